//! The smallest application: greets from ring 3 and exits with status 0.
#![no_std]
#![no_main]

use metal_ulib::{info, println};

#[unsafe(no_mangle)]
pub extern "C" fn umain(_arg: u64) -> u64 {
    let (pid, node, nodes) = info();
    println!("hello from ring 3: pid {pid} on node {node} of {nodes}");
    0
}
