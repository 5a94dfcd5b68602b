//! Pluggable node policies (seed 000: "changes behavior of OS without changing the
//! kernel"). Each is a trait; the PCT picks implementations from its configuration.

use crate::config::{PctConfig, PlacementKind, Scheduling, Tasking, VariantKind};
use crate::proto::{CpuMode, LoadRequest, RankStatus};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::time::SystemTime;

/// A job already running on this node, as the admission policy sees it.
#[derive(Debug, Clone)]
pub struct RunningJob {
    pub job: String,
    pub uid: u32,
    pub priority: i32,
}

/// Decides whether a new job may start next to the running ones.
pub trait Admission: Send + Sync {
    fn name(&self) -> &'static str;
    fn admit(&self, running: &[RunningJob], req: &LoadRequest) -> Result<(), String>;
}

/// One job per node.
pub struct SingleTasking;
impl Admission for SingleTasking {
    fn name(&self) -> &'static str {
        "single"
    }
    fn admit(&self, running: &[RunningJob], _req: &LoadRequest) -> Result<(), String> {
        match running.first() {
            None => Ok(()),
            Some(j) => Err(format!(
                "node is single-tasking and runs job {} already",
                j.job
            )),
        }
    }
}

/// Several jobs, but whole nodes stay with one user.
pub struct MultiTasking;
impl Admission for MultiTasking {
    fn name(&self) -> &'static str {
        "multi"
    }
    fn admit(&self, running: &[RunningJob], req: &LoadRequest) -> Result<(), String> {
        match running.iter().find(|j| j.uid != req.uid) {
            None => Ok(()),
            Some(j) => Err(format!(
                "node is allocated to user {} (job {}); nodes are never shared between users",
                j.uid, j.job
            )),
        }
    }
}

/// Sets the scheduling share of a job's ranks (as a nice value).
pub trait SchedulingPolicy: Send + Sync {
    fn name(&self) -> &'static str;
    /// The nice value for a job of this priority, or None to leave it alone.
    fn nice_for(&self, priority: i32) -> Option<i32>;
}

pub struct RoundRobin;
impl SchedulingPolicy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }
    fn nice_for(&self, _priority: i32) -> Option<i32> {
        None
    }
}

/// Higher priority → lower nice value. Unprivileged PCTs can only lower priority,
/// so positive priorities map to nice 0 and negative ones to nice 1..=19.
pub struct PriorityScheduling;
impl SchedulingPolicy for PriorityScheduling {
    fn name(&self) -> &'static str {
        "priority"
    }
    fn nice_for(&self, priority: i32) -> Option<i32> {
        Some((-priority).clamp(if is_root() { -20 } else { 0 }, 19))
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Chooses the cores a rank is pinned to.
pub trait Placement: Send + Sync {
    fn name(&self) -> &'static str;
    /// `avail` are the node's usable CPU numbers. None = do not pin.
    fn cpus_for(
        &self,
        local_rank: usize,
        local_size: usize,
        mode: CpuMode,
        avail: &[usize],
    ) -> Option<Vec<usize>>;
}

/// Consecutive cores: rank i gets cores [i*c, i*c+c) (c = cores per rank in the mode),
/// wrapping round when the node is oversubscribed.
pub struct Compact;
impl Placement for Compact {
    fn name(&self) -> &'static str {
        "compact"
    }
    fn cpus_for(
        &self,
        lr: usize,
        _ls: usize,
        mode: CpuMode,
        avail: &[usize],
    ) -> Option<Vec<usize>> {
        if avail.is_empty() {
            return None;
        }
        let c = mode.cores_per_rank().min(avail.len());
        Some((0..c).map(|k| avail[(lr * c + k) % avail.len()]).collect())
    }
}

/// Ranks spread evenly over the cores (leaves gaps when undersubscribed).
pub struct Spread;
impl Placement for Spread {
    fn name(&self) -> &'static str {
        "spread"
    }
    fn cpus_for(&self, lr: usize, ls: usize, mode: CpuMode, avail: &[usize]) -> Option<Vec<usize>> {
        if avail.is_empty() {
            return None;
        }
        let c = mode.cores_per_rank().min(avail.len());
        let slots = (avail.len() / c).max(1);
        let stride = (slots / ls.max(1)).max(1);
        let first = ((lr * stride) % slots) * c;
        Some((0..c).map(|k| avail[(first + k) % avail.len()]).collect())
    }
}

pub struct NoPinning;
impl Placement for NoPinning {
    fn name(&self) -> &'static str {
        "none"
    }
    fn cpus_for(&self, _: usize, _: usize, _: CpuMode, _: &[usize]) -> Option<Vec<usize>> {
        None
    }
}

/// First line of a Chama trace (crates/chama, `chama-trace v1`).
pub const TRACE_MAGIC: &str = "# chama-trace v1";
/// Column header of a Chama trace.
pub const TRACE_HEADER: &str = "rank\top\tpeer\ttag\tbytes\tstart_ns\tend_ns\tclass";

/// One rank's record, written by the profiling variant.
#[derive(Debug, Clone, Serialize)]
pub struct RankRecord {
    pub job: String,
    pub rank: u32,
    pub node: u32,
    pub pid: u32,
    pub cpus: Option<Vec<usize>>,
    pub start_unix_ns: u128,
    pub end_unix_ns: u128,
    pub user_cpu_ns: u64,
    pub system_cpu_ns: u64,
    pub status: RankStatus,
    /// Where the rank's message trace was asked to go (`PUMA_TRACE`).
    pub message_trace: Option<String>,
}

/// High-performance vs debugging/profiling behaviour.
pub trait Variant: Send + Sync {
    fn name(&self) -> &'static str;
    /// Extra environment for a rank.
    fn rank_env(&self, _job: &str, _rank: u32) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Called when a rank has ended, before it is reaped.
    fn rank_done(&self, _rec: &RankRecord) {}
    /// Called when every rank of the job on this node has ended.
    fn job_done(&self, _req: &LoadRequest) {}
}

pub struct Performance;
impl Variant for Performance {
    fn name(&self) -> &'static str {
        "performance"
    }
}

/// Records, for every rank, a JSON line with its timing, CPU use and exit, in
/// `<trace_dir>/<job>/ranks.jsonl`, and asks the rank's library to append its
/// message records (chama-trace v1 record lines: rank, op, peer, tag, bytes,
/// start_ns, end_ns, class, tab-separated) to `<trace_dir>/<job>/rank-<r>.trace`
/// (`PUMA_TRACE`). When the job ends on the node, the PCT merges them into
/// `<trace_dir>/<job>/node-<n>.trace`, a complete `chama-trace v1` file that the
/// simulator reads (`chama convert` / `chama run`).
pub struct Profiling {
    pub dir: PathBuf,
}

impl Profiling {
    fn job_dir(&self, job: &str) -> PathBuf {
        self.dir.join(job)
    }
}

impl Variant for Profiling {
    fn name(&self) -> &'static str {
        "profiling"
    }
    fn rank_env(&self, job: &str, rank: u32) -> Vec<(String, String)> {
        let d = self.job_dir(job);
        let _ = std::fs::create_dir_all(&d);
        vec![(
            "PUMA_TRACE".into(),
            d.join(format!("rank-{rank}.trace")).display().to_string(),
        )]
    }
    fn job_done(&self, req: &LoadRequest) {
        let d = self.job_dir(&req.job);
        let mut text = format!(
            "{TRACE_MAGIC}\n# ranks={}\n# node={}\n{TRACE_HEADER}\n",
            req.size, req.node
        );
        for r in &req.ranks {
            if let Ok(body) = std::fs::read_to_string(d.join(format!("rank-{r}.trace"))) {
                for l in body.lines().filter(|l| {
                    !l.trim().is_empty() && !l.starts_with('#') && !l.starts_with("rank\t")
                }) {
                    text.push_str(l);
                    text.push('\n');
                }
            }
        }
        let out = d.join(format!("node-{}.trace", req.node));
        let tmp = d.join(format!(".node-{}.trace.tmp", req.node));
        if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &out)) {
            eprintln!("pct: profiling: cannot write {}: {e}", out.display());
        }
    }
    fn rank_done(&self, rec: &RankRecord) {
        let d = self.job_dir(&rec.job);
        let res = std::fs::create_dir_all(&d).and_then(|_| {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(d.join("ranks.jsonl"))?;
            let mut line = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
            line.push(b'\n');
            f.write_all(&line)
        });
        if let Err(e) = res {
            eprintln!("pct: profiling: cannot record rank {}: {e}", rec.rank);
        }
    }
}

/// The set of policies one PCT runs.
pub struct Policies {
    pub admission: Box<dyn Admission>,
    pub scheduling: Box<dyn SchedulingPolicy>,
    pub placement: Box<dyn Placement>,
    pub variant: Box<dyn Variant>,
}

impl Policies {
    pub fn from_config(cfg: &PctConfig) -> Self {
        Policies {
            admission: match cfg.tasking {
                Tasking::Single => Box::new(SingleTasking),
                Tasking::Multi => Box::new(MultiTasking),
            },
            scheduling: match cfg.scheduling {
                Scheduling::RoundRobin => Box::new(RoundRobin),
                Scheduling::Priority => Box::new(PriorityScheduling),
            },
            placement: match cfg.placement {
                PlacementKind::Compact => Box::new(Compact),
                PlacementKind::Spread => Box::new(Spread),
                PlacementKind::None => Box::new(NoPinning),
            },
            variant: match cfg.variant {
                VariantKind::Performance => Box::new(Performance),
                VariantKind::Profiling => Box::new(Profiling {
                    dir: cfg
                        .trace_dir
                        .clone()
                        .unwrap_or_else(|| std::env::temp_dir().join("puma-traces")),
                }),
            },
        }
    }
}

/// Nanoseconds since the Unix epoch.
pub fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Environment variable naming a node's service CPUs (same syntax as `--service-cpus`).
pub const SERVICE_CPUS_ENV: &str = "PUMA_SERVICE_CPUS";

/// Which CPUs the runtime's own threads (PCT, yod, the node engine) are kept on, as asked for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ServiceCpus {
    /// CPU 0 (the first usable CPU) on a node with two or more CPUs; the only CPU otherwise.
    #[default]
    Auto,
    /// No split: our threads run wherever the kernel puts them, ranks get every CPU.
    Shared,
    /// These CPUs.
    List(Vec<usize>),
}

impl std::str::FromStr for ServiceCpus {
    type Err = String;
    /// `auto`, `none` (no split) or a CPU list such as `0` or `0,2-3`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "auto" => Ok(ServiceCpus::Auto),
            "none" => Ok(ServiceCpus::Shared),
            list => parse_cpu_list(list).map(ServiceCpus::List),
        }
    }
}

/// Parses a CPU list in the kernel's notation (`0-3,5`); the result is sorted, without duplicates.
pub fn parse_cpu_list(s: &str) -> std::result::Result<Vec<usize>, String> {
    let bad = |why: &str| format!("bad CPU list {s:?}: {why} (expected e.g. 0 or 0,2-3)");
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(bad("empty entry"));
        }
        let num = |t: &str| -> std::result::Result<usize, String> {
            let v: usize = t
                .trim()
                .parse()
                .map_err(|_| bad(&format!("{t:?} is not a CPU number")))?;
            if v >= rustix::thread::CpuSet::MAX_CPU {
                return Err(bad(&format!("CPU {v} is beyond the largest CPU number")));
            }
            Ok(v)
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(bad(&format!("range {a}-{b} runs backwards")));
                }
                out.extend(a..=b);
            }
            None => out.push(num(part)?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Writes a CPU list in the kernel's notation (`0-3,5`).
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut v = cpus.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}-{}", v[i], v[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// A node's CPUs split into service CPUs (where every thread of the PCT and yod runs, heartbeats,
/// control link, output forwarding and the node engine included) and application CPUs (where
/// ranks run and nothing of ours wakes up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuSplit {
    /// Every CPU of the node we may use.
    pub all: Vec<usize>,
    /// Where our own threads are pinned.
    pub service: Vec<usize>,
    /// Where ranks go first.
    pub app: Vec<usize>,
}

impl CpuSplit {
    /// Splits `usable` (the CPUs in our affinity mask) as `spec` asks.
    pub fn new(usable: &[usize], spec: &ServiceCpus) -> std::result::Result<CpuSplit, String> {
        let all = usable.to_vec();
        if all.is_empty() {
            return Err("no usable CPU in the affinity mask".into());
        }
        let (service, app) = match spec {
            ServiceCpus::Shared => (all.clone(), all.clone()),
            ServiceCpus::Auto if all.len() == 1 => (all.clone(), all.clone()),
            ServiceCpus::Auto => (vec![all[0]], all[1..].to_vec()),
            ServiceCpus::List(l) => {
                if let Some(c) = l.iter().find(|c| !all.contains(c)) {
                    return Err(format!(
                        "service CPU {c} is not usable here (usable CPUs: {})",
                        format_cpu_list(&all)
                    ));
                }
                if l.is_empty() {
                    return Err("the service CPU list is empty (use `none` for no split)".into());
                }
                let app: Vec<usize> = all.iter().copied().filter(|c| !l.contains(c)).collect();
                // Every CPU a service CPU: ranks share them.
                let app = if app.is_empty() { all.clone() } else { app };
                (l.clone(), app)
            }
        };
        Ok(CpuSplit { all, service, app })
    }

    /// True when our threads have CPUs of their own, apart from the ranks'.
    pub fn separated(&self) -> bool {
        self.service.iter().all(|c| !self.app.contains(c))
    }

    /// The CPUs offered to a job's placement on this node when it needs `cores` cores: the
    /// application CPUs, or, when those are too few, the application CPUs followed by the
    /// service CPUs (the ranks placed last then share a CPU with our threads).
    pub fn rank_cpus(&self, cores: usize) -> Vec<usize> {
        if cores <= self.app.len() {
            return self.app.clone();
        }
        let mut v = self.app.clone();
        v.extend(
            self.service
                .iter()
                .copied()
                .filter(|c| !self.app.contains(c)),
        );
        v
    }

    /// Pins the calling thread (and so every thread it starts afterwards, and every process it
    /// spawns unless that process is pinned again) to the service CPUs.
    pub fn pin_here_to_service(&self) -> std::io::Result<()> {
        crate::sys::pin_current_thread(&self.service)
    }
}

/// The CPU a job's node engine (the QK's inter-node engine thread) is pinned to on this node,
/// given the CPUs each of the job's ranks here is pinned to (`None` for an unpinned rank).
///
/// The policy:
/// 1. a CPU of the node that no rank of the job uses goes to the engine: a service CPU first
///    (where the PCT's own threads live, so the application CPUs stay quiet), else an
///    application CPU the job left free. The engine then never takes a rank's core;
/// 2. with no such CPU, the CPU of the node's first rank. Sharing a CPU with one known rank, not
///    a random one, is what lets that rank sleep instead of spin while it waits: the engine
///    publishes the CPU it runs on (qk's `Region::cpu_hint`), and the only rank of a node that
///    finds the engine on its own CPU blocks at once, since nothing it waits for can arrive
///    while it holds the core;
/// 3. ranks that are not pinned (placement `none`): `None`, the engine keeps the PCT's mask
///    (the service CPUs), as every other thread of ours.
///
/// Only this job's ranks are known here: with several jobs on a node (multi tasking) a CPU
/// "free" of this job may run another job's rank.
pub fn engine_cpu(split: &CpuSplit, rank_cpus: &[Option<Vec<usize>>]) -> Option<usize> {
    let mut used = Vec::new();
    for r in rank_cpus {
        used.extend_from_slice(r.as_deref()?);
    }
    let free = |c: &&usize| !used.contains(c);
    split
        .service
        .iter()
        .find(free)
        .or_else(|| split.all.iter().find(free))
        .copied()
        .or_else(|| rank_cpus.first()?.as_ref()?.first().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uid: u32) -> LoadRequest {
        LoadRequest {
            job: "b".into(),
            uid,
            program: "x".into(),
            args: vec![],
            env: vec![],
            cwd: "/".into(),
            size: 1,
            node: 0,
            ranks: vec![0],
            mode: CpuMode::Heater,
            node_map: "{}".into(),
            stdin_rank: None,
            priority: 0,
        }
    }

    #[test]
    fn admission_policies() {
        let running = [RunningJob {
            job: "a".into(),
            uid: 1000,
            priority: 0,
        }];
        assert!(SingleTasking.admit(&[], &req(1)).is_ok());
        assert!(SingleTasking.admit(&running, &req(1000)).is_err());
        assert!(MultiTasking.admit(&running, &req(1000)).is_ok());
        assert!(MultiTasking.admit(&running, &req(1001)).is_err());
    }

    #[test]
    fn the_engine_takes_a_cpu_no_rank_uses_else_the_first_ranks() {
        let two = CpuSplit::new(&[0, 1], &ServiceCpus::Auto).unwrap();
        // One rank on the application CPU: the service CPU is free.
        assert_eq!(engine_cpu(&two, &[Some(vec![1])]), Some(0));
        // Both CPUs taken by ranks: the first rank's CPU, whichever it is.
        assert_eq!(engine_cpu(&two, &[Some(vec![1]), Some(vec![0])]), Some(1));
        // Unpinned ranks: the engine keeps the PCT's own mask.
        assert_eq!(engine_cpu(&two, &[None]), None);
        assert_eq!(engine_cpu(&two, &[Some(vec![1]), None]), None);
        // No split: every CPU is an application CPU and the free one goes to the engine.
        let shared = CpuSplit::new(&[0, 1, 2, 3], &ServiceCpus::Shared).unwrap();
        assert_eq!(
            engine_cpu(&shared, &[Some(vec![0]), Some(vec![1])]),
            Some(2)
        );
        // A free service CPU is preferred to a free application CPU.
        let four = CpuSplit::new(&[0, 1, 2, 3], &ServiceCpus::List(vec![2, 3])).unwrap();
        assert_eq!(engine_cpu(&four, &[Some(vec![0])]), Some(2));
        assert_eq!(engine_cpu(&four, &[Some(vec![0]), Some(vec![2])]), Some(3));
        assert_eq!(
            engine_cpu(&four, &[Some(vec![0]), Some(vec![2]), Some(vec![3])]),
            Some(1)
        );
        // Ranks of several cores each (virtual node mode) count every core.
        assert_eq!(
            engine_cpu(&four, &[Some(vec![2, 3]), Some(vec![0, 1])]),
            Some(2)
        );
        // No rank at all: a service CPU.
        assert_eq!(engine_cpu(&four, &[]), Some(2));
    }

    #[test]
    fn placement_per_mode() {
        let cpus = [0, 1, 2, 3];
        assert_eq!(
            Compact.cpus_for(1, 4, CpuMode::Heater, &cpus),
            Some(vec![1])
        );
        assert_eq!(
            Compact.cpus_for(1, 2, CpuMode::MsgCoproc, &cpus),
            Some(vec![2, 3])
        );
        assert_eq!(
            Compact.cpus_for(5, 8, CpuMode::Heater, &cpus),
            Some(vec![1])
        );
        assert_eq!(Spread.cpus_for(1, 2, CpuMode::Heater, &cpus), Some(vec![2]));
        assert_eq!(NoPinning.cpus_for(0, 1, CpuMode::Heater, &cpus), None);
        assert_eq!(
            Compact.cpus_for(0, 1, CpuMode::MsgCoproc, &[7]),
            Some(vec![7])
        );
    }

    #[test]
    fn cpu_lists_parse_and_format() {
        assert_eq!(parse_cpu_list("0"), Ok(vec![0]));
        assert_eq!(parse_cpu_list("3,0-1, 1"), Ok(vec![0, 1, 3]));
        assert_eq!(format_cpu_list(&[5, 0, 1, 2, 7, 8]), "0-2,5,7-8");
        for bad in ["", "1,", "a", "3-1", "-1", "99999"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!("auto".parse(), Ok(ServiceCpus::Auto));
        assert_eq!("none".parse(), Ok(ServiceCpus::Shared));
        assert_eq!("2-3".parse(), Ok(ServiceCpus::List(vec![2, 3])));
    }

    #[test]
    fn service_and_application_cpus() {
        let all = [0, 1, 2, 3];
        let auto = CpuSplit::new(&all, &ServiceCpus::Auto).unwrap();
        assert_eq!(
            (auto.service.clone(), auto.app.clone()),
            (vec![0], vec![1, 2, 3])
        );
        assert!(auto.separated());
        // Enough application CPUs: only those are offered; too few: the service CPU comes last.
        assert_eq!(auto.rank_cpus(3), vec![1, 2, 3]);
        assert_eq!(auto.rank_cpus(4), vec![1, 2, 3, 0]);
        // Heater on 2 of 4 CPUs never touches CPU 0; msg-coproc with 2 ranks needs all four.
        let offered = auto.rank_cpus(2 * CpuMode::Heater.cores_per_rank());
        assert_eq!(
            Compact.cpus_for(0, 2, CpuMode::Heater, &offered),
            Some(vec![1])
        );
        assert_eq!(
            Compact.cpus_for(1, 2, CpuMode::Heater, &offered),
            Some(vec![2])
        );
        let offered = auto.rank_cpus(2 * CpuMode::MsgCoproc.cores_per_rank());
        assert_eq!(
            Compact.cpus_for(1, 2, CpuMode::MsgCoproc, &offered),
            Some(vec![3, 0])
        );

        let one = CpuSplit::new(&[5], &ServiceCpus::Auto).unwrap();
        assert_eq!((one.service.clone(), one.app.clone()), (vec![5], vec![5]));
        assert!(!one.separated());
        let shared = CpuSplit::new(&all, &ServiceCpus::Shared).unwrap();
        assert_eq!(shared.app, all.to_vec());
        assert!(!shared.separated());
        let listed = CpuSplit::new(&all, &ServiceCpus::List(vec![2, 3])).unwrap();
        assert_eq!(
            (listed.service.clone(), listed.app.clone()),
            (vec![2, 3], vec![0, 1])
        );
        let every = CpuSplit::new(&[0, 1], &ServiceCpus::List(vec![0, 1])).unwrap();
        assert_eq!(every.app, vec![0, 1]);
        let err = CpuSplit::new(&all, &ServiceCpus::List(vec![7])).unwrap_err();
        assert!(err.contains("CPU 7") && err.contains("0-3"), "{err}");
        assert!(CpuSplit::new(&[], &ServiceCpus::Auto).is_err());
    }

    #[test]
    fn priority_maps_to_nice() {
        assert_eq!(RoundRobin.nice_for(5), None);
        assert_eq!(PriorityScheduling.nice_for(-5), Some(5));
    }
}
