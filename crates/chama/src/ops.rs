//! The operation array of a schedule ([`Ops`]): a plain vector, or, once room for a large
//! schedule is asked for ([`Ops::reserve`]), an anonymous memory mapping whose pages are
//! populated in bulk as operations are added.
//!
//! A million-rank all-reduce has 42 M operations (1 GB): 246 K pages whose demand faults were
//! the largest part of generation's system time (a quarter of the command's page faults in
//! `ScheduleBuilder::push`). Populating them in steps (`madvise(MADV_POPULATE_WRITE)`, see
//! [`crate::states`]) maps the same pages for about 60 % of that cost. A failed populate only
//! leaves the pages to demand faults, as a vector's would be: the memory is the same either way.

use std::fmt;
use std::ops::{Deref, DerefMut};

use memmap2::{Advice, MmapMut, MmapOptions};
use zerocopy::{FromBytes, IntoBytes};

use crate::schedule::Op;

/// Bytes per operation.
const OP_BYTES: usize = std::mem::size_of::<Op>();

/// [`Ops::reserve`] asks for a mapping for room of at least this many bytes (smaller arrays
/// stay on the heap: a few page faults cost less than the system calls).
const MAP_FROM_BYTES: usize = 64 << 20;

/// Pages are populated in steps of at least this many bytes while operations are added.
const POPULATE_STEP: usize = 8 << 20;

/// The operations of a schedule (dereferences to a slice).
pub struct Ops(Repr);

enum Repr {
    /// On the heap.
    Heap(Vec<Op>),
    /// In an anonymous mapping: `len` operations, the first `populated` bytes' pages
    /// populated (or left to demand faults where populating failed).
    Mapped {
        map: MmapMut,
        len: usize,
        populated: usize,
    },
}

impl Ops {
    /// No operations, on the heap.
    pub fn new() -> Self {
        Ops(Repr::Heap(Vec::new()))
    }

    /// Room for `extra` more operations. Room for at least [`MAP_FROM_BYTES`] moves the
    /// operations into a mapping of that room (address space only: pages are populated as
    /// operations are added); if the system refuses the mapping they stay on the heap.
    pub fn reserve(&mut self, extra: usize) {
        let need = self.len().saturating_add(extra);
        match &mut self.0 {
            Repr::Heap(v) => {
                if need > v.capacity() && need.saturating_mul(OP_BYTES) >= MAP_FROM_BYTES {
                    if let Some(m) = Self::mapped_copy(v, need) {
                        *self = m;
                        return;
                    }
                }
                v.reserve(extra);
            }
            Repr::Mapped { map, .. } => {
                if need.saturating_mul(OP_BYTES) > map.len() {
                    self.remap(need);
                }
            }
        }
    }

    /// Operations the array holds without growing.
    pub fn capacity(&self) -> usize {
        match &self.0 {
            Repr::Heap(v) => v.capacity(),
            Repr::Mapped { map, .. } => map.len() / OP_BYTES,
        }
    }

    /// Whether the operations live in a mapping (see [`Ops::reserve`]).
    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Repr::Mapped { .. })
    }

    /// Add one operation at the end.
    #[inline]
    pub fn push(&mut self, op: Op) {
        match &mut self.0 {
            Repr::Heap(v) => v.push(op),
            Repr::Mapped {
                map,
                len,
                populated,
            } => {
                let end = (*len + 1) * OP_BYTES;
                if end <= *populated {
                    map[end - OP_BYTES..end].copy_from_slice(op.as_bytes());
                    *len += 1;
                } else {
                    self.push_slow(op);
                }
            }
        }
    }

    /// [`Ops::push`] past the populated pages: populate the next step (growing the mapping
    /// first when it is full), then add.
    #[cold]
    fn push_slow(&mut self, op: Op) {
        self.extend_from_slice(std::slice::from_ref(&op));
    }

    /// Add copies of `ops` at the end.
    pub fn extend_from_slice(&mut self, ops: &[Op]) {
        if ops.is_empty() {
            return;
        }
        self.reserve(ops.len());
        match &mut self.0 {
            Repr::Heap(v) => v.extend_from_slice(ops),
            Repr::Mapped {
                map,
                len,
                populated,
            } => {
                let (from, to) = (*len * OP_BYTES, (*len + ops.len()) * OP_BYTES);
                if to > *populated {
                    let end = to.max(*populated + POPULATE_STEP).min(map.len());
                    populate(map, *populated, end);
                    *populated = end;
                }
                map[from..to].copy_from_slice(ops.as_bytes());
                *len += ops.len();
            }
        }
    }

    /// Keep the first `n` operations (nothing if there are no more).
    pub fn truncate(&mut self, n: usize) {
        match &mut self.0 {
            Repr::Heap(v) => v.truncate(n),
            Repr::Mapped { len, .. } => *len = (*len).min(n),
        }
    }

    /// Populate the pages of the room for operations `from..to` (beyond the last operation,
    /// inside the capacity) now, so that adding them later only copies; several threads may
    /// each take a part. Nothing on the heap. Follow with [`Ops::note_populated`].
    pub fn populate_room(&self, from: usize, to: usize) {
        if let Repr::Mapped { map, .. } = &self.0 {
            let to = to.saturating_mul(OP_BYTES).min(map.len());
            populate(map, from.saturating_mul(OP_BYTES).min(to), to);
        }
    }

    /// The room up to operation `to` was populated (by [`Ops::populate_room`]).
    pub fn note_populated(&mut self, to: usize) {
        if let Repr::Mapped { map, populated, .. } = &mut self.0 {
            *populated = (*populated).max(to.saturating_mul(OP_BYTES).min(map.len()));
        }
    }

    /// `v`'s operations in a fresh mapping with room for `cap` (`None` if the system refuses
    /// the mapping).
    fn mapped_copy(v: &[Op], cap: usize) -> Option<Ops> {
        let bytes = cap.checked_mul(OP_BYTES)?.max(4096);
        let mut map = MmapOptions::new().len(bytes).map_anon().ok()?;
        let used = std::mem::size_of_val(v);
        populate(&map, 0, used);
        map[..used].copy_from_slice(v.as_bytes());
        Some(Ops(Repr::Mapped {
            map,
            len: v.len(),
            populated: used,
        }))
    }

    /// A full mapping replaced by a larger one (room for `need`, and at least half as much
    /// again as before), or by a vector if the system refuses it.
    #[cold]
    fn remap(&mut self, need: usize) {
        let cap = need.max(self.capacity().saturating_add(self.capacity() / 2));
        *self = match Self::mapped_copy(self, cap) {
            Some(m) => m,
            None => {
                let mut v = Vec::with_capacity(need);
                v.extend_from_slice(self);
                Ops(Repr::Heap(v))
            }
        };
    }
}

/// Populate the pages of bytes `from..to` of `map` for writing, in one system call. A failure
/// (a kernel without `MADV_POPULATE_WRITE`, or memory short) leaves them to demand faults.
fn populate(map: &MmapMut, from: usize, to: usize) {
    if to > from {
        // Only the cost of the faults depends on it (see the module's text).
        let _ = map.advise_range(Advice::PopulateWrite, from, to - from);
    }
}

impl Default for Ops {
    fn default() -> Self {
        Ops::new()
    }
}

impl From<Vec<Op>> for Ops {
    fn from(v: Vec<Op>) -> Self {
        Ops(Repr::Heap(v))
    }
}

impl Deref for Ops {
    type Target = [Op];
    #[inline]
    fn deref(&self) -> &[Op] {
        match &self.0 {
            Repr::Heap(v) => v,
            Repr::Mapped { map, len, .. } => {
                // A mapping is page-aligned and holds its `len` operations (see `push`,
                // `extend_from_slice`), so the cast cannot fail; an empty slice would only
                // hide a broken invariant.
                <[Op]>::ref_from_prefix_with_elems(&map[..], *len)
                    .map(|(s, _)| s)
                    .expect("a page-aligned mapping holds its operations")
            }
        }
    }
}

impl DerefMut for Ops {
    #[inline]
    fn deref_mut(&mut self) -> &mut [Op] {
        match &mut self.0 {
            Repr::Heap(v) => v,
            Repr::Mapped { map, len, .. } => <[Op]>::mut_from_prefix_with_elems(&mut map[..], *len)
                .map(|(s, _)| s)
                .expect("a page-aligned mapping holds its operations"),
        }
    }
}

impl Clone for Ops {
    /// A copy on the heap.
    fn clone(&self) -> Self {
        Ops(Repr::Heap(self.to_vec()))
    }
}

impl PartialEq for Ops {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Ops {}

impl fmt::Debug for Ops {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(i: usize) -> Op {
        Op {
            size: i as u64 * 3,
            rank: i as u32,
            peer: !(i as u32),
            tag: (i as u32).rotate_left(7),
            kind: (i % 3) as u8,
            class: (i % 5) as u8,
            cpu: (i % 7) as u8,
            nic: (i % 11) as u8,
        }
    }

    /// A mapped array keeps every operation through pushes, copies, growth past its room
    /// and truncation, the same as a vector fed the same way.
    #[test]
    fn mapped_ops_are_a_vector() {
        let mut m = Ops::new();
        let mut v: Vec<Op> = Vec::new();
        m.push(op(0));
        v.push(op(0));
        // A room of the mapping size: the one operation moves along.
        let room = MAP_FROM_BYTES / OP_BYTES;
        m.reserve(room);
        assert!(m.is_mapped());
        assert!(m.capacity() > room);
        let steps = POPULATE_STEP / OP_BYTES;
        for i in 1..3 * steps {
            m.push(op(i));
            v.push(op(i));
        }
        let more: Vec<Op> = (0..steps + 5).map(|i| op(i * 13)).collect();
        m.extend_from_slice(&more);
        v.extend_from_slice(&more);
        assert_eq!(*m, *v);
        // Past the room: a larger mapping with the same contents.
        while m.len() <= room + 10 {
            let i = m.len();
            m.push(op(i));
            v.push(op(i));
        }
        assert!(m.is_mapped());
        assert_eq!(*m, *v);
        m[5] = op(999);
        v[5] = op(999);
        m.truncate(room / 2);
        v.truncate(room / 2);
        assert_eq!(*m, *v);
        m.push(op(7));
        v.push(op(7));
        assert_eq!(*m, *v);
        let c = m.clone();
        assert!(!c.is_mapped());
        assert_eq!(c, m);
    }

    /// The room populated ahead (two parts, as two threads do it) takes the operations
    /// added afterwards.
    #[test]
    fn populated_room_takes_operations() {
        let mut m = Ops::new();
        let n = 2 * MAP_FROM_BYTES / OP_BYTES;
        m.reserve(n);
        for i in 0..1000 {
            m.push(op(i));
        }
        m.populate_room(1000, n / 2);
        m.populate_room(n / 2, n);
        m.note_populated(n);
        let rest: Vec<Op> = (1000..n).map(op).collect();
        m.extend_from_slice(&rest);
        assert_eq!(m.len(), n);
        assert!((0..n).step_by(4099).all(|i| m[i] == op(i)));
        assert_eq!(m[n - 1], op(n - 1));
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
