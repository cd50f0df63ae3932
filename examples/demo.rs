//! The demo: a prefork TLS server whose workers resume each other's sessions.
//!
//! `cargo run --release --example demo` starts a 4-worker server on the Rust API with a
//! certificate made at run time, then a client makes one full handshake and resumes 100
//! times; connections land on random workers (each worker has its own SO_REUSEPORT
//! listener). It prints, per worker, connections served and how many were resumptions, with
//! sharing on and then off, for TLS 1.2 session ids, TLS 1.3 stateful tickets and TLS 1.3's
//! default stateless tickets (cluster-wide ticket keys). It exits 0 only when sharing on
//! resumed every connection.

#[path = "support/cert.rs"]
mod cert;
#[path = "support/client.rs"]
mod client;
#[path = "support/server.rs"]
mod server;

use std::collections::BTreeMap;
use std::time::Duration;

use cluster_tls_store::{master_setup, Config};
use server::ServerOpts;

const WORKERS: usize = 4;
const RESUMES: usize = 100;

struct Run {
    resumed: usize,
    workers_seen: usize,
}

/// Stops and reaps the workers however a run ends, an error included (they have no
/// parent-death signal and would go on listening after the demo exits).
struct StopOnDrop(Vec<libc::pid_t>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            // SAFETY: signalling and reaping our own children.
            unsafe {
                libc::kill(*pid, libc::SIGTERM);
                libc::waitpid(*pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

fn run(opts: &ServerOpts, title: &str) -> Result<Run, Box<dyn std::error::Error>> {
    let reserved = server::reserve(0)?;
    let w = server::fork_workers(WORKERS, opts, &reserved, None);
    let workers = StopOnDrop(w.pids.clone());
    let addr = server::addr(w.port);
    for _ in 0..300 {
        if std::net::TcpStream::connect(addr).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    let mut c = client::Client::new(opts.tls12);
    let first = c.request(addr, "/")?;
    let mut per: BTreeMap<u32, (usize, usize)> = BTreeMap::new();
    per.entry(first.pid).or_default().0 += 1;
    let mut resumed = 0;
    for _ in 0..RESUMES {
        let o = c.request(addr, "/")?;
        let e = per.entry(o.pid).or_default();
        e.0 += 1;
        if o.reused {
            e.1 += 1;
            resumed += 1;
        }
    }
    drop(workers);
    println!("\n== {title} ==");
    println!("  {:>10}  {:>11}  {:>8}", "worker pid", "connections", "resumed");
    for (pid, (n, r)) in &per {
        println!("  {pid:>10}  {n:>11}  {r:>8}");
    }
    println!(
        "  1 full handshake (worker {}), then {resumed}/{RESUMES} resumed ({:.1}%) across {} workers",
        first.pid,
        100.0 * resumed as f64 / RESUMES as f64,
        per.len()
    );
    Ok(Run { resumed, workers_seen: per.len() })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("cts-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = cert::make_cert(&dir)?;
    master_setup(Config::default())?;
    println!("cluster-tls-store demo: {WORKERS} prefork workers, 1 client, 1 full handshake + {RESUMES} resumptions");
    let base =
        ServerOpts { no_tickets: true, tls12: true, namespace: Some("demo".into()), ..ServerOpts::new(cert, key) };
    let mut ok = true;
    let runs = [
        (true, true, "TLS 1.2 session ids"),
        (false, true, "TLS 1.3 stateful tickets"),
        (false, false, "TLS 1.3 default (stateless) tickets"),
    ];
    for (tls12, no_tickets, proto) in runs {
        let on = ServerOpts { tls12, no_tickets, ..base.clone() };
        let r_on = run(&on, &format!("{proto}, sharing ON"))?;
        let off = ServerOpts { share: false, ..on };
        let r_off = run(&off, &format!("{proto}, sharing OFF (OpenSSL's per-process cache)"))?;
        println!("  => {proto}: {}/{RESUMES} resumed with sharing, {}/{RESUMES} without", r_on.resumed, r_off.resumed);
        ok &= r_on.resumed == RESUMES && r_on.workers_seen > 1;
    }
    let st = cluster_tls_store::stats();
    println!(
        "\nmaster cache: {} hits, {} misses, {} stores, {} sessions held ({} bytes)",
        st.master.hits, st.master.misses, st.master.stores, st.master.entries, st.master.bytes
    );
    let _ = std::fs::remove_dir_all(&dir);
    if ok {
        println!("\nOK: with sharing on, every connection resumed, whichever worker it landed on.");
        Ok(())
    } else {
        println!("\nFAILED: with sharing on, some connections did not resume.");
        std::process::exit(1)
    }
}
