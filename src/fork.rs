//! Who this process is (master, worker, neither) and what happens at `fork()`.
//!
//! `master_setup` registers three `pthread_atfork` handlers:
//! - prepare (in the forking thread of the master): make a fresh SOCK_SEQPACKET socketpair and
//!   remember it in a thread-local;
//! - parent: close the worker's end and hand the master's end to the cache thread;
//! - child: adopt the worker's end as this process's channel and close every master-side
//!   descriptor inherited from the master (other workers' channels, the cache thread's
//!   wake-up fd and epoll fd), so no worker can read another worker's traffic.
//!
//! The child handler runs before `fork()` returns to the host, in a process whose only thread
//! is the forking one: it touches only atomics, a const-initialised thread-local and
//! async-signal-safe system calls (`getpid`, `close`). The master-side descriptors it must close
//! are kept in a fixed, lock-free bitmap for that reason.

use std::cell::{Cell, UnsafeCell};
use std::os::fd::RawFd;
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicPtr, AtomicU64,
    Ordering::{Acquire, Relaxed, Release, SeqCst},
};

/// pid of the process that ran `master_setup`, 0 if none.
static MASTER_PID: AtomicI32 = AtomicI32::new(0);
/// The worker end of this process's channel, -1 if none.
static CHANNEL_FD: AtomicI32 = AtomicI32::new(-1);
/// pid of the process that owns `CHANNEL_FD`; a different pid means the fd was inherited.
static CHANNEL_PID: AtomicI32 = AtomicI32::new(0);
/// Set in a child whose parent was a worker: the parent's channel was closed here, and
/// `share_sessions` says so instead of "no master".
static PARENT_CHANNEL_CLOSED: AtomicI32 = AtomicI32::new(0);

/// Master-side descriptors (fd numbers) that every forked child must close.
const FD_BITMAP_WORDS: usize = 16 * 1024;
/// Descriptors at or above this number cannot be tracked, so they are never handed out as
/// channels (the fork proceeds without one and the worker reports `NoMaster`).
pub(crate) const MAX_TRACKED_FD: RawFd = (FD_BITMAP_WORDS * 64) as RawFd;
static MASTER_FDS: [AtomicU64; FD_BITMAP_WORDS] = [const { AtomicU64::new(0) }; FD_BITMAP_WORDS];

thread_local! {
    /// The pair made by `prepare` for the fork in progress on this thread: [master, worker].
    static PENDING: Cell<[RawFd; 2]> = const { Cell::new([-1, -1]) };
    /// Whether this thread holds `FORK_GATE` between `prepare` and `parent`.
    static GATE_HELD: Cell<bool> = const { Cell::new(false) };
}

/// Held by the cache thread while it works (never while it sleeps in `epoll_wait`) and by a
/// forking thread from `prepare` to `parent`. So a fork never snapshots the cache thread in the
/// middle of an allocation: with an allocator that does not make itself fork-safe
/// (AddressSanitizer's, for one) a child could otherwise inherit the allocator's lock held
/// forever. A plain pthread mutex: the child never touches it.
struct ForkGate(UnsafeCell<libc::pthread_mutex_t>);

/// SAFETY: the mutex is only used through pthread_mutex_lock/unlock, which synchronise.
unsafe impl Sync for ForkGate {}

static FORK_GATE: ForkGate = ForkGate(UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER));

/// Enter the cache thread's working section.
pub(crate) fn gate_lock() {
    // SAFETY: a statically initialised mutex, locked and unlocked in pairs.
    unsafe { libc::pthread_mutex_lock(FORK_GATE.0.get()) };
}

/// Leave the cache thread's working section.
pub(crate) fn gate_unlock() {
    // SAFETY: called only by the thread that holds the gate.
    unsafe { libc::pthread_mutex_unlock(FORK_GATE.0.get()) };
}

/// The pid of this process, without a system call once known.
///
/// `getpid` is a real system call in current glibc, and every session callback needs the pid
/// (is this the master? does this process own its channel?). The pid is kept in a page mapped
/// with `MADV_WIPEONFORK`: the kernel gives every child a zero-filled copy of it, whatever
/// made the child (`fork`, `_Fork`, a raw `clone` without `CLONE_VM`: no handler has to run),
/// so a zero means "ask the kernel" and anything else is this process's own pid. A child that
/// shares the parent's memory (`vfork`, `posix_spawn`) may only exec or exit, and never gets
/// here. Without the page (a kernel before 4.14, or a failed `mmap`) every call asks the
/// kernel, as before. Async-signal-safe once the page exists (atomics and `getpid`).
pub fn pid() -> i32 {
    let slot = PID_SLOT.load(Acquire);
    if slot.is_null() {
        // (A load first: after a failed mapping every call comes here, and a read-only
        // check keeps the flag's cache line shared between threads.)
        if !PID_SLOT_CLAIMED.load(Relaxed) && !PID_SLOT_CLAIMED.swap(true, SeqCst) {
            map_pid_slot();
        }
        return getpid();
    }
    // SAFETY: the page is mapped once and never unmapped; it holds one AtomicI32 at its start.
    let slot = unsafe { &*slot };
    match slot.load(Relaxed) {
        0 => {
            let me = getpid();
            slot.store(me, Relaxed);
            me
        }
        me => me,
    }
}

/// The wipe-on-fork page holding this process's pid (null until mapped, or if it cannot be).
static PID_SLOT: AtomicPtr<AtomicI32> = AtomicPtr::new(std::ptr::null_mut());
/// Set by the one caller that maps the page.
static PID_SLOT_CLAIMED: AtomicBool = AtomicBool::new(false);

fn getpid() -> i32 {
    // SAFETY: getpid has no preconditions and cannot fail.
    unsafe { libc::getpid() }
}

fn map_pid_slot() {
    // SAFETY: a fresh private anonymous page; if the kernel refuses MADV_WIPEONFORK it is
    // unmapped again and never published.
    unsafe {
        let page = libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if page == libc::MAP_FAILED {
            return;
        }
        if libc::madvise(page, PAGE, libc::MADV_WIPEONFORK) != 0 {
            libc::munmap(page, PAGE);
            return;
        }
        PID_SLOT.store(page.cast(), Release);
    }
}

/// The size mapped for the pid slot (one page on every Linux target we build for).
const PAGE: usize = 4096;

/// True in the process that ran `master_setup`.
pub fn is_master() -> bool {
    is_master_pid(pid())
}

/// `is_master` for a caller that already knows its pid (one `pid()` per callback, not two).
pub fn is_master_pid(me: i32) -> bool {
    let m = MASTER_PID.load(SeqCst);
    m != 0 && m == me
}

/// True in a descendant of the master (a worker, or a worker's helper).
pub fn is_descendant_of_master() -> bool {
    let m = MASTER_PID.load(SeqCst);
    m != 0 && m != pid()
}

/// The master's pid (0 before `master_setup`, and in a process that only adopted a channel).
pub(crate) fn master_pid() -> i32 {
    MASTER_PID.load(SeqCst)
}

pub(crate) fn set_master_pid(p: i32) {
    MASTER_PID.store(p, SeqCst);
}

/// This process's channel fd, if it owns one.
pub enum ChannelFd {
    /// This process owns the worker end of a channel.
    Owned(RawFd),
    /// An fd is recorded but belongs to the parent process (a worker's helper).
    Inherited,
    /// No channel.
    None,
}

/// What channel this process has.
pub fn channel_fd() -> ChannelFd {
    let fd = CHANNEL_FD.load(SeqCst);
    if fd < 0 {
        if PARENT_CHANNEL_CLOSED.load(SeqCst) == pid() {
            return ChannelFd::Inherited;
        }
        return ChannelFd::None;
    }
    if CHANNEL_PID.load(SeqCst) == pid() {
        ChannelFd::Owned(fd)
    } else {
        ChannelFd::Inherited
    }
}

/// Record `fd` as this process's channel (exec'd workers adopting an inherited descriptor).
pub(crate) fn adopt_channel_fd(fd: RawFd) {
    CHANNEL_PID.store(pid(), SeqCst);
    CHANNEL_FD.store(fd, SeqCst);
}

/// Remember a master-side descriptor so children close it. Returns false when the fd is too
/// large to track (the caller must not hand it out).
pub(crate) fn track_master_fd(fd: RawFd) -> bool {
    if !(0..MAX_TRACKED_FD).contains(&fd) {
        return false;
    }
    MASTER_FDS[fd as usize / 64].fetch_or(1 << (fd % 64), SeqCst);
    true
}

/// Forget a master-side descriptor. Call before closing it, so a concurrent fork never closes
/// a number that was reused for something else.
pub(crate) fn untrack_master_fd(fd: RawFd) {
    if (0..MAX_TRACKED_FD).contains(&fd) {
        MASTER_FDS[fd as usize / 64].fetch_and(!(1 << (fd % 64)), SeqCst);
    }
}

static HANDLERS_INSTALLED: AtomicBool = AtomicBool::new(false);

/// Register the fork handlers, once per process image: by `master_setup`, or by an exec'd
/// worker adopting its channel (so helpers it forks close their copy of it). Children of the
/// master inherit the registration with the rest of the process.
pub(crate) fn install_handlers() -> Result<(), crate::Error> {
    if HANDLERS_INSTALLED.swap(true, SeqCst) {
        return Ok(());
    }
    // SAFETY: the three handlers are `extern "C"` functions with the signature pthread_atfork
    // expects; they never unwind (see each body).
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if rc != 0 {
        return Err(crate::Error::System(format!("pthread_atfork: {}", std::io::Error::from_raw_os_error(rc))));
    }
    Ok(())
}

extern "C" fn prepare() {
    // Only the master hands out channels; a worker forking a helper gets nothing here.
    if !is_master() || !crate::master::accepting_workers() {
        return;
    }
    gate_lock();
    GATE_HELD.with(|g| g.set(true));
    let mut fds = [-1 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints for socketpair to fill.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return; // The child will have no channel: its lookups report NoMaster, nothing worse.
    }
    if fds[1] >= MAX_TRACKED_FD || !track_master_fd(fds[0]) {
        // SAFETY: both fds were just created by socketpair and are owned here.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        return;
    }
    PENDING.with(|p| p.set(fds));
}

extern "C" fn parent() {
    if GATE_HELD.with(|g| g.replace(false)) {
        gate_unlock();
    }
    let [master_end, worker_end] = PENDING.with(|p| p.replace([-1, -1]));
    if master_end < 0 {
        return;
    }
    // SAFETY: `worker_end` was created by `prepare` on this thread and belongs to the child
    // now; the master's copy is closed here exactly once.
    unsafe { libc::close(worker_end) };
    // If fork failed there is no child: the master end will see EOF at once and be closed
    // by the cache thread like any departed worker.
    let handed = std::panic::catch_unwind(|| crate::master::adopt_worker_fd(master_end));
    if handed.is_err() {
        untrack_master_fd(master_end);
        // SAFETY: the fd was not handed over (the closure panicked before taking it).
        unsafe { libc::close(master_end) };
    }
}

extern "C" fn child() {
    // Async-signal-safe only: atomics, a const thread-local, getpid, close.
    let [_master_end, worker_end] = PENDING.with(|p| p.replace([-1, -1]));
    // The gate stays as inherited: this process has no cache thread and never uses it.
    GATE_HELD.with(|g| g.set(false));
    let me = pid();

    // A channel inherited from the parent worker is the parent's: close our copy so a helper
    // can neither read the parent's replies nor keep the channel open after the parent dies.
    let inherited = CHANNEL_FD.load(SeqCst);
    if inherited >= 0 && CHANNEL_PID.load(SeqCst) != me {
        // SAFETY: the fd number was the parent's channel, inherited by this fork; this
        // process never uses it and closes its copy once.
        unsafe { libc::close(inherited) };
        CHANNEL_FD.store(-1, SeqCst);
        CHANNEL_PID.store(0, SeqCst);
        PARENT_CHANNEL_CLOSED.store(me, SeqCst);
    }

    // Every master-side descriptor (all channels' master ends, including the one just made,
    // and the cache thread's wake-up and epoll fds) is closed in the child.
    for (w, word) in MASTER_FDS.iter().enumerate() {
        let mut bits = word.swap(0, SeqCst);
        while bits != 0 {
            let b = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            // SAFETY: the bit was set only while the master owned that fd; the child's copy
            // is closed once and never used.
            unsafe { libc::close((w * 64 + b) as RawFd) };
        }
    }

    if worker_end >= 0 {
        CHANNEL_PID.store(me, SeqCst);
        CHANNEL_FD.store(worker_end, SeqCst);
    } else {
        // Not a worker of this master (a worker's helper): no access to the session ring.
        crate::ring::forget_in_child();
    }
    crate::stats::WORKER.reset();
    crate::channel::forget_parent_channel();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child made by the raw `clone` system call (no libc wrapper, so no fork handler runs)
    /// still sees its own pid, not the parent's cached one.
    #[test]
    fn a_child_made_behind_libcs_back_sees_its_own_pid() {
        let parent = pid();
        assert_eq!(parent, getpid());
        assert_eq!(pid(), parent);
        assert!(!PID_SLOT.load(Acquire).is_null(), "no MADV_WIPEONFORK page: every pid() is a system call");
        // SAFETY: a plain fork through the system call; the child only reads atomics, makes
        // system calls and leaves with _exit.
        let child = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0) };
        if child == 0 {
            // SAFETY: system calls only.
            let own = unsafe { libc::syscall(libc::SYS_getpid) } as i32;
            let ok = pid() == own && own != parent && pid() == own;
            // SAFETY: leaves the child without running the test harness's atexit handlers.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        assert!(child > 0, "clone failed");
        let mut status = 0;
        // SAFETY: waits for the child made above.
        unsafe { libc::waitpid(child as i32, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the child saw the wrong pid ({status:#x})");
        assert_eq!(pid(), parent);
    }
}
