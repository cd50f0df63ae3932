//! Session bytes are gone from every buffer the cache frees: a global allocator wrapper scans
//! each freed block for a marker that only the test's session bytes contain.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};

use cluster_tls_store::cache::Cache;
use cluster_tls_store::handler::handle_frame;
use cluster_tls_store::protocol::{self, Op};

struct Scanning;

static SCAN: AtomicBool = AtomicBool::new(false);
static MARKER: AtomicU64 = AtomicU64::new(0);
static FOUND: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; the scan only reads the
// block being freed, which is still allocated and `layout.size()` bytes long.
unsafe impl GlobalAlloc for Scanning {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if SCAN.load(SeqCst) && layout.size() >= 8 {
            let marker = MARKER.load(SeqCst).to_le_bytes();
            // SAFETY: the block is live until System.dealloc below.
            let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            if block.windows(8).any(|w| w == marker) {
                FOUND.fetch_add(1, SeqCst);
            }
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Scanning = Scanning;

fn secret_der(marker: u64, n: u8) -> Vec<u8> {
    sized_secret_der(marker, n, 200)
}

fn sized_secret_der(marker: u64, n: u8, len: usize) -> Vec<u8> {
    let mut v = vec![n; len];
    for chunk in v.chunks_mut(40) {
        chunk[..8].copy_from_slice(&marker.to_le_bytes());
    }
    v
}

fn wipe_vec(mut v: Vec<u8>) {
    for b in v.iter_mut() {
        // SAFETY: a valid exclusive reference.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    drop(v);
}

#[test]
fn session_bytes_never_reach_freed_memory_from_the_cache() {
    let marker = 0x5EC2_E7C0_FFEE_0000u64 ^ u64::from(std::process::id());
    MARKER.store(marker, SeqCst);
    SCAN.store(true, SeqCst);

    // The scanner works: an unwiped buffer with the marker is seen when freed.
    drop(secret_der(marker, 1));
    assert_eq!(FOUND.swap(0, SeqCst), 1, "the canary must be found");

    let now = 1_700_000_000;
    let mut cache = Cache::new(64 * 1024, 4096);
    for i in 0..400u32 {
        // Sizes repeat and vary: an evicted entry either gives its memory to a new one of its
        // size (overwritten in full) or is wiped and freed.
        let der = sized_secret_der(marker, i as u8, 200 + (i as usize % 7) / 3 * 8);
        cache.put(b"ns", &i.to_le_bytes(), &der, now + 1 + u64::from(i % 5), now); // evicts
        wipe_vec(der);
    }
    for i in 300..310u32 {
        let der = sized_secret_der(marker, 3, 232);
        cache.put(b"ns", &i.to_le_bytes(), &der, now + 100, now); // overwrites, another size
        wipe_vec(der);
    }
    for i in 300..350u32 {
        let der = secret_der(marker, 7);
        cache.put(b"ns", &i.to_le_bytes(), &der, now + 100, now); // overwrites
        wipe_vec(der);
        cache.remove(b"ns", &(i + 50).to_le_bytes()); // removes
    }
    cache.sweep(now + 3); // expires some
    assert!(cache.get(b"ns", &320u32.to_le_bytes(), now + 200).is_none()); // expired on read
                                                                           // Frames through the master's handler: its reply buffer is the caller's and wiped here.
    let mut out = Vec::new();
    let mut frame = Vec::new();
    let der = secret_der(marker, 9);
    protocol::encode(&mut frame, Op::Put, 0, now + 50, b"ns", b"frame-id", &der);
    handle_frame(&mut cache, &frame, now, 3600, |_, _| Vec::new(), &mut out);
    wipe_vec(frame);
    wipe_vec(der);
    let mut get = Vec::new();
    protocol::encode(&mut get, Op::Get, 1, 0, b"ns", b"frame-id", &[]);
    handle_frame(&mut cache, &get, now, 3600, |_, _| Vec::new(), &mut out);
    assert_eq!(protocol::decode(&out).map(|m| m.op), Ok(Op::Hit));
    wipe_vec(out);
    drop(cache); // the rest, wiped by Drop

    SCAN.store(false, SeqCst);
    assert_eq!(FOUND.load(SeqCst), 0, "freed blocks still held session bytes");
}
