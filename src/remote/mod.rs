//! The remote tier: a Redis (or Valkey) shared by the masters of several hosts.
//!
//! The master's cache stays the first tier. The cache thread never touches the network: it
//! hands work to two threads of this module through bounded queues and goes on.
//!
//! - **GET** (`cts-remote-get`): a local miss is forwarded with the worker's channel, a token
//!   naming that channel's life, and the request id. The thread asks Redis, opens the sealed
//!   value, and leaves the answer in `replies`, then writes the master's wake-up eventfd. The
//!   cache thread stores a hit locally and answers the worker itself, with the original
//!   request id, only if the channel still has the same token (a worker that died and whose
//!   descriptor number was reused gets nothing). Each forwarded GET has a budget (half the
//!   worker's `get_timeout`, at most `remote_timeout`): past it the thread answers "miss"
//!   without asking, and Redis's read timeout is the time left, so the worker hears back
//!   before its own deadline and never counts a timeout because of Redis.
//! - **PUT/DEL and ticket keys** (`cts-remote-put`): stores (sealed, with a TTL equal to the
//!   session's remaining lifetime) and removals are queued, pipelined, and dropped (counted)
//!   when the queue is full. Once a second the same thread agrees on ticket keys with the
//!   other hosts (see `tickets`).
//! - **Breaker**: any error or timeout drops the connection and pauses the tier (50 ms,
//!   doubling up to 5 s). While paused, misses are answered at once and writes are skipped
//!   (counted). After the pause each thread reconnects on its own time: lookups are
//!   forwarded only while the GET thread holds a live connection, so no lookup ever waits
//!   for a connection to be made (to a stalled Redis, that could take `remote_timeout`).
//!
//! Values are sealed with AES-256-GCM (`seal`), so Redis never holds a session's master
//! secret in the clear.

pub mod seal;
mod tickets;

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::protocol::{self, Op};
use crate::stats::MasterStats;
use crate::wipe::{clear_wiped, SecretBuf};
use crate::Error;
use seal::Sealer;

/// `MasterStats::remote_state` (0 when no remote tier is configured): the last request to Redis succeeded (or none failed yet).
pub const REMOTE_UP: u64 = 1;
/// `MasterStats::remote_state`: Redis failed; requests are skipped until the next probe.
pub const REMOTE_DOWN: u64 = 2;

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "cts:";
/// Environment variable naming the Redis URL when the configuration does not.
pub const ENV_URL: &str = "CTS_REMOTE";
/// Environment variable naming the at-rest key file when the configuration does not.
pub const ENV_KEY_FILE: &str = "CTS_REMOTE_KEY_FILE";
/// Environment variable for the key prefix when the configuration leaves the default.
pub const ENV_PREFIX: &str = "CTS_REMOTE_PREFIX";

const BREAKER_MIN: Duration = Duration::from_millis(50);
const BREAKER_MAX: Duration = Duration::from_secs(5);
/// Writes sent to Redis in one pipeline at most.
const WRITE_BATCH: usize = 64;
/// How often the write thread agrees on ticket keys (and probes a paused tier).
const TICK: Duration = Duration::from_secs(1);

/// A Redis URL, which may hold a password: `Debug` shows the scheme and host only.
#[derive(Clone, PartialEq, Eq)]
pub struct RemoteUrl(pub String);

impl From<&str> for RemoteUrl {
    fn from(s: &str) -> RemoteUrl {
        RemoteUrl(s.to_string())
    }
}

impl From<String> for RemoteUrl {
    fn from(s: String) -> RemoteUrl {
        RemoteUrl(s)
    }
}

impl RemoteUrl {
    /// The URL without user name or password, for messages.
    pub fn redacted(&self) -> String {
        match (self.0.split_once("://"), self.0.rfind('@')) {
            (Some((scheme, _)), Some(at)) => format!("{scheme}://***@{}", &self.0[at + 1..]),
            _ => self.0.clone(),
        }
    }
}

impl std::fmt::Debug for RemoteUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

/// Fill the remote settings the configuration leaves unset from the environment
/// (`CTS_REMOTE`, `CTS_REMOTE_KEY_FILE`, `CTS_REMOTE_PREFIX`).
pub fn apply_env(config: &mut Config) {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if config.remote_url.is_none() {
        config.remote_url = var(ENV_URL).map(RemoteUrl);
    }
    if config.remote_key_file.is_none() {
        config.remote_key_file = var(ENV_KEY_FILE).map(Into::into);
    }
    if config.remote_prefix == DEFAULT_PREFIX {
        if let Some(p) = var(ENV_PREFIX) {
            config.remote_prefix = p;
        }
    }
}

/// Check the remote settings (called by `Config::validate` when a URL is set).
pub fn validate(config: &Config) -> Result<(), Error> {
    let Some(url) = &config.remote_url else { return Ok(()) };
    let bad = |why: String| Err(Error::InvalidConfig(why));
    match redis::IntoConnectionInfo::into_connection_info(url.0.as_str()) {
        Err(e) => return bad(format!("remote_url {}: {e}", url.redacted())),
        Ok(info) if matches!(info.addr(), redis::ConnectionAddr::TcpTls { insecure: true, .. }) => {
            return bad(format!(
                "remote_url {}: #insecure (no certificate verification) is not supported; point \
                 SSL_CERT_FILE at the CA that signed the Redis server's certificate",
                url.redacted()
            ))
        }
        Ok(_) => {}
    }
    let Some(path) = &config.remote_key_file else {
        return bad(format!(
            "remote_url is set but no remote_key_file (or {ENV_KEY_FILE}): the remote tier \
             refuses to store sessions unencrypted"
        ));
    };
    if let Err(why) = Sealer::load(path) {
        return bad(format!("remote_key_file {why}"));
    }
    if config.remote_prefix.len() > 64 {
        return bad(format!("remote_prefix is {} bytes (at most 64)", config.remote_prefix.len()));
    }
    if config.remote_timeout < Duration::from_millis(1) || config.remote_timeout > Duration::from_secs(10) {
        return bad(format!("remote_timeout = {:?} (allowed 1 ms ..= 10 s)", config.remote_timeout));
    }
    if !(1..=1 << 20).contains(&config.remote_queue_len) {
        return bad(format!("remote_queue_len = {} (allowed 1 ..= 1048576)", config.remote_queue_len));
    }
    Ok(())
}

/// A lookup forwarded by the cache thread.
struct GetJob {
    fd: RawFd,
    token: u64,
    request_id: u64,
    namespace: Vec<u8>,
    id: Vec<u8>,
    deadline: Instant,
}

/// The answer to a forwarded lookup, for the cache thread.
pub struct Reply {
    /// The worker channel that asked.
    pub fd: RawFd,
    token: u64,
    /// The worker's request id.
    pub request_id: u64,
    /// The session's namespace.
    pub namespace: Vec<u8>,
    /// The session id.
    pub id: Vec<u8>,
    /// On a hit: the session's expiry (unix seconds) and its DER.
    pub found: Option<(u64, SecretBuf)>,
}

enum WriteJob {
    Put { namespace: Vec<u8>, id: Vec<u8>, der: SecretBuf, expiry: u64 },
    Del { namespace: Vec<u8>, id: Vec<u8> },
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    queue_drops: AtomicU64,
    open_failures: AtomicU64,
    skips: AtomicU64,
    stores: AtomicU64,
}

/// Shared by both threads and the cache thread: paused until `down_until` (ms since start).
struct Breaker {
    start: Instant,
    down_until: AtomicU64,
    backoff_ms: AtomicU64,
    state: AtomicU8,
}

impl Breaker {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn allows(&self) -> bool {
        self.now_ms() >= self.down_until.load(Relaxed)
    }

    fn trip(&self) {
        if !self.allows() {
            return; // Already paused (the other thread saw the same failure).
        }
        let b = self.backoff_ms.load(Relaxed);
        let next = if b == 0 { BREAKER_MIN.as_millis() as u64 } else { (b * 2).min(BREAKER_MAX.as_millis() as u64) };
        self.backoff_ms.store(next, Relaxed);
        self.down_until.store(self.now_ms() + next, Relaxed);
        self.state.store(REMOTE_DOWN as u8, Relaxed);
    }

    fn ok(&self) {
        self.backoff_ms.store(0, Relaxed);
        self.down_until.store(0, Relaxed);
        self.state.store(REMOTE_UP as u8, Relaxed);
    }
}

/// How long a removal is remembered: a value Redis still returns for a key removed this
/// recently is not brought back (the DEL may still be queued behind other writes, or be in
/// flight while a lookup of the same key reads the old value).
const REMOVED_WINDOW: Duration = Duration::from_secs(30);
/// Removals remembered at most; past that every remote hit is refused for a window.
const REMOVED_MAX: usize = 16 * 1024;
/// Removals whose DEL has not reached Redis, kept at most (see `Removed::unconfirmed`).
const UNCONFIRMED_MAX: usize = 16 * 1024;
/// DELs the write thread sends again per round, at most.
const RETRY_BATCH: usize = 512;

/// Keys removed within `REMOVED_WINDOW` (used by the cache thread only).
#[derive(Default)]
struct Removed {
    /// Oldest first: when each key was removed.
    order: std::collections::VecDeque<(Instant, Vec<u8>)>,
    /// Each key's latest removal.
    latest: HashMap<Vec<u8>, Instant>,
    /// More than `REMOVED_MAX` removals came within a window: until then, no remote hit is
    /// trusted (a full handshake instead).
    refuse_all_until: Option<Instant>,
    /// Removals whose DEL never reached Redis (the breaker was open, the queue full, or the
    /// pipeline failed): Redis may hold the session for as long as its TTL, so the key stays
    /// removed here until the write thread's retry of its DEL succeeds, not just for
    /// `REMOVED_WINDOW`. Past `UNCONFIRMED_MAX`, every remote hit is refused for the longest
    /// a session stored before can live in Redis (`max_lifetime`).
    unconfirmed: std::collections::HashSet<Vec<u8>>,
}

impl Removed {
    fn forget_old(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < REMOVED_WINDOW {
                break;
            }
            if let Some((at, key)) = self.order.pop_front() {
                if self.latest.get(&key) == Some(&at) {
                    self.latest.remove(&key);
                }
            }
        }
        if self.refuse_all_until.is_some_and(|t| now >= t) {
            self.refuse_all_until = None;
        }
    }

    fn note(&mut self, key: Vec<u8>, now: Instant) {
        self.forget_old(now);
        if self.order.len() >= REMOVED_MAX {
            self.order.clear();
            self.latest.clear();
            self.refuse_all(now + REMOVED_WINDOW);
            return;
        }
        self.latest.insert(key.clone(), now);
        self.order.push_back((now, key));
    }

    fn lately(&mut self, key: &[u8], now: Instant) -> bool {
        self.forget_old(now);
        self.refuse_all_until.is_some() || self.latest.contains_key(key) || self.unconfirmed.contains(key)
    }

    /// Refuse every remote hit until `until` (a refusal already longer stands).
    fn refuse_all(&mut self, until: Instant) {
        self.refuse_all_until = Some(self.refuse_all_until.map_or(until, |t| t.max(until)));
    }

    /// The DEL of `key` did not reach Redis.
    fn note_unconfirmed(&mut self, key: Vec<u8>, now: Instant, max_lifetime: Duration) {
        if self.unconfirmed.len() >= UNCONFIRMED_MAX {
            self.refuse_all(now + max_lifetime);
            return;
        }
        self.unconfirmed.insert(key);
    }
}

/// The remote tier, owned by the master.
pub struct Tier {
    client: redis::Client,
    url: RemoteUrl,
    sealer: Sealer,
    prefix: Vec<u8>,
    timeout: Duration,
    get_budget: Duration,
    wake_fd: RawFd,
    get_tx: SyncSender<GetJob>,
    put_tx: SyncSender<WriteJob>,
    receivers: Mutex<Option<(Receiver<GetJob>, Receiver<WriteJob>)>>,
    replies: Mutex<Vec<Reply>>,
    tokens: Mutex<HashMap<RawFd, u64>>,
    removed: Mutex<Removed>,
    next_token: AtomicU64,
    counters: Counters,
    breaker: Breaker,
    /// The GET thread holds a live connection (lookups are forwarded only then).
    get_ready: AtomicBool,
    /// The longest a session stays in Redis (its TTL is capped by it).
    max_lifetime: Duration,
    tickets: Option<tickets::Agreement>,
}

impl std::fmt::Debug for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tier").field("url", &self.url).field("sealer", &self.sealer).finish()
    }
}

/// The certificates a rediss:// server is verified against, as PEM: the system's trust store,
/// or `SSL_CERT_FILE` / `SSL_CERT_DIR` when set (as OpenSSL reads them). Read once, at setup:
/// left to itself the client crate reads the whole store again for every connection (~40 ms
/// for Debian's 140 roots, most of the default 50 ms budget). An empty or unreadable store is
/// not an error here: every handshake then fails verification, counted and logged like any
/// other remote error.
fn trust_roots() -> Vec<u8> {
    let found = rustls_native_certs::load_native_certs();
    if !found.errors.is_empty() || found.certs.is_empty() {
        crate::log::debug!(
            "remote: trust store: {} certificate(s), {} error(s) ({})",
            found.certs.len(),
            found.errors.len(),
            found.errors.first().map(|e| e.to_string()).unwrap_or_default()
        );
    }
    let mut pem = Vec::new();
    for cert in &found.certs {
        pem.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        for line in openssl::base64::encode_block(cert).as_bytes().chunks(64) {
            pem.extend_from_slice(line);
            pem.push(b'\n');
        }
        pem.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    pem
}

/// Hex of bytes, lower case.
fn hex_into(out: &mut Vec<u8>, bytes: &[u8]) {
    const H: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(H[(b >> 4) as usize]);
        out.push(H[(b & 15) as usize]);
    }
}

impl Tier {
    /// Build the tier from a validated configuration; `None` when no URL is configured.
    /// `wake_fd` is the master's eventfd, written when replies are ready.
    pub fn new(config: &Config, wake_fd: RawFd) -> Result<Option<Tier>, Error> {
        let Some(url) = config.remote_url.clone() else { return Ok(None) };
        validate(config)?;
        // TCP_NODELAY: every exchange is one small request and its reply, and the TLS
        // handshake's last flight is followed at once by the first command; with Nagle that
        // second write waits for the server's delayed ACK (40 ms on Linux), most of the
        // default 50 ms budget.
        let bad_url = |e: redis::RedisError| Error::InvalidConfig(format!("remote_url {}: {e}", url.redacted()));
        let info = redis::IntoConnectionInfo::into_connection_info(url.0.as_str())
            .map(|info| info.set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true)))
            .map_err(bad_url)?;
        let client = if matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
            let roots = redis::TlsCertificates { client_tls: None, root_cert: Some(trust_roots()) };
            redis::Client::build_with_tls(info, roots)
        } else {
            redis::Client::open(info)
        }
        .map_err(bad_url)?;
        let path = config.remote_key_file.as_ref().ok_or_else(|| Error::InvalidConfig("remote_key_file".into()))?;
        let sealer = Sealer::load(path).map_err(|why| Error::InvalidConfig(format!("remote_key_file {why}")))?;
        crate::log::debug!("remote tier {}: {} at-rest key(s)", url.redacted(), sealer.len());
        let queue = config.remote_queue_len;
        let (get_tx, get_rx) = std::sync::mpsc::sync_channel(queue);
        let (put_tx, put_rx) = std::sync::mpsc::sync_channel(queue);
        let tickets = (config.share_tickets && config.ticket_key_file.is_none()).then(|| {
            tickets::Agreement::new(config.ticket_key_rotation.as_secs().max(1), u64::from(config.ticket_keys))
        });
        Ok(Some(Tier {
            client,
            url,
            sealer,
            prefix: config.remote_prefix.as_bytes().to_vec(),
            timeout: config.remote_timeout,
            get_budget: config.remote_timeout.min(config.get_timeout / 2),
            wake_fd,
            get_tx,
            put_tx,
            receivers: Mutex::new(Some((get_rx, put_rx))),
            replies: Mutex::new(Vec::new()),
            tokens: Mutex::new(HashMap::new()),
            removed: Mutex::new(Removed::default()),
            next_token: AtomicU64::new(1),
            counters: Counters::default(),
            get_ready: AtomicBool::new(false),
            max_lifetime: config.max_lifetime,
            breaker: Breaker {
                start: Instant::now(),
                down_until: AtomicU64::new(0),
                backoff_ms: AtomicU64::new(0),
                state: AtomicU8::new(REMOTE_UP as u8),
            },
            tickets,
        }))
    }

    /// Agree on ticket keys once, now, on the calling thread (the master's setup, before
    /// the first fork, so workers start with the shared keys). Failure leaves the local
    /// keys; the write thread retries every second.
    pub fn first_ticket_sync(&self, install: &dyn Fn(crate::tickets::TicketKey)) {
        let Some(t) = &self.tickets else { return };
        match self.connect(self.timeout) {
            Ok(mut con) => {
                if let Err(e) = t.sync(self, &mut con, crate::master::now_secs(), install) {
                    self.failed(&e);
                }
            }
            Err(e) => self.failed(&e),
        }
    }

    /// Start the GET and write threads (the caller has blocked signals). `install` puts
    /// agreed ticket keys into the master's schedule.
    pub fn start(&'static self, install: fn(crate::tickets::TicketKey)) -> Result<(), Error> {
        let Some((get_rx, put_rx)) = self.receivers.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Ok(());
        };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map(drop)
                .map_err(|e| Error::System(format!("spawning the {name} thread: {e}")))
        };
        spawn("cts-remote-get", Box::new(move || self.supervise(|| self.get_loop(&get_rx))))?;
        spawn("cts-remote-put", Box::new(move || self.supervise(|| self.write_loop(&put_rx, install))))
    }

    /// Run a thread's loop until it returns (its queue is gone). A panic (a bug here or in
    /// the client crate) is counted as an error, pauses the tier like one, so the stats say
    /// it is down, and the loop starts again with a fresh connection.
    fn supervise(&self, run: impl Fn()) {
        while std::panic::catch_unwind(std::panic::AssertUnwindSafe(&run)).is_err() {
            self.counters.errors.fetch_add(1, Relaxed);
            self.breaker.trip();
        }
    }

    /// The Redis key of a session: prefix, namespace, ':', hex session id.
    pub fn key(&self, namespace: &[u8], id: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + namespace.len() + 1 + 2 * id.len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(namespace);
        k.push(b':');
        hex_into(&mut k, id);
        k
    }

    fn connect(&self, timeout: Duration) -> redis::RedisResult<redis::Connection> {
        // A panic in the client crate while connecting (redis 1.2 unwrapped a failed
        // native-tls handshake; rustls, used now, returns errors) is an error like any other.
        let con =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.client.get_connection_with_timeout(timeout)))
                .unwrap_or_else(|_| {
                    Err((redis::ErrorKind::Io, "connecting failed (the client crate panicked)").into())
                })?;
        con.set_write_timeout(Some(self.timeout))?;
        con.set_read_timeout(Some(self.timeout))?;
        Ok(con)
    }

    fn failed(&self, e: &redis::RedisError) {
        self.counters.errors.fetch_add(1, Relaxed);
        self.breaker.trip();
        crate::log::debug!("remote {}: {e}; paused", self.url.redacted());
    }

    /// A new worker channel (the cache thread adopted `fd`).
    pub fn conn_opened(&self, fd: RawFd) {
        let t = self.next_token.fetch_add(1, Relaxed);
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).insert(fd, t);
    }

    /// A worker channel closed; replies to it are dropped from now on.
    pub fn conn_closed(&self, fd: RawFd) {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).remove(&fd);
    }

    fn token(&self, fd: RawFd) -> Option<u64> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).get(&fd).copied()
    }

    /// True when `reply` is for the channel that is open on its descriptor now.
    pub fn still_open(&self, reply: &Reply) -> bool {
        self.token(reply.fd) == Some(reply.token)
    }

    /// After the cache handled `frame` from worker `fd` (and `out` holds its reply): send
    /// stores and removals to Redis, and forward a GET that missed. Returns true when the
    /// GET was forwarded: `out` is then cleared, the answer comes later through `replies`.
    pub fn after_frame(&self, fd: RawFd, frame: &[u8], out: &mut Vec<u8>, now: u64, max_lifetime: u64) -> bool {
        let Some(&op) = frame.get(1) else { return false };
        if op == Op::Get as u8 && out.get(1) != Some(&(Op::Miss as u8)) {
            return false; // a local hit (or no reply)
        }
        if op != Op::Get as u8 && op != Op::Put as u8 && op != Op::Del as u8 {
            return false;
        }
        let Ok(m) = protocol::decode(frame) else { return false };
        match m.op {
            Op::Put => self.put(m.namespace, m.id, m.payload, m.expiry.min(now.saturating_add(max_lifetime)), now),
            Op::Del => self.del(m.namespace, m.id),
            Op::Get if self.forward_get(fd, m.namespace, m.id, m.request_id) => {
                clear_wiped(out);
                return true;
            }
            _ => {}
        }
        false
    }

    fn forward_get(&self, fd: RawFd, namespace: &[u8], id: &[u8], request_id: u64) -> bool {
        if !self.get_ready.load(Relaxed) || !self.breaker.allows() {
            self.counters.skips.fetch_add(1, Relaxed);
            return false;
        }
        let Some(token) = self.token(fd) else { return false };
        let job = GetJob {
            fd,
            token,
            request_id,
            namespace: namespace.to_vec(),
            id: id.to_vec(),
            deadline: Instant::now() + self.get_budget,
        };
        match self.get_tx.try_send(job) {
            Ok(()) => true,
            Err(_) => {
                self.counters.queue_drops.fetch_add(1, Relaxed);
                false
            }
        }
    }

    /// Queue a store of `der` (sealed by the write thread) until `expiry`.
    pub fn put(&self, namespace: &[u8], id: &[u8], der: &[u8], expiry: u64, now: u64) {
        if expiry <= now {
            return;
        }
        let der = SecretBuf::from_slice(der);
        self.queue_write(WriteJob::Put { namespace: namespace.to_vec(), id: id.to_vec(), der, expiry });
    }

    /// Queue a removal, and remember it for `REMOVED_WINDOW`, or until its DEL reaches Redis
    /// if it cannot be queued (see `take_replies`).
    pub fn del(&self, namespace: &[u8], id: &[u8]) {
        let key = self.key(namespace, id);
        self.removed.lock().unwrap_or_else(|e| e.into_inner()).note(key, Instant::now());
        self.queue_write(WriteJob::Del { namespace: namespace.to_vec(), id: id.to_vec() });
    }

    fn queue_write(&self, job: WriteJob) {
        if !self.breaker.allows() {
            self.counters.skips.fetch_add(1, Relaxed);
            self.lost_del(&job);
            return;
        }
        match self.put_tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) | Err(TrySendError::Disconnected(job)) => {
                self.counters.queue_drops.fetch_add(1, Relaxed);
                self.lost_del(&job);
            }
        }
    }

    /// A write that will not reach Redis: if it is a DEL, keep its key removed here until
    /// the write thread's retry succeeds (`retry_dels`).
    fn lost_del(&self, job: &WriteJob) {
        if let WriteJob::Del { namespace, id } = job {
            let key = self.key(namespace, id);
            self.removed.lock().unwrap_or_else(|e| e.into_inner()).note_unconfirmed(
                key,
                Instant::now(),
                self.max_lifetime,
            );
        }
    }

    /// Send again the DELs that did not reach Redis (up to `RETRY_BATCH` a round); each one
    /// that does is forgotten.
    fn retry_dels(&self, c: &mut redis::Connection) -> redis::RedisResult<()> {
        let keys: Vec<Vec<u8>> = {
            let removed = self.removed.lock().unwrap_or_else(|e| e.into_inner());
            removed.unconfirmed.iter().take(RETRY_BATCH).cloned().collect()
        };
        if keys.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("DEL").arg(key.as_slice()).ignore();
        }
        if let Err(e) = pipe.query::<()>(c) {
            if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                return Err(e);
            }
            // Redis answered, and refused: counted, and tried again next round, but the
            // connection is fine and the other writes go on.
            self.counters.errors.fetch_add(1, Relaxed);
            crate::log::debug!("remote {}: DEL refused: {e}", self.url.redacted());
            return Ok(());
        }
        let mut removed = self.removed.lock().unwrap_or_else(|e| e.into_inner());
        for key in &keys {
            removed.unconfirmed.remove(key);
        }
        Ok(())
    }

    /// Take the answers ready for the cache thread. A hit for a session removed here within
    /// `REMOVED_WINDOW` becomes a miss: Redis returned it because the removal had not
    /// reached it yet (or was skipped), and storing it again would make a removed session
    /// resumable on every worker.
    pub fn take_replies(&self) -> Vec<Reply> {
        let mut replies = std::mem::take(&mut *self.replies.lock().unwrap_or_else(|e| e.into_inner()));
        if replies.iter().any(|r| r.found.is_some()) {
            let now = Instant::now();
            let mut removed = self.removed.lock().unwrap_or_else(|e| e.into_inner());
            for r in replies.iter_mut().filter(|r| r.found.is_some()) {
                if removed.lately(&self.key(&r.namespace, &r.id), now) {
                    r.found = None;
                    self.counters.hits.fetch_sub(1, Relaxed);
                    self.counters.misses.fetch_add(1, Relaxed);
                    crate::log::debug!("remote: a session removed here came back from redis; a miss");
                }
            }
        }
        replies
    }

    fn reply(&self, job: GetJob, found: Option<(u64, SecretBuf)>) {
        let GetJob { fd, token, request_id, namespace, id, .. } = job;
        self.replies.lock().unwrap_or_else(|e| e.into_inner()).push(Reply {
            fd,
            token,
            request_id,
            namespace,
            id,
            found,
        });
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to the master's eventfd, which lives as long
        // as the master (a static); a full counter is harmless (the loop drains on any wake).
        unsafe { libc::write(self.wake_fd, (&one as *const u64).cast(), 8) };
    }

    /// Open a sealed session value: `expiry (8, LE) | DER`.
    fn open_session(&self, key: &[u8], sealed: &[u8]) -> Option<(u64, SecretBuf)> {
        let plain = self.sealer.open(&session_aad(key), sealed)?;
        if plain.len() < 9 {
            return None;
        }
        let expiry = u64::from_le_bytes(plain[..8].try_into().ok()?);
        let der = SecretBuf::from_slice(&plain[8..]);
        Some((expiry, der))
    }

    /// The GET thread. It connects (and reconnects after the pause) on its own time, with
    /// `get_ready` false meanwhile so that nothing is forwarded: a lookup never waits for a
    /// connection to be made, only for one GET on a live connection, bounded by its budget.
    fn get_loop(&self, rx: &Receiver<GetJob>) {
        let mut con: Option<redis::Connection> = None;
        loop {
            if con.is_none() && self.breaker.allows() {
                match self.connect(self.timeout) {
                    Ok(c) => {
                        con = Some(c);
                        self.breaker.ok();
                        self.get_ready.store(true, Relaxed);
                    }
                    Err(e) => self.failed(&e),
                }
            }
            // Without a connection, wake up when the pause ends to try again.
            let wait = if con.is_some() {
                TICK
            } else {
                let until = self.breaker.down_until.load(Relaxed).saturating_sub(self.breaker.now_ms());
                Duration::from_millis(until.clamp(1, TICK.as_millis() as u64))
            };
            let job = match rx.recv_timeout(wait) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let left = job.deadline.saturating_duration_since(Instant::now());
            let Some(c) = con.as_mut().filter(|_| left >= Duration::from_millis(1) && self.breaker.allows()) else {
                // Too late to ask in time, paused or not connected since it was queued: a
                // miss now.
                self.counters.skips.fetch_add(1, Relaxed);
                self.reply(job, None);
                continue;
            };
            let key = self.key(&job.namespace, &job.id);
            let result: redis::RedisResult<Option<Vec<u8>>> =
                c.set_read_timeout(Some(left)).and_then(|()| redis::cmd("GET").arg(&key).query(c));
            let found = match result {
                Ok(Some(sealed)) => {
                    self.breaker.ok();
                    let opened = self.open_session(&key, &sealed);
                    if opened.is_none() {
                        self.counters.open_failures.fetch_add(1, Relaxed);
                        crate::log::debug!("remote: a value failed to open (key {})", String::from_utf8_lossy(&key));
                    }
                    opened
                }
                Ok(None) => {
                    self.breaker.ok();
                    None
                }
                Err(e) => {
                    con = None;
                    self.get_ready.store(false, Relaxed);
                    self.failed(&e);
                    None
                }
            };
            if found.is_some() {
                self.counters.hits.fetch_add(1, Relaxed);
            } else {
                self.counters.misses.fetch_add(1, Relaxed);
            }
            self.reply(job, found);
        }
    }

    fn write_loop(&self, rx: &Receiver<WriteJob>, install: fn(crate::tickets::TicketKey)) {
        let mut con: Option<redis::Connection> = None;
        let mut next_tick = Instant::now() + TICK;
        let mut batch: Vec<WriteJob> = Vec::with_capacity(WRITE_BATCH);
        let mut value: Vec<u8> = Vec::new();
        loop {
            match rx.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
                Ok(job) => batch.push(job),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while batch.len() < WRITE_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let tick = Instant::now() >= next_tick;
            if tick {
                next_tick = Instant::now() + TICK;
            }
            if !self.breaker.allows() {
                self.counters.skips.fetch_add(batch.len() as u64, Relaxed);
                batch.iter().for_each(|job| self.lost_del(job));
                batch.clear();
                continue;
            }
            if batch.is_empty() && !tick {
                continue;
            }
            let r = (|| -> redis::RedisResult<()> {
                if con.is_none() {
                    con = Some(self.connect(self.timeout)?);
                }
                let c = con.as_mut().ok_or_else(|| redis::RedisError::from(std::io::Error::other("no connection")))?;
                if !batch.is_empty() {
                    let stores = self.write_batch(c, &batch, &mut value)?;
                    self.counters.stores.fetch_add(stores, Relaxed);
                }
                self.retry_dels(c)?;
                if tick {
                    if let Some(t) = &self.tickets {
                        t.sync(self, c, crate::master::now_secs(), &install)?;
                    }
                }
                Ok(())
            })();
            if r.is_err() {
                // What this pipeline held may not have reached Redis: its DELs are kept.
                batch.iter().for_each(|job| self.lost_del(job));
            }
            batch.clear();
            match r {
                Ok(()) => self.breaker.ok(),
                Err(e) => {
                    con = None;
                    self.failed(&e);
                }
            }
        }
    }

    /// Send the queued writes as one pipeline; returns how many were stores.
    fn write_batch(
        &self,
        c: &mut redis::Connection,
        batch: &[WriteJob],
        value: &mut Vec<u8>,
    ) -> redis::RedisResult<u64> {
        let now = crate::master::now_secs();
        let mut pipe = redis::pipe();
        let mut stores = 0;
        let mut plain = SecretBuf::with_capacity(0);
        for job in batch {
            match job {
                WriteJob::Put { namespace, id, der, expiry } => {
                    let Some(ttl) = expiry.checked_sub(now).filter(|&t| t > 0) else { continue };
                    let key = self.key(namespace, id);
                    plain.clear();
                    plain.extend_from_slice(&expiry.to_le_bytes());
                    plain.extend_from_slice(der);
                    value.clear();
                    if self.sealer.seal(&session_aad(&key), &plain, value).is_err() {
                        self.counters.errors.fetch_add(1, Relaxed);
                        continue;
                    }
                    pipe.cmd("SET").arg(key).arg(value.as_slice()).arg("EX").arg(ttl).ignore();
                    stores += 1;
                }
                WriteJob::Del { namespace, id } => {
                    pipe.cmd("DEL").arg(self.key(namespace, id)).ignore();
                }
            }
        }
        pipe.query::<()>(c)?;
        Ok(stores)
    }

    /// Copy the counters into the master's stats.
    pub fn fill(&self, s: &mut MasterStats) {
        let c = &self.counters;
        s.remote_state = u64::from(self.breaker.state.load(Relaxed));
        s.remote_hits = c.hits.load(Relaxed);
        s.remote_misses = c.misses.load(Relaxed);
        s.remote_errors = c.errors.load(Relaxed);
        s.remote_queue_drops = c.queue_drops.load(Relaxed);
        s.remote_open_failures = c.open_failures.load(Relaxed);
        s.remote_skips = c.skips.load(Relaxed);
        s.remote_stores = c.stores.load(Relaxed);
    }
}

/// Associated data of a session value: a label and the Redis key (prefix, namespace, id).
fn session_aad(key: &[u8]) -> Vec<u8> {
    let mut aad = b"cts-session-v1\0".to_vec();
    aad.extend_from_slice(key);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removals_are_remembered_for_the_window_then_forgotten() {
        let t0 = Instant::now();
        let mut r = Removed::default();
        r.note(b"k1".to_vec(), t0);
        r.note(b"k2".to_vec(), t0 + Duration::from_secs(10));
        assert!(r.lately(b"k1", t0 + Duration::from_secs(1)));
        assert!(!r.lately(b"k3", t0 + Duration::from_secs(1)));
        // k1 leaves at 30 s, k2 at 40 s; a second removal of k1 renews it.
        assert!(!r.lately(b"k1", t0 + REMOVED_WINDOW));
        assert!(r.lately(b"k2", t0 + REMOVED_WINDOW));
        r.note(b"k1".to_vec(), t0 + REMOVED_WINDOW);
        assert!(r.lately(b"k1", t0 + REMOVED_WINDOW + Duration::from_secs(20)));
        assert!(!r.lately(b"k2", t0 + REMOVED_WINDOW + Duration::from_secs(20)));
        assert!(!r.lately(b"k1", t0 + 2 * REMOVED_WINDOW));
        assert!(r.order.is_empty() && r.latest.is_empty(), "memory goes with the window");
    }

    #[test]
    fn too_many_removals_refuse_every_hit_for_a_window_in_bounded_memory() {
        let t0 = Instant::now();
        let mut r = Removed::default();
        for i in 0..=REMOVED_MAX {
            r.note(i.to_le_bytes().to_vec(), t0);
        }
        assert!(r.order.len() <= REMOVED_MAX && r.latest.len() <= REMOVED_MAX);
        assert!(r.lately(b"never removed", t0 + Duration::from_secs(1)), "every hit refused");
        assert!(!r.lately(b"never removed", t0 + REMOVED_WINDOW), "until the window ends");
    }

    #[test]
    fn a_removal_whose_del_was_lost_stays_until_confirmed_in_bounded_memory() {
        let t0 = Instant::now();
        let life = Duration::from_secs(3600);
        let mut r = Removed::default();
        r.note(b"k".to_vec(), t0);
        r.note_unconfirmed(b"k".to_vec(), t0, life);
        assert!(r.lately(b"k", t0 + 10 * REMOVED_WINDOW), "past the window, still removed");
        r.unconfirmed.remove(b"k".as_slice());
        assert!(!r.lately(b"k", t0 + 10 * REMOVED_WINDOW), "forgotten once its DEL went through");
        for i in 0..=UNCONFIRMED_MAX {
            r.note_unconfirmed(i.to_le_bytes().to_vec(), t0, life);
        }
        assert_eq!(r.unconfirmed.len(), UNCONFIRMED_MAX, "bounded");
        assert!(r.lately(b"never removed", t0 + life / 2), "past the bound every hit is refused");
        // A flood of removals meanwhile does not shorten that refusal to its own window.
        for i in 0..=REMOVED_MAX {
            r.note(i.to_le_bytes().to_vec(), t0 + Duration::from_secs(1));
        }
        assert!(r.lately(b"never removed", t0 + life / 2));
        assert!(!r.lately(b"never removed", t0 + life + Duration::from_secs(2)), "until the refusal ends");
    }

    #[test]
    fn state_numbers_match_the_c_constants() {
        assert_eq!(REMOTE_UP, crate::capi::CTS_REMOTE_UP);
        assert_eq!(REMOTE_DOWN, crate::capi::CTS_REMOTE_DOWN);
    }

    #[test]
    fn urls_are_redacted_in_debug_output() {
        let u = RemoteUrl::from("redis://user:hunter2@10.0.0.1:6379/2");
        let d = format!("{u:?}");
        assert!(!d.contains("hunter2") && d.contains("10.0.0.1:6379/2"), "{d}");
        assert_eq!(RemoteUrl::from("redis://h:1").redacted(), "redis://h:1");
    }

    #[test]
    fn an_insecure_url_is_refused() {
        let dir = std::env::temp_dir().join(format!("cts-insecure-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let key = dir.join("k");
        std::fs::write(&key, format!("{}\n", "cd".repeat(32))).expect("key");
        let config = |url: &str| Config {
            remote_url: Some(url.into()),
            remote_key_file: Some(key.clone()),
            ..Config::default()
        };
        let err = validate(&config("rediss://:pw@127.0.0.1:6380/0#insecure")).unwrap_err().to_string();
        assert!(err.contains("#insecure") && !err.contains("pw"), "{err}");
        assert!(validate(&config("rediss://127.0.0.1:6380/0")).is_ok());
        assert!(validate(&config("redis://127.0.0.1:6379/0")).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_url_without_a_key_file_is_refused() {
        let c = Config { remote_url: Some("redis://127.0.0.1:1/".into()), ..Config::default() };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("remote_key_file"), "{e}");
        let c = Config { remote_url: Some("nonsense".into()), ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().contains("remote_url"));
    }

    #[test]
    fn breaker_pauses_and_doubles_then_closes() {
        let b = Breaker {
            start: Instant::now(),
            down_until: AtomicU64::new(0),
            backoff_ms: AtomicU64::new(0),
            state: AtomicU8::new(REMOTE_UP as u8),
        };
        assert!(b.allows());
        b.trip();
        assert!(!b.allows());
        assert_eq!(b.backoff_ms.load(Relaxed), 50);
        b.trip();
        assert_eq!(
            b.backoff_ms.load(Relaxed),
            50,
            "a second failure within the pause (the other thread) does not double"
        );
        b.down_until.store(0, Relaxed); // the pause is over: the next failure doubles it
        b.trip();
        assert_eq!(b.backoff_ms.load(Relaxed), 100);
        b.ok();
        assert_eq!(b.state.load(Relaxed) as u64, REMOTE_UP);
        b.trip();
        assert_eq!(b.backoff_ms.load(Relaxed), 50, "a success resets the back-off");
    }
}
