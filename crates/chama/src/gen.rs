//! Built-in schedule generators for the patterns studied at scale, for any number of ranks.
//!
//! Every generator builds the simulator's [`Schedule`] directly; [`crate::goal::write_goal`]
//! turns any of them into GOAL text. Operation classes name the collective or phase
//! (`barrier`, `bcast`, `allreduce`, `halo`, `compute`) so reports can say which class absorbed
//! or amplified noise.

use crate::error::{ScheduleError, SpecError};
use crate::schedule::{Schedule, ScheduleBuilder};

/// A communication pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// Dissemination barrier: ceil(log2 P) rounds, rank r sends to r+2^k, receives from r-2^k.
    Barrier,
    /// Binomial-tree broadcast from rank 0 (largest subtree first).
    Bcast,
    /// Recursive-doubling all-reduce (non-powers of two fold the extra ranks in and out).
    AllreduceRd,
    /// Ring all-reduce: reduce-scatter then all-gather, 2(P-1) steps of bytes/P.
    AllreduceRing,
    /// Rabenseifner all-reduce: recursive-halving reduce-scatter, recursive-doubling all-gather.
    AllreduceRab,
    /// 2-D periodic stencil: compute, halo exchange with 4 neighbours, periodic all-reduce.
    Stencil2d,
    /// 3-D periodic stencil: compute, halo exchange with 6 neighbours, periodic all-reduce.
    Stencil3d,
}

impl Pattern {
    /// Name as typed on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Barrier => "barrier",
            Pattern::Bcast => "bcast",
            Pattern::AllreduceRd => "allreduce-rd",
            Pattern::AllreduceRing => "allreduce-ring",
            Pattern::AllreduceRab => "allreduce-rab",
            Pattern::Stencil2d => "stencil2d",
            Pattern::Stencil3d => "stencil3d",
        }
    }
    /// Every pattern.
    pub fn all() -> [Pattern; 7] {
        [
            Pattern::Barrier,
            Pattern::Bcast,
            Pattern::AllreduceRd,
            Pattern::AllreduceRing,
            Pattern::AllreduceRab,
            Pattern::Stencil2d,
            Pattern::Stencil3d,
        ]
    }
}

/// Generator parameters.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GenParams {
    /// Number of ranks.
    pub ranks: u32,
    /// Message / vector size of the collective (bytes).
    pub bytes: u64,
    /// Reduction cost in picoseconds per byte (0: no reduction compute ops).
    pub reduce_ps_per_byte: u64,
    /// Stencil: iterations.
    pub iterations: u32,
    /// Stencil: compute per iteration (ns).
    pub compute_ns: u64,
    /// Stencil: bytes per halo face.
    pub halo_bytes: u64,
    /// Stencil: all-reduce (8 bytes, recursive doubling) every this many iterations (0: never).
    pub allreduce_every: u32,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            ranks: 16,
            bytes: 8,
            reduce_ps_per_byte: 0,
            iterations: 10,
            compute_ns: 100_000,
            halo_bytes: 4096,
            allreduce_every: 5,
        }
    }
}

const NIL: u32 = u32::MAX;

/// Per-rank frontier: the operations the next step of each rank must wait for
/// (a run of consecutive operation indices).
struct Front {
    first: Vec<u32>,
    count: Vec<u8>,
}

impl Front {
    fn new(p: usize) -> Self {
        Front {
            first: vec![NIL; p],
            count: vec![0; p],
        }
    }
    fn depend(&self, b: &mut ScheduleBuilder, r: usize, op: u32) {
        let f = self.first[r];
        for k in 0..self.count[r] as u32 {
            b.depend(op, f + k, false);
        }
    }
    fn set(&mut self, r: usize, op: u32) {
        self.first[r] = op;
        self.count[r] = 1;
    }
    fn set_range(&mut self, r: usize, first: u32, count: u8) {
        self.first[r] = first;
        self.count[r] = count;
    }
}

/// Generate `pattern`.
pub fn generate(pattern: Pattern, gp: &GenParams) -> Result<Schedule, SpecError> {
    generate_layout(pattern, gp, false)
}

/// [`generate`]; with `halves`, the operations of the first half of the ranks come first (each
/// half in generation order, see [`ScheduleBuilder::group_halves`]), the layout a two-thread
/// simulation needs. Only the operations' indices differ (and with them the latency noise,
/// which is keyed by them).
pub fn generate_layout(
    pattern: Pattern,
    gp: &GenParams,
    halves: bool,
) -> Result<Schedule, SpecError> {
    generate_threads(pattern, gp, halves, 1)
}

/// [`generate_layout`] on up to `threads` threads: with `halves` and two threads, each half of
/// the ranks is generated, and its dependency lists built, by a thread of its own (the same
/// schedule as on one thread).
pub fn generate_threads(
    pattern: Pattern,
    gp: &GenParams,
    halves: bool,
    threads: usize,
) -> Result<Schedule, SpecError> {
    build_schedule(pattern, gp, halves, threads, None, false)
}

/// How far a schedule being built by [`generate_with`] has got, for the work beside it.
#[derive(Debug, Default)]
pub struct Progress {
    ops: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    done: std::sync::atomic::AtomicBool,
    estimate: usize,
}

impl Progress {
    /// Operations built so far (a lower bound, updated every 65,536 operations), and whether
    /// that is the final count (the build ended; 0 if it failed).
    pub fn ops(&self) -> (usize, bool) {
        use std::sync::atomic::Ordering::Acquire;
        // `done` first: once it is set, the count read after it is final.
        let done = self.done.load(Acquire);
        (self.ops.load(Acquire), done)
    }
    /// The generator's estimate of the final count (may be off either way).
    pub fn estimate(&self) -> usize {
        self.estimate
    }
    fn finish(&self, n: usize) {
        use std::sync::atomic::Ordering::Release;
        self.ops.store(n, Release);
        self.done.store(true, Release);
    }
}

/// [`generate_threads`], calling `side` on another thread from the start: it can follow the
/// number of operations built ([`Progress::ops`]) and work on it while the generator and the
/// dependency lists' build run, e.g. write state templates ([`crate::states::States::grow`]).
/// The schedule keeps its builders' edge arrays as spare buffers for the analysis
/// ([`crate::analysis::analyse_with`] uses them); [`Schedule::release_spare`] frees them
/// for other uses.
pub fn generate_with<T: Send>(
    pattern: Pattern,
    gp: &GenParams,
    halves: bool,
    threads: usize,
    side: impl FnOnce(&Progress) -> T + Send,
) -> Result<(Schedule, T), SpecError> {
    let progress = Progress {
        estimate: usize::try_from(estimate_ops(pattern, gp)).unwrap_or(usize::MAX),
        ..Progress::default()
    };
    let (s, t) = std::thread::scope(|sc| {
        let h = sc.spawn(|| side(&progress));
        let s = build_schedule(pattern, gp, halves, threads, Some(&progress), true);
        if s.is_err() {
            progress.finish(0);
        }
        match h.join() {
            Ok(t) => (s, t),
            Err(e) => std::panic::resume_unwind(e),
        }
    });
    Ok((s?, t))
}

/// The schedule of `pattern`, on two threads when `halves` and `threads` allow; with
/// `progress`, the operation count is published there as it goes (and marked final once all
/// operations are built). With `keep_edges` the builders' edge arrays stay with the schedule
/// as spare buffers (see [`ScheduleBuilder::keep_edges`]).
fn build_schedule(
    pattern: Pattern,
    gp: &GenParams,
    halves: bool,
    threads: usize,
    progress: Option<&Progress>,
    keep_edges: bool,
) -> Result<Schedule, SpecError> {
    let counter = progress.map(|p| p.ops.clone());
    let schedule = if halves && threads >= 2 {
        let ops_estimate = check_size(pattern, gp)?;
        let p = gp.ranks;
        let half = p / 2;
        let part = |lo: u32, hi: u32, room: usize| {
            let mut b = ScheduleBuilder::new(p);
            b.only_ranks(lo, hi);
            if keep_edges {
                b.keep_edges();
            }
            // The first half's operation array takes the second's at the end: room for all.
            b.reserve(room, ops_estimate as usize);
            if let Some(c) = &counter {
                b.report_progress(c.clone());
            }
            run(pattern, gp, &mut b);
            b
        };
        let (a, b) = std::thread::scope(|sc| {
            let h = sc.spawn(|| part(half, p, ops_estimate as usize / 2 + 1));
            let a = part(0, half, ops_estimate as usize);
            match h.join() {
                Ok(b) => (a, b),
                Err(e) => std::panic::resume_unwind(e),
            }
        });
        if let Some(pr) = progress {
            pr.finish(a.len() + b.len());
        }
        ScheduleBuilder::finish_halves(a, b, threads)
    } else {
        let mut b = build_with(pattern, gp, halves, counter)?;
        if let Some(pr) = progress {
            pr.finish(b.len());
        }
        if keep_edges {
            b.keep_edges();
        }
        b.finish()
    };
    schedule.map_err(|e: ScheduleError| SpecError(e.to_string()))
}

/// The operations and dependencies of `pattern`, before the dependency lists are built.
#[cfg(test)]
fn build(pattern: Pattern, gp: &GenParams, halves: bool) -> Result<ScheduleBuilder, SpecError> {
    build_with(pattern, gp, halves, None)
}

/// Refuse impossible requests; returns the estimated operation count.
fn check_size(pattern: Pattern, gp: &GenParams) -> Result<u64, SpecError> {
    let p = gp.ranks;
    if p == 0 {
        return Err(SpecError("the number of ranks must be at least 1".into()));
    }
    let ops_estimate = estimate_ops(pattern, gp);
    if ops_estimate > crate::schedule::MAX_OPS as u64 {
        return Err(SpecError(format!(
            "{} at {p} ranks needs about {ops_estimate} operations, more than the 2^31 a schedule holds{}",
            pattern.name(),
            if pattern == Pattern::AllreduceRing {
                " (`chama run` simulates it in segments instead)"
            } else {
                ""
            }
        )));
    }
    Ok(ops_estimate)
}

/// The operations and dependencies of `pattern` on one thread, publishing the operation count
/// in `progress` as it goes.
fn build_with(
    pattern: Pattern,
    gp: &GenParams,
    halves: bool,
    progress: Option<std::sync::Arc<std::sync::atomic::AtomicUsize>>,
) -> Result<ScheduleBuilder, SpecError> {
    let ops_estimate = check_size(pattern, gp)?;
    let mut b = ScheduleBuilder::new(gp.ranks);
    b.reserve(ops_estimate as usize, ops_estimate as usize * 2);
    // Each half of the ranks numbered apart (see `ScheduleBuilder::split_lanes`); schedules too
    // large for that are regrouped after they are built.
    let lanes = halves && ops_estimate < (1 << 29);
    if lanes {
        b.split_lanes();
    }
    if let Some(p) = progress {
        b.report_progress(p);
    }
    run(pattern, gp, &mut b);
    if halves && !lanes {
        b.group_halves();
    }
    Ok(b)
}

/// Add the operations of `pattern` to `b` (those of the ranks it owns).
fn run(pattern: Pattern, gp: &GenParams, b: &mut ScheduleBuilder) {
    let mut front = Front::new(gp.ranks as usize);
    let mut tag = 0u32;
    match pattern {
        Pattern::Barrier => barrier(b, &mut front, &mut tag),
        Pattern::Bcast => bcast(b, &mut front, gp.bytes, &mut tag),
        Pattern::AllreduceRd => {
            allreduce_rd(b, &mut front, gp.bytes, gp.reduce_ps_per_byte, &mut tag)
        }
        Pattern::AllreduceRing => allreduce_ring(b, &mut front, gp, &mut tag),
        Pattern::AllreduceRab => allreduce_rab(b, &mut front, gp, &mut tag),
        Pattern::Stencil2d => stencil(b, &mut front, gp, 2, &mut tag),
        Pattern::Stencil3d => stencil(b, &mut front, gp, 3, &mut tag),
    }
}

fn log2_ceil(p: u32) -> u32 {
    if p <= 1 {
        0
    } else {
        32 - (p - 1).leading_zeros()
    }
}

/// Rough operation count, for pre-sizing and for refusing impossible requests.
pub fn estimate_ops(pattern: Pattern, gp: &GenParams) -> u64 {
    let p = gp.ranks as u64;
    let l = log2_ceil(gp.ranks) as u64 + 2;
    match pattern {
        Pattern::Barrier => 2 * p * l,
        Pattern::Bcast => 2 * p,
        Pattern::AllreduceRd => 3 * p * l,
        Pattern::AllreduceRing => 6 * p * p.saturating_sub(1).max(1),
        Pattern::AllreduceRab => 6 * p * l,
        Pattern::Stencil2d | Pattern::Stencil3d => {
            let per_iter = if pattern == Pattern::Stencil2d { 9 } else { 13 };
            let ar = (gp.iterations / gp.allreduce_every.max(1)) as u64 * 3 * l;
            p * (gp.iterations as u64 * per_iter + ar)
        }
    }
}

fn barrier(b: &mut ScheduleBuilder, front: &mut Front, tag: &mut u32) {
    let p = b.num_ranks();
    let class = b.class("barrier");
    for k in 0..log2_ceil(p) {
        let d = 1u32 << k;
        let t = *tag;
        *tag += 1;
        for r in 0..p {
            if !b.owns(r) {
                continue;
            }
            let ru = r as usize;
            let s = b.send(r, ((r as u64 + d as u64) % p as u64) as u32, t, 1, class);
            let rv = b.recv(
                r,
                ((r as u64 + p as u64 - d as u64) % p as u64) as u32,
                t,
                1,
                class,
            );
            front.depend(b, ru, s);
            front.depend(b, ru, rv);
            front.set(ru, rv);
        }
    }
}

fn bcast(b: &mut ScheduleBuilder, front: &mut Front, bytes: u64, tag: &mut u32) {
    let p = b.num_ranks();
    let class = b.class("bcast");
    let t = *tag;
    *tag += 1;
    for r in 0..p {
        if !b.owns(r) {
            continue;
        }
        let ru = r as usize;
        let mut last = NIL;
        // Lowest power of two above r: children are r + 2^k for 2^k > r.
        let first_k = if r == 0 { 0 } else { 32 - r.leading_zeros() };
        if r != 0 {
            let parent = r & !(1u32 << (31 - r.leading_zeros()));
            let rv = b.recv(r, parent, t, bytes, class);
            front.depend(b, ru, rv);
            last = rv;
        }
        let gate = last;
        let mut kids = [0u32; 32];
        let mut nk = 0;
        let mut k = first_k;
        while k < 32 && (r as u64 + (1u64 << k)) < p as u64 {
            kids[nk] = r + (1u32 << k);
            nk += 1;
            k += 1;
        }
        for &c in kids[..nk].iter().rev() {
            let s = b.send(r, c, t, bytes, class);
            if gate != NIL {
                b.depend(s, gate, false);
            } else {
                front.depend(b, ru, s);
            }
            last = s;
        }
        if last != NIL {
            front.set(ru, last);
        }
    }
}

/// Exchange with `partner`: send and receive `bytes`, then optionally reduce.
#[allow(clippy::too_many_arguments)]
fn exchange(
    b: &mut ScheduleBuilder,
    front: &mut Front,
    r: u32,
    partner: u32,
    t: u32,
    bytes: u64,
    reduce_ps: u64,
    class: u8,
) {
    shift(b, front, r, partner, partner, t, bytes, reduce_ps, class);
}

/// Rank `r` sends `bytes` to `to` and receives as much from `from` (both after its previous
/// step), then optionally reduces what it received.
#[allow(clippy::too_many_arguments)]
fn shift(
    b: &mut ScheduleBuilder,
    front: &mut Front,
    r: u32,
    to: u32,
    from: u32,
    t: u32,
    bytes: u64,
    reduce_ps: u64,
    class: u8,
) {
    if !b.owns(r) {
        return;
    }
    let ru = r as usize;
    let s = b.send(r, to, t, bytes, class);
    let rv = b.recv(r, from, t, bytes, class);
    front.depend(b, ru, s);
    front.depend(b, ru, rv);
    let cost = bytes.saturating_mul(reduce_ps) / 1000;
    if cost > 0 {
        let c = b.calc(r, cost, class);
        b.depend(c, rv, false);
        front.set(ru, c);
    } else {
        front.set(ru, rv);
    }
}

/// One-way step: `from` sends to `to`.
#[allow(clippy::too_many_arguments)]
fn one_way(
    b: &mut ScheduleBuilder,
    front: &mut Front,
    from: u32,
    to: u32,
    t: u32,
    bytes: u64,
    reduce_ps: u64,
    class: u8,
) {
    if b.owns(from) {
        let s = b.send(from, to, t, bytes, class);
        front.depend(b, from as usize, s);
        front.set(from as usize, s);
    }
    if !b.owns(to) {
        return;
    }
    let rv = b.recv(to, from, t, bytes, class);
    front.depend(b, to as usize, rv);
    let cost = bytes.saturating_mul(reduce_ps) / 1000;
    if cost > 0 {
        let c = b.calc(to, cost, class);
        b.depend(c, rv, false);
        front.set(to as usize, c);
    } else {
        front.set(to as usize, rv);
    }
}

/// Fold ranks beyond the largest power of two: returns (p2, rem). Ranks 2i (i < rem) hand their
/// data to 2i+1 and sit out; participants are renumbered 0..p2.
fn fold_in(
    b: &mut ScheduleBuilder,
    front: &mut Front,
    bytes: u64,
    reduce_ps: u64,
    class: u8,
    tag: &mut u32,
) -> (u32, u32) {
    let p = b.num_ranks();
    let p2 = if p.is_power_of_two() {
        p
    } else {
        1u32 << (31 - p.leading_zeros())
    };
    let rem = p - p2;
    if rem > 0 {
        let t = *tag;
        *tag += 1;
        for i in 0..rem {
            one_way(b, front, 2 * i, 2 * i + 1, t, bytes, reduce_ps, class);
        }
    }
    (p2, rem)
}

fn fold_out(
    b: &mut ScheduleBuilder,
    front: &mut Front,
    bytes: u64,
    rem: u32,
    class: u8,
    tag: &mut u32,
) {
    if rem > 0 {
        let t = *tag;
        *tag += 1;
        for i in 0..rem {
            one_way(b, front, 2 * i + 1, 2 * i, t, bytes, 0, class);
        }
    }
}

#[inline]
fn real_rank(nr: u32, rem: u32) -> u32 {
    if nr < rem {
        2 * nr + 1
    } else {
        nr + rem
    }
}

fn allreduce_rd(
    b: &mut ScheduleBuilder,
    front: &mut Front,
    bytes: u64,
    reduce_ps: u64,
    tag: &mut u32,
) {
    let class = b.class("allreduce");
    let (p2, rem) = fold_in(b, front, bytes, reduce_ps, class, tag);
    let mut d = 1u32;
    while d < p2 {
        let t = *tag;
        *tag += 1;
        for nr in 0..p2 {
            exchange(
                b,
                front,
                real_rank(nr, rem),
                real_rank(nr ^ d, rem),
                t,
                bytes,
                reduce_ps,
                class,
            );
        }
        d <<= 1;
    }
    fold_out(b, front, bytes, rem, class, tag);
}

fn allreduce_ring(b: &mut ScheduleBuilder, front: &mut Front, gp: &GenParams, tag: &mut u32) {
    let p = b.num_ranks();
    if p == 1 {
        b.class("allreduce");
        return;
    }
    let chunk = ring_chunk(gp);
    ring_steps(b, front, chunk, gp.reduce_ps_per_byte, p - 1, tag);
    ring_steps(b, front, chunk, 0, p - 1, tag);
}

/// Bytes each ring step moves: the vector split in P chunks.
pub fn ring_chunk(gp: &GenParams) -> u64 {
    gp.bytes.div_ceil(gp.ranks.max(1) as u64).max(1)
}

/// `steps` ring steps: every rank sends a chunk to its right neighbour, receives one from its
/// left neighbour and (if `reduce` > 0) reduces it.
fn ring_steps(
    b: &mut ScheduleBuilder,
    front: &mut Front,
    chunk: u64,
    reduce: u64,
    steps: u32,
    tag: &mut u32,
) {
    let p = b.num_ranks();
    let class = b.class("allreduce");
    for _ in 0..steps {
        let t = *tag;
        *tag = tag.wrapping_add(1) & 0x7fff_ffff;
        for r in 0..p {
            shift(
                b,
                front,
                r,
                (r + 1) % p,
                (r + p - 1) % p,
                t,
                chunk,
                reduce,
                class,
            );
        }
    }
}

/// Operations one ring step of `phase` (0: reduce-scatter, 1: all-gather) adds.
pub fn ring_ops_per_step(gp: &GenParams, phase: u32) -> u64 {
    let reduce = if phase == 0 { gp.reduce_ps_per_byte } else { 0 };
    let calc = ring_chunk(gp).saturating_mul(reduce) / 1000 > 0;
    gp.ranks as u64 * if calc { 3 } else { 2 }
}

/// `steps` consecutive steps of the ring all-reduce's `phase` (0: reduce-scatter with its
/// reductions, 1: all-gather) as a schedule of their own, laid out exactly as [`generate`] lays
/// them out inside the whole ring. The first step's operations have no dependencies (they
/// depend on the previous segment, see [`crate::sim::simulate_segment`]); returns the
/// schedule and every rank's exit operation (the one its next step waits for).
pub fn ring_segment(
    gp: &GenParams,
    phase: u32,
    steps: u32,
) -> Result<(Schedule, Vec<u32>), SpecError> {
    let p = gp.ranks;
    let ops = ring_ops_per_step(gp, phase).saturating_mul(steps as u64);
    if p < 2 || ops > crate::schedule::MAX_OPS as u64 {
        return Err(SpecError(format!(
            "a ring segment of {steps} steps at {p} ranks is not possible"
        )));
    }
    let mut b = ScheduleBuilder::new(p);
    b.reserve(ops as usize, ops as usize * 2);
    let mut front = Front::new(p as usize);
    let reduce = if phase == 0 { gp.reduce_ps_per_byte } else { 0 };
    let mut tag = 0;
    ring_steps(&mut b, &mut front, ring_chunk(gp), reduce, steps, &mut tag);
    let s = b
        .finish()
        .map_err(|e: ScheduleError| SpecError(e.to_string()))?;
    Ok((s, front.first))
}

fn allreduce_rab(b: &mut ScheduleBuilder, front: &mut Front, gp: &GenParams, tag: &mut u32) {
    let class = b.class("allreduce");
    let (p2, rem) = fold_in(b, front, gp.bytes, gp.reduce_ps_per_byte, class, tag);
    let steps = log2_ceil(p2);
    // Reduce-scatter by recursive halving: partner distance p2/2, p2/4, ..., 1.
    let mut size = gp.bytes;
    for k in (0..steps).rev() {
        size = size.div_ceil(2).max(1);
        let t = *tag;
        *tag += 1;
        for nr in 0..p2 {
            exchange(
                b,
                front,
                real_rank(nr, rem),
                real_rank(nr ^ (1 << k), rem),
                t,
                size,
                gp.reduce_ps_per_byte,
                class,
            );
        }
    }
    // All-gather by recursive doubling: distance 1, 2, ..., p2/2, sizes growing back.
    for k in 0..steps {
        let t = *tag;
        *tag += 1;
        for nr in 0..p2 {
            exchange(
                b,
                front,
                real_rank(nr, rem),
                real_rank(nr ^ (1 << k), rem),
                t,
                size,
                0,
                class,
            );
        }
        size = size.saturating_mul(2).min(gp.bytes.max(1));
    }
    fold_out(b, front, gp.bytes, rem, class, tag);
}

/// Split `p` into `nd` factors as equal as possible (largest first).
pub fn grid_dims(p: u32, nd: usize) -> Vec<u32> {
    let mut dims = vec![1u32; nd];
    let mut rest = p;
    // Assign prime factors, largest first, to the currently smallest dimension.
    let mut factors = Vec::new();
    let mut f = 2u32;
    while (f as u64) * (f as u64) <= rest as u64 {
        while rest % f == 0 {
            factors.push(f);
            rest /= f;
        }
        f += 1;
    }
    if rest > 1 {
        factors.push(rest);
    }
    factors.sort_unstable_by(|a, b| b.cmp(a));
    for fa in factors {
        let i = (0..nd).min_by_key(|&i| dims[i]).unwrap_or(0);
        dims[i] *= fa;
    }
    dims.sort_unstable_by(|a, b| b.cmp(a));
    dims
}

fn stencil(b: &mut ScheduleBuilder, front: &mut Front, gp: &GenParams, nd: usize, tag: &mut u32) {
    let p = b.num_ranks();
    let dims = grid_dims(p, nd);
    let c_compute = b.class("compute");
    let c_halo = b.class("halo");
    let mut stride = vec![1u32; nd];
    for i in 1..nd {
        stride[i] = stride[i - 1] * dims[i - 1];
    }
    let mut nbr: Vec<(u32, u32)> = Vec::with_capacity(2 * nd);
    for it in 0..gp.iterations {
        let base = *tag;
        *tag += 2 * nd as u32;
        for r in 0..p {
            if !b.owns(r) {
                continue;
            }
            let ru = r as usize;
            let c = b.calc(r, gp.compute_ns, c_compute);
            front.depend(b, ru, c);
            // Neighbours along each dimension of extent > 1: (rank, direction id).
            nbr.clear();
            for (i, (&dim, &st)) in dims.iter().zip(&stride).enumerate() {
                if dim < 2 {
                    continue;
                }
                let coord = (r / st) % dim;
                let up = r - coord * st + ((coord + 1) % dim) * st;
                let down = r - coord * st + ((coord + dim - 1) % dim) * st;
                nbr.push((up, 2 * i as u32));
                nbr.push((down, 2 * i as u32 + 1));
            }
            if nbr.is_empty() {
                front.set(ru, c);
                continue;
            }
            let first = b.next_id(r);
            for &(q, dir) in &nbr {
                // A message sent in direction `dir` is received as coming from `dir ^ 1`.
                let rv = b.recv(r, q, base + (dir ^ 1), gp.halo_bytes, c_halo);
                b.depend(rv, c, true);
            }
            for &(q, dir) in &nbr {
                let s = b.send(r, q, base + dir, gp.halo_bytes, c_halo);
                b.depend(s, c, false);
            }
            front.set_range(ru, first, (2 * nbr.len()) as u8);
        }
        if gp.allreduce_every > 0 && (it + 1) % gp.allreduce_every == 0 {
            allreduce_rd(b, front, 8, gp.reduce_ps_per_byte, tag);
        }
    }
}

/// Parse a pattern name.
pub fn parse_pattern(s: &str) -> Result<Pattern, SpecError> {
    Pattern::all()
        .into_iter()
        .find(|p| p.name() == s)
        .ok_or_else(|| {
            SpecError(format!(
                "unknown pattern `{s}` (one of: {})",
                Pattern::all().map(|p| p.name()).join(", ")
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Numbering the halves apart while generating gives the schedule that regrouping the
    /// operations afterwards gives, and its first half holds exactly the first half's ranks.
    #[test]
    fn lanes_equal_regrouping() {
        for pat in Pattern::all() {
            for ranks in [1u32, 2, 7, 64, 301] {
                let gp = GenParams {
                    ranks,
                    iterations: 2,
                    allreduce_every: 1,
                    ..GenParams::default()
                };
                let a = generate_layout(pat, &gp, true).expect("generator");
                let mut b = build(pat, &gp, false).expect("generator");
                b.group_halves();
                let b = b.finish().expect("schedule");
                assert_eq!(a.ops, b.ops, "{pat:?} {ranks}");
                assert_eq!(a.dep_start, b.dep_start, "{pat:?} {ranks}");
                assert_eq!(a.dep_list, b.dep_list, "{pat:?} {ranks}");
                let plain = generate(pat, &gp).expect("generator");
                assert_eq!(a.len(), plain.len());
                let half = ranks / 2;
                let n0 = a.ops.iter().filter(|o| o.rank < half).count();
                assert!(a.ops[..n0].iter().all(|o| o.rank < half));
                let y = plain.ops.iter().filter(|o| o.rank < half);
                assert!(
                    a.ops[..n0].iter().eq(y),
                    "{pat:?} {ranks}: generation order"
                );
            }
        }
    }

    /// Every generator, built half by half on two threads, gives exactly the schedule of one
    /// thread: for odd, small and power-of-two rank counts, with and without reduction
    /// compute operations, in the halves layout (the only one two threads build) and the
    /// plain one (which stays on one thread whatever `threads` says).
    #[test]
    fn two_threads_build_the_one_thread_schedule() {
        for pat in Pattern::all() {
            for ranks in [1u32, 2, 3, 5, 7, 8, 64, 301, 1000] {
                for reduce_ps_per_byte in [0, 2000] {
                    let gp = GenParams {
                        ranks,
                        iterations: 3,
                        allreduce_every: 2,
                        bytes: 4096,
                        reduce_ps_per_byte,
                        ..GenParams::default()
                    };
                    for halves in [true, false] {
                        let one = generate_threads(pat, &gp, halves, 1).expect("generator");
                        let two = generate_threads(pat, &gp, halves, 2).expect("generator");
                        let what = format!("{pat:?} {ranks} ranks, halves {halves}");
                        assert!(ranks == 1 || !one.is_empty(), "{what}");
                        assert_eq!(one.num_ranks, two.num_ranks, "{what}");
                        assert_eq!(one.ops, two.ops, "{what}");
                        assert_eq!(one.dep_start, two.dep_start, "{what}");
                        assert_eq!(one.dep_list, two.dep_list, "{what}");
                        assert_eq!(one.class_names, two.class_names, "{what}");
                        assert_eq!((one.num_cpus, one.num_nics), (two.num_cpus, two.num_nics));
                    }
                }
            }
        }
    }

    /// The two-thread build reports its operation count to the side job like one thread does.
    #[test]
    fn two_thread_build_reports_the_count() {
        let gp = GenParams {
            ranks: 1 << 12,
            ..GenParams::default()
        };
        let (s, n) =
            generate_with(Pattern::AllreduceRd, &gp, true, 2, wait_for_count).expect("generator");
        assert_eq!(n, s.len());
        assert_eq!(
            s.ops,
            generate_layout(Pattern::AllreduceRd, &gp, true)
                .expect("gen")
                .ops
        );
    }

    /// A dependency between the two halves' builders is refused, with whole-schedule indices.
    #[test]
    fn finish_halves_checks_edges() {
        let mut a = ScheduleBuilder::new(2);
        a.only_ranks(0, 1);
        let mut b = ScheduleBuilder::new(2);
        b.only_ranks(1, 2);
        a.send(0, 1, 0, 8, 0);
        b.recv(1, 0, 0, 8, 0);
        let r = b.calc(1, 5, 0);
        b.depend(r, 3, false);
        let e = ScheduleBuilder::finish_halves(a, b, 2).expect_err("bad edge");
        assert_eq!(
            e.to_string(),
            crate::error::ScheduleError::BadEdge { from: 4, to: 2 }.to_string()
        );
    }

    /// The final operation count, as a side job of `generate_with` sees it.
    fn wait_for_count(p: &Progress) -> usize {
        loop {
            match p.ops() {
                (n, true) => return n,
                _ => std::thread::yield_now(),
            }
        }
    }

    /// `generate_with` builds the same schedule as `generate` and hands its side job the
    /// number of operations.
    #[test]
    fn generate_with_gives_the_same_schedule() {
        let gp = GenParams {
            ranks: 300,
            iterations: 2,
            ..GenParams::default()
        };
        for pat in [Pattern::AllreduceRd, Pattern::Stencil2d, Pattern::Bcast] {
            let a = generate(pat, &gp).expect("generator");
            let (b, n) = generate_with(pat, &gp, false, 1, wait_for_count).expect("generator");
            assert_eq!(n, a.len());
            assert_eq!(a.ops, b.ops, "{pat:?}");
            assert_eq!(a.dep_start, b.dep_start);
            assert_eq!(a.dep_list, b.dep_list);
            assert_eq!(a.class_names, b.class_names);
        }
        assert!(generate_with(
            Pattern::Bcast,
            &GenParams { ranks: 0, ..gp },
            false,
            2,
            wait_for_count
        )
        .is_err());
    }
}
