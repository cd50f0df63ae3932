//! The wire protocol between a worker and the master.
//!
//! One message per SOCK_SEQPACKET datagram. Every message starts with a fixed 20-byte
//! header, then the namespace, the session id and the payload:
//!
//! ```text
//! 0      1    2       3       4            12          20
//! | ver | op | ns_len | id_len | request id | expiry    | ns | id | payload |
//!                               u64 LE       u64 LE (unix seconds, PUT only)
//! ```
//!
//! Lengths are checked against the datagram before anything is sliced, so a garbled,
//! truncated or hostile frame decodes to an error, never to a panic or an out-of-bounds read.
//! The codec is pure: it takes and returns bytes and is unit-tested without sockets.

/// Protocol version carried by every message. A peer with another version is ignored.
pub const VERSION: u8 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 20;
/// Longest namespace accepted on the wire (and by `share_sessions`).
pub const MAX_NAMESPACE_LEN: usize = 64;
/// Longest session id (TLS caps ids at 32 bytes).
pub const MAX_ID_LEN: usize = 32;
/// Largest payload (session DER or stats) a frame may carry, whatever the configuration.
pub const MAX_PAYLOAD_LEN: usize = 64 * 1024;
/// Largest frame on the wire: anything longer is malformed.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_NAMESPACE_LEN + MAX_ID_LEN + MAX_PAYLOAD_LEN;

/// What a message asks for or answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Worker → master: look up (ns, id); expects `Hit` or `Miss` with the same request id.
    Get = 1,
    /// Worker → master: store (ns, id) → payload until `expiry`; no reply.
    Put = 2,
    /// Worker → master: remove (ns, id); no reply.
    Del = 3,
    /// Worker → master: ask for the master's counters; expects `StatsReply`.
    Stats = 4,
    /// Worker → master: ask for the session ticket keys; expects `TicketKeysReply`.
    TicketKeys = 5,
    /// Worker → master: a quarter of the session ring is unread by the master (with the
    /// remote tier on: any of it; see `ring`); no reply, the wake-up is the message.
    Nudge = 6,
    /// Master → worker: the session DER is the payload.
    Hit = 0x81,
    /// Master → worker: nothing stored under that key.
    Miss = 0x82,
    /// Master → worker: the master's counters, encoded by `crate::stats`.
    StatsReply = 0x84,
    /// Master → worker: the ticket keys, encoded by `crate::tickets::KeySet::encode`.
    TicketKeysReply = 0x85,
    /// Master → worker, unasked: PUTs and DELs other workers made, for the worker's replica.
    /// The payload is a sequence of records, each a little-endian u16 length and a whole
    /// PUT or DEL frame (see `sync_records`). The request id field carries how far the master
    /// had read the session ring (`ring`) when it sent them.
    Sync = 0x86,
    /// Master → worker, unasked: some `Sync` frames to this worker were lost (its socket was
    /// full); drop the whole replica, which may hold a session removed since, and skip what
    /// the session ring holds now.
    Flush = 0x87,
}

impl Op {
    fn from_u8(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::Get,
            2 => Op::Put,
            3 => Op::Del,
            4 => Op::Stats,
            5 => Op::TicketKeys,
            6 => Op::Nudge,
            0x81 => Op::Hit,
            0x82 => Op::Miss,
            0x84 => Op::StatsReply,
            0x85 => Op::TicketKeysReply,
            0x86 => Op::Sync,
            0x87 => Op::Flush,
            _ => return None,
        })
    }
}

/// Why a frame was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the fixed header.
    Truncated,
    /// Another protocol version.
    Version(u8),
    /// An op this version does not know.
    UnknownOp(u8),
    /// A namespace or id longer than allowed.
    FieldTooLong,
    /// The lengths in the header do not add up to the frame.
    LengthMismatch,
    /// Longer than `MAX_FRAME_LEN`.
    Oversized,
}

/// A decoded message. Borrows from the frame it was decoded from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    /// What the message asks for or answers.
    pub op: Op,
    /// Matches a reply to its request; 0 for messages that expect no reply.
    pub request_id: u64,
    /// Absolute expiry in unix seconds (PUT), otherwise 0.
    pub expiry: u64,
    /// Cache namespace.
    pub namespace: &'a [u8],
    /// TLS session id.
    pub id: &'a [u8],
    /// Session DER (PUT, Hit) or encoded stats (StatsReply).
    pub payload: &'a [u8],
}

/// Where a frame's expiry (little-endian u64) sits in its header.
pub const EXPIRY_OFFSET: usize = 12;

/// Parse one frame.
pub fn decode(frame: &[u8]) -> Result<Message<'_>, DecodeError> {
    if frame.len() > MAX_FRAME_LEN {
        return Err(DecodeError::Oversized);
    }
    if frame.len() < HEADER_LEN {
        return Err(DecodeError::Truncated);
    }
    if frame[0] != VERSION {
        return Err(DecodeError::Version(frame[0]));
    }
    let op = Op::from_u8(frame[1]).ok_or(DecodeError::UnknownOp(frame[1]))?;
    let ns_len = frame[2] as usize;
    let id_len = frame[3] as usize;
    if ns_len > MAX_NAMESPACE_LEN || id_len > MAX_ID_LEN {
        return Err(DecodeError::FieldTooLong);
    }
    let body = &frame[HEADER_LEN..];
    if body.len() < ns_len + id_len {
        return Err(DecodeError::LengthMismatch);
    }
    let (namespace, rest) = body.split_at(ns_len);
    let (id, payload) = rest.split_at(id_len);
    if payload.len() > MAX_PAYLOAD_LEN {
        return Err(DecodeError::Oversized);
    }
    let request_id = u64::from_le_bytes(frame[4..12].try_into().map_err(|_| DecodeError::Truncated)?);
    let expiry =
        u64::from_le_bytes(frame[EXPIRY_OFFSET..EXPIRY_OFFSET + 8].try_into().map_err(|_| DecodeError::Truncated)?);
    Ok(Message { op, request_id, expiry, namespace, id, payload })
}

/// Length of the frame `encode_header` + the three fields will make.
pub fn frame_len(namespace: &[u8], id: &[u8], payload_len: usize) -> usize {
    HEADER_LEN + namespace.len() + id.len() + payload_len
}

/// Append a frame's header, namespace and id to `out`; the caller appends `payload_len`
/// payload bytes after it (so a session can be DER-encoded straight into the frame).
///
/// Panics never: over-long fields are a caller bug caught by `debug_assert`, and are cut to
/// the protocol limits in release builds so the frame stays well formed.
pub fn encode_header(out: &mut Vec<u8>, op: Op, request_id: u64, expiry: u64, namespace: &[u8], id: &[u8]) {
    debug_assert!(namespace.len() <= MAX_NAMESPACE_LEN && id.len() <= MAX_ID_LEN);
    let namespace = &namespace[..namespace.len().min(MAX_NAMESPACE_LEN)];
    let id = &id[..id.len().min(MAX_ID_LEN)];
    // Built whole and appended once: a push per field re-checks the capacity every time.
    let mut head = [0u8; HEADER_LEN];
    head[..4].copy_from_slice(&[VERSION, op as u8, namespace.len() as u8, id.len() as u8]);
    head[4..12].copy_from_slice(&request_id.to_le_bytes());
    head[12..].copy_from_slice(&expiry.to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(namespace);
    out.extend_from_slice(id);
}

/// Append a whole frame to `out`.
pub fn encode(out: &mut Vec<u8>, op: Op, request_id: u64, expiry: u64, namespace: &[u8], id: &[u8], payload: &[u8]) {
    out.reserve(frame_len(namespace, id, payload.len()));
    encode_header(out, op, request_id, expiry, namespace, id);
    out.extend_from_slice(payload);
}

/// Append one record (a whole PUT or DEL frame) to a `Sync` payload. False, with `payload`
/// unchanged, when it would not fit in `MAX_PAYLOAD_LEN`.
pub fn push_sync_record(payload: &mut Vec<u8>, frame: &[u8]) -> bool {
    if frame.len() > u16::MAX as usize || payload.len() + 2 + frame.len() > MAX_PAYLOAD_LEN {
        return false;
    }
    payload.extend_from_slice(&(frame.len() as u16).to_le_bytes());
    payload.extend_from_slice(frame);
    true
}

/// The records of a `Sync` payload, in order. A record that does not decode as a PUT or DEL
/// ends the walk with an error item; what came before stays valid.
pub fn sync_records(payload: &[u8]) -> impl Iterator<Item = Result<Message<'_>, DecodeError>> {
    let mut rest = payload;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let Some((len, tail)) = rest.split_first_chunk::<2>() else {
            rest = &[];
            return Some(Err(DecodeError::Truncated));
        };
        let len = u16::from_le_bytes(*len) as usize;
        if tail.len() < len {
            rest = &[];
            return Some(Err(DecodeError::LengthMismatch));
        }
        let (frame, after) = tail.split_at(len);
        rest = after;
        match decode(frame) {
            Ok(m) if matches!(m.op, Op::Put | Op::Del) => Some(Ok(m)),
            Ok(m) => {
                rest = &[];
                Some(Err(DecodeError::UnknownOp(m.op as u8)))
            }
            Err(e) => {
                rest = &[];
                Some(Err(e))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(op: Op, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode(&mut v, op, 0x0102_0304_0506_0708, 1_700_000_000, b"web", &[7u8; 32], payload);
        v
    }

    #[test]
    fn round_trips_every_field() {
        let f = frame(Op::Put, b"der-bytes");
        let m = decode(&f).expect("decodes");
        assert_eq!(m.op, Op::Put);
        assert_eq!(m.request_id, 0x0102_0304_0506_0708);
        assert_eq!(m.expiry, 1_700_000_000);
        assert_eq!(m.namespace, b"web");
        assert_eq!(m.id, &[7u8; 32]);
        assert_eq!(m.payload, b"der-bytes");
    }

    #[test]
    fn every_truncation_is_an_error_or_a_shorter_payload() {
        let f = frame(Op::Hit, b"0123456789");
        for cut in 0..f.len() {
            match decode(&f[..cut]) {
                Err(_) => {}
                Ok(m) => {
                    // Cutting into the payload is indistinguishable from a shorter payload on
                    // a datagram channel; the DER decoder rejects it later.
                    assert!(cut >= HEADER_LEN + 3 + 32);
                    assert_eq!(m.payload, &b"0123456789"[..cut - (HEADER_LEN + 3 + 32)]);
                }
            }
        }
        assert_eq!(decode(&f[..HEADER_LEN - 1]), Err(DecodeError::Truncated));
        assert_eq!(decode(&f[..HEADER_LEN + 2]), Err(DecodeError::LengthMismatch));
    }

    #[test]
    fn rejects_unknown_version_and_op() {
        let mut f = frame(Op::Get, b"");
        f[0] = 2;
        assert_eq!(decode(&f), Err(DecodeError::Version(2)));
        let mut f = frame(Op::Get, b"");
        f[1] = 0x55;
        assert_eq!(decode(&f), Err(DecodeError::UnknownOp(0x55)));
    }

    #[test]
    fn rejects_oversized_fields_and_frames() {
        let mut f = frame(Op::Get, b"");
        f[3] = 33;
        assert_eq!(decode(&f), Err(DecodeError::FieldTooLong));
        let mut f = frame(Op::Get, b"");
        f[2] = 65;
        assert_eq!(decode(&f), Err(DecodeError::FieldTooLong));
        let big = vec![0u8; MAX_PAYLOAD_LEN + 1];
        let mut f = Vec::new();
        encode(&mut f, Op::Put, 1, 1, b"", b"", &big);
        assert_eq!(decode(&f), Err(DecodeError::Oversized));
        let huge = vec![1u8; MAX_FRAME_LEN + 1];
        assert_eq!(decode(&huge), Err(DecodeError::Oversized));
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small deterministic xorshift so the test is reproducible without a rand crate.
        let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let len = (s % 200) as usize;
            let mut buf = Vec::with_capacity(len);
            let mut t = s;
            for _ in 0..len {
                t = t.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                buf.push((t >> 56) as u8);
            }
            if !buf.is_empty() {
                buf[0] = VERSION;
            }
            let _ = decode(&buf);
        }
    }

    #[test]
    fn sync_records_round_trip_and_stop_at_garbage() {
        let mut payload = Vec::new();
        let put = frame(Op::Put, b"der");
        let mut del = Vec::new();
        encode(&mut del, Op::Del, 0, 0, b"web", b"id", &[]);
        assert!(push_sync_record(&mut payload, &put));
        assert!(push_sync_record(&mut payload, &del));
        let got: Vec<_> = sync_records(&payload).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].expect("put").payload, b"der");
        assert_eq!(got[1].expect("del").op, Op::Del);
        // A GET is not a sync record; a truncated record ends the walk.
        let mut bad = payload.clone();
        assert!(push_sync_record(&mut bad, &frame(Op::Get, b"")));
        assert!(sync_records(&bad).nth(2).expect("third").is_err());
        for cut in 0..payload.len() {
            assert!(sync_records(&payload[..cut]).count() <= 2);
        }
        let big = vec![0u8; MAX_PAYLOAD_LEN];
        assert!(!push_sync_record(&mut payload, &big), "a record that does not fit is refused");
    }
}
