//! # cluster-tls-store
//!
//! Share one TLS session cache across the worker processes of a prefork OpenSSL server.
//!
//! The master calls [`master_setup`] once before it forks; from then on every `fork()` hands
//! the child a private AF_UNIX SOCK_SEQPACKET channel to the master's cache thread. Each
//! worker calls [`share_sessions`] on its `SSL_CTX`; OpenSSL's new/get/remove session callbacks
//! then store and fetch sessions (as DER) in the master, so a client resumes on any worker.
//!
//! The C API (`include/cluster_tls_store.h`) is a thin layer over these same functions.
//!
//! ```no_run
//! use cluster_tls_store::{master_setup, share_sessions, Config};
//! use openssl::ssl::{SslAcceptor, SslMethod};
//!
//! // In the master, before forking:
//! master_setup(Config::default())?;
//! // ... fork workers; in each worker, per SSL_CTX:
//! let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())?;
//! // (certificate and key set here)
//! share_sessions(&acceptor, Some("web"))?;
//! let acceptor = acceptor.build();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Lookups never fail a handshake: a miss, a timeout, a dead master or a garbled reply is a
//! full handshake. Session bytes hold the master secret; they are wiped wherever this library
//! lets go of them and never written to disk or logged.

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

/// Run `$body`; a panic becomes `$default` instead of unwinding into C or OpenSSL.
macro_rules! ffi_boundary {
    ($default:expr, $body:block) => {
        match ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| $body)) {
            Ok(v) => v,
            Err(_) => $default,
        }
    };
}

pub mod cache;
mod callbacks;
pub mod capi;
mod channel;
mod config;
mod error;
mod fork;
pub mod handler;
mod hot;
mod keyhash;
mod log;
mod master;
pub mod protocol;
mod remote;
mod ring;
mod stats;
pub mod tickets;
mod wipe;

use foreign_types::ForeignTypeRef;
use openssl::ssl::{SslContext, SslContextBuilder, SslContextRef};

pub use callbacks::{ShareOptions, TicketMode};
pub use channel::CHANNEL_FD_ENV;
pub use config::Config;
pub use error::Error;
pub use remote::RemoteUrl;
pub use stats::{MasterStats, Stats, WorkerStats, ROLE_MASTER, ROLE_NONE, ROLE_WORKER};

/// Start the shared cache in this process (the master) and arrange that every later `fork()`
/// gives the child its own channel to it.
///
/// Call once, before forking workers. Calling again in the master is a no-op (the first
/// configuration stays). Called in a worker it returns [`Error::InWorker`].
pub fn master_setup(config: Config) -> Result<(), Error> {
    master::setup(config)
}

/// Anything that wraps an `SSL_CTX`: the openssl crate's builder, context and context ref.
pub trait AsSslContext {
    /// The raw context pointer; not owned by the caller.
    fn as_ssl_ctx_ptr(&self) -> *mut openssl_sys::SSL_CTX;
}

impl AsSslContext for SslContextRef {
    fn as_ssl_ctx_ptr(&self) -> *mut openssl_sys::SSL_CTX {
        self.as_ptr()
    }
}

impl AsSslContext for SslContext {
    fn as_ssl_ctx_ptr(&self) -> *mut openssl_sys::SSL_CTX {
        (**self).as_ptr()
    }
}

impl AsSslContext for SslContextBuilder {
    fn as_ssl_ctx_ptr(&self) -> *mut openssl_sys::SSL_CTX {
        self.as_ptr()
    }
}

impl AsSslContext for openssl::ssl::SslAcceptorBuilder {
    fn as_ssl_ctx_ptr(&self) -> *mut openssl_sys::SSL_CTX {
        (**self).as_ptr()
    }
}

/// Make `ctx` store its sessions in, and resume them from, the shared cache under
/// `namespace` (`None` = the default namespace, at most 64 bytes otherwise).
///
/// Call in a worker (or in the master for a server without workers), before the context
/// serves handshakes. It installs the session callbacks, turns OpenSSL's per-process cache
/// off and sets a session id context derived from the namespace (see [`share_sessions_with`]
/// to keep your own). Without a master it returns [`Error::NoMaster`] and leaves `ctx` as it
/// was.
pub fn share_sessions<C: AsSslContext + ?Sized>(ctx: &C, namespace: Option<&str>) -> Result<(), Error> {
    share_sessions_with(ctx, namespace, ShareOptions::default())
}

/// [`share_sessions`] with options.
pub fn share_sessions_with<C: AsSslContext + ?Sized>(
    ctx: &C,
    namespace: Option<&str>,
    options: ShareOptions,
) -> Result<(), Error> {
    let ns = namespace.unwrap_or("").as_bytes();
    // SAFETY: the pointer comes from a live openssl-crate wrapper borrowed for this call.
    unsafe { callbacks::install(ctx.as_ssl_ctx_ptr(), ns, options) }
}

/// Which ticket keys `ctx` uses after [`share_sessions`]: the cluster-wide ones (the
/// default: OpenSSL 3.0 cannot report whether the host set keys of its own, so the library
/// takes over), the host's own ([`ShareOptions::keep_ticket_keys`]), none shared because
/// ticket sharing is off, or none issued (`SSL_OP_NO_TICKET`). Log it at start-up to see
/// which happened.
pub fn ticket_mode<C: AsSslContext + ?Sized>(ctx: &C) -> TicketMode {
    // SAFETY: the pointer comes from a live openssl-crate wrapper borrowed for this call.
    unsafe { callbacks::ticket_mode(ctx.as_ssl_ctx_ptr()) }
}

/// Counters of this process and, when reachable, of the master.
///
/// In a worker this asks the master (waiting at most the lookup deadline); `master_valid`
/// says whether it answered.
pub fn stats() -> Stats {
    let worker = stats::WORKER.snapshot();
    let role = callbacks::role();
    let master = match role {
        ROLE_MASTER => master::get().map(|m| m.stats()),
        ROLE_WORKER => channel::current().ok().and_then(|c| c.master_stats()),
        _ => None,
    };
    Stats { role, master_valid: u32::from(master.is_some()), master: master.unwrap_or_default(), worker }
}

/// This worker's channel descriptor, for servers whose workers `exec` a new program: clear
/// its close-on-exec flag and pass its number in the environment variable
/// [`CHANNEL_FD_ENV`]. `None` when this process has no channel of its own.
pub fn channel_fd() -> Option<std::os::fd::RawFd> {
    match fork::channel_fd() {
        fork::ChannelFd::Owned(fd) => Some(fd),
        _ => None,
    }
}

/// Entry points for the benchmarks under `benches/` and `bench/`: the channel's own GET, PUT
/// and DEL without OpenSSL around them. Not part of the supported API.
#[doc(hidden)]
pub mod bench {
    use crate::{channel, fork, master};

    /// Keeps the master's cache thread from handling anything while it lives: the thread
    /// finishes what it is doing, and after its next wake-up waits for the guard to drop. For
    /// tests that need several frames queued before the thread reads any. Do not fork while
    /// holding it (the fork handlers take the same gate). Not `Send`: the thread that locked
    /// the gate must be the one that unlocks it.
    pub struct CacheThreadHold(std::marker::PhantomData<*const ()>);

    impl Drop for CacheThreadHold {
        fn drop(&mut self) {
            fork::gate_unlock();
        }
    }

    /// Empty the master's cache and give back the memory it grew to (its counters kept), so
    /// that each repetition of a benchmark starts from the same state. False outside the
    /// master.
    pub fn reset_master_cache() -> bool {
        match master::get() {
            Some(m) => {
                m.cache().clear();
                true
            }
            None => false,
        }
    }

    /// Hold the cache thread (see `CacheThreadHold`). In the master only.
    pub fn hold_cache_thread() -> CacheThreadHold {
        fork::gate_lock();
        CacheThreadHold(std::marker::PhantomData)
    }

    /// Store `der` under (`namespace`, `id`) from a worker, expiring at unix time `expiry`.
    /// In the master it stores directly. Returns false when there is no channel.
    pub fn put(namespace: &[u8], id: &[u8], der: &[u8], expiry: u64) -> bool {
        if let Some(m) = master::get() {
            m.put(namespace, id, der, expiry);
            return true;
        }
        let Ok(ch) = channel::current() else { return false };
        ch.put(
            namespace,
            id,
            expiry,
            der.len(),
            |out| {
                out.extend_from_slice(der);
                true
            },
            None,
        );
        true
    }

    /// Look up (`namespace`, `id`) the way the get-session callback does; the DER's length
    /// on a hit.
    pub fn get(namespace: &[u8], id: &[u8]) -> Option<usize> {
        if let Some(m) = master::get() {
            return m.cache().get(namespace, id, master::now_secs()).map(|d| d.len());
        }
        channel::current().ok()?.get(namespace, id).map(|d| d.len())
    }

    /// Look up (`namespace`, `id`) in the master with a round trip, bypassing this worker's
    /// replica: the channel's request/reply path alone.
    pub fn get_from_master(namespace: &[u8], id: &[u8]) -> Option<usize> {
        if master::get().is_some() {
            return get(namespace, id);
        }
        channel::current().ok()?.get_from_master(namespace, id).map(|d| d.len())
    }

    /// How many slots of the session ring hold any byte of a session (`None` without a
    /// ring): for tests that the ring is wiped.
    pub fn ring_slots_holding_data() -> Option<u64> {
        crate::ring::get().map(|r| r.slots_holding_data())
    }

    /// Remove (`namespace`, `id`) cluster-wide.
    pub fn del(namespace: &[u8], id: &[u8]) {
        if let Some(m) = master::get() {
            m.remove(namespace, id);
        } else if let Ok(ch) = channel::current() {
            ch.del(namespace, id);
        }
    }
}
