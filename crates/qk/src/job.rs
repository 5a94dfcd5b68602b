//! What the PCT uses: create a job's node-local fabric before spawning its ranks.

use std::os::fd::RawFd;

use crate::region::{Region, RegionParams};
use crate::sys::Memfd;
use crate::QkError;

/// The CPU modes of a Puma node (seed 000), chosen at job load (`yod --mode`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum CpuMode {
    /// Application and engine share a core; the engine runs inside library calls.
    #[default]
    Heater,
    /// The engine runs on its own core and deposits while the application computes.
    MsgCoproc,
    /// The application uses both cores; the engine runs inline.
    ComputeCoproc,
    /// Two application processes per node, one per core; engines inline.
    VirtualNode,
}

impl CpuMode {
    /// The name used in `PUMA_MODE` and `yod --mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            CpuMode::Heater => "heater",
            CpuMode::MsgCoproc => "msg-coproc",
            CpuMode::ComputeCoproc => "compute-coproc",
            CpuMode::VirtualNode => "virtual-node",
        }
    }

    /// Cores one rank occupies in this mode (placement uses it).
    pub fn cores_per_rank(self) -> usize {
        match self {
            CpuMode::Heater | CpuMode::VirtualNode => 1,
            CpuMode::MsgCoproc | CpuMode::ComputeCoproc => 2,
        }
    }

    /// True when the progress engine runs on its own core (a co-processor thread).
    pub fn engine_on_own_core(self) -> bool {
        self == CpuMode::MsgCoproc
    }

    pub(crate) fn code(self) -> u32 {
        match self {
            CpuMode::Heater => 0,
            CpuMode::MsgCoproc => 1,
            CpuMode::ComputeCoproc => 2,
            CpuMode::VirtualNode => 3,
        }
    }

    /// Decodes the mode stored in a region header.
    pub fn from_code(c: u32) -> CpuMode {
        match c {
            1 => CpuMode::MsgCoproc,
            2 => CpuMode::ComputeCoproc,
            3 => CpuMode::VirtualNode,
            _ => CpuMode::Heater,
        }
    }
}

impl std::str::FromStr for CpuMode {
    type Err = QkError;
    fn from_str(s: &str) -> Result<Self, QkError> {
        match s {
            "heater" => Ok(CpuMode::Heater),
            "msg-coproc" => Ok(CpuMode::MsgCoproc),
            "compute-coproc" => Ok(CpuMode::ComputeCoproc),
            "virtual-node" => Ok(CpuMode::VirtualNode),
            _ => Err(QkError::BadEnv {
                var: "PUMA_MODE",
                value: s.to_string(),
                why: "expected heater, msg-coproc, compute-coproc or virtual-node",
            }),
        }
    }
}

impl std::fmt::Display for CpuMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Default bytes per inbound queue. Small on purpose: a ring's lines are reused every
/// `queue_bytes / 64` one-line messages, and at 64 KiB a ping-pong finds them still in the two
/// cores' caches; at 256 KiB the 0 B one-way latency was ≈ 50 ns (20 %) longer on the
/// development machine (`puma-bench --queue-bytes`), with the same message rate.
pub const DEFAULT_QUEUE_BYTES: u64 = 64 * 1024;
/// Default job-shared heap per local rank.
pub const DEFAULT_HEAP_BYTES: u64 = 64 * 1024 * 1024;
/// Default eager limit: messages up to this size travel inside the queue.
pub const DEFAULT_EAGER_BYTES: u32 = 16 * 1024;
/// Default largest message.
pub const DEFAULT_MAX_MESSAGE: u64 = 1 << 30;

/// Everything the QK needs to lay out a job's fabric on one node. Sizes are fixed here, at job
/// load, and never change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobFabricSpec {
    /// Job id (the portals group id).
    pub job_id: u32,
    /// Number of ranks in the whole job.
    pub world_size: u32,
    /// Node id of this node in the job's node map.
    pub node_id: u32,
    /// World ranks placed on this node, in local-rank order (`PUMA_LOCAL_RANK` = index).
    pub local_ranks: Vec<u32>,
    /// CPU mode.
    pub cpu_mode: CpuMode,
    /// Bytes per inbound queue (power of two, ≥ 4 KiB).
    pub queue_bytes: u64,
    /// Job-shared heap bytes per local rank (large-message buffers).
    pub heap_bytes_per_rank: u64,
    /// Eager limit in bytes (≤ a quarter of the queue).
    pub eager_bytes: u32,
    /// Largest message a rank may send.
    pub max_message: u64,
    /// Lock and prefault the region (the QK's "no paging" rule; tests may turn it off).
    pub lock_memory: bool,
}

impl JobFabricSpec {
    /// A spec with default sizes for `local_ranks` of a `world_size`-rank job.
    pub fn new(job_id: u32, world_size: u32, local_ranks: Vec<u32>, cpu_mode: CpuMode) -> Self {
        JobFabricSpec {
            job_id,
            world_size,
            node_id: 0,
            local_ranks,
            cpu_mode,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            heap_bytes_per_rank: DEFAULT_HEAP_BYTES,
            eager_bytes: DEFAULT_EAGER_BYTES,
            max_message: DEFAULT_MAX_MESSAGE,
            lock_memory: true,
        }
    }

    fn check(&self) -> Result<(), QkError> {
        if self.local_ranks.is_empty() {
            return Err(QkError::BadSpec("no local ranks".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for &r in &self.local_ranks {
            if r >= self.world_size {
                return Err(QkError::BadSpec(format!(
                    "local rank list names rank {r} but the world size is {}",
                    self.world_size
                )));
            }
            if !seen.insert(r) {
                return Err(QkError::BadSpec(format!("rank {r} listed twice")));
            }
        }
        if self.max_message == 0 {
            return Err(QkError::BadSpec("max_message must be positive".into()));
        }
        Ok(())
    }
}

/// A job's fabric on one node: the locked shared-memory region every local rank attaches to.
/// Created by the PCT before it spawns the ranks; dropping it does not disturb ranks that still
/// hold the fd (the memory goes away with its last holder: nothing is left in /dev/shm).
#[derive(Debug)]
pub struct NodeFabric {
    fd: Memfd,
    region: Region,
    spec: JobFabricSpec,
}

impl NodeFabric {
    /// Lays out, creates, locks and prefaults the region.
    pub fn create(spec: &JobFabricSpec) -> Result<NodeFabric, QkError> {
        spec.check()?;
        let params = RegionParams {
            job: spec.job_id,
            world: spec.world_size,
            node: spec.node_id,
            ranks: spec.local_ranks.clone(),
            ring_cap: spec.queue_bytes,
            heap_per_rank: spec.heap_bytes_per_rank,
            eager_max: spec.eager_bytes,
            mode: spec.cpu_mode.code(),
            max_message: spec.max_message,
        };
        let (fd, region) = Region::create(&params, spec.lock_memory)?;
        Ok(NodeFabric {
            fd,
            region,
            spec: spec.clone(),
        })
    }

    /// The memfd to pass to each rank (inherited across exec; see [`NodeFabric::prepare_child_fd`]).
    pub fn fd(&self) -> RawFd {
        self.fd.raw()
    }

    /// Clears close-on-exec on the fabric's fd so a rank spawned with `exec` inherits it under the
    /// same number; set `PUMA_QK_FD` to [`NodeFabric::fd`].
    pub fn prepare_child_fd(&self) -> Result<RawFd, QkError> {
        self.fd
            .inheritable()
            .map_err(|e| QkError::os("clearing close-on-exec on the QK fd", e))?;
        Ok(self.fd.raw())
    }

    /// The environment entries the QK needs in a rank (`PUMA_QK_FD`); the PCT adds its own.
    pub fn child_env(&self) -> Vec<(String, String)> {
        vec![("PUMA_QK_FD".into(), self.fd.raw().to_string())]
    }

    /// The region (for counters and the node engine).
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The spec it was made from.
    pub fn spec(&self) -> &JobFabricSpec {
        &self.spec
    }

    /// A duplicate of the region fd (e.g. to give the node engine its own handle).
    pub fn dup_fd(&self) -> Result<Memfd, QkError> {
        self.fd
            .try_clone()
            .map_err(|e| QkError::os("duplicating the QK fd", e))
    }

    /// Counters of every port (local ranks, then the node engine).
    pub fn stats(&self) -> Vec<crate::PortStats> {
        (0..self.region.layout.ports)
            .map(|p| self.region.stats(p))
            .collect()
    }
}
