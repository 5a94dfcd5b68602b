//! Job resources a PCT sets up before spawning ranks: the seam where the QK's
//! node fabric (`qk::job::NodeFabric::create`) plugs in.
//!
//! A [`JobResources`] implementation creates, for one job on one node, whatever
//! the ranks share (shared-memory regions, locked memory); the returned
//! [`JobResourceHandle`] tells the PCT which environment variables and file
//! descriptors each rank inherits, and releases everything when dropped. The PCT
//! drops the handle only after every rank of the job has been reaped, so the last
//! reference to a segment disappears with the job.

use crate::error::{PctError, Result};
use crate::proto::LoadRequest;
use rustix::fs::{memfd_create, MemfdFlags};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Creates per-job resources on a node.
pub trait JobResources: Send + Sync {
    fn name(&self) -> &'static str;
    fn create(&self, req: &LoadRequest) -> Result<Box<dyn JobResourceHandle>>;
}

/// Resources of one running job; dropping it releases them.
pub trait JobResourceHandle: Send {
    /// Environment for a rank (e.g. `PUMA_QK_FD`).
    fn rank_env(&self, local_rank: u32) -> Vec<(String, String)>;
    /// Descriptors every rank inherits (the PCT clears close-on-exec in the child).
    fn inherited_fds(&self) -> Vec<RawFd>;
}

/// The default until the QK fabric lands: one anonymous memory file (memfd, so
/// nothing appears in /dev/shm and nothing can be left behind) per job and node,
/// holding the node map, passed to ranks as `PUMA_JOB_SEGMENT_FD`.
pub struct MemfdSegment;

struct MemfdHandle {
    fd: OwnedFd,
}

impl JobResources for MemfdSegment {
    fn name(&self) -> &'static str {
        "memfd-segment"
    }
    fn create(&self, req: &LoadRequest) -> Result<Box<dyn JobResourceHandle>> {
        let fd = memfd_create(format!("puma-job-{}", req.job), MemfdFlags::CLOEXEC)
            .map_err(|e| PctError::io("creating the job segment (memfd)", e.into()))?;
        let mut f = std::fs::File::from(fd);
        f.write_all(req.node_map.as_bytes())
            .map_err(|e| PctError::io("filling the job segment", e))?;
        Ok(Box::new(MemfdHandle { fd: f.into() }))
    }
}

impl JobResourceHandle for MemfdHandle {
    fn rank_env(&self, _local_rank: u32) -> Vec<(String, String)> {
        vec![(
            "PUMA_JOB_SEGMENT_FD".into(),
            self.fd.as_raw_fd().to_string(),
        )]
    }
    fn inherited_fds(&self) -> Vec<RawFd> {
        vec![self.fd.as_raw_fd()]
    }
}
