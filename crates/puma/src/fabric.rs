//! Attaching a rank to its job's QK fabric.
//!
//! Two ways, tried in this order:
//! 1. `PUMA_QK_FD` is set: the PCT created the node's [`qk::NodeFabric`] and the rank inherited its
//!    memfd under that number (the contract of `crates/qk`). The local rank is `PUMA_LOCAL_RANK`.
//!    When the job spans several nodes the PCTs have started their QK node engines and connected
//!    them (TCP, cluster key) before spawning any rank, so records for ranks elsewhere go to the
//!    node engine's port and are routed: the same code serves one node and many.
//! 2. Otherwise (a PCT without the fabric), the library builds the fabric itself, which
//!    works when every rank of the job runs on this machine (the embedded partition, any
//!    `--nodes`): rank 0 creates one region for the whole job and publishes `<pid> <fd>` in a
//!    rendezvous file in yod's private run directory (found above `PUMA_NODE_MAP`); the other
//!    ranks open `/proc/<pid>/fd/<fd>` and attach with their world rank as local rank.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qk::job::{CpuMode as QkMode, JobFabricSpec, NodeFabric};
use qk::region::Region;
use qk::sys::Memfd;
use qk::{AttachSpec, Endpoint};

use crate::env::World;
use crate::error::{Error, Result};

/// A rank's attachment: its endpoint, a view of the region (peer pids for liveness) and, at the
/// rank that built a library-side fabric, the fabric itself.
pub(crate) struct Attached {
    pub ep: Endpoint,
    pub region: Region,
    pub fabric: Option<NodeFabric>,
    /// The library-side fabric (all ranks of the job in one region).
    pub library_fabric: bool,
}

fn spec(job: u32, local: u32, mode: QkMode, lock: bool) -> AttachSpec {
    AttachSpec {
        mds: 4096,
        match_entries: 8192,
        events: 1 << 16,
        lock_memory: lock,
        ..AttachSpec::new(job, local, mode)
    }
}

/// A stable 31-bit job id from the job name (the portals group id).
pub(crate) fn job_id(name: &str) -> u32 {
    if let Ok(n) = name.parse::<u32>() {
        return n;
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h & 0x7fff_ffff
}

fn open(fd: Memfd, local: u32, mode: QkMode, lock: bool) -> Result<(Endpoint, Region)> {
    let view = fd
        .try_clone()
        .map_err(|e| Error::Attach(format!("duplicating the fabric fd: {e}")))?;
    let region = Region::attach(&view, true, false)?;
    let ep = Endpoint::attach(fd, &spec(region.job, local, mode, lock))?;
    Ok((ep, region))
}

/// Where the library-side rendezvous file goes: yod's private directory when it can be found
/// (removed with the job), else the system temporary directory.
fn rendezvous_path(w: &World) -> PathBuf {
    let dir = w
        .node_map_path
        .ancestors()
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("yod-"))
        })
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    dir.join(format!("puma-qk-{}", w.job))
}

pub(crate) fn attach(w: &World, timeout: Duration) -> Result<Attached> {
    let mode = w.mode;
    // The PCT's fabric: its node engine routes to the job's other nodes (the PCT sets
    // PUMA_QK_FD only with the QK fabric, whose node engines it starts for multi-node jobs).
    if let Ok(v) = std::env::var("PUMA_QK_FD") {
        let fd: i32 = v
            .parse()
            .map_err(|_| Error::Attach(format!("PUMA_QK_FD={v:?} is not a descriptor number")))?;
        let memfd = Memfd::from_inherited(fd)
            .map_err(|e| Error::Attach(format!("PUMA_QK_FD={fd}: {e}")))?;
        let (ep, region) = open(memfd, w.local_rank, mode, true)?;
        if ep.rank() != w.rank {
            return Err(Error::Attach(format!(
                "PUMA_RANK={} but the fabric's local rank {} is world rank {}",
                w.rank,
                w.local_rank,
                ep.rank()
            )));
        }
        return Ok(Attached {
            ep,
            region,
            fabric: None,
            library_fabric: false,
        });
    }
    let path = rendezvous_path(w);
    let heap_mb: u64 = std::env::var("PUMA_HEAP_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    if w.rank == 0 {
        let mut s = JobFabricSpec::new(job_id(&w.job), w.size, (0..w.size).collect(), mode);
        s.heap_bytes_per_rank = heap_mb << 20;
        s.lock_memory = false;
        let fabric = NodeFabric::create(&s)?;
        let fd = fabric.dup_fd().map_err(|e| Error::Attach(e.to_string()))?;
        let (ep, region) = open(fd, 0, mode, false)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{} {}\n", std::process::id(), fabric.fd()))
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::Attach(format!("publishing {}: {e}", path.display())))?;
        return Ok(Attached {
            ep,
            region,
            fabric: Some(fabric),
            library_fabric: true,
        });
    }
    let start = Instant::now();
    let text = loop {
        match std::fs::read_to_string(&path) {
            Ok(t) => break t,
            Err(_) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => {
                return Err(Error::Attach(format!(
                    "rank 0 did not publish the job fabric at {} within {timeout:?} ({e}); \
                     the PCT sets no PUMA_QK_FD",
                    path.display()
                )))
            }
        }
    };
    let mut it = text.split_whitespace().map(|x| x.parse::<u32>());
    let (Some(Ok(pid)), Some(Ok(fd))) = (it.next(), it.next()) else {
        return Err(Error::Attach(format!(
            "malformed rendezvous file {}",
            path.display()
        )));
    };
    let proc_path = PathBuf::from(format!("/proc/{pid}/fd/{fd}"));
    let memfd = Memfd::open_path(&proc_path, true)
        .map_err(|e| Error::Attach(format!("opening {}: {e}", proc_path.display())))?;
    let (ep, region) = open(memfd, w.rank, mode, false)?;
    Ok(Attached {
        ep,
        region,
        fabric: None,
        library_fabric: true,
    })
}

/// Removes the rendezvous file (rank 0, once every rank attached).
pub(crate) fn unpublish(w: &World) {
    let _ = std::fs::remove_file(rendezvous_path(w));
}

/// True when the process is gone or a zombie.
pub(crate) fn pid_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st == "Z" || st == "X"),
    }
}
