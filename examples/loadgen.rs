//! Load generator for the handshake benchmarks of issue 4 (`bench/run.sh`).
//!
//! K client threads reconnect in a loop. Each connection does a TLS handshake, sends
//! `GET / HTTP/1.0`, reads the reply to the end, shuts TLS down (close_notify) and closes. By
//! default every client offers the newest session it holds for that server (TLS 1.2 session
//! ids with `--tls12`, TLS 1.3 tickets with `--tls13`: stateful when the server runs with
//! `SSL_OP_NO_TICKET`), so the figures are resumed handshakes/s and the resumption rate.
//! `--full` never offers a session: full handshakes/s.
//!
//! ```text
//! cargo run --release --example loadgen -- (--port P [--host H] | --target NAME=PORT[:PID] ...)
//!     [--clients 8] [--duration-ms 3000] [--slices 1] [--turn-ms MS] [--warmup-ms 300]
//!     [--tls12 | --tls13] [--full] [--source-addrs] [--label TEXT]
//! ```
//!
//! `--source-addrs`: client c connects from 127.0.0.(2 + c) rather than 127.0.0.1, as distinct
//! clients would. Every target sees the same clients; a server that steers connections by
//! client address (the C example's `--sticky`) then gives each client one worker.
//!
//! With several `--target`s the servers are measured interleaved, so that a comparison
//! between them is not skewed by the machine's speed changing under it (on a shared machine
//! it swings by ±15 % over seconds). Time is cut into turns of `--turn-ms`; in each turn every
//! client works against one target, and the targets take turns in an order that rotates by
//! one each time. A slice is `--duration-ms` of turns for every target; `--slices` of them are
//! made and each is reported on its own line. At the end of a turn every client finishes the
//! connection it has in flight, then all wait for each other, so no work for one server spills
//! into another's turn. With a `:PID`, the CPU time of that process, its children and all
//! their threads (`/proc/<pid>/task/*/schedstat`) is read at both ends of each of the
//! target's turns: `server_cpu_ms`.
//!
//! Rates are K / the mean connection time (connections over the clients' busy time, that is
//! from the start of a turn to the end of the last connection started in it), which does not
//! depend on how long the turn's last connections overhang it. Before the first slice each
//! target gets one uncounted turn of `--warmup-ms` (each client's first full handshake).
//! Prints one JSON line (`{"bench":"loadgen",...}`) per slice and target on stdout and one
//! human line each on stderr.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use openssl::ssl::{SslConnector, SslMethod, SslSession, SslVerifyMode, SslVersion};

struct Target {
    name: String,
    addr: SocketAddr,
    /// The server's top process, whose CPU time (with its children's) is read around turns.
    pid: Option<i32>,
}

pub struct Opts {
    targets: Vec<Target>,
    clients: usize,
    duration: Duration,
    turn: Option<Duration>,
    slices: usize,
    warmup: Duration,
    tls12: bool,
    full: bool,
    /// Client c connects from 127.0.0.(2 + c) (`--source-addrs`), so a server that steers by
    /// source address (the C example's `--sticky`) always hands it the same worker.
    source_addrs: bool,
    label: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: loadgen (--port P [--host H] | --target NAME=PORT[:PID] ...) [--clients K] [--duration-ms MS] \
         [--slices S] [--turn-ms MS] [--warmup-ms MS] [--tls12|--tls13] [--full] [--source-addrs] [--label TEXT]"
    );
    std::process::exit(2)
}

/// Options from the arguments (without the program name); exits with the usage on an error.
pub fn parse(args: &[String]) -> Opts {
    let (mut host, mut port) = ("127.0.0.1".to_string(), None::<u16>);
    let mut targets: Vec<(String, u16, Option<i32>)> = Vec::new();
    let mut o = Opts {
        targets: Vec::new(),
        clients: 8,
        duration: Duration::from_millis(3000),
        turn: None,
        slices: 1,
        warmup: Duration::from_millis(300),
        tls12: false,
        full: false,
        source_addrs: false,
        label: String::new(),
    };
    let mut i = 0;
    while i < args.len() {
        let flag = args[i].as_str();
        match flag {
            "--tls12" => o.tls12 = true,
            "--tls13" => o.tls12 = false,
            "--full" => o.full = true,
            "--source-addrs" => o.source_addrs = true,
            _ => {
                let Some(v) = args.get(i + 1) else { usage() };
                let num = || v.parse::<u64>().unwrap_or_else(|_| usage());
                match flag {
                    "--host" => host = v.clone(),
                    "--port" => port = Some(u16::try_from(num()).unwrap_or_else(|_| usage())),
                    "--target" => targets.push(parse_target(v)),
                    "--clients" => o.clients = (num() as usize).max(1),
                    "--duration-ms" => o.duration = Duration::from_millis(num().max(1)),
                    "--turn-ms" => o.turn = Some(Duration::from_millis(num().max(1))),
                    "--slices" => o.slices = (num() as usize).max(1),
                    "--warmup-ms" => o.warmup = Duration::from_millis(num()),
                    "--label" => o.label = v.clone(),
                    _ => usage(),
                }
                i += 1;
            }
        }
        i += 1;
    }
    if let Some(p) = port {
        targets.push((o.label.clone(), p, None));
    }
    if targets.is_empty() {
        usage()
    }
    for (name, p, pid) in targets {
        let addr = (host.as_str(), p).to_socket_addrs().ok().and_then(|mut a| a.next()).unwrap_or_else(|| usage());
        o.targets.push(Target { name, addr, pid });
    }
    o
}

/// `NAME=PORT[:PID]`
fn parse_target(v: &str) -> (String, u16, Option<i32>) {
    let Some((name, rest)) = v.split_once('=') else { usage() };
    let (p, pid) = match rest.split_once(':') {
        Some((p, pid)) => (p, Some(pid.parse::<i32>().unwrap_or_else(|_| usage()))),
        None => (rest, None),
    };
    (name.to_string(), p.parse::<u16>().unwrap_or_else(|_| usage()), pid)
}

/// What one client counted in one turn.
#[derive(Default)]
struct Tally {
    handshakes: u64,
    offered: u64,
    resumed: u64,
    errors: u64,
    /// From the start of the turn to the end of the client's last connection.
    busy: Duration,
    /// Connection times (connect to close) in microseconds.
    micros: Vec<u32>,
    last_error: Option<String>,
}

impl Tally {
    fn add(&mut self, t: Tally) {
        self.handshakes += t.handshakes;
        self.offered += t.offered;
        self.resumed += t.resumed;
        self.errors += t.errors;
        self.busy += t.busy;
        self.micros.extend(t.micros);
        if t.last_error.is_some() {
            self.last_error = t.last_error;
        }
    }
}

/// One connection: handshake, `GET /`, read to the end, close_notify. Returns whether the
/// session was resumed and the newest session the server gave.
fn connect_once(
    connector: &SslConnector,
    addr: SocketAddr,
    session: Option<&SslSession>,
    source: Option<std::net::Ipv4Addr>,
) -> Result<(bool, Option<SslSession>), String> {
    let tcp = match source {
        None => TcpStream::connect_timeout(&addr, Duration::from_secs(3)),
        Some(src) => connect_from(src, addr),
    }
    .map_err(|e| format!("connect: {e}"))?;
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

/// A TCP connection to `addr` from `src` (any port), its connect bounded by 3 s.
fn connect_from(src: std::net::Ipv4Addr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(dst) = addr else {
        return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "--source-addrs needs an IPv4 target"));
    };
    let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns (from its creation by
    // `socket`, through `tcp`, which closes it on every return).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let tcp = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let int_len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let timeout = libc::timeval { tv_sec: 3, tv_usec: 0 };
        let (src, dst) = (sin(src, 0), sin(*dst.ip(), dst.port()));
        if libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            int_len,
        ) != 0
            || libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            ) != 0
            || libc::bind(fd, (&src as *const libc::sockaddr_in).cast(), len) != 0
            || libc::connect(fd, (&dst as *const libc::sockaddr_in).cast(), len) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(tcp)
    }
}

/// The turn the coordinator has set up: which target, for how long (from the moment the
/// start barrier lets the clients go); `None` ends the clients.
type Turn = Option<(usize, Duration)>;

struct Shared {
    start: Barrier,
    end: Barrier,
    turn: Mutex<Turn>,
    tallies: Mutex<Vec<Tally>>,
}

fn connector(tls12: bool) -> Result<SslConnector, String> {
    let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(|e| e.to_string())?;
    b.set_verify(SslVerifyMode::NONE);
    let v = if tls12 { SslVersion::TLS1_2 } else { SslVersion::TLS1_3 };
    b.set_min_proto_version(Some(v))
        .and_then(|_| b.set_max_proto_version(Some(v)))
        .map_err(|_| "protocol version".to_string())?;
    Ok(b.build())
}

fn client(o: Arc<Opts>, sh: Arc<Shared>, index: usize) {
    let source = o.source_addrs.then(|| std::net::Ipv4Addr::new(127, 0, 0, 2 + (index % 250) as u8));
    let connector = connector(o.tls12);
    // The newest session from each target.
    let mut sessions: Vec<Option<SslSession>> = vec![None; o.targets.len()];
    loop {
        sh.start.wait();
        let turn = *sh.turn.lock().unwrap_or_else(|e| e.into_inner());
        let Some((target, len)) = turn else { return };
        let t_start = Instant::now();
        let until = t_start + len;
        let mut t = Tally::default();
        match &connector {
            Err(e) => {
                t.errors = 1;
                t.last_error = Some(e.clone());
            }
            Ok(c) => {
                while Instant::now() < until {
                    let t0 = Instant::now();
                    let offer = if o.full { None } else { sessions[target].as_ref() };
                    let offered = offer.is_some();
                    let r = connect_once(c, o.targets[target].addr, offer, source);
                    let t1 = Instant::now();
                    match r {
                        Ok((resumed, newest)) => {
                            if newest.is_some() {
                                sessions[target] = newest;
                            }
                            t.handshakes += 1;
                            t.offered += u64::from(offered);
                            t.resumed += u64::from(resumed);
                            t.micros.push((t1 - t0).as_micros().min(u32::MAX as u128) as u32);
                        }
                        Err(e) => {
                            t.errors += 1;
                            t.last_error = Some(e);
                            sessions[target] = None;
                            // Do not spin against a server that is gone.
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                    t.busy = t1 - t_start;
                }
            }
        }
        sh.tallies.lock().unwrap_or_else(|e| e.into_inner()).push(t);
        sh.end.wait();
    }
}

/// CPU time (ns) of `pid`, its children and all their threads.
fn tree_cpu_ns(pid: i32) -> u64 {
    let mut total = 0;
    let mut pids = vec![pid];
    let mut i = 0;
    while i < pids.len() {
        let p = pids[i];
        i += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else { continue };
        for task in tasks.flatten() {
            let dir = task.path();
            if let Ok(s) = std::fs::read_to_string(dir.join("schedstat")) {
                total += s.split_whitespace().next().and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
            }
            if let Ok(c) = std::fs::read_to_string(dir.join("children")) {
                pids.extend(c.split_whitespace().filter_map(|x| x.parse::<i32>().ok()));
            }
        }
    }
    total
}

fn self_cpu_ms() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
        ms(ru.ru_utime) + ms(ru.ru_stime)
    }
}

/// One slice's sums for one target.
#[derive(Default)]
struct Sum {
    tally: Tally,
    server_cpu_ns: u64,
    client_cpu_ms: f64,
    turns: u64,
}

/// Runs one turn against `target` for `len`; the clients' tallies and the CPU times spent.
fn turn(o: &Opts, sh: &Shared, target: usize, len: Duration) -> (Tally, u64, f64) {
    let pid = o.targets[target].pid;
    let (s0, c0) = (pid.map_or(0, tree_cpu_ns), self_cpu_ms());
    *sh.turn.lock().unwrap_or_else(|e| e.into_inner()) = Some((target, len));
    sh.start.wait();
    sh.end.wait();
    // Let the server finish what the last connections left it (a store's asynchronous
    // work, the closes) inside this turn's account.
    std::thread::sleep(Duration::from_millis(2));
    let (s1, c1) = (pid.map_or(0, tree_cpu_ns), self_cpu_ms());
    let mut t = Tally::default();
    for x in sh.tallies.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        t.add(x);
    }
    (t, s1.saturating_sub(s0), c1 - c0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    for line in run(parse(&args)) {
        println!("{line}");
    }
}

/// Measures as the options say; one JSON line per slice and target (the human lines go to
/// stderr as they come).
pub fn run(o: Opts) -> Vec<String> {
    let o = Arc::new(o);
    let n = o.targets.len();
    let sh = Arc::new(Shared {
        start: Barrier::new(o.clients + 1),
        end: Barrier::new(o.clients + 1),
        turn: Mutex::new(None),
        tallies: Mutex::new(Vec::new()),
    });
    let handles: Vec<_> = (0..o.clients)
        .map(|i| {
            let (o, sh) = (Arc::clone(&o), Arc::clone(&sh));
            std::thread::spawn(move || client(o, sh, i))
        })
        .collect();
    if !o.warmup.is_zero() {
        for target in 0..n {
            turn(&o, &sh, target, o.warmup);
        }
    }
    let turn_len = o.turn.unwrap_or(o.duration).min(o.duration);
    let turns = o.duration.as_nanos().div_ceil(turn_len.as_nanos()) as usize;
    let mut k = 0;
    let mut lines = Vec::new();
    for slice in 0..o.slices {
        let mut sums: Vec<Sum> = (0..n).map(|_| Sum::default()).collect();
        for _ in 0..turns {
            for j in 0..n {
                let target = (j + k) % n;
                let (t, server_ns, client_ms) = turn(&o, &sh, target, turn_len);
                let s = &mut sums[target];
                s.tally.add(t);
                s.server_cpu_ns += server_ns;
                s.client_cpu_ms += client_ms;
                s.turns += 1;
            }
            k += 1;
        }
        for (target, s) in sums.into_iter().enumerate() {
            lines.push(report(&o, target, slice, s));
        }
    }
    *sh.turn.lock().unwrap_or_else(|e| e.into_inner()) = None;
    sh.start.wait();
    for h in handles {
        let _ = h.join();
    }
    lines
}

fn report(o: &Opts, target: usize, slice: usize, s: Sum) -> String {
    let Sum { tally: mut all, server_cpu_ns, client_cpu_ms, turns } = s;
    all.micros.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.micros.is_empty() {
            return f64::NAN;
        }
        all.micros[((all.micros.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
    };
    // The clients' mean busy time: K connections in flight over it.
    let secs = all.busy.as_secs_f64() / o.clients as f64;
    let per_s = |x: u64| if secs > 0.0 { x as f64 / secs } else { f64::NAN };
    let rate = per_s(all.handshakes);
    let resumption = if all.offered > 0 { all.resumed as f64 / all.offered as f64 } else { f64::NAN };
    let num = |x: f64| if x.is_finite() { format!("{x:.6}") } else { "null".to_string() };
    let esc = |x: &str| x.replace(['"', '\\'], "'");
    let err = esc(all.last_error.as_deref().unwrap_or(""));
    let t = &o.targets[target];
    let server =
        if t.pid.is_some() { format!(",\"server_cpu_ms\":{:.1}", server_cpu_ns as f64 / 1e6) } else { String::new() };
    let line = format!(
        "{{\"bench\":\"loadgen\",\"label\":\"{}\",\"target\":\"{}\",\"slice\":{},\"turns\":{turns},\"proto\":\"{}\",\
         \"mode\":\"{}\",\"clients\":{},\"duration_s\":{secs:.3},\"handshakes\":{},\"handshakes_per_s\":{},\
         \"offered\":{},\"resumed\":{},\"resumed_per_s\":{},\"resumption_rate\":{},\"errors\":{},\
         \"connections_total\":{},\"client_cpu_ms\":{client_cpu_ms:.1}{server},\"p50_ms\":{},\"p99_ms\":{},\
         \"last_error\":\"{err}\"}}",
        esc(&o.label),
        esc(&t.name),
        slice + 1,
        if o.tls12 { "tls1.2" } else { "tls1.3" },
        if o.full { "full" } else { "resume" },
        o.clients,
        all.handshakes,
        num(rate),
        all.offered,
        all.resumed,
        num(per_s(all.resumed)),
        num(resumption),
        all.errors,
        all.handshakes,
        num(pct(0.5)),
        num(pct(0.99)),
    );
    eprintln!(
        "loadgen {} {} slice {}: {} clients, {:.2} s busy: {} connections ({:.0}/s), resumed {}/{} ({:.3} %), \
         errors {}, p50 {:.2} ms, p99 {:.2} ms{}",
        o.label,
        t.name,
        slice + 1,
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
    line
}
