//! The worker's side of the channel to the master.
//!
//! - PUT and DEL are fire-and-forget: sent non-blocking with `MSG_NOSIGNAL`; a full socket
//!   buffer drops the message (counted), a dead master is noticed and remembered.
//! - GET and STATS carry a request id and wait for the matching reply until a deadline.
//!   Several threads may wait at once: whichever thread is the "reader" at the moment polls
//!   the socket and files every reply under its request id; the others sleep on a condition
//!   variable. A reply whose request already gave up finds no slot and is dropped.
//! - A timeout opens a breaker: lookups are skipped (instant miss) for a back-off that
//!   doubles up to `breaker_max_backoff`; then one probe is let through, and its answer closes
//!   the breaker again. A stalled master costs about one timeout, not one per handshake.

use std::cell::RefCell;
use std::os::fd::RawFd;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::cache::{Cache, PutOutcome};
use crate::config::Config;
use crate::fork::{self, ChannelFd};
use crate::hot::Hot;
use crate::protocol::{self, Op, MAX_FRAME_LEN};
use crate::stats::{bump, MasterStats, WORKER};
use crate::wipe::{wipe, SecretBuf};
use crate::Error;
use openssl::ssl::{SslSession, SslSessionRef};

/// Environment variable naming an inherited channel descriptor (`FD`, or `FD:PID` to bind it to
/// the process that adopts it), for workers that `exec`.
pub const CHANNEL_FD_ENV: &str = "CTS_CHANNEL_FD";

static GET_TIMEOUT_US: AtomicU64 = AtomicU64::new(10_000);
static BACKOFF_MAX_MS: AtomicU64 = AtomicU64::new(500);
static MAX_SESSION: AtomicU64 = AtomicU64::new(16 << 10);
static SHARE_TICKETS: AtomicBool = AtomicBool::new(true);
static REPLICA_BYTES: AtomicU64 = AtomicU64::new(4 << 20);
static MAX_LIFETIME_SECS: AtomicU64 = AtomicU64::new(24 * 3600);

/// The latest expiry a session may have at `now`: `max_lifetime` from then.
fn lifetime_cap(now: u64) -> u64 {
    now.saturating_add(MAX_LIFETIME_SECS.load(Relaxed))
}

/// Whether shared contexts get the cluster-wide ticket keys.
pub(crate) fn share_tickets() -> bool {
    SHARE_TICKETS.load(Relaxed)
}

/// Publish the worker-side settings; set in the master before any fork, inherited by
/// every worker.
pub(crate) fn set_worker_config(cfg: &Config) {
    GET_TIMEOUT_US.store(cfg.get_timeout.as_micros() as u64, SeqCst);
    BACKOFF_MAX_MS.store(cfg.breaker_max_backoff.as_millis().max(1) as u64, SeqCst);
    MAX_SESSION.store(cfg.max_session_bytes as u64, SeqCst);
    SHARE_TICKETS.store(cfg.share_tickets, SeqCst);
    REPLICA_BYTES.store(cfg.replica_bytes as u64, SeqCst);
    MAX_LIFETIME_SECS.store(cfg.max_lifetime.as_secs(), SeqCst);
}

/// Largest session DER a worker sends.
pub(crate) fn max_session_bytes() -> usize {
    MAX_SESSION.load(Relaxed) as usize
}

static CHANNEL: AtomicPtr<Channel> = AtomicPtr::new(ptr::null_mut());

/// Forget (leak) the channel object inherited from a parent worker. Called from the fork
/// child handler: an atomic store only.
pub(crate) fn forget_parent_channel() {
    CHANNEL.store(ptr::null_mut(), SeqCst);
}

/// This process's channel to the master, opened on first use.
pub fn current() -> Result<&'static Channel, Error> {
    current_as(fork::pid())
}

/// `current` for a caller that already knows its pid (`me` must be `fork::pid()`).
pub fn current_as(me: i32) -> Result<&'static Channel, Error> {
    let p = CHANNEL.load(SeqCst);
    // SAFETY: a non-null CHANNEL points to a leaked Box<Channel> that is never freed.
    if let Some(ch) = unsafe { p.as_ref() } {
        if ch.pid == me {
            return Ok(ch);
        }
    }
    let fd = match fork::channel_fd() {
        ChannelFd::Owned(fd) => fd,
        ChannelFd::Inherited => return Err(Error::NotChannelOwner),
        ChannelFd::None => adopt_from_env()?,
    };
    let fresh = Box::into_raw(Box::new(Channel::new(fd, me)));
    match CHANNEL.compare_exchange(p, fresh, SeqCst, SeqCst) {
        // SAFETY: `fresh` came from Box::into_raw above and is now published for good.
        Ok(_) => Ok(unsafe { &*fresh }),
        Err(winner) => {
            // SAFETY: `fresh` was never published; we still own it.
            drop(unsafe { Box::from_raw(fresh) });
            // SAFETY: as above, published channels are never freed.
            match unsafe { winner.as_ref() } {
                Some(ch) if ch.pid == me => Ok(ch),
                _ => Err(Error::NoMaster),
            }
        }
    }
}

/// A worker that was exec'd gets its channel as an inherited descriptor named by
/// `CTS_CHANNEL_FD`. The descriptor must be an AF_UNIX SOCK_SEQPACKET socket.
fn adopt_from_env() -> Result<RawFd, Error> {
    let Some(v) = std::env::var_os(CHANNEL_FD_ENV) else {
        return Err(Error::NoMaster);
    };
    // "FD", or "FD:PID": then only the process with that pid (the worker that exec'd: exec
    // keeps the pid) may adopt the descriptor, not a child the new program forks first.
    let v = v.to_str().map(str::trim).ok_or(Error::NoMaster)?;
    let (fd, owner) = match v.split_once(':') {
        Some((fd, pid)) => (fd, Some(pid.parse::<i32>().map_err(|_| Error::NoMaster)?)),
        None => (v, None),
    };
    let fd: RawFd = fd.parse().map_err(|_| Error::NoMaster)?;
    // SAFETY: getpid has no preconditions.
    if owner.is_some_and(|pid| pid != unsafe { libc::getpid() }) {
        return Err(Error::NotChannelOwner);
    }
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `ty`; an invalid fd fails with EBADF.
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE, (&mut ty as *mut libc::c_int).cast(), &mut len)
    };
    if rc != 0 || ty != libc::SOCK_SEQPACKET {
        return Err(Error::NoMaster);
    }
    // SAFETY: fcntl on a valid descriptor; flags are plain integers. (Blocking or not does
    // not matter: `Channel::new` sets the mode it needs.)
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    fork::adopt_channel_fd(fd);
    fork::install_handlers()?;
    adopt_env_config();
    Ok(fd)
}

/// An exec'd worker did not inherit the master's settings in memory: it reads them from the
/// environment when the host passes them (`CTS_GET_TIMEOUT_US`, `CTS_BREAKER_MAX_BACKOFF_MS`,
/// `CTS_SHARE_TICKETS`, `CTS_REPLICA_BYTES`, `CTS_MAX_SESSION_BYTES`), else keeps the
/// defaults, except the replica: without `CTS_REPLICA_BYTES` it stays off, because a master
/// with replicas off pushes no removals, and a replica that never hears of one must not exist.
fn adopt_env_config() {
    REPLICA_BYTES.store(0, SeqCst);
    let read = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(v) = read("CTS_GET_TIMEOUT_US").filter(|v| (100..=10_000_000).contains(v)) {
        GET_TIMEOUT_US.store(v, SeqCst);
    }
    if let Some(v) = read("CTS_BREAKER_MAX_BACKOFF_MS").filter(|v| (1..=60_000).contains(v)) {
        BACKOFF_MAX_MS.store(v, SeqCst);
    }
    if let Some(v) = read("CTS_SHARE_TICKETS") {
        SHARE_TICKETS.store(v != 0, SeqCst);
    }
    if let Some(v) = read("CTS_REPLICA_BYTES").filter(|v| *v == 0 || (64 << 10..=1 << 40).contains(v)) {
        REPLICA_BYTES.store(v, SeqCst);
    }
    if let Some(v) = read("CTS_MAX_SESSION_BYTES").filter(|v| (256..=protocol::MAX_PAYLOAD_LEN as u64).contains(v)) {
        MAX_SESSION.store(v, SeqCst);
    }
}

/// What a request got back.
pub enum Reply {
    /// The session DER (wiped when dropped); `file_reply` already put it into the replica.
    Hit(SecretBuf),
    /// Nothing stored under that key.
    Miss,
    /// The master's counters.
    Stats(MasterStats),
    /// The ticket keys in wire form (wiped when dropped).
    TicketKeys(SecretBuf),
}

struct Slot {
    id: u64,
    reply: Option<Reply>,
}

struct Waiters {
    reader: bool,
    slots: Vec<Slot>,
    /// Threads asleep on `cond` now. Wake-ups are sent only when there is one: with the
    /// std futex condvar every `notify_all` is a system call, which a single-threaded
    /// worker would otherwise pay on every round trip.
    sleepers: u32,
}

/// One process's channel to the master. Lives for the rest of the process (leaked).
pub struct Channel {
    fd: RawFd,
    pid: i32,
    next_id: AtomicU64,
    waiters: Mutex<Waiters>,
    cond: Condvar,
    /// Monotonic ms until which lookups are skipped; 0 = breaker closed.
    open_until_ms: AtomicU64,
    backoff_ms: AtomicU64,
    dead: AtomicBool,
    /// The receive timeout set on the socket (`SO_RCVTIMEO`, the GET timeout) once it was made
    /// blocking; `None` if either failed. With it, the reader waits for a reply in one
    /// blocking `recv` instead of a `ppoll` and a `recv` (see `read_replies`).
    recv_timeout: Option<Duration>,
    /// Recent sessions of the whole cluster, pushed by the master (`Op::Sync`), plus this
    /// process's own stores and the master's hits; `None` when replicas are off.
    replica: Option<Mutex<Replica>>,
    /// The master's push count (`ring::Ring::pushes`) when this process last read its socket
    /// empty, and when that was (monotonic ms): see `drain_now`.
    pushes_seen: AtomicU64,
    drained_ms: AtomicU64,
    /// `DRAIN_EVERY_MS` (a field so that a test can stretch it).
    drain_every_ms: u64,
    /// Whether the master was this process's parent when the channel was made: then a
    /// parent other than the master later means the master exited (see `mark_dead`).
    parent_was_master: bool,
    /// When (monotonic ms) a worker whose master is gone last asked whether it has exited
    /// (`while_dead`).
    exit_checked_ms: AtomicU64,
    /// Set once this process wiped the session ring after the master exited.
    ring_wiped: AtomicBool,
}

/// How long a worker with the session ring goes at most without reading its socket while the
/// master pushes nothing (`drain_now`): what comes unannounced (the master's EOF when it
/// dies, a reply that came after its deadline) is read within this.
const DRAIN_EVERY_MS: u64 = 100;

/// Decoded sessions kept per MiB of replica budget (one per 4 KiB, at most 4096): at about
/// 1.3 KiB each (OpenSSL's `SSL_SESSION` and its allocations), a third of the budget again.
fn hot_capacity(replica_bytes: usize) -> usize {
    (replica_bytes / 4096).clamp(64, 4096)
}

/// A worker's replica: the DER of recent sessions, and decoded copies of those that were hit
/// or that this worker stored itself (see `hot`). Every change goes through here, so a
/// decoded copy never outlives the DER it came from.
struct Replica {
    cache: Cache,
    hot: Hot,
    /// How far this worker has read the session ring (`None`: no ring in this process).
    ring: Option<crate::ring::Cursor>,
    /// Removals the records still unread must not undo (see `ring::Tombstones`).
    tombs: crate::ring::Tombstones,
    /// The second of the last sweep (`sweep_if_due`).
    swept_at: u64,
}

impl Replica {
    /// Once a second, at a lookup: drop the expired sessions (an expired session is never
    /// served, but its DER, the master secret, would stay in this worker's memory until
    /// evicted or looked up again) and their decoded copies. Costs a heap peek when none
    /// expired.
    fn sweep_if_due(&mut self, now: u64) {
        if now == self.swept_at {
            return;
        }
        self.swept_at = now;
        if self.cache.sweep(now) > 0 {
            let cache = &self.cache;
            self.hot.retain(|ns, id| cache.contains(ns, id, now));
        }
    }

    fn put(&mut self, namespace: &[u8], id: &[u8], der: &[u8], expiry: u64, now: u64) -> PutOutcome {
        self.hot.remove(namespace, id);
        self.cache.put(namespace, id, der, expiry, now)
    }

    fn remove(&mut self, namespace: &[u8], id: &[u8]) {
        self.hot.remove(namespace, id);
        self.cache.remove(namespace, id);
    }

    /// Drop everything, and skip what the session ring holds now: the removal of any of it
    /// may be among the pushes that were lost (a removal pushed after this is not).
    fn clear(&mut self) {
        self.hot.clear();
        self.cache.clear();
        if let (Some(ring), Some(cur)) = (crate::ring::get(), self.ring.as_mut()) {
            cur.next = cur.next.max(ring.head());
        }
        self.tombs.clear();
    }
}

/// What `Channel::get_session` found.
pub enum Found {
    /// A decoded session (from the replica's decoded copies, or decoded just now).
    Session(SslSession),
    /// The DER did not decode: a miss.
    Undecodable,
}

thread_local! {
    static SEND_BUF: RefCell<SecretBuf> = RefCell::new(SecretBuf::with_capacity(1024));
    static RECV_BUF: RefCell<SecretBuf> = RefCell::new(SecretBuf::default());
}

/// How far past its deadline a request's blocking wait for a reply may end at most (see
/// `read_replies`).
const BLOCK_SLACK: Duration = Duration::from_micros(200);

/// Make the worker's end blocking, with `timeout` as its receive timeout. Every other
/// operation on it passes `MSG_DONTWAIT`, so only the reader's wait for a reply blocks.
/// `None` (the descriptor then keeps its mode, which nothing relies on) if the kernel
/// refuses either.
fn blocking_with_timeout(fd: RawFd, timeout: Duration) -> Option<Duration> {
    if timeout.is_zero() {
        return None;
    }
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` is a valid timeval of the given size; fcntl on our own descriptor.
    unsafe {
        let len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
        if libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), len) != 0 {
            return None;
        }
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK) != 0 {
            return None;
        }
    }
    Some(timeout)
}

/// Monotonic time in nanoseconds (`clock_gettime` itself: `Instant`'s checked arithmetic cost
/// a request more than the clock, callgrind).
fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Monotonic milliseconds for what is counted in them (the breaker's backoff, the drain
/// interval): the coarse clock, the time of the last timer tick (one to a few ms behind).
/// Every lookup the replica answers reads it once; it costs 5 ns here against 19 ns for
/// `CLOCK_MONOTONIC`, a tenth of such a lookup.
fn mono_ms() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE) / 1_000_000
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64)
}

/// The lookup deadline, `get_timeout`, in nanoseconds: how long a request waits for its
/// reply, and a removal for room on the socket.
fn get_timeout_ns() -> u64 {
    GET_TIMEOUT_US.load(Relaxed).saturating_mul(1000)
}

/// The reader's role (`Waiters::reader`), taken by the thread that reads the socket for
/// all. Dropping it gives the role back and wakes the sleepers, also when a panic unwinds
/// through the read, so the channel never stays with a reader that is gone.
struct ReaderRole<'a>(&'a Channel);

impl Drop for ReaderRole<'_> {
    fn drop(&mut self) {
        let mut w = self.0.lock();
        w.reader = false;
        // Only a thread asleep on `cond` (for its reply, or to become the reader) needs the
        // wake-up; without one, skip it (a futex system call per lookup).
        let waiting = w.sleepers > 0;
        drop(w);
        if waiting {
            self.0.cond.notify_all();
        }
    }
}

impl Channel {
    fn new(fd: RawFd, pid: i32) -> Channel {
        let recv_timeout = blocking_with_timeout(fd, Duration::from_micros(GET_TIMEOUT_US.load(SeqCst)));
        Channel {
            recv_timeout,
            fd,
            pid,
            next_id: AtomicU64::new(0),
            waiters: Mutex::new(Waiters { reader: false, slots: Vec::new(), sleepers: 0 }),
            cond: Condvar::new(),
            open_until_ms: AtomicU64::new(0),
            backoff_ms: AtomicU64::new(0),
            dead: AtomicBool::new(false),
            pushes_seen: AtomicU64::new(0),
            drained_ms: AtomicU64::new(0),
            drain_every_ms: DRAIN_EVERY_MS,
            // SAFETY: getppid has no preconditions.
            parent_was_master: fork::master_pid() > 1 && unsafe { libc::getppid() } == fork::master_pid(),
            exit_checked_ms: AtomicU64::new(0),
            ring_wiped: AtomicBool::new(false),
            replica: match REPLICA_BYTES.load(SeqCst) as usize {
                0 => None,
                bytes => Some(Mutex::new(Replica {
                    cache: Cache::new(bytes, MAX_SESSION.load(SeqCst) as usize),
                    hot: Hot::new(hot_capacity(bytes)),
                    // From the head on: what was written before this channel existed may
                    // have been removed since, and this worker would never hear of it.
                    ring: crate::ring::get().map(|r| r.cursor_at_head()),
                    tombs: crate::ring::Tombstones::default(),
                    swept_at: 0,
                })),
            },
        }
    }

    /// True once the master closed the channel.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn replica(&self) -> Option<MutexGuard<'_, Replica>> {
        self.replica.as_ref().map(|r| r.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Store in the replica, with the lifetime cap the master applies, and keep `decoded`
    /// (the session the DER was made from) as its decoded copy.
    fn replica_put(
        &self,
        namespace: &[u8],
        id: &[u8],
        der: &[u8],
        expiry: u64,
        now: u64,
        decoded: Option<&SslSessionRef>,
    ) {
        if let Some(mut r) = self.replica() {
            let outcome = r.put(namespace, id, der, expiry.min(lifetime_cap(now)), now);
            // Only beside an entry the replica took (not one refused as expired or too big).
            let taken = matches!(outcome, PutOutcome::Stored | PutOutcome::Replaced);
            if let Some(s) = decoded.filter(|_| taken) {
                let r = &mut *r;
                let cache = &r.cache;
                r.hot.insert(namespace, id, s, |ns, id| cache.contains(ns, id, now));
            }
        }
    }

    /// The master closed the channel (it exited, or it gave up on this worker): from now on
    /// lookups are misses, and stores and removals are skipped. The replica is emptied at the
    /// next lookup (`replica_for_lookup`), which no longer reads the session ring: no removal
    /// can reach it any more. If the master exited, nobody wipes the ring any more either, so
    /// this process wipes it whole (other workers that have not noticed yet wipe it again
    /// when they do: every store and lookup reads the socket at least every `DRAIN_EVERY_MS`).
    fn mark_dead(&self) {
        if !self.dead.swap(true, SeqCst) {
            WORKER.master_gone.store(1, Relaxed);
            crate::log::debug!("the master closed the channel: lookups are misses from now on");
            self.wipe_ring_if_master_exited();
        }
        self.cond.notify_all();
    }

    /// A lookup's or a store's part once the master is gone, with no system call but a
    /// `kill(2)` at most every `DRAIN_EVERY_MS` until the ring is wiped: the replica serves
    /// nothing (no removal reaches it any more), so it is emptied whenever it holds anything
    /// (a thread past its own check when the master died may have added to it).
    fn while_dead(&self) {
        let now = mono_ms();
        if now.wrapping_sub(self.exit_checked_ms.load(Relaxed)) >= DRAIN_EVERY_MS {
            self.exit_checked_ms.store(now, Relaxed);
            self.wipe_ring_if_master_exited();
        }
        if let Some(mut r) = self.replica() {
            if !r.cache.is_empty() || !r.hot.is_empty() {
                r.clear();
            }
        }
    }

    /// Once the master has exited, wipe the session ring (once). Tried when the channel dies
    /// and again after (`while_dead`): the EOF comes as the master's descriptors close, a
    /// moment before its pid goes and its children are given another parent.
    fn wipe_ring_if_master_exited(&self) {
        if self.ring_wiped.load(Relaxed) {
            return;
        }
        if let Some(ring) = crate::ring::get().filter(|_| self.master_exited()) {
            if !self.ring_wiped.swap(true, SeqCst) {
                ring.wipe_range(0, ring.head());
            }
        }
    }

    /// Whether the master process is gone (not merely this channel): its pid no longer
    /// exists, or this process, once its child, has been given another parent.
    fn master_exited(&self) -> bool {
        let m = fork::master_pid();
        if m <= 1 || m == self.pid {
            return false;
        }
        // SAFETY: getppid has no preconditions; kill with signal 0 only checks the pid.
        unsafe {
            (self.parent_was_master && libc::getppid() != m)
                || (libc::kill(m, 0) == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH))
        }
    }

    /// Send one frame without blocking. The frame is built by `build` in a thread-local
    /// buffer that is wiped afterwards. Returns false if it was not sent.
    fn send_frame(&self, build: impl FnOnce(&mut Vec<u8>) -> bool) -> bool {
        self.send_frame_within(None, false, build)
    }

    /// `send_frame`, but a full socket is waited on (for room, up to `deadline_ns`, a
    /// `mono_ns` time) instead of costing the message: for a removal, whose loss would let a
    /// dead session resume.
    ///
    /// With `ring`, the frame (a PUT) goes into the session ring instead when it fits there.
    fn send_frame_within(
        &self,
        deadline_ns: Option<u64>,
        ring: bool,
        build: impl FnOnce(&mut Vec<u8>) -> bool,
    ) -> bool {
        let send = |buf: &mut SecretBuf| -> bool {
            buf.clear();
            if !build(buf.vec()) {
                buf.clear();
                return false;
            }
            if ring && self.publish(buf) {
                buf.clear();
                return true;
            }
            let (rc, err) = loop {
                // SAFETY: `buf` is valid for its length; non-blocking, and MSG_NOSIGNAL keeps
                // a dead master from raising SIGPIPE in the host.
                let rc = unsafe {
                    libc::send(self.fd, buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                };
                if rc >= 0 {
                    break (rc, None);
                }
                // Only a full socket reads the clock: a send that went through needs no time.
                let err = std::io::Error::last_os_error().raw_os_error();
                let left = Duration::from_nanos(deadline_ns.map_or(0, |d| d.saturating_sub(mono_ns())));
                if err != Some(libc::EAGAIN) || left.is_zero() {
                    break (rc, err);
                }
                let mut pfd = libc::pollfd { fd: self.fd, events: libc::POLLOUT, revents: 0 };
                let ts = libc::timespec {
                    tv_sec: left.as_secs() as libc::time_t,
                    tv_nsec: left.subsec_nanos() as libc::c_long,
                };
                // SAFETY: one valid pollfd, a valid timespec, no signal mask change.
                unsafe { libc::ppoll(&mut pfd, 1, &ts, ptr::null()) };
            };
            buf.clear();
            if rc >= 0 {
                return true;
            }
            match err {
                // Only a vanished peer ends the channel; anything else (a full buffer, a frame
                // too large for a small SO_SNDBUF) costs this one message.
                Some(libc::EPIPE) | Some(libc::ECONNRESET) | Some(libc::ENOTCONN) | Some(libc::EBADF) => {
                    self.mark_dead()
                }
                _ => bump(&WORKER.send_drops),
            }
            false
        };
        // The thread-local buffer saves an allocation per message; a re-entrant call or a
        // thread being torn down falls back to a fresh buffer.
        let mut send = Some(send);
        let mut result = None;
        let _ = SEND_BUF.try_with(|cell| {
            // The closure is taken only once the buffer is ours: a busy buffer leaves it for
            // the fallback below.
            if let Ok(mut b) = cell.try_borrow_mut() {
                if let Some(f) = send.take() {
                    result = Some(f(&mut b));
                }
            }
        });
        match (result, send) {
            (Some(r), _) => r,
            (None, Some(f)) => f(&mut SecretBuf::with_capacity(512)),
            (None, None) => false,
        }
    }

    /// Put a PUT frame into the session ring (see `ring`); false if it must go over the
    /// channel. A writer that finds a quarter of the ring unread by the master nudges it.
    fn publish(&self, frame: &[u8]) -> bool {
        let Some(ring) = crate::ring::get() else { return false };
        match ring.publish(self.pid, frame) {
            crate::ring::Published::Yes { nudge } => {
                if nudge {
                    // Sent directly: this runs inside `send_frame_within`, which holds the
                    // thread's send buffer. The frame is made once (with the remote tier on,
                    // every store nudges: no allocation per handshake).
                    static NUDGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
                    let f = NUDGE.get_or_init(|| {
                        let mut f = Vec::with_capacity(protocol::HEADER_LEN);
                        protocol::encode(&mut f, Op::Nudge, 0, 0, b"", b"", &[]);
                        f
                    });
                    // SAFETY: `f` is valid for its length; non-blocking, no SIGPIPE. A lost
                    // nudge is made up for by the master's next wake-up (at most a second).
                    unsafe { libc::send(self.fd, f.as_ptr().cast(), f.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
                }
                bump(&WORKER.ring_puts);
                true
            }
            crate::ring::Published::No => false,
        }
    }

    /// Fire-and-forget PUT: `der` fills the payload after the header. `decoded`, the session
    /// the DER encodes, is kept beside this process's replica: a client that comes back to
    /// this worker resumes with no `d2i` at all, as from OpenSSL's own cache.
    pub fn put(
        &self,
        namespace: &[u8],
        id: &[u8],
        expiry: u64,
        der_len: usize,
        der: impl FnOnce(&mut Vec<u8>) -> bool,
        decoded: Option<&SslSessionRef>,
    ) {
        // With the ring, a store needs no system call, so it would never see the master's
        // EOF: read the socket as a lookup does (at least every `DRAIN_EVERY_MS`), or a
        // worker that only makes new sessions would feed the ring after the master died.
        // Without the ring the store's own send finds a dead master.
        if !self.master_alive(crate::ring::get().is_some()) {
            return;
        }
        // Capped now, where the session is made: a worker reading the record from the ring
        // later caps by its own clock, and would stretch the session's life by the delay.
        let now = crate::master::now_secs();
        let expiry = expiry.min(lifetime_cap(now));
        let sent = self.send_frame_within(None, true, |out| {
            out.reserve(protocol::frame_len(namespace, id, der_len));
            protocol::encode_header(out, Op::Put, 0, expiry, namespace, id);
            let start = out.len();
            if !der(out) {
                return false;
            }
            // Our own sessions go to our replica too: a client that comes back to this worker
            // resumes without a round trip.
            self.replica_put(namespace, id, &out[start..], expiry, now, decoded);
            true
        });
        if sent {
            bump(&WORKER.puts);
        }
    }

    /// DEL without a reply. Unlike a PUT (a lost store is a later miss), a lost removal
    /// would leave a session the host invalidated resumable, so a full socket is waited on
    /// for room, at most the lookup deadline (`get_timeout`), before it is given up and
    /// counted in `send_drops`.
    pub fn del(&self, namespace: &[u8], id: &[u8]) {
        if let Some(mut r) = self.replica() {
            r.remove(namespace, id);
        }
        if self.is_dead() {
            return;
        }
        if self.send_frame_within(Some(mono_ns().saturating_add(get_timeout_ns())), false, |out| {
            protocol::encode(out, Op::Del, 0, 0, namespace, id, &[]);
            true
        }) {
            bump(&WORKER.dels);
        }
    }

    /// Look up a session's DER; `None` on a miss, a timeout, a skipped lookup or a dead
    /// master. (The callback uses `get_session`, which also keeps decoded copies.)
    pub fn get(&self, namespace: &[u8], id: &[u8]) -> Option<SecretBuf> {
        if let Some((mut r, now)) = self.replica_for_lookup() {
            if let Some(der) = r.cache.get(namespace, id, now) {
                bump(&WORKER.replica_hits);
                return Some(SecretBuf::from_slice(der));
            }
        }
        self.get_from_master(namespace, id)
    }

    /// Look up a session and decode it with `decode`, which also says whether the session is
    /// worth keeping decoded. A replica hit is served from its decoded copy when there is one
    /// (no decoding at all), else decoded under the replica's lock and, if worth it, the copy
    /// kept, so no change to that key can slip in between. A hit from the master is decoded
    /// here and not kept: its next hit comes from the replica.
    pub fn get_session(
        &self,
        namespace: &[u8],
        id: &[u8],
        decode: impl FnOnce(&[u8]) -> Option<(SslSession, bool)>,
    ) -> Option<Found> {
        if let Some((mut r, now)) = self.replica_for_lookup() {
            let r = &mut *r;
            if let Some(der) = r.cache.get(namespace, id, now) {
                bump(&WORKER.replica_hits);
                if let Some(s) = r.hot.get(namespace, id) {
                    bump(&WORKER.replica_decoded_hits);
                    return Some(Found::Session(s));
                }
                let Some((s, keep)) = decode(der) else { return Some(Found::Undecodable) };
                if keep {
                    let cache = &r.cache;
                    r.hot.insert(namespace, id, &s, |ns, id| cache.contains(ns, id, now));
                }
                return Some(Found::Session(s));
            }
        }
        let der = self.get_from_master(namespace, id)?;
        Some(decode(&der).map_or(Found::Undecodable, |(s, _)| Found::Session(s)))
    }

    /// Whether to go on with a store or lookup: reads what the master sent first when `read`
    /// (which is how a worker notices its EOF), then, once the master is known dead, does
    /// `while_dead` and says no.
    fn master_alive(&self, read: bool) -> bool {
        if read && !self.is_dead() {
            self.drain_now();
        }
        if self.is_dead() {
            self.while_dead();
            return false;
        }
        true
    }

    /// The start of every lookup (counted in `gets`): with replicas on, apply what the master
    /// pushed since the last look (one non-blocking recv when nothing is there) and hand back
    /// the locked replica with the time to look it up at; `None` when replicas are off.
    fn replica_for_lookup(&self) -> Option<(MutexGuard<'_, Replica>, u64)> {
        bump(&WORKER.gets);
        self.replica.as_ref()?;
        if !self.master_alive(true) {
            return None;
        }
        let mut r = self.replica()?;
        let now = crate::master::now_secs();
        self.read_ring(&mut r, 0, now);
        r.sweep_if_due(now);
        Some((r, now))
    }

    /// Apply to the replica the sessions other workers put into the ring since the last
    /// read (a few loads when there are none). `settled`: see `ring::Ring::read`.
    fn read_ring(&self, r: &mut Replica, settled: u64, now: u64) {
        let (Some(ring), Some(cur)) = (crate::ring::get(), r.ring.as_mut()) else { return };
        let cap = lifetime_cap(now);
        let (cache, hot, tombs) = (&mut r.cache, &mut r.hot, &mut r.tombs);
        let n = ring.read(cur, settled, self.pid, |seq, rec| match protocol::decode(rec) {
            // Stored before a removal this replica has applied already: stays removed.
            Ok(m) if m.op == Op::Put && tombs.buries(m.namespace, m.id, seq) => {}
            Ok(m) if m.op == Op::Put => {
                hot.remove(m.namespace, m.id);
                cache.put(m.namespace, m.id, m.payload, m.expiry.min(cap), now);
            }
            _ => bump(&WORKER.decode_failures),
        });
        tombs.forget_read(cur.next);
        if n.records > 0 {
            WORKER.replica_updates.fetch_add(n.records, Relaxed);
        }
    }

    /// Look up a session in the master, bypassing the replica (which then keeps a hit).
    pub fn get_from_master(&self, namespace: &[u8], id: &[u8]) -> Option<SecretBuf> {
        match self.request(Op::Get, namespace, id)? {
            // `file_reply` already put the hit into the replica, in socket order.
            Reply::Hit(der) => Some(der),
            _ => {
                bump(&WORKER.misses);
                None
            }
        }
    }

    /// Ask the master for the ticket keys (wire form).
    pub fn ticket_keys(&self) -> Option<SecretBuf> {
        match self.request(Op::TicketKeys, b"", b"")? {
            Reply::TicketKeys(k) => Some(k),
            _ => None,
        }
    }

    /// Ask the master for its counters.
    pub fn master_stats(&self) -> Option<MasterStats> {
        match self.request(Op::Stats, b"", b"")? {
            Reply::Stats(s) => Some(s),
            _ => None,
        }
    }

    /// May a lookup go to the master now? `Some(true)` for the single probe of a half-open
    /// breaker, `Some(false)` while it is closed, `None` while it is open.
    fn admit(&self) -> Option<bool> {
        let until = self.open_until_ms.load(SeqCst);
        if until == 0 {
            return Some(false);
        }
        // The clock is read only with the breaker open (a closed one needs no time).
        let now = mono_ms();
        if now < until {
            return None;
        }
        // Half-open: exactly one caller probes; the others keep skipping until it answers
        // (closing the breaker) or times out (re-opening it for longer).
        let probe_end = now + GET_TIMEOUT_US.load(Relaxed) / 1000 + 1000;
        match self.open_until_ms.compare_exchange(until, probe_end, SeqCst, SeqCst) {
            Ok(_) => Some(true),
            Err(_) => None,
        }
    }

    fn trip(&self, now: u64, was_probe: bool) {
        let until = self.open_until_ms.load(SeqCst);
        if !was_probe && until != 0 && now < until {
            return; // Another thread already opened it.
        }
        let max = BACKOFF_MAX_MS.load(Relaxed).max(1);
        let prev = self.backoff_ms.load(SeqCst);
        let next = if prev == 0 { (max / 8).max(1) } else { (prev * 2).min(max) };
        self.backoff_ms.store(next, SeqCst);
        self.open_until_ms.store(now + next, SeqCst);
    }

    fn close_breaker(&self) {
        if self.open_until_ms.load(Relaxed) != 0 || self.backoff_ms.load(Relaxed) != 0 {
            self.open_until_ms.store(0, SeqCst);
            self.backoff_ms.store(0, SeqCst);
        }
    }

    fn request(&self, op: Op, namespace: &[u8], id: &[u8]) -> Option<Reply> {
        if self.is_dead() {
            return None;
        }
        let Some(was_probe) = self.admit() else {
            bump(&WORKER.breaker_skips);
            return None;
        };
        let rid = self.next_id.fetch_add(1, Relaxed).wrapping_add(1);
        self.lock().slots.push(Slot { id: rid, reply: None });
        let timeout_ns = get_timeout_ns();
        let deadline = mono_ns().saturating_add(timeout_ns);
        let sent = self.send_frame(|out| {
            protocol::encode(out, op, rid, 0, namespace, id, &[]);
            true
        });
        let mut w = self.lock();
        if !sent {
            w.slots.retain(|s| s.id != rid);
            drop(w);
            if was_probe {
                // A probe that could not even be sent (the master's socket is full) failed.
                self.trip(mono_ms(), true);
            }
            return None;
        }
        // The first pass reads no clock: the request was just sent, all of its time is left.
        // A later one reads it only when the reply is not there yet.
        let mut left_ns = timeout_ns;
        let mut waited = false;
        loop {
            if let Some(i) = w.slots.iter().position(|s| s.id == rid && s.reply.is_some()) {
                let reply = w.slots.swap_remove(i).reply;
                drop(w);
                self.close_breaker();
                return reply;
            }
            if waited {
                left_ns = deadline.saturating_sub(mono_ns());
            }
            waited = true;
            if left_ns == 0 || self.is_dead() {
                w.slots.retain(|s| s.id != rid);
                drop(w);
                if !self.is_dead() {
                    crate::log::debug!("request {rid}: no answer from the master by the deadline");
                    bump(&WORKER.timeouts);
                    self.trip(mono_ms(), was_probe);
                }
                return None;
            }
            if !w.reader {
                w.reader = true;
                drop(w);
                {
                    let _role = ReaderRole(self);
                    self.read_replies(Duration::from_nanos(left_ns));
                }
                w = self.lock();
            } else {
                w.sleepers += 1;
                let wait = Duration::from_nanos(left_ns);
                w = self.cond.wait_timeout(w, wait).map(|r| r.0).unwrap_or_else(|e| e.into_inner().0);
                w.sleepers -= 1;
            }
        }
    }

    /// Read whatever is waiting on the socket now, without blocking, unless another thread
    /// is the reader (it files everything it reads).
    ///
    /// With the session ring, the master counts every push it sends there (odd while one is
    /// being sent): when the count is even and where the last full read left it, and that
    /// read is recent (`DRAIN_EVERY_MS`), there is no push to read and the `recv` is
    /// skipped, so a lookup the replica answers makes no system call.
    fn drain_now(&self) {
        // An odd count (a push under way) is read for but never recorded as seen.
        let pushes = crate::ring::get().map(|r| r.pushes()).filter(|p| p % 2 == 0);
        let now = mono_ms();
        let recent = now.wrapping_sub(self.drained_ms.load(Relaxed)) < self.drain_every_ms;
        if recent && pushes.is_some_and(|p| p == self.pushes_seen.load(Relaxed)) {
            return;
        }
        {
            let mut w = self.lock();
            if w.reader {
                return;
            }
            w.reader = true;
        }
        let role = ReaderRole(self);
        // Every push counted in an even `pushes` was on the socket before the read began, so
        // a read that went on until the socket was empty read it. (Two threads may store their
        // counts out of order: the older one then only costs one more read.) A read that
        // stopped before (the channel died, or no receive buffer) records nothing, so the
        // next lookup reads again.
        if self.recv_available(false, false) {
            if let Some(p) = pushes {
                self.pushes_seen.store(p, Relaxed);
            }
            self.drained_ms.store(now, Relaxed);
        }
        drop(role);
    }

    /// Wait up to `wait` for the socket to be readable, then file every reply there is.
    fn read_replies(&self, wait: Duration) {
        // A request's first wait is about the whole timeout: one blocking recv then, which
        // returns with the first frame, or EAGAIN after `SO_RCVTIMEO`, at most `BLOCK_SLACK`
        // (or a tenth of the timeout, if less) past `wait`. Shorter waits (a push came
        // first) poll, to keep the deadline exact.
        if let Some(t) = self.recv_timeout {
            if wait + BLOCK_SLACK.min(t / 10) >= t {
                self.recv_available(true, true);
                return;
            }
        }
        let mut pfd = libc::pollfd { fd: self.fd, events: libc::POLLIN, revents: 0 };
        let ts =
            libc::timespec { tv_sec: wait.as_secs() as libc::time_t, tv_nsec: wait.subsec_nanos() as libc::c_long };
        // SAFETY: one valid pollfd, a valid timespec, no signal mask change.
        let n = unsafe { libc::ppoll(&mut pfd, 1, &ts, ptr::null()) };
        if n <= 0 {
            return;
        }
        // Stop at the first reply a caller waits for: its caller need not pay for one more
        // recv that finds the socket empty (pushes behind it are drained at the next lookup).
        self.recv_available(true, false);
    }

    /// Receive and file the frames waiting on the socket: all of them, or with
    /// `until_reply` up to the first one that answers a waiting request. With `block_first`
    /// the first `recv` waits (up to the socket's `SO_RCVTIMEO`). True when it read until the
    /// socket was empty.
    fn recv_available(&self, until_reply: bool, block_first: bool) -> bool {
        let drain = |buf: &mut SecretBuf| {
            let v = buf.vec();
            if v.len() < MAX_FRAME_LEN + 1 {
                v.resize(MAX_FRAME_LEN + 1, 0);
            }
            let mut flags = if block_first { libc::MSG_TRUNC } else { libc::MSG_DONTWAIT | libc::MSG_TRUNC };
            loop {
                // SAFETY: `v` is valid for `v.len()` bytes; MSG_TRUNC reports oversized frames.
                let n = unsafe { libc::recv(self.fd, v.as_mut_ptr().cast(), v.len(), flags) };
                if n == 0 {
                    self.mark_dead();
                    return false;
                }
                if n < 0 {
                    match std::io::Error::last_os_error().raw_os_error() {
                        Some(libc::EAGAIN) => return true,
                        // A non-blocking read goes on until the socket is empty; a blocking
                        // first wait that a signal cut short counts as a timeout, as before.
                        Some(libc::EINTR) if flags & libc::MSG_DONTWAIT != 0 => continue,
                        Some(libc::EINTR) => return false,
                        _ => {
                            self.mark_dead();
                            return false;
                        }
                    }
                }
                flags = libc::MSG_DONTWAIT | libc::MSG_TRUNC;
                let n = n as usize;
                let answered = n <= v.len() && self.file_reply(&v[..n]);
                wipe(&mut v[..n.min(MAX_FRAME_LEN + 1)]);
                if until_reply && answered {
                    return false;
                }
            }
        };
        RECV_BUF
            .try_with(|b| match b.try_borrow_mut() {
                Ok(mut b) => drain(&mut b),
                Err(_) => drain(&mut SecretBuf::default()),
            })
            .unwrap_or(false)
    }

    /// Apply the stores and removals other workers made to the replica.
    ///
    /// `ring_pos` is how far the master had read the ring when it sent them: the replica
    /// reads that far first, so a removal is never applied before the store it removes.
    fn apply_sync(&self, payload: &[u8], ring_pos: u64) {
        let Some(mut r) = self.replica() else { return };
        let r = &mut *r;
        let now = crate::master::now_secs();
        self.read_ring(r, ring_pos, now);
        let cap = lifetime_cap(now);
        for rec in protocol::sync_records(payload) {
            match rec {
                Ok(m) if m.op == Op::Put => {
                    r.put(m.namespace, m.id, m.payload, m.expiry.min(cap), now);
                }
                Ok(m) => {
                    r.remove(m.namespace, m.id);
                    // A DEL's expiry field is the ring's head when the master pushed it: a
                    // store of this session in the ring below that, still unread here, must
                    // not bring it back (see `ring::Tombstones`).
                    if let Some(cur) = &r.ring {
                        r.tombs.note(m.namespace, m.id, m.expiry, cur.next);
                    }
                }
                Err(_) => {
                    // A garbled push: what it might have removed is unknown, so trust nothing.
                    r.clear();
                    bump(&WORKER.decode_failures);
                    return;
                }
            }
            bump(&WORKER.replica_updates);
        }
    }

    fn file_reply(&self, frame: &[u8]) -> bool {
        let Ok(msg) = protocol::decode(frame) else {
            bump(&WORKER.decode_failures);
            return false;
        };
        let reply = match msg.op {
            Op::Sync => {
                self.apply_sync(msg.payload, msg.request_id);
                return false;
            }
            Op::Flush => {
                if let Some(mut r) = self.replica() {
                    r.clear();
                }
                bump(&WORKER.replica_flushes);
                return false;
            }
            Op::Hit => {
                // Into the replica here, in the order the socket delivers frames: a removal
                // the master pushed after this reply is applied after it, never before.
                self.replica_put(msg.namespace, msg.id, msg.payload, msg.expiry, crate::master::now_secs(), None);
                Reply::Hit(SecretBuf::from_slice(msg.payload))
            }
            Op::Miss => Reply::Miss,
            Op::TicketKeysReply => Reply::TicketKeys(SecretBuf::from_slice(msg.payload)),
            Op::StatsReply => match MasterStats::decode(msg.payload) {
                Some(s) => Reply::Stats(s),
                None => {
                    bump(&WORKER.decode_failures);
                    return false;
                }
            },
            _ => {
                bump(&WORKER.decode_failures);
                return false;
            }
        };
        let mut w = self.lock();
        match w.slots.iter_mut().find(|s| s.id == msg.request_id && s.reply.is_none()) {
            Some(slot) => {
                slot.reply = Some(reply);
                true
            }
            None => {
                bump(&WORKER.late_replies);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hot::tests::session;

    fn replica() -> Replica {
        Replica {
            cache: Cache::new(1 << 20, 16 << 10),
            hot: Hot::new(16),
            ring: None,
            tombs: crate::ring::Tombstones::default(),
            swept_at: 0,
        }
    }

    #[test]
    fn the_sweep_drops_expired_sessions_and_their_decoded_copies() {
        let mut r = replica();
        let now = 1_000_000;
        r.sweep_if_due(now);
        r.put(b"ns", b"short", b"secret der", now + 1, now);
        r.put(b"ns", b"long", b"secret der", now + 100, now);
        r.hot.insert(b"ns", b"short", &session(), |_, _| true);
        r.hot.insert(b"ns", b"long", &session(), |_, _| true);
        r.sweep_if_due(now);
        assert_eq!((r.cache.len(), r.hot.len()), (2, 2), "nothing expired yet");
        r.sweep_if_due(now + 1);
        assert_eq!((r.cache.len(), r.hot.len()), (1, 1), "the expired session went, with its decoded copy");
        assert!(r.hot.get(b"ns", b"long").is_some());
    }

    fn keep_decoded(r: &mut Replica, id: &[u8]) {
        let now = crate::master::now_secs();
        assert!(r.cache.get(b"ns", id, now).is_some());
        let cache = &r.cache;
        r.hot.insert(b"ns", id, &session(), |ns, id| cache.contains(ns, id, now));
        assert!(r.hot.get(b"ns", id).is_some());
    }

    #[test]
    fn every_replica_change_drops_the_decoded_copy() {
        let now = crate::master::now_secs();
        let mut r = replica();
        r.put(b"ns", &[1; 32], b"der one", now + 60, now);
        keep_decoded(&mut r, &[1; 32]);
        // A store of the same key (another DER) must not be answered by the old copy.
        r.put(b"ns", &[1; 32], b"der two", now + 60, now);
        assert!(r.hot.get(b"ns", &[1; 32]).is_none(), "store");
        keep_decoded(&mut r, &[1; 32]);
        r.remove(b"ns", &[1; 32]);
        assert!(r.hot.get(b"ns", &[1; 32]).is_none(), "remove");
        r.put(b"ns", &[2; 32], b"der", now + 60, now);
        keep_decoded(&mut r, &[2; 32]);
        r.clear();
        assert!(r.hot.get(b"ns", &[2; 32]).is_none(), "clear");
    }

    #[test]
    fn hot_capacity_follows_the_replica_budget() {
        assert_eq!(hot_capacity(64 << 10), 64);
        assert_eq!(hot_capacity(4 << 20), 1024);
        assert_eq!(hot_capacity(1 << 40), 4096);
    }

    /// A worker's channel (its master end returned) in a process that has the session ring.
    fn channel_with_ring() -> (Channel, std::os::fd::OwnedFd, &'static crate::ring::Ring) {
        use std::os::fd::FromRawFd;
        crate::ring::create(64, false).expect("ring");
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) }, 0);
        let ch = Channel::new(fds[0], fork::pid());
        assert!(ch.replica().is_some_and(|r| r.ring.is_some()));
        // SAFETY: `fds[1]` is ours alone.
        (ch, unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[1]) }, crate::ring::get().unwrap())
    }

    fn frame(op: Op, request_id: u64, id: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        protocol::encode(&mut f, op, request_id, 4_000_000_000, b"ns", id, payload);
        f
    }

    fn in_replica(ch: &Channel, id: &[u8]) -> bool {
        let (mut r, now) = ch.replica_for_lookup().unwrap();
        r.cache.get(b"ns", id, now).is_some()
    }

    #[test]
    fn after_the_master_closed_the_channel_the_replica_serves_nothing() {
        let (ch, master, ring) = channel_with_ring();
        ring.publish(-7, &frame(Op::Put, 0, b"before-death", b"der"));
        assert!(in_replica(&ch, b"before-death"));
        drop(master);
        // A store notices within DRAIN_EVERY_MS, as a lookup does.
        std::thread::sleep(Duration::from_millis(DRAIN_EVERY_MS + 20));
        ch.put(
            b"ns",
            b"own",
            4_000_000_000,
            3,
            |o| {
                o.extend_from_slice(b"der");
                true
            },
            None,
        );
        assert!(ch.is_dead());
        // Another worker that has not noticed yet still stores into the ring.
        ring.publish(-7, &frame(Op::Put, 0, b"after-death", b"der"));
        for id in [&b"before-death"[..], b"own", b"after-death"] {
            assert!(
                ch.get(b"ns", id).is_none(),
                "{}: a dead master's worker served from its replica",
                String::from_utf8_lossy(id)
            );
        }
        assert_eq!(ch.replica().unwrap().cache.len(), 0, "the replica was emptied");
    }

    #[test]
    fn ring_records_reach_the_replica_and_a_removal_pushed_later_wins() {
        let (ch, _master, ring) = channel_with_ring();
        // Another process's store, through the ring.
        assert!(matches!(ring.publish(-7, &frame(Op::Put, 0, b"r1", b"der")), crate::ring::Published::Yes { .. }));
        assert!(in_replica(&ch, b"r1"));
        // A store still unread in the ring, then the master's push removing it (sent once
        // it had read that far): the store is applied first, the removal last.
        ring.publish(-7, &frame(Op::Put, 0, b"r2", b"der"));
        let mut sync = Vec::new();
        assert!(protocol::push_sync_record(&mut sync, &frame(Op::Del, 0, b"r2", b"")));
        ch.file_reply(&frame(Op::Sync, ring.head(), b"", &sync));
        assert!(!in_replica(&ch, b"r2"));
        // This process's own records are not read back (its replica has them already, and
        // a removal of its own must not be undone by them).
        ring.publish(fork::pid(), &frame(Op::Put, 0, b"own", b"der"));
        assert!(!in_replica(&ch, b"own"));
    }

    /// A session stored in the ring behind a record another writer has not published yet,
    /// then removed (a fatal alert on its connection): the master pushes the removal with how
    /// far it could read, which stops short of the store. Once the stalled writer publishes,
    /// the store is read, and must not bring the session back.
    #[test]
    fn a_removal_is_not_undone_by_its_store_read_later_from_the_ring() {
        let (ch, _master, ring) = channel_with_ring();
        let _ = in_replica(&ch, b"x"); // reads up to the head
        let stalled = ring.claim_unpublished();
        ring.publish(-7, &frame(Op::Put, 0, b"gone", b"der"));
        assert!(!in_replica(&ch, b"gone"), "held behind the record being written");
        let mut del = Vec::new();
        protocol::encode(&mut del, Op::Del, 0, ring.head(), b"ns", b"gone", &[]);
        let mut sync = Vec::new();
        assert!(protocol::push_sync_record(&mut sync, &del));
        ch.file_reply(&frame(Op::Sync, stalled, b"", &sync));
        ring.publish_claimed(stalled, -8, &frame(Op::Put, 0, b"other", b"der"));
        assert!(in_replica(&ch, b"other"), "the ring is read past the stall");
        assert!(!in_replica(&ch, b"gone"), "the removed session came back from the ring");
        assert_eq!(ch.replica().unwrap().tombs.len(), 0, "the note goes once read past");
        // A store made after the removal is not buried.
        ring.publish(-7, &frame(Op::Put, 0, b"gone", b"der2"));
        assert!(in_replica(&ch, b"gone"));
    }

    /// A send made while this thread's send buffer is in use (a re-entrant call) goes out
    /// through a fresh buffer, not silently dropped.
    #[test]
    fn a_reentrant_send_is_not_dropped() {
        use std::os::fd::AsRawFd;
        let (ch, master, _ring) = channel_with_ring();
        let mut inner = false;
        let outer = ch.send_frame_within(None, false, |out| {
            inner = ch.send_frame_within(None, false, |o| {
                protocol::encode(o, Op::Del, 0, 0, b"ns", b"inner", &[]);
                true
            });
            protocol::encode(out, Op::Del, 0, 0, b"ns", b"outer", &[]);
            true
        });
        assert!(outer && inner, "outer {outer}, inner {inner}");
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        for _ in 0..2 {
            // SAFETY: reads into a valid buffer from our own socket.
            let n = unsafe { libc::recv(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            assert!(n > 0, "a frame is missing");
            got.push(protocol::decode(&buf[..n as usize]).expect("frame").id.to_vec());
        }
        assert_eq!(got, vec![b"inner".to_vec(), b"outer".to_vec()]);
    }

    /// A record read from the ring seconds after it was made (lookups read it lazily) must
    /// not live `max_lifetime` from that read: the writer caps it.
    #[test]
    fn a_stored_sessions_expiry_is_capped_where_it_is_made() {
        let (ch, _master, ring) = channel_with_ring();
        let mut cur = ring.cursor_at_head();
        let der = |out: &mut Vec<u8>| {
            out.extend_from_slice(b"der");
            true
        };
        ch.put(b"ns", b"long-lived", u64::MAX - 1, 3, der, None);
        let mut expiry = None;
        ring.read(&mut cur, 0, 0, |_, rec| {
            if let Ok(m) = protocol::decode(rec) {
                if m.id == b"long-lived" {
                    expiry = Some(m.expiry);
                }
            }
        });
        let cap = lifetime_cap(crate::master::now_secs());
        let e = expiry.expect("the store went through the ring");
        assert!(e <= cap && e + 60 >= cap, "expiry {e}, cap {cap}");
    }

    #[test]
    fn a_lookup_reads_the_socket_only_for_a_counted_push_or_after_a_while() {
        use std::os::fd::AsRawFd;
        let (mut ch, master, ring) = channel_with_ring();
        // Long enough that no pause of this machine's makes a read happen on the clock.
        ch.drain_every_ms = 3_600_000;
        let removal = |id: &[u8]| {
            let mut sync = Vec::new();
            assert!(protocol::push_sync_record(&mut sync, &frame(Op::Del, 0, id, b"")));
            frame(Op::Sync, ring.head(), b"", &sync)
        };
        let send = |f: &[u8]| {
            // SAFETY: a valid buffer on our own socket.
            assert_eq!(unsafe { libc::send(master.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) }, f.len() as isize);
        };
        ring.publish(-7, &frame(Op::Put, 0, b"d1", b"der"));
        assert!(in_replica(&ch, b"d1"));
        // The master's removal, on the socket but not counted: lookups do not read the socket
        // for it (no system call)...
        send(&removal(b"d1"));
        assert!(in_replica(&ch, b"d1"), "read without a counted push");
        // ...but they do while a push is being sent (the count is odd then), every time: a
        // frame that lands after one such read is read at the next.
        ring.counted_push(|| {
            assert!(!in_replica(&ch, b"d1"), "not read during a push");
            ring.publish(-7, &frame(Op::Put, 0, b"d4", b"der"));
            assert!(in_replica(&ch, b"d4"));
            send(&removal(b"d4"));
            assert!(!in_replica(&ch, b"d4"), "a frame sent while the count is odd was not read");
        });
        // ...and after one was sent, which is read at the next lookup.
        ring.publish(-7, &frame(Op::Put, 0, b"d2", b"der"));
        assert!(in_replica(&ch, b"d2"));
        ring.counted_push(|| send(&removal(b"d2")));
        assert!(!in_replica(&ch, b"d2"), "a counted push is read at the next lookup");
        // What comes unannounced is read once DRAIN_EVERY_MS went by since the last read.
        ring.publish(-7, &frame(Op::Put, 0, b"d3", b"der"));
        assert!(in_replica(&ch, b"d3"));
        send(&removal(b"d3"));
        assert!(in_replica(&ch, b"d3"), "read without a counted push");
        ch.drain_every_ms = DRAIN_EVERY_MS;
        std::thread::sleep(Duration::from_millis(DRAIN_EVERY_MS + 20));
        assert!(!in_replica(&ch, b"d3"), "read once DRAIN_EVERY_MS went by");
        // The master's EOF is noticed the same way.
        drop(master);
        std::thread::sleep(Duration::from_millis(DRAIN_EVERY_MS + 20));
        assert!(!ch.is_dead());
        assert!(ch.replica_for_lookup().is_none(), "no replica once the master is gone");
        assert!(ch.is_dead(), "EOF read once DRAIN_EVERY_MS went by");
    }

    #[test]
    fn a_session_this_process_stored_resumes_here_without_a_decode() {
        let (ch, _master, _ring) = channel_with_ring();
        let own = session();
        let id = [0x5a; 32];
        let der = b"own session's der";
        ch.put(
            b"ns",
            &id,
            4_000_000_000,
            der.len(),
            |out| {
                out.extend_from_slice(der);
                true
            },
            Some(&own),
        );
        let found = ch.get_session(b"ns", &id, |_| panic!("a session kept decoded was decoded again"));
        let Some(Found::Session(s)) = found else { panic!("no hit") };
        use foreign_types::ForeignType;
        assert_eq!(s.as_ptr(), own.as_ptr(), "the very session stored, by reference");
        // Once removed (here, or pushed by the master), the copy goes with the DER.
        ch.del(b"ns", &id);
        assert!(ch.replica().unwrap().hot.get(b"ns", &id).is_none());
        // A session the replica refuses (expired on arrival) is not kept decoded either.
        let late = [0x5b; 32];
        ch.put(
            b"ns",
            &late,
            1,
            der.len(),
            |out| {
                out.extend_from_slice(der);
                true
            },
            Some(&own),
        );
        assert!(ch.replica().unwrap().hot.get(b"ns", &late).is_none(), "a copy beside no replica entry");
    }

    #[test]
    fn a_flush_drops_the_ring_records_published_before_it() {
        let (ch, _master, ring) = channel_with_ring();
        // Its removal may be among the pushes the Flush stands for.
        ring.publish(-7, &frame(Op::Put, 0, b"before", b"der"));
        ch.file_reply(&frame(Op::Flush, 0, b"", b""));
        ring.publish(-7, &frame(Op::Put, 0, b"after", b"der"));
        assert!(in_replica(&ch, b"after"));
        assert!(!in_replica(&ch, b"before"));
    }
}
