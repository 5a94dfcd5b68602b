//! Segmented simulation of schedules too large to hold: the ring all-reduce.
//!
//! A ring all-reduce on P ranks has 2(P−1) steps of 2P (or 3P) operations: at 65,536 ranks
//! 1.7·10¹⁰ operations (8.6·10⁹ messages), more than a
//! [`Schedule`](crate::schedule::Schedule) can index and far more than memory holds. Its steps are regular, so the simulator runs it a few steps at a
//! time: [`ring_segment`] builds a block of consecutive steps laid out exactly as the whole
//! ring would lay them out, and [`simulate_segment`] runs the block starting from the per-rank
//! state ([`Carry`]) the previous block left: each rank starts when its previous step's receive
//! (or reduction) completed, with its CPU, NIC and message order where they were. Full blocks
//! of a phase share one schedule, so memory stays at one block plus O(P).
//!
//! This is the same discrete-event simulation, not a formula: every message is injected,
//! matched and timed. The result is identical to simulating the whole ring at once (checked by
//! `tests/generators.rs` against [`crate::sim::simulate`] with noise and latency fluctuations)
//! because in a ring step of eager messages every resource use of a rank (its send's CPU and
//! NIC, its receive's NIC and CPU, its reduction) happens before the receive (or reduction)
//! that its next step waits for completes, and messages never cross steps (tags differ).
//! Rendezvous chunks (bytes/P > S) break that argument (a clear-to-send may arrive after the
//! next step began) and are refused.

use crate::error::SpecError;
use crate::gen::{ring_chunk, ring_ops_per_step, ring_segment, GenParams};
use crate::noise::Noise;
use crate::sim::{simulate_segment, Carry, Params, Prepared, Segment, SimOptions};

/// What a segmented run produces (per-operation state is not kept).
#[derive(Clone, Debug, Default)]
pub struct StreamOutput {
    /// Time the last operation completed (ns).
    pub completion: u64,
    /// Events processed.
    pub events: u64,
    /// Operations simulated (all segments).
    pub ops: u64,
    /// Operations completed.
    pub completed: u64,
    /// Receives never matched.
    pub unmatched_recvs: u64,
    /// Messages never received.
    pub unmatched_sends: u64,
    /// Segments simulated.
    pub segments: u64,
    /// Steps per full segment.
    pub steps_per_segment: u32,
    /// Operations in the largest segment.
    pub max_segment_ops: u64,
    /// Per rank: time its last operation completed.
    pub rank_end: Vec<u64>,
    /// Per rank: CPU time used (empty unless `record_busy`).
    pub rank_busy: Vec<u64>,
    /// Per class: receive wait time.
    pub class_wait: Vec<u64>,
    /// Per class: detour time injected into the class's CPU work.
    pub class_noise: Vec<u64>,
}

impl StreamOutput {
    /// Operations that never completed (the run stops after the first incomplete segment, so
    /// later segments are not counted).
    pub fn unfinished(&self) -> u64 {
        self.ops - self.completed
    }
}

/// Operations the whole ring all-reduce has.
pub fn ring_total_ops(gp: &GenParams) -> u64 {
    let steps = gp.ranks.saturating_sub(1) as u64;
    steps * (ring_ops_per_step(gp, 0) + ring_ops_per_step(gp, 1))
}

/// Simulate the ring all-reduce of `gp` in segments of about `segment_ops` operations.
pub fn simulate_ring_segmented(
    gp: &GenParams,
    p: &Params,
    noise: &Noise,
    opts: &SimOptions,
    segment_ops: u64,
) -> Result<StreamOutput, SpecError> {
    simulate_ring_segmented_with_progress(gp, p, noise, opts, segment_ops, &mut |_, _, _| {})
}

/// [`simulate_ring_segmented`], calling `progress(so_far, steps_done, steps_total)` after
/// every segment.
pub fn simulate_ring_segmented_with_progress(
    gp: &GenParams,
    p: &Params,
    noise: &Noise,
    opts: &SimOptions,
    segment_ops: u64,
    progress: &mut dyn FnMut(&StreamOutput, u64, u64),
) -> Result<StreamOutput, SpecError> {
    let ranks = gp.ranks;
    if ranks < 2 {
        return Err(SpecError(
            "a segmented ring needs at least 2 ranks".to_string(),
        ));
    }
    let chunk = ring_chunk(gp);
    if chunk > p.s {
        return Err(SpecError(format!(
            "the ring's {chunk}-byte chunks would use rendezvous (S = {}): a segmented run is exact only for eager chunks",
            p.s
        )));
    }
    let total_steps = ranks - 1;
    let per_step = ring_ops_per_step(gp, 0).max(ring_ops_per_step(gp, 1));
    let k = (segment_ops / per_step).clamp(1, total_steps as u64) as u32;
    let mut carry = Carry::new(ranks);
    let mut o = StreamOutput {
        steps_per_segment: k,
        rank_end: vec![0; ranks as usize],
        class_wait: vec![0; 256],
        class_noise: vec![0; 256],
        ..StreamOutput::default()
    };
    let mut op_base = 0u64;
    'phases: for phase in 0..2 {
        let (full, full_exits) = ring_segment(gp, phase, k)?;
        let full_prep = Prepared::new(&full);
        let mut done = 0u32;
        while done < total_steps {
            let n = k.min(total_steps - done);
            let tail;
            let seg = if n == k {
                Segment {
                    schedule: &full,
                    prepared: &full_prep,
                    exits: &full_exits,
                    op_base,
                }
            } else {
                let (s, e) = ring_segment(gp, phase, n)?;
                let pr = Prepared::new(&s);
                tail = (s, e, pr);
                Segment {
                    schedule: &tail.0,
                    prepared: &tail.2,
                    exits: &tail.1,
                    op_base,
                }
            };
            let out = simulate_segment(&seg, p, noise, opts, &mut carry);
            let len = seg.schedule.len() as u64;
            o.segments += 1;
            o.events += out.events;
            o.ops += len;
            o.max_segment_ops = o.max_segment_ops.max(len);
            o.completed += out.completed;
            o.unmatched_recvs += out.unmatched_recvs;
            o.unmatched_sends += out.unmatched_sends;
            for (a, b) in o.class_wait.iter_mut().zip(&out.class_wait) {
                *a += b;
            }
            for (a, b) in o.class_noise.iter_mut().zip(&out.class_noise) {
                *a += b;
            }
            let last = phase == 1 && done + n == total_steps;
            if last || out.unfinished() > 0 {
                // Every operation of a segment depends (through its rank's exit) on the
                // previous segment, so a rank's last completion is in the last segment.
                for (op, st) in seg.schedule.ops.iter().zip(&out.st) {
                    let r = op.rank as usize;
                    if st.end != u64::MAX && st.end > o.rank_end[r] {
                        o.rank_end[r] = st.end;
                    }
                }
            }
            op_base += len;
            done += n;
            progress(
                &o,
                (phase * total_steps + done) as u64,
                2 * total_steps as u64,
            );
            if out.unfinished() > 0 {
                break 'phases;
            }
        }
    }
    o.completion = o.rank_end.iter().copied().max().unwrap_or(0);
    if opts.record_busy {
        o.rank_busy = carry.busy;
    }
    Ok(o)
}
