//! An application that faults on purpose; the PCT must report it and the
//! node must go on. Argument 0 (default): read kernel memory at 1 MiB
//! (mapped supervisor-only: page fault). 1: execute the privileged `hlt`
//! in ring 3 (general protection fault). 2: divide by zero.
#![no_std]
#![no_main]

use metal_ulib::println;

#[unsafe(no_mangle)]
pub extern "C" fn umain(arg: u64) -> u64 {
    match arg {
        1 => {
            println!("fault: executing hlt in ring 3");
            // SAFETY: deliberately not safe: hlt is privileged, so this raises
            // #GP and the kernel ends this process.
            unsafe { core::arch::asm!("hlt") };
        }
        2 => {
            println!("fault: dividing by zero");
            let zero = core::hint::black_box(0u64);
            let r: u64;
            // SAFETY: deliberately not safe: div by zero raises #DE (asm so
            // the compiler's own check does not panic first).
            unsafe {
                core::arch::asm!("div {z}", z = in(reg) zero, inout("rax") 1u64 => r, inout("rdx") 0u64 => _)
            };
            println!("fault: got {r}");
        }
        _ => {
            println!("fault: reading kernel memory at 0x100000 from ring 3");
            let p = 0x10_0000 as *const u64;
            // SAFETY: deliberately not safe: this read must page-fault (the
            // page is supervisor-only) so the kernel ends this process.
            let v = unsafe { p.read_volatile() };
            println!("fault: read {v:#x}");
        }
    }
    println!("fault: still running: protection is broken");
    1
}
