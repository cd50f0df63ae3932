//! Codec benchmark (issue 4): what a cache outside the worker process pays per session that
//! OpenSSL's own in-process cache does not. OpenSSL's cache keeps the `SSL_SESSION` object; a
//! shared cache keeps bytes, so each new session is encoded (`i2d_SSL_SESSION` twice: its
//! length, then the bytes, as the store's new-session callback does) and each hit decoded
//! (`d2i_SSL_SESSION`, and the decoded copy freed when its connection ends). nginx's
//! `shared:SSL` cache does the same two calls (`ngx_ssl_new_session`,
//! `ngx_ssl_get_cached_session`), so this is the floor of any shared cache built on OpenSSL's
//! public API, and most of what separates store on from the in-process ideal in TLS 1.3.
//!
//! Real sessions from real handshakes: a server thread accepts TLS connections on 127.0.0.1
//! from a client thread that reconnects with its newest session (TLS 1.2 session ids and TLS
//! 1.3 stateful tickets, P-256 certificate). Right after each resumed handshake the server
//! encodes the session it has just made and decodes the bytes, timed one by one: the caches
//! are then as a worker's are when the callbacks run (`after_handshake`). The server thread's
//! CPU time for the handshake itself is measured too, for scale. Then the same session is
//! encoded and decoded in a tight loop (`hot`: what a microbenchmark of the two calls shows).
//!
//! Output: JSON lines (`{"bench":"codec",...}`) and a table. Options: `--connections N`
//! (default 600 per protocol), `--hot N` (default 20000). `cargo bench --bench codec` passes
//! `--bench`, which is ignored.

#[path = "../examples/support/cert.rs"]
mod cert;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openssl::ssl::{
    SslAcceptor, SslConnector, SslMethod, SslOptions, SslSession, SslSessionCacheMode, SslVerifyMode, SslVersion,
};

type Latest = Arc<Mutex<Option<SslSession>>>;

/// How long either side waits for the other before the bench fails (instead of hanging).
const DEADLINE: Duration = Duration::from_secs(10);

/// The next connection, or a panic once `limit` passes without one (the client thread died).
fn accept_within(listener: &TcpListener, limit: Duration) -> TcpStream {
    let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, limit.as_millis() as libc::c_int) };
    assert_eq!(ready, 1, "no connection within {limit:?}: the client thread failed");
    listener.accept().expect("accept").0
}

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Median and 90th percentile of `v` (sorted in place).
fn p50_p90(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return (0.0, 0.0);
    }
    (v[v.len() / 2], v[(v.len() * 9 / 10).min(v.len() - 1)])
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Row {
    proto: &'static str,
    /// Whether a resumed connection makes a new session (so is encoded too).
    new_per_resumption: bool,
    der_len: usize,
    resumed: usize,
    handshake_cpu: (f64, f64),
    encode: (f64, f64),
    decode: (f64, f64),
    free: (f64, f64),
    hot_encode: f64,
    hot_decode: f64,
    hot_free: f64,
}

impl Row {
    /// What the store adds to one resumed connection, µs (p50s): the lookup's decode and the
    /// copy's free, and the new session's encode where one is made.
    fn per_resumption(&self) -> f64 {
        self.decode.0 + self.free.0 + if self.new_per_resumption { self.encode.0 } else { 0.0 }
    }

    /// `per_resumption` as a share of the handshake's server CPU (p50s).
    fn share(&self) -> f64 {
        if self.handshake_cpu.0 > 0.0 {
            self.per_resumption() / self.handshake_cpu.0
        } else {
            0.0
        }
    }

    /// The timed steps after each handshake, by the name their JSON fields carry.
    fn timings(&self) -> [(&'static str, (f64, f64)); 4] {
        [("handshake_cpu", self.handshake_cpu), ("encode", self.encode), ("decode", self.decode), ("free", self.free)]
    }
}

fn run(
    proto: &'static str,
    version: SslVersion,
    connections: usize,
    hot: usize,
    certs: &(std::path::PathBuf, std::path::PathBuf),
) -> Row {
    let made: Latest = Arc::new(Mutex::new(None));
    let mut sb = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).expect("acceptor");
    sb.set_certificate_chain_file(&certs.0).expect("certificate");
    sb.set_private_key_file(&certs.1, openssl::ssl::SslFiletype::PEM).expect("key");
    sb.set_min_proto_version(Some(version)).expect("version");
    sb.set_max_proto_version(Some(version)).expect("version");
    // Stateful resumption, as the store serves it: session ids in TLS 1.2, tickets that name a
    // cached session in TLS 1.3.
    sb.set_options(SslOptions::NO_TICKET);
    sb.set_session_cache_mode(SslSessionCacheMode::SERVER);
    sb.set_session_id_context(b"codec").expect("sid ctx");
    let m = made.clone();
    sb.set_new_session_callback(move |_, s| *m.lock().expect("lock") = Some(s));
    let acceptor = sb.build();

    let latest: Latest = Arc::new(Mutex::new(None));
    let mut cb = SslConnector::builder(SslMethod::tls_client()).expect("connector");
    cb.set_verify(SslVerifyMode::NONE);
    cb.set_min_proto_version(Some(version)).expect("version");
    cb.set_max_proto_version(Some(version)).expect("version");
    cb.set_session_cache_mode(SslSessionCacheMode::CLIENT);
    let l = latest.clone();
    cb.set_new_session_callback(move |_, s| *l.lock().expect("lock") = Some(s));
    let connector = cb.build();

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let client = std::thread::spawn(move || {
        for _ in 0..connections {
            let tcp = TcpStream::connect(addr).expect("connect");
            tcp.set_nodelay(true).ok();
            tcp.set_read_timeout(Some(DEADLINE)).ok();
            let mut cfg = connector.configure().expect("configure");
            cfg.set_verify_hostname(false);
            cfg.set_use_server_name_indication(false);
            let mut ssl = cfg.into_ssl("localhost").expect("ssl");
            if let Some(s) = latest.lock().expect("lock").clone() {
                // SAFETY: the session comes from a context of the same method.
                unsafe { ssl.set_session(&s).expect("set session") };
            }
            let mut stream = openssl::ssl::SslStream::new(ssl, tcp).expect("stream");
            stream.connect().expect("client handshake");
            stream.write_all(b"x").expect("write");
            let mut b = [0u8; 1];
            // Reading the reply also reads a TLS 1.3 ticket sent before it.
            stream.read_exact(&mut b).expect("read");
            let _ = stream.shutdown();
        }
    });

    let (mut hs, mut enc, mut dec, mut fre) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut der_len = 0;
    let mut new_per_resumption = false;
    let mut last: Option<SslSession> = None;
    for _ in 0..connections {
        let tcp = accept_within(&listener, DEADLINE);
        tcp.set_nodelay(true).ok();
        tcp.set_read_timeout(Some(DEADLINE)).ok();
        let c0 = thread_cpu();
        let mut stream = acceptor.accept(tcp).expect("server handshake");
        let handshake = thread_cpu() - c0;
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).expect("read");
        stream.write_all(b"y").expect("write");
        let resumed = stream.ssl().session_reused();
        // TLS 1.3 makes a new session on every connection (the ticket it sends); TLS 1.2 only
        // on a full handshake, and a resumed connection goes on with the one it found.
        let new = made.lock().expect("lock").take();
        let makes_new = new.is_some();
        let Some(sess) = new.or_else(|| stream.ssl().session().map(|s| s.to_owned())) else { continue };
        let _ = stream.shutdown();
        // Encode as the store's new-session callback does (length, then bytes)...
        let t = Instant::now();
        let der = sess.to_der().expect("i2d");
        let e = t.elapsed();
        // ... and decode as a lookup does, with its id check; the copy is freed when the
        // connection that resumed it ends.
        let t = Instant::now();
        let decoded = SslSession::from_der(&der).expect("d2i");
        assert_eq!(decoded.id(), sess.id(), "decoded session has another id");
        let d = t.elapsed();
        let t = Instant::now();
        drop(decoded);
        let f = t.elapsed();
        der_len = der.len();
        if resumed {
            new_per_resumption = makes_new;
            hs.push(us(handshake));
            enc.push(us(e));
            dec.push(us(d));
            fre.push(us(f));
        }
        last = Some(sess);
    }
    client.join().expect("client thread");
    let sess = last.expect("no session was made");
    let der = sess.to_der().expect("i2d");
    let t = Instant::now();
    for _ in 0..hot {
        std::hint::black_box(sess.to_der().expect("i2d"));
    }
    let hot_encode = us(t.elapsed()) / hot as f64;
    let (mut dt, mut ft) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..hot {
        let t = Instant::now();
        let d = SslSession::from_der(std::hint::black_box(&der)).expect("d2i");
        let t2 = Instant::now();
        drop(d);
        ft += t2.elapsed();
        dt += t2 - t;
    }
    Row {
        proto,
        new_per_resumption,
        der_len,
        resumed: enc.len(),
        handshake_cpu: p50_p90(&mut hs),
        encode: p50_p90(&mut enc),
        decode: p50_p90(&mut dec),
        free: p50_p90(&mut fre),
        hot_encode,
        hot_decode: us(dt) / hot as f64,
        hot_free: us(ft) / hot as f64,
    }
}

fn main() {
    let connections = arg("--connections", 600).max(2);
    let hot = arg("--hot", 20_000).max(1);
    let dir = std::env::temp_dir().join(format!("cts-codec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let certs = cert::make_cert(&dir).expect("certificate");
    let t0 = Instant::now();
    let rows = [
        run("tls12", SslVersion::TLS1_2, connections, hot, &certs),
        run("tls13", SslVersion::TLS1_3, connections, hot, &certs),
    ];
    let _ = std::fs::remove_dir_all(&dir);
    for r in &rows {
        let mut fields = vec![
            format!("\"proto\":\"{}\"", r.proto),
            format!("\"encodes_per_resumption\":{}", u8::from(r.new_per_resumption)),
            format!("\"der_bytes\":{}", r.der_len),
            format!("\"resumed\":{}", r.resumed),
        ];
        for (name, (p50, p90)) in r.timings() {
            fields.push(format!("\"{name}_us_p50\":{p50:.3},\"{name}_us_p90\":{p90:.3}"));
        }
        fields.push(format!("\"codec_us_p50\":{:.3}", r.per_resumption()));
        fields.push(format!("\"codec_share_of_handshake\":{:.4}", r.share()));
        fields.push(format!(
            "\"hot_encode_us\":{:.3},\"hot_decode_us\":{:.3},\"hot_free_us\":{:.3}",
            r.hot_encode, r.hot_decode, r.hot_free
        ));
        println!("{{\"bench\":\"codec\",{}}}", fields.join(","));
    }
    println!();
    println!("codec bench: {connections} connections per protocol, {hot} hot rounds; µs, p50 (p90)");
    println!("proto    DER  resumed hs (CPU)  encode  decode  free  per conn.  hot: encode / decode / free");
    for r in &rows {
        let cells: Vec<String> = r.timings().iter().map(|(_, (p50, p90))| format!("{p50:.2} ({p90:.2})")).collect();
        println!(
            "{:<6} {:>5}  {}  {:.2} ({:.1} %)  {:.2} / {:.2} / {:.2}",
            r.proto,
            r.der_len,
            cells.join("  "),
            r.per_resumption(),
            100.0 * r.share(),
            r.hot_encode,
            r.hot_decode,
            r.hot_free,
        );
    }
    println!(
        "resumed handshakes timed: {} / {}; total {:.1} s",
        rows[0].resumed,
        rows[1].resumed,
        t0.elapsed().as_secs_f64()
    );
}
