//! `cts-test-helper`: scenarios that need a master that forks, run as a child process of the
//! tests (the test harness is multi-threaded and never forks itself). Each scenario prints
//! `key=value` lines and exits 0 when it could run; the tests judge the values.
//!
//! ```text
//! cts-test-helper churn N        fork N short-lived workers (some killed mid-request)
//! cts-test-helper grandchild     a worker forks a helper that tries to use the channel
//! cts-test-helper exec           a worker re-execs itself and adopts its channel by env var
//! cts-test-helper hostile SECS   one worker writes garbage while another does PUT/GET
//! cts-test-helper soak SECS MB   workers store distinct sessions through a small budget
//! cts-test-helper shut-read     workers shut their channel for reading and keep it open
//! cts-test-helper dead-master   the master exits while a worker lives
//! cts-test-helper share-twice   a context shared twice with different ticket options
//! cts-test-helper broken-drain  a worker's last frames are read although a push to it failed
//! cts-test-helper remote-forks MS fork workers for MS ms while the remote threads keep
//!                                reconnecting to a rediss:// server that never answers
//! ```

#[path = "../common/silent.rs"]
mod silent;

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use cluster_tls_store::protocol::{self, Op};
use cluster_tls_store::{master_setup, share_sessions, stats, Config, Error};
use openssl::ssl::{SslContext, SslMethod};

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Shared anonymous mappings of this process (the session ring is the library's only one).
fn shared_anon_mappings() -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    maps.lines().filter(|l| l.contains(" rw-s ") && l.contains("/dev/zero")).count()
}

fn fork_child(f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child runs `f` and leaves with _exit, never returning into the caller.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
        // SAFETY: ends the child without running the parent's atexit handlers twice.
        unsafe { libc::_exit(code) };
    }
    assert!(pid > 0, "fork failed");
    pid
}

fn wait(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: reaping our own child with a valid status pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }
}

fn send_raw(fd: RawFd, frame: &[u8]) -> isize {
    // SAFETY: sends `frame.len()` bytes from a valid slice; MSG_NOSIGNAL avoids SIGPIPE.
    unsafe { libc::send(fd, frame.as_ptr().cast(), frame.len(), libc::MSG_NOSIGNAL) }
}

fn recv_raw(fd: RawFd, buf: &mut [u8], timeout_ms: i32) -> Option<usize> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd; then a recv into a valid buffer.
    unsafe {
        if libc::poll(&mut pfd, 1, timeout_ms) <= 0 {
            return None;
        }
        let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT);
        (n > 0).then_some(n as usize)
    }
}

fn channel() -> RawFd {
    cluster_tls_store::channel_fd().expect("this worker has a channel")
}

fn setup() {
    let cfg = Config { get_timeout: Duration::from_millis(200), ..Config::default() };
    master_setup(cfg).expect("master_setup");
}

fn churn(n: usize) {
    setup();
    let warm = fork_child(|| i32::from(stats().master_valid != 1));
    wait(warm);
    std::thread::sleep(Duration::from_millis(200));
    let (fds0, rss0) = (fd_count(), rss_kib());
    let start = Instant::now();
    let mut failures = 0;
    let mut done = 0;
    while done < n {
        let batch: Vec<i32> = (0..50.min(n - done))
            .map(|i| {
                fork_child(move || match i % 5 {
                    // A real lookup round trip through the library.
                    0 | 1 => i32::from(stats().master_valid != 1),
                    // Ask and leave before the reply: the master's reply finds a dead peer.
                    2 => {
                        let mut f = Vec::new();
                        protocol::encode(&mut f, Op::Get, 7, 0, b"ns", &[1; 32], &[]);
                        send_raw(channel(), &f);
                        0
                    }
                    // Store something, exit at once.
                    3 => {
                        let mut f = Vec::new();
                        protocol::encode(&mut f, Op::Put, 0, u64::MAX / 2, b"ns", &[i as u8; 32], &[9; 135]);
                        send_raw(channel(), &f);
                        0
                    }
                    // Killed by the parent while it waits.
                    _ => {
                        std::thread::sleep(Duration::from_secs(10));
                        0
                    }
                })
            })
            .collect();
        for (i, pid) in batch.iter().enumerate() {
            if i % 5 == 4 {
                // SAFETY: killing our own child.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
                wait(*pid);
            } else if wait(*pid) != 0 {
                failures += 1;
            }
        }
        done += batch.len();
    }
    // The cache thread closes departed workers' channels asynchronously.
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats().master.workers != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let st = stats();
    println!("workers_forked={n}");
    println!("child_failures={failures}");
    println!("seconds={:.2}", start.elapsed().as_secs_f64());
    println!("fds_before={fds0}");
    println!("fds_after={}", fd_count());
    println!("rss_kib_before={rss0}");
    println!("rss_kib_after={}", rss_kib());
    println!("workers_open={}", st.master.workers);
    println!("entries={}", st.master.entries);
}

/// A master whose own threads fork at the same time: every child must get its own working
/// channel, and the master must end with no channel left open.
fn threaded_forks(threads: usize, per_thread: usize) {
    setup();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let mut bad = 0;
                for _ in 0..per_thread {
                    let pid = fork_child(|| {
                        let st = stats();
                        i32::from(st.master_valid != 1 || st.role != cluster_tls_store::ROLE_WORKER)
                    });
                    if wait(pid) != 0 {
                        bad += 1;
                    }
                }
                bad
            })
        })
        .collect();
    let bad: i32 = handles.into_iter().map(|h| h.join().unwrap_or(1_000)).sum();
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats().master.workers != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("forks={}", threads * per_thread);
    println!("children_without_a_working_channel={bad}");
    println!("workers_open={}", stats().master.workers);
    println!("fds_after={}", fd_count());
}

fn grandchild() {
    setup();
    let worker = fork_child(|| {
        let ctx = SslContext::builder(SslMethod::tls_server()).expect("ctx").build();
        share_sessions(&*ctx, Some("w")).expect("worker shares sessions");
        let fd = channel();
        let helper = fork_child(move || {
            let ctx = SslContext::builder(SslMethod::tls_server()).expect("ctx").build();
            let refused = matches!(share_sessions(&*ctx, Some("w")), Err(Error::NotChannelOwner));
            // SAFETY: F_GETFD on a number; EBADF means our copy of the parent's channel is closed.
            let closed = unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1;
            let no_fd = cluster_tls_store::channel_fd().is_none();
            println!("helper_refused={}", u8::from(refused));
            println!("helper_channel_closed={}", u8::from(closed));
            println!("helper_has_no_channel={}", u8::from(no_fd));
            println!("helper_ring_mappings={}", shared_anon_mappings());
            0
        });
        wait(helper);
        // The worker's own channel still works after its helper came and went.
        let st = stats();
        println!("worker_master_valid={}", st.master_valid);
        println!("worker_role={}", st.role);
        println!("worker_ring_mappings={}", shared_anon_mappings());
        0
    });
    println!("worker_exit={}", wait(worker));
}

fn exec_worker() {
    setup();
    let worker = fork_child(|| {
        let fd = channel();
        // SAFETY: clearing FD_CLOEXEC on our own channel so the exec'd program inherits it.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        let exe = std::env::current_exe().expect("current exe");
        let err = std::os::unix::process::CommandExt::exec(
            std::process::Command::new(exe)
                .arg("exec-child")
                .env(cluster_tls_store::CHANNEL_FD_ENV, format!("{fd}:{}", std::process::id())),
        );
        eprintln!("exec failed: {err}");
        1
    });
    println!("exec_worker_exit={}", wait(worker));
}

fn exec_child() -> i32 {
    // A child forked before this program's first call inherits the descriptor and the
    // variable: it must not adopt the channel.
    let helper = fork_child(|| {
        let ctx = SslContext::builder(SslMethod::tls_server()).expect("ctx").build();
        i32::from(!matches!(share_sessions(&*ctx, Some("exec")), Err(Error::NotChannelOwner)))
    });
    println!("exec_helper_refused={}", u8::from(wait(helper) == 0));
    let ctx = SslContext::builder(SslMethod::tls_server()).expect("ctx").build();
    let shared = share_sessions(&*ctx, Some("exec")).is_ok();
    let st = stats();
    println!("exec_child_shared={}", u8::from(shared));
    println!("exec_child_role={}", st.role);
    println!("exec_child_master_valid={}", st.master_valid);
    let refused = matches!(master_setup(Config::default()), Err(Error::InWorker));
    println!("exec_child_setup_refused={}", u8::from(refused));
    0
}

fn hostile(secs: u64) {
    setup();
    let until = Instant::now() + Duration::from_secs(secs);
    let garbage = fork_child(move || {
        let fd = channel();
        let mut s: u64 = 0x1234_5678_9abc_def1;
        let mut sent = 0u64;
        let mut big = vec![0u8; 200 * 1024];
        while Instant::now() < until {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let frame: Vec<u8> = match s % 6 {
                0 => (0..(s >> 20) % 300).map(|i| (s >> (i % 56)) as u8).collect(),
                1 => {
                    let mut f = Vec::new();
                    protocol::encode(&mut f, Op::Put, 1, u64::MAX, b"x", &[1; 8], &[2; 100]);
                    f.truncate((s >> 16) as usize % f.len());
                    f
                }
                2 => {
                    let mut f = Vec::new();
                    protocol::encode(&mut f, Op::Get, 1, 0, b"x", &[1; 8], &[]);
                    f[0] = (s >> 8) as u8 | 2;
                    f
                }
                3 => {
                    let mut f = Vec::new();
                    protocol::encode(&mut f, Op::Get, 1, 0, b"x", &[1; 8], &[]);
                    f[2] = 255;
                    f[3] = 255;
                    f
                }
                4 => {
                    big[0] = protocol::VERSION;
                    big[1] = Op::Put as u8;
                    big.clone()
                }
                _ => {
                    let mut f = Vec::new();
                    protocol::encode(&mut f, Op::Hit, 1, 0, b"x", &[1; 8], &[3; 50]);
                    f
                }
            };
            if frame.is_empty() {
                continue; // An empty datagram reads as EOF: it would only close our own channel.
            }
            if send_raw(fd, &frame) >= 0 {
                sent += 1;
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        println!("garbage_frames_sent={sent}");
        0
    });
    let honest = fork_child(move || {
        let fd = channel();
        let (mut ok, mut tries) = (0u64, 0u64);
        let mut buf = vec![0u8; protocol::MAX_FRAME_LEN + 1];
        let mut worst = Duration::ZERO;
        while Instant::now() < until {
            tries += 1;
            let id = tries.to_le_bytes();
            let der: Vec<u8> = (0..135).map(|i| (i as u64 ^ tries) as u8).collect();
            let mut put = Vec::new();
            protocol::encode(&mut put, Op::Put, 0, u64::MAX / 4, b"honest", &id, &der);
            send_raw(fd, &put);
            let mut get = Vec::new();
            protocol::encode(&mut get, Op::Get, tries, 0, b"honest", &id, &[]);
            let t = Instant::now();
            send_raw(fd, &get);
            // Unasked replica pushes (Sync, Flush) may come before the answer: skip them.
            while let Some(n) = recv_raw(fd, &mut buf, 2000) {
                match protocol::decode(&buf[..n]) {
                    Ok(m) if matches!(m.op, Op::Sync | Op::Flush) => continue,
                    Ok(m) if m.op == Op::Hit && m.request_id == tries && m.payload == der.as_slice() => ok += 1,
                    _ => {}
                }
                break;
            }
            worst = worst.max(t.elapsed());
        }
        println!("honest_requests={tries}");
        println!("honest_answered={ok}");
        println!("honest_worst_ms={:.2}", worst.as_secs_f64() * 1000.0);
        0
    });
    let (g, h) = (wait(garbage), wait(honest));
    let st = stats();
    println!("garbage_exit={g}");
    println!("honest_exit={h}");
    println!("bad_frames={}", st.master.bad_frames);
}

/// CPU ticks (user + system, 1/100 s) the master's cache thread has used so far.
fn cache_thread_ticks() -> u64 {
    for e in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let p = e.path();
        if std::fs::read_to_string(p.join("comm")).unwrap_or_default().trim() != "cts-cache" {
            continue;
        }
        let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
        // After the command's ")": state, then utime and stime are the 12th and 13th fields.
        let f: Vec<u64> = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        return f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    }
    panic!("no cts-cache thread");
}

/// Two workers shut their channel for reading (`shutdown(SHUT_RD)`) and keep it open: the
/// master's sends to them then fail with EPIPE, while its end stays "writable" and never
/// reads EOF. One is sent a push (a store the master made itself), the other a reply (it
/// asks for stats). The master must close both channels, not spin on them.
fn shut_read() {
    setup();
    let (quit_a, quit_b) = (gate_pipe(), gate_pipe());
    let pushed = fork_child(move || {
        // SAFETY: shuts down our end of our own channel for reading.
        unsafe { libc::shutdown(channel(), libc::SHUT_RD) };
        wait_gate(quit_a);
        0
    });
    let asker = fork_child(move || {
        let fd = channel();
        // SAFETY: as above.
        unsafe { libc::shutdown(fd, libc::SHUT_RD) };
        let mut f = Vec::new();
        protocol::encode(&mut f, Op::Stats, 7, 0, b"", b"", &[]);
        send_raw(fd, &f);
        wait_gate(quit_b);
        0
    });
    std::thread::sleep(Duration::from_millis(300));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // A store of the master's own: pushed to every worker's replica.
    cluster_tls_store::bench::put(b"shut", &[7u8; 32], &[0x42; 135], now + 60);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = (Instant::now(), cache_thread_ticks());
    std::thread::sleep(Duration::from_millis(1500));
    let ticks_per_s = (cache_thread_ticks() - t0.1) as f64 / t0.0.elapsed().as_secs_f64();
    // Both workers are still alive here, holding their (half-shut) channels.
    println!("workers_open={}", stats().master.workers);
    println!("cache_thread_ticks_per_s={ticks_per_s:.1}");
    open_gate(quit_a);
    open_gate(quit_b);
    println!("pushed_exit={}", wait(pushed));
    println!("asker_exit={}", wait(asker));
}

/// The master exits while a worker lives: the worker stored a session through the session
/// ring just before. Once the worker has noticed (its lookups read the master's EOF), its
/// replica must serve nothing and the ring must hold no session any more (nobody else will
/// ever wipe it).
fn dead_master() {
    // Orphans (the worker, once its master exited) come back to this process, to be reaped.
    // SAFETY: prctl with an integer argument.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    let stored = gate_pipe();
    let master = fork_child(move || {
        setup();
        let worker = fork_child(move || {
            let far = 4_000_000_000u64;
            assert!(cluster_tls_store::bench::put(b"dead", b"stored", &[0x42; 135], far));
            assert!(cluster_tls_store::bench::get(b"dead", b"stored").is_some(), "in this worker's replica");
            println!("ring_slots_before={}", cluster_tls_store::bench::ring_slots_holding_data().unwrap_or(0));
            open_gate(stored);
            let until = Instant::now() + Duration::from_secs(10);
            while stats().worker.master_gone == 0 && Instant::now() < until {
                let _ = cluster_tls_store::bench::get(b"dead", b"probe");
                std::thread::sleep(Duration::from_millis(20));
            }
            println!("master_gone={}", stats().worker.master_gone);
            println!("found_after={}", u8::from(cluster_tls_store::bench::get(b"dead", b"stored").is_some()));
            // The EOF can come a moment before the master's pid goes: the wipe then comes
            // with a later lookup, as a live worker makes them.
            let until = Instant::now() + Duration::from_secs(5);
            while cluster_tls_store::bench::ring_slots_holding_data().unwrap_or(99) != 0 && Instant::now() < until {
                let _ = cluster_tls_store::bench::get(b"dead", b"probe");
                std::thread::sleep(Duration::from_millis(10));
            }
            println!("ring_slots_after={}", cluster_tls_store::bench::ring_slots_holding_data().unwrap_or(99));
            0
        });
        wait_gate(stored);
        // Exits with its worker still running (the worker is not waited for).
        let _ = worker;
        0
    });
    println!("master_exit={}", wait(master));
    // The worker, now this process's child.
    let mut status = 0;
    // SAFETY: reaping any child of ours with a valid status pointer.
    let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
    println!("worker_exit={}", if pid > 0 && libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 255 });
}

/// A worker that stops reading while others store and remove sessions: pushes to it are
/// lost, and it must never resume a session that was removed meanwhile.
fn sync_overflow() {
    setup();
    let ns = b"overflow";
    let der = [0x42u8; 135];
    // Too large for a slot of the session ring: the flood goes over the channels, and the
    // master pushes it to the sleeper.
    let big = [0x43u8; 600];
    let far = 4_000_000_000u64;
    // The sleeper: opens its channel (and replica), then stops reading until the writer is
    // done (a byte on `go`; at most 20 s), however slowly a loaded machine runs the writer.
    let mut go = [0 as libc::c_int; 2];
    // SAFETY: `go` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe(go.as_mut_ptr()) }, 0, "pipe");
    let sleeper = fork_child(move || {
        let _ = cluster_tls_store::bench::get(ns, b"warm-up");
        let mut pfd = libc::pollfd { fd: go[0], events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 20_000) };
        let victim_found = cluster_tls_store::bench::get(ns, b"victim").is_some();
        let kept_found = cluster_tls_store::bench::get(ns, b"kept").is_some();
        let st = stats();
        println!("sleeper_victim_found={}", u8::from(victim_found));
        println!("sleeper_kept_found={}", u8::from(kept_found));
        println!("sleeper_replica_flushes={}", st.worker.replica_flushes);
        0
    });
    std::thread::sleep(Duration::from_millis(200));
    // The writer: stores a session, floods (the sleeper's socket fills up and pushes are
    // lost), stores the victim through the session ring (which the sleeper reads when it
    // wakes, after the Flush that the lost pushes earned it), then removes the victim (a push
    // lost too, but covered by that Flush).
    let writer = fork_child(move || {
        assert!(cluster_tls_store::bench::put(ns, b"kept", &der, far));
        std::thread::sleep(Duration::from_millis(100));
        for i in 0..20_000u64 {
            cluster_tls_store::bench::put(ns, &i.to_le_bytes(), &big, far);
            if i % 64 == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        assert!(cluster_tls_store::bench::put(ns, b"victim", &der, far));
        println!("writer_ring_puts={}", stats().worker.ring_puts);
        // The master has read the victim from the ring once it answers.
        let until = Instant::now() + Duration::from_secs(5);
        while cluster_tls_store::bench::get_from_master(ns, b"victim").is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        // The flood may have filled this worker's channel: the removal waits for room
        // rather than being lost (a lost DEL left the victim in the master).
        let dels = stats().worker.dels;
        cluster_tls_store::bench::del(ns, b"victim");
        // (`stats` snapshots this worker's counters before it asks the master.)
        println!("writer_del_sent={}", stats().worker.dels - dels);
        // Make sure the master has read everything before the sleeper wakes: a stats
        // request answered (one sent on a still-full channel is dropped; try again).
        let until = Instant::now() + Duration::from_secs(5);
        while stats().master_valid != 1 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        0
    });
    let w = wait(writer);
    // SAFETY: writing one byte to our own pipe.
    unsafe { libc::write(go[1], b"g".as_ptr().cast(), 1) };
    let s = wait(sleeper);
    let st = stats();
    println!("writer_exit={w}");
    println!("sleeper_exit={s}");
    println!("sync_drops={}", st.master.sync_drops);
    println!("sync_records={}", st.master.sync_records);
}

/// A pipe whose read end a child waits on until the parent writes a byte (at most 20 s).
fn gate_pipe() -> [libc::c_int; 2] {
    let mut p = [0 as libc::c_int; 2];
    // SAFETY: `p` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0, "pipe");
    p
}

fn wait_gate(p: [libc::c_int; 2]) {
    let mut pfd = libc::pollfd { fd: p[0], events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, 20_000) };
}

fn open_gate(p: [libc::c_int; 2]) {
    // SAFETY: writing one byte to our own pipe.
    unsafe { libc::write(p[1], b"g".as_ptr().cast(), 1) };
}

/// The catch-up before a miss, when it comes across a GET that would miss too. Three workers
/// in fork order (channel 0, 1, 2). With the cache thread held, worker 2 asks for an absent
/// session, then worker 0 asks for "s", then worker 1 stores "s". Released, the thread sees
/// worker 2's GET, which would miss, and catches up on channel 0 (the GET for "s") before
/// channel 1 (its PUT). Worker 0 must get a hit: its GET is answered after the catch-up.
fn catch_up_order() {
    let cfg = Config { get_timeout: Duration::from_secs(10), ..Config::default() };
    master_setup(cfg).expect("master_setup");
    let ns = b"order";
    let der = [0x33u8; 135];
    let far = 4_000_000_000u64;
    let gates = [gate_pipe(), gate_pipe(), gate_pipe()];
    let w0 = fork_child(move || {
        let _ = cluster_tls_store::bench::get_from_master(ns, b"warm-up");
        wait_gate(gates[0]);
        let found = cluster_tls_store::bench::get_from_master(ns, b"s").is_some();
        println!("late_get_found={}", u8::from(found));
        0
    });
    let w1 = fork_child(move || {
        let _ = cluster_tls_store::bench::get_from_master(ns, b"warm-up");
        wait_gate(gates[1]);
        assert!(cluster_tls_store::bench::put(ns, b"s", &der, far));
        0
    });
    let w2 = fork_child(move || {
        let _ = cluster_tls_store::bench::get_from_master(ns, b"warm-up");
        wait_gate(gates[2]);
        let found = cluster_tls_store::bench::get_from_master(ns, b"absent").is_some();
        println!("absent_found={}", u8::from(found));
        0
    });
    // Every channel registered and idle (the warm-ups answered), then hold the thread.
    std::thread::sleep(Duration::from_millis(300));
    let hold = cluster_tls_store::bench::hold_cache_thread();
    for g in [gates[2], gates[0], gates[1]] {
        open_gate(g);
        std::thread::sleep(Duration::from_millis(150));
    }
    drop(hold);
    let codes = [wait(w0), wait(w1), wait(w2)];
    println!("child_failures={}", codes.iter().filter(|&&c| c != 0).count());
}

/// A worker removes a session and exits with more frames queued than the master reads in one
/// batch, while another worker's store makes the master push to it: the push fails (the
/// worker is gone), and the master must still read the removal before it closes the channel.
fn broken_drain() {
    setup();
    let ns = b"drain";
    let far = 4_000_000_000u64;
    // Too large for a slot of the session ring: these go over the channels.
    let big = [0x44u8; 600];
    assert!(cluster_tls_store::bench::put(ns, b"victim", &[0x42; 135], far));
    let (go_a, go_b, check) = (gate_pipe(), gate_pipe(), gate_pipe());
    let leaver = fork_child(move || {
        let _ = cluster_tls_store::bench::get_from_master(ns, b"warm-up");
        wait_gate(go_a);
        for i in 0..40u64 {
            cluster_tls_store::bench::put(ns, &i.to_le_bytes(), &big, far);
        }
        cluster_tls_store::bench::del(ns, b"victim");
        0
    });
    let storer = fork_child(move || {
        // The master's hit goes into this worker's replica.
        let _ = cluster_tls_store::bench::get_from_master(ns, b"victim");
        wait_gate(go_b);
        cluster_tls_store::bench::put(ns, b"pushed", &big, far);
        // Shortly after the master's round: the removal it read from the leaver's channel
        // must have been pushed here in that round, not at the next (up to a second later).
        wait_gate(check);
        println!("storer_replica_victim={}", u8::from(cluster_tls_store::bench::get(ns, b"victim").is_some()));
        0
    });
    std::thread::sleep(Duration::from_millis(300));
    {
        // Everything below queues up while the cache thread is held.
        let _hold = cluster_tls_store::bench::hold_cache_thread();
        open_gate(go_a);
        println!("leaver_exit={}", wait(leaver));
        open_gate(go_b);
        std::thread::sleep(Duration::from_millis(300));
    }
    // The round that drains the leaver's channel applies the removal here, then pushes it:
    // give that round a moment past the removal, not a whole second (the next round's tick).
    let until = Instant::now() + Duration::from_secs(5);
    while cluster_tls_store::bench::get(ns, b"victim").is_some() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    open_gate(check);
    println!("victim_found={}", u8::from(cluster_tls_store::bench::get(ns, b"victim").is_some()));
    println!("last_put_found={}", u8::from(cluster_tls_store::bench::get(ns, &39u64.to_le_bytes()).is_some()));
    println!("storer_exit={}", wait(storer));
}

/// A context shared with the cluster's ticket keys, then shared again asking to keep its own:
/// refused, and left as it was (OpenSSL cannot tell whether the host replaced our callback).
fn share_twice() {
    use cluster_tls_store::{share_sessions_with, ticket_mode, ShareOptions, TicketMode};
    setup();
    let ctx = SslContext::builder(SslMethod::tls_server()).expect("ctx").build();
    share_sessions_with(&*ctx, Some("twice"), ShareOptions::default()).expect("first share");
    println!("first_mode_cluster={}", u8::from(ticket_mode(&*ctx) == TicketMode::ClusterKeys));
    let keep = ShareOptions { keep_ticket_keys: true, ..ShareOptions::default() };
    let refused = matches!(share_sessions_with(&*ctx, Some("twice"), keep), Err(Error::InvalidConfig(m)) if m.contains("KEEP_TICKET_KEYS"));
    println!("keep_refused={}", u8::from(refused));
    println!("mode_still_cluster={}", u8::from(ticket_mode(&*ctx) == TicketMode::ClusterKeys));
    let again = share_sessions_with(&*ctx, Some("twice"), ShareOptions::default()).is_ok();
    println!("same_options_again_ok={}", u8::from(again));
}

/// A master that stores and removes sessions itself (it serves TLS too) while it has a
/// worker: the worker's replica hears of both, like it hears of other workers' changes.
fn master_in_process() {
    setup();
    let ns = b"inproc";
    let der = [0x21u8; 135];
    let far = 4_000_000_000u64;
    let gates = [gate_pipe(), gate_pipe()];
    let w = fork_child(move || {
        // Open the channel; then the master stores "s".
        let _ = cluster_tls_store::bench::get_from_master(ns, b"warm-up");
        wait_gate(gates[0]);
        let before = stats().worker.replica_hits;
        let found = cluster_tls_store::bench::get(ns, b"s").is_some();
        let pushed = stats().worker.replica_hits == before + 1;
        println!("worker_found_store={}", u8::from(found));
        println!("worker_store_was_pushed={}", u8::from(pushed));
        // The master removes "s": the replica must not answer it any more.
        wait_gate(gates[1]);
        let found = cluster_tls_store::bench::get(ns, b"s").is_some();
        println!("worker_found_removed={}", u8::from(found));
        0
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(cluster_tls_store::bench::put(ns, b"s", &der, far));
    std::thread::sleep(Duration::from_millis(200));
    open_gate(gates[0]);
    std::thread::sleep(Duration::from_millis(300));
    cluster_tls_store::bench::del(ns, b"s");
    std::thread::sleep(Duration::from_millis(200));
    open_gate(gates[1]);
    println!("worker_exit={}", wait(w));
}

fn soak(secs: u64, budget_mib: usize) {
    let budget = budget_mib << 20;
    let cfg = Config { cache_bytes: budget, get_timeout: Duration::from_millis(500), ..Config::default() };
    master_setup(cfg).expect("master_setup");
    let rss0 = rss_kib();
    let until = Instant::now() + Duration::from_secs(secs);
    // At least SECS seconds and at least 40,000 PUTs per worker (enough to cycle the budget
    // several times however slow a loaded machine is), at most 60 s more.
    let cap = until + Duration::from_secs(60);
    let enough = 40_000u64;
    let workers: Vec<i32> = (0..3u64)
        .map(|w| {
            fork_child(move || {
                let fd = channel();
                let mut n = 0u64;
                let mut frame = Vec::with_capacity(256);
                let der = [0x5au8; 135];
                while (Instant::now() < until || n < enough) && Instant::now() < cap {
                    n += 1;
                    let mut id = [0u8; 32];
                    id[..8].copy_from_slice(&n.to_le_bytes());
                    id[8] = w as u8;
                    frame.clear();
                    protocol::encode(&mut frame, Op::Put, 0, u64::MAX / 4, b"soak", &id, &der);
                    // The channel is non-blocking: wait for room instead of dropping, so the
                    // soak measures what the master absorbs.
                    while send_raw(fd, &frame) < 0 {
                        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
                            println!("worker{w}_sent={n}");
                            return 1;
                        }
                        let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
                        // SAFETY: one valid pollfd.
                        unsafe { libc::poll(&mut pfd, 1, 100) };
                        if Instant::now() >= cap {
                            break;
                        }
                    }
                }
                println!("worker{w}_sent={n}");
                0
            })
        })
        .collect();
    let mut peak = 0;
    let mut running = workers.len();
    while running > 0 {
        peak = peak.max(rss_kib());
        std::thread::sleep(Duration::from_millis(50));
        for &w in &workers {
            let mut status = 0;
            // SAFETY: non-blocking reap of our own child with a valid status pointer.
            if unsafe { libc::waitpid(w, &mut status, libc::WNOHANG) } == w {
                running -= 1;
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    peak = peak.max(rss_kib());
    let st = stats();
    println!("budget_bytes={budget}");
    println!("stores={}", st.master.stores);
    println!("evictions={}", st.master.evictions);
    println!("entries={}", st.master.entries);
    println!("cache_bytes={}", st.master.bytes);
    println!("rss_kib_before={rss0}");
    println!("rss_kib_peak={peak}");
    println!("rss_kib_after={}", rss_kib());
}

/// Workers forked while the remote tier's threads work must not inherit a lock held by one
/// of them. The remote server accepts TCP and never answers, so the threads keep making
/// connections (a TLS client set up, a handshake that times out, a pause, again) from the
/// moment setup returns; meanwhile the master forks workers back to back. Each worker runs
/// the OpenSSL work a first handshake does (algorithm fetches, a context, a key pair, a
/// signature, a cipher) under an alarm: a lock snapshotted held by a remote thread would
/// leave it waiting until SIGALRM.
fn remote_forks(ms: u64) {
    let port = silent::silent_server();
    let dir = std::env::temp_dir().join(format!("cts-remote-forks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let key = dir.join("remote.key");
    std::fs::write(&key, format!("{}\n", "ab".repeat(32))).expect("key file");
    let cfg = Config {
        get_timeout: Duration::from_millis(200),
        remote_url: Some(format!("rediss://127.0.0.1:{port}/0").as_str().into()),
        remote_key_file: Some(key),
        remote_timeout: Duration::from_millis(20),
        ..Config::default()
    };
    master_setup(cfg).expect("master_setup");
    let _ = std::fs::remove_dir_all(&dir);
    let (mut forks, mut hung, mut failed) = (0, 0, 0);
    let end = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < end {
        let pid = fork_child(|| {
            // SAFETY: alarm has no preconditions; its default action ends this child.
            unsafe { libc::alarm(5) };
            let work = || -> Result<(), openssl::error::ErrorStack> {
                drop(SslContext::builder(SslMethod::tls())?.build());
                let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1)?;
                let key = openssl::pkey::PKey::from_ec_key(openssl::ec::EcKey::generate(&group)?)?;
                let mut signer = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha384(), &key)?;
                signer.update(b"worker")?;
                signer.sign_to_vec()?;
                openssl::symm::encrypt(openssl::symm::Cipher::chacha20_poly1305(), &[1; 32], Some(&[2; 12]), b"x")?;
                Ok(())
            };
            i32::from(work().is_err())
        });
        forks += 1;
        match wait(pid) {
            0 => {}
            c if c == 128 + libc::SIGALRM => hung += 1,
            _ => failed += 1,
        }
    }
    let st = stats();
    println!("forks={forks}");
    println!("workers_hung={hung}");
    println!("workers_failed={failed}");
    println!("remote_errors={}", st.master.remote_errors);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: u64| args.get(i).and_then(|v| v.parse().ok()).unwrap_or(d);
    match args.first().map(String::as_str) {
        Some("churn") => churn(num(1, 1000) as usize),
        Some("grandchild") => grandchild(),
        Some("threaded-forks") => threaded_forks(num(1, 4) as usize, num(2, 50) as usize),
        Some("exec") => exec_worker(),
        Some("exec-child") => std::process::exit(exec_child()),
        Some("hostile") => hostile(num(1, 3)),
        Some("soak") => soak(num(1, 5), num(2, 16) as usize),
        Some("sync-overflow") => sync_overflow(),
        Some("catch-up-order") => catch_up_order(),
        Some("master-in-process") => master_in_process(),
        Some("remote-forks") => remote_forks(num(1, 1500)),
        Some("shut-read") => shut_read(),
        Some("dead-master") => dead_master(),
        Some("share-twice") => share_twice(),
        Some("broken-drain") => broken_drain(),
        _ => {
            eprintln!("usage: cts-test-helper churn N | grandchild | exec | hostile SECS | soak SECS MIB");
            std::process::exit(2);
        }
    }
}
