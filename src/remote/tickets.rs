//! Ticket keys agreed across hosts through Redis.
//!
//! Time is cut into epochs of one rotation period R: epoch e encrypts during `[e·R, (e+1)·R)`
//! and opens tickets until `(e+K)·R`. The key of epoch e lives under `<prefix>tk:<e>`, sealed
//! like sessions (associated data: a label and that Redis key). Whichever host first finds a
//! slot empty, for the current epoch or the next one, fills it with fresh random key material
//! using `SET NX`; every host then reads the slot, so all hosts hold the same keys, and the
//! next key is known a whole period before it takes over. Slots expire after the last ticket
//! they made can no longer be opened. Agreed keys go into the master's `KeySchedule` ahead of
//! its own random keys (which stay only for tickets made before the agreement).

use std::collections::HashSet;
use std::sync::Mutex;

use super::Tier;
use crate::tickets::TicketKey;
use crate::wipe::SecretBuf;

/// Key material in a slot: name (16), AES-256 key (32), HMAC-SHA256 key (32).
const SLOT_PLAIN_LEN: usize = 80;

/// The epochs already installed, so a slot is read once.
pub(super) struct Agreement {
    rotation: u64,
    keep: u64,
    installed: Mutex<HashSet<u64>>,
}

impl Agreement {
    pub(super) fn new(rotation: u64, keep: u64) -> Agreement {
        Agreement { rotation, keep: keep.max(1), installed: Mutex::new(HashSet::new()) }
    }

    fn slot_key(tier: &Tier, epoch: u64) -> Vec<u8> {
        let mut k = tier.prefix.clone();
        k.extend_from_slice(format!("tk:{epoch}").as_bytes());
        k
    }

    fn aad(key: &[u8]) -> Vec<u8> {
        let mut aad = b"cts-ticket-key-v1\0".to_vec();
        aad.extend_from_slice(key);
        aad
    }

    /// Make sure the keys of the epochs that may still open tickets, the current one and
    /// the next one are installed; create the current and next slots when empty.
    pub(super) fn sync(
        &self,
        tier: &Tier,
        con: &mut redis::Connection,
        now: u64,
        install: &dyn Fn(TicketKey),
    ) -> redis::RedisResult<()> {
        let e_now = now / self.rotation;
        let first = e_now.saturating_sub(self.keep - 1);
        let mut installed = self.installed.lock().unwrap_or_else(|e| e.into_inner());
        installed.retain(|&e| e >= first);
        for epoch in first..=e_now + 1 {
            if installed.contains(&epoch) {
                continue;
            }
            let key = Self::slot_key(tier, epoch);
            let aad = Self::aad(&key);
            let mut sealed: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query(con)?;
            if sealed.is_none() && epoch >= e_now {
                let mut fresh = SecretBuf::with_capacity(SLOT_PLAIN_LEN);
                fresh.vec().resize(SLOT_PLAIN_LEN, 0);
                let mut value = Vec::new();
                if super::seal::random(&mut fresh.vec()[..]).is_ok()
                    && tier.sealer.seal(&aad, &fresh, &mut value).is_ok()
                {
                    let ttl = (epoch + self.keep + 1) * self.rotation - now;
                    let _: Option<String> =
                        redis::cmd("SET").arg(&key).arg(&value).arg("NX").arg("EX").arg(ttl).query(con)?;
                    // Read back: another host may have won the race.
                    sealed = redis::cmd("GET").arg(&key).query(con)?;
                }
            }
            let Some(sealed) = sealed else { continue };
            let Some(plain) = tier.sealer.open(&aad, &sealed) else {
                tier.counters.open_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            };
            if plain.len() != SLOT_PLAIN_LEN {
                continue;
            }
            let mut k = TicketKey {
                name: [0; 16],
                aes: [0; 32],
                hmac: [0; 32],
                aes_len: 32,
                hmac_len: 32,
                encrypt_from: epoch * self.rotation,
                encrypt_until: (epoch + 1) * self.rotation,
                decrypt_until: (epoch + self.keep) * self.rotation,
            };
            k.name.copy_from_slice(&plain[..16]);
            k.aes.copy_from_slice(&plain[16..48]);
            k.hmac.copy_from_slice(&plain[48..80]);
            install(k);
            installed.insert(epoch);
            crate::log::debug!("remote: ticket key of epoch {epoch} installed");
        }
        Ok(())
    }
}
