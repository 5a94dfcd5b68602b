//! The array of operation states of a run ([`States`]): a plain vector, or, for the big arrays
//! of a large run, an anonymous memory mapping whose pages are populated in bulk.
//!
//! A fresh page costs a page fault on its first touch (about 3 µs on the VM this was measured
//! on; a million-rank all-reduce's 1.34 GB of states are 330 K of them). Asking the kernel to
//! populate a whole range at once (`madvise(MADV_POPULATE_WRITE)`, Linux 5.14 and later) maps
//! the same pages for about 60 % of that (0.46–0.48 s against 0.74–0.81 s per GiB, measured
//! with a small C program on this machine). On kernels without it the pages are left to
//! demand faults as before.

use std::fmt;
use std::ops::{Deref, DerefMut};

use memmap2::{Advice, MmapMut, MmapOptions};
use zerocopy::FromBytes;

use crate::error::MemoryError;
use crate::sim::{OpState, FRESH_STATE};

/// Bytes per state.
const STATE_BYTES: usize = std::mem::size_of::<OpState>();

/// [`States::grow`] populates pages in steps of at least this many bytes (fewer system calls
/// while a template follows a generator).
const POPULATE_STEP: usize = 8 << 20;

/// `EINVAL`: `madvise` does not know `MADV_POPULATE_WRITE` (Linux before 5.14).
const EINVAL: i32 = 22;

/// The states of a run's operations (dereferences to a slice).
pub struct States(Repr);

enum Repr {
    /// On the heap.
    Heap(Vec<OpState>),
    /// In an anonymous mapping: `len` states, the first `populated` bytes' pages populated.
    Mapped {
        map: MmapMut,
        len: usize,
        populated: usize,
    },
}

impl States {
    /// No states, on the heap.
    pub fn new() -> Self {
        States(Repr::Heap(Vec::new()))
    }

    /// No states yet, in a mapping with room for `cap` states (address space only: no page is
    /// touched until [`States::grow`] populates it). The mapping is replaced by a larger one
    /// if [`States::grow`] goes beyond `cap`.
    pub fn mapped(cap: usize) -> Result<Self, MemoryError> {
        Ok(States(Repr::Mapped {
            map: map_states(cap)?,
            len: 0,
            populated: 0,
        }))
    }

    /// Grow to `n` states (nothing if there are that many already). The new states of a
    /// heap array are fresh (completion `u64::MAX`, no dependents); those of a mapping are
    /// zeroed memory whose pages are populated here in bulk (an error if the kernel cannot
    /// provide them). Either way they are meant for the run's initial fill, which writes every
    /// state (see [`crate::sim::simulate_from_template`]).
    pub fn grow(&mut self, n: usize) -> Result<(), MemoryError> {
        match &mut self.0 {
            Repr::Heap(v) => {
                if n > v.len() {
                    v.resize(n, FRESH_STATE);
                }
                Ok(())
            }
            Repr::Mapped {
                map,
                len,
                populated,
            } => {
                if n <= *len {
                    return Ok(());
                }
                let need = bytes_of(n)?;
                if need > map.len() {
                    // Beyond the room asked for: a larger mapping, the states so far copied.
                    let mut bigger = map_states(n.max(*len + *len / 2))?;
                    let old = *len * STATE_BYTES;
                    populate(&bigger, 0, old)?;
                    bigger[..old].copy_from_slice(&map[..old]);
                    *map = bigger;
                    *populated = old;
                }
                if need > *populated {
                    let end = need.max(*populated + POPULATE_STEP).min(map.len());
                    populate(map, *populated, end - *populated)?;
                    *populated = end;
                }
                *len = n;
                Ok(())
            }
        }
    }

    /// Whether the states live in a mapping (see [`States::mapped`]).
    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Repr::Mapped { .. })
    }
}

/// Bytes of `n` states, or the error of a request beyond the address space.
fn bytes_of(n: usize) -> Result<usize, MemoryError> {
    n.checked_mul(STATE_BYTES).ok_or(MemoryError {
        what: "operation states",
        bytes: usize::MAX,
        source: std::io::ErrorKind::OutOfMemory.into(),
    })
}

/// An anonymous mapping with room for `cap` states (at least one page).
fn map_states(cap: usize) -> Result<MmapMut, MemoryError> {
    let bytes = bytes_of(cap)?.max(4096);
    MmapOptions::new()
        .len(bytes)
        .map_anon()
        .map_err(|source| MemoryError {
            what: "operation states",
            bytes,
            source,
        })
}

/// Populate the pages of bytes `off..off + len` of `map` for writing, in one system call.
/// Kernels without `MADV_POPULATE_WRITE` leave them to demand faults; any other failure (the
/// kernel could not provide the memory) is an error.
fn populate(map: &MmapMut, off: usize, len: usize) -> Result<(), MemoryError> {
    if len == 0 {
        return Ok(());
    }
    match map.advise_range(Advice::PopulateWrite, off, len) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(EINVAL) => Ok(()),
        Err(source) => Err(MemoryError {
            what: "operation states",
            bytes: len,
            source,
        }),
    }
}

impl Default for States {
    fn default() -> Self {
        States::new()
    }
}

impl From<Vec<OpState>> for States {
    fn from(v: Vec<OpState>) -> Self {
        States(Repr::Heap(v))
    }
}

impl Deref for States {
    type Target = [OpState];
    fn deref(&self) -> &[OpState] {
        match &self.0 {
            Repr::Heap(v) => v,
            Repr::Mapped { map, len, .. } => {
                // A mapping is page-aligned and `len` states fit in it (see `grow`), so the
                // cast cannot fail; an empty slice would only hide a broken invariant.
                <[OpState]>::ref_from_prefix_with_elems(&map[..], *len)
                    .map(|(s, _)| s)
                    .expect("a page-aligned mapping holds its states")
            }
        }
    }
}

impl DerefMut for States {
    fn deref_mut(&mut self) -> &mut [OpState] {
        match &mut self.0 {
            Repr::Heap(v) => v,
            Repr::Mapped { map, len, .. } => {
                <[OpState]>::mut_from_prefix_with_elems(&mut map[..], *len)
                    .map(|(s, _)| s)
                    .expect("a page-aligned mapping holds its states")
            }
        }
    }
}

impl Clone for States {
    /// A copy on the heap.
    fn clone(&self) -> Self {
        States(Repr::Heap(self.to_vec()))
    }
}

impl PartialEq for States {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl fmt::Debug for States {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<'a> IntoIterator for &'a States {
    type Item = &'a OpState;
    type IntoIter = std::slice::Iter<'a, OpState>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(i: usize) -> OpState {
        let mut x = OpState::default();
        x.ready = i as u64;
        x.end = 3 * i as u64 + 1;
        x.link = i as u32 ^ 0x55;
        x.pred = 7;
        x
    }

    #[test]
    fn mapped_states_grow_past_their_room_and_keep_their_contents() {
        // Room for 100 states; grown in steps to 10x that, written between the steps.
        let mut m = States::mapped(100).expect("map");
        assert!(m.is_mapped() && m.is_empty());
        let mut want = Vec::new();
        for n in [1usize, 99, 100, 101, 150, 1000, 1000, 700] {
            m.grow(n).expect("grow");
            assert_eq!(m.len(), n.max(want.len()));
            // Fresh states of a mapping are zeroed memory.
            assert!(m[want.len()..].iter().all(|x| *x == OpState::default()));
            for i in want.len()..m.len() {
                m[i] = sample(i);
                want.push(sample(i));
            }
            assert_eq!(&m[..], &want[..]);
        }
        // A clone is a heap copy, equal to the mapping.
        let c = m.clone();
        assert!(!c.is_mapped());
        assert_eq!(c, m);
        assert_eq!((&c).into_iter().count(), 1000);
    }

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
