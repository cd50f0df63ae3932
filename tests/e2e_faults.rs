//! A stopped or killed master must never stall the workers' handshakes.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Server};

fn timed(c: &mut Client, s: &Server) -> (Duration, bool) {
    let t = Instant::now();
    let o = c.request(s.addr(), "/").expect("handshake completes");
    (t.elapsed(), o.reused)
}

#[test]
fn stopped_master_costs_at_most_one_timeout_and_recovers() {
    let s = Server::start(&["--workers", "4", "--tls12", "--no-tickets", "--get-timeout-us", "20000"]);
    let mut c = Client::new(true);
    c.request(s.addr(), "/").expect("full");
    assert!(c.request(s.addr(), "/").expect("resume").reused);

    s.signal_master(libc::SIGSTOP);
    // Six clients handshake concurrently (so several workers are mid-lookup at once) while
    // the master is stopped.
    let addr = s.addr();
    let started = Instant::now();
    let handles: Vec<_> = (0..6)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = Client::new(true);
                let mut times = Vec::new();
                for _ in 0..10 {
                    let t = Instant::now();
                    c.request(addr, "/").expect("handshake completes while the master is stopped");
                    times.push(t.elapsed());
                }
                times
            })
        })
        .collect();
    let times: Vec<Duration> = handles.into_iter().flat_map(|h| h.join().expect("client thread")).collect();
    let worst = times.iter().copied().max().unwrap_or_default();
    let n = times.len() as u32;
    println!(
        "master stopped: {n} handshakes by 6 concurrent clients in {:?}, worst {worst:?}, mean {:?}",
        started.elapsed(),
        times.iter().sum::<Duration>() / n
    );
    assert!(worst < Duration::from_millis(500), "a handshake took {worst:?} while the master was stopped");
    let st = s.stats();
    println!("worker counters while stopped: {st:?}");
    // Each of the 4 workers pays a few timeouts at most (one per breaker probe), not one per
    // handshake.
    assert!(st["w_timeouts"] <= 6, "breaker did not open: {st:?}");

    s.signal_master(libc::SIGCONT);
    let back = Instant::now();
    let mut recovered = None;
    while back.elapsed() < Duration::from_secs(3) {
        let (_, reused) = timed(&mut c, &s);
        if reused {
            recovered = Some(back.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let recovered = recovered.expect("resumption came back after SIGCONT");
    println!("resumption back {recovered:?} after SIGCONT");
    assert!(recovered < Duration::from_millis(1500), "took {recovered:?}");
}

#[test]
fn killed_master_leaves_workers_serving_full_handshakes() {
    let s = Server::start(&["--workers", "4", "--tls12", "--no-tickets"]);
    let mut c = Client::new(true);
    c.request(s.addr(), "/").expect("full");
    s.signal_master(libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(100));
    let mut worst = Duration::ZERO;
    for _ in 0..30 {
        let (d, _) = timed(&mut c, &s);
        worst = worst.max(d);
    }
    println!("master killed: 30 handshakes, worst {worst:?}");
    assert!(worst < Duration::from_secs(1));
    let st = s.stats();
    assert_eq!(st["w_master_gone"], 1, "stats say the master is gone: {st:?}");
    assert_eq!(st["master_valid"], 0);
}

#[test]
fn killed_master_leaves_no_worker_resuming_from_its_replica() {
    // Removals travel through the master: once it is gone, a session a worker's OpenSSL
    // removes (a fatal alert) would stay resumable in every other worker's replica. So a
    // worker that finds the master gone serves nothing from its replica.
    let s = Server::start(&["--workers", "4", "--tls12", "--no-tickets"]);
    let mut c = Client::new(true);
    assert!(!c.request(s.addr(), "/").expect("full").reused);
    let saved = c.session.clone();
    let mut before = 0;
    for _ in 0..20 {
        c.session = saved.clone();
        before += usize::from(c.request(s.addr(), "/").expect("resume").reused);
    }
    assert_eq!(before, 20, "the session resumed on every worker while the master lived");
    s.signal_master(libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(300));
    let mut after = 0;
    for _ in 0..20 {
        c.session = saved.clone();
        after += usize::from(c.request(s.addr(), "/").expect("full handshake").reused);
    }
    assert_eq!(after, 0, "a worker resumed from its replica after the master died");
}
