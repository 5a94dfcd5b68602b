//! The analysis recovers known periodic interference from synthetic FTQ series.

use noise::analysis::{analyse_counts, noise_fraction, synth_counts, PulseTrain};

const INTERVAL: u64 = 1_000_000; // 1 ms
const NOMINAL: u64 = 1000;

/// Deterministic xorshift noise so the tests are repeatable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Add the ±1 quantum jitter of real interval edges.
fn jitter(counts: &mut [u32], rng: &mut Rng) {
    for c in counts.iter_mut() {
        *c = (*c + rng.below(3) as u32).saturating_sub(1);
    }
}

fn circular_diff(a: f64, b: f64, period: f64) -> f64 {
    let d = (a - b).rem_euclid(period);
    d.min(period - d)
}

#[test]
fn pulse_trains_recovered_frequency_lost_work_width_phase() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for &(freq, width_us, phase_us) in &[
        (50.0, 300.0, 3700.0),
        (33.3, 500.0, 12_000.0),
        (123.4, 150.0, 250.0),
        (7.25, 2500.0, 90_000.0),
    ] {
        let train = PulseTrain {
            freq_hz: freq,
            width_ns: width_us * 1e3,
            phase_ns: phase_us * 1e3,
        };
        let mut counts = synth_counts(30_000, INTERVAL, NOMINAL, &[train]);
        jitter(&mut counts, &mut rng);
        let a = analyse_counts(&counts, NOMINAL, INTERVAL).unwrap();
        let duty = width_us * 1e-6 * freq;
        assert!(
            (a.noise_fraction - duty).abs() / duty < 0.05,
            "{freq} Hz: noise {} vs duty {duty}",
            a.noise_fraction
        );
        let s = &a.sources[0];
        assert!(
            (s.freq - freq).abs() / freq < 0.01,
            "{freq} Hz: got {}",
            s.freq
        );
        assert!(
            (s.lost_fraction - duty).abs() / duty < 0.05,
            "{freq} Hz: periodic lost {} vs {duty}",
            s.lost_fraction
        );
        assert!((s.width - width_us * 1e-6).abs() / (width_us * 1e-6) < 0.05);
        let centre = (phase_us + width_us / 2.0) * 1e-6;
        let period = 1.0 / freq;
        assert!(
            circular_diff(s.phase, centre.rem_euclid(period), period) <= 1.5e-3,
            "{freq} Hz: phase {} vs {}",
            s.phase,
            centre.rem_euclid(period)
        );
        // Nothing else of consequence is reported.
        let others: f64 = a.sources[1..].iter().map(|s| s.lost_fraction).sum();
        assert!(
            others < 0.1 * duty,
            "{freq} Hz: spurious sources {:?}",
            &a.sources[1..]
        );
    }
}

#[test]
fn harmonics_are_grouped_under_the_cepstral_fundamental() {
    // A narrow 50 Hz train has lines at 50, 100, ..., 500 Hz of nearly equal height: the
    // spectrum alone cannot say which is the source; the cepstrum peaks at 20 ms.
    let train = PulseTrain {
        freq_hz: 50.0,
        width_ns: 200e3,
        phase_ns: 1e6,
    };
    let counts = synth_counts(20_000, INTERVAL, NOMINAL, &[train]);
    let a = analyse_counts(&counts, NOMINAL, INTERVAL).unwrap();
    assert!(
        a.peaks.len() >= 5,
        "expected a comb of harmonics, got {:?}",
        a.peaks
    );
    let (q, _) = a.cepstral_peaks[0];
    assert!((q - 0.020).abs() <= 0.001, "top cepstral peak at {q} s");
    assert_eq!(
        a.sources.len(),
        1,
        "harmonics reported as sources: {:?}",
        a.sources
    );
    let s = &a.sources[0];
    assert!((s.freq - 50.0).abs() < 0.5);
    assert!(s.cepstrum_confirmed);
    assert!(s.harmonics.len() >= 5 && s.harmonics.contains(&1) && s.harmonics.contains(&3));
}

#[test]
fn weak_fundamental_found_by_cepstrum() {
    // Two detours per 25 ms period, at 0 and 10 ms: the waveform repeats at 40 Hz, but its
    // 40 Hz line is weaker than its 80, 120 and 200 Hz lines (|1 + e^(-2πi·n·0.4)|).
    let trains = [
        PulseTrain {
            freq_hz: 40.0,
            width_ns: 300e3,
            phase_ns: 0.0,
        },
        PulseTrain {
            freq_hz: 40.0,
            width_ns: 300e3,
            phase_ns: 10e6,
        },
    ];
    let counts = synth_counts(20_000, INTERVAL, NOMINAL, &trains);
    let a = analyse_counts(&counts, NOMINAL, INTERVAL).unwrap();
    let strongest = a.peaks[0].freq;
    assert!(
        (strongest - 40.0).abs() > 5.0,
        "40 Hz line should not be the strongest"
    );
    assert!(
        a.cepstral_peaks
            .iter()
            .take(3)
            .any(|(q, _)| (q - 0.025).abs() <= 0.001),
        "cepstrum {:?}",
        &a.cepstral_peaks[..3.min(a.cepstral_peaks.len())]
    );
    assert_eq!(a.sources.len(), 1, "{:?}", a.sources);
    let s = &a.sources[0];
    assert!(
        (s.freq - 40.0).abs() < 0.4,
        "fundamental {} ({:?})",
        s.freq,
        a.sources
    );
    let duty = 600.0e-6 * 40.0;
    assert!(
        (s.lost_fraction - duty).abs() / duty < 0.05,
        "{} vs {duty}",
        s.lost_fraction
    );
}

#[test]
fn weak_source_on_a_harmonic_of_a_strong_one_is_separated() {
    // 100 Hz × 200 us (2 %) plus 50 Hz × 60 us (0.3 %): one 50 Hz-periodic waveform, but two
    // sources; the strong one is reported at its own frequency, not at the weak one's. (Folding
    // at 100 Hz cannot tell the 50 Hz detours from every-other-period 100 Hz ones, so the lost
    // work of the pair is checked as a whole.)
    let trains = [
        PulseTrain {
            freq_hz: 100.0,
            width_ns: 200e3,
            phase_ns: 3.3e6,
        },
        PulseTrain {
            freq_hz: 50.0,
            width_ns: 60e3,
            phase_ns: 7.1e6,
        },
    ];
    let counts = synth_counts(20_000, INTERVAL, NOMINAL, &trains);
    let a = analyse_counts(&counts, NOMINAL, INTERVAL).unwrap();
    assert!((a.sources[0].freq - 100.0).abs() < 1.0, "{:?}", a.sources);
    let pair: f64 = a.sources.iter().take(2).map(|s| s.lost_fraction).sum();
    assert!((pair - 0.023).abs() / 0.023 < 0.05, "{:?}", a.sources);
    assert!(a.sources[0].lost_fraction >= 0.02 * 0.95, "{:?}", a.sources);
}

#[test]
fn two_independent_sources_are_told_apart() {
    let trains = [
        PulseTrain {
            freq_hz: 40.0,
            width_ns: 400e3,
            phase_ns: 2e6,
        },
        PulseTrain {
            freq_hz: 70.7,
            width_ns: 150e3,
            phase_ns: 5e6,
        },
    ];
    let counts = synth_counts(30_000, INTERVAL, NOMINAL, &trains);
    let a = analyse_counts(&counts, NOMINAL, INTERVAL).unwrap();
    assert!(a.sources.len() >= 2, "{:?}", a.sources);
    let mut found: Vec<f64> = a.sources[..2].iter().map(|s| s.freq).collect();
    found.sort_by(f64::total_cmp);
    assert!((found[0] - 40.0).abs() / 40.0 < 0.01, "{found:?}");
    assert!((found[1] - 70.7).abs() / 70.7 < 0.01, "{found:?}");
    for s in &a.sources[..2] {
        let duty = if s.freq < 50.0 {
            400e-6 * 40.0
        } else {
            150e-6 * 70.7
        };
        assert!((s.lost_fraction - duty).abs() / duty < 0.05, "{s:?}");
    }
    let minor: f64 = a.sources[2..].iter().map(|s| s.lost_fraction).sum();
    assert!(minor < 0.002, "spurious: {:?}", &a.sources[2..]);
}

#[test]
fn white_noise_gives_no_false_peak() {
    for seed in 1..=5u64 {
        let mut rng = Rng(seed * 0x2545_f491_4f6c_dd1d);
        // Random lost work in every interval: 0-5 % of the interval, independent.
        let counts: Vec<u32> = (0..30_000)
            .map(|_| (NOMINAL - rng.below(51)) as u32)
            .collect();
        let a = analyse_counts(&counts, NOMINAL, INTERVAL).unwrap();
        assert!(a.peaks.is_empty(), "seed {seed}: false peaks {:?}", a.peaks);
        assert!(
            a.sources.is_empty(),
            "seed {seed}: false sources {:?}",
            a.sources
        );
        assert!((noise_fraction(&counts, NOMINAL) - 0.025).abs() < 0.001);
    }
}

#[test]
fn too_short_series_is_an_error_not_a_panic() {
    assert!(analyse_counts(&[1000; 5], NOMINAL, INTERVAL).is_err());
}

/// Two detours with the same period but different phases (an injected 100 Hz × 200 µs source on
/// a machine with its own, weaker 100 Hz line) plus a 62.5 Hz source: `dip_lost` measures the
/// strongest one alone, and `window_lost` over its window in a run without it sees only what
/// falls there by chance.
#[test]
fn dip_lost_tells_two_same_period_detours_apart_by_phase() {
    use noise::analysis::{dip_lost, lost_series, window_lost};
    let interval = 250_000; // 250 us: 40 phase bins at 100 Hz
    let nominal = 250;
    let injected = PulseTrain {
        freq_hz: 100.0,
        width_ns: 200_000.0,
        phase_ns: 9_900_000.0,
    };
    let native = PulseTrain {
        freq_hz: 100.0,
        width_ns: 100_000.0,
        phase_ns: 4_300_000.0,
    };
    let other = PulseTrain {
        freq_hz: 62.5,
        width_ns: 300_000.0,
        phase_ns: 1_000_000.0,
    };
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let fs = 1e9 / interval as f64;
    let mut with = synth_counts(20_000, interval, nominal, &[injected, native, other]);
    jitter(&mut with, &mut rng);
    let dip = dip_lost(&lost_series(&with, nominal), fs, 100.0);
    assert_eq!(dip.bins, 40);
    assert!(
        (dip.lost - 0.02).abs() / 0.02 < 0.05,
        "injected dip measured {} (window {:?})",
        dip.lost,
        dip
    );
    assert!(dip.len <= 3, "window too wide: {dip:?}");
    let mut without = synth_counts(20_000, interval, nominal, &[native, other]);
    jitter(&mut without, &mut rng);
    let there = window_lost(
        &lost_series(&without, nominal),
        fs,
        100.0,
        dip.first_bin,
        dip.len,
    );
    assert!(there.abs() < 0.001, "baseline window carries {there}");
    // The weaker same-period detour is the strongest once the injected one is gone.
    let native_dip = dip_lost(&lost_series(&without, nominal), fs, 100.0);
    assert!(
        (native_dip.lost - 0.01).abs() / 0.01 < 0.1,
        "native dip {native_dip:?}"
    );
}
