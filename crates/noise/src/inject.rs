//! The built-in interferer: a thread pinned to a sampled CPU that wakes at absolute times
//! `t0 + k·period` and burns a fixed amount of time, a known periodic noise source.

use crate::error::Result;
use crate::sys::{self, now_ns};
use crate::units::InjectSpec;

/// Pin to `cpu` (and take the samplers' nice value, so it competes with them on equal terms),
/// then wake every period from `t0` until `t_end`, each time spinning for the
/// burn time measured from the actual wake-up. Returns the number of wake-ups. A wake-up that
/// comes so late that the next one is already due is not made up: the next wake-up is the next
/// future multiple of the period, as a real periodic source would behave.
pub fn run_interferer(
    cpu: usize,
    spec: InjectSpec,
    nice: Option<i32>,
    t0: u64,
    t_end: u64,
) -> Result<u64> {
    sys::pin_to(cpu)?;
    if let Some(n) = nice {
        sys::set_thread_nice(n)?;
    }
    let period = spec.period_ns().max(1);
    let mut k = 1u64;
    let mut wakeups = 0;
    let stop = crate::interrupt::flag();
    loop {
        let wake = t0 + k * period;
        if wake + spec.burn_ns > t_end || stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        sys::sleep_until(wake);
        let began = now_ns();
        while now_ns() - began < spec.burn_ns {
            std::hint::spin_loop();
        }
        wakeups += 1;
        let now = now_ns();
        k = (k + 1).max((now - t0) / period + 1);
    }
    Ok(wakeups)
}
