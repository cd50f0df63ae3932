//! End to end: real forked workers, real handshakes, a real client (openssl crate).

mod common;

use std::time::Duration;

use common::{distinct_pids, resume_n, sum_over_workers, Client, Server};

fn all_resumed_on_several_workers(server: &Server, tls12: bool, proto: &str) {
    let out = resume_n(server.addr(), tls12, 60);
    let resumed = out.iter().filter(|o| o.reused).count();
    assert_eq!(resumed, 60, "every connection resumes: {out:?}");
    assert!(out.iter().all(|o| o.proto == proto), "protocol {proto}: {out:?}");
    let pids = distinct_pids(&out);
    assert!(pids >= 2, "resumptions landed on {pids} worker(s) only; the test proves nothing");
    for o in &out {
        assert!(server.workers.contains(&(o.pid as i32)), "answer from a known worker: {o:?}");
    }
}

#[test]
fn tls12_session_ids_resume_across_workers() {
    let s = Server::start(&["--workers", "4", "--tls12", "--no-tickets"]);
    all_resumed_on_several_workers(&s, true, "TLSv1.2");
    let st = s.stats();
    assert_eq!(st["master_valid"], 1);
    // The session reached the master through the session ring (the other workers read it
    // there too), not in a message.
    assert!(st["ring_records"] >= 1, "the stored session went through the ring: {st:?}");
    assert!(st["w_hits"] >= 1, "{st:?}");
}

#[test]
fn without_replicas_every_lookup_is_a_round_trip_to_the_master() {
    let s = Server::start(&["--workers", "4", "--tls12", "--no-tickets", "--replica-bytes", "0"]);
    all_resumed_on_several_workers(&s, true, "TLSv1.2");
    let st = s.stats();
    assert!(st["hits"] >= 60, "the master answered every resumption: {st:?}");
    assert_eq!(st["sync_records"] + st["w_replica_hits"], 0, "{st:?}");
}

#[test]
fn replicas_answer_lookups_inside_the_worker() {
    let s = Server::start(&["--workers", "4", "--tls12", "--no-tickets"]);
    all_resumed_on_several_workers(&s, true, "TLSv1.2");
    // Ask every worker (several /stats requests spread over them): together their replicas
    // answered most of the resumptions, and the master only a few.
    let per_worker = s.stats_per_worker();
    let replica_hits = sum_over_workers(&per_worker, "w_replica_hits");
    let any = per_worker.values().next().expect("stats");
    assert!(replica_hits >= 30, "replica hits {replica_hits} over {} workers: {per_worker:?}", per_worker.len());
    assert!(any["hits"] < 60, "{any:?}");
}

#[test]
fn context_built_before_the_fork_resumes_across_workers() {
    let s = Server::start(&["--workers", "4", "--tls12", "--no-tickets", "--ctx-before-fork"]);
    all_resumed_on_several_workers(&s, true, "TLSv1.2");
}

#[test]
fn tls13_stateful_tickets_resume_across_workers() {
    let s = Server::start(&["--workers", "4", "--no-tickets"]);
    all_resumed_on_several_workers(&s, false, "TLSv1.3");
}

#[test]
fn immediate_reconnections_find_the_session_just_made_on_another_worker() {
    // TLS 1.3 stateful: every resumption issues a fresh ticket (a PUT from the worker that
    // made it) and the client offers it at once, usually to another worker.
    let s = Server::start(&["--workers", "4", "--no-tickets"]);
    let out = resume_n(s.addr(), false, 300);
    let missed = out.iter().filter(|o| !o.reused).count();
    assert_eq!(missed, 0, "{missed} of 300 immediate reconnections missed their fresh session");
    assert!(distinct_pids(&out) >= 2);
    // A TLS 1.3 session is resumed at most once, mostly on another worker: its maker keeps
    // no decoded copy (a long-lived `SSL_SESSION` per new session cost more than the decode
    // it saved), so every replica hit here was decoded.
    let per_worker = s.stats_per_worker();
    let replica = sum_over_workers(&per_worker, "w_replica_hits");
    let decoded = sum_over_workers(&per_worker, "w_replica_decoded_hits");
    assert!(replica >= 150, "replica hits {replica} of 300 resumptions: {per_worker:?}");
    assert_eq!(decoded, 0, "TLS 1.3 sessions kept decoded: {per_worker:?}");
}

#[test]
fn without_sharing_cross_worker_resumptions_miss() {
    let s = Server::start(&["--workers", "4", "--tls12", "--no-tickets", "--no-share"]);
    let out = resume_n(s.addr(), true, 60);
    let resumed = out.iter().filter(|o| o.reused).count();
    assert!(resumed < 60, "without the shared cache some connections must miss: {resumed}/60");
}

#[test]
fn master_alone_uses_the_cache_in_process() {
    let s = Server::start(&["--workers", "0", "--tls12", "--no-tickets"]);
    let out = resume_n(s.addr(), true, 20);
    assert!(out.iter().all(|o| o.reused));
    let st = s.stats();
    assert_eq!(st["role"], 1, "the master serves itself: {st:?}");
    assert!(st["hits"] >= 20);
}

/// A session made in namespace alpha is offered to namespace beta and must not resume there;
/// alpha still resumes it. Both contexts keep the same host-chosen session id context, so only
/// the namespace keeps their sessions apart.
fn assert_namespaces_isolated(extra: &[&str], tls12: bool) {
    let mut args = vec!["--workers", "2", "--ns", "alpha", "--ns2", "beta", "--keep-sid-ctx"];
    args.extend_from_slice(extra);
    let s = Server::start(&args);
    let mut c = Client::new(tls12);
    let first = c.request(s.addr(), "/").expect("alpha");
    assert!(!first.reused);
    let saved = c.session.clone();
    for _ in 0..10 {
        c.session = saved.clone();
        let o = c.request(s.addr2(), "/").expect("beta");
        assert!(!o.reused, "a session of namespace alpha resumed in namespace beta ({extra:?})");
    }
    for _ in 0..10 {
        c.session = saved.clone();
        assert!(c.request(s.addr(), "/").expect("alpha again").reused, "alpha still resumes its own session");
    }
}

#[test]
fn namespaces_are_isolated() {
    assert_namespaces_isolated(&["--tls12", "--no-tickets"], true);
}

#[test]
fn namespaces_are_isolated_for_tickets_too() {
    // The cluster's ticket keys are the same in every namespace: a ticket is sealed with an
    // HMAC key derived for its namespace, or it would open in the other (found in review:
    // both TLS 1.2 and TLS 1.3 tickets of alpha resumed in beta).
    assert_namespaces_isolated(&["--tls12"], true);
    assert_namespaces_isolated(&[], false);
}

#[test]
fn tls13_stateless_tickets_are_not_stored() {
    // Tickets on (the OpenSSL default): the ticket carries the session, the cache must not.
    let s = Server::start(&["--workers", "1"]);
    let mut c = Client::new(false);
    for _ in 0..5 {
        c.request(s.addr(), "/").expect("tls 1.3 connection");
    }
    let st = s.stats();
    assert_eq!(st["stores"], 0, "{st:?}");
    // The full handshake issues two tickets (OpenSSL's default), each seen and skipped.
    assert!(st["w_stateless_skipped"] >= 2, "{st:?}");
}

#[test]
fn sessions_expire_at_their_timeout() {
    // Session times are whole seconds: with a 1 s timeout a session made just before a
    // second turns could expire before the immediate resumption below (seen once in CI), so
    // 2 s, and a sleep past 3 whole seconds.
    let s = Server::start(&["--workers", "4", "--tls12", "--no-tickets", "--session-timeout", "2"]);
    let mut c = Client::new(true);
    c.request(s.addr(), "/").expect("full");
    assert!(c.request(s.addr(), "/").expect("resume").reused);
    let saved = c.session.clone();
    std::thread::sleep(Duration::from_millis(3600));
    c.session = saved;
    let o = c.request(s.addr(), "/").expect("after expiry");
    assert!(!o.reused, "an expired session must not resume");
    let st = s.stats();
    assert!(st["expirations"] >= 1 || st["entries"] <= 1, "expired entries are gone: {st:?}");
}

/// The master's cache thread's CPU time (ns) and the times it was switched in
/// (`/proc/<pid>/task/<tid>/schedstat`).
fn cache_thread_sched(master: i32) -> (u64, u64) {
    for t in std::fs::read_dir(format!("/proc/{master}/task")).expect("task dir").flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == "cts-cache" {
            let st = std::fs::read_to_string(t.path().join("schedstat")).expect("schedstat");
            let f: Vec<u64> = st.split_whitespace().filter_map(|v| v.parse().ok()).collect();
            return (f[0], f[2]);
        }
    }
    panic!("no cts-cache thread in the master");
}

#[test]
fn an_idle_master_wakes_about_once_a_second_to_sweep() {
    let s = Server::start(&["--workers", "2", "--tls12", "--no-tickets", "--session-timeout", "1"]);
    let mut c = Client::new(true);
    c.request(s.addr(), "/").expect("full");
    std::thread::sleep(Duration::from_millis(300));
    // Nothing reaches the master for 3 s: only its sweep timer may wake the cache thread,
    // and it must (an expired session is swept without traffic), about once a second, never
    // in a loop.
    let (cpu0, woke0) = cache_thread_sched(s.master);
    std::thread::sleep(Duration::from_millis(3000));
    let (cpu1, woke1) = cache_thread_sched(s.master);
    let (cpu, woke) = (Duration::from_nanos(cpu1 - cpu0), woke1 - woke0);
    assert!((2..=6).contains(&woke), "the idle cache thread woke {woke} times in 3 s");
    assert!(cpu < Duration::from_millis(100), "the idle cache thread used {cpu:?} of CPU in 3 s");
    let st = s.stats();
    assert!(st["expirations"] >= 1, "the session expired after 1 s was swept: {st:?}");
}

#[test]
fn max_lifetime_caps_a_long_session_timeout() {
    let s = Server::start(&[
        "--workers",
        "2",
        "--tls12",
        "--no-tickets",
        "--session-timeout",
        "3600",
        "--max-lifetime",
        "1",
    ]);
    let mut c = Client::new(true);
    c.request(s.addr(), "/").expect("full");
    let saved = c.session.clone();
    std::thread::sleep(Duration::from_millis(2600));
    // The cache dropped it; the worker that made it has no internal cache either.
    c.session = saved;
    assert!(!c.request(s.addr(), "/").expect("after the cap").reused);
}

#[test]
fn cache_evicts_least_recently_used_at_the_byte_budget() {
    let budget = 65_536u64;
    // Replicas are sized apart from the master's cache; give them the same budget so that an
    // eviction is one everywhere.
    let b = budget.to_string();
    let s = Server::start(&["--workers", "2", "--tls12", "--no-tickets", "--cache-bytes", &b, "--replica-bytes", &b]);
    let mut oldest = Client::new(true);
    oldest.request(s.addr(), "/").expect("oldest");
    let oldest_session = oldest.session.clone();
    // Each session costs ~350 bytes against the budget: 400 fresh sessions overflow it.
    for _ in 0..400 {
        Client::new(true).request(s.addr(), "/").expect("filler");
    }
    let st = s.stats();
    assert!(st["evictions"] > 0, "{st:?}");
    assert!(st["entries"] < 400, "{st:?}");
    oldest.session = oldest_session;
    assert!(!oldest.request(s.addr(), "/").expect("oldest again").reused, "the LRU session was evicted");
}

#[test]
fn eight_threads_per_worker_resume_their_own_sessions() {
    let s = Server::start(&["--workers", "3", "--threads", "8", "--tls12", "--no-tickets"]);
    let addr = s.addr();
    let handles: Vec<_> = (0..24)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Client::new(true);
                c.request(addr, "/").expect("full");
                let mut pids = Vec::new();
                for i in 0..15 {
                    let offered = c.session.as_ref().expect("session").id().to_vec();
                    let o = c.request(addr, "/").unwrap_or_else(|e| panic!("thread {t} conn {i}: {e}"));
                    assert!(o.reused, "thread {t} conn {i} did not resume");
                    let got = c.session.as_ref().expect("session").id().to_vec();
                    assert_eq!(offered, got, "thread {t} got another client's session back");
                    pids.push(o.pid);
                }
                pids
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().expect("client thread"));
    }
    all.sort_unstable();
    all.dedup();
    assert!(all.len() >= 2, "connections spread over workers");
}

#[test]
fn master_setup_in_a_worker_is_refused() {
    let s = Server::start(&["--workers", "2", "--check-worker-api"]);
    let st = s.stats();
    assert_eq!(st["worker_setup_code"], 3, "CTS_ERR_IN_WORKER: {st:?}");
}

#[test]
fn debug_log_never_contains_a_session_master_key() {
    let log = std::env::temp_dir().join(format!("cts-debug-log-{}.txt", std::process::id()));
    let s = Server::start_with(&["--workers", "3", "--no-tickets"], &[("CTS_DEBUG", "1")], Some(&log));
    let mut keys = Vec::new();
    for tls12 in [true, false] {
        let mut c = Client::new(tls12);
        for _ in 0..10 {
            c.request(s.addr(), "/").expect("connection");
            let sess = c.session.as_ref().expect("session");
            let mut key = vec![0u8; sess.master_key_len()];
            sess.master_key(&mut key);
            keys.push(key);
        }
    }
    drop(s);
    let text = std::fs::read(&log).expect("log file");
    let _ = std::fs::remove_file(&log);
    let lines = String::from_utf8_lossy(&text);
    // (The master reads stores from the session ring up to a second late: it may not have
    // logged them before the server was stopped.)
    assert!(lines.contains("new session") && lines.contains("get session"), "debug logging was on:\n{lines}");
    for key in &keys {
        assert!(key.len() >= 32);
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!lines.contains(&hex), "a master key (hex) is in the log");
        assert!(!lines.to_uppercase().contains(&hex.to_uppercase()));
        assert!(!text.windows(16).any(|w| w == &key[..16]), "master key bytes are in the log");
    }
}

/// A client certificate of several KiB (many subject alternative names): it travels inside the
/// session, so the session DER is several KiB too.
fn big_client_certificate() -> (openssl::x509::X509, openssl::pkey::PKey<openssl::pkey::Private>) {
    use openssl::asn1::Asn1Time;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::hash::MessageDigest;
    use openssl::nid::Nid;
    use openssl::pkey::PKey;
    use openssl::x509::extension::SubjectAlternativeName;
    use openssl::x509::{X509Builder, X509NameBuilder};
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("group");
    let key = PKey::from_ec_key(EcKey::generate(&group).expect("key")).expect("pkey");
    let mut name = X509NameBuilder::new().expect("name");
    name.append_entry_by_text("CN", "client").expect("cn");
    let name = name.build();
    let mut b = X509Builder::new().expect("builder");
    b.set_version(2).expect("version");
    b.set_subject_name(&name).expect("subject");
    b.set_issuer_name(&name).expect("issuer");
    b.set_pubkey(&key).expect("pubkey");
    let (from, until) = (Asn1Time::days_from_now(0).expect("now"), Asn1Time::days_from_now(1).expect("later"));
    b.set_not_before(&from).expect("not before");
    b.set_not_after(&until).expect("not after");
    let mut san = SubjectAlternativeName::new();
    for i in 0..150 {
        san.dns(&format!("host-{i:04}.a-rather-long-client-domain-name.example"));
    }
    let ext = san.build(&b.x509v3_context(None, None)).expect("san");
    b.append_extension(ext).expect("extension");
    b.sign(&key, MessageDigest::sha256()).expect("sign");
    let cert = b.build();
    assert!(cert.to_der().expect("der").len() > 5000, "the certificate is several KiB");
    (cert, key)
}

#[test]
fn sessions_carrying_a_client_certificate_resume_across_workers() {
    let (cert, key) = big_client_certificate();
    let s = Server::start(&["--workers", "4", "--tls12", "--no-tickets", "--verify-client"]);
    let mut c = Client::with_certificate(true, &cert, &key);
    c.request(s.addr(), "/").expect("full handshake with a client certificate");
    let der_len = c.session.as_ref().expect("session").to_der().expect("der").len();
    let out: Vec<_> = (0..30).map(|_| c.request(s.addr(), "/").expect("resumption")).collect();
    assert!(out.iter().all(|o| o.reused), "every resumption with a {der_len}-byte session: {out:?}");
    assert!(distinct_pids(&out) >= 2);
}

#[test]
fn sessions_over_the_size_cap_are_not_stored_and_handshakes_still_complete() {
    let (cert, key) = big_client_certificate();
    let s =
        Server::start(&["--workers", "4", "--tls12", "--no-tickets", "--verify-client", "--max-session-bytes", "2048"]);
    let mut c = Client::with_certificate(true, &cert, &key);
    c.request(s.addr(), "/").expect("full handshake");
    let out: Vec<_> = (0..20).map(|_| c.request(s.addr(), "/").expect("handshake completes")).collect();
    assert!(out.iter().any(|o| !o.reused), "an oversize session cannot be shared");
    let body = c.request(s.addr(), "/stats").expect("stats").body;
    let stat = |k: &str| -> u64 {
        body.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX)
    };
    assert_eq!(stat("stores"), 0, "nothing over the cap reached the cache: {body}");
    assert!(stat("w_oversize") >= 1, "the worker counted the refusal: {body}");
}

#[test]
fn decoded_replica_copies_serve_repeat_resumptions_and_die_with_the_session() {
    let s = Server::start(&["--workers", "4", "--tls12", "--no-tickets"]);
    let mut c = Client::new(true);
    c.request(s.addr(), "/").expect("full");
    let saved = c.session.clone();
    let mut on = std::collections::HashSet::new();
    for _ in 0..60 {
        c.session = saved.clone();
        let o = c.request(s.addr(), "/").expect("resume");
        assert!(o.reused, "{o:?}");
        on.insert(o.pid);
    }
    assert!(on.len() >= 2, "resumptions landed on {} worker(s) only", on.len());
    // Each worker decodes the session on its first replica hit and serves the rest from the
    // decoded copy: across the workers, at most one decode each.
    let per_worker = s.stats_per_worker();
    let replica = sum_over_workers(&per_worker, "w_replica_hits");
    let decoded = sum_over_workers(&per_worker, "w_replica_decoded_hits");
    assert!(decoded >= 30, "decoded hits {decoded} of {replica} replica hits: {per_worker:?}");
    assert!(replica - decoded <= per_worker.len() as u64, "one decode per worker: {per_worker:?}");

    // A connection freed without a shutdown makes OpenSSL remove its session, cluster-wide:
    // no worker may resume it from its decoded copy afterwards.
    c.session = saved.clone();
    assert!(c.request(s.addr(), "/forget").expect("forget").reused);
    std::thread::sleep(Duration::from_millis(300));
    let mut on = std::collections::HashSet::new();
    for _ in 0..30 {
        c.session = saved.clone();
        let o = c.request(s.addr(), "/").expect("after removal");
        assert!(!o.reused, "a removed session resumed on worker {}", o.pid);
        on.insert(o.pid);
    }
    assert!(on.len() >= 2, "the check reached {} worker(s) only", on.len());
}
