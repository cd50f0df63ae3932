//! Helpers for end-to-end tests: servers run as child processes (the harness is
//! multi-threaded and never forks itself), a runtime certificate, a resuming client.
#![allow(dead_code)]

#[path = "../../examples/support/cert.rs"]
mod cert;
#[path = "../../examples/support/client.rs"]
pub mod client;
pub mod redis_server;
pub mod silent;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

pub use client::{Client, Outcome};

/// Certificate and key shared by every server of this test binary.
pub fn cert() -> &'static (PathBuf, PathBuf) {
    static CERT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    CERT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("cts-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        cert::make_cert(&dir).expect("certificate")
    })
}

/// A `cts-prefork-server` child process (its own process group), stopped on drop.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub port2: Option<u16>,
    pub workers: Vec<i32>,
    pub master: i32,
}

impl Server {
    /// Start the server with extra arguments; waits (at most 15 s) for its ready line.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with(args, &[], None)
    }

    /// `start` with extra environment variables and, optionally, stderr sent to a file.
    pub fn start_with(args: &[&str], env: &[(&str, &str)], stderr: Option<&std::path::Path>) -> Server {
        let (c, k) = cert();
        // These tests prove sharing, not latency: a generous lookup deadline keeps a loaded
        // 2-core CI machine from turning a slow cache thread into a miss. Fault tests that
        // measure the deadline pass their own.
        let deadline: &[&str] = if args.contains(&"--get-timeout-us") { &[] } else { &["--get-timeout-us", "500000"] };
        let mut child = Command::new(env!("CARGO_BIN_EXE_cts-prefork-server"))
            .args(deadline)
            .arg("--cert")
            .arg(c)
            .arg("--key")
            .arg(k)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(match stderr {
                Some(p) => Stdio::from(std::fs::File::create(p).expect("stderr file")),
                None => Stdio::inherit(),
            })
            .spawn()
            .expect("spawn cts-prefork-server");
        let master = child.id() as i32;
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut s = Server { child, port: 0, port2: None, workers: Vec::new(), master };
        let mut expected = None;
        loop {
            let line = rx.recv_timeout(Duration::from_secs(15)).expect("server did not get ready in 15 s");
            if let Some(rest) = line.strip_prefix("ready ") {
                for kv in rest.split_whitespace() {
                    let (k, v) = kv.split_once('=').expect("key=value");
                    match k {
                        "port" => s.port = v.parse().expect("port"),
                        "port2" => s.port2 = Some(v.parse().expect("port2")),
                        "workers" => expected = Some(v.parse::<usize>().expect("workers").max(1)),
                        _ => {}
                    }
                }
            } else if let Some(pid) = line.strip_prefix("worker pid=") {
                s.workers.push(pid.parse().expect("pid"));
            }
            if expected == Some(s.workers.len()) {
                return s;
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn addr2(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port2.expect("second port")))
    }

    /// Send a signal to the master only.
    pub fn signal_master(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.master, sig) };
    }

    /// Counters from `GET /stats` (the worker's and, if it answers, the master's).
    pub fn stats(&self) -> HashMap<String, u64> {
        let mut c = Client::new(true);
        let o = c.request(self.addr(), "/stats").expect("stats request");
        o.body
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect()
    }

    /// `stats` from every worker, by pid: 40 requests, spread over the workers by the kernel
    /// (with 4 workers, one is missed with a chance of about 4 in 100,000).
    pub fn stats_per_worker(&self) -> HashMap<u64, HashMap<String, u64>> {
        let mut per_worker = HashMap::new();
        for _ in 0..40 {
            let st = self.stats();
            per_worker.insert(st["pid"], st);
        }
        per_worker
    }
}

/// The sum of counter `key` over the workers of `stats_per_worker`.
pub fn sum_over_workers(per_worker: &HashMap<u64, HashMap<String, u64>>, key: &str) -> u64 {
    per_worker.values().map(|st| st[key]).sum()
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: the server made itself a process group leader; SIGCONT first so a stopped
        // master can die, then SIGKILL the whole group.
        unsafe {
            libc::kill(-self.master, libc::SIGCONT);
            libc::kill(-self.master, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Make `n` resumptions after one full handshake; returns the outcomes of the resumptions.
pub fn resume_n(addr: SocketAddr, tls12: bool, n: usize) -> Vec<Outcome> {
    let mut c = Client::new(tls12);
    let first = c.request(addr, "/").expect("first handshake");
    assert!(!first.reused, "the first connection is a full handshake");
    (0..n).map(|i| c.request(addr, "/").unwrap_or_else(|e| panic!("connection {i}: {e}"))).collect()
}

/// Distinct worker pids among outcomes.
pub fn distinct_pids(v: &[Outcome]) -> usize {
    let mut p: Vec<u32> = v.iter().map(|o| o.pid).collect();
    p.sort_unstable();
    p.dedup();
    p.len()
}
