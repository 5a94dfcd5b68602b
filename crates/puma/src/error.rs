//! The library's error type: every call returns `Result<_, puma::Error>`.

use std::time::Duration;

/// What went wrong in a messaging, window or collective call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Start-up failed (not started by yod, bad environment, unreadable node map).
    #[error(transparent)]
    Init(#[from] crate::env::InitError),
    /// The QK fabric refused an operation.
    #[error("QK fabric: {0}")]
    Qk(#[from] qk::QkError),
    /// The portals engine refused an operation (tables full, stale handle...).
    #[error("portals: {0}")]
    Portals(String),
    /// The rank could not attach to its job's fabric.
    #[error("cannot attach to the job's QK fabric: {0}")]
    Attach(String),
    /// A rank argument outside the communicator.
    #[error("rank {rank} is outside the communicator (size {size})")]
    BadRank { rank: u32, size: u32 },
    /// A negative tag other than `ANY_TAG` where one is not allowed.
    #[error(
        "tag {0} is invalid: user tags are 0..=2147483647 (ANY_TAG only in receives and probes)"
    )]
    BadTag(i32),
    /// A message longer than the receive buffer.
    #[error("message truncated: rank {from} sent {sent} bytes with tag {tag} but the receive buffer holds only {cap} bytes")]
    Truncated {
        from: u32,
        tag: i32,
        sent: u64,
        cap: u64,
    },
    /// Ranks disagree about the size of a collective's or exact receive's data.
    #[error("size mismatch in {op}: {detail}")]
    SizeMismatch { op: &'static str, detail: String },
    /// A received length is not a whole number of elements.
    #[error("received {bytes} bytes, not a whole number of {elem}-byte elements")]
    NotWhole { bytes: u64, elem: usize },
    /// Nothing happened for too long.
    #[error("timed out after {0:?} waiting for {1}; a peer may be stuck or not calling the matching operation (PUMA_TIMEOUT_MS sets the limit)")]
    Timeout(Duration, String),
    /// A peer process is gone.
    #[error("rank {rank} (pid {pid}) has died while this rank was waiting for {what}")]
    PeerDied { rank: u32, pid: u32, what: String },
    /// The fabric dropped one of this rank's messages.
    #[error("the fabric discarded a message for portal {portal} from rank {from}: {reason}")]
    Discarded {
        portal: u32,
        from: u32,
        reason: String,
    },
    /// An argument the call cannot use.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn portals(e: impl std::fmt::Display) -> Error {
        Error::Portals(e.to_string())
    }
}

/// Shorthand.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The line a program prints when it gives up: `program: error`, newline included.
pub fn error_line(program: &str, err: &dyn std::fmt::Display) -> String {
    format!("{program}: {err}\n")
}

/// Prints `program: error` on stderr and ends the process with `code`.
///
/// The line is formatted first and written with one `write_all`, so a rank that yod stops
/// while it reports leaves either its whole line or nothing (`eprintln!` writes the pieces
/// one by one, and a rank killed between them left half a line such as `fileserver: `).
/// A closed stderr is ignored instead of panicking.
pub fn exit_with_error(program: &str, err: &dyn std::fmt::Display, code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stderr().write_all(error_line(program, err).as_bytes());
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_line_is_the_program_then_the_whole_message_on_one_line() {
        let e = Error::BadRank { rank: 9, size: 4 };
        assert_eq!(
            error_line("ring", &e),
            "ring: rank 9 is outside the communicator (size 4)\n"
        );
    }
}
