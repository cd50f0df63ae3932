//! Calls into the C API pass valid pointers or NULL, as each function's Safety section asks.
//! The API's contract outside a cluster: clear errors, NULL-safety, an untouched context,
//! and a committed header identical to what cbindgen generates now.
//!
//! This test binary never calls `master_setup`: it is the "process with no master".

use std::ffi::{CStr, CString};

use cluster_tls_store::capi::*;
use cluster_tls_store::{share_sessions, Error};
use foreign_types::ForeignTypeRef;
use openssl::ssl::{SslContext, SslMethod};

const SSL_CTRL_GET_SESS_CACHE_MODE: i32 = 45;

fn cache_mode(ctx: &SslContext) -> i64 {
    // SAFETY: a valid context; GET_SESS_CACHE_MODE only reads.
    unsafe { openssl_sys::SSL_CTX_ctrl(ctx.as_ptr(), SSL_CTRL_GET_SESS_CACHE_MODE, 0, std::ptr::null_mut()) as i64 }
}

#[test]
fn share_sessions_without_a_master_is_a_clear_error_and_leaves_the_context_untouched() {
    let ctx = SslContext::builder(SslMethod::tls_server()).expect("ctx").build();
    let before = cache_mode(&ctx);
    let err = share_sessions(&*ctx, Some("web")).expect_err("no master");
    assert_eq!(err, Error::NoMaster);
    assert!(err.to_string().contains("cts_master_setup"), "{err}");
    assert_eq!(cache_mode(&ctx), before, "cache mode unchanged");

    let ns = CString::new("web").expect("cstring");
    let code = unsafe { cts_share_sessions(ctx.as_ptr(), ns.as_ptr()) };
    assert_eq!(code, cts_result::CTS_ERR_NO_MASTER);
    let mut buf = [0 as std::ffi::c_char; 256];
    let n = unsafe { cts_last_error(buf.as_mut_ptr(), buf.len()) };
    // SAFETY: cts_last_error NUL-terminates within the buffer.
    let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    assert!(n > 0 && msg.contains("no session cache master"), "{msg}");
    assert_eq!(cache_mode(&ctx), before);
    // SAFETY: a valid SSL_CTX that outlives the call.
    assert_eq!(unsafe { cts_ticket_mode(ctx.as_ptr()) }, CTS_TICKETS_NOT_SHARED, "never shared");
}

#[test]
fn null_arguments_are_reported_not_dereferenced() {
    // SAFETY (every call below): NULL is an allowed argument of each; the functions check it.
    assert_eq!(
        unsafe { cts_share_sessions(std::ptr::null_mut(), std::ptr::null()) },
        cts_result::CTS_ERR_NULL_ARGUMENT
    );
    assert_eq!(unsafe { cts_config_init(std::ptr::null_mut()) }, cts_result::CTS_ERR_NULL_ARGUMENT);
    assert_eq!(unsafe { cts_get_stats(std::ptr::null_mut()) }, cts_result::CTS_ERR_NULL_ARGUMENT);
    assert!(unsafe { cts_last_error(std::ptr::null_mut(), 0) } > 0);
    assert_eq!(unsafe { cts_ticket_mode(std::ptr::null()) }, CTS_TICKETS_NOT_SHARED);
}

#[test]
fn invalid_configuration_is_refused_with_the_field_named() {
    let mut cfg = std::mem::MaybeUninit::<cts_config>::uninit();
    assert_eq!(unsafe { cts_config_init(cfg.as_mut_ptr()) }, cts_result::CTS_OK);
    // SAFETY: initialised by cts_config_init.
    let mut cfg = unsafe { cfg.assume_init() };
    assert_eq!(cfg.cache_bytes, 64 << 20);
    assert_eq!(cfg.max_session_bytes, 16 << 10);
    cfg.max_session_bytes = 1 << 20;
    assert_eq!(unsafe { cts_master_setup(&cfg) }, cts_result::CTS_ERR_INVALID_CONFIG);
    let mut buf = [0 as std::ffi::c_char; 256];
    unsafe { cts_last_error(buf.as_mut_ptr(), buf.len()) };
    // SAFETY: NUL-terminated by cts_last_error.
    let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    assert!(msg.contains("max_session_bytes"), "{msg}");
}

#[test]
fn namespaces_longer_than_64_bytes_are_refused() {
    let ctx = SslContext::builder(SslMethod::tls_server()).expect("ctx").build();
    let long = "n".repeat(65);
    assert!(matches!(share_sessions(&*ctx, Some(&long)), Err(Error::InvalidNamespace(_))));
}

#[test]
fn every_result_code_has_a_message() {
    for code in 0..=9 {
        // SAFETY: cts_strerror returns a static NUL-terminated string.
        let m = unsafe { CStr::from_ptr(cts_strerror(code)) }.to_string_lossy().into_owned();
        assert!(!m.is_empty() && !m.contains("unknown"), "code {code}: {m}");
    }
    // SAFETY: as above.
    let unknown = unsafe { CStr::from_ptr(cts_strerror(12345)) }.to_string_lossy().into_owned();
    assert!(unknown.contains("unknown"));
}

#[test]
fn stats_outside_a_cluster_say_role_none() {
    let mut st = std::mem::MaybeUninit::uninit();
    assert_eq!(unsafe { cts_get_stats(st.as_mut_ptr()) }, cts_result::CTS_OK);
    // SAFETY: written by cts_get_stats on success.
    let st = unsafe { st.assume_init() };
    assert_eq!(st.role, CTS_ROLE_NONE);
    assert_eq!(st.master_valid, 0);
    assert_eq!(cts_channel_fd(), -1);
}

#[test]
fn committed_header_matches_cbindgen_output() {
    let generated = std::fs::read_to_string(env!("CTS_GENERATED_HEADER")).expect("generated header");
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/cluster_tls_store.h"))
        .expect("include/cluster_tls_store.h");
    assert!(
        generated == committed,
        "include/cluster_tls_store.h is stale: run `CTS_UPDATE_HEADER=1 cargo build` and commit it"
    );
}

#[test]
fn every_exported_symbol_is_declared_in_the_header() {
    let header =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/cluster_tls_store.h")).expect("header");
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/capi.rs")).expect("capi.rs");
    let mut n = 0;
    for line in src.lines() {
        if let Some(rest) = line
            .trim()
            .strip_prefix("pub extern \"C\" fn ")
            .or_else(|| line.trim().strip_prefix("pub unsafe extern \"C\" fn "))
        {
            let name = rest.split('(').next().expect("name");
            assert!(header.contains(&format!("{name}(")), "{name} missing from the header");
            n += 1;
        }
    }
    assert!(n >= 8, "found {n} exported functions");
}

#[test]
fn early_data_with_anti_replay_is_refused_with_a_reason_and_the_context_untouched() {
    use openssl::ssl::SslOptions;
    // OpenSSL resumes such a context's TLS 1.3 sessions only by taking them out of its own
    // per-process cache: shared, it would resume none (found in review: 0 of 5).
    let mut b = SslContext::builder(SslMethod::tls_server()).expect("ctx");
    b.set_max_early_data(16384).expect("early data");
    let ctx = b.build();
    let before = cache_mode(&ctx);
    let err = share_sessions(&*ctx, Some("web")).expect_err("refused");
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("early data") && m.contains("SSL_OP_NO_ANTI_REPLAY")),
        "{err}"
    );
    assert_eq!(cache_mode(&ctx), before, "cache mode unchanged");
    // Without anti-replay the sessions ride in stateless tickets, which the cluster's keys
    // open anywhere: past this check (here, no master).
    let mut b = SslContext::builder(SslMethod::tls_server()).expect("ctx");
    b.set_max_early_data(16384).expect("early data");
    b.set_options(SslOptions::from_bits_retain(1 << 24)); // SSL_OP_NO_ANTI_REPLAY
    assert_eq!(share_sessions(&*b.build(), Some("web")).expect_err("no master"), Error::NoMaster);
}
