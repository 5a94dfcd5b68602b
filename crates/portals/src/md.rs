//! Memory descriptors (sections 7.2 to 7.5) and the placement logic that
//! decides where an incoming message lands in one.

use crate::plan::Body;
use crate::types::{EqHandle, MdHandle, Region};
use crate::wire::HEADER_LEN;

/// Who chooses the offset in a single or combined block descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OffsetMode {
    /// The sender's header carries the offset (parallel file server style).
    Sender,
    /// The descriptor keeps a local offset that advances by each message.
    Receiver,
}

/// What an independent-block or dynamic descriptor keeps of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Save {
    /// Only the encoded header ([`HEADER_LEN`] bytes).
    Header,
    /// Only the payload.
    Body,
    /// The header, then the payload right after it.
    Both,
}

impl Save {
    const fn header_len(self) -> u64 {
        match self {
            Save::Header | Save::Both => HEADER_LEN as u64,
            Save::Body => 0,
        }
    }
    const fn keeps_body(self) -> bool {
        !matches!(self, Save::Header)
    }
}

/// Options common to every descriptor kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MdOptions {
    /// Remote processes may put into it.
    pub put: bool,
    /// Remote processes may get from it.
    pub get: bool,
    /// Send an acknowledgment when a put asks for one.
    pub ack: bool,
    /// Deposit what fits instead of refusing a message that is too long
    /// (single, independent and combined blocks; a dynamic descriptor
    /// always allocates the whole message or refuses it).
    pub truncate: bool,
}

impl MdOptions {
    /// Put only, acks on, no truncation.
    pub const PUT: MdOptions = MdOptions {
        put: true,
        get: false,
        ack: true,
        truncate: false,
    };
    /// Get only.
    pub const GET: MdOptions = MdOptions {
        put: false,
        get: true,
        ack: false,
        truncate: false,
    };
    /// Put and get, acks on, no truncation.
    pub const PUT_GET: MdOptions = MdOptions {
        put: true,
        get: true,
        ack: true,
        truncate: false,
    };

    /// The same options with truncation on.
    pub const fn truncating(mut self) -> Self {
        self.truncate = true;
        self
    }
}

/// The four descriptor kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MdKind<'a> {
    /// 7.2: one contiguous region.
    Single {
        /// The memory.
        region: Region,
        /// Who picks the offset.
        offset: OffsetMode,
    },
    /// 7.3: one message per block, in order.
    Independent {
        /// The blocks (copied into the engine's block table).
        blocks: &'a [Region],
        /// Wrap around to the first block after the last.
        circular: bool,
        /// What to keep of each message.
        save: Save,
    },
    /// 7.4: the blocks form one buffer; messages scatter across block
    /// boundaries and gets gather across them.
    Combined {
        /// The blocks, in order (copied into the engine's block table).
        blocks: &'a [Region],
        /// Who picks the offset.
        offset: OffsetMode,
    },
    /// 7.5: the engine manages `region` as a heap, allocating space for
    /// each message; the application frees with [`crate::Engine::md_free`].
    Dynamic {
        /// The heap.
        region: Region,
        /// What to keep of each message.
        save: Save,
        /// Most messages held at once (records taken from the heap-record table).
        max_messages: u32,
    },
}

/// Everything needed to create a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MdSpec<'a> {
    /// Kind and memory.
    pub kind: MdKind<'a>,
    /// Options.
    pub options: MdOptions,
    /// Event queue for this descriptor's events (takes precedence over the
    /// portal's queue for target-side events; the only queue for initiator
    /// events: send, reply, ack).
    pub eq: Option<EqHandle>,
}

/// Allocation record of a dynamic descriptor (opaque; public for storage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapChunk {
    pub(crate) off: u64,
    pub(crate) len: u64,
}

impl HeapChunk {
    /// An unused record.
    pub const EMPTY: HeapChunk = HeapChunk { off: 0, len: 0 };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MdState {
    Free,
    Single {
        region: Region,
        mode: OffsetMode,
        local: u64,
    },
    Independent {
        base: u32,
        count: u32,
        next: u32,
        used: u32,
        circular: bool,
        save: Save,
    },
    Combined {
        base: u32,
        count: u32,
        total: u64,
        mode: OffsetMode,
        local: u64,
    },
    Dynamic {
        region: Region,
        save: Save,
        base: u32,
        cap: u32,
        live: u32,
    },
}

/// Memory descriptor slot (opaque; public only so callers can provide storage).
#[derive(Clone, Copy, Debug)]
pub struct MdSlot {
    pub(crate) gen: u32,
    pub(crate) next_free: u32,
    pub(crate) opts: MdOptions,
    pub(crate) eq: EqHandle,
    pub(crate) state: MdState,
    pub(crate) pending_acks: u32,
    pub(crate) pending_replies: u32,
}

impl MdSlot {
    /// An unused slot.
    pub const EMPTY: MdSlot = MdSlot {
        gen: 0,
        next_free: u32::MAX,
        opts: MdOptions::PUT,
        eq: EqHandle::NONE,
        state: MdState::Free,
        pending_acks: 0,
        pending_replies: 0,
    };

    #[inline]
    pub(crate) fn is(&self, h: MdHandle) -> bool {
        (self.gen == h.gen) & !matches!(self.state, MdState::Free)
    }

    /// Block-table range this descriptor owns.
    pub(crate) fn block_range(&self) -> Option<(u32, u32)> {
        match self.state {
            MdState::Independent { base, count, .. } | MdState::Combined { base, count, .. } => {
                Some((base, count))
            }
            _ => None,
        }
    }

    /// Heap-record range this descriptor owns.
    pub(crate) fn chunk_range(&self) -> Option<(u32, u32)> {
        match self.state {
            MdState::Dynamic { base, cap, .. } => Some((base, cap)),
            _ => None,
        }
    }
}

/// Why a descriptor could not take a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Miss {
    /// Does not fit (follow the second link).
    TooLong,
    /// Not valid for this message (follow the third link).
    Invalid,
}

/// Where a message goes in a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Place {
    pub header_at: Option<u64>,
    pub body: Body,
    pub md_offset: u64,
    pub mlength: u64,
    pub truncated: bool,
}

impl Place {
    /// Nothing placed (a value to assign over).
    pub(crate) const EMPTY: Place = Place {
        header_at: None,
        body: Body::EMPTY,
        md_offset: 0,
        mlength: 0,
        truncated: false,
    };
}

/// How the descriptor is being used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Remote put: write; offset from the header or the descriptor.
    Put { offset: u64 },
    /// Remote get: read.
    Get { offset: u64 },
    /// Reply arriving at the initiator: write at this exact offset.
    Reply { offset: u64 },
}

/// Fit `want` bytes at `off` in a buffer of `len` bytes.
#[inline]
pub(crate) fn fit(len: u64, off: u64, want: u64, truncate: bool) -> Result<(u64, bool), Miss> {
    if off > len {
        return Err(Miss::TooLong);
    }
    let avail = len - off;
    if want <= avail {
        Ok((want, false))
    } else if truncate {
        Ok((avail, true))
    } else {
        Err(Miss::TooLong)
    }
}

/// Map the virtual range `[off, off+len)` of a combined descriptor onto its
/// blocks. The caller guarantees the range lies inside the blocks.
pub(crate) fn combined_body(
    md: MdHandle,
    blocks: &[Region],
    base: u32,
    count: u32,
    off: u64,
    len: u64,
) -> Body {
    let mut cum = 0u64;
    let end = base + count;
    let mut i = base;
    while i < end {
        let b = blocks[i as usize];
        if off < cum + b.len || (len == 0 && off == cum + b.len && i + 1 == end) {
            let inner = off - cum;
            let take = (b.len - inner).min(len);
            return Body {
                md,
                first: b.sub(inner, take),
                pool_next: i + 1,
                pool_end: end,
                rest: len - take,
            };
        }
        cum += b.len;
        i += 1;
    }
    Body {
        md,
        first: Region::EMPTY,
        pool_next: end,
        pool_end: end,
        rest: 0,
    }
}

#[inline]
fn contiguous(md: MdHandle, r: Region) -> Body {
    Body {
        md,
        first: r,
        pool_next: 0,
        pool_end: 0,
        rest: 0,
    }
}

/// Decide where `length` bytes go in (or come from) descriptor `slot`, and
/// commit the descriptor's state change (local offset, next block, heap
/// allocation) when it succeeds. Nothing changes on a miss.
#[inline(always)]
pub(crate) fn place(
    slot: &mut MdSlot,
    h: MdHandle,
    blocks: &[Region],
    chunks: &mut [HeapChunk],
    access: Access,
    length: u64,
) -> Result<Place, Miss> {
    let mut p = Place::EMPTY;
    place_into(slot, h, blocks, chunks, access, length, &mut p).map(|()| p)
}

/// [`place`] writing into `out` (left unspecified on a miss). The common case, a put into a
/// sender-managed single block, is inline and writes `out`'s fields where they are: a placement
/// built and then moved as a whole was written with narrow stores and read back with wide loads,
/// a store-forwarding stall that cost a fifth of the delivery path's time.
#[inline(always)]
pub(crate) fn place_into(
    slot: &mut MdSlot,
    h: MdHandle,
    blocks: &[Region],
    chunks: &mut [HeapChunk],
    access: Access,
    length: u64,
    out: &mut Place,
) -> Result<(), Miss> {
    if let (
        Access::Put { offset },
        MdState::Single {
            region,
            mode: OffsetMode::Sender,
            ..
        },
        true,
    ) = (access, &slot.state, slot.opts.put)
    {
        let (m, truncated) = fit(region.len, offset, length, slot.opts.truncate)?;
        out.header_at = None;
        out.body.md = h;
        out.body.first = region.sub(offset, m);
        out.body.pool_next = 0;
        out.body.pool_end = 0;
        out.body.rest = 0;
        out.md_offset = offset;
        out.mlength = m;
        out.truncated = truncated;
        return Ok(());
    }
    *out = place_any(slot, h, blocks, chunks, access, length)?;
    Ok(())
}

/// [`place`] for every kind of descriptor and access.
#[inline(never)]
fn place_any(
    slot: &mut MdSlot,
    h: MdHandle,
    blocks: &[Region],
    chunks: &mut [HeapChunk],
    access: Access,
    length: u64,
) -> Result<Place, Miss> {
    let o = slot.opts;
    let permitted = match access {
        Access::Put { .. } => o.put,
        Access::Get { .. } => o.get,
        Access::Reply { .. } => true,
    };
    if !permitted {
        return Err(Miss::Invalid);
    }
    match &mut slot.state {
        MdState::Free => Err(Miss::Invalid),
        MdState::Single {
            region,
            mode,
            local,
        } => {
            let (off, advance) = match access {
                Access::Put { offset } | Access::Get { offset } => match mode {
                    OffsetMode::Sender => (offset, false),
                    OffsetMode::Receiver => (*local, true),
                },
                Access::Reply { offset } => (offset, false),
            };
            let (m, truncated) = fit(region.len, off, length, o.truncate)?;
            if advance {
                *local = off + m;
            }
            Ok(Place {
                header_at: None,
                body: contiguous(h, region.sub(off, m)),
                md_offset: off,
                mlength: m,
                truncated,
            })
        }
        MdState::Combined {
            base,
            count,
            total,
            mode,
            local,
        } => {
            let (off, advance) = match access {
                Access::Put { offset } | Access::Get { offset } => match mode {
                    OffsetMode::Sender => (offset, false),
                    OffsetMode::Receiver => (*local, true),
                },
                Access::Reply { offset } => (offset, false),
            };
            let (m, truncated) = fit(*total, off, length, o.truncate)?;
            if advance {
                *local = off + m;
            }
            Ok(Place {
                header_at: None,
                body: combined_body(h, blocks, *base, *count, off, m),
                md_offset: off,
                mlength: m,
                truncated,
            })
        }
        MdState::Independent {
            base,
            count,
            next,
            used,
            circular,
            save,
        } => {
            if !*circular && *used >= *count {
                return Err(Miss::Invalid);
            }
            let block = blocks[(*base + *next) as usize];
            let (header_at, hdr, want) = match access {
                Access::Get { .. } => (None, 0, length),
                _ => {
                    let hdr = save.header_len();
                    let want = if save.keeps_body() { length } else { 0 };
                    (Some(block.addr), hdr, want)
                }
            };
            if hdr > block.len {
                return Err(Miss::TooLong);
            }
            let (m, truncated) = fit(block.len, hdr, want, o.truncate)?;
            let index = *next as u64;
            *next += 1;
            if *next == *count {
                *next = 0;
            }
            *used = used.saturating_add(1);
            Ok(Place {
                header_at: if hdr > 0 { header_at } else { None },
                body: contiguous(h, block.sub(hdr, m)),
                md_offset: index,
                mlength: m,
                truncated,
            })
        }
        MdState::Dynamic {
            region,
            save,
            base,
            cap,
            live,
        } => {
            if matches!(access, Access::Get { .. }) {
                return Err(Miss::Invalid);
            }
            let hdr = save.header_len();
            let body = if save.keeps_body() { length } else { 0 };
            // Keep allocations 8-byte aligned and never empty, so that every
            // message has a distinct offset to free.
            let need = hdr.saturating_add(body).max(1).saturating_add(7) & !7;
            if *live == *cap {
                return Err(Miss::TooLong);
            }
            let recs = &mut chunks[*base as usize..(*base + *cap) as usize];
            let mut prev_end = 0u64;
            let mut at = *live as usize;
            for (i, c) in recs[..*live as usize].iter().enumerate() {
                if c.off - prev_end >= need {
                    at = i;
                    break;
                }
                prev_end = c.off + c.len;
            }
            if at == *live as usize && region.len.saturating_sub(prev_end) < need {
                return Err(Miss::TooLong);
            }
            recs.copy_within(at..*live as usize, at + 1);
            recs[at] = HeapChunk {
                off: prev_end,
                len: need,
            };
            *live += 1;
            Ok(Place {
                header_at: if hdr > 0 {
                    Some(region.addr + prev_end)
                } else {
                    None
                },
                body: contiguous(h, region.sub(prev_end + hdr, body)),
                md_offset: prev_end,
                mlength: body,
                truncated: false,
            })
        }
    }
}

/// Length of the buffer a descriptor presents as an initiator source or a
/// reply target (single and combined only).
pub(crate) fn linear_len(state: &MdState) -> Option<u64> {
    match state {
        MdState::Single { region, .. } => Some(region.len),
        MdState::Combined { total, .. } => Some(*total),
        _ => None,
    }
}
