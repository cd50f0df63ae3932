//! Cluster-wide session ticket keys: TLS 1.3 (OpenSSL's default, stateless tickets) and
//! TLS 1.2 tickets resume across workers whose `SSL_CTX` was built after the fork.

mod common;

use std::time::Duration;

use common::{distinct_pids, resume_n, Client, Server};

#[test]
fn tls13_default_tickets_resume_across_workers() {
    let s = Server::start(&["--workers", "4"]);
    let out = resume_n(s.addr(), false, 40);
    let resumed = out.iter().filter(|o| o.reused).count();
    assert_eq!(resumed, 40, "every TLS 1.3 ticket opens on any worker: {out:?}");
    assert!(distinct_pids(&out) >= 2);
    let st = s.stats();
    assert_eq!(st["stores"], 0, "stateless tickets are not stored in the cache: {st:?}");
    assert!(st["w_tickets_issued"] >= 1, "{st:?}");
}

#[test]
fn tls12_tickets_resume_across_workers() {
    let s = Server::start(&["--workers", "4", "--tls12"]);
    let out = resume_n(s.addr(), true, 40);
    assert!(out.iter().all(|o| o.reused), "{out:?}");
    assert!(distinct_pids(&out) >= 2);
    let st = s.stats();
    assert!(st["w_tickets_opened"] >= 1, "resumptions went through tickets: {st:?}");
}

#[test]
fn without_ticket_sharing_tls13_tickets_miss_across_workers() {
    let s = Server::start(&["--workers", "4", "--no-share-tickets"]);
    let out = resume_n(s.addr(), false, 40);
    let resumed = out.iter().filter(|o| o.reused).count();
    assert!(resumed < 40, "each worker's own keys cannot open the others' tickets: {resumed}/40");
}

#[test]
fn rotated_keys_still_open_and_renew_then_expire_after_k_rotations() {
    // Rotation every 3 s, a key opens tickets for 3 rotations (at most 9 s).
    let s = Server::start(&["--workers", "1", "--ticket-rotation", "3", "--ticket-keys", "3"]);
    let mut c = Client::new(false);
    c.request(s.addr(), "/").expect("full handshake");
    let first_ticket = c.session.clone();

    std::thread::sleep(Duration::from_millis(3500));
    c.session = first_ticket.clone();
    assert!(c.request(s.addr(), "/").expect("after one rotation").reused, "a ticket one rotation old opens");
    let st = s.stats();
    assert!(st["w_tickets_renewed"] >= 1, "and is renewed: {st:?}");
    assert!(st["ticket_rotations"] >= 1, "{st:?}");

    std::thread::sleep(Duration::from_millis(6500));
    c.session = first_ticket;
    assert!(!c.request(s.addr(), "/").expect("after K rotations").reused, "a ticket older than K rotations is refused");
    let st = s.stats();
    assert!(st["w_tickets_refused"] >= 1, "{st:?}");
}
