//! An application that tries PCT-only entry points; each must be refused
//! with EPERM and the application keeps running.
#![no_std]
#![no_main]

use metal_ulib::{abi, errname, println, syscall};

#[unsafe(no_mangle)]
pub extern "C" fn umain(_arg: u64) -> u64 {
    let mut refused = 0;
    for (name, nr) in [
        ("proc_create", abi::PROC_CREATE),
        ("sched_policy", abi::SCHED_POLICY),
        ("shutdown", abi::SHUTDOWN),
    ] {
        let r = syscall(nr, 0, 0, 0, 0);
        println!("pctcall: {name} returned {r}: {}", errname(r));
        if r == abi::EPERM {
            refused += 1;
        }
    }
    // mem_map on another process is also a PCT privilege.
    let r = syscall(abi::MEM_MAP, 1, abi::USER_BASE, abi::PAGE, 0);
    println!("pctcall: mem_map(pid 1) returned {r}: {}", errname(r));
    if r == abi::EPERM {
        refused += 1;
    }
    println!("pctcall: {refused} of 4 privileged calls refused; still running");
    if refused == 4 {
        0
    } else {
        1
    }
}
