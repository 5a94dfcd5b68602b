//! Per-port counters kept in the job's shared memory so `qk-stat` (and any rank) can read them.

/// Why the QK dropped a message. Every drop increments exactly one of these counters. The fabric's
/// own reasons are checked before the portals engine sees the header; the engine's reasons are
/// carried as they are ([`DropReason::Portals`]), so a reason added to portals is counted here too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Header fields that cannot be decoded (unknown op, bad flags, impossible lengths).
    Malformed,
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
    /// A large get reply had to be bounced through the job heap (its descriptor is not one run
    /// of heap memory the initiator can read) and the heap had no room, with nothing in flight
    /// that would free any: the get is not answered. A larger heap (`heap_bytes_per_rank`) helps.
    NoHeapRoom,
    /// The portals engine dropped the message.
    Portals(portals::DropReason),
}

/// The fabric's own reasons, in counter order (before the portals engine's).
const FABRIC_REASONS: [DropReason; 8] = [
    DropReason::Malformed,
    DropReason::ForgedSource,
    DropReason::WrongJob,
    DropReason::BadReference,
    DropReason::CorruptQueue,
    DropReason::UnknownToken,
    DropReason::BadMemory,
    DropReason::NoHeapRoom,
];

/// Number of drop reasons.
pub const N_DROP: usize = FABRIC_REASONS.len() + portals::DropReason::COUNT;

impl DropReason {
    /// All reasons in counter order: the fabric's, then the portals engine's.
    pub const ALL: [DropReason; N_DROP] = {
        let mut all = [DropReason::Malformed; N_DROP];
        let mut i = 0;
        while i < FABRIC_REASONS.len() {
            all[i] = FABRIC_REASONS[i];
            i += 1;
        }
        let mut j = 0;
        while j < portals::DropReason::COUNT {
            all[FABRIC_REASONS.len() + j] = DropReason::Portals(portals::DropReason::ALL[j]);
            j += 1;
        }
        all
    };

    /// Position of this reason's counter among the drop counters ([`DropReason::ALL`] order).
    pub fn index(self) -> usize {
        match self {
            DropReason::Malformed => 0,
            DropReason::ForgedSource => 1,
            DropReason::WrongJob => 2,
            DropReason::BadReference => 3,
            DropReason::CorruptQueue => 4,
            DropReason::UnknownToken => 5,
            DropReason::BadMemory => 6,
            DropReason::NoHeapRoom => 7,
            DropReason::Portals(r) => FABRIC_REASONS.len() + r as usize,
        }
    }

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
            DropReason::NoHeapRoom => "no_heap_room",
            DropReason::Portals(r) => r.name(),
        }
    }
}

impl From<portals::DropReason> for DropReason {
    fn from(r: portals::DropReason) -> DropReason {
        DropReason::Portals(r)
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
    /// Large messages whose copy into this port's memory the sender shared
    /// ([`crate::copy_share`]).
    pub const LARGE_SHARED: usize = 8;
    /// First drop counter; drop reason `r` is at `DROP0 + r.index()`.
    pub const DROP0: usize = 9;
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
    /// Large messages of those moved from the job heap whose copy the sender shared.
    pub large_shared: u64,
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
        self.drops.get(r.index()).map(|d| d.1).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter_in_all_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
        }
        let names: std::collections::HashSet<_> =
            DropReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), N_DROP);
        assert_eq!(
            DropReason::from(portals::DropReason::NoMatch).name(),
            portals::DropReason::NoMatch.name()
        );
    }
}
