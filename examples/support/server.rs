//! A small prefork HTTPS server on the Rust API: the master sets up the shared cache, forks
//! workers that each build their `SSL_CTX` after the fork, share sessions and answer every
//! request with `worker <pid> reused <0|1> proto <version>`.
//!
//! Used by the demo (`examples/demo.rs`) and by the `cts-prefork-server` binary the tests run.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use openssl::ssl::{SslContext, SslContextBuilder, SslFiletype, SslMethod, SslOptions, SslVerifyMode, SslVersion};

use cluster_tls_store::{share_sessions_with, ShareOptions};

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServerOpts {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub share: bool,
    pub no_tickets: bool,
    pub tls12: bool,
    pub namespace: Option<String>,
    /// A second listener with this namespace (for isolation tests).
    pub second_namespace: Option<String>,
    /// Set the same host-chosen session id context on every context and ask the library to
    /// keep it, so only the namespace separates the caches.
    pub keep_sid_ctx: bool,
    /// Session timeout in seconds (OpenSSL's default is 300).
    pub session_timeout: Option<u32>,
    /// Accept threads per worker.
    pub threads: usize,
    /// Each worker calls `master_setup` and reports the result code in `/stats`.
    pub check_worker_api: bool,
    /// Build the `SSL_CTX` in the master before forking; workers share the inherited one.
    pub ctx_before_fork: bool,
    /// Ask every client for a certificate (any certificate is accepted).
    pub verify_client: bool,
    /// Use the cluster-wide ticket keys (else each worker keeps OpenSSL's own).
    pub share_tickets: bool,
}

impl ServerOpts {
    /// Sharing on, OpenSSL's defaults otherwise (TLS 1.3 with stateless tickets), one thread.
    pub fn new(cert: PathBuf, key: PathBuf) -> ServerOpts {
        ServerOpts {
            cert,
            key,
            share: true,
            no_tickets: false,
            tls12: false,
            namespace: None,
            second_namespace: None,
            keep_sid_ctx: false,
            session_timeout: None,
            threads: 1,
            check_worker_api: false,
            ctx_before_fork: false,
            verify_client: false,
            share_tickets: true,
        }
    }
}

static WORKER_SETUP_CODE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);
/// What `share_sessions` did with the (first) context's ticket keys, as `TicketMode as u32`.
static TICKET_MODE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn record_ticket_mode(ctx: &impl cluster_tls_store::AsSslContext) {
    let mode = cluster_tls_store::ticket_mode(ctx) as u32;
    let _ = TICKET_MODE.compare_exchange(
        0,
        mode,
        std::sync::atomic::Ordering::Relaxed,
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// A listening port reserved by the master: bound with SO_REUSEPORT but never listened on,
/// so it only holds the port number; each worker binds and listens on its own socket.
pub struct Reserved {
    _sock: OwnedFd,
    pub port: u16,
}

fn reuseport_socket(port: u16) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket calls on a descriptor we own; arguments are valid structs.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
            libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, opt, (&one as *const libc::c_int).cast(), 4);
        }
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_port = port.to_be();
        sa.sin_addr.s_addr = u32::from_be_bytes([127, 0, 0, 1]).to_be();
        if libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// Reserve `port` (0 = any free port) on 127.0.0.1.
pub fn reserve(port: u16) -> std::io::Result<Reserved> {
    let sock = reuseport_socket(port)?;
    // SAFETY: getsockname fills a sockaddr_in of the size we pass.
    let port = unsafe {
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        libc::getsockname(sock.as_raw_fd(), (&mut sa as *mut libc::sockaddr_in).cast(), &mut len);
        u16::from_be(sa.sin_port)
    };
    Ok(Reserved { _sock: sock, port })
}

/// A worker's own listener on a reserved port.
pub fn listen(port: u16) -> std::io::Result<TcpListener> {
    let fd = reuseport_socket(port)?;
    // SAFETY: `fd` is a bound TCP socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 1024) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(TcpListener::from(fd))
}

/// Build a server context the way a host would, then hand it to the library.
pub fn build_context(opts: &ServerOpts, namespace: Option<&str>) -> Result<SslContext, Box<dyn std::error::Error>> {
    let mut b = SslContextBuilder::new(SslMethod::tls_server())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    b.set_certificate_chain_file(&opts.cert)?;
    b.set_private_key_file(&opts.key, SslFiletype::PEM)?;
    if opts.tls12 {
        b.set_max_proto_version(Some(SslVersion::TLS1_2))?;
    }
    if opts.no_tickets {
        b.set_options(SslOptions::NO_TICKET);
    }
    if let Some(t) = opts.session_timeout {
        extern "C" {
            fn SSL_CTX_set_timeout(ctx: *mut openssl_sys::SSL_CTX, t: libc::c_long) -> libc::c_long;
        }
        // SAFETY: `b` owns a valid SSL_CTX; SSL_CTX_set_timeout only stores a number.
        unsafe { SSL_CTX_set_timeout(b.as_ptr(), libc::c_long::from(t)) };
    }
    if opts.verify_client {
        b.set_verify_callback(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT, |_, _| true);
    }
    if opts.keep_sid_ctx {
        b.set_session_id_context(b"host-chosen-context")?;
    }
    if opts.share {
        let o = ShareOptions { keep_session_id_context: opts.keep_sid_ctx, keep_ticket_keys: !opts.share_tickets };
        share_sessions_with(&b, namespace, o)?;
        record_ticket_mode(&b);
    }
    Ok(b.build())
}

/// Serve connections on `listener` forever with `threads` threads.
pub fn serve(listener: TcpListener, ctx: SslContext, threads: usize) -> ! {
    let listener = std::sync::Arc::new(listener);
    let mut handles = Vec::new();
    for _ in 1..threads.max(1) {
        let (l, c) = (listener.clone(), ctx.clone());
        handles.push(std::thread::spawn(move || accept_loop(&l, &c)));
    }
    accept_loop(&listener, &ctx);
    for h in handles {
        let _ = h.join();
    }
    std::process::exit(0)
}

fn accept_loop(listener: &TcpListener, ctx: &SslContext) {
    loop {
        let Ok((tcp, _)) = listener.accept() else { continue };
        let _ = handle(tcp, ctx);
    }
}

fn handle(tcp: TcpStream, ctx: &SslContext) -> Result<(), Box<dyn std::error::Error>> {
    tcp.set_read_timeout(Some(Duration::from_secs(2)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(2)))?;
    let ssl = openssl::ssl::Ssl::new(ctx)?;
    let mut s = ssl.accept(tcp)?;
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let pid = std::process::id();
    let reused = u8::from(s.ssl().session_reused());
    let body = if req.starts_with(b"GET /stats") {
        let st = cluster_tls_store::stats();
        format!(
            "stats role={} master_valid={} hits={} misses={} stores={} entries={} evictions={} expirations={} workers={} w_gets={} w_hits={} w_timeouts={} w_breaker_skips={} w_stateless_skipped={} w_master_gone={} w_oversize={} w_tickets_issued={} w_tickets_opened={} w_tickets_renewed={} w_tickets_refused={} ticket_rotations={} worker_setup_code={} ticket_mode={} sync_records={} sync_drops={} w_replica_hits={} w_replica_updates={} w_replica_flushes={} w_replica_decoded_hits={} ring_records={} ring_lost={} w_ring_puts={} pid={}\n",
            st.role, st.master_valid, st.master.hits, st.master.misses, st.master.stores, st.master.entries,
            st.master.evictions, st.master.expirations, st.master.workers, st.worker.gets, st.worker.hits,
            st.worker.timeouts, st.worker.breaker_skips, st.worker.stateless_skipped, st.worker.master_gone,
            st.worker.oversize,
            st.worker.tickets_issued,
            st.worker.tickets_opened,
            st.worker.tickets_renewed,
            st.worker.tickets_refused,
            st.master.ticket_rotations,
            WORKER_SETUP_CODE.load(std::sync::atomic::Ordering::Relaxed),
            TICKET_MODE.load(std::sync::atomic::Ordering::Relaxed),
            st.master.sync_records,
            st.master.sync_drops,
            st.worker.replica_hits,
            st.worker.replica_updates,
            st.worker.replica_flushes,
            st.worker.replica_decoded_hits,
            st.master.ring_records,
            st.master.ring_lost,
            st.worker.ring_puts,
            pid
        ) + &remote_stats(&st.master)
    } else {
        format!("worker {pid} reused {reused} proto {}\n", s.ssl().version_str())
    };
    let resp = format!(
        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes())?;
    // A clean shutdown: OpenSSL removes (cluster-wide, through our remove callback) the
    // session of a connection freed without one. `GET /forget` is freed without one, so
    // tests can remove a session.
    if !req.starts_with(b"GET /forget") {
        let _ = s.shutdown();
    }
    Ok(())
}

/// A running set of workers, forked from this process.
pub struct Workers {
    pub pids: Vec<i32>,
    pub port: u16,
    pub port2: Option<u16>,
}

/// Fork `n` workers serving `opts` on a reserved port (and a second one for the second
/// namespace). Returns in the parent only.
pub fn fork_workers(n: usize, opts: &ServerOpts, port: &Reserved, port2: Option<&Reserved>) -> Workers {
    let mut pids = Vec::new();
    let inherited = if opts.ctx_before_fork {
        let unshared = ServerOpts { share: false, ..opts.clone() };
        Some(build_context(&unshared, None).expect("context before fork"))
    } else {
        None
    };
    for _ in 0..n {
        // SAFETY: the child only builds its own state and serves; it never returns.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            if let Some(ctx) = &inherited {
                if opts.share {
                    let o = ShareOptions {
                        keep_session_id_context: opts.keep_sid_ctx,
                        keep_ticket_keys: !opts.share_tickets,
                    };
                    if let Err(e) = share_sessions_with(ctx, opts.namespace.as_deref(), o) {
                        eprintln!("worker: {e}");
                        std::process::exit(1);
                    }
                    record_ticket_mode(ctx);
                }
                let l = listen(port.port).expect("listen");
                serve(l, ctx.clone(), opts.threads);
            }
            worker_main(opts, port.port, port2.map(|p| p.port));
        }
        if pid > 0 {
            pids.push(pid);
        }
    }
    Workers { pids, port: port.port, port2: port2.map(|p| p.port) }
}

/// A worker: contexts built after the fork, then serve.
pub fn worker_main(opts: &ServerOpts, port: u16, port2: Option<u16>) -> ! {
    if opts.check_worker_api {
        let code = match cluster_tls_store::master_setup(cluster_tls_store::Config::default()) {
            Ok(()) => 0,
            Err(e) => e.code(),
        };
        WORKER_SETUP_CODE.store(code, std::sync::atomic::Ordering::Relaxed);
    }
    let run = || -> Result<(), Box<dyn std::error::Error>> {
        if let (Some(p2), Some(ns2)) = (port2, opts.second_namespace.as_deref()) {
            let ctx2 = build_context(opts, Some(ns2))?;
            let l2 = listen(p2)?;
            let threads = opts.threads;
            std::thread::spawn(move || serve(l2, ctx2, threads));
        }
        let ctx = build_context(opts, opts.namespace.as_deref())?;
        let l = listen(port)?;
        serve(l, ctx, opts.threads)
    };
    if let Err(e) = run() {
        eprintln!("worker {}: {e}", std::process::id());
        std::process::exit(1);
    }
    std::process::exit(0)
}

/// The address of a port on loopback.
pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The remote tier's counters, for `GET /stats`.
fn remote_stats(m: &cluster_tls_store::MasterStats) -> String {
    format!(
        "remote_state={} remote_hits={} remote_misses={} remote_errors={} remote_queue_drops={} remote_open_failures={} remote_skips={} remote_stores={}\n",
        m.remote_state,
        m.remote_hits,
        m.remote_misses,
        m.remote_errors,
        m.remote_queue_drops,
        m.remote_open_failures,
        m.remote_skips,
        m.remote_stores
    )
}
