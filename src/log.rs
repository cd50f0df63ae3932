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

/// Write one log line to stderr. A stderr that is closed or a broken pipe loses the line:
/// unlike `eprintln!`, this never panics, so logging cannot end the cache thread or a
/// callback.
pub fn line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "cts[{}] {}", crate::fork::pid(), args);
}

/// Log a line when debugging is on. Arguments are only formatted when it is.
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::enabled() {
            $crate::log::line(format_args!($($arg)*));
        }
    };
}
pub(crate) use debug;

#[cfg(test)]
mod tests {
    /// Run `line` in a forked child whose stderr is the write end of a pipe (so the test
    /// harness keeps its own stderr); with `reader` false the pipe has no reader, so the
    /// write fails with EPIPE. Returns whether the child exited cleanly (no panic) and what
    /// reached the pipe.
    fn log_in_child(reader: bool) -> (bool, String) {
        let mut fds = [0; 2];
        // SAFETY: a valid two-int array for pipe(2).
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        if !reader {
            // SAFETY: our own read end, closed once.
            unsafe { libc::close(fds[0]) };
        }
        // SAFETY: the child only redirects its own stderr, logs and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: in the child: its own copy of the write end onto stderr, and SIGPIPE
            // ignored so a write with no reader fails with EPIPE instead of killing it.
            unsafe {
                libc::dup2(fds[1], 2);
                libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            }
            let ok = std::panic::catch_unwind(|| super::line(format_args!("marker-line"))).is_ok();
            // SAFETY: leave the child at once, without running the harness's exit code.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        // SAFETY: our copy of the write end, closed once (the reader then sees EOF once the
        // child exits).
        unsafe { libc::close(fds[1]) };
        let mut got = Vec::new();
        if reader {
            let mut buf = [0u8; 256];
            loop {
                // SAFETY: reads into a valid buffer from our read end.
                let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n as usize]);
            }
            // SAFETY: our read end, closed once.
            unsafe { libc::close(fds[0]) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child into a valid int.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        (libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, String::from_utf8_lossy(&got).into_owned())
    }

    /// A line goes to the process's real stderr (fd 2, not the test harness's capture), and
    /// a stderr whose reader is gone loses the line instead of panicking.
    #[test]
    fn a_line_reaches_fd_2_and_a_broken_stderr_does_not_panic() {
        let (ok, got) = log_in_child(true);
        assert!(ok && got.contains("marker-line"), "ok {ok}, got {got:?}");
        let (ok, _) = log_in_child(false);
        assert!(ok, "logging into a broken pipe panicked");
    }
}
