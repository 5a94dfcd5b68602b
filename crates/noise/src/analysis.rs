//! Analysis of an FTQ series: lost work, Hamming-windowed Welch spectrum, cepstrum, and the
//! periodic interference sources (fundamental frequency, harmonics, lost work per second).
//!
//! The input is the *lost-work series* `x[i] = 1 − count[i]/nominal`, the fraction of interval
//! `i` that the sampler did not get. It is uniformly sampled at `fs = 1/Δ` because FTQ intervals
//! are absolute and aligned, which is what makes spectral analysis legitimate (seed 003).

use crate::error::{NoiseError, Result};
use realfft::RealFftPlanner;

/// The lost fraction of each interval, `1 − count/nominal` (negative when an interval did a
/// little more than nominal, which happens by ±1 quantum at interval edges).
pub fn lost_series(counts: &[u32], nominal: u64) -> Vec<f64> {
    let nom = nominal.max(1) as f64;
    counts.iter().map(|&c| 1.0 - f64::from(c) / nom).collect()
}

/// Noise fraction: the share of the nominal work that was not done, over the whole series.
pub fn noise_fraction(counts: &[u32], nominal: u64) -> f64 {
    if counts.is_empty() || nominal == 0 {
        return 0.0;
    }
    let done: f64 = counts.iter().map(|&c| f64::from(c)).sum();
    (1.0 - done / (nominal as f64 * counts.len() as f64)).max(0.0)
}

/// A one-sided power spectrum of the lost-work series.
#[derive(Debug, Clone)]
pub struct Spectrum {
    /// Sampling rate (1/Δ), Hz.
    pub fs: f64,
    /// Segment length (power of two) used for each FFT.
    pub segment_len: usize,
    /// Number of segments averaged (Welch, 50 % overlap).
    pub segments: usize,
    /// Frequency of each bin, Hz.
    pub freq: Vec<f64>,
    /// Averaged power per bin (arbitrary units, consistent within a run).
    pub power: Vec<f64>,
    /// Amplitude per bin: the amplitude of a sinusoid in the lost-work fraction that would
    /// give this bin's power (window gain corrected).
    pub amplitude: Vec<f64>,
}

impl Spectrum {
    /// Bin width, Hz.
    pub fn resolution(&self) -> f64 {
        self.fs / self.segment_len as f64
    }
}

fn hamming(n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![1.0];
    }
    (0..n)
        .map(|i| 0.54 - 0.46 * (2.0 * std::f64::consts::PI * i as f64 / (n - 1) as f64).cos())
        .collect()
}

/// Hamming-windowed Welch power spectrum of `x` sampled at `fs`, segments of at most
/// `max_segment` samples (rounded down to a power of two) with 50 % overlap.
pub fn welch(x: &[f64], fs: f64, max_segment: usize) -> Result<Spectrum> {
    if x.len() < 16 {
        return Err(NoiseError::TooShort(format!(
            "a spectrum needs at least 16 intervals, got {}",
            x.len()
        )));
    }
    let mut seg = 16usize;
    while seg * 2 <= x.len().min(max_segment.max(16)) {
        seg *= 2;
    }
    let mean = x.iter().sum::<f64>() / x.len() as f64;
    let w = hamming(seg);
    let gain: f64 = w.iter().sum();
    let mut planner = RealFftPlanner::<f64>::new();
    let fft = planner.plan_fft_forward(seg);
    let mut input = fft.make_input_vec();
    let mut output = fft.make_output_vec();
    let mut power = vec![0.0; seg / 2 + 1];
    let step = seg / 2;
    let mut segments = 0;
    let mut start = 0;
    while start + seg <= x.len() {
        for i in 0..seg {
            input[i] = (x[start + i] - mean) * w[i];
        }
        fft.process(&mut input, &mut output)
            .map_err(|e| NoiseError::TooShort(format!("fft: {e}")))?;
        for (p, c) in power.iter_mut().zip(&output) {
            *p += c.norm_sqr();
        }
        segments += 1;
        start += step;
    }
    for p in &mut power {
        *p /= segments as f64;
    }
    let amplitude = power.iter().map(|p| 2.0 * p.sqrt() / gain).collect();
    Ok(Spectrum {
        fs,
        segment_len: seg,
        segments,
        freq: (0..=seg / 2).map(|k| k as f64 * fs / seg as f64).collect(),
        power,
        amplitude,
    })
}

/// The real cepstrum of a spectrum: the Fourier transform of the log power spectrum (the paper's
/// "forward Fourier transform of the spectrum"). A train of harmonics `k·f0` in the spectrum
/// becomes one peak at quefrency `1/f0`.
#[derive(Debug, Clone)]
pub struct Cepstrum {
    /// Quefrency of each coefficient, seconds.
    pub quefrency: Vec<f64>,
    /// Cepstral coefficient per quefrency.
    pub value: Vec<f64>,
}

/// Compute the real cepstrum of `s`.
pub fn cepstrum(s: &Spectrum) -> Result<Cepstrum> {
    let n = s.segment_len;
    let maxp = s.power.iter().cloned().fold(0.0, f64::max);
    let eps = (maxp * 1e-12).max(1e-300);
    let mut planner = RealFftPlanner::<f64>::new();
    let inv = planner.plan_fft_inverse(n);
    let mut spec = inv.make_input_vec();
    for (c, p) in spec.iter_mut().zip(&s.power) {
        *c = realfft::num_complex::Complex::new((p + eps).ln(), 0.0);
    }
    // The first and last bins of a real signal's spectrum are real already.
    let mut out = inv.make_output_vec();
    inv.process(&mut spec, &mut out)
        .map_err(|e| NoiseError::TooShort(format!("inverse fft: {e}")))?;
    let half = n / 2;
    Ok(Cepstrum {
        quefrency: (0..half).map(|q| q as f64 / s.fs).collect(),
        value: out[..half].iter().map(|v| v / n as f64).collect(),
    })
}

/// A significant local maximum of the spectrum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    /// Interpolated frequency, Hz.
    pub freq: f64,
    /// Amplitude of the equivalent sinusoid in the lost-work fraction.
    pub amplitude: f64,
    /// Peak power divided by the local noise floor.
    pub snr: f64,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Power must exceed this multiple of the local median floor for a bin to count as a peak. For a
/// single-segment periodogram the false-alarm chance per bin is then about e^-(25·ln 2) ≈ 3e-8.
pub const PEAK_THRESHOLD: f64 = 25.0;

/// Significant spectral peaks, strongest first.
pub fn spectral_peaks(s: &Spectrum) -> Vec<Peak> {
    let p = &s.power;
    let n = p.len();
    let mut peaks = Vec::new();
    if n < 5 {
        return peaks;
    }
    let half_window = 32usize.min(n / 2);
    for k in 1..n - 1 {
        if !(p[k] > p[k - 1] && p[k] >= p[k + 1]) {
            continue;
        }
        let lo = k.saturating_sub(half_window).max(1);
        let hi = (k + half_window).min(n - 1);
        let mut around: Vec<f64> = (lo..=hi)
            .filter(|&j| j.abs_diff(k) > 2)
            .map(|j| p[j])
            .collect();
        let floor = median(&mut around).max(1e-300);
        let snr = p[k] / floor;
        if snr < PEAK_THRESHOLD {
            continue;
        }
        // Gaussian (log-parabolic) interpolation between the neighbouring bins.
        let (a, b, c) = (
            p[k - 1].max(1e-300).ln(),
            p[k].ln(),
            p[k + 1].max(1e-300).ln(),
        );
        let denom = a - 2.0 * b + c;
        let delta = if denom.abs() > 1e-12 {
            (0.5 * (a - c) / denom).clamp(-0.5, 0.5)
        } else {
            0.0
        };
        peaks.push(Peak {
            freq: (k as f64 + delta) * s.resolution(),
            amplitude: s.amplitude[k],
            snr,
        });
    }
    peaks.sort_by(|a, b| b.amplitude.total_cmp(&a.amplitude));
    peaks
}

/// Cepstral peaks: `(quefrency_s, value)`, strongest first, restricted to quefrencies of at
/// least three intervals and significant against the cepstrum's own spread.
pub fn cepstral_peaks(c: &Cepstrum) -> Vec<(f64, f64)> {
    let v = &c.value;
    let n = v.len();
    if n < 8 {
        return Vec::new();
    }
    let mut abs: Vec<f64> = v[3..].iter().map(|x| x.abs()).collect();
    let spread = median(&mut abs) * 1.4826;
    let mut out = Vec::new();
    for q in 3..n - 1 {
        if v[q] > v[q - 1] && v[q] >= v[q + 1] && v[q] > 5.0 * spread {
            let (a, b, cc) = (v[q - 1], v[q], v[q + 1]);
            let denom = a - 2.0 * b + cc;
            let delta = if denom.abs() > 1e-300 {
                (0.5 * (a - cc) / denom).clamp(-0.5, 0.5)
            } else {
                0.0
            };
            let dq = c.quefrency.get(1).copied().unwrap_or(0.0);
            out.push(((q as f64 + delta) * dq, v[q]));
        }
    }
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

/// Fold `x` (sampled at `fs`) at frequency `f` into phase bins: `(mean per bin, samples per bin)`.
/// One bin per sample of the period (at most 100); empty bins have mean 0 and count 0.
pub fn fold_counts(x: &[f64], fs: f64, f: f64) -> (Vec<f64>, Vec<usize>) {
    fold_coarse(x, fs, f)
}

/// Fold with one bin per sample of the period (at most 100): for *comparing* frequencies, since
/// finer bins at a high multiple `k·f` would separate the samples of an `f`-periodic waveform by
/// their sampling phase and so fit it as well as `f` itself.
fn fold_coarse(x: &[f64], fs: f64, f: f64) -> (Vec<f64>, Vec<usize>) {
    fold_with(x, fs, f, ((fs / f).floor() as usize).clamp(2, 100))
}

fn fold_with(x: &[f64], fs: f64, f: f64, bins: usize) -> (Vec<f64>, Vec<usize>) {
    let period = fs / f;
    let mut sum = vec![0.0; bins];
    let mut cnt = vec![0usize; bins];
    for (i, v) in x.iter().enumerate() {
        let b = bin_of(i, period, bins);
        sum[b] += v;
        cnt[b] += 1;
    }
    let means = sum
        .iter()
        .zip(&cnt)
        .map(|(s, &c)| if c > 0 { s / c as f64 } else { 0.0 })
        .collect();
    (means, cnt)
}

fn bin_of(i: usize, period: f64, bins: usize) -> usize {
    (((i as f64 / period).fract() * bins as f64) as usize).min(bins - 1)
}

/// Fold `x` at frequency `f` and return the mean per phase bin (0 for empty bins).
pub fn fold(x: &[f64], fs: f64, f: f64) -> Vec<f64> {
    fold_counts(x, fs, f).0
}

/// The aperiodic background level of a fold: the mean of its non-empty phase bins without the
/// highest third (where a periodic detour sits) and the lowest tenth. Robust to other sources
/// whose folded pattern is not flat (e.g. a 250 Hz tick folded at 100 Hz alternates bin by bin).
pub fn fold_background(bins: &[f64], cnt: &[usize]) -> f64 {
    let mut v: Vec<f64> = bins
        .iter()
        .zip(cnt)
        .filter(|(_, &c)| c > 0)
        .map(|(b, _)| *b)
        .collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let lo = n / 10;
    let hi = (n - n / 3).max(lo + 1).min(n);
    let kept = &v[lo..hi];
    kept.iter().sum::<f64>() / kept.len() as f64
}

/// The lost-work fraction carried by a component periodic at `f`: fold at `f`, take
/// [`fold_background`] as the aperiodic level, and average the excess over all samples. Assumes
/// the interference occupies less than a third of its period (true of short periodic detours).
pub fn periodic_lost(x: &[f64], fs: f64, f: f64) -> f64 {
    let (bins, cnt) = fold_counts(x, fs, f);
    let base = fold_background(&bins, &cnt);
    let total: usize = cnt.iter().sum();
    if total == 0 {
        return 0.0;
    }
    bins.iter()
        .zip(&cnt)
        .map(|(b, &c)| (b - base) * c as f64)
        .sum::<f64>()
        / total as f64
}

/// The strongest detour of a fold at one frequency: a contiguous (circular) window of phase
/// bins around the bin with the most excess.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dip {
    /// Lost-work fraction the window carries (excess over the fold's median, averaged over all
    /// samples).
    pub lost: f64,
    /// First phase bin of the window.
    pub first_bin: usize,
    /// Number of bins in the window.
    pub len: usize,
    /// Number of bins of the fold.
    pub bins: usize,
}

/// The lost work of the single strongest detour periodic at `f`, told apart by phase from
/// other detours with the same period (e.g. a machine's own 100 Hz line under an injected one)
/// and from sources of other periods, whose folds spread over many phases. Folds at `f` with
/// one bin per sample of the period, takes the median bin as the background, and grows a
/// window from the two adjacent bins of most excess while its neighbours stay above a tenth of
/// the peak's excess, up to a quarter of the period (a periodic thread whose wake-up the
/// scheduler delays spills into the next bins; those belong to the same detour).
pub fn dip_lost(x: &[f64], fs: f64, f: f64) -> Dip {
    let (bins, cnt) = fold_coarse(x, fs, f);
    let nb = bins.len();
    let empty = Dip {
        lost: 0.0,
        first_bin: 0,
        len: 0,
        bins: nb,
    };
    if cnt.iter().filter(|&&c| c > 0).count() < 3 {
        return empty;
    }
    let median = median_bin(&bins, &cnt);
    // Seed with the two adjacent bins of most excess, so that a detour straddling two bins
    // outweighs a weaker one that happens to sit inside a single bin.
    let excess = |b: usize| if cnt[b] > 0 { bins[b] - median } else { 0.0 };
    let Some(top) = (0..nb).max_by(|&a, &b| {
        (excess(a) + excess((a + 1) % nb)).total_cmp(&(excess(b) + excess((b + 1) % nb)))
    }) else {
        return empty;
    };
    let peak = excess(top).max(excess((top + 1) % nb));
    if peak <= 0.0 {
        return empty;
    }
    let floor = 0.1 * peak;
    let inside = |b: usize| cnt[b] > 0 && bins[b] - median > floor;
    let widest = (nb / 4).max(2);
    // The seed pair keeps only the bins that are part of the detour.
    let (mut first, mut len) = match (inside(top), inside((top + 1) % nb)) {
        (true, true) => (top, 2),
        (false, true) => ((top + 1) % nb, 1),
        _ => (top, 1),
    };
    while len < widest && inside((first + nb - 1) % nb) {
        first = (first + nb - 1) % nb;
        len += 1;
    }
    while len < widest && inside((first + len) % nb) {
        len += 1;
    }
    Dip {
        lost: window_excess(&bins, &cnt, median, first, len),
        first_bin: first,
        len,
        bins: nb,
    }
}

/// The lost-work fraction in phase bins `first..first+len` (circular) of the fold of `x` at `f`
/// (the same binning as [`dip_lost`]), as excess over the fold's median bin.
pub fn window_lost(x: &[f64], fs: f64, f: f64, first: usize, len: usize) -> f64 {
    let (bins, cnt) = fold_coarse(x, fs, f);
    window_excess(&bins, &cnt, median_bin(&bins, &cnt), first, len)
}

/// The median of a fold's non-empty bins (0 when all are empty).
fn median_bin(bins: &[f64], cnt: &[usize]) -> f64 {
    let mut v: Vec<f64> = bins
        .iter()
        .zip(cnt)
        .filter(|(_, &c)| c > 0)
        .map(|(b, _)| *b)
        .collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Excess over `background` in bins `first..first+len` (circular), averaged over all samples.
fn window_excess(bins: &[f64], cnt: &[usize], background: f64, first: usize, len: usize) -> f64 {
    let nb = bins.len();
    let total: usize = cnt.iter().sum();
    if nb == 0 || total == 0 {
        return 0.0;
    }
    (0..len.min(nb))
        .map(|k| (first + k) % nb)
        .map(|b| (bins[b] - background) * cnt[b] as f64)
        .sum::<f64>()
        / total as f64
}

/// Epoch-folding score of frequency `f`: the variance the phase-bin means explain, less what
/// noise alone would explain with that many bins (so subharmonics, which have more bins, do
/// not win by fitting noise). Also returns the score's standard deviation under pure noise.
pub fn fold_score_sd(x: &[f64], fs: f64, f: f64) -> (f64, f64) {
    let (bins, cnt) = fold_coarse(x, fs, f);
    let n = x.len() as f64;
    if n < 2.0 {
        return (0.0, 0.0);
    }
    let used = cnt.iter().filter(|&&c| c > 0).count() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let total: f64 = x.iter().map(|v| (v - mean) * (v - mean)).sum();
    let explained: f64 = bins
        .iter()
        .zip(&cnt)
        .map(|(b, &c)| c as f64 * (b - mean) * (b - mean))
        .sum();
    let within = ((total - explained) / (n - used).max(1.0)).max(0.0);
    let dof = (used - 1.0).max(1.0);
    (explained - dof * within, within * (2.0 * dof).sqrt())
}

/// The best fold score at frequencies a few phase drifts per run away from `f` (`f ± k/T`,
/// k = 3, 5, 7, 9): what folding finds where there is no periodic source. A periodic source folds
/// coherently only at its own frequency, while rare long aperiodic detours fold just as "well"
/// at any nearby frequency, so a real source must score well above this.
pub fn null_fold_score(x: &[f64], fs: f64, f: f64) -> f64 {
    let duration = x.len() as f64 / fs;
    [-9.0, -7.0, -5.0, -3.0, 3.0, 5.0, 7.0, 9.0]
        .iter()
        .map(|k| f + k / duration)
        .filter(|g| *g > 0.0 && *g < fs / 2.0)
        .map(|g| fold_score(x, fs, g))
        .fold(0.0, f64::max)
}

/// Minimum ratio of a source's fold score to [`null_fold_score`].
pub const NULL_RATIO: f64 = 3.0;

/// [`fold_score_sd`] without the standard deviation.
pub fn fold_score(x: &[f64], fs: f64, f: f64) -> f64 {
    fold_score_sd(x, fs, f).0
}

/// Refine `f` to the frequency (within ± `span` Hz) with the best fold score: a coarse grid,
/// then a fine grid around its best point (resolution `span`/800).
pub fn refine_frequency(x: &[f64], fs: f64, f: f64, span: f64) -> f64 {
    let steps = 40;
    let mut best = (f, fold_score(x, fs, f));
    let mut centre = f;
    let mut span = span;
    for _ in 0..2 {
        for s in 0..=steps {
            let g = centre - span + 2.0 * span * s as f64 / steps as f64;
            if g <= 0.0 || g >= fs / 2.0 {
                continue;
            }
            let v = fold_score(x, fs, g);
            if v > best.1 {
                best = (g, v);
            }
        }
        centre = best.0;
        span = 2.0 * span / steps as f64;
    }
    best.0
}

/// If most of the waveform found at `f` (at least [`LIFT_SHARE`] of its fold score) is periodic
/// at a multiple `k·f`, return that multiple: `f` was a subharmonic, or a weaker source at `f`
/// is riding on a stronger one at `k·f` (the weaker one is then found in a later round, from the
/// residual).
/// Share of a fold's score that a multiple of its frequency must explain to be preferred.
pub const LIFT_SHARE: f64 = 0.6;

fn lift_subharmonic(x: &[f64], fs: f64, f: f64, res: f64) -> f64 {
    let base = fold_score(x, fs, f);
    let mut best = f;
    for k in 2..=8 {
        let g0 = f * f64::from(k);
        if g0 >= fs / 2.0 {
            break;
        }
        let g = refine_frequency(x, fs, g0, res / 4.0);
        if fold_score(x, fs, g) >= LIFT_SHARE * base {
            best = g;
        }
    }
    best
}

/// A periodic interference source.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// Fundamental frequency, Hz.
    pub freq: f64,
    /// Period, seconds.
    pub period: f64,
    /// Lost-work fraction attributable to this source (seconds of work lost per second).
    pub lost_fraction: f64,
    /// Harmonic numbers seen in the spectrum (1 = fundamental).
    pub harmonics: Vec<u32>,
    /// Spectral amplitude of the strongest of its peaks.
    pub amplitude: f64,
    /// Whether the cepstrum shows a peak at this source's period.
    pub cepstrum_confirmed: bool,
    /// Mean width of one detour of this source, seconds (`lost_fraction × period`).
    pub width: f64,
    /// Time of the detour centres modulo the period, seconds from the run's start.
    pub phase: f64,
}

/// Everything the analysis says about one CPU's series.
#[derive(Debug, Clone)]
pub struct SeriesAnalysis {
    /// Lost-work noise fraction over the whole run.
    pub noise_fraction: f64,
    /// The spectrum.
    pub spectrum: Spectrum,
    /// The cepstrum.
    pub cepstrum: Cepstrum,
    /// Significant spectral peaks, strongest first.
    pub peaks: Vec<Peak>,
    /// Significant cepstral peaks `(quefrency_s, value)`, strongest first.
    pub cepstral_peaks: Vec<(f64, f64)>,
    /// Periodic sources (harmonics grouped), most lost work first.
    pub sources: Vec<Source>,
}

/// Default longest Welch segment.
pub const DEFAULT_SEGMENT: usize = 4096;

fn harmonic_of(f: f64, f0: f64, tol: f64) -> Option<u32> {
    harmonic_of_tight(f, f0, tol)
}

/// Most sources one analysis reports.
pub const MAX_SOURCES: usize = 8;

/// Choose the fundamental behind the strongest of `peaks`: candidates are that peak's frequency
/// divided by 1..=12 and the cepstrum's periods (so a fundamental whose own line is weak is still
/// found), each refined through the spectral harmonics it matches and scored by epoch folding in
/// the time domain (which sees aliased harmonics too). Among candidates scoring within 2 % of
/// the best, the highest frequency wins, so a subharmonic never replaces its fundamental.
fn pick_fundamental(
    x: &[f64],
    fs: f64,
    peaks: &[Peak],
    cepstral: &[(f64, f64)],
    res: f64,
) -> Option<f64> {
    let strongest = peaks.first()?;
    let tol = 2.0 * res;
    let mut candidates: Vec<f64> = (1..=12).map(|n| strongest.freq / f64::from(n)).collect();
    candidates.extend(
        cepstral
            .iter()
            .take(6)
            .filter(|(q, _)| *q > 0.0)
            .map(|(q, _)| 1.0 / q),
    );
    let mut scored: Vec<(f64, f64)> = Vec::new();
    for f in candidates {
        if f < 3.0 * res || f >= fs / 2.0 {
            continue;
        }
        let mut f0 = f;
        for _ in 0..2 {
            let matched: Vec<(u32, f64)> = peaks
                .iter()
                .filter_map(|p| harmonic_of(p.freq, f0, tol).map(|n| (n, p.freq)))
                .collect();
            if matched.is_empty() {
                break;
            }
            let num: f64 = matched.iter().map(|(n, fr)| f64::from(*n) * fr).sum();
            let den: f64 = matched.iter().map(|(n, _)| f64::from(n * n)).sum();
            f0 = num / den;
        }
        if harmonic_of(strongest.freq, f0, tol).is_none() {
            continue;
        }
        let score = fold_score(x, fs, f0);
        if score >= NULL_RATIO * null_fold_score(x, fs, f0) {
            scored.push((f0, score));
        }
    }
    let best = scored.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
    if best <= 0.0 {
        return None;
    }
    scored
        .into_iter()
        .filter(|(_, sc)| *sc >= 0.98 * best)
        .map(|(f, _)| f)
        .fold(None, |acc: Option<f64>, f| {
            Some(acc.map_or(f, |a| a.max(f)))
        })
}

/// Whether `f` is a harmonic of `f0`, directly or aliased by sampling at `fs`.
fn is_aliased_harmonic(f: f64, f0: f64, fs: f64, tol: f64) -> bool {
    let max_n = ((20.0 * fs / f0) as u64).clamp(1, 2000);
    (1..=max_n).any(|n| {
        let h = (n as f64 * f0).rem_euclid(fs);
        let alias = if h > fs / 2.0 { fs - h } else { h };
        (alias - f).abs() <= tol
    })
}

fn harmonic_of_tight(f: f64, f0: f64, tol: f64) -> Option<u32> {
    let n = (f / f0).round();
    (n >= 1.0 && (f - n * f0).abs() <= tol).then_some(n as u32)
}

/// Analyse one lost-work series sampled at `fs`.
///
/// Sources are found one at a time (strongest spectral line first): pick the fundamental that
/// explains it with its harmonics (helped by the cepstrum), refine the frequency by folding,
/// measure the source's lost work from the fold, subtract its periodic waveform (which also
/// removes its aliased harmonics), and look again at the residual's spectrum.
pub fn analyse_series(x: &[f64], fs: f64, noise_fraction: f64) -> Result<SeriesAnalysis> {
    let spectrum = welch(x, fs, DEFAULT_SEGMENT)?;
    let cep = cepstrum(&spectrum)?;
    let peaks = spectral_peaks(&spectrum);
    let cpeaks = cepstral_peaks(&cep);
    let res = spectrum.resolution();
    let tol = 2.0 * res;

    let mut residual = x.to_vec();
    let mut sources: Vec<Source> = Vec::new();
    let mut round_peaks = peaks.clone();
    let mut round_cpeaks = cpeaks.clone();
    let mut attempts = 0;
    while sources.len() < MAX_SOURCES && attempts < 4 * MAX_SOURCES {
        attempts += 1;
        // Lines already explained by a found source (its harmonics, also where they alias back
        // below Nyquist) are what is left of that source's subtraction, not new sources.
        round_peaks.retain(|p| {
            !sources
                .iter()
                .any(|s| is_aliased_harmonic(p.freq, s.freq, fs, tol))
        });
        let Some(f0) = pick_fundamental(&residual, fs, &round_peaks, &round_cpeaks, res) else {
            break;
        };
        let f = refine_frequency(&residual, fs, f0, res);
        let f = lift_subharmonic(&residual, fs, f, res);
        let lost = periodic_lost(&residual, fs, f);
        let (score, sd) = fold_score_sd(&residual, fs, f);
        let null = null_fold_score(&residual, fs, f);
        if lost <= 1e-9 || score < 6.0 * sd || score < NULL_RATIO * null {
            // Not a periodic source: try the line again without the cepstrum's suggestions, then
            // drop the line and look at the next.
            if !round_cpeaks.is_empty() {
                round_cpeaks.clear();
            } else if !round_peaks.is_empty() {
                round_peaks.remove(0);
            } else {
                break;
            }
            continue;
        }
        let (bins, cnt) = fold_counts(&residual, fs, f);
        let base = fold_background(&bins, &cnt);
        let period = fs / f;
        // Circular centroid of the excess gives the phase of the detour centres.
        let nb = bins.len() as f64;
        let (mut sx, mut sy) = (0.0, 0.0);
        for (b, (v, &c)) in bins.iter().zip(&cnt).enumerate() {
            let excess = (v - base).max(0.0) * c as f64;
            let ang = 2.0 * std::f64::consts::PI * (b as f64 + 0.5) / nb;
            sx += excess * ang.cos();
            sy += excess * ang.sin();
        }
        let turn =
            sy.atan2(sx).rem_euclid(2.0 * std::f64::consts::PI) / (2.0 * std::f64::consts::PI);
        // Resolution: one interval (the lost work of an interval is not located within it).
        let phase = (turn * period / fs).rem_euclid(1.0 / f);
        for (i, v) in residual.iter_mut().enumerate() {
            *v -= bins[bin_of(i, period, bins.len())] - base;
        }
        let mut harmonics: Vec<u32> = peaks
            .iter()
            .filter_map(|p| harmonic_of_tight(p.freq, f, tol))
            .collect();
        harmonics.sort_unstable();
        harmonics.dedup();
        let amplitude = peaks
            .iter()
            .filter(|p| harmonic_of_tight(p.freq, f, tol).is_some())
            .map(|p| p.amplitude)
            .fold(0.0, f64::max);
        let cepstrum_confirmed = cpeaks
            .iter()
            .take(6)
            .any(|(q, _)| (q * f - 1.0).abs() < 0.05);
        sources.push(Source {
            freq: f,
            period: 1.0 / f,
            lost_fraction: lost,
            harmonics,
            amplitude,
            cepstrum_confirmed,
            width: lost / f,
            phase,
        });
        // Look again at what is left.
        let rs = welch(&residual, fs, DEFAULT_SEGMENT)?;
        round_peaks = spectral_peaks(&rs);
        round_cpeaks = cepstral_peaks(&cepstrum(&rs)?);
    }
    sources.sort_by(|a, b| b.lost_fraction.total_cmp(&a.lost_fraction));
    Ok(SeriesAnalysis {
        noise_fraction,
        spectrum,
        cepstrum: cep,
        peaks,
        cepstral_peaks: cpeaks,
        sources,
    })
}

/// Analyse one CPU's counts.
pub fn analyse_counts(counts: &[u32], nominal: u64, interval_ns: u64) -> Result<SeriesAnalysis> {
    let fs = 1e9 / interval_ns as f64;
    analyse_series(
        &lost_series(counts, nominal),
        fs,
        noise_fraction(counts, nominal),
    )
}

/// A periodic pulse train for synthetic series: every `1/freq_hz` seconds, starting at
/// `phase_ns`, the CPU is taken away for `width_ns`.
#[derive(Debug, Clone, Copy)]
pub struct PulseTrain {
    /// Pulses per second.
    pub freq_hz: f64,
    /// Width of each pulse, nanoseconds.
    pub width_ns: f64,
    /// Time of the first pulse, nanoseconds.
    pub phase_ns: f64,
}

/// Synthesise FTQ counts: `n` intervals of `interval_ns`, `nominal` quanta each when undisturbed,
/// minus the exact overlap of each interval with the pulse trains (overlaps between trains are
/// not double counted only approximately: trains are assumed not to overlap).
pub fn synth_counts(n: usize, interval_ns: u64, nominal: u64, trains: &[PulseTrain]) -> Vec<u32> {
    let dt = interval_ns as f64;
    let mut lost = vec![0.0f64; n];
    let end = n as f64 * dt;
    for t in trains {
        let period = 1e9 / t.freq_hz;
        if !period.is_finite() || period <= 0.0 {
            continue;
        }
        let mut k = 0u64;
        loop {
            let s = t.phase_ns + k as f64 * period;
            if s >= end {
                break;
            }
            let e = (s + t.width_ns).min(end);
            let mut i = (s / dt) as usize;
            while i < n && (i as f64) * dt < e {
                let lo = s.max(i as f64 * dt);
                let hi = e.min((i + 1) as f64 * dt);
                if hi > lo {
                    lost[i] += (hi - lo) / dt;
                }
                i += 1;
            }
            k += 1;
        }
    }
    lost.iter()
        .map(|l| ((1.0 - l.min(1.0)) * nominal as f64).round() as u32)
        .collect()
}
