//! Wiping secrets. Session DER holds the master secret, so every buffer that held one is
//! overwritten before its memory goes back to the allocator.

use std::sync::atomic::{compiler_fence, Ordering};

/// Overwrite `buf` with zeros in a way the optimiser may not remove as a dead store.
pub fn wipe(buf: &mut [u8]) {
    for b in buf.iter_mut() {
        // SAFETY: `b` is a valid, exclusive reference to one byte of `buf`.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    compiler_fence(Ordering::SeqCst);
}

/// A `Vec<u8>` that is wiped (its whole capacity) when dropped or cleared.
#[derive(Default)]
pub struct SecretBuf(Vec<u8>);

impl SecretBuf {
    /// An empty buffer with room for `cap` bytes.
    pub fn with_capacity(cap: usize) -> SecretBuf {
        SecretBuf(Vec::with_capacity(cap))
    }

    /// The bytes, for filling.
    pub fn vec(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }

    /// Wipe the contents and set the length to zero; the capacity is kept.
    pub fn clear(&mut self) {
        let len = self.0.len();
        wipe(&mut self.0[..len]);
        self.0.clear();
    }
}

impl std::ops::Deref for SecretBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
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
