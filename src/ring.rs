//! The session ring: new sessions go from the worker that made them to every other process
//! of the cluster through shared memory, with no system call and no wake-up.
//!
//! Why: a TLS 1.3 resumption issues a new ticket, so every resumed handshake stores a
//! session. Sent over the channel, each store woke the master (a context switch into another
//! process), which then pushed it to the other workers' replicas: 6 % of the server's CPU per
//! resumption, measured. In the ring, a store is a copy into a slot; the other workers read it
//! at their next lookup (a few loads when nothing is new), and the master reads it whenever
//! it wakes anyway, once a second, or when a writer finds a quarter of the ring unread by it
//! (then that writer sends it one `Op::Nudge`). With the remote tier on, writers nudge the
//! master for every store it has not read yet, so sessions reach Redis (and other hosts) at
//! once.
//!
//! Order with removals: a removal still goes to the master, which pushes it to the replicas
//! with how far it had read the ring (`Op::Sync`'s request id); a worker reads the ring that
//! far before applying it, so a store never lands after its own removal. A store the reads
//! have not reached when its removal is applied (a writer ahead of it is still writing) is
//! skipped when it is read later (`Tombstones`). A Flush (pushes were lost) also skips the
//! ring to its head.
//!
//! Layout: one `MAP_SHARED | MAP_ANONYMOUS` mapping made by `master_setup` before any fork,
//! so only the master and its workers have it (a worker's own children unmap it, and it does
//! not survive `exec`). A header page, then `slots` fixed slots of `SLOT_BYTES`. A record is a
//! whole PUT frame (`protocol::encode`), decoded and checked by its reader like one off the
//! socket; a session too large for a slot goes over the channel as before.
//!
//! Concurrency: writers take the next sequence number from `head` (one atomic add), then
//! claim the slot `seq % slots` by moving its state from "published" (or empty) to "being
//! written by seq"; a slot still being written by a writer one lap behind is left alone and
//! the record goes over the channel instead, so no two writers ever share a slot. Readers
//! never lock: each keeps its own cursor and checks a slot's state before and after copying
//! it (a sequence lock), so a record overwritten while it was read is skipped, never half
//! used. Readers that fall a whole lap behind skip what was overwritten: those sessions are
//! replica misses (asked of the master) or, for the master, counted as lost.
//!
//! Secrets: the master wipes every slot it read a tick (one second) earlier, so a session
//! stays in shared memory for one to two seconds; a worker that reads later finds it gone and
//! asks the master. A slot a worker claimed and then died in (killed half way through its
//! record) is zeroed and freed by the sweeps once that worker's pid is gone (`HeldSlots`).
//! Once the master itself is gone, the workers wipe the ring as they notice.

use std::ptr;
use std::sync::atomic::{
    fence, AtomicPtr, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release, Ordering::SeqCst,
};
use std::time::{Duration, Instant};

/// Bytes per slot: the state, the writer and length word, then the record.
pub(crate) const SLOT_BYTES: usize = 512;
const DATA_WORDS: usize = SLOT_BYTES / 8 - 2;
/// Longest record a slot holds.
pub(crate) const MAX_RECORD: usize = DATA_WORDS * 8;
/// Size of the header before the slots (a page, so the slots start page-aligned).
const HEADER_BYTES: usize = 4096;
/// How long a reader waits, at most, for a writer that claimed a slot to publish it before
/// it skips that record (a writer that died half way, or was descheduled).
const STALL_LIMIT: Duration = Duration::from_millis(50);
/// How many times a writer looks again at a slot the master's sweep is wiping (a few stores,
/// well under a microsecond) before it gives the record to the channel instead.
const WIPE_SPINS: u32 = 200;

#[repr(C)]
struct Header {
    /// The next sequence number a writer takes.
    head: AtomicU64,
    _pad: [u64; 7],
    /// How far the master has read (a writer nudges it when a quarter of the ring is unread).
    master_cursor: AtomicU64,
    /// 1 once a writer nudged the master, until the master read again.
    nudged: AtomicU64,
    /// 1: nudge the master for every record it has not read (set when the remote tier is on,
    /// so a session reaches Redis, and other hosts, at once).
    eager: AtomicU64,
    _pad2: [u64; 5],
    /// Pushes (`Op::Sync`, `Op::Flush`) the master has sent to its workers, counted twice
    /// each: odd while a send is under way, even once it returned (`Ring::counted_push`). A
    /// worker that finds an even count where its last full read of its socket left it has
    /// no push to read, and skips the `recv` (see `Channel::drain_now`). On a cache line of
    /// its own: every lookup reads it, only the master writes it, and only per push.
    pushes: AtomicU64,
}

#[repr(C)]
struct Slot {
    /// 0: empty; 2·seq + 1: being written (or wiped) by seq; 2·seq + 2: seq published.
    state: AtomicU64,
    /// The writer's pid, the record's length and the low bits of the writer's sequence number
    /// (`Meta`), in one store right after the claim.
    meta: AtomicU64,
    data: [AtomicU64; DATA_WORDS],
}

const _: () = assert!(std::mem::size_of::<Slot>() == SLOT_BYTES);

/// A slot's meta word: the writer's pid (22 bits: Linux pids are below 2^22), the record's
/// length (9 bits: at most `MAX_RECORD`) and the low 33 bits of the writer's sequence number.
/// The sequence bits tell whether the word is the current holder's: a slot is claimed before
/// its meta word is written, so until then the word is the record before's (see
/// `Ring::reclaim_if_writer_gone`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Meta {
    pid: i32,
    len: usize,
    seq_tag: u64,
}

const META_PID_BITS: u32 = 22;
const META_LEN_BITS: u32 = 9;
const META_TAG_SHIFT: u32 = META_PID_BITS + META_LEN_BITS;
const _: () = assert!(MAX_RECORD < 1 << META_LEN_BITS);

impl Meta {
    fn pack(pid: i32, len: usize, seq: u64) -> u64 {
        (pid as u32 as u64 & ((1 << META_PID_BITS) - 1))
            | ((len as u64 & ((1 << META_LEN_BITS) - 1)) << META_PID_BITS)
            | (seq << META_TAG_SHIFT)
    }

    fn unpack(word: u64) -> Meta {
        Meta {
            pid: (word & ((1 << META_PID_BITS) - 1)) as i32,
            len: ((word >> META_PID_BITS) & ((1 << META_LEN_BITS) - 1)) as usize,
            seq_tag: word >> META_TAG_SHIFT,
        }
    }

    /// Whether this word was written for `seq`.
    fn is_for(&self, seq: u64) -> bool {
        self.seq_tag == (seq << META_TAG_SHIFT) >> META_TAG_SHIFT
    }
}

/// `pid` as it is kept in a meta word (pids above 22 bits, which Linux does not make, would
/// be cut).
fn meta_pid(pid: i32) -> i32 {
    Meta::unpack(Meta::pack(pid, 0, 0)).pid
}
const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_BYTES);

/// The mapping. Made once in the master and inherited by every worker.
pub(crate) struct Ring {
    base: *mut u8,
    len: usize,
    slots: u64,
}

// SAFETY: the mapping is only ever accessed through atomics.
unsafe impl Sync for Ring {}
// SAFETY: as above; the pointer is to a mapping that lives as long as the process.
unsafe impl Send for Ring {}

/// A slot's state while `seq` writes (or the master wipes) it. Wrapping: a head scribbled
/// over by a hostile process must not make arithmetic panic.
fn writing(seq: u64) -> u64 {
    seq.wrapping_mul(2).wrapping_add(1)
}

/// A slot's state once `seq` is published in it.
fn published(seq: u64) -> u64 {
    seq.wrapping_mul(2).wrapping_add(2)
}

static RING: AtomicPtr<Ring> = AtomicPtr::new(ptr::null_mut());

/// Slots for a replica budget of `replica_bytes`: half the budget, a power of two between
/// 512 and 32768 slots (256 KiB to 16 MiB).
pub(crate) fn slots_for(replica_bytes: usize) -> u64 {
    let want = (replica_bytes / 2 / SLOT_BYTES).clamp(512, 32768) as u64;
    if want.is_power_of_two() {
        want
    } else {
        want.next_power_of_two() / 2
    }
}

/// Map the ring (in the master, before it forks). Idempotent; an error leaves no ring, and
/// the cluster then carries every store over the channels.
///
/// `eager`: see `Header::eager`.
pub(crate) fn create(slots: u64, eager: bool) -> Result<(), crate::Error> {
    if !RING.load(Acquire).is_null() {
        return Ok(());
    }
    let ring = Ring::map(slots)?;
    ring.header().eager.store(u64::from(eager), Relaxed);
    let ring = Box::into_raw(Box::new(ring));
    if RING.compare_exchange(ptr::null_mut(), ring, Release, Acquire).is_err() {
        // SAFETY: `ring` was never published; dropping it unmaps it.
        drop(unsafe { Box::from_raw(ring) });
    }
    Ok(())
}

/// The ring, in the master and in the workers it forked.
pub(crate) fn get() -> Option<&'static Ring> {
    // SAFETY: a published ring is never freed (only forgotten in a child, see below).
    unsafe { RING.load(Acquire).as_ref() }
}

/// In a child that is not a worker (a worker's helper): unmap the ring. Called from the fork
/// child handler, so async-signal-safe only: an atomic swap and `munmap`.
pub(crate) fn forget_in_child() {
    let p = RING.swap(ptr::null_mut(), Relaxed);
    // SAFETY: a non-null RING points to the (inherited copy of the) leaked Ring; its mapping
    // is unmapped once here, and nothing in this process reaches it afterwards.
    if let Some(r) = unsafe { p.as_ref() } {
        // SAFETY: see above: this process's copy of the mapping, unmapped once.
        unsafe { libc::munmap(r.base.cast(), r.len) };
    }
}

/// What `Ring::publish` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Published {
    /// In the ring; `nudge`: this writer should wake the master (`Op::Nudge`).
    Yes { nudge: bool },
    /// Not in the ring (too long for a slot, or the slot is still being written one lap
    /// behind): send it over the channel.
    No,
}

/// A reader's position, and the slot it found half written, since when.
#[derive(Debug)]
pub(crate) struct Cursor {
    pub(crate) next: u64,
    stall: Option<(u64, Instant)>,
}

impl Cursor {
    /// A cursor at the ring's first record (for a process without a ring).
    pub(crate) fn start() -> Cursor {
        Cursor { next: 0, stall: None }
    }
}

/// Removals that ring records not yet read must not undo.
///
/// A session put into the ring and removed soon after (a fatal alert on the connection that
/// made it) can be removed before a reader has read its record: a writer that took an earlier
/// sequence number and has not published it yet holds every reader there (see `Ring::read`),
/// and a removal may also be applied between two reads. Read afterwards, the record would bring
/// the removed session back, into the master's cache, Redis and every replica. So a reader
/// that applies a removal while records are still unread notes the key with the ring's head at
/// that moment; a record of that key below that position was stored before the removal and is
/// skipped. (The writer took the record's sequence number before it sent the removal, so the
/// head the removal is applied at is past it.) A note goes once the reader has read past it:
/// notes live only while a reader waits on a half-written record, at most `STALL_LIMIT`, or
/// between two reads. At most `MAX_TOMBSTONES` are kept, the oldest dropped first; filling
/// them takes that many removals within one stall. Session ids are not secret (clients send
/// them in the clear), so the notes are not wiped.
#[derive(Debug, Default)]
pub(crate) struct Tombstones {
    /// (the head at the removal, namespace length, then namespace and id)
    notes: Vec<(u64, Box<[u8]>)>,
}

/// See `Tombstones`.
pub(crate) const MAX_TOMBSTONES: usize = 1024;

fn tomb_key_eq(key: &[u8], namespace: &[u8], id: &[u8]) -> bool {
    key.len() == 1 + namespace.len() + id.len()
        && usize::from(key[0]) == namespace.len()
        && &key[1..1 + namespace.len()] == namespace
        && &key[1 + namespace.len()..] == id
}

impl Tombstones {
    /// A removal of (`namespace`, `id`) applied when the ring's head was `before`, by a reader
    /// that had read up to `read_to`; nothing to note when it had read everything.
    pub(crate) fn note(&mut self, namespace: &[u8], id: &[u8], before: u64, read_to: u64) {
        if read_to >= before || namespace.len() > usize::from(u8::MAX) {
            return;
        }
        if self.notes.len() >= MAX_TOMBSTONES {
            self.notes.remove(0);
        }
        let mut key = Vec::with_capacity(1 + namespace.len() + id.len());
        key.push(namespace.len() as u8);
        key.extend_from_slice(namespace);
        key.extend_from_slice(id);
        self.notes.push((before, key.into_boxed_slice()));
    }

    /// Whether the record at `seq` of (`namespace`, `id`) was stored before a removal of it.
    pub(crate) fn buries(&self, namespace: &[u8], id: &[u8], seq: u64) -> bool {
        self.notes.iter().any(|(before, key)| seq < *before && tomb_key_eq(key, namespace, id))
    }

    /// The reader has read (or skipped) every record before `read_to`.
    pub(crate) fn forget_read(&mut self, read_to: u64) {
        if !self.notes.is_empty() {
            self.notes.retain(|(before, _)| *before > read_to);
        }
    }

    /// Every note (a reader that jumps to the head).
    pub(crate) fn clear(&mut self) {
        self.notes.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.notes.len()
    }
}

/// Slots the master's sweeps found held by a writer (state odd), to free those whose writer
/// died half way.
///
/// A worker killed (SIGKILL, the OOM killer, a crash in another thread) between claiming a
/// slot and publishing it would hold the slot for good: its part of a session would never be
/// wiped from shared memory, and every later lap's writer would find the slot taken and send
/// its record over the channel instead. Readers already skip such a record after
/// `STALL_LIMIT`. A slot seen held with the same state at two sweeps in a row (a second
/// apart) whose writer's pid no longer exists is zeroed and freed (`Ring::reclaim_if_writer_gone`).
/// Not freed: a slot whose writer died before it wrote its meta word (a window of a few
/// instructions; the word is then the record before's, and says so), and a writer whose pid
/// was reused meanwhile.
#[derive(Debug, Default)]
pub(crate) struct HeldSlots {
    /// (slot index, state, sweeps in a row it was seen so)
    seen: Vec<(u64, u64, u32)>,
}

/// Held slots `HeldSlots` follows at most (more are looked at by later sweeps).
const MAX_HELD: usize = 256;

impl HeldSlots {
    /// One sweep: wipe the records `from..to` (`Ring::wipe_range`) and free the slots dead
    /// writers hold. Returns (records wiped, slots freed).
    pub(crate) fn sweep(&mut self, ring: &Ring, from: u64, to: u64) -> (u64, u64) {
        let before = std::mem::take(&mut self.seen);
        let mut now_held = Vec::new();
        let wiped = ring.wipe_range_noting(from, to, |index, state| {
            if now_held.len() < MAX_HELD {
                now_held.push((index, state));
            }
        });
        let mut freed = 0;
        for (index, state) in now_held {
            let times = before.iter().find(|h| h.0 == index && h.1 == state).map_or(1, |h| h.2 + 1);
            if times >= 2 && ring.reclaim_if_writer_gone(index, state) {
                freed += 1;
            } else {
                self.seen.push((index, state, times));
            }
        }
        (wiped, freed)
    }
}

/// What `Ring::copy_published` found in a slot.
enum Copied {
    /// The record, this many bytes of the buffer.
    Record(usize),
    /// Written by the process asked to be skipped.
    Skipped,
    /// Overwritten or wiped while it was copied.
    Changed,
}

/// What one `Ring::read` saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ReadCount {
    /// Records handed to the reader.
    pub(crate) records: u64,
    /// Records skipped: overwritten before this reader got to them, or never published.
    pub(crate) lost: u64,
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the mapping made by `map`, unmapped once (a published ring is never dropped).
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

impl Ring {
    /// A fresh, empty ring of `slots` (rounded up to a power of two) in its own mapping.
    pub(crate) fn map(slots: u64) -> Result<Ring, crate::Error> {
        let slots = slots.max(2).next_power_of_two();
        let len = HEADER_BYTES + slots as usize * SLOT_BYTES;
        // SAFETY: an anonymous shared mapping with no address hint; the result is checked.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(crate::Error::system("mmap of the session ring"));
        }
        // Zero-filled by the kernel: every slot empty, head 0. Kept out of core dumps.
        // SAFETY: advice on our own fresh mapping; failure changes nothing else.
        unsafe { libc::madvise(base, len, libc::MADV_DONTDUMP) };
        Ok(Ring { base: base.cast(), len, slots })
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping starts with a zero-initialised Header; only atomics inside.
        unsafe { &*self.base.cast::<Header>() }
    }

    fn slot(&self, seq: u64) -> &Slot {
        let i = (seq & (self.slots - 1)) as usize;
        // SAFETY: `i < slots`, each slot is SLOT_BYTES inside the mapping after the header;
        // only atomics inside.
        unsafe { &*self.base.add(HEADER_BYTES + i * SLOT_BYTES).cast::<Slot>() }
    }

    /// Slots holding any byte of a record (published, half written or not yet wiped): for
    /// tests of the wipes.
    pub(crate) fn slots_holding_data(&self) -> u64 {
        let held = |i: u64| {
            let slot = self.slot(i);
            slot.meta.load(Relaxed) != 0 || slot.data.iter().any(|w| w.load(Relaxed) != 0)
        };
        (0..self.slots).filter(|&i| held(i)).count() as u64
    }

    /// The next sequence number to be written.
    pub(crate) fn head(&self) -> u64 {
        self.header().head.load(Acquire)
    }

    /// Run `send`, a push to a worker, counted in `Header::pushes`: the count is odd from
    /// before the frame can be on the socket until after the send returned, so a worker
    /// reads its socket whenever it may hold a push it has not read.
    pub(crate) fn counted_push<T>(&self, send: impl FnOnce() -> T) -> T {
        let pushes = &self.header().pushes;
        pushes.fetch_add(1, SeqCst);
        let out = send();
        pushes.fetch_add(1, SeqCst);
        out
    }

    /// The push count (see `Header::pushes`): odd while a push is being sent.
    pub(crate) fn pushes(&self) -> u64 {
        self.header().pushes.load(SeqCst)
    }

    /// A cursor that starts with the next record written.
    pub(crate) fn cursor_at_head(&self) -> Cursor {
        Cursor { next: self.head(), stall: None }
    }

    /// Put one record (a PUT frame) into the ring, as written by `pid`.
    pub(crate) fn publish(&self, pid: i32, record: &[u8]) -> Published {
        if record.is_empty() || record.len() > MAX_RECORD {
            return Published::No;
        }
        let h = self.header();
        let seq = h.head.fetch_add(1, Relaxed);
        let slot = self.slot(seq);
        let mut spins = 0;
        loop {
            let cur = slot.state.load(Relaxed);
            // After a lap-long stall of ours, already holding a newer record: leave it.
            if cur >= writing(seq) {
                return Published::No;
            }
            // Free (even): claim it. Held (odd) by the master's sweep for the few stores of its
            // wipe, or by a writer a lap behind: look again a little rather than leave a hole,
            // which readers wait for (see `read`); still held after that, the slot stays with
            // its holder and the record goes to the channel.
            if cur & 1 == 0 && slot.state.compare_exchange(cur, writing(seq), Acquire, Relaxed).is_ok() {
                break;
            }
            spins += 1;
            if spins > WIPE_SPINS {
                return Published::No;
            }
            std::hint::spin_loop();
        }
        self.write_claimed(seq, pid, record);
        let unread = seq.wrapping_add(1).saturating_sub(h.master_cursor.load(Relaxed));
        let due = unread >= self.slots / 4 || h.eager.load(Relaxed) != 0;
        // SeqCst, paired with the master's swap in `master_read_to`: see there.
        let nudge = due && h.nudged.swap(1, SeqCst) == 0;
        Published::Yes { nudge }
    }

    /// Write `record` into the slot of `seq`, which this writer has claimed, and publish it.
    fn write_claimed(&self, seq: u64, pid: i32, record: &[u8]) {
        self.write_words(seq, pid, record);
        self.slot(seq).state.store(published(seq), Release);
    }

    /// Write the meta word and `record` into the slot of `seq`, claimed by this writer.
    fn write_words(&self, seq: u64, pid: i32, record: &[u8]) {
        let slot = self.slot(seq);
        // Readers that see any byte below also see the odd state when they check again.
        fence(Release);
        slot.meta.store(Meta::pack(pid, record.len(), seq), Relaxed);
        for (w, chunk) in slot.data.iter().zip(record.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            w.store(u64::from_le_bytes(b), Relaxed);
        }
    }

    /// A writer that has taken a sequence number and claimed its slot but not written it yet
    /// (as if descheduled there): for tests of what readers do meanwhile.
    #[cfg(test)]
    pub(crate) fn claim_unpublished(&self) -> u64 {
        let seq = self.header().head.fetch_add(1, Relaxed);
        self.slot(seq).state.store(writing(seq), Relaxed);
        seq
    }

    /// The writer of `claim_unpublished` writes its pid and `record` but does not publish (as
    /// if killed there).
    #[cfg(test)]
    pub(crate) fn write_unpublished(&self, seq: u64, pid: i32, record: &[u8]) {
        self.write_words(seq, pid, record);
    }

    /// The writer of `claim_unpublished` goes on: it writes `record` and publishes it.
    #[cfg(test)]
    pub(crate) fn publish_claimed(&self, seq: u64, pid: i32, record: &[u8]) {
        self.write_claimed(seq, pid, record);
    }

    /// Hand `each` every record published from `cur` on, up to the head, except those
    /// written by `skip_pid`; `cur` moves past them. A record being written now ends the read
    /// (it is read next time), unless it is below `settled` (a position the master already
    /// read past), has been half written for `STALL_LIMIT`, or is half a lap behind the head:
    /// then it is skipped. `each` gets the record's sequence number and the record, in a
    /// buffer wiped right after.
    ///
    /// A record whose writer has taken its sequence number (the head is past it) but not yet
    /// marked its slot still shows the slot's older content (a record of an earlier lap, or
    /// nothing): where the master has not read yet, that is a record about to be written,
    /// waited for as one being written. (Reading on counted it lost and the session never
    /// reached that reader: 0.1-1 % of stores at W=4 in the channel bench, where a writer
    /// descheduled between the two steps holds the window open.) Below the master's cursor
    /// the same content means the record was read and wiped, or overwritten: skipped.
    pub(crate) fn read(
        &self,
        cur: &mut Cursor,
        settled: u64,
        skip_pid: i32,
        mut each: impl FnMut(u64, &[u8]),
    ) -> ReadCount {
        let mut count = ReadCount::default();
        let head = self.head();
        if head < cur.next {
            // Only a process that scribbled over the header can move the head back: start
            // again from where it says.
            cur.next = head;
        }
        if head == cur.next {
            // Nothing new (most lookups): no buffer to zero, no slot to touch.
            return count;
        }
        if head - cur.next > self.slots {
            let from = head - self.slots;
            count.lost += from - cur.next;
            cur.next = from;
        }
        let mut buf = [0u8; MAX_RECORD];
        let master_read = self.header().master_cursor.load(Acquire);
        while cur.next < head {
            let seq = cur.next;
            let slot = self.slot(seq);
            let s1 = slot.state.load(Acquire);
            let not_yet_marked = s1 & 1 == 0 && s1 < writing(seq) && seq >= master_read;
            if s1 == writing(seq) || not_yet_marked {
                // Being written, or about to be, for this very record.
                let now = Instant::now();
                let stalled = match cur.stall {
                    Some((at, since)) if at == seq => now.duration_since(since) >= STALL_LIMIT,
                    _ => {
                        cur.stall = Some((seq, now));
                        false
                    }
                };
                if !(seq < settled || stalled || head - seq > self.slots / 2) {
                    break;
                }
                count.lost += 1;
                cur.next += 1;
                continue;
            }
            cur.next += 1;
            if s1 != published(seq) {
                // Overwritten by a later lap, wiped, or never published.
                count.lost += 1;
                continue;
            }
            match self.copy_published(seq, s1, skip_pid, &mut buf) {
                Copied::Record(len) => {
                    each(seq, &buf[..len]);
                    count.records += 1;
                    crate::wipe::wipe(&mut buf[..len]);
                }
                Copied::Skipped => {}
                Copied::Changed => count.lost += 1,
            }
        }
        count
    }

    /// Copy the record of `seq`, whose slot state was `s1 == published(seq)`, into `buf`
    /// under the slot's sequence lock (`buf` is wiped again if the record changed meanwhile).
    fn copy_published(&self, seq: u64, s1: u64, skip_pid: i32, buf: &mut [u8; MAX_RECORD]) -> Copied {
        let slot = self.slot(seq);
        let meta = Meta::unpack(slot.meta.load(Relaxed));
        let len = meta.len.min(MAX_RECORD);
        if skip_pid != 0 && meta.pid == meta_pid(skip_pid) {
            return Copied::Skipped;
        }
        for (w, chunk) in slot.data.iter().zip(buf[..len].chunks_mut(8)) {
            let b = w.load(Relaxed).to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        fence(Acquire);
        if slot.state.load(Relaxed) != s1 {
            crate::wipe::wipe(&mut buf[..len]);
            return Copied::Changed;
        }
        Copied::Record(len)
    }

    /// Hand `each` every record published from `from` up to the head, without a cursor and
    /// without stopping at a record still being written: for a reader whose in-order read
    /// stops at such a record (a writer descheduled between taking its sequence number and
    /// publishing holds every reader there) and that needs one record behind it now. Records
    /// not published yet are passed over; the in-order read gets them later. Returns how
    /// many records `each` got.
    pub(crate) fn read_ahead(&self, from: u64, mut each: impl FnMut(u64, &[u8])) -> u64 {
        let head = self.head();
        let mut buf = [0u8; MAX_RECORD];
        let mut n = 0;
        for seq in from.max(head.saturating_sub(self.slots))..head {
            let s1 = self.slot(seq).state.load(Acquire);
            if s1 != published(seq) {
                continue;
            }
            if let Copied::Record(len) = self.copy_published(seq, s1, 0, &mut buf) {
                each(seq, &buf[..len]);
                n += 1;
                crate::wipe::wipe(&mut buf[..len]);
            }
        }
        n
    }

    /// The master read up to `next`: clear the nudge, so the next quarter ring of stores
    /// nudges it again. Returns true if records were published meanwhile whose writer saw
    /// the old nudge and sent none: the master must read again. (A swap, so it synchronises
    /// with every writer's swap before it: their records are visible to that read.)
    pub(crate) fn master_read_to(&self, next: u64) -> bool {
        let h = self.header();
        h.master_cursor.store(next, Release);
        h.nudged.swap(0, SeqCst);
        self.head() != next
    }

    /// Wipe the slots of records `from..to` (those still holding exactly that record).
    pub(crate) fn wipe_range(&self, from: u64, to: u64) -> u64 {
        self.wipe_range_noting(from, to, |_, _| {})
    }

    /// `wipe_range`, and `held(slot index, state)` for every slot of the range found held by
    /// a writer (its state odd): see `HeldSlots`.
    fn wipe_range_noting(&self, from: u64, to: u64, mut held: impl FnMut(u64, u64)) -> u64 {
        let from = from.max(to.saturating_sub(self.slots));
        let mut wiped = 0;
        for seq in from..to {
            let slot = self.slot(seq);
            // A plain load first: most slots of the range are wiped already or hold a newer
            // record, and a failed compare-exchange is still a locked instruction.
            let state = slot.state.load(Relaxed);
            if state & 1 == 1 {
                held(seq & (self.slots - 1), state);
                continue;
            }
            // The record of `seq`, or one of an older lap still there: a writer delayed by
            // more than a lap that found the slot wiped published it below every later sweep's
            // range, and would keep it there until the slot is written again.
            let Some(held_seq) = (state / 2).checked_sub(1) else { continue };
            if held_seq >= to || slot.state.compare_exchange(state, writing(held_seq), Acquire, Relaxed).is_err() {
                continue;
            }
            self.zero(slot);
            slot.state.store(0, Release);
            wiped += 1;
        }
        wiped
    }

    /// Zero a slot's record words; the caller holds the slot (its state odd).
    fn zero(&self, slot: &Slot) {
        fence(Release);
        slot.meta.store(0, Relaxed);
        for w in &slot.data {
            w.store(0, Relaxed);
        }
    }

    /// Free the slot at `index` if it is still in `state` (held, odd) and the writer holding
    /// it is gone: a worker killed between claiming the slot and publishing. What that writer
    /// wrote (part of a session) is zeroed and the slot can be claimed again. A writer still
    /// alive (descheduled, stopped) keeps its slot: it will write on.
    ///
    /// The holder is known only once it wrote its meta word, whose sequence bits then match
    /// the claim's: until then the word is the record before's, whose writer may have exited
    /// although the holder lives (a worker stopped right after its claim). Such a slot is left.
    fn reclaim_if_writer_gone(&self, index: u64, state: u64) -> bool {
        let slot = self.slot(index);
        if state & 1 == 0 || slot.state.load(Acquire) != state {
            return false;
        }
        let word = slot.meta.load(Relaxed);
        let meta = Meta::unpack(word);
        if !meta.is_for(state / 2) {
            return false;
        }
        // SAFETY: kill with signal 0 only checks whether the pid exists.
        let gone = meta.pid > 0
            && unsafe { libc::kill(meta.pid, 0) } == -1
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if !gone {
            return false;
        }
        // Looked at again now that its writer is known dead: had it published (and another
        // writer claimed the slot since) before it died, the slot is no longer its. A dead
        // writer stores nothing more, so what is seen now stays until we change it.
        if slot.state.load(Acquire) != state || slot.meta.load(Relaxed) != word {
            return false;
        }
        // Nobody else claims an odd slot, and its writer is dead: ours to wipe and release.
        self.zero(slot);
        slot.state.compare_exchange(state, 0, Release, Relaxed).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid no process has now (from the top of the pid range down, where the kernel hands
    /// pids out last).
    fn gone_pid() -> i32 {
        let max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(32768);
        // SAFETY: kill with signal 0 only checks whether the pid exists.
        (2..max)
            .rev()
            .find(|&p| unsafe { libc::kill(p, 0) } == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH))
            .expect("a free pid")
    }

    #[test]
    fn a_live_writer_stopped_before_its_meta_word_keeps_its_slot_whoever_wrote_the_slot_before() {
        // Found in review: the meta word still names the record before's writer until the
        // holder writes its own, and that writer may have exited (worker recycling). Freeing
        // the slot then gave it to a second writer while the first would write on.
        let r = Ring::map(4).unwrap();
        let exited = gone_pid();
        for n in 0..4u8 {
            assert!(matches!(r.publish(exited, &rec(n, 8)), Published::Yes { .. }));
        }
        // A live writer takes sequence 4 and claims its slot (sequence 0's record, not wiped
        // yet), then stops before its meta store.
        let seq = r.header().head.fetch_add(1, Relaxed);
        let before = r.slot(seq).state.load(Relaxed);
        assert!(r.slot(seq).state.compare_exchange(before, writing(seq), Acquire, Relaxed).is_ok());
        let mut held = HeldSlots::default();
        for _ in 0..3 {
            assert_eq!(held.sweep(&r, 0, 4).1, 0, "the live writer's slot was freed");
        }
        assert_eq!(r.slot(seq).state.load(Relaxed), writing(seq));
        // It goes on, publishes, and the record reads whole.
        r.write_claimed(seq, 7, &rec(9, 30));
        let mut cur = Cursor { next: seq, stall: None };
        let (got, _) = read_all(&r, &mut cur, 0, 0);
        assert_eq!(got, vec![rec(9, 30)]);
    }

    #[test]
    fn meta_words_keep_pid_length_and_sequence_apart() {
        let m = Meta::unpack(Meta::pack(4_194_303, MAX_RECORD, (1 << 40) + 5));
        assert_eq!((m.pid, m.len), (4_194_303, MAX_RECORD));
        assert!(m.is_for((1 << 40) + 5) && !m.is_for((1 << 40) + 4) && !m.is_for(5 + 4));
        assert_eq!(meta_pid(1234), 1234);
    }

    fn rec(n: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| n.wrapping_add(i as u8)).collect()
    }

    fn read_all(r: &Ring, cur: &mut Cursor, settled: u64, skip: i32) -> (Vec<Vec<u8>>, ReadCount) {
        let mut got = Vec::new();
        let n = r.read(cur, settled, skip, |_, b| got.push(b.to_vec()));
        (got, n)
    }

    #[test]
    fn tombstones_bury_only_older_records_of_their_key_until_read_past() {
        let mut t = Tombstones::default();
        t.note(b"ns", b"id", 10, 10);
        assert_eq!(t.len(), 0, "everything before the removal was read: nothing to note");
        t.note(b"ns", b"id", 10, 7);
        assert!(t.buries(b"ns", b"id", 9), "stored before the removal");
        assert!(!t.buries(b"ns", b"id", 10), "stored after it");
        assert!(!t.buries(b"ns", b"other", 9) && !t.buries(b"n", b"sid", 9), "another key");
        t.forget_read(9);
        assert_eq!(t.len(), 1, "record 9 not read yet");
        t.forget_read(10);
        assert_eq!(t.len(), 0, "read past it");
        for i in 0..MAX_TOMBSTONES as u64 + 5 {
            t.note(b"ns", &i.to_le_bytes(), 100, 0);
        }
        assert_eq!(t.len(), MAX_TOMBSTONES, "bounded");
        assert!(!t.buries(b"ns", &0u64.to_le_bytes(), 1), "the oldest went first");
        assert!(t.buries(b"ns", &(MAX_TOMBSTONES as u64 + 4).to_le_bytes(), 1));
    }

    #[test]
    fn read_ahead_gets_the_records_behind_a_half_written_one_and_moves_nothing() {
        let r = Ring::map(16).unwrap();
        let mut cur = r.cursor_at_head();
        let stalled = r.claim_unpublished();
        r.publish(1, &rec(1, 20));
        r.publish(2, &rec(2, 20));
        assert!(read_all(&r, &mut cur, 0, 0).0.is_empty(), "the in-order read waits");
        let mut got = Vec::new();
        assert_eq!(r.read_ahead(cur.next, |seq, b| got.push((seq, b.to_vec()))), 2);
        assert_eq!(got, vec![(stalled + 1, rec(1, 20)), (stalled + 2, rec(2, 20))]);
        assert_eq!(cur.next, stalled, "no cursor moved");
        r.publish_claimed(stalled, 3, &rec(0, 20));
        assert_eq!(read_all(&r, &mut cur, 0, 0).0, vec![rec(0, 20), rec(1, 20), rec(2, 20)], "then in order");
    }

    #[test]
    fn slots_follow_the_replica_budget() {
        assert_eq!(slots_for(0), 512);
        assert_eq!(slots_for(4 << 20), 4096);
        assert_eq!(slots_for(5 << 20), 4096);
        assert_eq!(slots_for(1 << 40), 32768);
    }

    #[test]
    fn records_come_back_in_order_except_the_readers_own() {
        let r = Ring::map(8).unwrap();
        let mut cur = r.cursor_at_head();
        for (pid, n, len) in [(10, 1u8, 1usize), (11, 2, 100), (10, 3, MAX_RECORD), (12, 4, 7)] {
            assert!(matches!(r.publish(pid, &rec(n, len)), Published::Yes { .. }));
        }
        let (got, n) = read_all(&r, &mut cur, 0, 10);
        assert_eq!(got, vec![rec(2, 100), rec(4, 7)]);
        assert_eq!(n, ReadCount { records: 2, lost: 0 });
        assert_eq!(cur.next, 4);
        // Nothing new: nothing read, and a cursor made now starts after all of it.
        assert_eq!(read_all(&r, &mut cur, 0, 10).1, ReadCount::default());
        assert_eq!(r.cursor_at_head().next, 4);
    }

    #[test]
    fn a_record_too_long_or_empty_stays_out() {
        let r = Ring::map(8).unwrap();
        assert_eq!(r.publish(1, &rec(0, MAX_RECORD + 1)), Published::No);
        assert_eq!(r.publish(1, &[]), Published::No);
        assert_eq!(r.head(), 0);
    }

    #[test]
    fn a_reader_a_lap_behind_gets_the_last_lap_and_counts_the_rest() {
        let r = Ring::map(8).unwrap();
        let mut cur = r.cursor_at_head();
        for n in 0..20u8 {
            r.publish(1, &rec(n, 40));
        }
        let (got, n) = read_all(&r, &mut cur, 0, 0);
        assert_eq!(got, (12..20u8).map(|n| rec(n, 40)).collect::<Vec<_>>());
        assert_eq!(n, ReadCount { records: 8, lost: 12 });
    }

    #[test]
    fn a_half_written_record_is_waited_for_then_skipped() {
        let r = Ring::map(16).unwrap();
        let mut cur = r.cursor_at_head();
        r.publish(1, &rec(0, 30));
        let stuck = r.claim_unpublished();
        r.publish(1, &rec(2, 30));
        // The read stops at the record being written...
        let (got, n) = read_all(&r, &mut cur, 0, 0);
        assert_eq!((got, n.records, cur.next), (vec![rec(0, 30)], 1, stuck));
        // ...and goes on once it is published...
        let mut cur2 = Cursor { next: stuck, stall: None };
        r.publish_claimed(stuck, 1, &[1, 2, 3]);
        assert_eq!(read_all(&r, &mut cur2, 0, 0).0, vec![vec![1, 2, 3], rec(2, 30)]);
        // ...or skips it: below what the master had read when it sent a push,
        let stuck = r.claim_unpublished();
        r.publish(1, &rec(4, 30));
        let mut c = Cursor { next: stuck, stall: None };
        assert_eq!(read_all(&r, &mut c, stuck + 1, 0), (vec![rec(4, 30)], ReadCount { records: 1, lost: 1 }));
        // or after STALL_LIMIT.
        let mut c = Cursor { next: stuck, stall: None };
        assert_eq!(read_all(&r, &mut c, 0, 0).1.records, 0);
        std::thread::sleep(STALL_LIMIT + Duration::from_millis(10));
        assert_eq!(read_all(&r, &mut c, 0, 0), (vec![rec(4, 30)], ReadCount { records: 1, lost: 1 }));
    }

    #[test]
    fn a_record_whose_writer_has_not_marked_its_slot_yet_is_waited_for_not_lost() {
        let r = Ring::map(4).unwrap();
        let mut cur = r.cursor_at_head();
        for n in 0..4u8 {
            r.publish(1, &rec(n, 20));
        }
        assert_eq!(read_all(&r, &mut cur, 0, 0).0.len(), 4);
        r.master_read_to(4);
        // Sequence 4 taken (its slot still holds sequence 0's record), then 5 published.
        let taken = r.header().head.fetch_add(1, Relaxed);
        r.publish(1, &rec(5, 20));
        let (got, n) = read_all(&r, &mut cur, 0, 0);
        assert_eq!((got, n, cur.next), (vec![], ReadCount::default(), taken));
        // Its writer goes on: both come, in order, none lost.
        r.slot(taken).state.store(writing(taken), Relaxed);
        r.slot(taken).meta.store(Meta::pack(1, 3, taken), Relaxed);
        r.slot(taken).data[0].store(0x03_0201, Relaxed);
        r.slot(taken).state.store(published(taken), Release);
        let (got, n) = read_all(&r, &mut cur, 0, 0);
        assert_eq!((got, n), (vec![vec![1, 2, 3], rec(5, 20)], ReadCount { records: 2, lost: 0 }));
        // Below the master's cursor the same sight is a record read and wiped: skipped.
        let taken = r.header().head.fetch_add(1, Relaxed);
        r.publish(1, &rec(7, 20));
        r.master_read_to(taken + 1);
        let mut c = Cursor { next: taken, stall: None };
        assert_eq!(read_all(&r, &mut c, 0, 0), (vec![rec(7, 20)], ReadCount { records: 1, lost: 1 }));
    }

    #[test]
    fn a_writer_waits_out_the_sweep_wiping_its_slot() {
        let r = std::sync::Arc::new(Ring::map(4).unwrap());
        for n in 0..4u8 {
            r.publish(1, &rec(n, 20));
        }
        // The sweep holds slot 0 (sequence 0's record) while a writer takes sequence 4.
        assert!(r.slot(0).state.compare_exchange(published(0), writing(0), Acquire, Relaxed).is_ok());
        let w = {
            let r = r.clone();
            std::thread::spawn(move || r.publish(1, &rec(9, 20)))
        };
        std::thread::sleep(Duration::from_micros(50));
        r.slot(0).state.store(0, Release);
        // Either it saw the wipe end (published) or gave up to the channel after its spins;
        // never a half state left behind.
        match w.join().unwrap() {
            Published::Yes { .. } => assert_eq!(r.slot(4).state.load(Acquire), published(4)),
            Published::No => assert_eq!(r.slot(4).state.load(Acquire), 0),
        }
    }

    #[test]
    fn a_writer_never_takes_a_slot_still_being_written_a_lap_behind() {
        let r = Ring::map(4).unwrap();
        let stuck = r.claim_unpublished();
        for n in 1..4u8 {
            assert!(matches!(r.publish(1, &rec(n, 8)), Published::Yes { .. }));
        }
        // Sequence 4 maps to the stuck slot: refused, so the caller uses the channel.
        assert_eq!(r.publish(1, &rec(9, 8)), Published::No);
        assert_eq!(r.slot(stuck).state.load(Relaxed), writing(stuck));
    }

    #[test]
    fn a_slot_a_dead_writer_left_half_written_is_wiped_and_freed_by_the_second_sweep() {
        let r = Ring::map(4).unwrap();
        let dead = gone_pid();
        let killed = r.claim_unpublished();
        r.write_unpublished(killed, dead, &rec(1, 100));
        // A writer that is only slow (this process, alive) keeps its slot.
        let slow = r.claim_unpublished();
        r.write_unpublished(slow, std::process::id() as i32, &rec(2, 100));
        assert_eq!(r.slots_holding_data(), 2);
        let mut held = HeldSlots::default();
        let head = r.head();
        assert_eq!(held.sweep(&r, 0, head), (0, 0), "seen once: nothing freed yet");
        assert_eq!(held.sweep(&r, 0, head), (0, 1), "the dead writer's slot, seen held twice, is freed");
        assert_eq!(r.slot(killed).state.load(Relaxed), 0);
        assert_eq!(r.slots_holding_data(), 1, "its half record is gone; the slow writer's stays");
        assert_eq!(held.sweep(&r, 0, head), (0, 0), "the live writer's slot is never taken from it");
        // The next lap's record for the freed slot goes into the ring again.
        for n in 0..2u8 {
            assert!(matches!(r.publish(1, &rec(n, 8)), Published::Yes { .. }));
        }
        assert!(matches!(r.publish(1, &rec(9, 8)), Published::Yes { .. }), "the freed slot takes a record");
        assert_eq!(r.publish(1, &rec(9, 8)), Published::No, "the slow writer's slot is still its own");
    }

    #[test]
    fn a_record_published_a_lap_late_into_a_wiped_slot_is_wiped_by_the_next_sweep() {
        let r = Ring::map(4).unwrap();
        // A writer takes its sequence number, then is descheduled for more than a lap.
        let late = r.header().head.fetch_add(1, Relaxed);
        for n in 0..8u8 {
            assert!(matches!(r.publish(1, &rec(n, 8)), Published::Yes { .. }));
        }
        r.wipe_range(0, r.head());
        assert_eq!(r.slots_holding_data(), 0);
        // It wakes, finds its slot wiped, claims it and publishes, two laps behind the head.
        assert!(r.slot(late).state.compare_exchange(0, writing(late), Acquire, Relaxed).is_ok());
        r.write_claimed(late, 1, &rec(42, 100));
        assert_eq!(r.slots_holding_data(), 1);
        assert_eq!(r.wipe_range(0, r.head()), 1, "the sweep over the last lap wipes it too");
        assert_eq!(r.slots_holding_data(), 0);
        // A record the sweep's bound has not reached yet stays.
        assert!(matches!(r.publish(1, &rec(7, 8)), Published::Yes { .. }));
        assert_eq!(r.wipe_range(0, r.head() - 1), 0);
        assert_eq!(r.slots_holding_data(), 1);
    }

    #[test]
    fn wiped_slots_hold_nothing_and_take_new_records() {
        let r = Ring::map(8).unwrap();
        let mut cur = r.cursor_at_head();
        for n in 0..4u8 {
            r.publish(1, &rec(n + 1, MAX_RECORD));
        }
        // The master's sweep wipes only what the master has read.
        r.master_read_to(3);
        assert_eq!(r.wipe_range(0, 3), 3);
        for seq in 0..3 {
            let slot = r.slot(seq);
            assert_eq!(slot.state.load(Relaxed), 0);
            assert_eq!(slot.meta.load(Relaxed), 0);
            assert!(slot.data.iter().all(|w| w.load(Relaxed) == 0));
        }
        let (got, n) = read_all(&r, &mut cur, 0, 0);
        assert_eq!((got, n), (vec![rec(4, MAX_RECORD)], ReadCount { records: 1, lost: 3 }));
        // Wiping what was overwritten since leaves the newer record alone.
        for n in 0..8u8 {
            r.publish(1, &rec(n, 16));
        }
        assert_eq!(r.wipe_range(0, 4), 0);
        assert!(matches!(r.publish(1, &rec(0, 16)), Published::Yes { .. }));
    }

    /// A record whose writer published it only after the master had read past it (and after
    /// the sweep that covered it) is wiped by a later sweep, which goes over the whole last
    /// lap, not left in shared memory until the ring comes round again.
    #[test]
    fn a_record_published_after_its_sweep_is_wiped_by_the_next() {
        let r = Ring::map(8).unwrap();
        let late = r.claim_unpublished();
        r.publish(1, &rec(1, 16));
        r.master_read_to(2);
        assert_eq!(r.wipe_range(0, 2), 1, "the late record is not published yet");
        r.publish_claimed(late, 1, &rec(2, 16));
        assert_eq!(r.wipe_range(0, 2), 1, "wiped when the sweep goes over the lap again");
        assert_eq!(r.slot(late).state.load(Relaxed), 0);
        assert!(r.slot(late).data.iter().all(|w| w.load(Relaxed) == 0));
    }

    #[test]
    fn the_master_is_nudged_once_per_quarter_ring_it_has_not_read() {
        let r = Ring::map(16).unwrap();
        let nudges = |r: &Ring, k: usize| {
            (0..k).filter(|_| matches!(r.publish(1, b"x"), Published::Yes { nudge: true })).count()
        };
        assert_eq!(nudges(&r, 3), 0);
        assert_eq!(nudges(&r, 10), 1, "the 4th record is a quarter ring unread: one nudge");
        r.master_read_to(r.head());
        assert_eq!(nudges(&r, 3), 0);
        assert_eq!(nudges(&r, 1), 1);
        // Eager (remote tier on): the first store the master has not read nudges it, once.
        r.header().eager.store(1, Relaxed);
        r.master_read_to(r.head());
        assert_eq!(nudges(&r, 3), 1);
        r.master_read_to(r.head());
        assert_eq!(nudges(&r, 1), 1);
    }

    #[test]
    fn a_scribbled_header_neither_panics_nor_hands_out_garbage_as_records() {
        let r = Ring::map(8).unwrap();
        let mut cur = r.cursor_at_head();
        r.header().head.store(u64::MAX - 1, Relaxed);
        let _ = r.publish(1, b"abc");
        let _ = read_all(&r, &mut cur, u64::MAX, 0);
        // Every slot is empty or unrelated to the sequence numbers read: nothing handed out.
        r.header().head.store(3, Relaxed);
        let (got, _) = read_all(&r, &mut cur, 0, 0);
        assert!(got.is_empty(), "{got:?}");
        r.slot(5).meta.store(u64::MAX, Relaxed);
        r.slot(5).state.store(published(5), Relaxed);
        r.header().head.store(6, Relaxed);
        // (Empty slots the master has not read past are records about to be written: waited
        // for. Past them, they are skipped.)
        r.master_read_to(5);
        let (got, _) = read_all(&r, &mut cur, 0, 0);
        assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), vec![MAX_RECORD], "length capped");
    }

    /// Writers lapping a small ring while a reader reads: every record handed out is whole
    /// (a torn copy would mix two records' bytes), and each arrives at most once.
    #[test]
    fn concurrent_writers_never_hand_a_reader_a_torn_record() {
        let r = std::sync::Arc::new(Ring::map(16).unwrap());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (r, stop) = (r.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut cur = r.cursor_at_head();
                let (mut seen, mut bad, mut dup) = (0u64, 0u64, 0u64);
                let mut ids = std::collections::HashSet::new();
                // One more read after the writers stopped, so a reader that was not scheduled
                // while they ran (a loaded machine) still reads the records left in the ring.
                let mut last = false;
                while !last {
                    last = stop.load(Acquire);
                    r.read(&mut cur, 0, 0, |_, b| {
                        let id = u64::from_le_bytes(b[..8].try_into().unwrap());
                        let whole = b.len() == 9 + (id % 480) as usize && b[8..].iter().all(|&x| x == (id % 251) as u8);
                        bad += u64::from(!whole);
                        dup += u64::from(!ids.insert(id));
                        seen += 1;
                    });
                }
                (seen, bad, dup)
            })
        };
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        let id = t << 32 | i;
                        let mut b = id.to_le_bytes().to_vec();
                        b.resize(9 + (id % 480) as usize, (id % 251) as u8);
                        r.publish(7, &b);
                    }
                })
            })
            .collect();
        writers.into_iter().for_each(|w| w.join().unwrap());
        stop.store(true, Release);
        let (seen, bad, dup) = reader.join().unwrap();
        assert!(seen > 0);
        assert_eq!((bad, dup), (0, 0), "{seen} records read");
    }
}
