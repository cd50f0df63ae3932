//! A TCP server on a free loopback port that accepts connections and never says a word (a
//! Redis whose TLS handshake never completes). Shared by the tests and `cts-test-helper`.

/// Start it on a thread of this process; returns its port. It holds every connection open
/// for the rest of the process.
pub fn silent_server() -> u16 {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming().flatten() {
            held.push(s);
        }
    });
    port
}
