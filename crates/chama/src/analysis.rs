//! Compare a noisy run with the noise-free run of the same schedule: slowdown, per-rank wait,
//! critical path, and per operation class how much noise and skew was absorbed or amplified.

use std::time::Instant;

use crate::noise::Noise;
use crate::schedule::{Op, OpKind, Schedule};
use crate::sim::{
    critical_path_from, fill_states, fill_states_counted, initial_state_threads, refill_state,
    simulate, simulate_from, state_template, CriticalPath, OpState, Params, Scratch, SimOptions,
    SimOutput, Split, PARALLEL_SIM_OPS,
};
use crate::states::States;

/// Min / mean / max of a per-rank quantity.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Stats {
    /// Minimum.
    pub min: u64,
    /// Mean.
    pub mean: f64,
    /// Maximum.
    pub max: u64,
}

impl Stats {
    fn of(v: &[u64]) -> Stats {
        if v.is_empty() {
            return Stats::default();
        }
        let sum: u128 = v.iter().map(|&x| x as u128).sum();
        Stats {
            min: v.iter().copied().min().unwrap_or(0),
            mean: sum as f64 / v.len() as f64,
            max: v.iter().copied().max().unwrap_or(0),
        }
    }
}

/// Per (class, kind) noise and skew accounting.
///
/// For each operation: `delay_in` = how much later its dependencies were satisfied than without
/// noise, `delay_out` = how much later it completed, `noise` = detour time inside its own CPU
/// work. `absorbed` = max(0, delay_in + noise - delay_out) (slack swallowed delay);
/// `amplified` = max(0, delay_out - delay_in - noise) (delay appeared that neither came in nor was
/// injected here: a late partner, i.e. skew carried by a message, or CPU contention).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ClassRow {
    /// Class name (collective or phase).
    pub class: String,
    /// Operation kind.
    pub kind: String,
    /// Operations.
    pub ops: u64,
    /// Detour time injected into these operations (ns).
    pub noise_injected_ns: u64,
    /// Sum of input delays (ns).
    pub delay_in_ns: i128,
    /// Sum of output delays (ns).
    pub delay_out_ns: i128,
    /// Delay absorbed (ns).
    pub absorbed_ns: u128,
    /// Delay amplified (ns).
    pub amplified_ns: u128,
    /// Time receives of this class were posted before their message arrived, without noise (ns).
    pub wait_clean_ns: u64,
    /// The same with noise (ns): the skew between partners this class saw.
    pub wait_noisy_ns: u64,
}

/// Everything `chama run` reports.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    /// Input description.
    pub input: String,
    /// Ranks.
    pub ranks: u32,
    /// Operations.
    pub ops: u64,
    /// Dependencies.
    pub dependencies: u64,
    /// LogGOPS parameters.
    pub params: Option<Params>,
    /// Noise description.
    pub noise: String,
    /// Seed.
    pub seed: u64,
    /// Completion time with noise (ns).
    pub completion_ns: u64,
    /// Completion time without noise (ns).
    pub baseline_ns: u64,
    /// completion / baseline.
    pub slowdown: f64,
    /// Events processed (both runs).
    pub events: u64,
    /// Simulation wall time (both runs, run in parallel on two threads, s).
    pub sim_seconds: f64,
    /// Events per second of wall time (both runs together).
    pub events_per_second: f64,
    /// Per-rank wait (completion minus CPU busy time) with noise.
    pub rank_wait_ns: Stats,
    /// Per-rank completion time with noise.
    pub rank_end_ns: Stats,
    /// Critical path of the noisy run.
    pub critical_path: CriticalPath,
    /// Per class and kind.
    pub classes: Vec<ClassRow>,
    /// Operations that never completed (noisy run).
    pub unfinished_ops: u64,
    /// Receives left unmatched.
    pub unmatched_recvs: u64,
    /// Messages never received.
    pub unmatched_sends: u64,
    /// CPU time of the whole process (load + both runs on two threads + analysis, s), filled in
    /// by the command.
    pub cpu_seconds: f64,
    /// Peak resident memory of the process (KiB, VmHWM), filled in by the command.
    pub peak_memory_kib: u64,
    /// Per rank (only when requested): (end_clean, end_noisy, wait_noisy).
    #[serde(skip)]
    pub per_rank: Vec<(u64, u64, u64)>,
}

/// Run the noise-free and the noisy simulation and analyse them.
pub fn analyse(
    s: &Schedule,
    p: &Params,
    noise: &Noise,
    input: &str,
    noise_desc: &str,
    path_limit: usize,
    per_rank: bool,
) -> Report {
    analyse_with(
        s, p, noise, input, noise_desc, path_limit, per_rank, None, 1,
    )
    .0
}

/// The simulation results behind a [`Report`] from [`analyse_with`]: gigabytes for a large
/// schedule, handed back so that a caller about to exit can leave them to the kernel instead of
/// freeing them (`chama run`). Dropping them frees them.
#[derive(Default)]
pub struct Runs {
    _outputs: Vec<SimOutput>,
    _kept: Option<CleanKept>,
    _scratch: Option<Scratch>,
}

/// [`analyse`], given a [`crate::sim::state_template`] of `s.len()` states written
/// beforehand (ignored if its length is not the schedule's), on `threads` threads: with two or
/// more and a schedule [`crate::sim::can_split`] splits, each run is simulated on two threads,
/// one after the other (the noise-free run first, from the template; the noisy run reuses its
/// state array); otherwise the two runs go side by side, one thread each (the noisy run from
/// the template).
#[allow(clippy::too_many_arguments)]
pub fn analyse_with(
    s: &Schedule,
    p: &Params,
    noise: &Noise,
    input: &str,
    noise_desc: &str,
    path_limit: usize,
    per_rank: bool,
    template: Option<States>,
    threads: usize,
) -> (Report, Runs) {
    analyse_split_from(
        s,
        p,
        noise,
        (input, noise_desc),
        path_limit,
        per_rank,
        template,
        threads,
        PARALLEL_SIM_OPS,
    )
}

/// [`analyse_with`], with runs of `min_parallel_ops` operations or more on two threads.
#[allow(clippy::too_many_arguments)]
fn analyse_split_from(
    s: &Schedule,
    p: &Params,
    noise: &Noise,
    (input, noise_desc): (&str, &str),
    path_limit: usize,
    per_rank: bool,
    template: Option<States>,
    threads: usize,
    min_parallel_ops: usize,
) -> (Report, Runs) {
    let t0 = Instant::now();
    let busy = SimOptions {
        record_busy: true,
        threads,
        min_parallel_ops,
        ..SimOptions::default()
    };
    let noisy_opts = SimOptions {
        record_noise: true,
        ..busy
    };
    let split = Split::of(s, p, &busy);
    let init = |t: Option<States>| match t {
        Some(t) if t.len() == s.len() => fill_states(s, t, 2),
        _ => initial_state_threads(s, 2),
    };
    let (mut clean, noisy_run, kept) = if noise.is_quiet() {
        s.release_spare();
        (simulate(s, p, &Noise::none(), &busy), None, None)
    } else if split.two_threads() {
        // Each run takes both cores. The noise-free run goes first, from the template; what the
        // comparison needs of it is kept in a quarter of the space, and its state array is
        // filled in again for the noisy run (its pages already mapped: a fresh 1.3 GB array at
        // a million ranks is 330 K page faults, about 0.9 s of CPU). The noisy run takes over
        // the event queues and rank states too. The edge arrays a generated schedule's build
        // left hold the kept durations and the noisy run's noise per operation (their pages
        // are mapped already).
        // The first fill leaves the pending-dependency counts in the buffer that later holds
        // the kept durations, where the refill reads them back (no second pass over the edges).
        let mut scratch = Scratch::default();
        let mut counts = op_buffer(s.len(), s.spare.take());
        let template = match template {
            Some(t) if t.len() == s.len() => t,
            _ => state_template(s.len()),
        };
        let st = fill_states_counted(s, template, &mut counts, 2);
        let mut c = simulate_from(
            s,
            p,
            &Noise::none(),
            &busy,
            st,
            Some(&split),
            Some(&mut scratch),
        );
        let mut st = std::mem::take(&mut c.st);
        let kept = keep_clean(s, &mut st, per_rank, counts);
        scratch.noise = s.spare.take();
        s.release_spare();
        let n = simulate_from(
            s,
            p,
            noise,
            &noisy_opts,
            st,
            Some(&split),
            Some(&mut scratch),
        );
        (c, Some(n), Some((kept, scratch)))
    } else {
        // The noise-free and the noisy run are independent: run them on two threads.
        // The noisy run takes longer: it gets its initial states first, built on both cores;
        // the noise-free run builds its own on its thread.
        s.release_spare();
        let init = init(template);
        let one = SimOptions { threads: 1, ..busy };
        let noisy_one = SimOptions {
            threads: 1,
            ..noisy_opts
        };
        std::thread::scope(|sc| {
            let h = sc.spawn(|| {
                let st = initial_state_threads(s, 1);
                simulate_from(s, p, &Noise::none(), &one, st, None, None)
            });
            let n = simulate_from(s, p, noise, &noisy_one, init, None, None);
            match h.join() {
                Ok(c) => (c, Some(n), None),
                // The simulator does not panic on any input; if it did, run it again here so the
                // panic surfaces on this thread with its message.
                Err(_) => (simulate(s, p, &Noise::none(), &one), Some(n), None),
            }
        })
    };
    // The kept sums cover the operations the noise-free run completed; they are the ones both
    // runs completed when the noisy run completed everything.
    let (kept, scratch) = match kept {
        Some((k, sc)) => (Some(k), Some(sc)),
        None => (None, None),
    };
    let kept = kept.filter(|k| {
        k.exact
            && noisy_run
                .as_ref()
                .is_some_and(|n: &SimOutput| n.unfinished() == 0)
    });
    if clean.st.len() != s.len() && kept.is_none() {
        // Rare (a schedule the noise leaves unfinished, or an operation ending before it was
        // ready): simulate the noise-free run again, into states of its own, for the full
        // comparison.
        clean.st = simulate_from(s, p, &Noise::none(), &busy, init(None), Some(&split), None).st;
    }
    let noisy: &SimOutput = noisy_run.as_ref().unwrap_or(&clean);
    let secs = t0.elapsed().as_secs_f64();
    let events = clean.events + if noise.is_quiet() { 0 } else { noisy.events };
    let mut r = Report {
        input: input.to_string(),
        ranks: s.num_ranks,
        ops: s.len() as u64,
        dependencies: s.num_edges() as u64,
        params: Some(*p),
        noise: noise_desc.to_string(),
        seed: noise.seed,
        completion_ns: noisy.completion,
        baseline_ns: clean.completion,
        slowdown: if clean.completion > 0 {
            noisy.completion as f64 / clean.completion as f64
        } else {
            1.0
        },
        events,
        sim_seconds: secs,
        events_per_second: events as f64 / secs.max(1e-9),
        unfinished_ops: noisy.unfinished(),
        unmatched_recvs: noisy.unmatched_recvs,
        unmatched_sends: noisy.unmatched_sends,
        ..Report::default()
    };
    let c = match &kept {
        Some(k) => compare(s, Clean::Kept(k), noisy, per_rank),
        None => compare(s, Clean::Full(&clean.st), noisy, per_rank),
    };
    r.critical_path = critical_path_from(s, noisy, path_limit, c.last.map(|(_, i)| i));
    let ends = c.noisy_end;
    let waits: Vec<u64> = if noisy.rank_busy.is_empty() {
        Vec::new()
    } else {
        ends.iter()
            .zip(&noisy.rank_busy)
            .map(|(&e, &b)| e.saturating_sub(b))
            .collect()
    };
    r.rank_end_ns = Stats::of(&ends);
    r.rank_wait_ns = Stats::of(&waits);
    if per_rank {
        let ce = c.clean_end;
        r.per_rank = (0..s.num_ranks as usize)
            .map(|i| (ce[i], ends[i], waits.get(i).copied().unwrap_or(0)))
            .collect();
    }
    r.classes = class_rows(s, &c.sums, &clean, noisy);
    let mut outputs = vec![clean];
    outputs.extend(noisy_run);
    (
        r,
        Runs {
            _outputs: outputs,
            _kept: kept,
            _scratch: scratch,
        },
    )
}

/// [`CleanKept::dur`]: the operation never completed.
const DUR_NONE: u32 = u32::MAX;
/// [`CleanKept::dur`]: the duration does not fit, it is in [`CleanKept::long`].
const DUR_LONG: u32 = u32::MAX - 1;

/// What the comparison keeps of a noise-free run whose state array went on to the noisy run.
#[derive(Debug, Default)]
struct CleanKept {
    /// Per operation: its end minus its ready time if below [`DUR_LONG`] ns (4.3 s), else
    /// [`DUR_LONG`] ([`DUR_NONE`]: it never completed). Four bytes, not eight: at a million
    /// ranks that is 168 MB (41 K page faults) less.
    dur: Vec<u32>,
    /// The durations of [`DUR_LONG`] or more: (operation, duration), by operation.
    long: Vec<(usize, u64)>,
    /// Per class * 3 + kind: the sums of the ready and of the end times of the operations that
    /// completed.
    ready_sum: Vec<i128>,
    end_sum: Vec<i128>,
    /// Per rank: completion of its last operation (empty unless asked for).
    rank_end: Vec<u64>,
    /// False if an operation ended before it was ready (then `dur` cannot hold it).
    exact: bool,
}

impl CleanKept {
    /// Keep what the comparison needs of operations `lo..lo + part.len()` of a finished run
    /// and fill their states in again for a new run (as [`fill_states`] does, in the same
    /// pass); `dur` is theirs, and holds their pending-dependency counts on entry (as
    /// [`fill_states_counted`] leaves them), replaced by the durations.
    fn take(
        s: &Schedule,
        lo: usize,
        part: &mut [OpState],
        dur: &mut [u32],
        per_rank: bool,
    ) -> Self {
        let classes = s.class_names.len() * 3;
        let mut k = CleanKept {
            dur: Vec::new(),
            long: Vec::new(),
            ready_sum: vec![0; classes],
            end_sum: vec![0; classes],
            rank_end: if per_rank {
                vec![0; s.num_ranks as usize]
            } else {
                Vec::new()
            },
            exact: true,
        };
        let ops: &[Op] = &s.ops;
        for (i, (x, d)) in part.iter_mut().zip(dur.iter_mut()).enumerate() {
            let pending = *d;
            if x.end != u64::MAX {
                let o = &ops[lo + i];
                let c = o.class as usize * 3 + o.kind as usize;
                k.ready_sum[c] += x.ready as i128;
                k.end_sum[c] += x.end as i128;
                if let Some(e) = k.rank_end.get_mut(o.rank as usize) {
                    *e = (*e).max(x.end);
                }
                match x.end.checked_sub(x.ready) {
                    Some(v) if v < DUR_LONG as u64 => *d = v as u32,
                    Some(v) => {
                        *d = DUR_LONG;
                        k.long.push((lo + i, v));
                    }
                    None => k.exact = false,
                }
            } else {
                *d = DUR_NONE;
            }
            refill_state(x);
            x.link = pending;
        }
        k
    }

    /// The noise-free duration of `op` (end minus ready), `None` if it never completed.
    #[inline]
    fn dur(&self, op: usize) -> Option<u64> {
        match self.dur[op] {
            DUR_NONE => None,
            DUR_LONG => self
                .long
                .binary_search_by_key(&op, |&(o, _)| o)
                .ok()
                .map(|i| self.long[i].1),
            d => Some(d as u64),
        }
    }

    /// Merge `b` (of operations after all of `self`'s) into `self`.
    fn merge(mut self, mut b: CleanKept) -> Self {
        self.long.append(&mut b.long);
        for (x, y) in self.ready_sum.iter_mut().zip(&b.ready_sum) {
            *x += y;
        }
        for (x, y) in self.end_sum.iter_mut().zip(&b.end_sum) {
            *x += y;
        }
        for (x, &y) in self.rank_end.iter_mut().zip(&b.rank_end) {
            *x = (*x).max(y);
        }
        self.exact &= b.exact;
        self
    }
}

/// A buffer of `n` entries for [`fill_states_counted`]'s counts and then [`keep_clean`]'s
/// durations: `spare` (any content; every entry is written before it is read) if there is
/// one, else a zeroed vector (fresh pages, first written by the thread that owns them).
fn op_buffer(n: usize, spare: Option<Vec<u32>>) -> Vec<u32> {
    match spare {
        Some(mut v) => {
            v.truncate(n);
            v.resize(n, 0);
            v
        }
        None => vec![0u32; n],
    }
}

/// Keep what the comparison needs of the finished run in `st` and fill `st` in again for a new
/// run of `s`, on two threads for large schedules; `counts` holds the pending-dependency
/// counts of `s`'s operations ([`fill_states_counted`]) and returns as the kept durations.
fn keep_clean(s: &Schedule, st: &mut [OpState], per_rank: bool, counts: Vec<u32>) -> CleanKept {
    let n = st.len();
    debug_assert_eq!(counts.len(), n);
    let mut dur = counts;
    let mut k = if n < PARALLEL_MIN_OPS {
        CleanKept::take(s, 0, st, &mut dur, per_rank)
    } else {
        let mid = n / 2;
        let (a, b) = st.split_at_mut(mid);
        let (da, db) = dur.split_at_mut(mid);
        std::thread::scope(|sc| {
            let h = sc.spawn(|| CleanKept::take(s, mid, b, db, per_rank));
            let ka = CleanKept::take(s, 0, a, da, per_rank);
            match h.join() {
                Ok(kb) => ka.merge(kb),
                Err(e) => std::panic::resume_unwind(e),
            }
        })
    };
    k.dur = dur;
    k
}

/// Per (class, kind) sums over the operations both runs completed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ClassSum {
    ops: u64,
    noise: u64,
    delay_in: i128,
    delay_out: i128,
    absorbed: u128,
    amplified: u128,
}

/// What one pass over the operations of both runs collects.
struct Comparison {
    /// Per class * 3 + kind.
    sums: Vec<ClassSum>,
    /// Per rank: completion of its last operation with noise.
    noisy_end: Vec<u64>,
    /// The same without noise (empty unless asked for).
    clean_end: Vec<u64>,
    /// The latest noisy completion and the lowest operation completing then.
    last: Option<(u64, usize)>,
}

impl Comparison {
    fn new(s: &Schedule, per_rank: bool) -> Self {
        let ranks = s.num_ranks as usize;
        Comparison {
            sums: vec![ClassSum::default(); s.class_names.len() * 3],
            noisy_end: vec![0; ranks],
            clean_end: if per_rank { vec![0; ranks] } else { Vec::new() },
            last: None,
        }
    }

    /// Add operations `ops` of both runs.
    fn scan(&mut self, s: &Schedule, clean: Clean, noisy: &SimOutput, ops: std::ops::Range<usize>) {
        let noise = &noisy.noise;
        let all: &[Op] = &s.ops;
        for op in ops {
            let o = &all[op];
            let r = o.rank as usize;
            let n = &noisy.st[op];
            if n.end != u64::MAX {
                if n.end > self.noisy_end[r] {
                    self.noisy_end[r] = n.end;
                }
                if self.last.is_none_or(|(e, _)| n.end > e) {
                    self.last = Some((n.end, op));
                }
            }
            // The noise-free ready and end times subtracted here, and its duration (end
            // minus ready). Kept runs subtract their sums of ready and end times afterwards.
            let (c_ready, c_end, c_dur) = match clean {
                Clean::Full(st) => {
                    let c = &st[op];
                    if !self.clean_end.is_empty() && c.end != u64::MAX && c.end > self.clean_end[r]
                    {
                        self.clean_end[r] = c.end;
                    }
                    if c.end == u64::MAX {
                        continue;
                    }
                    (
                        c.ready as i128,
                        c.end as i128,
                        c.end as i128 - c.ready as i128,
                    )
                }
                Clean::Kept(k) => match k.dur(op) {
                    None => continue,
                    Some(d) => (0, 0, d as i128),
                },
            };
            if n.end == u64::MAX {
                continue;
            }
            let row = &mut self.sums[o.class as usize * 3 + o.kind as usize];
            row.ops += 1;
            let nz = if noise.is_empty() {
                0
            } else {
                noise[op] as i128
            };
            row.noise += nz as u64;
            row.delay_in += n.ready as i128 - c_ready;
            row.delay_out += n.end as i128 - c_end;
            // Delay in, plus noise, minus delay out.
            let absorbed = n.ready as i128 - n.end as i128 + nz + c_dur;
            if absorbed > 0 {
                row.absorbed += absorbed as u128;
            } else {
                row.amplified += (-absorbed) as u128;
            }
        }
    }

    /// Merge `b`, which scanned operations after all of `self`'s.
    fn merge(mut self, b: Comparison) -> Self {
        for (x, y) in self.sums.iter_mut().zip(&b.sums) {
            x.ops += y.ops;
            x.noise += y.noise;
            x.delay_in += y.delay_in;
            x.delay_out += y.delay_out;
            x.absorbed += y.absorbed;
            x.amplified += y.amplified;
        }
        for (x, &y) in self.noisy_end.iter_mut().zip(&b.noisy_end) {
            *x = (*x).max(y);
        }
        for (x, &y) in self.clean_end.iter_mut().zip(&b.clean_end) {
            *x = (*x).max(y);
        }
        // Ties keep the earlier operation, which is `self`'s.
        if let Some((e, i)) = b.last {
            if self.last.is_none_or(|(le, _)| e > le) {
                self.last = Some((e, i));
            }
        }
        self
    }
}

/// Operations below which [`compare`] does not bother with a second thread.
const PARALLEL_MIN_OPS: usize = 1 << 16;

/// The noise-free run as [`compare`] reads it.
#[derive(Clone, Copy)]
enum Clean<'a> {
    /// Its states.
    Full(&'a [OpState]),
    /// What [`keep_clean`] kept of them.
    Kept(&'a CleanKept),
}

/// One pass over every operation of both runs (split over two threads for large schedules):
/// class sums, per-rank completion, the last operation.
fn compare(s: &Schedule, clean: Clean, noisy: &SimOutput, per_rank: bool) -> Comparison {
    let n = s.len();
    let kept = match clean {
        Clean::Kept(k) => Some(k),
        Clean::Full(_) => None,
    };
    // Per-rank noise-free ends come from the states, or were kept.
    let full_ranks = per_rank && kept.is_none();
    let mut a = Comparison::new(s, full_ranks);
    if n < PARALLEL_MIN_OPS {
        a.scan(s, clean, noisy, 0..n);
    } else {
        let mid = n / 2;
        a = std::thread::scope(|sc| {
            let h = sc.spawn(|| {
                let mut b = Comparison::new(s, full_ranks);
                b.scan(s, clean, noisy, mid..n);
                b
            });
            a.scan(s, clean, noisy, 0..mid);
            match h.join() {
                Ok(b) => a.merge(b),
                // `scan` does not panic; if it did, redo that half here so the panic surfaces.
                Err(_) => {
                    a.scan(s, clean, noisy, mid..n);
                    a
                }
            }
        });
    }
    if let Some(k) = kept {
        for ((x, r), e) in a.sums.iter_mut().zip(&k.ready_sum).zip(&k.end_sum) {
            x.delay_in -= r;
            x.delay_out -= e;
        }
        if per_rank {
            a.clean_end = k.rank_end.clone();
        }
    }
    a
}

fn class_rows(
    s: &Schedule,
    sums: &[ClassSum],
    clean: &SimOutput,
    noisy: &SimOutput,
) -> Vec<ClassRow> {
    let nclass = s.class_names.len();
    let mut rows: Vec<ClassRow> = Vec::with_capacity(nclass * 3);
    for c in 0..nclass {
        for k in [OpKind::Send, OpKind::Recv, OpKind::Calc] {
            let x = sums[c * 3 + k as usize];
            rows.push(ClassRow {
                class: s.class_names[c].clone(),
                kind: k.name().to_string(),
                ops: x.ops,
                noise_injected_ns: x.noise,
                delay_in_ns: x.delay_in,
                delay_out_ns: x.delay_out,
                absorbed_ns: x.absorbed,
                amplified_ns: x.amplified,
                ..ClassRow::default()
            });
        }
    }
    // Receive waits are accumulated per class by the simulator.
    for c in 0..nclass {
        let row = &mut rows[c * 3 + OpKind::Recv as usize];
        row.wait_clean_ns = clean.class_wait[c];
        row.wait_noisy_ns = noisy.class_wait[c];
    }
    rows.retain(|r| r.ops > 0);
    rows
}

/// Per-class table as CSV.
pub fn classes_csv(r: &Report) -> String {
    let mut s = String::from(
        "class,kind,ops,noise_injected_ns,delay_in_ns,delay_out_ns,absorbed_ns,amplified_ns,wait_clean_ns,wait_noisy_ns\n",
    );
    for c in &r.classes {
        s += &format!(
            "{},{},{},{},{},{},{},{},{},{}\n",
            c.class,
            c.kind,
            c.ops,
            c.noise_injected_ns,
            c.delay_in_ns,
            c.delay_out_ns,
            c.absorbed_ns,
            c.amplified_ns,
            c.wait_clean_ns,
            c.wait_noisy_ns
        );
    }
    s
}

/// Per-rank table as CSV.
pub fn ranks_csv(r: &Report) -> String {
    let mut s = String::from("rank,end_clean_ns,end_noisy_ns,wait_noisy_ns\n");
    for (i, (a, b, w)) in r.per_rank.iter().enumerate() {
        s += &format!("{i},{a},{b},{w}\n");
    }
    s
}

/// Human-readable summary.
pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    s += &format!(
        "input: {}\nranks: {}  operations: {}  dependencies: {}\nnoise: {} (seed {})\n",
        r.input, r.ranks, r.ops, r.dependencies, r.noise, r.seed
    );
    s += &format!(
        "completion: {} ns  noise-free: {} ns  slowdown: {:.4}\n",
        r.completion_ns, r.baseline_ns, r.slowdown
    );
    s += &format!(
        "rank end (ns): min {} mean {:.0} max {}\nrank wait (ns): min {} mean {:.0} max {}\n",
        r.rank_end_ns.min,
        r.rank_end_ns.mean,
        r.rank_end_ns.max,
        r.rank_wait_ns.min,
        r.rank_wait_ns.mean,
        r.rank_wait_ns.max
    );
    let cp = &r.critical_path;
    s += &format!(
        "critical path: {} ops, {} messages, {} CPU-contention edges, {} ranks, calc {} ns, noise {} ns\n",
        cp.length, cp.messages, cp.cpu_contention, cp.ranks_visited, cp.calc_ns, cp.noise_ns
    );
    s += &format!(
        "events: {} in {:.3} s ({:.2} M events/s)\n",
        r.events,
        r.sim_seconds,
        r.events_per_second / 1e6
    );
    if r.unfinished_ops > 0 {
        s += &format!(
            "WARNING: {} operations never completed ({} receives unmatched, {} messages never received)\n",
            r.unfinished_ops, r.unmatched_recvs, r.unmatched_sends
        );
    }
    s += "class          kind   ops        noise_ns     absorbed_ns  amplified_ns  wait_clean_ns wait_noisy_ns\n";
    for c in &r.classes {
        s += &format!(
            "{:<14} {:<6} {:<10} {:<12} {:<12} {:<13} {:<13} {}\n",
            c.class,
            c.kind,
            c.ops,
            c.noise_injected_ns,
            c.absorbed_ns,
            c.amplified_ns,
            c.wait_clean_ns,
            c.wait_noisy_ns
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gen::{generate, GenParams, Pattern};
    use crate::noise::{LatencyNoise, NoiseSource};

    /// The comparison split over two threads gives what one pass over all operations gives,
    /// and its rank ends and last operation are those of the simulator's own helpers.
    #[test]
    fn comparison_on_two_threads_is_the_same() {
        let s = generate(
            Pattern::AllreduceRd,
            &GenParams {
                ranks: 4_000,
                reduce_ps_per_byte: 1_000,
                ..GenParams::default()
            },
        )
        .expect("generator");
        assert!(s.len() >= PARALLEL_MIN_OPS);
        let noise = Noise {
            source: NoiseSource::Poisson {
                interval: 50_000,
                detour: 5_000,
            },
            coscheduled: false,
            latency: LatencyNoise::Exp { mean: 200 },
            seed: 3,
        };
        let p = Params::default();
        let opts = SimOptions {
            record_noise: true,
            record_busy: true,
            ..SimOptions::default()
        };
        let clean = simulate(&s, &p, &Noise::none(), &opts);
        let noisy = simulate(&s, &p, &noise, &opts);
        let two = compare(&s, Clean::Full(&clean.st), &noisy, true);
        let mut one = Comparison::new(&s, true);
        one.scan(&s, Clean::Full(&clean.st), &noisy, 0..s.len());
        assert_eq!(two.sums, one.sums);
        assert!(one.sums.iter().any(|x| x.absorbed > 0 && x.amplified > 0));
        assert_eq!(two.noisy_end, one.noisy_end);
        assert_eq!(two.clean_end, one.clean_end);
        assert_eq!(two.last, one.last);
        assert_eq!(one.noisy_end, noisy.rank_end(&s));
        assert_eq!(one.clean_end, clean.rank_end(&s));
        let last = one.last.map(|(_, i)| i);
        assert_eq!(
            format!("{:?}", critical_path_from(&s, &noisy, 50, last)),
            format!("{:?}", crate::sim::critical_path(&s, &noisy, 50))
        );
    }

    /// When the noise leaves operations unfinished that the noise-free run completed (a
    /// wildcard receive takes the other message first), the two-thread analysis falls back to
    /// the full comparison and reports what the one-thread analysis reports.
    #[test]
    fn two_thread_analysis_of_a_run_the_noise_leaves_unfinished() {
        // Rank 0 takes any message first, then one from rank 1. Without noise rank 3's (the
        // other half's) arrives first; a detour long enough in rank 3's work lets rank 1's
        // overtake it, and the second receive is never matched.
        let s = crate::goal::parse_goal_str(
            "num_ranks 4
rank 0 {
  l1: recv 8b from -1 tag 0
  l2: recv 8b from 1 tag 0
  l2 requires l1
}
rank 1 {
  l1: calc 6000
  l2: send 8b to 0 tag 0
  l2 requires l1
}
rank 2 {
  l1: calc 100
}
rank 3 {
  l1: calc 1000
  l2: send 8b to 0 tag 0
  l2 requires l1
}
",
        )
        .expect("GOAL");
        let p = Params::default();
        let mut seen = false;
        for seed in 1..200 {
            let noise = Noise {
                source: NoiseSource::Poisson {
                    interval: 4_000,
                    detour: 8_000,
                },
                coscheduled: false,
                latency: LatencyNoise::None,
                seed,
            };
            let run = |threads, min| {
                let (r, _) =
                    analyse_split_from(&s, &p, &noise, ("t", "n"), 50, true, None, threads, min);
                let mut v = serde_json::to_value(&r).expect("json");
                if let Some(m) = v.as_object_mut() {
                    m.remove("sim_seconds");
                    m.remove("events_per_second");
                }
                (r, v)
            };
            let (one, v1) = run(1, PARALLEL_SIM_OPS);
            assert!(one.baseline_ns > 0);
            let (_, v2) = run(2, 0);
            assert_eq!(v1, v2, "seed {seed}");
            seen |= one.unfinished_ops > 0;
        }
        assert!(seen, "no seed left the noisy run unfinished");
    }

    /// The analysis of a generated schedule that left its edge arrays (which then hold the
    /// kept durations and the noisy run's noise per operation) reports what the analysis of
    /// the same schedule without them does, on one and on two threads.
    #[test]
    fn spare_edge_buffers_change_nothing() {
        let noise = Noise {
            source: NoiseSource::Poisson {
                interval: 20_000,
                detour: 4_000,
            },
            coscheduled: false,
            latency: LatencyNoise::Exp { mean: 300 },
            seed: 3,
        };
        let p = Params::default();
        for (pat, halves) in [(Pattern::AllreduceRd, true), (Pattern::Stencil2d, false)] {
            let gp = GenParams {
                ranks: 1_000,
                reduce_ps_per_byte: 1_000,
                ..GenParams::default()
            };
            let report = |s: &Schedule, threads: usize| {
                let min = if threads == 2 { 0 } else { PARALLEL_SIM_OPS };
                let (r, _) =
                    analyse_split_from(s, &p, &noise, ("t", "n"), 50, true, None, threads, min);
                let mut v = serde_json::to_value(&r).expect("json");
                if let Some(m) = v.as_object_mut() {
                    m.remove("sim_seconds");
                    m.remove("events_per_second");
                }
                v
            };
            let mut expected = None;
            for threads in [1, 2] {
                let (s, ()) =
                    crate::gen::generate_with(pat, &gp, halves, 2, |_| ()).expect("generator");
                assert_eq!(s.spare.count(), if halves { 2 } else { 1 }, "{pat:?}");
                // A clone has no spare buffers.
                let plain = s.clone();
                assert_eq!(plain.spare.count(), 0);
                let expected = expected.get_or_insert_with(|| report(&plain, 1));
                assert_eq!(&report(&plain, 2), expected);
                assert_eq!(
                    &report(&s, threads),
                    expected,
                    "{pat:?} on {threads} threads"
                );
                // Used or freed.
                assert_eq!(s.spare.count(), 0);
            }
        }
    }

    /// What [`keep_clean`] keeps of a noise-free run gives the comparison of its full states,
    /// and the state array it hands on is the fresh initial state (the noisy run from it is
    /// the noisy run from new states).
    #[test]
    fn kept_noise_free_run_compares_as_the_full_one() {
        let noise = Noise {
            source: NoiseSource::Poisson {
                interval: 20_000,
                detour: 4_000,
            },
            coscheduled: false,
            latency: LatencyNoise::Exp { mean: 300 },
            seed: 7,
        };
        let p = Params::default();
        let opts = SimOptions {
            record_noise: true,
            record_busy: true,
            ..SimOptions::default()
        };
        // Below and above the size at which both work on two threads; the last with a few
        // computations too long for a kept duration's four bytes (4.3 s), which the receives
        // waiting for them inherit: both halves then keep some in their long lists.
        for (pat, ranks, long) in [
            (Pattern::Stencil2d, 256, false),
            (Pattern::AllreduceRd, 4_000, false),
            (Pattern::AllreduceRd, 4_000, true),
        ] {
            let mut s = generate(
                pat,
                &GenParams {
                    ranks,
                    reduce_ps_per_byte: if long { 1_000 } else { 0 },
                    ..GenParams::default()
                },
            )
            .expect("generator");
            if long {
                let n = s.len();
                for at in [n / 8, 3 * n / 8, 5 * n / 8, 7 * n / 8] {
                    let c = (at..n)
                        .find(|&i| s.op_kind(i) == OpKind::Calc)
                        .expect("a computation");
                    s.ops[c].size = (1 << 32) + 12_345;
                }
            }
            let clean = simulate(&s, &p, &Noise::none(), &opts);
            let noisy = simulate(&s, &p, &noise, &opts);
            assert_eq!(noisy.unfinished(), 0);
            let mut st = clean.st.clone();
            // The counts as the first fill leaves them.
            let mut counts = vec![u32::MAX; s.len()];
            let first = fill_states_counted(&s, state_template(s.len()), &mut counts, 2);
            assert_eq!(first, initial_state_threads(&s, 1), "{pat:?}");
            let mut one = vec![7; s.len()];
            let first_one = fill_states_counted(&s, state_template(s.len()), &mut one, 1);
            assert_eq!(first_one, first);
            assert_eq!(one, counts);
            let kept = keep_clean(&s, &mut st, true, counts);
            assert!(kept.exact);
            let mid = s.len() / 2;
            assert_eq!(
                kept.long.iter().any(|&(o, _)| o < mid) && kept.long.iter().any(|&(o, _)| o >= mid),
                long,
                "{pat:?}"
            );
            assert!(kept.long.windows(2).all(|w| w[0].0 < w[1].0));
            for op in 0..s.len() {
                let c = clean.st[op];
                assert_eq!(
                    kept.dur(op),
                    (c.end != u64::MAX).then(|| c.end - c.ready),
                    "{pat:?} op {op}"
                );
            }
            assert_eq!(st, initial_state_threads(&s, 1), "{pat:?}");
            let again = simulate_from(&s, &p, &noise, &opts, st, None, None);
            assert_eq!(again.st, noisy.st);
            for per_rank in [false, true] {
                let full = compare(&s, Clean::Full(&clean.st), &noisy, per_rank);
                let part = compare(&s, Clean::Kept(&kept), &noisy, per_rank);
                assert_eq!(part.sums, full.sums, "{pat:?}");
                assert!(full.sums.iter().any(|x| x.absorbed > 0 && x.amplified > 0));
                assert_eq!(part.clean_end, full.clean_end);
                assert_eq!(part.noisy_end, full.noisy_end);
                assert_eq!(part.last, full.last);
            }
        }
    }
}
