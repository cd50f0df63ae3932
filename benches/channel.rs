//! Channel benchmark (issue 4): the store's GET and PUT between forked worker processes and
//! the master's cache thread, side by side with the two limits it is judged against, in one
//! run, one repetition after the other:
//!
//! - `store_get` and `echo`, interleaved (`round_trip_phase`): W = 1, 2, 4 forked workers
//!   ask the master for hits on 32-byte ids with a 135-byte DER
//!   (`cluster_tls_store::bench::get_from_master`: the round trip; the library's atfork
//!   handlers give each worker its channel), and W client processes send requests of the same
//!   sizes over raw `SOCK_SEQPACKET` pairs to one echo process with a poll loop without
//!   timeout (the physical limit of this design). Each such phase starts from a master that
//!   holds the hot sessions alone (`bench::reset_master_cache`; the store phases' sessions
//!   would otherwise fill the cache rep by rep, and the GETs slowed with it). Both groups run
//!   through the same stretch of time in alternating 10 ms turns, so the ratio of the two is
//!   not at the mercy of the machine's speed of the moment (A/A, both groups asking the
//!   master, 7 reps of 1 s: medians 0.97–1.04). With `--pin` both groups also get the same
//!   CPU layout: the master's cache thread and the echo process on the first CPU this process
//!   may use, worker / client w on the (w mod CPUs)-th.
//!   Left to the scheduler, each repetition places the two groups' processes anew and apart
//!   (five processes on two CPUs at W=4), and the per-repetition ratio of the two scattered
//!   0.50–1.25 at W=4; pinned, 0.77–0.84.
//! - `replica_get` / `store_put` (`store_phase`): GETs through the worker's replica (what the
//!   get-session callback does); then PUTs, fire-and-forget, then a GET on the last id proves
//!   the master read them all (one channel is FIFO), and the master's `stores` counter says
//!   how many arrived (PUTs dropped on a full socket buffer are not errors, they are counted).
//! - `hash`: `Mutex<HashMap<Vec<u8>, Vec<u8>>>` get + copy of 135 bytes in W threads of one
//!   process. The limit of any design.
//!
//! Output: one JSON object per line (`{"bench":"channel",...}`) for every measurement and
//! every summary, then a human table. Options: `--reps N` (5), `--phase-ms N` (400, the
//! replica and hash phases), `--round-trip-ms N` (1000, the interleaved phase, half of it
//! for each group), `--puts N` (20000 per worker), `--workers 1,2,4`, `--pin` (the same CPU
//! layout for both groups of the round-trip phase, above). `cargo bench --bench channel` passes
//! `--bench`, which is ignored.
//!
//! Latencies come from every request of every worker, merged in shared memory; hash
//! latencies are per-operation averages over batches of 64 (one clock read per op would cost
//! as much as the op).

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cluster_tls_store::{bench, Config};

const NS: &[u8] = b"bench";
const ID_LEN: usize = 32;
const DER_LEN: usize = 135;
/// Hot ids the GET phase cycles through.
const KEYS: usize = 1024;
/// GET frame: 20-byte header + namespace + id; HIT frame: the same plus the DER.
const REQ_LEN: usize = 20 + 5 + ID_LEN;
const REPLY_LEN: usize = REQ_LEN + DER_LEN;
/// Latency slots per worker in shared memory (u32 nanoseconds).
const LAT_CAP: usize = 1 << 21;
/// Counter slots per worker in shared memory.
const COUNTERS: usize = 16;
/// Hard limit for any child process.
const CHILD_DEADLINE: Duration = Duration::from_secs(20);

struct Opts {
    reps: usize,
    phase: Duration,
    /// The interleaved round-trip phase, both groups together (each works half of it).
    round_trip: Duration,
    puts: usize,
    workers: Vec<usize>,
    pin: bool,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        reps: 5,
        phase: Duration::from_millis(400),
        round_trip: Duration::from_millis(1000),
        puts: 20_000,
        workers: vec![1, 2, 4],
        pin: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--reps" => o.reps = val.parse().unwrap_or(o.reps).max(1),
            "--phase-ms" => o.phase = Duration::from_millis(val.parse().unwrap_or(400)),
            "--round-trip-ms" => o.round_trip = Duration::from_millis(val.parse().unwrap_or(1000)),
            "--puts" => o.puts = val.parse().unwrap_or(o.puts).max(1),
            "--pin" => {
                o.pin = true;
                i += 1;
                continue;
            }
            "--workers" => o.workers = val.split(',').filter_map(|w| w.parse().ok()).filter(|&w| w > 0).collect(),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    if o.workers.is_empty() {
        o.workers = vec![1, 2, 4];
    }
    o
}

/// Anonymous shared memory that forked children write and the parent reads after reaping them.
struct Shared {
    ptr: *mut u8,
    len: usize,
}

impl Shared {
    fn new(workers: usize) -> Shared {
        let len = workers * (COUNTERS * 8 + LAT_CAP * 4);
        // SAFETY: an anonymous shared mapping; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "mmap of {len} bytes failed");
        Shared { ptr: ptr.cast(), len }
    }

    fn base(&self, w: usize) -> *mut u8 {
        // SAFETY: w < workers (callers), so the offset stays inside the mapping.
        unsafe { self.ptr.add(w * (COUNTERS * 8 + LAT_CAP * 4)) }
    }

    fn counters(&self, w: usize) -> &[AtomicU64] {
        // SAFETY: the counter block is 8-aligned (page-aligned mapping, block sizes are
        // multiples of 8), inside the mapping, and only ever accessed atomically.
        unsafe { std::slice::from_raw_parts(self.base(w).cast::<AtomicU64>(), COUNTERS) }
    }

    #[allow(clippy::mut_from_ref)]
    fn latencies(&self, w: usize) -> &mut [u32] {
        // SAFETY: each worker's latency block is written only by that worker's process and
        // read by the parent only after the worker was reaped; 4-aligned, inside the mapping.
        unsafe { std::slice::from_raw_parts_mut(self.base(w).add(COUNTERS * 8).cast::<u32>(), LAT_CAP) }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Counter slots.
const C_OPS: usize = 0;
const C_HITS: usize = 1;
const C_ELAPSED_NS: usize = 2;
const C_LATS: usize = 3;
const C_PUT_SENT: usize = 4;
const C_PUT_SEND_NS: usize = 5;
const C_PUT_DONE_NS: usize = 6;
const C_PUT_SAMPLE: usize = 7;
const C_PUT_FOUND: usize = 8;
const C_PUT_DROPS: usize = 9;
const C_OK: usize = 10;

/// Fork a child that runs `f` and `_exit`s; it dies with the parent.
fn spawn(f: impl FnOnce()) -> libc::pid_t {
    // SAFETY: fork; the child only runs `f` and exits without returning to the caller.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: plain system calls in the child.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::alarm(CHILD_DEADLINE.as_secs() as u32);
        }
        let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(()) => 0,
            Err(_) => 1,
        };
        // SAFETY: leave the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    pid
}

/// Reap `pids`, killing whatever is still alive after `deadline`. Returns how many failed.
fn reap(pids: &[libc::pid_t], deadline: Duration) -> usize {
    let until = Instant::now() + deadline;
    let mut failed = 0;
    let mut left: Vec<libc::pid_t> = pids.to_vec();
    while !left.is_empty() {
        left.retain(|&pid| {
            let mut st = 0;
            // SAFETY: waiting for our own child.
            let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
            if r == pid || r < 0 {
                if r < 0 || !libc::WIFEXITED(st) || libc::WEXITSTATUS(st) != 0 {
                    failed += 1;
                }
                false
            } else {
                true
            }
        });
        if Instant::now() > until {
            for &pid in &left {
                // SAFETY: killing and reaping our own child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
                failed += 1;
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    failed
}

/// Pin thread `tid` (0: the caller) to the `k`-th CPU this process may run on (modulo their
/// number). A refusal is reported, not fatal: that thread then stays where the scheduler puts it.
fn pin(tid: libc::pid_t, k: usize) {
    let set_size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls read and write only the sets
    // passed with their size, and CPU_ISSET / CPU_SET stay inside them.
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, set_size, &mut allowed) != 0 {
            eprintln!("--pin: sched_getaffinity: {}", std::io::Error::last_os_error());
            return;
        }
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &allowed)).collect();
        let Some(&cpu) = cpus.get(k % cpus.len().max(1)) else { return };
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(tid, set_size, &set) != 0 {
            eprintln!("--pin: sched_setaffinity to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
}

/// The cache thread's id (by its name), for `--pin`.
fn cache_thread_tid() -> Option<libc::pid_t> {
    std::fs::read_dir("/proc/self/task").ok()?.flatten().find_map(|e| {
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == "cts-cache").then(|| e.file_name().to_str()?.parse().ok()).flatten()
    })
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

fn hot_id(i: usize) -> [u8; ID_LEN] {
    let mut id = [0x5au8; ID_LEN];
    id[..8].copy_from_slice(&(i as u64).to_le_bytes());
    id
}

fn put_id(w: usize, rep: usize, seq: usize) -> [u8; ID_LEN] {
    let mut id = [0xa5u8; ID_LEN];
    id[0] = 0xf0 | w as u8;
    id[1] = rep as u8;
    id[2..10].copy_from_slice(&(seq as u64).to_le_bytes());
    id
}

fn der(i: usize) -> [u8; DER_LEN] {
    let mut d = [0u8; DER_LEN];
    for (k, b) in d.iter_mut().enumerate() {
        *b = (k as u8).wrapping_mul(31).wrapping_add(i as u8);
    }
    d
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

/// Run `op` back to back from `from` (now) until `until`, each call timed into `lats` and
/// counted in `n` and `hits`; the call in flight at `until` is finished. Returns when.
fn run_ops(
    lats: &mut [u32],
    n: &mut usize,
    hits: &mut u64,
    from: Instant,
    until: Instant,
    op: &mut impl FnMut(usize) -> bool,
) -> Instant {
    let mut last = from;
    while last < until {
        let t0 = last;
        let hit = op(*n);
        last = Instant::now();
        if *n < LAT_CAP {
            lats[*n] = ns(last - t0).min(u32::MAX as u64) as u32;
        }
        *n += 1;
        *hits += u64::from(hit);
    }
    last
}

/// One worker's GET loop: every request timed, until `end`.
fn timed_loop(sh: &Shared, w: usize, start: Instant, end: Instant, mut op: impl FnMut(usize) -> bool) {
    let lats = sh.latencies(w);
    let c = sh.counters(w);
    for i in 0..64 {
        op(i);
    }
    sleep_until(start);
    let (mut n, mut hits) = (0usize, 0u64);
    let last = run_ops(lats, &mut n, &mut hits, Instant::now(), end, &mut op);
    c[C_OPS].store(n as u64, Ordering::Relaxed);
    c[C_HITS].store(hits, Ordering::Relaxed);
    c[C_ELAPSED_NS].store(ns(last - start), Ordering::Relaxed);
    c[C_LATS].store(n.min(LAT_CAP) as u64, Ordering::Relaxed);
}

/// Length of one turn of the interleaved round-trip phase (see `round_trip_phase`).
const TURN: Duration = Duration::from_millis(10);

/// One client's loop in the interleaved round-trip phase: from `start` to `end` the time is cut
/// into `TURN`s, and group `group` (0 or 1) works in every other turn, sleeping through the
/// rest. The request in flight at the end of a turn is finished (one round trip, a few µs of
/// a 10 ms turn). Throughput is counted over the time the client actually worked.
fn turn_loop(sh: &Shared, slot: usize, group: u32, start: Instant, end: Instant, mut op: impl FnMut(usize) -> bool) {
    let lats = sh.latencies(slot);
    let c = sh.counters(slot);
    for i in 0..64 {
        op(i);
    }
    sleep_until(start);
    let (mut n, mut hits, mut busy) = (0usize, 0u64, Duration::ZERO);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let k = ((now - start).as_nanos() / TURN.as_nanos()) as u32;
        let turn_end = (start + TURN * (k + 1)).min(end);
        if k % 2 != group {
            sleep_until(turn_end);
            continue;
        }
        busy += run_ops(lats, &mut n, &mut hits, now, turn_end, &mut op) - now;
    }
    c[C_OPS].store(n as u64, Ordering::Relaxed);
    c[C_HITS].store(hits, Ordering::Relaxed);
    c[C_ELAPSED_NS].store(ns(busy), Ordering::Relaxed);
    c[C_LATS].store(n.min(LAT_CAP) as u64, Ordering::Relaxed);
}

/// Percentiles and throughput merged over the workers of one phase.
#[derive(Clone, Copy, Default)]
struct Phase {
    p50_us: f64,
    p99_us: f64,
    ops_per_s: f64,
    hit_ratio: f64,
}

fn merge(sh: &Shared, slots: std::ops::Range<usize>) -> Phase {
    let mut all: Vec<u32> = Vec::new();
    let (mut ops, mut hits, mut rate) = (0u64, 0u64, 0.0);
    for w in slots {
        let c = sh.counters(w);
        let n = c[C_LATS].load(Ordering::Relaxed) as usize;
        all.extend_from_slice(&sh.latencies(w)[..n]);
        let o = c[C_OPS].load(Ordering::Relaxed);
        ops += o;
        hits += c[C_HITS].load(Ordering::Relaxed);
        let el = c[C_ELAPSED_NS].load(Ordering::Relaxed).max(1);
        rate += o as f64 * 1e9 / el as f64;
    }
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        let k = ((all.len() as f64 - 1.0) * p).round() as usize;
        all[k] as f64 / 1000.0
    };
    Phase { p50_us: pct(0.50), p99_us: pct(0.99), ops_per_s: rate, hit_ratio: hits as f64 / ops.max(1) as f64 }
}

fn reset(sh: &Shared, slots: usize) {
    for w in 0..slots {
        for c in sh.counters(w) {
            c.store(0, Ordering::Relaxed);
        }
    }
}

struct PutResult {
    sent: u64,
    stored: u64,
    sample: u64,
    found: u64,
    drops: u64,
    send_rate: f64,
    done_rate: f64,
}

fn put_hot_ids() {
    let expiry = unix_now() + 3600;
    for i in 0..KEYS {
        bench::put(NS, &hot_id(i), &der(i), expiry);
    }
}

/// W forked workers: a GET phase through the replica (what the get-session callback does),
/// then a PUT burst of new ids, then PUT round trips (store a new id, ask the master for it).
/// Returns (replica, PUT burst, PUT round trip, failed children).
fn store_phase(sh: &Shared, o: &Opts, workers: usize, rep: usize) -> (Phase, PutResult, Phase, usize) {
    let expiry = unix_now() + 3600;
    put_hot_ids();
    let stores_before = cluster_tls_store::stats().master.stores;
    let puts = o.puts;
    reset(sh, 2 * workers);
    let start = Instant::now() + Duration::from_millis(60);
    let end = start + o.phase;
    let put_start = end + Duration::from_millis(30);
    // After the burst and its check (tens of ms): the PUT round trips, in slots W..2W.
    let rt_start = put_start + Duration::from_millis(200);
    let rt_end = rt_start + o.phase / 2;
    let mut pids = Vec::new();
    for w in 0..workers {
        pids.push(spawn(|| {
            timed_loop(sh, w, start, end, |i| bench::get(NS, &hot_id(i % KEYS)).is_some());
            let c = sh.counters(w);
            let payload = der(w);
            sleep_until(put_start);
            let t0 = Instant::now();
            for seq in 0..puts {
                bench::put(NS, &put_id(w, rep, seq), &payload, expiry);
            }
            let t_sent = t0.elapsed();
            // FIFO per channel: when this reply is back, the master has read every PUT
            // before it (asked of the master: the worker's own replica has them all).
            let _ = bench::get_from_master(NS, &put_id(w, rep, puts - 1));
            let t_done = t0.elapsed();
            let (mut sample, mut found) = (0u64, 0u64);
            for seq in (0..puts).step_by(20) {
                sample += 1;
                found += u64::from(bench::get_from_master(NS, &put_id(w, rep, seq)).is_some());
            }
            // A PUT's round trip: store a new session, then ask the master for it (the channel
            // is FIFO and the master reads the session ring before serving, so the hit says the
            // store reached the cache: what another worker's lookup could then find).
            let mut next = puts;
            timed_loop(sh, workers + w, rt_start, rt_end, |_| {
                next += 1;
                let id = put_id(w, rep, next);
                bench::put(NS, &id, &payload, expiry);
                bench::get_from_master(NS, &id).is_some()
            });
            let st = cluster_tls_store::stats();
            c[C_PUT_SENT].store(puts as u64, Ordering::Relaxed);
            c[C_PUT_SEND_NS].store(ns(t_sent), Ordering::Relaxed);
            c[C_PUT_DONE_NS].store(ns(t_done), Ordering::Relaxed);
            c[C_PUT_SAMPLE].store(sample, Ordering::Relaxed);
            c[C_PUT_FOUND].store(found, Ordering::Relaxed);
            c[C_PUT_DROPS].store(st.worker.send_drops, Ordering::Relaxed);
            c[C_OK].store(1, Ordering::Relaxed);
        }));
    }
    let failed = reap(&pids, CHILD_DEADLINE);
    let replica = merge(sh, 0..workers);
    let mut pr = PutResult { sent: 0, stored: 0, sample: 0, found: 0, drops: 0, send_rate: 0.0, done_rate: 0.0 };
    pr.stored = cluster_tls_store::stats().master.stores.saturating_sub(stores_before);
    let mut done_max = 1u64;
    for w in 0..workers {
        let c = sh.counters(w);
        pr.sent += c[C_PUT_SENT].load(Ordering::Relaxed);
        pr.sample += c[C_PUT_SAMPLE].load(Ordering::Relaxed);
        pr.found += c[C_PUT_FOUND].load(Ordering::Relaxed);
        pr.drops += c[C_PUT_DROPS].load(Ordering::Relaxed);
        pr.send_rate +=
            c[C_PUT_SENT].load(Ordering::Relaxed) as f64 * 1e9 / c[C_PUT_SEND_NS].load(Ordering::Relaxed).max(1) as f64;
        done_max = done_max.max(c[C_PUT_DONE_NS].load(Ordering::Relaxed));
    }
    pr.done_rate = pr.stored as f64 * 1e9 / done_max as f64;
    (replica, pr, merge(sh, workers..2 * workers), failed)
}

/// SOCK_SEQPACKET pair, both ends blocking, close-on-exec.
fn seqpacket_pair() -> [libc::c_int; 2] {
    let mut fds = [-1; 2];
    // SAFETY: `fds` has room for the two descriptors.
    let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
    fds
}

/// The round trip beside its raw limit, interleaved: W forked workers ask the master for hot
/// ids (`get_from_master`: the round trip, bypassing the worker's replica), and W client
/// processes send requests of the same sizes to one echo process that polls their raw
/// SEQPACKET channels. Both groups live through the same stretch of time (`o.round_trip`)
/// and take 10 ms turns (`turn_loop`), so a change in the machine's speed, which on a shared
/// machine swings by 15 % over seconds, weighs on both alike. Slots 0..W are the store's
/// workers, W..2W the echo clients. Returns (round trip, echo, failed children).
fn round_trip_phase(sh: &Shared, o: &Opts, workers: usize) -> (Phase, Phase, usize) {
    put_hot_ids();
    reset(sh, 2 * workers);
    let start = Instant::now() + Duration::from_millis(60);
    let end = start + o.round_trip;
    let mut pids = Vec::new();
    let pinned = o.pin;
    for w in 0..workers {
        pids.push(spawn(move || {
            if pinned {
                pin(0, w);
            }
            turn_loop(sh, w, 0, start, end, |i| bench::get_from_master(NS, &hot_id(i % KEYS)).is_some());
            sh.counters(w)[C_OK].store(1, Ordering::Relaxed);
        }));
    }
    // Made after the store's workers are forked, so that only the echo processes hold them.
    let pairs: Vec<[libc::c_int; 2]> = (0..workers).map(|_| seqpacket_pair()).collect();
    let server_fds: Vec<libc::c_int> = pairs.iter().map(|p| p[0]).collect();
    let client_fds: Vec<libc::c_int> = pairs.iter().map(|p| p[1]).collect();
    pids.push(spawn(|| {
        if pinned {
            pin(0, 0);
        }
        for &fd in &client_fds {
            // SAFETY: closing this process's copies of the clients' ends.
            unsafe { libc::close(fd) };
        }
        for &fd in &server_fds {
            // SAFETY: setting O_NONBLOCK on our own descriptor.
            unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
        }
        let mut pfds: Vec<libc::pollfd> =
            server_fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
        let mut buf = [0u8; 512];
        let reply = [0x81u8; REPLY_LEN];
        let mut open = pfds.len();
        while open > 0 {
            // SAFETY: `pfds` is a valid array of its length.
            let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
            if r <= 0 {
                continue;
            }
            for p in pfds.iter_mut() {
                if p.fd < 0 || p.revents == 0 {
                    continue;
                }
                for _ in 0..16 {
                    // SAFETY: `buf` is valid for its length.
                    let n = unsafe { libc::recv(p.fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
                    if n == 0 || (n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN)) {
                        // SAFETY: closing our own descriptor once.
                        unsafe { libc::close(p.fd) };
                        p.fd = -1;
                        open -= 1;
                        break;
                    }
                    if n < 0 {
                        break;
                    }
                    // SAFETY: `reply` is valid for its length.
                    unsafe {
                        libc::send(p.fd, reply.as_ptr().cast(), reply.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                    };
                }
                p.revents = 0;
            }
        }
    }));
    for w in 0..workers {
        let fd = client_fds[w];
        let server_fds = &server_fds;
        let client_fds = &client_fds;
        pids.push(spawn(move || {
            if pinned {
                pin(0, w);
            }
            for &other in server_fds.iter().chain(client_fds.iter()) {
                if other != fd {
                    // SAFETY: closing this process's copies of descriptors it does not use.
                    unsafe { libc::close(other) };
                }
            }
            let req = [0x01u8; REQ_LEN];
            let mut buf = [0u8; 512];
            turn_loop(sh, workers + w, 1, start, end, |_| {
                // SAFETY: both buffers are valid for their lengths; blocking calls.
                unsafe {
                    libc::send(fd, req.as_ptr().cast(), req.len(), libc::MSG_NOSIGNAL);
                    libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) == REPLY_LEN as isize
                }
            });
            sh.counters(workers + w)[C_OK].store(1, Ordering::Relaxed);
        }));
    }
    for p in &pairs {
        // SAFETY: the parent's copies are not used.
        unsafe {
            libc::close(p[0]);
            libc::close(p[1]);
        }
    }
    let failed = reap(&pids, CHILD_DEADLINE);
    (merge(sh, 0..workers), merge(sh, workers..2 * workers), failed)
}

/// The limit of any design: W threads of one process share a Mutex<HashMap>.
fn hash_phase(o: &Opts, workers: usize) -> Phase {
    let mut m: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    for i in 0..KEYS {
        m.insert(hot_id(i).to_vec(), der(i).to_vec());
    }
    let map = Arc::new(Mutex::new(m));
    let ids: Arc<Vec<[u8; ID_LEN]>> = Arc::new((0..KEYS).map(hot_id).collect());
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + o.phase;
    const BATCH: usize = 64;
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let map = Arc::clone(&map);
            let ids = Arc::clone(&ids);
            std::thread::spawn(move || {
                let mut out = [0u8; DER_LEN];
                let mut per_op: Vec<u32> = Vec::with_capacity(1 << 20);
                sleep_until(start);
                let mut n = 0usize;
                let mut last = Instant::now();
                loop {
                    let t0 = last;
                    for k in 0..BATCH {
                        let id = &ids[(n + k) % KEYS];
                        let g = map.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(v) = g.get(&id[..]) {
                            out.copy_from_slice(v);
                        }
                        drop(g);
                        black_box(&mut out);
                    }
                    n += BATCH;
                    last = Instant::now();
                    if per_op.len() < per_op.capacity() {
                        per_op.push((ns(last - t0) / BATCH as u64) as u32);
                    }
                    if last >= end {
                        break;
                    }
                }
                (per_op, n as f64 * 1e9 / ns(last - start).max(1) as f64)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut rate = 0.0;
    for h in handles {
        if let Ok((lat, r)) = h.join() {
            all.extend(lat);
            rate += r;
        }
    }
    all.sort_unstable();
    let pct = |p: f64| all.get(((all.len().max(1) - 1) as f64 * p) as usize).map_or(f64::NAN, |&v| v as f64 / 1000.0);
    Phase { p50_us: pct(0.5), p99_us: pct(0.99), ops_per_s: rate, hit_ratio: 1.0 }
}

fn stats3(v: &[f64]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let med = if s.len() % 2 == 1 { s[s.len() / 2] } else { (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0 };
    (s[0], med, s[s.len() - 1])
}

fn jnum(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "null".to_string()
    }
}

fn main() {
    let o = parse_opts();
    let t_all = Instant::now();
    let config = Config { cache_bytes: 256 << 20, get_timeout: Duration::from_secs(1), ..Config::default() };
    if let Err(e) = cluster_tls_store::master_setup(config) {
        eprintln!("master_setup: {e}");
        std::process::exit(1);
    }
    if o.pin {
        // The cache thread on CPU 0, as the echo server: both groups get the same layout.
        match cache_thread_tid() {
            Some(tid) => pin(tid, 0),
            None => eprintln!("--pin: no cache thread found"),
        }
    }
    let max_w = o.workers.iter().copied().max().unwrap_or(4);
    // The round-trip phase runs W store workers and W echo clients at once.
    let sh = Shared::new(2 * max_w);
    // Per (metric, workers): one value per repetition.
    let mut series: HashMap<(String, usize), Vec<f64>> = HashMap::new();
    let mut failures = 0usize;
    for rep in 0..o.reps {
        for &w in &o.workers {
            // Every round-trip phase asks a master that holds the hot sessions alone: each
            // store phase leaves tens of thousands behind, and a cache left to fill up to its
            // budget over the repetitions made the GETs slower rep by rep (see the notes).
            bench::reset_master_cache();
            let (get, echo, f1) = round_trip_phase(&sh, &o, w);
            let (replica, put, put_rt, f2) = store_phase(&sh, &o, w, rep);
            let hash = hash_phase(&o, w);
            failures += f1 + f2;
            for (kind, p) in
                [("store_get", get), ("replica_get", replica), ("echo", echo), ("hash", hash), ("store_put_rt", put_rt)]
            {
                println!(
                    "{{\"bench\":\"channel\",\"kind\":\"{kind}\",\"workers\":{w},\"rep\":{rep},\"p50_us\":{},\
                     \"p99_us\":{},\"ops_per_s\":{},\"hit_ratio\":{}}}",
                    jnum(p.p50_us),
                    jnum(p.p99_us),
                    jnum(p.ops_per_s),
                    jnum(p.hit_ratio)
                );
            }
            println!(
                "{{\"bench\":\"channel\",\"kind\":\"store_put\",\"workers\":{w},\"rep\":{rep},\"sent\":{},\"stored\":{},\
                 \"send_drops\":{},\"sample\":{},\"sample_found\":{},\"send_per_s\":{},\"stored_per_s\":{}}}",
                put.sent,
                put.stored,
                put.drops,
                put.sample,
                put.found,
                jnum(put.send_rate),
                jnum(put.done_rate)
            );
            let mut add = |k: &str, v: f64| series.entry((k.to_string(), w)).or_default().push(v);
            add("get_p50_us", get.p50_us);
            add("get_p99_us", get.p99_us);
            add("get_ops_per_s", get.ops_per_s);
            add("get_hit_ratio", get.hit_ratio);
            add("replica_p50_us", replica.p50_us);
            add("replica_ops_per_s", replica.ops_per_s);
            add("echo_p50_us", echo.p50_us);
            add("echo_p99_us", echo.p99_us);
            add("echo_ops_per_s", echo.ops_per_s);
            add("hash_p50_us", hash.p50_us);
            add("hash_ops_per_s", hash.ops_per_s);
            add("put_send_per_s", put.send_rate);
            add("put_stored_per_s", put.done_rate);
            add("put_stored_ratio", put.stored as f64 / put.sent.max(1) as f64);
            add("put_rt_p50_us", put_rt.p50_us);
            add("put_rt_p99_us", put_rt.p99_us);
            add("put_rt_ops_per_s", put_rt.ops_per_s);
            add("put_rt_hit_ratio", put_rt.hit_ratio);
            add("ratio_get_p50_vs_echo_p50", get.p50_us / echo.p50_us);
            add("ratio_get_p99_vs_echo_p99", get.p99_us / echo.p99_us);
            add("ratio_get_tput_vs_echo_tput", get.ops_per_s / echo.ops_per_s);
            add("ratio_put_stored_vs_echo_tput", put.done_rate / echo.ops_per_s);
            add("ratio_get_p50_vs_hash_p50", get.p50_us / hash.p50_us);
            add("ratio_replica_p50_vs_hash_p50", replica.p50_us / hash.p50_us);
        }
    }
    let metrics = [
        ("get_p50_us", "GET round trip p50 (µs)"),
        ("get_p99_us", "GET round trip p99 (µs)"),
        ("replica_p50_us", "GET replica p50 (µs)"),
        ("echo_p50_us", "echo p50 (µs)"),
        ("echo_p99_us", "echo p99 (µs)"),
        ("hash_p50_us", "hash p50 (µs)"),
        ("get_ops_per_s", "GET/s round trip"),
        ("replica_ops_per_s", "GET/s replica"),
        ("echo_ops_per_s", "echo/s (all clients)"),
        ("hash_ops_per_s", "hash/s (all threads)"),
        ("get_hit_ratio", "GET hit ratio"),
        ("put_send_per_s", "PUT sent/s"),
        ("put_stored_per_s", "PUT stored/s (master)"),
        ("put_stored_ratio", "PUT stored/sent"),
        ("put_rt_p50_us", "PUT round trip p50 (µs)"),
        ("put_rt_p99_us", "PUT round trip p99 (µs)"),
        ("put_rt_ops_per_s", "PUT round trips/s"),
        ("put_rt_hit_ratio", "PUT round trip found"),
        ("ratio_get_p50_vs_echo_p50", "GET p50 / echo p50"),
        ("ratio_get_p99_vs_echo_p99", "GET p99 / echo p99"),
        ("ratio_get_tput_vs_echo_tput", "GET/s / echo/s"),
        ("ratio_put_stored_vs_echo_tput", "PUT stored/s / echo/s"),
        ("ratio_get_p50_vs_hash_p50", "GET p50 / hash p50"),
        ("ratio_replica_p50_vs_hash_p50", "replica p50 / hash p50"),
    ];
    for (key, _) in metrics {
        for &w in &o.workers {
            if let Some(v) = series.get(&(key.to_string(), w)) {
                let (mn, med, mx) = stats3(v);
                println!(
                    "{{\"bench\":\"channel\",\"kind\":\"summary\",\"metric\":\"{key}\",\"workers\":{w},\"reps\":{},\
                     \"min\":{},\"median\":{},\"max\":{}}}",
                    v.len(),
                    jnum(mn),
                    jnum(med),
                    jnum(mx)
                );
            }
        }
    }
    println!(
        "{{\"bench\":\"channel\",\"kind\":\"run\",\"reps\":{},\"phase_ms\":{},\"round_trip_ms\":{},\"puts_per_worker\":{},\
         \"child_failures\":{failures},\"seconds\":{:.1}}}",
        o.reps,
        o.phase.as_millis(),
        o.round_trip.as_millis(),
        o.puts,
        t_all.elapsed().as_secs_f64()
    );
    println!();
    println!(
        "channel bench: {} reps x ({} ms round trip and echo interleaved, {} ms phases), request {REQ_LEN} B, \
         reply {REPLY_LEN} B; min / median / max",
        o.reps,
        o.round_trip.as_millis(),
        o.phase.as_millis()
    );
    print!("{:<26}", "metric");
    for &w in &o.workers {
        print!(" | {:>30}", format!("W={w}"));
    }
    println!();
    for (key, label) in metrics {
        print!("{label:<26}");
        for &w in &o.workers {
            let (mn, med, mx) = series.get(&(key.to_string(), w)).map_or((f64::NAN, f64::NAN, f64::NAN), |v| stats3(v));
            let f = |x: f64| if x.abs() >= 1000.0 { format!("{x:.0}") } else { format!("{x:.3}") };
            print!(" | {:>30}", format!("{} / {} / {}", f(mn), f(med), f(mx)));
        }
        println!();
    }
    println!("child failures: {failures}; total {:.1} s", t_all.elapsed().as_secs_f64());
    if failures > 0 {
        std::process::exit(1);
    }
}
