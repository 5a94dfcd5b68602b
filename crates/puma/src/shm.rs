//! Intra-node collectives through the collective area of the job's QK region
//! ([`qk::coll_area`]): no queues, no portals matching, one cache line per rank and operation.
//!
//! A communicator that has at least one node with several of its members claims one context of
//! the area (context `(ctx / 2) mod CONTEXTS`; members agree once, on its first collective, that
//! no live communicator of theirs holds it, else the communicator keeps the portals algorithms).
//! Each collective of the communicator gets the next sequence number `s` (the same on every
//! member, since all call the same collectives in the same order). Per member and context the
//! area has an *arrival* word, a *release* word and `SLOTS` data slots; slot `s mod SLOTS` belongs
//! to operation `s`. The words hold `(ctx << 48) | s`, so a value left by another communicator never
//! passes for this one's.
//!
//! The rules that make it safe without any further handshake:
//! * a member sets its arrival word to `s` when it enters operation `s`, after writing its data
//!   (if any) into its slot; it has left operation `s - 1` before that, so it no longer reads
//!   anyone's slots of earlier operations;
//! * before writing the slot of operation `s` a member waits until every local member arrived at
//!   `s - SLOTS + 1` (so they are done with operation `s - SLOTS`, the slot's previous user).
//!   A broadcast root can therefore run `SLOTS - 1` operations ahead of its slowest reader, which
//!   matters when ranks share cores and a reader is not scheduled for a while. A member found
//!   behind is waited for until it is `SLOTS / 2` operations further (`SLOTS - 2` with more ranks
//!   than cores), at most at `s - 1` (which every member reaches without the writer), so a root
//!   that outruns a reader looks at the reader's arrival line once per 32 operations instead of
//!   once per operation.
//! * payloads of at most 112 bytes may instead go through the `SMALLS` small slots of 128 bytes
//!   (small slot `s mod SMALLS` for operation `s`) under the same rule with `SMALLS` for
//!   `SLOTS`: crowded broadcasts do, so their root runs up to 1023 operations ahead. Every member
//!   takes the same kind of slot for an operation (the choice depends only on the length and on
//!   what all of them know alike; a reader that finds the other kind published reports a size
//!   mismatch).
//!
//! Waiting spins briefly (not at all with more ranks than cores), then hands the core away (`sched_yield`) while still driving the
//! portals engine, so oversubscribed ranks do not starve the rank they wait for, and a sender
//! blocked on a full queue to this rank can drain; after 2 ms (50 µs with more ranks than
//! cores; `PUMACOLL_YIELD_US` sets it) it sleeps between looks (20 µs growing to 1 ms), so a long
//! wait leaves the CPU to the launcher, the PCT and busy ranks.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytemuck::Pod;
use qk::coll_area::{CollArea, CONTEXTS, SLOT, SLOTS, SMALL, SMALLS, STAGE};

use crate::core::Core;
use crate::error::{Error, Result};
use crate::ops::Operation;

/// Payload bytes of one slot. Its first 8 bytes hold the operation's word (`ctx << 48 | s`,
/// stored last, with release, so a reader can wait on the line it then reads small data from
/// instead of on the writer's arrival word), the next 8 the length of the whole payload (every
/// reader checks it). Payloads up to this size take one step; larger ones go in pieces.
pub const SLOT_BYTES: usize = SLOT - 16;
const SLOT_DATA: usize = 16;
/// Payload bytes of one small slot (see [`NodeColl::publish_small`]): its first 8 bytes hold the
/// operation's word, the next 8 the payload's length, like a slot's.
pub const SMALL_BYTES: usize = SMALL - SLOT_DATA;
/// Buffer addresses one member can publish for cross-memory attach.
const MAX_REMOTE: usize = 2;

/// Offsets in the payload of [`NodeColl::publish_exchange`]: the claim mask and the pending
/// count, on the slot's second cache line (the first holds the word, the length, the process id
/// and the buffer addresses, which waiting members poll and read: the members' claims and counts
/// would else take that line from them).
const EXCHANGE_CLAIMS: usize = 64 - SLOT_DATA;
const EXCHANGE_PENDING: usize = EXCHANGE_CLAIMS + 8;

/// Segments of a port's stage: a large collective goes in pieces of one segment each, and
/// piece `g` (counted over the communicator's life) uses segment `g mod STAGE_SEGS`, so a writer
/// may run `STAGE_SEGS - 1` pieces ahead of its slowest reader.
pub const STAGE_SEGS: usize = 4;
/// Bytes of one stage segment (the largest piece of a large collective).
pub const STAGE_SEG: usize = STAGE / STAGE_SEGS;

/// Copies `src` into `dst` (equal lengths) in pieces of at most 2 KiB. From about 4 KiB on,
/// glibc's memcpy uses `rep movsb`, which on AMD EPYC hosts (this project's test machine) runs
/// at about 2 GB/s instead of 40 when source and destination are not equally aligned modulo 64
/// (a 1 MiB `Vec` from malloc starts 16 bytes into a page, a stage segment on a page boundary);
/// pieces below that size take glibc's vector loop, which does not care.
pub(crate) fn copy_bytes(dst: &mut [u8], src: &[u8]) {
    const PIECE: usize = 2048;
    assert_eq!(
        dst.len(),
        src.len(),
        "copy between buffers of different lengths"
    );
    for (d, s) in dst.chunks_mut(PIECE).zip(src.chunks(PIECE)) {
        d.copy_from_slice(s);
    }
}

/// [`copy_bytes`] for elements.
pub(crate) fn copy_elems<T: Pod>(dst: &mut [T], src: &[T]) {
    copy_bytes(bytemuck::cast_slice_mut(dst), bytemuck::cast_slice(src));
}

/// The ways a large node-local broadcast or all-reduce can go.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum LargePath {
    /// Through the stages with plain stores: two copies, pipelined in pieces.
    Stage = 0,
    /// Straight out of the other ranks' buffers by cross-memory attach: one copy.
    Cma = 1,
    /// Through the stages, written with non-temporal stores (see [`copy_to_stage`]).
    StageNt = 2,
}

/// The large node-local operations that choose a [`LargePath`] by measured cost, each with its
/// own [`Chooser`] (a broadcast, an all-reduce and an all-to-all of one size cost different
/// amounts per byte; sharing estimates made one operation's samples mislead the other's choice).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum LargeOp {
    Broadcast = 0,
    AllReduce = 1,
    AllToAll = 2,
}

/// Number of [`LargeOp`]s.
const LARGE_OPS: usize = 3;

/// Number of [`LargePath`]s.
pub(crate) const PATHS: usize = 3;
const ALL_PATHS: [LargePath; PATHS] = [LargePath::Stage, LargePath::Cma, LargePath::StageNt];

impl LargePath {
    /// The header word a leader publishes for it.
    pub fn word(self) -> u64 {
        self as u64
    }

    /// The path a header word names (its low byte; anything unknown: the stages).
    pub fn from_word(w: u64) -> LargePath {
        ALL_PATHS
            .into_iter()
            .find(|p| p.word() == w & 0xff)
            .unwrap_or(LargePath::Stage)
    }

    /// A header word naming this path for the current operation and, in its second byte,
    /// `next`: the path the group's next crowded all-to-all of the same length takes (see
    /// `Comm::crowded_alltoall_ahead`; 0 there: none named).
    pub fn word_with_next(self, next: Option<LargePath>) -> u64 {
        self.word() | next.map_or(0, |p| (p.word() + 1) << 8)
    }

    /// The next operation's path a header word names (see [`LargePath::word_with_next`]).
    pub fn next_of(w: u64) -> Option<LargePath> {
        let k = (w >> 8) & 0xff;
        ALL_PATHS.into_iter().find(|p| p.word() + 1 == k)
    }

    /// Goes through the stages.
    pub fn staged(self) -> bool {
        self != LargePath::Cma
    }
}

/// Copies `src` into this rank's stage bytes `dst`, with non-temporal stores when `nt` (a large
/// operation whose leader chose [`LargePath::StageNt`]). A stage line the others read last time
/// sits in their caches; a plain store must take it back first, which with the two vCPUs far
/// apart (a line crossing in ~215 ns) held the writer to ~6 GB/s, against ~26 GB/s for streaming
/// stores that bypass the caches (the readers then read from memory: ~20 GB/s instead of ~14
/// from the far cache, or ~36 from a near one, hence the choice by measurement).
pub(crate) fn copy_to_stage(dst: &mut [u8], src: &[u8], nt: bool) {
    if nt {
        qk::sys::copy_nontemporal(dst, src);
    } else {
        copy_bytes(dst, src);
    }
}

/// Samples a path's estimate is the median of: one operation slowed by the scheduler or another
/// process (on this shared host several a second, 5-20x the usual time) moves nothing, and a
/// change of placement shows after two samples. (A running average moved a quarter of the way to
/// each sample, capped at 4x, let one such operation put a path 75 % behind and switch to a worse
/// one for a whole probe interval: the 2-rank 32 KiB all-to-all by measured choice took ~7 µs
/// where its best path took 5.5.)
const HISTORY: usize = 3;
/// The leading path keeps the lead while its estimate is within this factor of the lowest.
const LEAD_MARGIN: f64 = 1.05;
/// A sample counts for at most this many times the path's estimate (see [`Chooser::record`]).
const SAMPLE_CAP: f64 = 2.0;

/// Fewest operations of one size class between two probes of a path not taken.
const PROBE_EVERY: u32 = 16;
/// Most operations between two probes: a path that became the cheapest (the host moved the
/// vCPUs) is noticed within this many operations.
const PROBE_MAX: u32 = 160;
/// Share of the time a probe may cost, spread over the operations between two probes. A probe
/// takes the other path twice (`2 * ratio` operations of the best path's cost, `ratio` its
/// estimate over the best one) and the operation after it pays about one more for the switch
/// back (a stage emptied by non-temporal stores is cold), so a path is probed every
/// `(2 * ratio + 1) / PROBE_SPEND` operations, within `PROBE_EVERY..=PROBE_MAX`. With the fixed
/// 16 / 64 operations used before, probing two paths ~1.7x behind cost 10-30 % in the near
/// state (2-rank 1 MiB all-reduce 117 µs against 99 on the stages alone).
const PROBE_SPEND: f64 = 1.0 / 32.0;
/// A path within this factor of the best is re-checked soon while its estimate is young (after
/// 2, 4, 8, ... operations); one further behind only until it has [`HISTORY`] samples.
const PROBE_CLOSE: f64 = 1.5;

/// Picks the cheapest allowed [`LargePath`] for a large operation by measured cost, per size
/// class (powers of two). Which one is cheapest depends on where the host placed the two vCPUs
/// (a cache line crossing in ~40 ns or ~215 ns) and changes at run time, and the guest cannot
/// see it, so the decider times each operation (nanoseconds per byte), keeps a running estimate
/// per path, takes the cheapest, and takes each other path (twice in a row, keeping the second
/// sample) now and then to refresh its estimate: the further behind, the rarer, so probing costs
/// about [`PROBE_SPEND`] of the time per path (see there), and sooner while a close estimate
/// rests on few samples (after 2, 4, 8, ... operations). A path not yet measured in a class is
/// tried first (twice: the first sample is dropped).
#[derive(Clone, Debug)]
pub(crate) struct Chooser {
    classes: [Class; 64],
}

#[derive(Clone, Copy, Debug, Default)]
struct Class {
    /// Estimated ns per byte of each path (index: `LargePath as usize`).
    est: [Option<f64>; PATHS],
    /// Operations of the class since each path was last taken.
    age: [u32; PATHS],
    /// Each path's first operation of the class was seen (and ignored: it pays for first
    /// touches of buffers and cold caches, and made a path look several times too slow).
    warm: [bool; PATHS],
    /// Samples each path's estimate holds (from 240 on, counted round in steps of [`HISTORY`]).
    samples: [u8; PATHS],
    /// Each path's last [`HISTORY`] samples (ns per byte), the newest at `samples % HISTORY`;
    /// its estimate is their median.
    hist: [[f64; HISTORY]; PATHS],
    /// A probe's second operation is due on this path (see [`Chooser::pick`]).
    again: Option<LargePath>,
    /// Drop the next sample of each path (a probe's first operation).
    skip: [bool; PATHS],
    /// Samples since each path's estimate was last renewed (its first sample, a probe that beat
    /// the best, or losing the lead): while few, the path is re-checked soon (saturating).
    fresh: [u8; PATHS],
    /// The path in the lead at the last pick (see [`Chooser::leader`]).
    lead: Option<LargePath>,
    /// The path of the last pick.
    last: Option<LargePath>,
}

impl Default for Chooser {
    fn default() -> Chooser {
        Chooser {
            classes: [Class::default(); 64],
        }
    }
}

impl Chooser {
    fn class(bytes: usize) -> usize {
        bytes.max(1).ilog2() as usize
    }

    /// The path for an operation of `bytes`, among `allowed` (not empty; `Stage` if it is).
    pub fn pick(&mut self, bytes: usize, allowed: &[LargePath]) -> LargePath {
        let c = &mut self.classes[Self::class(bytes)];
        // A probe takes the other path twice and keeps only the second sample: the first
        // operation after a switch pays for the switch (a far all-reduce of 1 MiB by
        // non-temporal stages measured ~255 µs right after single-copy ones, ~175 µs in a row).
        let pick = match c.again.take() {
            Some(p) if allowed.contains(&p) => p,
            _ => {
                let best = Self::leader(c, allowed);
                // A path that lost the lead (two slow operations, or the placement changed) is
                // re-checked soon, as a young one: a short disturbance would else keep a worse
                // path in use for a whole probe interval.
                if let Some(old) = c.lead.filter(|&l| best.is_some_and(|b| b != l)) {
                    c.fresh[old as usize] = 0;
                }
                c.lead = best;
                let p = Self::choose(c, allowed, best);
                if best.is_some_and(|b| b != p) && c.est[p as usize].is_some() {
                    c.again = Some(p);
                }
                p
            }
        };
        // The first operation after a switch of path pays for the switch (cold caches, a stage
        // emptied by non-temporal stores): its sample is dropped, on a probe and on the way
        // back to the leader alike.
        if c.last.is_some_and(|l| l != pick) {
            c.skip[pick as usize] = true;
        }
        c.last = Some(pick);
        for p in allowed {
            c.age[*p as usize] = c.age[*p as usize].saturating_add(1);
        }
        c.age[pick as usize] = 0;
        pick
    }

    /// The path with the lowest estimate among `allowed`, but the current leader as long as it is
    /// within [`LEAD_MARGIN`] of that: two paths of about the same cost would else trade the lead
    /// on noise, and every switch costs an operation's worth of cold caches.
    fn leader(c: &Class, allowed: &[LargePath]) -> Option<LargePath> {
        let est = |p: LargePath| c.est[p as usize];
        let (low, e) = allowed
            .iter()
            .filter_map(|&q| Some((q, est(q)?)))
            .min_by(|a, b| a.1.total_cmp(&b.1))?;
        match c
            .lead
            .filter(|l| allowed.contains(l))
            .and_then(|l| Some((l, est(l)?)))
        {
            Some((l, el)) if el <= e * LEAD_MARGIN => Some(l),
            _ => Some(low),
        }
    }

    fn choose(c: &Class, allowed: &[LargePath], best: Option<LargePath>) -> LargePath {
        if let Some(&p) = allowed.iter().find(|p| c.est[**p as usize].is_none()) {
            return p;
        }
        let est = |p: &LargePath| c.est[*p as usize].unwrap_or(f64::INFINITY);
        let Some(best) = best else {
            return LargePath::Stage;
        };
        // The most overdue other path, if its turn has come.
        let due = allowed
            .iter()
            .filter(|&&p| p != best)
            .filter(|&&p| {
                let every = Self::probe_every(est(&p) / est(&best), c.fresh[p as usize]);
                c.age[p as usize] + 1 >= every
            })
            .max_by_key(|&&p| c.age[p as usize]);
        due.copied().unwrap_or(best)
    }

    /// Operations between two probes of a path whose estimate is `ratio` times the best one's
    /// and was renewed `samples` samples ago (see [`PROBE_SPEND`], [`PROBE_CLOSE`]).
    fn probe_every(ratio: f64, samples: u8) -> u32 {
        let ratio = if ratio.is_finite() {
            ratio.max(1.0)
        } else {
            4.0
        };
        let every = ((2.0 * ratio + 1.0) / PROBE_SPEND).ceil() as u32;
        let every = every.clamp(PROBE_EVERY, PROBE_MAX);
        if ratio <= PROBE_CLOSE || (samples as usize) < HISTORY {
            // A young estimate (one noisy sample, or a cache still cold on the second
            // operation of a path) is re-checked soon: after 2, 4, 8, ... operations, up to the
            // regular interval.
            every.min(1 << samples.min(16))
        } else {
            every
        }
    }

    /// Records that an operation of `bytes` took `ns` nanoseconds along `path`: the path's
    /// estimate becomes the median of its last [`HISTORY`] samples (the mean of two, while it has
    /// only two), except that a probe that beats the best estimate is taken at its word (the
    /// placement may have changed; if it was luck, the path's next samples correct it at once).
    pub fn record(&mut self, bytes: usize, path: LargePath, ns: f64) {
        let c = &mut self.classes[Self::class(bytes)];
        let i = path as usize;
        let cold = !std::mem::replace(&mut c.warm[i], true);
        if std::mem::take(&mut c.skip[i]) || cold {
            return;
        }
        let per = ns / bytes.max(1) as f64;
        let best = c.est.iter().flatten().fold(f64::INFINITY, |a, &b| a.min(b));
        let per = match c.est[i] {
            Some(old) if best < old && per < best => {
                c.samples[i] = 0;
                c.fresh[i] = 0;
                per
            }
            // Two operations in a row slowed by a descheduled peer (several ms each) would move
            // the median: a sample counts for at most twice the estimate.
            Some(old) => per.min(SAMPLE_CAP * old),
            None => per,
        };
        c.hist[i][c.samples[i] as usize % HISTORY] = per;
        c.samples[i] += 1;
        c.fresh[i] = c.fresh[i].saturating_add(1);
        if c.samples[i] >= 240 {
            // Stay far above the young range, on the same place in the history's cycle.
            c.samples[i] -= HISTORY as u8;
        }
        let mut h = c.hist[i];
        let h = &mut h[..(c.samples[i] as usize).min(HISTORY)];
        h.sort_by(f64::total_cmp);
        c.est[i] = Some(match h.len() {
            2 => (h[0] + h[1]) / 2.0,
            k => h[k / 2],
        });
    }

    /// The current estimate (ns per byte) of `path` for operations of `bytes`.
    #[cfg(test)]
    pub fn estimate(&self, bytes: usize, path: LargePath) -> Option<f64> {
        self.classes[Self::class(bytes)].est[path as usize]
    }
}

/// The process's share of the area: which contexts its live communicators hold.
pub(crate) struct ShmCore {
    area: CollArea,
    claims: RefCell<[Option<u16>; CONTEXTS as usize]>,
    /// The communicator (context id) that holds this process's stage. It keeps it for good,
    /// even once freed: a member of it may still be copying the last piece out of this stage
    /// when this process has returned, and a later communicator of other ranks could not tell.
    stage: std::cell::Cell<Option<u16>>,
}

impl ShmCore {
    pub fn new(area: CollArea) -> ShmCore {
        ShmCore {
            area,
            claims: RefCell::new([None; CONTEXTS as usize]),
            stage: std::cell::Cell::new(None),
        }
    }

    /// No live communicator of this process holds its stage.
    pub fn stage_free(&self) -> bool {
        self.stage.get().is_none()
    }

    /// The context a communicator with context id `ctx` would use, if free in this process.
    pub fn free_context(&self, ctx: u16) -> Option<u32> {
        let c = (ctx as u32 / 2) % CONTEXTS;
        self.claims.borrow()[c as usize].is_none().then_some(c)
    }

    fn claim(&self, c: u32, ctx: u16) {
        self.claims.borrow_mut()[c as usize] = Some(ctx);
    }

    fn release(&self, c: u32, ctx: u16) {
        let mut cl = self.claims.borrow_mut();
        if cl[c as usize] == Some(ctx) {
            cl[c as usize] = None;
        }
    }
}

/// One communicator's node-local group on the area.
pub(crate) struct NodeColl {
    core: Rc<Core>,
    /// Per member, the one CPU it is pinned to (see [`NodeColl::shares_core`]).
    cpus: Vec<Option<usize>>,
    /// The job region's collective area (taken from the core when the group is claimed).
    area: CollArea,
    /// Context in the area.
    c: u32,
    /// The communicator's context id (high bits of every word).
    ctx: u16,
    seq: std::cell::Cell<u64>,
    /// Area port of each member of this node's group (group order = communicator rank order).
    ports: Vec<u32>,
    /// The communicator's members grouped by node (communicator ranks; see `Comm::node_groups`).
    pub groups: Vec<Vec<u32>>,
    /// Index of this rank's group in `groups`.
    pub mine: usize,
    /// World rank of each member of the group (liveness checks).
    world: Vec<u32>,
    /// This rank's index in the group.
    pub me: usize,
    /// How long a waiter yields before it naps (`PUMACOLL_YIELD_US`; None: [`YIELD_FOR`] or
    /// [`YIELD_FOR_OVERSUBSCRIBED`], as the core says when the wait starts).
    yield_us: Option<u64>,
    /// Highest arrival seen from each member (arrivals only grow; saves re-reading a line
    /// another core keeps writing).
    seen: RefCell<Vec<u64>>,
    /// Every member's stage belongs to this communicator (claimed together at setup).
    pub stage: bool,
    /// Every member may read the others' memory with cross-memory attach (agreed at setup).
    pub cma: bool,
    /// Stage pieces this communicator has gone through.
    pieces: std::cell::Cell<u64>,
    /// First sequence number of each of the last `STAGE_SEGS` pieces (index: piece mod segs).
    piece_seq: RefCell<[u64; STAGE_SEGS]>,
    /// Which path large broadcasts from this rank and all-reduces led by it take.
    /// One measured-cost chooser per kind of large operation (their costs per byte differ).
    choosers: RefCell<Box<[Chooser; LARGE_OPS]>>,
    /// Per payload length (the newest last, at most [`AHEAD_LENGTHS`]), the path member 0
    /// named for the next crowded all-to-all of that length, as every member read it from
    /// member 0's header of the last one (see `Comm::crowded_alltoall_ahead`).
    ahead: RefCell<Vec<(u64, LargePath)>>,
}

/// Payload lengths whose next crowded all-to-all path a member remembers (see
/// [`NodeColl::set_ahead`]): a program that cycles through more lengths than this falls back to
/// the default path for some of them, on every member alike.
const AHEAD_LENGTHS: usize = 8;

impl Drop for NodeColl {
    fn drop(&mut self) {
        if let Some(s) = self.core.shm() {
            s.release(self.c, self.ctx);
        }
    }
}

/// How long a waiter yields its core in a loop before it starts sleeping between looks.
const YIELD_FOR: Duration = Duration::from_millis(2);
/// The same with more ranks than cores: yielding hands the core to other waiters as often as to
/// the rank that has work, so napping soon (20 µs) wins there. At 8 ranks on 2 cores
/// (puma-coll-bench, against 2 ms): 8-byte all-reduce 16 µs instead of 45, 1 MiB all-reduce
/// 2.4-3.7 ms instead of 6-8, 1 MiB broadcast 0.4 ms instead of 1.5.
const YIELD_FOR_OVERSUBSCRIBED: Duration = Duration::from_micros(50);
/// Lines of a slot (the word's included) a reader asks for while it waits for the word (see
/// [`NodeColl::wait_slot_data`]); the rest of a longer payload streams in behind them. Far
/// apart, 2 ranks, puma-coll-bench medians (µs) against none: all-reduce 64 B 0.50 → 0.36 (with
/// the writer's prefetch of its next slot); 4 lines against 32 at 512 B: 0.73 against 0.53, at
/// 1 KiB 0.80 against 0.97 (few runs: about a tie).
const TOUCH_LINES: usize = 4;
/// Spins before a waiter starts yielding its core.
const SPIN: u32 = 4000;
/// None with more ranks than cores: the rank waited for often shares this rank's core, so a spin
/// only delays it. puma-coll-bench medians (µs), 50 spins → none, same session: 3 ranks on 2
/// cores broadcast 8 B 0.36 → 0.28, barrier 3.9 → 2.5, all-reduce 8 B 4.7 → 3.0; 4 ranks
/// broadcast 8 B 0.36 → 0.28, barrier 3.9 → 3.6; 8 ranks barrier 14 → 9.2, all-reduce 8 B
/// 13.3 → 10.6, all-to-all 8 B 12.9 → 9.8. (5 spins came out between.)
const SPIN_OVERSUBSCRIBED: u32 = 0;

impl NodeColl {
    /// A group on context `c`, claimed for communicator context `ctx`. `ports` and `world` list
    /// the group in communicator rank order; `me` indexes this rank. `stage`: every member
    /// agreed to give its stage to this communicator.
    #[allow(clippy::too_many_arguments)]
    pub fn claim(
        core: Rc<Core>,
        c: u32,
        ctx: u16,
        ports: Vec<u32>,
        world: Vec<u32>,
        groups: Vec<Vec<u32>>,
        mine: usize,
        me: usize,
        stage: bool,
        cma: bool,
    ) -> Option<NodeColl> {
        let shm = core.shm()?;
        shm.claim(c, ctx);
        if stage {
            shm.stage.set(Some(ctx));
        }
        let area = shm.area.clone();
        let seen = RefCell::new(vec![0; ports.len()]);
        let cpus = ports.iter().map(|&p| core.pinned_cpu(p)).collect();
        let yield_us = std::env::var("PUMACOLL_YIELD_US")
            .ok()
            .and_then(|v| v.parse().ok());
        Some(NodeColl {
            cpus,
            yield_us,
            seen,
            area,
            core,
            c,
            ctx,
            seq: std::cell::Cell::new(0),
            ports,
            groups,
            mine,
            world,
            me,
            stage,
            cma,
            pieces: std::cell::Cell::new(0),
            piece_seq: RefCell::new([0; STAGE_SEGS]),
            choosers: RefCell::new(Box::new(std::array::from_fn(|_| Chooser::default()))),
            ahead: RefCell::new(Vec::new()),
        })
    }

    /// More ranks on this machine than CPUs (the same answer on every member; see
    /// `Core::crowded`).
    pub fn crowded(&self) -> bool {
        self.core.crowded()
    }

    /// Member `j` is pinned to the one CPU this rank is pinned to (as the PCT placed them when
    /// the group was set up): the two never run at the same time.
    pub fn shares_core(&self, j: usize) -> bool {
        self.cpus[self.me].is_some() && self.cpus[j] == self.cpus[self.me]
    }

    /// Members of the group.
    pub fn len(&self) -> usize {
        self.ports.len()
    }

    fn area(&self) -> &CollArea {
        &self.area
    }

    fn word(&self, s: u64) -> u64 {
        ((self.ctx as u64) << 48) | s
    }

    /// The sequence number in word `w` if it belongs to this communicator.
    fn seq_of(&self, w: &AtomicU64) -> u64 {
        let v = w.load(Ordering::Acquire);
        if v >> 48 == self.ctx as u64 {
            v & 0xffff_ffff_ffff
        } else {
            0
        }
    }

    fn reached(&self, w: &AtomicU64, s: u64) -> bool {
        self.seq_of(w) >= s
    }

    /// Starts the next operation; returns its sequence number.
    pub fn next(&self) -> u64 {
        let s = self.seq.get() + 1;
        self.seq.set(s);
        s
    }

    fn wait(&self, w: &AtomicU64, s: u64, who: usize, what: &str) -> Result<()> {
        self.wait_touching(w, s, who, what, || {})
    }

    /// [`NodeColl::wait`], calling `touch` before every look at the word while it spins (to ask
    /// for further cache lines at the same time as the word's).
    fn wait_touching(
        &self,
        w: &AtomicU64,
        s: u64,
        who: usize,
        what: &str,
        touch: impl Fn(),
    ) -> Result<()> {
        self.wait_until(s, who, what, || {
            touch();
            self.reached(w, s)
        })
    }

    /// Waits (spinning, yielding, then napping; see the module) until `done` holds, for member
    /// `who` in step `s` of a `what` (for the liveness checks and the error messages).
    fn wait_until(&self, s: u64, who: usize, what: &str, done: impl Fn() -> bool) -> Result<()> {
        if done() {
            return Ok(());
        }
        // Read per wait: the start-up barrier runs before the core knows how the ranks are placed.
        let oversubscribed = self.core.oversubscribed();
        let spin = if oversubscribed {
            SPIN_OVERSUBSCRIBED
        } else {
            SPIN
        };
        let yield_for = match (self.yield_us, oversubscribed) {
            (Some(us), _) => Duration::from_micros(us),
            (None, true) => YIELD_FOR_OVERSUBSCRIBED,
            (None, false) => YIELD_FOR,
        };
        for _ in 0..spin {
            std::hint::spin_loop();
            if done() {
                return Ok(());
            }
        }
        let start = Instant::now();
        let mut next_check = Duration::from_millis(200);
        let mut n: u32 = 0;
        loop {
            // Keep the portals engine going (a sender may wait for queue space here), then give
            // the core to whoever we wait for.
            self.core.drain()?;
            if done() {
                return Ok(());
            }
            // Yield for a while; a longer wait sleeps (briefly, growing with the wait to 100 ms:
            // a sixteenth of the time waited so far, so an answer is late by at most ~6 %) so
            // waiting ranks stop taking CPU from yod, the PCT and ranks that still compute, and
            // a rank parked in a collective wakes ten times a second, not a thousand.
            let el = start.elapsed();
            if el < yield_for {
                std::thread::yield_now();
            } else {
                let nap = (el / 16).clamp(Duration::from_micros(20), Duration::from_millis(100));
                std::thread::sleep(nap);
            }
            if done() {
                return Ok(());
            }
            n = n.wrapping_add(1);
            if n % 16 == 0 {
                let el = start.elapsed();
                if el > next_check {
                    next_check = el + Duration::from_millis(200);
                    let peer = self.world[who];
                    let describe = || format!("rank {peer} in a node-local {what} (step {s})");
                    self.core.check_peers(&[peer], &describe)?;
                }
                if el > self.core.timeout {
                    return Err(Error::Timeout(
                        self.core.timeout,
                        format!(
                            "world rank {} in a node-local {what} (step {s})",
                            self.world[who]
                        ),
                    ));
                }
            }
        }
    }

    /// Waits until member `i` arrived at operation `s`.
    pub fn wait_arrival(&self, i: usize, s: u64, what: &str) -> Result<()> {
        if self.seen.borrow()[i] >= s {
            return Ok(());
        }
        let w = self.area().arrival(self.c, self.ports[i]);
        self.wait(w, s, i, what)?;
        let now = self.seq_of(w);
        let mut seen = self.seen.borrow_mut();
        seen[i] = seen[i].max(now);
        Ok(())
    }

    /// Waits until member `i` released operation `s`.
    pub fn wait_release(&self, i: usize, s: u64, what: &str) -> Result<()> {
        self.wait(self.area().release(self.c, self.ports[i]), s, i, what)
    }

    /// Waits until every other member arrived at `s`.
    pub fn wait_all(&self, s: u64, what: &str) -> Result<()> {
        for i in 0..self.len() {
            if i != self.me {
                self.wait_arrival(i, s, what)?;
            }
        }
        Ok(())
    }

    /// Marks this rank arrived at `s`.
    pub fn arrive(&self, s: u64) {
        self.area()
            .arrival(self.c, self.ports[self.me])
            .store(self.word(s), Ordering::Release);
    }

    /// Marks operation `s` released by this rank (a leader: its result is in its slot).
    pub fn release(&self, s: u64) {
        self.area()
            .release(self.c, self.ports[self.me])
            .store(self.word(s), Ordering::Release);
    }

    /// Waits until the slot of operation `s` is free: every member arrived at `s + 1 - depth`.
    /// A member found behind that is waited for until it is `depth / 2` operations further
    /// (`depth - 2` when oversubscribed: the reader catches up in one turn on its core)
    /// (at most at `s - 1`, which every member reaches without this rank: it finished every
    /// earlier operation), so a writer that outruns a reader does not poll the reader's arrival
    /// line on every operation, which would move that line between the cores at each of the
    /// reader's arrivals.
    /// `depth` is the ring's length (`SLOTS` for the slots, `SMALLS` for the small slots; `s` is at
    /// least `depth`).
    fn wait_reuse(&self, s: u64, depth: u64, what: &str) -> Result<()> {
        let need = s + 1 - depth;
        let slack = if self.core.oversubscribed() {
            depth - 2
        } else {
            depth / 2
        };
        let target = (need + slack).min(s - 1);
        for i in 0..self.len() {
            if i != self.me && self.seen.borrow()[i] < need {
                self.wait_arrival(i, target, what)?;
            }
        }
        Ok(())
    }

    /// Writes `data` into this rank's slot of operation `s` (after the reuse check) and `total`
    /// (the whole payload's length, which every reader checks) into its info word.
    pub fn publish(&self, s: u64, data: &[u8], total: u64, what: &str) -> Result<()> {
        if s >= SLOTS as u64 {
            self.wait_reuse(s, SLOTS as u64, what)?;
        }
        let slot = (s % SLOTS as u64) as u32;
        let port = self.ports[self.me];
        self.area()
            .write(self.c, port, slot, 8, &total.to_le_bytes());
        self.area().write(self.c, port, slot, SLOT_DATA, data);
        self.area()
            .slot_word(self.c, port, slot)
            .store(self.word(s), Ordering::Release);
        // Take the lines of the next operation's slot now (for a payload of the same size): the
        // others read them SLOTS operations ago and still hold copies, and a store to such a line
        // waits a line crossing to get it back. The word is stored after every payload store, so
        // without this the next publication would reach its readers a crossing late.
        let next = ((s + 1) % SLOTS as u64) as u32;
        self.area().prefetch(
            self.c,
            port,
            next,
            0,
            Self::span(data.len(), SLOT / 64),
            true,
        );
        Ok(())
    }

    /// Writes `data` (at most [`SMALL_BYTES`]) into this rank's small slot of operation `s`
    /// (after the reuse check over the [`SMALLS`] small slots) with its length, then the word.
    /// Used instead of [`NodeColl::publish`] for small payloads when a writer may run far ahead
    /// of its readers (crowded broadcasts); the readers take it with [`NodeColl::take_small`].
    pub fn publish_small(&self, s: u64, data: &[u8], what: &str) -> Result<()> {
        if s >= SMALLS as u64 {
            self.wait_reuse(s, SMALLS as u64, what)?;
        }
        let which = (s % SMALLS as u64) as u32;
        let port = self.ports[self.me];
        let area = self.area();
        area.write_small(self.c, port, which, 8, &(data.len() as u64).to_le_bytes());
        area.write_small(self.c, port, which, SLOT_DATA, data);
        area.small_word(self.c, port, which)
            .store(self.word(s), Ordering::Release);
        // As in `publish`: take the next small slot's lines ahead (readers still hold copies from
        // SMALLS operations ago).
        let next = ((s + 1) % SMALLS as u64) as u32;
        area.prefetch_small_write(self.c, port, next, SLOT_DATA + data.len());
        self.core.st.borrow_mut().stats.small_ops += 1;
        Ok(())
    }

    /// Waits until member `i` published its small slot of operation `s`, checks that its payload
    /// has `dst.len()` bytes and copies it into `dst`. A member that published operation `s` in
    /// its slot instead (its payload does not fit a small slot: the lengths differ) is a size
    /// mismatch, not a wait without end.
    pub fn take_small(&self, i: usize, s: u64, dst: &mut [u8], op: &'static str) -> Result<()> {
        let which = (s % SMALLS as u64) as u32;
        let (port, area) = (self.ports[i], self.area());
        let small = area.small_word(self.c, port, which);
        let slot = area.slot_word(self.c, port, (s % SLOTS as u64) as u32);
        self.wait_until(s, i, op, || self.reached(small, s) || self.reached(slot, s))?;
        if !self.reached(small, s) {
            self.check_len(i, s, dst.len() as u64, op)?;
            // Equal lengths in the slot cannot be: this rank's payload fits a small slot.
            return Err(Error::SizeMismatch {
                op,
                detail: format!(
                    "world rank {} published a slot payload where this rank has {} bytes",
                    self.world[i],
                    dst.len()
                ),
            });
        }
        self.check_small_len(i, s, dst.len() as u64, op)?;
        area.read_small(self.c, port, which, SLOT_DATA, dst);
        self.core.st.borrow_mut().stats.small_ops += 1;
        Ok(())
    }

    /// Bytes from the start of a slot (header and payload) that a reader of a `len`-byte payload
    /// asks for while it waits, or a writer takes ownership of ahead (at most `lines` lines).
    fn span(len: usize, lines: usize) -> usize {
        (SLOT_DATA + len).min(SLOT).min(lines * 64)
    }

    /// Waits until member `i` published its slot of operation `s`, whose payload has `len` bytes:
    /// while it spins, it asks for the slot's further cache lines (up to [`TOUCH_LINES`] in all)
    /// along with the word's, so a payload that spills over the word's line costs one line
    /// crossing, not two in a row (the word's, then the rest once the word is seen).
    pub fn wait_slot_data(&self, i: usize, s: u64, len: usize, what: &str) -> Result<()> {
        let slot = (s % SLOTS as u64) as u32;
        let (port, area) = (self.ports[i], self.area());
        let span = Self::span(len, TOUCH_LINES);
        self.wait_touching(area.slot_word(self.c, port, slot), s, i, what, || {
            if span > 64 {
                area.prefetch(self.c, port, slot, 64, span - 64, false);
            }
        })
    }

    /// [`NodeColl::wait_slot_data`] for every other member.
    pub fn wait_all_slots_data(&self, s: u64, len: usize, what: &str) -> Result<()> {
        for i in 0..self.len() {
            if i != self.me {
                self.wait_slot_data(i, s, len, what)?;
            }
        }
        Ok(())
    }

    /// [`NodeColl::wait_slot_data`] for a reader whose payload does not fit a small slot while
    /// the writer would put one that does there (a crowded broadcast): a member that published
    /// operation `s` in its small slot has a shorter payload than this rank's `total` bytes, and
    /// that is a size mismatch, not a wait without end.
    pub fn wait_slot_data_not_small(
        &self,
        i: usize,
        s: u64,
        len: usize,
        total: u64,
        op: &'static str,
    ) -> Result<()> {
        let (port, area) = (self.ports[i], self.area());
        let slot = area.slot_word(self.c, port, (s % SLOTS as u64) as u32);
        if self.reached(slot, s) {
            return Ok(());
        }
        let small = area.small_word(self.c, port, (s % SMALLS as u64) as u32);
        let which = (s % SLOTS as u64) as u32;
        let span = Self::span(len, TOUCH_LINES);
        self.wait_until(s, i, op, || {
            if span > 64 {
                area.prefetch(self.c, port, which, 64, span - 64, false);
            }
            self.reached(slot, s) || self.reached(small, s)
        })?;
        if self.reached(slot, s) {
            return Ok(());
        }
        self.check_small_len(i, s, total, op)?;
        // Equal lengths in the small slot cannot be: this rank's payload does not fit one.
        Err(Error::SizeMismatch {
            op,
            detail: format!(
                "world rank {} published a small-slot payload where this rank has {total} bytes",
                self.world[i]
            ),
        })
    }

    /// Checks that member `i` (which published operation `s` in its small slot) has a payload of
    /// `total` bytes.
    fn check_small_len(&self, i: usize, s: u64, total: u64, op: &'static str) -> Result<()> {
        let mut b = [0u8; 8];
        self.area()
            .read_small(self.c, self.ports[i], (s % SMALLS as u64) as u32, 8, &mut b);
        self.same_len(i, u64::from_le_bytes(b), total, op)
    }

    /// Waits until member `i` published its slot of operation `s`.
    pub fn wait_slot(&self, i: usize, s: u64, what: &str) -> Result<()> {
        let slot = (s % SLOTS as u64) as u32;
        self.wait(
            self.area().slot_word(self.c, self.ports[i], slot),
            s,
            i,
            what,
        )
    }

    /// Member `i` has published its slot of operation `s` (no waiting).
    pub fn slot_ready(&self, i: usize, s: u64) -> bool {
        let slot = (s % SLOTS as u64) as u32;
        self.reached(self.area().slot_word(self.c, self.ports[i], slot), s)
    }

    /// Waits until every other member published its slot of operation `s`.
    pub fn wait_all_slots(&self, s: u64, what: &str) -> Result<()> {
        for i in 0..self.len() {
            if i != self.me {
                self.wait_slot(i, s, what)?;
            }
        }
        Ok(())
    }

    /// A size-mismatch error unless member `i`'s published length `theirs` is this rank's `total`.
    fn same_len(&self, i: usize, theirs: u64, total: u64, op: &'static str) -> Result<()> {
        if theirs != total {
            return Err(Error::SizeMismatch {
                op,
                detail: format!(
                    "world rank {} contributed {theirs} bytes where this rank has {total}",
                    self.world[i]
                ),
            });
        }
        Ok(())
    }

    /// Checks that member `i` (which published operation `s`) has a payload of `total` bytes.
    pub fn check_len(&self, i: usize, s: u64, total: u64, op: &'static str) -> Result<()> {
        let mut b = [0u8; 8];
        self.area()
            .read(self.c, self.ports[i], (s % SLOTS as u64) as u32, 8, &mut b);
        self.same_len(i, u64::from_le_bytes(b), total, op)
    }

    /// Checks every other member's payload length.
    pub fn check_all(&self, s: u64, total: u64, op: &'static str) -> Result<()> {
        for i in 0..self.len() {
            if i != self.me {
                self.check_len(i, s, total, op)?;
            }
        }
        Ok(())
    }

    /// Reads member `i`'s slot of operation `s`.
    pub fn read(&self, i: usize, s: u64, dst: &mut [u8]) {
        self.area().read(
            self.c,
            self.ports[i],
            (s % SLOTS as u64) as u32,
            SLOT_DATA,
            dst,
        );
    }

    /// Reads `dst.len()` bytes at `off` of member `i`'s payload in its slot of operation `s`.
    pub fn read_at(&self, i: usize, s: u64, off: usize, dst: &mut [u8]) {
        self.area().read(
            self.c,
            self.ports[i],
            (s % SLOTS as u64) as u32,
            SLOT_DATA + off,
            dst,
        );
    }

    /// Publishes in this rank's slot of operation `s` a header word (which path a large operation
    /// takes, see [`NodeColl::header`]), this process's id and the addresses of `bufs` in this
    /// process, for members to read them with [`NodeColl::read_remote`]; `total` is the payload
    /// length every reader checks. The caller must keep the buffers unchanged until every member
    /// has arrived at a later operation that it starts only after its reads.
    pub fn publish_remote(
        &self,
        s: u64,
        header: u64,
        bufs: &[&[u8]],
        total: u64,
        what: &str,
    ) -> Result<()> {
        let mut b = [0u8; 8 * (2 + MAX_REMOTE)];
        b[..8].copy_from_slice(&header.to_le_bytes());
        b[8..16].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
        for (k, buf) in bufs.iter().take(MAX_REMOTE).enumerate() {
            b[16 + 8 * k..24 + 8 * k].copy_from_slice(&(buf.as_ptr() as u64).to_le_bytes());
        }
        self.publish(s, &b[..16 + 8 * bufs.len().min(MAX_REMOTE)], total, what)
    }

    /// Publishes only a header word (see [`NodeColl::publish_remote`]).
    pub fn publish_header(&self, s: u64, header: u64, total: u64, what: &str) -> Result<()> {
        self.publish(s, &header.to_le_bytes(), total, what)
    }

    /// The header word member `i` published for operation `s` (after [`NodeColl::wait_slot`]).
    pub fn header(&self, i: usize, s: u64) -> u64 {
        let mut b = [0u8; 8];
        self.read(i, s, &mut b);
        u64::from_le_bytes(b)
    }

    /// Copies `dst.len()` bytes at offset `off` of buffer `which` that member `i` published with
    /// [`NodeColl::publish_remote`] for operation `s` straight from its process into `dst`
    /// (`process_vm_readv`: one copy, no staging). The caller has checked the published length
    /// covers `off + dst.len()`.
    pub fn read_remote(
        &self,
        i: usize,
        s: u64,
        which: usize,
        off: usize,
        dst: &mut [u8],
        what: &str,
    ) -> Result<()> {
        let len = dst.len();
        self.move_remote(
            i,
            s,
            which,
            off,
            len,
            what,
            ("read", "of"),
            |pid, at, done| qk::sys::cma_read(pid, at, &mut dst[done..]),
        )?;
        self.core.st.borrow_mut().stats.cma_blocks += 1;
        Ok(())
    }

    /// Moves `len` bytes between this process and member `i`'s buffer `which` (published in its
    /// slot of operation `s`) at offset `off`, by repeated `step(pid, address, bytes done)`
    /// calls, each returning the bytes it moved. The process id in the slot must be the one
    /// member `i` registered for its port when it attached, so a slot cannot aim this rank's
    /// cross-memory attach at a process outside the job's region.
    #[allow(clippy::too_many_arguments)]
    fn move_remote(
        &self,
        i: usize,
        s: u64,
        which: usize,
        off: usize,
        len: usize,
        what: &str,
        (verb, prep): (&str, &str),
        mut step: impl FnMut(i32, u64, usize) -> std::io::Result<usize>,
    ) -> Result<()> {
        let mut b = [0u8; 8 * (2 + MAX_REMOTE)];
        self.read(i, s, &mut b);
        let word = |k: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[8 * k..8 * k + 8]);
            u64::from_le_bytes(w)
        };
        let pid = word(1);
        let addr = word(2 + which.min(MAX_REMOTE - 1));
        let fail = |why: String| {
            Error::Invalid(format!(
                "node-local {what}: cannot {verb} {len} bytes {prep} world rank {} (pid {pid}) by \
                 cross-memory attach: {why} (PUMACOLL_CMA=0 turns this path off)",
                self.world[i]
            ))
        };
        if pid != u64::from(self.core.pid_of(self.ports[i])) {
            return Err(fail(
                "its slot names another process than the one attached to its port".into(),
            ));
        }
        let pid = i32::try_from(pid).map_err(|_| fail("bad process id".into()))?;
        let mut done = 0;
        while done < len {
            let at = addr + (off + done) as u64;
            match step(pid, at, done) {
                Ok(0) => return Err(fail("the kernel copied nothing".into())),
                Ok(k) => done += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(fail(e.to_string())),
            }
        }
        Ok(())
    }

    /// Publishes in this rank's slot of operation `s` what a crowded all-to-all by cross-memory
    /// attach needs (see `Comm::cma_alltoall_crowded`): `header` (naming the single-copy path,
    /// see [`LargePath::word_with_next`]), this
    /// process's id, the addresses of its send buffer `sb` and receive buffer `rb`, an empty
    /// claim mask ([`NodeColl::claim_move`]) and `pending`, the block moves this rank still waits for
    /// ([`NodeColl::complete`], [`NodeColl::pending`]). The caller keeps both buffers until
    /// [`NodeColl::pending`] reads 0.
    pub fn publish_exchange(
        &self,
        s: u64,
        header: u64,
        sb: &[u8],
        rb: &[u8],
        pending: u64,
        what: &str,
    ) -> Result<()> {
        let mut b = [0u8; EXCHANGE_PENDING + 8];
        let words = [
            header,
            u64::from(std::process::id()),
            sb.as_ptr() as u64,
            rb.as_ptr() as u64,
        ];
        for (k, w) in words.iter().enumerate() {
            b[8 * k..8 * k + 8].copy_from_slice(&w.to_le_bytes());
        }
        b[EXCHANGE_PENDING..].copy_from_slice(&pending.to_le_bytes());
        self.publish(s, &b, sb.len() as u64, what)
    }

    fn exchange_word(&self, i: usize, s: u64, off: usize) -> &AtomicU64 {
        let slot = (s % SLOTS as u64) as u32;
        self.area()
            .slot_atomic(self.c, self.ports[i], slot, SLOT_DATA + off)
    }

    /// Claims bit `bit` of member `i`'s claim mask of operation `s` (published with
    /// [`NodeColl::publish_exchange`]): true for the one caller that set it. `bit` < 64.
    pub fn claim_move(&self, i: usize, s: u64, bit: usize) -> bool {
        let m = 1u64 << bit;
        self.exchange_word(i, s, EXCHANGE_CLAIMS)
            .fetch_or(m, Ordering::AcqRel)
            & m
            == 0
    }

    /// Counts `k` of member `i`'s pending block moves of operation `s` done (after the copies;
    /// a member does not count its own moves here, see [`NodeColl::pending`]).
    pub fn complete(&self, i: usize, s: u64, k: u64) {
        self.exchange_word(i, s, EXCHANGE_PENDING)
            .fetch_sub(k, Ordering::AcqRel);
    }

    /// This rank's pending block moves of operation `s` less those the others have done: every
    /// block to and from this rank moved when it equals the moves this rank did itself.
    pub fn pending(&self, s: u64) -> u64 {
        self.exchange_word(self.me, s, EXCHANGE_PENDING)
            .load(Ordering::Acquire)
    }

    /// Waits (as for a slot or an arrival: spin, yield, nap) until `done` holds, checking that
    /// member `who` still lives.
    pub fn wait_for(&self, s: u64, who: usize, what: &str, done: impl Fn() -> bool) -> Result<()> {
        self.wait_until(s, who, what, done)
    }

    /// Copies `src` straight into member `i`'s buffer `which` (published with
    /// [`NodeColl::publish_exchange`]: 0 its send, 1 its receive buffer) at offset `off`
    /// (`process_vm_writev`). The caller has checked the published length covers it.
    pub fn write_remote(
        &self,
        i: usize,
        s: u64,
        which: usize,
        off: usize,
        src: &[u8],
        what: &str,
    ) -> Result<()> {
        self.move_remote(
            i,
            s,
            which,
            off,
            src.len(),
            what,
            ("write", "to"),
            |pid, at, done| qk::sys::cma_write(pid, at, &src[done..]),
        )?;
        let st = &mut self.core.st.borrow_mut().stats;
        st.cma_blocks += 1;
        st.cma_pushed += 1;
        Ok(())
    }

    /// The sequence number the next operation will get (without starting it): a member that
    /// must learn the leader's choice before it starts waits for the leader's slot of it.
    pub fn peek(&self) -> u64 {
        self.seq.get() + 1
    }

    /// The path member 0 named for this crowded all-to-all of `total` bytes per rank in its
    /// header of the last one of that length (None: none named, or forgotten).
    pub fn ahead(&self, total: u64) -> Option<LargePath> {
        let a = self.ahead.borrow();
        a.iter().find(|e| e.0 == total).map(|e| e.1)
    }

    /// Remembers `next` as the path of the next crowded all-to-all of `total` bytes per rank
    /// (None forgets it). Every member makes the same calls in the same order (one per such
    /// operation, from the one header word they all read), so their memories stay alike.
    pub fn set_ahead(&self, total: u64, next: Option<LargePath>) {
        let mut a = self.ahead.borrow_mut();
        a.retain(|e| e.0 != total);
        if let Some(p) = next {
            if a.len() == AHEAD_LENGTHS {
                a.remove(0);
            }
            a.push((total, p));
        }
    }

    /// Forgets every path named ahead (after a failed operation: the members may not have read
    /// the same header, so each goes back to the default).
    pub fn forget_ahead(&self) {
        self.ahead.borrow_mut().clear();
    }

    /// Reads the header word member `i` published for operation `s` (once) and checks that it
    /// names `mine`, the path this rank takes: members that took different protocols for one
    /// operation report it instead of reading each other's slots as their own protocol's.
    /// Returns the word (member 0's names the next operation's path ahead).
    pub fn check_path(&self, i: usize, s: u64, mine: LargePath, op: &'static str) -> Result<u64> {
        let w = self.header(i, s);
        let theirs = LargePath::from_word(w);
        if theirs != mine {
            return Err(Error::Invalid(format!(
                "node-local {op}: world rank {} took the {theirs:?} path where this rank took \
                 {mine:?}; the members did not agree on the protocol of this operation",
                self.world[i]
            )));
        }
        Ok(w)
    }

    /// The measured-cost chooser of large operations of kind `op` (used by the member that
    /// decides).
    pub fn chooser(&self, op: LargeOp) -> std::cell::RefMut<'_, Chooser> {
        std::cell::RefMut::map(self.choosers.borrow_mut(), |c| &mut c[op as usize])
    }

    /// Starts the next stage piece: returns the byte offset of its segment in every member's
    /// stage and the piece's first sequence number (the caller arrives at it once its own part
    /// of the piece is written). A `writer` first waits until every member arrived at the first
    /// sequence number of piece `g - STAGE_SEGS + 1`: members arrive there only after they read
    /// the segment's previous piece `g - STAGE_SEGS` (every stage protocol reads a piece before it
    /// starts the next one), so nobody still reads the bytes it overwrites.
    pub fn stage_piece(&self, writer: bool, what: &str) -> Result<(usize, u64)> {
        let g = self.pieces.get();
        self.pieces.set(g + 1);
        self.core.st.borrow_mut().stats.stage_pieces += 1;
        let segs = STAGE_SEGS as u64;
        if writer && g + 1 >= segs {
            let free_at = self.piece_seq.borrow()[((g + 1) % segs) as usize];
            self.wait_all(free_at, what)?;
        }
        let s = self.next();
        self.piece_seq.borrow_mut()[(g % segs) as usize] = s;
        Ok(((g % segs) as usize * STAGE_SEG, s))
    }

    /// This rank's stage bytes `off..off + len` (to write before arriving at the piece).
    #[allow(clippy::mut_from_ref)]
    pub fn stage_mine(&self, off: usize, len: usize) -> &mut [u8] {
        self.area.stage_mut(self.ports[self.me], off, len)
    }

    /// Member `i`'s stage bytes `off..off + len` (after it arrived at the piece).
    pub fn stage_of(&self, i: usize, off: usize, len: usize) -> &[u8] {
        self.area.stage(self.ports[i], off, len)
    }

    /// Combines every member's slot of operation `s` in group order into `acc` (which holds this
    /// rank's own contribution on entry; `tmp` is scratch of the same length).
    pub fn combine_all<T: Pod>(
        &self,
        s: u64,
        acc: &mut [T],
        tmp: &mut [T],
        own: &mut [T],
        op: &dyn Operation<T>,
    ) {
        copy_elems(own, acc);
        for i in 0..self.len() {
            let src: &[T] = if i == self.me {
                own
            } else {
                self.read(i, s, bytemuck::cast_slice_mut(tmp));
                tmp
            };
            if i == 0 {
                copy_elems(acc, src);
            } else {
                op.combine(acc, src);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: [LargePath; 2] = [LargePath::Stage, LargePath::Cma];

    /// Runs `ops` operations of `bytes` through the chooser among `allowed` with fixed per-byte
    /// costs (index: path); returns how many took each path.
    fn run(
        ch: &mut Chooser,
        bytes: usize,
        ops: u32,
        allowed: &[LargePath],
        cost: [f64; PATHS],
    ) -> [u32; PATHS] {
        let mut n = [0; PATHS];
        for _ in 0..ops {
            let p = ch.pick(bytes, allowed);
            assert!(allowed.contains(&p));
            n[p as usize] += 1;
            ch.record(bytes, p, cost[p as usize] * bytes as f64);
        }
        n
    }

    #[test]
    fn tries_every_path_then_keeps_the_cheapest_and_probes_the_others() {
        let mut ch = Chooser::default();
        // Each path twice (its first sample, which pays for cold caches, is dropped).
        for (p, ns) in [(LargePath::Stage, 9e6), (LargePath::Stage, 120_000.0)] {
            assert_eq!(ch.pick(1 << 20, &TWO), p);
            ch.record(1 << 20, p, ns);
        }
        for (p, ns) in [(LargePath::Cma, 9e6), (LargePath::Cma, 100_000.0)] {
            assert_eq!(ch.pick(1 << 20, &TWO), p);
            ch.record(1 << 20, p, ns);
        }
        // Cma is cheaper (within 1.5x): taken, the stages re-checked after 2, 4, ..., 64
        // operations (young estimate), then every (2 * 1.2 + 1) / PROBE_SPEND = 109th, two
        // operations each time.
        let n = run(&mut ch, 1 << 20, 160, &TWO, [0.12, 0.1, 9.0]);
        assert!((10..=18).contains(&n[0]) && n[0] + n[1] == 160, "{n:?}");
        // Other size classes are measured on their own.
        assert_eq!(ch.pick(100_000, &TWO), LargePath::Stage);
        assert_eq!(ch.estimate(100_000, LargePath::Cma), None);
        // Three paths: each probed in turn.
        let mut ch = Chooser::default();
        let n = run(&mut ch, 1 << 20, 6 + 160, &ALL_PATHS, [0.12, 0.11, 0.1]);
        assert_eq!(n[0] + n[1] + n[2], 166);
        assert!(
            (14..=34).contains(&n[0]) && (14..=34).contains(&n[1]),
            "{n:?}"
        );
    }

    #[test]
    fn a_far_worse_path_is_probed_rarely() {
        let mut ch = Chooser::default();
        let n = run(&mut ch, 300_000, 4 + 640, &TWO, [0.05, 0.12, 0.0]);
        // 2 to explore, 2 while young (after 2 and 4 operations, until it has 3 samples), then
        // every PROBE_MAX = 160th (2.4x behind), two operations each time.
        assert!((8..=16).contains(&n[1]) && n[0] + n[1] == 644, "{n:?}");
    }

    #[test]
    fn probing_costs_a_few_percent() {
        // Near-state costs of a 1 MiB broadcast: the stages 1.7x ahead of the other two paths.
        // Probing each every (2 * 1.7 + 1) / PROBE_SPEND = 141 operations, two operations each
        // time, costs ~4 % of the operations in all (the fixed 64-operation interval before:
        // ~12 %).
        let mut ch = Chooser::default();
        run(&mut ch, 1 << 20, 200, &ALL_PATHS, [0.05, 0.085, 0.085]);
        let n = run(&mut ch, 1 << 20, 2000, &ALL_PATHS, [0.05, 0.085, 0.085]);
        assert!(n[1] + n[2] <= 80, "{n:?}");
    }

    #[test]
    fn a_short_disturbance_does_not_keep_a_worse_path() {
        let mut ch = Chooser::default();
        let near = [0.05, 0.1, 0.06];
        run(&mut ch, 1 << 20, 300, &ALL_PATHS, near);
        // Two slow operations of the stages (a descheduled peer) hand the lead to the
        // non-temporal stores, ...
        let n = run(&mut ch, 1 << 20, 2, &ALL_PATHS, [0.3, 0.1, 0.06]);
        assert_eq!(n[0], 2, "{n:?}");
        assert!(ch.estimate(1 << 20, LargePath::Stage) > ch.estimate(1 << 20, LargePath::StageNt));
        // ... which the stages win back within a few operations (not a whole probe interval).
        let n = run(&mut ch, 1 << 20, 40, &ALL_PATHS, near);
        assert!(n[0] >= 25, "{n:?}");
    }

    #[test]
    fn follows_a_change_of_costs() {
        let mut ch = Chooser::default();
        let (near, far) = ([0.05, 0.1, 0.06], [0.15, 0.1, 0.07]);
        run(&mut ch, 1 << 20, 100, &ALL_PATHS, near);
        let n = run(&mut ch, 1 << 20, 100, &ALL_PATHS, near);
        assert!(n[0] >= 80, "{n:?}");
        // The host moved the vCPUs apart: plain stores into the stage get 3x slower.
        run(&mut ch, 1 << 20, 100, &ALL_PATHS, far);
        let n = run(&mut ch, 1 << 20, 100, &ALL_PATHS, far);
        assert!(n[2] >= 80, "{n:?}");
        // And back: the stages, 2x behind, are probed again within PROBE_MAX operations.
        run(&mut ch, 1 << 20, PROBE_MAX + 2, &ALL_PATHS, near);
        let n = run(&mut ch, 1 << 20, 100, &ALL_PATHS, near);
        assert!(n[0] >= 90, "{n:?}");
    }

    #[test]
    fn one_slow_sample_does_not_condemn_a_path() {
        let mut ch = Chooser::default();
        run(&mut ch, 1 << 20, 50, &TWO, [0.05, 0.1, 0.0]);
        ch.record(1 << 20, LargePath::Stage, 100.0 * (1 << 20) as f64);
        let e = ch.estimate(1 << 20, LargePath::Stage).unwrap_or(0.0);
        assert!(e < 0.1, "{e}");
        // Still the path taken (apart from one probe of the other).
        let n = run(&mut ch, 1 << 20, 16, &TWO, [0.05, 0.1, 0.0]);
        assert!(n[0] >= 15, "{n:?}");
    }

    #[test]
    fn only_allowed_paths_are_taken() {
        let mut ch = Chooser::default();
        let only = [LargePath::StageNt];
        let n = run(&mut ch, 5000, 50, &only, [0.01, 0.01, 1.0]);
        assert_eq!(n, [0, 0, 50]);
        assert_eq!(ch.pick(5000, &[]), LargePath::Stage);
    }

    #[test]
    fn header_words_name_the_path() {
        for p in ALL_PATHS {
            assert_eq!(LargePath::from_word(p.word()), p);
        }
        assert_eq!(LargePath::from_word(77), LargePath::Stage);
    }

    #[test]
    fn a_header_word_names_this_path_and_the_next_apart() {
        for p in ALL_PATHS {
            assert_eq!(LargePath::next_of(p.word()), None);
            assert_eq!(LargePath::from_word(p.word_with_next(None)), p);
            for q in ALL_PATHS {
                let w = p.word_with_next(Some(q));
                assert_eq!(LargePath::from_word(w), p, "{p:?} then {q:?}");
                assert_eq!(LargePath::next_of(w), Some(q), "{p:?} then {q:?}");
            }
        }
        // An unknown next path names none.
        assert_eq!(LargePath::next_of(LargePath::Cma.word() | 77 << 8), None);
    }
}
