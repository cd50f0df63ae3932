//! Memory benchmark (issue 4): master bytes per cached session.
//!
//! The bench process is the master (`master_setup` with a 1 GiB budget, so nothing is
//! evicted) and stores 135-byte DERs under distinct 32-byte ids through
//! `cluster_tls_store::bench::put`, which in the master goes straight into the cache the cache
//! thread serves. At each checkpoint (default 100k and 1M sessions) it prints:
//! - `rss_bytes_per_session`: growth of the process's resident set since just before the first
//!   store, divided by the sessions held (what the operator pays);
//! - `accounted_bytes_per_session`: the cache's own `bytes` counter from `stats()` divided by
//!   its `entries` (what the budget charges).
//!
//! Output: JSON lines (`{"bench":"memory",...}`) and a short table. Options:
//! `--sessions 100000,1000000`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cluster_tls_store::{bench, Config};

const ID_LEN: usize = 32;
const DER_LEN: usize = 135;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    pages * page
}

fn main() {
    let mut checkpoints: Vec<u64> = vec![100_000, 1_000_000];
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--sessions") {
        if let Some(v) = args.get(i + 1) {
            let parsed: Vec<u64> = v.split(',').filter_map(|x| x.parse().ok()).collect();
            if !parsed.is_empty() {
                checkpoints = parsed;
            }
        }
    }
    checkpoints.sort_unstable();
    let config = Config { cache_bytes: 1 << 30, get_timeout: Duration::from_secs(1), ..Config::default() };
    if let Err(e) = cluster_tls_store::master_setup(config) {
        eprintln!("master_setup: {e}");
        std::process::exit(1);
    }
    let expiry = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) + 3600;
    let mut der = [0u8; DER_LEN];
    for (k, b) in der.iter_mut().enumerate() {
        *b = (k as u8).wrapping_mul(37) ^ 0x30;
    }
    // One store and its removal first, so lazily made structures are not charged to the sessions.
    bench::put(b"mem", &[0xffu8; ID_LEN], &der, expiry);
    bench::del(b"mem", &[0xffu8; ID_LEN]);
    let base_rss = rss_bytes();
    let base = cluster_tls_store::stats().master;
    let t0 = Instant::now();
    let mut stored = 0u64;
    let mut rows = Vec::new();
    for &cp in &checkpoints {
        while stored < cp {
            let mut id = [0u8; ID_LEN];
            // Distinct, well-spread ids, as a real server's random session ids would be.
            let x = stored.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5555_5555;
            id[..8].copy_from_slice(&x.to_le_bytes());
            id[8..16].copy_from_slice(&stored.to_le_bytes());
            id[16..24].copy_from_slice(&x.rotate_left(17).to_le_bytes());
            der[0] = stored as u8;
            bench::put(b"mem", &id, &der, expiry);
            stored += 1;
        }
        let rss = rss_bytes();
        let m = cluster_tls_store::stats().master;
        let entries = m.entries.saturating_sub(base.entries);
        let rss_per = rss.saturating_sub(base_rss) as f64 / entries.max(1) as f64;
        let acc_per = m.bytes.saturating_sub(base.bytes) as f64 / entries.max(1) as f64;
        println!(
            "{{\"bench\":\"memory\",\"sessions\":{cp},\"entries\":{entries},\"evictions\":{},\"der_bytes\":{DER_LEN},\
             \"id_bytes\":{ID_LEN},\"rss_delta_bytes\":{},\"rss_bytes_per_session\":{rss_per:.1},\
             \"accounted_bytes\":{},\"accounted_bytes_per_session\":{acc_per:.1},\"seconds\":{:.2}}}",
            m.evictions,
            rss.saturating_sub(base_rss),
            m.bytes,
            t0.elapsed().as_secs_f64()
        );
        rows.push((cp, entries, rss_per, acc_per));
    }
    println!();
    println!("memory bench: {DER_LEN}-byte DER, {ID_LEN}-byte ids, master cache budget 1 GiB (nginx: ~384 B/session)");
    println!("{:>10} | {:>10} | {:>16} | {:>22}", "sessions", "entries", "RSS B/session", "accounted B/session");
    for (cp, entries, rss_per, acc_per) in rows {
        println!("{cp:>10} | {entries:>10} | {rss_per:>16.1} | {acc_per:>22.1}");
    }
}
