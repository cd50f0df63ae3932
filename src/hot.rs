//! Decoded sessions beside a worker's replica, so a resumption the replica answers costs a
//! hash lookup and a reference count, not a `d2i_SSL_SESSION` (about 4 µs with its free, on
//! this kind of machine: as much as the rest of the lookup ten times over). Only TLS 1.2
//! sessions are kept: a TLS 1.3 resumption gets a new ticket and its client offers that one
//! next, so a decoded copy would seldom be hit twice.
//!
//! Rules that keep it exactly as fresh as the replica:
//! - it is only read after the replica found the same key, under the replica's lock, so an
//!   entry the replica no longer has (removed, expired, evicted, flushed) is never served;
//! - every change the replica sees for a key (store, removal, clear) drops the decoded copy
//!   under the same lock, so a copy is always of the DER the replica holds now.
//!
//! Bounded by count (oldest decoded first out). An entry whose replica entry went away on its
//! own (expiry, eviction) is dropped when it reaches the front of the queue. Dropping a copy
//! releases our reference; OpenSSL's `SSL_SESSION_free` wipes the master key when the last one
//! goes (a handshake in progress may still hold one).

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::BuildHasher;

use hashbrown::HashTable;
use openssl_sys as ffi;

/// Our reference to a decoded `SSL_SESSION`.
pub struct OwnedSession(*mut ffi::SSL_SESSION);

// SAFETY: an SSL_SESSION's reference count is atomic, and OpenSSL itself hands one session to
// handshakes on several threads (its internal cache does); we never mutate it.
unsafe impl Send for OwnedSession {}

impl OwnedSession {
    /// Take ownership of one reference (`ptr` non-null).
    ///
    /// # Safety
    /// `ptr` must be a valid session whose reference the caller gives up.
    pub unsafe fn from_ptr(ptr: *mut ffi::SSL_SESSION) -> OwnedSession {
        OwnedSession(ptr)
    }

    /// Hand our reference over (to OpenSSL).
    pub fn into_ptr(self) -> *mut ffi::SSL_SESSION {
        let p = self.0;
        std::mem::forget(self);
        p
    }

    /// Another reference to the same session.
    fn share(&self) -> OwnedSession {
        // SAFETY: self.0 is valid while we hold our reference.
        unsafe { ffi::SSL_SESSION_up_ref(self.0) };
        OwnedSession(self.0)
    }
}

impl Drop for OwnedSession {
    fn drop(&mut self) {
        // SAFETY: we own one reference.
        unsafe { ffi::SSL_SESSION_free(self.0) };
    }
}

struct Entry {
    key: Box<[u8]>,
    session: OwnedSession,
    /// Bumped on every insertion, so a stale queue item does not evict a newer entry.
    stamp: u64,
}

/// Decoded sessions by (namespace, id); see the module notes.
pub struct Hot {
    cap: usize,
    table: HashTable<Entry>,
    hasher: RandomState,
    /// Insertion order: (hash, stamp). Items of entries removed since are skipped.
    order: VecDeque<(u64, u64)>,
    next_stamp: u64,
}

fn key_of(namespace: &[u8], id: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.push(namespace.len() as u8);
    out.extend_from_slice(namespace);
    out.extend_from_slice(id);
}

impl Hot {
    /// At most `cap` decoded sessions (0: none are kept).
    pub fn new(cap: usize) -> Hot {
        Hot { cap, table: HashTable::new(), hasher: RandomState::new(), order: VecDeque::new(), next_stamp: 0 }
    }

    /// How many decoded sessions are held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.table.len()
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// A new reference to the decoded session, if there is one.
    pub fn get(&self, namespace: &[u8], id: &[u8]) -> Option<OwnedSession> {
        if self.table.is_empty() {
            return None;
        }
        let mut key = Vec::with_capacity(1 + namespace.len() + id.len());
        key_of(namespace, id, &mut key);
        let h = self.hash(&key);
        self.table.find(h, |e| *e.key == *key).map(|e| e.session.share())
    }

    /// Keep a reference to `session` under (namespace, id), replacing any older copy.
    /// `still_cached` tells whether the replica still holds a key; entries it no longer has
    /// are dropped as they come up for eviction.
    pub fn insert(
        &mut self,
        namespace: &[u8],
        id: &[u8],
        session: &OwnedSession,
        mut still_cached: impl FnMut(&[u8], &[u8]) -> bool,
    ) {
        if self.cap == 0 {
            return;
        }
        let mut key = Vec::with_capacity(1 + namespace.len() + id.len());
        key_of(namespace, id, &mut key);
        let h = self.hash(&key);
        // The oldest entries go first; one whose replica entry is gone goes even under the cap.
        while let Some(&(oh, stamp)) = self.order.front() {
            let live = self.table.find(oh, |e| e.stamp == stamp).map(|e| {
                let ns_len = e.key[0] as usize;
                still_cached(&e.key[1..1 + ns_len], &e.key[1 + ns_len..])
            });
            match live {
                None => {
                    self.order.pop_front();
                }
                Some(true) if self.table.len() < self.cap => break,
                Some(_) => {
                    self.order.pop_front();
                    if let Ok(e) = self.table.find_entry(oh, |e| e.stamp == stamp) {
                        e.remove();
                    }
                }
            }
        }
        if let Ok(e) = self.table.find_entry(h, |e| *e.key == *key) {
            e.remove();
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let hasher = &self.hasher;
        self.table.insert_unique(h, Entry { key: key.into_boxed_slice(), session: session.share(), stamp }, |e| {
            hasher.hash_one(&*e.key)
        });
        self.order.push_back((h, stamp));
        // Items of removed entries pile up only until the queue is twice the table.
        if self.order.len() > 2 * self.cap.max(self.table.len()) + 16 {
            let table = &self.table;
            self.order.retain(|&(oh, stamp)| table.find(oh, |e| e.stamp == stamp).is_some());
        }
    }

    /// Drop the decoded copy of (namespace, id), if any.
    pub fn remove(&mut self, namespace: &[u8], id: &[u8]) {
        if self.table.is_empty() {
            return;
        }
        let mut key = Vec::with_capacity(1 + namespace.len() + id.len());
        key_of(namespace, id, &mut key);
        let h = self.hash(&key);
        if let Ok(e) = self.table.find_entry(h, |e| *e.key == *key) {
            e.remove();
        }
    }

    /// Drop every decoded copy.
    pub fn clear(&mut self) {
        self.table.clear();
        self.order.clear();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    extern "C" {
        fn SSL_SESSION_new() -> *mut ffi::SSL_SESSION;
    }

    /// A real (empty) session: what matters here is reference counting, not content.
    pub(crate) fn session() -> OwnedSession {
        // SAFETY: SSL_SESSION_new returns a fresh session with one reference, which we own.
        unsafe { OwnedSession::from_ptr(SSL_SESSION_new()) }
    }

    #[test]
    fn keeps_at_most_cap_and_evicts_oldest_first() {
        let mut h = Hot::new(3);
        let s = session();
        for i in 0..5u8 {
            h.insert(b"ns", &[i; 32], &s, |_, _| true);
        }
        assert_eq!(h.len(), 3);
        assert!(h.get(b"ns", &[0; 32]).is_none());
        assert!(h.get(b"ns", &[1; 32]).is_none());
        assert!(h.get(b"ns", &[4; 32]).is_some());
        assert!(h.get(b"other", &[4; 32]).is_none(), "the namespace is part of the key");
    }

    #[test]
    fn drops_entries_the_replica_no_longer_has_first() {
        let mut h = Hot::new(3);
        let s = session();
        for i in 0..3u8 {
            h.insert(b"ns", &[i; 32], &s, |_, _| true);
        }
        // Key 0 left the replica: the next insertion drops it although the table is not full
        // beyond the cap.
        h.insert(b"ns", &[9; 32], &s, |_, id| id[0] != 0);
        assert!(h.get(b"ns", &[0; 32]).is_none());
        assert!(h.get(b"ns", &[1; 32]).is_some());
        assert!(h.get(b"ns", &[9; 32]).is_some());
    }

    #[test]
    fn remove_clear_and_reinsert() {
        let mut h = Hot::new(8);
        let s = session();
        h.insert(b"ns", &[1; 32], &s, |_, _| true);
        h.insert(b"ns", &[1; 32], &s, |_, _| true);
        assert_eq!(h.len(), 1, "a second insertion replaces the first");
        h.remove(b"ns", &[1; 32]);
        assert!(h.get(b"ns", &[1; 32]).is_none());
        for i in 0..100u8 {
            h.insert(b"ns", &[i; 32], &s, |_, _| true);
            h.remove(b"ns", &[i; 32]);
        }
        assert!(h.order.len() <= 2 * 8 + 16 + 1, "stale queue items are compacted: {}", h.order.len());
        h.insert(b"ns", &[2; 32], &s, |_, _| true);
        h.clear();
        assert_eq!(h.len(), 0);
    }

    #[test]
    fn zero_cap_keeps_nothing() {
        let mut h = Hot::new(0);
        h.insert(b"ns", &[1; 32], &session(), |_, _| true);
        assert!(h.get(b"ns", &[1; 32]).is_none());
    }
}
