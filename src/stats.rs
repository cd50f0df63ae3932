//! Counters for operators. The master keeps the cache's counters; every process that shares
//! sessions keeps its own handshake-side counters in atomics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The master's counters: the shared cache as a whole.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MasterStats {
    /// Lookups that found a live session.
    pub hits: u64,
    /// Lookups that found nothing.
    pub misses: u64,
    /// Sessions stored (new or replaced).
    pub stores: u64,
    /// Sessions evicted to stay within the byte budget.
    pub evictions: u64,
    /// Sessions dropped because they expired.
    pub expirations: u64,
    /// Sessions refused because they were larger than `max_session_bytes`.
    pub oversize: u64,
    /// Sessions removed on request (OpenSSL's remove callback).
    pub removes: u64,
    /// Sessions held now.
    pub entries: u64,
    /// Bytes charged against the budget now.
    pub bytes: u64,
    /// The byte budget.
    pub budget_bytes: u64,
    /// Worker channels open now.
    pub workers: u64,
    /// Malformed frames received and dropped.
    pub bad_frames: u64,
    /// Replies dropped because a worker's socket buffer was full.
    pub reply_drops: u64,
    /// Ticket key rotations (a new key took over encryption).
    pub ticket_rotations: u64,
    /// Stores and removals pushed to the workers' replicas (one per receiving worker).
    pub sync_records: u64,
    /// Pushes lost because a worker's socket was full; that worker's replica is then
    /// flushed, so it never serves a session removed meanwhile.
    pub sync_drops: u64,
    /// Remote tier (Redis) state: 0 off (not configured), 1 up, 2 down (the breaker paused
    /// it after an error or timeout; lookups and stores skip it until the next probe).
    pub remote_state: u64,
    /// Local misses the remote tier answered with a session (stored locally too).
    pub remote_hits: u64,
    /// Lookups the remote tier answered "not found" (including errors, timeouts and values
    /// that failed to open).
    pub remote_misses: u64,
    /// Redis errors and timeouts (each pauses the remote tier).
    pub remote_errors: u64,
    /// Lookups, stores and removals dropped because a remote queue was full.
    pub remote_queue_drops: u64,
    /// Values read from Redis that failed to open (tampered, moved, unknown key): misses.
    pub remote_open_failures: u64,
    /// Lookups, stores and removals not sent because the remote tier was paused, or a lookup
    /// whose time ran out in the queue.
    pub remote_skips: u64,
    /// Sessions written to Redis.
    pub remote_stores: u64,
    /// Sessions the master read from the session ring (stored by workers without a message).
    pub ring_records: u64,
    /// Ring records the master did not get: overwritten before it read them (the ring was a
    /// whole lap ahead), or still half written after a writer's stall. Those sessions are
    /// only in the replicas.
    pub ring_lost: u64,
}

/// This process's own handshake-side counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Lookups asked of the cache (OpenSSL's get-session callback).
    pub gets: u64,
    /// Lookups answered with a session that OpenSSL then got.
    pub hits: u64,
    /// Lookups answered "not found".
    pub misses: u64,
    /// Sessions sent to the cache.
    pub puts: u64,
    /// Removals sent to the cache.
    pub dels: u64,
    /// Messages not sent because the channel was full or refused the frame (never blocks the
    /// handshake).
    pub send_drops: u64,
    /// Requests to the master (lookups and stats requests) that gave up at the deadline.
    pub timeouts: u64,
    /// Requests (lookups and stats requests) skipped at once while the breaker was open
    /// after timeouts.
    pub breaker_skips: u64,
    /// Sessions whose DER did not decode or was not the one asked for, and reply frames
    /// that did not decode (each a miss).
    pub decode_failures: u64,
    /// Sessions not sent because they were larger than `max_session_bytes`.
    pub oversize: u64,
    /// TLS 1.3 stateless-ticket sessions not stored (the ticket carries the state), and TLS
    /// 1.3 sessions of a context that turned early data on with anti-replay after it was
    /// shared (OpenSSL resumes those only from its own cache).
    pub stateless_skipped: u64,
    /// Replies that arrived after their request gave up, dropped.
    pub late_replies: u64,
    /// 1 when the master closed the channel (dead): lookups are misses from then on.
    pub master_gone: u64,
    /// Session tickets encrypted with a shared key.
    pub tickets_issued: u64,
    /// Tickets opened with a shared key.
    pub tickets_opened: u64,
    /// Tickets opened with a key that no longer encrypts, so OpenSSL issued a fresh one.
    pub tickets_renewed: u64,
    /// Tickets whose key is unknown or too old (a full handshake).
    pub tickets_refused: u64,
    /// Times the ticket keys were fetched from the master.
    pub ticket_key_fetches: u64,
    /// Lookups answered by this worker's replica, without asking the master.
    pub replica_hits: u64,
    /// Stores and removals from other workers applied to this worker's replica.
    pub replica_updates: u64,
    /// Times the master told this worker to drop its replica (pushes were lost).
    pub replica_flushes: u64,
    /// Replica hits served from a session already decoded by an earlier hit (no
    /// `d2i_SSL_SESSION`); a subset of `replica_hits`.
    pub replica_decoded_hits: u64,
    /// Sessions put into the session ring, which carries them to the other workers and the
    /// master without a message (a subset of `puts`; the others went over the channel).
    pub ring_puts: u64,
}

/// `Stats::role`: neither master nor connected worker.
pub const ROLE_NONE: u32 = 0;
/// `Stats::role`: the process that ran `master_setup`.
pub const ROLE_MASTER: u32 = 1;
/// `Stats::role`: a process that talks to the master over its channel.
pub const ROLE_WORKER: u32 = 2;

/// A snapshot of the counters (`cts_stats` in C).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// What this process is: `CTS_ROLE_NONE` (0), `CTS_ROLE_MASTER` (1) or `CTS_ROLE_WORKER` (2).
    pub role: u32,
    /// 1 when `master` holds the master's counters (always in the master; in a worker, when
    /// the master answered the stats request in time), else 0.
    pub master_valid: u32,
    /// The shared cache's counters.
    pub master: MasterStats,
    /// This process's own counters.
    pub worker: WorkerStats,
}

/// Encoded size of `MasterStats` on the wire.
pub const MASTER_STATS_WIRE_LEN: usize = MASTER_STATS_FIELDS * 8;
const MASTER_STATS_FIELDS: usize = 26;

impl MasterStats {
    fn fields(&self) -> [u64; MASTER_STATS_FIELDS] {
        [
            self.hits,
            self.misses,
            self.stores,
            self.evictions,
            self.expirations,
            self.oversize,
            self.removes,
            self.entries,
            self.bytes,
            self.budget_bytes,
            self.workers,
            self.bad_frames,
            self.reply_drops,
            self.ticket_rotations,
            self.sync_records,
            self.sync_drops,
            self.remote_state,
            self.remote_hits,
            self.remote_misses,
            self.remote_errors,
            self.remote_queue_drops,
            self.remote_open_failures,
            self.remote_skips,
            self.remote_stores,
            self.ring_records,
            self.ring_lost,
        ]
    }

    /// Little-endian u64 fields in declaration order.
    pub fn encode(&self) -> [u8; MASTER_STATS_WIRE_LEN] {
        let mut out = [0u8; MASTER_STATS_WIRE_LEN];
        for (chunk, v) in out.chunks_exact_mut(8).zip(self.fields()) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// The inverse of `encode`; `None` when the length is wrong.
    pub fn decode(bytes: &[u8]) -> Option<MasterStats> {
        if bytes.len() != MASTER_STATS_WIRE_LEN {
            return None;
        }
        let mut f = [0u64; MASTER_STATS_FIELDS];
        for (v, chunk) in f.iter_mut().zip(bytes.chunks_exact(8)) {
            *v = u64::from_le_bytes(chunk.try_into().ok()?);
        }
        Some(MasterStats {
            hits: f[0],
            misses: f[1],
            stores: f[2],
            evictions: f[3],
            expirations: f[4],
            oversize: f[5],
            removes: f[6],
            entries: f[7],
            bytes: f[8],
            budget_bytes: f[9],
            workers: f[10],
            bad_frames: f[11],
            reply_drops: f[12],
            ticket_rotations: f[13],
            sync_records: f[14],
            sync_drops: f[15],
            remote_state: f[16],
            remote_hits: f[17],
            remote_misses: f[18],
            remote_errors: f[19],
            remote_queue_drops: f[20],
            remote_open_failures: f[21],
            remote_skips: f[22],
            remote_stores: f[23],
            ring_records: f[24],
            ring_lost: f[25],
        })
    }
}

/// The live, lock-free form of `WorkerStats`. One per process (see `WORKER`); reset in a
/// forked child so a worker counts only its own work.
pub struct WorkerCounters {
    pub(crate) gets: AtomicU64,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) puts: AtomicU64,
    pub(crate) dels: AtomicU64,
    pub(crate) send_drops: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) breaker_skips: AtomicU64,
    pub(crate) decode_failures: AtomicU64,
    pub(crate) oversize: AtomicU64,
    pub(crate) stateless_skipped: AtomicU64,
    pub(crate) late_replies: AtomicU64,
    pub(crate) master_gone: AtomicU64,
    pub(crate) tickets_issued: AtomicU64,
    pub(crate) tickets_opened: AtomicU64,
    pub(crate) tickets_renewed: AtomicU64,
    pub(crate) tickets_refused: AtomicU64,
    pub(crate) ticket_key_fetches: AtomicU64,
    pub(crate) replica_hits: AtomicU64,
    pub(crate) replica_updates: AtomicU64,
    pub(crate) replica_flushes: AtomicU64,
    pub(crate) replica_decoded_hits: AtomicU64,
    pub(crate) ring_puts: AtomicU64,
}

/// This process's counters.
pub static WORKER: WorkerCounters = WorkerCounters::new();

impl WorkerCounters {
    const fn new() -> WorkerCounters {
        WorkerCounters {
            gets: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            puts: AtomicU64::new(0),
            dels: AtomicU64::new(0),
            send_drops: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            breaker_skips: AtomicU64::new(0),
            decode_failures: AtomicU64::new(0),
            oversize: AtomicU64::new(0),
            stateless_skipped: AtomicU64::new(0),
            late_replies: AtomicU64::new(0),
            master_gone: AtomicU64::new(0),
            tickets_issued: AtomicU64::new(0),
            tickets_opened: AtomicU64::new(0),
            tickets_renewed: AtomicU64::new(0),
            tickets_refused: AtomicU64::new(0),
            ticket_key_fetches: AtomicU64::new(0),
            replica_hits: AtomicU64::new(0),
            replica_updates: AtomicU64::new(0),
            replica_flushes: AtomicU64::new(0),
            replica_decoded_hits: AtomicU64::new(0),
            ring_puts: AtomicU64::new(0),
        }
    }

    fn all(&self) -> [&AtomicU64; 23] {
        [
            &self.gets,
            &self.hits,
            &self.misses,
            &self.puts,
            &self.dels,
            &self.send_drops,
            &self.timeouts,
            &self.breaker_skips,
            &self.decode_failures,
            &self.oversize,
            &self.stateless_skipped,
            &self.late_replies,
            &self.master_gone,
            &self.tickets_issued,
            &self.tickets_opened,
            &self.tickets_renewed,
            &self.tickets_refused,
            &self.ticket_key_fetches,
            &self.replica_hits,
            &self.replica_updates,
            &self.replica_flushes,
            &self.replica_decoded_hits,
            &self.ring_puts,
        ]
    }

    /// Zero every counter. Atomics only: safe in a forked child.
    pub(crate) fn reset(&self) {
        for c in self.all() {
            c.store(0, Relaxed);
        }
    }

    /// A consistent-enough snapshot (each counter read once).
    pub fn snapshot(&self) -> WorkerStats {
        let v = self.all().map(|c| c.load(Relaxed));
        WorkerStats {
            gets: v[0],
            hits: v[1],
            misses: v[2],
            puts: v[3],
            dels: v[4],
            send_drops: v[5],
            timeouts: v[6],
            breaker_skips: v[7],
            decode_failures: v[8],
            oversize: v[9],
            stateless_skipped: v[10],
            late_replies: v[11],
            master_gone: v[12],
            tickets_issued: v[13],
            tickets_opened: v[14],
            tickets_renewed: v[15],
            tickets_refused: v[16],
            ticket_key_fetches: v[17],
            replica_hits: v[18],
            replica_updates: v[19],
            replica_flushes: v[20],
            replica_decoded_hits: v[21],
            ring_puts: v[22],
        }
    }
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_stats_round_trip_on_the_wire() {
        let s = MasterStats {
            hits: 1,
            misses: 2,
            stores: 3,
            evictions: 4,
            expirations: 5,
            oversize: 6,
            removes: 7,
            entries: 8,
            bytes: 9,
            budget_bytes: 10,
            workers: 11,
            bad_frames: 12,
            reply_drops: u64::MAX,
            ticket_rotations: 14,
            sync_records: 15,
            sync_drops: 16,
            remote_state: 17,
            remote_hits: 18,
            remote_misses: 19,
            remote_errors: 20,
            remote_queue_drops: 21,
            remote_open_failures: 22,
            remote_skips: 23,
            remote_stores: 24,
            ring_records: 25,
            ring_lost: 26,
        };
        assert_eq!(MasterStats::decode(&s.encode()), Some(s));
        assert_eq!(MasterStats::decode(&s.encode()[1..]), None);
    }
}
