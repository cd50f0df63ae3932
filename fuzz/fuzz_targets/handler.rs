//! A sequence of frames (split on 0xFE bytes) into the master's request handler
//! over a small cache, half of them (by their last byte) first offered to the GET fast path
//! as the master's loop does: never a panic, the byte budget always holds, every reply is well
//! formed, and a frame the fast path declines leaves the cache's counters and size as they
//! were.
#![no_main]

use cluster_tls_store::cache::Cache;
use cluster_tls_store::handler::{answer_hit, handle_frame};
use cluster_tls_store::protocol;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let budget = 16 * 1024;
    let mut cache = Cache::new(budget, 4096);
    let mut out = Vec::new();
    let mut now = 1_700_000_000u64;
    for frame in data.split(|&b| b == 0xFE) {
        now += 1;
        // The frame's last byte picks the path, so handle_frame's own GET branch runs too.
        let fast_first = frame.last().is_some_and(|b| b & 1 == 1);
        let (before, len) = (cache.counters(), cache.len());
        if fast_first && answer_hit(&mut cache, frame, now, &mut out) {
            assert_eq!(protocol::decode(&out).map(|m| m.op).ok(), Some(protocol::Op::Hit));
        } else {
            if fast_first {
                assert!(out.is_empty());
                assert_eq!((cache.counters(), cache.len()), (before, len));
            }
            handle_frame(&mut cache, frame, now, 60, |_, _| vec![0; 8], &mut out);
        }
        assert!(cache.bytes() <= budget);
        if !out.is_empty() {
            assert!(protocol::decode(&out).is_ok());
        }
    }
    cache.sweep(u64::MAX);
    assert_eq!(cache.bytes(), 0);
});
