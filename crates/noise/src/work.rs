//! The unit of work the samplers count: a short, dependent chain of integer arithmetic that stays
//! in registers (no memory traffic, so it measures CPU availability, not cache behaviour).

use crate::sys::now_ns;
use std::hint::black_box;

/// Perform one work quantum of `iterations` dependent multiply-xorshift steps.
#[inline(never)]
pub fn quantum(iterations: u32, seed: u64) -> u64 {
    let mut x = black_box(seed) | 1;
    for _ in 0..black_box(iterations) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
    }
    black_box(x)
}

/// A calibrated work quantum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Iterations of [`quantum`] per work quantum.
    pub iterations: u32,
    /// Time for one quantum plus the clock read that follows it, nanoseconds (the least of many
    /// measurements, i.e. the undisturbed cost).
    pub quantum_ns: f64,
}

/// Pick the iteration count so that one quantum (with its clock read) takes about `target_ns`.
/// Run on the CPU that will be sampled. Uses the minimum over repeated trials so that
/// interference during calibration does not inflate the result.
pub fn calibrate(target_ns: u64) -> Calibration {
    let target = target_ns.max(50) as f64;
    let measure = |iters: u32| -> f64 {
        let mut best = f64::INFINITY;
        for _ in 0..7 {
            let reps = 64u32;
            let t0 = now_ns();
            let mut acc = 0u64;
            for r in 0..reps {
                acc = acc.wrapping_add(quantum(iters, u64::from(r)));
                black_box(now_ns());
            }
            black_box(acc);
            let dt = (now_ns() - t0) as f64 / f64::from(reps);
            best = best.min(dt);
        }
        best
    };
    // Grow until one quantum is measurable, then scale to the target.
    let mut iters = 16u32;
    let mut t = measure(iters);
    while t < target / 4.0 && iters < (1 << 28) {
        iters *= 2;
        t = measure(iters);
    }
    let per_iter = t / f64::from(iters);
    let mut iterations = ((target / per_iter).round() as u32).max(1);
    // One refinement pass with the real count.
    let t2 = measure(iterations);
    if t2 > 0.0 {
        iterations = ((f64::from(iterations) * target / t2).round() as u32).max(1);
    }
    Calibration {
        iterations,
        quantum_ns: measure(iterations),
    }
}
