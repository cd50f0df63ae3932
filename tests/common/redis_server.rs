//! A `redis-server` child process on a free loopback port for the remote-tier tests, and
//! the at-rest key file the hosts use. Debian's `redis-server` is installed when missing.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The at-rest key every test host uses (hex, 32 bytes).
pub const AT_REST_KEY: &str = "5a5b1c0d2e3f405162738495a6b7c8d9eafb0c1d2e3f40516273849500112233";

pub fn ensure_redis_server() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let r = READY.get_or_init(|| {
        let have = || Command::new("redis-server").arg("--version").output().is_ok_and(|o| o.status.success());
        if have() {
            return Ok(());
        }
        eprintln!("redis-server is missing: installing Debian's package (apt-get install -y redis-server)");
        let status = Command::new("sh")
            .arg("-c")
            .arg("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server")
            .status();
        match status {
            Ok(s) if s.success() && have() => Ok(()),
            Ok(s) => {
                Err(format!("`apt-get install -y redis-server` failed ({s}); install redis-server to run these tests"))
            }
            Err(e) => Err(format!("could not run apt-get ({e}); install redis-server to run these tests")),
        }
    });
    if let Err(why) = r {
        panic!("{why}");
    }
}

/// A `redis-server` on a free loopback port, killed on drop.
pub struct Redis {
    pub child: Option<Child>,
    port: u16,
    /// Extra `redis-server` arguments (TLS, password).
    extra: Vec<String>,
    /// The URL the hosts use, and the one the test itself uses (may skip verification).
    pub url: String,
    test_url: String,
}

/// Ports handed out in this process, so two tests never pick the same one.
static PORTS: Mutex<Vec<u16>> = Mutex::new(Vec::new());

fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let mut used = PORTS.lock().unwrap_or_else(|e| e.into_inner());
        if !used.contains(&port) {
            used.push(port);
            return port;
        }
    }
}

impl Redis {
    pub fn start() -> Redis {
        ensure_redis_server();
        let port = free_port();
        let url = format!("redis://127.0.0.1:{port}/0");
        let mut r = Redis { child: None, port, extra: Vec::new(), test_url: url.clone(), url };
        r.spawn();
        r
    }

    /// TLS only (`rediss://`), with a password, the server certificate being the tests' own
    /// self-signed one for "localhost".
    pub fn start_tls(password: &str) -> Redis {
        ensure_redis_server();
        let port = free_port();
        let (cert, key) = super::cert();
        let extra = [
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            cert.to_str().expect("utf-8"),
            "--tls-key-file",
            key.to_str().expect("utf-8"),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            password,
        ]
        .map(String::from)
        .to_vec();
        let url = format!("rediss://:{password}@localhost:{port}/0");
        let test_url = format!("rediss://:{password}@127.0.0.1:{port}/0#insecure");
        let mut r = Redis { child: None, port, extra, url, test_url };
        r.spawn();
        r
    }

    pub fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(mut c) = self.client().get_connection() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer PING in 10 s", self.port);
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.test_url.as_str()).expect("url")
    }

    pub fn con(&self) -> redis::Connection {
        self.client().get_connection().expect("connect to redis")
    }

    /// Every key and value stored now.
    pub fn dump(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut c = self.con();
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut c).expect("KEYS");
        keys.into_iter()
            .filter_map(|k| {
                let v: Option<Vec<u8>> = redis::cmd("GET").arg(&k).query(&mut c).expect("GET");
                v.map(|v| (k, v))
            })
            .collect()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn key_file() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("cts-remote-key-{}.txt", std::process::id()));
        std::fs::write(&p, format!("# test at-rest key\n{AT_REST_KEY}\n")).expect("key file");
        p
    })
    .clone()
}
