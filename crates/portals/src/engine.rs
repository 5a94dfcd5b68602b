//! The engine: portal table management, delivery planning, initiator helpers.

use crate::error::Error;
use crate::event::{post, reserve, EqSlot, Event, EventKind, Posted, Slot};
use crate::matching::{
    EntrySlot, Link, MatchSpec, PortalInfo, PortalSlot, Position, Target, Unlink, NIL,
};
use crate::md::{
    combined_body, fit, linear_len, place, place_into, Access, HeapChunk, MdKind, MdSlot, MdSpec,
    MdState, Miss, OffsetMode, Place,
};
use crate::plan::{
    Body, Counters, DeliveryPlan, DropReason, Dropped, Response, Segment, Segments, SendPlan,
};
use crate::store::{Config, Store, Tables};
use crate::types::{Acl, EqHandle, HandlerId, MatchHandle, MdHandle, ProcessId, Region, ANY};
use crate::wire::{flags, HeaderError, Limits, Op, PlainPut, WireHeader, NO_MD, WIRE_VERSION};

/// Arguments of [`Engine::prepare_put`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PutArgs {
    /// Local descriptor holding the payload (single or combined).
    pub md: MdHandle,
    /// Where the payload starts in it.
    pub local_offset: u64,
    /// Payload length.
    pub length: u64,
    /// Receiving process.
    pub target: ProcessId,
    /// Portal index at the target.
    pub portal: u32,
    /// Match bits.
    pub match_bits: u64,
    /// Offset at the target (used by sender-managed descriptors).
    pub remote_offset: u64,
    /// Ask for an acknowledgment (posted as an ack event on `md`'s queue).
    pub ack: bool,
    /// User data for the target's event.
    pub hdr_data: u64,
}

/// A put [`Engine::put_fast`] takes, with what its checks found: see [`Engine::put_ticket`] and
/// [`Engine::put_fast_again`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PutTicket {
    args: PutArgs,
    eq: EqHandle,
    src: Region,
}

impl PutTicket {
    /// The put this ticket repeats.
    #[inline(always)]
    pub fn args(&self) -> &PutArgs {
        &self.args
    }

    /// The local bytes it sends (inside its descriptor's block).
    #[inline(always)]
    pub fn src(&self) -> Region {
        self.src
    }
}

/// Arguments of [`Engine::prepare_get`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GetArgs {
    /// Local descriptor the reply lands in (single or combined).
    pub md: MdHandle,
    /// Where in it.
    pub local_offset: u64,
    /// Bytes wanted.
    pub length: u64,
    /// Process to read from.
    pub target: ProcessId,
    /// Portal index at the target.
    pub portal: u32,
    /// Match bits.
    pub match_bits: u64,
    /// Offset at the target (used by sender-managed descriptors).
    pub remote_offset: u64,
    /// User data for the target's event.
    pub hdr_data: u64,
}

/// A snapshot of a match entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatchInfo {
    /// Portal it belongs to.
    pub portal: u32,
    /// Its descriptor.
    pub md: MdHandle,
    /// Deliveries through it so far.
    pub uses: u32,
    /// Next entry in list order.
    pub next: Option<MatchHandle>,
}

/// The portals engine: every table, sized once, and the delivery logic.
///
/// See the crate documentation for the life of a message.
#[derive(Clone, Debug)]
pub struct Engine<S: Store> {
    store: S,
    cfg: Config,
    limits: Limits,
    counters: Counters,
    free_entries: u32,
    free_mds: u32,
    /// The fast put path's last look-up, kept while nothing it depends on changed.
    last: LastMatch,
}

/// What [`Engine::deliver_plain_put_fast_taking`] found for the last put it looked up: for a
/// portal, source and match bits, the first matching entry, its descriptor (a single
/// sender-managed block that takes puts), that block and the queue its events go to. Valid while
/// `at == changes`: every change of the tables bumps `changes` except those that cannot alter
/// this answer (a fast delivery: an entry's use count, which is read afresh, and events; event
/// takes; send events), so a put with the same key, seen again, skips the portal checks, the walk
/// and the descriptor checks. Its `Debug` form is empty: it is not state the API can observe.
#[derive(Clone, Copy)]
struct LastMatch {
    /// Changes of the tables since the engine was made (wrapping).
    changes: u64,
    /// `changes` when the fields below were found; `u64::MAX`: never (the count starts at 0).
    at: u64,
    portal: u32,
    src: ProcessId,
    match_bits: u64,
    entry: u32,
    entry_gen: u32,
    threshold: u32,
    md: MdHandle,
    region: Region,
    truncate: bool,
    eq: EqHandle,
}

impl LastMatch {
    const NONE: LastMatch = LastMatch {
        changes: 0,
        at: u64::MAX,
        portal: 0,
        src: ProcessId { group: 0, rank: 0 },
        match_bits: 0,
        entry: 0,
        entry_gen: 0,
        threshold: 0,
        md: MdHandle::NONE,
        region: Region::EMPTY,
        truncate: false,
        eq: EqHandle::NONE,
    };

    /// The tables are about to change in a way the last look-up may depend on: forget it.
    #[inline(always)]
    fn changed(&mut self) {
        self.changes = self.changes.wrapping_add(1);
    }
}

impl core::fmt::Debug for LastMatch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("LastMatch")
    }
}

#[cfg(feature = "alloc")]
impl Engine<crate::store::BoxStore> {
    /// Allocate every table once, at the sizes `config` gives (feature
    /// `alloc`). Nothing is allocated afterwards.
    pub fn new(config: Config) -> Result<Self, Error> {
        let store = crate::store::BoxStore::new(&config);
        Self::with_store(config, store)
    }
}

fn check_len(table: &'static str, need: u32, have: usize) -> Result<(), Error> {
    if (need as usize) > have {
        return Err(Error::StoreTooSmall { table, need, have });
    }
    if need == u32::MAX {
        return Err(Error::Invalid("table sizes must be below 2^32 - 1"));
    }
    Ok(())
}

/// First offset in a pool of `pool` slots where `n` slots are free, given
/// the ranges in use.
fn find_range<I>(pool: u32, used: I, n: u32) -> Option<u32>
where
    I: Iterator<Item = (u32, u32)> + Clone,
{
    let candidates = core::iter::once(0).chain(used.clone().map(|(b, l)| b + l));
    for c in candidates {
        let end = c.checked_add(n)?;
        if end > pool {
            continue;
        }
        let clash = used.clone().any(|(b, l)| l > 0 && b < end && c < b + l);
        if !clash {
            return Some(c);
        }
    }
    None
}

fn check_region(r: Region) -> Result<(), Error> {
    if r.is_valid() {
        Ok(())
    } else {
        Err(Error::BadRegion {
            addr: r.addr,
            len: r.len,
        })
    }
}

/// Remove entry `idx` from its portal's list and release the slot.
fn unlink_entry(t: &mut Tables<'_>, free_head: &mut u32, idx: u32) {
    let e = t.entries[idx as usize];
    if e.prev != NIL {
        t.entries[e.prev as usize].next = e.next;
    }
    if e.next != NIL {
        t.entries[e.next as usize].prev = e.prev;
    }
    if let Target::List { head, tail } = &mut t.portals[e.portal as usize].target {
        if *head == idx {
            *head = e.next;
        }
        if *tail == idx {
            *tail = e.prev;
        }
        if *head == NIL {
            t.portals[e.portal as usize].target = Target::None;
        }
    }
    let s = &mut t.entries[idx as usize];
    s.live = false;
    s.gen = s.gen.wrapping_add(1);
    s.prev = NIL;
    s.next = *free_head;
    *free_head = idx;
}

#[cfg(test)]
impl<S: Store + Clone + core::fmt::Debug> Engine<S> {
    /// The engine's state as the API can observe it: its `Debug` form with every event slot
    /// outside a live queue's window (head, `len` events on) blanked, since no call can read
    /// such a slot before a new event is written to it. Tests compare paths that differ only in
    /// what a taken event's slot still holds.
    pub(crate) fn observable_state(&self) -> std::string::String {
        let mut e = self.clone();
        let t = e.store.tables();
        let mut live = std::vec![false; t.events.len()];
        for q in t.eqs.iter().filter(|q| q.live) {
            for k in 0..q.len {
                let at = q.head + k;
                let at = if at >= q.cap { at - q.cap } else { at };
                if let Some(l) = live.get_mut((q.base + at) as usize) {
                    *l = true;
                }
            }
        }
        for (slot, l) in t.events.iter_mut().zip(live) {
            if !l {
                *slot = Event::EMPTY;
            }
        }
        std::format!("{e:?}")
    }
}

#[cfg(test)]
impl<S: Store> Engine<S> {
    /// Forgets the fast put path's last look-up, so the next put is looked up in full (tests
    /// hold a cached engine to one that never remembers).
    pub(crate) fn forget_last_match(&mut self) {
        self.last.changed();
    }
}

impl<S: Store> Engine<S> {
    /// Build an engine over `store`, whose tables must be at least as large
    /// as `config` asks. Every slot is reset. Never allocates.
    pub fn with_store(config: Config, mut store: S) -> Result<Self, Error> {
        if config.id.group == ANY || config.id.rank == ANY {
            return Err(Error::Invalid(
                "the engine's own process id cannot be a wildcard",
            ));
        }
        if config.portals == 0 {
            return Err(Error::Invalid("the portal table needs at least one entry"));
        }
        let t = store.tables();
        check_len("portal", config.portals, t.portals.len())?;
        check_len("match entry", config.match_entries, t.entries.len())?;
        check_len("memory descriptor", config.mds, t.mds.len())?;
        check_len("block", config.blocks, t.blocks.len())?;
        check_len("event queue", config.eqs, t.eqs.len())?;
        check_len("event", config.events, t.events.len())?;
        check_len("heap record", config.heap_records, t.chunks.len())?;
        t.portals.fill(PortalSlot::EMPTY);
        t.blocks.fill(Region::EMPTY);
        t.eqs.fill(EqSlot::EMPTY);
        t.events.fill(Event::EMPTY);
        t.chunks.fill(HeapChunk::EMPTY);
        let n = config.match_entries;
        for (i, e) in t.entries.iter_mut().enumerate().take(n as usize) {
            *e = EntrySlot::EMPTY;
            e.next = if i as u32 + 1 < n { i as u32 + 1 } else { NIL };
        }
        let n = config.mds;
        for (i, m) in t.mds.iter_mut().enumerate().take(n as usize) {
            *m = MdSlot::EMPTY;
            m.next_free = if i as u32 + 1 < n { i as u32 + 1 } else { NIL };
        }
        Ok(Engine {
            store,
            limits: Limits {
                portals: config.portals,
                max_message: config.max_message,
            },
            counters: Counters::default(),
            free_entries: if config.match_entries > 0 { 0 } else { NIL },
            free_mds: if config.mds > 0 { 0 } else { NIL },
            cfg: config,
            last: LastMatch::NONE,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The limits incoming headers are validated against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Delivery and drop counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Give the storage back.
    pub fn into_store(self) -> S {
        self.store
    }

    /// Decode and validate a header against this engine's limits.
    pub fn decode(&self, bytes: &[u8]) -> Result<WireHeader, HeaderError> {
        WireHeader::decode(bytes, &self.limits)
    }

    // ----------------------------------------------------------------- portals

    fn portal_mut(&mut self, portal: u32) -> Result<&mut PortalSlot, Error> {
        if portal >= self.cfg.portals {
            return Err(Error::PortalIndex {
                portal,
                size: self.cfg.portals,
            });
        }
        self.last.changed();
        Ok(&mut self.store.tables().portals[portal as usize])
    }

    fn eq_live(&self, h: EqHandle) -> bool {
        self.store
            .tables_ref()
            .eqs
            .get(h.idx as usize)
            .is_some_and(|q| q.live & (q.gen == h.gen) & (h.idx < self.cfg.eqs))
    }

    fn md_live(&self, h: MdHandle) -> bool {
        h.idx < self.cfg.mds
            && self
                .store
                .tables_ref()
                .mds
                .get(h.idx as usize)
                .is_some_and(|m| m.is(h))
    }

    fn entry_live(&self, h: MatchHandle) -> bool {
        h.idx < self.cfg.match_entries
            && self
                .store
                .tables_ref()
                .entries
                .get(h.idx as usize)
                .is_some_and(|e| e.is(h))
    }

    /// Let messages in.
    pub fn portal_enable(&mut self, portal: u32) -> Result<(), Error> {
        self.portal_mut(portal)?.enabled = true;
        Ok(())
    }

    /// Turn messages away (they are dropped and counted as [`DropReason::Disabled`]).
    pub fn portal_disable(&mut self, portal: u32) -> Result<(), Error> {
        self.portal_mut(portal)?.enabled = false;
        Ok(())
    }

    /// Set the access control entry.
    pub fn portal_set_acl(&mut self, portal: u32, acl: Acl) -> Result<(), Error> {
        self.portal_mut(portal)?.acl = acl;
        Ok(())
    }

    /// Attach (or with `None` detach) the portal's event queue.
    pub fn portal_set_eq(&mut self, portal: u32, eq: Option<EqHandle>) -> Result<(), Error> {
        if let Some(h) = eq {
            if !self.eq_live(h) {
                return Err(Error::StaleHandle("event queue"));
            }
        }
        self.portal_mut(portal)?.eq = eq.unwrap_or(EqHandle::NONE);
        Ok(())
    }

    /// Set (or clear) the event handler the fabric runs after each deposit
    /// or discard on this portal (section 7.8).
    pub fn portal_set_handler(
        &mut self,
        portal: u32,
        handler: Option<HandlerId>,
    ) -> Result<(), Error> {
        self.portal_mut(portal)?.handler = handler;
        Ok(())
    }

    /// Point the portal straight at a descriptor (no match list).
    pub fn portal_attach_md(&mut self, portal: u32, md: MdHandle) -> Result<(), Error> {
        if !self.md_live(md) {
            return Err(Error::StaleHandle("memory descriptor"));
        }
        let p = self.portal_mut(portal)?;
        if let Target::List { .. } = p.target {
            return Err(Error::PortalBusy {
                portal,
                what: "a match list",
            });
        }
        p.target = Target::Md(md);
        Ok(())
    }

    /// Remove a directly attached descriptor.
    pub fn portal_detach_md(&mut self, portal: u32) -> Result<(), Error> {
        let p = self.portal_mut(portal)?;
        if let Target::Md(_) = p.target {
            p.target = Target::None;
        }
        Ok(())
    }

    /// Snapshot of a portal table entry.
    pub fn portal_info(&self, portal: u32) -> Result<PortalInfo, Error> {
        if portal >= self.cfg.portals {
            return Err(Error::PortalIndex {
                portal,
                size: self.cfg.portals,
            });
        }
        let t = self.store.tables_ref();
        let p = t.portals[portal as usize];
        let (md, entries) = match p.target {
            Target::None => (None, 0),
            Target::Md(m) => (Some(m), 0),
            Target::List { head, .. } => {
                let mut n = 0u32;
                let mut cur = head;
                while cur != NIL && n < self.cfg.match_entries {
                    n += 1;
                    cur = t.entries[cur as usize].next;
                }
                (None, n)
            }
        };
        Ok(PortalInfo {
            enabled: p.enabled,
            acl: p.acl,
            eq: (p.eq != EqHandle::NONE).then_some(p.eq),
            handler: p.handler,
            md,
            entries,
        })
    }

    // ---------------------------------------------------------- match entries

    fn new_entry(&mut self, portal: u32, spec: &MatchSpec, md: MdHandle) -> Result<u32, Error> {
        if !self.md_live(md) {
            return Err(Error::StaleHandle("memory descriptor"));
        }
        let threshold = match spec.unlink {
            Unlink::Never => 0,
            Unlink::After(0) => {
                return Err(Error::Invalid("an unlink threshold must be at least 1"))
            }
            Unlink::After(n) => n,
        };
        let idx = self.free_entries;
        if idx == NIL {
            return Err(Error::Exhausted {
                table: "match entry",
                capacity: self.cfg.match_entries,
            });
        }
        self.last.changed();
        let t = self.store.tables();
        let s = &mut t.entries[idx as usize];
        self.free_entries = s.next;
        *s = EntrySlot {
            gen: s.gen,
            live: true,
            portal,
            group: spec.source.group,
            rank: spec.source.rank,
            bits: spec.match_bits,
            care: !spec.ignore_bits,
            md,
            next: NIL,
            prev: NIL,
            too_long: Link::Next,
            invalid: Link::Next,
            uses: 0,
            threshold,
        };
        Ok(idx)
    }

    fn handle_of(&self, idx: u32) -> MatchHandle {
        MatchHandle {
            idx,
            gen: self.store.tables_ref().entries[idx as usize].gen,
        }
    }

    /// Append a match entry for `md` at the end of `portal`'s match list.
    pub fn me_append(
        &mut self,
        portal: u32,
        spec: MatchSpec,
        md: MdHandle,
    ) -> Result<MatchHandle, Error> {
        let target = self.portal_mut(portal)?.target;
        if let Target::Md(_) = target {
            return Err(Error::PortalBusy {
                portal,
                what: "a memory descriptor",
            });
        }
        let idx = self.new_entry(portal, &spec, md)?;
        self.last.changed();
        let t = self.store.tables();
        match target {
            Target::List { head, tail } => {
                t.entries[tail as usize].next = idx;
                t.entries[idx as usize].prev = tail;
                t.portals[portal as usize].target = Target::List { head, tail: idx };
            }
            _ => {
                t.portals[portal as usize].target = Target::List {
                    head: idx,
                    tail: idx,
                }
            }
        }
        Ok(self.handle_of(idx))
    }

    /// Insert a match entry before or after `anchor`, in the anchor's portal.
    pub fn me_insert(
        &mut self,
        anchor: MatchHandle,
        pos: Position,
        spec: MatchSpec,
        md: MdHandle,
    ) -> Result<MatchHandle, Error> {
        if !self.entry_live(anchor) {
            return Err(Error::StaleHandle("match entry"));
        }
        let portal = self.store.tables_ref().entries[anchor.idx as usize].portal;
        let idx = self.new_entry(portal, &spec, md)?;
        self.last.changed();
        let t = self.store.tables();
        let a = anchor.idx;
        let (prev, next) = match pos {
            Position::Before => (t.entries[a as usize].prev, a),
            Position::After => (a, t.entries[a as usize].next),
        };
        t.entries[idx as usize].prev = prev;
        t.entries[idx as usize].next = next;
        if prev != NIL {
            t.entries[prev as usize].next = idx;
        }
        if next != NIL {
            t.entries[next as usize].prev = idx;
        }
        if let Target::List { head, tail } = &mut t.portals[portal as usize].target {
            if prev == NIL {
                *head = idx;
            }
            if next == NIL {
                *tail = idx;
            }
        }
        Ok(self.handle_of(idx))
    }

    /// Remove a match entry from its list. Its descriptor is untouched.
    pub fn me_unlink(&mut self, h: MatchHandle) -> Result<(), Error> {
        if !self.entry_live(h) {
            return Err(Error::StaleHandle("match entry"));
        }
        self.last.changed();
        let mut t = self.store.tables();
        unlink_entry(&mut t, &mut self.free_entries, h.idx);
        Ok(())
    }

    /// Set the second link (message too long for the descriptor) and the
    /// third link (descriptor not valid). Both default to [`Link::Next`].
    pub fn me_set_links(
        &mut self,
        h: MatchHandle,
        too_long: Link,
        invalid: Link,
    ) -> Result<(), Error> {
        if !self.entry_live(h) {
            return Err(Error::StaleHandle("match entry"));
        }
        let portal = self.store.tables_ref().entries[h.idx as usize].portal;
        for l in [too_long, invalid] {
            if let Link::Entry(to) = l {
                if !self.entry_live(to)
                    || self.store.tables_ref().entries[to.idx as usize].portal != portal
                {
                    return Err(Error::Invalid(
                        "a link must name a live entry of the same portal",
                    ));
                }
            }
        }
        self.last.changed();
        let e = &mut self.store.tables().entries[h.idx as usize];
        e.too_long = too_long;
        e.invalid = invalid;
        Ok(())
    }

    /// Snapshot of a match entry.
    pub fn me_info(&self, h: MatchHandle) -> Result<MatchInfo, Error> {
        if !self.entry_live(h) {
            return Err(Error::StaleHandle("match entry"));
        }
        let e = self.store.tables_ref().entries[h.idx as usize];
        Ok(MatchInfo {
            portal: e.portal,
            md: e.md,
            uses: e.uses,
            next: (e.next != NIL).then(|| self.handle_of(e.next)),
        })
    }

    /// The entries of `portal`'s match list in order, written into `out`;
    /// returns how many there are (may exceed `out.len()`).
    pub fn me_list(&self, portal: u32, out: &mut [MatchHandle]) -> Result<usize, Error> {
        if portal >= self.cfg.portals {
            return Err(Error::PortalIndex {
                portal,
                size: self.cfg.portals,
            });
        }
        let t = self.store.tables_ref();
        let Target::List { head, .. } = t.portals[portal as usize].target else {
            return Ok(0);
        };
        let mut n = 0usize;
        let mut cur = head;
        while cur != NIL && n < self.cfg.match_entries as usize {
            if let Some(o) = out.get_mut(n) {
                *o = MatchHandle {
                    idx: cur,
                    gen: t.entries[cur as usize].gen,
                };
            }
            n += 1;
            cur = t.entries[cur as usize].next;
        }
        Ok(n)
    }

    // ---------------------------------------------------- memory descriptors

    /// Create a memory descriptor. Blocks are copied into the engine's block
    /// table; dynamic descriptors take `max_messages` heap records.
    pub fn md_create(&mut self, spec: &MdSpec<'_>) -> Result<MdHandle, Error> {
        if let Some(eq) = spec.eq {
            if !self.eq_live(eq) {
                return Err(Error::StaleHandle("event queue"));
            }
        }
        let idx = self.free_mds;
        if idx == NIL {
            return Err(Error::Exhausted {
                table: "memory descriptor",
                capacity: self.cfg.mds,
            });
        }
        let cfg = self.cfg;
        self.last.changed();
        let t = self.store.tables();
        let live = &t.mds[..cfg.mds as usize];
        let state = match spec.kind {
            MdKind::Single { region, offset } => {
                check_region(region)?;
                MdState::Single {
                    region,
                    mode: offset,
                    local: 0,
                }
            }
            MdKind::Independent { blocks, .. } | MdKind::Combined { blocks, .. } => {
                if blocks.is_empty() {
                    return Err(Error::Invalid(
                        "a block descriptor needs at least one block",
                    ));
                }
                let mut total = 0u64;
                for b in blocks {
                    check_region(*b)?;
                    total = total.checked_add(b.len).ok_or(Error::Invalid(
                        "the blocks of a combined descriptor add up to more than 2^64 bytes",
                    ))?;
                }
                let n = u32::try_from(blocks.len()).map_err(|_| Error::Exhausted {
                    table: "block",
                    capacity: cfg.blocks,
                })?;
                let used = live.iter().filter_map(MdSlot::block_range);
                let base = find_range(cfg.blocks, used, n).ok_or(Error::Exhausted {
                    table: "block",
                    capacity: cfg.blocks,
                })?;
                t.blocks[base as usize..(base + n) as usize].copy_from_slice(blocks);
                match spec.kind {
                    MdKind::Independent { circular, save, .. } => MdState::Independent {
                        base,
                        count: n,
                        next: 0,
                        used: 0,
                        circular,
                        save,
                    },
                    MdKind::Combined { offset, .. } => MdState::Combined {
                        base,
                        count: n,
                        total,
                        mode: offset,
                        local: 0,
                    },
                    _ => return Err(Error::Invalid("unreachable descriptor kind")),
                }
            }
            MdKind::Dynamic {
                region,
                save,
                max_messages,
            } => {
                check_region(region)?;
                if max_messages == 0 {
                    return Err(Error::Invalid(
                        "a dynamic descriptor must hold at least one message",
                    ));
                }
                let used = live.iter().filter_map(MdSlot::chunk_range);
                let base =
                    find_range(cfg.heap_records, used, max_messages).ok_or(Error::Exhausted {
                        table: "heap record",
                        capacity: cfg.heap_records,
                    })?;
                MdState::Dynamic {
                    region,
                    save,
                    base,
                    cap: max_messages,
                    live: 0,
                }
            }
        };
        let s = &mut t.mds[idx as usize];
        self.free_mds = s.next_free;
        s.opts = spec.options;
        s.eq = spec.eq.unwrap_or(EqHandle::NONE);
        s.state = state;
        s.pending_acks = 0;
        s.pending_replies = 0;
        s.next_free = NIL;
        Ok(MdHandle { idx, gen: s.gen })
    }

    /// Release a descriptor. Match entries still pointing at it now see an
    /// invalid descriptor (third link); pending acks/replies are dropped as
    /// unexpected.
    pub fn md_release(&mut self, h: MdHandle) -> Result<(), Error> {
        if !self.md_live(h) {
            return Err(Error::StaleHandle("memory descriptor"));
        }
        self.last.changed();
        let s = &mut self.store.tables().mds[h.idx as usize];
        s.state = MdState::Free;
        s.gen = s.gen.wrapping_add(1);
        s.next_free = self.free_mds;
        self.free_mds = h.idx;
        Ok(())
    }

    /// Free the message a dynamic descriptor holds at `offset` (the event's
    /// `offset`).
    pub fn md_free(&mut self, h: MdHandle, offset: u64) -> Result<(), Error> {
        if !self.md_live(h) {
            return Err(Error::StaleHandle("memory descriptor"));
        }
        self.last.changed();
        let t = self.store.tables();
        let MdState::Dynamic { base, live, .. } = &mut t.mds[h.idx as usize].state else {
            return Err(Error::Unsupported(
                "only dynamic descriptors hold freeable messages",
            ));
        };
        let recs = &mut t.chunks[*base as usize..(*base + *live) as usize];
        let at = recs
            .binary_search_by_key(&offset, |c| c.off)
            .map_err(|_| Error::NoAllocation(offset))?;
        recs.copy_within(at + 1.., at);
        *live -= 1;
        Ok(())
    }

    /// Messages held and bytes allocated in a dynamic descriptor.
    pub fn md_heap_usage(&self, h: MdHandle) -> Result<(u32, u64), Error> {
        if !self.md_live(h) {
            return Err(Error::StaleHandle("memory descriptor"));
        }
        let t = self.store.tables_ref();
        let MdState::Dynamic { base, live, .. } = t.mds[h.idx as usize].state else {
            return Err(Error::Unsupported("only dynamic descriptors have a heap"));
        };
        let bytes = t.chunks[base as usize..(base + live) as usize]
            .iter()
            .map(|c| c.len)
            .sum();
        Ok((live, bytes))
    }

    /// Current local offset of a receiver-managed single or combined
    /// descriptor (0 for sender-managed ones).
    pub fn md_local_offset(&self, h: MdHandle) -> Result<u64, Error> {
        if !self.md_live(h) {
            return Err(Error::StaleHandle("memory descriptor"));
        }
        match self.store.tables_ref().mds[h.idx as usize].state {
            MdState::Single { local, .. } | MdState::Combined { local, .. } => Ok(local),
            _ => Err(Error::Unsupported(
                "only single and combined descriptors have an offset",
            )),
        }
    }

    // ------------------------------------------------------------ event queues

    /// Create an event queue of `capacity` events (taken from the event table).
    pub fn eq_alloc(&mut self, capacity: u32) -> Result<EqHandle, Error> {
        if capacity == 0 {
            return Err(Error::Invalid("an event queue needs at least one slot"));
        }
        let cfg = self.cfg;
        self.last.changed();
        let t = self.store.tables();
        let eqs = &mut t.eqs[..cfg.eqs as usize];
        let idx = eqs.iter().position(|q| !q.live).ok_or(Error::Exhausted {
            table: "event queue",
            capacity: cfg.eqs,
        })?;
        let used = eqs.iter().filter(|q| q.live).map(|q| (q.base, q.cap));
        let base = find_range(cfg.events, used, capacity).ok_or(Error::Exhausted {
            table: "event",
            capacity: cfg.events,
        })?;
        let q = &mut eqs[idx];
        *q = EqSlot {
            gen: q.gen,
            live: true,
            base,
            cap: capacity,
            head: 0,
            len: 0,
            lost: 0,
            seq: 0,
        };
        Ok(EqHandle {
            idx: idx as u32,
            gen: q.gen,
        })
    }

    /// Free an event queue. Portals and descriptors still naming it stop
    /// producing events.
    pub fn eq_free(&mut self, h: EqHandle) -> Result<(), Error> {
        if !self.eq_live(h) {
            return Err(Error::StaleHandle("event queue"));
        }
        self.last.changed();
        let q = &mut self.store.tables().eqs[h.idx as usize];
        q.live = false;
        q.gen = q.gen.wrapping_add(1);
        Ok(())
    }

    /// Take the oldest event. `Ok(None)`: the queue is empty.
    /// `Err(Error::EventsDropped(n))`: the queue overflowed since the last
    /// call and `n` events were lost; reported once, then polling goes on.
    #[inline]
    pub fn eq_get(&mut self, h: EqHandle) -> Result<Option<Event>, Error> {
        Ok(self.eq_take(h)?.map(|i| self.store.tables_ref().events[i]))
    }

    /// [`Engine::eq_get`] into a caller's event: `Ok(true)` when one was
    /// taken (written to `out`), `Ok(false)` when the queue is empty (`out`
    /// untouched). A poll loop that keeps one event saves moving it through
    /// a `Result<Option<Event>>` at every level.
    #[inline]
    pub fn eq_get_into(&mut self, h: EqHandle, out: &mut Event) -> Result<bool, Error> {
        match self.eq_take(h)? {
            Some(i) => {
                *out = self.store.tables_ref().events[i];
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// [`Engine::eq_get_into`] for the plain case only: when queue `h` is
    /// live, holds an event and has no loss to report first, takes the
    /// oldest event into `out` and returns true, exactly as `eq_get_into`
    /// would. Otherwise returns false having changed nothing (`out`
    /// untouched), and `eq_get_into` gives the full answer (the loss, the
    /// stale handle, or `Ok(false)`). No error to build, so a caller can
    /// inline it into a loop that takes a run of events.
    #[inline]
    pub fn eq_take_queued_into(&mut self, h: EqHandle, out: &mut Event) -> bool {
        if !self.eq_live(h) {
            return false;
        }
        let t = self.store.tables();
        let q = &mut t.eqs[h.idx as usize];
        if (q.len == 0) | (q.lost > 0) {
            return false;
        }
        let at = (q.base + q.head) as usize;
        let Some(ev) = t.events.get(at) else {
            return false;
        };
        *out = *ev;
        q.head += 1;
        if q.head == q.cap {
            q.head = 0;
        }
        q.len -= 1;
        true
    }

    /// Removes the oldest event of queue `h` and returns its slot (valid
    /// until the next post), or reports an overflow once.
    #[inline]
    fn eq_take(&mut self, h: EqHandle) -> Result<Option<usize>, Error> {
        if !self.eq_live(h) {
            return Err(Error::StaleHandle("event queue"));
        }
        let t = self.store.tables();
        let q = &mut t.eqs[h.idx as usize];
        if q.lost > 0 {
            let n = q.lost;
            q.lost = 0;
            return Err(Error::EventsDropped(n));
        }
        if q.len == 0 {
            return Ok(None);
        }
        let at = (q.base + q.head) as usize;
        q.head += 1;
        if q.head == q.cap {
            q.head = 0;
        }
        q.len -= 1;
        Ok(Some(at))
    }

    /// Events waiting in a queue.
    pub fn eq_len(&self, h: EqHandle) -> Result<u32, Error> {
        if !self.eq_live(h) {
            return Err(Error::StaleHandle("event queue"));
        }
        Ok(self.store.tables_ref().eqs[h.idx as usize].len)
    }

    // ---------------------------------------------------------------- delivery

    /// Plan the delivery of one incoming message. Validates the header,
    /// checks the portal (index, enabled, access control), walks the match
    /// list following the three links, places the message in the
    /// descriptor, posts the event, and says what to copy and what to send
    /// back. Never copies, never allocates, never panics on any header.
    #[inline]
    pub fn deliver(&mut self, h: &WireHeader) -> Result<DeliveryPlan, Dropped> {
        let mut plan = DeliveryPlan::EMPTY;
        self.deliver_into(h, &mut plan).map(|()| plan)
    }

    /// [`Engine::deliver`] that writes the plan into `plan` instead of returning it: a fabric
    /// that keeps one plan and hands it in for every message saves building a ~300-byte value
    /// and moving it through the return. Same checks, same counters, same events; on `Err` the
    /// contents of `plan` are unspecified (but valid).
    #[inline]
    pub fn deliver_into(&mut self, h: &WireHeader, plan: &mut DeliveryPlan) -> Result<(), Dropped> {
        self.deliver_plan::<true>(h, plan)
    }

    /// [`Engine::deliver_into`] for a fabric that takes its events from the queues and never
    /// reads [`DeliveryPlan::event`]: the plan's event is written only when the plan carries a
    /// handler (so [`DeliveryPlan::run_handler`] still sees it) and otherwise keeps what it held.
    /// Everything else (checks, counters, queued events, the rest of the plan) is the same; the
    /// event is written once, into its queue slot, instead of twice.
    #[inline]
    pub fn deliver_into_no_event(
        &mut self,
        h: &WireHeader,
        plan: &mut DeliveryPlan,
    ) -> Result<(), Dropped> {
        self.deliver_plan::<false>(h, plan)
    }

    /// The common small put, delivered without a plan: a put that asks for no
    /// acknowledgment, on an enabled portal without a handler, taken by a match
    /// entry that stays linked, into a single-block descriptor with sender-managed
    /// offsets. Returns `true` when it delivered the put: `out` is then the range
    /// the payload goes to, and the engine's state (entry use, event, counters) is
    /// exactly what [`Engine::deliver_into`] leaves, whose plan would hold that
    /// range, no response, no saved header and no handler. Returns `false`, having
    /// changed nothing, for every other header — invalid ones included: the caller
    /// then hands the same header to the general path, which refuses and counts it.
    /// A property test holds the two paths to the same effects on random tables and
    /// headers.
    #[inline(always)]
    pub fn deliver_put_fast(&mut self, h: &WireHeader, out: &mut Region) -> bool {
        let mut unused = Event::EMPTY;
        self.deliver_put_fast_taking(h, out, EqHandle::NONE, &mut unused)
            .is_some()
    }

    /// [`Engine::deliver_put_fast`] for a caller waiting on event queue `want`:
    /// when the put's event goes to `want` and `want` holds nothing older (no
    /// queued event, no loss to report), the event is also written to `ev` and
    /// taken off the queue, exactly as an [`Engine::eq_get_into`] right after
    /// would take it (its slot keeps the copy, so the engine's state is the same
    /// as after those two calls). The waiter so gets its event from registers
    /// instead of reading back the slot just written. `None`: declined, nothing
    /// changed, `ev` untouched; `Some(true)`: delivered and taken into `ev`;
    /// `Some(false)`: delivered, the event (if any) queued, `ev` untouched.
    /// `EqHandle::NONE` as `want` never takes. A property test holds it to the
    /// general path followed by `eq_get_into`.
    #[inline(always)]
    pub fn deliver_put_fast_taking(
        &mut self,
        h: &WireHeader,
        out: &mut Region,
        want: EqHandle,
        ev: &mut Event,
    ) -> Option<bool> {
        // The header's form: the fields that make it a plain put.
        let p = PlainPut::from_wire(h)?;
        self.deliver_plain_put_fast_taking(p, out, want, ev)
    }

    /// [`Engine::deliver_put_fast_taking`] for a put already decoded into its
    /// plain form (a fabric whose record says "plain put" builds no
    /// [`WireHeader`]): the rest of [`WireHeader::validate`], the destination
    /// check, then the same delivery. Returns what
    /// `deliver_put_fast_taking(&p.to_wire(), ..)` returns, with the same
    /// effects; a property test holds it to that and to the general path.
    #[inline(always)]
    pub fn deliver_plain_put_fast_taking(
        &mut self,
        h: PlainPut,
        out: &mut Region,
        want: EqHandle,
        ev: &mut Event,
    ) -> Option<bool> {
        // `WireHeader::validate` for a put without ack (which needs no return
        // descriptor) past what the plain form already holds, then the
        // destination check of the general path: the checks that depend on
        // more than the look-up's key.
        let sized = (h.length <= self.limits.max_message)
            & h.offset.checked_add(h.length).is_some()
            & (h.dst == self.cfg.id);
        if !sized {
            return None;
        }
        let c = &self.last;
        let (cur, gen, threshold, mdh, region, truncate, eq) = if (c.at == c.changes)
            & (c.portal == h.portal)
            & (c.src == h.src)
            & (c.match_bits == h.match_bits)
        {
            // The same key as the last look-up, and nothing it depends on changed since: the
            // same portal checks passed, the walk ends at the same entry and its descriptor
            // passed the same checks (`LastMatch`).
            (
                c.entry,
                c.entry_gen,
                c.threshold,
                c.md,
                c.region,
                c.truncate,
                c.eq,
            )
        } else {
            self.look_up_plain_put(&h)?
        };
        let t = self.store.tables();
        let Ok((m, truncated)) = fit(region.len, h.offset, h.length, truncate) else {
            return None;
        };
        // An entry reaching its threshold is unlinked (and an unlink event posted): general path.
        let uses = t.entries.get(cur as usize)?.uses.saturating_add(1);
        if (threshold != 0) & (uses >= threshold) {
            return None;
        }
        // Every check passed: from here on the effects of the general path, in its order.
        t.entries[cur as usize].uses = uses;
        let mut taken = false;
        if eq.idx != u32::MAX {
            let event = |seq| Event {
                kind: EventKind::Put,
                initiator: h.src,
                portal: h.portal,
                match_bits: h.match_bits,
                rlength: h.length,
                mlength: m,
                offset: h.offset,
                md: mdh,
                entry: MatchHandle { idx: cur, gen },
                hdr_data: h.hdr_data,
                truncated,
                header_saved: false,
                reason: None,
                seq,
            };
            // The waiter's queue, live, with nothing older to report (no event, no loss) and
            // room for one: `reserve` would put the event at its head and `eq_take` take it right
            // back. So the event goes to the waiter only, and the queue gets the effects of the
            // two (one more sequence number, the head one slot on); the slot the event would
            // have passed through is outside the queue's window either way.
            let take = match t.eqs.get_mut(eq.idx as usize) {
                Some(q)
                    if (want == eq)
                        & q.live
                        & (q.gen == eq.gen)
                        & (q.len == 0)
                        & (q.lost == 0)
                        & (q.cap > 0)
                        & (((q.base + q.head) as usize) < t.events.len()) =>
                {
                    let seq = q.seq;
                    q.seq += 1;
                    q.head += 1;
                    if q.head == q.cap {
                        q.head = 0;
                    }
                    Some(seq)
                }
                _ => None,
            };
            if let Some(seq) = take {
                *ev = event(seq);
                taken = true;
            } else {
                let (at, seq) = match reserve(t.eqs, eq) {
                    Slot::At(at, seq) => (at, seq),
                    Slot::Overflowed => {
                        self.counters.eq_overflows += 1;
                        (usize::MAX, 0)
                    }
                    Slot::NoQueue => (usize::MAX, 0),
                };
                // Written in place, from registers.
                if let Some(slot) = t.events.get_mut(at) {
                    *slot = event(seq);
                }
            }
        }
        self.counters.delivered += 1;
        self.counters.bytes = self.counters.bytes.wrapping_add(m);
        *out = region.sub(h.offset, m);
        Some(taken)
    }

    /// The look-up of [`Engine::deliver_plain_put_fast_taking`] for a put that passed its
    /// sized checks: the rest of the header's checks, the portal, the walk to the first
    /// matching entry and that entry's descriptor; `None` when the fast path does not take the
    /// put. What it finds is kept ([`LastMatch`]) for the next put with the same key. Inline:
    /// out of line (`#[inline(never)]`) a put whose key differs from the last one cost 36 more
    /// instructions (callgrind, every put missing: 743 against 707 per streamed message, 672
    /// without the memory), and the hit 9 more (594 against 585).
    #[inline(always)]
    fn look_up_plain_put(
        &mut self,
        h: &PlainPut,
    ) -> Option<(u32, u32, u32, MdHandle, Region, bool, EqHandle)> {
        let plain = (h.portal < self.limits.portals)
            & (h.src.group != ANY)
            & (h.src.rank != ANY)
            & (h.dst.group != ANY)
            & (h.dst.rank != ANY);
        if !plain {
            return None;
        }
        let t = self.store.tables_ref();
        let &portal = t.portals.get(h.portal as usize)?;
        if !portal.enabled | portal.handler.is_some() | !portal.acl.permits(h.src, false) {
            return None;
        }
        let Target::List { head, .. } = portal.target else {
            return None;
        };
        // The general path's walk: entries that do not match are skipped without effect.
        let mut cur = head;
        let e = loop {
            match t.entries.get(cur as usize) {
                Some(e) if !e.matches_parts(h.src, h.match_bits) => cur = e.next,
                Some(e) => break e,
                None => return None,
            }
        };
        let (mdh, gen, threshold) = (e.md, e.gen, e.threshold);
        let slot = t.mds.get(mdh.idx as usize)?;
        if !slot.is(mdh) | !slot.opts.put {
            return None;
        }
        let MdState::Single {
            region,
            mode: OffsetMode::Sender,
            ..
        } = slot.state
        else {
            return None;
        };
        let truncate = slot.opts.truncate;
        let eq = if slot.eq.idx != u32::MAX {
            slot.eq
        } else {
            portal.eq
        };
        self.last = LastMatch {
            changes: self.last.changes,
            at: self.last.changes,
            portal: h.portal,
            src: h.src,
            match_bits: h.match_bits,
            entry: cur,
            entry_gen: gen,
            threshold,
            md: mdh,
            region,
            truncate,
            eq,
        };
        Some((cur, gen, threshold, mdh, region, truncate, eq))
    }

    /// Delivery, writing the plan's event when `EVENT` (else only for a handler).
    #[inline]
    fn deliver_plan<const EVENT: bool>(
        &mut self,
        h: &WireHeader,
        plan: &mut DeliveryPlan,
    ) -> Result<(), Dropped> {
        if let Err(e) = h.validate(&self.limits) {
            return Err(self.drop_bad_header(e));
        }
        if h.dst != self.cfg.id {
            self.counters.drops[DropReason::WrongDestination as usize] += 1;
            return Err(Dropped::bare(DropReason::WrongDestination));
        }
        match h.op {
            Op::Put | Op::Get => self.deliver_target::<EVENT>(h, plan),
            Op::Reply => self.deliver_reply::<EVENT>(h, plan),
            Op::Ack => self.deliver_ack::<EVENT>(h, plan),
        }
    }

    /// Decode the header at the start of `bytes` and deliver it. Unlike
    /// [`Engine::decode`] followed by [`Engine::deliver`], a header that
    /// fails to decode is counted as a drop ([`DropReason::BadHeader`] or
    /// [`DropReason::InvalidPortal`]). Returns the header with the plan,
    /// since descriptors that save headers need its bytes.
    pub fn deliver_bytes(&mut self, bytes: &[u8]) -> Result<(WireHeader, DeliveryPlan), Dropped> {
        match WireHeader::decode(bytes, &self.limits) {
            Ok(h) => self.deliver(&h).map(|p| (h, p)),
            Err(e) => Err(self.drop_bad_header(e)),
        }
    }

    /// Count a header that failed validation or decoding as a drop ([`DropReason::InvalidPortal`]
    /// for a bad portal index, else [`DropReason::BadHeader`]) and describe it.
    #[cold]
    fn drop_bad_header(&mut self, e: HeaderError) -> Dropped {
        let reason = match e {
            HeaderError::Portal { .. } => DropReason::InvalidPortal,
            _ => DropReason::BadHeader,
        };
        self.counters.drops[reason as usize] += 1;
        Dropped {
            header: Some(e),
            ..Dropped::bare(reason)
        }
    }

    #[inline]
    fn deliver_target<const EVENT: bool>(
        &mut self,
        h: &WireHeader,
        out: &mut DeliveryPlan,
    ) -> Result<(), Dropped> {
        let is_get = h.op == Op::Get;
        let max_steps = self.cfg.match_entries;
        self.last.changed();
        let mut t = self.store.tables();
        let portal = t.portals[h.portal as usize];
        if !portal.enabled {
            self.counters.drops[DropReason::Disabled as usize] += 1;
            return Err(Dropped {
                portal: Some(h.portal),
                ..Dropped::bare(DropReason::Disabled)
            });
        }
        if !portal.acl.permits(h.src, is_get) {
            self.counters.drops[DropReason::Forbidden as usize] += 1;
            return Err(Dropped {
                portal: Some(h.portal),
                ..Dropped::bare(DropReason::Forbidden)
            });
        }
        let access = if is_get {
            Access::Get { offset: h.offset }
        } else {
            Access::Put { offset: h.offset }
        };
        // The placement is written where it is found (`place_into`), not moved out of the match.
        let mut p = Place::EMPTY;
        let (md, entry): (MdHandle, u32) = match portal.target {
            Target::None => {
                return Err(discard(
                    &mut t,
                    &mut self.counters,
                    &portal,
                    h,
                    DropReason::NoMatch,
                ));
            }
            Target::Md(md) => {
                let r = match t.mds.get_mut(md.idx as usize) {
                    Some(slot) if slot.is(md) => {
                        place_into(slot, md, t.blocks, t.chunks, access, h.length, &mut p)
                    }
                    _ => Err(Miss::Invalid),
                };
                match r {
                    Ok(()) => (md, NIL),
                    Err(m) => {
                        let reason = match m {
                            Miss::TooLong => DropReason::TooLong,
                            Miss::Invalid => DropReason::InvalidMd,
                        };
                        return Err(discard(&mut t, &mut self.counters, &portal, h, reason));
                    }
                }
            }
            Target::List { head, .. } => {
                let mut cur = head;
                // The list order (first link) is acyclic by construction, so
                // only explicit jumps (second and third links) can loop. A
                // finite search jumps at most once per entry: placement has
                // no side effect on a miss, so revisiting an entry after a
                // jump means the search would never end.
                let mut jumps = 0u32;
                let mut miss = DropReason::NoMatch;
                let entries: &[EntrySlot] = t.entries;
                let found = loop {
                    // Hot loop: skip entries that do not match.
                    let e = loop {
                        match entries.get(cur as usize) {
                            Some(e) if !e.matches_parts(h.src, h.match_bits) => cur = e.next,
                            other => break other,
                        }
                    };
                    let Some(e) = e else { break None };
                    let mdh = e.md;
                    let link = match t.mds.get_mut(mdh.idx as usize) {
                        Some(slot) if slot.is(mdh) => {
                            match place_into(
                                slot, mdh, t.blocks, t.chunks, access, h.length, &mut p,
                            ) {
                                Ok(()) => break Some((mdh, cur)),
                                Err(Miss::TooLong) => {
                                    miss = DropReason::TooLong;
                                    e.too_long
                                }
                                Err(Miss::Invalid) => {
                                    miss = DropReason::InvalidMd;
                                    e.invalid
                                }
                            }
                        }
                        _ => {
                            miss = DropReason::InvalidMd;
                            e.invalid
                        }
                    };
                    cur = match link {
                        Link::Next => e.next,
                        Link::End => NIL,
                        Link::Entry(to) => {
                            jumps += 1;
                            if jumps > max_steps {
                                miss = DropReason::LinkLoop;
                                break None;
                            }
                            match entries.get(to.idx as usize) {
                                Some(x) if x.is(to) && x.portal == h.portal => to.idx,
                                _ => NIL,
                            }
                        }
                    };
                };
                match found {
                    Some(f) => f,
                    None => return Err(discard(&mut t, &mut self.counters, &portal, h, miss)),
                }
            }
        };

        // Account for the use of the match entry; unlink at its threshold.
        let mut entry_h = MatchHandle::NONE;
        let mut unlinked = false;
        if entry != NIL {
            let e = &mut t.entries[entry as usize];
            entry_h = MatchHandle {
                idx: entry,
                gen: e.gen,
            };
            e.uses = e.uses.saturating_add(1);
            if (e.threshold != 0) & (e.uses >= e.threshold) {
                unlink_entry(&mut t, &mut self.free_entries, entry);
                unlinked = true;
            }
        }

        let slot = &t.mds[md.idx as usize];
        let ack_ok = slot.opts.ack;
        let eq = if slot.eq.idx != u32::MAX {
            slot.eq
        } else {
            portal.eq
        };
        // The event is built once and written into its queue (and the plan, when asked for).
        let ev = Event {
            kind: if is_get {
                EventKind::Get
            } else {
                EventKind::Put
            },
            initiator: h.src,
            portal: h.portal,
            match_bits: h.match_bits,
            rlength: h.length,
            mlength: p.mlength,
            offset: p.md_offset,
            md,
            entry: entry_h,
            hdr_data: h.hdr_data,
            truncated: p.truncated,
            header_saved: p.header_at.is_some(),
            reason: None,
            seq: 0,
        };
        let posted = if eq.idx != u32::MAX {
            let r = post(t.eqs, t.events, eq, &ev);
            if unlinked {
                let un = Event {
                    kind: EventKind::Unlink,
                    ..ev
                };
                if let Posted::Overflowed(_) = post(t.eqs, t.events, eq, &un) {
                    self.counters.eq_overflows += 1;
                }
            }
            r
        } else {
            Posted::NoQueue
        };
        if let Posted::Overflowed(_) = posted {
            self.counters.eq_overflows += 1;
        }

        // The response header only when there is a response.
        if is_get {
            out.response = Response::Reply(WireHeader {
                op: Op::Reply,
                offset: h.return_offset,
                ..response_header(h, &p)
            });
        } else if h.ack_requested() & ack_ok {
            out.response = Response::Ack(response_header(h, &p));
        } else {
            out.response = Response::None;
        }
        self.counters.delivered += 1;
        self.counters.bytes = self.counters.bytes.wrapping_add(p.mlength);
        out.op = h.op;
        out.portal = h.portal;
        out.md = md;
        out.entry = entry_h;
        out.header_at = p.header_at;
        out.body = p.body;
        out.md_offset = p.md_offset;
        out.rlength = h.length;
        out.mlength = p.mlength;
        out.truncated = p.truncated;
        out.posted = posted;
        out.unlinked = unlinked;
        out.handler = portal.handler;
        if EVENT | portal.handler.is_some() {
            out.event = ev;
        }
        Ok(())
    }

    fn deliver_reply<const EVENT: bool>(
        &mut self,
        h: &WireHeader,
        out: &mut DeliveryPlan,
    ) -> Result<(), Dropped> {
        self.last.changed();
        let t = self.store.tables();
        let md = MdHandle::from_cookie(h.return_md);
        let ok = md.idx < self.cfg.mds
            && t.mds
                .get(md.idx as usize)
                .is_some_and(|s| s.is(md) && s.pending_replies > 0);
        if !ok {
            self.counters.drops[DropReason::Unexpected as usize] += 1;
            return Err(Dropped::bare(DropReason::Unexpected));
        }
        let slot = &mut t.mds[md.idx as usize];
        let p = match place(
            slot,
            md,
            t.blocks,
            t.chunks,
            Access::Reply { offset: h.offset },
            h.length,
        ) {
            Ok(p) => p,
            Err(_) => {
                self.counters.drops[DropReason::TooLong as usize] += 1;
                return Err(Dropped::bare(DropReason::TooLong));
            }
        };
        slot.pending_replies -= 1;
        let eq = slot.eq;
        let ev = Event {
            kind: EventKind::Reply,
            initiator: h.src,
            portal: h.portal,
            match_bits: h.match_bits,
            rlength: h.rlength,
            mlength: p.mlength,
            offset: p.md_offset,
            md,
            entry: MatchHandle::NONE,
            hdr_data: h.hdr_data,
            truncated: h.truncated() | p.truncated,
            header_saved: p.header_at.is_some(),
            reason: None,
            seq: 0,
        };
        let posted = post(t.eqs, t.events, eq, &ev);
        if let Posted::Overflowed(_) = posted {
            self.counters.eq_overflows += 1;
        }
        self.counters.delivered += 1;
        self.counters.bytes = self.counters.bytes.wrapping_add(p.mlength);
        out.op = Op::Reply;
        out.portal = h.portal;
        out.md = md;
        out.entry = MatchHandle::NONE;
        out.header_at = p.header_at;
        out.body = p.body;
        out.md_offset = p.md_offset;
        out.rlength = h.rlength;
        out.mlength = p.mlength;
        out.truncated = ev.truncated;
        out.response = Response::None;
        out.posted = posted;
        out.unlinked = false;
        out.handler = None;
        if EVENT {
            out.event = ev;
        }
        Ok(())
    }

    fn deliver_ack<const EVENT: bool>(
        &mut self,
        h: &WireHeader,
        out: &mut DeliveryPlan,
    ) -> Result<(), Dropped> {
        self.last.changed();
        let t = self.store.tables();
        let md = MdHandle::from_cookie(h.return_md);
        let slot = match t.mds.get_mut(md.idx as usize) {
            Some(s) if md.idx < self.cfg.mds && s.is(md) && s.pending_acks > 0 => s,
            _ => {
                self.counters.drops[DropReason::Unexpected as usize] += 1;
                return Err(Dropped::bare(DropReason::Unexpected));
            }
        };
        slot.pending_acks -= 1;
        let eq = slot.eq;
        let ev = Event {
            kind: EventKind::Ack,
            initiator: h.src,
            portal: h.portal,
            match_bits: h.match_bits,
            rlength: h.rlength,
            mlength: h.length,
            offset: h.offset,
            md,
            entry: MatchHandle::NONE,
            hdr_data: h.hdr_data,
            truncated: h.truncated(),
            header_saved: false,
            reason: None,
            seq: 0,
        };
        let posted = post(t.eqs, t.events, eq, &ev);
        if let Posted::Overflowed(_) = posted {
            self.counters.eq_overflows += 1;
        }
        self.counters.delivered += 1;
        out.op = Op::Ack;
        out.portal = h.portal;
        out.md = md;
        out.entry = MatchHandle::NONE;
        out.header_at = None;
        out.body = Body { md, ..Body::EMPTY };
        out.md_offset = h.offset;
        out.rlength = h.rlength;
        out.mlength = h.length;
        out.truncated = h.truncated();
        out.response = Response::None;
        out.posted = posted;
        out.unlinked = false;
        out.handler = None;
        if EVENT {
            out.event = ev;
        }
        Ok(())
    }

    // ------------------------------------------------------------- segments

    /// The segments of a body, in message order, without allocating. Bodies
    /// that span several blocks (combined descriptors) need the descriptor to
    /// be alive still.
    pub fn segments(&self, body: &Body) -> Result<Segments<'_>, Error> {
        if body.rest > 0 && !self.md_live(body.md) {
            return Err(Error::StaleHandle("memory descriptor"));
        }
        Ok(Segments {
            pool: self.store.tables_ref().blocks,
            first: Some(body.first),
            next: body.pool_next,
            end: body.pool_end,
            rest: body.rest,
            pos: 0,
        })
    }

    /// Write the segments of `body` into `out`; returns how many.
    pub fn write_segments(&self, body: &Body, out: &mut [Segment]) -> Result<usize, Error> {
        let mut n = 0;
        for s in self.segments(body)? {
            let cap = out.len();
            *out.get_mut(n).ok_or(Error::SegmentBuffer(cap))? = s;
            n += 1;
        }
        Ok(n)
    }

    // ------------------------------------------------------------- initiator

    fn source_body(&self, md: MdHandle, offset: u64, length: u64) -> Result<Body, Error> {
        if !self.md_live(md) {
            return Err(Error::StaleHandle("memory descriptor"));
        }
        let t = self.store.tables_ref();
        let slot = &t.mds[md.idx as usize];
        let size = linear_len(&slot.state).ok_or(Error::Unsupported(
            "only single and combined descriptors can be the local side of a put or get",
        ))?;
        let fits = offset.checked_add(length).is_some_and(|e| e <= size);
        if !fits {
            return Err(Error::OutOfBounds {
                offset,
                length,
                size,
            });
        }
        Ok(match slot.state {
            MdState::Single { region, .. } => Body {
                md,
                first: region.sub(offset, length),
                ..Body::EMPTY
            },
            MdState::Combined { base, count, .. } => {
                combined_body(md, t.blocks, base, count, offset, length)
            }
            _ => return Err(Error::Unsupported("descriptor kind")),
        })
    }

    fn check_target(&self, target: ProcessId, length: u64) -> Result<(), Error> {
        if target.group == ANY || target.rank == ANY {
            return Err(Error::Invalid(
                "the target of a put or get must be a concrete process",
            ));
        }
        if length > self.cfg.max_message {
            return Err(Error::Header(HeaderError::Length {
                length,
                max: self.cfg.max_message,
            }));
        }
        Ok(())
    }

    /// Build the header of a put from local descriptor `a.md` and say which
    /// local bytes to send after it. With `a.ack` the descriptor expects one
    /// more acknowledgment. Call [`Engine::sent`] once the bytes are out.
    pub fn prepare_put(&mut self, a: &PutArgs) -> Result<SendPlan, Error> {
        let body = self.prepare_put_body(a)?;
        Ok(self.put_plan(a, body))
    }

    /// [`Engine::prepare_put`] without building the header: the same checks
    /// (the ones [`WireHeader::validate`] makes on the header `prepare_put`
    /// would build, plus the descriptor's bounds) and the same accounting,
    /// returning only the local bytes to send. A fabric that encodes its own
    /// header straight from `a` saves building a [`SendPlan`] per message;
    /// [`Engine::put_plan`] gives the header when it is wanted after all,
    /// [`Engine::sent_put`] posts the send event.
    #[inline]
    pub fn prepare_put_body(&mut self, a: &PutArgs) -> Result<Body, Error> {
        self.check_target(a.target, a.length)?;
        let body = self.source_body(a.md, a.local_offset, a.length)?;
        // What `WireHeader::validate` checks of a put header built from `a`: the version, flags,
        // portal (below `u32::MAX`, the sending side's limit), destination wildcards and length are right by
        // construction or by `check_target`, and `local_offset + length` fits (`source_body`).
        if a.portal == u32::MAX {
            return Err(Error::Header(HeaderError::Portal {
                portal: a.portal,
                limit: u32::MAX,
            }));
        }
        if self.cfg.id.group == ANY || self.cfg.id.rank == ANY {
            return Err(Error::Header(HeaderError::Wildcard));
        }
        if a.remote_offset.checked_add(a.length).is_none() {
            return Err(Error::Header(HeaderError::Offset));
        }
        if a.ack {
            if a.md.to_cookie() == NO_MD {
                return Err(Error::Header(HeaderError::ReturnMd(Op::Put)));
            }
            self.last.changed();
            let s = &mut self.store.tables().mds[a.md.idx as usize];
            s.pending_acks = s
                .pending_acks
                .checked_add(1)
                .ok_or(Error::Invalid("too many acknowledgments outstanding"))?;
        }
        Ok(body)
    }

    /// The plan [`Engine::prepare_put`] returns, from the body
    /// [`Engine::prepare_put_body`] returned for the same `a` (no checks, no
    /// side effects).
    pub fn put_plan(&self, a: &PutArgs, body: Body) -> SendPlan {
        let header = WireHeader {
            version: WIRE_VERSION,
            op: Op::Put,
            flags: if a.ack { flags::ACK_REQ } else { 0 },
            portal: a.portal,
            src: self.cfg.id,
            dst: a.target,
            match_bits: a.match_bits,
            offset: a.remote_offset,
            length: a.length,
            rlength: a.length,
            return_md: if a.ack { a.md.to_cookie() } else { NO_MD },
            return_offset: a.local_offset,
            hdr_data: a.hdr_data,
        };
        SendPlan { header, body }
    }

    /// Build the header of a get whose reply lands in `a.md` at
    /// `a.local_offset`. The descriptor expects one more reply.
    pub fn prepare_get(&mut self, a: &GetArgs) -> Result<SendPlan, Error> {
        self.check_target(a.target, a.length)?;
        let into = self.source_body(a.md, a.local_offset, a.length)?;
        let header = WireHeader {
            version: WIRE_VERSION,
            op: Op::Get,
            flags: 0,
            portal: a.portal,
            src: self.cfg.id,
            dst: a.target,
            match_bits: a.match_bits,
            offset: a.remote_offset,
            length: a.length,
            rlength: a.length,
            return_md: a.md.to_cookie(),
            return_offset: a.local_offset,
            hdr_data: a.hdr_data,
        };
        header.validate(&Limits {
            portals: u32::MAX,
            max_message: self.cfg.max_message,
        })?;
        self.last.changed();
        let s = &mut self.store.tables().mds[a.md.idx as usize];
        s.pending_replies = s
            .pending_replies
            .checked_add(1)
            .ok_or(Error::Invalid("too many replies outstanding"))?;
        Ok(SendPlan {
            header,
            body: Body {
                md: into.md,
                ..Body::EMPTY
            },
        })
    }

    /// The fabric has sent `plan` (the local bytes may be reused): post the
    /// send event on the descriptor's queue.
    pub fn sent(&mut self, plan: &SendPlan) -> Result<Posted, Error> {
        let h = &plan.header;
        self.post_send(
            &plan.body,
            h.dst,
            h.portal,
            h.match_bits,
            h.rlength,
            h.return_offset,
            h.hdr_data,
        )
    }

    /// [`Engine::sent`] for a put started with [`Engine::prepare_put_body`]:
    /// the same event, from the put's arguments and the body it returned.
    #[inline]
    pub fn sent_put(&mut self, a: &PutArgs, body: &Body) -> Result<Posted, Error> {
        self.post_send(
            body,
            a.target,
            a.portal,
            a.match_bits,
            a.length,
            a.local_offset,
            a.hdr_data,
        )
    }

    /// The common small put in one step, for a fabric that sends it at once:
    /// a put without acknowledgment from a single-block descriptor. It makes
    /// exactly the checks of [`Engine::prepare_put_body`], calls `send` with
    /// the local bytes to send, and when `send` returns `Ok` posts the send
    /// event of [`Engine::sent_put`]: the effects of those two calls, with
    /// one descriptor look-up and nothing built in between (no [`Body`], no
    /// `Result` carrying an [`Error`]).
    ///
    /// * `None`: any other put (acknowledged, from another descriptor kind)
    ///   or one those checks refuse. `send` was not called and nothing
    ///   changed; take the general path, which reports the error.
    /// * `Some(Err(e))`: `send` failed with `e`; nothing changed.
    /// * `Some(Ok(posted))`: sent, and the send event posted as `posted`.
    #[inline(always)]
    pub fn put_fast<E>(
        &mut self,
        a: &PutArgs,
        send: impl FnOnce(Region) -> Result<(), E>,
    ) -> Option<Result<Posted, E>> {
        let t = self.put_ticket(a)?;
        Some(self.put_ticketed(&t, send))
    }

    /// The checks [`Engine::put_fast`] makes of `a`, without its effects: `Some` when it would
    /// take `a`, with what it found (the descriptor's queue and the block to send). A fabric
    /// that sends the same put again and again keeps the ticket and repeats the put with
    /// [`Engine::put_fast_again`], which makes only the checks that can change.
    #[inline(always)]
    pub fn put_ticket(&self, a: &PutArgs) -> Option<PutTicket> {
        // `check_target`, the header checks of `prepare_put_body` and (no ack) nothing to count.
        if a.ack
            | (a.target.group == ANY)
            | (a.target.rank == ANY)
            | (a.length > self.cfg.max_message)
            | (a.portal == u32::MAX)
            | (self.cfg.id.group == ANY)
            | (self.cfg.id.rank == ANY)
            || a.remote_offset.checked_add(a.length).is_none()
            || !self.md_live(a.md)
        {
            return None;
        }
        // `source_body` for a single block.
        let slot = &self.store.tables_ref().mds[a.md.idx as usize];
        let MdState::Single { region, .. } = slot.state else {
            return None;
        };
        if a.local_offset
            .checked_add(a.length)
            .is_none_or(|e| e > region.len)
        {
            return None;
        }
        Some(PutTicket {
            args: *a,
            eq: slot.eq,
            src: region.sub(a.local_offset, a.length),
        })
    }

    /// [`Engine::put_fast`] of the ticket's put (`t.args()`), for a ticket this engine issued
    /// ([`Engine::put_ticket`]): the same effects and the same answers, with one check instead of
    /// all of them. What the ticket holds follows from the put's arguments, the engine's
    /// configuration (fixed) and the descriptor's slot; a live descriptor's kind, block and queue
    /// change only when it is released, which changes its handle's generation. So while
    /// `t.args().md` is live the ticket's checks still pass and its queue and block are the
    /// descriptor's; once it is not, `None` (nothing called, nothing changed) and the general
    /// path reports the stale handle.
    #[inline(always)]
    pub fn put_fast_again<E>(
        &mut self,
        t: &PutTicket,
        send: impl FnOnce(Region) -> Result<(), E>,
    ) -> Option<Result<Posted, E>> {
        if !self.md_live(t.args.md) {
            return None;
        }
        Some(self.put_ticketed(t, send))
    }

    /// Sends the ticket's block, then posts the send event (nothing when `send` fails).
    #[inline(always)]
    fn put_ticketed<E>(
        &mut self,
        t: &PutTicket,
        send: impl FnOnce(Region) -> Result<(), E>,
    ) -> Result<Posted, E> {
        send(t.src)?;
        let a = &t.args;
        Ok(self.post_send_event(
            t.eq,
            a.md,
            a.length,
            a.target,
            a.portal,
            a.match_bits,
            a.length,
            a.local_offset,
            a.hdr_data,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn post_send(
        &mut self,
        body: &Body,
        dst: ProcessId,
        portal: u32,
        match_bits: u64,
        rlength: u64,
        offset: u64,
        hdr_data: u64,
    ) -> Result<Posted, Error> {
        let md = body.md;
        if !self.md_live(md) {
            return Err(Error::StaleHandle("memory descriptor"));
        }
        let eq = self.store.tables_ref().mds[md.idx as usize].eq;
        Ok(self.post_send_event(
            eq,
            md,
            body.len(),
            dst,
            portal,
            match_bits,
            rlength,
            offset,
            hdr_data,
        ))
    }

    /// The send event of live descriptor `md` (whose queue is `eq`), posted.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn post_send_event(
        &mut self,
        eq: EqHandle,
        md: MdHandle,
        mlength: u64,
        dst: ProcessId,
        portal: u32,
        match_bits: u64,
        rlength: u64,
        offset: u64,
        hdr_data: u64,
    ) -> Posted {
        let t = self.store.tables();
        // The slot first, then the event written into it from registers (nothing is built when
        // the descriptor has no queue).
        match reserve(t.eqs, eq) {
            Slot::NoQueue => Posted::NoQueue,
            Slot::Overflowed => {
                self.counters.eq_overflows += 1;
                Posted::Overflowed(eq)
            }
            Slot::At(at, seq) => {
                t.events[at] = Event {
                    kind: EventKind::Send,
                    initiator: dst,
                    portal,
                    match_bits,
                    rlength,
                    mlength,
                    offset,
                    md,
                    entry: MatchHandle::NONE,
                    hdr_data,
                    truncated: false,
                    header_saved: false,
                    reason: None,
                    seq,
                };
                Posted::Queued(eq)
            }
        }
    }
}

/// The ack a put target sends back (a get's reply starts from it too).
#[inline]
fn response_header(h: &WireHeader, p: &Place) -> WireHeader {
    WireHeader {
        version: WIRE_VERSION,
        op: Op::Ack,
        flags: if p.truncated { flags::TRUNCATED } else { 0 },
        portal: h.portal,
        src: h.dst,
        dst: h.src,
        match_bits: h.match_bits,
        offset: p.md_offset,
        length: p.mlength,
        rlength: h.length,
        return_md: h.return_md,
        return_offset: h.return_offset,
        hdr_data: h.hdr_data,
    }
}

/// Count a drop on an enabled, permitting portal, post its discard event
/// and name the handler to run.
#[cold]
fn discard(
    t: &mut Tables<'_>,
    counters: &mut Counters,
    portal: &PortalSlot,
    h: &WireHeader,
    reason: DropReason,
) -> Dropped {
    counters.drops[reason as usize] += 1;
    let event = Event {
        kind: EventKind::Discard,
        initiator: h.src,
        portal: h.portal,
        match_bits: h.match_bits,
        rlength: h.length,
        mlength: 0,
        offset: 0,
        md: MdHandle::NONE,
        entry: MatchHandle::NONE,
        hdr_data: h.hdr_data,
        truncated: false,
        header_saved: false,
        reason: Some(reason),
        seq: 0,
    };
    let posted = post(t.eqs, t.events, portal.eq, &event);
    if let Posted::Overflowed(_) = posted {
        counters.eq_overflows += 1;
    }
    Dropped {
        reason,
        header: None,
        portal: Some(h.portal),
        event: Some(event),
        posted,
        handler: portal.handler,
    }
}
