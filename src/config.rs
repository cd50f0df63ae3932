//! Configuration of the master's cache and of the workers' channel.

use std::time::Duration;

use crate::protocol::MAX_PAYLOAD_LEN;
use crate::Error;

/// How the shared cache behaves. `Config::default()` holds the documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Byte budget of the master's cache (session DER + key + a fixed per-entry overhead).
    /// Least-recently-used sessions are evicted beyond it. Default 64 MiB.
    pub cache_bytes: usize,
    /// Largest session DER stored; larger sessions are refused and counted. Default 16 KiB.
    pub max_session_bytes: usize,
    /// Upper bound on a session's lifetime in the cache, whatever its own timeout says.
    /// Default 24 hours.
    pub max_lifetime: Duration,
    /// How long a worker's lookup waits for the master before it counts as a miss (at most
    /// 200 µs more, and no more than a tenth more).
    /// Default 10 ms.
    pub get_timeout: Duration,
    /// Longest pause of lookups after the master failed to answer (the breaker doubles its
    /// pause from 1/8 of this up to this value). Default 500 ms.
    pub breaker_max_backoff: Duration,
    /// Share TLS session ticket keys: the master makes and rotates them, every shared
    /// `SSL_CTX` uses them, so tickets (TLS 1.3's default resumption, and TLS 1.2 clients
    /// that send the SessionTicket extension) open on any worker. Default on.
    pub share_tickets: bool,
    /// How often a new ticket key takes over encryption. Default 1 hour.
    pub ticket_key_rotation: Duration,
    /// How many rotations a key keeps opening tickets (K ≥ 2): a ticket older than K
    /// rotations is refused (full handshake). Default 3, so tickets live at most 3 hours with
    /// the default rotation (OpenSSL's own session timeout applies too).
    pub ticket_keys: u32,
    /// Ticket keys managed by the operator instead of rotated by the master: a file in the
    /// nginx/HAProxy format (one 48- or 80-byte key, or base64 lines; the first key encrypts,
    /// all open). The master reloads it when it changes (checked every second). Default none.
    pub ticket_key_file: Option<std::path::PathBuf>,
    /// Byte budget of each worker's replica: every stored or removed session reaches the
    /// other workers, which keep recent ones (LRU, same accounting as the master's cache), so
    /// most lookups are answered in the worker without a round trip. A new session travels
    /// through the session ring, a shared mapping of half this budget (256 KiB to 16 MiB)
    /// that the master makes before it forks; removals, and sessions too large for a ring
    /// slot (about 400 bytes of DER), are pushed by the master. Memory cost: up to this much
    /// per worker, plus the ring once. 0 turns replicas and the ring off (every lookup asks
    /// the master). Default 4 MiB.
    pub replica_bytes: usize,
    /// The remote tier, shared by the masters of several hosts: a Redis (or Valkey) URL,
    /// `redis://[user:password@]host:port/db` or `rediss://` for TLS. `None` (default) keeps
    /// the cache on this host; `master_setup` then reads `CTS_REMOTE` from the environment.
    pub remote_url: Option<crate::remote::RemoteUrl>,
    /// The at-rest key file of the remote tier: one 32-byte AES-256-GCM key per line, as 64
    /// hex digits or base64; the first seals, all open. Required with `remote_url`;
    /// `None` reads `CTS_REMOTE_KEY_FILE`.
    pub remote_key_file: Option<std::path::PathBuf>,
    /// Prefix of every Redis key, so several clusters can share one Redis. Default "cts:"
    /// (`CTS_REMOTE_PREFIX` replaces the default).
    pub remote_prefix: String,
    /// Timeout of Redis requests (read, write) and of making a connection (TCP connect, the
    /// `rediss://` TLS handshake and authentication, as a whole); a lookup also gives up at
    /// half the worker's `get_timeout`. It does not bound the host name lookup (the system's
    /// resolver), which never runs on a handshake's path; `master_setup` waits for its first
    /// Redis exchange (the ticket-key agreement) at most 4 × this (at least 0.5 s), then goes
    /// on without it. Default 50 ms.
    pub remote_timeout: Duration,
    /// Length of each of the two queues to the remote threads (lookups; stores and removals);
    /// work that finds its queue full is dropped and counted, except a removal, which is kept
    /// and sent again until Redis takes it. Default 1024.
    pub remote_queue_len: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            cache_bytes: 64 << 20,
            max_session_bytes: 16 << 10,
            max_lifetime: Duration::from_secs(24 * 3600),
            get_timeout: Duration::from_millis(10),
            breaker_max_backoff: Duration::from_millis(500),
            share_tickets: true,
            ticket_key_rotation: Duration::from_secs(3600),
            ticket_keys: 3,
            ticket_key_file: None,
            replica_bytes: 4 << 20,
            remote_url: None,
            remote_key_file: None,
            remote_prefix: crate::remote::DEFAULT_PREFIX.to_string(),
            remote_timeout: Duration::from_millis(50),
            remote_queue_len: 1024,
        }
    }
}

impl Config {
    /// Check every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |why: String| Err(Error::InvalidConfig(why));
        if self.max_session_bytes < 256 || self.max_session_bytes > MAX_PAYLOAD_LEN {
            return bad(format!("max_session_bytes = {} (allowed 256..={MAX_PAYLOAD_LEN})", self.max_session_bytes));
        }
        if self.replica_bytes != 0 && !(64 << 10..=1 << 40).contains(&self.replica_bytes) {
            return bad(format!("replica_bytes = {} (0, or 65536 ..= 2^40)", self.replica_bytes));
        }
        if self.cache_bytes < 64 << 10 {
            return bad(format!("cache_bytes = {} (at least 65536)", self.cache_bytes));
        }
        if self.max_lifetime < Duration::from_secs(1) || self.max_lifetime > Duration::from_secs(7 * 24 * 3600) {
            return bad(format!("max_lifetime = {:?} (allowed 1 s ..= 7 days)", self.max_lifetime));
        }
        if self.get_timeout < Duration::from_micros(100) || self.get_timeout > Duration::from_secs(10) {
            return bad(format!("get_timeout = {:?} (allowed 100 µs ..= 10 s)", self.get_timeout));
        }
        if self.breaker_max_backoff < Duration::from_millis(1) || self.breaker_max_backoff > Duration::from_secs(60) {
            return bad(format!("breaker_max_backoff = {:?} (allowed 1 ms ..= 60 s)", self.breaker_max_backoff));
        }
        if self.ticket_key_rotation < Duration::from_secs(1)
            || self.ticket_key_rotation > Duration::from_secs(7 * 24 * 3600)
        {
            return bad(format!("ticket_key_rotation = {:?} (allowed 1 s ..= 7 days)", self.ticket_key_rotation));
        }
        if !(2..=16).contains(&self.ticket_keys) {
            return bad(format!("ticket_keys = {} (allowed 2..=16)", self.ticket_keys));
        }
        if let Some(path) = &self.ticket_key_file {
            let bytes = std::fs::read(path)
                .map_err(|e| Error::InvalidConfig(format!("ticket_key_file {}: {e}", path.display())))?;
            let mut bytes = bytes;
            let parsed = crate::tickets::parse_key_file(&bytes, 0, 1);
            crate::wipe::wipe(&mut bytes);
            if let Err(why) = parsed {
                return bad(format!("ticket_key_file {}: {why}", path.display()));
            }
        }
        crate::remote::validate(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        assert!(Config::default().validate().is_ok());
        let c = Config { max_session_bytes: 10, ..Config::default() };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("max_session_bytes"), "{e}");
        let c = Config { get_timeout: Duration::ZERO, ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().contains("get_timeout"));
    }
}
