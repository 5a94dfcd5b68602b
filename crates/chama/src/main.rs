//! `chama`: simulate what operating-system noise costs a message-passing application.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};

use chama::analysis::{analyse_with, classes_csv, ranks_csv, summary};
use chama::error::{ChamaError, MemoryError, SpecError};
use chama::gen::{
    estimate_ops, generate, generate_threads, generate_with, GenParams, Pattern, Progress,
};
use chama::goal::{parse_goal_file, write_goal};
use chama::noise::{parse_latency, parse_noise_source, parse_ns, Noise, NoiseSource};
use chama::schedule::{Schedule, MAX_OPS};
use chama::sim::{simulate, simulate_from_template, Params, SimOptions, PARALLEL_SIM_OPS};
use chama::states::States;
use chama::stream::{simulate_ring_segmented, simulate_ring_segmented_with_progress, StreamOutput};
use chama::svg::{line_plot, Series};
use chama::trace::{read_trace, trace_to_schedule};

/// Trace-driven OS-noise simulator over the LogGOPS model.
///
/// Reads GOAL schedules (as LogGOPSim does), traces recorded by our runtime, or builds collective
/// and stencil schedules itself; adds measured or synthetic noise; reports completion time,
/// slowdown against the noise-free run, per-rank wait, the critical path and which operation
/// classes absorbed or amplified the noise.
#[derive(Parser)]
#[command(name = "chama", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Simulate one schedule with and without noise and report.
    Run(RunArgs),
    /// Write a built-in pattern as GOAL text.
    Gen(GenCmd),
    /// Convert a runtime trace (chama-trace v1) into GOAL text.
    Convert(ConvertArgs),
    /// Slowdown against scale or noise amplitude, co-scheduled vs uncoordinated; SVG plot.
    Sweep(SweepArgs),
    /// Performance benchmark: events/s, 1M-rank broadcast from GOAL text, 1M-rank all-reduce
    /// with measured noise; peak memory from VmHWM.
    Bench(BenchArgs),
}

#[derive(Args, Clone)]
struct GenOpts {
    /// Number of ranks.
    #[arg(long, default_value_t = 16)]
    ranks: u32,
    /// Collective message / vector size in bytes.
    #[arg(long, default_value_t = 8)]
    bytes: u64,
    /// Reduction compute in picoseconds per byte (0: reductions cost nothing, no calc ops).
    #[arg(long, default_value_t = 0)]
    reduce_ps_per_byte: u64,
    /// Stencil iterations.
    #[arg(long, default_value_t = 10)]
    iterations: u32,
    /// Stencil compute per iteration (e.g. 100us).
    #[arg(long, default_value = "100us")]
    compute: String,
    /// Stencil bytes per halo face.
    #[arg(long, default_value_t = 4096)]
    halo_bytes: u64,
    /// Stencil: an 8-byte all-reduce every N iterations (0: never).
    #[arg(long, default_value_t = 5)]
    allreduce_every: u32,
}

impl GenOpts {
    fn params(&self, ranks: u32) -> Result<GenParams, SpecError> {
        Ok(GenParams {
            ranks,
            bytes: self.bytes,
            reduce_ps_per_byte: self.reduce_ps_per_byte,
            iterations: self.iterations,
            compute_ns: parse_ns(&self.compute)?,
            halo_bytes: self.halo_bytes,
            allreduce_every: self.allreduce_every,
        })
    }
}

#[derive(Args, Clone)]
struct InputArgs {
    /// GOAL schedule file (LogGOPSim's text format), parsed streaming.
    #[arg(long, group = "input")]
    goal: Option<String>,
    /// Runtime trace (chama-trace v1, see TRACE_FORMAT.md).
    #[arg(long, group = "input")]
    trace: Option<String>,
    /// Built-in pattern.
    #[arg(long, value_enum, group = "input")]
    gen: Option<Pattern>,
    #[command(flatten)]
    g: GenOpts,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// L: latency (ns).
    #[arg(short = 'L', long = "latency", default_value_t = 2500)]
    l: u64,
    /// o: CPU overhead per message (ns).
    #[arg(short = 'o', long = "overhead", default_value_t = 1500)]
    o: u64,
    /// g: NIC gap per message (ns).
    #[arg(short = 'g', long = "gap", default_value_t = 1000)]
    g: u64,
    /// G: gap per byte (ns, fractional allowed).
    #[arg(short = 'G', long = "gap-per-byte", default_value_t = 6.0)]
    big_g: f64,
    /// O: CPU overhead per byte (ns, fractional allowed).
    #[arg(short = 'O', long = "overhead-per-byte", default_value_t = 0.0)]
    big_o: f64,
    /// S: rendezvous threshold (bytes); larger messages use rendezvous.
    #[arg(short = 'S', long = "rendezvous", default_value_t = 65535)]
    s: u64,
}

impl ModelArgs {
    fn params(&self) -> Result<Params, SpecError> {
        for (n, v) in [("G", self.big_g), ("O", self.big_o)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(SpecError(format!("{n} must be a non-negative number")));
            }
        }
        Ok(Params {
            l: self.l,
            o: self.o,
            g: self.g,
            big_g_ps: (self.big_g * 1000.0).round() as u64,
            big_o_ps: (self.big_o * 1000.0).round() as u64,
            s: self.s,
        })
    }
}

#[derive(Args, Clone)]
struct NoiseArgs {
    /// Noise: none | periodic:interval=1ms,detour=25us | poisson:interval=1ms,detour=25us |
    /// gaussian:interval=1ms,mean=25us,sd=5us | detours:FILE[,scale=X] | ftq:FILE[,cpu=N][,scale=X]
    #[arg(long, default_value = "none")]
    noise: String,
    /// Co-scheduled noise: every rank has the same detours at the same time (default: each rank
    /// has its own random phase / stream).
    #[arg(long)]
    coscheduled: bool,
    /// Message latency fluctuation: none | exp:mean=200ns | uniform:max=1us | gauss:mean=..,sd=..
    #[arg(long, default_value = "none")]
    latency_noise: String,
    /// Seed for phases and random noise streams.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl NoiseArgs {
    fn build(&self) -> Result<(Noise, String), ChamaError> {
        let source = parse_noise_source(&self.noise)?;
        let latency = parse_latency(&self.latency_noise)?;
        let desc = format!(
            "{}{}{}",
            self.noise,
            if self.coscheduled {
                " (co-scheduled)"
            } else {
                " (uncoordinated)"
            },
            if self.latency_noise != "none" {
                format!(", latency {}", self.latency_noise)
            } else {
                String::new()
            }
        );
        Ok((
            Noise {
                source,
                coscheduled: self.coscheduled,
                latency,
                seed: self.seed,
            },
            desc,
        ))
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    input: InputArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    noise: NoiseArgs,
    /// Write the full report as JSON ("-" for stdout).
    #[arg(long)]
    json: Option<String>,
    /// Write the per-class table as CSV.
    #[arg(long)]
    csv: Option<String>,
    /// Write per-rank completion and wait times as CSV.
    #[arg(long)]
    ranks_csv: Option<String>,
    /// Critical-path steps to list in the JSON report.
    #[arg(long, default_value_t = 20)]
    path_limit: usize,
    /// One simulation only (no noise-free baseline, no analysis); prints a one-line JSON with
    /// timings, events and peak memory. Used by `chama bench`.
    #[arg(long)]
    single: bool,
    /// Do not print the summary.
    #[arg(long, short)]
    quiet: bool,
    /// Threads per simulation (default: the cores available, at most 2). With 2, a run of
    /// 4 Mi operations or more is split into two halves of the ranks simulated side by side
    /// (same results as 1). 1: one thread per run (the noise-free and the noisy run still go
    /// side by side).
    #[arg(long)]
    threads: Option<usize>,
    /// Simulate a ring all-reduce (`--gen allreduce-ring`) a few steps at a time with bounded
    /// memory, exactly as the whole ring would run (automatic when the ring does not fit one
    /// schedule, e.g. 65,536 ranks). Reports completion, slowdown, per-rank wait and per-class
    /// noise; no critical path.
    #[arg(long)]
    segmented: bool,
    /// Operations per segment of a segmented run.
    #[arg(long, default_value_t = 1 << 20)]
    segment_ops: u64,
    /// Segmented run: report progress on stderr every N seconds (0: never).
    #[arg(long, default_value_t = 0)]
    progress: u64,
}

#[derive(Args)]
struct GenCmd {
    /// Pattern.
    #[arg(value_enum)]
    pattern: Pattern,
    #[command(flatten)]
    g: GenOpts,
    /// Output GOAL file ("-" for stdout).
    #[arg(long, short = 'o', default_value = "-")]
    out: String,
}

#[derive(Args)]
struct ConvertArgs {
    /// Trace file (chama-trace v1).
    trace: String,
    /// Output GOAL file ("-" for stdout).
    #[arg(long, short = 'o', default_value = "-")]
    out: String,
}

#[derive(Args)]
struct SweepArgs {
    /// Pattern to sweep.
    #[arg(long, value_enum)]
    gen: Pattern,
    /// Rank counts (comma-separated).
    #[arg(long, default_value = "16,64,256,1024,4096")]
    ranks_list: String,
    /// Noise amplitude factors applied to detour lengths (comma-separated).
    #[arg(long, default_value = "1")]
    amplitudes: String,
    #[command(flatten)]
    g: GenOpts,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    noise: NoiseArgs,
    /// SVG plot output.
    #[arg(long, default_value = "sweep.svg")]
    svg: String,
    /// CSV output.
    #[arg(long)]
    csv: Option<String>,
    /// JSON output.
    #[arg(long)]
    json: Option<String>,
}

#[derive(Args)]
struct BenchArgs {
    /// Ranks for the broadcast and all-reduce runs.
    #[arg(long, default_value_t = 1 << 20)]
    ranks: u32,
    /// Repeats per measurement (min/median/max reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Measured noise file for the all-reduce (`detours:FILE` or `ftq:FILE` spec). Default: a
    /// detour trace synthesised from a Poisson process and read back through the measured path.
    #[arg(long)]
    noise: Option<String>,
    /// Directory for temporary files.
    #[arg(long, default_value = "/tmp")]
    tmp: String,
    /// Skip the million-rank all-reduce.
    #[arg(long)]
    skip_allreduce: bool,
    /// Repeats of the (long) all-reduce measurement.
    #[arg(long, default_value_t = 1)]
    allreduce_repeats: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => cmd_run(a),
        Cmd::Gen(a) => cmd_gen(a),
        Cmd::Convert(a) => cmd_convert(a),
        Cmd::Sweep(a) => cmd_sweep(a),
        Cmd::Bench(a) => cmd_bench(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chama: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Before a run that may take minutes and gigabytes: check that every output named can be
/// written (not a directory, its directory exists and takes a new file), so the run never ends
/// in "cannot write" with its result lost. "-" (stdout) always passes.
fn check_outputs<'a>(paths: impl IntoIterator<Item = Option<&'a str>>) -> Result<(), ChamaError> {
    for path in paths.into_iter().flatten().filter(|p| *p != "-") {
        outfile::check_writable(Path::new(path)).map_err(|e| ChamaError::Output {
            path: path.to_string(),
            source: e,
        })?;
    }
    Ok(())
}

/// Write `path` whole or not at all (a regular file; a device such as `/dev/null` or a FIFO is
/// written in place, see the `outfile` crate), or stdout for "-".
fn write_out(
    path: &str,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), ChamaError> {
    let err = |e| ChamaError::Output {
        path: path.to_string(),
        source: e,
    };
    if path == "-" {
        let out = std::io::stdout();
        let mut lock = std::io::BufWriter::new(out.lock());
        fill(&mut lock).map_err(err)?;
        return lock.flush().map_err(err);
    }
    outfile::write(Path::new(path), outfile::Durability::Rename, fill).map_err(err)
}

fn load(input: &InputArgs) -> Result<(Schedule, String), ChamaError> {
    if let Some(f) = &input.goal {
        return Ok((parse_goal_file(f)?, format!("GOAL {f}")));
    }
    if let Some(f) = &input.trace {
        let t = read_trace(f)?;
        return Ok((trace_to_schedule(&t, f)?, format!("trace {f}")));
    }
    let pat = input.gen.ok_or_else(|| {
        SpecError("give an input: --goal FILE, --trace FILE or --gen PATTERN".into())
    })?;
    let gp = input.g.params(input.g.ranks)?;
    Ok((generate(pat, &gp)?, generated_input(pat, &gp)))
}

/// The state template of the run that goes first (see [`analyse_with`]), written as the
/// generator goes (beside it, see [`generate_with`]).
/// It starts as `t`, a mapping (see [`States::mapped`]) whose pages are populated in bulk as
/// it grows; the error says so if the kernel cannot provide them.
fn template(p: &Progress, mut t: States) -> Result<States, MemoryError> {
    loop {
        let (n, done) = p.ops();
        let grow = n > t.len();
        t.grow(n)?;
        if done {
            return Ok(t);
        }
        if !grow {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }
}

/// How the report names a generated schedule.
fn generated_input(pat: Pattern, gp: &GenParams) -> String {
    format!("{} on {} ranks", pat.name(), gp.ranks)
}

/// CPU time consumed by the calling thread (ns), from /proc/thread-self/schedstat; immune to
/// other processes competing for the cores.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// CPU time (user + system) of the whole process including finished threads, in seconds, from
/// /proc/self/stat (USER_HZ = 100 on Linux).
fn process_cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / 100.0)
}

/// Peak resident set (VmHWM) in KiB, if /proc is there.
fn vm_hwm_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn cmd_run(a: RunArgs) -> Result<(), ChamaError> {
    check_outputs([a.json.as_deref(), a.csv.as_deref(), a.ranks_csv.as_deref()])?;
    if a.input.gen == Some(Pattern::AllreduceRing)
        && a.input.goal.is_none()
        && a.input.trace.is_none()
    {
        let gp = a.input.g.params(a.input.g.ranks)?;
        if a.segmented || estimate_ops(Pattern::AllreduceRing, &gp) > MAX_OPS as u64 {
            return cmd_run_segmented(a, gp);
        }
    } else if a.segmented {
        return Err(SpecError("--segmented applies to --gen allreduce-ring only".into()).into());
    }
    let t0 = Instant::now();
    let c0 = thread_cpu_ns().unwrap_or(0);
    let pc0 = process_cpu_seconds().unwrap_or(0.0);
    let params = a.model.params()?;
    let (noise, desc) = a.noise.build()?;
    // A generated schedule's size is known before its dependency lists are built: write the
    // noisy run's state template on the second core meanwhile.
    let overlap =
        (a.single || !noise.is_quiet()) && a.input.goal.is_none() && a.input.trace.is_none();
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(2)));
    if threads == 0 {
        return Err(SpecError("--threads must be at least 1".into()).into());
    }
    let (s, input, template) = match a.input.gen {
        Some(pat) => {
            let gp = a.input.g.params(a.input.g.ranks)?;
            // A schedule big enough for two threads is laid out half by half for them, whatever
            // `--threads` says, so that the operation indices (which key the latency noise
            // and name the critical path's steps) do not depend on it.
            let halves = estimate_ops(pat, &gp) >= PARALLEL_SIM_OPS as u64;
            if overlap {
                // Room for the estimate, asked for before the generator starts, so that a
                // machine without the address space says so at once (pages are populated as
                // the template grows).
                let ops = usize::try_from(estimate_ops(pat, &gp)).unwrap_or(MAX_OPS);
                let room = States::mapped(ops.min(MAX_OPS))?;
                let (s, t) = generate_with(pat, &gp, halves, threads, |p| template(p, room))?;
                (s, generated_input(pat, &gp), Some(t?))
            } else {
                (
                    generate_threads(pat, &gp, halves, threads)?,
                    generated_input(pat, &gp),
                    None,
                )
            }
        }
        _ => {
            let (s, input) = load(&a.input)?;
            (s, input, None)
        }
    };
    let t_load = t0.elapsed().as_secs_f64();
    let c1 = thread_cpu_ns().unwrap_or(0);
    let pc1 = process_cpu_seconds().unwrap_or(0.0);
    if a.single {
        // Only the analysis of two runs has a use for them.
        s.release_spare();
        let t1 = Instant::now();
        let opts = SimOptions {
            threads,
            ..SimOptions::default()
        };
        let out = match template {
            Some(t) => simulate_from_template(&s, &params, &noise, &opts, t),
            None => simulate(&s, &params, &noise, &opts),
        };
        let t_sim = t1.elapsed().as_secs_f64();
        let c2 = thread_cpu_ns().unwrap_or(0);
        let pc2 = process_cpu_seconds().unwrap_or(0.0);
        let j = serde_json::json!({
            "input": input,
            "noise": desc,
            "ranks": s.num_ranks,
            "ops": s.len(),
            "completion_ns": out.completion,
            "events": out.events,
            "unfinished_ops": out.unfinished(),
            "load_seconds": t_load,
            "sim_seconds": t_sim,
            "total_seconds": t0.elapsed().as_secs_f64(),
            "events_per_second": out.events as f64 / t_sim.max(1e-9),
            "load_cpu_seconds": (c1 - c0) as f64 / 1e9,
            // All threads (a large GOAL file is parsed on two); 10 ms resolution.
            "load_process_cpu_seconds": pc1 - pc0,
            "sim_cpu_seconds": (c2 - c1) as f64 / 1e9,
            // All threads (two simulate a large schedule); 10 ms resolution.
            "sim_process_cpu_seconds": pc2 - pc1,
            "events_per_cpu_second": out.events as f64 / ((c2 - c1) as f64 / 1e9).max(1e-9),
            "vm_hwm_kib": vm_hwm_kib(),
        });
        println!("{j}");
        if out.unfinished() > 0 {
            return Err(ChamaError::Incomplete(format!(
                "{} operations never completed ({} receives unmatched)",
                out.unfinished(),
                out.unmatched_recvs
            )));
        }
        return Ok(());
    }
    let per_rank = a.ranks_csv.is_some();
    let (mut r, runs) = analyse_with(
        &s,
        &params,
        &noise,
        &input,
        &desc,
        a.path_limit,
        per_rank,
        template,
        threads,
    );
    r.peak_memory_kib = vm_hwm_kib().unwrap_or(0);
    r.cpu_seconds = process_cpu_seconds().unwrap_or(0.0);
    if !a.quiet {
        print!("{}", summary(&r));
        println!(
            "load: {t_load:.3} s  process CPU: {:.2} s  wall: {:.3} s  peak memory: {} KiB",
            r.cpu_seconds,
            t0.elapsed().as_secs_f64(),
            r.peak_memory_kib
        );
    }
    if let Some(j) = &a.json {
        write_out(j, |w| {
            serde_json::to_writer_pretty(&mut *w, &r).map_err(std::io::Error::other)?;
            writeln!(w)
        })?;
    }
    if let Some(c) = &a.csv {
        write_out(c, |w| w.write_all(classes_csv(&r).as_bytes()))?;
    }
    if let Some(c) = &a.ranks_csv {
        write_out(c, |w| w.write_all(ranks_csv(&r).as_bytes()))?;
    }
    // The process ends next: leave the schedule and the runs' arrays (gigabytes for a large
    // run) to the kernel, which takes the whole address space down at exit, instead of freeing
    // them piece by piece first.
    std::mem::forget(runs);
    std::mem::forget(s);
    if r.unfinished_ops > 0 {
        return Err(ChamaError::Incomplete(format!(
            "{} operations never completed: {} receives unmatched, {} messages never received (deadlock or missing partner)",
            r.unfinished_ops, r.unmatched_recvs, r.unmatched_sends
        )));
    }
    Ok(())
}

/// `chama run` on a ring all-reduce too large for one schedule: see [`chama::stream`].
fn cmd_run_segmented(a: RunArgs, gp: GenParams) -> Result<(), ChamaError> {
    if a.csv.is_some() {
        return Err(SpecError(
            "a segmented run keeps no per-operation state: no per-class CSV (use --json)".into(),
        )
        .into());
    }
    let t0 = Instant::now();
    let params = a.model.params()?;
    let (noise, desc) = a.noise.build()?;
    let opts = SimOptions {
        record_busy: true,
        ..SimOptions::default()
    };
    let seg = a.segment_ops.max(1);
    let run = |n: &Noise| simulate_ring_segmented(&gp, &params, n, &opts, seg);
    let every = a.progress;
    let mut last = Instant::now();
    let mut report = |o: &StreamOutput, done: u64, total: u64| {
        if every > 0 && (last.elapsed().as_secs() >= every || done == total) {
            last = Instant::now();
            eprintln!(
                "ring {} ranks: {done}/{total} steps ({:.2} %), {} events, {} ops, {} unfinished, {} unmatched receives, {:.0} s wall, {:.0} s CPU, {} KiB peak",
                gp.ranks,
                100.0 * done as f64 / total as f64,
                o.events,
                o.ops,
                o.unfinished(),
                o.unmatched_recvs,
                t0.elapsed().as_secs_f64(),
                process_cpu_seconds().unwrap_or(0.0),
                vm_hwm_kib().unwrap_or(0)
            );
        }
    };
    let run_noisy = |r: &mut dyn FnMut(&StreamOutput, u64, u64)| {
        simulate_ring_segmented_with_progress(&gp, &params, &noise, &opts, seg, r)
    };
    let (clean, noisy) = if a.single {
        (None, run_noisy(&mut report))
    } else {
        std::thread::scope(|sc| {
            let h = sc.spawn(|| run(&Noise::none()));
            let n = run_noisy(&mut report);
            let c = h.join().unwrap_or_else(|_| run(&Noise::none()));
            (Some(c), n)
        })
    };
    let clean = clean.transpose()?;
    let noisy = noisy?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds().unwrap_or(0.0);
    let wait: Vec<u64> = noisy
        .rank_end
        .iter()
        .zip(&noisy.rank_busy)
        .map(|(&e, &b)| e.saturating_sub(b))
        .collect();
    let wmax = wait.iter().copied().max().unwrap_or(0);
    let wmean = wait.iter().sum::<u64>() as f64 / wait.len().max(1) as f64;
    let events = noisy.events + clean.as_ref().map_or(0, |c| c.events);
    let j = serde_json::json!({
        "input": format!("allreduce-ring on {} ranks (segmented)", gp.ranks),
        "noise": desc,
        "ranks": gp.ranks,
        "ops": noisy.ops,
        "segments": noisy.segments,
        "steps_per_segment": noisy.steps_per_segment,
        "max_segment_ops": noisy.max_segment_ops,
        "events": noisy.events,
        "completion_ns": noisy.completion,
        "clean_completion_ns": clean.as_ref().map(|c| c.completion),
        "slowdown": clean.as_ref().map(|c| noisy.completion as f64 / c.completion.max(1) as f64),
        "unfinished_ops": noisy.unfinished(),
        "unmatched_recvs": noisy.unmatched_recvs,
        "unmatched_sends": noisy.unmatched_sends,
        "clean_unfinished_ops": clean.as_ref().map(|c| c.unfinished()),
        "rank_wait_max_ns": wmax,
        "rank_wait_mean_ns": wmean,
        "allreduce_noise_ns": noisy.class_noise.get(1).copied().unwrap_or(0),
        "allreduce_recv_wait_ns": noisy.class_wait.get(1).copied().unwrap_or(0),
        "wall_seconds": wall,
        "process_cpu_seconds": cpu,
        "events_all_runs": events,
        "events_per_cpu_second": events as f64 / cpu.max(1e-9),
        "vm_hwm_kib": vm_hwm_kib(),
    });
    if !a.quiet {
        println!("{j}");
    }
    if let Some(f) = &a.json {
        write_out(f, |w| {
            serde_json::to_writer_pretty(&mut *w, &j).map_err(std::io::Error::other)?;
            writeln!(w)
        })?;
    }
    if let Some(f) = &a.ranks_csv {
        write_out(f, |w| {
            writeln!(w, "rank,completion_ns,wait_ns")?;
            for (r, (e, wt)) in noisy.rank_end.iter().zip(&wait).enumerate() {
                writeln!(w, "{r},{e},{wt}")?;
            }
            Ok(())
        })?;
    }
    let bad = noisy.unfinished() + clean.as_ref().map_or(0, |c| c.unfinished());
    if bad > 0 {
        return Err(ChamaError::Incomplete(format!(
            "{bad} operations never completed: {} receives unmatched, {} messages never received",
            noisy.unmatched_recvs, noisy.unmatched_sends
        )));
    }
    Ok(())
}

fn cmd_gen(a: GenCmd) -> Result<(), ChamaError> {
    check_outputs([Some(a.out.as_str())])?;
    let gp = a.g.params(a.g.ranks)?;
    let s = generate(a.pattern, &gp)?;
    write_out(&a.out, |w| write_goal(&s, w))
}

fn cmd_convert(a: ConvertArgs) -> Result<(), ChamaError> {
    check_outputs([Some(a.out.as_str())])?;
    let t = read_trace(&a.trace)?;
    let s = trace_to_schedule(&t, &a.trace)?;
    write_out(&a.out, |w| write_goal(&s, w))
}

fn parse_list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>, SpecError> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            x.trim()
                .parse()
                .map_err(|_| SpecError(format!("bad {what} `{x}`")))
        })
        .collect()
}

#[derive(serde::Serialize)]
struct SweepPoint {
    ranks: u32,
    amplitude: f64,
    coscheduled: bool,
    baseline_ns: u64,
    completion_ns: u64,
    slowdown: f64,
}

fn cmd_sweep(a: SweepArgs) -> Result<(), ChamaError> {
    check_outputs([Some(a.svg.as_str()), a.csv.as_deref(), a.json.as_deref()])?;
    let ranks: Vec<u32> = parse_list(&a.ranks_list, "rank count")?;
    let amps: Vec<f64> = parse_list(&a.amplitudes, "amplitude")?;
    if ranks.is_empty() || amps.is_empty() || amps.iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
        return Err(
            SpecError("need at least one rank count and non-negative amplitudes".into()).into(),
        );
    }
    let params = a.model.params()?;
    let (base_noise, desc) = a.noise.build()?;
    if matches!(base_noise.source, NoiseSource::None)
        && matches!(base_noise.latency, chama::noise::LatencyNoise::None)
    {
        return Err(SpecError("a sweep needs --noise (or --latency-noise)".into()).into());
    }
    let mut points = Vec::new();
    for &p in &ranks {
        let gp = a.g.params(p)?;
        let s = generate(a.gen, &gp)?;
        let clean = simulate(&s, &params, &Noise::none(), &SimOptions::default());
        if clean.unfinished() > 0 {
            return Err(ChamaError::Incomplete(format!(
                "{} at {p} ranks did not complete",
                a.gen.name()
            )));
        }
        for &amp in &amps {
            for cos in [false, true] {
                let noise = Noise {
                    source: base_noise.source.scaled(amp),
                    coscheduled: cos,
                    latency: base_noise.latency,
                    seed: base_noise.seed,
                };
                let out = simulate(&s, &params, &noise, &SimOptions::default());
                let pt = SweepPoint {
                    ranks: p,
                    amplitude: amp,
                    coscheduled: cos,
                    baseline_ns: clean.completion,
                    completion_ns: out.completion,
                    slowdown: out.completion as f64 / clean.completion.max(1) as f64,
                };
                println!(
                    "ranks {:>8}  amplitude {:>6}  {:<13}  noise-free {:>12} ns  noisy {:>12} ns  slowdown {:.4}",
                    p,
                    amp,
                    if cos { "co-scheduled" } else { "uncoordinated" },
                    pt.baseline_ns,
                    pt.completion_ns,
                    pt.slowdown
                );
                points.push(pt);
            }
        }
    }
    let by_ranks = ranks.len() > 1;
    let mut series = Vec::new();
    for cos in [false, true] {
        let label = if cos { "co-scheduled" } else { "uncoordinated" };
        if by_ranks {
            for &amp in &amps {
                series.push(Series {
                    name: if amps.len() > 1 {
                        format!("{label} x{amp}")
                    } else {
                        label.to_string()
                    },
                    points: points
                        .iter()
                        .filter(|p| p.coscheduled == cos && p.amplitude == amp)
                        .map(|p| (p.ranks as f64, p.slowdown))
                        .collect(),
                });
            }
        } else {
            series.push(Series {
                name: label.to_string(),
                points: points
                    .iter()
                    .filter(|p| p.coscheduled == cos)
                    .map(|p| (p.amplitude, p.slowdown))
                    .collect(),
            });
        }
    }
    let title = format!("{}: {}", a.gen.name(), desc.replace(" (uncoordinated)", ""));
    let svg = if by_ranks {
        line_plot(&title, "ranks", "slowdown", &series, true)
    } else {
        line_plot(
            &title,
            "noise amplitude (x detour length)",
            "slowdown",
            &series,
            false,
        )
    };
    write_out(&a.svg, |w| w.write_all(svg.as_bytes()))?;
    if let Some(c) = &a.csv {
        let mut t =
            String::from("ranks,amplitude,coscheduled,baseline_ns,completion_ns,slowdown\n");
        for p in &points {
            t += &format!(
                "{},{},{},{},{},{}\n",
                p.ranks, p.amplitude, p.coscheduled, p.baseline_ns, p.completion_ns, p.slowdown
            );
        }
        write_out(c, |w| w.write_all(t.as_bytes()))?;
    }
    if let Some(j) = &a.json {
        write_out(j, |w| {
            serde_json::to_writer_pretty(&mut *w, &points).map_err(std::io::Error::other)?;
            writeln!(w)
        })?;
    }
    eprintln!("plot written to {}", a.svg);
    Ok(())
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// Run `chama run ... --single` in a child process so its peak memory is its own.
fn child(args: &[String]) -> Result<(f64, serde_json::Value), ChamaError> {
    let exe = std::env::current_exe()
        .map_err(|e| ChamaError::Child(format!("cannot find own executable: {e}")))?;
    let t = Instant::now();
    let out = std::process::Command::new(exe)
        .arg("run")
        .args(args)
        .arg("--single")
        .output()
        .map_err(|e| ChamaError::Child(format!("cannot start child: {e}")))?;
    let wall = t.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(ChamaError::Child(format!(
            "child `chama run {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| ChamaError::Child(format!("child printed no JSON: {e}")))?;
    Ok((wall, v))
}

fn cmd_bench(a: BenchArgs) -> Result<(), ChamaError> {
    if a.repeats == 0 || a.allreduce_repeats == 0 {
        return Err(
            SpecError("--repeats and --allreduce-repeats must be at least 1".into()).into(),
        );
    }
    let reps = a.repeats;
    println!(
        "chama bench: {} ranks, {} repeats (min / median / max)",
        a.ranks, reps
    );
    println!("anchor (issue 7, LogGOPSim on this machine, not run here): 1,048,576-rank binomial broadcast,");
    println!("  3.15 M events, 6.4 s simulation, 673 MB, after a 54 s txt2bin conversion; 0.5-1.9 M events/s\n");

    // 1. Engine throughput on an in-memory schedule.
    let gp = GenParams {
        ranks: a.ranks,
        ..GenParams::default()
    };
    let s = generate(Pattern::AllreduceRd, &gp)?;
    let params = Params::default();
    let mut eps = Vec::new();
    let mut eps_cpu = Vec::new();
    let mut events = 0;
    for _ in 0..reps {
        let t = Instant::now();
        let c = thread_cpu_ns().unwrap_or(0);
        let out = simulate(&s, &params, &Noise::none(), &SimOptions::default());
        let dc = thread_cpu_ns().unwrap_or(0).saturating_sub(c) as f64 / 1e9;
        let dt = t.elapsed().as_secs_f64();
        events = out.events;
        eps.push(out.events as f64 / dt / 1e6);
        eps_cpu.push(out.events as f64 / dc.max(1e-9) / 1e6);
    }
    drop(s);
    let (lo, med, hi) = stats(&mut eps);
    let (clo, cmed, chi) = stats(&mut eps_cpu);
    println!(
        "[1] engine, recursive-doubling all-reduce, {} ranks, {} events (goal >= 10 M events/s on one core):",
        a.ranks, events
    );
    println!("    per CPU second of this thread: {clo:.1} / {cmed:.1} / {chi:.1} M events/s");
    println!("    per wall second:               {lo:.1} / {med:.1} / {hi:.1} M events/s");

    // 2. Broadcast from GOAL text, end to end, in a child process.
    let goal = format!("{}/chama-bench-bcast-{}.goal", a.tmp, a.ranks);
    let t = Instant::now();
    let s = generate(
        Pattern::Bcast,
        &GenParams {
            ranks: a.ranks,
            bytes: 1,
            ..GenParams::default()
        },
    )?;
    write_out(&goal, |w| write_goal(&s, w))?;
    drop(s);
    let size = std::fs::metadata(&goal).map(|m| m.len()).unwrap_or(0);
    println!(
        "\n[2] binomial broadcast GOAL text written: {goal} ({:.1} MB, {:.2} s, not timed below)",
        size as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let (mut wall, mut mem, mut evs, mut parse) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut cpu = Vec::new();
    let mut ev_count = 0u64;
    for _ in 0..reps {
        let (w, v) = child(&["--goal".into(), goal.clone(), "-q".into()])?;
        wall.push(w);
        mem.push(v["vm_hwm_kib"].as_f64().unwrap_or(0.0) / 1024.0);
        evs.push(v["events_per_second"].as_f64().unwrap_or(0.0) / 1e6);
        parse.push(v["load_seconds"].as_f64().unwrap_or(0.0));
        cpu.push(
            v["load_process_cpu_seconds"].as_f64().unwrap_or(0.0)
                + v["sim_cpu_seconds"].as_f64().unwrap_or(0.0),
        );
        ev_count = v["events"].as_u64().unwrap_or(0);
    }
    let _ = std::fs::remove_file(&goal);
    let (a1, b1, c1) = stats(&mut wall);
    let (a2, b2, c2) = stats(&mut mem);
    let (a3, b3, c3) = stats(&mut evs);
    let (a4, b4, c4) = stats(&mut parse);
    let (a5, b5, c5) = stats(&mut cpu);
    println!("    end to end (process start, parse, simulate, exit): {a1:.3} / {b1:.3} / {c1:.3} s (goal < 1 s; anchor 54 s + 6.4 s)");
    println!("    of which GOAL parse (two threads): {a4:.3} / {b4:.3} / {c4:.3} s");
    println!("    CPU time of parse + simulation: {a5:.3} / {b5:.3} / {c5:.3} s (wall exceeds it when other processes share the cores)");
    println!(
        "    peak memory (VmHWM): {a2:.1} / {b2:.1} / {c2:.1} MiB (goal < 200 MB; anchor 673 MB)"
    );
    println!("    simulation: {ev_count} events, {a3:.1} / {b3:.1} / {c3:.1} M events/s (anchor 0.5-1.9)");
    println!(
        "    ratio vs anchor (median, end to end): {:.0}x faster",
        (54.0 + 6.4) / b1
    );

    // 3. Million-rank all-reduce with measured noise (noise-free baseline + noisy run).
    if !a.skip_allreduce {
        let spec = match &a.noise {
            Some(s) => s.clone(),
            None => {
                let f = format!("{}/chama-bench-detours.txt", a.tmp);
                synth_detour_file(&f)?;
                println!("\n[3] no --noise given: synthesised a detour trace {f} (Poisson, 1 ms mean gap, 2-50 us detours)");
                format!("detours:{f}")
            }
        };
        let mut wall = Vec::new();
        let mut mem = Vec::new();
        let mut slow = 0.0;
        let mut cpu = Vec::new();
        for _ in 0..a.allreduce_repeats {
            let exe = std::env::current_exe().map_err(|e| ChamaError::Child(e.to_string()))?;
            let t = Instant::now();
            let out = std::process::Command::new(exe)
                .args([
                    "run",
                    "--gen",
                    "allreduce-rd",
                    "--ranks",
                    &a.ranks.to_string(),
                    "--noise",
                    &spec,
                    "--json",
                    "-",
                    "-q",
                ])
                .output()
                .map_err(|e| ChamaError::Child(e.to_string()))?;
            wall.push(t.elapsed().as_secs_f64());
            if !out.status.success() {
                return Err(ChamaError::Child(
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                ));
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                .map_err(|e| ChamaError::Child(format!("bad JSON from child: {e}")))?;
            slow = v["slowdown"].as_f64().unwrap_or(0.0);
            mem.push(v["peak_memory_kib"].as_f64().unwrap_or(0.0) / 1024.0);
            cpu.push(v["cpu_seconds"].as_f64().unwrap_or(0.0));
        }
        let (a1, b1, c1) = stats(&mut wall);
        println!(
            "[3] recursive-doubling all-reduce, {} ranks, noise {spec}, noise-free + noisy run + analysis:",
            a.ranks
        );
        let (a3, b3, c3) = stats(&mut cpu);
        println!(
            "    end to end: {a1:.2} / {b1:.2} / {c1:.2} s wall (goal < 10 s); slowdown {slow:.4}"
        );
        println!("    CPU time: {a3:.2} / {b3:.2} / {c3:.2} s");
        if mem.iter().any(|&m| m > 0.0) {
            let (a2, b2, c2) = stats(&mut mem);
            println!("    peak memory: {a2:.0} / {b2:.0} / {c2:.0} MiB");
        }
    }
    Ok(())
}

/// A detour trace in puma-noise's format from a seeded Poisson process (1 s of "measurement").
fn synth_detour_file(path: &str) -> Result<(), ChamaError> {
    let mut t = 0u64;
    let mut k = 0u64;
    let mut lines = String::from(
        "# puma-noise detour v1\n# source=chama bench synthetic\n# duration_ns=1000000000\n",
    );
    loop {
        let u = (chama::noise::mix(k) >> 11) as f64 / (1u64 << 53) as f64;
        t += (-(u.max(1e-12)).ln() * 1e6) as u64 + 1;
        if t >= 1_000_000_000 {
            break;
        }
        let d = 2_000 + chama::noise::mix(k ^ 0xdead) % 48_000;
        lines += &format!("{t}\t{d}\n");
        t += d;
        k += 1;
    }
    write_out(path, |w| w.write_all(lines.as_bytes()))
}
