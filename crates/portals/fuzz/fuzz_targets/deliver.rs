//! Header decoding + delivery on arbitrary bytes; see `portals::fuzzing::run`
//! for the invariants checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    portals::fuzzing::run(data);
});
