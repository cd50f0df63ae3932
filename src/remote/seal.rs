//! Encryption at rest for everything the remote tier writes: AES-256-GCM through `ring`.
//!
//! Not OpenSSL: sealing and opening run on the remote tier's threads, which are not held by
//! the fork gate (they block on the network). OpenSSL takes process-wide locks (its
//! algorithm store, for one) that a `fork()` would snapshot held if one of these threads were
//! inside it, and a worker would then wait on them forever in its first handshake. `ring`
//! (already here for the rediss:// transport, see `remote`) has no such locks that a worker
//! ever touches.
//!
//! A sealed value is `version (1) | key id (4) | nonce (12, random) | ciphertext | tag (16)`.
//! The associated data is a label plus the Redis key the value is stored under, so a value
//! copied to another key (another session id, namespace or prefix) does not open. The key
//! id is the first 4 bytes of SHA-256 over the key: it names the key without revealing it.
//!
//! Key file: one key per line, 32 bytes written as 64 hex digits or as base64 (44
//! characters); blank lines and lines starting with `#` are ignored. The first key seals,
//! every key opens, so a new key is rolled out by adding it second on every host, then moving
//! it first, then removing the old one.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};

use crate::wipe::{reserve_wiped, wipe, SecretBuf};

/// Format version of a sealed value.
const SEAL_VERSION: u8 = 1;
const KEY_ID_LEN: usize = 4;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Bytes a sealed value adds to its plaintext.
pub const SEAL_OVERHEAD: usize = 1 + KEY_ID_LEN + NONCE_LEN + TAG_LEN;

/// One 32-byte key and its id; wiped on drop.
struct SealKey {
    id: [u8; KEY_ID_LEN],
    key: [u8; 32],
}

impl Drop for SealKey {
    fn drop(&mut self) {
        wipe(&mut self.key);
    }
}

/// The at-rest keys: the first seals, all open.
pub struct Sealer {
    keys: Vec<SealKey>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key ids only, never the keys.
        let ids: Vec<String> = self.keys.iter().map(|k| crate::log::hex(&k.id)).collect();
        f.debug_struct("Sealer").field("key_ids", &ids).finish()
    }
}

/// Sealing failed (the system's random source or the cipher refused); nothing was written
/// anywhere but the caller's buffer.
#[derive(Debug)]
pub struct SealError;

impl std::fmt::Display for SealError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sealing failed")
    }
}

/// Fill `buf` from the system's random source (getrandom).
pub fn random(buf: &mut [u8]) -> Result<(), SealError> {
    SystemRandom::new().fill(buf).map_err(|_| SealError)
}

/// Run `f` with the AES-256-GCM key made from `key`. ring expands the key into a schedule
/// held inline in the value and does not wipe it on drop: it lives on this stack frame for
/// one call and its bytes are overwritten before the frame is left.
fn with_aead_key<T>(key: &[u8; 32], f: impl FnOnce(&LessSafeKey) -> T) -> Result<T, SealError> {
    let k = UnboundKey::new(&AES_256_GCM, key).map(LessSafeKey::new).map_err(|_| SealError)?;
    let mut k = std::mem::ManuallyDrop::new(k);
    let r = f(&k);
    let p = (&mut *k as *mut LessSafeKey).cast::<u8>();
    for i in 0..size_of::<LessSafeKey>() {
        // SAFETY: `p..p + size_of` is the storage of `k`, a live local never used again
        // (ManuallyDrop: not dropped either); bytes are written through a raw pointer, never
        // read (no reference to possibly uninitialised padding is made). The type owns no
        // heap memory (an inline key schedule and a pointer to a static algorithm), so not
        // running its drop leaks nothing.
        unsafe { std::ptr::write_volatile(p.add(i), 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    Ok(r)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    // Sized up front: the bytes are key material, and a growing Vec frees old copies unwiped.
    let mut out = Vec::with_capacity(s.len() / 2);
    for i in (0..s.len()).step_by(2) {
        out.push(u8::from_str_radix(&s[i..i + 2], 16).ok()?);
    }
    Some(out)
}

impl Sealer {
    /// Parse a key file's contents (see the module documentation).
    pub fn parse(text: &[u8]) -> Result<Sealer, String> {
        let text =
            std::str::from_utf8(text).map_err(|_| "the key file is not text (hex or base64 lines)".to_string())?;
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut raw = if line.len() == 64 { unhex(line) } else { openssl::base64::decode_block(line).ok() }
                .ok_or_else(|| format!("line {}: neither 64 hex digits nor base64", n + 1))?;
            if raw.len() != 32 {
                let len = raw.len();
                wipe(&mut raw);
                return Err(format!("line {}: a key is 32 bytes, this one is {len}", n + 1));
            }
            let mut k = SealKey { id: [0; KEY_ID_LEN], key: [0; 32] };
            k.key.copy_from_slice(&raw);
            wipe(&mut raw);
            let mut digest = openssl::sha::sha256(&k.key);
            k.id.copy_from_slice(&digest[..KEY_ID_LEN]);
            wipe(&mut digest);
            reserve_wiped(&mut keys, 1);
            keys.push(k);
        }
        if keys.is_empty() {
            return Err("no key in the file (one 32-byte key per line, hex or base64)".into());
        }
        Ok(Sealer { keys })
    }

    /// Read and parse a key file; the bytes read are wiped.
    pub fn load(path: &std::path::Path) -> Result<Sealer, String> {
        let mut bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let r = Sealer::parse(&bytes).map_err(|why| format!("{}: {why}", path.display()));
        wipe(&mut bytes);
        r
    }

    /// Number of keys.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Seal `plain` under the first key with `aad`; the sealed value is appended to `out`.
    pub fn seal(&self, aad: &[u8], plain: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        let k = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce)?;
        let start = out.len();
        out.push(SEAL_VERSION);
        out.extend_from_slice(&k.id);
        out.extend_from_slice(&nonce);
        let body = out.len();
        out.extend_from_slice(plain);
        let tag = with_aead_key(&k.key, |key| {
            key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut out[body..])
        })?
        .map_err(|_| SealError)?;
        out.extend_from_slice(tag.as_ref());
        debug_assert_eq!(out.len() - start, SEAL_OVERHEAD + plain.len());
        Ok(())
    }

    /// Open a sealed value; `None` when it is malformed, sealed under an unknown key, or
    /// fails authentication (tampered, moved to another key, other associated data).
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<SecretBuf> {
        if sealed.len() < SEAL_OVERHEAD || sealed[0] != SEAL_VERSION {
            return None;
        }
        let id = &sealed[1..1 + KEY_ID_LEN];
        let nonce = &sealed[1 + KEY_ID_LEN..1 + KEY_ID_LEN + NONCE_LEN];
        let (body, tag) = sealed[1 + KEY_ID_LEN + NONCE_LEN..].split_at(sealed.len() - SEAL_OVERHEAD);
        let k = self.keys.iter().find(|k| k.id == id)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        // Decrypted in place, inside a buffer that is wiped on drop; the tag follows the body.
        let mut plain = SecretBuf::with_capacity(body.len() + TAG_LEN);
        plain.extend_from_slice(body);
        plain.extend_from_slice(tag);
        let n = with_aead_key(&k.key, |key| {
            key.open_in_place(nonce, Aad::from(aad), &mut plain.vec()[..]).map(|p| p.len())
        })
        .ok()?
        .ok()?;
        // Shrinking keeps the bytes inside the capacity, which SecretBuf wipes on drop.
        plain.vec().truncate(n);
        Some(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn two_keys() -> Sealer {
        let b64 = openssl::base64::encode_block(&[7u8; 32]);
        Sealer::parse(format!("# at-rest keys\n{K1}\n\n{b64}\n").as_bytes()).expect("parses")
    }

    #[test]
    fn sealed_values_open_with_the_same_aad_only() {
        let s = two_keys();
        assert_eq!(s.len(), 2);
        let mut v = Vec::new();
        s.seal(b"cts:web:abcd", b"session bytes", &mut v).expect("seal");
        assert_eq!(v.len(), SEAL_OVERHEAD + 13);
        assert!(!v.windows(13).any(|w| w == b"session bytes"));
        assert_eq!(&s.open(b"cts:web:abcd", &v).expect("opens")[..], b"session bytes");
        assert!(s.open(b"cts:web:abce", &v).is_none(), "moved to another id");
        for i in 0..v.len() {
            let mut t = v.clone();
            t[i] ^= 0x01;
            assert!(s.open(b"cts:web:abcd", &t).is_none(), "byte {i} flipped still opened");
        }
        assert!(s.open(b"cts:web:abcd", &v[..v.len() - 1]).is_none());
        assert!(s.open(b"", &[]).is_none());
    }

    #[test]
    fn the_first_key_seals_and_every_key_opens() {
        let old = Sealer::parse(K1.as_bytes()).expect("one key");
        let mut v = Vec::new();
        old.seal(b"a", b"x", &mut v).expect("seal");
        // The new key goes first: it seals, the old one (second) still opens.
        let b64 = openssl::base64::encode_block(&[7u8; 32]);
        let rotated = Sealer::parse(format!("{b64}\n{K1}\n").as_bytes()).expect("parses");
        assert_eq!(&rotated.open(b"a", &v).expect("old key still opens")[..], b"x");
        let b64_only = Sealer::parse(openssl::base64::encode_block(&[7u8; 32]).as_bytes()).expect("base64");
        assert!(b64_only.open(b"a", &v).is_none(), "an unknown key does not open");
        let mut w = Vec::new();
        rotated.seal(b"a", b"y", &mut w).expect("seal");
        assert!(old.open(b"a", &w).is_none(), "the first key of the new file seals");
    }

    #[test]
    fn bad_key_files_are_refused_with_a_reason() {
        assert!(Sealer::parse(b"").unwrap_err().contains("no key"));
        assert!(Sealer::parse(b"# only a comment\n").is_err());
        assert!(Sealer::parse(b"abcd\n").unwrap_err().contains("line 1"));
        assert!(Sealer::parse(openssl::base64::encode_block(&[1u8; 16]).as_bytes()).unwrap_err().contains("16"));
        assert!(Sealer::parse(&[0xff, 0xfe]).is_err());
        assert!(!format!("{:?}", two_keys()).contains("0102030405"), "Debug never shows a key");
    }
}
