//! The hash of a session key (namespace and id), for the master's cache, the worker's replica
//! and its decoded-session table.
//!
//! std's SipHash-1-3 cost about 200 instructions for a 38-byte key: on a GET answered by the
//! master that was two of the ~2,700 instructions of the cache thread's round, and one more in
//! the worker's replica. This is a folded multiply (the 128-bit product of two words, its
//! halves xored), one per 16 bytes of key, behind a random per-table seed: about 25
//! instructions for the same key.
//!
//! Why a keyed but non-cryptographic hash is enough here: hash flooding needs an attacker to
//! choose the keys that go *into* a table. Every key stored is a session id the server's own
//! OpenSSL made (random 32 bytes by default), in a namespace the server named; a client only
//! chooses the ids it *looks up*, and a lookup inserts nothing. The seed is still random per
//! table, so even a server that makes predictable ids does not get a layout known in advance.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use crate::protocol::{MAX_ID_LEN, MAX_NAMESPACE_LEN};

/// Odd 64-bit constants (digits of pi), so no multiply by them loses bits.
const P0: u64 = 0x243f_6a88_85a3_08d3;
const P1: u64 = 0x1319_8a2e_0370_7345;
const P2: u64 = 0xa409_3822_299f_31d1;

/// The 128-bit product of `a` and `b`, its high and low halves xored: every bit of the result
/// depends on every bit of both inputs, in one multiply instruction.
#[inline]
fn fold(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// Up to 8 bytes as a little-endian word (short input zero-padded).
///
/// A copy into a zeroed array would do, but for a length not known at compile time (the
/// key's last bytes) it is a call to `memcpy`, two per hash. Two overlapping loads of 4 bytes
/// (or 2, or 1) give the same word without a call (callgrind: the master's lookup of a
/// 38-byte key, 199 → 191 instructions).
#[inline]
fn word(b: &[u8]) -> u64 {
    let n = b.len();
    if n >= 8 {
        return u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    }
    if n >= 4 {
        let lo = u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        // Bytes n-4..n; the first 8-n of them are already in `lo`.
        let hi = u64::from(u32::from_le_bytes([b[n - 4], b[n - 3], b[n - 2], b[n - 1]]));
        return lo | (hi >> (8 * (8 - n)) << 32);
    }
    if n >= 2 {
        let lo = u64::from(u16::from_le_bytes([b[0], b[1]]));
        let hi = u64::from(u16::from_le_bytes([b[n - 2], b[n - 1]]));
        return lo | (hi >> (8 * (4 - n)) << 16);
    }
    b.first().map_or(0, |&x| u64::from(x))
}

/// A seeded hash of byte strings; see the module notes. No `Debug`: it would print the seed.
pub struct KeyHasher {
    seed: [u64; 2],
}

impl KeyHasher {
    /// A hasher with a random seed, drawn through std's `RandomState` (keys from the
    /// operating system's random source once per thread, then a fresh pair per call). Two
    /// workers forked from one master may draw the same seed; that costs nothing here, since
    /// the seed only has to be unknown to clients, not different in every process.
    pub fn new() -> KeyHasher {
        let s = RandomState::new();
        KeyHasher { seed: [s.hash_one(P0), s.hash_one(P1)] }
    }

    /// The hash of `key`. The length goes in at the start and at the end.
    ///
    /// Each 16 bytes: the state and the first word in one factor, the second word in the
    /// other, each masked by its own key (seed xor a constant, so even a zero seed masks).
    /// Earlier versions, and what was wrong with them:
    /// - the state beside the second word: with a zero seed, keys whose words repeat
    ///   (0x5a5a...) piled a sixteenth of all keys into one bucket;
    /// - the state started at `k0 ^ len * P2`, so the first word's own `k0` cancelled it: a
    ///   key whose first word was `len * P2` zeroed the first product under every seed, and
    ///   a 15-byte key and a 16-byte one built from it collided under every seed (the length
    ///   was not in the last step).
    #[inline]
    pub fn hash(&self, key: &[u8]) -> u64 {
        let (k0, k1) = (self.seed[0] ^ P0, self.seed[1] ^ P1);
        let len = key.len() as u64;
        let mut h = len.wrapping_mul(P2);
        let mut chunks = key.chunks_exact(16);
        for c in &mut chunks {
            h = fold(word(&c[..8]) ^ k0 ^ h, word(&c[8..]) ^ k1);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let (a, b) = rest.split_at(rest.len().min(8));
            h = fold(word(a) ^ k0 ^ h, word(b) ^ k1 ^ P2);
        }
        fold(h ^ k1 ^ len, P2 ^ k0)
    }

    /// The hash of the key (namespace length, namespace, id) as the cache lays it out,
    /// assembled on the stack from its parts. Parts longer than the protocol allows (never
    /// stored) are hashed apart, still consistently.
    pub fn hash_parts(&self, namespace: &[u8], id: &[u8]) -> u64 {
        let mut buf = [0u8; 1 + MAX_NAMESPACE_LEN + MAX_ID_LEN];
        if namespace.len() > MAX_NAMESPACE_LEN || id.len() > MAX_ID_LEN {
            return fold(self.hash(namespace) ^ P1, self.hash(id));
        }
        let end = 1 + namespace.len() + id.len();
        buf[0] = namespace.len() as u8;
        buf[1..1 + namespace.len()].copy_from_slice(namespace);
        buf[1 + namespace.len()..end].copy_from_slice(id);
        self.hash(&buf[..end])
    }
}

#[cfg(test)]
impl KeyHasher {
    /// A hasher with a given seed, so a test's outcome does not depend on chance.
    pub fn with_seed(s0: u64, s1: u64) -> KeyHasher {
        KeyHasher { seed: [s0, s1] }
    }
}

impl Default for KeyHasher {
    fn default() -> KeyHasher {
        KeyHasher::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Keys laid out as the cache lays them out: namespace length, namespace, 32-byte id.
    fn key(ns: &[u8], id: &[u8]) -> Vec<u8> {
        let mut k = vec![ns.len() as u8];
        k.extend_from_slice(ns);
        k.extend_from_slice(id);
        k
    }

    #[test]
    fn a_short_word_is_its_bytes_zero_padded() {
        let bytes: Vec<u8> = (1..=12).map(|i| 0x10 * i + i).collect();
        for start in 0..4 {
            for n in 0..=8 {
                let b = &bytes[start..start + n];
                let mut padded = [0u8; 8];
                padded[..n].copy_from_slice(b);
                assert_eq!(word(b), u64::from_le_bytes(padded), "{n} bytes from {start}");
            }
        }
        assert_eq!(word(&bytes[..12]), u64::from_le_bytes(bytes[..8].try_into().unwrap()), "longer: its first 8");
    }

    #[test]
    fn the_same_key_hashes_the_same_and_a_new_seed_changes_it() {
        let h = KeyHasher::new();
        let k = key(b"web", &[7; 32]);
        assert_eq!(h.hash(&k), h.hash(&k.clone()));
        let other = KeyHasher::new();
        assert_ne!(h.hash(&k), other.hash(&k), "two tables do not share a layout");
    }

    #[test]
    fn the_parts_hash_as_the_assembled_key() {
        let h = KeyHasher::new();
        assert_eq!(h.hash_parts(b"web", &[9; 32]), h.hash(&key(b"web", &[9; 32])));
        assert_eq!(h.hash_parts(b"", b""), h.hash(&[0]));
        // Longer than the protocol allows: still a function of the parts.
        let long = [1u8; 200];
        assert_eq!(h.hash_parts(&long, b"id"), h.hash_parts(&long, b"id"));
        assert_ne!(h.hash_parts(&long, b"id"), h.hash_parts(&long, b"ie"));
    }

    const SEEDS: [(u64, u64); 4] = [(0, 0), (0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210), (u64::MAX, 1), (P2, P0)];

    /// Keys built to cancel the seed in a first version (see `hash`): under every seed they
    /// must hash apart like any others.
    #[test]
    fn no_key_cancels_the_seed() {
        for (s0, s1) in SEEDS {
            let h = KeyHasher::with_seed(s0, s1);
            for len in [16usize, 24, 40] {
                let mut seen = HashSet::new();
                for first in [(len as u64).wrapping_mul(P2), (len as u64).wrapping_mul(P2) ^ 1] {
                    for v in 0..64u64 {
                        let mut k = vec![0u8; len];
                        k[..8].copy_from_slice(&first.to_le_bytes());
                        k[8..16].copy_from_slice(&v.to_le_bytes());
                        assert!(seen.insert(h.hash(&k)), "seed {s0:x}, len {len}, {first:x}/{v} collides");
                    }
                }
            }
            // A 15-byte key, and the 16-byte key that feeds the same two factors to the
            // first (and only) step.
            let k15: Vec<u8> = (1..=15u8).collect();
            let w0 = word(&k15[..8]) ^ 15u64.wrapping_mul(P2) ^ 16u64.wrapping_mul(P2);
            let w1 = word(&k15[8..]) ^ P2;
            let k16: Vec<u8> = [w0.to_le_bytes(), w1.to_le_bytes()].concat();
            assert_ne!(h.hash(&k15), h.hash(&k16), "seed {s0:x}: 15 and 16 bytes collide");
        }
    }

    #[test]
    fn keys_that_differ_in_one_bit_or_in_length_hash_apart() {
        let h = KeyHasher::with_seed(0x9e37_79b9_7f4a_7c15, 0x2545_f491_4f6c_dd1d);
        for len in 0..80usize {
            let base: Vec<u8> = (0..len).map(|i| (i * 37) as u8).collect();
            let mut seen = HashSet::new();
            assert!(seen.insert(h.hash(&base)));
            for bit in 0..len * 8 {
                let mut k = base.clone();
                k[bit / 8] ^= 1 << (bit % 8);
                assert!(seen.insert(h.hash(&k)), "len {len}, bit {bit} collides");
            }
            // A trailing zero byte is not the same key.
            let mut longer = base.clone();
            longer.push(0);
            assert!(seen.insert(h.hash(&longer)), "len {len} and len {} collide", len + 1);
        }
    }

    /// hashbrown picks the bucket from the low bits and the tag byte from the top 7: both must
    /// spread sequential ids (the worst case: keys that differ in one counter) evenly.
    #[test]
    fn sequential_ids_spread_evenly_over_buckets_and_tags() {
        // Fixed seeds (one of them zero), so the outcome does not depend on chance.
        for (s0, s1) in SEEDS {
            let h = KeyHasher::with_seed(s0, s1);
            const N: usize = 1 << 16;
            const BUCKETS: usize = 1 << 10;
            let mut low = vec![0u32; BUCKETS];
            let mut top = [0u32; 128];
            for i in 0..N {
                for place in [0usize, 24] {
                    let mut id = [0x5au8; 32];
                    id[place..place + 8].copy_from_slice(&(i as u64).to_le_bytes());
                    let v = h.hash(&key(b"bench", &id));
                    low[(v as usize) & (BUCKETS - 1)] += 1;
                    top[(v >> 57) as usize] += 1;
                }
            }
            // 2N keys: 128 per bucket (standard deviation 11) and 1024 per tag (32) on
            // average. A uniform hash stays within 5.5 deviations; a broken one piles keys
            // into a few buckets or tags.
            let (lo_min, lo_max) = (low.iter().min().copied(), low.iter().max().copied());
            assert!(lo_min >= Some(66) && lo_max <= Some(190), "seed {s0:x}: buckets {lo_min:?}..{lo_max:?}");
            let (t_min, t_max) = (top.iter().min().copied(), top.iter().max().copied());
            assert!(t_min >= Some(848) && t_max <= Some(1200), "seed {s0:x}: tags {t_min:?}..{t_max:?}");
        }
    }
}
