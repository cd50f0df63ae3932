//! Typed errors for the Rust API, and the stable numeric codes the C API returns.

use std::fmt;

/// Everything that can go wrong in a call of this library. Handshake-time failures are never
/// errors: a lookup that fails for any reason is a cache miss and a full handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A required pointer argument was NULL (C API only).
    NullArgument(&'static str),
    /// A configuration value is out of range; the text says which and why.
    InvalidConfig(String),
    /// `master_setup` was called in a worker (a process forked by the master).
    InWorker,
    /// `share_sessions` was called in a process that has neither run `master_setup` nor
    /// been forked (or exec'd with a channel) by a process that did.
    NoMaster,
    /// The process inherited a channel that belongs to its parent (a helper forked by a
    /// worker); it may not use it.
    NotChannelOwner,
    /// The namespace is longer than 64 bytes.
    InvalidNamespace(String),
    /// OpenSSL refused a call; the text holds its error queue.
    OpenSsl(String),
    /// A system call failed.
    System(String),
    /// A panic was caught at the C boundary (a bug in this library).
    Panic,
}

impl Error {
    /// The stable C code for this error (see `cts_result` in the header).
    pub fn code(&self) -> i32 {
        match self {
            Error::NullArgument(_) => 1,
            Error::InvalidConfig(_) => 2,
            Error::InWorker => 3,
            Error::NoMaster => 4,
            Error::InvalidNamespace(_) => 5,
            Error::OpenSsl(_) => 6,
            Error::System(_) => 7,
            Error::Panic => 8,
            Error::NotChannelOwner => 9,
        }
    }

    pub(crate) fn system(what: &str) -> Error {
        Error::System(format!("{what}: {}", std::io::Error::last_os_error()))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NullArgument(name) => write!(f, "required argument `{name}` is NULL"),
            Error::InvalidConfig(why) => write!(f, "invalid configuration: {why}"),
            Error::InWorker => {
                f.write_str("cts_master_setup called in a worker: call it once in the master, before it forks")
            }
            Error::NoMaster => f.write_str(
                "no session cache master: call cts_master_setup in the master before forking \
                 (or pass the channel with CTS_CHANNEL_FD to an exec'd worker); the SSL_CTX was \
                 left untouched",
            ),
            Error::NotChannelOwner => f.write_str(
                "this process inherited its parent worker's channel and may not use it; only \
                 processes forked by the master get a channel; the SSL_CTX was left untouched",
            ),
            Error::InvalidNamespace(why) => write!(f, "invalid namespace: {why}"),
            Error::OpenSsl(why) => write!(f, "OpenSSL error: {why}"),
            Error::System(why) => write!(f, "system error: {why}"),
            Error::Panic => f.write_str("internal error (caught panic) in cluster-tls-store"),
        }
    }
}

impl std::error::Error for Error {}

/// Static text for a C result code, for `cts_strerror`.
pub fn code_message(code: i32) -> &'static std::ffi::CStr {
    match code {
        0 => c"success",
        1 => c"a required argument is NULL",
        2 => c"invalid configuration",
        3 => c"called in a worker; cts_master_setup belongs in the master before it forks",
        4 => c"no session cache master for this process; the SSL_CTX was left untouched",
        5 => c"invalid namespace (at most 64 bytes)",
        6 => c"OpenSSL error",
        7 => c"system error",
        8 => c"internal error (caught panic)",
        9 => c"this process inherited another process's channel and may not use it",
        _ => c"unknown cluster-tls-store result code",
    }
}
