//! The simulator's schedule: every operation of every rank in struct-of-arrays form, plus the
//! dependency graph in compressed-sparse-row form.
//!
//! One operation costs 24 bytes here, one dependency 8 bytes; nothing is allocated per operation.

use crate::error::ScheduleError;
use crate::mapped::{BestEffort, MappedArray};
use crate::ops::Ops;

/// Wildcard peer (`MPI_ANY_SOURCE`) or tag (`MPI_ANY_TAG`); written `-1` in GOAL.
pub const ANY: u32 = u32::MAX;
/// Set in a dependent's entry when the dependency is an `irequires` (satisfied when the
/// dependency *starts*) rather than a `requires` (satisfied when it *completes*).
pub const IREQ_BIT: u32 = 1 << 31;
/// Largest operation count a schedule may hold (indices are 31-bit).
pub const MAX_OPS: usize = (1 << 31) - 1;

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum OpKind {
    /// Send `size` bytes to `peer` with `tag`.
    Send = 0,
    /// Receive `size` bytes from `peer` (or [`ANY`]) with `tag` (or [`ANY`]).
    Recv = 1,
    /// Compute for `size` nanoseconds on the rank's CPU.
    Calc = 2,
}

impl OpKind {
    /// Decode the byte stored in [`Op::kind`].
    pub fn from_u8(v: u8) -> OpKind {
        match v {
            0 => OpKind::Send,
            1 => OpKind::Recv,
            _ => OpKind::Calc,
        }
    }
    /// Lower-case name as used in GOAL and in reports.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Send => "send",
            OpKind::Recv => "recv",
            OpKind::Calc => "calc",
        }
    }
}

/// One operation (24 bytes): everything the simulator reads about it in one cache line.
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
#[repr(C)]
pub struct Op {
    /// Bytes (send/recv) or nanoseconds (calc).
    pub size: u64,
    /// Rank executing the operation.
    pub rank: u32,
    /// Destination (send) or source (recv, may be [`ANY`]); unused for calc.
    pub peer: u32,
    /// Message tag (may be [`ANY`] on a recv); unused for calc.
    pub tag: u32,
    /// [`OpKind`] as a byte.
    pub kind: u8,
    /// Operation class index into [`Schedule::class_names`] (collective or phase).
    pub class: u8,
    /// CPU index on the rank.
    pub cpu: u8,
    /// NIC index on the rank.
    pub nic: u8,
}

/// A complete schedule ready for simulation.
#[derive(Clone, Debug, Default)]
pub struct Schedule {
    /// Number of ranks (processes).
    pub num_ranks: u32,
    /// The operations (a mapping for a large schedule, see [`Ops`]).
    pub ops: Ops,
    /// CSR offsets: dependents of op `i` are `dep_list[dep_start[i]..dep_start[i+1]]`.
    pub dep_start: DepArray,
    /// Dependent op index, with [`IREQ_BIT`] set for `irequires` edges.
    pub dep_list: DepArray,
    /// Names of the operation classes.
    pub class_names: Vec<String>,
    /// Number of CPUs per rank (largest cpu index + 1).
    pub num_cpus: u8,
    /// Number of NICs per rank (largest nic index + 1).
    pub num_nics: u8,
    /// Memory the build leaves for later use (see [`Spare`]); not part of the schedule.
    pub(crate) spare: Spare,
}

/// An array of the dependency lists ([`Schedule::dep_start`], [`Schedule::dep_list`]): a
/// vector, or, from 64 MiB on, an anonymous mapping whose pages were populated in bulk (at a
/// million ranks the two are 328 MB, 80 K pages that the lists' build took as demand faults
/// before: see [`crate::mapped`]). It dereferences to a slice.
pub type DepArray = MappedArray<u32, BestEffort>;

/// `n` zeroed entries of each of `lens` arrays for the dependency lists, for threads to write
/// their parts of: a mapping for 64 MiB or more, whose pages `threads` threads (1 or 2)
/// populate at once, half each; a vector otherwise.
fn zeroed_dep_arrays<const K: usize>(lens: [usize; K], threads: usize) -> [DepArray; K] {
    let mut arrays = lens.map(|n| {
        let mut a = DepArray::new();
        let Ok(()) = a.reserve(n);
        a
    });
    let populate = |a: &DepArray, n: usize, part: usize| {
        let (from, to) = match (threads >= 2, part) {
            (false, _) => (0, n),
            (true, 0) => (0, n / 2),
            (true, _) => (n / 2, n),
        };
        let Ok(()) = a.populate_room(from, to);
    };
    if arrays.iter().any(|a| a.is_mapped()) {
        let (arrays, populate) = (&arrays, &populate);
        std::thread::scope(|sc| {
            if threads >= 2 {
                sc.spawn(move || {
                    for (a, &n) in arrays.iter().zip(&lens) {
                        populate(a, n, 1);
                    }
                });
            }
            for (a, &n) in arrays.iter().zip(&lens) {
                populate(a, n, 0);
            }
        });
    }
    for (a, &n) in arrays.iter_mut().zip(&lens) {
        a.note_populated(n);
        let Ok(()) = a.grow(n, 0);
    }
    arrays
}

/// Buffers a schedule's build leaves behind for later use: the builders' edge arrays, whose
/// pages are mapped already (at a million ranks each is 160 MB, 40 K page faults a fresh array
/// of that size would take again). Only builds that ask for it keep them
/// ([`ScheduleBuilder::keep_edges`]); a clone of the schedule has none.
#[derive(Default)]
pub(crate) struct Spare(std::sync::Mutex<Vec<Vec<u32>>>);

impl std::fmt::Debug for Spare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The sizes only: the contents are leftovers.
        let sizes: Vec<usize> = self
            .0
            .lock()
            .map(|m| m.iter().map(Vec::len).collect())
            .unwrap_or_default();
        f.debug_tuple("Spare").field(&sizes).finish()
    }
}

impl Clone for Spare {
    fn clone(&self) -> Self {
        Spare::default()
    }
}

impl Spare {
    fn put(&self, v: Vec<u32>) {
        if let Ok(mut m) = self.0.lock() {
            m.push(v);
        }
    }

    /// A spare buffer, if one is left (the one with the most entries, so the most pages
    /// mapped, first), with whatever it holds.
    pub(crate) fn take(&self) -> Option<Vec<u32>> {
        let mut m = self.0.lock().ok()?;
        let i = (0..m.len()).max_by_key(|&i| m[i].len())?;
        Some(m.swap_remove(i))
    }

    /// How many buffers are left.
    #[cfg(test)]
    pub(crate) fn count(&self) -> usize {
        self.0.lock().map_or(0, |m| m.len())
    }

    /// Drop what is left (on another thread when large).
    fn release(&self) {
        let left = match self.0.lock() {
            Ok(mut m) => std::mem::take(&mut *m),
            Err(_) => return,
        };
        for v in left {
            drop_in_background(v);
        }
    }
}

impl Schedule {
    /// Free the spare buffers its build left (see [`crate::gen::generate_with`]), if they are
    /// not going to be used.
    pub fn release_spare(&self) {
        self.spare.release();
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }
    /// True when the schedule has no operations.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    /// Kind of operation `op`.
    pub fn op_kind(&self, op: usize) -> OpKind {
        OpKind::from_u8(self.ops[op].kind)
    }
    /// Dependents of `op` (raw entries, [`IREQ_BIT`] marks `irequires`).
    pub fn dependents(&self, op: usize) -> &[u32] {
        &self.dep_list[self.dep_start[op] as usize..self.dep_start[op + 1] as usize]
    }
    /// Total number of dependency edges.
    pub fn num_edges(&self) -> usize {
        self.dep_list.len()
    }
    /// Operations of every rank, grouped by rank and in program order within a rank.
    /// Returns (offsets per rank, op indices).
    pub fn ops_by_rank(&self) -> (Vec<u32>, Vec<u32>) {
        let p = self.num_ranks as usize;
        let mut off = vec![0u32; p + 1];
        for o in self.ops.iter() {
            off[o.rank as usize + 1] += 1;
        }
        for i in 0..p {
            off[i + 1] += off[i];
        }
        let mut fill = off.clone();
        let mut idx = vec![0u32; self.len()];
        for (op, o) in self.ops.iter().enumerate() {
            idx[fill[o.rank as usize] as usize] = op as u32;
            fill[o.rank as usize] += 1;
        }
        (off, idx)
    }
    /// Approximate heap bytes held by the schedule.
    pub fn heap_bytes(&self) -> usize {
        self.len() * (std::mem::size_of::<Op>() + 4) + self.dep_list.len() * 4
    }
}

/// Builds a [`Schedule`] operation by operation; dependencies may be added in any order.
#[derive(Debug, Default)]
pub struct ScheduleBuilder {
    s: Schedule,
    /// Pairs (dependency, dependent | IREQ_BIT), flat (so that the array can serve as a
    /// `u32` buffer once the dependency lists are built, see [`Spare`]).
    edges: Vec<u32>,
    /// Leave the edge array to the schedule's [`Spare`] instead of freeing it.
    keep_edges: bool,
    /// With [`ScheduleBuilder::split_lanes`]: the operations of ranks from `.0` on, numbered
    /// from [`LANE`] until [`ScheduleBuilder::finish`] puts them after the others.
    lane: Option<(u32, Vec<Op>)>,
    /// With [`ScheduleBuilder::report_progress`]: where the number of operations is published.
    progress: Option<std::sync::Arc<std::sync::atomic::AtomicUsize>>,
    /// With [`ScheduleBuilder::only_ranks`]: the ranks whose operations this builder holds.
    only: Option<(u32, u32)>,
}

/// [`ScheduleBuilder::report_progress`] publishes the operation count every this many operations.
const PROGRESS_STEP: usize = 1 << 16;

/// Provisional index of the first operation of the second lane (see
/// [`ScheduleBuilder::split_lanes`]); each lane holds fewer operations than this.
const LANE: u32 = 1 << 30;

impl ScheduleBuilder {
    /// A builder for `num_ranks` ranks, with the class `"default"` as class 0.
    pub fn new(num_ranks: u32) -> Self {
        let s = Schedule {
            num_ranks,
            num_cpus: 1,
            num_nics: 1,
            class_names: vec!["default".to_string()],
            ..Schedule::default()
        };
        ScheduleBuilder {
            s,
            edges: Vec::new(),
            keep_edges: false,
            lane: None,
            progress: None,
            only: None,
        }
    }

    /// Reserve room for `ops` operations and `edges` dependencies.
    pub fn reserve(&mut self, ops: usize, edges: usize) {
        self.s.ops.reserve(ops);
        self.edges.reserve(edges * 2);
    }

    /// Leave the edge array, once the dependency lists are built, to the schedule (see
    /// [`Spare`]) instead of freeing it.
    pub(crate) fn keep_edges(&mut self) {
        self.keep_edges = true;
    }

    /// Change the declared number of ranks (GOAL's `num_ranks` may come after nothing else).
    pub fn set_num_ranks(&mut self, n: u32) {
        self.s.num_ranks = n;
    }

    /// Declared number of ranks.
    pub fn num_ranks(&self) -> u32 {
        self.s.num_ranks
    }

    /// Register (or look up) an operation class by name; returns its index.
    pub fn class(&mut self, name: &str) -> u8 {
        if let Some(i) = self.s.class_names.iter().position(|c| c == name) {
            return i as u8;
        }
        let i = self.s.class_names.len().min(255);
        if i < 255 {
            self.s.class_names.push(name.to_string());
        }
        i as u8
    }

    /// Number of operations added so far.
    pub fn len(&self) -> usize {
        self.s.ops.len() + self.lane.as_ref().map_or(0, |l| l.1.len())
    }

    /// True when no operation was added yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// From now on, number the operations of ranks `num_ranks / 2` and up apart from the others
    /// and, in [`ScheduleBuilder::finish`], put them after all others (each group in the order
    /// added): the layout a two-thread simulation needs, built without the copy and index map
    /// of [`ScheduleBuilder::group_halves`]. Indices returned by [`ScheduleBuilder::push`] are
    /// provisional until then (consecutive for consecutive operations of one half; use
    /// [`ScheduleBuilder::next_id`]). Each half may hold up to 2^30 − 1 operations. Call it
    /// before adding any operation (it does nothing otherwise).
    pub fn split_lanes(&mut self) {
        if self.is_empty() {
            self.lane = Some((self.s.num_ranks / 2, Vec::new()));
        }
    }

    /// Build the operations of ranks `lo..hi` only: generators skip every other rank
    /// ([`ScheduleBuilder::owns`]). Two such builders, one per half of the ranks, built at once
    /// and joined by [`ScheduleBuilder::finish_halves`], give the schedule that
    /// [`ScheduleBuilder::split_lanes`] gives on one thread.
    pub fn only_ranks(&mut self, lo: u32, hi: u32) {
        self.only = Some((lo, hi));
    }

    /// Whether this builder holds the operations of `rank` (see [`ScheduleBuilder::only_ranks`]).
    #[inline]
    pub fn owns(&self, rank: u32) -> bool {
        match self.only {
            None => true,
            Some((lo, hi)) => lo <= rank && rank < hi,
        }
    }

    /// Add the number of operations to `to` every `PROGRESS_STEP` operations (for work that
    /// runs beside the build and needs only the count, such as writing state templates;
    /// builders working at once may share one counter).
    pub fn report_progress(&mut self, to: std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        self.progress = Some(to);
    }

    /// The index the next operation of `rank` will get.
    pub fn next_id(&self, rank: u32) -> u32 {
        match &self.lane {
            Some((half, ops)) if rank >= *half => LANE + ops.len() as u32,
            _ => self.s.ops.len() as u32,
        }
    }

    /// Add one operation; returns its index.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        rank: u32,
        kind: OpKind,
        peer: u32,
        tag: u32,
        size: u64,
        cpu: u8,
        nic: u8,
        class: u8,
    ) -> Result<u32, ScheduleError> {
        debug_assert!(self.owns(rank), "rank {rank} belongs to the other builder");
        let s = &mut self.s;
        if rank >= s.num_ranks {
            return Err(ScheduleError::RankOutOfRange {
                rank,
                num_ranks: s.num_ranks,
            });
        }
        if kind != OpKind::Calc && peer != ANY && peer >= s.num_ranks {
            return Err(ScheduleError::PeerOutOfRange {
                rank,
                peer,
                num_ranks: s.num_ranks,
            });
        }
        let op = Op {
            size,
            rank,
            peer,
            tag,
            kind: kind as u8,
            class,
            cpu,
            nic,
        };
        let id = match &mut self.lane {
            None => {
                if s.ops.len() >= MAX_OPS {
                    return Err(ScheduleError::TooManyOps);
                }
                s.ops.len() as u32
            }
            Some((half, ops)) => {
                if s.ops.len().max(ops.len()) >= LANE as usize - 1 {
                    return Err(ScheduleError::TooManyOps);
                }
                if rank >= *half {
                    ops.push(op);
                    LANE + ops.len() as u32 - 1
                } else {
                    s.ops.len() as u32
                }
            }
        };
        if id == s.ops.len() as u32 {
            s.ops.push(op);
        }
        if cpu >= s.num_cpus {
            s.num_cpus = cpu + 1;
        }
        if nic >= s.num_nics {
            s.num_nics = nic + 1;
        }
        if let Some(p) = &self.progress {
            let n = self.len();
            if n % PROGRESS_STEP == 0 {
                p.fetch_add(PROGRESS_STEP, std::sync::atomic::Ordering::Release);
            }
        }
        Ok(id)
    }

    /// Shorthand: send on CPU 0 / NIC 0.
    pub fn send(&mut self, rank: u32, to: u32, tag: u32, bytes: u64, class: u8) -> u32 {
        self.push_checked(rank, OpKind::Send, to, tag, bytes, class)
    }
    /// Shorthand: receive on CPU 0 / NIC 0.
    pub fn recv(&mut self, rank: u32, from: u32, tag: u32, bytes: u64, class: u8) -> u32 {
        self.push_checked(rank, OpKind::Recv, from, tag, bytes, class)
    }
    /// Shorthand: compute on CPU 0.
    pub fn calc(&mut self, rank: u32, ns: u64, class: u8) -> u32 {
        self.push_checked(rank, OpKind::Calc, 0, 0, ns, class)
    }

    /// Used by generators whose arguments are correct by construction.
    fn push_checked(
        &mut self,
        rank: u32,
        kind: OpKind,
        peer: u32,
        tag: u32,
        size: u64,
        class: u8,
    ) -> u32 {
        match self.push(rank, kind, peer, tag, size, 0, 0, class) {
            Ok(id) => id,
            // Generators compute ranks modulo num_ranks; reaching this is a bug in a generator.
            Err(e) => panic!("generator produced an invalid operation: {e}"),
        }
    }

    /// Append the operations and dependencies of `other` (built for the same ranks and
    /// classes) after this builder's, shifting its operation indices.
    pub(crate) fn append(&mut self, other: ScheduleBuilder) {
        debug_assert_eq!(self.s.class_names, other.s.class_names);
        let off = self.s.ops.len() as u32;
        self.s.ops.extend_from_slice(&other.s.ops);
        self.edges.extend(
            other
                .edges
                .chunks_exact(2)
                .flat_map(|e| [e[0] + off, ((e[1] & !IREQ_BIT) + off) | (e[1] & IREQ_BIT)]),
        );
        self.s.num_cpus = self.s.num_cpus.max(other.s.num_cpus);
        self.s.num_nics = self.s.num_nics.max(other.s.num_nics);
    }

    /// Renumber the operations so that those of ranks `0..num_ranks / 2` come first, the
    /// others after them, each group in its former order (what a two-thread simulation needs,
    /// see [`crate::sim::simulate`]). Dependencies follow their operations.
    pub fn group_halves(&mut self) {
        let half = self.s.num_ranks / 2;
        let ops: &mut [Op] = &mut self.s.ops;
        let first = ops.iter().filter(|o| o.rank < half).count() as u32;
        // New index of every operation.
        let mut new = Vec::with_capacity(ops.len());
        let (mut a, mut b) = (0u32, first);
        for o in ops.iter() {
            if o.rank < half {
                new.push(a);
                a += 1;
            } else {
                new.push(b);
                b += 1;
            }
        }
        // Stable partition: the second half's operations wait aside while the first half's
        // move forward.
        let mut second = Vec::with_capacity(ops.len() - first as usize);
        let mut k = 0;
        for i in 0..ops.len() {
            let o = ops[i];
            if o.rank < half {
                ops[k] = o;
                k += 1;
            } else {
                second.push(o);
            }
        }
        self.s.ops.truncate(k);
        self.s.ops.extend_from_slice(&second);
        drop(second);
        let map = |x: u32| new.get(x as usize).copied().unwrap_or(x);
        for e in self.edges.chunks_exact_mut(2) {
            let to = e[1] & !IREQ_BIT;
            e[0] = map(e[0]);
            e[1] = map(to) | (e[1] & IREQ_BIT);
        }
    }

    /// `dependent requires dependency` (or `irequires` when `start_only`).
    pub fn depend(&mut self, dependent: u32, dependency: u32, start_only: bool) {
        let d = if start_only {
            dependent | IREQ_BIT
        } else {
            dependent
        };
        self.edges.extend_from_slice(&[dependency, d]);
    }

    /// Finish: builds the dependency CSR.
    pub fn finish(self) -> Result<Schedule, ScheduleError> {
        let ScheduleBuilder {
            mut s,
            mut edges,
            lane,
            keep_edges,
            ..
        } = self;
        // Second-lane operations after the others; their edges renumbered below.
        let first = s.ops.len() as u32;
        let renumber = lane.is_some();
        if let Some((_, ops)) = lane {
            s.ops.extend_from_slice(&ops);
        }
        let at = |x: u32| if x >= LANE { x - LANE + first } else { x };
        let n = s.ops.len();
        if renumber {
            for e in edges.chunks_exact_mut(2) {
                e[0] = at(e[0]);
                e[1] = at(e[1] & !IREQ_BIT) | (e[1] & IREQ_BIT);
            }
        }
        let [mut start, mut list] = zeroed_dep_arrays([n + 1, edges.len() / 2], 1);
        csr_part(&edges, n, &mut start, &mut list, 0, 0)?;
        if keep_edges {
            s.spare.put(edges);
        } else {
            // Returning the edge buffer's pages to the system takes a while for big schedules,
            // and nothing here waits for it: leave it to another thread.
            drop_in_background(edges);
        }
        s.dep_start = start;
        s.dep_list = list;
        Ok(s)
    }

    /// Finish two builders of the same ranks and classes, `a` holding the operations of the
    /// first half of the ranks and `b` those of the second (see
    /// [`ScheduleBuilder::only_ranks`]): `b`'s operations go after `a`'s. With `threads` >= 2
    /// the two halves' dependency lists are built at once, each into its own part of the
    /// arrays. Dependencies must link operations of one builder (they are checked).
    pub fn finish_halves(
        a: ScheduleBuilder,
        b: ScheduleBuilder,
        threads: usize,
    ) -> Result<Schedule, ScheduleError> {
        let ScheduleBuilder {
            s: mut sa,
            edges: ea,
            keep_edges,
            ..
        } = a;
        let ScheduleBuilder {
            s: sb, edges: eb, ..
        } = b;
        debug_assert_eq!(sa.class_names, sb.class_names);
        let (na, nb) = (sa.ops.len(), sb.ops.len());
        let n = na + nb;
        if n > MAX_OPS {
            return Err(ScheduleError::TooManyOps);
        }
        sa.num_cpus = sa.num_cpus.max(sb.num_cpus);
        sa.num_nics = sa.num_nics.max(sb.num_nics);
        // Fresh zeroed arrays whose pages both threads populate (half each).
        let [mut start, mut list] = zeroed_dep_arrays([n + 1, (ea.len() + eb.len()) / 2], threads);
        let (start_a, start_b) = start.split_at_mut(na);
        let (list_a, list_b) = list.split_at_mut(ea.len() / 2);
        let (off_ops, off_edges) = (na as u32, (ea.len() / 2) as u32);
        let (ra, rb) = if threads >= 2 {
            // The second half's operations go after the first half's, into room whose pages
            // both threads populate after their lists (half each: 122 K pages at a million
            // ranks), so the copy below, on one thread, only copies.
            sa.ops.reserve(nb);
            let (ra, rb) = std::thread::scope(|sc| {
                let ops = &sa.ops;
                let eb = &eb;
                let h = sc.spawn(move || {
                    let rb = csr_part(eb, nb, start_b, list_b, off_ops, off_edges);
                    ops.populate_room(na + nb / 2, n);
                    rb
                });
                let ra = csr_part(&ea, na, start_a, list_a, 0, 0);
                ops.populate_room(na, na + nb / 2);
                match h.join() {
                    Ok(rb) => (ra, rb),
                    Err(e) => std::panic::resume_unwind(e),
                }
            });
            sa.ops.note_populated(n);
            sa.ops.extend_from_slice(&sb.ops);
            (ra, rb)
        } else {
            sa.ops.extend_from_slice(&sb.ops);
            (
                csr_part(&ea, na, start_a, list_a, 0, 0),
                csr_part(&eb, nb, start_b, list_b, off_ops, off_edges),
            )
        };
        ra?;
        rb?;
        if keep_edges {
            sa.spare.put(ea);
            sa.spare.put(eb);
        } else {
            drop_in_background(ea);
            drop_in_background(eb);
        }
        drop_ops_in_background(sb.ops);
        sa.dep_start = start;
        sa.dep_list = list;
        Ok(sa)
    }
}

/// Build the dependency lists of `n` operations from their `edges` (flat pairs, indices local to
/// them, checked) into `start` (at least `n` entries; `start[i]` becomes where operation i's list
/// begins, and an entry `n`, if there is one, the end of the last) and `list` (one entry per
/// edge). The operations are numbered from `op_off` in the whole schedule and their lists from
/// `edge_off`: entries and errors carry whole-schedule numbers.
fn csr_part(
    edges: &[u32],
    n: usize,
    start: &mut [u32],
    list: &mut [u32],
    op_off: u32,
    edge_off: u32,
) -> Result<(), ScheduleError> {
    debug_assert!(start.len() >= n && list.len() * 2 == edges.len());
    // Per operation, its number of dependents (checking every edge on the way), summed:
    // `start[i]` is then where operation i's list ends.
    for e in edges.chunks_exact(2) {
        let (from, to) = (e[0], e[1]);
        let to_op = to & !IREQ_BIT;
        if from as usize >= n || to_op as usize >= n {
            return Err(ScheduleError::BadEdge {
                from: from.wrapping_add(op_off),
                to: to_op.wrapping_add(op_off),
            });
        }
        if from == to_op {
            return Err(ScheduleError::SelfDependency { op: from + op_off });
        }
        start[from as usize] += 1;
    }
    let mut sum = edge_off;
    for x in start.iter_mut() {
        sum += *x;
        *x = sum;
    }
    // Fill each list from its end, walking the edges backwards: the entries keep the
    // order the edges were added in, and `start[i]` ends up where list i begins.
    for e in edges.chunks_exact(2).rev() {
        let (from, to) = (e[0], e[1]);
        let f = &mut start[from as usize];
        *f -= 1;
        list[(*f - edge_off) as usize] = to + op_off;
    }
    Ok(())
}

/// Vectors above this size are dropped on a thread of their own by [`drop_in_background`].
const BACKGROUND_DROP_BYTES: usize = 64 << 20;

/// Drop `v` on a short-lived thread of its own when it is large (unmapping gigabytes of
/// memory costs a noticeable fraction of a second), here otherwise or if no thread can be
/// started.
pub(crate) fn drop_in_background<T: Send + 'static>(v: Vec<T>) {
    let bytes = v.capacity() * std::mem::size_of::<T>();
    drop_sized_in_background(v, bytes);
}

/// [`drop_in_background`] for an operation array.
fn drop_ops_in_background(v: Ops) {
    let bytes = v.capacity() * std::mem::size_of::<Op>();
    drop_sized_in_background(v, bytes);
}

/// Drop `v`, which holds `bytes` of memory, on a thread of its own if that is a lot.
fn drop_sized_in_background<T: Send + 'static>(v: T, bytes: usize) {
    if bytes < BACKGROUND_DROP_BYTES {
        return;
    }
    // On failure the closure, and with it `v`, is dropped here.
    let _ = std::thread::Builder::new()
        .name("chama-drop".into())
        .spawn(move || drop(v));
}
