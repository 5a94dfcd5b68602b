//! `puma-bench`: the hosted QK's fabric against MPICH and Open MPI, side by side, interleaved.
//!
//! Every measurement launches a fresh pair of ranks (ours: a fabric from `NodeFabric::create` and
//! two processes of this program pinned one per core; the peers: `mpirun -n 2` of
//! `bench-peers/mpi_peer.c`), in the order A B C A B C ... so the host moving the two virtual CPUs
//! between "near" and "far" placements hits every contender alike. It prints min / median / max per
//! contender and the median of the per-round ratios to the best peer of the same round.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use qk::portals::{
    Acl, EventKind, MatchSpec, MdKind, MdOptions, MdSpec, OffsetMode, ProcessId, PutArgs,
};
use qk::{AttachSpec, CpuMode, Endpoint, JobFabricSpec, NodeFabric, QkError};

#[derive(Parser)]
#[command(
    about = "Benchmark the QK fabric against MPICH and Open MPI (ping-pong latency, streaming bandwidth, message rate)",
    long_about = "Runs our fabric (inline and co-processor progress) and the MPI peers built by \
                  crates/qk/bench-peers/install.sh in interleaved rounds and prints min/median/max and \
                  ratios to the best peer of each round. Peers that are not installed are reported as absent."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Rounds per measurement (each round runs every contender once).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Directory holding mpi_peer.mpich / mpi_peer.openmpi (built by bench-peers/install.sh).
    #[arg(long, default_value = "target/bench-peers")]
    peers: PathBuf,
    /// Only these measurements (comma list of lat,bw,rate).
    #[arg(long, default_value = "lat,bw,rate")]
    only: String,
    /// Only these message sizes in bytes (comma list; empty = every size of each measurement). A
    /// size other than the standard ones (lat 0, 8, 1024, 65536, 1048576, 4194304; bw 65536,
    /// 1048576, 4194304; rate 8) adds a latency and a bandwidth measurement at that size.
    #[arg(long, default_value = "")]
    sizes: String,
    /// Our progress modes to run (comma list of heater,msg-coproc).
    #[arg(long, default_value = "heater,msg-coproc")]
    modes: String,
    /// Where our sender's buffers live (comma list of shared, bounce, cma): shared = job heap
    /// (single copy); bounce / cma = private memory through a heap bounce buffer or cross-memory
    /// attach. Several values run side by side, interleaved.
    #[arg(long, default_value = "shared")]
    sources: String,
    /// Compare over TCP instead, between two network namespaces joined by a veth pair that the
    /// benchmark creates and removes (root only): ours through two node engines, one per namespace;
    /// MPICH with one rank per namespace over UCX's TCP transport. Both run at normal priority
    /// even under `chrt -f` (a real-time spinner starves the kernel thread that moves the packets).
    #[arg(long)]
    tcp: bool,
    /// Scale iteration counts (0.1 = a quick look).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Size of our node-local queues in bytes (power of two; default: the fabric's default).
    /// The eager limit is capped at a quarter of it.
    #[arg(long)]
    queue_bytes: Option<u64>,
    /// Before each send, the sender writes one byte in every 64-byte line of the bytes it sends,
    /// as an application producing new data per message would (ours and the MPI peers alike).
    /// Without it the send buffer never changes, so a large message's source lines may still sit
    /// in the receiver's caches from the last message. In lat both ranks rewrite before each send;
    /// in bw and rate the sender rewrites once per window, before its sends (a buffer must not be
    /// written while a send from it is in flight). Needs peers built from this tree's mpi_peer.c
    /// (bench-peers/install.sh): a peer that does not confirm the rewrite is reported as failed.
    #[arg(long)]
    rewrite: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// CPU cost of one small put end to end on a single core: both ranks' endpoints live in this
    /// process and take turns (sender library call, queue, receiver engine, match, deposit,
    /// event), so the figure has no cache-line crossing, no scheduling and no peer in it.
    Cost {
        /// Payload bytes.
        #[arg(long, default_value_t = 8)]
        size: u64,
        /// Messages per batch (sent, then all received).
        #[arg(long, default_value_t = 64)]
        window: u64,
        /// Batches per repeat.
        #[arg(long, default_value_t = 20000)]
        batches: u64,
        /// Repeats (min/median/max printed).
        #[arg(long, default_value_t = 7)]
        reps: usize,
    },
    /// The physical floor of a small message between the two cores: two threads pinned one per
    /// core bounce a counter in one 64-byte line (each waits for the other's value, then writes
    /// the next), with no fabric, queue or portals work at all. Prints min/median/max one-way ns
    /// (half a round trip) over the repeats.
    Line {
        /// Round trips per repeat.
        #[arg(long, default_value_t = 200_000)]
        iters: u64,
        /// Repeats (min/median/max printed).
        #[arg(long, default_value_t = 7)]
        reps: usize,
        /// A `pause` per look, as the fabric's waiters spin (default: a tight spin of loads).
        #[arg(long)]
        pause: bool,
    },
    /// The floor of our own queues: two threads pinned one per core bounce an 8-byte compact put
    /// through qk's node-local rings (two rings, one per direction, as between two ranks), with no
    /// portals work, match or event. Between `line` (one line, no queue) and the full ping-pong
    /// it shows what the queue design costs and what is left for the library. Prints
    /// min/median/max one-way ns over the repeats.
    Ring {
        /// Round trips per repeat.
        #[arg(long, default_value_t = 200_000)]
        iters: u64,
        /// Repeats (min/median/max printed).
        #[arg(long, default_value_t = 7)]
        reps: usize,
    },
    /// Internal: one rank of our side.
    Rank {
        #[arg(long)]
        fd: i32,
        #[arg(long)]
        port: u32,
        #[arg(long)]
        job: u32,
        #[arg(long)]
        mode: String,
        #[arg(long)]
        what: String,
        #[arg(long)]
        size: u64,
        #[arg(long)]
        iters: u64,
        #[arg(long)]
        window: u64,
        #[arg(long)]
        cpu: Option<usize>,
        /// Rewrite the send buffer before sending (see the top-level `--rewrite`).
        #[arg(long)]
        rewrite: bool,
    },
}

#[derive(Clone, Copy, PartialEq)]
enum Better {
    Lower,
    Higher,
}

struct Measure {
    what: &'static str,
    size: u64,
    iters: u64,
    window: u64,
    queue_bytes: Option<u64>,
    /// The sender rewrites its buffer before sending (`--rewrite`).
    rewrite: bool,
}

impl Measure {
    fn better(&self) -> Better {
        if self.what == "lat" {
            Better::Lower
        } else {
            Better::Higher
        }
    }
    fn label(&self) -> String {
        let s = human(self.size);
        match self.what {
            "lat" => format!("one-way latency {s} (µs)"),
            "bw" => format!("bandwidth {s} (GB/s)"),
            _ => format!("message rate {s} (M msg/s)"),
        }
    }
    fn display(&self, v: f64) -> f64 {
        match self.what {
            "lat" => v / 1000.0,
            "bw" => v / 1e9,
            _ => v / 1e6,
        }
    }
}

fn human(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{} MiB", n >> 20)
    } else if n >= 1024 {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}

/// Where our sender's buffer lives (how a large message leaves it).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Source {
    /// Job heap: the receiver copies once, straight from it.
    Shared,
    /// Private memory, bounced through the heap (two memcpys).
    Bounce,
    /// Private memory, read by the receiver with process_vm_readv.
    Cma,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Shared => "shared",
            Source::Bounce => "private-bounce",
            Source::Cma => "private-cma",
        }
    }
    fn parse(s: &str) -> Result<Source, String> {
        match s {
            "shared" => Ok(Source::Shared),
            "bounce" | "private-bounce" => Ok(Source::Bounce),
            "cma" | "private-cma" => Ok(Source::Cma),
            _ => Err(format!("unknown source {s:?} (shared, bounce, cma)")),
        }
    }
}

#[derive(Clone)]
enum Contender {
    Ours(CpuMode, Source),
    /// Ours with the two ranks on two "hosts" (network namespaces) joined by node engines over TCP.
    OursTcp(CpuMode, std::sync::Arc<Netns>),
    Mpi {
        name: &'static str,
        bin: PathBuf,
        launcher: &'static str,
        extra: Vec<String>,
    },
}

impl Contender {
    fn name(&self) -> String {
        match self {
            Contender::Ours(m, Source::Shared) => format!("qk {m}"),
            Contender::Ours(m, src) => format!("qk {m} {}", src.name()),
            Contender::OursTcp(m, _) => format!("qk tcp {m}"),
            Contender::Mpi { name, .. } => name.to_string(),
        }
    }
    fn is_peer(&self) -> bool {
        matches!(self, Contender::Mpi { .. })
    }
    fn is_tcp(&self) -> bool {
        match self {
            Contender::OursTcp(..) => true,
            Contender::Mpi { name, .. } => name.contains("TCP"),
            Contender::Ours(..) => false,
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Some(Cmd::Rank {
            fd,
            port,
            job,
            mode,
            what,
            size,
            iters,
            window,
            cpu,
            rewrite,
        }) => rank_main(
            fd, port, job, &mode, &what, size, iters, window, cpu, rewrite,
        ),
        Some(Cmd::Cost {
            size,
            window,
            batches,
            reps,
        }) => cost_main(size, window, batches, reps),
        Some(Cmd::Line { iters, reps, pause }) => line_main(iters, reps, pause),
        Some(Cmd::Ring { iters, reps }) => ring_main(iters, reps),
        None => bench_main(&cli),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("puma-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

type R<T> = Result<T, Box<dyn std::error::Error>>;

/// The measurements `--only` and `--sizes` ask for, in the order they run.
fn plan(cli: &Cli, only: &[&str]) -> R<Vec<Measure>> {
    let sc = |n: u64| ((n as f64 * cli.scale).ceil() as u64).max(3);
    let mut ms = Vec::new();
    if only.contains(&"lat") {
        for (s, it) in LAT_SIZES {
            ms.push(Measure {
                what: "lat",
                size: s,
                iters: sc(it),
                window: 1,
                queue_bytes: cli.queue_bytes,
                rewrite: cli.rewrite,
            });
        }
    }
    if only.contains(&"bw") {
        for (s, it, w) in BW_SIZES {
            ms.push(Measure {
                what: "bw",
                size: s,
                iters: sc(it),
                window: w,
                queue_bytes: cli.queue_bytes,
                rewrite: cli.rewrite,
            });
        }
    }
    if only.contains(&"rate") {
        ms.push(Measure {
            what: "rate",
            size: RATE_SIZE,
            iters: sc(3000),
            window: 64,
            queue_bytes: cli.queue_bytes,
            rewrite: cli.rewrite,
        });
    }
    if !cli.sizes.is_empty() {
        let keep: Vec<u64> = cli
            .sizes
            .split(',')
            .map(|x| x.trim().parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("--sizes wants byte counts separated by commas: {e}"))?;
        if let Some(big) = keep.iter().find(|&&k| k > MAX_EXTRA_SIZE) {
            return Err(format!(
                "--sizes: {big} bytes is more than this benchmark sends ({MAX_EXTRA_SIZE})"
            )
            .into());
        }
        let standard = |k: &u64| {
            *k == RATE_SIZE
                || LAT_SIZES.iter().any(|l| l.0 == *k)
                || BW_SIZES.iter().any(|b| b.0 == *k)
        };
        ms.retain(|m| keep.contains(&m.size));
        // A size outside the standard ones is measured too, by latency and bandwidth (as asked
        // by --only), with as many iterations as move about the same bytes.
        for &size in keep.iter().filter(|k| !standard(k)) {
            for what in ["lat", "bw"] {
                if !only.contains(&what) || ms.iter().any(|m| m.what == what && m.size == size) {
                    continue;
                }
                let (iters, window) = extra_iters(what, size);
                ms.push(Measure {
                    what,
                    size,
                    iters: sc(iters),
                    window,
                    queue_bytes: cli.queue_bytes,
                    rewrite: cli.rewrite,
                });
            }
        }
    }
    if ms.is_empty() {
        return Err(format!(
            "nothing to measure: --only {:?} with --sizes {:?} selects no measurement",
            cli.only, cli.sizes
        )
        .into());
    }
    Ok(ms)
}

/// The standard latency measurements: size, iterations.
const LAT_SIZES: [(u64, u64); 6] = [
    (0, 20000),
    (8, 20000),
    (1024, 20000),
    (65536, 3000),
    (1 << 20, 400),
    (4 << 20, 100),
];
/// The standard bandwidth measurements: size, iterations, window.
const BW_SIZES: [(u64, u64, u64); 3] = [(65536, 100, 64), (1 << 20, 40, 16), (4 << 20, 12, 8)];
/// The message rate's size.
const RATE_SIZE: u64 = 8;

/// Largest size `--sizes` may ask for outside the standard ones.
const MAX_EXTRA_SIZE: u64 = 64 << 20;

/// Iterations (and bandwidth window) of a measurement at a size outside the standard ones: about
/// as many bytes as the standard measurements move, within their iteration ranges.
fn extra_iters(what: &str, size: u64) -> (u64, u64) {
    let size = size.max(1);
    if what == "lat" {
        (((1u64 << 28) / size).clamp(100, 20000), 1)
    } else {
        (
            ((1u64 << 26) / size).clamp(8, 100),
            ((1u64 << 22) / size).clamp(8, 64),
        )
    }
}

/// Largest `--scale`: the standard measurements at this scale already run for hours.
const MAX_SCALE: f64 = 1000.0;

/// The names of a comma list option, trimmed, empty ones skipped.
fn items(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|x| !x.is_empty())
}

/// Checks the options `plan` does not: rounds, scale, our modes and sources, queue size. Called
/// before anything is created or looked for, so a bad request costs nothing and says what is wrong.
fn check_request(cli: &Cli) -> R<()> {
    if cli.reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    if !(cli.scale.is_finite() && cli.scale > 0.0 && cli.scale <= MAX_SCALE) {
        return Err(format!(
            "--scale must be a number above 0 and at most {MAX_SCALE} (got {})",
            cli.scale
        )
        .into());
    }
    if items(&cli.modes).next().is_none() {
        return Err("--modes names no mode (give heater and/or msg-coproc)".into());
    }
    for m in items(&cli.modes) {
        if m.parse::<CpuMode>().is_err() {
            return Err(format!(
                "--modes: unknown mode `{m}` (give heater, msg-coproc, compute-coproc or virtual-node)"
            )
            .into());
        }
    }
    if !cli.tcp {
        if items(&cli.sources).next().is_none() {
            return Err("--sources names no source (give shared, bounce and/or cma)".into());
        }
        for s in items(&cli.sources) {
            Source::parse(s).map_err(|e| format!("--sources: {e}"))?;
        }
    }
    if let Some(q) = cli.queue_bytes {
        qk::region::Layout::new(2, q, 1 << 20).map_err(|e| format!("--queue-bytes: {e}"))?;
    }
    Ok(())
}

fn bench_main(cli: &Cli) -> R<()> {
    // Check the request before creating namespaces or looking for peers.
    let only: Vec<&str> = cli.only.split(',').map(str::trim).collect();
    if let Some(bad) = only.iter().find(|w| !["lat", "bw", "rate"].contains(w)) {
        return Err(
            format!("--only: unknown measurement `{bad}` (give lat, bw and/or rate)").into(),
        );
    }
    let ms = plan(cli, &only)?;
    check_request(cli)?;
    let mut contenders = Vec::new();
    let netns = if cli.tcp {
        match Netns::create() {
            Ok(n) => Some(std::sync::Arc::new(n)),
            Err(why) => {
                println!("puma-bench: skipping the TCP comparison: {why}");
                return Ok(());
            }
        }
    } else {
        None
    };
    for m in items(&cli.modes) {
        let mode: CpuMode = m.parse()?;
        if let Some(ns) = &netns {
            contenders.push(Contender::OursTcp(mode, ns.clone()));
        } else {
            for src in items(&cli.sources) {
                contenders.push(Contender::Ours(mode, Source::parse(src)?));
            }
        }
    }
    let mpich = cli.peers.join("mpi_peer.mpich");
    let ompi = cli.peers.join("mpi_peer.openmpi");
    if mpich.exists() && which("mpirun.mpich") {
        contenders.push(Contender::Mpi {
            name: "MPICH",
            bin: mpich.clone(),
            launcher: "mpirun.mpich",
            extra: strs(&["-bind-to", "core"]),
        });
        if let Some(ns) = &netns {
            // One rank per namespace: mpiexec runs in the first namespace and reaches the second
            // "host" through a launcher script, so MPICH really goes over the veth pair.
            contenders.push(Contender::Mpi {
                name: "MPICH TCP",
                bin: mpich,
                launcher: "ip",
                extra: ns.mpich_args(),
            });
        }
    } else {
        println!(
            "peer absent: MPICH (run crates/qk/bench-peers/install.sh; looked for {})",
            mpich.display()
        );
    }
    if ompi.exists() && which("mpirun.openmpi") {
        contenders.push(Contender::Mpi {
            name: "Open MPI",
            bin: ompi.clone(),
            launcher: "mpirun.openmpi",
            extra: strs(&["--allow-run-as-root", "--bind-to", "core"]),
        });
        contenders.push(Contender::Mpi {
            name: "Open MPI no-CMA",
            bin: ompi,
            launcher: "mpirun.openmpi",
            extra: strs(&[
                "--allow-run-as-root",
                "--bind-to",
                "core",
                "--mca",
                "btl_vader_single_copy_mechanism",
                "none",
            ]),
        });
    } else {
        println!(
            "peer absent: Open MPI (run crates/qk/bench-peers/install.sh; looked for {})",
            ompi.display()
        );
    }
    contenders.retain(|c| c.is_tcp() == cli.tcp);
    if cli.tcp {
        println!(
            "puma-bench: Open MPI is not run over TCP: its runtime daemons cannot span two network namespaces of one machine"
        );
        if qk::sys::thread_sched().is_ok_and(|s| s.is_real_time()) {
            println!(
                "puma-bench: the TCP contenders run at normal priority, not this real-time one: \
                 a real-time spinner starves the kernel thread that moves veth packets"
            );
        }
    }
    let cpus = qk::sys::allowed_cpus();
    println!(
        "puma-bench: {} rounds, contenders: {}; cpus {:?}",
        cli.reps,
        contenders
            .iter()
            .map(|c| c.name())
            .collect::<Vec<_>>()
            .join(", "),
        cpus
    );
    let (mut runs, mut failed) = (0usize, 0usize);
    for m in &ms {
        let mut vals: Vec<Vec<f64>> = vec![Vec::new(); contenders.len()];
        let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); contenders.len()];
        for _rep in 0..cli.reps {
            let mut round = vec![f64::NAN; contenders.len()];
            for (i, c) in contenders.iter().enumerate() {
                runs += 1;
                match run_one(c, m) {
                    Ok(v) => {
                        round[i] = v;
                        vals[i].push(v);
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("  {} {}: failed: {e}", c.name(), m.label())
                    }
                }
            }
            let peers: Vec<f64> = contenders
                .iter()
                .zip(&round)
                .filter(|(c, v)| c.is_peer() && v.is_finite())
                .map(|(_, v)| *v)
                .collect();
            if let Some(best) = best_of(&peers, m.better()) {
                for (i, c) in contenders.iter().enumerate() {
                    if !c.is_peer() && round[i].is_finite() {
                        ratios[i].push(round[i] / best);
                    }
                }
            }
        }
        println!("\n{}", m.label());
        for (i, c) in contenders.iter().enumerate() {
            let mut v: Vec<f64> = vals[i].iter().map(|x| m.display(*x)).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            if v.is_empty() {
                println!("  {:<18} no result", c.name());
                continue;
            }
            let mut line = format!(
                "  {:<18} min {:>9.3}  median {:>9.3}  max {:>9.3}",
                c.name(),
                v[0],
                v[v.len() / 2],
                v[v.len() - 1]
            );
            let mut r = ratios[i].clone();
            r.sort_by(|a, b| a.total_cmp(b));
            if !r.is_empty() {
                line += &format!(
                    "   ratio to best peer (per round) median {:.2} [{:.2} .. {:.2}]",
                    r[r.len() / 2],
                    r[0],
                    r[r.len() - 1]
                );
            }
            println!("{line}");
        }
    }
    if failed > 0 {
        // The tables above hold what did run; the exit status says they are incomplete.
        return Err(
            format!("{failed} of {runs} runs failed (each one's reason is printed above)").into(),
        );
    }
    Ok(())
}

fn best_of(v: &[f64], b: Better) -> Option<f64> {
    v.iter().copied().reduce(|a, x| {
        if (b == Better::Lower) == (x < a) {
            x
        } else {
            a
        }
    })
}

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).exists()))
}

fn run_one(c: &Contender, m: &Measure) -> R<f64> {
    // Over TCP nobody spins at a real-time priority: a veth packet is moved by the kernel's
    // softirq work, which falls to `ksoftirqd`, a normal thread, that a real-time spinner on its
    // CPU starves (MPICH's 1 MiB ping-pong ran for minutes instead of a second).
    let _normal = c.is_tcp().then(SchedFor::normal);
    match c {
        Contender::Ours(mode, src) => run_ours(*mode, *src, m),
        Contender::OursTcp(mode, ns) => run_ours_tcp(*mode, ns, m),
        Contender::Mpi {
            bin,
            launcher,
            extra,
            ..
        } => {
            let out = Command::new(launcher)
                .args(extra)
                .args(["-n", "2"])
                .arg(bin)
                .args(peer_args(m))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0)
                .spawn()?;
            let out = wait_bounded(out, PEER_DEADLINE)?;
            parse_result(&out, m)
        }
    }
}

/// The arguments of `mpi_peer` for `m`: `<what> <size> <iters> <window>`, then `rewrite` when the
/// sender rewrites its buffer (without it, the form older peers take).
fn peer_args(m: &Measure) -> Vec<String> {
    let mut v = vec![
        m.what.to_string(),
        m.size.to_string(),
        m.iters.to_string(),
        m.window.to_string(),
    ];
    if m.rewrite {
        v.push(REWRITE.to_string());
    }
    v
}

/// The word that asks `mpi_peer` to rewrite its buffer, and that every result line of a rewriting
/// run (ours and the peers') ends with.
const REWRITE: &str = "rewrite";

/// Our rank's measurement arguments for `m` (after `rank --fd .. --port .. --job .. --mode ..`).
fn rank_args(m: &Measure) -> Vec<String> {
    let mut v = strs(&["--what", m.what]);
    for (k, n) in [
        ("--size", m.size),
        ("--iters", m.iters),
        ("--window", m.window),
    ] {
        v.push(k.to_string());
        v.push(n.to_string());
    }
    if m.rewrite {
        v.push("--rewrite".to_string());
    }
    v
}

/// Writes one byte in every 64-byte line of `b` (a new value each call), as an application
/// producing the next message's data would.
fn rewrite_lines(b: &mut [u8]) {
    for x in b.iter_mut().step_by(64) {
        *x = x.wrapping_add(1);
    }
}

/// Longest one run may take (a peer's launcher, or one of our ranks); a run past it is killed
/// with everything it started and reported as failed. MPICH over TCP between the namespaces
/// stalled for minutes when it ran at a real-time priority (see [`run_one`]).
const PEER_DEADLINE: Duration = Duration::from_secs(90);

/// Waits for `child` (leader of its own process group) for at most `limit`; past it, kills the
/// whole group (the launcher and the ranks it started) and says so.
fn wait_bounded(mut child: std::process::Child, limit: Duration) -> R<std::process::Output> {
    // The child inherited this thread's class: when that is real-time and the child spins on
    // every CPU, a watcher at the same priority would never run again, and the deadline with it.
    let _watch = SchedFor::above_children();
    let start = Instant::now();
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut so = child.stdout.take().ok_or("no stdout pipe")?;
    let mut se = child.stderr.take().ok_or("no stderr pipe")?;
    let to = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut so, &mut v);
        v
    });
    let te = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut se, &mut v);
        v
    });
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(std::process::Output {
                status,
                stdout: to.join().unwrap_or_default(),
                stderr: te.join().unwrap_or_default(),
            });
        }
        if start.elapsed() > limit {
            // The launcher and every process it started, wherever they moved (MPICH's proxies
            // and ranks each lead a process group of their own).
            kill_tree(child.id());
            let _ = child.wait();
            return Err(format!("no result after {limit:?}: killed").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for our ranks, all within one [`PEER_DEADLINE`]: when one is killed for it, the others
/// (waiting for it) are killed as soon as their turn comes.
fn wait_all(kids: Vec<std::process::Child>) -> Vec<R<std::process::Output>> {
    let end = Instant::now() + PEER_DEADLINE;
    kids.into_iter()
        .map(|k| wait_bounded(k, end.saturating_duration_since(Instant::now())))
        .collect()
}

/// Kills process `root` and all its descendants: stops them first, so that none can start
/// another while the tree is read, then kills them all.
fn kill_tree(root: u32) {
    let signal = |sig: &str, pids: &[u32]| {
        let _ = Command::new("kill")
            .arg(sig)
            .args(pids.iter().map(|p| p.to_string()))
            .stderr(Stdio::null())
            .status();
    };
    let mut all = vec![root];
    for _ in 0..10 {
        signal("-STOP", &all);
        let now = [vec![root], descendants(root)].concat();
        let grew = now.iter().any(|p| !all.contains(p));
        all = now;
        if !grew {
            break;
        }
    }
    signal("-KILL", &all);
}

/// Every process descended from `root` (its children, theirs, and so on), from the parent field
/// of `/proc/<pid>/stat`: neither a process group nor a session reaches a launcher's ranks when
/// they lead groups or sessions of their own.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses, and ends at the
        // last ')'.
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((pid, ppid));
        }
    }
    let mut out: Vec<u32> = Vec::new();
    let mut next = vec![root];
    while let Some(p) = next.pop() {
        for &(c, pp) in &parent_of {
            if pp == p && c != root && !out.contains(&c) {
                out.push(c);
                next.push(c);
            }
        }
    }
    out
}

/// While alive, the calling thread runs in another scheduling class, and what it starts meanwhile
/// inherits that class; the old one is restored on drop. Does nothing unless the thread is
/// real-time (`chrt -f`), which is how the benchmark is meant to be run.
struct SchedFor {
    old: Option<qk::sys::ThreadSched>,
}

impl SchedFor {
    fn switch(to: impl FnOnce(qk::sys::ThreadSched) -> Option<qk::sys::ThreadSched>) -> SchedFor {
        let old = qk::sys::thread_sched()
            .ok()
            .filter(|s| s.is_real_time())
            .and_then(|cur| {
                let new = to(cur)?;
                qk::sys::set_thread_sched(new).ok().map(|()| cur)
            });
        SchedFor { old }
    }

    /// One real-time priority above the caller's: a watcher of children that inherited the
    /// caller's priority.
    fn above_children() -> SchedFor {
        SchedFor::switch(|cur| {
            (cur.priority < 99).then_some(qk::sys::ThreadSched {
                priority: cur.priority + 1,
                ..cur
            })
        })
    }

    /// The normal class.
    fn normal() -> SchedFor {
        SchedFor::switch(|_| Some(qk::sys::ThreadSched::NORMAL))
    }
}

impl Drop for SchedFor {
    fn drop(&mut self) {
        if let Some(old) = self.old {
            let _ = qk::sys::set_thread_sched(old);
        }
    }
}

fn parse_result(out: &std::process::Output, m: &Measure) -> R<f64> {
    let so = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{}: {}{}",
            out.status,
            so,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    parse_line(&so, m)
}

/// Finds the result line `<what> <size> <value>` in a rank's output; with `--rewrite` it must end
/// in `rewrite`, so a peer built before the option existed (which ignores the extra argument) is
/// caught instead of being compared unrewritten.
fn parse_line(so: &str, m: &Measure) -> R<f64> {
    for l in so.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 3 || f[0] != m.what {
            continue;
        }
        let rewrote = f.get(3) == Some(&REWRITE);
        if f.len() > 4 || (f.len() == 4 && !rewrote) {
            continue;
        }
        if rewrote != m.rewrite {
            return Err(if m.rewrite {
                format!(
                    "asked to rewrite the send buffer, but the result {l:?} does not confirm it: \
                     rebuild the peers with crates/qk/bench-peers/install.sh"
                )
            } else {
                format!("rewrote the send buffer without being asked: {l:?}")
            }
            .into());
        }
        return Ok(f[2].parse()?);
    }
    Err(format!("no result line in {so:?}").into())
}

fn run_ours(mode: CpuMode, src: Source, m: &Measure) -> R<f64> {
    let mut spec = JobFabricSpec::new(77, 2, vec![0, 1], mode);
    if let Some(q) = m.queue_bytes {
        spec.queue_bytes = q;
        spec.eager_bytes = spec.eager_bytes.min((q / 4) as u32);
    }
    spec.heap_bytes_per_rank = 2 * m.size.max(1 << 16) + (8 << 20);
    spec.lock_memory = false;
    let fab = NodeFabric::create(&spec)?;
    let fd = fab.prepare_child_fd()?;
    let exe = std::env::current_exe()?;
    let cpus = qk::sys::allowed_cpus();
    let mut kids = Vec::new();
    for port in 0..2u32 {
        let mut c = Command::new(&exe);
        c.args([
            "rank",
            "--fd",
            &fd.to_string(),
            "--port",
            &port.to_string(),
            "--job",
            "77",
            "--mode",
            mode.as_str(),
        ]);
        c.args(rank_args(m));
        c.env("PUMA_BENCH_SOURCE", src.name());
        if cpus.len() >= 2 {
            c.args(["--cpu", &cpus[port as usize].to_string()]);
        }
        kids.push(c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?);
    }
    let outs = wait_all(kids).into_iter().collect::<R<Vec<_>>>()?;
    for o in &outs[1..] {
        if !o.status.success() {
            return Err(format!("rank 1: {}", String::from_utf8_lossy(&o.stderr)).into());
        }
    }
    parse_result(&outs[0], m)
}

fn run_ours_tcp(mode: CpuMode, ns: &Netns, m: &Measure) -> R<f64> {
    use qk::tcp::{NodeEngine, NodeEngineSpec};
    let mut fabs = Vec::new();
    for node in 0..2u32 {
        let mut spec = JobFabricSpec::new(78, 2, vec![node], mode);
        spec.node_id = node;
        spec.heap_bytes_per_rank = 4 * m.size.max(1 << 16) + (8 << 20);
        spec.lock_memory = false;
        fabs.push(NodeFabric::create(&spec)?);
    }
    // Each node engine is built on a thread inside its namespace, so its listener and the
    // connection it dials belong there; the two threads swap listening addresses first.
    let (tx0, rx0) = std::sync::mpsc::channel::<std::net::SocketAddr>();
    let (tx1, rx1) = std::sync::mpsc::channel::<std::net::SocketAddr>();
    let mut chans = vec![(tx0, rx1), (tx1, rx0)];
    let mut starting = Vec::new();
    for node in (0..2u32).rev() {
        let (tx, rx) = chans.pop().ok_or("channel")?;
        let fd = fabs[node as usize].dup_fd()?;
        let path = ns.path(node as usize);
        let ip = ns.addr(node as usize);
        starting.push(std::thread::spawn(move || -> Result<NodeEngine, String> {
            qk::sys::enter_netns(&path).map_err(|e| format!("entering {}: {e}", path.display()))?;
            let l = std::net::TcpListener::bind((ip, 0))
                .map_err(|e| format!("listening on {ip}: {e}"))?;
            let me = l.local_addr().map_err(|e| e.to_string())?;
            tx.send(me).map_err(|e| e.to_string())?;
            let peer = rx
                .recv_timeout(Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            let spec = NodeEngineSpec {
                job_id: 78,
                node_id: node,
                listen: me,
                peers: vec![(1 - node, peer)],
                rank_node: vec![0, 1],
                cluster_key: b"puma-bench".to_vec(),
                connect_timeout: Duration::from_secs(10),
            };
            NodeEngine::with_listener(fd, spec, l).map_err(|e| e.to_string())
        }));
    }
    // Each "node" is one CPU: its rank and its node engine run there (as MPICH's rank and its
    // socket work do), and the other node's threads stay off it.
    let cpus = qk::sys::allowed_cpus();
    let mut engines = Vec::new();
    for t in starting {
        let e = t.join().map_err(|_| "engine start panicked")??;
        let node = e.node_id() as usize;
        let cpu = (cpus.len() >= 2).then(|| cpus[node]);
        engines.push(e.spawn_on(cpu)?);
    }
    let exe = std::env::current_exe()?;
    let mut kids = Vec::new();
    for (node, fab) in fabs.iter().enumerate() {
        let fd = fab.prepare_child_fd()?;
        let mut c = Command::new(&exe);
        c.args([
            "rank",
            "--fd",
            &fd.to_string(),
            "--port",
            "0",
            "--job",
            "78",
            "--mode",
            mode.as_str(),
        ]);
        c.args(rank_args(m));
        if cpus.len() >= 2 {
            c.args(["--cpu", &cpus[node].to_string()]);
        }
        kids.push(c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?);
    }
    let outs = wait_all(kids);
    for e in engines {
        e.stop()?;
    }
    let outs = outs.into_iter().collect::<R<Vec<_>>>()?;
    if !outs[1].status.success() {
        return Err(format!("rank 1: {}", String::from_utf8_lossy(&outs[1].stderr)).into());
    }
    parse_result(&outs[0], m)
}

const P_DATA: u32 = 1;
const WAIT: Duration = Duration::from_secs(60);

#[allow(clippy::too_many_arguments)]
fn rank_main(
    fd: i32,
    port: u32,
    job: u32,
    mode: &str,
    what: &str,
    size: u64,
    iters: u64,
    window: u64,
    cpu: Option<usize>,
    rewrite: bool,
) -> R<()> {
    if let Some(c) = cpu {
        qk::sys::pin_to_cpu(c)?;
    }
    let mode: CpuMode = mode.parse()?;
    let memfd = qk::sys::Memfd::from_inherited(fd)?;
    let mut ep = Endpoint::attach(
        memfd,
        &AttachSpec {
            lock_memory: false,
            ..AttachSpec::new(job, port, mode)
        },
    )?;
    let me = ep.rank();
    let peer = ProcessId::new(job, 1 - me);
    let source =
        Source::parse(&std::env::var("PUMA_BENCH_SOURCE").unwrap_or_else(|_| "shared".into()))?;
    let sbuf = match source {
        Source::Shared => ep.alloc_shared(size.max(8))?,
        Source::Bounce => {
            ep.set_private_path(qk::PrivatePath::Bounce);
            ep.alloc_private(size.max(8))
        }
        Source::Cma => {
            ep.set_private_path(qk::PrivatePath::CrossMemoryAttach);
            ep.alloc_private(size.max(8))
        }
    };
    // The ping-pong sends and receives with one buffer, as mpi_peer.c does: the bytes a rank sends
    // back are the ones it just received (and, large, sit in its caches as they would in an
    // application's). Private sources keep a separate (job-heap) receive buffer.
    let rbuf = if what == "lat" && source == Source::Shared {
        sbuf
    } else {
        ep.alloc_shared(size.max(8))?
    };
    let (eq, smd) = bench_portals(&mut ep, job, window, sbuf, rbuf)?;
    let sent = size.min(sbuf.len) as usize;
    let touch = |ep: &mut Endpoint| -> Result<(), QkError> {
        if rewrite {
            ep.with_bytes(&sbuf, |b| {
                let n = sent.min(b.len());
                rewrite_lines(&mut b[..n])
            })?;
        }
        Ok(())
    };
    // Each loop's put arguments are made once, as an application streaming to one peer would
    // keep them: the loops then measure the library's put, not the making of its arguments
    // (ten stores per call, which on this machine slowed the sender's ring stores: see
    // crates/qk/ROUNDS.md, twenty-first round).
    let args = |n: u64, bits: u64| PutArgs {
        md: smd,
        local_offset: 0,
        length: n,
        target: peer,
        portal: P_DATA,
        match_bits: bits,
        remote_offset: 0,
        ack: false,
        hdr_data: 0,
    };
    let (hello, lat, stream, answer) = (args(0, 9), args(size, 1), args(size, 2), args(0, 3));
    let mut ev = qk::portals::Event::EMPTY;
    let mut wait_put = |ep: &mut Endpoint| -> Result<(), QkError> {
        loop {
            ep.eq_wait_into(eq, WAIT, &mut ev)?;
            if ev.kind == EventKind::Put {
                return Ok(());
            }
        }
    };
    // Start-up handshake: rank 1 announces it is ready; rank 0 answers (both portals are set up).
    if me == 1 {
        ep.put(&hello)?;
        wait_put(&mut ep)?;
    } else {
        wait_put(&mut ep)?;
        ep.put(&hello)?;
    }
    let warm = iters / 10 + 1;
    let mut t0 = Instant::now();
    if what == "lat" {
        for i in 0..iters + warm {
            if i == warm {
                t0 = Instant::now();
            }
            if me == 0 {
                touch(&mut ep)?;
                ep.put(&lat)?;
                wait_put(&mut ep)?;
            } else {
                wait_put(&mut ep)?;
                touch(&mut ep)?;
                ep.put(&lat)?;
            }
        }
        if me == 0 {
            println!(
                "lat {size} {:.1}{}",
                t0.elapsed().as_nanos() as f64 / iters as f64 / 2.0,
                mark(rewrite)
            );
        }
    } else {
        for i in 0..iters + warm {
            if i == warm {
                t0 = Instant::now();
            }
            if me == 0 {
                // Once per window: the last window's sends are complete (answered), this
                // window's may still read the buffer until the answer.
                touch(&mut ep)?;
                for _ in 0..window {
                    ep.put(&stream)?;
                }
                wait_put(&mut ep)?;
            } else {
                for _ in 0..window {
                    wait_put(&mut ep)?;
                }
                ep.put(&answer)?;
            }
        }
        if me == 0 {
            let t = t0.elapsed().as_secs_f64();
            let msgs = (iters * window) as f64;
            if what == "bw" {
                println!("bw {size} {:.1}{}", msgs * size as f64 / t, mark(rewrite));
            } else {
                println!("rate {size} {:.1}{}", msgs / t, mark(rewrite));
            }
        }
    }
    // Let the last completions drain before the fabric goes away.
    let end = Instant::now();
    while ep.large_in_flight() > 0 && end.elapsed() < Duration::from_secs(2) {
        ep.progress();
    }
    Ok(())
}

/// The end of a result line: ` rewrite` when the sender rewrote its buffer.
fn mark(rewrite: bool) -> String {
    if rewrite {
        format!(" {REWRITE}")
    } else {
        String::new()
    }
}

/// Sets up `ep` the way a benchmark rank does: an event queue, a receive descriptor on
/// [`P_DATA`] matching anything, and a send descriptor over `sbuf`. Returns (eq, send md).
fn bench_portals(
    ep: &mut Endpoint,
    job: u32,
    window: u64,
    sbuf: qk::Buf,
    rbuf: qk::Buf,
) -> Result<(qk::portals::EqHandle, qk::portals::MdHandle), QkError> {
    let pe = |e: qk::portals::Error| QkError::Portals(e.to_string());
    ep.with_engine(|e| -> Result<_, QkError> {
        let eq = e.eq_alloc(4 * window as u32 + 64).map_err(pe)?;
        let rmd = e
            .md_create(&MdSpec {
                kind: MdKind::Single {
                    region: rbuf.region(),
                    offset: OffsetMode::Sender,
                },
                options: MdOptions::PUT,
                eq: Some(eq),
            })
            .map_err(pe)?;
        e.portal_enable(P_DATA).map_err(pe)?;
        e.portal_set_acl(P_DATA, Acl::job(job)).map_err(pe)?;
        e.me_append(P_DATA, MatchSpec::any(), rmd).map_err(pe)?;
        let smd = e
            .md_create(&MdSpec {
                kind: MdKind::Single {
                    region: sbuf.region(),
                    offset: OffsetMode::Sender,
                },
                options: MdOptions::PUT,
                eq: None,
            })
            .map_err(pe)?;
        Ok((eq, smd))
    })
}

fn cost_main(size: u64, window: u64, batches: u64, reps: usize) -> R<()> {
    if window == 0 || batches == 0 || reps == 0 {
        return Err("cost: --window, --batches and --reps must be at least 1".into());
    }
    let job = 79;
    let mut spec = JobFabricSpec::new(job, 2, vec![0, 1], CpuMode::Heater);
    spec.heap_bytes_per_rank = 2 * size.max(1 << 16) + (8 << 20);
    spec.lock_memory = false;
    let fab = NodeFabric::create(&spec)?;
    let mut eps = Vec::new();
    for port in 0..2 {
        eps.push(Endpoint::attach(
            fab.dup_fd()?,
            &AttachSpec {
                lock_memory: false,
                ..AttachSpec::new(job, port, CpuMode::Heater)
            },
        )?);
    }
    let mut setup = Vec::new();
    for ep in eps.iter_mut() {
        let sbuf = ep.alloc_shared(size.max(8))?;
        let rbuf = ep.alloc_shared(size.max(8))?;
        setup.push(bench_portals(ep, job, window, sbuf, rbuf)?);
    }
    let (a, b) = eps.split_at_mut(1);
    let (tx, rx) = (&mut a[0], &mut b[0]);
    let smd = setup[0].1;
    let eq = setup[1].0;
    let args = PutArgs {
        md: smd,
        local_offset: 0,
        length: size,
        target: ProcessId::new(job, 1),
        portal: P_DATA,
        match_bits: 1,
        remote_offset: 0,
        ack: false,
        hdr_data: 0,
    };
    let mut send_ns = Vec::new();
    let mut recv_ns = Vec::new();
    let mut ev = qk::portals::Event::EMPTY;
    for _ in 0..reps {
        let (mut ts, mut tr) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..batches {
            let t0 = Instant::now();
            for _ in 0..window {
                tx.put(&args)?;
            }
            let t1 = Instant::now();
            for _ in 0..window {
                let got = rx.eq_poll_into(eq, &mut ev)?;
                if !got || ev.kind != EventKind::Put {
                    return Err(format!("expected a put event, got {:?}", got.then_some(ev)).into());
                }
            }
            ts += t1 - t0;
            tr += t1.elapsed();
        }
        let n = (batches * window) as f64;
        send_ns.push(ts.as_nanos() as f64 / n);
        recv_ns.push(tr.as_nanos() as f64 / n);
    }
    let show = |name: &str, v: &mut Vec<f64>| {
        let (min, med, max) = spread(v);
        println!("  {name:<8} min {min:>7.1}  median {med:>7.1}  max {max:>7.1} ns/message");
    };
    println!("cost of a {size} B put on one core ({reps} repeats of {batches} x {window}):");
    show("send", &mut send_ns);
    show("receive", &mut recv_ns);
    let mut tot: Vec<f64> = send_ns.iter().zip(&recv_ns).map(|(a, b)| a + b).collect();
    show("total", &mut tot);
    Ok(())
}

/// One cache line holding the counter the two threads of [`line_main`] bounce.
#[repr(C, align(64))]
struct Line {
    v: std::sync::atomic::AtomicU64,
}

/// The first two CPUs this process may use, for a measurement that bounces `what` between two
/// cores, after checking its counts.
fn two_cpus_for(what: &str, iters: u64, reps: usize) -> R<(usize, usize)> {
    let cpus = qk::sys::allowed_cpus();
    let (Some(&c0), Some(&c1)) = (cpus.first(), cpus.get(1)) else {
        return Err(format!(
            "needs two CPUs to bounce {what} between, this process may use {cpus:?}"
        )
        .into());
    };
    if iters == 0 || reps == 0 {
        return Err("--iters and --reps must be at least 1".into());
    }
    Ok((c0, c1))
}

/// Sorts `v` (not empty) and returns its min, median and max.
fn spread(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// `puma-bench line`: one-way latency of a bare cache-line ping-pong between the first two
/// allowed CPUs (see [`Cmd::Line`]).
fn line_main(iters: u64, reps: usize, pause: bool) -> R<()> {
    use std::sync::atomic::Ordering;
    let (c0, c1) = two_cpus_for("a line", iters, reps)?;
    let line = Line {
        v: std::sync::atomic::AtomicU64::new(0),
    };
    let total = iters * reps as u64;
    let mut one_way = Vec::with_capacity(reps);
    let placed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| -> R<()> {
        // The answering side: waits for each odd value and writes the next even one. After a
        // pinning error it still answers, or the other side would wait for ever.
        let echo = s.spawn(|| -> Result<(), String> {
            let pinned = qk::sys::pin_to_cpu(c1);
            placed.store(true, Ordering::Release);
            for k in 0..total {
                while line.v.load(Ordering::Acquire) != 2 * k + 1 {
                    if pause {
                        std::hint::spin_loop();
                    }
                }
                line.v.store(2 * k + 2, Ordering::Release);
            }
            pinned.map_err(|e| format!("pinning to CPU {c1}: {e}"))
        });
        let pinned = qk::sys::pin_to_cpu(c0);
        wait_placed(&placed);
        let mut k = 0u64;
        for _ in 0..reps {
            let t = Instant::now();
            for _ in 0..iters {
                // Even after a pinning error: the answering side must see every value it waits
                // for, or it would spin forever.
                line.v.store(2 * k + 1, Ordering::Release);
                while line.v.load(Ordering::Acquire) != 2 * k + 2 {
                    if pause {
                        std::hint::spin_loop();
                    }
                }
                k += 1;
            }
            one_way.push(t.elapsed().as_nanos() as f64 / (2 * iters) as f64);
        }
        echo.join()
            .map_err(|_| "the answering thread panicked")?
            .map_err(|e| e.to_string())?;
        pinned.map_err(|e| format!("pinning to CPU {c0}: {e}"))?;
        Ok(())
    })?;
    let (min, med, max) = spread(&mut one_way);
    println!(
        "cache-line ping-pong CPU {c0} <-> CPU {c1}{} ({reps} repeats of {iters} round trips): one-way min {min:.1}  median {med:.1}  max {max:.1} ns",
        if pause { ", pause per look" } else { "" },
    );
    Ok(())
}

/// Waits, yielding, until the answering thread of a two-CPU measurement has pinned itself. Under
/// `chrt -f` a thread spinning at a real-time priority never lets one of the same priority that
/// still sits on its CPU run, so spinning before the other side has moved away could wait for ever.
fn wait_placed(placed: &std::sync::atomic::AtomicBool) {
    while !placed.load(std::sync::atomic::Ordering::Acquire) {
        std::thread::yield_now();
    }
}

/// One side of [`ring_main`]: sends `k` (when `first`) and waits for the answer, or the other
/// way round, `n` times from `k0`; checks every payload it takes. `Err` names the first wrong one,
/// or says the other side stopped (`stop`, which this side sets when it fails).
fn ring_turns(
    port: &mut qk::fabric::Port,
    to: u32,
    first: bool,
    (k0, n): (u64, u64),
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), String> {
    let h = qk::fabric::Hdr {
        op: qk::fabric::op::PUT,
        portal: 1,
        length: 8,
        ..Default::default()
    };
    let word = qk::fabric::compact_word(&h).ok_or("an 8-byte put has a compact form")?;
    let take = |port: &mut qk::fabric::Port, want: u64| -> Result<(), String> {
        let mut got = None;
        while port.poll_run(1, |m| {
            got = Some(match m.head {
                qk::fabric::Head::Compact(c) => c.payload,
                qk::fabric::Head::Line(_) => u64::MAX,
            })
        }) == 0
        {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(RING_STOPPED.into());
            }
        }
        match got {
            Some(v) if v == want => Ok(()),
            other => Err(format!("expected payload {want}, got {other:?}")),
        }
    };
    let mut turns = || -> Result<(), String> {
        for k in k0..k0 + n {
            if !first {
                take(port, k)?;
            }
            while !port.try_send_compact(to, word, 1, k, 8) {}
            if first {
                take(port, k)?;
            }
        }
        Ok(())
    };
    let r = turns();
    if r.is_err() {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    r
}

/// What a side of [`ring_main`] says when the other side failed first.
const RING_STOPPED: &str = "the other side stopped";

fn ring_main(iters: u64, reps: usize) -> R<()> {
    let (c0, c1) = two_cpus_for("messages", iters, reps)?;
    let mut spec = JobFabricSpec::new(77, 2, vec![0, 1], CpuMode::Heater);
    spec.lock_memory = false;
    let fab = NodeFabric::create(&spec)?;
    let (mut p0, mut p1) = (
        qk::fabric::Port::new(fab.region().clone(), 0),
        qk::fabric::Port::new(fab.region().clone(), 1),
    );
    let total = iters * reps as u64;
    let mut one_way = Vec::with_capacity(reps);
    let placed = std::sync::atomic::AtomicBool::new(false);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| -> R<()> {
        let (placed, stop) = (&placed, &stop);
        let echo = s.spawn(move || -> Result<(), String> {
            // After a pinning error the answers still go out, or the other side would wait for ever.
            let pinned = qk::sys::pin_to_cpu(c1);
            placed.store(true, std::sync::atomic::Ordering::Release);
            ring_turns(&mut p1, 0, false, (0, total), stop)?;
            pinned.map_err(|e| format!("pinning to CPU {c1}: {e}"))
        });
        let pinned = qk::sys::pin_to_cpu(c0);
        wait_placed(placed);
        let mut k = 0;
        let mut res = Ok(());
        for _ in 0..reps {
            let t = Instant::now();
            res = ring_turns(&mut p0, 1, true, (k, iters), stop);
            if res.is_err() {
                break;
            }
            k += iters;
            one_way.push(t.elapsed().as_nanos() as f64 / (2 * iters) as f64);
        }
        let answered = echo.join().map_err(|_| "the answering thread panicked")?;
        match (res, answered) {
            (Ok(()), Ok(())) => {}
            // Whichever side failed first says why; the other only saw it stop.
            (Err(mine), Err(theirs)) if mine == RING_STOPPED => return Err(theirs.into()),
            (Err(why), _) | (Ok(()), Err(why)) => return Err(why.into()),
        }
        pinned.map_err(|e| format!("pinning to CPU {c0}: {e}"))?;
        Ok(())
    })?;
    let (min, med, max) = spread(&mut one_way);
    println!(
        "qk ring ping-pong CPU {c0} <-> CPU {c1} (8-byte compact puts, no portals; {reps} repeats of {iters} round trips): one-way min {min:.1}  median {med:.1}  max {max:.1} ns"
    );
    Ok(())
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Two network namespaces joined by a veth pair (each end named `qk0` inside its namespace),
/// created for the TCP comparison and removed when dropped, with the launcher script that lets
/// MPICH's mpiexec start its second rank in the second namespace.
struct Netns {
    names: [String; 2],
    ips: [std::net::Ipv4Addr; 2],
    script: PathBuf,
}

impl Netns {
    fn create() -> Result<Netns, String> {
        let root = std::fs::read_to_string("/proc/self/status")
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false);
        if !root {
            return Err(
                "it runs between two network namespaces joined by a veth pair, and creating them needs root"
                    .into(),
            );
        }
        if !which("ip") {
            return Err("iproute2 (the `ip` command) is not installed".into());
        }
        let id = std::process::id() % 250 + 1;
        let ns = Netns {
            names: [format!("qkbenchA{id}"), format!("qkbenchB{id}")],
            ips: [
                std::net::Ipv4Addr::new(10, 234, id as u8, 1),
                std::net::Ipv4Addr::new(10, 234, id as u8, 2),
            ],
            script: std::env::temp_dir().join(format!("puma-bench-nslaunch-{id}.sh")),
        };
        let ip = |args: &[&str]| -> Result<(), String> {
            let st = Command::new("ip")
                .args(args)
                .stderr(Stdio::piped())
                .output()
                .map_err(|e| format!("running ip: {e}"))?;
            if st.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&st.stderr).trim()
                ))
            }
        };
        let (a, b) = (&ns.names[0], &ns.names[1]);
        ip(&["netns", "add", a])?;
        ip(&["netns", "add", b])?;
        let (va, vb) = (format!("qkbva{id}"), format!("qkbvb{id}"));
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        for (n, v, addr) in [(a, &va, ns.ips[0]), (b, &vb, ns.ips[1])] {
            ip(&["link", "set", v, "netns", n])?;
            ip(&["-n", n, "link", "set", "dev", v, "name", "qk0"])?;
            ip(&["-n", n, "addr", "add", &format!("{addr}/24"), "dev", "qk0"])?;
            ip(&["-n", n, "link", "set", "qk0", "up"])?;
            ip(&["-n", n, "link", "set", "lo", "up"])?;
        }
        // mpiexec calls the launcher like ssh: options, host, command. Host A's rank goes on CPU
        // 0 and host B's on CPU 1, as ours do.
        let cpus = qk::sys::allowed_cpus();
        let cpu = |i: usize| cpus.get(i).or(cpus.first()).copied().unwrap_or(0);
        let script = format!(
            "#!/bin/sh\nwhile [ \"${{1#-}}\" != \"$1\" ]; do shift; done\nhost=\"$1\"; shift\ncase \"$host\" in\n  {}) ns={a}; cpu={} ;;\n  {}) ns={b}; cpu={} ;;\n  *) echo \"unknown host $host\" >&2; exit 1 ;;\nesac\nexec ip netns exec \"$ns\" taskset -c \"$cpu\" sh -c \"$*\"\n",
            ns.ips[0],
            cpu(0),
            ns.ips[1],
            cpu(1)
        );
        std::fs::write(&ns.script, script).map_err(|e| format!("writing the launcher: {e}"))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ns.script, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("launcher permissions: {e}"))?;
        Ok(ns)
    }

    fn path(&self, i: usize) -> PathBuf {
        Path::new("/var/run/netns").join(&self.names[i])
    }

    fn addr(&self, i: usize) -> std::net::Ipv4Addr {
        self.ips[i]
    }

    /// Arguments after `ip` that run MPICH's mpiexec with one rank per namespace over TCP.
    fn mpich_args(&self) -> Vec<String> {
        let hosts = format!("{},{}", self.ips[0], self.ips[1]);
        let script = self.script.display().to_string();
        strs(&[
            "netns",
            "exec",
            &self.names[0],
            "mpirun.mpich",
            "-launcher",
            "ssh",
            "-launcher-exec",
            &script,
            "-iface",
            "qk0",
            "-hosts",
            &hosts,
            "-ppn",
            "1",
            "-bind-to",
            "none",
            "-env",
            "UCX_TLS",
            "tcp,self",
            "-env",
            "UCX_NET_DEVICES",
            "qk0",
        ])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
        let _ = std::fs::remove_file(&self.script);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ports of one job's queues, in this process.
    fn two_ports() -> (NodeFabric, qk::fabric::Port, qk::fabric::Port) {
        let mut spec = JobFabricSpec::new(76, 2, vec![0, 1], CpuMode::Heater);
        spec.lock_memory = false;
        let fab = NodeFabric::create(&spec).unwrap();
        let p0 = qk::fabric::Port::new(fab.region().clone(), 0);
        let p1 = qk::fabric::Port::new(fab.region().clone(), 1);
        (fab, p0, p1)
    }

    #[test]
    fn a_ring_side_stops_waiting_once_the_other_side_has_failed() {
        let (_fab, mut p0, _p1) = two_ports();
        let stop = std::sync::atomic::AtomicBool::new(true);
        // Nothing will ever come: without the flag this would wait for ever.
        assert_eq!(
            ring_turns(&mut p0, 1, false, (0, 5), &stop),
            Err(RING_STOPPED.to_string())
        );
    }

    #[test]
    fn a_wrong_payload_fails_the_ring_side_that_takes_it_and_stops_the_other() {
        let (_fab, mut p0, mut p1) = two_ports();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let h = qk::fabric::Hdr {
            op: qk::fabric::op::PUT,
            portal: 1,
            length: 8,
            ..Default::default()
        };
        let word = qk::fabric::compact_word(&h).unwrap();
        assert!(p1.try_send_compact(0, word, 1, 7, 8));
        let r = ring_turns(&mut p0, 1, false, (0, 1), &stop);
        assert_eq!(r, Err("expected payload 0, got Some(7)".to_string()));
        assert!(stop.load(std::sync::atomic::Ordering::Relaxed));
        // The right payloads, in turn, pass (one side at a time: each answer is already queued).
        let ok = std::sync::atomic::AtomicBool::new(false);
        assert!(p1.try_send_compact(0, word, 1, 0, 8));
        assert_eq!(ring_turns(&mut p0, 1, false, (0, 1), &ok), Ok(()));
        assert_eq!(ring_turns(&mut p1, 0, false, (0, 1), &ok), Ok(()));
    }

    fn measure(what: &'static str, rewrite: bool) -> Measure {
        Measure {
            what,
            size: 1 << 20,
            iters: 400,
            window: 1,
            queue_bytes: None,
            rewrite,
        }
    }

    #[test]
    fn sizes_filter_the_standard_measures_and_add_any_other_size() {
        let cli = |args: &[&str]| {
            let mut argv = vec!["puma-bench"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).unwrap()
        };
        let got = |c: &Cli| {
            let only: Vec<&str> = c.only.split(',').collect();
            plan(c, &only).map(|ms| {
                ms.iter()
                    .map(|m| (m.what, m.size, m.window))
                    .collect::<Vec<_>>()
            })
        };
        let c = cli(&["--sizes", "65536"]);
        assert_eq!(got(&c).unwrap(), [("lat", 65536, 1), ("bw", 65536, 64)]);
        let c = cli(&["--only", "lat,bw", "--sizes", "8,32768"]);
        assert_eq!(
            got(&c).unwrap(),
            [("lat", 8, 1), ("lat", 32768, 1), ("bw", 32768, 64)]
        );
        let c = cli(&["--only", "rate", "--sizes", "32768"]);
        assert!(got(&c)
            .unwrap_err()
            .to_string()
            .contains("selects no measurement"));
        let c = cli(&["--sizes", "1073741824"]);
        assert!(got(&c)
            .unwrap_err()
            .to_string()
            .contains("more than this benchmark sends"));
    }

    #[test]
    fn rewrite_flag_reaches_the_measures() {
        let cli = Cli::try_parse_from(["puma-bench", "--rewrite", "--only", "lat"]).unwrap();
        assert!(cli.rewrite);
        let cli = Cli::try_parse_from(["puma-bench", "--only", "lat"]).unwrap();
        assert!(!cli.rewrite);
    }

    #[test]
    fn peer_args_keep_the_old_form_and_add_rewrite() {
        assert_eq!(
            peer_args(&measure("lat", false)),
            ["lat", "1048576", "400", "1"]
        );
        assert_eq!(
            peer_args(&measure("bw", true)),
            ["bw", "1048576", "400", "1", "rewrite"]
        );
    }

    /// The rank's command line, as run_ours builds it, parses back to a rank that rewrites.
    #[test]
    fn rank_command_line_carries_rewrite() {
        for rewrite in [false, true] {
            let mut argv = strs(&[
                "puma-bench",
                "rank",
                "--fd",
                "3",
                "--port",
                "0",
                "--job",
                "77",
                "--mode",
                "heater",
            ]);
            argv.extend(rank_args(&measure("lat", rewrite)));
            let cli = Cli::try_parse_from(argv).unwrap();
            match cli.cmd {
                Some(Cmd::Rank {
                    rewrite: r,
                    size,
                    what,
                    ..
                }) => {
                    assert_eq!(r, rewrite);
                    assert_eq!(size, 1 << 20);
                    assert_eq!(what, "lat");
                }
                _ => panic!("not a rank command"),
            }
        }
    }

    #[test]
    fn result_line_must_confirm_the_rewrite() {
        let on = measure("lat", true);
        let off = measure("lat", false);
        assert_eq!(
            parse_line("lat 1048576 123.4 rewrite\n", &on).unwrap(),
            123.4
        );
        assert_eq!(parse_line("lat 1048576 123.4\n", &off).unwrap(), 123.4);
        // A peer built before --rewrite ignores the extra argument and prints the old line.
        assert!(parse_line("lat 1048576 123.4\n", &on).is_err());
        assert!(parse_line("lat 1048576 123.4 rewrite\n", &off).is_err());
    }

    #[test]
    fn rewrite_lines_changes_one_byte_per_line() {
        let mut b = vec![7u8; 200];
        rewrite_lines(&mut b);
        for (i, x) in b.iter().enumerate() {
            assert_eq!(*x, if i % 64 == 0 { 8 } else { 7 }, "byte {i}");
        }
    }

    /// A run past its deadline is killed with everything it started, also a grandchild that left
    /// the run's process group and session (as MPICH's proxies and ranks do).
    #[test]
    fn a_run_past_its_deadline_is_killed_with_every_process_it_started() {
        let dir = std::env::temp_dir().join(format!("puma-bench-kill-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("pid");
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "setsid sleep 300 & echo $! > {}; sleep 300",
                file.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawn");
        let t = Instant::now();
        while !file.exists() || std::fs::read_to_string(&file).is_ok_and(|s| s.trim().is_empty()) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the shell never started"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let grandchild: u32 = std::fs::read_to_string(&file)
            .expect("pid file")
            .trim()
            .parse()
            .expect("a pid");
        let err = wait_bounded(child, Duration::from_millis(200)).expect_err("past the deadline");
        assert!(err.to_string().contains("killed"), "{err}");
        // Gone, or a zombie waiting for init to reap it.
        let t = Instant::now();
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat"));
            let alive = stat.is_ok_and(|s| {
                s.rfind(')')
                    .and_then(|i| s[i + 1..].split_whitespace().next())
                    .is_some_and(|state| state != "Z")
            });
            if !alive {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "process {grandchild} (another session) survived the kill"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
