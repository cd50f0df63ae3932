//! What the master does with one frame: pure, no sockets, no locks. The master's loop feeds
//! it every datagram; the unit tests and the fuzz target feed it anything at all.

use crate::cache::Cache;
use crate::protocol::{self, Op};

/// What became of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    /// `out` holds a reply to send back.
    Reply,
    /// Done; nothing to send (PUT, DEL).
    NoReply,
    /// Malformed or not a request: dropped, to be counted.
    Bad,
}

/// Apply one frame to `cache` at time `now` (unix seconds). PUT lifetimes are capped at
/// `now + max_lifetime`. `info` answers the requests that are not about the cache: it gets
/// the cache and the op (`Stats`: the master's counters; `TicketKeys`: the key set, empty when
/// ticket sharing is off). A reply, if any, is written to `out` (cleared first).
pub fn handle_frame(
    cache: &mut Cache,
    frame: &[u8],
    now: u64,
    max_lifetime: u64,
    info: impl FnOnce(&Cache, Op) -> Vec<u8>,
    out: &mut Vec<u8>,
) -> Handled {
    out.clear();
    let Ok(msg) = protocol::decode(frame) else {
        return Handled::Bad;
    };
    match msg.op {
        Op::Put => {
            let expiry = msg.expiry.min(now.saturating_add(max_lifetime));
            cache.put(msg.namespace, msg.id, msg.payload, expiry, now);
            Handled::NoReply
        }
        Op::Del => {
            cache.remove(msg.namespace, msg.id);
            Handled::NoReply
        }
        // The wake-up was the point: the loop reads the session ring on every round.
        Op::Nudge => Handled::NoReply,
        Op::Get => {
            match cache.lookup(msg.namespace, msg.id, now) {
                // The entry's expiry rides along, for the worker's replica.
                Some((der, expiry)) => {
                    protocol::encode(out, Op::Hit, msg.request_id, expiry, msg.namespace, msg.id, der)
                }
                None => protocol::encode(out, Op::Miss, msg.request_id, 0, msg.namespace, msg.id, &[]),
            }
            Handled::Reply
        }
        Op::Stats => {
            let s = info(cache, Op::Stats);
            protocol::encode(out, Op::StatsReply, msg.request_id, 0, b"", b"", &s);
            Handled::Reply
        }
        Op::TicketKeys => {
            let mut keys = info(cache, Op::TicketKeys);
            protocol::encode(out, Op::TicketKeysReply, msg.request_id, 0, b"", b"", &keys);
            crate::wipe::wipe(&mut keys);
            Handled::Reply
        }
        Op::Hit | Op::Miss | Op::StatsReply | Op::TicketKeysReply | Op::Sync | Op::Flush => Handled::Bad,
    }
}

/// The fast path of a GET: if `frame` is a well-formed GET that `cache` answers at `now`,
/// write the Hit reply to `out` and return true. Otherwise (not a GET, malformed, a miss)
/// return false with `out` cleared and nothing counted, so that `handle_frame` can take the
/// frame afterwards as if this had never run.
pub fn answer_hit(cache: &mut Cache, frame: &[u8], now: u64, out: &mut Vec<u8>) -> bool {
    out.clear();
    if frame.get(1) != Some(&(Op::Get as u8)) {
        return false;
    }
    let Ok(msg) = protocol::decode(frame) else {
        return false;
    };
    if msg.op != Op::Get {
        return false;
    }
    match cache.lookup_hit(msg.namespace, msg.id, now) {
        Some((der, expiry)) => {
            protocol::encode(out, Op::Hit, msg.request_id, expiry, msg.namespace, msg.id, der);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn frame(op: Op, rid: u64, expiry: u64, id: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        protocol::encode(&mut f, op, rid, expiry, b"ns", id, payload);
        f
    }

    fn run(cache: &mut Cache, f: &[u8], out: &mut Vec<u8>) -> Handled {
        handle_frame(cache, f, NOW, 3600, |_, _| vec![1, 2, 3], out)
    }

    #[test]
    fn put_then_get_answers_with_the_same_request_id_and_bytes() {
        let mut c = Cache::new(1 << 20, 4096);
        let mut out = Vec::new();
        assert_eq!(run(&mut c, &frame(Op::Put, 0, NOW + 60, b"id1", b"der"), &mut out), Handled::NoReply);
        assert_eq!(run(&mut c, &frame(Op::Get, 42, 0, b"id1", b""), &mut out), Handled::Reply);
        let m = protocol::decode(&out).expect("reply decodes");
        assert_eq!((m.op, m.request_id, m.payload), (Op::Hit, 42, &b"der"[..]));
        run(&mut c, &frame(Op::Del, 0, 0, b"id1", b""), &mut out);
        run(&mut c, &frame(Op::Get, 43, 0, b"id1", b""), &mut out);
        assert_eq!(protocol::decode(&out).expect("reply").op, Op::Miss);
    }

    #[test]
    fn the_get_fast_path_answers_hits_as_handle_frame_does_and_declines_the_rest_untouched() {
        let mut c = Cache::new(1 << 20, 4096);
        let mut out = Vec::new();
        run(&mut c, &frame(Op::Put, 0, NOW + 60, b"id1", b"der"), &mut out);
        run(&mut c, &frame(Op::Put, 0, NOW + 1, b"old", b"der"), &mut out);
        let get = frame(Op::Get, 42, 0, b"id1", b"");
        assert!(answer_hit(&mut c, &get, NOW, &mut out));
        let fast = out.clone();
        assert_eq!(run(&mut c, &get, &mut out), Handled::Reply);
        assert_eq!(fast, out, "the same reply, byte for byte");
        assert_eq!(c.counters().hits, 2);

        // A miss, an expired entry, a PUT, a reply and garbage: declined, with the cache
        // and its counters as they were, so `handle_frame` takes the frame as usual.
        let before = c.counters();
        let len = c.len();
        for f in [
            frame(Op::Get, 1, 0, b"nope", b""),
            frame(Op::Get, 2, 0, b"old", b""),
            frame(Op::Put, 0, NOW + 60, b"id2", b"der"),
            frame(Op::Hit, 3, 0, b"id1", b"der"),
            get[..get.len() - 1].to_vec(),
            vec![0x01, Op::Get as u8],
        ] {
            out.extend_from_slice(b"stale");
            assert!(!answer_hit(&mut c, &f, NOW + 1, &mut out), "{f:?}");
            assert!(out.is_empty());
        }
        assert_eq!((c.counters(), c.len()), (before, len));
        // The expired entry is still there for the counting lookup to drop and count.
        let get_old = frame(Op::Get, 2, 0, b"old", b"");
        assert_eq!(handle_frame(&mut c, &get_old, NOW + 1, 3600, |_, _| vec![], &mut out), Handled::Reply);
        assert_eq!(protocol::decode(&out).expect("reply").op, Op::Miss);
        assert_eq!((c.counters().misses, c.counters().expirations, c.len()), (1, 1, len - 1));
    }

    #[test]
    fn lifetimes_are_capped_by_the_maximum() {
        let mut c = Cache::new(1 << 20, 4096);
        let mut out = Vec::new();
        run(&mut c, &frame(Op::Put, 0, u64::MAX, b"id", b"der"), &mut out);
        assert!(c.get(b"ns", b"id", NOW + 3599).is_some());
        assert!(c.get(b"ns", b"id", NOW + 3600).is_none());
    }

    #[test]
    fn replies_and_garbage_from_a_worker_are_bad_frames() {
        let mut c = Cache::new(1 << 20, 4096);
        let mut out = Vec::new();
        assert_eq!(run(&mut c, &frame(Op::Hit, 1, 0, b"id", b"x"), &mut out), Handled::Bad);
        assert_eq!(run(&mut c, b"\x01", &mut out), Handled::Bad);
        assert_eq!(run(&mut c, &[0xff; 40], &mut out), Handled::Bad);
        assert!(out.is_empty());
    }

    #[test]
    fn mutated_frames_never_panic_and_never_break_the_budget() {
        let budget = 64 * 1024;
        let mut c = Cache::new(budget, 2048);
        let mut out = Vec::new();
        let mut s: u64 = 0xDEAD_BEEF_CAFE_F00D;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for i in 0..50_000u64 {
            let op = [Op::Put, Op::Get, Op::Del, Op::Stats, Op::Hit][(next() % 5) as usize];
            let id = (next() % 64).to_le_bytes();
            let payload = vec![(i % 251) as u8; (next() % 3000) as usize];
            let mut f = frame(op, i, NOW + next() % 100, &id, &payload);
            for _ in 0..(next() % 4) {
                let at = (next() as usize) % f.len();
                f[at] = next() as u8;
            }
            if next() % 7 == 0 {
                let cut = (next() as usize) % f.len();
                f.truncate(cut);
            }
            let _ = run(&mut c, &f, &mut out);
            assert!(c.bytes() <= budget);
            if !out.is_empty() {
                assert!(protocol::decode(&out).is_ok(), "every reply is a well-formed frame");
            }
        }
    }
}
