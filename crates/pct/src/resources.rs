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
    /// Whether a job spanning several nodes needs an inter-node engine here.
    fn wants_node_engine(&self) -> bool {
        false
    }
    /// Starts the inter-node engine (connects to every peer node; blocks until done).
    fn start_node_engine(&mut self, _e: EngineStart) -> Result<()> {
        Ok(())
    }
}

/// What the PCT hands the job resources to start a node engine.
pub struct EngineStart {
    pub job_id: u32,
    pub node_id: u32,
    pub listener: std::net::TcpListener,
    /// Every other node of the job: (node id, address).
    pub peers: Vec<(u32, std::net::SocketAddr)>,
    /// Node of every world rank.
    pub rank_node: Vec<u32>,
    pub cluster_key: Vec<u8>,
    pub connect_timeout: std::time::Duration,
    /// The CPU the engine thread is pinned to (`policy::engine_cpu`); `None` keeps the PCT's
    /// own mask.
    pub cpu: Option<usize>,
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

/// Most ranks one node's QK fabric holds (one port is the node engine's).
pub const MAX_LOCAL_RANKS: u32 = 255;

/// The QK's node fabric: one locked, prefaulted region per job and node holding
/// the ranks' inbound queues and job heap (`qk::job::NodeFabric`), passed to ranks
/// as `PUMA_QK_FD` (they attach with `qk::Endpoint::from_env`).
pub struct QkFabric {
    /// Bytes per inbound queue; None = sized so all queues of a node fit in
    /// [`QkFabric::QUEUE_BUDGET`] (the queues are per pair of local ports).
    pub queue_bytes: Option<u64>,
    pub heap_bytes_per_rank: u64,
    /// Lock the region (Puma: no paging). Falls back to unlocked, with a warning,
    /// when RLIMIT_MEMLOCK is too small.
    pub lock_memory: bool,
}

impl QkFabric {
    /// Bytes all inbound queues of one node may take by default.
    pub const QUEUE_BUDGET: u64 = 64 << 20;
    /// Default job heap per local rank: 16 MiB. Every message above the eager limit to a rank on
    /// another node is staged in the sender's heap while the node engine ships it, so the heap
    /// bounds the largest such message (1 MiB refused a 4 MiB send); and at 16 MiB and more the
    /// puma library bounces large private payloads to local ranks through the heap (one copy)
    /// instead of cross-memory attach (a system call per message). Locked, it costs 16 MiB per
    /// rank (128 MiB for 8 ranks on a node); `heap_bytes_per_rank` in the PCT configuration
    /// changes it.
    pub const DEFAULT_HEAP: u64 = 16 << 20;

    /// Queue size for `local` ranks (a power of two in 4 KiB ..= 64 KiB, qk's default).
    pub fn queue_for(&self, local: usize) -> u64 {
        if let Some(q) = self.queue_bytes {
            return q;
        }
        let ports = (local as u64 + 1).pow(2);
        let per = (Self::QUEUE_BUDGET / ports).clamp(4096, qk::job::DEFAULT_QUEUE_BYTES);
        1u64 << (63 - per.leading_zeros())
    }
}

/// The QK's numeric job id for a yod job id (decimal ids map to themselves).
pub fn qk_job_id(job: &str) -> u32 {
    job.parse().unwrap_or_else(|_| {
        // FNV-1a, the same on every node.
        job.bytes().fold(0x811c9dc5u32, |h, b| {
            (h ^ b as u32).wrapping_mul(0x01000193)
        })
    })
}

/// Holds only the region's memfd: the PCT unmaps the region once it is built, so
/// forking the ranks does not copy its page tables, and the memory is locked by
/// the ranks that map it (and released with the last of them).
struct QkHandle {
    fd: qk::sys::Memfd,
    engine: Option<qk::tcp::NodeEngineHandle>,
}

impl Drop for QkHandle {
    fn drop(&mut self) {
        if let Some(h) = self.engine.take() {
            let _ = h.stop();
        }
    }
}

impl JobResources for QkFabric {
    fn name(&self) -> &'static str {
        "qk-fabric"
    }
    fn create(&self, req: &LoadRequest) -> Result<Box<dyn JobResourceHandle>> {
        if req.ranks.len() > MAX_LOCAL_RANKS as usize {
            return Err(PctError::Refused(format!(
                "{} ranks on one node, but the QK fabric holds at most {MAX_LOCAL_RANKS}; use more nodes (--nodes / --ppn)",
                req.ranks.len()
            )));
        }
        let mode = req.mode;
        let mut spec =
            qk::JobFabricSpec::new(qk_job_id(&req.job), req.size, req.ranks.clone(), mode);
        spec.node_id = req.node;
        spec.queue_bytes = self.queue_for(req.ranks.len());
        // A quarter of the queue: at the default 64 KiB queue this is qk's own 16 KiB default
        // (four eager messages in flight before the sender waits); smaller queues shrink it.
        spec.eager_bytes = (qk::job::DEFAULT_EAGER_BYTES as u64).min(spec.queue_bytes / 4) as u32;
        spec.heap_bytes_per_rank = self.heap_bytes_per_rank;
        // The PCT does not keep the region mapped (see `QkHandle`): its job is to
        // have every page allocated before any rank runs; each rank locks and
        // prefaults its own mapping when it attaches. Allocating the pages with
        // fallocate costs a fraction of mapping, locking and unmapping them here
        // (about 0.07 s instead of 0.25 s for the 195 MiB of a 128-rank node).
        spec.lock_memory = false;
        let fabric = qk::NodeFabric::create(&spec)
            .map_err(|e| PctError::Refused(format!("QK fabric: {e}")))?;
        let fd = fabric
            .dup_fd()
            .map_err(|e| PctError::Refused(format!("QK fabric: {e}")))?;
        drop(fabric);
        let bytes = fd
            .size()
            .map_err(|e| PctError::io("reading the QK region's size", e))?;
        if let Err(e) = allocate_all(fd.raw(), bytes) {
            if self.lock_memory {
                // The old way still works where fallocate does not (no /proc).
                eprintln!(
                    "pct: fallocate of the QK region failed ({e}); prefaulting it by locking"
                );
                return self.create_locked(req, spec);
            }
            return Err(e);
        }
        if self.lock_memory && !can_lock_without_limit() {
            if let Some(limit) = qk::sys::memlock_limit().filter(|&l| l < bytes) {
                eprintln!(
                    "pct: RLIMIT_MEMLOCK {limit} is below the {bytes} bytes of job {}'s QK region; its ranks may not be able to lock it",
                    req.job
                );
            }
        }
        Ok(Box::new(QkHandle { fd, engine: None }))
    }
}

/// Whether this process (and so the ranks it starts) has CAP_IPC_LOCK, which
/// lifts RLIMIT_MEMLOCK.
fn can_lock_without_limit() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Allocates (and zeroes) every page of the memfd `fd` now, without mapping it.
fn allocate_all(fd: RawFd, bytes: u64) -> Result<()> {
    // A second open file description of the same memfd, through /proc: plain
    // safe code, and the PCT's own descriptor stays as it is.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{fd}"))
        .map_err(|e| PctError::io("reopening the QK region", e))?;
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, bytes).map_err(|e| {
        PctError::Refused(format!(
            "cannot allocate the {bytes} bytes of the QK region: {}",
            std::io::Error::from(e)
        ))
    })
}

impl QkFabric {
    /// The previous way: qk maps, locks and prefaults the region in the PCT.
    fn create_locked(
        &self,
        req: &LoadRequest,
        mut spec: qk::JobFabricSpec,
    ) -> Result<Box<dyn JobResourceHandle>> {
        spec.lock_memory = true;
        let fabric = match qk::NodeFabric::create(&spec) {
            Ok(f) => f,
            Err(qk::QkError::Memlock { bytes, limit, .. }) => {
                eprintln!(
                    "pct: cannot lock {bytes} bytes for job {} (RLIMIT_MEMLOCK {limit}); running it unlocked",
                    req.job
                );
                spec.lock_memory = false;
                qk::NodeFabric::create(&spec)
                    .map_err(|e| PctError::Refused(format!("QK fabric: {e}")))?
            }
            Err(e) => return Err(PctError::Refused(format!("QK fabric: {e}"))),
        };
        let fd = fabric
            .dup_fd()
            .map_err(|e| PctError::Refused(format!("QK fabric: {e}")))?;
        Ok(Box::new(QkHandle { fd, engine: None }))
    }
}

impl JobResourceHandle for QkHandle {
    fn rank_env(&self, _local_rank: u32) -> Vec<(String, String)> {
        vec![("PUMA_QK_FD".into(), self.fd.raw().to_string())]
    }
    fn inherited_fds(&self) -> Vec<RawFd> {
        vec![self.fd.raw()]
    }
    fn wants_node_engine(&self) -> bool {
        true
    }
    fn start_node_engine(&mut self, e: EngineStart) -> Result<()> {
        let fd = self
            .fd
            .try_clone()
            .map_err(|err| PctError::io("duplicating the QK fd for the node engine", err))?;
        let spec = qk::tcp::NodeEngineSpec {
            job_id: e.job_id,
            node_id: e.node_id,
            listen: e
                .listener
                .local_addr()
                .map_err(|err| PctError::io("reading the engine's address", err))?,
            peers: e.peers,
            rank_node: e.rank_node,
            cluster_key: e.cluster_key,
            connect_timeout: e.connect_timeout,
        };
        let engine = qk::tcp::NodeEngine::with_listener(fd, spec, e.listener)
            .map_err(|err| PctError::Refused(format!("QK node engine: {err}")))?;
        self.engine = Some(
            engine
                .spawn_on(e.cpu)
                .map_err(|err| PctError::Refused(format!("QK node engine: {err}")))?,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_size_scales_down_with_local_ranks() {
        let f = QkFabric {
            queue_bytes: None,
            heap_bytes_per_rank: QkFabric::DEFAULT_HEAP,
            lock_memory: false,
        };
        assert_eq!(f.queue_for(1), qk::job::DEFAULT_QUEUE_BYTES);
        let q = f.queue_for(16);
        assert!(q.is_power_of_two() && 17 * 17 * q <= QkFabric::QUEUE_BUDGET && q > 4096);
        assert_eq!(
            f.queue_for(256),
            4096,
            "never below the QK's smallest queue"
        );
        assert_eq!(qk_job_id("1234"), 1234);
        assert_eq!(qk_job_id("abc"), qk_job_id("abc"));
    }

    #[test]
    fn every_page_of_the_qk_region_is_allocated_before_ranks_run() {
        use std::os::unix::fs::MetadataExt;
        let f = QkFabric {
            queue_bytes: None,
            heap_bytes_per_rank: QkFabric::DEFAULT_HEAP,
            lock_memory: false,
        };
        let req = LoadRequest {
            job: "77".into(),
            uid: 0,
            program: "/bin/true".into(),
            args: vec![],
            env: vec![],
            cwd: "/".into(),
            size: 4,
            node: 0,
            ranks: vec![0, 1, 2, 3],
            mode: qk::CpuMode::Heater,
            node_map: "{}".into(),
            stdin_rank: None,
            priority: 0,
        };
        let h = f.create(&req).unwrap();
        let fd = h.inherited_fds()[0];
        let m = std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap();
        assert!(m.len() > 4 << 20, "region of {} bytes", m.len());
        // shmem counts allocated pages in st_blocks (512-byte units).
        assert!(
            m.blocks() * 512 >= m.len(),
            "{} of {} bytes allocated",
            m.blocks() * 512,
            m.len()
        );
        // The ranks attach to a valid region.
        let memfd =
            qk::sys::Memfd::open_path(std::path::Path::new(&format!("/proc/self/fd/{fd}")), false)
                .unwrap();
        let r = qk::region::Region::attach(&memfd, false, false).unwrap();
        assert_eq!(r.job, 77);
    }
}
