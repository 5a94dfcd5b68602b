//! What `deliver` returns: the plan the fabric executes (where the bytes go,
//! which response to send), or the reason the message was dropped.

use crate::event::{Event, EventHandler, Posted};
use crate::types::{HandlerId, MatchHandle, MdHandle, Region};
use crate::wire::{HeaderError, Op, WireHeader};

/// Why a message was dropped. Each reason has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[repr(u8)]
pub enum DropReason {
    /// The header failed validation (other than the portal index).
    #[error("malformed header")]
    BadHeader = 0,
    /// The header names another process as destination.
    #[error("message addressed to another process")]
    WrongDestination,
    /// The portal index is outside the portal table.
    #[error("invalid portal index")]
    InvalidPortal,
    /// The portal is disabled.
    #[error("portal disabled")]
    Disabled,
    /// The portal's access control entry does not admit the sender or the op.
    #[error("sender not allowed by the portal's access control entry")]
    Forbidden,
    /// No match entry matched (or the portal has nothing attached).
    #[error("no match entry matched")]
    NoMatch,
    /// A match was found but the message did not fit the descriptor (a full
    /// heap counts as too long), and no later entry took it.
    #[error("message too long for the descriptor")]
    TooLong,
    /// The descriptor was invalid (released, exhausted, or not permitting
    /// the operation) and no later entry took the message.
    #[error("memory descriptor not valid")]
    InvalidMd,
    /// The links of the match list formed a cycle.
    #[error("match list links form a cycle")]
    LinkLoop,
    /// A reply or ack for a descriptor that is gone or expects none.
    #[error("unexpected reply or acknowledgment")]
    Unexpected,
}

impl DropReason {
    /// Number of reasons (size of the counter array).
    pub const COUNT: usize = 10;
    /// Every reason, in counter order.
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::BadHeader,
        DropReason::WrongDestination,
        DropReason::InvalidPortal,
        DropReason::Disabled,
        DropReason::Forbidden,
        DropReason::NoMatch,
        DropReason::TooLong,
        DropReason::InvalidMd,
        DropReason::LinkLoop,
        DropReason::Unexpected,
    ];

    /// Short stable name, for CLIs and logs.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::BadHeader => "bad_header",
            DropReason::WrongDestination => "wrong_destination",
            DropReason::InvalidPortal => "invalid_portal",
            DropReason::Disabled => "disabled",
            DropReason::Forbidden => "forbidden",
            DropReason::NoMatch => "no_match",
            DropReason::TooLong => "too_long",
            DropReason::InvalidMd => "invalid_md",
            DropReason::LinkLoop => "link_loop",
            DropReason::Unexpected => "unexpected",
        }
    }
}

/// A discarded message: why, and what was reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("message dropped: {reason}")]
pub struct Dropped {
    /// Reason (also counted in [`Counters`]).
    pub reason: DropReason,
    /// The header error, for [`DropReason::BadHeader`] and [`DropReason::InvalidPortal`].
    pub header: Option<HeaderError>,
    /// Portal index when the portal was valid.
    pub portal: Option<u32>,
    /// The discard event, when one was produced (the portal was enabled and
    /// admitted the sender, but nothing could take the message).
    pub event: Option<Event>,
    /// Where that event went.
    pub posted: Posted,
    /// Handler to run for the discard (section 7.8).
    pub handler: Option<HandlerId>,
}

impl Dropped {
    pub(crate) const fn bare(reason: DropReason) -> Self {
        Dropped {
            reason,
            header: None,
            portal: None,
            event: None,
            posted: Posted::NoQueue,
            handler: None,
        }
    }

    /// Run the portal's handler for this discard, if it has one.
    pub fn run_handler(&self, h: &mut impl EventHandler) {
        if let (Some(id), Some(ev)) = (self.handler, &self.event) {
            h.handle(id, ev);
        }
    }
}

/// One contiguous piece of a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Where in the owner's address space.
    pub addr: u64,
    /// How many bytes.
    pub len: u64,
    /// Offset of these bytes within the message payload.
    pub msg_offset: u64,
}

/// The memory a transfer touches: a first contiguous region, followed (for
/// combined blocks only) by further blocks of the descriptor. Iterate it
/// with [`crate::Engine::segments`] or copy it out with
/// [`crate::Engine::write_segments`]; when [`Body::is_contiguous`] the
/// first region is all there is and no engine access is needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Body {
    pub(crate) md: MdHandle,
    pub(crate) first: Region,
    pub(crate) pool_next: u32,
    pub(crate) pool_end: u32,
    pub(crate) rest: u64,
}

impl Body {
    pub(crate) const EMPTY: Body = Body {
        md: MdHandle::NONE,
        first: Region::EMPTY,
        pool_next: 0,
        pool_end: 0,
        rest: 0,
    };

    /// Total bytes.
    pub const fn len(&self) -> u64 {
        self.first.len + self.rest
    }

    /// True when no bytes move.
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when the whole body is [`Body::first`].
    pub const fn is_contiguous(&self) -> bool {
        self.rest == 0
    }

    /// The first contiguous region.
    pub const fn first(&self) -> Region {
        self.first
    }

    /// Address of the first region (the field alone, without copying the region).
    pub const fn first_addr(&self) -> u64 {
        self.first.addr
    }

    /// Length of the first region.
    pub const fn first_len(&self) -> u64 {
        self.first.len
    }
}

/// Allocation-free iterator over the segments of a [`Body`].
#[derive(Clone, Debug)]
pub struct Segments<'a> {
    pub(crate) pool: &'a [Region],
    pub(crate) first: Option<Region>,
    pub(crate) next: u32,
    pub(crate) end: u32,
    pub(crate) rest: u64,
    pub(crate) pos: u64,
}

impl Iterator for Segments<'_> {
    type Item = Segment;

    fn next(&mut self) -> Option<Segment> {
        if let Some(r) = self.first.take() {
            if r.len > 0 {
                let s = Segment {
                    addr: r.addr,
                    len: r.len,
                    msg_offset: self.pos,
                };
                self.pos += r.len;
                return Some(s);
            }
        }
        while self.rest > 0 && self.next < self.end {
            let r = *self.pool.get(self.next as usize)?;
            self.next += 1;
            let take = r.len.min(self.rest);
            if take == 0 {
                continue;
            }
            self.rest -= take;
            let s = Segment {
                addr: r.addr,
                len: take,
                msg_offset: self.pos,
            };
            self.pos += take;
            return Some(s);
        }
        None
    }
}

/// What to send back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Response {
    /// Nothing.
    None,
    /// An acknowledgment (header only).
    Ack(WireHeader),
    /// A reply: this header followed by the bytes of [`DeliveryPlan::body`]
    /// (read from the target's memory).
    Reply(WireHeader),
}

/// The result of a successful delivery: everything the fabric needs to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeliveryPlan {
    /// Operation delivered. Put and reply: write the payload into `body`.
    /// Get: read `body` and send it after the reply header. Ack: no bytes.
    pub op: Op,
    /// Portal index (target side) or the header's portal field.
    pub portal: u32,
    /// Memory descriptor used.
    pub md: MdHandle,
    /// Match entry that matched, or [`MatchHandle::NONE`].
    pub entry: MatchHandle,
    /// Write the encoded incoming header ([`crate::HEADER_LEN`] bytes) here.
    pub header_at: Option<u64>,
    /// Where the payload goes (put/reply) or comes from (get).
    pub body: Body,
    /// Position in the descriptor (see [`Event`]).
    pub md_offset: u64,
    /// Length the initiator asked for.
    pub rlength: u64,
    /// Length that moves.
    pub mlength: u64,
    /// `mlength < rlength` because the descriptor truncated.
    pub truncated: bool,
    /// Ack or reply to send.
    pub response: Response,
    /// The event describing this delivery.
    pub event: Event,
    /// Where that event went.
    pub posted: Posted,
    /// The match entry hit its threshold and was unlinked (an unlink event
    /// was posted too).
    pub unlinked: bool,
    /// Portal event handler to run once the bytes are in place.
    pub handler: Option<HandlerId>,
}

impl DeliveryPlan {
    /// A plan that delivers nothing: the starting value of a plan kept for
    /// [`crate::Engine::deliver_into`].
    pub const EMPTY: DeliveryPlan = DeliveryPlan {
        op: Op::Ack,
        portal: 0,
        md: MdHandle::NONE,
        entry: MatchHandle::NONE,
        header_at: None,
        body: Body::EMPTY,
        md_offset: 0,
        rlength: 0,
        mlength: 0,
        truncated: false,
        response: Response::None,
        event: Event::EMPTY,
        posted: Posted::NoQueue,
        unlinked: false,
        handler: None,
    };

    /// Run the portal's handler, if it has one. Call after the copy.
    pub fn run_handler(&self, h: &mut impl EventHandler) {
        if let Some(id) = self.handler {
            h.handle(id, &self.event);
        }
    }
}

/// What an initiator sends: the header, and where the put payload comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendPlan {
    /// Header to send.
    pub header: WireHeader,
    /// Put: the local bytes to send after the header. Get: empty.
    pub body: Body,
}

/// Delivery and drop counters, readable by a CLI.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Messages delivered (all ops).
    pub delivered: u64,
    /// Bytes planned to move by deliveries.
    pub bytes: u64,
    /// Events lost because a queue was full.
    pub eq_overflows: u64,
    pub(crate) drops: [u64; DropReason::COUNT],
}

impl Counters {
    /// Drops for one reason.
    pub const fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    /// All drops.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// `(reason, count)` for every reason.
    pub fn iter_drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.drops[*r as usize]))
    }
}
