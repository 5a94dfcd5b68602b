//! Where the engine's tables live.
//!
//! The engine never allocates. Its seven tables (portals, match entries,
//! memory descriptors, descriptor blocks, event queues, event slots, heap
//! records) are provided by a [`Store`]:
//!
//! * [`SliceStore`]: caller-provided `&mut` slices (a bare-metal kernel
//!   carving tables out of memory it owns);
//! * [`ArrayStore`]: fixed arrays sized by const generics (a `static` or a
//!   stack frame, no allocator needed);
//! * [`BoxStore`] (feature `alloc`): boxed slices allocated once from a
//!   [`Config`] by [`crate::Engine::new`]; nothing grows afterwards.

use crate::event::{EqSlot, Event};
use crate::matching::{EntrySlot, PortalSlot};
use crate::md::{HeapChunk, MdSlot};
use crate::types::{ProcessId, Region};

/// Sizes of every table, fixed at initialisation, and the engine's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// The process this engine receives for; headers for anyone else are dropped.
    pub id: ProcessId,
    /// Portal table entries.
    pub portals: u32,
    /// Match entries, shared by all portals.
    pub match_entries: u32,
    /// Memory descriptors.
    pub mds: u32,
    /// Blocks of independent and combined descriptors, shared.
    pub blocks: u32,
    /// Event queues.
    pub eqs: u32,
    /// Event slots, shared by all queues.
    pub events: u32,
    /// Allocation records of dynamic descriptors, shared.
    pub heap_records: u32,
    /// Largest message length accepted.
    pub max_message: u64,
}

impl Config {
    /// A small configuration good for tests and examples.
    pub const fn small(id: ProcessId) -> Self {
        Config {
            id,
            portals: 16,
            match_entries: 256,
            mds: 64,
            blocks: 256,
            eqs: 8,
            events: 1024,
            heap_records: 256,
            max_message: 1 << 30,
        }
    }
}

/// Mutable view of every table.
#[derive(Debug)]
pub struct Tables<'a> {
    /// Portal table.
    pub portals: &'a mut [PortalSlot],
    /// Match entries.
    pub entries: &'a mut [EntrySlot],
    /// Memory descriptors.
    pub mds: &'a mut [MdSlot],
    /// Descriptor blocks.
    pub blocks: &'a mut [Region],
    /// Event queues.
    pub eqs: &'a mut [EqSlot],
    /// Event slots.
    pub events: &'a mut [Event],
    /// Heap allocation records.
    pub chunks: &'a mut [HeapChunk],
}

/// Shared view of every table.
#[derive(Debug, Clone, Copy)]
pub struct TablesRef<'a> {
    /// Portal table.
    pub portals: &'a [PortalSlot],
    /// Match entries.
    pub entries: &'a [EntrySlot],
    /// Memory descriptors.
    pub mds: &'a [MdSlot],
    /// Descriptor blocks.
    pub blocks: &'a [Region],
    /// Event queues.
    pub eqs: &'a [EqSlot],
    /// Event slots.
    pub events: &'a [Event],
    /// Heap allocation records.
    pub chunks: &'a [HeapChunk],
}

/// Storage for the engine's tables.
pub trait Store {
    /// Mutable access.
    fn tables(&mut self) -> Tables<'_>;
    /// Shared access.
    fn tables_ref(&self) -> TablesRef<'_>;
}

/// Caller-provided slices.
#[derive(Debug)]
pub struct SliceStore<'a>(pub Tables<'a>);

impl Store for SliceStore<'_> {
    fn tables(&mut self) -> Tables<'_> {
        let t = &mut self.0;
        Tables {
            portals: t.portals,
            entries: t.entries,
            mds: t.mds,
            blocks: t.blocks,
            eqs: t.eqs,
            events: t.events,
            chunks: t.chunks,
        }
    }
    fn tables_ref(&self) -> TablesRef<'_> {
        let t = &self.0;
        TablesRef {
            portals: t.portals,
            entries: t.entries,
            mds: t.mds,
            blocks: t.blocks,
            eqs: t.eqs,
            events: t.events,
            chunks: t.chunks,
        }
    }
}

/// Tables as fixed arrays: `P` portals, `M` match entries, `D` descriptors,
/// `B` blocks, `Q` event queues, `E` event slots, `H` heap records.
/// `ArrayStore::new()` is `const`, so it can initialise a `static`.
#[derive(Clone, Debug)]
pub struct ArrayStore<
    const P: usize,
    const M: usize,
    const D: usize,
    const B: usize,
    const Q: usize,
    const E: usize,
    const H: usize,
> {
    portals: [PortalSlot; P],
    entries: [EntrySlot; M],
    mds: [MdSlot; D],
    blocks: [Region; B],
    eqs: [EqSlot; Q],
    events: [Event; E],
    chunks: [HeapChunk; H],
}

impl<
        const P: usize,
        const M: usize,
        const D: usize,
        const B: usize,
        const Q: usize,
        const E: usize,
        const H: usize,
    > ArrayStore<P, M, D, B, Q, E, H>
{
    /// Empty tables.
    pub const fn new() -> Self {
        ArrayStore {
            portals: [PortalSlot::EMPTY; P],
            entries: [EntrySlot::EMPTY; M],
            mds: [MdSlot::EMPTY; D],
            blocks: [Region::EMPTY; B],
            eqs: [EqSlot::EMPTY; Q],
            events: [Event::EMPTY; E],
            chunks: [HeapChunk::EMPTY; H],
        }
    }

    /// The configuration that uses exactly these tables.
    pub const fn config(id: ProcessId, max_message: u64) -> Config {
        Config {
            id,
            portals: P as u32,
            match_entries: M as u32,
            mds: D as u32,
            blocks: B as u32,
            eqs: Q as u32,
            events: E as u32,
            heap_records: H as u32,
            max_message,
        }
    }
}

impl<
        const P: usize,
        const M: usize,
        const D: usize,
        const B: usize,
        const Q: usize,
        const E: usize,
        const H: usize,
    > Default for ArrayStore<P, M, D, B, Q, E, H>
{
    fn default() -> Self {
        Self::new()
    }
}

impl<
        const P: usize,
        const M: usize,
        const D: usize,
        const B: usize,
        const Q: usize,
        const E: usize,
        const H: usize,
    > Store for ArrayStore<P, M, D, B, Q, E, H>
{
    fn tables(&mut self) -> Tables<'_> {
        Tables {
            portals: &mut self.portals,
            entries: &mut self.entries,
            mds: &mut self.mds,
            blocks: &mut self.blocks,
            eqs: &mut self.eqs,
            events: &mut self.events,
            chunks: &mut self.chunks,
        }
    }
    fn tables_ref(&self) -> TablesRef<'_> {
        TablesRef {
            portals: &self.portals,
            entries: &self.entries,
            mds: &self.mds,
            blocks: &self.blocks,
            eqs: &self.eqs,
            events: &self.events,
            chunks: &self.chunks,
        }
    }
}

#[cfg(feature = "alloc")]
mod boxed {
    use super::*;
    use alloc::boxed::Box;
    use alloc::vec;

    /// Tables allocated once from a [`Config`] (feature `alloc`).
    #[derive(Debug)]
    pub struct BoxStore {
        portals: Box<[PortalSlot]>,
        entries: Box<[EntrySlot]>,
        mds: Box<[MdSlot]>,
        blocks: Box<[Region]>,
        eqs: Box<[EqSlot]>,
        events: Box<[Event]>,
        chunks: Box<[HeapChunk]>,
    }

    impl BoxStore {
        /// Allocate every table at the size `config` asks for.
        pub fn new(config: &Config) -> Self {
            BoxStore {
                portals: vec![PortalSlot::EMPTY; config.portals as usize].into_boxed_slice(),
                entries: vec![EntrySlot::EMPTY; config.match_entries as usize].into_boxed_slice(),
                mds: vec![MdSlot::EMPTY; config.mds as usize].into_boxed_slice(),
                blocks: vec![Region::EMPTY; config.blocks as usize].into_boxed_slice(),
                eqs: vec![EqSlot::EMPTY; config.eqs as usize].into_boxed_slice(),
                events: vec![Event::EMPTY; config.events as usize].into_boxed_slice(),
                chunks: vec![HeapChunk::EMPTY; config.heap_records as usize].into_boxed_slice(),
            }
        }
    }

    impl Store for BoxStore {
        fn tables(&mut self) -> Tables<'_> {
            Tables {
                portals: &mut self.portals,
                entries: &mut self.entries,
                mds: &mut self.mds,
                blocks: &mut self.blocks,
                eqs: &mut self.eqs,
                events: &mut self.events,
                chunks: &mut self.chunks,
            }
        }
        fn tables_ref(&self) -> TablesRef<'_> {
            TablesRef {
                portals: &self.portals,
                entries: &self.entries,
                mds: &self.mds,
                blocks: &self.blocks,
                eqs: &self.eqs,
                events: &self.events,
                chunks: &self.chunks,
            }
        }
    }
}

#[cfg(feature = "alloc")]
pub use boxed::BoxStore;
