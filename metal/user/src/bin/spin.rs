//! A compute-bound application for the round-robin policy: five steps of
//! busy work (`arg` million TSC ticks each, default 20), one line per step.
//! Two of them under round-robin interleave their lines; under
//! single-tasking they cannot.
#![no_std]
#![no_main]

use metal_ulib::{info, println, rdtsc};

#[unsafe(no_mangle)]
pub extern "C" fn umain(arg: u64) -> u64 {
    let (pid, _, _) = info();
    let step = if arg == 0 {
        20_000_000
    } else {
        arg * 1_000_000
    };
    for i in 0..5 {
        let end = rdtsc() + step;
        while rdtsc() < end {
            core::hint::spin_loop();
        }
        println!("spin: pid {pid} step {i}");
    }
    0
}
