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

use crate::wipe::{reserve_wiped, wipe, wipe_spare, SecretBuf};

/// Bytes of one key on the wire: name, AES key (32, of which `aes_len` used), HMAC key (32,
/// of which `hmac_len` used), three times, the two lengths.
pub const KEY_WIRE_LEN: usize = 16 + 32 + 32 + 8 + 8 + 8 + 2;

/// One ticket key with its validity windows (unix seconds).
#[derive(Clone)]
pub struct TicketKey {
    /// Identifies the key inside every ticket it made.
    pub name: [u8; 16],
    /// AES-CBC key: AES-256 (`aes_len` 32) or AES-128 (16, from 48-byte key files).
    pub aes: [u8; 32],
    /// HMAC-SHA256 key (`hmac_len` bytes used: 32, or 16 from 48-byte key files).
    pub hmac: [u8; 32],
    /// Bytes of `aes` in use (16 or 32).
    pub aes_len: u8,
    /// Bytes of `hmac` in use (16 or 32).
    pub hmac_len: u8,
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
    /// The key that encrypts at `now`; if none is current (the set is stale), the newest key
    /// that has begun and still opens tickets. None past every key's decrypt window: a ticket
    /// made with a retired key would be refused by every worker, and the key is retired so
    /// that it stops being used.
    pub fn encrypting(&self, now: u64) -> Option<&TicketKey> {
        self.keys.iter().find(|k| k.encrypt_from <= now && now < k.encrypt_until).or_else(|| {
            self.keys.iter().filter(|k| k.encrypt_from <= now && now < k.decrypt_until).max_by_key(|k| k.encrypt_from)
        })
    }

    /// The key named `name`, if it may still open tickets at `now`.
    pub fn opening(&self, name: &[u8], now: u64) -> Option<&TicketKey> {
        self.keys.iter().find(|k| k.name == name && now < k.decrypt_until)
    }

    /// Make the first key (an operator's file's encrypting key) current for `window` seconds
    /// from `now`. Its window is what a worker's copy divides by two to know when to ask
    /// again, so it starts at `now`: a window stretched from the file's load time on would
    /// space the asks out to the ten-second cap, and a reload or a removed key would reach
    /// the workers that much later.
    pub fn keep_first_current(&mut self, now: u64, window: u64) {
        if let Some(first) = self.keys.first_mut() {
            first.encrypt_from = now;
            first.encrypt_until = now + window;
        }
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
            out.push(k.aes_len);
            out.push(k.hmac_len);
        }
    }

    /// The inverse of `encode`; `None` for a payload that is not whole keys.
    pub fn decode(payload: &[u8]) -> Option<KeySet> {
        if payload.is_empty() || !payload.len().is_multiple_of(KEY_WIRE_LEN) {
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
                    aes_len: c[104],
                    hmac_len: c[105],
                };
                k.name.copy_from_slice(&c[..16]);
                k.aes.copy_from_slice(&c[16..48]);
                k.hmac.copy_from_slice(&c[48..80]);
                k
            })
            .collect::<Vec<TicketKey>>();
        if keys.iter().any(|k| !matches!(k.aes_len, 16 | 32) || !matches!(k.hmac_len, 16 | 32)) {
            return None;
        }
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

    /// A fresh key for the window starting at `from`; `None` when the random source failed
    /// (the partly filled key is wiped on drop).
    fn make(&self, from: u64, random: &mut impl FnMut(&mut [u8]) -> bool) -> Option<TicketKey> {
        let mut k = TicketKey {
            name: [0; 16],
            aes: [0; 32],
            hmac: [0; 32],
            encrypt_from: from,
            encrypt_until: from + self.rotation,
            decrypt_until: from + self.keep * self.rotation,
            aes_len: 32,
            hmac_len: 32,
        };
        (random(&mut k.name) && random(&mut k.aes) && random(&mut k.hmac)).then_some(k)
    }

    /// Install a key agreed with other hosts (see `remote::tickets`). It goes ahead of the
    /// keys made here, so it encrypts during its window; the local keys keep opening the
    /// tickets they made. A key already held (same name) is ignored.
    pub fn install(&mut self, key: TicketKey) {
        if self.set.keys.iter().any(|k| k.name == key.name) {
            return;
        }
        // `encrypting` takes the first key whose window holds `now`: agreed keys first.
        // (Key material is wiped wherever moves leave a copy: see `wipe_spare`.)
        reserve_wiped(&mut self.set.keys, 1);
        self.set.keys.insert(0, key);
    }

    /// Bring the set up to date at `now`: a current key, the next one made ahead, and no key
    /// past its decrypt window (dropped keys are wiped). `random` fills a buffer and says
    /// whether it could; a key it could not fill is not made (a later call tries again), so
    /// the set never holds a guessable key: without a current key workers encrypt with the
    /// newest one that has begun, or issue no ticket at all.
    pub fn refresh(&mut self, now: u64, mut random: impl FnMut(&mut [u8]) -> bool) {
        self.set.keys.retain(|k| now < k.decrypt_until);
        wipe_spare(&mut self.set.keys);
        let current =
            |set: &KeySet| set.keys.iter().find(|k| k.encrypt_from <= now && now < k.encrypt_until).map(|k| k.name);
        if current(&self.set).is_none() {
            if let Some(key) = self.make(now, &mut random) {
                reserve_wiped(&mut self.set.keys, 1);
                self.set.keys.push(key);
            }
        }
        let newest_until = self.set.keys.iter().map(|k| k.encrypt_until).max().unwrap_or(now);
        if newest_until <= now + self.rotation {
            if let Some(key) = self.make(newest_until.max(now), &mut random) {
                reserve_wiped(&mut self.set.keys, 1);
                self.set.keys.push(key);
            }
        }
        let now_current = current(&self.set);
        if self.last_current.is_some() && self.last_current != now_current {
            self.rotations += 1;
        }
        self.last_current = now_current;
    }
}

/// Parse an operator's ticket key file, in the formats nginx (`ssl_session_ticket_key`) and
/// HAProxy (`tls-ticket-keys`) use: either one key of 48 or 80 raw bytes, or one key per line
/// in base64. A 48-byte key is name (16), AES-128 key (16), HMAC key (16); an 80-byte key is
/// name (16), HMAC key (32), AES-256 key (32), as nginx reads them. The first key encrypts;
/// all of them open tickets. The keys are stamped current at `now`; `window` is how long the
/// copies handed to workers stay current before they ask again.
pub fn parse_key_file(bytes: &[u8], now: u64, window: u64) -> Result<KeySet, String> {
    // Every decoded key is wiped when dropped, on the error paths too.
    let raw_keys: Vec<SecretBuf> = if bytes.len() == 48 || bytes.len() == 80 {
        vec![SecretBuf::from_slice(bytes)]
    } else {
        let text = std::str::from_utf8(bytes).map_err(|_| "neither 48/80 raw bytes nor base64 lines".to_string())?;
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                openssl::base64::decode_block(l).map(SecretBuf::from).map_err(|_| "a line is not base64".to_string())
            })
            .collect::<Result<_, _>>()?
    };
    if raw_keys.is_empty() {
        return Err("no key in the file".into());
    }
    let mut keys = Vec::with_capacity(raw_keys.len());
    for (i, raw) in raw_keys.iter().enumerate() {
        let mut k = TicketKey {
            name: [0; 16],
            aes: [0; 32],
            hmac: [0; 32],
            aes_len: 0,
            hmac_len: 0,
            encrypt_from: if i == 0 { now } else { 0 },
            encrypt_until: if i == 0 { now + window.max(1) } else { 0 },
            decrypt_until: u64::MAX,
        };
        match raw.len() {
            48 => {
                k.name.copy_from_slice(&raw[..16]);
                k.aes[..16].copy_from_slice(&raw[16..32]);
                k.hmac[..16].copy_from_slice(&raw[32..48]);
                (k.aes_len, k.hmac_len) = (16, 16);
            }
            80 => {
                k.name.copy_from_slice(&raw[..16]);
                k.hmac.copy_from_slice(&raw[16..48]);
                k.aes.copy_from_slice(&raw[48..80]);
                (k.aes_len, k.hmac_len) = (32, 32);
            }
            n => return Err(format!("key {} is {n} bytes (48 or 80 expected)", i + 1)),
        }
        keys.push(k);
    }
    Ok(KeySet { keys })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> impl FnMut(&mut [u8]) -> bool {
        let mut n = 0u8;
        move |b: &mut [u8]| {
            n = n.wrapping_add(1);
            b.fill(n);
            true
        }
    }

    #[test]
    fn a_failing_random_source_makes_no_key() {
        let mut s = KeySchedule::new(10, 3);
        s.refresh(1000, |b: &mut [u8]| {
            b.fill(0);
            false
        });
        assert!(s.keys().keys.is_empty(), "no key from a source that failed");
        assert!(s.keys().encrypting(1000).is_none(), "so no ticket is issued");
        s.refresh(1001, counter());
        assert!(s.keys().encrypting(1001).is_some(), "made once the source works");
        let next = s.keys().encrypting(1011).expect("and the next key ahead").name;
        // The source fails from then on: past both windows no key is current and none is
        // made; the newest key that has begun encrypts, and no key of zeros ever appears.
        s.refresh(1025, |_: &mut [u8]| false);
        assert_eq!(s.keys().keys.len(), 2, "nothing added");
        assert_eq!(s.keys().encrypting(1025).map(|k| k.name), Some(next), "the newest begun key");
        assert!(s.keys().keys.iter().all(|k| k.name != [0; 16] && k.aes != [0; 32] && k.hmac != [0; 32]));
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
    fn agreed_keys_encrypt_ahead_of_local_ones_and_local_ones_still_open() {
        let mut s = KeySchedule::new(10, 3);
        s.refresh(1005, counter());
        let local = s.keys().encrypting(1005).expect("local key").name;
        let agreed = |fill: u8, epoch: u64| TicketKey {
            name: [fill; 16],
            aes: [fill; 32],
            hmac: [fill; 32],
            aes_len: 32,
            hmac_len: 32,
            encrypt_from: epoch * 10,
            encrypt_until: epoch * 10 + 10,
            decrypt_until: epoch * 10 + 30,
        };
        s.install(agreed(0xA0, 100));
        s.install(agreed(0xA1, 101));
        s.install(agreed(0xA1, 101));
        assert_eq!(s.keys().keys.len(), 4, "a key already held is not installed twice");
        s.refresh(1006, counter());
        assert_eq!(s.keys().encrypting(1006).map(|k| k.name), Some([0xA0; 16]));
        assert!(s.keys().opening(&local, 1006).is_some(), "tickets made before the agreement open");
        s.refresh(1012, counter());
        assert_eq!(s.keys().encrypting(1012).map(|k| k.name), Some([0xA1; 16]), "the next agreed key on time");
        assert_eq!(s.keys().keys.len(), 4, "no local key made while agreed keys cover the time");
    }

    #[test]
    fn key_files_in_nginx_and_haproxy_formats_parse_first_key_encrypts() {
        let k80: Vec<u8> = (0..80u8).collect();
        let k48: Vec<u8> = (100..148u8).collect();
        let raw = parse_key_file(&k80, 1000, 2).expect("raw 80-byte key");
        assert_eq!(raw.keys.len(), 1);
        assert_eq!(raw.keys[0].hmac[..], k80[16..48]);
        assert_eq!(raw.keys[0].aes[..], k80[48..80]);
        let text =
            format!("{}\n# comment\n{}\n", openssl::base64::encode_block(&k48), openssl::base64::encode_block(&k80));
        let set = parse_key_file(text.as_bytes(), 1000, 2).expect("base64 lines");
        assert_eq!(set.keys.len(), 2);
        assert_eq!((set.keys[0].aes_len, set.keys[0].hmac_len), (16, 16));
        assert_eq!(set.keys[0].aes[..16], k48[16..32]);
        assert_eq!(set.encrypting(1001).map(|k| k.name), Some(set.keys[0].name));
        assert!(set.opening(&set.keys[1].name, u64::MAX - 1).is_some(), "all keys open");
        assert!(parse_key_file(&[0u8; 50], 1000, 2).is_err());
        assert!(parse_key_file(b"bm90IGEga2V5\n", 1000, 2).is_err(), "a 9-byte key");
    }

    #[test]
    fn a_stale_set_encrypts_with_no_retired_key() {
        let mut s = KeySchedule::new(10, 2);
        s.refresh(1000, counter());
        let copy = s.keys().clone(); // what a worker holds when the master goes away
        let last = copy.keys.iter().max_by_key(|k| k.encrypt_from).expect("keys").clone();
        assert_eq!(copy.encrypting(last.encrypt_until + 1).map(|k| k.name), Some(last.name), "stale but open");
        assert!(copy.encrypting(last.decrypt_until).is_none(), "no key past every decrypt window");
    }

    #[test]
    fn a_key_files_first_key_stays_current_in_short_windows() {
        let k80: Vec<u8> = (0..80u8).collect();
        let mut set = parse_key_file(&k80, 1000, 2).expect("key");
        for now in [1001, 1030, 5000] {
            set.keep_first_current(now, 2);
            let k = set.encrypting(now).expect("current");
            assert_eq!((k.encrypt_from, k.encrypt_until), (now, now + 2), "at {now}");
        }
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
