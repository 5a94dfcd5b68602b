//! yod, Puma's launcher: `yod -n N PROGRAM` runs N ranks of PROGRAM on the
//! compute partition (by default an embedded local partition of this machine),
//! forwards their I/O line by line and returns the first failing rank's status.
#![forbid(unsafe_code)]

pub mod cli;
pub mod error;
pub mod hostlist;
pub mod launch;
pub mod local;
pub mod nodemap;
pub mod partition;
pub mod slurm;

pub use error::{Result, YodError};
