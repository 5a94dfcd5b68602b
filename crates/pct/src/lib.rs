//! The Puma process control thread (PCT): the per-node policy daemon.
//!
//! yod connects to the PCT of every node of a job over an authenticated control
//! link ([`proto`]), sends a [`proto::LoadRequest`], and the PCT sets up the job's
//! resources ([`resources`]), places and pins the ranks ([`policy`]), spawns them
//! with the rank environment (`PUMA_JOB`, `PUMA_RANK`, ...), forwards their output
//! line by line, reports their exits and cleans everything up ([`job`]).
#![deny(unsafe_code)]

pub mod cli;
pub mod config;
pub mod error;
pub mod job;
pub mod key;
pub mod names;
pub mod policy;
pub mod proto;
pub mod resources;
pub mod server;
mod sys;

pub use error::{PctError, Result};
