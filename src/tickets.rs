//! Cluster-wide session ticket keys.
//!
//! The master owns the keys: it makes them from the OS random source and rotates them every
//! `ticket_key_rotation`. Key *i* encrypts new tickets during `[from, from + R)` and opens
//! tickets until `from + K·R` (K = `ticket_keys`), so a ticket is refused (a full handshake)
//! once K rotations have passed, and renewed when it was opened with a key that is no longer
//! the current one. The next key is made one period ahead, so a worker that fetched the keys
//! switches to it on time without asking the master again.
//!
//! Workers fetch the key set over their channel (op `TicketKeys`) and keep it; OpenSSL's
//! ticket key callback (`callbacks::ticket_key_cb`) reads the local copy, and asks the master
//! again only once per half rotation. Keys are wiped when dropped and never logged.

use crate::wipe::wipe;

/// Bytes of one key on the wire: name, AES-256 key, HMAC-SHA256 key, three times.
pub const KEY_WIRE_LEN: usize = 16 + 32 + 32 + 8 + 8 + 8;

/// One ticket key with its validity windows (unix seconds).
#[derive(Clone)]
pub struct TicketKey {
    /// Identifies the key inside every ticket it made.
    pub name: [u8; 16],
    /// AES-256-CBC key.
    pub aes: [u8; 32],
    /// HMAC-SHA256 key.
    pub hmac: [u8; 32],
    /// First second this key encrypts new tickets.
    pub encrypt_from: u64,
    /// First second it no longer encrypts.
    pub encrypt_until: u64,
    /// First second tickets made with it are refused.
    pub decrypt_until: u64,
}

impl Drop for TicketKey {
    fn drop(&mut self) {
        wipe(&mut self.aes);
        wipe(&mut self.hmac);
    }
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material.
        f.debug_struct("TicketKey")
            .field("name", &crate::log::hex(&self.name))
            .field("encrypt_from", &self.encrypt_from)
            .field("encrypt_until", &self.encrypt_until)
            .field("decrypt_until", &self.decrypt_until)
            .finish()
    }
}

/// A set of keys, newest last.
#[derive(Clone, Debug, Default)]
pub struct KeySet {
    /// The keys still able to open tickets, plus the next one.
    pub keys: Vec<TicketKey>,
}

impl KeySet {
    /// The key that encrypts at `now`; if none is current (the set is stale), the newest key.
    pub fn encrypting(&self, now: u64) -> Option<&TicketKey> {
        self.keys
            .iter()
            .find(|k| k.encrypt_from <= now && now < k.encrypt_until)
            .or_else(|| self.keys.iter().filter(|k| k.encrypt_from <= now).max_by_key(|k| k.encrypt_from))
    }

    /// The key named `name`, if it may still open tickets at `now`.
    pub fn opening(&self, name: &[u8], now: u64) -> Option<&TicketKey> {
        self.keys.iter().find(|k| k.name == name && now < k.decrypt_until)
    }

    /// Append the wire form of every key to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for k in &self.keys {
            out.extend_from_slice(&k.name);
            out.extend_from_slice(&k.aes);
            out.extend_from_slice(&k.hmac);
            out.extend_from_slice(&k.encrypt_from.to_le_bytes());
            out.extend_from_slice(&k.encrypt_until.to_le_bytes());
            out.extend_from_slice(&k.decrypt_until.to_le_bytes());
        }
    }

    /// The inverse of `encode`; `None` for a payload that is not whole keys.
    pub fn decode(payload: &[u8]) -> Option<KeySet> {
        if payload.is_empty() || payload.len() % KEY_WIRE_LEN != 0 {
            return None;
        }
        let keys = payload
            .chunks_exact(KEY_WIRE_LEN)
            .map(|c| {
                let u = |at: usize| u64::from_le_bytes(c[at..at + 8].try_into().unwrap_or([0; 8]));
                let mut k = TicketKey {
                    name: [0; 16],
                    aes: [0; 32],
                    hmac: [0; 32],
                    encrypt_from: u(80),
                    encrypt_until: u(88),
                    decrypt_until: u(96),
                };
                k.name.copy_from_slice(&c[..16]);
                k.aes.copy_from_slice(&c[16..48]);
                k.hmac.copy_from_slice(&c[48..80]);
                k
            })
            .collect();
        Some(KeySet { keys })
    }
}

/// The master's key schedule: pure, time and randomness are inputs.
pub struct KeySchedule {
    set: KeySet,
    rotation: u64,
    keep: u64,
    rotations: u64,
    last_current: Option<[u8; 16]>,
}

impl KeySchedule {
    /// Rotate every `rotation` seconds; a key opens tickets for `keep` rotations.
    pub fn new(rotation: u64, keep: u64) -> KeySchedule {
        KeySchedule {
            set: KeySet::default(),
            rotation: rotation.max(1),
            keep: keep.max(1),
            rotations: 0,
            last_current: None,
        }
    }

    /// Rotations so far (a new key became current).
    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    /// The keys now.
    pub fn keys(&self) -> &KeySet {
        &self.set
    }

    fn make(&self, from: u64, random: &mut impl FnMut(&mut [u8])) -> TicketKey {
        let mut k = TicketKey {
            name: [0; 16],
            aes: [0; 32],
            hmac: [0; 32],
            encrypt_from: from,
            encrypt_until: from + self.rotation,
            decrypt_until: from + self.keep * self.rotation,
        };
        random(&mut k.name);
        random(&mut k.aes);
        random(&mut k.hmac);
        k
    }

    /// Bring the set up to date at `now`: a current key, the next one made ahead, and no key
    /// past its decrypt window (dropped keys are wiped).
    pub fn refresh(&mut self, now: u64, mut random: impl FnMut(&mut [u8])) {
        self.set.keys.retain(|k| now < k.decrypt_until);
        let current =
            |set: &KeySet| set.keys.iter().find(|k| k.encrypt_from <= now && now < k.encrypt_until).map(|k| k.name);
        if current(&self.set).is_none() {
            let key = self.make(now, &mut random);
            self.set.keys.push(key);
        }
        let newest_until = self.set.keys.iter().map(|k| k.encrypt_until).max().unwrap_or(now);
        if newest_until <= now + self.rotation {
            let key = self.make(newest_until, &mut random);
            self.set.keys.push(key);
        }
        let now_current = current(&self.set);
        if self.last_current.is_some() && self.last_current != now_current {
            self.rotations += 1;
        }
        self.last_current = now_current;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> impl FnMut(&mut [u8]) {
        let mut n = 0u8;
        move |b: &mut [u8]| {
            n = n.wrapping_add(1);
            b.fill(n);
        }
    }

    #[test]
    fn keys_rotate_and_old_tickets_open_for_k_rotations() {
        let mut s = KeySchedule::new(10, 3);
        let mut r = counter();
        s.refresh(1000, &mut r);
        let first = s.keys().encrypting(1000).expect("current").name;
        assert_eq!(s.keys().keys.len(), 2, "current and next");
        s.refresh(1012, &mut r);
        let second = s.keys().encrypting(1012).expect("current").name;
        assert_ne!(first, second, "rotated");
        assert!(s.keys().opening(&first, 1012).is_some(), "one rotation later the old key still opens");
        assert!(s.keys().opening(&first, 1029).is_some());
        assert!(s.keys().opening(&first, 1030).is_none(), "after K rotations it does not");
        s.refresh(1031, &mut r);
        assert!(s.keys().keys.iter().all(|k| k.name != first), "dropped from the set");
        assert_eq!(s.rotations(), 2, "1000 -> 1012 -> 1031: two new current keys");
    }

    #[test]
    fn the_next_key_is_made_ahead_so_a_stale_copy_switches_on_time() {
        let mut s = KeySchedule::new(10, 2);
        s.refresh(1000, counter());
        let copy = s.keys().clone();
        let now_current = copy.encrypting(1005).expect("current").name;
        let later = copy.encrypting(1011).expect("next").name;
        assert_ne!(now_current, later, "the copy knows the next key");
    }

    #[test]
    fn wire_form_round_trips_and_rejects_partial_keys() {
        let mut s = KeySchedule::new(60, 3);
        s.refresh(5000, counter());
        let mut out = Vec::new();
        s.keys().encode(&mut out);
        let back = KeySet::decode(&out).expect("decodes");
        assert_eq!(back.keys.len(), s.keys().keys.len());
        assert_eq!(back.keys[0].aes, s.keys().keys[0].aes);
        assert_eq!(back.keys[1].decrypt_until, s.keys().keys[1].decrypt_until);
        assert!(KeySet::decode(&out[..out.len() - 1]).is_none());
        assert!(KeySet::decode(&[]).is_none());
    }
}
