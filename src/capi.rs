//! The C API. Thin wrappers: convert pointers and codes, call the Rust API, never unwind.
//!
//! Conventions (all functions):
//! - the return value is a `cts_result`; 0 (`CTS_OK`) means success;
//! - NULL arguments are checked and reported (`CTS_ERR_NULL_ARGUMENT`) unless documented as
//!   optional; output parameters are written only on success;
//! - on failure, `cts_last_error` gives a readable message for the calling thread;
//! - a panic inside the library is caught and reported as `CTS_ERR_PANIC`.
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use openssl_sys::SSL_CTX;

use crate::stats::Stats;
use crate::{Config, Error, ShareOptions};

/// Result codes. Numbers are stable and never reused.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum cts_result {
    /// Success.
    CTS_OK = 0,
    /// A required pointer argument was NULL.
    CTS_ERR_NULL_ARGUMENT = 1,
    /// A configuration value is out of range (`cts_last_error` names it).
    CTS_ERR_INVALID_CONFIG = 2,
    /// `cts_master_setup` was called in a worker.
    CTS_ERR_IN_WORKER = 3,
    /// No master: `cts_master_setup` was not called before this process was forked (and no
    /// channel was passed with `CTS_CHANNEL_FD`). The `SSL_CTX` was left untouched.
    CTS_ERR_NO_MASTER = 4,
    /// The namespace is longer than 64 bytes.
    CTS_ERR_INVALID_NAMESPACE = 5,
    /// An OpenSSL call failed.
    CTS_ERR_OPENSSL = 6,
    /// A system call failed.
    CTS_ERR_SYSTEM = 7,
    /// Internal error: a panic was caught at the boundary.
    CTS_ERR_PANIC = 8,
    /// This process inherited its parent worker's channel (it is a helper forked by a worker)
    /// and may not use it. The `SSL_CTX` was left untouched.
    CTS_ERR_NOT_CHANNEL_OWNER = 9,
}

/// Flag for `cts_share_sessions_ex`: keep the session id context already set on the
/// `SSL_CTX` instead of deriving one from the namespace. The namespace still keeps sessions
/// apart: each has its own cache entries, and the cluster's tickets are sealed with an HMAC key
/// derived for the namespace of the context whose ticket callback OpenSSL calls, so a ticket
/// opens only in the namespace that issued it. OpenSSL opens a ticket before a servername
/// callback runs, with the context the connection arrived on: a ticket issued after such a
/// callback moved the connection to a context of another namespace does not resume (share
/// those contexts under one namespace to resume across them).
pub const CTS_SHARE_KEEP_SESSION_ID_CONTEXT: u32 = 1;

/// Flag for `cts_share_sessions_ex`: keep this `SSL_CTX`'s own ticket keys or ticket key
/// callback instead of installing the cluster-wide keys (OpenSSL 3.0 cannot report whether
/// the host set its own, so the library takes over unless told not to).
pub const CTS_SHARE_KEEP_TICKET_KEYS: u32 = 2;

/// `cts_ticket_mode`: the context was never passed to `cts_share_sessions` (or is NULL).
pub const CTS_TICKETS_NOT_SHARED: u32 = 0;
/// `cts_ticket_mode`: the library took over the context's ticket keys; tickets are sealed
/// with the cluster-wide, rotated keys and open on every worker.
pub const CTS_TICKETS_CLUSTER_KEYS: u32 = 1;
/// `cts_ticket_mode`: the host kept its own ticket keys or callback
/// (`CTS_SHARE_KEEP_TICKET_KEYS`); tickets open only where those keys are.
pub const CTS_TICKETS_HOST_KEYS: u32 = 2;
/// `cts_ticket_mode`: ticket sharing is off for the whole server (`share_tickets = 0`); the
/// context's own keys apply (OpenSSL's per-context random keys unless the host set some).
pub const CTS_TICKETS_SHARING_OFF: u32 = 3;
/// `cts_ticket_mode`: the context is shared but issues no tickets now (`SSL_OP_NO_TICKET`);
/// TLS 1.3 then resumes with stateful tickets, which go through the shared cache.
pub const CTS_TICKETS_NONE_ISSUED: u32 = 4;

// `cts_ticket_mode` returns `TicketMode as u32`: the two lists must agree.
const _: () = {
    use crate::callbacks::TicketMode;
    assert!(TicketMode::NotShared as u32 == CTS_TICKETS_NOT_SHARED);
    assert!(TicketMode::ClusterKeys as u32 == CTS_TICKETS_CLUSTER_KEYS);
    assert!(TicketMode::HostKeys as u32 == CTS_TICKETS_HOST_KEYS);
    assert!(TicketMode::SharingOff as u32 == CTS_TICKETS_SHARING_OFF);
    assert!(TicketMode::NoTickets as u32 == CTS_TICKETS_NONE_ISSUED);
};

/// Configuration of `cts_master_setup`. Fill with `cts_config_init`, then change fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct cts_config {
    /// Byte budget of the master's cache; LRU eviction beyond it. Default 64 MiB.
    pub cache_bytes: u64,
    /// Largest session (DER bytes) stored; larger ones are refused and counted.
    /// Default 16384; allowed 256..=65536.
    pub max_session_bytes: u32,
    /// Cap on a session's lifetime in the cache, in seconds. Default 86400.
    pub max_lifetime_secs: u32,
    /// How long a worker's lookup waits for the master, in microseconds (at most 200 µs more,
    /// and no more than a tenth more); then it is a miss.
    /// Default 10000 (10 ms).
    pub get_timeout_us: u32,
    /// Longest pause of lookups after the master failed to answer, in milliseconds.
    /// Default 500.
    pub breaker_max_backoff_ms: u32,
    /// 1 (default): the master makes and rotates the session ticket keys and every shared
    /// `SSL_CTX` uses them, so tickets open on any worker. 0: each `SSL_CTX` keeps OpenSSL's
    /// own keys (tickets then only open in the process that made them).
    pub share_tickets: u32,
    /// Seconds between ticket key rotations. Default 3600; allowed 1..=604800.
    pub ticket_rotation_secs: u32,
    /// Rotations a key keeps opening tickets (older tickets mean a full handshake).
    /// Default 3; allowed 2..=16.
    pub ticket_keys: u32,
    /// NULL (default), or the path of an operator-managed ticket key file in the nginx/HAProxy
    /// format (one 48- or 80-byte key, or one base64 key per line; the first encrypts, all
    /// open). The master reloads it when it changes; rotation settings are then unused. The
    /// string is copied by `cts_master_setup`.
    pub ticket_key_file: *const c_char,
    /// Byte budget of each worker's replica of recent sessions, so most lookups are answered
    /// inside the worker. Costs up to this much memory per worker, plus one session ring
    /// shared by the master and its workers (half this, 256 KiB to 16 MiB; 2 MiB by default)
    /// through which workers hand new sessions to each other and to the master without a
    /// message. 0 turns both off (every lookup asks the master). Default 4194304 (4 MiB).
    pub replica_bytes: u64,
    /// NULL (default), or the URL of a Redis (or Valkey) shared by the masters of several
    /// hosts: `redis://[user:password@]host:port/db`, or `rediss://...` for TLS. A local miss
    /// then asks Redis (within the lookup deadline), stores go to both (Redis asynchronously,
    /// with a TTL equal to the session's remaining lifetime), removals to both, and the hosts
    /// agree on the ticket keys through it. When NULL, `cts_master_setup` reads the
    /// environment variable `CTS_REMOTE`; when both are unset the cache stays on this host.
    /// Copied by `cts_master_setup`.
    pub remote_url: *const c_char,
    /// NULL (default), or the path of the remote tier's at-rest key file: one 32-byte
    /// AES-256-GCM key per line, as 64 hex digits or base64; `#` starts a comment. The first
    /// key seals every value written to Redis, all keys open. When NULL, `cts_master_setup`
    /// reads `CTS_REMOTE_KEY_FILE`. With a remote URL and no key file, `cts_master_setup`
    /// returns `CTS_ERR_INVALID_CONFIG`: sessions are never stored unencrypted.
    pub remote_key_file: *const c_char,
    /// NULL (default "cts:", or the environment variable `CTS_REMOTE_PREFIX`), or the prefix
    /// of every Redis key (at most 64 bytes): keys are `<prefix><namespace>:<hex session id>`
    /// and `<prefix>tk:<epoch>` for ticket keys, so several clusters can share one Redis.
    pub remote_prefix: *const c_char,
    /// Timeout of Redis requests (read, write) and of making a connection (TCP connect, the
    /// `rediss://` TLS handshake and authentication, as a whole), in milliseconds; a lookup
    /// also gives up at half of `get_timeout_us`. It does not bound the host name lookup (the
    /// system's resolver), which never runs on a handshake's path; `cts_master_setup` waits
    /// for its first Redis exchange (the ticket-key agreement) at most 4 × this (at least
    /// 0.5 s), then goes on without it. Default 50; allowed 1..=10000.
    pub remote_timeout_ms: u32,
    /// Length of each queue to the remote threads (lookups; stores and removals). Work that
    /// finds its queue full is dropped and counted (`remote_queue_drops`), except a removal:
    /// it is kept and sent again until Redis takes it. Default 1024.
    pub remote_queue_len: u32,
}

impl From<&Config> for cts_config {
    fn from(c: &Config) -> cts_config {
        cts_config {
            cache_bytes: c.cache_bytes as u64,
            max_session_bytes: c.max_session_bytes.min(u32::MAX as usize) as u32,
            max_lifetime_secs: c.max_lifetime.as_secs().min(u32::MAX as u64) as u32,
            get_timeout_us: c.get_timeout.as_micros().min(u32::MAX as u128) as u32,
            breaker_max_backoff_ms: c.breaker_max_backoff.as_millis().min(u32::MAX as u128) as u32,
            share_tickets: u32::from(c.share_tickets),
            ticket_rotation_secs: c.ticket_key_rotation.as_secs().min(u64::from(u32::MAX)) as u32,
            ticket_keys: c.ticket_keys,
            ticket_key_file: std::ptr::null(),
            replica_bytes: c.replica_bytes as u64,
            remote_url: std::ptr::null(),
            remote_key_file: std::ptr::null(),
            remote_prefix: std::ptr::null(),
            remote_timeout_ms: c.remote_timeout.as_millis().min(u32::MAX as u128) as u32,
            remote_queue_len: c.remote_queue_len.min(u32::MAX as usize) as u32,
        }
    }
}

impl From<&cts_config> for Config {
    fn from(c: &cts_config) -> Config {
        Config {
            cache_bytes: usize::try_from(c.cache_bytes).unwrap_or(usize::MAX),
            max_session_bytes: c.max_session_bytes as usize,
            max_lifetime: Duration::from_secs(u64::from(c.max_lifetime_secs)),
            get_timeout: Duration::from_micros(u64::from(c.get_timeout_us)),
            breaker_max_backoff: Duration::from_millis(u64::from(c.breaker_max_backoff_ms)),
            share_tickets: c.share_tickets != 0,
            ticket_key_rotation: Duration::from_secs(u64::from(c.ticket_rotation_secs)),
            ticket_keys: c.ticket_keys,
            // SAFETY: the caller gives NULL or a NUL-terminated path (documented).
            ticket_key_file: unsafe { opt_path(c.ticket_key_file) },
            replica_bytes: usize::try_from(c.replica_bytes).unwrap_or(usize::MAX),
            // SAFETY: the caller gives NULL or a NUL-terminated string (documented).
            remote_url: unsafe { opt_str(c.remote_url) }.map(crate::remote::RemoteUrl),
            // SAFETY: as for ticket_key_file.
            remote_key_file: unsafe { opt_path(c.remote_key_file) },
            // SAFETY: as for remote_url.
            remote_prefix: unsafe { opt_str(c.remote_prefix) }
                .unwrap_or_else(|| crate::remote::DEFAULT_PREFIX.to_string()),
            remote_timeout: Duration::from_millis(u64::from(c.remote_timeout_ms)),
            remote_queue_len: c.remote_queue_len as usize,
        }
    }
}

/// A C string as an owned `String` (lossy), `None` for NULL.
///
/// # Safety
/// `p` must be NULL or a NUL-terminated string.
unsafe fn opt_str(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-NULL and NUL-terminated per the contract.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// A path from C, byte for byte (paths need not be UTF-8).
///
/// # Safety
/// `p` must be NULL or a NUL-terminated string.
unsafe fn opt_path(p: *const c_char) -> Option<std::path::PathBuf> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-NULL and NUL-terminated per the contract.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    Some(std::path::PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
}

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

fn set_last_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = Some(c));
}

fn code_of(e: &Error) -> cts_result {
    use cts_result::*;
    match e.code() {
        1 => CTS_ERR_NULL_ARGUMENT,
        2 => CTS_ERR_INVALID_CONFIG,
        3 => CTS_ERR_IN_WORKER,
        4 => CTS_ERR_NO_MASTER,
        5 => CTS_ERR_INVALID_NAMESPACE,
        6 => CTS_ERR_OPENSSL,
        7 => CTS_ERR_SYSTEM,
        9 => CTS_ERR_NOT_CHANNEL_OWNER,
        _ => CTS_ERR_PANIC,
    }
}

/// Report a Rust result as a C code, remembering the message of an error.
fn report(r: Result<(), Error>) -> cts_result {
    match r {
        Ok(()) => cts_result::CTS_OK,
        Err(e) => {
            set_last_error(e.to_string());
            code_of(&e)
        }
    }
}

/// Run a C entry point's body behind the panic boundary.
fn guarded(body: impl FnOnce() -> Result<(), Error>) -> cts_result {
    ffi_boundary!(
        {
            set_last_error(Error::Panic.to_string());
            cts_result::CTS_ERR_PANIC
        },
        { report(body()) }
    )
}

/// Fill `*cfg` with the defaults.
///
/// May be called anywhere, any time; thread-safe. Returns `CTS_ERR_NULL_ARGUMENT` if `cfg` is
/// NULL. In C, the `cts_config_init` macro at the end of this header calls
/// `cts_config_init_sized` with the caller's `sizeof(cts_config)` instead.
///
/// # Safety
/// `cfg` must be NULL or point to a writable `cts_config`.
#[no_mangle]
pub unsafe extern "C" fn cts_config_init(cfg: *mut cts_config) -> cts_result {
    // SAFETY: same contract, for a cts_config of the first sized release's layout.
    unsafe { cts_config_init_sized(cfg, LEGACY_CONFIG_SIZE) }
}

/// `sizeof(cts_config)`, `sizeof(cts_stats)` and `sizeof(cts_master_stats)` as of the release
/// that made the `*_sized` entry points: what the unsized functions assume of a caller built
/// without the header's macros (or with `CTS_NO_SIZED_MACROS`). Never changed when the
/// structs grow, so such a caller is never read or written past what it had then.
const LEGACY_CONFIG_SIZE: usize = 88;
const LEGACY_STATS_SIZE: usize = 400;
const LEGACY_MASTER_STATS_SIZE: usize = 208;

/// Copy the first `size` bytes of `from` (at most all of it) to `to`: a struct of this
/// library's layout to a caller's, whose `size` may be that of an older header (fields are only
/// ever added at the end), or the other way.
///
/// # Safety
/// `from` readable and `to` writable for `min(size, size_of::<T>())` bytes.
unsafe fn copy_prefix<T>(from: *const T, to: *mut T, size: usize) {
    // SAFETY: see the function's contract.
    unsafe { std::ptr::copy_nonoverlapping(from.cast::<u8>(), to.cast::<u8>(), size.min(std::mem::size_of::<T>())) }
}

/// Hand `from` to a caller's struct of `size` bytes: `copy_prefix`, then zeroes whatever the
/// caller's struct has past ours (fields of a newer header, which this library does not know
/// and the caller then reads as 0 instead of what its memory held).
///
/// # Safety
/// `to` writable for `size` bytes.
unsafe fn copy_out<T>(from: &T, to: *mut T, size: usize) {
    let ours = std::mem::size_of::<T>();
    // SAFETY: `from` is a whole T; `to` is writable for `size` bytes, and the zeroed range
    // `ours..size` (empty unless `size > ours`) lies inside them.
    unsafe {
        copy_prefix(from, to, size);
        if size > ours {
            std::ptr::write_bytes(to.cast::<u8>().add(ours), 0, size - ours);
        }
    }
}

/// `cts_config_init` for a `cts_config` of `size` bytes: the header's `cts_config_init`
/// macro passes `sizeof(cts_config)` as the caller's code was compiled with it, so a library
/// whose `cts_config` grew since never writes past the caller's. Fills the fields that fit;
/// fields of a newer header than this library's read 0.
///
/// # Safety
/// `cfg` must be NULL or point to `size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn cts_config_init_sized(cfg: *mut cts_config, size: usize) -> cts_result {
    guarded(|| {
        if cfg.is_null() {
            return Err(Error::NullArgument("cfg"));
        }
        let defaults = cts_config::from(&Config::default());
        // SAFETY: checked non-NULL; the caller gives `size` writable bytes.
        unsafe { copy_out(&defaults, cfg, size) };
        Ok(())
    })
}

/// Start the shared session cache in this process, the master.
///
/// Call once in the master, before it forks its workers. It starts the cache thread and
/// registers fork handlers: every later `fork()` gives the child its own private channel
/// (an AF_UNIX SOCK_SEQPACKET socketpair) to the cache. `cfg` may be NULL for the defaults;
/// it is copied, the caller keeps ownership.
///
/// In C, the `cts_master_setup` macro at the end of this header calls
/// `cts_master_setup_sized` with the caller's `sizeof(cts_config)` instead.
///
/// Idempotent: a second call in the master returns `CTS_OK` and keeps the first
/// configuration. Returns `CTS_ERR_IN_WORKER` in a process forked by the master,
/// `CTS_ERR_INVALID_CONFIG` for out-of-range values, `CTS_ERR_SYSTEM` if the thread or
/// descriptors cannot be created. Thread-safe.
///
/// # Safety
/// `cfg` must be NULL or point to a readable `cts_config`.
#[no_mangle]
pub unsafe extern "C" fn cts_master_setup(cfg: *const cts_config) -> cts_result {
    // SAFETY: same contract, for a cts_config of the first sized release's layout.
    unsafe { cts_master_setup_sized(cfg, LEGACY_CONFIG_SIZE) }
}

/// `cts_master_setup` for a `cts_config` of `size` bytes (the header's `cts_master_setup`
/// macro passes `sizeof(cts_config)`): only those bytes are read, and fields past them (added
/// to the library after the caller was compiled) keep their defaults.
///
/// # Safety
/// `cfg` must be NULL or point to `size` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn cts_master_setup_sized(cfg: *const cts_config, size: usize) -> cts_result {
    // SAFETY: same contract.
    guarded(|| crate::master_setup(unsafe { config_from_sized(cfg, size) }))
}

/// The configuration a caller's `cts_config` of `size` bytes (NULL: none) asks for; fields
/// past `size` keep their defaults.
///
/// # Safety
/// As for `cts_master_setup_sized`.
unsafe fn config_from_sized(cfg: *const cts_config, size: usize) -> Config {
    if cfg.is_null() {
        return Config::default();
    }
    let mut c = cts_config::from(&Config::default());
    // SAFETY: the caller gives `size` readable bytes; `c` is a whole cts_config.
    unsafe { copy_prefix(cfg, &mut c, size) };
    Config::from(&c)
}

/// Share `ctx`'s TLS sessions with every worker through the master's cache.
///
/// Call in a worker (after the fork) for each `SSL_CTX` it serves, whether the context was
/// made before or after the fork; or in the master itself for a server without workers
/// (then the cache is used in-process). `ns` is the namespace, a NUL-terminated string of at
/// most 64 bytes; NULL means the default namespace "". Contexts that must not resume each
/// other's sessions use different namespaces.
///
/// It installs session new/get/remove callbacks, sets the session cache mode to
/// `SSL_SESS_CACHE_SERVER | SSL_SESS_CACHE_NO_INTERNAL` (the shared cache is the only cache)
/// and sets a session id context derived from the namespace (OpenSSL 3.0 cannot report one
/// the host set; use `cts_share_sessions_ex` with `CTS_SHARE_KEEP_SESSION_ID_CONTEXT` to keep
/// yours). The library keeps no reference to `ctx`; its state is freed with the context
/// (that of an earlier share of the same context is kept until the process exits: a
/// handshake in flight may still use it).
///
/// Returns `CTS_ERR_NO_MASTER` (or `CTS_ERR_NOT_CHANNEL_OWNER`) with `ctx` left untouched when
/// this process cannot reach a master, and `CTS_ERR_INVALID_CONFIG`, `ctx` untouched, when
/// early data is on with OpenSSL's anti-replay protection (`SSL_CTX_set_max_early_data` > 0
/// without `SSL_OP_NO_ANTI_REPLAY`): OpenSSL then resumes TLS 1.3 sessions only from its own
/// per-process cache, so a shared one would resume none. Not thread-safe with respect to handshakes on the same
/// `ctx`, nor to another call on the same `ctx` (OpenSSL's setters are not): call it once per
/// context, before the context serves connections.
///
/// # Safety
/// `ctx` must be NULL or a valid `SSL_CTX`; `ns` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cts_share_sessions(ctx: *mut SSL_CTX, ns: *const c_char) -> cts_result {
    // SAFETY: same contract as this function.
    unsafe { cts_share_sessions_ex(ctx, ns, 0) }
}

/// `cts_share_sessions` with flags (`CTS_SHARE_KEEP_SESSION_ID_CONTEXT`,
/// `CTS_SHARE_KEEP_TICKET_KEYS`); unknown flag bits are ignored. Sharing a context again is
/// allowed, with one exception: a context already shared with the cluster's ticket keys is
/// refused `CTS_SHARE_KEEP_TICKET_KEYS` (`CTS_ERR_INVALID_CONFIG`, `ctx` untouched), since its own
/// keys are gone.
///
/// # Safety
/// As for `cts_share_sessions`.
#[no_mangle]
pub unsafe extern "C" fn cts_share_sessions_ex(ctx: *mut SSL_CTX, ns: *const c_char, flags: u32) -> cts_result {
    guarded(|| {
        if ctx.is_null() {
            return Err(Error::NullArgument("ctx"));
        }
        let ns: &[u8] = if ns.is_null() {
            b""
        } else {
            // SAFETY: the caller gives a NUL-terminated string.
            unsafe { CStr::from_ptr(ns) }.to_bytes()
        };
        let opts = ShareOptions {
            keep_session_id_context: flags & CTS_SHARE_KEEP_SESSION_ID_CONTEXT != 0,
            keep_ticket_keys: flags & CTS_SHARE_KEEP_TICKET_KEYS != 0,
        };
        // SAFETY: `ctx` is a non-NULL SSL_CTX from the caller, not serving handshakes yet.
        unsafe { crate::callbacks::install(ctx, ns, opts) }
    })
}

/// Which ticket keys `ctx` uses after `cts_share_sessions`: one of `CTS_TICKETS_*`.
///
/// OpenSSL 3.0 cannot tell the library whether the host installed ticket keys or a ticket
/// key callback of its own, so by default `cts_share_sessions` takes the context's tickets
/// over (that is what makes TLS 1.3 resumption work across workers with one call); a host
/// that wants to keep its own passes `CTS_SHARE_KEEP_TICKET_KEYS`. This call tells, per
/// context, which of the two happened (or that ticket sharing is off, or that the context
/// issues no tickets), so a server can log it at start-up. Returns `CTS_TICKETS_NOT_SHARED`
/// for NULL or a context that was never shared.
///
/// # Safety
/// `ctx` must be NULL or a valid `SSL_CTX`.
#[no_mangle]
pub unsafe extern "C" fn cts_ticket_mode(ctx: *const SSL_CTX) -> u32 {
    ffi_boundary!(CTS_TICKETS_NOT_SHARED, {
        if ctx.is_null() {
            return CTS_TICKETS_NOT_SHARED;
        }
        // SAFETY: a non-NULL valid SSL_CTX from the caller.
        unsafe { crate::callbacks::ticket_mode(ctx) as u32 }
    })
}

/// Copy this process's counters into `*out`. In C, the `cts_get_stats` macro at the end of
/// this header calls `cts_get_stats_sized` with the caller's `sizeof(cts_stats)` and
/// `sizeof(cts_master_stats)` instead.
///
/// `out->worker` holds this process's own counters. `out->master` holds the cache's counters
/// when `out->master_valid` is 1: always in the master; in a worker, when the master answered
/// the request within the lookup deadline. `out->role` is `CTS_ROLE_*`. Callable from any
/// thread, in any process.
///
/// # Safety
/// `out` must be NULL or point to a writable `cts_stats`.
#[no_mangle]
pub unsafe extern "C" fn cts_get_stats(out: *mut Stats) -> cts_result {
    // SAFETY: same contract, for a cts_stats of the first sized release's layout.
    unsafe { cts_get_stats_sized(out, LEGACY_STATS_SIZE, LEGACY_MASTER_STATS_SIZE) }
}

/// `cts_get_stats` into a `cts_stats` of `size` bytes whose `master` member is `master_size`
/// bytes (the header's `cts_get_stats` macro passes `sizeof(cts_stats)` and
/// `sizeof(cts_master_stats)`). New counters are only ever added at the end of
/// `cts_master_stats` or of `cts_worker_stats`, so the caller's `worker` member starts
/// `master_size` bytes after `master`: each member gets the counters that fit in it, and a
/// library whose structs grew since the caller was compiled never writes past them or
/// shifts them; counters of a newer header than this library's read 0.
/// `CTS_ERR_INVALID_CONFIG` if the sizes cannot be such a layout.
///
/// # Safety
/// `out` must be NULL or point to `size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn cts_get_stats_sized(out: *mut Stats, size: usize, master_size: usize) -> cts_result {
    guarded(|| {
        if out.is_null() {
            return Err(Error::NullArgument("out"));
        }
        const HEAD: usize = std::mem::offset_of!(Stats, master);
        // Checked: a hostile `master_size` near usize::MAX must not wrap past the test.
        let worker_size = HEAD.checked_add(master_size).and_then(|used| size.checked_sub(used));
        if !master_size.is_multiple_of(8) || !worker_size.is_some_and(|w| w.is_multiple_of(8)) {
            return Err(Error::InvalidConfig(format!(
                "cts_get_stats_sized: size {size} and master_size {master_size} are not a cts_stats layout"
            )));
        }
        // SAFETY: checked non-NULL and a layout of `size` bytes, which the caller gives.
        unsafe { write_stats(&crate::stats(), out.cast(), size, master_size) };
        Ok(())
    })
}

/// Write `s` into a caller's `cts_stats` at `out`, of `size` bytes with a `master` member of
/// `master_size` bytes (checked by the caller to be such a layout): each member gets the
/// counters that fit in it, and counters of a newer header that this library lacks read 0.
///
/// # Safety
/// `out` writable for `size` bytes; `size >= offset_of!(Stats, master) + master_size`.
unsafe fn write_stats(s: &Stats, out: *mut u8, size: usize, master_size: usize) {
    const HEAD: usize = std::mem::offset_of!(Stats, master);
    // SAFETY: each copy stays inside its member of the caller's layout (`HEAD + master_size +
    // worker` = `size`) and of ours.
    unsafe {
        copy_prefix(&s.role, out.cast(), std::mem::size_of::<u32>());
        copy_prefix(&s.master_valid, out.add(std::mem::size_of::<u32>()).cast(), std::mem::size_of::<u32>());
        copy_out(&s.master, out.add(HEAD).cast(), master_size);
        copy_out(&s.worker, out.add(HEAD + master_size).cast(), size - HEAD - master_size);
    }
}

/// A static, human-readable description of a result code. Never NULL; do not free.
#[no_mangle]
pub extern "C" fn cts_strerror(code: i32) -> *const c_char {
    crate::error::code_message(code).as_ptr()
}

/// Copy the calling thread's last error message (from the most recent failing `cts_` call)
/// into `buf` (`len` bytes, NUL-terminated, truncated to fit). Returns the message's full
/// length without the NUL, 0 if there is none. `buf` may be NULL when `len` is 0.
///
/// # Safety
/// `buf` must be NULL or point to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn cts_last_error(buf: *mut c_char, len: usize) -> usize {
    ffi_boundary!(0, {
        LAST_ERROR
            .try_with(|e| {
                let e = e.borrow();
                let Some(msg) = e.as_ref() else { return 0 };
                let bytes = msg.as_bytes();
                if !buf.is_null() && len > 0 {
                    let n = bytes.len().min(len - 1);
                    // SAFETY: the caller gives `len` writable bytes at `buf`; we write n + 1 ≤ len.
                    unsafe {
                        std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), buf, n);
                        *buf.add(n) = 0;
                    }
                }
                bytes.len()
            })
            .unwrap_or(0)
    })
}

/// This worker's channel descriptor, or -1 if the process has none of its own.
///
/// For servers whose workers `exec` a new program after the fork: clear the descriptor's
/// `FD_CLOEXEC` flag and put `<fd>:<pid>` (this process's pid, which `exec` keeps; a bare
/// `<fd>` is accepted too) in the environment variable `CTS_CHANNEL_FD` before
/// `exec`; `cts_share_sessions` in the new program adopts it.
#[no_mangle]
pub extern "C" fn cts_channel_fd() -> c_int {
    ffi_boundary!(-1, { crate::channel_fd().unwrap_or(-1) })
}

/// The library version, a static NUL-terminated string.
#[no_mangle]
pub extern "C" fn cts_version() -> *const c_char {
    const V: &CStr = match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(v) => v,
        Err(_) => c"unknown",
    };
    V.as_ptr()
}

/// `Stats::role` value: neither master nor worker.
pub const CTS_ROLE_NONE: u32 = 0;
/// `Stats::role` value: the master.
pub const CTS_ROLE_MASTER: u32 = 1;
/// `Stats::role` value: a worker connected to the master.
pub const CTS_ROLE_WORKER: u32 = 2;

/// `cts_master_stats.remote_state` value: no remote tier configured.
pub const CTS_REMOTE_OFF: u64 = 0;
/// `cts_master_stats.remote_state` value: Redis answered the last request.
pub const CTS_REMOTE_UP: u64 = 1;
/// `cts_master_stats.remote_state` value: Redis failed (error or timeout); the remote tier is
/// paused (lookups are answered from the local cache only) until a probe reconnects.
pub const CTS_REMOTE_DOWN: u64 = 2;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{MasterStats, WorkerStats};

    #[test]
    fn a_config_of_an_older_smaller_layout_is_read_up_to_its_size_only() {
        let mut c = cts_config::from(&Config::default());
        c.cache_bytes = 1 << 20;
        c.replica_bytes = 12345 << 10;
        // A caller compiled when the struct ended before `replica_bytes`: what its memory
        // holds past that is not a field of its, and must not be read.
        let size = std::mem::offset_of!(cts_config, replica_bytes);
        // SAFETY: `c` is readable for its whole size, more than `size`.
        let got = unsafe { config_from_sized(&c, size) };
        assert_eq!(got.cache_bytes, 1 << 20, "a field within the size is read");
        assert_eq!(got.replica_bytes, Config::default().replica_bytes, "a field past it keeps its default");
        // SAFETY: as above, for the whole struct.
        assert_eq!(unsafe { config_from_sized(&c, std::mem::size_of::<cts_config>()) }.replica_bytes, 12345 << 10);
        // SAFETY: NULL is allowed.
        assert_eq!(unsafe { config_from_sized(std::ptr::null(), 0) }.cache_bytes, Config::default().cache_bytes);
    }

    #[test]
    fn stats_members_are_where_the_sized_copy_expects_them() {
        // The layout `cts_get_stats_sized` relies on: two u32, then the master's counters,
        // then the worker's, nothing after (new counters go at the end of either member).
        assert_eq!(std::mem::offset_of!(Stats, master), 8);
        assert_eq!(std::mem::offset_of!(Stats, worker), 8 + std::mem::size_of::<MasterStats>());
        assert_eq!(
            std::mem::size_of::<Stats>(),
            8 + std::mem::size_of::<MasterStats>() + std::mem::size_of::<WorkerStats>()
        );
        assert!(std::mem::size_of::<MasterStats>().is_multiple_of(8));
        // The unsized functions' frozen sizes never exceed this library's.
        assert!(LEGACY_STATS_SIZE <= std::mem::size_of::<Stats>());
        assert!(LEGACY_MASTER_STATS_SIZE <= std::mem::size_of::<MasterStats>());
        assert!(LEGACY_CONFIG_SIZE <= std::mem::size_of::<cts_config>());
    }

    #[test]
    fn an_older_smaller_stats_layout_gets_each_member_in_its_place_and_nothing_past_it() {
        let s = Stats {
            role: 2,
            master_valid: 1,
            master: MasterStats { hits: 11, ..MasterStats::default() },
            worker: WorkerStats { gets: 22, ..WorkerStats::default() },
        };
        // A caller compiled when each member was 16 bytes shorter.
        let master_size = std::mem::size_of::<MasterStats>() - 16;
        let size = std::mem::size_of::<Stats>() - 32;
        let mut buf = vec![0xCDu8; size + 64];
        // SAFETY: `buf` holds `size` bytes and more; a valid layout.
        unsafe { write_stats(&s, buf.as_mut_ptr(), size, master_size) };
        let u64_at = |off: usize| u64::from_ne_bytes(buf[off..off + 8].try_into().unwrap());
        assert_eq!(u32::from_ne_bytes(buf[0..4].try_into().unwrap()), 2);
        assert_eq!(u64_at(8 + std::mem::offset_of!(MasterStats, hits)), 11);
        // The worker's counters start where the caller's (shorter) master member ends.
        assert_eq!(u64_at(8 + master_size + std::mem::offset_of!(WorkerStats, gets)), 22);
        assert!(buf[size..].iter().all(|&b| b == 0xCD), "written past the caller's struct");
        // SAFETY: NULL, and sizes that are no layout, are refused before anything is written.
        unsafe {
            assert_eq!(cts_get_stats_sized(std::ptr::null_mut(), size, master_size), cts_result::CTS_ERR_NULL_ARGUMENT);
            let mut st = std::mem::MaybeUninit::<Stats>::zeroed();
            assert_eq!(cts_get_stats_sized(st.as_mut_ptr(), 12, 8), cts_result::CTS_ERR_INVALID_CONFIG);
            assert_eq!(cts_get_stats_sized(st.as_mut_ptr(), 64, usize::MAX - 7), cts_result::CTS_ERR_INVALID_CONFIG);
            assert_eq!(
                cts_get_stats_sized(st.as_mut_ptr(), std::mem::size_of::<Stats>(), std::mem::size_of::<MasterStats>()),
                cts_result::CTS_OK
            );
        }
    }

    #[test]
    fn a_newer_larger_stats_layout_reads_zero_in_the_counters_this_library_lacks() {
        let s = Stats {
            role: 2,
            master_valid: 1,
            master: MasterStats { hits: 11, ..MasterStats::default() },
            worker: WorkerStats { gets: 22, ..WorkerStats::default() },
        };
        // A caller compiled when each member was 16 bytes longer, its memory not zeroed.
        let ours_master = std::mem::size_of::<MasterStats>();
        let master_size = ours_master + 16;
        let size = std::mem::size_of::<Stats>() + 32;
        let mut buf = vec![0xCDu8; size + 64];
        // SAFETY: `buf` holds `size` bytes and more; a valid layout.
        unsafe { write_stats(&s, buf.as_mut_ptr(), size, master_size) };
        let u64_at = |off: usize| u64::from_ne_bytes(buf[off..off + 8].try_into().unwrap());
        assert_eq!(u64_at(8 + std::mem::offset_of!(MasterStats, hits)), 11);
        assert!(buf[8 + ours_master..8 + master_size].iter().all(|&b| b == 0), "the master's newer counters");
        assert_eq!(u64_at(8 + master_size + std::mem::offset_of!(WorkerStats, gets)), 22);
        let worker_end = 8 + master_size + std::mem::size_of::<WorkerStats>();
        assert!(buf[worker_end..size].iter().all(|&b| b == 0), "the worker's newer counters");
        assert!(buf[size..].iter().all(|&b| b == 0xCD), "written past the caller's struct");

        // cts_config_init likewise: a newer caller's fields past ours read 0.
        let ours = std::mem::size_of::<cts_config>();
        let mut cfg = vec![0xCDu8; ours + 24 + 8];
        // SAFETY: `cfg` holds `ours + 24` bytes and more.
        assert_eq!(unsafe { cts_config_init_sized(cfg.as_mut_ptr().cast(), ours + 24) }, cts_result::CTS_OK);
        assert!(cfg[ours..ours + 24].iter().all(|&b| b == 0));
        assert!(cfg[ours + 24..].iter().all(|&b| b == 0xCD));
    }

    #[test]
    fn config_init_never_writes_past_the_size_it_is_given() {
        let short = std::mem::offset_of!(cts_config, ticket_key_file);
        let mut cfg = std::mem::MaybeUninit::<cts_config>::zeroed();
        // SAFETY: `cfg` is writable for its whole size, more than `short`; the bytes past
        // `short` stand for the caller's neighbouring memory.
        unsafe {
            let tail = cfg.as_mut_ptr().cast::<u8>().add(short);
            std::ptr::write_bytes(tail, 0xCD, std::mem::size_of::<cts_config>() - short);
            assert_eq!(cts_config_init_sized(cfg.as_mut_ptr(), short), cts_result::CTS_OK);
            let tail = std::slice::from_raw_parts(tail, std::mem::size_of::<cts_config>() - short);
            assert!(tail.iter().all(|&b| b == 0xCD), "cts_config_init_sized wrote past its size");
            assert_eq!(
                (*cfg.as_ptr()).cache_bytes,
                Config::default().cache_bytes as u64,
                "the fields that fit are filled"
            );
        }
    }
}
