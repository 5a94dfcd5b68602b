//! Errors of the management and initiator API. (Delivery failures are not
//! errors of the caller: they are [`crate::Dropped`] messages, counted.)

use crate::wire::HeaderError;

/// What went wrong with a management or initiator call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A fixed-size table is full. Static size: nothing grows.
    #[error(
        "the {table} table is full ({capacity} entries); raise it in the engine configuration"
    )]
    Exhausted {
        /// Which table.
        table: &'static str,
        /// Its size.
        capacity: u32,
    },
    /// The handle names an object that was released (or never existed).
    #[error("stale or unknown {0} handle")]
    StaleHandle(&'static str),
    /// Portal index beyond the table.
    #[error("portal index {portal} is outside the portal table (size {size})")]
    PortalIndex {
        /// Index given.
        portal: u32,
        /// Table size.
        size: u32,
    },
    /// The portal already has the other kind of target attached.
    #[error("portal {portal} already has {what} attached; detach it first")]
    PortalBusy {
        /// Portal.
        portal: u32,
        /// What is attached.
        what: &'static str,
    },
    /// A store table is smaller than the configuration asks.
    #[error("the store's {table} table has {have} slots but the configuration needs {need}")]
    StoreTooSmall {
        /// Which table.
        table: &'static str,
        /// Configured size.
        need: u32,
        /// Slots in the store.
        have: usize,
    },
    /// A region wraps around the 64-bit address space.
    #[error("region at {addr:#x} of {len} bytes wraps around the address space")]
    BadRegion {
        /// Start.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// A range lies outside a descriptor.
    #[error("{length} bytes at offset {offset} do not fit in the descriptor's {size} bytes")]
    OutOfBounds {
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
        /// Descriptor size.
        size: u64,
    },
    /// The descriptor kind cannot be used this way.
    #[error("{0}")]
    Unsupported(&'static str),
    /// An argument is invalid.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// The event queue overflowed since the last poll; this many events were
    /// lost. The events still queued remain readable.
    #[error("event queue overflowed: {0} events were lost")]
    EventsDropped(u64),
    /// `md_free` was given an offset that is not an allocation.
    #[error("the dynamic descriptor holds no message at offset {0}")]
    NoAllocation(u64),
    /// The caller's segment buffer is too small.
    #[error("the segment buffer holds {0} segments; the body has more")]
    SegmentBuffer(usize),
    /// A header the initiator helpers built failed validation.
    #[error("header: {0}")]
    Header(#[from] HeaderError),
}
