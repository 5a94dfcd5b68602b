//! Events and fixed-size event queues.

use crate::plan::DropReason;
use crate::types::{EqHandle, HandlerId, MatchHandle, MdHandle, ProcessId};

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EventKind {
    /// Target side: a put was deposited.
    Put,
    /// Target side: a get was served (the reply is ready to send).
    Get,
    /// Initiator side: the reply to a get was deposited.
    Reply,
    /// Initiator side: the acknowledgment of a put arrived.
    Ack,
    /// Initiator side: the payload of a put has left the local MD.
    Send,
    /// A match entry reached its use threshold and was unlinked.
    Unlink,
    /// A message for this portal was discarded; `reason` says why.
    Discard,
}

/// One event. Fixed size, `Copy`, no pointers: it can live in a shared
/// memory ring as it is.
///
/// `offset` is the position in the memory descriptor: a byte offset for
/// single and combined blocks, the block index for independent blocks, the
/// byte offset of the allocation inside the heap for dynamic descriptors
/// (pass it to [`crate::Engine::md_free`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Kind.
    pub kind: EventKind,
    /// Sender of the message (for initiator-side events: the target).
    pub initiator: ProcessId,
    /// Portal index.
    pub portal: u32,
    /// Match bits carried by the message.
    pub match_bits: u64,
    /// Length the initiator asked for.
    pub rlength: u64,
    /// Length actually deposited or read.
    pub mlength: u64,
    /// Position in the memory descriptor (see the type documentation).
    pub offset: u64,
    /// Memory descriptor involved, or [`MdHandle::NONE`].
    pub md: MdHandle,
    /// Match entry involved, or [`MatchHandle::NONE`].
    pub entry: MatchHandle,
    /// User header data from the message.
    pub hdr_data: u64,
    /// The operation was truncated.
    pub truncated: bool,
    /// The message header was saved in the descriptor (independent and
    /// dynamic descriptors with [`crate::Save::Header`] or [`crate::Save::Both`]).
    pub header_saved: bool,
    /// For [`EventKind::Discard`]: why.
    pub reason: Option<DropReason>,
    /// Sequence number in its queue (gaps show lost events).
    pub seq: u64,
}

impl Event {
    /// An all-zero event, used to fill unused queue slots.
    pub const EMPTY: Event = Event {
        kind: EventKind::Discard,
        initiator: ProcessId { group: 0, rank: 0 },
        portal: 0,
        match_bits: 0,
        rlength: 0,
        mlength: 0,
        offset: 0,
        md: MdHandle::NONE,
        entry: MatchHandle::NONE,
        hdr_data: 0,
        truncated: false,
        header_saved: false,
        reason: None,
        seq: 0,
    };
}

/// What happened to the event a delivery produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Posted {
    /// No event queue was attached (or it had been freed).
    NoQueue,
    /// Posted to this queue.
    Queued(EqHandle),
    /// The queue was full: the event was lost, the loss counted and reported
    /// by the next [`crate::Engine::eq_get`].
    Overflowed(EqHandle),
}

/// Something that can run the per-portal event handlers of section 7.8.
/// The engine never calls it itself: it tells the fabric which handler to
/// run ([`crate::DeliveryPlan::handler`]) and the fabric runs it once the
/// bytes are in place (or at once for a discard).
pub trait EventHandler {
    /// Run handler `id` for `event`.
    fn handle(&mut self, id: HandlerId, event: &Event);
}

/// Event queue slot (opaque; public only so callers can provide storage).
#[derive(Clone, Copy, Debug)]
pub struct EqSlot {
    pub(crate) gen: u32,
    pub(crate) live: bool,
    pub(crate) base: u32,
    pub(crate) cap: u32,
    pub(crate) head: u32,
    pub(crate) len: u32,
    pub(crate) lost: u64,
    pub(crate) seq: u64,
}

impl EqSlot {
    /// An unused slot.
    pub const EMPTY: EqSlot = EqSlot {
        gen: 0,
        live: false,
        base: 0,
        cap: 0,
        head: 0,
        len: 0,
        lost: 0,
        seq: 0,
    };
}

/// Where [`reserve`] put the next event of a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    /// No live queue: nothing to write.
    NoQueue,
    /// The queue was full: the loss is counted, nothing to write.
    Overflowed,
    /// Write the event, with this sequence number, at this index of the events table.
    At(usize, u64),
}

/// [`post`] without the write: takes the queue's next sequence number and slot (or counts the
/// loss) and leaves the event to the caller, who writes it in place from its values (an event
/// built on the stack and then copied was written with narrow stores and read back with wide
/// loads, a store-forwarding stall).
#[inline(always)]
pub(crate) fn reserve(eqs: &mut [EqSlot], h: EqHandle) -> Slot {
    let Some(q) = eqs.get_mut(h.idx as usize) else {
        return Slot::NoQueue;
    };
    if !q.live | (q.gen != h.gen) {
        return Slot::NoQueue;
    }
    let seq = q.seq;
    q.seq += 1;
    if q.len == q.cap {
        q.lost += 1;
        return Slot::Overflowed;
    }
    let mut at = q.head + q.len;
    if at >= q.cap {
        at -= q.cap;
    }
    q.len += 1;
    Slot::At((q.base + at) as usize, seq)
}

/// Post `ev` to queue `h` if it is live. Branch-light: one generation check,
/// one capacity check.
#[inline]
pub(crate) fn post(eqs: &mut [EqSlot], events: &mut [Event], h: EqHandle, ev: &Event) -> Posted {
    let Some(q) = eqs.get_mut(h.idx as usize) else {
        return Posted::NoQueue;
    };
    if !q.live | (q.gen != h.gen) {
        return Posted::NoQueue;
    }
    let seq = q.seq;
    q.seq += 1;
    if q.len == q.cap {
        q.lost += 1;
        return Posted::Overflowed(h);
    }
    let mut at = q.head + q.len;
    if at >= q.cap {
        at -= q.cap;
    }
    events[(q.base + at) as usize] = Event { seq, ..*ev };
    q.len += 1;
    Posted::Queued(h)
}
