//! Operating-system noise and message-latency fluctuations.
//!
//! Noise is modelled as *detours*: intervals during which a rank's CPU does no application or
//! messaging work. Work of `w` ns that starts at `t` finishes at the first instant by which the
//! CPU has been available for `w` ns ([`Noise::finish`]). Every source is a pure function of
//! (seed, rank, time), so runs are reproducible and ranks need no stored state, which is what lets
//! a million ranks replay a measured signature.
//!
//! *Co-scheduled* noise gives every rank the same detours at the same instants; *uncoordinated*
//! noise gives each rank its own random phase (and, for random sources, its own random stream).

use std::io::{BufRead, BufReader};

use crate::error::{InputError, SpecError};

/// A deterministic 64-bit mixer (SplitMix64 finaliser).
#[inline]
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[inline]
fn h3(seed: u64, a: u64, b: u64) -> u64 {
    mix(mix(mix(seed) ^ a) ^ b)
}

/// Uniform in [0, 1).
#[inline]
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Standard normal from two hashes (Box-Muller).
fn normal(h1: u64, h2: u64) -> f64 {
    let u1 = unit(h1).max(1e-300);
    let u2 = unit(h2);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Where detours come from.
#[derive(Clone, Debug)]
pub enum NoiseSource {
    /// No noise.
    None,
    /// A detour of `detour` ns every `interval` ns.
    Periodic {
        /// Period.
        interval: u64,
        /// Detour length.
        detour: u64,
    },
    /// Detours of `detour` ns arriving as a Poisson process with mean gap `interval` ns.
    Poisson {
        /// Mean time between detour starts.
        interval: u64,
        /// Detour length.
        detour: u64,
    },
    /// One detour every `interval` ns with a normally distributed length (mean, sd), clamped
    /// to [0, interval).
    Gaussian {
        /// Period.
        interval: u64,
        /// Mean detour length.
        mean: u64,
        /// Standard deviation.
        sd: u64,
    },
    /// A measured signature (detour trace or FTQ run) replayed periodically with period `span`.
    Trace {
        /// Sorted, disjoint detour starts within [0, span).
        starts: Vec<u64>,
        /// Matching ends (start + duration), also sorted.
        ends: Vec<u64>,
        /// Length of the recorded run.
        span: u64,
        /// Where in `ends` to look for a time (built from `ends` and `span`).
        index: DetourIndex,
    },
}

/// Bucket index over the sorted detour ends of a [`NoiseSource::Trace`] (built by the trace
/// readers; `DetourIndex::default()` searches the whole trace): for a time `tau` in
/// `[0, span)` it gives the few entries among which the first end after `tau` lies, so the
/// per-operation noise lookup costs a table read and a search over a bucket instead of a binary
/// search over the whole trace (its branches are unpredictable, and every send, receive and
/// calc of every rank does one).
#[derive(Clone, Debug, Default)]
pub struct DetourIndex {
    /// Bucket width is `1 << shift` ns.
    shift: u32,
    /// `first[b]`: index of the first end greater than `b << shift`; one extra entry at the end
    /// (the number of ends).
    first: Vec<u32>,
}

impl DetourIndex {
    /// Index `ends` (sorted, all below `span`) in about two buckets per detour.
    pub(crate) fn new(ends: &[u64], span: u64) -> Self {
        if ends.is_empty() || ends.len() >= u32::MAX as usize {
            return DetourIndex::default();
        }
        let want = span.div_ceil(2 * ends.len() as u64).max(1);
        let shift = want.next_power_of_two().trailing_zeros();
        let buckets = (span >> shift) + 1;
        let mut first = Vec::with_capacity(buckets as usize + 1);
        let mut i = 0usize;
        for b in 0..buckets {
            let lo = b << shift;
            while i < ends.len() && ends[i] <= lo {
                i += 1;
            }
            first.push(i as u32);
        }
        first.push(ends.len() as u32);
        DetourIndex { shift, first }
    }

    /// Index of the first entry of `ends` greater than `tau` (`ends.len()` if none); the same
    /// as `ends.partition_point(|&e| e <= tau)`.
    #[inline]
    fn first_end_after(&self, ends: &[u64], tau: u64) -> usize {
        let b = (tau >> self.shift) as usize;
        match (self.first.get(b), self.first.get(b + 1)) {
            (Some(&lo), Some(&hi)) if hi as usize <= ends.len() && lo <= hi => {
                let (lo, hi) = (lo as usize, hi as usize);
                lo + ends[lo..hi].partition_point(|&e| e <= tau)
            }
            // Not built for these ends (or `tau` past the span): search everything.
            _ => ends.partition_point(|&e| e <= tau),
        }
    }
}

/// A rank's last detour lookup, `[end, back << 32 | len]`: the first detour ending after any
/// time in `[end - back, end)` is `(end - len, end)`, since every source's detours, ordered by
/// end, make `next_detour` a step function of the time. All zero ([`DETOUR_CACHE_EMPTY`])
/// holds nothing; two plain words so that a zeroed array of them is allocated lazily.
pub(crate) type DetourCache = [u64; 2];

/// A [`DetourCache`] that holds nothing (`end == 0`: no time lies below it).
pub(crate) const DETOUR_CACHE_EMPTY: DetourCache = [0, 0];

/// The cached detour if it is the first one ending after `t`.
#[inline]
fn cache_get(c: &DetourCache, t: u64) -> Option<(u64, u64)> {
    let [end, x] = *c;
    // `end - back <= t < end`, without underflow.
    if t < end && end - t <= x >> 32 {
        Some((end - (x & 0xffff_ffff), end))
    } else {
        None
    }
}

/// Remember that `(ds, de)` is the first detour ending after `t` (`ds <= de`, `t < de`);
/// nothing when the detour is longer than 32 bits of nanoseconds. A gap from `t` wider than
/// 32 bits is narrowed (still a valid range, merely smaller).
#[inline]
fn cache_put(c: &mut DetourCache, t: u64, (ds, de): (u64, u64)) {
    *c = match u32::try_from(de - ds) {
        Ok(len) if t < de => {
            let back = u32::try_from(de - t).unwrap_or(u32::MAX);
            [de, (back as u64) << 32 | len as u64]
        }
        _ => DETOUR_CACHE_EMPTY,
    };
}

/// Extra latency added to each message.
#[derive(Clone, Copy, Debug, Default)]
pub enum LatencyNoise {
    /// None.
    #[default]
    None,
    /// Exponentially distributed with this mean (ns).
    Exp {
        /// Mean.
        mean: u64,
    },
    /// Uniform in [0, max] ns.
    Uniform {
        /// Upper bound.
        max: u64,
    },
    /// Normal (mean, sd) ns, clamped at 0.
    Gauss {
        /// Mean.
        mean: u64,
        /// Standard deviation.
        sd: u64,
    },
}

/// Noise configuration for one simulation.
#[derive(Clone, Debug)]
pub struct Noise {
    /// Detour source.
    pub source: NoiseSource,
    /// Same detours on every rank at the same time.
    pub coscheduled: bool,
    /// Latency fluctuation.
    pub latency: LatencyNoise,
    /// Seed for phases and random streams.
    pub seed: u64,
}

impl Noise {
    /// No noise at all.
    pub fn none() -> Self {
        Noise {
            source: NoiseSource::None,
            coscheduled: false,
            latency: LatencyNoise::None,
            seed: 0,
        }
    }

    /// True when neither CPU nor latency noise is configured.
    pub fn is_quiet(&self) -> bool {
        matches!(self.source, NoiseSource::None) && matches!(self.latency, LatencyNoise::None)
    }

    /// True when CPU detours are configured.
    pub fn has_detours(&self) -> bool {
        !matches!(self.source, NoiseSource::None)
    }

    /// Fraction of CPU time lost to detours (long-run average, before overlap).
    pub fn fraction(&self) -> f64 {
        match &self.source {
            NoiseSource::None => 0.0,
            NoiseSource::Periodic { interval, detour }
            | NoiseSource::Poisson { interval, detour } => *detour as f64 / *interval as f64,
            NoiseSource::Gaussian { interval, mean, .. } => *mean as f64 / *interval as f64,
            NoiseSource::Trace {
                starts, ends, span, ..
            } => {
                let lost: u64 = ends.iter().zip(starts).map(|(e, s)| e - s).sum();
                lost as f64 / *span as f64
            }
        }
    }

    #[inline]
    fn key(&self, rank: u32) -> u64 {
        if self.coscheduled {
            0
        } else {
            rank as u64 + 1
        }
    }

    #[inline]
    fn phase(&self, rank: u32, period: u64) -> u64 {
        h3(self.seed, self.key(rank), 0x0070_6861_7365) % period
    }

    /// The first detour (start, end) whose end lies after `t` on `rank`.
    fn next_detour(&self, rank: u32, t: u64) -> (u64, u64) {
        match &self.source {
            NoiseSource::None => (u64::MAX, u64::MAX),
            NoiseSource::Periodic { interval, detour } => {
                let p = *interval;
                let shift = p - self.phase(rank, p);
                let u = t + shift;
                let ds = u / p * p;
                let (ds, de) = if ds + detour > u {
                    (ds, ds + detour)
                } else {
                    (ds + p, ds + p + detour)
                };
                (ds.saturating_sub(shift), de - shift)
            }
            NoiseSource::Gaussian { interval, mean, sd } => {
                let p = *interval;
                let shift = p - self.phase(rank, p);
                let u = t + shift;
                let mut k = u / p;
                let key = self.key(rank);
                loop {
                    let z = normal(h3(self.seed, key, 2 * k), h3(self.seed, key, 2 * k + 1));
                    let len = (*mean as f64 + z * *sd as f64).clamp(0.0, (p - 1) as f64) as u64;
                    let ds = k * p;
                    if ds + len > u {
                        return (ds.saturating_sub(shift), ds + len - shift);
                    }
                    k += 1;
                }
            }
            NoiseSource::Poisson { interval, detour } => {
                // Buckets of `interval` ns; inside each, a Poisson process of rate 1/interval
                // drawn from a counter-based stream. Detours from earlier buckets may reach
                // into this one, so look back far enough.
                let w = *interval;
                let key = self.key(rank);
                let back = detour / w + 1;
                let mut b = (t / w).saturating_sub(back);
                loop {
                    let lo = b * w;
                    let hi = lo + w;
                    let mut pos = lo as f64;
                    let mut j = 0u64;
                    loop {
                        let u =
                            unit(h3(self.seed ^ 0x5eed, key, b.wrapping_mul(64) + j)).max(1e-300);
                        pos += -u.ln() * w as f64;
                        j += 1;
                        if pos >= hi as f64 || j > 63 {
                            break;
                        }
                        let ds = pos as u64;
                        if ds + detour > t {
                            return (ds, ds + detour);
                        }
                    }
                    b += 1;
                }
            }
            NoiseSource::Trace {
                starts,
                ends,
                span,
                index,
            } => {
                let p = *span;
                let shift = p - self.phase(rank, p);
                let u = t + shift;
                let k = u / p;
                let tau = u - k * p;
                let i = index.first_end_after(ends, tau);
                let (ds, de) = if i < ends.len() {
                    (k * p + starts[i], k * p + ends[i])
                } else {
                    ((k + 1) * p + starts[0], (k + 1) * p + ends[0])
                };
                (ds.saturating_sub(shift), de - shift)
            }
        }
    }

    /// When `work` ns of CPU work started at `start` on `rank` completes.
    /// Always `>= start + work`, and non-decreasing in `start`.
    #[inline]
    pub fn finish(&self, rank: u32, start: u64, work: u64) -> u64 {
        self.finish_with(start, work, |t| self.next_detour(rank, t))
    }

    /// The walk of [`Noise::finish`] over the detours `next` gives (the first one ending after
    /// a time), shared by the plain and the cached lookup.
    #[inline(always)]
    fn finish_with(&self, start: u64, work: u64, mut next: impl FnMut(u64) -> (u64, u64)) -> u64 {
        if work == 0 || matches!(self.source, NoiseSource::None) {
            return start + work;
        }
        let mut t = start;
        let mut rem = work;
        loop {
            let (ds, de) = next(t);
            if ds <= t {
                t = de;
                continue;
            }
            let gap = ds - t;
            if rem <= gap {
                return t + rem;
            }
            rem -= gap;
            t = de;
        }
    }

    /// [`Noise::finish`], remembering in `c` the last detour looked up for `rank` (one cache
    /// per rank, all for this noise): computations that start between two detours, most of
    /// them, then skip the phase hash, the divisions and the trace lookup. The result is
    /// `finish`'s for any order of calls.
    #[inline]
    pub(crate) fn finish_cached(
        &self,
        rank: u32,
        start: u64,
        work: u64,
        c: &mut DetourCache,
    ) -> u64 {
        self.finish_with(start, work, |t| match cache_get(c, t) {
            Some(d) => d,
            None => {
                let d = self.next_detour(rank, t);
                cache_put(c, t, d);
                d
            }
        })
    }

    /// Extra latency for message `msg` (a send op index; `leg` separates rendezvous legs).
    #[inline]
    pub fn latency(&self, msg: u64, leg: u64) -> u64 {
        match self.latency {
            LatencyNoise::None => 0,
            LatencyNoise::Exp { mean } => {
                let u = unit(h3(self.seed ^ 0x1a7e, msg, leg)).max(1e-300);
                (-u.ln() * mean as f64) as u64
            }
            LatencyNoise::Uniform { max } => {
                (unit(h3(self.seed ^ 0x1a7e, msg, leg)) * (max as f64 + 1.0)) as u64
            }
            LatencyNoise::Gauss { mean, sd } => {
                let z = normal(
                    h3(self.seed ^ 0x1a7e, msg, leg),
                    h3(self.seed ^ 0x1a7f, msg, leg),
                );
                (mean as f64 + z * sd as f64).max(0.0) as u64
            }
        }
    }
}

/// Parse a duration: `250`, `250ns`, `2.5us`, `3ms`, `1s`.
pub fn parse_ns(s: &str) -> Result<u64, SpecError> {
    let s = s.trim();
    let (num, mult) = if let Some(x) = s.strip_suffix("ns") {
        (x, 1.0)
    } else if let Some(x) = s.strip_suffix("us") {
        (x, 1e3)
    } else if let Some(x) = s.strip_suffix("ms") {
        (x, 1e6)
    } else if let Some(x) = s.strip_suffix('s') {
        (x, 1e9)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| SpecError(format!("`{s}` is not a duration (e.g. 250ns, 2.5us, 3ms)")))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(SpecError(format!(
            "duration `{s}` must be a non-negative number"
        )));
    }
    Ok((v * mult).round() as u64)
}

fn kv(params: &str) -> Result<Vec<(String, String)>, SpecError> {
    let mut out = Vec::new();
    for p in params.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| SpecError(format!("expected key=value, found `{p}`")))?;
        out.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(out)
}

fn get(kvs: &[(String, String)], key: &str, what: &str) -> Result<u64, SpecError> {
    let v = kvs
        .iter()
        .find(|(k, _)| k == key)
        .ok_or_else(|| SpecError(format!("{what} needs `{key}=`")))?;
    parse_ns(&v.1)
}

fn check_keys(kvs: &[(String, String)], allowed: &[&str], what: &str) -> Result<(), SpecError> {
    for (k, _) in kvs {
        if !allowed.contains(&k.as_str()) {
            return Err(SpecError(format!(
                "{what}: unknown parameter `{k}` (allowed: {})",
                allowed.join(", ")
            )));
        }
    }
    Ok(())
}

/// Parse a noise specification:
/// `none`, `periodic:interval=1ms,detour=25us`, `poisson:interval=1ms,detour=25us`,
/// `gaussian:interval=1ms,mean=25us,sd=5us`, `detours:FILE[,scale=X]`,
/// `ftq:FILE[,cpu=N][,scale=X]`. `scale` multiplies every measured detour.
pub fn parse_noise_source(spec: &str) -> Result<NoiseSource, ChamaSpecError> {
    let (kind, rest) = spec.split_once(':').unwrap_or((spec, ""));
    match kind {
        "none" => Ok(NoiseSource::None),
        "periodic" | "poisson" => {
            let kvs = kv(rest)?;
            check_keys(&kvs, &["interval", "detour"], kind)?;
            let interval = get(&kvs, "interval", kind)?;
            let detour = get(&kvs, "detour", kind)?;
            if interval == 0 || detour >= interval {
                return Err(SpecError(format!(
                    "{kind}: need 0 < detour < interval (got detour={detour}ns interval={interval}ns)"
                ))
                .into());
            }
            Ok(if kind == "periodic" {
                NoiseSource::Periodic { interval, detour }
            } else {
                NoiseSource::Poisson { interval, detour }
            })
        }
        "gaussian" => {
            let kvs = kv(rest)?;
            check_keys(&kvs, &["interval", "mean", "sd"], kind)?;
            let interval = get(&kvs, "interval", kind)?;
            let mean = get(&kvs, "mean", kind)?;
            let sd = get(&kvs, "sd", kind)?;
            if interval < 2 || mean >= interval {
                return Err(SpecError("gaussian: need mean < interval".to_string()).into());
            }
            Ok(NoiseSource::Gaussian { interval, mean, sd })
        }
        "detours" | "ftq" => {
            // FILE may contain commas; options are trailing `,key=value` items.
            let mut path = rest.to_string();
            let mut scale = 1.0f64;
            let mut cpu: Option<u64> = None;
            while let Some((head, tail)) = path.rsplit_once(',') {
                let Some((k, v)) = tail.split_once('=') else {
                    break;
                };
                match k {
                    "scale" => {
                        scale = v
                            .parse()
                            .map_err(|_| SpecError(format!("bad scale `{v}`")))?;
                        if !(scale.is_finite() && scale >= 0.0) {
                            return Err(SpecError(format!("bad scale `{v}`")).into());
                        }
                    }
                    "cpu" if kind == "ftq" => {
                        cpu = Some(v.parse().map_err(|_| SpecError(format!("bad cpu `{v}`")))?)
                    }
                    _ => break,
                }
                path = head.to_string();
            }
            if path.is_empty() {
                return Err(
                    SpecError(format!("{kind}: needs a file name, e.g. {kind}:noise.txt")).into(),
                );
            }
            let (det, span) = if kind == "detours" {
                read_detour_trace(&path)?
            } else {
                read_ftq(&path, cpu)?
            };
            Ok(trace_source(det, span, scale))
        }
        _ => Err(SpecError(format!(
            "unknown noise `{kind}` (none, periodic, poisson, gaussian, detours, ftq)"
        ))
        .into()),
    }
}

/// Parse a latency-noise specification: `none`, `exp:mean=200ns`, `uniform:max=1us`,
/// `gauss:mean=200ns,sd=50ns`.
pub fn parse_latency(spec: &str) -> Result<LatencyNoise, SpecError> {
    let (kind, rest) = spec.split_once(':').unwrap_or((spec, ""));
    let kvs = kv(rest)?;
    match kind {
        "none" => Ok(LatencyNoise::None),
        "exp" => {
            check_keys(&kvs, &["mean"], kind)?;
            Ok(LatencyNoise::Exp {
                mean: get(&kvs, "mean", kind)?,
            })
        }
        "uniform" => {
            check_keys(&kvs, &["max"], kind)?;
            Ok(LatencyNoise::Uniform {
                max: get(&kvs, "max", kind)?,
            })
        }
        "gauss" => {
            check_keys(&kvs, &["mean", "sd"], kind)?;
            Ok(LatencyNoise::Gauss {
                mean: get(&kvs, "mean", kind)?,
                sd: get(&kvs, "sd", kind)?,
            })
        }
        _ => Err(SpecError(format!(
            "unknown latency noise `{kind}` (none, exp, uniform, gauss)"
        ))),
    }
}

/// Errors from noise specs: either the spec or the file it names.
#[derive(Debug, thiserror::Error)]
pub enum ChamaSpecError {
    /// Malformed spec.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// Unreadable noise file.
    #[error(transparent)]
    Input(#[from] InputError),
}

/// Build a replayable source from raw detours: sort, scale, merge overlaps, clip to the span.
pub fn trace_source(mut det: Vec<(u64, u64)>, span: u64, scale: f64) -> NoiseSource {
    det.sort_unstable();
    let mut starts: Vec<u64> = Vec::with_capacity(det.len());
    let mut ends: Vec<u64> = Vec::with_capacity(det.len());
    let span = span.max(1);
    for (s, d) in det {
        let d = (d as f64 * scale).round() as u64;
        if d == 0 || s >= span {
            continue;
        }
        let e = s.saturating_add(d).min(span);
        if let Some(last) = ends.last_mut() {
            if s <= *last {
                *last = (*last).max(e);
                continue;
            }
        }
        starts.push(s);
        ends.push(e);
    }
    // A span fully covered by detours would leave no CPU time at all.
    let covered: u64 = ends.iter().zip(&starts).map(|(e, s)| e - s).sum();
    if starts.is_empty() || covered >= span {
        if covered >= span {
            // Keep the CPU available for at least 1 ns per span.
            if let Some(last) = ends.last_mut() {
                *last = (*last).min(span - 1).max(starts[starts.len() - 1]);
            }
        }
        if starts.is_empty() {
            return NoiseSource::None;
        }
    }
    let index = DetourIndex::new(&ends, span);
    NoiseSource::Trace {
        starts,
        ends,
        span,
        index,
    }
}

fn io_err(path: &str, e: std::io::Error) -> InputError {
    InputError::Io {
        path: path.to_string(),
        source: e,
    }
}

fn syn(path: &str, line: u64, msg: impl Into<String>) -> InputError {
    InputError::Syntax {
        path: path.to_string(),
        line,
        msg: msg.into(),
    }
}

/// Read a selfish-detour trace: `#` comment lines (`# duration_ns=N` gives the run length),
/// then `start_ns<TAB>duration_ns` lines. Returns (detours, span).
pub fn read_detour_trace(path: &str) -> Result<(Vec<(u64, u64)>, u64), InputError> {
    let f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut det = Vec::new();
    let mut span_meta: Option<u64> = None;
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| io_err(path, e))?;
        let l = line.trim();
        let ln = i as u64 + 1;
        if l.is_empty() {
            continue;
        }
        if let Some(c) = l.strip_prefix('#') {
            if let Some(v) = c.trim().strip_prefix("duration_ns=") {
                span_meta = Some(
                    v.trim()
                        .parse()
                        .map_err(|_| syn(path, ln, format!("bad duration_ns `{v}`")))?,
                );
            }
            continue;
        }
        let mut it = l.split(['\t', ' ']).filter(|x| !x.is_empty());
        let (Some(a), Some(b), None) = (it.next(), it.next(), it.next()) else {
            return Err(syn(path, ln, "expected `start_ns<TAB>duration_ns`"));
        };
        let s: u64 = a
            .parse()
            .map_err(|_| syn(path, ln, format!("bad start_ns `{a}`")))?;
        let d: u64 = b
            .parse()
            .map_err(|_| syn(path, ln, format!("bad duration_ns `{b}`")))?;
        det.push((s, d));
    }
    if det.is_empty() {
        return Err(syn(path, 1, "the detour trace holds no detours"));
    }
    let max_end = det
        .iter()
        .map(|&(s, d)| s.saturating_add(d))
        .max()
        .unwrap_or(1);
    let span = span_meta.unwrap_or(max_end).max(max_end).max(1);
    Ok((det, span))
}

/// Read an FTQ CSV: lost work per interval = (nominal_count - count) * quantum_ns, placed as a
/// detour at the start of that interval. `cpu` selects a CPU's series (default: the first).
pub fn read_ftq(path: &str, cpu: Option<u64>) -> Result<(Vec<(u64, u64)>, u64), InputError> {
    let f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut interval: Option<u64> = None;
    let mut quantum: Option<f64> = None;
    let mut nominal: Option<u64> = None;
    let mut det = Vec::new();
    let mut span = 0u64;
    let mut chosen = cpu;
    let mut header = false;
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| io_err(path, e))?;
        let l = line.trim();
        let ln = i as u64 + 1;
        if i == 0 && l != "# puma-noise ftq v1" {
            return Err(syn(
                path,
                1,
                "not a puma-noise FTQ CSV (first line must be `# puma-noise ftq v1`)",
            ));
        }
        if l.is_empty() {
            continue;
        }
        if let Some(c) = l.strip_prefix('#') {
            let c = c.trim();
            if let Some((k, v)) = c.split_once('=') {
                let bad = |what: &str| syn(path, ln, format!("bad {what} `{v}`"));
                match k.trim() {
                    "interval_ns" => interval = Some(v.trim().parse().map_err(|_| bad(k))?),
                    "quantum_ns" => quantum = Some(v.trim().parse().map_err(|_| bad(k))?),
                    "nominal_count" => nominal = Some(v.trim().parse().map_err(|_| bad(k))?),
                    _ => {}
                }
            }
            continue;
        }
        if !header {
            if l.replace(' ', "") != "cpu,index,start_ns,count" {
                return Err(syn(path, ln, "expected header `cpu,index,start_ns,count`"));
            }
            header = true;
            continue;
        }
        let (Some(iv), Some(q), Some(nom)) = (interval, quantum, nominal) else {
            return Err(syn(
                path,
                ln,
                "metadata `interval_ns`, `quantum_ns` and `nominal_count` must precede the data",
            ));
        };
        let mut it = l.split(',').map(str::trim);
        let (Some(c), Some(_idx), Some(st), Some(cnt), None) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            return Err(syn(path, ln, "expected `cpu,index,start_ns,count`"));
        };
        let c: u64 = c
            .parse()
            .map_err(|_| syn(path, ln, format!("bad cpu `{c}`")))?;
        let st: u64 = st
            .parse()
            .map_err(|_| syn(path, ln, format!("bad start_ns `{st}`")))?;
        let cnt: u64 = cnt
            .parse()
            .map_err(|_| syn(path, ln, format!("bad count `{cnt}`")))?;
        let want = *chosen.get_or_insert(c);
        if c != want {
            continue;
        }
        span = span.max(st.saturating_add(iv));
        let lost = ((nom.saturating_sub(cnt)) as f64 * q).round() as u64;
        if lost > 0 {
            det.push((st, lost.min(iv)));
        }
    }
    if span == 0 {
        return Err(syn(
            path,
            1,
            "the FTQ file holds no samples for the chosen CPU",
        ));
    }
    Ok((det, span))
}

impl NoiseSource {
    /// The same source with every detour `f` times as long (amplitude sweeps). Detours stay
    /// shorter than their interval so the CPU is never unavailable forever.
    pub fn scaled(&self, f: f64) -> NoiseSource {
        let sc = |d: u64, cap: u64| ((d as f64 * f).round() as u64).min(cap.saturating_sub(1));
        match self {
            NoiseSource::None => NoiseSource::None,
            NoiseSource::Periodic { interval, detour } => NoiseSource::Periodic {
                interval: *interval,
                detour: sc(*detour, *interval),
            },
            NoiseSource::Poisson { interval, detour } => NoiseSource::Poisson {
                interval: *interval,
                detour: sc(*detour, *interval),
            },
            NoiseSource::Gaussian { interval, mean, sd } => NoiseSource::Gaussian {
                interval: *interval,
                mean: sc(*mean, *interval),
                sd: (*sd as f64 * f).round() as u64,
            },
            NoiseSource::Trace {
                starts, ends, span, ..
            } => {
                let det = starts.iter().zip(ends).map(|(&s, &e)| (s, e - s)).collect();
                trace_source(det, *span, f)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bucket index gives what a binary search over all ends gives, for every time in the
    /// span: ends clustered, spread, at 0 and at the span's end, one detour and many.
    #[test]
    fn detour_index_matches_binary_search() {
        let cases: Vec<(Vec<u64>, u64)> = vec![
            (vec![5], 10),
            (vec![10], 10),
            (vec![1, 2, 3, 4, 5, 6, 7, 8, 9], 10),
            (vec![3, 4, 5, 900, 901, 902, 903, 904, 999], 1000),
            ((1..200).map(|i| i * i).collect(), 40_001),
            ((0..64).map(|i| 1_000_000 + i).collect(), 1u64 << 40),
        ];
        for (ends, span) in cases {
            let ix = DetourIndex::new(&ends, span);
            assert!(!ix.first.is_empty());
            let step = (span / 5000).max(1);
            let mut taus: Vec<u64> = (0..span).step_by(step as usize).collect();
            for &e in &ends {
                taus.extend([e.saturating_sub(1), e, e + 1]);
            }
            taus.push(span - 1);
            for tau in taus.into_iter().filter(|&t| t < span) {
                assert_eq!(
                    ix.first_end_after(&ends, tau),
                    ends.partition_point(|&e| e <= tau),
                    "ends {ends:?} span {span} tau {tau}"
                );
            }
        }
    }

    /// The default (empty) index searches the whole trace.
    #[test]
    fn detour_index_default_searches_everything() {
        let ends = [10u64, 20, 30];
        let none = DetourIndex::default();
        for tau in 0..40 {
            assert_eq!(
                none.first_end_after(&ends, tau),
                ends.partition_point(|&e| e <= tau)
            );
        }
    }

    /// A replayed trace puts each detour where the file says, shifted by the rank's phase.
    #[test]
    fn trace_lookup_finds_every_detour() {
        let det: Vec<(u64, u64)> = (0..500)
            .map(|i| (i * 2000 + (i % 7) * 100, 50 + i % 13))
            .collect();
        let src = trace_source(det.clone(), 1_000_000, 1.0);
        let n = Noise {
            source: src,
            coscheduled: true,
            latency: LatencyNoise::None,
            seed: 9,
        };
        let p = 1_000_000;
        let shift = p - n.phase(0, p);
        for &(s, d) in &det {
            // The detour recorded at s is at s - shift (mod p) in simulated time.
            let t = (s + p - shift % p) % p + p;
            assert_eq!(n.next_detour(0, t), (t, t + d), "detour at {s}");
        }
    }

    /// The per-rank detour cache gives `finish`'s result for every source, with calls in
    /// time order, out of order, inside detours and across trace periods.
    #[test]
    fn cached_finish_is_finish() {
        let det: Vec<(u64, u64)> = (0..300)
            .map(|i| (i * 3000 + (i % 5) * 200, 40 + i % 11))
            .collect();
        let sources = [
            NoiseSource::Periodic {
                interval: 10_000,
                detour: 700,
            },
            // Detours longer than 16 bits of nanoseconds.
            NoiseSource::Periodic {
                interval: 300_000,
                detour: 100_000,
            },
            NoiseSource::Poisson {
                interval: 5_000,
                detour: 900,
            },
            NoiseSource::Gaussian {
                interval: 8_000,
                mean: 600,
                sd: 300,
            },
            trace_source(det, 1_000_000, 1.0),
        ];
        for (si, src) in sources.into_iter().enumerate() {
            let n = Noise {
                source: src,
                coscheduled: false,
                latency: LatencyNoise::None,
                seed: 11,
            };
            let mut caches = [DETOUR_CACHE_EMPTY; 3];
            let mut x = 5u64;
            let mut now = [0u64; 3];
            let mut hits = 0;
            for step in 0..20_000u64 {
                x = mix(x);
                let rank = (x % 3) as u32;
                let r = rank as usize;
                // Mostly forward in time, sometimes back; short and long computations.
                let start = if x % 7 == 0 {
                    now[r].saturating_sub(x >> 40 & 0xffff)
                } else {
                    now[r] + (x >> 20 & 0x3ff)
                };
                let work = if x % 5 == 0 {
                    x >> 8 & 0x3_ffff
                } else {
                    x >> 30 & 0xff
                };
                let before = caches[r];
                hits += usize::from(cache_get(&before, start).is_some());
                let want = n.finish(rank, start, work);
                let got = n.finish_cached(rank, start, work, &mut caches[r]);
                assert_eq!(got, want, "source {si} step {step} rank {rank} start {start} work {work} cache {before:?}");
                now[r] = start.max(got);
            }
            // The cache is used (otherwise this test would test nothing).
            assert!(hits > 5_000, "source {si}: {hits} hits");
        }
    }
}
