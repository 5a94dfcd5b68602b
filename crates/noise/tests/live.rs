//! Live tests of the real samplers against the built-in interferer (`--inject 100Hz:200us`,
//! a 2 % duty cycle). They measure time, so their names carry `exclusive_` and nextest runs them
//! alone. To stay robust on a shared 2-core VM they run the samplers at nice -20 (which needs
//! root; without it they skip), measure the baseline in the same test and subtract it, and look
//! for the injected line only among the few strongest sources.

use noise::analysis::{dip_lost, lost_series, refine_frequency, window_lost};
use noise::format::load_ftq;
use noise::report::analyse_run;
use std::path::Path;
use std::process::Command;

const DUTY: f64 = 0.02;

/// FTQ interval of the live runs: 250 us gives 40 phase bins per 10 ms period, so that the
/// injected detour (one or two bins) is told apart by phase from a machine's own 100 Hz line
/// and from other sources' folds (the CI machine has lines at 50, 62.5, 100, 250 and 300 Hz).
const INTERVAL: &str = "250us";

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn test_cpu() -> usize {
    *noise::sys::allowed_cpus().last().unwrap_or(&0)
}

fn ftq(out: &Path, duration: &str, inject: bool) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_puma-noise"));
    cmd.args([
        "ftq",
        "--quiet",
        "--nice",
        "-20",
        "--duration",
        duration,
        "--interval",
        INTERVAL,
        "--cpu",
    ])
    .arg(test_cpu().to_string())
    .arg("-o")
    .arg(out);
    if inject {
        cmd.args(["--inject", "100Hz:200us"]);
    }
    let o = cmd.output().expect("run puma-noise");
    assert!(
        o.status.success(),
        "puma-noise failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    println!("{}", String::from_utf8_lossy(&o.stdout));
}

/// What FTQ reports for the injected source: (frequency, lost fraction net of baseline, total
/// noise fraction net of baseline, baseline noise fraction).
fn ftq_injected(dir: &Path, duration: &str) -> (f64, f64, f64, f64) {
    let (base_p, inj_p) = (dir.join("base.csv"), dir.join("inj.csv"));
    ftq(&base_p, duration, false);
    ftq(&inj_p, duration, true);
    let (base, inj) = (load_ftq(&base_p).unwrap(), load_ftq(&inj_p).unwrap());
    let (rb, ri) = (analyse_run(&base).unwrap(), analyse_run(&inj).unwrap());
    // What the tool reports nearest 100 Hz: among its ten strongest spectral lines and its
    // sources (a source folds harmonics, so on a machine with its own 50 Hz
    // line the injection can be filed under 50 Hz; a raw line can be the 200 Hz harmonic),
    // refined by folding.
    let fs = 1e9 / inj.interval_ns as f64;
    let a = &ri[0].analysis;
    println!(
        "sources reported: {:?}",
        &a.sources[..a.sources.len().min(3)]
    );
    let peak = a
        .peaks
        .iter()
        .take(10)
        .map(|p| p.freq)
        .chain(a.sources.iter().map(|s| s.freq))
        .min_by(|x, y| (x - 100.0).abs().total_cmp(&(y - 100.0).abs()))
        .unwrap_or_else(|| panic!("no spectral line at all; sources {:?}", a.sources));
    let inj_series = lost_series(&inj.counts[0], inj.nominal_count);
    let f = refine_frequency(&inj_series, fs, peak, a.spectrum.resolution());
    // The injected detour is the strongest at that period; the same phase window of the quiet
    // run holds what the machine itself had there (usually nothing: its own lines at that
    // period sit at other phases).
    let dip = dip_lost(&inj_series, fs, f);
    let base_series = lost_series(&base.counts[0], base.nominal_count);
    let already = window_lost(&base_series, fs, f, dip.first_bin, dip.len);
    println!(
        "injected detour: bins {}..+{} of {}, {:.3} % lost there; the quiet run had {:.3} % there",
        dip.first_bin,
        dip.len,
        dip.bins,
        100.0 * dip.lost,
        100.0 * already
    );
    let lost = dip.lost - already;
    (
        f,
        lost,
        ri[0].analysis.noise_fraction - rb[0].analysis.noise_fraction,
        rb[0].analysis.noise_fraction,
    )
}

/// Whether a lost-work fraction measured for the injection is the injection: at most 20 % less
/// (FTQ must not miss work that was taken), and up to 30 % more. Each detour costs the sampler
/// the 200 us burn plus the switch to the interferer and back, which on this virtual machine adds
/// 20-55 us a time (CI read 2.31 / 2.55 / 2.40 % for the three pairs of one run, 240-255 us per
/// 10 ms period, all in the detour's two phase bins and none in the quiet run's).
fn within_injection(lost: f64) -> bool {
    (0.8 * DUTY..=1.3 * DUTY).contains(&lost)
}

#[test]
fn exclusive_ftq_finds_injected_100hz_at_2_percent() {
    if !is_root() {
        println!("SKIP: needs root for --nice -20 (keeps background load off the sampled CPU)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Three baseline/injected pairs; the lost work is their median, so that a change of
    // background load during one pair (a shared, virtualised machine whose own noise is
    // several per cent) cannot decide the result alone.
    let pairs: Vec<(f64, f64, f64, f64)> = (0..3).map(|_| ftq_injected(dir.path(), "5s")).collect();
    for (i, (fi, lost_i, _, _)) in pairs.iter().enumerate() {
        println!("pair {}: {fi:.3} Hz, {:.3} %", i + 1, 100.0 * lost_i);
        assert!(
            (fi - 100.0).abs() / 100.0 < 0.02,
            "pair {}: frequency {fi}",
            i + 1
        );
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let f = pairs.iter().map(|p| p.0).sum::<f64>() / pairs.len() as f64;
    let lost = median(pairs.iter().map(|p| p.1).collect());
    let total = median(pairs.iter().map(|p| p.2).collect());
    let base = pairs.iter().map(|p| p.3).fold(0.0, f64::max);
    println!(
        "injected 100 Hz x 200 us (2 %): FTQ reports {f:.3} Hz, {:.3} % lost to it (net of baseline); total noise {:+.3} % over a baseline of {:.3} %",
        100.0 * lost,
        100.0 * total,
        100.0 * base
    );
    assert!((f - 100.0).abs() / 100.0 < 0.02, "frequency {f}");
    assert!(
        within_injection(lost),
        "lost fraction {lost}, injected {DUTY}"
    );
    if base < 0.005 {
        // A quiet CPU: the whole-run noise fraction must show the injection too.
        assert!(within_injection(total), "total noise difference {total}");
    } else {
        println!(
            "note: baseline noise {:.2} % too high to check the whole-run difference",
            100.0 * base
        );
    }
}

#[test]
fn exclusive_figure1_benchmark_misreports_what_ftq_gets_right() {
    if !is_root() {
        println!("SKIP: needs root for --nice -20 (keeps background load off the sampled CPU)");
        return;
    }
    let fig1_run = |inject: bool| {
        let cfg = noise::modes::RunConfig {
            cpus: vec![test_cpu()],
            duration_ns: 4_000_000_000,
            inject: inject.then(|| "100Hz:200us".parse().unwrap()),
            progress: false,
            nice: Some(-20),
        };
        let (_, series) = noise::modes::run_fig1(&cfg, 1000).unwrap();
        noise::modes::read_fig1(&series[0].deltas).unwrap()
    };
    let fig1_base = fig1_run(false);
    let fig1 = fig1_run(true);
    let fig1_added = fig1.per_sample_noise - fig1_base.per_sample_noise;
    let dir = tempfile::tempdir().unwrap();
    // FTQ's reading is the median of three baseline/injected pairs, as in the test above: one
    // run alone read 2.69 % for the 2 % injection once in CI (a burst of the VM's own noise in
    // the detour's phase), which says nothing about Figure 1 against FTQ.
    let pairs: Vec<(f64, f64)> = (0..3)
        .map(|_| {
            let (f, lost, _, _) = ftq_injected(dir.path(), "5s");
            (f, lost)
        })
        .collect();
    let mut losts: Vec<f64> = pairs.iter().map(|p| p.1).collect();
    losts.sort_by(f64::total_cmp);
    let lost = losts[1];
    let f = pairs.iter().map(|p| p.0).sum::<f64>() / pairs.len() as f64;
    println!("under --inject 100Hz:200us (2 % duty cycle):");
    println!(
        "  Figure 1: {} samples, {:.4} % disturbed, per-sample noise {:.4} %, line at {:?} Hz",
        fig1.samples,
        100.0 * fig1.disturbed_samples,
        100.0 * fig1.per_sample_noise,
        fig1.apparent_freq_hz
    );
    println!(
        "  Figure 1 without injection: per-sample noise {:.4} %, so the injection added {:+.4} %",
        100.0 * fig1_base.per_sample_noise,
        100.0 * fig1_added
    );
    println!(
        "  FTQ:      {f:.3} Hz, {:.3} % lost to it (median of {:.3?} %)",
        100.0 * lost,
        losts.iter().map(|l| 100.0 * l).collect::<Vec<_>>()
    );
    // FTQ is right...
    for (fi, _) in &pairs {
        assert!((fi - 100.0).abs() / 100.0 < 0.02, "frequency {fi}");
    }
    assert!(within_injection(lost), "lost {lost}, injected {DUTY}");
    // ...while Figure 1's per-sample reading makes the 2 % interference all but vanish.
    assert!(
        fig1_added < DUTY / 4.0,
        "Figure 1 saw the injection add {fig1_added} (base {}, injected {})",
        fig1_base.per_sample_noise,
        fig1.per_sample_noise
    );
    // Its sample-numbered spectrum is printed above for the record but not asserted on: where
    // (or whether) the line shows depends on how much the gaps between samples stretch time.
}
