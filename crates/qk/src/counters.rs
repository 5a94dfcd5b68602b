//! Per-port counters kept in the job's shared memory so `qk-stat` (and any rank) can read them.

/// Why the QK dropped a message. Every drop increments exactly one of these counters. The first
/// group is checked by the QK before the portals engine sees the header; the second mirrors the
/// portals engine's own reasons (`portals::DropReason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    /// Header fields that cannot be decoded (unknown op, bad flags, impossible lengths).
    Malformed = 0,
    /// The header claims a source other than the queue or connection it arrived on.
    ForgedSource,
    /// The header names another job.
    WrongJob,
    /// A large-message reference points outside the sender's part of the job heap.
    BadReference,
    /// A queue's framing was corrupted by its producer; the queue is abandoned.
    CorruptQueue,
    /// A completion names a transfer this rank never started.
    UnknownToken,
    /// A memory descriptor names memory this rank does not own; nothing was written.
    BadMemory,
    /// portals: header failed validation.
    BadHeader,
    /// portals: addressed to another process.
    WrongDestination,
    /// portals: portal index outside the table.
    InvalidPortal,
    /// portals: portal disabled.
    Disabled,
    /// portals: the portal's access control refused the sender.
    Forbidden,
    /// portals: no match entry accepted the message.
    NoMatch,
    /// portals: too long for the descriptor.
    TooLong,
    /// portals: descriptor not valid for the operation.
    InvalidMd,
    /// portals: match list links form a loop.
    LinkLoop,
    /// portals: unexpected reply or ack.
    Unexpected,
}

/// Number of drop reasons.
pub const N_DROP: usize = 17;

impl DropReason {
    /// All reasons in counter order.
    pub const ALL: [DropReason; N_DROP] = [
        DropReason::Malformed,
        DropReason::ForgedSource,
        DropReason::WrongJob,
        DropReason::BadReference,
        DropReason::CorruptQueue,
        DropReason::UnknownToken,
        DropReason::BadMemory,
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

    /// Short name used by `qk-stat`.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::ForgedSource => "forged_source",
            DropReason::WrongJob => "wrong_job",
            DropReason::BadReference => "bad_reference",
            DropReason::CorruptQueue => "corrupt_queue",
            DropReason::UnknownToken => "unknown_token",
            DropReason::BadMemory => "bad_memory",
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

    /// The QK counter for a portals drop reason.
    pub fn from_portals(r: portals::DropReason) -> DropReason {
        use portals::DropReason as P;
        match r {
            P::BadHeader => DropReason::BadHeader,
            P::WrongDestination => DropReason::WrongDestination,
            P::InvalidPortal => DropReason::InvalidPortal,
            P::Disabled => DropReason::Disabled,
            P::Forbidden => DropReason::Forbidden,
            P::NoMatch => DropReason::NoMatch,
            P::TooLong => DropReason::TooLong,
            P::InvalidMd => DropReason::InvalidMd,
            P::LinkLoop => DropReason::LinkLoop,
            P::Unexpected => DropReason::Unexpected,
        }
    }
}

/// Counter slots of a port (index into the port's counter array).
pub mod slot {
    /// Messages this port sent.
    pub const SENT: usize = 0;
    /// Payload bytes this port sent.
    pub const SENT_BYTES: usize = 1;
    /// Messages delivered into this port's memory.
    pub const DELIVERED: usize = 2;
    /// Bytes deposited into this port's memory.
    pub const DELIVERED_BYTES: usize = 3;
    /// Times a sender found a queue to this port... (sender side) full and had to wait.
    pub const SEND_WAITS: usize = 4;
    /// Large messages copied straight from the job heap (single copy).
    pub const LARGE_DIRECT: usize = 5;
    /// Large messages copied with cross-memory attach.
    pub const LARGE_CMA: usize = 6;
    /// Times the engine blocked (futex) because it was idle.
    pub const SLEEPS: usize = 7;
    /// First drop counter; drop reason `r` is at `DROP0 + r as usize`.
    pub const DROP0: usize = 8;
    /// Number of counter slots.
    pub const COUNT: usize = DROP0 + super::N_DROP;
}

/// A snapshot of one port's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PortStats {
    /// Port (local rank, or the node engine).
    pub port: u32,
    /// World rank of the port (u32::MAX for the node engine).
    pub rank: u32,
    /// Messages sent.
    pub sent: u64,
    /// Bytes sent.
    pub sent_bytes: u64,
    /// Messages delivered.
    pub delivered: u64,
    /// Bytes delivered.
    pub delivered_bytes: u64,
    /// Sender waits on a full queue.
    pub send_waits: u64,
    /// Large messages moved with one memcpy from the job heap.
    pub large_direct: u64,
    /// Large messages moved with cross-memory attach.
    pub large_cma: u64,
    /// Idle sleeps.
    pub sleeps: u64,
    /// Drops per reason, in [`DropReason::ALL`] order.
    pub drops: Vec<(String, u64)>,
}

impl PortStats {
    /// Total drops.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().map(|d| d.1).sum()
    }

    /// Drops for one reason.
    pub fn drops_for(&self, r: DropReason) -> u64 {
        self.drops.get(r as usize).map(|d| d.1).unwrap_or(0)
    }
}
