//! The one error type of the noise crate.

use std::path::PathBuf;

/// Everything that can go wrong while sampling, reading, analysing or plotting.
#[derive(Debug, thiserror::Error)]
pub enum NoiseError {
    /// A command-line value (duration, frequency, CPU list, injection spec) did not parse.
    #[error("invalid {what} `{value}`: {why}")]
    BadValue {
        /// Which kind of value was being parsed.
        what: &'static str,
        /// The text the user gave.
        value: String,
        /// What was wrong with it.
        why: String,
    },
    /// A CPU was requested that this process may not run on.
    #[error("cpu {cpu} is not available to this process (allowed: {allowed})")]
    CpuUnavailable {
        /// The requested CPU.
        cpu: usize,
        /// The CPUs the affinity mask allows, as a list.
        allowed: String,
    },
    /// Pinning a thread to a CPU failed.
    #[error("cannot pin thread to cpu {cpu}: {source}")]
    Pin {
        /// The CPU.
        cpu: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// Setting a thread's nice value failed.
    #[error("cannot set nice {nice} (negative values need root or CAP_SYS_NICE): {source}")]
    Nice {
        /// The requested nice value.
        nice: i32,
        /// The OS error.
        source: std::io::Error,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A data file is not in the format this tool writes.
    #[error("{path}: line {line}: {why}")]
    Format {
        /// The file.
        path: PathBuf,
        /// 1-based line (or record) number.
        line: usize,
        /// What was wrong.
        why: String,
    },
    /// A comparison exceeded the limits it was given (exit status 3).
    #[error("comparison exceeds the given limits")]
    Verdict,
    /// Too little data for the requested analysis.
    #[error("not enough data: {0}")]
    TooShort(String),
    /// A sampler or interferer thread failed.
    #[error("sampler thread failed: {0}")]
    Thread(String),
    /// The run was ended early by a signal (SIGINT/SIGTERM); what was sampled before it is
    /// kept as the message says (exit status 130).
    #[error("interrupted: {0}")]
    Interrupted(String),
    /// The command to run during sampling could not be started.
    #[error("cannot start command `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl NoiseError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        NoiseError::Io {
            path: path.into(),
            source,
        }
    }
    /// A bad value given by the user: what it was for, the value, and why it is refused.
    pub fn bad(what: &'static str, value: &str, why: impl Into<String>) -> Self {
        NoiseError::BadValue {
            what,
            value: value.to_string(),
            why: why.into(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, NoiseError>;
