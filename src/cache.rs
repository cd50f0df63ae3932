//! The master's session cache: pure data structure, no I/O, no OpenSSL.
//!
//! - Key: (namespace, session id). Value: session DER and an absolute expiry (unix seconds).
//! - Bounded by bytes: each entry costs its key, its DER and `ENTRY_OVERHEAD`. When a store
//!   would exceed the budget, least-recently-used entries are evicted first; lookups refresh
//!   recency.
//! - Expired entries are never returned. `sweep` removes them in expiry order through a
//!   min-heap, so it never scans the whole table.
//! - Every DER leaving the cache (evicted, expired, removed, overwritten, dropped) is wiped,
//!   or overwritten in full by the next entry of the same size, which takes over its memory.
//! - A lookup that misses allocates nothing: the key is assembled on the stack.
//! - Memory per entry: one allocation holding key and DER, a 32-byte slab slot, a 4-byte slot
//!   number in the hash index (hashbrown's `HashTable`, so the key is stored once) and an
//!   8-byte expiry-heap item. Measured: about 225 bytes of RSS per 135-byte session with a
//!   32-byte id, at 100k and 1M sessions.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use hashbrown::HashTable;

use crate::keyhash::KeyHasher;
use crate::protocol::{MAX_ID_LEN, MAX_NAMESPACE_LEN};
use crate::wipe::wipe;

/// Fixed bytes charged per entry on top of key and DER: the slab slot (32), the index slot
/// and its control byte at the lowest load factor (10), the expiry-heap item with the heap's
/// spare capacity and stale items (32), the allocator's header and rounding (24), and the slab's spare
/// capacity (up to 40), rounded up. The soak test checks it against the process's RSS, so
/// the budget stays an honest bound on the master's memory.
pub const ENTRY_OVERHEAD: usize = 160;

const NIL: u32 = u32::MAX;
const KEY_BUF: usize = 1 + MAX_NAMESPACE_LEN + MAX_ID_LEN;

/// Counters kept by the cache itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheCounters {
    /// Lookups that found a live entry.
    pub hits: u64,
    /// Lookups that found nothing (or only an expired entry).
    pub misses: u64,
    /// Entries stored (new or overwritten).
    pub stores: u64,
    /// Entries evicted to stay within the byte budget.
    pub evictions: u64,
    /// Entries dropped because their expiry passed.
    pub expirations: u64,
    /// Stores refused because the session was larger than allowed.
    pub oversize: u64,
    /// Entries removed on request.
    pub removes: u64,
}

/// What `Cache::put` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// Stored as a new entry.
    Stored,
    /// Replaced an entry with the same key.
    Replaced,
    /// Refused: larger than the per-session cap or the whole budget.
    Oversize,
    /// Refused: already expired, or a malformed key.
    Rejected,
}

struct Entry {
    /// Key (`make_key` layout) followed by the session DER, in one allocation.
    data: Box<[u8]>,
    key_len: u8,
    /// Unix seconds, saturated at u32::MAX (the year 2106).
    expiry: u32,
    prev: u32,
    next: u32,
}

/// A victim's memory on its way to the new entry (see `Cache::put`): wiped if anything
/// unwinds before the new entry takes it (the cache thread survives panics).
struct Spare(Option<Box<[u8]>>);

impl Drop for Spare {
    fn drop(&mut self) {
        if let Some(data) = self.0.as_mut() {
            wipe(data);
        }
    }
}

/// A byte-bounded LRU cache of TLS sessions with absolute expiry.
pub struct Cache {
    budget: usize,
    max_session: usize,
    bytes: usize,
    index: HashTable<u32>,
    hasher: KeyHasher,
    slots: Vec<Option<Entry>>,
    free: Vec<u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used: evicted first.
    tail: u32,
    /// (expiry, slot). An item whose slot was reused since is harmless: `sweep` removes a
    /// slot's entry only if that entry has itself expired.
    expiries: BinaryHeap<Reverse<(u32, u32)>>,
    counters: CacheCounters,
}

/// Saturate unix seconds to an entry's 32-bit field.
fn secs32(t: u64) -> u32 {
    t.min(u64::from(u32::MAX)) as u32
}

fn make_key<'b>(buf: &'b mut [u8; KEY_BUF], namespace: &[u8], id: &[u8]) -> Option<&'b [u8]> {
    if namespace.len() > MAX_NAMESPACE_LEN || id.len() > MAX_ID_LEN {
        return None;
    }
    buf[0] = namespace.len() as u8;
    buf[1..1 + namespace.len()].copy_from_slice(namespace);
    let end = 1 + namespace.len() + id.len();
    buf[1 + namespace.len()..end].copy_from_slice(id);
    Some(&buf[..end])
}

impl Entry {
    fn key(&self) -> &[u8] {
        &self.data[..self.key_len as usize]
    }

    fn der(&self) -> &[u8] {
        &self.data[self.key_len as usize..]
    }

    fn wipe_der(&mut self) {
        let k = self.key_len as usize;
        wipe(&mut self.data[k..]);
    }
}

impl Cache {
    /// A cache holding at most `budget` bytes (see `ENTRY_OVERHEAD`) of sessions no larger
    /// than `max_session` bytes of DER each.
    pub fn new(budget: usize, max_session: usize) -> Cache {
        Cache {
            budget,
            max_session,
            bytes: 0,
            index: HashTable::new(),
            hasher: KeyHasher::new(),
            slots: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            expiries: BinaryHeap::new(),
            counters: CacheCounters::default(),
        }
    }

    /// Bytes charged against the budget now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Entries held now (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn find(&self, key: &[u8]) -> Option<u32> {
        let hash = self.hasher.hash(key);
        let slots = &self.slots;
        self.index.find(hash, |&s| slots[s as usize].as_ref().is_some_and(|e| e.key() == key)).copied()
    }

    /// An entry holding `key` then `der`: in `spare` (an evicted entry's memory of exactly
    /// that size, overwritten in full here) or in a new allocation.
    fn make_entry(key: &[u8], der: &[u8], expiry: u64, spare: Option<Box<[u8]>>) -> Entry {
        let data = match spare {
            Some(mut data) => {
                data[..key.len()].copy_from_slice(key);
                data[key.len()..].copy_from_slice(der);
                data
            }
            None => {
                let mut data = Vec::with_capacity(key.len() + der.len());
                data.extend_from_slice(key);
                data.extend_from_slice(der);
                data.into_boxed_slice()
            }
        };
        Entry { data, key_len: key.len() as u8, expiry: secs32(expiry), prev: NIL, next: NIL }
    }

    /// The counters so far.
    pub fn counters(&self) -> CacheCounters {
        self.counters
    }

    /// The cost of one entry against the budget.
    pub fn entry_cost(key_len: usize, der_len: usize) -> usize {
        key_len + der_len + ENTRY_OVERHEAD
    }

    /// Store `der` under (namespace, id) until `expiry` (unix seconds).
    pub fn put(&mut self, namespace: &[u8], id: &[u8], der: &[u8], expiry: u64, now: u64) -> PutOutcome {
        let mut buf = [0u8; KEY_BUF];
        let Some(key) = make_key(&mut buf, namespace, id) else {
            return PutOutcome::Rejected;
        };
        if id.is_empty() {
            return PutOutcome::Rejected;
        }
        if expiry <= now {
            // It expired on its way here (the master reads the session ring up to a second
            // late when nothing else wakes it): dropped because it expired.
            self.counters.expirations += 1;
            return PutOutcome::Rejected;
        }
        let cost = Self::entry_cost(key.len(), der.len());
        if der.len() > self.max_session || cost > self.budget {
            self.counters.oversize += 1;
            return PutOutcome::Oversize;
        }
        if let Some(slot) = self.find(key) {
            self.unlink(slot);
            let entry = self.slots[slot as usize].as_mut().expect("indexed slot is occupied");
            let old_cost = Self::entry_cost(entry.key_len as usize, entry.der().len());
            // Same key, same size: the new entry takes the old one's memory and overwrites
            // every byte of it; another size: the old DER is wiped and freed.
            let same_size = entry.data.len() == key.len() + der.len();
            if !same_size {
                entry.wipe_der();
            }
            let spare = same_size.then(|| std::mem::take(&mut entry.data));
            *entry = Self::make_entry(key, der, expiry, spare);
            self.bytes = self.bytes - old_cost + cost;
            self.push_front(slot);
            self.expiries.push(Reverse((secs32(expiry), slot)));
            self.counters.stores += 1;
            self.evict_to_budget(slot);
            self.compact_expiries();
            return PutOutcome::Replaced;
        }
        // Make room first so the new entry is never its own victim. A full cache evicts on
        // every store, and one server's sessions are mostly of one size: the first victim
        // whose allocation fits the new entry exactly gives it its memory (overwritten in full
        // right below, which wipes the victim's DER) instead of a free and a malloc.
        let size = key.len() + der.len();
        let mut spare = Spare(None);
        while self.bytes + cost > self.budget && self.tail != NIL {
            let want = if spare.0.is_none() { size } else { usize::MAX };
            if let Some(data) = self.evict_tail(want) {
                spare.0 = Some(data);
            }
        }
        let entry = Self::make_entry(key, der, expiry, spare.0.take());
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(entry);
                s
            }
            None => {
                self.slots.push(Some(entry));
                (self.slots.len() - 1) as u32
            }
        };
        let hash = self.hasher.hash(key);
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index.insert_unique(hash, slot, |&s| slots[s as usize].as_ref().map_or(0, |e| hasher.hash(e.key())));
        self.bytes += cost;
        self.push_front(slot);
        self.expiries.push(Reverse((secs32(expiry), slot)));
        self.counters.stores += 1;
        self.compact_expiries();
        PutOutcome::Stored
    }

    /// Look up (namespace, id) at time `now`. A hit refreshes recency; an expired entry is
    /// removed and reported as a miss. Reads never extend the expiry.
    pub fn get(&mut self, namespace: &[u8], id: &[u8], now: u64) -> Option<&[u8]> {
        self.lookup(namespace, id, now).map(|(der, _)| der)
    }

    /// `get` that also tells the entry's expiry.
    pub fn lookup(&mut self, namespace: &[u8], id: &[u8], now: u64) -> Option<(&[u8], u64)> {
        self.lookup_counting(namespace, id, now, true)
    }

    /// `lookup` for a first try that is asked again if it misses: a hit counts and refreshes
    /// recency as usual, a miss counts nothing and leaves an expired entry for the second ask.
    pub fn lookup_hit(&mut self, namespace: &[u8], id: &[u8], now: u64) -> Option<(&[u8], u64)> {
        self.lookup_counting(namespace, id, now, false)
    }

    fn lookup_counting(&mut self, namespace: &[u8], id: &[u8], now: u64, miss: bool) -> Option<(&[u8], u64)> {
        let mut buf = [0u8; KEY_BUF];
        let slot = make_key(&mut buf, namespace, id).and_then(|key| self.find(key));
        let Some(slot) = slot else {
            self.counters.misses += u64::from(miss);
            return None;
        };
        let expired = self.slots[slot as usize].as_ref().is_none_or(|e| u64::from(e.expiry) <= now);
        if expired {
            if miss {
                self.remove_slot(slot);
                self.counters.expirations += 1;
                self.counters.misses += 1;
            }
            return None;
        }
        self.unlink(slot);
        self.push_front(slot);
        self.counters.hits += 1;
        self.slots[slot as usize].as_ref().map(|e| (e.der(), u64::from(e.expiry)))
    }

    /// Drop (and wipe) every entry and give back the memory the tables grew to: the cache as
    /// new, its counters kept. (A replica that must forget everything, or whose master is
    /// gone, needs none of that memory; a benchmark's repetitions each start from the same
    /// state.)
    pub fn clear(&mut self) {
        let counters = self.counters;
        // The old cache is dropped here, which wipes every DER it held.
        *self = Cache::new(self.budget, self.max_session);
        self.counters = counters;
    }

    /// Whether a live entry exists for (namespace, id) at `now`; touches neither recency nor
    /// counters.
    pub fn contains(&self, namespace: &[u8], id: &[u8], now: u64) -> bool {
        let mut buf = [0u8; KEY_BUF];
        make_key(&mut buf, namespace, id)
            .and_then(|key| self.find(key))
            .and_then(|slot| self.slots[slot as usize].as_ref())
            .is_some_and(|e| u64::from(e.expiry) > now)
    }

    /// Remove (namespace, id). Returns whether something was removed.
    pub fn remove(&mut self, namespace: &[u8], id: &[u8]) -> bool {
        let mut buf = [0u8; KEY_BUF];
        let slot = make_key(&mut buf, namespace, id).and_then(|key| self.find(key));
        match slot {
            Some(slot) => {
                self.remove_slot(slot);
                self.counters.removes += 1;
                true
            }
            None => false,
        }
    }

    /// Drop every entry whose expiry is at or before `now`; returns how many went.
    /// Costs O(k log n) for k expired entries, never a scan of the table.
    pub fn sweep(&mut self, now: u64) -> usize {
        let mut removed = 0;
        while let Some(&Reverse((expiry, slot))) = self.expiries.peek() {
            if u64::from(expiry) > now {
                break;
            }
            self.expiries.pop();
            let expired =
                self.slots.get(slot as usize).and_then(|s| s.as_ref()).is_some_and(|e| u64::from(e.expiry) <= now);
            if expired {
                self.remove_slot(slot);
                self.counters.expirations += 1;
                removed += 1;
            }
        }
        removed
    }

    /// Overwrites leave stale heap items behind; rebuild the heap when they dominate so it
    /// stays proportional to the live entries.
    fn compact_expiries(&mut self) {
        if self.expiries.len() > 2 * self.index.len() + 1024 {
            let live: Vec<_> = self
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.as_ref().map(|e| Reverse((e.expiry, i as u32))))
                .collect();
            self.expiries = BinaryHeap::from(live);
        }
    }

    fn evict_to_budget(&mut self, keep: u32) {
        while self.bytes > self.budget && self.tail != NIL && self.tail != keep {
            self.evict_tail(usize::MAX);
        }
    }

    /// Evict the least recently used entry; its memory is returned if it holds exactly
    /// `want` bytes (see `remove_slot_reusing`).
    fn evict_tail(&mut self, want: usize) -> Option<Box<[u8]>> {
        self.counters.evictions += 1;
        self.remove_slot_reusing(self.tail, want)
    }

    fn remove_slot(&mut self, slot: u32) {
        self.remove_slot_reusing(slot, usize::MAX);
    }

    /// Remove `slot`'s entry. Its allocation is returned, not wiped, when it holds exactly
    /// `want` bytes: the caller overwrites all of them at once. Otherwise its DER is wiped
    /// and the memory freed.
    fn remove_slot_reusing(&mut self, slot: u32, want: usize) -> Option<Box<[u8]>> {
        self.unlink(slot);
        let entry = self.slots[slot as usize].as_ref()?;
        let hash = self.hasher.hash(entry.key());
        if let Ok(found) = self.index.find_entry(hash, |&s| s == slot) {
            found.remove();
        }
        let mut entry = self.slots[slot as usize].take()?;
        self.bytes -= Self::entry_cost(entry.key_len as usize, entry.der().len());
        self.free.push(slot);
        if entry.data.len() == want {
            return Some(entry.data);
        }
        entry.wipe_der();
        None
    }

    fn push_front(&mut self, slot: u32) {
        let old_head = self.head;
        if let Some(e) = self.slots[slot as usize].as_mut() {
            e.prev = NIL;
            e.next = old_head;
        }
        if old_head != NIL {
            if let Some(h) = self.slots[old_head as usize].as_mut() {
                h.prev = slot;
            }
        } else {
            self.tail = slot;
        }
        self.head = slot;
    }

    fn unlink(&mut self, slot: u32) {
        let Some((prev, next)) = self.slots[slot as usize].as_ref().map(|e| (e.prev, e.next)) else {
            return;
        };
        if prev != NIL {
            if let Some(p) = self.slots[prev as usize].as_mut() {
                p.next = next;
            }
        } else if self.head == slot {
            self.head = next;
        }
        if next != NIL {
            if let Some(n) = self.slots[next as usize].as_mut() {
                n.prev = prev;
            }
        } else if self.tail == slot {
            self.tail = prev;
        }
        if let Some(e) = self.slots[slot as usize].as_mut() {
            e.prev = NIL;
            e.next = NIL;
        }
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        for entry in self.slots.iter_mut().flatten() {
            entry.wipe_der();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000;

    fn id(n: u32) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&n.to_le_bytes());
        b
    }

    #[test]
    fn stores_and_finds_by_namespace_and_id() {
        let mut c = Cache::new(1 << 20, 1024);
        assert_eq!(c.put(b"a", &id(1), b"one", NOW + 10, NOW), PutOutcome::Stored);
        assert!(c.contains(b"a", &id(1), NOW) && !c.contains(b"a", &id(2), NOW));
        assert!(!c.contains(b"a", &id(1), NOW + 10), "expired");
        assert_eq!(c.get(b"a", &id(1), NOW), Some(&b"one"[..]));
        assert_eq!(c.get(b"b", &id(1), NOW), None, "namespaces are isolated");
        assert_eq!(c.counters().hits, 1);
        assert_eq!(c.counters().misses, 1);
    }

    #[test]
    fn expiry_is_absolute_and_reads_do_not_extend_it() {
        let mut c = Cache::new(1 << 20, 1024);
        c.put(b"", &id(1), b"x", NOW + 5, NOW);
        for t in NOW..NOW + 5 {
            assert!(c.get(b"", &id(1), t).is_some());
        }
        assert_eq!(c.get(b"", &id(1), NOW + 5), None);
        assert_eq!(c.counters().expirations, 1);
        assert_eq!(c.len(), 0);
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn sweep_removes_only_expired_entries_in_order() {
        let mut c = Cache::new(1 << 20, 1024);
        for i in 0..100u32 {
            c.put(b"", &id(i), b"x", NOW + 1 + u64::from(i % 10), NOW);
        }
        // Overwrite some with longer lifetimes: their stale heap items must not remove them.
        for i in 0..10u32 {
            c.put(b"", &id(i), b"y", NOW + 100, NOW);
        }
        // Expiring by NOW+5: i % 10 in 0..=4, 50 entries, less the 5 overwritten ones.
        assert_eq!(c.sweep(NOW + 5), 45);
        assert_eq!(c.len(), 55);
        assert_eq!(c.sweep(NOW + 50), 45);
        assert_eq!(c.len(), 10);
        assert_eq!(c.get(b"", &id(3), NOW + 50), Some(&b"y"[..]));
    }

    /// A cache whose budget holds exactly three entries of `der`, holding ids 0, 1, 2 (stored
    /// in that order, expiring at NOW + 100).
    fn full_with_three() -> (Cache, [u8; 100]) {
        let der = [0u8; 100];
        let mut c = Cache::new(Cache::entry_cost(1 + 32, der.len()) * 3, 1024);
        for i in 0..3 {
            c.put(b"", &id(i), &der, NOW + 100, NOW);
        }
        (c, der)
    }

    #[test]
    fn evicts_least_recently_used_at_the_byte_budget() {
        let (mut c, der) = full_with_three();
        let cost = Cache::entry_cost(1 + 32, der.len());
        assert!(c.get(b"", &id(0), NOW).is_some(), "touch 0 so 1 is the oldest");
        c.put(b"", &id(3), &der, NOW + 100, NOW);
        assert_eq!(c.len(), 3);
        assert!(c.get(b"", &id(1), NOW).is_none(), "LRU entry evicted");
        assert!(c.get(b"", &id(0), NOW).is_some());
        assert!(c.get(b"", &id(2), NOW).is_some());
        assert!(c.get(b"", &id(3), NOW).is_some());
        assert_eq!(c.counters().evictions, 1);
        assert!(c.bytes() <= cost * 3);
    }

    /// A full cache evicting for a new entry of the victim's size hands the victim's memory
    /// to it (no free, no malloc); of another size, it does not. Either way the entries read
    /// back exactly, and the victim is gone.
    #[test]
    fn a_victim_of_the_same_size_gives_the_new_entry_its_memory() {
        let (mut c, _) = full_with_three();
        let victim = c.get(b"", &id(0), NOW).map(|d| d.as_ptr()).expect("stored");
        assert!(c.get(b"", &id(1), NOW).is_some() && c.get(b"", &id(2), NOW).is_some(), "0 is now the oldest");
        let new = [7u8; 100];
        c.put(b"", &id(3), &new, NOW + 100, NOW);
        assert!(c.get(b"", &id(0), NOW).is_none(), "LRU entry evicted");
        let got = c.get(b"", &id(3), NOW).expect("stored");
        assert_eq!((got, got.as_ptr()), (&new[..], victim), "same size: the victim's memory, overwritten");
        // Another size: the victim (1) is wiped and freed, not reused.
        let small = [9u8; 60];
        c.put(b"", &id(4), &small, NOW + 100, NOW);
        assert_eq!(c.get(b"", &id(4), NOW), Some(&small[..]));
        assert!(c.get(b"", &id(1), NOW).is_none());
        assert_eq!(c.get(b"", &id(3), NOW), Some(&new[..]));
        assert_eq!(c.bytes(), c.len() * Cache::entry_cost(33, 100) - 40);
    }

    /// Storing a key again with a DER of the same size overwrites it in place; of another
    /// size, it takes a new allocation. Accounting and expiry follow the new value.
    #[test]
    fn a_store_over_the_same_key_overwrites_in_place_when_the_size_matches() {
        let (mut c, der) = full_with_three();
        let before = c.get(b"", &id(1), NOW).map(|d| d.as_ptr()).expect("stored");
        let bytes = c.bytes();
        let same = [5u8; 100];
        assert_eq!(c.put(b"", &id(1), &same, NOW + 10, NOW), PutOutcome::Replaced);
        let got = c.get(b"", &id(1), NOW).expect("stored");
        assert_eq!((got, got.as_ptr()), (&same[..], before));
        assert_eq!(c.bytes(), bytes);
        assert!(c.get(b"", &id(1), NOW + 10).is_none(), "the new expiry applies");
        let longer = [6u8; 101];
        assert_eq!(c.put(b"", &id(2), &longer, NOW + 100, NOW), PutOutcome::Replaced);
        assert_eq!(c.get(b"", &id(2), NOW), Some(&longer[..]));
        assert_eq!(c.get(b"", &id(0), NOW), Some(&der[..]));
    }

    /// The master's GET fast path (`lookup_hit`) is where nearly every hit goes: a hit there
    /// must refresh recency as `lookup` does, and a miss there must leave everything as it was.
    #[test]
    fn a_first_try_lookup_refreshes_recency_on_a_hit_and_touches_nothing_on_a_miss() {
        let (mut c, der) = full_with_three();
        assert!(c.lookup_hit(b"", &id(0), NOW).is_some(), "touch 0 so 1 is the oldest");
        assert_eq!((c.counters().hits, c.counters().misses), (1, 0));
        assert!(c.lookup_hit(b"", &id(9), NOW).is_none());
        assert_eq!(c.counters().misses, 0, "a first try's miss is not counted");
        c.put(b"", &id(3), &der, NOW + 100, NOW);
        assert!(!c.contains(b"", &id(1), NOW), "LRU entry evicted");
        assert!(c.contains(b"", &id(0), NOW), "the entry hit through lookup_hit survives");
        // Expired: left in place and uncounted, for the counting lookup to drop and count.
        assert!(c.lookup_hit(b"", &id(2), NOW + 100).is_none());
        assert_eq!((c.len(), c.counters().expirations, c.counters().misses), (3, 0, 0));
        assert!(c.lookup(b"", &id(2), NOW + 100).is_none());
        assert_eq!((c.len(), c.counters().expirations, c.counters().misses), (2, 1, 1));
    }

    #[test]
    fn never_exceeds_budget_under_many_stores() {
        let budget = 64 * 1024;
        let mut c = Cache::new(budget, 4096);
        let mut s: u64 = 12345;
        for i in 0..50_000u32 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            let len = (s >> 40) as usize % 2000;
            let der = vec![1u8; len];
            c.put(b"ns", &id(i % 5000), &der, NOW + 1 + (s >> 60), NOW);
            assert!(c.bytes() <= budget);
            if i % 97 == 0 {
                c.remove(b"ns", &id(i / 2));
            }
        }
        c.sweep(u64::MAX);
        assert_eq!(c.bytes(), 0);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn refuses_oversize_sessions_and_counts_them() {
        let mut c = Cache::new(1 << 20, 100);
        assert_eq!(c.put(b"", &id(1), &[0u8; 101], NOW + 1, NOW), PutOutcome::Oversize);
        let mut tiny = Cache::new(64, 1000);
        assert_eq!(tiny.put(b"", &id(1), &[0u8; 10], NOW + 1, NOW), PutOutcome::Oversize);
        assert_eq!(c.counters().oversize, 1);
        assert!(c.is_empty());
    }

    #[test]
    fn rejects_expired_and_malformed_keys() {
        let mut c = Cache::new(1 << 20, 100);
        assert_eq!(c.put(b"", &id(1), b"x", NOW, NOW), PutOutcome::Rejected);
        assert_eq!(c.put(b"", &[0u8; 33], b"x", NOW + 1, NOW), PutOutcome::Rejected);
        assert_eq!(c.put(&[b'n'; 65], &id(1), b"x", NOW + 1, NOW), PutOutcome::Rejected);
        assert_eq!(c.put(b"", b"", b"x", NOW + 1, NOW), PutOutcome::Rejected);
        assert_eq!(c.get(b"", &[0u8; 40], NOW), None);
        // The one that came too late counts as expired; malformed keys count nowhere.
        assert_eq!(c.counters().expirations, 1);
        assert!(c.is_empty());
    }

    #[test]
    fn a_clear_empties_the_cache_gives_back_its_memory_keeps_its_counters_and_leaves_it_usable() {
        let mut c = Cache::new(1 << 20, 4096);
        for n in 0..100 {
            c.put(b"ns", &id(n), &[7u8; 100], NOW + 60, NOW);
        }
        assert!(c.get(b"ns", &id(3), NOW).is_some());
        let before = c.counters();
        c.clear();
        assert_eq!((c.len(), c.bytes()), (0, 0));
        assert_eq!((c.index.capacity(), c.slots.capacity(), c.expiries.capacity()), (0, 0, 0), "memory given back");
        assert_eq!(c.counters(), before, "counters survive a clear");
        assert!(c.get(b"ns", &id(3), NOW).is_none());
        assert_eq!(c.put(b"ns", &id(3), b"again", NOW + 60, NOW), PutOutcome::Stored);
        assert_eq!(c.get(b"ns", &id(3), NOW), Some(&b"again"[..]));
    }

    #[test]
    fn overwrite_and_remove_keep_accounting_exact() {
        let mut c = Cache::new(1 << 20, 1000);
        c.put(b"", &id(1), &[1u8; 10], NOW + 9, NOW);
        assert_eq!(c.put(b"", &id(1), &[2u8; 500], NOW + 9, NOW), PutOutcome::Replaced);
        assert_eq!(c.bytes(), Cache::entry_cost(33, 500));
        assert_eq!(c.get(b"", &id(1), NOW), Some(&[2u8; 500][..]));
        assert!(c.remove(b"", &id(1)));
        assert!(!c.remove(b"", &id(1)));
        assert_eq!(c.bytes(), 0);
        assert_eq!(c.counters().removes, 1);
    }
}
