//! The operation array of a schedule ([`Ops`]): a plain vector, or, once room for a large
//! schedule is asked for ([`Ops::reserve`]), an anonymous memory mapping whose pages are
//! populated in bulk as operations are added (the mechanism is
//! [`crate::mapped::MappedArray`]).
//!
//! A million-rank all-reduce has 42 M operations (1 GB): 246 K pages whose demand faults were
//! the largest part of generation's system time (a quarter of the command's page faults in
//! `ScheduleBuilder::push`). Populating them in steps (`madvise(MADV_POPULATE_WRITE)`) maps
//! the same pages for about 60 % of that cost. The policy here is [`BestEffort`]: a failed
//! populate only leaves the pages to demand faults, as a vector's would be, and a mapping the
//! system refuses leaves the operations on the heap: the memory is the same either way.

use crate::mapped::{BestEffort, MappedArray};
use crate::schedule::Op;

/// The operations of a schedule (dereferences to a slice).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Ops(MappedArray<Op, BestEffort>);

impl Ops {
    /// No operations, on the heap.
    pub fn new() -> Self {
        Ops(MappedArray::new())
    }

    /// Room for `extra` more operations. Room for at least 64 MiB (see [`BestEffort`]) moves
    /// the operations into a mapping of that room (address space only: pages are populated as
    /// operations are added); a full mapping is replaced by one half as large again. If the
    /// system refuses the mapping the operations stay on (or move to) the heap.
    pub fn reserve(&mut self, extra: usize) {
        let Ok(()) = self.0.reserve(extra);
    }

    /// Operations the array holds without growing.
    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }

    /// Whether the operations live in a mapping (see [`Ops::reserve`]).
    pub fn is_mapped(&self) -> bool {
        self.0.is_mapped()
    }

    /// Add one operation at the end.
    #[inline]
    pub fn push(&mut self, op: Op) {
        let Ok(()) = self.0.push(op);
    }

    /// Add copies of `ops` at the end.
    pub fn extend_from_slice(&mut self, ops: &[Op]) {
        let Ok(()) = self.0.extend_from_slice(ops);
    }

    /// Keep the first `n` operations (nothing if there are no more).
    pub fn truncate(&mut self, n: usize) {
        self.0.truncate(n);
    }

    /// Populate the pages of the room for operations `from..to` (beyond the last operation,
    /// inside the capacity) now, so that adding them later only copies; several threads may
    /// each take a part. Nothing on the heap. Follow with [`Ops::note_populated`].
    pub fn populate_room(&self, from: usize, to: usize) {
        let Ok(()) = self.0.populate_room(from, to);
    }

    /// The room up to operation `to` was populated (by [`Ops::populate_room`]).
    pub fn note_populated(&mut self, to: usize) {
        self.0.note_populated(to);
    }
}

crate::mapped::mapped_newtype!(Ops, Op);

#[cfg(test)]
mod tests {
    use super::*;

    use crate::mapped::tests::op;

    /// Room for 64 MiB moves the operations into a mapping (they move along); less stays
    /// on the heap (below).
    #[test]
    fn large_rooms_are_mapped() {
        let mut m = Ops::from(vec![op(0), op(1)]);
        let room = (64 << 20) / std::mem::size_of::<Op>();
        m.reserve(room - 3);
        assert!(!m.is_mapped());
        m.reserve(room);
        assert!(m.is_mapped() && m.capacity() >= room + 2);
        m.extend_from_slice(&[op(2), op(3)]);
        m.push(op(4));
        m.truncate(4);
        assert_eq!(*m, [op(0), op(1), op(2), op(3)]);
        assert_eq!(m.clone(), m);
    }

    /// Small rooms stay on the heap.
    #[test]
    fn small_rooms_stay_on_the_heap() {
        let mut m = Ops::from(vec![op(1)]);
        m.reserve(1000);
        m.push(op(2));
        assert!(!m.is_mapped());
        assert_eq!(*m, [op(1), op(2)]);
    }
}
