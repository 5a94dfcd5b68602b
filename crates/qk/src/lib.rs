//! The hosted quintessential kernel: Puma's message fabric and enforcement on Linux.
//!
//! * [`job::NodeFabric`] — what the PCT creates per job and node: a locked, prefaulted memfd holding
//!   the job's inbound queues and job-shared heap.
//! * [`Endpoint`] — what a rank attaches with ([`Endpoint::from_env`]): portals operations, events,
//!   counters, progress (inline or on a co-processor thread).
//! * [`tcp::NodeEngine`] — the node's engine owning one authenticated TCP connection per peer node.
//!
//! See `crates/qk/README.md` for the interface contract with the PCT and the benchmark.

pub mod coll_area;
pub mod copy_share;
pub mod counters;
pub mod endpoint;
pub mod error;
pub mod fabric;
pub mod job;
pub mod region;
pub mod ring;
pub mod sys;
pub mod tcp;

pub use counters::{DropReason, PortStats};
pub use endpoint::{AttachSpec, Buf, Endpoint, PrivatePath};
pub use error::QkError;
pub use job::{CpuMode, JobFabricSpec, NodeFabric};
/// The portals engine crate, re-exported so users name its types through `qk::portals`.
pub use portals;
