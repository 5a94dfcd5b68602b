//! The error type of the hosted QK.

use std::io;

/// Everything that can go wrong in the hosted QK, phrased for the person who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum QkError {
    /// A variable `yod`/the PCT sets is missing.
    #[error("{var} is not set: this process was not started by yod/the PCT (qk::Endpoint::from_env needs PUMA_QK_FD, PUMA_JOB, PUMA_RANK, PUMA_LOCAL_RANK, ...)")]
    NotLaunched {
        /// The missing variable.
        var: &'static str,
    },
    /// A variable is set but cannot be parsed.
    #[error("environment variable {var}={value:?} is invalid: {why}")]
    BadEnv {
        /// Variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What was expected.
        why: &'static str,
    },
    /// A job fabric specification cannot be satisfied.
    #[error("invalid job fabric specification: {0}")]
    BadSpec(String),
    /// The shared-memory region is not a QK region or belongs to another job.
    #[error("shared-memory region rejected: {0}")]
    BadRegion(String),
    /// Locking memory failed.
    #[error("cannot lock {bytes} bytes of message memory into RAM ({source}); raise RLIMIT_MEMLOCK (ulimit -l, currently {limit}) or run with CAP_IPC_LOCK, or shrink the job's queue/heap sizes")]
    Memlock {
        /// Bytes we tried to lock.
        bytes: u64,
        /// The current limit, printable.
        limit: String,
        /// The OS error.
        source: io::Error,
    },
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What we were doing.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// The portals engine refused a request.
    #[error("portals: {0}")]
    Portals(String),
    /// A destination rank does not exist in this job.
    #[error("rank {rank} is not in this job (world size {world})")]
    NoSuchRank {
        /// Requested rank.
        rank: u32,
        /// World size.
        world: u32,
    },
    /// The message is larger than what the fabric was sized for.
    #[error("message of {len} bytes exceeds the job's maximum message size {max}")]
    TooLarge {
        /// Requested length.
        len: u64,
        /// Configured maximum.
        max: u64,
    },
    /// The job-shared heap has no room for an allocation.
    #[error(
        "job-shared heap exhausted: {want} bytes requested, {free} bytes free in this rank's heap"
    )]
    HeapExhausted {
        /// Requested size.
        want: u64,
        /// Free bytes.
        free: u64,
    },
    /// A handle does not name a live object.
    #[error("stale or unknown handle: {0}")]
    BadHandle(&'static str),
    /// The inter-node transport failed.
    #[error("transport: {0}")]
    Transport(String),
    /// A peer failed the key handshake.
    #[error("handshake with {peer} failed: {why}")]
    Handshake {
        /// Peer address.
        peer: String,
        /// Reason.
        why: String,
    },
    /// A wait gave up.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(std::time::Duration, &'static str),
    /// The node map file is unreadable or malformed.
    #[error("node map {path}: {why}")]
    NodeMap {
        /// Path.
        path: String,
        /// What is wrong.
        why: String,
    },
}

impl QkError {
    pub(crate) fn os(what: impl Into<String>, source: io::Error) -> Self {
        QkError::Os {
            what: what.into(),
            source,
        }
    }
}
