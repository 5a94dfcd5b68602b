//! The discrete-event LogGOPS simulator.
//!
//! Time is integer nanoseconds (`u64`). State is struct-of-arrays indexed by operation or rank;
//! the event queue is a radix heap (events never move backwards in time), and events due at the
//! current instant go through a FIFO. Nothing is allocated per event.
//!
//! # Model (per rank: `num_cpus` CPUs, `num_nics` NICs)
//! * `calc w`: starts when its dependencies are met and its CPU is free; occupies the CPU for `w`
//!   ns of available (non-detour) CPU time.
//! * Eager send of `z <= S` bytes: starts when the CPU and the NIC are free; CPU busy for
//!   `o + (z-1)O` (stretched by detours); NIC busy for `g + (z-1)G`; the message is completely at
//!   the receiver `L + (z-1)G` after the CPU part ends. The send completes when its CPU part ends.
//! * A message is matched at the receiver when it has arrived *and* a matching receive is posted
//!   (MPI semantics: posted-receive queue and unexpected-message queue, first match in order, so
//!   receives with identical source and tag match in posting order; messages from one rank arrive
//!   in injection order, so they cannot overtake each other). The receiver then spends
//!   `o + (z-1)O` on its CPU (after its NIC receive gap `g`); the receive completes at the end.
//! * Rendezvous (`z > S`): the send's CPU spends `o` issuing a request-to-send; when the request
//!   is matched the receiver spends `o` and returns a clear-to-send (`L`); then the sender spends
//!   `o + (z-1)O` and the data arrives `L + (z-1)G` later; the receiver finishes with
//!   `o + (z-1)O`. The send completes after its data part, the receive after its last part.
//! * `a requires b`: `a` becomes ready when `b` completes; `a irequires b`: when `b` starts
//!   (a receive starts when it is posted). Resources are granted first-come first-served.

use crate::noise::{DetourCache, Noise};
use crate::schedule::{Op, OpKind, Schedule, ANY, IREQ_BIT};
use crate::states::States;

/// LogGOPS parameters. Times in ns; `G` and `O` in picoseconds per byte.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Params {
    /// Latency.
    pub l: u64,
    /// CPU overhead per message.
    pub o: u64,
    /// NIC gap per message.
    pub g: u64,
    /// Gap per byte (ps).
    pub big_g_ps: u64,
    /// CPU overhead per byte (ps).
    pub big_o_ps: u64,
    /// Rendezvous threshold: messages larger than `s` bytes use rendezvous.
    pub s: u64,
}

impl Default for Params {
    /// LogGOPSim's defaults: L=2500, o=1500, g=1000, G=6, O=0, S=65535.
    fn default() -> Self {
        Params {
            l: 2500,
            o: 1500,
            g: 1000,
            big_g_ps: 6000,
            big_o_ps: 0,
            s: 65535,
        }
    }
}

impl Params {
    #[inline]
    fn gb(&self, z: u64) -> u64 {
        z.saturating_sub(1).saturating_mul(self.big_g_ps) / 1000
    }
    #[inline]
    fn ob(&self, z: u64) -> u64 {
        z.saturating_sub(1).saturating_mul(self.big_o_ps) / 1000
    }
}

/// What to record beyond completion times, and on how many threads to simulate.
#[derive(Clone, Copy, Debug)]
pub struct SimOptions {
    /// Keep per-operation noise (needed for the per-class absorbed/amplified analysis).
    pub record_noise: bool,
    /// Keep per-operation start times (send: CPU start, recv: posting, calc: CPU start).
    pub record_start: bool,
    /// Keep per-rank CPU busy time (needed for per-rank wait).
    pub record_busy: bool,
    /// Threads to simulate on: 2 or more splits the ranks in two halves simulated side by side
    /// (same results; see [`simulate`]); default 1.
    pub threads: usize,
    /// Fewest operations for which more than one thread is used (default [`PARALLEL_SIM_OPS`]).
    pub min_parallel_ops: usize,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            record_noise: false,
            record_start: false,
            record_busy: false,
            threads: 1,
            min_parallel_ops: PARALLEL_SIM_OPS,
        }
    }
}

/// Marks a critical-path predecessor reached through CPU contention (not a dependency/message).
pub const PRED_RESOURCE: u32 = 1 << 31;
/// No predecessor.
pub const PRED_NONE: u32 = u32::MAX;

/// Per-operation simulation state: 32 bytes, 32-byte aligned, so one record is always within
/// one cache line. Besides the timing it carries the operation's first two dependents (copied
/// from the schedule's CSR lists), so releasing them reads no other line than this one.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    zerocopy::FromBytes,
    zerocopy::IntoBytes,
    zerocopy::KnownLayout,
    zerocopy::Immutable,
)]
#[repr(C, align(32))]
pub struct OpState {
    /// Time its dependencies were satisfied.
    pub ready: u64,
    /// Completion time (`u64::MAX`: never completed).
    pub end: u64,
    /// Internal: pending-dependency count, then matching-queue link / matched receive.
    pub link: u32,
    /// The predecessor that determined its timing ([`PRED_RESOURCE`] bit, [`PRED_NONE`]).
    pub pred: u32,
    /// Internal: the dependents (raw CSR entries) when there are at most two, [`DEP_NONE`]
    /// filling the unused places; `[DEP_CSR, _]` when there are more (read them from the
    /// schedule).
    deps: [u32; 2],
}

/// No dependent in this place of [`OpState::deps`] (no operation index has all 31 bits set).
const DEP_NONE: u32 = u32::MAX;
/// [`OpState::deps`] holds no dependents: there are more than two, read them from the schedule.
const DEP_CSR: u32 = u32::MAX >> 1;

/// Result of one simulation.
#[derive(Clone, Debug, Default)]
pub struct SimOutput {
    /// Time the last operation completed (ns).
    pub completion: u64,
    /// Events processed.
    pub events: u64,
    /// Operations completed.
    pub completed: u64,
    /// Per operation.
    pub st: States,
    /// Per op: detour time inside its own CPU work (empty unless recorded).
    pub noise: Vec<u32>,
    /// Per op: start time (empty unless recorded).
    pub start: Vec<u64>,
    /// Per rank: CPU time used (work plus the detours inside it); empty unless recorded.
    pub rank_busy: Vec<u64>,
    /// Per class: receive wait time.
    pub class_wait: Vec<u64>,
    /// Per class: detour time injected into the class's CPU work.
    pub class_noise: Vec<u64>,
    /// Receives never matched.
    pub unmatched_recvs: u64,
    /// Messages never received.
    pub unmatched_sends: u64,
}

impl SimOutput {
    /// Operations that never completed.
    pub fn unfinished(&self) -> u64 {
        self.st.len() as u64 - self.completed
    }

    /// Completion time of every operation (`u64::MAX`: never completed).
    pub fn ends(&self) -> Vec<u64> {
        self.st.iter().map(|x| x.end).collect()
    }

    /// Per rank: wait time = completion time of the rank minus its CPU busy time (time it had
    /// nothing to run because it waited for messages or dependencies).
    pub fn rank_wait(&self, s: &Schedule) -> Vec<u64> {
        if self.rank_busy.is_empty() {
            return Vec::new();
        }
        self.rank_end(s)
            .iter()
            .zip(&self.rank_busy)
            .map(|(&e, &b)| e.saturating_sub(b))
            .collect()
    }

    /// Per rank: time its last operation completed.
    pub fn rank_end(&self, s: &Schedule) -> Vec<u64> {
        let mut v = vec![0u64; s.num_ranks as usize];
        let ops: &[Op] = &s.ops;
        for (op, x) in self.st.iter().enumerate() {
            let e = x.end;
            let r = ops[op].rank as usize;
            if e != u64::MAX && e > v[r] {
                v[r] = e;
            }
        }
        v
    }
}

/// Digit width of [`RadixHeap`]'s buckets.
const RADIX_BITS: u32 = 4;
/// Buckets per digit position.
const RADIX: usize = 1 << RADIX_BITS;
/// Entries (16 bytes each) an emptied bucket of [`RadixHeap`] may keep allocated.
const SMALL_BUCKET: usize = 4096;
/// Bucket 0 (times equal to the floor) and one per digit position and digit value.
const RADIX_BUCKETS: usize = 1 + (64 / RADIX_BITS as usize) * RADIX;

/// Monotone priority queue keyed by time (radix heap with 16-way digits): O(1) push,
/// amortised O(log16 range) moves per entry.
///
/// A time `t` at or after the floor `last` lives in bucket 0 if it equals `last`, else in the
/// bucket of the highest 4-bit digit position `g` where it differs from `last` and its own
/// digit `v` there (`t`'s digit is the larger one): bucket `1 + 16 g + v`. Buckets in index
/// order hold ever larger times, so the first non-empty one holds the minimum. When bucket 0 is
/// empty, the first non-empty bucket's minimum becomes the floor and its entries move to buckets
/// of lower digit positions (or 0); the other buckets' entries stay where they are, since the
/// new floor shares every digit above position `g` with the old one. A binary radix heap moves
/// each entry about once per bit of its distance from the floor (10–20 moves for the
/// microsecond-to-millisecond delays of a noisy run); here once per 4-bit digit.
struct RadixHeap {
    last: u64,
    buckets: Vec<Vec<(u64, u64)>>,
    /// The largest allocation an emptied bucket gave up, for the next bucket that fills up.
    spare: Vec<(u64, u64)>,
    /// Bit `b - 1` is set when bucket `b` (from 1) is non-empty.
    occupied: [u64; (RADIX_BUCKETS - 1) / 64],
    len: usize,
    /// The smallest time in the first non-empty bucket after bucket 0 when `min_known` (see
    /// [`RadixHeap::min`]).
    min: u64,
    min_known: bool,
}

impl RadixHeap {
    fn new() -> Self {
        RadixHeap {
            last: 0,
            buckets: (0..RADIX_BUCKETS).map(|_| Vec::new()).collect(),
            spare: Vec::new(),
            occupied: [0; (RADIX_BUCKETS - 1) / 64],
            len: 0,
            min: 0,
            min_known: false,
        }
    }
    #[inline]
    fn bucket(&self, t: u64) -> usize {
        let x = t ^ self.last;
        if x == 0 {
            0
        } else {
            let g = (63 - x.leading_zeros()) / RADIX_BITS;
            let v = (t >> (g * RADIX_BITS)) as usize & (RADIX - 1);
            1 + g as usize * RADIX + v
        }
    }
    /// Put `(t, v)` into bucket `b` (from [`RadixHeap::bucket`]).
    #[inline]
    fn put(&mut self, b: usize, t: u64, v: u64) {
        let q = &mut self.buckets[b];
        if q.len() == q.capacity() && self.spare.capacity() > q.capacity() {
            // Full: move into the spare allocation instead of growing a new one.
            self.spare.extend_from_slice(q);
            std::mem::swap(q, &mut self.spare);
            self.spare = Vec::new();
        }
        self.buckets[b].push((t, v));
        if b > 0 {
            self.occupied[(b - 1) / 64] |= 1 << ((b - 1) % 64);
        }
    }
    /// The first non-empty bucket after bucket 0.
    #[inline]
    fn first_occupied(&self) -> Option<usize> {
        let (w, &m) = self.occupied.iter().enumerate().find(|(_, &m)| m != 0)?;
        Some(1 + w * 64 + m.trailing_zeros() as usize)
    }
    #[inline]
    fn push(&mut self, t: u64, v: u64) {
        let b = self.bucket(t);
        self.put(b, t, v);
        self.len += 1;
        // `min` is that of the buckets after 0 (bucket 0 is looked at first anyway): counting
        // a time equal to the floor in it would leave it stale once bucket 0 is drained.
        if b > 0 && self.min_known && t < self.min {
            self.min = t;
        }
    }
    /// The earliest time queued, without taking anything out (and without moving the heap's
    /// floor, so times from `last` on may still be pushed).
    fn min(&mut self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        if !self.buckets[0].is_empty() {
            return Some(self.last);
        }
        if !self.min_known {
            let i = self.first_occupied()?;
            self.min = self.buckets[i].iter().map(|x| x.0).min()?;
            self.min_known = true;
        }
        Some(self.min)
    }
    /// Move every entry with the minimum time into `out` (payloads) if that time is before
    /// `end`; returns that time.
    fn pop_batch(&mut self, out: &mut Vec<u64>, end: u64) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        if self.buckets[0].is_empty() {
            let i = self.first_occupied()?;
            let m = match self.min_known {
                true => self.min,
                false => self.buckets[i].iter().map(|x| x.0).min()?,
            };
            if m >= end {
                self.min = m;
                self.min_known = true;
                return None;
            }
            let mut items = std::mem::take(&mut self.buckets[i]);
            self.occupied[(i - 1) / 64] &= !(1 << ((i - 1) % 64));
            self.last = m;
            for &(t, v) in &items {
                let b = self.bucket(t);
                self.put(b, t, v);
            }
            items.clear();
            // Keep the largest emptied allocation for the next bucket that fills up, give the
            // emptied bucket back a small one only: a lockstep instant's events (up to one per
            // rank) pass through buckets that vary with the instant's digits, and each keeping
            // its allocation held 0.5 GB more at a million ranks.
            if items.capacity() > self.spare.capacity() {
                std::mem::swap(&mut items, &mut self.spare);
            }
            if items.capacity() <= SMALL_BUCKET {
                self.buckets[i] = items;
            }
            self.min_known = false;
        } else if self.last >= end {
            return None;
        }
        let b0 = &mut self.buckets[0];
        self.len -= b0.len();
        out.extend(b0.drain(..).map(|x| x.1));
        Some(self.last)
    }
}

const EV_READY: u64 = 0;
const EV_ARRIVE: u64 = 1;
const EV_CTS: u64 = 2;
const EV_DATA: u64 = 3;
const NIL: u32 = u32::MAX;
/// Events whose memory [`Sim::warm`] loads together before handling them.
const WARM: usize = 32;

/// Sort events (`kind << 32 | operation`) into the canonical same-instant order: by kind, then
/// operation. Large batches come from lockstep instants (a noise-free collective has up to one
/// event per rank at one instant) and are far from sorted (e.g. the ranks' next steps released
/// in the order of their partners), so a comparison sort costs a good part of such a run. But
/// no event occurs twice (each operation is ready, arrives, gets its clear-to-send and its data
/// once at most) and one instant's events of one kind lie in a narrow range of operations: a
/// stable counting pass by kind into `tmp`, then each kind's operations set as bits in `bits`
/// and read back in order, is linear. Batches whose range is too wide for that (sparse ones)
/// take the standard sort.
fn sort_events(v: &mut Vec<u64>, tmp: &mut Vec<u64>, bits: &mut Vec<u64>) {
    if v.is_sorted() {
        return;
    }
    if v.len() < 256 {
        v.sort_unstable();
        return;
    }
    let mut at = [0usize; 5];
    for &x in v.iter() {
        at[((x >> 32) as usize).min(3) + 1] += 1;
    }
    for k in 1..5 {
        at[k] += at[k - 1];
    }
    let bounds = at;
    tmp.clear();
    tmp.resize(v.len(), 0);
    for &x in v.iter() {
        let k = ((x >> 32) as usize).min(3);
        tmp[at[k]] = x;
        at[k] += 1;
    }
    std::mem::swap(v, tmp);
    for k in 0..4 {
        let part = &mut v[bounds[k]..bounds[k + 1]];
        if !part.is_sorted() {
            sort_distinct(part, bits);
        }
    }
}

/// Sort `v` (values of one kind, so within a range of 2^32) through a bitmap when its range is
/// at most 64 times its length and no value occurs twice; otherwise with the standard sort.
fn sort_distinct(v: &mut [u64], bits: &mut Vec<u64>) {
    let (lo, hi) = v
        .iter()
        .fold((u64::MAX, 0), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let range = hi - lo + 1;
    if range > 64 * v.len() as u64 {
        v.sort_unstable();
        return;
    }
    bits.clear();
    bits.resize(range.div_ceil(64) as usize, 0);
    let mut twice = false;
    for &x in v.iter() {
        let d = x - lo;
        let (w, b) = ((d / 64) as usize, 1u64 << (d % 64));
        twice |= bits[w] & b != 0;
        bits[w] |= b;
    }
    if twice {
        v.sort_unstable();
        return;
    }
    let mut k = 0;
    for (w, &word) in bits.iter().enumerate() {
        let mut m = word;
        while m != 0 {
            v[k] = lo + w as u64 * 64 + m.trailing_zeros() as u64;
            k += 1;
            m &= m - 1;
        }
    }
}

/// The `link` fields the matching queues thread through: those of this part's operations (in
/// their states) and, on a two-thread run, those of the other part's send operations whose
/// messages wait in this part's unexpected-message queues (or whose rendezvous this part
/// matched).
struct Links<'x> {
    st: &'x mut [OpState],
    o0: usize,
    /// The other part's links, complemented (`!link`): all-zero is all [`NIL`], so the array
    /// is allocated zeroed and only the pages of the few links ever set are touched.
    foreign: &'x mut [u32],
    f0: usize,
}

impl Links<'_> {
    #[inline]
    fn get(&self, x: usize) -> u32 {
        match self.st.get(x.wrapping_sub(self.o0)) {
            Some(s) => s.link,
            None => !self.foreign[x - self.f0],
        }
    }
    #[inline]
    fn set(&mut self, x: usize, v: u32) {
        match self.st.get_mut(x.wrapping_sub(self.o0)) {
            Some(s) => s.link = v,
            None => self.foreign[x - self.f0] = !v,
        }
    }

    /// Append `x` to the circular FIFO whose tail is `tail` (threaded through `link`).
    #[inline]
    fn push(&mut self, tail: &mut u32, x: u32) {
        if *tail == NIL {
            self.set(x as usize, x);
        } else {
            let t = *tail as usize;
            let h = self.get(t);
            self.set(x as usize, h);
            self.set(t, x);
        }
        *tail = x;
    }

    /// Remove and return the first element of the circular FIFO satisfying `pred`.
    #[inline]
    fn take(&mut self, tail: &mut u32, mut pred: impl FnMut(usize) -> bool) -> Option<usize> {
        if *tail == NIL {
            return None;
        }
        let t = *tail as usize;
        let mut prev = t;
        loop {
            let cur = self.get(prev) as usize;
            if pred(cur) {
                if cur == prev {
                    *tail = NIL;
                } else {
                    let next = self.get(cur);
                    self.set(prev, next);
                    if cur == t {
                        *tail = prev as u32;
                    }
                }
                return Some(cur);
            }
            if cur == t {
                return None;
            }
            prev = cur;
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct CpuState {
    free: u64,
    last: u32,
}

#[derive(Clone, Copy, Debug, Default)]
struct NicState {
    send_free: u64,
    recv_free: u64,
}

/// Everything per rank in one cache line (CPU 0 and NIC 0 live here too).
#[derive(Clone, Copy, Debug)]
struct RankState {
    cpu0: CpuState,
    nic0: NicState,
    last_arr: u64,
    /// CPU time used (work and the detours inside it).
    /// Posted receives (circular list through `OpState::link`; head = link of the tail).
    prq_tail: u32,
    /// Unexpected messages (same).
    uq_tail: u32,
}

impl RankState {
    const IDLE: RankState = RankState {
        cpu0: CpuState { free: 0, last: NIL },
        nic0: NicState {
            send_free: 0,
            recv_free: 0,
        },
        last_arr: 0,
        prq_tail: NIL,
        uq_tail: NIL,
    };
}

/// Per-rank state carried from one segment of a long schedule to the next (see
/// [`simulate_segment`]): when each rank may start its next segment, its CPU and NIC, its
/// message ordering and its CPU busy time.
#[derive(Clone, Debug)]
pub struct Carry {
    /// Time each rank's exit operation of the previous segment completed.
    pub ready: Vec<u64>,
    rk: Vec<RankState>,
    /// Per rank: CPU time used so far (work plus the detours inside it).
    pub busy: Vec<u64>,
}

impl Carry {
    /// State of `ranks` idle ranks at time 0.
    pub fn new(ranks: u32) -> Self {
        Carry {
            ready: vec![0; ranks as usize],
            rk: vec![RankState::IDLE; ranks as usize],
            busy: vec![0; ranks as usize],
        }
    }
}

/// One simulation, of all ranks (one thread) or of one part of them (one of the threads of
/// [`simulate_parallel`]): ranks `r0..r1`, whose operations are `o0..o0 + st.len()`.
struct Sim<'a, 'b> {
    s: &'a Schedule,
    /// `s.ops` as a slice (the schedule's array may be a mapping: one look-up, not one per
    /// access).
    ops: &'a [Op],
    /// Index of this schedule's first operation in the whole (segmented) program; keys the
    /// latency noise so a segmented run draws what the whole program would.
    op_base: u64,
    p: Params,
    noise: &'a Noise,
    noisy: bool,
    now: u64,
    heap: RadixHeap,
    /// Events due at `now`, scheduled while handling events (handled in this order).
    fifo: Vec<u64>,
    /// States of operations `o0..o0 + st.len()`.
    st: &'b mut [OpState],
    o0: usize,
    /// Queue links of the other part's send operations (index: operation − `f0`), see [`Links`].
    foreign: Vec<u32>,
    f0: usize,
    /// Per operation of this part (empty unless recorded).
    noise_op: &'b mut [u32],
    start: &'b mut [u64],
    /// Per rank of this part (empty unless recorded).
    busy: &'b mut [u64],
    /// Per rank of this part: its last detour lookup (empty without detours).
    det: Vec<DetourCache>,
    r0: usize,
    r1: usize,
    /// CPUs and NICs when a rank has more than one (else they live in `rk`).
    cpu_x: Vec<CpuState>,
    nic_x: Vec<NicState>,
    nc1: bool,
    nn1: bool,
    /// Use [`Sim::warm`] (off only in tests that check it changes nothing).
    warm_on: bool,
    /// Ranks `r0..r1`.
    rk: Vec<RankState>,
    class_wait: Vec<u64>,
    class_noise: Vec<u64>,
    events: u64,
    completed: u64,
    /// The latest completion time so far (other than `u64::MAX`; 0 before any): the run's
    /// completion, kept as operations complete instead of found by a pass over every state
    /// at the end (1.34 GB per run at a million ranks).
    last_end: u64,
    /// Events for the other part's ranks: (time, event, for a clear-to-send the receive).
    outbox: Vec<(u64, u64, u32)>,
    /// Two-thread runs: the operations to offer [`Sim::enter`] at time 0 (empty: all of
    /// them, noting these; see [`Sim::run_windows`]).
    entries: Vec<u32>,
    /// Scratch space of [`sort_events`].
    sort_tmp: Vec<u64>,
    sort_bits: Vec<u64>,
}

/// What a [`Sim`] leaves besides the arrays it filled in.
struct SimTotals {
    completion: u64,
    events: u64,
    completed: u64,
    class_wait: Vec<u64>,
    class_noise: Vec<u64>,
    unmatched_recvs: u64,
    unmatched_sends: u64,
}

/// Run one simulation of `s`.
///
/// With [`SimOptions::threads`] of 2 or more and at least [`SimOptions::min_parallel_ops`]
/// operations, it runs on two threads (see `simulate_parallel`) when the schedule allows it:
/// `L > 0`, the first half of the ranks' operations all before the second half's, no
/// dependency between the halves. The results are the same as on one thread.
pub fn simulate(s: &Schedule, p: &Params, noise: &Noise, opts: &SimOptions) -> SimOutput {
    simulate_inner(s, p, noise, opts, None, true, None, None, None)
}

/// [`simulate`] from states built beforehand by [`initial_state`] (or
/// [`initial_state_threads`]) for `s`; `split`, when given, is [`Split::of`] for `s`, `p` and
/// `opts` (saves checking the schedule again). With `scratch` (two-thread runs), the run takes
/// the buffers an earlier such run of `s` left there (their pages already mapped; a first run
/// finds it empty and allocates them) and leaves its own there in turn.
pub(crate) fn simulate_from(
    s: &Schedule,
    p: &Params,
    noise: &Noise,
    opts: &SimOptions,
    st: States,
    split: Option<&Split>,
    scratch: Option<&mut Scratch>,
) -> SimOutput {
    debug_assert_eq!(st.len(), s.len());
    simulate_inner(
        s,
        p,
        noise,
        opts,
        None,
        true,
        Some(st),
        split.map(|x| x.0),
        scratch,
    )
}

/// The buffers of both threads of a two-thread run (event queue, rank states, ...) kept for the
/// next run of the same schedule, see [`simulate_from`].
#[derive(Default)]
pub(crate) struct Scratch {
    parts: [Option<PartScratch>; 2],
    /// A buffer (any content) for the next run that records the noise per operation
    /// ([`SimOptions::record_noise`]) to hold it, instead of a fresh array.
    pub(crate) noise: Option<Vec<u32>>,
}

/// One thread's part of a [`Scratch`].
struct PartScratch {
    heap: RadixHeap,
    fifo: Vec<u64>,
    outbox: Vec<(u64, u64, u32)>,
    sort_tmp: Vec<u64>,
    sort_bits: Vec<u64>,
    rk: Vec<RankState>,
    /// The part's operations that had no pending dependency when the run reached them at time
    /// 0 (see [`Sim::run_windows`]), in order; empty before the first run.
    entries: Vec<u32>,
}

/// [`simulate`], given a [`state_template`] of `s.len()` states written beforehand (ignored
/// if its length is not the schedule's).
pub fn simulate_from_template(
    s: &Schedule,
    p: &Params,
    noise: &Noise,
    opts: &SimOptions,
    template: States,
) -> SimOutput {
    if template.len() != s.len() {
        return simulate(s, p, noise, opts);
    }
    let threads = if s.len() >= PARALLEL_INIT_OPS { 2 } else { 1 };
    simulate_from(
        s,
        p,
        noise,
        opts,
        fill_states(s, template, threads),
        None,
        None,
    )
}

/// A schedule's initial simulation state (pending-dependency counts, dependency-free
/// operations), computed once for a schedule that is simulated many times as a segment.
#[derive(Clone, Debug)]
pub struct Prepared {
    st: States,
    entries: Vec<u32>,
}

impl Prepared {
    /// Prepare `s`.
    pub fn new(s: &Schedule) -> Self {
        let st = initial_state(s);
        let entries = (0..st.len() as u32)
            .filter(|&i| st[i as usize].link == 0)
            .collect();
        Prepared { st, entries }
    }
}

/// Operations from which [`initial_state`] fills the states on two threads.
const PARALLEL_INIT_OPS: usize = 1 << 18;

/// The states of `s`'s operations before a run: pending-dependency counts and the first two
/// dependents of each; on two threads for large schedules.
pub(crate) fn initial_state(s: &Schedule) -> States {
    initial_state_threads(s, if s.len() >= PARALLEL_INIT_OPS { 2 } else { 1 })
}

/// [`initial_state`] on one thread, or two (`threads >= 2`: each fills half of the states).
pub(crate) fn initial_state_threads(s: &Schedule, threads: usize) -> States {
    fill_states(s, state_template(s.len()), threads)
}

/// `n` operation states as they are before their dependents and dependency counts are filled
/// in: the first write to a fresh array, which takes its page faults (a good part of the
/// setup of a large run), so it pays to do it on an idle core ([`crate::gen::generate_with`]
/// can do it while the schedule is generated, growing it with [`States::grow`], in a mapping
/// whose pages it populates in bulk: [`States::mapped`]).
pub fn state_template(n: usize) -> States {
    // This pass stays on one thread: safe Rust cannot hand out uninitialised memory, and the
    // allocator zeroes memory aligned to 32 bytes with a `memset` of its own.
    States::from(vec![FRESH_STATE; n])
}

/// An operation's state before its dependents and dependency count are filled in.
pub(crate) const FRESH_STATE: OpState = OpState {
    ready: 0,
    end: u64::MAX,
    link: 0,
    pred: PRED_NONE,
    deps: [DEP_NONE; 2],
};

/// Fill a [`state_template`] of `s.len()` states in for `s`, on one thread or two.
pub(crate) fn fill_states(s: &Schedule, mut st: States, threads: usize) -> States {
    let n = s.len();
    debug_assert_eq!(st.len(), n);
    if threads < 2 || n < 2 {
        fill_initial(s, 0, &mut st);
        return st;
    }
    let (a, b) = st.split_at_mut(n / 2);
    // A panic on the helper thread is propagated when the scope ends.
    std::thread::scope(|sc| {
        sc.spawn(|| fill_initial(s, n / 2, b));
        fill_initial(s, 0, a);
    });
    st
}

/// Fill in the dependents and pending-dependency counts of operations `lo..lo + part.len()`
/// (states as [`FRESH_STATE`] leaves them).
pub(crate) fn fill_initial(s: &Schedule, lo: usize, part: &mut [OpState]) {
    // The lists as slices once (they may be mappings, whose every look-up checks the layout).
    let (start, list): (&[u32], &[u32]) = (&s.dep_start, &s.dep_list);
    for (i, x) in part.iter_mut().enumerate() {
        let op = lo + i;
        *x = fresh_state(&list[start[op] as usize..start[op + 1] as usize]);
    }
    count_pending(s, lo, part);
}

/// [`fill_states`] that also leaves each operation's pending-dependency count in `counts`
/// (one entry per operation, any content before): a second run of the schedule can take the
/// counts from there ([`refill_state`] and the count) instead of scanning all edges again.
/// The counts are summed in `counts`, 4 bytes per operation, not in the 32-byte states: the
/// scattered increments touch an eighth of the cache lines and pages.
pub(crate) fn fill_states_counted(
    s: &Schedule,
    mut st: States,
    counts: &mut [u32],
    threads: usize,
) -> States {
    let n = s.len();
    debug_assert_eq!(st.len(), n);
    debug_assert_eq!(counts.len(), n);
    if threads < 2 || n < 2 {
        fill_initial_counted(s, 0, &mut st, counts);
        return st;
    }
    let (a, b) = st.split_at_mut(n / 2);
    let (ca, cb) = counts.split_at_mut(n / 2);
    // A panic on the helper thread is propagated when the scope ends.
    std::thread::scope(|sc| {
        sc.spawn(|| fill_initial_counted(s, n / 2, b, cb));
        fill_initial_counted(s, 0, a, ca);
    });
    st
}

/// [`fill_initial`], the counts summed in `counts` (the part's, any content before) first and
/// copied into the states as they are written.
fn fill_initial_counted(s: &Schedule, lo: usize, part: &mut [OpState], counts: &mut [u32]) {
    counts.fill(0);
    let (start, list): (&[u32], &[u32]) = (&s.dep_start, &s.dep_list);
    for &d in list {
        if let Some(c) = counts.get_mut(((d & !IREQ_BIT) as usize).wrapping_sub(lo)) {
            *c += 1;
        }
    }
    for (i, (x, &c)) in part.iter_mut().zip(counts.iter()).enumerate() {
        let op = lo + i;
        *x = fresh_state(&list[start[op] as usize..start[op + 1] as usize]);
        x.link = c;
    }
}

/// The state `x` (of a finished run, or one as [`fill_initial`] leaves it) as [`fill_initial`]
/// leaves it but for the pending-dependency count (0): a run never changes the dependents it
/// holds, so only the times, the link and the predecessor are reset, and the dependency lists
/// are not read again.
#[inline]
pub(crate) fn refill_state(x: &mut OpState) {
    *x = OpState {
        deps: x.deps,
        ..FRESH_STATE
    };
}

/// Add to the pending-dependency counts of operations `lo..lo + part.len()` the edges into
/// them.
pub(crate) fn count_pending(s: &Schedule, lo: usize, part: &mut [OpState]) {
    // Every part reads all edges and counts those into it.
    for &d in &s.dep_list {
        if let Some(x) = part.get_mut(((d & !IREQ_BIT) as usize).wrapping_sub(lo)) {
            x.link += 1;
        }
    }
}

/// The state before a run of an operation whose dependents are `deps`, its pending-dependency
/// count aside (0).
#[inline]
fn fresh_state(deps: &[u32]) -> OpState {
    let mut x = FRESH_STATE;
    match deps {
        [] => {}
        &[a] => x.deps[0] = a,
        &[a, b] => x.deps = [a, b],
        _ => x.deps[0] = DEP_CSR,
    }
    x
}

/// One segment of a longer program, for [`simulate_segment`].
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    /// The segment's operations.
    pub schedule: &'a Schedule,
    /// [`Prepared::new`] of `schedule`.
    pub prepared: &'a Prepared,
    /// Per rank: the operation the rank's next segment depends on (`u32::MAX`: none, the rank
    /// keeps its previous ready time).
    pub exits: &'a [u32],
    /// Index of the segment's first operation in the whole program (keys latency noise).
    pub op_base: u64,
}

/// Simulate one segment of a longer program whose earlier segments left `carry`.
///
/// Operations of the segment without dependencies become ready when their rank's previous
/// segment ended (`carry.ready`); each rank's CPU, NIC, message order and busy time continue
/// from `carry`. On return `carry` describes the end of this segment: `ready[r]` is the
/// completion time of `exits[r]` (`u64::MAX` if it never completed: stop there).
///
/// This reproduces the whole program's simulation exactly when every resource use of a rank in
/// the segment happens before the rank's exit operation completes (true for blocking steps of
/// eager messages, as in the ring all-reduce) and messages never cross a segment boundary.
/// Schedules with more than one CPU or NIC per rank are not supported (the extra ones are not
/// carried).
pub fn simulate_segment(
    seg: &Segment,
    p: &Params,
    noise: &Noise,
    opts: &SimOptions,
    carry: &mut Carry,
) -> SimOutput {
    simulate_inner(
        seg.schedule,
        p,
        noise,
        opts,
        Some((carry, seg)),
        true,
        None,
        None,
        None,
    )
}

#[allow(clippy::too_many_arguments)]
fn simulate_inner(
    s: &Schedule,
    p: &Params,
    noise: &Noise,
    opts: &SimOptions,
    carry: Option<(&mut Carry, &Segment)>,
    warm_on: bool,
    init: Option<States>,
    checked: Option<Option<(usize, usize)>>,
    scratch: Option<&mut Scratch>,
) -> SimOutput {
    let n = s.len();
    let pr = s.num_ranks as usize;
    let (mut st, op_base) = match &carry {
        Some((_, seg)) => (seg.prepared.st.clone(), seg.op_base),
        None => (init.unwrap_or_else(|| initial_state(s)), 0),
    };
    let mut scratch = scratch;
    let mut noise_op = if opts.record_noise {
        match scratch.as_deref_mut().and_then(|sc| sc.noise.take()) {
            Some(mut v) => {
                v.clear();
                v.resize(n, 0);
                v
            }
            None => vec![0; n],
        }
    } else {
        Vec::new()
    };
    let mut busy = match (&carry, opts.record_busy) {
        (_, false) => Vec::new(),
        (Some((c, _)), true) => c.busy.clone(),
        (None, true) => vec![0; pr],
    };
    let mut start = if opts.record_start {
        vec![u64::MAX; n]
    } else {
        Vec::new()
    };
    if carry.is_none() {
        let split = match checked {
            Some(c) => c,
            None => parallel_split(s, p, opts),
        };
        if let Some(split) = split {
            return simulate_parallel(
                s, p, noise, warm_on, st, noise_op, start, busy, split, scratch,
            );
        }
    }
    let rk = match &carry {
        Some((c, _)) => {
            c.rk.iter()
                .map(|x| RankState {
                    cpu0: CpuState {
                        free: x.cpu0.free,
                        last: NIL,
                    },
                    prq_tail: NIL,
                    uq_tail: NIL,
                    ..*x
                })
                .collect()
        }
        None => vec![RankState::IDLE; pr],
    };
    let mut sim = Sim::new(
        s,
        p,
        noise,
        warm_on,
        Part {
            st: &mut st,
            o0: 0,
            noise_op: &mut noise_op,
            start: &mut start,
            busy: &mut busy,
            r0: 0,
            r1: pr,
            f0: 0,
            foreign: 0,
        },
        rk,
        op_base,
    );
    // Operations without dependencies start at time 0 (or when their rank's previous segment
    // ended), in program order, before anything they trigger.
    match &carry {
        Some((c, seg)) => {
            for &op in &seg.prepared.entries {
                let op = op as usize;
                let t = c.ready[s.ops[op].rank as usize];
                sim.enter(op, t);
            }
        }
        None => {
            for op in 0..n {
                sim.enter(op, 0);
            }
        }
    }
    sim.run();
    let t = sim.finish();
    let rk = std::mem::take(&mut sim.rk);
    let out = SimOutput {
        completion: t.completion,
        events: t.events,
        completed: t.completed,
        st,
        noise: noise_op,
        start,
        rank_busy: busy,
        class_wait: t.class_wait,
        class_noise: t.class_noise,
        unmatched_recvs: t.unmatched_recvs,
        unmatched_sends: t.unmatched_sends,
    };
    if let Some((c, seg)) = carry {
        c.rk.copy_from_slice(&rk);
        if opts.record_busy {
            c.busy.copy_from_slice(&out.rank_busy);
        }
        for (r, &e) in seg.exits.iter().enumerate() {
            if e != NIL {
                // `u64::MAX` when the exit never completed; the caller stops there.
                c.ready[r] = out.st[e as usize].end;
            }
        }
    }
    out
}

/// Operations from which [`simulate`] runs on two threads when [`SimOptions::threads`] allows.
pub const PARALLEL_SIM_OPS: usize = 1 << 22;

/// Whether (and where) [`simulate`] splits a schedule over two threads, checked once for
/// several runs.
#[derive(Clone, Copy, Debug)]
pub struct Split(Option<(usize, usize)>);

impl Split {
    /// Check `s` for `p` and `opts`.
    pub fn of(s: &Schedule, p: &Params, opts: &SimOptions) -> Self {
        Split(parallel_split(s, p, opts))
    }
    /// True when the runs go on two threads.
    pub fn two_threads(&self) -> bool {
        self.0.is_some()
    }
}

/// True when [`simulate`] with `opts` runs `s` on two threads.
pub fn can_split(s: &Schedule, p: &Params, opts: &SimOptions) -> bool {
    Split::of(s, p, opts).two_threads()
}

/// Where a two-thread run splits `s`: ranks `0..ranks` and operations `0..ops` go to the first
/// thread, the rest to the second. `None` when it must run on one thread: one thread asked for
/// (or fewer than [`SimOptions::min_parallel_ops`] operations), `L = 0` (a message could then
/// reach another rank at the instant it was sent), fewer than two ranks, the first half of the
/// ranks' operations not all before the second half's (see [`crate::gen::generate_layout`]),
/// or a dependency between the two halves.
fn parallel_split(s: &Schedule, p: &Params, opts: &SimOptions) -> Option<(usize, usize)> {
    if opts.threads < 2 || p.l == 0 || s.num_ranks < 2 || s.len() < opts.min_parallel_ops {
        return None;
    }
    let ranks = s.num_ranks / 2;
    let ops = s.ops.partition_point(|o| o.rank < ranks);
    let (d0, d1) = (
        s.dep_start[ops] as usize,
        s.dep_start.get(s.len()).copied()? as usize,
    );
    // Check both halves on two threads (each reads a large array once).
    let check = |o: std::ops::Range<usize>, d: std::ops::Range<usize>, first: bool| {
        let ok_rank = |r: u32| (r < ranks) == first;
        s.ops[o.clone()].iter().all(|x| ok_rank(x.rank))
            && s.dep_list[d]
                .iter()
                .all(|&e| o.contains(&((e & !IREQ_BIT) as usize)))
    };
    let (a, b) = std::thread::scope(|sc| {
        let h = sc.spawn(|| check(ops..s.len(), d0..d1, false));
        let a = check(0..ops, 0..d0, true);
        (a, h.join().unwrap_or(false))
    });
    (a && b).then_some((ranks as usize, ops))
}

/// The arrays one [`Sim`] works on and which ranks and operations they hold.
struct Part<'b> {
    st: &'b mut [OpState],
    o0: usize,
    noise_op: &'b mut [u32],
    start: &'b mut [u64],
    busy: &'b mut [u64],
    r0: usize,
    r1: usize,
    /// First operation of the other part and its number of operations.
    f0: usize,
    foreign: usize,
}

/// What the two threads of [`simulate_parallel`] share: each part's events for the other,
/// each part's next event time, a barrier between windows, and a flag set when a thread
/// panicked so the other stops waiting.
struct Exchange {
    mail: [std::sync::Mutex<Vec<(u64, u64, u32)>>; 2],
    next: [std::sync::atomic::AtomicU64; 2],
    barrier: std::sync::Barrier,
    failed: std::sync::atomic::AtomicBool,
}

/// Sets [`Exchange::failed`] if its thread unwinds (so the other thread does not wait for it
/// at the barrier forever).
struct PanicFlag<'x>(&'x Exchange);

impl Drop for PanicFlag<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .failed
                .store(true, std::sync::atomic::Ordering::SeqCst);
            // Release the other thread if it waits at the barrier right now.
            self.0.barrier.wait();
        }
    }
}

/// [`simulate`] on two threads, conservatively: each thread owns half of the ranks with their
/// operations, states and event queue. Every interaction between ranks of different halves is
/// a message (arrival, clear-to-send, rendezvous data) that arrives at least `L` after the
/// event sending it, so in a window `[T, T + L)` both threads handle their events on their own;
/// the events for the other half are handed over at the window's end, and the next window
/// starts at the earliest event of both halves. Events of one rank at one instant run in the
/// same (canonical) order as on one thread, so the results are identical.
#[allow(clippy::too_many_arguments)]
fn simulate_parallel(
    s: &Schedule,
    p: &Params,
    noise: &Noise,
    warm_on: bool,
    mut st: States,
    mut noise_op: Vec<u32>,
    mut start: Vec<u64>,
    mut busy: Vec<u64>,
    (ranks, ops): (usize, usize),
    scratch: Option<&mut Scratch>,
) -> SimOutput {
    let n = s.len();
    let pr = s.num_ranks as usize;
    let (st0, st1) = st.split_at_mut(ops);
    // Arrays not recorded are empty: both parts get an empty slice.
    let at = |empty: bool, k: usize| if empty { 0 } else { k };
    let (no_at, sa_at, bu_at) = (
        at(noise_op.is_empty(), ops),
        at(start.is_empty(), ops),
        at(busy.is_empty(), ranks),
    );
    let (no0, no1) = noise_op.split_at_mut(no_at);
    let (sa0, sa1) = start.split_at_mut(sa_at);
    let (bu0, bu1) = busy.split_at_mut(bu_at);
    let parts = [
        Part {
            st: st0,
            o0: 0,
            noise_op: no0,
            start: sa0,
            busy: bu0,
            r0: 0,
            r1: ranks,
            f0: ops,
            foreign: n - ops,
        },
        Part {
            st: st1,
            o0: ops,
            noise_op: no1,
            start: sa1,
            busy: bu1,
            r0: ranks,
            r1: pr,
            f0: 0,
            foreign: ops,
        },
    ];
    let ex = Exchange {
        mail: [Default::default(), Default::default()],
        next: [
            std::sync::atomic::AtomicU64::new(0),
            std::sync::atomic::AtomicU64::new(0),
        ],
        barrier: std::sync::Barrier::new(2),
        failed: std::sync::atomic::AtomicBool::new(false),
    };
    let run_part = |h: usize, part: Part, kept: Option<PartScratch>| {
        let guard = PanicFlag(&ex);
        let local = part.r1 - part.r0;
        let (rk, kept) = match kept {
            Some(mut k) => {
                let mut rk = std::mem::take(&mut k.rk);
                rk.clear();
                rk.resize(local, RankState::IDLE);
                (rk, Some(k))
            }
            None => (vec![RankState::IDLE; local], None),
        };
        let mut sim = Sim::new(s, p, noise, warm_on, part, rk, 0);
        if let Some(k) = kept {
            sim.adopt(k);
        }
        sim.run_windows(h, &ex);
        // Past the last barrier: nothing to release any more.
        std::mem::forget(guard);
        let t = sim.finish();
        (t, sim.scratch())
    };
    let [part0, part1] = parts;
    let mut scratch = scratch;
    let [k0, k1] = match scratch.as_deref_mut() {
        Some(sc) => std::mem::take(&mut sc.parts),
        None => [None, None],
    };
    let ((t0, k0), (t1, k1)) = std::thread::scope(|sc| {
        let h = sc.spawn(|| run_part(1, part1, k1));
        let t0 = run_part(0, part0, k0);
        match h.join() {
            Ok(t1) => (t0, t1),
            Err(e) => std::panic::resume_unwind(e),
        }
    });
    if let Some(sc) = scratch {
        sc.parts = [Some(k0), Some(k1)];
    }
    let sum = |a: &[u64], b: &[u64]| a.iter().zip(b).map(|(x, y)| x + y).collect::<Vec<u64>>();
    SimOutput {
        completion: t0.completion.max(t1.completion),
        events: t0.events + t1.events,
        completed: t0.completed + t1.completed,
        st,
        noise: noise_op,
        start,
        rank_busy: busy,
        class_wait: sum(&t0.class_wait, &t1.class_wait),
        class_noise: sum(&t0.class_noise, &t1.class_noise),
        unmatched_recvs: t0.unmatched_recvs + t1.unmatched_recvs,
        unmatched_sends: t0.unmatched_sends + t1.unmatched_sends,
    }
}

impl<'a, 'b> Sim<'a, 'b> {
    fn new(
        s: &'a Schedule,
        p: &Params,
        noise: &'a Noise,
        warm_on: bool,
        part: Part<'b>,
        rk: Vec<RankState>,
        op_base: u64,
    ) -> Self {
        let nc = s.num_cpus as usize;
        let nn = s.num_nics as usize;
        let local = part.r1 - part.r0;
        Sim {
            s,
            ops: &s.ops,
            op_base,
            p: *p,
            noise,
            noisy: noise.has_detours(),
            now: 0,
            heap: RadixHeap::new(),
            fifo: Vec::with_capacity(1024),
            st: part.st,
            o0: part.o0,
            // All NIL (see `Links::foreign`).
            foreign: vec![0; part.foreign],
            f0: part.f0,
            noise_op: part.noise_op,
            start: part.start,
            busy: part.busy,
            // All zero (`DETOUR_CACHE_EMPTY`): untouched pages until a rank computes.
            det: if noise.has_detours() {
                vec![[0; 2]; local]
            } else {
                Vec::new()
            },
            r0: part.r0,
            r1: part.r1,
            cpu_x: if nc > 1 {
                vec![CpuState { free: 0, last: NIL }; local * nc]
            } else {
                Vec::new()
            },
            nic_x: if nn > 1 {
                vec![NicState::default(); local * nn]
            } else {
                Vec::new()
            },
            nc1: nc == 1,
            nn1: nn == 1,
            warm_on,
            rk,
            class_wait: vec![0; 256],
            class_noise: vec![0; 256],
            events: 0,
            completed: 0,
            last_end: 0,
            outbox: Vec::new(),
            sort_tmp: Vec::new(),
            sort_bits: Vec::new(),
            entries: Vec::new(),
        }
    }

    /// Take over the (empty) event queue and buffers an earlier run left (see [`Scratch`]).
    fn adopt(&mut self, k: PartScratch) {
        debug_assert_eq!(k.heap.len, 0);
        self.heap = k.heap;
        self.heap.last = 0;
        self.heap.min_known = false;
        self.fifo = k.fifo;
        self.fifo.clear();
        self.outbox = k.outbox;
        self.outbox.clear();
        self.sort_tmp = k.sort_tmp;
        self.sort_bits = k.sort_bits;
        self.entries = k.entries;
    }

    /// The event queue and buffers of a finished run, for the next (see [`Scratch`]).
    fn scratch(&mut self) -> PartScratch {
        PartScratch {
            heap: std::mem::replace(&mut self.heap, RadixHeap::new()),
            fifo: std::mem::take(&mut self.fifo),
            outbox: std::mem::take(&mut self.outbox),
            sort_tmp: std::mem::take(&mut self.sort_tmp),
            sort_bits: std::mem::take(&mut self.sort_bits),
            rk: std::mem::take(&mut self.rk),
            entries: std::mem::take(&mut self.entries),
        }
    }

    /// Start operation `op` at `t` if it has no dependencies (an operation released by an
    /// earlier initial operation has a predecessor and is queued already).
    fn enter(&mut self, op: usize, t: u64) {
        let x = &mut self.st[op - self.o0];
        if x.link == 0 && x.pred == PRED_NONE {
            if t == 0 {
                self.handle(EV_READY << 32 | op as u64);
            } else {
                x.ready = t;
                self.heap.push(t, EV_READY << 32 | op as u64);
            }
        }
    }

    /// The links of the matching queues (see [`Links`]).
    #[inline]
    fn links(&mut self) -> Links<'_> {
        Links {
            st: self.st,
            o0: self.o0,
            foreign: &mut self.foreign,
            f0: self.f0,
        }
    }

    /// Schedule `ev` at `t` for a rank of this part, or hand it to the other part (`aux`: for
    /// a clear-to-send, the receive it answers).
    #[inline]
    fn post(&mut self, t: u64, ev: u64, rank: u32, aux: u32) {
        let r = rank as usize;
        if r >= self.r0 && r < self.r1 {
            self.schedule(t, ev);
        } else {
            self.outbox.push((t, ev, aux));
        }
    }

    /// The loop of one thread of [`simulate_parallel`] (`h`: this thread's part).
    fn run_windows(&mut self, h: usize, ex: &Exchange) {
        use std::sync::atomic::Ordering::SeqCst;
        // Operations without dependencies start at time 0, in program order. The first run of
        // a schedule finds them in a pass over all its states (1.34 GB at a million ranks) and
        // notes every operation whose pending count is 0 when it is reached: each that has no
        // dependency is among them (nothing raises a count, and an operation only joins a
        // queue once handled), so a later run of the same schedule (see [`Scratch`]) offers
        // `enter` those only, in the same order, and `enter` decides as in the full pass.
        if self.entries.is_empty() {
            for op in self.o0..self.o0 + self.st.len() {
                if self.st[op - self.o0].link == 0 {
                    self.entries.push(op as u32);
                    self.enter(op, 0);
                }
            }
        } else {
            let entries = std::mem::take(&mut self.entries);
            for &op in &entries {
                self.enter(op as usize, 0);
            }
            self.entries = entries;
        }
        let w = self.p.l;
        let mut end = w;
        let mut batch: Vec<u64> = Vec::with_capacity(1024);
        let mut now_evs: Vec<u64> = Vec::with_capacity(1024);
        loop {
            self.run_until(end, &mut batch, &mut now_evs);
            // Hand this window's events for the other part over.
            if let Ok(mut m) = ex.mail[h].lock() {
                m.append(&mut self.outbox);
            }
            ex.barrier.wait();
            if ex.failed.load(SeqCst) {
                return;
            }
            let incoming = match ex.mail[1 - h].lock() {
                Ok(mut m) => std::mem::take(&mut *m),
                Err(_) => Vec::new(),
            };
            for &(t, ev, aux) in &incoming {
                if ev >> 32 == EV_CTS {
                    // The receive that answered: its rank's part wrote it into the sender's
                    // link on one thread.
                    let sop = (ev & 0xffff_ffff) as usize;
                    self.st[sop - self.o0].link = aux;
                }
                self.heap.push(t, ev);
            }
            let mine = self.heap.min().unwrap_or(u64::MAX);
            ex.next[h].store(mine, SeqCst);
            ex.barrier.wait();
            if ex.failed.load(SeqCst) {
                return;
            }
            let next = mine.min(ex.next[1 - h].load(SeqCst));
            if next == u64::MAX {
                return;
            }
            end = next.saturating_add(w);
        }
    }

    /// Handle every event due before `end`, as [`Sim::run`] does.
    fn run_until(&mut self, end: u64, batch: &mut Vec<u64>, now_evs: &mut Vec<u64>) {
        loop {
            while !self.fifo.is_empty() {
                std::mem::swap(&mut self.fifo, now_evs);
                self.handle_all(now_evs);
                now_evs.clear();
            }
            let Some(t) = self.heap.pop_batch(batch, end) else {
                break;
            };
            self.now = t;
            sort_events(batch, &mut self.sort_tmp, &mut self.sort_bits);
            let evs = std::mem::take(batch);
            self.handle_all(&evs);
            *batch = evs;
            batch.clear();
        }
    }

    #[inline]
    fn note_start(&mut self, op: usize, t: u64) {
        if !self.start.is_empty() {
            self.start[op - self.o0] = t;
        }
    }

    /// Index of CPU `cpu` of `rank` (a rank of this part) for [`Sim::cpu_at`].
    #[inline]
    fn ci(&self, rank: u32, cpu: u8) -> usize {
        (rank as usize - self.r0) * self.s.num_cpus as usize + cpu as usize
    }

    /// Index of NIC `nic` of `rank` (a rank of this part) for [`Sim::nic_at`].
    #[inline]
    fn ni(&self, rank: u32, nic: u8) -> usize {
        (rank as usize - self.r0) * self.s.num_nics as usize + nic as usize
    }

    /// The state of operation `op` (of this part).
    #[inline]
    fn stm(&mut self, op: usize) -> &mut OpState {
        &mut self.st[op - self.o0]
    }

    #[inline]
    fn cpu_at(&mut self, ci: usize) -> &mut CpuState {
        if self.nc1 {
            &mut self.rk[ci].cpu0
        } else {
            &mut self.cpu_x[ci]
        }
    }

    #[inline]
    fn nic_at(&mut self, ni: usize) -> &mut NicState {
        if self.nn1 {
            &mut self.rk[ni].nic0
        } else {
            &mut self.nic_x[ni]
        }
    }

    /// Handle every event. Events due at one instant run in a canonical order: those taken
    /// from the queue sorted by kind and operation, then those they schedule for the same
    /// instant in the order they were scheduled (round by round). This order depends on nothing
    /// but each rank's own events, so [`simulate_parallel`] reproduces it.
    fn run(&mut self) {
        let mut batch: Vec<u64> = Vec::with_capacity(1024);
        let mut now_evs: Vec<u64> = Vec::with_capacity(1024);
        self.run_until(u64::MAX, &mut batch, &mut now_evs);
    }

    /// Handle `evs` in order, [`WARM`] at a time, each group after [`Sim::warm`].
    #[inline]
    fn handle_all(&mut self, evs: &[u64]) {
        for chunk in evs.chunks(WARM) {
            if self.warm_on && chunk.len() > 1 {
                self.warm(chunk);
            }
            for &ev in chunk {
                self.handle(ev);
            }
        }
    }

    /// Load the memory that handling `evs` (at most [`WARM`] events) will touch, in rounds of
    /// independent loads: the operation and its state (which names its first dependents), then
    /// the rank (its record and, when recorded, its busy time) and the first dependent's state,
    /// then the head of the matching queue (or the
    /// tail of the queue the event joins), then the matched operation and then its first
    /// dependent. Records that may straddle two cache lines (24-byte operations, 48-byte ranks)
    /// are read at both ends. At large scale each of these is a cache (and TLB) miss at a random address;
    /// loading them for a whole group at once keeps many misses in flight instead of taking
    /// them one after another inside `handle`. Nothing here changes state: the values only feed
    /// later rounds and a `black_box`, so a value made stale by an earlier event of the group
    /// costs a miss later, never a wrong result. On lockstep batches of neighbouring operations
    /// (a noise-free collective) the hardware prefetcher does this already and warming costs a
    /// few percent; skipping groups whose operation indices lie close together recovered that
    /// but made the 1M-rank broadcast slower (0.72 against 0.56 s CPU median), so every group is
    /// warmed.
    fn warm(&self, evs: &[u64]) {
        let ops = self.ops;
        let n = evs.len().min(WARM);
        let mut acc = 0u64;
        // Round 1: operation records and states (the state holds the first dependents).
        let mut rank = [NIL; WARM];
        let mut dep = [NIL; WARM];
        for (i, &ev) in evs[..n].iter().enumerate() {
            let o = (ev & 0xffff_ffff) as usize;
            let Some(op) = ops.get(o) else { continue };
            // Both ends of the record: a 24-byte record may straddle two lines.
            acc ^= op.size ^ op.kind as u64;
            rank[i] = if ev >> 32 == EV_ARRIVE {
                op.peer
            } else {
                op.rank
            };
            if let Some(x) = self.stl(o) {
                acc ^= x.end;
                dep[i] = self.first_dependent(o, x);
            }
        }
        // Round 2: the rank an event works on (the receiver for an arrival; both ends of the
        // record, which may straddle two lines; its busy time, which `work` adds to: at a
        // million ranks that 8 MB array missed once per computation, 8 % of the samples of a
        // noisy all-reduce) and the event's first dependent's state.
        let mut qtail = [NIL; WARM];
        let mut ptail = [NIL; WARM];
        for i in 0..n {
            let ev = evs[i];
            let r = (rank[i] as usize).wrapping_sub(self.r0);
            // The rank's busy time (when recorded), which `work` adds to.
            acc ^= self.busy.get(r).copied().unwrap_or(0);
            // And its last detour lookup, which `work` reads.
            acc ^= self.det.get(r).map_or(0, |c| c[0]);
            if let Some(rk) = self.rk.get(r) {
                acc ^= rk.cpu0.free ^ rk.last_arr;
                let kind = ev >> 32;
                if kind == EV_ARRIVE {
                    qtail[i] = rk.prq_tail;
                    // No receive posted: the message joins the unexpected queue.
                    ptail[i] = if qtail[i] == NIL { rk.uq_tail } else { NIL };
                } else if kind == EV_READY {
                    let o = (ev & 0xffff_ffff) as usize;
                    if ops.get(o).is_some_and(|x| x.kind == OpKind::Recv as u8) {
                        qtail[i] = rk.uq_tail;
                        // No message waiting: the receive joins the posted queue.
                        ptail[i] = if qtail[i] == NIL { rk.prq_tail } else { NIL };
                    }
                }
            }
            acc ^= self.stl(dep[i] as usize).map_or(0, |x| x.ready);
        }
        // Round 3: the head of the matching queue (the receive an arrival matches, or the
        // message a receive finds), or the tail of the queue the event joins.
        let mut head = [NIL; WARM];
        for i in 0..n {
            if let Some(x) = self.stl(qtail[i] as usize) {
                head[i] = x.link;
            }
            acc ^= self.stl(ptail[i] as usize).map_or(0, |x| x.link as u64);
        }
        // Round 4: the matched operation (both ends of its record) and its state (with its
        // first dependents).
        for i in 0..n {
            let h = head[i] as usize;
            acc ^= ops.get(h).map_or(0, |x| x.size ^ x.tag as u64);
            dep[i] = match self.stl(h) {
                Some(x) => {
                    acc ^= x.end;
                    self.first_dependent(h, x)
                }
                None => NIL,
            };
        }
        // Round 5: a matched receive completes and releases its dependents.
        for &d in &dep[..n] {
            acc ^= self.stl(d as usize).map_or(0, |x| x.ready);
        }
        std::hint::black_box(acc);
    }

    /// The state of operation `op` if it is one of this part's.
    #[inline]
    fn stl(&self, op: usize) -> Option<&OpState> {
        self.st.get(op.wrapping_sub(self.o0))
    }

    /// Index of the first dependent of `op` whose state is `x` ([`NIL`]: none).
    #[inline]
    fn first_dependent(&self, op: usize, x: &OpState) -> u32 {
        let d = x.deps[0];
        if d == DEP_CSR {
            let s = self.s;
            let a = s.dep_start.get(op).copied().unwrap_or(0) as usize;
            s.dep_list.get(a).map_or(NIL, |&d| d & !IREQ_BIT)
        } else if d == DEP_NONE {
            NIL
        } else {
            d & !IREQ_BIT
        }
    }

    #[inline]
    fn schedule(&mut self, t: u64, ev: u64) {
        if t == self.now {
            self.fifo.push(ev);
        } else {
            self.heap.push(t, ev);
        }
    }

    #[inline]
    fn work(&mut self, op: usize, rank: u32, start: u64, w: u64) -> u64 {
        let r = rank as usize - self.r0;
        if !self.noisy {
            if !self.busy.is_empty() {
                self.busy[r] += w;
            }
            return start + w;
        }
        let e = match self.det.get_mut(r) {
            Some(c) => self.noise.finish_cached(rank, start, w, c),
            None => self.noise.finish(rank, start, w),
        };
        if !self.busy.is_empty() {
            self.busy[r] += e - start;
        }
        let extra = e - start - w;
        if extra > 0 {
            self.class_noise[self.ops[op].class as usize] += extra;
            if !self.noise_op.is_empty() {
                let x = &mut self.noise_op[op - self.o0];
                *x = x.saturating_add(extra.min(u32::MAX as u64) as u32);
            }
        }
        e
    }

    /// Satisfy dependents of `op` at time `t`: `irequires` edges if `ireq`, `requires` if `req`.
    #[inline]
    fn release(&mut self, op: usize, t: u64, ireq: bool, req: bool) {
        let deps = self.stm(op).deps;
        if deps[0] == DEP_CSR {
            let s = self.s;
            let (a, b) = (s.dep_start[op] as usize, s.dep_start[op + 1] as usize);
            for k in a..b {
                self.release_one(op, s.dep_list[k], t, ireq, req);
            }
        } else {
            for d in deps {
                if d == DEP_NONE {
                    break;
                }
                self.release_one(op, d, t, ireq, req);
            }
        }
    }

    /// Satisfy dependency entry `d` (a dependent of `op`, [`IREQ_BIT`] for `irequires`) at `t`
    /// if its kind is selected.
    #[inline]
    fn release_one(&mut self, op: usize, d: u32, t: u64, ireq: bool, req: bool) {
        let is_ireq = d & IREQ_BIT != 0;
        if (is_ireq && !ireq) || (!is_ireq && !req) {
            return;
        }
        let d = (d & !IREQ_BIT) as usize;
        let x = self.stm(d);
        if t >= x.ready {
            x.ready = t;
            x.pred = op as u32;
        }
        x.link -= 1;
        if x.link == 0 {
            let rt = x.ready;
            self.schedule(rt, EV_READY << 32 | d as u64);
        }
    }

    #[inline]
    fn complete(&mut self, op: usize, t: u64) {
        self.stm(op).end = t;
        self.completed += 1;
        if t > self.last_end && t != u64::MAX {
            self.last_end = t;
        }
        self.release(op, t, false, true);
    }

    fn handle(&mut self, ev: u64) {
        self.events += 1;
        let op = (ev & 0xffff_ffff) as usize;
        match ev >> 32 {
            EV_READY => self.on_ready(op),
            EV_ARRIVE => self.on_arrive(op),
            EV_CTS => self.on_cts(op),
            _ => self.on_data(op),
        }
    }

    fn on_ready(&mut self, op: usize) {
        let s = self.s;
        let ops = self.ops;
        let now = self.now;
        let o = ops[op];
        let rank = o.rank;
        let ci = self.ci(rank, o.cpu);
        match s.op_kind(op) {
            OpKind::Calc => {
                let start = now.max(self.cpu_at(ci).free);
                if start > now {
                    self.stm(op).pred = self.cpu_at(ci).last | PRED_RESOURCE;
                }
                self.note_start(op, start);
                let e = self.work(op, rank, start, o.size);
                self.cpu_at(ci).free = e;
                self.cpu_at(ci).last = op as u32;
                self.release(op, start, true, false);
                self.complete(op, e);
            }
            OpKind::Send => {
                let ni = self.ni(rank, o.nic);
                let start = now.max(self.cpu_at(ci).free).max(self.nic_at(ni).send_free);
                if start > now {
                    self.stm(op).pred = self.cpu_at(ci).last | PRED_RESOURCE;
                }
                self.note_start(op, start);
                let z = o.size;
                let eager = z <= self.p.s;
                let w = self.p.o + if eager { self.p.ob(z) } else { 0 };
                let e = self.work(op, rank, start, w);
                self.cpu_at(ci).free = e;
                self.cpu_at(ci).last = op as u32;
                let wire = if eager { self.p.gb(z) } else { 0 };
                self.nic_at(ni).send_free = start + self.p.g + wire;
                let mut arr = e + self.p.l + wire + self.noise.latency(self.op_base + op as u64, 0);
                let r = rank as usize - self.r0;
                arr = arr.max(self.rk[r].last_arr);
                self.rk[r].last_arr = arr;
                self.post(arr, EV_ARRIVE << 32 | op as u64, o.peer, NIL);
                self.release(op, start, true, false);
                if eager {
                    self.complete(op, e);
                }
            }
            OpKind::Recv => {
                // Until it completes, `end` holds the posting time.
                self.stm(op).end = now;
                self.note_start(op, now);
                self.release(op, now, true, false);
                let r = rank as usize - self.r0;
                let (src, tag) = (o.peer, o.tag);
                let mut tail = self.rk[r].uq_tail;
                let hit = self.links().take(&mut tail, |c| {
                    (src == ANY || src == ops[c].rank) && (tag == ANY || tag == ops[c].tag)
                });
                self.rk[r].uq_tail = tail;
                match hit {
                    Some(c) => self.matched(op, c),
                    None => {
                        let mut tail = self.rk[r].prq_tail;
                        self.links().push(&mut tail, op as u32);
                        self.rk[r].prq_tail = tail;
                    }
                }
            }
        }
    }

    fn on_arrive(&mut self, sop: usize) {
        let ops = self.ops;
        let dest = ops[sop].peer as usize - self.r0;
        let (src, tag) = (ops[sop].rank, ops[sop].tag);
        let mut tail = self.rk[dest].prq_tail;
        let hit = self.links().take(&mut tail, |c| {
            let (rs, rt) = (ops[c].peer, ops[c].tag);
            (rs == ANY || rs == src) && (rt == ANY || rt == tag)
        });
        self.rk[dest].prq_tail = tail;
        match hit {
            Some(c) => self.matched(c, sop),
            None => {
                let mut tail = self.rk[dest].uq_tail;
                self.links().push(&mut tail, sop as u32);
                self.rk[dest].uq_tail = tail;
            }
        }
    }

    /// Receive `r` (of this part) and message `sop` (of either part) meet at `now`.
    fn matched(&mut self, r: usize, sop: usize) {
        let ops = self.ops;
        let now = self.now;
        let o = ops[r];
        let rank = o.rank;
        let posted = self.stm(r).end;
        let wait = now - posted;
        self.class_wait[o.class as usize] += wait;
        if now > posted {
            self.stm(r).pred = sop as u32;
        }
        let ci = self.ci(rank, o.cpu);
        let ni = self.ni(rank, o.nic);
        let start = now.max(self.cpu_at(ci).free).max(self.nic_at(ni).recv_free);
        if start > now {
            self.stm(r).pred = self.cpu_at(ci).last | PRED_RESOURCE;
        }
        let z = ops[sop].size;
        self.nic_at(ni).recv_free = start + self.p.g;
        self.cpu_at(ci).last = r as u32;
        if z <= self.p.s {
            let e = self.work(r, rank, start, self.p.o + self.p.ob(z));
            self.cpu_at(ci).free = e;
            self.complete(r, e);
        } else {
            let e = self.work(r, rank, start, self.p.o);
            self.cpu_at(ci).free = e;
            self.links().set(sop, r as u32);
            let t = e + self.p.l + self.noise.latency(self.op_base + sop as u64, 1);
            self.post(t, EV_CTS << 32 | sop as u64, ops[sop].rank, r as u32);
        }
    }

    /// Clear-to-send reached the sender of rendezvous message `sop`.
    fn on_cts(&mut self, sop: usize) {
        let ops = self.ops;
        let now = self.now;
        let o = ops[sop];
        let rank = o.rank;
        let ci = self.ci(rank, o.cpu);
        let ni = self.ni(rank, o.nic);
        let start = now.max(self.cpu_at(ci).free).max(self.nic_at(ni).send_free);
        let pred = if start > now {
            self.cpu_at(ci).last | PRED_RESOURCE
        } else {
            self.stm(sop).link
        };
        self.stm(sop).pred = pred;
        let z = o.size;
        let e = self.work(sop, rank, start, self.p.o + self.p.ob(z));
        self.cpu_at(ci).free = e;
        self.cpu_at(ci).last = sop as u32;
        self.nic_at(ni).send_free = start + self.p.g + self.p.gb(z);
        let r = rank as usize - self.r0;
        let arr = (e + self.p.l + self.p.gb(z) + self.noise.latency(self.op_base + sop as u64, 2))
            .max(self.rk[r].last_arr);
        self.rk[r].last_arr = arr;
        self.complete(sop, e);
        self.post(arr, EV_DATA << 32 | sop as u64, o.peer, NIL);
    }

    /// Rendezvous data reached the receiver.
    fn on_data(&mut self, sop: usize) {
        let ops = self.ops;
        let now = self.now;
        let r = self.links().get(sop) as usize;
        let o = ops[r];
        let rank = o.rank;
        let ci = self.ci(rank, o.cpu);
        let ni = self.ni(rank, o.nic);
        let start = now.max(self.cpu_at(ci).free).max(self.nic_at(ni).recv_free);
        let pred = if start > now {
            self.cpu_at(ci).last | PRED_RESOURCE
        } else {
            sop as u32
        };
        self.stm(r).pred = pred;
        let z = ops[sop].size;
        let e = self.work(r, rank, start, self.p.o + self.p.ob(z));
        self.cpu_at(ci).free = e;
        self.cpu_at(ci).last = r as u32;
        self.nic_at(ni).recv_free = start + self.p.g;
        self.complete(r, e);
    }

    /// Count what never matched (unmatched receives never completed) and sum up.
    fn finish(&mut self) -> SimTotals {
        let mut unmatched_recvs = 0;
        let mut unmatched_sends = 0;
        for r in 0..self.rk.len() {
            let t = self.rk[r].prq_tail;
            if t != NIL {
                let mut c = t;
                loop {
                    c = self.links().get(c as usize);
                    unmatched_recvs += 1;
                    // It holds its posting time; it never completed.
                    self.stm(c as usize).end = u64::MAX;
                    if c == t {
                        break;
                    }
                }
            }
            let t = self.rk[r].uq_tail;
            if t != NIL {
                let mut c = t;
                loop {
                    c = self.links().get(c as usize);
                    unmatched_sends += 1;
                    if c == t {
                        break;
                    }
                }
            }
        }
        // Only completions set a final `end`: a posted receive's posting time (left in `end`
        // until it completes) was just replaced above if it never matched, and a matched one
        // always completes before the queue runs dry. So this is the largest finite `end`.
        debug_assert_eq!(
            Some(self.last_end),
            self.st
                .iter()
                .map(|x| x.end)
                .filter(|&e| e != u64::MAX)
                .max()
                .or(Some(0))
        );
        SimTotals {
            completion: self.last_end,
            events: self.events,
            completed: self.completed,
            class_wait: std::mem::take(&mut self.class_wait),
            class_noise: std::mem::take(&mut self.class_noise),
            unmatched_recvs,
            unmatched_sends,
        }
    }
}

/// One step of the critical path, latest first.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PathStep {
    /// Operation index.
    pub op: u32,
    /// Rank.
    pub rank: u32,
    /// Operation kind.
    pub kind: OpKind,
    /// Class name.
    pub class: String,
    /// Completion time (ns).
    pub end: u64,
    /// How this step was reached from the next-later step: "dep", "msg" or "cpu".
    pub via: &'static str,
}

/// Critical-path summary.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CriticalPath {
    /// Number of operations on the path.
    pub length: u64,
    /// Edges that are messages between ranks.
    pub messages: u64,
    /// Edges that are CPU contention on one rank.
    pub cpu_contention: u64,
    /// Computation (calc) time on the path (ns).
    pub calc_ns: u64,
    /// Detour time inside operations on the path (ns; 0 unless noise was recorded).
    pub noise_ns: u64,
    /// Distinct ranks visited.
    pub ranks_visited: u64,
    /// The last `limit` steps (latest first).
    pub tail: Vec<PathStep>,
}

/// Walk the critical path back from the last operation to complete.
pub fn critical_path(s: &Schedule, out: &SimOutput, limit: usize) -> CriticalPath {
    let last = out
        .st
        .iter()
        .map(|x| x.end)
        .enumerate()
        .filter(|&(_, e)| e != u64::MAX)
        .max_by_key(|&(i, e)| (e, std::cmp::Reverse(i)))
        .map(|(i, _)| i);
    critical_path_from(s, out, limit, last)
}

/// [`critical_path`] when the operation it starts from is known already: `last` is the
/// operation that completed last (the lowest index among those completing at that time;
/// `None` when nothing completed).
pub fn critical_path_from(
    s: &Schedule,
    out: &SimOutput,
    limit: usize,
    last: Option<usize>,
) -> CriticalPath {
    let mut cp = CriticalPath::default();
    let Some(mut cur) = last else {
        return cp;
    };
    let mut ranks = std::collections::HashSet::new();
    let mut steps = 0usize;
    let mut via = "end";
    loop {
        steps += 1;
        cp.length += 1;
        ranks.insert(s.ops[cur].rank);
        if s.op_kind(cur) == OpKind::Calc {
            cp.calc_ns += s.ops[cur].size;
        }
        if !out.noise.is_empty() {
            cp.noise_ns += out.noise[cur] as u64;
        }
        if cp.tail.len() < limit {
            cp.tail.push(PathStep {
                op: cur as u32,
                rank: s.ops[cur].rank,
                kind: s.op_kind(cur),
                class: s.class_names[s.ops[cur].class as usize].clone(),
                end: out.st[cur].end,
                via,
            });
        }
        let p = out.st[cur].pred;
        if p == PRED_NONE || steps > s.len() {
            break;
        }
        let res = p & PRED_RESOURCE != 0;
        let pi = (p & !PRED_RESOURCE) as usize;
        if pi >= s.len() || out.st[pi].end == u64::MAX || out.st[pi].end > out.st[cur].end {
            break;
        }
        if res {
            cp.cpu_contention += 1;
            via = "cpu";
        } else if s.ops[pi].rank != s.ops[cur].rank {
            cp.messages += 1;
            via = "msg";
        } else {
            via = "dep";
        }
        cur = pi;
    }
    cp.ranks_visited = ranks.len() as u64;
    cp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gen::{generate, GenParams, Pattern};
    use crate::noise::{LatencyNoise, NoiseSource};

    /// Entries held by a heap's buckets' allocations (and its spare).
    fn heap_capacity(h: &RadixHeap) -> usize {
        h.buckets.iter().map(Vec::capacity).sum::<usize>() + h.spare.capacity()
    }

    /// The radix heap pops the same batches as an ordered map: every entry of the earliest
    /// time, before `end` only, and `min` agrees; pushes at or after the floor in between,
    /// with distances from 0 to 2^63 and same-time batches larger than [`SMALL_BUCKET`].
    #[test]
    fn radix_heap_pops_what_an_ordered_map_pops() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut h = RadixHeap::new();
        let mut r: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
        let mut now = 0u64;
        let mut id = 0u64;
        let mut out = Vec::new();
        for round in 0..800 {
            let pushes = match rnd() % 16 {
                0 => 5000,
                1 => 0,
                _ => rnd() % 40,
            };
            let lockstep = now + 1 + rnd() % 1000;
            for _ in 0..pushes {
                let t = match rnd() % 10 {
                    0 => now,
                    1 => now.saturating_add(rnd() >> (rnd() % 64)),
                    2..=4 if pushes > 100 => lockstep,
                    _ => now + rnd() % (1 << (rnd() % 24)),
                };
                h.push(t, id);
                r.entry(t).or_default().push(id);
                id += 1;
            }
            assert_eq!(h.min(), r.keys().next().copied(), "round {round}");
            let end = match rnd() % 4 {
                0 => now + rnd() % 100,
                _ => u64::MAX,
            };
            out.clear();
            let got = h.pop_batch(&mut out, end);
            match r.first_key_value().map(|(&t, _)| t) {
                Some(t) if t < end => {
                    assert_eq!(got, Some(t), "round {round}");
                    let mut want = r.remove(&t).unwrap();
                    want.sort_unstable();
                    out.sort_unstable();
                    assert_eq!(out, want, "round {round}");
                    now = t;
                }
                _ => assert_eq!(got, None, "round {round}"),
            }
            assert_eq!(h.len, r.values().map(Vec::len).sum::<usize>());
        }
    }

    /// Lockstep batches at instants with varying digits pass through many buckets; the
    /// allocations left behind stay bounded (about two batches, plus small buckets) instead of
    /// one batch per bucket ever used.
    #[test]
    fn radix_heap_keeps_few_large_allocations() {
        let mut h = RadixHeap::new();
        let mut out = Vec::new();
        let n = 20_000u64;
        let mut t = 0u64;
        for step in 0..200u64 {
            t += 1 + step * 7919 % 65_536;
            for op in 0..n {
                h.push(t, op);
            }
            out.clear();
            assert_eq!(h.pop_batch(&mut out, u64::MAX), Some(t));
            assert_eq!(out.len() as u64, n);
        }
        let bound = 4 * n as usize + RADIX_BUCKETS * SMALL_BUCKET;
        assert!(
            heap_capacity(&h) <= bound,
            "{} > {bound}",
            heap_capacity(&h)
        );
    }

    /// Warming only loads memory: with it and without it every operation gets the same times,
    /// predecessor and noise.
    #[test]
    fn warming_changes_nothing() {
        let noisy = Noise {
            source: NoiseSource::Poisson {
                interval: 200_000,
                detour: 20_000,
            },
            coscheduled: false,
            latency: LatencyNoise::Exp { mean: 300 },
            seed: 7,
        };
        let opts = SimOptions {
            record_noise: true,
            record_start: true,
            record_busy: true,
            ..SimOptions::default()
        };
        for (pat, ranks) in [
            (Pattern::Bcast, 20_000),
            (Pattern::AllreduceRd, 6_000),
            (Pattern::Stencil3d, 4_096),
        ] {
            let s = generate(
                pat,
                &GenParams {
                    ranks,
                    iterations: 3,
                    ..GenParams::default()
                },
            )
            .expect("generator");
            for noise in [Noise::none(), noisy.clone()] {
                let p = Params::default();
                let a = simulate_inner(&s, &p, &noise, &opts, None, true, None, None, None);
                let b = simulate_inner(&s, &p, &noise, &opts, None, false, None, None, None);
                assert_eq!(a.completed, s.len() as u64);
                assert_eq!(a.st, b.st, "{pat:?}");
                assert_eq!(a.noise, b.noise);
                assert_eq!(a.start, b.start);
                assert_eq!(a.rank_busy, b.rank_busy);
                assert_eq!(a.class_wait, b.class_wait);
                assert_eq!(a.class_noise, b.class_noise);
                assert_eq!((a.events, a.completion), (b.events, b.completion));
            }
        }
    }

    /// Everything a run reports, for comparing two runs (the states' `link` is internal: the
    /// queue links of messages from the other half live outside the states on two threads).
    fn summary(o: &SimOutput) -> impl PartialEq + std::fmt::Debug {
        (
            o.st.iter()
                .map(|x| (x.ready, x.end, x.pred))
                .collect::<Vec<_>>(),
            (o.noise.clone(), o.start.clone(), o.rank_busy.clone()),
            (o.class_wait.clone(), o.class_noise.clone()),
            (o.completion, o.events, o.completed),
            (o.unmatched_recvs, o.unmatched_sends),
        )
    }

    fn all_opts(threads: usize) -> SimOptions {
        SimOptions {
            record_noise: true,
            record_start: true,
            record_busy: true,
            threads,
            min_parallel_ops: 0,
        }
    }

    /// The two-thread engine gives exactly the one-thread results on every generator, odd and
    /// even rank counts, with and without detours and latency noise, eager and rendezvous sizes.
    #[test]
    fn two_threads_equal_one_thread_on_generators() {
        let noises = [
            Noise::none(),
            Noise {
                source: NoiseSource::Poisson {
                    interval: 100_000,
                    detour: 20_000,
                },
                coscheduled: false,
                latency: LatencyNoise::Exp { mean: 300 },
                seed: 3,
            },
            Noise {
                source: NoiseSource::Periodic {
                    interval: 50_000,
                    detour: 5_000,
                },
                coscheduled: true,
                latency: LatencyNoise::None,
                seed: 1,
            },
        ];
        for pat in Pattern::all() {
            for ranks in [16u32, 17, 255, 1000, 4096] {
                if pat == Pattern::AllreduceRing && ranks > 255 {
                    continue;
                }
                for bytes in [8u64, 200_000] {
                    let gp = GenParams {
                        ranks,
                        bytes,
                        halo_bytes: bytes,
                        iterations: 3,
                        compute_ns: 20_000,
                        allreduce_every: 2,
                        ..GenParams::default()
                    };
                    let s = crate::gen::generate_layout(pat, &gp, true).expect("generator");
                    // The same program as GOAL text (rank by rank: another layout).
                    let mut text = Vec::new();
                    crate::goal::write_goal(&s, &mut text).expect("write");
                    let text = String::from_utf8(text).expect("utf-8");
                    let g = crate::goal::parse_goal_str(&text).expect("parse");
                    assert!(can_split(&g, &Params::default(), &all_opts(2)));
                    for (s, noise) in noises.iter().map(|n| (&s, n)).chain([(&g, &noises[1])]) {
                        let p = Params::default();
                        let one = simulate(s, &p, noise, &all_opts(1));
                        let two = simulate(s, &p, noise, &all_opts(2));
                        assert_eq!(one.completed, s.len() as u64, "{pat:?} {ranks}");
                        assert_eq!(summary(&one), summary(&two), "{pat:?} {ranks} {bytes}");
                    }
                }
            }
        }
    }

    /// Unmatched receives and messages (also across the halves), wildcards, rendezvous across
    /// the halves, several CPUs and NICs, `irequires`: two threads count and time them as one.
    #[test]
    fn two_threads_equal_one_thread_on_goal_corner_cases() {
        let text = "num_ranks 5
rank 0 {
l1: recv 100000b from 4 tag 1
l2: send 8b to 3 tag 2 cpu 1 nic 1
l3: recv 8b from -1 tag -1
l4: calc 500
l4 requires l1
l2 irequires l1
}
rank 1 {
l1: send 8b to 4 tag 9
l2: recv 8b from 3 tag 5
}
rank 2 {
l1: calc 100
l2: send 8b to 0 tag 7
l2 requires l1
}
rank 3 {
l1: recv 8b from 0 tag 2
l2: send 8b to 0 tag 3
l3: send 8b to 1 tag 4
l2 requires l1
}
rank 4 {
l1: send 100000b to 0 tag 1 nic 1
l2: recv 8b from 1 tag 8
}
";
        let s = crate::goal::parse_goal_str(text).expect("parse");
        assert!(can_split(&s, &Params::default(), &all_opts(2)));
        let noise = Noise {
            source: NoiseSource::Poisson {
                interval: 3_000,
                detour: 700,
            },
            coscheduled: false,
            latency: LatencyNoise::Uniform { max: 900 },
            seed: 11,
        };
        for noise in [Noise::none(), noise] {
            for l in [1, 3, 2500] {
                let p = Params {
                    l,
                    ..Params::default()
                };
                let one = simulate(&s, &p, &noise, &all_opts(1));
                let two = simulate(&s, &p, &noise, &all_opts(2));
                assert_eq!(summary(&one), summary(&two), "L = {l}");
                // Rank 1's and rank 4's receives; rank 1's message, rank 3's to rank 1, and one
                // of the two the wildcard receive of rank 0 did not take.
                assert_eq!((one.unmatched_recvs, one.unmatched_sends), (2, 3));
            }
        }
    }

    /// A run from a template written beforehand (or grown in steps, as beside the generator)
    /// is the run that builds its own states; a template of the wrong length is ignored.
    #[test]
    fn run_from_template_is_the_same() {
        let gp = GenParams {
            ranks: 300,
            ..GenParams::default()
        };
        let s = crate::gen::generate_layout(Pattern::Stencil2d, &gp, true).expect("gen");
        let p = Params::default();
        let mut grown = state_template(10);
        grown.grow(s.len() / 2).expect("heap");
        grown.grow(s.len()).expect("heap");
        assert_eq!(grown, state_template(s.len()));
        // A mapped template grown in steps (zeroed states), and one whose states hold
        // garbage: the run writes every state before it starts.
        let mut mapped = States::mapped(s.len() / 3).expect("map");
        mapped.grow(s.len() / 2).expect("populate");
        mapped.grow(s.len()).expect("populate");
        assert!(mapped.is_mapped() && mapped.len() == s.len());
        let mut garbage = States::mapped(s.len()).expect("map");
        garbage.grow(s.len()).expect("populate");
        for (i, x) in garbage.iter_mut().enumerate() {
            *x = OpState {
                ready: i as u64 * 7,
                end: i as u64,
                link: 3,
                pred: i as u32,
                deps: [i as u32 + 1, 5],
            };
        }
        for opts in [all_opts(1), all_opts(2)] {
            let want = summary(&simulate(&s, &p, &Noise::none(), &opts));
            let a = simulate_from_template(&s, &p, &Noise::none(), &opts, grown.clone());
            let b = simulate_from_template(&s, &p, &Noise::none(), &opts, state_template(3));
            assert_eq!(summary(&a), want);
            assert_eq!(summary(&b), want);
            for t in [&mapped, &garbage] {
                let mut m = States::mapped(1).expect("map");
                m.grow(s.len()).expect("populate");
                m.copy_from_slice(t);
                let c = simulate_from_template(&s, &p, &Noise::none(), &opts, m);
                assert_eq!(summary(&c), want);
            }
        }
    }

    /// The two-thread engine really splits: it is chosen for a grouped layout with `L > 0` and
    /// refused for `L = 0`, a layout whose halves interleave, or one thread.
    #[test]
    fn two_threads_only_when_allowed() {
        let gp = GenParams {
            ranks: 64,
            ..GenParams::default()
        };
        let grouped = crate::gen::generate_layout(Pattern::AllreduceRd, &gp, true).expect("gen");
        let plain = generate(Pattern::AllreduceRd, &gp).expect("gen");
        let p = Params::default();
        assert_eq!(
            parallel_split(&grouped, &p, &all_opts(2)).map(|x| x.0),
            Some(32)
        );
        assert!(parallel_split(&grouped, &p, &all_opts(1)).is_none());
        assert!(parallel_split(&plain, &p, &all_opts(2)).is_none());
        let l0 = Params { l: 0, ..p };
        assert!(parallel_split(&grouped, &l0, &all_opts(2)).is_none());
        // L = 0 falls back to one thread and still gives the one-thread results.
        let a = simulate(&grouped, &l0, &Noise::none(), &all_opts(2));
        let b = simulate(&grouped, &l0, &Noise::none(), &all_opts(1));
        assert_eq!(summary(&a), summary(&b));
        let big = SimOptions {
            min_parallel_ops: grouped.len() + 1,
            ..all_opts(2)
        };
        assert!(parallel_split(&grouped, &p, &big).is_none());
    }

    /// The canonical batch order is the sorted order, whichever path `sort_events` takes:
    /// small, dense (bitmap), sparse, several kinds, already sorted.
    #[test]
    fn sort_events_sorts() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut tmp, mut bits) = (Vec::new(), Vec::new());
        for (n, spread) in [
            (10usize, 1u64 << 30),
            (300, 2),
            (5000, 3),
            (5000, 1 << 30),
            (70_000, 1),
        ] {
            for kinds in [1u64, 4] {
                // Distinct operations (a shuffled run of `spread`-spaced indices), random kinds.
                let base = next() % (1 << 20);
                let mut v: Vec<u64> = (0..n as u64)
                    .map(|i| (next() % kinds) << 32 | (base + i * spread))
                    .collect();
                for i in (1..v.len()).rev() {
                    v.swap(i, (next() % (i as u64 + 1)) as usize);
                }
                let mut want = v.clone();
                want.sort_unstable();
                sort_events(&mut v, &mut tmp, &mut bits);
                assert_eq!(v, want, "{n} {spread} {kinds}");
                sort_events(&mut v, &mut tmp, &mut bits);
                assert_eq!(v, want);
            }
        }
        // A value twice (never happens in a run) still sorts, through the standard sort.
        let mut v: Vec<u64> = (0..1000u64).rev().chain([500]).collect();
        let mut want = v.clone();
        want.sort_unstable();
        sort_events(&mut v, &mut tmp, &mut bits);
        assert_eq!(v, want);
    }

    /// The initial states are the same whether one thread or two fill them, and match the
    /// schedule: pending counts are the dependencies, inline dependents the CSR lists.
    #[test]
    fn initial_state_on_two_threads_is_the_same() {
        for (pat, ranks) in [
            (Pattern::Bcast, 5_000),
            (Pattern::AllreduceRd, 3_001),
            (Pattern::Stencil2d, 1_024),
        ] {
            let s = generate(
                pat,
                &GenParams {
                    ranks,
                    iterations: 2,
                    ..GenParams::default()
                },
            )
            .expect("generator");
            let one = initial_state_threads(&s, 1);
            let two = initial_state_threads(&s, 2);
            assert_eq!(one, two, "{pat:?}");
            let mut pending = vec![0u32; s.len()];
            for &d in &s.dep_list {
                pending[(d & !IREQ_BIT) as usize] += 1;
            }
            for (op, x) in one.iter().enumerate() {
                assert_eq!(x.link, pending[op]);
                assert_eq!((x.ready, x.end, x.pred), (0, u64::MAX, PRED_NONE));
                match s.dependents(op) {
                    [] => assert_eq!(x.deps, [DEP_NONE; 2]),
                    &[a] => assert_eq!(x.deps, [a, DEP_NONE]),
                    &[a, b] => assert_eq!(x.deps, [a, b]),
                    _ => assert_eq!(x.deps[0], DEP_CSR),
                }
            }
        }
    }

    /// Runs that share a [`Scratch`] (the second and later offer `enter` only the operations
    /// the first found without pending dependencies) give what fresh runs give, noise-free
    /// then noisy, on schedules whose operations start at time 0 in several places.
    #[test]
    fn runs_sharing_scratch_are_fresh_runs() {
        let noisy = Noise {
            source: NoiseSource::Poisson {
                interval: 30_000,
                detour: 6_000,
            },
            coscheduled: false,
            latency: LatencyNoise::Exp { mean: 200 },
            seed: 9,
        };
        let p = Params::default();
        let opts = all_opts(2);
        for (pat, ranks) in [
            (Pattern::AllreduceRd, 1000),
            (Pattern::Stencil2d, 900),
            (Pattern::Bcast, 777),
        ] {
            let gp = GenParams {
                ranks,
                ..GenParams::default()
            };
            let s = crate::gen::generate_layout(pat, &gp, true).expect("generator");
            let split = Split::of(&s, &p, &opts);
            assert!(split.two_threads(), "{pat:?}");
            let mut sc = Scratch::default();
            for (k, noise) in [Noise::none(), noisy.clone(), Noise::none()]
                .iter()
                .enumerate()
            {
                let shared = simulate_from(
                    &s,
                    &p,
                    noise,
                    &opts,
                    initial_state(&s),
                    Some(&split),
                    Some(&mut sc),
                );
                let fresh = simulate(&s, &p, noise, &opts);
                assert_eq!(summary(&shared), summary(&fresh), "{pat:?} run {k}");
                assert!(shared.st == fresh.st, "{pat:?} run {k}");
                // Each part noted its entries: fewer than its operations, more than none.
                for part in sc.parts.iter().flatten() {
                    assert!(!part.entries.is_empty() && part.entries.len() < s.len() / 2);
                }
            }
        }
    }
}
