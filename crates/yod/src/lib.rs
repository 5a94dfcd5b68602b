//! yod, Puma's launcher: `yod -n N PROGRAM` runs N ranks of PROGRAM on the
//! compute partition (by default an embedded local partition of this machine),
//! forwards their I/O line by line and returns the first failing rank's status.
#![forbid(unsafe_code)]

/// yod's own messages on stderr. Unlike `eprintln!`, a closed or broken stderr (e.g. `yod ... 2>&1
/// | head`) does not panic: yod must still tear the job down and return the job's exit status.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod cli;
pub mod error;
pub mod hostlist;
pub mod launch;
pub mod local;
pub mod nodemap;
pub mod partition;
pub mod slurm;

pub use error::{Result, YodError};
