//! `puma-noise`: measure operating-system interference and show its spectrum.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use noise::format::{self, DetourTrace};
use noise::modes::{self, RunConfig};
use noise::report;
use noise::stats::{duration_stats, human_ns};
use noise::units::{format_cpu_list, parse_cpu_list, parse_duration_ns, InjectSpec};
use noise::{ftq, NoiseError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "puma-noise",
    version,
    about = "Measure operating-system interference with FTQ (fixed time quantum on an absolute, \
             aligned time base: the right-weight paper's Figure 2) and analyse it: noise fraction, \
             detour percentiles, Hamming/Welch spectrum, cepstrum, periodic sources, SVG/HTML report.",
    after_help = "Examples:\n  puma-noise ftq --cpu 0,1 --duration 10s -o run.csv --report report/\n  \
                  puma-noise ftq --cpu 1 --duration 5s --inject 100Hz:200us\n  \
                  puma-noise ftq --cpu 1 --duration 10s -- yod --mode heater ./app\n  \
                  puma-noise analyze run.csv --report report/\n  puma-noise compare base.csv job.csv"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// CPUs to sample (e.g. `1`, `0,1`, `0-3`); one pinned sampler per CPU, common aligned start.
    #[arg(long, default_value = "0")]
    cpu: String,
    /// How long to sample (e.g. `10s`, `500ms`).
    #[arg(long, default_value = "10s")]
    duration: String,
    /// Built-in interferer pinned to each sampled CPU, FREQ:BURN: wakes at absolute times
    /// `k/FREQ` and busy-burns BURN each time (e.g. `100Hz:200us` = 2 % duty cycle).
    #[arg(long)]
    inject: Option<InjectSpec>,
    /// Nice value for the sampler threads (and the interferer), e.g. `-20` so that ordinary
    /// background processes disturb the measurement less; negative values need root.
    #[arg(long, allow_hyphen_values = true)]
    nice: Option<i32>,
    /// No progress line on stderr (it is shown only when stderr is a terminal anyway).
    #[arg(long)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fixed time quantum (the correct benchmark): count calibrated work quanta in absolute,
    /// aligned intervals; intervals missed entirely are recorded as zero.
    Ftq {
        #[command(flatten)]
        common: Common,
        /// Interval length Δ (sampling rate 1/Δ).
        #[arg(long, default_value = "1ms")]
        interval: String,
        /// Target time of one work quantum; must be small against the interval.
        #[arg(long, default_value = "1us")]
        quantum: String,
        /// Write the samples here: CSV, or the compact binary format if the name ends in `.ftq`.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Write an HTML report with SVG figures into this directory.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Command to run while sampling, after `--` (killed if still running at the end; its
        /// exit status is recorded in the output's metadata).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Fixed work quantum: time a fixed piece of work over and over (absolute time stamps kept).
    Fwq {
        #[command(flatten)]
        common: Common,
        /// Target duration of one piece of work.
        #[arg(long, default_value = "100us")]
        work: String,
        /// Write `cpu,index,start_ns,duration_ns` CSV here.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// The DEFECTIVE benchmark of the paper's Figure 1 (time a small fixed work quantum, keep only
    /// the deltas), to show how it misreports. Do not use it to judge a system.
    Fig1 {
        #[command(flatten)]
        common: Common,
        /// Target duration of the work quantum.
        #[arg(long, default_value = "1us")]
        work: String,
        /// Write `cpu,index,delta_ns` CSV here.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Selfish detour: spin on the clock and record every gap above a threshold as a detour in
    /// the `start_ns<TAB>duration_ns` trace format (read by the chama simulator).
    Detour {
        #[command(flatten)]
        common: Common,
        /// Gaps between clock reads longer than this are detours.
        #[arg(long, default_value = "1us")]
        threshold: String,
        /// Write the trace here (with several CPUs: one file per CPU, `.cpuN` before the extension).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Write an HTML report with the detour histogram into this directory (first CPU).
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Analyse a saved FTQ run (CSV or binary) or detour trace.
    Analyze {
        /// The file.
        file: PathBuf,
        /// Also write an HTML report with SVG figures into this directory.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Compare two FTQ runs (e.g. a quiet baseline against a run with a job): noise fractions
    /// and which periodic sources appear, vanish or change.
    Compare {
        /// The baseline run.
        a: PathBuf,
        /// The run to compare with it.
        b: PathBuf,
        /// Exit with status 3 if B adds more than this much noise (percent of the CPU) on any
        /// CPU, or shows a periodic source A does not have (e.g. `0.1` for the "less than 0.1 %
        /// lost work, no new peak" goal).
        #[arg(long)]
        max_added: Option<f64>,
    },
    /// Judge repeated runs against repeated baselines (run i of each mode paired with baseline
    /// i): per mode the added lost work min / median / max and the periodic sources no baseline
    /// shows. Exit status 3 when a mode's median added lost work reaches --max-added or a new
    /// source shows in at least half of its runs.
    Judge {
        /// Baseline runs, in round order (repeat the option).
        #[arg(long = "baseline", value_name = "FILE", required = true)]
        baselines: Vec<PathBuf>,
        /// A mode's runs in the same round order: NAME=FILE,FILE,... (repeat the option).
        #[arg(long = "mode", value_name = "NAME=FILES", required = true)]
        modes: Vec<String>,
        /// Largest median added lost work allowed, percent of the CPU.
        #[arg(long, default_value_t = 0.1)]
        max_added: f64,
    },
    /// Convert an FTQ run between CSV and the binary format (chosen by the output's extension).
    Convert {
        /// Input (CSV or binary).
        input: PathBuf,
        /// Output (`.ftq`/`.bin` = binary, anything else = CSV).
        output: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(NoiseError::Verdict) => ExitCode::from(3),
        Err(e @ NoiseError::Interrupted(_)) => {
            eprintln!("puma-noise: {e}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("puma-noise: {e}");
            ExitCode::FAILURE
        }
    }
}

fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

fn run_config(c: &Common) -> Result<RunConfig, NoiseError> {
    Ok(RunConfig {
        cpus: parse_cpu_list(&c.cpu)?,
        duration_ns: parse_duration_ns(&c.duration)?,
        inject: c.inject,
        progress: !c.quiet,
        nice: c.nice,
    })
}

fn write_csv(
    path: &Path,
    body: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), NoiseError> {
    format::write_atomic(path, body)
}

/// From here on SIGINT and SIGTERM end the measurement early and keep what was sampled (a second
/// signal ends the process at once, exit status 130).
fn stop_on_signals() -> Result<(), NoiseError> {
    let flag = noise::interrupt::flag();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let registered = signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())
            .and_then(|_| signal_hook::flag::register(sig, flag.clone()));
        registered
            .map_err(|e| NoiseError::Thread(format!("cannot watch for signal {sig}: {e}")))?;
    }
    Ok(())
}

/// After a run's results are written: the run ended early if a signal asked it to.
fn unless_interrupted(kept: &str) -> Result<(), NoiseError> {
    if noise::interrupt::requested() {
        return Err(NoiseError::Interrupted(format!(
            "kept {kept} taken before the signal"
        )));
    }
    Ok(())
}

/// Refuse to start a measurement whose results could not be saved afterwards.
fn check_outputs(output: Option<&Path>, report_dir: Option<&Path>) -> Result<(), NoiseError> {
    if let Some(p) = output {
        format::check_writable(p)?;
    }
    if let Some(d) = report_dir {
        format::check_report_dir(d)?;
    }
    Ok(())
}

fn run(cli: Cli) -> Result<(), NoiseError> {
    match cli.cmd {
        Cmd::Ftq {
            common,
            interval,
            quantum,
            output,
            report: report_dir,
            command,
        } => {
            let rc = run_config(&common)?;
            check_outputs(output.as_deref(), report_dir.as_deref())?;
            let cfg = ftq::FtqConfig {
                cpus: rc.cpus,
                interval_ns: parse_duration_ns(&interval)?,
                duration_ns: rc.duration_ns,
                quantum_target_ns: parse_duration_ns(&quantum)?,
                inject: rc.inject,
                command,
                progress: rc.progress,
                nice: rc.nice,
            };
            stop_on_signals()?;
            let mut run = ftq::run(&cfg)?;
            run.meta.push(("cmdline".into(), command_line()));
            let stopped = noise::interrupt::requested();
            if stopped && run.is_empty() {
                return Err(NoiseError::Interrupted(
                    "before any interval was complete; nothing written".into(),
                ));
            }
            if let Some(p) = &output {
                format::save_ftq(&run, p)?;
            }
            let kept = format!(
                "the {} intervals{}",
                run.len(),
                output
                    .as_ref()
                    .map_or(String::new(), |p| format!(" (in {})", p.display()))
            );
            let reports = match report::analyse_run(&run) {
                Ok(r) => r,
                Err(e) if stopped => {
                    return Err(NoiseError::Interrupted(format!(
                        "{kept}, too few to analyse ({e})"
                    )))
                }
                Err(e) => return Err(e),
            };
            print!("{}", report::summary_text(&run, &reports));
            if let Some(dir) = report_dir {
                let page = report::write_ftq_report(&dir, &run, &reports, &command_line())?;
                println!("\nreport: {}", page.display());
            }
            unless_interrupted(&kept)
        }
        Cmd::Fwq {
            common,
            work,
            output,
        } => {
            let rc = run_config(&common)?;
            check_outputs(output.as_deref(), None)?;
            stop_on_signals()?;
            let (cal, series) = modes::run_fwq(&rc, parse_duration_ns(&work)?)?;
            println!(
                "FWQ: work {:.1} us per sample ({} iterations)",
                cal.quantum_ns / 1e3,
                cal.iterations
            );
            for s in &series {
                let d: Vec<u64> = s.samples.iter().map(|x| x.1).collect();
                let st = duration_stats(&d);
                let min = d.iter().copied().min().unwrap_or(0);
                let total: u64 = d.iter().sum();
                let noise = if total > 0 {
                    (total - min * d.len() as u64) as f64 / total as f64
                } else {
                    0.0
                };
                println!(
                    "cpu {}: {} samples; min {}, median {}, p99 {}, p99.9 {}, max {}; noise (time-weighted) {:.3} %",
                    s.cpu,
                    st.count,
                    human_ns(min as f64),
                    human_ns(st.p50_ns as f64),
                    human_ns(st.p99_ns as f64),
                    human_ns(st.p999_ns as f64),
                    human_ns(st.max_ns as f64),
                    100.0 * noise
                );
            }
            if let Some(p) = output {
                write_csv(&p, |w| {
                    writeln!(w, "# puma-noise fwq v1")?;
                    writeln!(w, "# work_ns={:.3}", cal.quantum_ns)?;
                    writeln!(w, "# cpus={}", format_cpu_list(&rc.cpus))?;
                    writeln!(w, "# duration_ns={}", rc.duration_ns)?;
                    if noise::interrupt::requested() {
                        writeln!(w, "# interrupted=yes (ended early by a signal)")?;
                    }
                    if let Some(i) = rc.inject {
                        writeln!(w, "# inject={i}")?;
                    }
                    writeln!(w, "cpu,index,start_ns,duration_ns")?;
                    for s in &series {
                        for (i, (st, d)) in s.samples.iter().enumerate() {
                            writeln!(w, "{},{i},{st},{d}", s.cpu)?;
                        }
                    }
                    Ok(())
                })?;
            }
            unless_interrupted("the samples")
        }
        Cmd::Fig1 {
            common,
            work,
            output,
        } => {
            let rc = run_config(&common)?;
            check_outputs(output.as_deref(), None)?;
            stop_on_signals()?;
            let (cal, series) = modes::run_fig1(&rc, parse_duration_ns(&work)?)?;
            println!(
                "Figure 1 (defective) benchmark: work quantum {:.0} ns; read per sample, as its design invites:",
                cal.quantum_ns
            );
            for s in &series {
                let r = modes::read_fig1(&s.deltas)?;
                println!(
                    "cpu {}: {} samples; delta min {} median {} max {}; disturbed samples {:.4} %",
                    s.cpu,
                    r.samples,
                    human_ns(r.min_ns as f64),
                    human_ns(r.median_ns as f64),
                    human_ns(r.max_ns as f64),
                    100.0 * r.disturbed_samples
                );
                println!(
                    "  per-sample noise {:.4} %  (time-weighted from the same deltas: {:.3} %); strongest line at {}",
                    100.0 * r.per_sample_noise,
                    100.0 * r.time_weighted_noise,
                    r.apparent_freq_hz
                        .map_or("none".to_string(), |f| format!("{f:.2} Hz (sample j placed at j x median)"))
                );
            }
            if let Some(p) = output {
                write_csv(&p, |w| {
                    writeln!(w, "# puma-noise fig1 v1")?;
                    writeln!(w, "# work_ns={:.3}", cal.quantum_ns)?;
                    writeln!(w, "# cpus={}", format_cpu_list(&rc.cpus))?;
                    if noise::interrupt::requested() {
                        writeln!(w, "# interrupted=yes (ended early by a signal)")?;
                    }
                    writeln!(w, "cpu,index,delta_ns")?;
                    for s in &series {
                        for (i, d) in s.deltas.iter().enumerate() {
                            writeln!(w, "{},{i},{d}", s.cpu)?;
                        }
                    }
                    Ok(())
                })?;
            }
            unless_interrupted("the samples")
        }
        Cmd::Detour {
            common,
            threshold,
            output,
            report: report_dir,
        } => {
            let rc = run_config(&common)?;
            check_outputs(output.as_deref(), report_dir.as_deref())?;
            stop_on_signals()?;
            let traces = modes::run_detour(&rc, parse_duration_ns(&threshold)?)?;
            for t in &traces {
                println!(
                    "cpu {}: {}",
                    t.meta("cpu").unwrap_or("?"),
                    report::detour_summary(t).trim_end()
                );
            }
            if let Some(p) = output {
                for t in &traces {
                    let path = if traces.len() == 1 {
                        p.clone()
                    } else {
                        per_cpu_path(&p, t.meta("cpu").unwrap_or("x"))
                    };
                    let mut t = t.clone();
                    t.meta.push(("cmdline".into(), command_line()));
                    write_csv(&path, |w| format::write_detours(&t, w))?;
                    println!("wrote {}", path.display());
                }
            }
            if let (Some(dir), Some(t)) = (report_dir, traces.first()) {
                let page = report::write_detour_report(&dir, t, &command_line())?;
                println!("report: {}", page.display());
            }
            unless_interrupted("the detours")
        }
        Cmd::Analyze {
            file,
            report: report_dir,
        } => {
            if format::is_detour_file(&file) {
                let t: DetourTrace = format::load_detours(&file)?;
                print!("{}", report::detour_summary(&t));
                if let Some(dir) = report_dir {
                    let page = report::write_detour_report(&dir, &t, &command_line())?;
                    println!("report: {}", page.display());
                }
                return Ok(());
            }
            let run = format::load_ftq(&file)?;
            let reports = report::analyse_run(&run)?;
            print!("{}", report::summary_text(&run, &reports));
            if let Some(dir) = report_dir {
                let page = report::write_ftq_report(
                    &dir,
                    &run,
                    &reports,
                    run.meta("cmdline").unwrap_or(""),
                )?;
                println!("\nreport: {}", page.display());
            }
            Ok(())
        }
        Cmd::Compare { a, b, max_added } => {
            let (ra, rb) = (format::load_ftq(&a)?, format::load_ftq(&b)?);
            let (aa, ab) = (report::analyse_run(&ra)?, report::analyse_run(&rb)?);
            let c = report::compare(&a.display().to_string(), &aa, &b.display().to_string(), &ab);
            print!("{}", c.text);
            if let Some(limit) = max_added {
                let fail = c.added_noise * 100.0 > limit || !c.new_sources.is_empty();
                println!(
                    "\n{}: B adds {:+.4} % (limit {limit} %), {} new periodic source(s)",
                    if fail { "FAIL" } else { "PASS" },
                    100.0 * c.added_noise,
                    c.new_sources.len()
                );
                if fail {
                    return Err(NoiseError::Verdict);
                }
            }
            Ok(())
        }
        Cmd::Judge {
            baselines,
            modes,
            max_added,
        } => {
            let load = |p: &Path| -> Result<report::NamedRun, NoiseError> {
                let run = format::load_ftq(p)?;
                Ok((p.display().to_string(), report::analyse_run(&run)?))
            };
            let bases = baselines
                .iter()
                .map(|p| load(p))
                .collect::<Result<Vec<_>, _>>()?;
            let mut judged = Vec::new();
            for m in &modes {
                let (name, files) = m.split_once('=').ok_or_else(|| {
                    NoiseError::bad(
                        "mode",
                        m,
                        "expected NAME=FILE,FILE,... (e.g. heater=h1.csv,h2.csv)",
                    )
                })?;
                let runs = files
                    .split(',')
                    .filter(|f| !f.is_empty())
                    .map(|f| load(Path::new(f)))
                    .collect::<Result<Vec<_>, _>>()?;
                if runs.len() != bases.len() {
                    return Err(NoiseError::bad(
                        "mode",
                        m,
                        format!(
                            "{} runs, but {} baselines to pair them with",
                            runs.len(),
                            bases.len()
                        ),
                    ));
                }
                judged.push((name.to_string(), runs));
            }
            let j = report::judge(&bases, &judged, max_added / 100.0);
            print!("{}", j.text);
            if j.pass {
                Ok(())
            } else {
                Err(NoiseError::Verdict)
            }
        }
        Cmd::Convert { input, output } => {
            let run = format::load_ftq(&input)?;
            format::save_ftq(&run, &output)?;
            Ok(())
        }
    }
}

fn per_cpu_path(p: &Path, cpu: &str) -> PathBuf {
    let stem = p
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match p.extension() {
        Some(ext) => format!("{stem}.cpu{cpu}.{}", ext.to_string_lossy()),
        None => format!("{stem}.cpu{cpu}"),
    };
    p.with_file_name(name)
}
