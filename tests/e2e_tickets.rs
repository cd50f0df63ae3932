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
    assert_eq!(st["ticket_mode"], 1, "the library took the tickets over (CTS_TICKETS_CLUSTER_KEYS): {st:?}");
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
    assert_eq!(s.stats()["ticket_mode"], 2, "the host kept its keys (CTS_TICKETS_HOST_KEYS)");
}

#[test]
fn a_host_that_keeps_its_own_keys_keeps_them_and_is_told_so() {
    // The context is built before the fork, so every worker inherits the same OpenSSL keys:
    // the host's own keys open each other's tickets, and the library never touches them.
    let s = Server::start(&["--workers", "4", "--ctx-before-fork", "--no-share-tickets"]);
    let out = resume_n(s.addr(), false, 30);
    assert!(out.iter().all(|o| o.reused), "the host's inherited keys open every ticket: {out:?}");
    assert!(distinct_pids(&out) >= 2);
    let st = s.stats();
    assert_eq!(st["ticket_mode"], 2, "{st:?}");
    assert_eq!(st["w_tickets_issued"] + st["w_tickets_opened"], 0, "our callback never ran: {st:?}");
}

#[test]
fn ticket_mode_reports_sharing_off_and_no_tickets() {
    let off = Server::start(&["--workers", "2", "--tickets-off"]);
    assert_eq!(off.stats()["ticket_mode"], 3, "share_tickets = 0 (CTS_TICKETS_SHARING_OFF)");
    drop(off);
    let none = Server::start(&["--workers", "2", "--no-tickets"]);
    assert_eq!(none.stats()["ticket_mode"], 4, "SSL_OP_NO_TICKET (CTS_TICKETS_NONE_ISSUED)");
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

extern "C" {
    fn SSL_SESSION_get0_ticket(s: *const openssl_sys::SSL_SESSION, tick: *mut *const u8, len: *mut usize);
}

/// The key name a ticket was made with: OpenSSL puts it in the ticket's first 16 bytes.
fn ticket_key_name(c: &Client) -> Vec<u8> {
    use foreign_types::ForeignTypeRef;
    let sess = c.session.as_ref().expect("session");
    let (mut p, mut n) = (std::ptr::null(), 0usize);
    // SAFETY: reads the ticket of a live session; the pointer is valid while it lives.
    unsafe {
        SSL_SESSION_get0_ticket(sess.as_ptr(), &mut p, &mut n);
        assert!(n >= 16, "the session carries a ticket");
        std::slice::from_raw_parts(p, 16).to_vec()
    }
}

fn key(name: u8, len: usize) -> Vec<u8> {
    let mut k: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(name)).collect();
    k[..16].fill(name);
    k
}

#[test]
fn operator_key_file_is_honoured_and_a_reload_takes_effect() {
    let file = std::env::temp_dir().join(format!("cts-ticket-keys-{}.txt", std::process::id()));
    let lines = |keys: &[Vec<u8>]| -> String { keys.iter().map(|k| openssl::base64::encode_block(k) + "\n").collect() };
    // HAProxy-style base64 lines: an 80-byte key first (encrypts), a 48-byte key second.
    std::fs::write(&file, lines(&[key(0xA1, 80), key(0xB2, 48)])).expect("key file");
    let s = Server::start(&["--workers", "4", "--ticket-key-file", file.to_str().expect("utf-8 path")]);
    let out = resume_n(s.addr(), false, 20);
    assert!(out.iter().all(|o| o.reused), "{out:?}");
    assert!(distinct_pids(&out) >= 2);
    let mut c = Client::new(false);
    c.request(s.addr(), "/").expect("full");
    assert_eq!(ticket_key_name(&c), vec![0xA1; 16], "the file's first key encrypts");
    let made_with_a1 = c.session.clone();

    // Reload: a new first key; the old one still opens (and its tickets are renewed).
    std::fs::write(&file, lines(&[key(0xC3, 80), key(0xA1, 80)])).expect("rewrite");
    std::thread::sleep(Duration::from_millis(3500));
    c.session = made_with_a1.clone();
    assert!(c.request(s.addr(), "/").expect("after reload").reused, "the previous key still opens");
    assert_eq!(ticket_key_name(&c), vec![0xC3; 16], "new tickets use the reloaded first key");

    // Drop the old key: its tickets are refused.
    std::fs::write(&file, lines(&[key(0xC3, 80)])).expect("rewrite");
    std::thread::sleep(Duration::from_millis(3500));
    c.session = made_with_a1;
    assert!(!c.request(s.addr(), "/").expect("after removal").reused, "a removed key opens nothing");
    drop(s);

    // nginx-style: one raw 48-byte key (AES-128-CBC, 16-byte HMAC key).
    std::fs::write(&file, key(0xD4, 48)).expect("raw key file");
    let s = Server::start(&["--workers", "4", "--ticket-key-file", file.to_str().expect("utf-8 path")]);
    let out = resume_n(s.addr(), false, 10);
    assert!(out.iter().all(|o| o.reused), "a 48-byte key works: {out:?}");
    let _ = std::fs::remove_file(&file);
}
