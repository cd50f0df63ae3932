//! Any bytes into the wire decoder: never a panic; whatever decodes re-encodes to the same
//! frame. The same bytes as a replica push (`Sync` payload): never a panic, and every
//! record that decodes is a PUT or DEL.
#![no_main]

use cluster_tls_store::protocol;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = protocol::decode(data) {
        let mut again = Vec::new();
        protocol::encode(&mut again, m.op, m.request_id, m.expiry, m.namespace, m.id, m.payload);
        assert_eq!(again, data);
    }
    for rec in protocol::sync_records(data) {
        match rec {
            Ok(m) => assert!(matches!(m.op, protocol::Op::Put | protocol::Op::Del)),
            Err(_) => {}
        }
    }
});
