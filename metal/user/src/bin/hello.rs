//! The smallest application: greets from ring 3, asks the QK's memory
//! service for one more 2 MiB page and checks it, and exits with status 0.
#![no_std]
#![no_main]

use metal_ulib::{abi, errname, info, println, syscall};

const EXTRA: u64 = 0x6000_0000;

#[unsafe(no_mangle)]
pub extern "C" fn umain(_arg: u64) -> u64 {
    let (pid, node, nodes) = info();
    println!("hello from ring 3: pid {pid} on node {node} of {nodes}");
    let r = syscall(abi::MEM_MAP, 0, EXTRA, abi::PAGE, 0);
    if r < 0 {
        println!("hello: mem_map failed: {}", errname(r));
        return 1;
    }
    let page = EXTRA as *mut u64;
    let words = (abi::PAGE / 8) as usize;
    // SAFETY: the QK has just mapped [EXTRA, EXTRA + 2 MiB) for this process,
    // zero-filled; nothing else refers to it.
    let mem = unsafe { core::slice::from_raw_parts_mut(page, words) };
    let zeroed = mem.iter().all(|&w| w == 0);
    for (i, w) in mem.iter_mut().enumerate() {
        *w = i as u64 ^ 0xdead_beef;
    }
    let ok = mem
        .iter()
        .enumerate()
        .all(|(i, &w)| w == i as u64 ^ 0xdead_beef);
    println!("hello: memory service mapped 2 MiB at {EXTRA:#x}: zero-filled {zeroed}, write/read-back {ok}");
    if zeroed && ok {
        0
    } else {
        1
    }
}
