//! yod's error type.

/// Everything that can stop yod from running a job.
#[derive(Debug, thiserror::Error)]
pub enum YodError {
    #[error(transparent)]
    Pct(#[from] pct::PctError),
    #[error("partition file {path}: {reason}")]
    Partition { path: String, reason: String },
    #[error("bad Slurm node list {list:?}: {reason}")]
    Hostlist { list: String, reason: String },
    #[error("{0}")]
    Usage(String),
    #[error("not enough nodes: {0}")]
    Allocation(String),
    #[error("cannot start the local PCT: {0}")]
    LocalPct(String),
    #[error("I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl YodError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        YodError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, YodError>;
