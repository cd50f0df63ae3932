//! Load generator for the handshake benchmarks of issue 4 (`bench/run.sh`).
//!
//! K client threads reconnect in a loop to HOST:PORT for a fixed time. Each connection does a
//! TLS handshake, sends `GET / HTTP/1.0`, reads the reply to the end, shuts TLS down
//! (close_notify) and closes. By default every client offers the newest session it holds
//! (TLS 1.2 session ids with `--tls12`, TLS 1.3 tickets with `--tls13`: stateful when the
//! server runs with `SSL_OP_NO_TICKET`), so the figures are resumed handshakes/s and the
//! resumption rate. `--full` never offers a session: full handshakes/s.
//!
//! ```text
//! cargo run --release --example loadgen -- --port P [--host 127.0.0.1] [--clients 8]
//!     [--duration-ms 3000] [--warmup-ms 300] [--tls12 | --tls13] [--full] [--label TEXT]
//! ```
//!
//! Connections that start during the warm-up (the first full handshake of each client) are
//! not counted. Prints one JSON line (`{"bench":"loadgen",...}`) and one human line.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl::ssl::{SslConnector, SslMethod, SslSession, SslVerifyMode, SslVersion};

struct Opts {
    addr: SocketAddr,
    clients: usize,
    duration: Duration,
    warmup: Duration,
    tls12: bool,
    full: bool,
    label: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: loadgen --port P [--host H] [--clients K] [--duration-ms MS] [--warmup-ms MS] \
         [--tls12|--tls13] [--full] [--label TEXT]"
    );
    std::process::exit(2)
}

fn parse() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut host, mut port) = ("127.0.0.1".to_string(), None::<u16>);
    let mut o = Opts {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        clients: 8,
        duration: Duration::from_millis(3000),
        warmup: Duration::from_millis(300),
        tls12: false,
        full: false,
        label: String::new(),
    };
    let mut i = 0;
    while i < args.len() {
        let flag = args[i].as_str();
        match flag {
            "--tls12" => o.tls12 = true,
            "--tls13" => o.tls12 = false,
            "--full" => o.full = true,
            _ => {
                let Some(v) = args.get(i + 1) else { usage() };
                let num = || v.parse::<u64>().unwrap_or_else(|_| usage());
                match flag {
                    "--host" => host = v.clone(),
                    "--port" => port = Some(u16::try_from(num()).unwrap_or_else(|_| usage())),
                    "--clients" => o.clients = (num() as usize).max(1),
                    "--duration-ms" => o.duration = Duration::from_millis(num().max(1)),
                    "--warmup-ms" => o.warmup = Duration::from_millis(num()),
                    "--label" => o.label = v.clone(),
                    _ => usage(),
                }
                i += 1;
            }
        }
        i += 1;
    }
    let Some(port) = port else { usage() };
    o.addr = (host.as_str(), port).to_socket_addrs().ok().and_then(|mut a| a.next()).unwrap_or_else(|| usage());
    o
}

/// What one client thread counted inside the measurement window.
#[derive(Default)]
struct Tally {
    handshakes: u64,
    offered: u64,
    resumed: u64,
    errors: u64,
    /// Every completed connection, warm-up and the run's edges included (to divide the
    /// server's CPU time by).
    all: u64,
    /// Connection times (connect to close) in microseconds.
    micros: Vec<u32>,
    last_error: Option<String>,
}

/// One connection: handshake, `GET /`, read to the end, close_notify. Returns whether the
/// session was resumed and the newest session the server gave.
fn connect_once(
    connector: &SslConnector,
    addr: SocketAddr,
    session: Option<&SslSession>,
) -> Result<(bool, Option<SslSession>), String> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = tcp.set_write_timeout(Some(Duration::from_secs(3)));
    let cfg = connector.configure().map_err(|e| e.to_string())?;
    let mut ssl = cfg
        .use_server_name_indication(false)
        .verify_hostname(false)
        .into_ssl("localhost")
        .map_err(|e| e.to_string())?;
    if let Some(s) = session {
        // SAFETY: the session was made by a connection of this same connector (same SSL_CTX).
        unsafe { ssl.set_session(s) }.map_err(|e| e.to_string())?;
    }
    let mut s = ssl.connect(tcp).map_err(|e| format!("handshake: {e}"))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    let mut reply = Vec::with_capacity(256);
    // The server answers, sends close_notify and closes; read_to_end stops at close_notify.
    let read = s.read_to_end(&mut reply);
    if reply.is_empty() {
        return Err(format!("no reply: {read:?}"));
    }
    let resumed = s.ssl().session_reused();
    let newest = s.ssl().session().map(|x| x.to_owned());
    let _ = s.shutdown();
    Ok((resumed, newest))
}

fn client(o: Arc<Opts>, start: Instant) -> Tally {
    let mut b = match SslConnector::builder(SslMethod::tls_client()) {
        Ok(b) => b,
        Err(e) => return Tally { errors: 1, last_error: Some(e.to_string()), ..Tally::default() },
    };
    b.set_verify(SslVerifyMode::NONE);
    let v = if o.tls12 { SslVersion::TLS1_2 } else { SslVersion::TLS1_3 };
    if b.set_min_proto_version(Some(v)).and_then(|_| b.set_max_proto_version(Some(v))).is_err() {
        return Tally { errors: 1, last_error: Some("protocol version".into()), ..Tally::default() };
    }
    let connector = b.build();
    let measure_from = start + o.warmup;
    let end = measure_from + o.duration;
    let mut t = Tally { micros: Vec::with_capacity(1 << 16), ..Tally::default() };
    let mut session: Option<SslSession> = None;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let offer = if o.full { None } else { session.as_ref() };
        let offered = offer.is_some();
        let r = connect_once(&connector, o.addr, offer);
        let t1 = Instant::now();
        let counted = t0 >= measure_from && t1 <= end;
        match r {
            Ok((resumed, newest)) => {
                t.all += 1;
                if newest.is_some() {
                    session = newest;
                }
                if counted {
                    t.handshakes += 1;
                    t.offered += u64::from(offered);
                    t.resumed += u64::from(resumed);
                    t.micros.push((t1 - t0).as_micros().min(u32::MAX as u128) as u32);
                }
            }
            Err(e) => {
                if counted {
                    t.errors += 1;
                }
                t.last_error = Some(e);
                session = None;
                // Do not spin against a server that is gone.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    t
}

fn main() {
    let o = Arc::new(parse());
    let start = Instant::now();
    let handles: Vec<_> = (0..o.clients)
        .map(|_| {
            let o = Arc::clone(&o);
            std::thread::spawn(move || client(o, start))
        })
        .collect();
    let mut all = Tally::default();
    for h in handles {
        let t = h.join().unwrap_or_else(|_| Tally {
            errors: 1,
            last_error: Some("client panicked".into()),
            ..Tally::default()
        });
        all.handshakes += t.handshakes;
        all.offered += t.offered;
        all.resumed += t.resumed;
        all.errors += t.errors;
        all.all += t.all;
        all.micros.extend(t.micros);
        if t.last_error.is_some() {
            all.last_error = t.last_error;
        }
    }
    all.micros.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.micros.is_empty() {
            return f64::NAN;
        }
        all.micros[((all.micros.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
    };
    let secs = o.duration.as_secs_f64();
    // The client's own CPU time, whole run (warm-up included, like `connections_total`): the
    // clients do the same work against every server, so server CPU / client CPU compares
    // servers with the machine's speed of the moment divided out.
    // SAFETY: getrusage fills the zeroed struct it is given.
    let client_cpu_ms = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        let us = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
        us(ru.ru_utime) + us(ru.ru_stime)
    };
    let rate = all.handshakes as f64 / secs;
    let resumed_rate = all.resumed as f64 / secs;
    let resumption = if all.offered > 0 { all.resumed as f64 / all.offered as f64 } else { f64::NAN };
    let num = |x: f64| if x.is_finite() { format!("{x:.6}") } else { "null".to_string() };
    let err = all.last_error.as_deref().unwrap_or("").replace(['"', '\\'], "'");
    println!(
        "{{\"bench\":\"loadgen\",\"label\":\"{}\",\"proto\":\"{}\",\"mode\":\"{}\",\"clients\":{},\"duration_s\":{secs:.3},\
         \"handshakes\":{},\"handshakes_per_s\":{},\"offered\":{},\"resumed\":{},\"resumed_per_s\":{},\
         \"resumption_rate\":{},\"errors\":{},\"connections_total\":{},\"client_cpu_ms\":{client_cpu_ms:.1},\"p50_ms\":{},\"p99_ms\":{},\"last_error\":\"{err}\"}}",
        o.label.replace(['"', '\\'], "'"),
        if o.tls12 { "tls1.2" } else { "tls1.3" },
        if o.full { "full" } else { "resume" },
        o.clients,
        all.handshakes,
        num(rate),
        all.offered,
        all.resumed,
        num(resumed_rate),
        num(resumption),
        all.errors,
        all.all,
        num(pct(0.5)),
        num(pct(0.99)),
    );
    eprintln!(
        "loadgen {}: {} clients, {:.1} s: {} connections ({:.0}/s), resumed {}/{} ({:.3} %), errors {}, p50 {:.2} ms, \
         p99 {:.2} ms{}",
        o.label,
        o.clients,
        secs,
        all.handshakes,
        rate,
        all.resumed,
        all.offered,
        resumption * 100.0,
        all.errors,
        pct(0.5),
        pct(0.99),
        if all.errors > 0 { format!(" (last error: {err})") } else { String::new() }
    );
}
