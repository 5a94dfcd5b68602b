//! The puma application library: start-up from the environment yod and the PCT set ([`init`],
//! [`start`]), point-to-point messaging, one-sided windows, communicators and collectives, all on
//! portals through the QK fabric. See `crates/puma/README.md` for a tour.
#![forbid(unsafe_code)]

pub mod coll;
pub mod comm;
mod core;
pub mod env;
pub mod error;
mod fabric;
pub mod ops;
mod shm;
pub mod window;

pub use crate::core::{MsgStats, Status};
pub use bytemuck::{Pod, Zeroable};
pub use comm::{
    start, start_with, wait_all, Comm, Options, Request, Source, Universe, ANY_SOURCE, ANY_TAG,
};
pub use env::{init, CpuMode, InitError, NodeMap, World};
pub use error::{exit_with_error, Error, Result};
pub use ops::{Max, Min, Operation, Product, Sum, UserOp};
pub use window::{RmaGet, RmaRequest, Window};
