//! Debug logging for operators, off by default: `CTS_DEBUG=1` in the environment prints one
//! line per cache event to stderr. Lines carry the operation, namespace, session id (which
//! TLS sends in the clear), sizes and outcome; never session bytes, so never a secret.

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

static STATE: AtomicU8 = AtomicU8::new(0); // 0 unknown, 1 off, 2 on

/// Whether `CTS_DEBUG=1` is set (read once per process).
pub fn enabled() -> bool {
    match STATE.load(Relaxed) {
        0 => {
            let on = std::env::var_os("CTS_DEBUG").is_some_and(|v| v == "1");
            STATE.store(if on { 2 } else { 1 }, Relaxed);
            on
        }
        s => s == 2,
    }
}

/// Hex of a session id (public data) for a log line.
pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Log a line when debugging is on. Arguments are only formatted when it is.
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::enabled() {
            eprintln!("cts[{}] {}", std::process::id(), format_args!($($arg)*));
        }
    };
}
pub(crate) use debug;
