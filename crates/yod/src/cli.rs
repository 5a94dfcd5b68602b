//! The `yod` command line.

use crate::error::{Result, YodError};
use crate::launch::{self, allocate, FaultPolicy, JobSpec, Target};
use crate::local::{pct_command, LocalPartition};
use crate::nodemap::Topology;
use crate::partition::Partition;
use crate::slurm;
use clap::Parser;
use pct::key::{default_key_path, ClusterKey};
use pct::policy::{format_cpu_list, CpuSplit, ServiceCpus};
use pct::proto::CpuMode;
use std::path::PathBuf;
use std::time::Duration;

const AFTER: &str = "\
Other commands:
  yod keygen [--out FILE] [--force]   create a cluster key (mode 0600) for PCTs and yod
  yod pct serve --listen ADDR ...     run a PCT daemon (same as the `pct` binary)

Where the nodes come from, first match wins:
  --partition FILE / $PUMA_PARTITION   a partition file (TOML) naming the compute nodes
  $SLURM_JOB_NODELIST                  inside a Slurm allocation: one PCT per node via srun
  otherwise                            an embedded local partition of this machine
                                       (--nodes K virtual nodes, started by yod itself)

Exit status: 0 when every rank succeeded, else the first failing rank's status
(128+N for a rank killed by signal N); 255 when a node was lost; 128+N when yod
itself was stopped by signal N; 1 when the job could not be started.";

/// Run a parallel job: N ranks of PROGRAM, on whole nodes of the compute partition.
#[derive(Parser, Debug)]
#[command(name = "yod", version, after_help = AFTER, trailing_var_arg = true)]
pub struct RunCli {
    /// Number of ranks.
    #[arg(short = 'n', long = "ntasks", value_name = "N")]
    pub n: u32,
    /// Ranks per node (default: spread evenly over the nodes).
    #[arg(long, value_name = "P")]
    pub ppn: Option<u32>,
    /// Number of nodes (embedded partition: split this machine into K virtual nodes).
    #[arg(long, value_name = "K")]
    pub nodes: Option<u32>,
    /// Prefix every output line with the rank that wrote it ("3: ...").
    #[arg(long)]
    pub label: bool,
    /// CPU mode chosen at load time.
    #[arg(long, value_enum, default_value = "heater")]
    pub mode: ModeArg,
    /// Partition file (TOML) describing the machine.
    #[arg(long, env = "PUMA_PARTITION", value_name = "FILE")]
    pub partition: Option<PathBuf>,
    /// Cluster key [default: the partition's `key`, $PUMA_KEY or ~/.config/puma/cluster.key].
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Ignore a surrounding Slurm allocation and use the embedded local partition.
    #[arg(long)]
    pub local: bool,
    /// What a failing rank does to the job.
    #[arg(long, value_enum, default_value = "end-job")]
    pub fault: FaultPolicy,
    /// Job priority between jobs on multi-tasking nodes (-20..=20, higher first).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// TCP port of the PCTs started with srun inside Slurm.
    #[arg(long, default_value_t = 7070)]
    pub pct_port: u16,
    /// PCT policy configuration (TOML, see the pct README) for the embedded
    /// partition's PCTs.
    #[arg(long, value_name = "FILE")]
    pub pct_config: Option<PathBuf>,
    /// CPUs for yod's and the embedded PCTs' own threads: `auto` (CPU 0 on a machine with
    /// two or more CPUs), `none` (no split) or a list like `0,2-3`. Ranks go to the other CPUs.
    /// Passed on to the embedded PCTs [default: auto, or the --pct-config's `service_cpus` for
    /// the PCTs].
    #[arg(long, env = "PUMA_SERVICE_CPUS", value_name = "LIST")]
    pub service_cpus: Option<String>,
    /// Say where ranks go.
    #[arg(short, long)]
    pub verbose: bool,
    /// The program and its arguments.
    #[arg(required = true, value_name = "PROGRAM [ARGS]...")]
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ModeArg {
    Heater,
    MsgCoproc,
    ComputeCoproc,
    VirtualNode,
}

impl From<ModeArg> for CpuMode {
    fn from(m: ModeArg) -> CpuMode {
        match m {
            ModeArg::Heater => CpuMode::Heater,
            ModeArg::MsgCoproc => CpuMode::MsgCoproc,
            ModeArg::ComputeCoproc => CpuMode::ComputeCoproc,
            ModeArg::VirtualNode => CpuMode::VirtualNode,
        }
    }
}

#[derive(Parser, Debug)]
#[command(name = "yod keygen")]
struct KeygenCli {
    /// Where to write [default: $PUMA_KEY or ~/.config/puma/cluster.key].
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Replace an existing key.
    #[arg(long)]
    force: bool,
}

/// Entry point; returns the exit status.
pub fn main() -> i32 {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        Some("pct") => {
            let cli = <pct::cli::PctCli as clap::Parser>::parse_from(&args[1..]);
            return pct::cli::main_with(cli);
        }
        Some("keygen") => {
            let k = KeygenCli::parse_from(&args[1..]);
            let p = k.out.unwrap_or_else(default_key_path);
            return match ClusterKey::generate().and_then(|key| key.write(&p, k.force)) {
                Ok(()) => {
                    println!(
                        "wrote cluster key {} (mode 0600); copy it to every node",
                        p.display()
                    );
                    0
                }
                Err(e) => {
                    crate::say!("yod: {e}");
                    1
                }
            };
        }
        _ => {}
    }
    let cli = RunCli::parse_from(&args);
    match run_cli(cli) {
        Ok(code) => code,
        Err(e) => {
            crate::say!("yod: {e}");
            launch::EXIT_LAUNCH_FAILED
        }
    }
}

fn spec_of(cli: &RunCli) -> Result<JobSpec> {
    let (program, args) = cli
        .command
        .split_first()
        .ok_or_else(|| YodError::Usage("no program given".into()))?;
    if cli.n == 0 {
        return Err(YodError::Usage("-n must be at least 1".into()));
    }
    if cli.n > pct::proto::MAX_RANKS {
        // Every node's PCT would refuse the load request; say it once, before any node is asked.
        return Err(YodError::Usage(format!(
            "-n {} is more ranks than a job may have ({})",
            cli.n,
            pct::proto::MAX_RANKS
        )));
    }
    if cli.ppn == Some(0) || cli.nodes == Some(0) {
        return Err(YodError::Usage(
            "--ppn and --nodes must be at least 1".into(),
        ));
    }
    if let Some(k) = cli.nodes.filter(|&k| k > cli.n) {
        // As srun does: say so rather than silently starting fewer nodes than asked.
        crate::say!(
            "yod: note: --nodes {k} is more than the {} rank(s); the job uses {} node(s), one rank each",
            cli.n, cli.n
        );
    }
    if !(-20..=20).contains(&cli.priority) {
        return Err(YodError::Usage("--priority must be in -20..=20".into()));
    }
    // Resolve a relative program path against our directory so every node finds it.
    let program = if program.contains('/') && !program.starts_with('/') {
        std::env::current_dir()
            .map(|d| d.join(program).display().to_string())
            .unwrap_or_else(|_| program.clone())
    } else {
        program.clone()
    };
    Ok(JobSpec {
        n: cli.n,
        ppn: cli.ppn,
        nodes: cli.nodes,
        label: cli.label,
        mode: cli.mode.into(),
        fault: cli.fault,
        priority: cli.priority,
        program,
        args: args.to_vec(),
        verbose: cli.verbose,
        local: false,
    })
}

fn load_key(p: Option<PathBuf>) -> Result<ClusterKey> {
    Ok(ClusterKey::load(&p.unwrap_or_else(default_key_path))?)
}

/// This machine's CPUs split as `--service-cpus` asks (yod's own threads go to the service CPUs).
fn service_split(cli: &RunCli) -> Result<CpuSplit> {
    let Some(text) = &cli.service_cpus else {
        return CpuSplit::new(&pct::server::usable_cpus(), &ServiceCpus::Auto)
            .map_err(YodError::Usage);
    };
    let bad = |why: String| YodError::Usage(format!("--service-cpus {text:?}: {why}"));
    let spec: ServiceCpus = text.parse().map_err(bad)?;
    CpuSplit::new(&pct::server::usable_cpus(), &spec).map_err(bad)
}

/// Pins yod's calling thread, and so every thread yod starts afterwards, to the service CPUs.
/// Called after the embedded PCTs (which must see every CPU) have been started.
fn pin_to_service(split: &CpuSplit, verbose: bool) {
    match split.pin_here_to_service() {
        Ok(()) if verbose => crate::say!(
            "yod: own threads on service CPU(s) {}; ranks on {}",
            format_cpu_list(&split.service),
            format_cpu_list(&split.app)
        ),
        Ok(()) => {}
        Err(e) => crate::say!(
            "yod: cannot pin to service CPUs {}: {e}; yod's threads may run on application CPUs",
            format_cpu_list(&split.service)
        ),
    }
}

/// Runs one job as the command line says; returns yod's exit status.
pub fn run_cli(cli: RunCli) -> Result<i32> {
    let spec = spec_of(&cli)?;
    let split = service_split(&cli)?;
    if let Some(pf) = &cli.partition {
        let part = Partition::load(pf)?;
        let key = load_key(cli.key.clone().or(part.key.clone()))?;
        let state = DownList::for_partition(&part.name);
        let mut cands: Vec<Target> = part
            .compute_nodes()
            .into_iter()
            .map(|c| Target {
                name: c.name,
                address: c.address,
                coords: c.coords,
            })
            .collect();
        // Nodes marked down by earlier jobs are tried last.
        let down_before = state.load();
        cands.sort_by_key(|t| down_before.contains(&t.name));
        pin_to_service(&split, cli.verbose);
        let alloc = allocate(&spec, cands, &key, part.topology.clone())?;
        let mut down: Vec<String> = down_before
            .into_iter()
            .filter(|n| !alloc.links.iter().any(|l| &l.target.name == n))
            .collect();
        down.extend(alloc.down.iter().cloned());
        state.store(&down);
        let out = launch::run(&spec, alloc)?;
        if !out.lost.is_empty() {
            down.extend(out.lost);
            state.store(&down);
        }
        return Ok(out.code);
    }
    if !cli.local {
        if let Some(hosts) = slurm::nodes_from_env() {
            return run_slurm(&cli, &spec, hosts?, &split);
        }
    }
    // Embedded local partition.
    if let Some(k) = &cli.key {
        // Its PCTs are yod's own and share a key made for this job alone; say so rather than
        // let an explicit key (readable or not) look used.
        crate::say!(
            "yod: note: --key {} is not used: the embedded local partition's PCTs share a key made for this job",
            k.display()
        );
    }
    let k = match (cli.nodes, cli.ppn) {
        // One virtual node unless the job exceeds what one node's QK fabric holds.
        (None, None) => cli.n.div_ceil(pct::resources::MAX_LOCAL_RANKS) as usize,
        // The same rule (and the same refusal of --nodes x --ppn < -n) as for real nodes.
        _ => launch::nodes_needed(&spec, usize::MAX)?,
    };
    if k > 1024 {
        return Err(YodError::Usage(format!(
            "{k} virtual nodes is too many for one machine"
        )));
    }
    let cfg = match &cli.pct_config {
        Some(p) => {
            Some(std::path::absolute(p).map_err(|e| YodError::io("resolving --pct-config", e))?)
        }
        None => None,
    };
    let mut lp = LocalPartition::start(k, cfg.as_deref(), cli.service_cpus.as_deref())?;
    pin_to_service(&split, cli.verbose);
    let mut links = Vec::with_capacity(k);
    for i in 0..k {
        let conn = lp.wait_ready(i)?;
        links.push(launch::Link::over(lp.targets[i].clone(), conn, &lp.key)?);
    }
    let alloc = launch::Allocation {
        links,
        topology: Topology::Mesh {
            dims: vec![k as u32],
        },
        down: vec![],
    };
    let spec = JobSpec {
        local: true,
        ..spec
    };
    let out = launch::run(&spec, alloc);
    lp.stop();
    Ok(out?.code)
}

fn run_slurm(cli: &RunCli, spec: &JobSpec, hosts: Vec<String>, split: &CpuSplit) -> Result<i32> {
    let key_path = cli.key.clone().unwrap_or_else(default_key_path);
    let key = ClusterKey::load(&key_path)?;
    let (prog, pre) = pct_command();
    let argv = slurm::srun_argv(&prog, &pre, &hosts, cli.pct_port, &key_path);
    if cli.verbose {
        crate::say!("yod: starting PCTs: {}", argv.join(" "));
    }
    let mut srun = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| YodError::io("starting srun (is Slurm installed?)", e))?;
    pin_to_service(split, cli.verbose);
    let targets = slurm::targets(&hosts, cli.pct_port)?;
    // Give the PCTs up to 10 s to come up.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut links = Vec::new();
    for t in &targets {
        loop {
            match launch::Link::open(t.clone(), &key, Duration::from_secs(1)) {
                Ok(l) => {
                    links.push(l);
                    break;
                }
                Err(e) if std::time::Instant::now() > deadline => {
                    stop_srun(&mut srun);
                    return Err(YodError::Allocation(format!(
                        "PCT on {} did not come up: {e}",
                        t.name
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
    let k = launch::nodes_needed(spec, links.len())?;
    links.truncate(k);
    let alloc = launch::Allocation {
        links,
        topology: Topology::Mesh {
            dims: vec![hosts.len() as u32],
        },
        down: vec![],
    };
    let out = launch::run(spec, alloc);
    stop_srun(&mut srun);
    Ok(out?.code)
}

/// Stops the srun step politely: srun forwards SIGUSR1 to the PCTs, which kill
/// their jobs and remove their files (a SIGTERM would make srun kill the step
/// with SIGKILL, leaving the PCTs no time to clean up). SIGTERM after 5 s, then
/// SIGKILL.
fn stop_srun(srun: &mut std::process::Child) {
    use rustix::process::Signal;
    let pid = rustix::process::Pid::from_raw(srun.id() as i32);
    for (sig, wait) in [(Signal::USR1, 5), (Signal::TERM, 3)] {
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, sig);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(wait);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = srun.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = srun.kill();
    let _ = srun.wait();
}

/// The partition's record of nodes found down: tried last by later jobs.
struct DownList {
    path: Option<PathBuf>,
}

impl DownList {
    fn for_partition(name: &str) -> DownList {
        let base = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")));
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        DownList {
            path: base.map(|b| b.join("puma").join(format!("{safe}.down.json"))),
        }
    }

    fn load(&self) -> Vec<String> {
        self.path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn store(&self, names: &[String]) {
        let Some(p) = &self.path else { return };
        let mut v: Vec<&String> = names.iter().collect();
        v.sort();
        v.dedup();
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if let Ok(b) = serde_json::to_vec(&v) {
            if std::fs::write(&tmp, b).is_ok() {
                let _ = std::fs::rename(&tmp, p);
            }
        }
    }
}
