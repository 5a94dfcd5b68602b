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

use std::collections::VecDeque;

use crate::noise::Noise;
use crate::schedule::{OpKind, Schedule, ANY, IREQ_BIT};

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

/// What to record beyond completion times.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimOptions {
    /// Keep per-operation noise (needed for the per-class absorbed/amplified analysis).
    pub record_noise: bool,
}

/// Marks a critical-path predecessor reached through CPU contention (not a dependency/message).
pub const PRED_RESOURCE: u32 = 1 << 31;
/// No predecessor.
pub const PRED_NONE: u32 = u32::MAX;

/// Result of one simulation.
#[derive(Clone, Debug, Default)]
pub struct SimOutput {
    /// Time the last operation completed (ns).
    pub completion: u64,
    /// Events processed.
    pub events: u64,
    /// Operations completed.
    pub completed: u64,
    /// Per op: time its dependencies were satisfied.
    pub ready: Vec<u64>,
    /// Per op: completion time.
    pub end: Vec<u64>,
    /// Per op: the predecessor that determined its timing ([`PRED_RESOURCE`] bit, [`PRED_NONE`]).
    pub pred: Vec<u32>,
    /// Per op: detour time inside its own CPU work (empty unless recorded).
    pub noise: Vec<u32>,
    /// Per rank: time spent in posted receives waiting for the message.
    pub rank_wait: Vec<u64>,
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
        self.end.len() as u64 - self.completed
    }

    /// Per rank: time its last operation completed.
    pub fn rank_end(&self, s: &Schedule) -> Vec<u64> {
        let mut v = vec![0u64; s.num_ranks as usize];
        for (op, &e) in self.end.iter().enumerate() {
            let r = s.rank[op] as usize;
            if e != u64::MAX && e > v[r] {
                v[r] = e;
            }
        }
        v
    }
}

/// Monotone priority queue keyed by time (radix heap): O(1) push, amortised O(log range) pop.
struct RadixHeap {
    last: u64,
    buckets: Vec<Vec<(u64, u64)>>,
    len: usize,
}

impl RadixHeap {
    fn new() -> Self {
        RadixHeap {
            last: 0,
            buckets: (0..65).map(|_| Vec::new()).collect(),
            len: 0,
        }
    }
    #[inline]
    fn bucket(&self, t: u64) -> usize {
        if t == self.last {
            0
        } else {
            64 - (t ^ self.last).leading_zeros() as usize
        }
    }
    #[inline]
    fn push(&mut self, t: u64, v: u64) {
        let b = self.bucket(t);
        self.buckets[b].push((t, v));
        self.len += 1;
    }
    /// Move every entry with the minimum time into `out` (payloads); returns that time.
    fn pop_batch(&mut self, out: &mut Vec<u64>) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        if self.buckets[0].is_empty() {
            let i = (1..65).find(|&i| !self.buckets[i].is_empty())?;
            let mut items = std::mem::take(&mut self.buckets[i]);
            self.last = items.iter().map(|x| x.0).min().unwrap_or(self.last);
            for &(t, v) in &items {
                let b = self.bucket(t);
                self.buckets[b].push((t, v));
            }
            items.clear();
            // Give the (now empty) bucket its allocation back.
            self.buckets[i] = items;
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

struct Sim<'a> {
    s: &'a Schedule,
    p: Params,
    noise: &'a Noise,
    noisy: bool,
    now: u64,
    heap: RadixHeap,
    fifo: VecDeque<u64>,
    // per op
    ready: Vec<u64>,
    end: Vec<u64>,
    /// Pending-dependency count until ready; then the matching-queue link / matched receive.
    link: Vec<u32>,
    pred: Vec<u32>,
    noise_op: Vec<u32>,
    // per rank (x cpu / x nic)
    cpu_free: Vec<u64>,
    cpu_last: Vec<u32>,
    nic_free: Vec<u64>,
    nicr_free: Vec<u64>,
    last_arr: Vec<u64>,
    prq_head: Vec<u32>,
    prq_tail: Vec<u32>,
    uq_head: Vec<u32>,
    uq_tail: Vec<u32>,
    rank_wait: Vec<u64>,
    class_wait: Vec<u64>,
    class_noise: Vec<u64>,
    events: u64,
    completed: u64,
}

/// Run one simulation of `s`.
pub fn simulate(s: &Schedule, p: &Params, noise: &Noise, opts: &SimOptions) -> SimOutput {
    let n = s.len();
    let pr = s.num_ranks as usize;
    let nc = s.num_cpus as usize;
    let nn = s.num_nics as usize;
    let mut link = vec![0u32; n];
    for &d in &s.dep_list {
        link[(d & !IREQ_BIT) as usize] += 1;
    }
    let mut sim = Sim {
        s,
        p: *p,
        noise,
        noisy: noise.has_detours(),
        now: 0,
        heap: RadixHeap::new(),
        fifo: VecDeque::with_capacity(1024),
        ready: vec![0; n],
        end: vec![u64::MAX; n],
        link,
        pred: vec![PRED_NONE; n],
        noise_op: if opts.record_noise {
            vec![0; n]
        } else {
            Vec::new()
        },
        cpu_free: vec![0; pr * nc],
        cpu_last: vec![NIL; pr * nc],
        nic_free: vec![0; pr * nn],
        nicr_free: vec![0; pr * nn],
        last_arr: vec![0; pr],
        prq_head: vec![NIL; pr],
        prq_tail: vec![NIL; pr],
        uq_head: vec![NIL; pr],
        uq_tail: vec![NIL; pr],
        rank_wait: vec![0; pr],
        class_wait: vec![0; 256],
        class_noise: vec![0; 256],
        events: 0,
        completed: 0,
    };
    for op in 0..n {
        if sim.link[op] == 0 {
            sim.fifo.push_back(EV_READY << 32 | op as u64);
        }
    }
    sim.run();
    sim.finish()
}

impl<'a> Sim<'a> {
    fn run(&mut self) {
        let mut batch: Vec<u64> = Vec::with_capacity(1024);
        loop {
            while let Some(ev) = self.fifo.pop_front() {
                self.handle(ev);
            }
            match self.heap.pop_batch(&mut batch) {
                None => break,
                Some(t) => {
                    self.now = t;
                    // Deterministic order among events due at the same instant.
                    batch.sort_unstable();
                    let evs = std::mem::take(&mut batch);
                    for &ev in &evs {
                        self.handle(ev);
                    }
                    batch = evs;
                    batch.clear();
                }
            }
        }
    }

    #[inline]
    fn schedule(&mut self, t: u64, ev: u64) {
        if t == self.now {
            self.fifo.push_back(ev);
        } else {
            self.heap.push(t, ev);
        }
    }

    #[inline]
    fn work(&mut self, op: usize, rank: u32, start: u64, w: u64) -> u64 {
        if !self.noisy {
            return start + w;
        }
        let e = self.noise.finish(rank, start, w);
        let extra = e - start - w;
        if extra > 0 {
            self.class_noise[self.s.class[op] as usize] += extra;
            if !self.noise_op.is_empty() {
                self.noise_op[op] =
                    self.noise_op[op].saturating_add(extra.min(u32::MAX as u64) as u32);
            }
        }
        e
    }

    /// Satisfy dependents of `op` at time `t`: `irequires` edges if `ireq`, `requires` if `req`.
    #[inline]
    fn release(&mut self, op: usize, t: u64, ireq: bool, req: bool) {
        let s = self.s;
        let (a, b) = (s.dep_start[op] as usize, s.dep_start[op + 1] as usize);
        for k in a..b {
            let d = s.dep_list[k];
            let is_ireq = d & IREQ_BIT != 0;
            if (is_ireq && !ireq) || (!is_ireq && !req) {
                continue;
            }
            let d = (d & !IREQ_BIT) as usize;
            if t >= self.ready[d] {
                self.ready[d] = t;
                self.pred[d] = op as u32;
            }
            self.link[d] -= 1;
            if self.link[d] == 0 {
                let rt = self.ready[d];
                self.schedule(rt, EV_READY << 32 | d as u64);
            }
        }
    }

    #[inline]
    fn complete(&mut self, op: usize, t: u64) {
        self.end[op] = t;
        self.completed += 1;
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
        let now = self.now;
        let rank = s.rank[op];
        let ci = rank as usize * s.num_cpus as usize + s.cpu[op] as usize;
        match s.op_kind(op) {
            OpKind::Calc => {
                let start = now.max(self.cpu_free[ci]);
                if start > now {
                    self.pred[op] = self.cpu_last[ci] | PRED_RESOURCE;
                }
                let e = self.work(op, rank, start, s.size[op]);
                self.cpu_free[ci] = e;
                self.cpu_last[ci] = op as u32;
                self.release(op, start, true, false);
                self.complete(op, e);
            }
            OpKind::Send => {
                let ni = rank as usize * s.num_nics as usize + s.nic[op] as usize;
                let start = now.max(self.cpu_free[ci]).max(self.nic_free[ni]);
                if start > now {
                    self.pred[op] = self.cpu_last[ci] | PRED_RESOURCE;
                }
                let z = s.size[op];
                let eager = z <= self.p.s;
                let w = self.p.o + if eager { self.p.ob(z) } else { 0 };
                let e = self.work(op, rank, start, w);
                self.cpu_free[ci] = e;
                self.cpu_last[ci] = op as u32;
                let wire = if eager { self.p.gb(z) } else { 0 };
                self.nic_free[ni] = start + self.p.g + wire;
                let mut arr = e + self.p.l + wire + self.noise.latency(op as u32, 0);
                let r = rank as usize;
                arr = arr.max(self.last_arr[r]);
                self.last_arr[r] = arr;
                self.schedule(arr, EV_ARRIVE << 32 | op as u64);
                self.release(op, start, true, false);
                if eager {
                    self.complete(op, e);
                }
            }
            OpKind::Recv => {
                // Until it completes, `end` holds the posting time.
                self.end[op] = now;
                self.release(op, now, true, false);
                let r = rank as usize;
                let (src, tag) = (s.peer[op], s.tag[op]);
                let mut prev = NIL;
                let mut cur = self.uq_head[r];
                while cur != NIL {
                    let c = cur as usize;
                    if (src == ANY || src == s.rank[c]) && (tag == ANY || tag == s.tag[c]) {
                        let next = self.link[c];
                        if prev == NIL {
                            self.uq_head[r] = next;
                        } else {
                            self.link[prev as usize] = next;
                        }
                        if self.uq_tail[r] == cur {
                            self.uq_tail[r] = prev;
                        }
                        self.matched(op, c);
                        return;
                    }
                    prev = cur;
                    cur = self.link[c];
                }
                self.link[op] = NIL;
                if self.prq_tail[r] == NIL {
                    self.prq_head[r] = op as u32;
                } else {
                    self.link[self.prq_tail[r] as usize] = op as u32;
                }
                self.prq_tail[r] = op as u32;
            }
        }
    }

    fn on_arrive(&mut self, sop: usize) {
        let s = self.s;
        let dest = s.peer[sop] as usize;
        let (src, tag) = (s.rank[sop], s.tag[sop]);
        let mut prev = NIL;
        let mut cur = self.prq_head[dest];
        while cur != NIL {
            let c = cur as usize;
            let (rs, rt) = (s.peer[c], s.tag[c]);
            if (rs == ANY || rs == src) && (rt == ANY || rt == tag) {
                let next = self.link[c];
                if prev == NIL {
                    self.prq_head[dest] = next;
                } else {
                    self.link[prev as usize] = next;
                }
                if self.prq_tail[dest] == cur {
                    self.prq_tail[dest] = prev;
                }
                self.matched(c, sop);
                return;
            }
            prev = cur;
            cur = self.link[c];
        }
        self.link[sop] = NIL;
        if self.uq_tail[dest] == NIL {
            self.uq_head[dest] = sop as u32;
        } else {
            self.link[self.uq_tail[dest] as usize] = sop as u32;
        }
        self.uq_tail[dest] = sop as u32;
    }

    /// Receive `r` and message `sop` meet at `now`.
    fn matched(&mut self, r: usize, sop: usize) {
        let s = self.s;
        let now = self.now;
        let rank = s.rank[r];
        let posted = self.end[r];
        let wait = now - posted;
        self.rank_wait[rank as usize] += wait;
        self.class_wait[s.class[r] as usize] += wait;
        if now > posted {
            self.pred[r] = sop as u32;
        }
        let ci = rank as usize * s.num_cpus as usize + s.cpu[r] as usize;
        let ni = rank as usize * s.num_nics as usize + s.nic[r] as usize;
        let start = now.max(self.cpu_free[ci]).max(self.nicr_free[ni]);
        if start > now {
            self.pred[r] = self.cpu_last[ci] | PRED_RESOURCE;
        }
        let z = s.size[sop];
        self.nicr_free[ni] = start + self.p.g;
        self.cpu_last[ci] = r as u32;
        if z <= self.p.s {
            let e = self.work(r, rank, start, self.p.o + self.p.ob(z));
            self.cpu_free[ci] = e;
            self.complete(r, e);
        } else {
            let e = self.work(r, rank, start, self.p.o);
            self.cpu_free[ci] = e;
            self.link[sop] = r as u32;
            let t = e + self.p.l + self.noise.latency(sop as u32, 1);
            self.schedule(t, EV_CTS << 32 | sop as u64);
        }
    }

    /// Clear-to-send reached the sender of rendezvous message `sop`.
    fn on_cts(&mut self, sop: usize) {
        let s = self.s;
        let now = self.now;
        let rank = s.rank[sop];
        let ci = rank as usize * s.num_cpus as usize + s.cpu[sop] as usize;
        let ni = rank as usize * s.num_nics as usize + s.nic[sop] as usize;
        let start = now.max(self.cpu_free[ci]).max(self.nic_free[ni]);
        self.pred[sop] = if start > now {
            self.cpu_last[ci] | PRED_RESOURCE
        } else {
            self.link[sop]
        };
        let z = s.size[sop];
        let e = self.work(sop, rank, start, self.p.o + self.p.ob(z));
        self.cpu_free[ci] = e;
        self.cpu_last[ci] = sop as u32;
        self.nic_free[ni] = start + self.p.g + self.p.gb(z);
        let r = rank as usize;
        let arr =
            (e + self.p.l + self.p.gb(z) + self.noise.latency(sop as u32, 2)).max(self.last_arr[r]);
        self.last_arr[r] = arr;
        self.complete(sop, e);
        self.schedule(arr, EV_DATA << 32 | sop as u64);
    }

    /// Rendezvous data reached the receiver.
    fn on_data(&mut self, sop: usize) {
        let s = self.s;
        let now = self.now;
        let r = self.link[sop] as usize;
        let rank = s.rank[r];
        let ci = rank as usize * s.num_cpus as usize + s.cpu[r] as usize;
        let ni = rank as usize * s.num_nics as usize + s.nic[r] as usize;
        let start = now.max(self.cpu_free[ci]).max(self.nicr_free[ni]);
        self.pred[r] = if start > now {
            self.cpu_last[ci] | PRED_RESOURCE
        } else {
            sop as u32
        };
        let z = s.size[sop];
        let e = self.work(r, rank, start, self.p.o + self.p.ob(z));
        self.cpu_free[ci] = e;
        self.cpu_last[ci] = r as u32;
        self.nicr_free[ni] = start + self.p.g;
        self.complete(r, e);
    }

    fn finish(mut self) -> SimOutput {
        let mut unmatched_recvs = 0;
        let mut unmatched_sends = 0;
        for r in 0..self.s.num_ranks as usize {
            let mut c = self.prq_head[r];
            while c != NIL {
                unmatched_recvs += 1;
                // It holds its posting time; it never completed.
                self.end[c as usize] = u64::MAX;
                c = self.link[c as usize];
            }
            let mut c = self.uq_head[r];
            while c != NIL {
                unmatched_sends += 1;
                c = self.link[c as usize];
            }
        }
        let completion = self
            .end
            .iter()
            .filter(|&&e| e != u64::MAX)
            .max()
            .copied()
            .unwrap_or(0);
        SimOutput {
            completion,
            events: self.events,
            completed: self.completed,
            ready: self.ready,
            end: self.end,
            pred: self.pred,
            noise: self.noise_op,
            rank_wait: self.rank_wait,
            class_wait: self.class_wait,
            class_noise: self.class_noise,
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
    let mut cp = CriticalPath::default();
    let Some((mut cur, _)) = out
        .end
        .iter()
        .enumerate()
        .filter(|(_, &e)| e != u64::MAX)
        .max_by_key(|(i, &e)| (e, std::cmp::Reverse(*i)))
    else {
        return cp;
    };
    let mut ranks = std::collections::HashSet::new();
    let mut steps = 0usize;
    let mut via = "end";
    loop {
        steps += 1;
        cp.length += 1;
        ranks.insert(s.rank[cur]);
        if s.op_kind(cur) == OpKind::Calc {
            cp.calc_ns += s.size[cur];
        }
        if !out.noise.is_empty() {
            cp.noise_ns += out.noise[cur] as u64;
        }
        if cp.tail.len() < limit {
            cp.tail.push(PathStep {
                op: cur as u32,
                rank: s.rank[cur],
                kind: s.op_kind(cur),
                class: s.class_names[s.class[cur] as usize].clone(),
                end: out.end[cur],
                via,
            });
        }
        let p = out.pred[cur];
        if p == PRED_NONE || steps > s.len() {
            break;
        }
        let res = p & PRED_RESOURCE != 0;
        let pi = (p & !PRED_RESOURCE) as usize;
        if pi >= s.len() || out.end[pi] == u64::MAX || out.end[pi] > out.end[cur] {
            break;
        }
        if res {
            cp.cpu_contention += 1;
            via = "cpu";
        } else if s.rank[pi] != s.rank[cur] {
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
