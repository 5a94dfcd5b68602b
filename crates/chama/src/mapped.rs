//! An array that is either a plain vector or an anonymous memory mapping whose pages are
//! populated in bulk ([`MappedArray`]): the one mechanism behind the operation states
//! ([`crate::states::States`]) and the operation array ([`crate::ops::Ops`]).
//!
//! A fresh page costs a page fault on its first touch (about 3 µs on the VM this was measured
//! on). Asking the kernel to populate a whole range at once (`madvise(MADV_POPULATE_WRITE)`,
//! Linux 5.14 and later) maps the same pages for about 60 % of that (0.46–0.48 s against
//! 0.74–0.81 s per GiB, measured with a small C program on this machine). The elements are read
//! and written in place through `zerocopy`, so no `unsafe` is needed.
//!
//! What a failure means differs between the users of the array, so it is a type parameter
//! ([`Policy`]): [`Strict`] makes a refused mapping or a failed populate an error, except on
//! kernels that do not know the advice; [`BestEffort`] leaves the pages to demand faults and a
//! refused mapping to a vector, since the memory is the same either way.

use std::convert::Infallible;
use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use memmap2::{Advice, MmapMut, MmapOptions};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Pages are populated in steps of at least this many bytes while the array grows (fewer
/// system calls).
pub const POPULATE_STEP: usize = 8 << 20;

/// `EINVAL`: `madvise` does not know `MADV_POPULATE_WRITE` (Linux before 5.14).
const EINVAL: i32 = 22;

/// Memory the kernel did not give: a mapping refused, or its pages not populated.
#[derive(Debug)]
pub struct MapError {
    /// Bytes asked for (`usize::MAX` for a size beyond the address space).
    pub bytes: usize,
    /// Cause.
    pub source: std::io::Error,
}

/// What a [`MappedArray`] does when the kernel refuses memory.
pub trait Policy {
    /// The error of a growth (`Infallible` when every failure has a fallback).
    type Error;
    /// Heap arrays whose room reaches this many bytes move into a mapping in
    /// [`MappedArray::reserve`] (`None`: they stay on the heap).
    const MAP_FROM_BYTES: Option<usize>;
    /// A populate failed (`e`, not `EINVAL`): an error, or `Ok` to leave the pages to demand
    /// faults.
    fn populate_failed(e: MapError) -> Result<(), Self::Error>;
    /// A mapping was refused (`e`): an error, or `Ok` to keep or move the elements on the heap.
    fn map_refused(e: MapError) -> Result<(), Self::Error>;
}

/// Every refusal is an error, except a kernel that does not know `MADV_POPULATE_WRITE`
/// (its pages are left to demand faults). Heap arrays stay on the heap.
#[derive(Debug)]
pub enum Strict {}

impl Policy for Strict {
    type Error = MapError;
    const MAP_FROM_BYTES: Option<usize> = None;
    fn populate_failed(e: MapError) -> Result<(), MapError> {
        Err(e)
    }
    fn map_refused(e: MapError) -> Result<(), MapError> {
        Err(e)
    }
}

/// Nothing fails: a failed populate leaves the pages to demand faults, a refused mapping
/// leaves the elements on the heap. Heap arrays with room for 64 MiB or more move into a
/// mapping (smaller ones stay: a few page faults cost less than the system calls).
#[derive(Debug)]
pub enum BestEffort {}

impl Policy for BestEffort {
    type Error = Infallible;
    const MAP_FROM_BYTES: Option<usize> = Some(64 << 20);
    fn populate_failed(_: MapError) -> Result<(), Infallible> {
        Ok(())
    }
    fn map_refused(_: MapError) -> Result<(), Infallible> {
        Ok(())
    }
}

/// Elements of type `T` on the heap or in an anonymous mapping (dereferences to a slice),
/// with the failure policy `P`.
pub struct MappedArray<T, P> {
    repr: Repr<T>,
    policy: PhantomData<P>,
}

enum Repr<T> {
    /// On the heap.
    Heap(Vec<T>),
    /// In an anonymous mapping: `len` elements; the first `populated` bytes' pages populated
    /// (or left to demand faults where the policy let populating fail); bytes from `dirty`
    /// on never written since the mapping was made (still zero).
    Mapped {
        map: MmapMut,
        len: usize,
        populated: usize,
        dirty: usize,
    },
}

impl<T, P> MappedArray<T, P>
where
    T: FromBytes + IntoBytes + KnownLayout + Immutable + Clone,
    P: Policy,
{
    /// Bytes per element (zero-sized elements are refused at compile time: a mapping of them
    /// would have no capacity to speak of).
    const SIZE: usize = {
        assert!(
            std::mem::size_of::<T>() > 0,
            "MappedArray of zero-sized elements"
        );
        std::mem::size_of::<T>()
    };

    /// No elements, on the heap.
    pub fn new() -> Self {
        Self::from(Vec::new())
    }

    /// No elements yet, in a mapping with room for `cap` (address space only: no page is
    /// touched until the array grows into it). Growing beyond `cap` replaces the mapping by a
    /// larger one.
    pub fn mapped(cap: usize) -> Result<Self, MapError> {
        Ok(Self::in_mapping(Self::map_anon(cap)?))
    }

    /// Whether the elements live in a mapping.
    pub fn is_mapped(&self) -> bool {
        matches!(self.repr, Repr::Mapped { .. })
    }

    /// Elements the array holds without growing.
    pub fn capacity(&self) -> usize {
        match &self.repr {
            Repr::Heap(v) => v.capacity(),
            Repr::Mapped { map, .. } => map.len() / Self::SIZE,
        }
    }

    /// Room for `extra` more elements. A mapping too small is replaced by a larger one (room
    /// for at least half as much again); a heap array moves into a mapping if its room
    /// reaches [`Policy::MAP_FROM_BYTES`]. A refused mapping is the policy's error, or leaves
    /// (or moves) the elements on the heap.
    pub fn reserve(&mut self, extra: usize) -> Result<(), P::Error> {
        let need = self.len().saturating_add(extra);
        if need <= self.capacity() {
            return Ok(());
        }
        let (cap, to_map) = match &self.repr {
            Repr::Heap(_) => (
                need,
                P::MAP_FROM_BYTES
                    .is_some_and(|from| need.checked_mul(Self::SIZE).is_none_or(|b| b >= from)),
            ),
            Repr::Mapped { .. } => (need.max(self.capacity().saturating_mul(3) / 2), true),
        };
        if to_map && self.remap(cap)? {
            return Ok(());
        }
        match &mut self.repr {
            Repr::Heap(v) => v.reserve(extra),
            Repr::Mapped { .. } => {
                let mut v = Vec::with_capacity(need);
                v.extend_from_slice(self);
                *self = Self::from(v);
            }
        }
        Ok(())
    }

    /// Grow to `n` elements (nothing if there are that many already). The new elements of a
    /// heap array are `fill`; those of a mapping are zeroed memory, whose pages are
    /// populated here in bulk. A failed growth leaves the array as it was.
    pub fn grow(&mut self, n: usize, fill: T) -> Result<(), P::Error> {
        if n <= self.len() {
            return Ok(());
        }
        if let Repr::Heap(v) = &mut self.repr {
            v.resize(n, fill);
            return Ok(());
        }
        self.reserve(n - self.len())?;
        self.populate_to(n)?;
        match &mut self.repr {
            Repr::Heap(v) => v.resize(n, fill),
            Repr::Mapped {
                map, len, dirty, ..
            } => {
                let (from, to) = (*len * Self::SIZE, n * Self::SIZE);
                if *dirty > from {
                    // Elements dropped by `truncate` left their bytes behind.
                    map[from..to.min(*dirty)].fill(0);
                }
                *len = n;
            }
        }
        Ok(())
    }

    /// Add one element at the end.
    #[inline]
    pub fn push(&mut self, x: T) -> Result<(), P::Error> {
        match &mut self.repr {
            Repr::Heap(v) => {
                v.push(x);
                Ok(())
            }
            Repr::Mapped {
                map,
                len,
                populated,
                ..
            } => {
                let end = (*len + 1) * Self::SIZE;
                if end <= *populated {
                    map[end - Self::SIZE..end].copy_from_slice(x.as_bytes());
                    *len += 1;
                    Ok(())
                } else {
                    self.push_slow(x)
                }
            }
        }
    }

    /// [`MappedArray::push`] past the populated pages: populate the next step (growing the
    /// mapping first when it is full), then add.
    #[cold]
    fn push_slow(&mut self, x: T) -> Result<(), P::Error> {
        self.extend_from_slice(std::slice::from_ref(&x))
    }

    /// Add copies of `xs` at the end.
    pub fn extend_from_slice(&mut self, xs: &[T]) -> Result<(), P::Error> {
        if xs.is_empty() {
            return Ok(());
        }
        self.reserve(xs.len())?;
        let n = self.len() + xs.len();
        self.populate_to(n)?;
        match &mut self.repr {
            Repr::Heap(v) => v.extend_from_slice(xs),
            Repr::Mapped { map, len, .. } => {
                map[*len * Self::SIZE..n * Self::SIZE].copy_from_slice(xs.as_bytes());
                *len = n;
            }
        }
        Ok(())
    }

    /// Keep the first `n` elements (nothing if there are no more).
    pub fn truncate(&mut self, n: usize) {
        match &mut self.repr {
            Repr::Heap(v) => v.truncate(n),
            Repr::Mapped { len, dirty, .. } => {
                *dirty = (*dirty).max(*len * Self::SIZE);
                *len = (*len).min(n);
            }
        }
    }

    /// Populate the pages of the room for elements `from..to` (beyond the last element,
    /// inside the capacity) now, so that adding them later only copies; several threads may
    /// each take a part. Nothing on the heap. Follow with [`MappedArray::note_populated`].
    pub fn populate_room(&self, from: usize, to: usize) -> Result<(), P::Error> {
        match &self.repr {
            Repr::Mapped { map, .. } => {
                let to = to.saturating_mul(Self::SIZE).min(map.len());
                populate::<P>(map, from.saturating_mul(Self::SIZE).min(to), to)
            }
            Repr::Heap(_) => Ok(()),
        }
    }

    /// The room up to element `to` was populated (by [`MappedArray::populate_room`]).
    pub fn note_populated(&mut self, to: usize) {
        if let Repr::Mapped { map, populated, .. } = &mut self.repr {
            *populated = (*populated).max(to.saturating_mul(Self::SIZE).min(map.len()));
        }
    }

    /// Make sure the pages of the first `n` elements (`n` within the capacity) are
    /// populated, populating at least [`POPULATE_STEP`] bytes at a time.
    fn populate_to(&mut self, n: usize) -> Result<(), P::Error> {
        if let Repr::Mapped { map, populated, .. } = &mut self.repr {
            let need = n * Self::SIZE;
            if need > *populated {
                let end = need.max(*populated + POPULATE_STEP).min(map.len());
                populate::<P>(map, *populated, end)?;
                *populated = end;
            }
        }
        Ok(())
    }

    /// Move the elements into a fresh mapping with room for `cap` (at least their number),
    /// their pages populated: whether it was done (`false`: the policy let a refused mapping
    /// pass). On a refusal the array is left as it was.
    fn remap(&mut self, cap: usize) -> Result<bool, P::Error> {
        let mut map = match Self::map_anon(cap.max(self.len())) {
            Ok(m) => m,
            Err(e) => {
                P::map_refused(e)?;
                return Ok(false);
            }
        };
        let used = self.len() * Self::SIZE;
        populate::<P>(&map, 0, used)?;
        map[..used].copy_from_slice(self.as_bytes());
        let len = self.len();
        *self = Self::in_mapping(map);
        if let Repr::Mapped {
            len: l, populated, ..
        } = &mut self.repr
        {
            *l = len;
            *populated = used;
        }
        Ok(true)
    }

    /// An anonymous mapping with room for `cap` elements (at least one page).
    fn map_anon(cap: usize) -> Result<MmapMut, MapError> {
        let bytes = cap
            .checked_mul(Self::SIZE)
            .ok_or_else(|| MapError {
                bytes: usize::MAX,
                source: std::io::ErrorKind::OutOfMemory.into(),
            })?
            .max(4096);
        MmapOptions::new()
            .len(bytes)
            .map_anon()
            .map_err(|source| MapError { bytes, source })
    }

    /// An empty array in `map`.
    fn in_mapping(map: MmapMut) -> Self {
        MappedArray {
            repr: Repr::Mapped {
                map,
                len: 0,
                populated: 0,
                dirty: 0,
            },
            policy: PhantomData,
        }
    }
}

/// Populate the pages of bytes `from..to` of `map` for writing, in one system call. A kernel
/// without `MADV_POPULATE_WRITE` leaves them to demand faults; any other failure (the kernel
/// could not provide the memory) is for the policy to judge.
fn populate<P: Policy>(map: &MmapMut, from: usize, to: usize) -> Result<(), P::Error> {
    if to <= from {
        return Ok(());
    }
    match map.advise_range(Advice::PopulateWrite, from, to - from) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(EINVAL) => Ok(()),
        Err(source) => P::populate_failed(MapError {
            bytes: to - from,
            source,
        }),
    }
}

impl<T, P> Default for MappedArray<T, P> {
    fn default() -> Self {
        Self::from(Vec::new())
    }
}

impl<T, P> From<Vec<T>> for MappedArray<T, P> {
    fn from(v: Vec<T>) -> Self {
        MappedArray {
            repr: Repr::Heap(v),
            policy: PhantomData,
        }
    }
}

impl<T: FromBytes + IntoBytes + KnownLayout + Immutable, P> Deref for MappedArray<T, P> {
    type Target = [T];
    #[inline]
    fn deref(&self) -> &[T] {
        match &self.repr {
            Repr::Heap(v) => v,
            Repr::Mapped { map, len, .. } => {
                // A mapping is page-aligned and holds its `len` elements (see `grow`,
                // `extend_from_slice`), so the cast cannot fail; an empty slice would only
                // hide a broken invariant.
                <[T]>::ref_from_prefix_with_elems(&map[..], *len)
                    .map(|(s, _)| s)
                    .expect("a page-aligned mapping holds its elements")
            }
        }
    }
}

impl<T: FromBytes + IntoBytes + KnownLayout + Immutable, P> DerefMut for MappedArray<T, P> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.repr {
            Repr::Heap(v) => v,
            Repr::Mapped { map, len, .. } => <[T]>::mut_from_prefix_with_elems(&mut map[..], *len)
                .map(|(s, _)| s)
                .expect("a page-aligned mapping holds its elements"),
        }
    }
}

impl<T: FromBytes + IntoBytes + KnownLayout + Immutable + Clone, P> Clone for MappedArray<T, P> {
    /// A copy on the heap.
    fn clone(&self) -> Self {
        Self::from(self.to_vec())
    }
}

impl<T, P> PartialEq for MappedArray<T, P>
where
    T: FromBytes + IntoBytes + KnownLayout + Immutable + PartialEq,
{
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T, P> Eq for MappedArray<T, P> where T: FromBytes + IntoBytes + KnownLayout + Immutable + Eq {}

impl<T, P> fmt::Debug for MappedArray<T, P>
where
    T: FromBytes + IntoBytes + KnownLayout + Immutable + fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<'a, T, P> IntoIterator for &'a MappedArray<T, P>
where
    T: FromBytes + IntoBytes + KnownLayout + Immutable,
{
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// The slice-like impls of a newtype `$name(MappedArray<$elem, _>)` that adds its own policy
/// methods (`From<Vec>`, `Deref`/`DerefMut` to a slice, `Debug`, iteration by reference).
macro_rules! mapped_newtype {
    ($name:ident, $elem:ty) => {
        impl From<Vec<$elem>> for $name {
            fn from(v: Vec<$elem>) -> Self {
                $name($crate::mapped::MappedArray::from(v))
            }
        }

        impl std::ops::Deref for $name {
            type Target = [$elem];
            #[inline]
            fn deref(&self) -> &[$elem] {
                &self.0
            }
        }

        impl std::ops::DerefMut for $name {
            #[inline]
            fn deref_mut(&mut self) -> &mut [$elem] {
                &mut self.0
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Debug::fmt(&self.0, f)
            }
        }

        impl<'a> IntoIterator for &'a $name {
            type Item = &'a $elem;
            type IntoIter = std::slice::Iter<'a, $elem>;
            fn into_iter(self) -> Self::IntoIter {
                self.iter()
            }
        }
    };
}
pub(crate) use mapped_newtype;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::schedule::Op;
    use crate::sim::OpState;

    /// A state whose fields all depend on `i` (shared with `states`' tests).
    pub(crate) fn state(i: usize) -> OpState {
        let mut x = OpState::default();
        x.ready = i as u64;
        x.end = 3 * i as u64 + 1;
        x.link = i as u32 ^ 0x55;
        x.pred = 7;
        x
    }

    /// An operation whose fields all depend on `i` (shared with `ops`' tests).
    pub(crate) fn op(i: usize) -> Op {
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

    #[test]
    fn mapped_arrays_grow_past_their_room_and_keep_their_contents() {
        // Room for 100 elements; grown in steps to 10x that, written between the steps.
        let mut m = MappedArray::<OpState, Strict>::mapped(100).expect("map");
        assert!(m.is_mapped() && m.is_empty());
        let mut want = Vec::new();
        for n in [1usize, 99, 100, 101, 150, 1000, 1000, 700] {
            m.grow(n, state(12345)).expect("grow");
            assert_eq!(m.len(), n.max(want.len()));
            // Fresh elements of a mapping are zeroed memory (not the heap's fill).
            assert!(m[want.len()..].iter().all(|x| *x == OpState::default()));
            for i in want.len()..m.len() {
                m[i] = state(i);
                want.push(state(i));
            }
            assert_eq!(&m[..], &want[..]);
        }
        assert!(m.is_mapped());
        // A clone is a heap copy, equal to the mapping.
        let c = m.clone();
        assert!(!c.is_mapped());
        assert_eq!(c, m);
        assert_eq!((&c).into_iter().count(), 1000);
    }

    /// Elements dropped by `truncate` and grown again are zeroed, as fresh ones are, whether
    /// or not the mapping was replaced in between.
    #[test]
    fn truncated_then_grown_elements_are_zeroed() {
        let mut m = MappedArray::<OpState, Strict>::mapped(200).expect("map");
        m.grow(150, state(1)).expect("grow");
        m.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = state(i + 1));
        m.truncate(50);
        m.grow(100, state(1)).expect("grow");
        assert_eq!(&m[..50], &(1..51).map(state).collect::<Vec<_>>()[..]);
        assert!(m[50..].iter().all(|x| *x == OpState::default()));
        m.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = state(i + 1));
        m.truncate(10);
        // Past the room: a fresh mapping, whose bytes past the elements are zero anyway.
        m.grow(1000, state(1)).expect("grow");
        assert!(m[10..].iter().all(|x| *x == OpState::default()));
        // The heap fills with the given element.
        let mut h = MappedArray::<OpState, Strict>::from(vec![state(3)]);
        h.grow(3, state(9)).expect("grow");
        assert_eq!(&h[..], &[state(3), state(9), state(9)]);
    }

    /// A mapped array keeps every element through pushes, copies, growth past its room and
    /// truncation, the same as a vector fed the same way.
    #[test]
    fn mapped_arrays_are_vectors() {
        let mut m = MappedArray::<Op, BestEffort>::new();
        let mut v: Vec<Op> = Vec::new();
        let Ok(()) = m.push(op(0));
        v.push(op(0));
        // A room of the mapping size: the one element moves along.
        let size = std::mem::size_of::<Op>();
        let room = BestEffort::MAP_FROM_BYTES.expect("maps") / size;
        let Ok(()) = m.reserve(room);
        assert!(m.is_mapped());
        assert!(m.capacity() > room);
        let steps = POPULATE_STEP / size;
        for i in 1..3 * steps {
            let Ok(()) = m.push(op(i));
            v.push(op(i));
        }
        let more: Vec<Op> = (0..steps + 5).map(|i| op(i * 13)).collect();
        let Ok(()) = m.extend_from_slice(&more);
        v.extend_from_slice(&more);
        assert_eq!(*m, *v);
        // Past the room: a larger mapping with the same contents.
        while m.len() <= room + 10 {
            let i = m.len();
            let Ok(()) = m.push(op(i));
            v.push(op(i));
        }
        assert!(m.is_mapped());
        assert!(m.capacity() >= room + room / 2);
        assert_eq!(*m, *v);
        m[5] = op(999);
        v[5] = op(999);
        m.truncate(room / 2);
        v.truncate(room / 2);
        assert_eq!(*m, *v);
        let Ok(()) = m.push(op(7));
        v.push(op(7));
        assert_eq!(*m, *v);
        let c = m.clone();
        assert!(!c.is_mapped());
        assert_eq!(c, m);
    }

    /// The room populated ahead (two parts, as two threads do it) takes the elements added
    /// afterwards.
    #[test]
    fn populated_room_takes_elements() {
        let mut m = MappedArray::<Op, Strict>::mapped(1000).expect("map");
        let n = 2 * (64 << 20) / std::mem::size_of::<Op>();
        m.extend_from_slice(&(0..1000).map(op).collect::<Vec<_>>())
            .expect("populate");
        m.reserve(n - 1000).expect("map");
        m.populate_room(1000, n / 2).expect("populate");
        m.populate_room(n / 2, n).expect("populate");
        m.note_populated(n);
        let rest: Vec<Op> = (1000..n).map(op).collect();
        m.extend_from_slice(&rest).expect("copy");
        assert_eq!(m.len(), n);
        assert!((0..n).step_by(4099).all(|i| m[i] == op(i)));
        assert_eq!(m[n - 1], op(n - 1));
        // On the heap there is nothing to populate.
        let h = MappedArray::<Op, Strict>::from(vec![op(1)]);
        h.populate_room(1, 100).expect("nothing");
        assert!(!h.is_mapped() && h.len() == 1);
    }

    /// A strict array on the heap stays there however much room is asked for; a mapping
    /// beyond the address space is an error that leaves the array as it was.
    #[test]
    fn strict_arrays_stay_where_they_are() {
        let mut h = MappedArray::<u64, Strict>::from(vec![1, 2]);
        h.reserve((128 << 20) / 8).expect("heap");
        assert!(!h.is_mapped() && *h == [1, 2]);
        let mut m = MappedArray::<u64, Strict>::mapped(4).expect("map");
        m.grow(3, 0).expect("grow");
        m[2] = 5;
        let e = m
            .reserve(usize::MAX / 4)
            .expect_err("beyond the address space");
        assert_eq!(e.bytes, usize::MAX);
        assert!(m.grow(1 << 45, 0).is_err());
        assert!(m.is_mapped() && *m == [0, 0, 5]);
    }
}
