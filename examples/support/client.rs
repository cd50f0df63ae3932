//! A resuming TLS client on the openssl crate: connects, reads the server's one-line answer
//! (`worker <pid> reused <0|1> proto <v>`), and keeps the newest session for the next connection.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use openssl::ssl::{SslConnector, SslMethod, SslSession, SslVerifyMode, SslVersion};

/// What one connection saw.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub pid: u32,
    pub reused: bool,
    pub proto: String,
    pub body: String,
}

/// A client that offers its latest session on every connection.
pub struct Client {
    connector: SslConnector,
    pub session: Option<SslSession>,
}

impl Client {
    fn builder(max_tls12: bool) -> openssl::ssl::SslConnectorBuilder {
        let mut b = SslConnector::builder(SslMethod::tls_client()).expect("client context");
        b.set_verify(SslVerifyMode::NONE);
        if max_tls12 {
            b.set_max_proto_version(Some(SslVersion::TLS1_2)).expect("max version");
        } else {
            b.set_min_proto_version(Some(SslVersion::TLS1_3)).expect("min version");
        }
        b
    }

    /// `max_tls12` caps the client at TLS 1.2 (session ids); otherwise TLS 1.3 is used.
    pub fn new(max_tls12: bool) -> Client {
        Client { connector: Self::builder(max_tls12).build(), session: None }
    }

    /// A client that presents `cert` (signed by `key`) when the server asks for one.
    pub fn with_certificate(
        max_tls12: bool,
        cert: &openssl::x509::X509Ref,
        key: &openssl::pkey::PKeyRef<openssl::pkey::Private>,
    ) -> Client {
        let mut b = Self::builder(max_tls12);
        b.set_certificate(cert).expect("client certificate");
        b.set_private_key(key).expect("client key");
        Client { connector: b.build(), session: None }
    }

    /// One request; `path` is sent as `GET <path>`. Keeps the newest session.
    pub fn request(&mut self, addr: SocketAddr, path: &str) -> Result<Outcome, Box<dyn std::error::Error>> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut cfg = self.connector.configure()?.use_server_name_indication(false).verify_hostname(false);
        cfg.set_verify(SslVerifyMode::NONE);
        let mut ssl = cfg.into_ssl("localhost")?;
        if let Some(s) = &self.session {
            // SAFETY: the session came from a connection made by this same connector.
            unsafe { ssl.set_session(s)? };
        }
        let mut s = ssl.connect(tcp).map_err(|e| format!("handshake: {e}"))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())?;
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        let reused = s.ssl().session_reused();
        if let Some(sess) = s.ssl().session() {
            self.session = Some(sess.to_owned());
        }
        let _ = s.shutdown();
        let text = String::from_utf8_lossy(&resp).into_owned();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_string();
        let mut words = body.split_whitespace();
        let pid =
            if words.next() == Some("worker") { words.next().and_then(|p| p.parse().ok()).unwrap_or(0) } else { 0 };
        let proto = body.split_whitespace().nth(5).unwrap_or("").to_string();
        Ok(Outcome { pid, reused, proto, body })
    }
}
