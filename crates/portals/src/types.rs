//! Small value types shared by every part of the engine: process ids,
//! memory regions, handles, access control entries.

/// Wildcard for a source group id or rank in a match entry or an access
/// control entry. Never valid as the source of a message on the wire.
pub const ANY: u32 = u32::MAX;

/// Who sent a message: the group (job) id and the rank inside that group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(C)]
pub struct ProcessId {
    /// Source group identifier (the job id in Puma).
    pub group: u32,
    /// Rank within the group.
    pub rank: u32,
}

impl ProcessId {
    /// A process id.
    pub const fn new(group: u32, rank: u32) -> Self {
        Self { group, rank }
    }
}

/// A range of memory in whatever address space the owner of the bytes uses:
/// virtual addresses or shared-memory offsets (hosted QK), physical addresses
/// (bare-metal QK), or plain indices (a simulator). The engine never
/// dereferences it; it only computes sub-ranges of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Region {
    /// First address of the range.
    pub addr: u64,
    /// Number of bytes.
    pub len: u64,
}

impl Region {
    /// The empty region at address 0.
    pub const EMPTY: Region = Region { addr: 0, len: 0 };

    /// A region of `len` bytes at `addr`.
    pub const fn new(addr: u64, len: u64) -> Self {
        Self { addr, len }
    }

    /// True when `addr + len` does not overflow the address space.
    pub const fn is_valid(&self) -> bool {
        self.addr.checked_add(self.len).is_some()
    }

    /// The sub-range starting `offset` bytes in, `len` bytes long. The
    /// caller guarantees `offset + len <= self.len`.
    #[inline]
    pub(crate) const fn sub(&self, offset: u64, len: u64) -> Region {
        Region {
            addr: self.addr + offset,
            len,
        }
    }
}

macro_rules! handle {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        ///
        /// A handle carries the slot index and the slot's generation; once the
        /// object is released the generation moves on and the handle is
        /// rejected as stale.
        // Aligned as one 64-bit word so a handle is moved with one load and one store: as two
        // 32-bit halves, the delivery path wrote a descriptor handle in halves and read it back
        // as part of a wider load, which stalled store forwarding.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(C, align(8))]
        pub struct $name {
            pub(crate) idx: u32,
            pub(crate) gen: u32,
        }

        impl $name {
            /// A handle that never names a live object.
            pub const NONE: $name = $name { idx: u32::MAX, gen: 0 };

            /// Slot index (for diagnostics).
            pub const fn index(&self) -> u32 {
                self.idx
            }

            /// Generation of the slot when the handle was issued.
            pub const fn generation(&self) -> u32 {
                self.gen
            }

            /// The handle packed into 64 bits (generation high, index low),
            /// as carried in wire headers.
            pub const fn to_cookie(&self) -> u64 {
                ((self.gen as u64) << 32) | self.idx as u64
            }

            /// Inverse of [`Self::to_cookie`].
            pub const fn from_cookie(cookie: u64) -> Self {
                Self {
                    idx: cookie as u32,
                    gen: (cookie >> 32) as u32,
                }
            }
        }
    };
}

handle!(
    /// Names a match list entry.
    MatchHandle
);
handle!(
    /// Names a memory descriptor.
    MdHandle
);
handle!(
    /// Names an event queue.
    EqHandle
);

/// Identifies an event handler the owner of the engine registered for a
/// portal (section 7.8). The engine only reports which handler to run; the
/// fabric runs it after it has copied the bytes (or at once for a discard).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HandlerId(pub u16);

/// Access control entry of a portal: which job and rank may put or get.
/// The default denies everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Acl {
    /// Allowed source group, or [`ANY`].
    pub group: u32,
    /// Allowed source rank, or [`ANY`].
    pub rank: u32,
    /// Puts are allowed.
    pub put: bool,
    /// Gets are allowed.
    pub get: bool,
}

impl Acl {
    /// Nobody may put or get (the initial state of every portal).
    pub const DENY_ALL: Acl = Acl {
        group: ANY,
        rank: ANY,
        put: false,
        get: false,
    };
    /// Everybody may put and get.
    pub const ALLOW_ALL: Acl = Acl {
        group: ANY,
        rank: ANY,
        put: true,
        get: true,
    };

    /// Any rank of job `group` may put and get.
    pub const fn job(group: u32) -> Acl {
        Acl {
            group,
            rank: ANY,
            put: true,
            get: true,
        }
    }

    #[inline]
    pub(crate) fn permits(&self, src: ProcessId, is_get: bool) -> bool {
        let who = (self.group == ANY) | (self.group == src.group);
        let rank = (self.rank == ANY) | (self.rank == src.rank);
        let op = if is_get { self.get } else { self.put };
        who & rank & op
    }
}

impl Default for Acl {
    fn default() -> Self {
        Acl::DENY_ALL
    }
}
