//! OpenSSL's session-cache callbacks, written over openssl-sys.
//!
//! We do not use the openssl crate's `set_*_session_callback`: they find their closure through
//! ex_data that only `Ssl::new` fills, so on an `SSL*` made by C code they panic inside an
//! `extern "C"` function and abort the host. Our trampolines keep their per-context state
//! (the namespace) in an ex_data slot of our own on the `SSL_CTX`, freed with the context.
//!
//! Every trampoline runs inside `ffi_boundary!`: a panic becomes "no session" (a miss or a
//! skipped store), never an unwind into OpenSSL.

use std::ffi::{c_int, c_long, c_uchar, c_uint, c_void};
use std::sync::atomic::{AtomicI32, Ordering::SeqCst};

use foreign_types::{ForeignType, ForeignTypeRef};
use openssl::ssl::{SslSession, SslSessionRef};
use openssl_sys as ffi;

use crate::channel::{self, Channel, Found};
use crate::fork;
use crate::master::{self, Master};
use crate::protocol::{MAX_ID_LEN, MAX_NAMESPACE_LEN};
use crate::stats::{bump, WORKER};
use crate::wipe::SecretBuf;
use crate::Error;

type TicketKeyCb = unsafe extern "C" fn(
    *mut ffi::SSL,
    *mut c_uchar,
    *mut c_uchar,
    *mut ffi::EVP_CIPHER_CTX,
    *mut ffi::EVP_MAC_CTX,
    c_int,
) -> c_int;

extern "C" {
    // Not bound by openssl-sys; exported by libssl/libcrypto 3.
    fn SSL_get_options(ssl: *const ffi::SSL) -> u64;
    fn ERR_set_mark() -> c_int;
    fn ERR_pop_to_mark() -> c_int;
    fn SSL_SESSION_set_ex_data(s: *mut ffi::SSL_SESSION, idx: c_int, data: *mut c_void) -> c_int;
    fn SSL_SESSION_get_ex_data(s: *const ffi::SSL_SESSION, idx: c_int) -> *mut c_void;
    fn SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx: *mut ffi::SSL_CTX, cb: Option<TicketKeyCb>) -> c_int;
    fn OSSL_PARAM_construct_utf8_string(
        key: *const std::ffi::c_char,
        buf: *mut std::ffi::c_char,
        bsize: usize,
    ) -> ffi::OSSL_PARAM;
}

const TLS1_3_VERSION: c_int = 0x0304;

/// Per-`SSL_CTX` state, owned by the context's ex_data slot.
struct CtxState {
    namespace: Box<[u8]>,
    tickets: TicketMode,
    /// The namespace, interned: what the sessions stored and found through this context are
    /// tagged with (`tag_session`). `None` past `MAX_NS_TAGS` distinct namespaces.
    tag: Option<&'static NsTag>,
}

/// A namespace a session was stored or found under, kept on the session (ex_data) so that
/// its removal goes to the same namespace. OpenSSL calls every session callback of the
/// context the connection started on, but the library stores and looks up under the
/// namespace of the context serving the handshake, which a client-hello or servername
/// callback may have switched to (as HAProxy does per site); the removal callback is only
/// given the first context, and its namespace was the wrong one: the session was never
/// removed. Interned and never freed, so a session outliving every context still points at
/// a live one.
struct NsTag(Box<[u8]>);

/// Distinct namespaces interned at most (a host with more keeps removing under the
/// context's namespace for the rest).
const MAX_NS_TAGS: usize = 4096;

static NS_TAGS: std::sync::Mutex<Vec<&'static NsTag>> = std::sync::Mutex::new(Vec::new());

/// How many namespaces `NS_TAGS` holds. While this process shares contexts under one
/// namespace only, every removal names a context of that namespace, and no session needs a
/// tag (none is written: a first ex_data on a session costs an allocation, and makes OpenSSL
/// copy the ex_data each time it duplicates the session, as every TLS 1.3 resumption does).
static NS_TAG_COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn intern_namespace(ns: &[u8]) -> Option<&'static NsTag> {
    let mut tags = NS_TAGS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = tags.iter().find(|t| *t.0 == *ns) {
        return Some(*t);
    }
    if tags.len() >= MAX_NS_TAGS {
        return None;
    }
    let t: &'static NsTag = Box::leak(Box::new(NsTag(ns.into())));
    tags.push(t);
    NS_TAG_COUNT.store(tags.len(), SeqCst);
    Some(t)
}

/// The SSL_SESSION ex_data index of the namespace tags; -1 until made.
static SESSION_EX_INDEX: AtomicI32 = AtomicI32::new(-1);

fn session_ex_index() -> Result<c_int, Error> {
    index_once(&SESSION_EX_INDEX, "CRYPTO_get_ex_new_index (SSL_SESSION)", || {
        // SAFETY: registers a new SSL_SESSION ex_data index without callbacks: the values
        // are `&'static NsTag`, copied as they are when OpenSSL duplicates a session.
        unsafe { ffi::CRYPTO_get_ex_new_index(CRYPTO_EX_INDEX_SSL_SESSION, 0, std::ptr::null_mut(), None, None, None) }
    })
}

/// The ex_data index kept in `slot`, made by `make` on first use. Two racing first calls each
/// make one; one wins and the other index stays unused.
fn index_once(slot: &AtomicI32, what: &str, make: impl FnOnce() -> c_int) -> Result<c_int, Error> {
    let idx = slot.load(SeqCst);
    if idx >= 0 {
        return Ok(idx);
    }
    let new = make();
    if new < 0 {
        return Err(Error::OpenSsl(format!("{what} failed")));
    }
    match slot.compare_exchange(-1, new, SeqCst, SeqCst) {
        Ok(_) => Ok(new),
        Err(existing) => Ok(existing),
    }
}

const CRYPTO_EX_INDEX_SSL_SESSION: c_int = 2;

/// Tag `sess` with the namespace it is stored or found under (see `NsTag`). Only on a
/// session no other thread can see yet: one OpenSSL just made, or one just decoded.
///
/// # Safety
/// `sess` must be a valid session.
unsafe fn tag_session(sess: *mut ffi::SSL_SESSION, state: &CtxState) {
    let (Some(tag), idx) = (state.tag, SESSION_EX_INDEX.load(SeqCst)) else { return };
    if idx < 0 || NS_TAG_COUNT.load(SeqCst) < 2 {
        return;
    }
    // SAFETY: valid session (caller); the value is a 'static pointer. Already so tagged:
    // nothing to write. A failure (no memory) leaves the session untagged: removed under the
    // context's namespace.
    unsafe {
        if !std::ptr::eq(SSL_SESSION_get_ex_data(sess, idx).cast_const().cast::<NsTag>(), tag) {
            SSL_SESSION_set_ex_data(sess, idx, (tag as *const NsTag).cast_mut().cast());
        }
    }
}

/// The namespace `sess` was tagged with, if any.
///
/// # Safety
/// `sess` must be a valid session.
unsafe fn session_namespace<'a>(sess: *const ffi::SSL_SESSION) -> Option<&'a [u8]> {
    let idx = SESSION_EX_INDEX.load(SeqCst);
    if idx < 0 {
        return None;
    }
    // SAFETY: valid session (caller); non-null values at our index are `&'static NsTag`.
    unsafe { SSL_SESSION_get_ex_data(sess, idx).cast::<NsTag>().as_ref() }.map(|t| &t.0[..])
}

/// What [`install`] did with a context's session ticket keys (reported by
/// `cts_ticket_mode` / [`crate::ticket_mode`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TicketMode {
    /// The context was never shared (or is not a valid context).
    NotShared = 0,
    /// The library took over: tickets are sealed with the cluster-wide, rotated keys.
    ClusterKeys = 1,
    /// The host asked to keep its own ticket keys or callback (`CTS_SHARE_KEEP_TICKET_KEYS`):
    /// tickets open only where those keys are.
    HostKeys = 2,
    /// Ticket sharing is off for the whole server (`share_tickets = 0`): the context's own
    /// keys (OpenSSL's per-context random ones unless the host set some) apply.
    SharingOff = 3,
    /// Shared, but the context issues no tickets now (`SSL_OP_NO_TICKET`): TLS 1.3 resumes
    /// with stateful tickets, which go through the shared cache.
    NoTickets = 4,
}

/// Where this process's lookups go.
enum Backend {
    /// The master itself (a server with no workers): the cache, in process.
    InProcess(&'static Master),
    /// A worker: the channel to the master.
    Channel(&'static Channel),
}

fn backend() -> Option<Backend> {
    // One pid read per callback (no system call: see fork::pid).
    let me = fork::pid();
    if let Some(m) = master::get_as(me) {
        return Some(Backend::InProcess(m));
    }
    channel::current_as(me).ok().map(Backend::Channel)
}

static EX_INDEX: AtomicI32 = AtomicI32::new(-1);

unsafe extern "C" fn free_ctx_state(
    _parent: *mut c_void,
    ptr: *mut c_void,
    _ad: *mut ffi::CRYPTO_EX_DATA,
    _idx: c_int,
    _argl: c_long,
    _argp: *mut c_void,
) {
    ffi_boundary!((), {
        if !ptr.is_null() {
            // SAFETY: non-null values in our slot are only ever Box<CtxState> set by
            // `install`; OpenSSL calls this once, when the context is freed.
            drop(unsafe { Box::from_raw(ptr.cast::<CtxState>()) });
        }
    })
}

fn ex_index() -> Result<c_int, Error> {
    index_once(&EX_INDEX, "SSL_CTX_get_ex_new_index", || {
        // SAFETY: registers a new ex_data index with a free callback of the right signature.
        unsafe { ffi::SSL_CTX_get_ex_new_index(0, std::ptr::null_mut(), None, None, Some(free_ctx_state)) }
    })
}

/// State of a context, if `install` ran on it.
///
/// # Safety
/// `ctx` must be a valid `SSL_CTX` pointer.
unsafe fn ctx_state<'a>(ctx: *const ffi::SSL_CTX) -> Option<&'a CtxState> {
    let idx = EX_INDEX.load(SeqCst);
    if idx < 0 || ctx.is_null() {
        return None;
    }
    // SAFETY: caller guarantees `ctx` is valid; our slot holds a Box<CtxState> or NULL, alive
    // as long as the context.
    unsafe { ffi::SSL_CTX_get_ex_data(ctx, idx).cast::<CtxState>().as_ref() }
}

/// What happened to `ctx`'s ticket keys when it was shared; `NoTickets` when it issues no
/// tickets at the time of asking.
///
/// # Safety
/// `ctx` must be a valid `SSL_CTX` pointer.
pub unsafe fn ticket_mode(ctx: *const ffi::SSL_CTX) -> TicketMode {
    // SAFETY: caller guarantees `ctx` is valid.
    let Some(state) = (unsafe { ctx_state(ctx) }) else { return TicketMode::NotShared };
    // SAFETY: `ctx` is valid; SSL_CTX_get_options only reads it.
    let options = unsafe { ffi::SSL_CTX_get_options(ctx) };
    if state.tickets == TicketMode::ClusterKeys && options & ffi::SSL_OP_NO_TICKET != 0 {
        return TicketMode::NoTickets;
    }
    state.tickets
}

/// Options for `install`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShareOptions {
    /// Keep the session id context the host set instead of deriving one from the namespace.
    pub keep_session_id_context: bool,
    /// Keep the context's own ticket keys (or ticket key callback) instead of installing the
    /// cluster-wide keys.
    pub keep_ticket_keys: bool,
}

/// Check a namespace for use on the wire.
pub fn check_namespace(ns: &[u8]) -> Result<(), Error> {
    if ns.len() > MAX_NAMESPACE_LEN {
        return Err(Error::InvalidNamespace(format!("{} bytes, at most {MAX_NAMESPACE_LEN}", ns.len())));
    }
    Ok(())
}

/// The session id context derived from a namespace: SHA-256 of a fixed label and the
/// namespace (32 bytes, the TLS maximum).
fn session_id_context(ns: &[u8]) -> [u8; 32] {
    let mut h = openssl::sha::Sha256::new();
    h.update(b"cluster-tls-store session id context\0");
    h.update(ns);
    h.finish()
}

/// Install the callbacks on `ctx` for namespace `ns`.
///
/// # Safety
/// `ctx` must be a valid `SSL_CTX` pointer; the caller must not be running handshakes on it
/// concurrently (OpenSSL's setters are not synchronised).
pub unsafe fn install(ctx: *mut ffi::SSL_CTX, ns: &[u8], opts: ShareOptions) -> Result<(), Error> {
    check_namespace(ns)?;
    // SAFETY: `ctx` is valid (caller); both getters only read it.
    let (options, max_early) = unsafe { (ffi::SSL_CTX_get_options(ctx), ffi::SSL_CTX_get_max_early_data(ctx)) };
    if early_data_with_anti_replay(options, max_early) {
        return Err(Error::InvalidConfig(format!(
            "early data is on (max_early_data {max_early}) with OpenSSL's anti-replay protection: OpenSSL then \
             resumes a TLS 1.3 session only by taking it out of its own per-process cache, so a shared cache \
             would resume none. Turn early data off, or set SSL_OP_NO_ANTI_REPLAY (0-RTT data may then be \
             replayed: accept it only for idempotent requests), before sharing. The context was left untouched"
        )));
    }
    // Find the backend first: with no master, the context is left untouched.
    match backend() {
        Some(_) => {}
        None => return Err(channel::current().err().unwrap_or(Error::NoMaster)),
    }
    let idx = ex_index()?;
    // SAFETY: `ctx` is valid (caller).
    let was = unsafe { ctx_state(ctx) }.map(|s| s.tickets);
    if was == Some(TicketMode::ClusterKeys) && opts.keep_ticket_keys {
        // Our ticket key callback is on it, and OpenSSL 3.0 cannot tell whether the host has
        // replaced it since: removing it could remove the host's, keeping it would report
        // host keys while the cluster's are in use.
        return Err(Error::InvalidConfig(
            "this SSL_CTX was shared with the cluster's ticket keys; sharing it again with \
             CTS_SHARE_KEEP_TICKET_KEYS cannot give it back keys of its own (set your ticket key \
             callback after sharing, on a context shared with that flag from the start). The \
             context was left as it was"
                .into(),
        ));
    }
    if !opts.keep_session_id_context {
        let sid = session_id_context(ns);
        // SAFETY: `ctx` is valid (caller); `sid` is 32 bytes, the maximum OpenSSL accepts.
        if unsafe { ffi::SSL_CTX_set_session_id_context(ctx, sid.as_ptr(), sid.len() as c_uint) } != 1 {
            return Err(Error::OpenSsl("SSL_CTX_set_session_id_context failed".into()));
        }
    }
    let tickets = if !channel::share_tickets() {
        TicketMode::SharingOff
    } else if opts.keep_ticket_keys {
        TicketMode::HostKeys
    } else {
        TicketMode::ClusterKeys
    };
    session_ex_index()?;
    let state = Box::into_raw(Box::new(CtxState { namespace: ns.into(), tickets, tag: intern_namespace(ns) }));
    // SAFETY: `ctx` is valid. A previous state (the context shared before) is left allocated,
    // not freed: a handshake on another thread may be reading it, and two threads sharing one
    // context at once would both free it. A few dozen bytes per repeated share; the context's
    // free callback frees the current one.
    unsafe {
        if ffi::SSL_CTX_set_ex_data(ctx, idx, state.cast()) != 1 {
            drop(Box::from_raw(state));
            return Err(Error::OpenSsl("SSL_CTX_set_ex_data failed".into()));
        }
        ffi::SSL_CTX_sess_set_new_cb(ctx, Some(new_session_cb));
        ffi::SSL_CTX_sess_set_get_cb(ctx, Some(get_session_cb));
        ffi::SSL_CTX_sess_set_remove_cb(ctx, Some(remove_session_cb));
        if tickets == TicketMode::ClusterKeys {
            SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, Some(ticket_key_cb));
            // Fetch the keys now, so the first handshakes do not wait for the master.
            local_keys().refresh_if_due(master::now_secs());
        }
        // The shared cache is the only cache: OpenSSL's per-process one would serve
        // sessions that were removed or expired cluster-wide and grow without our bound.
        ffi::SSL_CTX_set_session_cache_mode(ctx, ffi::SSL_SESS_CACHE_SERVER | ffi::SSL_SESS_CACHE_NO_INTERNAL);
    }
    Ok(())
}

/// `SSL_OP_NO_ANTI_REPLAY` (OpenSSL 1.1.1 and later; not bound by openssl-sys).
const SSL_OP_NO_ANTI_REPLAY: u64 = 1 << 24;

/// Whether early data (0-RTT) is on with OpenSSL's anti-replay protection, for options
/// `options` and `max_early_data`. OpenSSL then issues stateful TLS 1.3 tickets and resumes
/// one only after taking it out of its own per-process cache (single use): with the shared
/// cache as the only cache it resumes none.
fn early_data_with_anti_replay(options: u64, max_early_data: u32) -> bool {
    max_early_data > 0 && options & SSL_OP_NO_ANTI_REPLAY == 0
}

/// True for TLS 1.3 sessions not worth storing: those that ride in stateless tickets (the
/// ticket holds the state; nginx skips them the same way), and those OpenSSL would only
/// resume from its own cache (early data with anti-replay; `install` refuses such a context,
/// but the host may turn early data on later).
///
/// # Safety
/// `ssl` must be a valid `SSL` pointer.
unsafe fn is_stateless_tls13(ssl: *const ffi::SSL) -> bool {
    // SAFETY: caller guarantees `ssl` is valid.
    unsafe {
        if ffi::SSL_version(ssl) < TLS1_3_VERSION {
            return false;
        }
        let options = SSL_get_options(ssl);
        options & ffi::SSL_OP_NO_TICKET == 0 || early_data_with_anti_replay(options, ffi::SSL_get_max_early_data(ssl))
    }
}

unsafe extern "C" fn new_session_cb(ssl: *mut ffi::SSL, sess: *mut ffi::SSL_SESSION) -> c_int {
    // Returning 0 tells OpenSSL we kept no reference: it frees its own.
    ffi_boundary!(0, {
        // SAFETY: OpenSSL passes a valid SSL and SESSION for the duration of the callback.
        unsafe { store_session(ssl, sess) };
        0
    })
}

/// Whether a worker keeps `sess` decoded beside its replica entry (`hot.rs`), when it stores
/// it or decodes it for a hit: TLS 1.2 sessions, which clients resume again and again, yes.
/// TLS 1.3 sessions, no: each resumption is issued a new ticket and clients offer the newest,
/// so a session is resumed at most once, and with N workers on its maker only 1/N of the time.
/// Kept, each stayed until the copies' bound pushed it out and was freed cold, long after its
/// neighbours in the heap, which cost the workers more than the decode it saved (TLS 1.3 at
/// N=4, interleaved: resumed handshakes/s +1.1 to +1.4 % without, worker CPU 253 to 246 µs
/// per connection; at N=2 +0.9 %).
///
/// # Safety
/// `sess` is a valid session.
unsafe fn worth_keeping_decoded(sess: *const ffi::SSL_SESSION) -> bool {
    // SAFETY: see the function's contract.
    unsafe { ffi::SSL_SESSION_get_protocol_version(sess) < TLS1_3_VERSION }
}

/// # Safety
/// `ssl` and `sess` must be valid.
unsafe fn store_session(ssl: *mut ffi::SSL, sess: *mut ffi::SSL_SESSION) {
    // SAFETY: both pointers are valid (caller).
    unsafe {
        if is_stateless_tls13(ssl) {
            bump(&WORKER.stateless_skipped);
            crate::log::debug!("new session: TLS 1.3 stateless ticket (or early data with anti-replay), not stored");
            return;
        }
        let Some(state) = ctx_state(ffi::SSL_get_SSL_CTX(ssl)) else { return };
        let Some(backend) = backend() else { return };
        let mut id_len: c_uint = 0;
        let id_ptr = ffi::SSL_SESSION_get_id(sess, &mut id_len);
        if id_ptr.is_null() || id_len == 0 || id_len as usize > MAX_ID_LEN {
            return;
        }
        let id = std::slice::from_raw_parts(id_ptr, id_len as usize);
        let der_len = ffi::i2d_SSL_SESSION(sess, std::ptr::null_mut());
        if der_len <= 0 {
            return;
        }
        let der_len = der_len as usize;
        if der_len > channel::max_session_bytes() {
            bump(&WORKER.oversize);
            crate::log::debug!("new session: id={} {der_len}B over the cap, not stored", crate::log::hex(id));
            return;
        }
        crate::log::debug!(
            "new session: ns={} id={} {der_len}B stored",
            String::from_utf8_lossy(&state.namespace),
            crate::log::hex(id)
        );
        tag_session(sess, state);
        let time = ffi::SSL_SESSION_get_time(sess).max(0) as u64;
        let timeout = ffi::SSL_SESSION_get_timeout(sess).max(0) as u64;
        let expiry = time.saturating_add(timeout);
        // i2d into the tail of `out`; the bytes are wiped with the buffer after the send.
        let encode = |out: &mut Vec<u8>| -> bool {
            let start = out.len();
            out.resize(start + der_len, 0);
            let mut p = out.as_mut_ptr().add(start);
            let written = ffi::i2d_SSL_SESSION(sess, &mut p);
            if written as usize != der_len {
                out.truncate(start);
                return false;
            }
            true
        };
        match backend {
            // A session worth it (see `worth_keeping_decoded`) is kept too, beside this
            // worker's replica (a reference, as OpenSSL's own cache keeps): its resumptions
            // here need no d2i.
            Backend::Channel(ch) => {
                let keep = worth_keeping_decoded(sess);
                ch.put(&state.namespace, id, expiry, der_len, encode, keep.then(|| SslSessionRef::from_ptr(sess)))
            }
            Backend::InProcess(m) => {
                let mut buf = SecretBuf::with_capacity(der_len);
                if encode(buf.vec()) {
                    m.put(&state.namespace, id, &buf, expiry);
                    bump(&WORKER.puts);
                }
            }
        }
    }
}

unsafe extern "C" fn get_session_cb(
    ssl: *mut ffi::SSL,
    id: *const c_uchar,
    len: c_int,
    copy: *mut c_int,
) -> *mut ffi::SSL_SESSION {
    ffi_boundary!(std::ptr::null_mut(), {
        // SAFETY: OpenSSL passes a valid SSL, `len` readable bytes at `id`, and a valid `copy`.
        unsafe { lookup_session(ssl, id, len, copy) }
    })
}

/// # Safety
/// As for `get_session_cb`.
unsafe fn lookup_session(
    ssl: *mut ffi::SSL,
    id: *const c_uchar,
    len: c_int,
    copy: *mut c_int,
) -> *mut ffi::SSL_SESSION {
    if id.is_null() || len <= 0 || len as usize > MAX_ID_LEN {
        return std::ptr::null_mut();
    }
    // SAFETY: see the function's contract.
    unsafe {
        let id = std::slice::from_raw_parts(id, len as usize);
        let Some(state) = ctx_state(ffi::SSL_get_SSL_CTX(ssl)) else {
            return std::ptr::null_mut();
        };
        let der = match backend() {
            Some(Backend::Channel(ch)) => {
                let found = ch.get_session(&state.namespace, id, |der| {
                    let s = decode_session(der, id);
                    if s.is_null() {
                        return None;
                    }
                    tag_session(s, state);
                    let keep = worth_keeping_decoded(s);
                    // SAFETY (of the enclosing block): a non-null session from d2i, whose one
                    // reference the SslSession takes over.
                    Some((SslSession::from_ptr(s), keep))
                });
                return match found {
                    Some(Found::Session(s)) => {
                        crate::log::debug!("get session: id={} hit", crate::log::hex(id));
                        bump(&WORKER.hits);
                        // Hand OpenSSL the reference we got (not freed here).
                        if !copy.is_null() {
                            *copy = 0;
                        }
                        let ptr = s.as_ptr();
                        std::mem::forget(s);
                        ptr
                    }
                    Some(Found::Undecodable) => {
                        bump(&WORKER.decode_failures);
                        crate::log::debug!("get session: id={} did not decode: miss", crate::log::hex(id));
                        std::ptr::null_mut()
                    }
                    None => {
                        crate::log::debug!("get session: id={} miss", crate::log::hex(id));
                        std::ptr::null_mut()
                    }
                };
            }
            Some(Backend::InProcess(m)) => {
                bump(&WORKER.gets);
                // Sessions the workers made may still be in the session ring only.
                m.read_ring();
                let mut cache = m.cache();
                let found = cache.get(&state.namespace, id, master::now_secs()).map(SecretBuf::from_slice);
                drop(cache);
                if found.is_none() {
                    bump(&WORKER.misses);
                }
                found
            }
            None => None,
        };
        let Some(der) = der else {
            crate::log::debug!("get session: id={} miss", crate::log::hex(id));
            return std::ptr::null_mut();
        };
        let sess = decode_session(&der, id);
        if sess.is_null() {
            bump(&WORKER.decode_failures);
            crate::log::debug!("get session: id={} {}B did not decode: miss", crate::log::hex(id), der.len());
            return std::ptr::null_mut();
        }
        crate::log::debug!("get session: id={} hit ({}B)", crate::log::hex(id), der.len());
        bump(&WORKER.hits);
        tag_session(sess, state);
        // A freshly decoded session: hand OpenSSL our only reference.
        if !copy.is_null() {
            *copy = 0;
        }
        sess
    }
}

/// Decode a session and check it is the one asked for; NULL otherwise. OpenSSL errors from a
/// bad DER are popped so the host's error queue is left as it was.
fn decode_session(der: &[u8], id: &[u8]) -> *mut ffi::SSL_SESSION {
    let Ok(len) = c_long::try_from(der.len()) else { return std::ptr::null_mut() };
    // SAFETY: d2i reads at most `len` bytes from `p`; the mark/pop pair only touches this
    // thread's error queue; the returned session is owned by us until handed to OpenSSL.
    unsafe {
        ERR_set_mark();
        let mut p = der.as_ptr();
        let sess = ffi::d2i_SSL_SESSION(std::ptr::null_mut(), &mut p, len);
        ERR_pop_to_mark();
        if sess.is_null() {
            return sess;
        }
        let mut got_len: c_uint = 0;
        let got = ffi::SSL_SESSION_get_id(sess, &mut got_len);
        if got.is_null() || std::slice::from_raw_parts(got, got_len as usize) != id {
            ffi::SSL_SESSION_free(sess);
            return std::ptr::null_mut();
        }
        sess
    }
}

unsafe extern "C" fn remove_session_cb(ctx: *mut ffi::SSL_CTX, sess: *mut ffi::SSL_SESSION) {
    ffi_boundary!((), {
        // SAFETY: OpenSSL passes a valid context and session.
        unsafe {
            let Some(state) = ctx_state(ctx) else { return };
            // Where it was stored or found, which may be another context's namespace.
            let ns = session_namespace(sess).unwrap_or(&state.namespace);
            let mut id_len: c_uint = 0;
            let id_ptr = ffi::SSL_SESSION_get_id(sess, &mut id_len);
            if id_ptr.is_null() || id_len == 0 || id_len as usize > MAX_ID_LEN {
                return;
            }
            let id = std::slice::from_raw_parts(id_ptr, id_len as usize);
            crate::log::debug!("remove session: ns={} id={}", String::from_utf8_lossy(ns), crate::log::hex(id));
            match backend() {
                Some(Backend::Channel(ch)) => ch.del(ns, id),
                Some(Backend::InProcess(m)) => {
                    m.remove(ns, id);
                    bump(&WORKER.dels);
                }
                None => {}
            }
        }
    })
}

/// This process's copy of the cluster-wide ticket keys.
struct LocalKeys {
    pid: i32,
    state: std::sync::Mutex<KeyState>,
}

#[derive(Default)]
struct KeyState {
    keys: crate::tickets::KeySet,
    refresh_at: u64,
    fetching: bool,
    /// Ticket HMAC keys derived for a namespace (`namespace_mac`), cached: at most
    /// `MAX_DERIVED`, emptied when the keys are replaced.
    derived: Vec<DerivedMac>,
    /// Where the next derived key goes once `derived` is full (it replaces the oldest).
    derived_next: usize,
}

/// A ticket key's HMAC key for one namespace. Wiped when dropped.
struct DerivedMac {
    namespace: Box<[u8]>,
    name: [u8; 16],
    mac: [u8; 32],
}

impl Drop for DerivedMac {
    fn drop(&mut self) {
        crate::wipe::wipe(&mut self.mac);
    }
}

/// How many (namespace, key) HMAC keys a process keeps derived: a few namespaces times the
/// few keys of a set.
const MAX_DERIVED: usize = 64;

/// HMAC-SHA256 (RFC 2104) of `msg` under `key` (at most 64 bytes, the block size).
fn hmac_sha256(key: &[u8], msg: &[&[u8]]) -> [u8; 32] {
    let mut pad = [0u8; 64];
    pad[..key.len()].copy_from_slice(key);
    let mut outer = openssl::sha::Sha256::new();
    let mut inner = openssl::sha::Sha256::new();
    for b in pad.iter_mut() {
        *b ^= 0x36;
    }
    inner.update(&pad);
    for b in pad.iter_mut() {
        *b ^= 0x36 ^ 0x5c;
    }
    outer.update(&pad);
    crate::wipe::wipe(&mut pad);
    for m in msg {
        inner.update(m);
    }
    let mut h = inner.finish();
    outer.update(&h);
    crate::wipe::wipe(&mut h);
    outer.finish()
}

impl KeyState {
    /// The HMAC key tickets of `namespace` are sealed with under `k`: derived from `k`'s HMAC
    /// key and the namespace, so a ticket opens only in the namespace that issued it, even
    /// where contexts share a session id context (`keep_session_id_context`). Without it, a
    /// ticket issued by a context that asks for no client certificate resumed, certificate
    /// and all, in one that requires it.
    fn namespace_mac(&mut self, k: &crate::tickets::TicketKey, namespace: &[u8]) -> [u8; 32] {
        if let Some(d) = self.derived.iter().find(|d| d.name == k.name && *d.namespace == *namespace) {
            return d.mac;
        }
        let len = [namespace.len() as u8];
        let mac =
            hmac_sha256(&k.hmac[..usize::from(k.hmac_len)], &[b"cluster-tls-store ticket mac\0", &len, namespace]);
        let fresh = DerivedMac { namespace: namespace.into(), name: k.name, mac };
        if self.derived.len() >= MAX_DERIVED {
            // Full (more namespace and key pairs in use than it holds): replace the oldest in
            // place, which drops (wipes) it, rather than emptying the cache and deriving every
            // pair again.
            let i = self.derived_next % MAX_DERIVED;
            self.derived[i] = fresh;
            self.derived_next = i + 1;
            return mac;
        }
        // Its whole capacity at once: a vector that grows moves its entries and frees the old
        // allocation unwiped.
        if self.derived.capacity() < MAX_DERIVED {
            self.derived.reserve_exact(MAX_DERIVED);
        }
        self.derived.push(fresh);
        mac
    }
}

static LOCAL_KEYS: std::sync::atomic::AtomicPtr<LocalKeys> = std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

/// The key store of this process (a forked child makes its own: an inherited one might be
/// locked by a thread that does not exist in the child).
fn local_keys() -> &'static LocalKeys {
    let me = fork::pid();
    loop {
        let p = LOCAL_KEYS.load(SeqCst);
        // SAFETY: published stores are leaked Boxes, never freed.
        if let Some(k) = unsafe { p.as_ref() } {
            if k.pid == me {
                return k;
            }
        }
        // None yet, or the parent's: publish ours (the parent's is leaked, never touched).
        let fresh = Box::into_raw(Box::new(LocalKeys { pid: me, state: std::sync::Mutex::new(KeyState::default()) }));
        if LOCAL_KEYS.compare_exchange(p, fresh, SeqCst, SeqCst).is_ok() {
            // SAFETY: `fresh` is now published for good.
            return unsafe { &*fresh };
        }
        // Another thread of this process published first: free ours and use theirs.
        // SAFETY: `fresh` was never published; we still own it.
        drop(unsafe { Box::from_raw(fresh) });
    }
}

/// The fetcher's role (`KeyState::fetching`), given back when dropped.
struct Fetching<'a>(&'a LocalKeys);

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        self.0.lock().fetching = false;
    }
}

impl LocalKeys {
    fn lock(&self) -> std::sync::MutexGuard<'_, KeyState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fetch the keys from the master when due. One thread fetches; the others keep using
    /// the copy they have, so a handshake never waits behind another thread's fetch.
    fn refresh_if_due(&self, now: u64) {
        {
            let mut st = self.lock();
            if now < st.refresh_at || st.fetching {
                return;
            }
            st.fetching = true;
        }
        // Clears `fetching` however this ends (a panic included), so fetches never stop.
        let _fetching = Fetching(self);
        let payload = match backend() {
            Some(Backend::InProcess(m)) => Some(SecretBuf::from(m.ticket_keys())),
            Some(Backend::Channel(ch)) => ch.ticket_keys(),
            None => None,
        };
        let fetched = payload.as_deref().and_then(crate::tickets::KeySet::decode);
        // (`_fetching` is dropped after `st`, so it takes the lock once this one is released.)
        let mut st = self.lock();
        match fetched {
            Some(keys) => {
                bump(&WORKER.ticket_key_fetches);
                // Ask again half way through the current key's period: the master makes the
                // next key a period ahead, so the copy never runs out while the master lives.
                let period = keys.encrypting(now).map(|k| k.encrypt_until.saturating_sub(k.encrypt_from)).unwrap_or(2);
                st.refresh_at = now + (period / 2).clamp(1, 10);
                st.keys = keys;
                st.derived.clear();
                st.derived_next = 0;
            }
            // Master unreachable: keep the copy we have (tickets keep working across the
            // workers that share it) and try again in a second.
            None => st.refresh_at = now + 1,
        }
    }
}

unsafe extern "C" fn ticket_key_cb(
    ssl: *mut ffi::SSL,
    key_name: *mut c_uchar,
    iv: *mut c_uchar,
    cctx: *mut ffi::EVP_CIPHER_CTX,
    hctx: *mut ffi::EVP_MAC_CTX,
    enc: c_int,
) -> c_int {
    // 0 on any failure: no ticket issued / ticket not accepted, i.e. a full handshake.
    ffi_boundary!(0, {
        // SAFETY: OpenSSL passes a 16-byte key name, an IV buffer of EVP_MAX_IV_LENGTH and
        // valid cipher and MAC contexts.
        unsafe { ticket_key(ssl, key_name, iv, cctx, hctx, enc == 1) }
    })
}

/// AES-128-CBC for keys from 48-byte key files, AES-256-CBC otherwise.
fn ticket_cipher(k: &crate::tickets::TicketKey) -> *const ffi::EVP_CIPHER {
    // SAFETY: these return pointers to OpenSSL's static cipher tables.
    unsafe {
        if k.aes_len == 16 {
            ffi::EVP_aes_128_cbc()
        } else {
            ffi::EVP_aes_256_cbc()
        }
    }
}

/// Set the ticket HMAC's key and digest (SHA-256).
///
/// # Safety
/// `hctx` must be a valid MAC context.
unsafe fn set_ticket_mac(hctx: *mut ffi::EVP_MAC_CTX, hmac: &[u8]) -> bool {
    // SAFETY: the params point at live buffers for the duration of the call; OpenSSL copies.
    unsafe {
        let params = [
            ffi::OSSL_PARAM_construct_octet_string(c"key".as_ptr(), hmac.as_ptr() as *mut c_void, hmac.len()),
            OSSL_PARAM_construct_utf8_string(c"digest".as_ptr(), c"SHA256".as_ptr() as *mut std::ffi::c_char, 0),
            ffi::OSSL_PARAM_construct_end(),
        ];
        ffi::EVP_MAC_CTX_set_params(hctx, params.as_ptr()) == 1
    }
}

/// # Safety
/// As for `ticket_key_cb`.
unsafe fn ticket_key(
    ssl: *mut ffi::SSL,
    key_name: *mut c_uchar,
    iv: *mut c_uchar,
    cctx: *mut ffi::EVP_CIPHER_CTX,
    hctx: *mut ffi::EVP_MAC_CTX,
    encrypt: bool,
) -> c_int {
    let now = master::now_secs();
    let store = local_keys();
    store.refresh_if_due(now);
    // SAFETY: see the function's contract. The namespace of the context now serving the
    // handshake (a context never shared seals its tickets for the empty namespace).
    let namespace = unsafe { ctx_state(ffi::SSL_get_SSL_CTX(ssl)) }.map(|s| &s.namespace[..]).unwrap_or(b"");
    // SAFETY: see the function's contract.
    unsafe {
        if encrypt {
            let (k, mut mac) = {
                let mut st = store.lock();
                let Some(k) = st.keys.encrypting(now).cloned() else { return 0 };
                let mac = st.namespace_mac(&k, namespace);
                (k, mac)
            };
            std::ptr::copy_nonoverlapping(k.name.as_ptr(), key_name, 16);
            let ok = ffi::RAND_bytes(iv, 16) == 1
                && ffi::EVP_EncryptInit_ex(cctx, ticket_cipher(&k), std::ptr::null_mut(), k.aes.as_ptr(), iv) == 1
                && set_ticket_mac(hctx, &mac);
            crate::wipe::wipe(&mut mac);
            if !ok {
                return 0;
            }
            bump(&WORKER.tickets_issued);
            1
        } else {
            let name = std::slice::from_raw_parts(key_name, 16);
            let found = {
                let mut st = store.lock();
                let current = st.keys.encrypting(now).map(|k| k.name);
                st.keys.opening(name, now).cloned().map(|k| {
                    let is_current = current == Some(k.name);
                    let mac = st.namespace_mac(&k, namespace);
                    (k, mac, is_current)
                })
            };
            let Some((k, mut mac, is_current)) = found else {
                bump(&WORKER.tickets_refused);
                crate::log::debug!("ticket refused: key {} unknown or too old", crate::log::hex(name));
                return 0;
            };
            let ok = ffi::EVP_DecryptInit_ex(cctx, ticket_cipher(&k), std::ptr::null_mut(), k.aes.as_ptr(), iv) == 1
                && set_ticket_mac(hctx, &mac);
            crate::wipe::wipe(&mut mac);
            if !ok {
                return 0;
            }
            bump(&WORKER.tickets_opened);
            if is_current {
                1
            } else {
                bump(&WORKER.tickets_renewed);
                2
            }
        }
    }
}

/// What this process is, for stats.
pub(crate) fn role() -> u32 {
    if fork::is_master() {
        crate::stats::ROLE_MASTER
    } else if channel::current().is_ok() {
        crate::stats::ROLE_WORKER
    } else {
        crate::stats::ROLE_NONE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    extern "C" {
        fn SSL_SESSION_new() -> *mut ffi::SSL_SESSION;
        fn SSL_SESSION_set1_id(s: *mut ffi::SSL_SESSION, sid: *const c_uchar, len: c_uint) -> c_int;
        fn SSL_SESSION_set1_master_key(s: *mut ffi::SSL_SESSION, key: *const c_uchar, len: usize) -> c_int;
        fn SSL_SESSION_set_protocol_version(s: *mut ffi::SSL_SESSION, version: c_int) -> c_int;
        fn SSL_CIPHER_find(ssl: *mut ffi::SSL, ptr: *const c_uchar) -> *const ffi::SSL_CIPHER;
        fn SSL_SESSION_set_cipher(s: *mut ffi::SSL_SESSION, cipher: *const ffi::SSL_CIPHER) -> c_int;
    }

    /// DER of a TLS 1.2 session with a 32-byte id.
    fn session_der(id: &[u8; 32]) -> Vec<u8> {
        // SAFETY: a fresh session, filled through its setters, encoded, then freed.
        unsafe {
            let s = SSL_SESSION_new();
            assert!(!s.is_null());
            assert_eq!(SSL_SESSION_set1_id(s, id.as_ptr(), 32), 1);
            assert_eq!(SSL_SESSION_set1_master_key(s, [0x42u8; 48].as_ptr(), 48), 1);
            assert_eq!(SSL_SESSION_set_protocol_version(s, 0x0303), 1);
            // ECDHE-ECDSA-AES128-GCM-SHA256, looked up through a throwaway SSL.
            let ctx = openssl::ssl::SslContext::builder(openssl::ssl::SslMethod::tls()).expect("ctx").build();
            let ssl = openssl::ssl::Ssl::new(&ctx).expect("ssl");
            let cipher = SSL_CIPHER_find(foreign_types::ForeignType::as_ptr(&ssl), [0xC0u8, 0x2B].as_ptr());
            assert!(!cipher.is_null());
            assert_eq!(SSL_SESSION_set_cipher(s, cipher), 1);
            let len = ffi::i2d_SSL_SESSION(s, std::ptr::null_mut());
            assert!(len > 0);
            let mut der = vec![0u8; len as usize];
            let mut p = der.as_mut_ptr();
            ffi::i2d_SSL_SESSION(s, &mut p);
            ffi::SSL_SESSION_free(s);
            der
        }
    }

    fn decodes(der: &[u8], id: &[u8]) -> bool {
        let s = decode_session(der, id);
        if s.is_null() {
            return false;
        }
        // SAFETY: we own the session decode_session returned.
        unsafe { ffi::SSL_SESSION_free(s) };
        true
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // RFC 4231, test case 2.
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn each_namespace_seals_tickets_with_its_own_mac_key() {
        let k = crate::tickets::TicketKey {
            name: [1; 16],
            aes: [2; 32],
            hmac: [3; 32],
            aes_len: 32,
            hmac_len: 32,
            encrypt_from: 0,
            encrypt_until: 10,
            decrypt_until: 20,
        };
        let mut st = KeyState::default();
        let (a, b, empty) = (st.namespace_mac(&k, b"alpha"), st.namespace_mac(&k, b"beta"), st.namespace_mac(&k, b""));
        assert!(a != b && a != empty && b != empty && a != k.hmac);
        assert_eq!(st.namespace_mac(&k, b"alpha"), a, "cached, and the same");
        assert_eq!(st.derived.len(), 3);
        // Past MAX_DERIVED pairs the oldest is replaced, the rest kept (not all dropped).
        for i in 0..MAX_DERIVED {
            st.namespace_mac(&k, format!("ns{i}").as_bytes());
        }
        assert_eq!(st.derived.len(), MAX_DERIVED);
        assert!(!st.derived.iter().any(|d| &*d.namespace == b"alpha"), "the oldest went");
        assert!(st.derived.iter().any(|d| &*d.namespace == b"ns0"), "the others stayed");
        assert_eq!(st.namespace_mac(&k, b"alpha"), a, "derived again, the same");
    }

    #[test]
    fn a_good_der_with_a_32_byte_id_decodes() {
        let id = [7u8; 32];
        assert!(decodes(&session_der(&id), &id));
    }

    #[test]
    fn corrupt_truncated_or_foreign_ders_are_misses_and_leave_no_openssl_error() {
        let id = [7u8; 32];
        let der = session_der(&id);
        assert!(!decodes(&der, &[8u8; 32]), "a session with another id is not handed out");
        for cut in [0, 1, der.len() / 2, der.len() - 1] {
            assert!(!decodes(&der[..cut], &id), "truncated at {cut}");
        }
        assert!(!decodes(&[0xffu8; 300], &id));
        let mut flipped = der.clone();
        for i in (0..flipped.len()).step_by(3) {
            flipped[i] ^= 0x5a;
        }
        assert!(!decodes(&flipped, &id));
        // SAFETY: reads this thread's OpenSSL error queue.
        assert_eq!(unsafe { ffi::ERR_get_error() }, 0, "decode failures must not leak into the host's error queue");
    }
}
