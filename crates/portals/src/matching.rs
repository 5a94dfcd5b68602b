//! Match lists (section 7.6) and the portal table entries they hang from
//! (section 7.1).

use crate::types::{Acl, EqHandle, HandlerId, MatchHandle, MdHandle, ProcessId, ANY};

pub(crate) const NIL: u32 = u32::MAX;

/// Where to go from a match entry when its descriptor cannot take the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Link {
    /// The next entry in list order (the default for both links).
    Next,
    /// A specific entry (of the same portal). If that entry has been
    /// unlinked, the search ends there.
    Entry(MatchHandle),
    /// Stop searching: the message is discarded.
    End,
}

/// When a match entry unlinks itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unlink {
    /// Stays until unlinked by the application.
    Never,
    /// Unlinks after this many messages were delivered through it
    /// (`After(1)` is use-once).
    After(u32),
}

/// What a match entry accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatchSpec {
    /// Source group id and rank; either may be [`ANY`].
    pub source: ProcessId,
    /// Match bits.
    pub match_bits: u64,
    /// Bits set here are ignored when comparing match bits.
    pub ignore_bits: u64,
    /// Unlink policy.
    pub unlink: Unlink,
}

impl MatchSpec {
    /// Matches exactly `match_bits` from anybody; never unlinks.
    pub const fn new(match_bits: u64) -> Self {
        MatchSpec {
            source: ProcessId {
                group: ANY,
                rank: ANY,
            },
            match_bits,
            ignore_bits: 0,
            unlink: Unlink::Never,
        }
    }

    /// Matches every message.
    pub const fn any() -> Self {
        MatchSpec::new(0).ignore(u64::MAX)
    }

    /// Only from this group and rank (either may be [`ANY`]).
    pub const fn from(mut self, group: u32, rank: u32) -> Self {
        self.source = ProcessId { group, rank };
        self
    }

    /// Ignore these match bits.
    pub const fn ignore(mut self, mask: u64) -> Self {
        self.ignore_bits = mask;
        self
    }

    /// Unlink after the first delivery.
    pub const fn use_once(self) -> Self {
        self.threshold(1)
    }

    /// Unlink after `n` deliveries.
    pub const fn threshold(mut self, n: u32) -> Self {
        self.unlink = Unlink::After(n);
        self
    }
}

/// Where to insert relative to an existing entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Position {
    /// Before the anchor.
    Before,
    /// After the anchor.
    After,
}

/// Match entry slot (opaque; public only so callers can provide storage).
/// `repr(C)` with the fields the match loop reads first, so that they share
/// a cache line.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct EntrySlot {
    pub(crate) bits: u64,
    pub(crate) care: u64,
    pub(crate) group: u32,
    pub(crate) rank: u32,
    /// First link: next entry on no match (list order). Also the free-list link.
    pub(crate) next: u32,
    pub(crate) gen: u32,
    pub(crate) md: MdHandle,
    pub(crate) portal: u32,
    pub(crate) prev: u32,
    pub(crate) uses: u32,
    /// 0 means never unlink.
    pub(crate) threshold: u32,
    /// Second link: message too long for the descriptor.
    pub(crate) too_long: Link,
    /// Third link: descriptor not valid.
    pub(crate) invalid: Link,
    pub(crate) live: bool,
}

impl EntrySlot {
    /// An unused slot.
    pub const EMPTY: EntrySlot = EntrySlot {
        gen: 0,
        live: false,
        portal: 0,
        group: ANY,
        rank: ANY,
        bits: 0,
        care: 0,
        md: MdHandle::NONE,
        next: NIL,
        prev: NIL,
        too_long: Link::Next,
        invalid: Link::Next,
        uses: 0,
        threshold: 0,
    };

    /// Does a message header from `src` with `match_bits` satisfy this entry? Branch-free.
    #[inline(always)]
    pub(crate) fn matches_parts(&self, src: ProcessId, match_bits: u64) -> bool {
        let bits = ((self.bits ^ match_bits) & self.care) == 0;
        let group = (self.group == ANY) | (self.group == src.group);
        let rank = (self.rank == ANY) | (self.rank == src.rank);
        bits & group & rank
    }

    #[inline]
    pub(crate) fn is(&self, h: MatchHandle) -> bool {
        self.live & (self.gen == h.gen)
    }
}

/// What a portal table entry points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    None,
    List { head: u32, tail: u32 },
    Md(MdHandle),
}

/// Portal table slot (opaque; public only so callers can provide storage).
#[derive(Clone, Copy, Debug)]
pub struct PortalSlot {
    pub(crate) enabled: bool,
    pub(crate) acl: Acl,
    pub(crate) eq: EqHandle,
    pub(crate) handler: Option<HandlerId>,
    pub(crate) target: Target,
}

impl PortalSlot {
    /// A disabled entry with nothing attached that admits nobody.
    pub const EMPTY: PortalSlot = PortalSlot {
        enabled: false,
        acl: Acl::DENY_ALL,
        eq: EqHandle::NONE,
        handler: None,
        target: Target::None,
    };
}

/// A snapshot of a portal table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortalInfo {
    /// Enabled.
    pub enabled: bool,
    /// Access control entry.
    pub acl: Acl,
    /// Event queue, if any.
    pub eq: Option<EqHandle>,
    /// Event handler, if any.
    pub handler: Option<HandlerId>,
    /// Descriptor attached directly, if any.
    pub md: Option<MdHandle>,
    /// Number of match entries in its list.
    pub entries: u32,
}
