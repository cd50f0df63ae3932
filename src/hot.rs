//! Decoded sessions beside a worker's replica, so a resumption the replica answers costs a
//! hash lookup and a reference count, not a `d2i_SSL_SESSION` (about 4 µs with its free, on
//! this kind of machine: as much as the rest of the lookup ten times over). A session this
//! worker made itself is kept from its store on (OpenSSL's own object, one more reference);
//! one decoded from another worker's DER is kept only for TLS 1.2: a TLS 1.3 resumption gets
//! a new ticket and its client offers that one next, so a decoded copy would seldom be hit
//! twice.
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

use std::collections::VecDeque;

use hashbrown::HashTable;
use openssl::ssl::{SslSession, SslSessionRef};

use crate::keyhash::KeyHasher;

struct Entry {
    /// Namespace length (one byte: at most 64), namespace, session id.
    key: Box<[u8]>,
    /// Our reference to the decoded session (openssl's owned type: `clone` is an up_ref,
    /// drop a free).
    session: SslSession,
    /// Bumped on every insertion, so a stale queue item does not evict a newer entry.
    stamp: u64,
}

impl Entry {
    fn parts(&self) -> (&[u8], &[u8]) {
        let ns_len = self.key[0] as usize;
        (&self.key[1..1 + ns_len], &self.key[1 + ns_len..])
    }

    fn is(&self, namespace: &[u8], id: &[u8]) -> bool {
        self.parts() == (namespace, id)
    }
}

/// Decoded sessions by (namespace, id); see the module notes.
pub struct Hot {
    cap: usize,
    table: HashTable<Entry>,
    hasher: KeyHasher,
    /// Insertion order: (hash, stamp). Items of entries removed since are skipped.
    order: VecDeque<(u64, u64)>,
    next_stamp: u64,
}

impl Hot {
    /// At most `cap` decoded sessions (0: none are kept).
    pub fn new(cap: usize) -> Hot {
        Hot { cap, table: HashTable::new(), hasher: KeyHasher::new(), order: VecDeque::new(), next_stamp: 0 }
    }

    /// How many decoded sessions are held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no decoded session is held.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// A new reference to the decoded session, if there is one.
    pub fn get(&self, namespace: &[u8], id: &[u8]) -> Option<SslSession> {
        if self.table.is_empty() {
            return None;
        }
        let h = self.hasher.hash_parts(namespace, id);
        self.table.find(h, |e| e.is(namespace, id)).map(|e| e.session.clone())
    }

    /// Keep a reference to `session` under (namespace, id), replacing any older copy.
    /// `still_cached` tells whether the replica still holds a key; entries it no longer has
    /// are dropped as they come up for eviction.
    pub fn insert(
        &mut self,
        namespace: &[u8],
        id: &[u8],
        session: &SslSessionRef,
        mut still_cached: impl FnMut(&[u8], &[u8]) -> bool,
    ) {
        if self.cap == 0 {
            return;
        }
        let h = self.hasher.hash_parts(namespace, id);
        // The oldest entries go first; one whose replica entry is gone goes even under the cap.
        while let Some(&(oh, stamp)) = self.order.front() {
            let live = self.table.find(oh, |e| e.stamp == stamp).map(|e| {
                let (ns, id) = e.parts();
                still_cached(ns, id)
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
        self.remove_hashed(h, namespace, id);
        let mut key = Vec::with_capacity(1 + namespace.len() + id.len());
        key.push(namespace.len() as u8);
        key.extend_from_slice(namespace);
        key.extend_from_slice(id);
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let hasher = &self.hasher;
        let entry = Entry { key: key.into_boxed_slice(), session: session.to_owned(), stamp };
        self.table.insert_unique(h, entry, |e| {
            let (ns, id) = e.parts();
            hasher.hash_parts(ns, id)
        });
        self.order.push_back((h, stamp));
        // Items of removed entries pile up only until the queue is twice the table.
        if self.order.len() > 2 * self.cap.max(self.table.len()) + 16 {
            let table = &self.table;
            self.order.retain(|&(oh, stamp)| table.find(oh, |e| e.stamp == stamp).is_some());
        }
    }

    fn remove_hashed(&mut self, h: u64, namespace: &[u8], id: &[u8]) {
        if let Ok(e) = self.table.find_entry(h, |e| e.is(namespace, id)) {
            e.remove();
        }
    }

    /// Drop the decoded copy of (namespace, id), if any.
    pub fn remove(&mut self, namespace: &[u8], id: &[u8]) {
        if !self.table.is_empty() {
            self.remove_hashed(self.hasher.hash_parts(namespace, id), namespace, id);
        }
    }

    /// Keep only the decoded copies whose key `keep` accepts (the replica's sweep drops those
    /// of expired sessions at once, instead of when they come up for eviction).
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8], &[u8]) -> bool) {
        if !self.table.is_empty() {
            self.table.retain(|e| {
                let (ns, id) = e.parts();
                keep(ns, id)
            });
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

    use foreign_types::ForeignType;
    use openssl_sys as ffi;

    extern "C" {
        fn SSL_SESSION_new() -> *mut ffi::SSL_SESSION;
    }

    /// A real (empty) session: what matters here is reference counting, not content.
    pub(crate) fn session() -> SslSession {
        // SAFETY: SSL_SESSION_new returns a fresh, non-null session with one reference, which
        // the SslSession takes over.
        unsafe { SslSession::from_ptr(SSL_SESSION_new()) }
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
    fn retain_drops_the_copies_refused() {
        let mut h = Hot::new(8);
        let s = session();
        for i in 0..4u8 {
            h.insert(b"ns", &[i; 32], &s, |_, _| true);
        }
        h.retain(|_, id| id[0] % 2 == 0);
        assert_eq!(h.len(), 2);
        assert!(h.get(b"ns", &[1; 32]).is_none() && h.get(b"ns", &[2; 32]).is_some());
        h.insert(b"ns", &[9; 32], &s, |_, _| true);
        assert_eq!(h.len(), 3, "stale order items of dropped copies are skipped");
    }

    #[test]
    fn zero_cap_keeps_nothing() {
        let mut h = Hot::new(0);
        h.insert(b"ns", &[1; 32], &session(), |_, _| true);
        assert!(h.get(b"ns", &[1; 32]).is_none());
    }
}
