//! The other samplers, for comparison with FTQ: fixed work quantum (FWQ), the defective
//! benchmark of the paper's Figure 1, and selfish detour. All run one pinned thread per CPU with
//! a common, aligned absolute start, and can run the built-in interferer alongside.

use crate::error::{NoiseError, Result};
use crate::format::DetourTrace;
use crate::ftq::align_up;
use crate::inject::run_interferer;
use crate::progress::Progress;
use crate::sys::{self, now_ns};
use crate::units::InjectSpec;
use crate::work::{self, quantum};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

/// Common settings of a timed, pinned run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// CPUs, one sampler thread pinned to each.
    pub cpus: Vec<usize>,
    /// Sampling time, ns.
    pub duration_ns: u64,
    /// Optional interferer on each CPU.
    pub inject: Option<InjectSpec>,
    /// Progress line on stderr if it is a terminal.
    pub progress: bool,
    /// Nice value for sampler and interferer threads; negative needs root.
    pub nice: Option<i32>,
}

/// What [`run_pinned`] returns: the common start, one result per CPU, and how many times the
/// interferers (if any) woke up.
pub(crate) struct Pinned<T> {
    pub t0: u64,
    pub out: Vec<T>,
    pub inject_wakeups: u64,
}

/// Run `body(prepared, t0, t_end, progress)` on a thread pinned to each CPU after `prepare()` has
/// run on it there; all bodies start at the same absolute time `t0`, a multiple of `align_ns`.
/// Every sampler of this crate (FTQ, FWQ, Figure 1, selfish detour) runs through here.
pub(crate) fn run_pinned<P, T>(
    cfg: &RunConfig,
    label: &'static str,
    align_ns: u64,
    prepare: impl Fn() -> P + Send + Sync + 'static,
    body: impl Fn(P, u64, u64, &AtomicU64) -> T + Send + Sync + 'static,
) -> Result<Pinned<T>>
where
    P: Send + 'static,
    T: Send + 'static,
{
    if cfg.duration_ns == 0 {
        // Zero samples would read as a perfectly quiet machine.
        return Err(NoiseError::bad(
            "duration",
            "0 ns",
            "must be longer than zero",
        ));
    }
    sys::check_cpus(&cfg.cpus)?;
    let _group = cfg.nice.map(sys::AutogroupNice::set);
    let n = cfg.cpus.len();
    let barrier = Arc::new(Barrier::new(n + 1));
    let start = Arc::new(AtomicU64::new(0));
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let prepare = Arc::new(prepare);
    let body = Arc::new(body);
    let duration = cfg.duration_ns;
    let nice = cfg.nice;
    let mut handles = Vec::new();
    for (slot, &cpu) in cfg.cpus.iter().enumerate() {
        let (barrier, start, progress) = (barrier.clone(), start.clone(), progress.clone());
        let (prepare, body) = (prepare.clone(), body.clone());
        handles.push(
            std::thread::Builder::new()
                .name(format!("{label}-cpu{cpu}"))
                .spawn(move || -> Result<T> {
                    let pinned = sys::pin_to(cpu).and_then(|()| match nice {
                        Some(n) => sys::set_thread_nice(n),
                        None => Ok(()),
                    });
                    let p = prepare();
                    barrier.wait();
                    barrier.wait();
                    pinned?;
                    let t0 = start.load(Ordering::Acquire);
                    sys::wait_until_precise(t0);
                    Ok(body(p, t0, t0 + duration, &progress[slot]))
                })
                .map_err(|e| NoiseError::Thread(e.to_string()))?,
        );
    }
    barrier.wait();
    let t0 = align_up(now_ns() + 20_000_000, align_ns.max(1));
    let t_end = t0 + duration;
    start.store(t0, Ordering::Release);
    barrier.wait();
    let mut injectors = Vec::new();
    if let Some(spec) = cfg.inject {
        for &cpu in &cfg.cpus {
            injectors.push(
                std::thread::Builder::new()
                    .name(format!("inject-cpu{cpu}"))
                    .spawn(move || run_interferer(cpu, spec, nice, t0, t_end))
                    .map_err(|e| NoiseError::Thread(e.to_string()))?,
            );
        }
    }
    let _away = sys::OffSampledCpus::enter(&cfg.cpus);
    let mut bar = Progress::new(cfg.progress, label, t0, t_end);
    while bar.active() && handles.iter().any(|h| !h.is_finished()) {
        bar.update(now_ns());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bar.finish();
    let mut out = Vec::new();
    for h in handles {
        out.push(
            h.join()
                .map_err(|_| NoiseError::Thread(format!("{label} sampler panicked")))??,
        );
    }
    let mut inject_wakeups = 0;
    for h in injectors {
        inject_wakeups += h
            .join()
            .map_err(|_| NoiseError::Thread("interferer panicked".into()))??;
    }
    Ok(Pinned {
        t0,
        out,
        inject_wakeups,
    })
}

/// Most samples FWQ and Figure 1 keep per CPU; sampling stops early when they are full.
pub const MAX_SAMPLES: usize = 1 << 26;

fn sample_capacity(duration_ns: u64, work_ns: u64) -> Result<usize> {
    if work_ns < 100 {
        return Err(NoiseError::bad(
            "work",
            &format!("{work_ns} ns"),
            "a piece of work must be at least 100 ns (longer than a clock read)",
        ));
    }
    Ok(((duration_ns / work_ns) as usize + 16).min(MAX_SAMPLES))
}

/// One CPU's fixed-work samples: `(start_ns since t0, duration_ns)`.
#[derive(Debug, Clone, PartialEq)]
pub struct FwqSeries {
    /// The CPU.
    pub cpu: usize,
    /// Samples.
    pub samples: Vec<(u64, u64)>,
}

/// Fixed work quantum: repeat a calibrated piece of work of about `work_ns`, recording when each
/// started and how long it took (absolute time stamps, so the time base is kept).
pub fn run_fwq(cfg: &RunConfig, work_ns: u64) -> Result<(work::Calibration, Vec<FwqSeries>)> {
    let cap = sample_capacity(cfg.duration_ns, work_ns)?;
    let Pinned { out, .. } = run_pinned(
        cfg,
        "fwq",
        1_000_000,
        move || work::calibrate(work_ns),
        move |cal: work::Calibration, t0, t_end, progress| {
            let mut v = Vec::with_capacity(cap);
            let mut seed = 1;
            let stop = crate::interrupt::flag();
            let mut s = now_ns();
            while s < t_end && v.len() < cap && !stop.load(Ordering::Relaxed) {
                seed = quantum(cal.iterations, seed);
                let e = now_ns();
                v.push((s - t0, e - s));
                s = e;
                progress.store(s, Ordering::Relaxed);
            }
            std::hint::black_box(seed);
            (cal, v)
        },
    )?;
    let cal = out.first().map(|o| o.0).unwrap_or(work::Calibration {
        iterations: 0,
        quantum_ns: 0.0,
    });
    Ok((
        cal,
        out.into_iter()
            .zip(&cfg.cpus)
            .map(|((_, samples), &cpu)| FwqSeries { cpu, samples })
            .collect(),
    ))
}

/// One CPU's samples of the defective benchmark: only the deltas, as Figure 1 stores them.
#[derive(Debug, Clone, PartialEq)]
pub struct Fig1Series {
    /// The CPU.
    pub cpu: usize,
    /// `end − start` of each sample, ns, in sample order (no time stamps).
    pub deltas: Vec<u32>,
}

/// The paper's Figure 1: `start = clock; small work quantum; end = clock; store end − start`,
/// repeated. The time base is relative (sample number, not time) and the start of each sample
/// is wherever the previous one ended. Kept to show how it misreports.
pub fn run_fig1(cfg: &RunConfig, work_ns: u64) -> Result<(work::Calibration, Vec<Fig1Series>)> {
    let cap = sample_capacity(cfg.duration_ns, work_ns)?;
    let Pinned { out, .. } = run_pinned(
        cfg,
        "fig1",
        1_000_000,
        move || work::calibrate(work_ns),
        move |cal: work::Calibration, _t0, t_end, progress| {
            let mut v: Vec<u32> = Vec::with_capacity(cap);
            let mut seed = 1;
            let stop = crate::interrupt::flag();
            loop {
                let start = now_ns();
                seed = quantum(cal.iterations, seed);
                let end = now_ns();
                v.push((end - start).min(u64::from(u32::MAX)) as u32);
                if end >= t_end || v.len() >= cap || stop.load(Ordering::Relaxed) {
                    break;
                }
                if v.len() % 4096 == 0 {
                    progress.store(end, Ordering::Relaxed);
                }
            }
            std::hint::black_box(seed);
            (cal, v)
        },
    )?;
    let cal = out.first().map(|o| o.0).unwrap_or(work::Calibration {
        iterations: 0,
        quantum_ns: 0.0,
    });
    Ok((
        cal,
        out.into_iter()
            .zip(&cfg.cpus)
            .map(|((_, deltas), &cpu)| Fig1Series { cpu, deltas })
            .collect(),
    ))
}

/// Most detours kept per CPU (8 MiB each); later ones are counted but not stored.
pub const MAX_DETOURS: usize = 1 << 19;

/// What one detour sampler hands back: its loop's undisturbed cost, the detours, how many did not
/// fit, how many clock reads it made, and how long it sampled (ns from `t0`).
type SamplerOut = (u64, Vec<(u64, u64)>, u64, u64, u64);

/// Selfish detour: read the clock in a tight loop; every gap between consecutive reads longer
/// than `threshold_ns` is a detour `(start since t0, duration)`. Returns one trace per CPU.
pub fn run_detour(cfg: &RunConfig, threshold_ns: u64) -> Result<Vec<DetourTrace>> {
    let Pinned { t0, out, .. } = run_pinned(
        cfg,
        "detour",
        1_000_000,
        || {
            // The loop's own undisturbed cost, for the metadata.
            let mut best = u64::MAX;
            for _ in 0..10_000 {
                let a = now_ns();
                let b = now_ns();
                best = best.min(b - a);
            }
            best
        },
        move |loop_ns: u64, t0, t_end, progress| {
            let mut v: Vec<(u64, u64)> = Vec::with_capacity(MAX_DETOURS);
            let mut dropped = 0u64;
            let mut prev = now_ns();
            let mut reads = 0u64;
            let stop = crate::interrupt::flag();
            while prev < t_end && !stop.load(Ordering::Relaxed) {
                let t = now_ns();
                reads += 1;
                if t - prev > threshold_ns {
                    if v.len() < MAX_DETOURS {
                        v.push((prev.saturating_sub(t0), t - prev));
                    } else {
                        dropped += 1;
                    }
                    progress.store(t, Ordering::Relaxed);
                }
                prev = t;
            }
            (loop_ns, v, dropped, reads, prev.saturating_sub(t0))
        },
    )?;
    let interrupted = crate::interrupt::requested();
    let trace = |(sample, &cpu): (SamplerOut, &usize)| {
        let (loop_ns, detours, dropped, reads, ran) = sample;
        // Ended early: the time actually sampled, which the noise fraction divides by.
        let stopped = interrupted && ran < cfg.duration_ns;
        let sampled = if stopped { ran } else { cfg.duration_ns };
        DetourTrace {
            detours,
            meta: vec![
                ("cpu".into(), cpu.to_string()),
                ("duration_ns".into(), sampled.to_string()),
                ("threshold_ns".into(), threshold_ns.to_string()),
                ("loop_ns".into(), loop_ns.to_string()),
                ("clock_reads".into(), reads.to_string()),
                ("dropped".into(), dropped.to_string()),
                ("t0_monotonic_ns".into(), t0.to_string()),
                ("kernel".into(), crate::format::kernel_release()),
            ]
            .into_iter()
            .chain(cfg.inject.map(|s| ("inject".to_string(), s.to_string())))
            .chain(stopped.then(|| {
                (
                    "interrupted".to_string(),
                    format!("after {ran} of {} ns", cfg.duration_ns),
                )
            }))
            .collect(),
        }
    };
    Ok(out.into_iter().zip(&cfg.cpus).map(trace).collect())
}

/// What the Figure 1 data says when read the way its design invites (one number per sample,
/// samples as the time axis), next to what the same deltas say when weighted by time.
#[derive(Debug, Clone)]
pub struct Fig1Reading {
    /// Samples taken.
    pub samples: usize,
    /// Shortest delta (the undisturbed cost of one sample), ns.
    pub min_ns: u64,
    /// Median delta, ns (the spacing a sample-indexed plot assumes).
    pub median_ns: u64,
    /// Largest delta, ns.
    pub max_ns: u64,
    /// Share of samples slower than 1.5 × the median.
    pub disturbed_samples: f64,
    /// Per-sample noise: the mean over samples of each sample's slowdown `1 − median/delta`,
    /// counting only visibly disturbed samples (`delta > 1.5 × median`; the rest is clock and
    /// pipeline jitter). This is what averaging a per-sample plot shows.
    pub per_sample_noise: f64,
    /// Time-weighted noise of the same deltas, `Σ max(0, delta − median) / Σ delta` (still blind
    /// to the unmeasured time between samples, which Figure 1 never sees).
    pub time_weighted_noise: f64,
    /// Frequency of the strongest spectral line when sample `j` is placed at `j × median`.
    pub apparent_freq_hz: Option<f64>,
}

/// Read Figure 1 deltas.
pub fn read_fig1(deltas: &[u32]) -> Result<Fig1Reading> {
    if deltas.len() < 64 {
        return Err(NoiseError::TooShort(format!(
            "{} Figure 1 samples; need at least 64",
            deltas.len()
        )));
    }
    let mut sorted: Vec<u64> = deltas.iter().map(|&d| u64::from(d)).collect();
    sorted.sort_unstable();
    let min = sorted[0].max(1);
    let median = sorted[sorted.len() / 2].max(1);
    let max = *sorted.last().unwrap_or(&min);
    let n = deltas.len() as f64;
    let med = median as f64;
    let lost: Vec<f64> = deltas
        .iter()
        .map(|&d| (1.0 - med / f64::from(d.max(1))).max(0.0))
        .collect();
    let disturbed = |d: u32| f64::from(d) > 1.5 * med;
    let per_sample_noise = deltas
        .iter()
        .zip(&lost)
        .filter(|(&d, _)| disturbed(d))
        .map(|(_, l)| l)
        .sum::<f64>()
        / n;
    let total: f64 = deltas.iter().map(|&d| f64::from(d)).sum();
    let excess: f64 = deltas.iter().map(|&d| (f64::from(d) - med).max(0.0)).sum();
    let time_weighted_noise = excess / total;
    let disturbed_samples = deltas.iter().filter(|&&d| disturbed(d)).count() as f64 / n;
    let fs = 1e9 / median as f64;
    let spec = crate::analysis::welch(&lost, fs, 1 << 20)?;
    let apparent_freq_hz = crate::analysis::spectral_peaks(&spec)
        .iter()
        .filter(|p| p.freq > 2.0 * spec.resolution())
        .max_by(|a, b| a.amplitude.total_cmp(&b.amplitude))
        .map(|p| p.freq);
    Ok(Fig1Reading {
        samples: deltas.len(),
        min_ns: min,
        median_ns: median,
        max_ns: max,
        disturbed_samples,
        per_sample_noise,
        time_weighted_noise,
        apparent_freq_hz,
    })
}
