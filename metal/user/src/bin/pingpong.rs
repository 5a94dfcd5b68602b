//! placeholder
#![no_std]
#![no_main]

use metal_ulib as _;

#[unsafe(no_mangle)]
pub extern "C" fn umain(_arg: u64) -> u64 {
    0
}
