//! Wiping secrets. Session DER holds the master secret, so every buffer that held one is
//! overwritten before its memory goes back to the allocator.

use std::sync::atomic::{compiler_fence, Ordering};

/// Overwrite `buf` with zeros in a way the optimiser may not remove as a dead store.
pub fn wipe(buf: &mut [u8]) {
    // SAFETY: `buf` is valid for writes of its length.
    unsafe { wipe_raw(buf.as_mut_ptr(), buf.len()) };
}

/// Overwrite `len` bytes at `p` with zeros, as `wipe` does, for memory that may hold no
/// live value (a `Vec`'s spare capacity).
///
/// `explicit_bzero` (glibc 2.25 and later, musl): a `memset` the compiler may not drop as a
/// dead store. Every round trip to the master wipes its frames on both ends (the request, the
/// 192-byte reply, the replica's copy): volatile stores a byte at a time were about 870 of the
/// round trip's instructions (callgrind, channel bench, one worker, both ends), a word at a
/// time about 420, `explicit_bzero` about 130.
///
/// # Safety
/// `p` must be valid for writes of `len` bytes.
unsafe fn wipe_raw(p: *mut u8, len: usize) {
    if len > 0 {
        // SAFETY: the caller vouches for `len` writable bytes at `p`.
        unsafe { libc::explicit_bzero(p.cast(), len) };
    }
    compiler_fence(Ordering::SeqCst);
}

/// Wipe the contents of `v` and set its length to zero (the capacity is kept): for a plain
/// scratch `Vec` that held a secret.
pub fn clear_wiped(v: &mut Vec<u8>) {
    wipe(v);
    v.clear();
}

/// Wipe the spare capacity of `v`: the bit copies that moving values within it (`retain`,
/// `remove`, `insert`) leaves behind past its length. For a `Vec` of values holding secrets.
pub fn wipe_spare<T>(v: &mut Vec<T>) {
    let spare = v.spare_capacity_mut();
    // SAFETY: the spare capacity is allocated and owned by `v`, and holds no live value.
    unsafe { wipe_raw(spare.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(spare)) };
}

/// Make room in `v` for `additional` more values. A `Vec` that grows frees its old
/// allocation as it is; here the values move to a new one and the old one is wiped first.
pub fn reserve_wiped<T>(v: &mut Vec<T>, additional: usize) {
    if v.capacity() - v.len() >= additional {
        return;
    }
    let mut grown = Vec::with_capacity(v.len().saturating_add(additional).max(v.capacity().saturating_mul(2)));
    grown.append(v);
    // `v` is empty now: its whole allocation is spare.
    wipe_spare(v);
    *v = grown;
}

/// A `Vec<u8>` that is wiped (its whole capacity) when dropped or cleared.
#[derive(Default)]
pub struct SecretBuf(Vec<u8>);

impl SecretBuf {
    /// An empty buffer with room for `cap` bytes.
    pub fn with_capacity(cap: usize) -> SecretBuf {
        SecretBuf(Vec::with_capacity(cap))
    }

    /// A buffer holding a copy of `bytes` (allocated to their size).
    pub fn from_slice(bytes: &[u8]) -> SecretBuf {
        let mut s = SecretBuf::with_capacity(bytes.len());
        s.0.extend_from_slice(bytes);
        s
    }

    /// The bytes, for filling.
    pub fn vec(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }

    /// Make room for `additional` more bytes. A `Vec` that grows frees its old allocation
    /// as it is; here the contents move to a new one and the old one is wiped first. Append
    /// secrets through this (or `extend_from_slice`), or into a buffer sized beforehand.
    pub fn reserve(&mut self, additional: usize) {
        reserve_wiped(&mut self.0, additional);
    }

    /// Append `bytes`, growing as `reserve` does.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        self.0.extend_from_slice(bytes);
    }

    /// Wipe the contents and set the length to zero; the capacity is kept.
    pub fn clear(&mut self) {
        clear_wiped(&mut self.0);
    }
}

/// Take over a `Vec` that holds a secret (no copy): it is wiped when the buffer goes.
impl From<Vec<u8>> for SecretBuf {
    fn from(v: Vec<u8>) -> SecretBuf {
        SecretBuf(v)
    }
}

impl std::ops::Deref for SecretBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::DerefMut for SecretBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl Drop for SecretBuf {
    fn drop(&mut self) {
        let cap = self.0.capacity();
        // SAFETY: the whole capacity is allocated and owned by this Vec; bytes past `len`
        // may be uninitialised, which writing zeros over is fine; we set the length back
        // to 0 before the Vec is dropped.
        unsafe {
            self.0.set_len(cap);
            wipe(&mut self.0);
            self.0.set_len(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wipe_zeroes_every_byte() {
        let mut v = vec![0xA5u8; 300];
        wipe(&mut v);
        assert!(v.iter().all(|&b| b == 0));
    }

    #[test]
    fn wipe_zeroes_exactly_its_range_at_every_alignment() {
        // Every start offset against the 8-byte word grid and every length up to three
        // words and a half: the bytes inside are zero, the guard bytes around them are not.
        for start in 0..8 {
            for len in 0..=28 {
                let mut v = [0xA5u8; 48];
                wipe(&mut v[start..start + len]);
                for (i, &b) in v.iter().enumerate() {
                    let inside = i >= start && i < start + len;
                    assert_eq!(b == 0, inside, "start {start} len {len} byte {i}");
                }
            }
        }
    }

    #[test]
    fn secret_buf_growth_keeps_the_contents() {
        let mut s = SecretBuf::with_capacity(4);
        for i in 0..100u8 {
            s.extend_from_slice(&[i, i]);
        }
        assert_eq!(s.len(), 200);
        assert!(s.chunks(2).enumerate().all(|(i, c)| c == [i as u8, i as u8]));
        let cap = s.vec().capacity();
        s.reserve(cap - s.len());
        assert_eq!(s.vec().capacity(), cap, "room enough: no new allocation");
    }

    #[test]
    fn wipe_spare_zeroes_what_moves_leave_behind() {
        let mut v: Vec<[u8; 8]> = Vec::with_capacity(4);
        v.extend([[1; 8], [2; 8], [3; 8]]);
        v.remove(0);
        let p = v.as_ptr();
        wipe_spare(&mut v);
        assert_eq!(v, [[2; 8], [3; 8]]);
        // SAFETY: the capacity (4 values) is still allocated; slot 2 was initialised above
        // (the bit copy `remove` left behind) and slot 3 is what wipe_spare just zeroed.
        let left = unsafe { std::slice::from_raw_parts(p.add(2).cast::<u8>(), 16) };
        assert!(left.iter().all(|&b| b == 0), "{left:?}");
    }

    #[test]
    fn reserve_wiped_keeps_the_values() {
        let mut v: Vec<u32> = Vec::new();
        for i in 0..100 {
            reserve_wiped(&mut v, 1);
            v.push(i);
        }
        assert!(v.iter().copied().eq(0..100));
    }

    #[test]
    fn secret_buf_clear_zeroes_contents_before_reuse() {
        let mut s = SecretBuf::with_capacity(16);
        s.vec().extend_from_slice(b"master-secret!!!");
        let p = s.vec().as_ptr();
        s.clear();
        // SAFETY: the capacity (16 bytes) is still allocated and was initialised above.
        let after = unsafe { std::slice::from_raw_parts(p, 16) };
        assert!(after.iter().all(|&b| b == 0));
    }
}
