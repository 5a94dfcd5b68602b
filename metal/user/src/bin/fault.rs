//! An application that faults: it reads an address outside its user region
//! (the kernel's memory, mapped supervisor-only). The PCT must report it.
#![no_std]
#![no_main]

use metal_ulib::println;

#[unsafe(no_mangle)]
pub extern "C" fn umain(_arg: u64) -> u64 {
    println!("fault: reading kernel memory at 0x100000 from ring 3");
    let p = 0x10_0000 as *const u64;
    // SAFETY: deliberately not safe: this read must page-fault (the page is
    // supervisor-only) so the kernel ends this process.
    let v = unsafe { p.read_volatile() };
    println!("fault: read {v:#x}: protection is broken");
    1
}
