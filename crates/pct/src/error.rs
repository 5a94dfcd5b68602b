//! The PCT's error type.

use std::io;

/// Everything that can go wrong in the PCT or on its control link.
#[derive(Debug, thiserror::Error)]
pub enum PctError {
    #[error("I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("control link closed by the peer")]
    Closed,
    #[error("control link timed out after {0} ms without a message")]
    Timeout(u64),
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge { size: usize, limit: usize },
    #[error("malformed message on the control link: {0}")]
    Malformed(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("key file {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("configuration {path}: {reason}")]
    Config { path: String, reason: String },
    #[error("invalid load request: {0}")]
    BadRequest(String),
    #[error("job refused: {0}")]
    Refused(String),
    #[error("cannot start rank {rank} ({program}): {source}")]
    Spawn {
        rank: u32,
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("bad listen/connect address {0:?}: use unix:/path or tcp:HOST:PORT")]
    Address(String),
}

impl PctError {
    /// Wraps an I/O error with what we were doing.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        PctError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<rustix::io::Errno> for PctError {
    fn from(e: rustix::io::Errno) -> Self {
        PctError::io("a system call", e.into())
    }
}

/// Result alias for the PCT.
pub type Result<T> = std::result::Result<T, PctError>;
