//! The puma application library: start-up from the environment yod and the PCT
//! set ([`init`]); messaging and collectives follow in later issues.
#![forbid(unsafe_code)]

pub mod env;

pub use env::{init, CpuMode, InitError, NodeMap, World};
