//! The fixed-time-quantum sampler of the right-weight paper's Figure 2.
//!
//! Time is cut into intervals at absolute, aligned CLOCK_MONOTONIC times `t0 + i·Δ` (with `t0` a
//! multiple of Δ, shared by every sampled CPU). In each interval the sampler counts small,
//! calibrated work quanta until the clock passes the interval's end. If the thread was away for
//! longer than an interval, the intervals it missed keep a count of zero and sampling resumes in
//! the interval that contains the current time: the series stays on its absolute time base, so a
//! long interruption appears as zero-count intervals rather than shifting every later sample.

use crate::error::{NoiseError, Result};
use crate::modes::{run_pinned, Pinned, RunConfig};
use crate::sys::{self, now_ns};
use crate::units::InjectSpec;
use crate::work::{self, quantum};
use std::sync::atomic::{AtomicU64, Ordering};

/// Most intervals one run keeps per CPU (1 GiB of counts).
pub const MAX_INTERVALS: u64 = 1 << 28;

/// What to sample.
#[derive(Debug, Clone)]
pub struct FtqConfig {
    /// CPUs to sample, one sampler thread pinned to each.
    pub cpus: Vec<usize>,
    /// Interval length Δ in nanoseconds.
    pub interval_ns: u64,
    /// Total sampling time in nanoseconds (rounded down to whole intervals).
    pub duration_ns: u64,
    /// Target duration of one work quantum, nanoseconds.
    pub quantum_target_ns: u64,
    /// Optional built-in interferer on every sampled CPU.
    pub inject: Option<InjectSpec>,
    /// Optional command to run while sampling (killed if still running at the end).
    pub command: Vec<String>,
    /// Show a progress line on stderr (only if it is a terminal).
    pub progress: bool,
    /// Nice value for the sampler (and interferer) threads; negative needs root.
    pub nice: Option<i32>,
}

/// One FTQ run: counts per interval per CPU plus the metadata that makes them interpretable.
#[derive(Debug, Clone, PartialEq)]
pub struct FtqRun {
    /// Interval length Δ, nanoseconds.
    pub interval_ns: u64,
    /// Calibrated time per work quantum, nanoseconds.
    pub quantum_ns: f64,
    /// Count of a noise-free interval.
    pub nominal_count: u64,
    /// The sampled CPUs, in the order of `counts`.
    pub cpus: Vec<usize>,
    /// `counts[c][i]`: quanta completed on `cpus[c]` in interval `i` (which starts at `i·Δ`).
    pub counts: Vec<Vec<u32>>,
    /// Further `key=value` metadata (in file order), e.g. `inject`, `command_exit`.
    pub meta: Vec<(String, String)>,
}

impl FtqRun {
    /// Look up a metadata value.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.meta
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    /// Number of intervals (of the shortest CPU series).
    pub fn len(&self) -> usize {
        self.counts.iter().map(Vec::len).min().unwrap_or(0)
    }
    /// True if there are no intervals.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Estimate the count of a noise-free interval from the data: the median of the intervals that
/// reach at least 99 % of the 95th percentile (interference only ever lowers a count).
pub fn estimate_nominal(counts: &[Vec<u32>]) -> u64 {
    let mut all: Vec<u32> = counts.iter().flatten().copied().collect();
    if all.is_empty() {
        return 0;
    }
    all.sort_unstable();
    let p95 = all[((all.len() - 1) as f64 * 0.95) as usize];
    let floor = (f64::from(p95) * 0.99).floor() as u32;
    let top: Vec<u32> = all.into_iter().filter(|&c| c >= floor).collect();
    u64::from(top[top.len() / 2])
}

/// The Figure 2 loop for one CPU: intervals start at `t0 + i·interval`.
fn sample_intervals(
    t0: u64,
    interval_ns: u64,
    n: usize,
    iterations: u32,
    progress: &AtomicU64,
) -> Vec<u32> {
    let mut counts = vec![0u32; n];
    let mut seed = 1u64;
    let stop = crate::interrupt::flag();
    sys::wait_until_precise(t0);
    let mut now = now_ns();
    // If we woke late, the intervals we missed stay zero.
    let mut i = (now.saturating_sub(t0) / interval_ns) as usize;
    while i < n {
        let end = t0 + (i as u64 + 1) * interval_ns;
        let mut count = 0u32;
        while now < end {
            seed = quantum(iterations, seed);
            count += 1;
            now = now_ns();
        }
        counts[i] = count;
        // Overrun compensation: continue in the interval that contains `now`; any interval
        // skipped over was lost entirely and keeps its zero.
        i = ((now - t0) / interval_ns) as usize;
        progress.store(i as u64, Ordering::Relaxed);
        if stop.load(Ordering::Relaxed) {
            // Asked to end early: the intervals before `i` are complete (or lost, as zeros).
            counts.truncate(i);
            break;
        }
    }
    std::hint::black_box(seed);
    counts
}

/// Align `t` up to the next multiple of `interval`.
pub(crate) fn align_up(t: u64, interval: u64) -> u64 {
    t.div_ceil(interval) * interval
}

/// Run FTQ as configured: one pinned sampler per CPU, calibrated on its CPU, all starting on the
/// same aligned absolute time.
pub fn run(cfg: &FtqConfig) -> Result<FtqRun> {
    if cfg.interval_ns == 0 {
        return Err(NoiseError::bad(
            "interval",
            "0 ns",
            "must be longer than zero",
        ));
    }
    if cfg.duration_ns < cfg.interval_ns {
        return Err(NoiseError::bad(
            "duration",
            &format!("{} ns", cfg.duration_ns),
            "must cover at least one interval",
        ));
    }
    if cfg.quantum_target_ns * 10 > cfg.interval_ns {
        return Err(NoiseError::bad(
            "quantum",
            &format!("{} ns", cfg.quantum_target_ns),
            "a work quantum must be at most a tenth of the interval",
        ));
    }
    if cfg.duration_ns / cfg.interval_ns > MAX_INTERVALS {
        return Err(NoiseError::bad(
            "duration",
            &format!("{} ns", cfg.duration_ns),
            format!("more than {MAX_INTERVALS} intervals per CPU; use a longer interval or several runs"),
        ));
    }
    sys::check_cpus(&cfg.cpus)?;
    let _group = cfg.nice.map(sys::AutogroupNice::set);
    // The command starts first (a failure to start it is reported before any sampling) and
    // runs from just before the samplers' calibration until sampling ends.
    let mut child = None;
    let mut command_meta = Vec::new();
    if !cfg.command.is_empty() {
        let line = cfg.command.join(" ");
        command_meta.push(("command".to_string(), line.clone()));
        match std::process::Command::new(&cfg.command[0])
            .args(&cfg.command[1..])
            .spawn()
        {
            Ok(c) => child = Some(c),
            Err(source) => {
                return Err(NoiseError::Spawn {
                    command: line,
                    source,
                })
            }
        }
    }

    let n = (cfg.duration_ns / cfg.interval_ns) as usize;
    let run_cfg = RunConfig {
        cpus: cfg.cpus.clone(),
        duration_ns: n as u64 * cfg.interval_ns,
        inject: cfg.inject,
        progress: cfg.progress,
        nice: cfg.nice,
    };
    let (interval, target) = (cfg.interval_ns, cfg.quantum_target_ns);
    let sampled = run_pinned(
        &run_cfg,
        "ftq",
        interval,
        move || work::calibrate(target),
        move |cal: work::Calibration, t0, _t_end, progress| {
            (
                cal,
                sample_intervals(t0, interval, n, cal.iterations, progress),
            )
        },
    );

    // Stop the command before looking at the results, so that no error leaves it running.
    if let Some(mut c) = child {
        let exit = match c.try_wait() {
            Ok(Some(status)) => format!("{status}"),
            Ok(None) => {
                let _ = c.kill();
                match c.wait() {
                    Ok(status) => format!("still running at end of sampling; killed ({status})"),
                    Err(e) => format!("still running at end of sampling; kill failed: {e}"),
                }
            }
            Err(e) => format!("unknown: {e}"),
        };
        command_meta.push(("command_exit".to_string(), exit));
    }
    let Pinned {
        t0,
        out,
        inject_wakeups: burns,
    } = sampled?;
    let (cals, mut counts): (Vec<work::Calibration>, Vec<Vec<u32>>) = out.into_iter().unzip();
    // Ended early: every CPU keeps the intervals all of them completed.
    let kept = counts.iter().map(Vec::len).min().unwrap_or(0);
    let interrupted = kept < n;
    for c in &mut counts {
        c.truncate(kept);
    }

    let quantum_ns = cals.iter().map(|c| c.quantum_ns).sum::<f64>() / cals.len().max(1) as f64;
    let mut meta = vec![
        ("mode".to_string(), "ftq".to_string()),
        (
            "duration_ns".to_string(),
            (kept as u64 * cfg.interval_ns).to_string(),
        ),
        ("t0_monotonic_ns".to_string(), t0.to_string()),
        (
            "quantum_iterations".to_string(),
            crate::units::format_cpu_list(
                &cals
                    .iter()
                    .map(|c| c.iterations as usize)
                    .collect::<Vec<_>>(),
            ),
        ),
        ("kernel".to_string(), crate::format::kernel_release()),
    ];
    if let Some(spec) = cfg.inject {
        meta.push(("inject".to_string(), spec.to_string()));
        meta.push(("inject_wakeups".to_string(), burns.to_string()));
    }
    if let Some(n) = cfg.nice {
        meta.push(("nice".to_string(), n.to_string()));
    }
    if interrupted {
        meta.push((
            "interrupted".to_string(),
            format!(
                "after {kept} of {n} intervals ({} of {} ns)",
                kept as u64 * cfg.interval_ns,
                n as u64 * cfg.interval_ns
            ),
        ));
    }
    meta.extend(command_meta);
    Ok(FtqRun {
        interval_ns: cfg.interval_ns,
        quantum_ns,
        nominal_count: estimate_nominal(&counts),
        cpus: cfg.cpus.clone(),
        counts,
        meta,
    })
}
