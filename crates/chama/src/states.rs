//! The array of operation states of a run ([`States`]): a plain vector, or, for the big arrays
//! of a large run, an anonymous memory mapping whose pages are populated in bulk (the
//! mechanism is [`crate::mapped::MappedArray`]).
//!
//! A million-rank all-reduce's 1.34 GB of states are 330 K fresh pages; populating them in
//! bulk costs about 60 % of their demand faults. The policy here is [`Strict`]: a mapping the
//! kernel refuses, or pages it cannot populate, are a [`MemoryError`] (a run would fail later
//! for want of that memory anyway), except on kernels without `MADV_POPULATE_WRITE`, whose
//! pages are left to demand faults.

use crate::error::MemoryError;
use crate::mapped::{MapError, MappedArray, Strict};
use crate::sim::{OpState, FRESH_STATE};

/// The states of a run's operations (dereferences to a slice).
#[derive(Clone, Default, PartialEq)]
pub struct States(MappedArray<OpState, Strict>);

impl States {
    /// No states, on the heap.
    pub fn new() -> Self {
        States(MappedArray::new())
    }

    /// No states yet, in a mapping with room for `cap` states (address space only: no page is
    /// touched until [`States::grow`] populates it). The mapping is replaced by a larger one
    /// if [`States::grow`] goes beyond `cap`.
    pub fn mapped(cap: usize) -> Result<Self, MemoryError> {
        MappedArray::mapped(cap).map(States).map_err(memory_error)
    }

    /// Grow to `n` states (nothing if there are that many already). The new states of a
    /// heap array are fresh (completion `u64::MAX`, no dependents); those of a mapping are
    /// zeroed memory whose pages are populated here in bulk (an error if the kernel cannot
    /// provide them; the states are then left as they were). Either way they are meant for
    /// the run's initial fill, which writes every state (see
    /// [`crate::sim::simulate_from_template`]).
    pub fn grow(&mut self, n: usize) -> Result<(), MemoryError> {
        self.0.grow(n, FRESH_STATE).map_err(memory_error)
    }

    /// Whether the states live in a mapping (see [`States::mapped`]).
    pub fn is_mapped(&self) -> bool {
        self.0.is_mapped()
    }
}

/// The memory error of the operation states.
fn memory_error(e: MapError) -> MemoryError {
    MemoryError {
        what: "operation states",
        bytes: e.bytes,
        source: e.source,
    }
}

crate::mapped::mapped_newtype!(States, OpState);

#[cfg(test)]
mod tests {
    use super::*;

    use crate::mapped::tests::state as sample;

    #[test]
    fn heap_states_grow_with_fresh_states() {
        let mut h = States::from(vec![sample(1)]);
        h.grow(3).expect("grow");
        assert_eq!(&h[..], &[sample(1), FRESH_STATE, FRESH_STATE]);
        h.grow(2).expect("grow");
        assert_eq!(h.len(), 3);
        assert_eq!(States::default(), States::new());
    }

    #[test]
    fn states_beyond_the_address_space_are_an_error() {
        // 2^58 states of 32 bytes overflow the size; 2^42 (128 TiB) exceed the address space.
        let e = States::mapped(1 << 58).expect_err("error");
        assert!(e.to_string().contains("operation states"), "{e}");
        let e = States::mapped(1 << 42).expect_err("error");
        assert!(e.to_string().contains("GiB"), "{e}");
        let mut m = States::mapped(1).expect("map");
        assert!(m.grow(1 << 42).is_err());
        // The failed growth left the states as they were.
        assert!(m.is_empty());
    }
}
