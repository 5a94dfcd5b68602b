//! Puma portals: the pure, static-size message-delivery engine shared by
//! every QK (hosted, bare metal) and by the simulator (seed 002, section 7).
//!
//! # The engine plans, it does not copy
//!
//! A message arrives as a [`WireHeader`] (80 bytes, versioned, explicit
//! little-endian, validated field by field) followed by its payload.
//! [`Engine::deliver`] looks the header's portal up in the portal table,
//! checks it is enabled and that its access control entry admits the
//! sender, walks the portal's match list (or takes the descriptor attached
//! directly), places the message in a memory descriptor, posts the event,
//! and returns a [`DeliveryPlan`]:
//!
//! * where the payload goes ([`DeliveryPlan::body`]: a [`Region`] in the
//!   owner's address space, plus further blocks for combined descriptors,
//!   read with [`Engine::segments`] or [`Engine::write_segments`]), and
//!   where the header goes when the descriptor saves headers;
//! * the offset, `rlength`, `mlength`, whether it was truncated;
//! * the [`Event`] and the queue it was posted to (or that the queue
//!   overflowed);
//! * the ack or reply header to send back ([`Response`]);
//! * the portal's event handler to run after the copy (section 7.8).
//!
//! Or it returns [`Dropped`] with the [`DropReason`], counted per reason in
//! [`Engine::counters`]. The fabric that owns the bytes does the copy, so
//! the same crate serves a hosted QK (virtual addresses or shared-memory
//! offsets), a bare-metal QK (physical addresses) and a simulator.
//!
//! # Static size: where the tables live
//!
//! Every table is sized by a [`Config`] at initialisation; exhausting one
//! returns [`Error::Exhausted`], never panics, never grows. The core never
//! allocates: the engine is generic over a [`Store`] that owns the tables.
//!
//! * No allocator (bare-metal kernel): [`ArrayStore`] (const-generic arrays;
//!   `const fn new`, so it can sit in a `static`) or [`SliceStore`]
//!   (slices the kernel carved out of memory it owns), passed to
//!   [`Engine::with_store`].
//! * Feature `alloc` (on by default; the hosted QK): [`Engine::new`]
//!   allocates a [`BoxStore`] once from the configuration.
//!
//! We chose a store trait over const generics on the engine itself so that
//! a hosted QK can size its tables from a configuration file at run time,
//! while a kernel without an allocator still gets fixed storage; the
//! delivery code is identical for both.
//!
//! # Descriptors, match lists, events
//!
//! * [`MdKind::Single`]: one region, sender- or receiver-managed offset
//!   ([`OffsetMode`]); put and/or get ([`MdOptions`]), optional ack,
//!   optional truncation.
//! * [`MdKind::Independent`]: one message per block, linear or circular,
//!   saving the header, the body or both ([`Save`]); a message that does
//!   not fit is refused (too long) and, if nothing else takes it,
//!   discarded with a discard event.
//! * [`MdKind::Combined`]: the blocks form one buffer; a put scatters
//!   across blocks, a get gathers.
//! * [`MdKind::Dynamic`]: a heap; the engine allocates per message, the
//!   application frees with [`Engine::md_free`]. A full heap counts as
//!   "too long", so the search goes on down the list.
//!
//! Match entries ([`MatchSpec`]) match source group and rank (each may be
//! [`ANY`]) and 64 match bits under an ignore mask. They are triply linked
//! as the seed says: the list order is the link followed on no match; the
//! second link ([`Link`], set by [`Engine::me_set_links`]) is followed when
//! the message is too long for the descriptor, the third when the
//! descriptor is not valid (released, exhausted, or not permitting the op).
//! Entries unlink themselves after a threshold ([`Unlink`]).
//!
//! Event queues are fixed rings; when one is full the event is lost,
//! [`Posted::Overflowed`] says so in the plan, [`Counters::eq_overflows`]
//! counts it, and the next [`Engine::eq_get`] returns
//! [`Error::EventsDropped`].
//!
//! # Example: the protocol of section 7.7
//!
//! Preposted receives sit in the match list; a dynamic descriptor at the
//! end catches unexpected messages; a second dynamic descriptor keeps only
//! headers once the first is full, so that the receiver can ask for the
//! body again.
//!
//! ```
//! use portals::*;
//!
//! let me = ProcessId::new(1, 0);
//! let peer = ProcessId::new(1, 1);
//! let mut e = Engine::new(Config::small(me))?;
//! let eq = e.eq_alloc(64)?;
//! e.portal_set_eq(0, Some(eq))?;
//! e.portal_set_acl(0, Acl::job(1))?;
//! e.portal_enable(0)?;
//!
//! // The catch-alls at the end of the list: a 256-byte unexpected-message
//! // heap, then a heap that keeps only headers.
//! let unexpected = e.md_create(&MdSpec {
//!     kind: MdKind::Dynamic { region: Region::new(0x10_000, 256), save: Save::Both, max_messages: 16 },
//!     options: MdOptions::PUT,
//!     eq: None,
//! })?;
//! let headers = e.md_create(&MdSpec {
//!     kind: MdKind::Dynamic { region: Region::new(0x20_000, 4096), save: Save::Header, max_messages: 32 },
//!     options: MdOptions::PUT,
//!     eq: None,
//! })?;
//! let catch_all = e.me_append(0, MatchSpec::any(), unexpected)?;
//! e.me_append(0, MatchSpec::any(), headers)?;
//!
//! // A preposted receive for tag 7 goes before the catch-alls.
//! let buf = e.md_create(&MdSpec {
//!     kind: MdKind::Single { region: Region::new(0x1000, 100), offset: OffsetMode::Receiver },
//!     options: MdOptions::PUT,
//!     eq: None,
//! })?;
//! e.me_insert(catch_all, Position::Before, MatchSpec::new(7).use_once(), buf)?;
//!
//! let msg = |tag: u64, len: u64| WireHeader {
//!     version: WIRE_VERSION, op: Op::Put, flags: 0, portal: 0, src: peer, dst: me,
//!     match_bits: tag, offset: 0, length: len, rlength: len,
//!     return_md: NO_MD, return_offset: 0, hdr_data: tag,
//! };
//!
//! // Expected: lands in the preposted buffer, whose entry then unlinks.
//! let plan = e.deliver(&msg(7, 100)).map_err(|d| d.reason)?;
//! assert_eq!(plan.md, buf);
//! assert_eq!(plan.body.first(), Region::new(0x1000, 100));
//! assert!(plan.unlinked);
//!
//! // Unexpected: header + body into the first heap (80 + 100 bytes).
//! let plan = e.deliver(&msg(8, 100)).map_err(|d| d.reason)?;
//! assert_eq!(plan.md, unexpected);
//! assert_eq!(plan.header_at, Some(0x10_000));
//! assert_eq!(plan.body.first(), Region::new(0x10_000 + HEADER_LEN as u64, 100));
//!
//! // The first heap is now too full: only the header is kept, in the second.
//! let plan = e.deliver(&msg(9, 100)).map_err(|d| d.reason)?;
//! assert_eq!(plan.md, headers);
//! assert!(plan.header_at.is_some() && plan.body.is_empty());
//! assert_eq!(plan.mlength, 0); // the receiver re-requests the body with a get
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `examples/fabric.rs` runs the same protocol with real bytes: two
//! engines, two byte vectors as memory, and a loop that carries headers and
//! performs the copies the plans describe (`cargo run -p portals --example
//! fabric`).
//!
//! # Room for Portals 4
//!
//! * Op codes 5..=31 are reserved in [`Op`] for atomics, fetch-atomics and
//!   swap; the header has `hdr_data` and `rlength` already, and an operand
//!   would follow the header like a payload.
//! * Priority and overflow lists: [`Engine::deliver`] takes the portal's
//!   target, which is an internal enum (none / list / descriptor); a second
//!   list is one more variant, searched after the first, with the
//!   dynamic-descriptor deposit above as the overflow buffer and
//!   [`Save::Header`] as the unexpected-header store.
//! * Counting events: a counter table is one more [`Store`] table and an
//!   optional counter handle on [`MdSpec`], bumped where events are posted.
//! * Triggered operations: a table of prepared [`SendPlan`]s keyed by
//!   counter thresholds, emitted by the same place.
//! * Flow control: a portal flag that disables the portal when a deposit
//!   misses for lack of resources, reported as a new [`DropReason`]
//!   (counters are indexed by reason, so adding one is local).
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// `Dropped` carries the discard event (136 bytes) but `DeliveryPlan` is larger
// still, so the `Result` is no bigger for it; boxing needs an allocator we do
// not have on bare metal.
#![allow(clippy::result_large_err)]

#[cfg(feature = "alloc")]
extern crate alloc;

#[cfg(test)]
extern crate std;

mod engine;
mod error;
mod event;
pub mod fuzzing;
mod matching;
mod md;
mod plan;
mod store;
mod types;
mod wire;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use engine::{Engine, GetArgs, MatchInfo, PutArgs, PutTicket};
pub use error::Error;
pub use event::{EqSlot, Event, EventHandler, EventKind, Posted};
pub use matching::{EntrySlot, Link, MatchSpec, PortalInfo, PortalSlot, Position, Unlink};
pub use md::{HeapChunk, MdKind, MdOptions, MdSlot, MdSpec, OffsetMode, Save};
pub use plan::{
    Body, Counters, DeliveryPlan, DropReason, Dropped, Response, Segment, Segments, SendPlan,
};
#[cfg(feature = "alloc")]
pub use store::BoxStore;
pub use store::{ArrayStore, Config, SliceStore, Store, Tables, TablesRef};
pub use types::{Acl, EqHandle, HandlerId, MatchHandle, MdHandle, ProcessId, Region, ANY};
pub use wire::{
    flags, HeaderError, Limits, Op, PlainPut, WireHeader, HEADER_LEN, NO_MD, WIRE_VERSION,
};
