//! The master's side: the cache thread and its event loop.
//!
//! One thread serves every worker channel from a single `epoll(7)` loop (level-triggered;
//! each channel is registered once, so a wake-up costs the same with 2 workers or 64). All
//! sockets are non-blocking: a worker that stops reading loses its replies (counted), it
//! never stalls the loop; a worker that dies gives EOF and its fd is closed and forgotten.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use crate::cache::{Cache, PutOutcome};
use crate::config::Config;
use crate::fork;
use crate::handler::{answer_hit, handle_frame, Handled};
use crate::protocol::{self, Op, MAX_FRAME_LEN};
use crate::stats::MasterStats;
use crate::tickets::KeySchedule;
use crate::wipe::{clear_wiped, wipe, wipe_spare, SecretBuf};
use crate::Error;

/// Messages read from one worker before the loop moves on to the next (fairness).
const BATCH: usize = 16;
/// How often expired sessions are swept when nothing else wakes the loop (the period of the
/// `tick` timer; the loop's `epoll_wait` itself has no timeout).
const SWEEP_INTERVAL: libc::timespec = libc::timespec { tv_sec: 1, tv_nsec: 0 };

/// The loop's receive and reply buffers (wiped after every message).
struct Scratch {
    buf: Vec<u8>,
    out: Vec<u8>,
    /// GETs that a catch-up read and that would have missed: (channel index, frame), answered
    /// once the catch-up has been through every channel. A GET frame holds no secret.
    deferred: Vec<(usize, Vec<u8>)>,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch { buf: vec![0u8; MAX_FRAME_LEN + 1], out: Vec::with_capacity(MAX_FRAME_LEN), deferred: Vec::new() }
    }

    /// Wipe every byte the buffers hold or held (after a round was abandoned half way).
    fn wipe_all(&mut self) {
        wipe(&mut self.buf);
        self.out.clear();
        wipe_spare(&mut self.out);
        self.deferred.clear();
    }
}

/// What the cache thread keeps from one round of its loop to the next.
struct LoopState {
    conns: Vec<Conn>,
    main: Scratch,
    spare: Scratch,
    /// The second of the last sweep.
    last_sweep: u64,
}

/// One worker's channel as the loop sees it.
struct Conn {
    fd: OwnedFd,
    /// Records (PUT and DEL frames other workers sent) waiting to go to this worker's
    /// replica as one `Op::Sync` frame; wiped once sent or dropped (and when it grows).
    sync: SecretBuf,
    /// Pushes to this worker were lost: it must drop its replica (`Op::Flush`) before it may
    /// trust pushes again.
    flush_due: bool,
    /// The last frame sent to this worker was a Flush (while it is unread, a new loss needs
    /// no other Flush).
    last_was_flush: bool,
    /// Replica pushes may fill at most this many bytes of the worker's socket (half of the
    /// send buffer): the other half stays free for replies and for a Flush.
    sync_room: usize,
    /// The epoll registration watches for room to send (EPOLLOUT) as well: kept equal to
    /// `flush_due` at the end of every round.
    watch_out: bool,
    /// An upper bound on the bytes the worker has not read yet (what SIOCOUTQ would say):
    /// measured, then raised by every frame sent since, at no less than the kernel charges
    /// for it (`datagram_charge`; the worker's reads only lower the real figure). While it
    /// leaves room, a push needs no measurement (see `room_for`).
    unread_bound: usize,
    /// A send found the channel broken (`Sent::Broken`): the loop closes it.
    broken: bool,
}

/// At least what the kernel charges a socket (SIOCOUTQ counts skb truesize) for a datagram
/// of `len` bytes. Up to 16 KiB, the data and the skb's shared info (~320 bytes) are one slab
/// object rounded up to a power of two (so up to about twice the length); beyond that, a
/// 16 KiB head plus whole pages. Plus the sk_buff itself. The unit test checks each step
/// against the kernel's own count.
fn datagram_charge(len: usize) -> usize {
    const SHARED_INFO: usize = 320;
    const SK_BUFF: usize = 512;
    const PAGE: usize = 4096;
    let head = len.saturating_add(SHARED_INFO);
    if head <= 4 * PAGE {
        head.next_power_of_two() + SK_BUFF
    } else {
        head.saturating_add(2 * PAGE + SK_BUFF)
    }
}

/// Bytes sent on `fd` that the peer has not read yet (SIOCOUTQ).
fn unread_bytes(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int to a valid pointer.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if rc == 0 {
        n.max(0) as usize
    } else {
        usize::MAX
    }
}

impl Conn {
    fn new(fd: OwnedFd) -> Conn {
        let mut sndbuf: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `sndbuf`.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&mut sndbuf as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        let sync_room = if rc == 0 && sndbuf > 0 { sndbuf as usize / 2 } else { 64 << 10 };
        Conn {
            fd,
            sync: SecretBuf::default(),
            flush_due: false,
            last_was_flush: false,
            sync_room,
            watch_out: false,
            unread_bound: 0,
            broken: false,
        }
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Count a frame of `len` bytes sent (or tried) on this channel into `unread_bound`.
    fn note_sent(&mut self, len: usize) {
        self.unread_bound = self.unread_bound.saturating_add(datagram_charge(len));
    }

    /// Whether a push of `len` bytes keeps the worker's unread bytes within `sync_room`. The
    /// bound answers without a system call while it leaves room; only when it does not is
    /// the socket asked (SIOCOUTQ), which also resets the bound to the real figure.
    fn room_for(&mut self, len: usize) -> bool {
        let need = datagram_charge(len);
        if self.unread_bound.saturating_add(need) <= self.sync_room {
            return true;
        }
        self.unread_bound = unread_bytes(self.raw());
        self.unread_bound.saturating_add(need) <= self.sync_room
    }

    /// Wipe and empty the queued replica updates (sent or lost).
    fn drop_sync(&mut self) {
        self.sync.clear();
    }
}

/// What a send to a worker came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    Yes,
    /// Not sent, for now: the worker's socket is full (or memory is short).
    Lost,
    /// Not sent, and no frame ever will be: the worker shut its end for reading, or the
    /// channel is otherwise broken. Such a socket can stay "writable" and never report EOF,
    /// so the loop closes the channel rather than keep trying (and keep waking for it).
    Broken,
}

/// Send one frame to a worker without blocking.
fn send_nonblocking(fd: RawFd, frame: &[u8]) -> Sent {
    // SAFETY: `frame` is valid for its length. Non-blocking and no SIGPIPE: a full or closed
    // worker socket costs that frame, nothing else.
    let n = unsafe { libc::send(fd, frame.as_ptr().cast(), frame.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n >= 0 {
        return Sent::Yes;
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN | libc::ESHUTDOWN | libc::EBADF | libc::ENOTSOCK) => {
            Sent::Broken
        }
        _ => Sent::Lost,
    }
}

/// Send a push (`Op::Sync`, `Op::Flush`) to a worker, counted in the session ring: a worker
/// reads its socket at a lookup only when the count moved since its last read, or while a
/// push is being sent (see `ring::Ring::counted_push` and `Channel::drain_now`).
fn send_push(fd: RawFd, frame: &[u8]) -> Sent {
    match crate::ring::get() {
        Some(ring) => ring.counted_push(|| send_nonblocking(fd, frame)),
        None => send_nonblocking(fd, frame),
    }
}

/// Register, change or forget `fd` in the epoll set `ep` (the event carries the fd number).
/// False when the kernel refused (no memory): the caller gives up that channel.
fn epoll_ctl(ep: RawFd, op: libc::c_int, fd: RawFd, out: bool) -> bool {
    let events = if out { libc::EPOLLIN | libc::EPOLLOUT } else { libc::EPOLLIN };
    let mut ev = libc::epoll_event { events: events as u32, u64: fd as u64 };
    // SAFETY: `ev` is a valid epoll_event for the duration of the call (ignored for DEL).
    unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) == 0 }
}

/// Events one `epoll_wait` returns at most (more stay ready for the next round).
const EVENTS_MAX: usize = 64;

/// Batches (`BATCH` frames each) read at most from a broken channel before it is closed.
const DRAIN_BROKEN_BATCHES: usize = 64;

/// State shared between the cache thread, the fork handlers and in-process callers.
pub struct Master {
    pub(crate) config: Config,
    cache: Mutex<Cache>,
    incoming: Mutex<Vec<OwnedFd>>,
    wake: OwnedFd,
    /// A periodic timer (`SWEEP_INTERVAL`) that wakes an idle loop for the sweep. With it,
    /// `epoll_wait` needs no timeout: a wait with one arms and cancels a kernel timer every
    /// time a frame wakes the loop early, which in a virtual machine is a costly exit.
    tick: OwnedFd,
    /// The cache thread's epoll set: `wake`, `tick` and every channel's master end.
    epoll: OwnedFd,
    workers: AtomicU64,
    bad_frames: AtomicU64,
    reply_drops: AtomicU64,
    sync_records: AtomicU64,
    sync_drops: AtomicU64,
    tickets: Mutex<KeySchedule>,
    key_file: Mutex<Option<FileKeys>>,
    /// `FileKeys::reloads`, for the stats: read without `key_file`'s lock, which a reload
    /// holds while it reads the file (the stats are made under the cache lock).
    key_file_reloads: AtomicU64,
    remote: Option<crate::remote::Tier>,
    /// Stores and removals this process made itself (a master serving TLS while it has
    /// workers), waiting for the cache thread to push them to the workers' replicas.
    local_sync: Mutex<LocalSync>,
    /// How far the master has read the session ring, and what it wipes there (`ring`).
    ring_reader: Mutex<RingReader>,
    /// `ring_reader`'s position after its last read: for the `Sync` frames (see `Op::Sync`),
    /// and for `read_ring` to see that nothing is new without taking `ring_reader`'s lock.
    ring_pos: AtomicU64,
    ring_records: AtomicU64,
    ring_lost: AtomicU64,
}

/// See `Master::ring_reader`.
struct RingReader {
    cursor: crate::ring::Cursor,
    /// Where the cursor was at the last sweep: the records before it were read at least a
    /// sweep ago, and are wiped at the next one.
    read_at_last_sweep: u64,
    /// Removals the records still unread must not undo (see `ring::Tombstones`).
    tombs: crate::ring::Tombstones,
    /// Slots found held by a writer, freed if it died half way (see `ring::HeldSlots`).
    held: crate::ring::HeldSlots,
}

/// See `Master::local_sync`.
#[derive(Default)]
struct LocalSync {
    /// PUT and DEL frames, wiped when pushed or dropped.
    frames: Vec<SecretBuf>,
    /// Their bytes.
    bytes: usize,
    /// More than `LOCAL_SYNC_MAX` frames or `LOCAL_SYNC_MAX_BYTES` piled up (the cache thread
    /// is stalled) and some were lost: every worker must drop its replica.
    lost: bool,
}

/// Frames `local_sync` holds at most.
const LOCAL_SYNC_MAX: usize = 4096;
/// Bytes of frames `local_sync` holds at most (sessions may be up to 64 KiB each).
const LOCAL_SYNC_MAX_BYTES: usize = 1 << 20;

/// Operator-managed ticket keys, reloaded when the file changes.
struct FileKeys {
    stamp: (i64, i64, u64, u64),
    set: crate::tickets::KeySet,
    reloads: u64,
}

/// How long a worker's copy of file keys stays current before it asks again (so a reload
/// reaches every worker within about this long).
const FILE_KEY_WINDOW: u64 = 2;

fn file_stamp(path: &std::path::Path) -> Option<(i64, i64, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.mtime(), m.mtime_nsec(), m.size(), m.ino()))
}

static MASTER: OnceLock<Master> = OnceLock::new();
static ACCEPTING: AtomicBool = AtomicBool::new(false);

/// The master state, in the master process only.
pub fn get() -> Option<&'static Master> {
    get_as(fork::pid())
}

/// `get` for a caller that already knows its pid (`me` must be `fork::pid()`).
pub fn get_as(me: i32) -> Option<&'static Master> {
    if fork::is_master_pid(me) {
        MASTER.get()
    } else {
        None
    }
}

/// True once the cache thread runs and forks should get a channel.
pub fn accepting_workers() -> bool {
    ACCEPTING.load(Relaxed)
}

/// Unix time in seconds (0 before 1970).
///
/// Read with `clock_gettime` itself: it is taken several times per lookup on both ends of a
/// channel, and `SystemTime`'s checked `Duration` arithmetic was about 110 instructions of
/// each (callgrind), more than the vDSO call. The coarse clock (the time of the last timer
/// tick, a few milliseconds behind at most) is what `time()` reads, which is how OpenSSL
/// stamps a session, and whole seconds need no more; it costs 5 ns here against 19 ns for
/// `CLOCK_REALTIME`, which reads the TSC.
pub fn now_secs() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    ts.tv_sec.max(0) as u64
}

static SETUP: Mutex<()> = Mutex::new(());

/// Start the cache thread and install the fork handlers. Idempotent in the master.
pub fn setup(mut config: Config) -> Result<(), Error> {
    if fork::is_master() {
        return Ok(());
    }
    if fork::is_descendant_of_master() || !matches!(fork::channel_fd(), fork::ChannelFd::None) {
        return Err(Error::InWorker);
    }
    if std::env::var_os(crate::channel::CHANNEL_FD_ENV).is_some() {
        return Err(Error::InWorker);
    }
    crate::remote::apply_env(&mut config);
    config.validate()?;
    let _guard = SETUP.lock().unwrap_or_else(|e| e.into_inner());
    if fork::is_master() {
        return Ok(());
    }
    // SAFETY: eventfd has no memory preconditions; the result is checked before use.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if raw < 0 {
        return Err(Error::system("eventfd"));
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let wake = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: epoll_create1 has no memory preconditions; the result is checked before use.
    let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if raw < 0 {
        return Err(Error::system("epoll_create1"));
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: timerfd_create has no memory preconditions; the result is checked before use.
    let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC | libc::TFD_NONBLOCK) };
    if raw < 0 {
        return Err(Error::system("timerfd_create"));
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let tick = unsafe { OwnedFd::from_raw_fd(raw) };
    let period = libc::itimerspec { it_interval: SWEEP_INTERVAL, it_value: SWEEP_INTERVAL };
    // SAFETY: a valid itimerspec for our own timerfd; the old value is not asked for.
    if unsafe { libc::timerfd_settime(raw, 0, &period, std::ptr::null_mut()) } != 0 {
        return Err(Error::system("timerfd_settime"));
    }
    if !epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, wake.as_raw_fd(), false)
        || !epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, tick.as_raw_fd(), false)
    {
        return Err(Error::system("registering the wake-up descriptors with epoll"));
    }
    // Declared after the descriptors, so on an early return it untracks them before they close.
    let mut tracked = Tracked::default();
    if ![wake.as_raw_fd(), tick.as_raw_fd(), epoll.as_raw_fd()].into_iter().all(|fd| tracked.track(fd)) {
        return Err(Error::System("master descriptor number too large to track".into()));
    }
    let remote = crate::remote::Tier::new(&config, wake.as_raw_fd())?;
    if config.replica_bytes > 0 {
        // Without it, every store goes over the channels (and wakes the master), as before.
        let eager = remote.is_some();
        if let Err(e) = crate::ring::create(crate::ring::slots_for(config.replica_bytes), eager) {
            crate::log::debug!("no session ring: {e}");
        }
    }
    let ring_cursor = crate::ring::get().map_or_else(crate::ring::Cursor::start, |r| r.cursor_at_head());
    let ring_start = ring_cursor.next;
    let cache = Cache::new(config.cache_bytes, config.max_session_bytes);
    let schedule = KeySchedule::new(config.ticket_key_rotation.as_secs(), u64::from(config.ticket_keys));
    let master = Master {
        config,
        cache: Mutex::new(cache),
        incoming: Mutex::new(Vec::new()),
        wake,
        tick,
        epoll,
        workers: AtomicU64::new(0),
        bad_frames: AtomicU64::new(0),
        reply_drops: AtomicU64::new(0),
        sync_records: AtomicU64::new(0),
        sync_drops: AtomicU64::new(0),
        tickets: Mutex::new(schedule),
        key_file: Mutex::new(None),
        key_file_reloads: AtomicU64::new(0),
        remote,
        local_sync: Mutex::new(LocalSync::default()),
        ring_reader: Mutex::new(RingReader {
            cursor: ring_cursor,
            read_at_last_sweep: ring_start,
            tombs: crate::ring::Tombstones::default(),
            held: crate::ring::HeldSlots::default(),
        }),
        ring_pos: AtomicU64::new(0),
        ring_records: AtomicU64::new(0),
        ring_lost: AtomicU64::new(0),
    };
    if let Err(rejected) = MASTER.set(master) {
        drop(tracked);
        drop(rejected);
        return Err(Error::System(
            "an earlier master_setup in this process failed part way (after its state was made: \
             see that call's error); the cache cannot be started again in this process"
                .into(),
        ));
    }
    // The master owns its descriptors for the life of the process now.
    tracked.keep();
    let master = MASTER.get().ok_or(Error::Panic)?;
    if let Some(r) = &master.remote {
        // Before the first fork, so workers start with the keys every host shares. On a
        // thread, waited for a bounded time: the connection, TLS handshake and commands are
        // bounded by remote_timeout, but the host name lookup (the system's resolver) is not,
        // and the host's setup must not hang on it. If it is late, workers start with local
        // keys and take the shared ones when they come (the write thread retries too).
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        let sync = spawn_masked("cts-remote-init", move || {
            r.first_ticket_sync(&install_ticket_key);
            let _ = done_tx.send(());
        });
        if sync.is_ok() {
            let bound = master.config.remote_timeout.saturating_mul(4).max(Duration::from_millis(500));
            if done_rx.recv_timeout(bound).is_err() {
                crate::log::debug!("remote: ticket key agreement not done within {bound:?}; going on without it");
            }
        }
    }
    crate::channel::set_worker_config(&master.config);
    fork::install_handlers()?;
    let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
    let spawned = spawn_masked("cts-cache", move || master.run(started_tx)).and_then(|()| match &master.remote {
        Some(remote) => {
            // SAFETY: see `spawn_masked`: the remote threads start with every signal blocked.
            let _mask = unsafe { SignalsBlocked::new() };
            remote.start(install_ticket_key).map_err(std::io::Error::other)
        }
        None => Ok(()),
    });
    spawned.map_err(|e| Error::System(format!("spawning the cache thread: {e}")))?;
    started_rx.recv().map_err(|_| Error::System("the cache thread did not start".into()))?;
    fork::set_master_pid(fork::pid());
    ACCEPTING.store(true, Relaxed);
    Ok(())
}

/// Master-side descriptors `setup` tracked (so children close them), untracked again on drop
/// unless kept: a setup that fails must not leave numbers that every later child would close
/// after the host reused them.
#[derive(Default)]
struct Tracked {
    fds: Vec<RawFd>,
}

impl Tracked {
    fn track(&mut self, fd: RawFd) -> bool {
        let ok = fork::track_master_fd(fd);
        if ok {
            self.fds.push(fd);
        }
        ok
    }

    fn keep(mut self) {
        self.fds.clear();
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.fds.iter().for_each(|&fd| fork::untrack_master_fd(fd));
    }
}

/// Every signal blocked on this thread while it lives; the previous mask back on drop.
struct SignalsBlocked(libc::sigset_t);

impl SignalsBlocked {
    /// # Safety
    /// Drop it on the thread that made it.
    unsafe fn new() -> SignalsBlocked {
        // SAFETY: sigset_t values are initialised by sigfillset/pthread_sigmask before use.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            SignalsBlocked(old)
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `new` on this same thread.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// Spawn one of the library's threads with every signal blocked, so the host's signals
/// (SIGTERM, SIGCHLD, ...) are never delivered to it instead of to the host's own threads.
/// The mask is inherited at spawn, so it is blocked here and the caller's restored after.
fn spawn_masked(name: &str, f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    // SAFETY: made and dropped on this thread.
    let _mask = unsafe { SignalsBlocked::new() };
    std::thread::Builder::new().name(name.into()).spawn(f).map(drop)
}

/// Put a ticket key agreed with the other hosts (remote tier) into the schedule.
fn install_ticket_key(key: crate::tickets::TicketKey) {
    if let Some(m) = MASTER.get() {
        m.tickets.lock().unwrap_or_else(|e| e.into_inner()).install(key);
    }
}

/// Hand a new worker's channel to the cache thread (called by the fork parent handler).
pub(crate) fn adopt_worker_fd(fd: RawFd) {
    // SAFETY: `fd` is the master end made by the prepare handler; ownership moves here.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let Some(master) = MASTER.get() else {
        fork::untrack_master_fd(fd);
        return; // dropping closes it
    };
    master.incoming.lock().unwrap_or_else(|e| e.into_inner()).push(owned);
    master.wake_cache_thread();
}

impl Master {
    /// Lock the cache (in-process callers and the loop). A poisoned lock is recovered: the
    /// cache's invariants hold between calls, which never panic midway by design.
    pub(crate) fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Store a session made in this process, capping its lifetime by the configured maximum;
    /// with workers, it goes to their replicas too.
    pub(crate) fn put(&self, namespace: &[u8], id: &[u8], der: &[u8], expiry: u64) -> PutOutcome {
        let now = now_secs();
        let cap = self.lifetime_cap(now);
        if let Some(r) = &self.remote {
            r.put(namespace, id, der, expiry.min(cap), now);
        }
        let outcome = self.cache().put(namespace, id, der, expiry.min(cap), now);
        if matches!(outcome, PutOutcome::Stored | PutOutcome::Replaced) {
            self.push_local(Op::Put, namespace, id, expiry.min(cap), der);
        }
        outcome
    }

    /// Remove a session here, from the workers' replicas and, with the remote tier on, from
    /// Redis too.
    pub(crate) fn remove(&self, namespace: &[u8], id: &[u8]) {
        if let Some(r) = &self.remote {
            r.del(namespace, id);
        }
        self.before_removal(namespace, id);
        self.cache().remove(namespace, id);
        self.push_local(Op::Del, namespace, id, 0, &[]);
    }

    /// Queue a store or removal made in this process for the workers' replicas and wake the
    /// cache thread, which pushes it like one a worker sent. Nothing to do without workers:
    /// one that connects later starts with an empty replica, and the cache change above came
    /// first, so it cannot be handed the old state either (`workers` is counted before the
    /// loop serves a new channel).
    fn push_local(&self, op: Op, namespace: &[u8], id: &[u8], expiry: u64, der: &[u8]) {
        if self.config.replica_bytes == 0 || self.workers.load(SeqCst) == 0 {
            return;
        }
        let mut frame = SecretBuf::with_capacity(protocol::frame_len(namespace, id, der.len()));
        protocol::encode(frame.vec(), op, 0, expiry, namespace, id, der);
        let mut q = self.local_sync.lock().unwrap_or_else(|e| e.into_inner());
        if q.frames.len() < LOCAL_SYNC_MAX && q.bytes + frame.len() <= LOCAL_SYNC_MAX_BYTES {
            q.bytes += frame.len();
            q.frames.push(frame);
        } else {
            q.lost = true;
        }
        drop(q);
        self.wake_cache_thread();
    }

    /// Wake the cache thread from `epoll_wait`: it then adopts new channels and pushes local
    /// stores (both are read on any wake-up).
    fn wake_cache_thread(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our own eventfd; failure (counter full) is
        // harmless because the thread is due to wake anyway.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Push the stores and removals queued by `push_local` to every worker's replica.
    fn push_local_sync(&self, conns: &mut [Conn], out: &mut Vec<u8>) {
        let q = std::mem::take(&mut *self.local_sync.lock().unwrap_or_else(|e| e.into_inner()));
        for frame in &q.frames {
            self.queue_sync(usize::MAX, conns, frame, out);
        }
        if q.lost {
            self.lose_pushes(conns);
        }
    }

    /// Pushes to every worker were (or may have been) lost: drop what is queued and owe each
    /// worker a Flush, so none keeps serving from a replica that missed a removal.
    fn lose_pushes(&self, conns: &mut [Conn]) {
        for c in conns.iter_mut() {
            c.drop_sync();
            c.flush_due = true;
            self.sync_drops.fetch_add(1, Relaxed);
        }
    }

    /// The master's counters now.
    pub fn stats(&self) -> MasterStats {
        self.read_ring();
        self.stats_with(&self.cache())
    }

    /// Store what the workers put into the session ring since the last read (into the cache
    /// and, with the remote tier on, Redis). Called on every round of the loop, before a GET
    /// would miss, and by in-process lookups; a few loads when nothing is new.
    pub(crate) fn read_ring(&self) {
        let Some(ring) = crate::ring::get() else { return };
        // Nothing published since the last read ended: no lock taken (the cache thread asks
        // on every wake-up). `ring_pos` is stored after each read, so an equal head means
        // every record was read; a read under way leaves it behind, and the lock is taken.
        if self.ring_pos.load(SeqCst) == ring.head() {
            return;
        }
        let mut reader = self.ring_reader.lock().unwrap_or_else(|e| e.into_inner());
        if reader.cursor.next == ring.head() {
            return;
        }
        // Twice at most: a store published while the nudge was being cleared sent no nudge.
        for _ in 0..2 {
            let now = now_secs();
            let cap = self.lifetime_cap(now);
            let mut cache = self.cache();
            let RingReader { cursor, tombs, .. } = &mut *reader;
            let n = ring.read(cursor, 0, 0, |seq, rec| match protocol::decode(rec) {
                // Stored before a removal the master has applied already: stays removed.
                Ok(m) if m.op == Op::Put && tombs.buries(m.namespace, m.id, seq) => {}
                Ok(m) if m.op == Op::Put => {
                    let expiry = m.expiry.min(cap);
                    crate::log::debug!(
                        "master: Put (ring) ns={} id={} payload={}B",
                        String::from_utf8_lossy(m.namespace),
                        crate::log::hex(m.id),
                        m.payload.len()
                    );
                    cache.put(m.namespace, m.id, m.payload, expiry, now);
                    if let Some(r) = &self.remote {
                        r.put(m.namespace, m.id, m.payload, expiry, now);
                    }
                }
                _ => {
                    self.bad_frames.fetch_add(1, Relaxed);
                }
            });
            drop(cache);
            tombs.forget_read(cursor.next);
            let again = ring.master_read_to(reader.cursor.next);
            self.ring_pos.store(reader.cursor.next, SeqCst);
            self.ring_records.fetch_add(n.records, Relaxed);
            self.ring_lost.fetch_add(n.lost, Relaxed);
            if !again {
                break;
            }
        }
    }

    /// Store the session (`namespace`, `id`) if the ring holds it past where the master's
    /// in-order read stopped: a writer descheduled between taking its sequence number and
    /// publishing holds that read, for as long as it is off the CPU, and a lookup of any
    /// session stored after it would miss meanwhile. Only that key is taken (the in-order
    /// read takes the rest later, and stores this one again, the same); a key removed since
    /// its store stays removed (`Tombstones`). Called only for a lookup that would miss.
    fn read_ring_ahead_for(&self, namespace: &[u8], id: &[u8]) {
        let Some(ring) = crate::ring::get() else { return };
        let reader = self.ring_reader.lock().unwrap_or_else(|e| e.into_inner());
        if reader.cursor.next >= ring.head() {
            return;
        }
        // The latest store of that key, copied out: the cache is locked only to store it, not
        // for the whole read (every worker's lookups wait on that lock).
        let mut found: Option<SecretBuf> = None;
        ring.read_ahead(reader.cursor.next, |seq, rec| match protocol::decode(rec) {
            // Not one stored before a removal the master has applied (`Tombstones`).
            Ok(m)
                if m.op == Op::Put
                    && m.namespace == namespace
                    && m.id == id
                    && !reader.tombs.buries(m.namespace, m.id, seq) =>
            {
                found = Some(SecretBuf::from_slice(rec));
            }
            _ => {}
        });
        let Some(rec) = found else { return };
        if let Ok(m) = protocol::decode(&rec) {
            let now = now_secs();
            // Still under the reader's lock, which a removal takes first (`before_removal`).
            self.cache().put(m.namespace, m.id, m.payload, m.expiry.min(self.lifetime_cap(now)), now);
        }
        drop(reader);
    }

    /// The latest expiry a session may have at `now`: `max_lifetime` from then.
    fn lifetime_cap(&self, now: u64) -> u64 {
        now.saturating_add(self.config.max_lifetime.as_secs())
    }

    /// Before a removal is applied: read what the ring holds, and if a record still unread
    /// may be this session's store (a writer before it has not published yet), note the
    /// removal so that reading the store later does not bring the session back (see
    /// `ring::Tombstones`). Not with the cache locked (the ring's reader lock comes first).
    fn before_removal(&self, namespace: &[u8], id: &[u8]) {
        let Some(ring) = crate::ring::get() else { return };
        self.read_ring();
        let mut reader = self.ring_reader.lock().unwrap_or_else(|e| e.into_inner());
        let read_to = reader.cursor.next;
        reader.tombs.note(namespace, id, ring.head(), read_to);
    }

    /// Wipe the ring slots the master read at least a sweep ago (called once a second).
    fn wipe_ring(&self) {
        let Some(ring) = crate::ring::get() else { return };
        let mut reader = self.ring_reader.lock().unwrap_or_else(|e| e.into_inner());
        // The whole last lap before that point, not just what is new since the last sweep: a
        // record published late (its writer was descheduled, and the reads went past it) is
        // wiped by the next sweep. Slots already wiped cost one load each.
        let to = reader.read_at_last_sweep;
        let (_, freed) = reader.held.sweep(ring, 0, to);
        if freed > 0 {
            crate::log::debug!("session ring: freed {freed} slot(s) a dead worker held half written");
        }
        reader.read_at_last_sweep = reader.cursor.next;
    }

    fn stats_with(&self, cache: &Cache) -> MasterStats {
        let c = cache.counters();
        let mut s = MasterStats {
            hits: c.hits,
            misses: c.misses,
            stores: c.stores,
            evictions: c.evictions,
            expirations: c.expirations,
            oversize: c.oversize,
            removes: c.removes,
            entries: cache.len() as u64,
            bytes: cache.bytes() as u64,
            budget_bytes: self.config.cache_bytes as u64,
            workers: self.workers.load(Relaxed),
            bad_frames: self.bad_frames.load(Relaxed),
            reply_drops: self.reply_drops.load(Relaxed),
            ticket_rotations: self.tickets.lock().unwrap_or_else(|e| e.into_inner()).rotations()
                + self.key_file_reloads.load(Relaxed),
            sync_records: self.sync_records.load(Relaxed),
            sync_drops: self.sync_drops.load(Relaxed),
            ring_records: self.ring_records.load(Relaxed),
            ring_lost: self.ring_lost.load(Relaxed),
            ..MasterStats::default()
        };
        if let Some(r) = &self.remote {
            r.fill(&mut s);
        }
        s
    }

    /// Keys from the operator's file: reloaded when its stamp changes; a file that no longer
    /// parses keeps the last good keys (and says so in the debug log).
    fn file_ticket_keys(&self, path: &std::path::Path) -> Vec<u8> {
        let now = now_secs();
        let mut guard = self.key_file.lock().unwrap_or_else(|e| e.into_inner());
        let stamp = file_stamp(path);
        let stale = guard.as_ref().is_none_or(|f| Some(f.stamp) != stamp);
        if stale {
            if let (Ok(mut bytes), Some(stamp)) = (std::fs::read(path), stamp) {
                match crate::tickets::parse_key_file(&bytes, now, FILE_KEY_WINDOW) {
                    Ok(set) => {
                        let reloads = guard.as_ref().map_or(0, |f| f.reloads + 1);
                        crate::log::debug!("ticket key file {} loaded: {} keys", path.display(), set.keys.len());
                        *guard = Some(FileKeys { stamp, set, reloads });
                        self.key_file_reloads.store(reloads, Relaxed);
                    }
                    Err(why) => crate::log::debug!("ticket key file {}: {why}; keeping the last keys", path.display()),
                }
                wipe(&mut bytes);
            }
        }
        let Some(f) = guard.as_mut() else { return Vec::new() };
        // Keep the first key current for another window, so workers keep asking (and see a
        // reload) while the copies they hold stay usable if the master goes away.
        f.set.keep_first_current(now, FILE_KEY_WINDOW);
        let mut out = Vec::with_capacity(f.set.keys.len() * crate::tickets::KEY_WIRE_LEN);
        f.set.encode(&mut out);
        out
    }

    /// The ticket keys now, brought up to date, in wire form (wiped by the caller); empty
    /// when ticket sharing is off.
    pub(crate) fn ticket_keys(&self) -> Vec<u8> {
        if !self.config.share_tickets {
            return Vec::new();
        }
        if let Some(path) = &self.config.ticket_key_file {
            return self.file_ticket_keys(path);
        }
        let mut schedule = self.tickets.lock().unwrap_or_else(|e| e.into_inner());
        // The OS random source through OpenSSL. A key it cannot fill is not made (never one
        // of zeros): workers keep the newest key that has begun, or issue no tickets.
        schedule.refresh(now_secs(), |b| openssl::rand::rand_bytes(b).is_ok());
        let mut out = Vec::with_capacity(schedule.keys().keys.len() * crate::tickets::KEY_WIRE_LEN);
        schedule.keys().encode(&mut out);
        out
    }

    /// The cache thread. It holds the fork gate (see `fork::gate_lock`) whenever it is not
    /// asleep in `epoll_wait`, and reports on `started` once its start-up allocations are done,
    /// so `master_setup` returns only when a fork can no longer catch it mid-allocation.
    fn run(&'static self, started: std::sync::mpsc::SyncSender<()>) {
        fork::gate_lock();
        let ep = self.epoll.as_raw_fd();
        let wake = self.wake.as_raw_fd();
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_MAX];
        let mut st =
            LoopState { conns: Vec::new(), main: Scratch::new(), spare: Scratch::new(), last_sweep: now_secs() };
        let _ = started.send(());
        drop(started);
        loop {
            fork::gate_unlock();
            // SAFETY: `events` is a valid array of EVENTS_MAX epoll_event structs.
            let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), EVENTS_MAX as libc::c_int, -1) };
            fork::gate_lock();
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                continue;
            }
            let ready = &events[..n as usize];
            let round = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.round(ep, wake, ready, &mut st)));
            if round.is_err() {
                // A bug in the loop must not end the cache thread (which would hold the fork
                // gate forever) nor leave a secret behind: wipe the scratch buffers, and since
                // pushes may have been lost half way, have every worker drop its replica.
                self.bad_frames.fetch_add(1, Relaxed);
                st.main.wipe_all();
                st.spare.wipe_all();
                self.lose_pushes(&mut st.conns);
            }
        }
    }

    /// One round of the loop: what `epoll_wait` reported as `ready`, then the pushes owed,
    /// then the once-a-second sweep.
    fn round(&self, ep: RawFd, wake: RawFd, ready: &[libc::epoll_event], st: &mut LoopState) {
        let LoopState { conns, main, spare, last_sweep } = st;
        self.read_ring();
        let tick = self.tick.as_raw_fd();
        if ready.iter().any(|ev| ev.u64 == tick as u64) {
            // Read the expirations, or the level-triggered timer stays ready. The sweep
            // below runs on the clock, whatever woke the loop.
            let mut expirations: u64 = 0;
            // SAFETY: reads at most 8 bytes into a valid u64 from our non-blocking timerfd.
            unsafe { libc::read(tick, (&mut expirations as *mut u64).cast(), 8) };
        }
        // New channels first, so a worker's first frames are served after it is counted.
        if ready.iter().any(|ev| ev.u64 == wake as u64) {
            self.drain_wake();
            let mut incoming = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
            for fd in incoming.drain(..) {
                if !epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd.as_raw_fd(), false) {
                    // Cannot watch it: closing it gives the worker EOF (its lookups miss).
                    fork::untrack_master_fd(fd.as_raw_fd());
                    continue;
                }
                if let Some(r) = &self.remote {
                    r.conn_opened(fd.as_raw_fd());
                }
                conns.push(Conn::new(fd));
            }
            drop(incoming);
            // Counted before any of their frames is served (see `push_local`).
            self.workers.store(conns.len() as u64, SeqCst);
            self.answer_remote(conns, &mut main.out);
            self.push_local_sync(conns, &mut main.out);
        }
        for ev in ready.iter().filter(|ev| ev.u64 != wake as u64 && ev.u64 != tick as u64) {
            // Readable, hung up, broken or (owing a Flush) writable: `serve` reads what is
            // there and tells whether the channel lives on (EOF and hard errors end it).
            let Some(i) = conns.iter().position(|c| c.raw() as u64 == ev.u64) else { continue };
            if !self.serve(i, conns, main, Some(spare)) {
                self.close_conn(ep, conns.swap_remove(i));
            }
        }
        self.flush_all(ep, conns, &mut main.out);
        // Channels a send found broken: closed like those at EOF (the worker's lookups miss),
        // once what the worker sent before is read. A worker that exited leaves its last
        // frames (a removal among them, perhaps) queued before the EOF, and a send to it
        // fails (ECONNRESET) before they are read. What they change is pushed to the other
        // workers now, not at the next round (up to a second away).
        let mut drained = false;
        let mut i = 0;
        while i < conns.len() {
            if conns[i].broken {
                self.drain_broken(i, conns, main);
                self.close_conn(ep, conns.swap_remove(i));
                drained = true;
            } else {
                i += 1;
            }
        }
        if drained {
            self.flush_all(ep, conns, &mut main.out);
        }
        self.workers.store(conns.len() as u64, Relaxed);
        let now = now_secs();
        if now != *last_sweep {
            *last_sweep = now;
            self.cache().sweep(now);
            self.wipe_ring();
            // Rotate on time (and wipe retired keys) even when nobody asks.
            let mut retired = self.ticket_keys();
            wipe(&mut retired);
        }
    }

    /// Send every worker its queued replica updates (and a Flush it owes), and watch for room
    /// on the sockets of those that still owe one.
    fn flush_all(&self, ep: RawFd, conns: &mut [Conn], out: &mut Vec<u8>) {
        for c in conns.iter_mut() {
            self.flush_sync(c, out);
            // A worker that owes a Flush is watched for room to send it.
            if c.watch_out != c.flush_due && epoll_ctl(ep, libc::EPOLL_CTL_MOD, c.raw(), c.flush_due) {
                c.watch_out = c.flush_due;
            }
        }
    }

    /// Read and handle what a broken channel still holds, up to its EOF or until it is empty
    /// (at most `DRAIN_BROKEN_BATCHES` batches: a worker that shut its end for reading could
    /// otherwise keep the loop here by writing on).
    fn drain_broken(&self, idx: usize, conns: &mut [Conn], main: &mut Scratch) {
        for _ in 0..DRAIN_BROKEN_BATCHES {
            if !self.serve(idx, conns, main, None) {
                break;
            }
            let mut b = 0u8;
            // SAFETY: peeks at most one byte into a valid local; non-blocking.
            let n = unsafe {
                libc::recv(conns[idx].raw(), (&mut b as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
            };
            if n <= 0 {
                break; // Empty (EAGAIN), at EOF, or failed: nothing more to read.
            }
        }
        // Lookups that would miss are put aside for an answer after a catch-up (`serve`);
        // this channel's asker cannot read one. (Copies of GET frames: nothing to wipe.)
        main.deferred.clear();
    }

    /// Close a worker's channel, which `epoll` watches (EOF, or found broken).
    fn close_conn(&self, ep: RawFd, conn: Conn) {
        // Out of the set before the close: a copy of the descriptor still open elsewhere (a
        // child mid-fork) would otherwise keep reporting it.
        epoll_ctl(ep, libc::EPOLL_CTL_DEL, conn.raw(), false);
        if let Some(r) = &self.remote {
            r.conn_closed(conn.raw());
        }
        fork::untrack_master_fd(conn.raw());
        drop(conn);
    }

    /// Answer the lookups the remote tier finished: a hit is stored here first (and, with
    /// replicas on, pushed to the other workers like any store), then the worker gets Hit or
    /// Miss with its own request id, if its channel is still the one that asked.
    fn answer_remote(&self, conns: &mut [Conn], out: &mut Vec<u8>) {
        let Some(r) = &self.remote else { return };
        let mut frame = SecretBuf::with_capacity(0);
        for reply in r.take_replies() {
            let open = r.still_open(&reply);
            let asker = conns.iter().position(|c| open && c.raw() == reply.fd).unwrap_or(usize::MAX);
            let (ns, id) = (&reply.namespace[..], &reply.id[..]);
            frame.clear();
            match &reply.found {
                Some((expiry, der)) => {
                    let expiry = self.put_local(ns, id, der, *expiry);
                    if self.config.replica_bytes > 0 {
                        protocol::encode(frame.vec(), Op::Put, 0, expiry, ns, id, der);
                        self.queue_sync(asker, conns, &frame, out);
                        frame.clear();
                    }
                    protocol::encode(frame.vec(), Op::Hit, reply.request_id, expiry, ns, id, der);
                }
                None => protocol::encode(frame.vec(), Op::Miss, reply.request_id, 0, ns, id, &[]),
            }
            if open {
                let sent = self.send_reply(reply.fd, &frame);
                if let Some(c) = conns.get_mut(asker) {
                    // A reply now follows any Flush still unread (see `flush_sync`).
                    c.last_was_flush = false;
                    c.note_sent(frame.len());
                    c.broken |= sent == Sent::Broken;
                }
            }
        }
    }

    /// Store a session the remote tier found; returns the expiry applied (capped).
    fn put_local(&self, namespace: &[u8], id: &[u8], der: &[u8], expiry: u64) -> u64 {
        let now = now_secs();
        let expiry = expiry.min(self.lifetime_cap(now));
        self.cache().put(namespace, id, der, expiry, now);
        expiry
    }

    fn drain_wake(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a valid u64 from our non-blocking eventfd.
        unsafe { libc::read(self.wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    /// Read and answer up to `BATCH` messages from one worker. Returns false when the channel
    /// is finished (EOF or a hard error).
    ///
    /// A worker stores a session (PUT, no reply) before OpenSSL sends the client its session
    /// id or ticket, so by the time another worker asks for it the PUT is already queued on
    /// the first worker's channel, but perhaps not yet read. Before answering a GET that would
    /// miss, the loop therefore catches up on the other channels (with `spare` buffers, one
    /// level deep), so an immediate reconnection to another worker finds its session.
    ///
    /// With replicas on, every PUT and DEL that was applied is queued for the other workers
    /// (sent by `flush_sync` at the end of the loop's round, batched).
    fn serve(&self, idx: usize, conns: &mut [Conn], s: &mut Scratch, mut spare: Option<&mut Scratch>) -> bool {
        let fd = conns[idx].raw();
        let Scratch { buf, out, deferred } = s;
        for _ in 0..BATCH {
            // SAFETY: `buf` is valid for `buf.len()` bytes; MSG_TRUNC makes recv return the
            // datagram's real length so an oversized frame is detected, not silently cut.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR));
            }
            if n == 0 {
                return false; // EOF: the worker is gone.
            }
            let n = n as usize;
            if n > buf.len() {
                self.bad_frames.fetch_add(1, Relaxed);
                wipe(buf);
                continue;
            }
            // A GET the cache answers now: one decode and one lookup, none of the catch-up below.
            if self.handle_guarded(idx, conns, &buf[..n], out, true) {
                wipe(&mut buf[..n]);
                continue;
            }
            match spare.as_deref_mut() {
                Some(sp) if self.would_miss(&buf[..n]) => {
                    for other in (0..conns.len()).filter(|&o| o != idx) {
                        // An EOF seen here is seen again (and handled) by the main loop.
                        self.serve(other, conns, sp, None);
                    }
                    // A GET the catch-up read that would have missed may ask for a session
                    // whose PUT sits on a channel the catch-up reached after it: answer those
                    // now that every channel has been read once.
                    for (o, frame) in sp.deferred.drain(..) {
                        if o < conns.len() {
                            self.handle_guarded(o, conns, &frame, &mut sp.out, false);
                        }
                    }
                }
                None if self.would_miss(&buf[..n]) => {
                    deferred.push((idx, buf[..n].to_vec()));
                    wipe(&mut buf[..n]);
                    continue;
                }
                _ => {}
            }
            self.handle_guarded(idx, conns, &buf[..n], out, false);
            wipe(&mut buf[..n]);
        }
        true
    }

    /// Handle one frame from worker `idx`, then push an applied PUT or DEL to the replicas,
    /// or note that a reply went out. A bug in handling one frame must not end the cache
    /// thread for every worker: the frame is dropped and counted, the loop goes on.
    ///
    /// With `hit_only`, only a GET the cache can answer now is handled (see `handle`); false
    /// for any other frame, with nothing sent or counted. Otherwise always true.
    fn handle_guarded(&self, idx: usize, conns: &mut [Conn], frame: &[u8], out: &mut Vec<u8>, hit_only: bool) -> bool {
        let fd = conns[idx].raw();
        let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handle(fd, frame, out, hit_only)));
        if handled.is_err() {
            // `out` may hold a reply built half way (a session's DER), never sent.
            clear_wiped(out);
        }
        if !out.is_empty() {
            let c = &mut conns[idx];
            c.broken |= self.send_reply(c.raw(), out) == Sent::Broken;
            c.note_sent(out.len());
            // Wiped, its length kept (the caller reads it: a reply went out).
            wipe(out);
        }
        match handled {
            Ok(None) => return false,
            Ok(Some(Handled::NoReply)) if self.config.replica_bytes > 0 => self.queue_sync(idx, conns, frame, out),
            Ok(Some(Handled::Reply)) => conns[idx].last_was_flush = false,
            Ok(Some(_)) => {}
            Err(_) => {
                self.bad_frames.fetch_add(1, Relaxed);
            }
        }
        true
    }

    /// True for a well-formed GET whose key is not in the cache now.
    fn would_miss(&self, frame: &[u8]) -> bool {
        // Most frames are not GETs: look at the op byte before decoding anything.
        if frame.get(1) != Some(&(Op::Get as u8)) {
            return false;
        }
        match protocol::decode(frame) {
            Ok(m) if m.op == Op::Get => {
                let missing = || !self.cache().contains(m.namespace, m.id, now_secs());
                // A store still in the session ring counts: read it first, and if the read
                // stopped at a record still being written, look for this one behind it.
                missing()
                    && {
                        self.read_ring();
                        missing()
                    }
                    && {
                        self.read_ring_ahead_for(m.namespace, m.id);
                        missing()
                    }
            }
            _ => false,
        }
    }

    /// Queue an applied PUT or DEL from worker `from` for every other worker's replica.
    fn queue_sync(&self, from: usize, conns: &mut [Conn], frame: &[u8], out: &mut Vec<u8>) {
        if !matches!(frame.get(1), Some(&b) if b == Op::Put as u8 || b == Op::Del as u8) {
            return;
        }
        // A PUT goes out with the expiry the cache applied (capped by max_lifetime now), so
        // a worker that reads it late cannot stretch the session's life.
        let capped = match protocol::decode(frame) {
            Ok(m) if m.op == Op::Put => Some(m.expiry.min(self.lifetime_cap(now_secs()))),
            _ => None,
        };
        let is_put = capped.is_some();
        // A DEL goes out with the ring's head now, past every store of that session (see
        // `ring::Tombstones`): a worker that has not read the ring that far yet skips them.
        let removed_at = match (is_put, crate::ring::get()) {
            (false, Some(ring)) => Some(ring.head()),
            _ => None,
        };
        for (j, c) in conns.iter_mut().enumerate() {
            // The sender has its own PUT already; its own DEL goes back to it too, in order
            // behind any push of the same session still queued for it (which would otherwise
            // bring the session back into its replica after its local removal).
            if j == from && is_put {
                continue;
            }
            let need = 2 + frame.len();
            if c.sync.len() + need > protocol::MAX_PAYLOAD_LEN {
                // Full batch: send it now and start another.
                self.flush_sync(c, out);
            }
            c.sync.reserve(need);
            if !protocol::push_sync_record(c.sync.vec(), frame) {
                continue;
            }
            if let Some(stamp) = capped.or(removed_at) {
                let at = c.sync.len() - frame.len() + protocol::EXPIRY_OFFSET;
                c.sync[at..at + 8].copy_from_slice(&stamp.to_le_bytes());
            }
            self.sync_records.fetch_add(1, Relaxed);
        }
    }

    /// Send a worker its queued replica updates as one frame. If the worker's socket is
    /// full they are lost, and the worker is told to drop its replica as soon as a frame
    /// fits again, so it never keeps serving a session that was removed meanwhile.
    ///
    /// Pushes use at most half of the socket's buffer (`sync_room`), so the Flush that
    /// follows a loss finds room at once: the worker reads it, in order, before anything it
    /// could resume from a stale replica. Only if replies alone fill the other half is the
    /// Flush late; the loop then watches the socket and sends it as soon as it fits.
    fn flush_sync(&self, c: &mut Conn, out: &mut Vec<u8>) {
        if c.flush_due {
            self.send_flush(c, out);
        }
        if c.sync.is_empty() {
            return;
        }
        if !c.flush_due {
            out.clear();
            protocol::encode(out, Op::Sync, self.ring_pos.load(SeqCst), 0, b"", b"", &c.sync);
            let fits = c.room_for(out.len());
            let sent = if fits { send_push(c.raw(), out) } else { Sent::Lost };
            let len = out.len();
            clear_wiped(out);
            if sent == Sent::Broken {
                c.broken = true;
            } else if sent == Sent::Yes {
                c.note_sent(len);
                c.last_was_flush = false;
            } else {
                self.sync_drops.fetch_add(1, Relaxed);
                // An unread Flush still ahead of everything the worker has not read covers
                // this loss too. (When the bound refused, `room_for` has just measured it.)
                let unread = if fits { unread_bytes(c.raw()) } else { c.unread_bound };
                if !(c.last_was_flush && unread > 0) {
                    c.flush_due = true;
                    self.send_flush(c, out);
                }
            }
        }
        c.drop_sync();
    }

    fn send_flush(&self, c: &mut Conn, out: &mut Vec<u8>) {
        out.clear();
        protocol::encode(out, Op::Flush, 0, 0, b"", b"", &[]);
        match send_push(c.raw(), out) {
            Sent::Yes => {
                c.note_sent(out.len());
                c.flush_due = false;
                c.last_was_flush = true;
            }
            // Owed no longer: the channel is closed at the end of this round, and nothing
            // must keep the loop watching it for room meanwhile.
            Sent::Broken => {
                c.broken = true;
                c.flush_due = false;
            }
            Sent::Lost => {}
        }
        out.clear();
    }

    /// Handle one frame, leaving the reply, if any, in `out` (`handle_guarded` sends it). With
    /// `hit_only`, the fast path for GETs: `handler::answer_hit` answers one the cache can
    /// answer now, and anything else is left (`None`, nothing built or counted) for a call
    /// without it after the catch-up `serve` does before a miss. The fast path is off while
    /// debug logging is on, so that every frame is logged below.
    fn handle(&self, fd: RawFd, frame: &[u8], out: &mut Vec<u8>, hit_only: bool) -> Option<Handled> {
        let handled = if hit_only {
            if crate::log::enabled() || !answer_hit(&mut self.cache(), frame, now_secs(), out) {
                return None;
            }
            Handled::Reply
        } else {
            if frame.get(1) == Some(&(Op::Del as u8)) {
                if let Ok(m) = protocol::decode(frame) {
                    self.before_removal(m.namespace, m.id);
                }
            }
            // The ticket keys before the cache lock: with a key file they may mean a stat and
            // a read of it, which must not hold up every worker's lookups.
            let mut keys = (frame.get(1) == Some(&(Op::TicketKeys as u8))).then(|| self.ticket_keys());
            let mut cache = self.cache();
            let max_lifetime = self.config.max_lifetime.as_secs();
            let info = |c: &Cache, op: Op| match op {
                Op::TicketKeys => keys.take().unwrap_or_else(|| self.ticket_keys()),
                _ => self.stats_with(c).encode().to_vec(),
            };
            let handled = handle_frame(&mut cache, frame, now_secs(), max_lifetime, info, out);
            drop(cache);
            if let Some(mut unused) = keys.take() {
                // Fetched for a frame that did not decode: key material, wiped.
                wipe(&mut unused);
            }
            if let Some(r) = &self.remote {
                // Stores and removals go to Redis too; a GET that missed is forwarded there
                // and answered later (`answer_remote`), so nothing is sent now.
                r.after_frame(fd, frame, out, now_secs(), max_lifetime);
            }
            handled
        };
        if handled == Handled::Bad {
            self.bad_frames.fetch_add(1, Relaxed);
        }
        if crate::log::enabled() {
            match protocol::decode(frame) {
                Ok(m) => crate::log::debug!(
                    "master: {:?} ns={} id={} payload={}B -> {:?}{}",
                    m.op,
                    String::from_utf8_lossy(m.namespace),
                    crate::log::hex(m.id),
                    m.payload.len(),
                    handled,
                    if out.len() > protocol::HEADER_LEN + m.namespace.len() + m.id.len() { " (hit)" } else { "" }
                ),
                Err(e) => crate::log::debug!("master: bad frame of {} bytes: {e:?}", frame.len()),
            }
        }
        Some(handled)
    }

    /// Send a reply; a lost one is counted. The caller marks a broken channel's `Conn`.
    fn send_reply(&self, fd: RawFd, out: &[u8]) -> Sent {
        let sent = send_nonblocking(fd, out);
        if sent != Sent::Yes {
            self.reply_drops.fetch_add(1, Relaxed);
        }
        sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Conn, OwnedFd) {
        let mut fds = [-1 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two ints for socketpair to fill.
        let rc =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK, 0, fds.as_mut_ptr()) };
        assert_eq!(rc, 0);
        // SAFETY: both are fresh descriptors owned by nobody else.
        unsafe { (Conn::new(OwnedFd::from_raw_fd(fds[0])), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// Pushes counted through `room_for`/`note_sent` never take the worker's unread bytes past
    /// `sync_room`, measured by the kernel after every push, though most of them skip the
    /// measurement; and once the worker reads, the room comes back. Sizes around the slab
    /// steps (where the kernel's charge is furthest above the length) and a near-maximal one.
    #[test]
    fn the_unread_bound_keeps_pushes_within_their_room() {
        for len in [300, 3_800, 4_000, 7_900, 8_200, 16_000, 60_000] {
            let (mut c, peer) = pair();
            let frame = vec![7u8; len];
            let mut sent = 0;
            while c.room_for(frame.len()) {
                let before = unread_bytes(c.raw());
                assert_eq!(send_nonblocking(c.raw(), &frame), Sent::Yes, "{len}: the socket filled before sync_room");
                c.note_sent(frame.len());
                sent += 1;
                let after = unread_bytes(c.raw());
                assert!(after - before <= datagram_charge(len), "{len}: charged {} bytes", after - before);
                assert!(after <= c.sync_room, "{len}: {after} unread > {}", c.sync_room);
                assert!(c.unread_bound >= after);
            }
            assert!(sent >= 1, "{len}: no room at all in {} bytes", c.sync_room);
            // The bound said no, and was measured: it is exact now, and still says no.
            assert_eq!(c.unread_bound, unread_bytes(c.raw()));
            assert!(!c.room_for(frame.len()));
            let mut buf = vec![0u8; MAX_FRAME_LEN + 1];
            // SAFETY: reads into a valid buffer of its length.
            while unsafe { libc::recv(peer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) } > 0 {}
            assert!(c.room_for(frame.len()));
            assert_eq!(c.unread_bound, 0);
        }
    }
}
