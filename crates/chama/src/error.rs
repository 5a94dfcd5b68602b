//! Error types, one enum per module concern.

use thiserror::Error;

/// A schedule could not be built.
#[derive(Debug, Error)]
pub enum ScheduleError {
    /// An operation names a rank beyond `num_ranks`.
    #[error("operation on rank {rank}, but the schedule has only {num_ranks} ranks")]
    RankOutOfRange {
        /// The offending rank.
        rank: u32,
        /// Declared ranks.
        num_ranks: u32,
    },
    /// A send or receive names a peer beyond `num_ranks`.
    #[error(
        "rank {rank} communicates with rank {peer}, but the schedule has only {num_ranks} ranks"
    )]
    PeerOutOfRange {
        /// Rank issuing the operation.
        rank: u32,
        /// The offending peer.
        peer: u32,
        /// Declared ranks.
        num_ranks: u32,
    },
    /// More than 2^31 - 1 operations.
    #[error("the schedule has more than 2^31 - 1 operations")]
    TooManyOps,
    /// A dependency refers to an operation that does not exist.
    #[error("dependency between operations {from} and {to} refers to a missing operation")]
    BadEdge {
        /// Dependency.
        from: u32,
        /// Dependent.
        to: u32,
    },
    /// An operation depends on itself.
    #[error("operation {op} depends on itself")]
    SelfDependency {
        /// The operation.
        op: u32,
    },
}

/// A GOAL, trace or noise file could not be read.
#[derive(Debug, Error)]
pub enum InputError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// File name.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Syntax or semantic error at a line.
    #[error("{path}:{line}: {msg}")]
    Syntax {
        /// File name.
        path: String,
        /// 1-based line number.
        line: u64,
        /// What was wrong.
        msg: String,
    },
    /// The operations read do not form a valid schedule.
    #[error("{path}: {source}")]
    Schedule {
        /// File name.
        path: String,
        /// Cause.
        source: ScheduleError,
    },
}

/// A command-line parameter (noise spec, generator spec) is malformed.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct SpecError(pub String);

/// Memory for a large array could not be had from the kernel.
#[derive(Debug, Error)]
#[error("cannot get {:.2} GiB of memory for the {what}: {source}", *bytes as f64 / (1u64 << 30) as f64)]
pub struct MemoryError {
    /// What the memory was for.
    pub what: &'static str,
    /// Bytes asked for.
    pub bytes: usize,
    /// Cause.
    pub source: std::io::Error,
}

/// Top-level error of the `chama` command.
#[derive(Debug, Error)]
pub enum ChamaError {
    /// Reading input failed.
    #[error(transparent)]
    Input(#[from] InputError),
    /// Building a schedule failed.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// A specification string was malformed.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A noise specification or the file it names was bad.
    #[error(transparent)]
    Noise(#[from] crate::noise::ChamaSpecError),
    /// Memory could not be had.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A child process (benchmark) failed.
    #[error("{0}")]
    Child(String),
    /// The simulation could not finish every operation.
    #[error("{0}")]
    Incomplete(String),
    /// Writing an output file failed.
    #[error("cannot write {path}: {source}")]
    Output {
        /// File name.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}
