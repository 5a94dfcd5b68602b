//! Fixed Time Quantum (FTQ) sampler: counts units of work done in each of
//! `samples` back-to-back quanta of `quantum` TSC ticks and prints the counts.
//! Any interruption of the application (a tick, a daemon) lowers the count of
//! the quantum it hits; periodic ones show up as lines in the spectrum.
//! Argument (from the PCT's `arg=`): number of samples (default 2000).
#![no_std]
#![no_main]

use core::fmt::Write;
use metal_ulib::{println, rdtsc, Console};

const MAX_SAMPLES: usize = 8192;
const QUANTUM_TSC: u64 = 250_000;
static mut COUNTS: [u32; MAX_SAMPLES] = [0; MAX_SAMPLES];

#[unsafe(no_mangle)]
pub extern "C" fn umain(arg: u64) -> u64 {
    let n = if arg == 0 {
        2000
    } else {
        (arg as usize).min(MAX_SAMPLES)
    };
    // SAFETY: single-threaded program; the only reference to COUNTS.
    let counts = unsafe { &mut *core::ptr::addr_of_mut!(COUNTS) };
    let mut end = rdtsc() + QUANTUM_TSC;
    for c in counts[..n].iter_mut() {
        let mut work = 0u32;
        while rdtsc() < end {
            work = work.wrapping_add(1);
            core::hint::black_box(work);
        }
        *c = work;
        end += QUANTUM_TSC;
    }
    println!("ftq: samples {n} quantum_tsc {QUANTUM_TSC}");
    for chunk in counts[..n].chunks(32) {
        let mut con = Console::new();
        let _ = write!(con, "ftq: counts");
        for c in chunk {
            let _ = write!(con, " {c}");
        }
        let _ = writeln!(con);
    }
    let (min, max) = counts[..n]
        .iter()
        .fold((u32::MAX, 0), |(a, b), &c| (a.min(c), b.max(c)));
    println!("ftq: done, min {min} max {max}");
    0
}
