//! `cts-prefork-server`: a prefork HTTPS server on the Rust API, for tests and experiments.
//!
//! ```text
//! cts-prefork-server --cert F --key F [--port P] [--workers N] [--threads T] [--no-share]
//!     [--no-tickets] [--tls12] [--ns NAME] [--ns2 NAME] [--keep-sid-ctx] [--ctx-before-fork] [--verify-client] [--max-session-bytes N]
//!     [--no-share-tickets (keep the context's own keys)] [--tickets-off] [--ticket-rotation S] [--ticket-keys K] [--ticket-key-file F]
//!     [--session-timeout S] [--get-timeout-us N] [--cache-bytes N] [--replica-bytes N] [--max-lifetime S]
//! ```
//! Prints `ready port=P [port2=Q] workers=N` and one `worker pid=X` line per worker, then
//! waits for its workers. `--workers 0` serves from the master itself (in-process cache).
//! The server puts itself in its own process group so a test can stop everything at once.

#[path = "../../examples/support/server.rs"]
mod server;

use std::io::Write;
use std::time::Duration;

use cluster_tls_store::{master_setup, Config};
use server::ServerOpts;

fn usage(msg: &str) -> ! {
    eprintln!("cts-prefork-server: {msg}");
    std::process::exit(2)
}

fn main() {
    let mut opts = ServerOpts::new("".into(), "".into());
    let mut config = Config::default();
    let (mut port, mut workers) = (0u16, 4usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage(&format!("{a} needs a value")));
        let num = |v: String| -> u64 { v.parse().unwrap_or_else(|_| usage(&format!("not a number: {v}"))) };
        match a.as_str() {
            "--cert" => opts.cert = val().into(),
            "--key" => opts.key = val().into(),
            "--port" => port = num(val()) as u16,
            "--workers" => workers = num(val()) as usize,
            "--threads" => opts.threads = num(val()) as usize,
            "--no-share" => opts.share = false,
            "--no-tickets" => opts.no_tickets = true,
            "--tls12" => opts.tls12 = true,
            "--ns" => opts.namespace = Some(val()),
            "--ns2" => opts.second_namespace = Some(val()),
            "--keep-sid-ctx" => opts.keep_sid_ctx = true,
            "--check-worker-api" => opts.check_worker_api = true,
            "--ctx-before-fork" => opts.ctx_before_fork = true,
            "--verify-client" => opts.verify_client = true,
            "--no-share-tickets" => opts.share_tickets = false,
            "--tickets-off" => config.share_tickets = false,
            "--ticket-rotation" => config.ticket_key_rotation = Duration::from_secs(num(val())),
            "--ticket-keys" => config.ticket_keys = num(val()) as u32,
            "--ticket-key-file" => config.ticket_key_file = Some(val().into()),
            "--max-session-bytes" => config.max_session_bytes = num(val()) as usize,
            "--session-timeout" => opts.session_timeout = Some(num(val()) as u32),
            "--get-timeout-us" => config.get_timeout = Duration::from_micros(num(val())),
            "--cache-bytes" => config.cache_bytes = num(val()) as usize,
            "--replica-bytes" => config.replica_bytes = num(val()) as usize,
            "--max-lifetime" => config.max_lifetime = Duration::from_secs(num(val())),
            "--breaker-max-backoff-ms" => config.breaker_max_backoff = Duration::from_millis(num(val())),
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    if opts.cert.as_os_str().is_empty() || opts.key.as_os_str().is_empty() {
        usage("--cert and --key are required");
    }
    // SAFETY: setpgid(0, 0) only changes this process's own group.
    unsafe { libc::setpgid(0, 0) };
    if opts.share {
        if let Err(e) = master_setup(config) {
            usage(&format!("master_setup: {e}"));
        }
    }
    let reserved = server::reserve(port).unwrap_or_else(|e| usage(&format!("port {port}: {e}")));
    let reserved2 =
        opts.second_namespace.as_ref().map(|_| server::reserve(0).unwrap_or_else(|e| usage(&e.to_string())));
    let port2 = reserved2.as_ref().map(|r| format!(" port2={}", r.port)).unwrap_or_default();
    if workers == 0 {
        println!("ready port={}{port2} workers=0", reserved.port);
        println!("worker pid={}", std::process::id());
        let _ = std::io::stdout().flush();
        server::worker_main(&opts, reserved.port, reserved2.as_ref().map(|r| r.port));
    }
    let w = server::fork_workers(workers, &opts, &reserved, reserved2.as_ref());
    // Give the workers a moment to listen before announcing readiness.
    for _ in 0..200 {
        if std::net::TcpStream::connect(server::addr(w.port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    println!("ready port={}{port2} workers={}", w.port, w.pids.len());
    for p in &w.pids {
        println!("worker pid={p}");
    }
    let _ = std::io::stdout().flush();
    let mut status = 0;
    // SAFETY: waitpid on our own children with a valid status pointer.
    while unsafe { libc::waitpid(-1, &mut status, 0) } > 0 {}
}
