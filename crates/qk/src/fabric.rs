//! The node-local fabric: a process's attachment to the rings of its job's region, and the compact
//! header records travel with.
//!
//! A record body is a 56-byte [`Hdr`] followed by the eager payload, so a header plus the ring's
//! stamp is exactly one cache line; or, for the commonest message (a put of at most 8 bytes with
//! no offset, no user header data and no ack), the 24-byte compact form ([`COMPACT_LEN`]), so a
//! stamp and the message are one 32-byte ring slot and two messages share a line.

use crate::counters::slot;
use crate::region::{PortBlock, Region, ShmRing};
use crate::ring::{Consumer, Peek, Producer, RingMem};

/// Encoded size of [`Hdr`].
pub const HDR_LEN: usize = 56;

/// Where [`Hdr::aux`] lies in the encoded header.
const AUX_AT: u64 = 40;

/// Body bytes of a compact put: with the ring's stamp, one 32-byte slot ([`crate::ring::SLOT`]).
///
/// | bytes | field |
/// |---|---|
/// | 0 | [`op::PUT`] |
/// | 1 | [`flag::INLINE8`] |
/// | 2..4 | portal |
/// | 4 | payload bytes (at most 8) |
/// | 5..8 | zero |
/// | 8..16 | match bits |
/// | 16..24 | payload, in the low bytes |
///
/// What it leaves out is fixed: remote offset 0, user header data 0, no ack (so no return
/// descriptor), and the source, which is the rank that owns the ring the record came on. The
/// receiver reads it into the [`Hdr`] the 56-byte form would carry ([`Port::poll`]), so every
/// check of the one-line put applies to it unchanged.
pub const COMPACT_LEN: usize = 24;

/// The first word of the compact form of one-line put `h` (`INLINE8` not yet set), or `None`
/// when `h` says more than the compact form can (an offset, user header data, an ack, or a
/// payload of more than 8 bytes).
#[inline(always)]
pub fn compact_word(h: &Hdr) -> Option<u64> {
    (h.op == op::PUT && h.flags == 0 && h.offset == 0 && h.hdr_data == 0 && h.length <= 8).then(
        || {
            u64::from(op::PUT)
                | u64::from(flag::INLINE8) << 8
                | u64::from(h.portal) << 16
                | h.length << 32
        },
    )
}

/// A compact put as read from its ring: copied once, checked, its source the rank that owns the
/// ring. [`CompactPut::hdr`] is the header its one-line form would carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompactPut {
    /// Portal table index.
    pub portal: u16,
    /// Sender's world rank (the owner of the ring).
    pub src: u32,
    /// Match bits.
    pub match_bits: u64,
    /// Payload bytes (at most 8).
    pub length: u64,
    /// The payload, in the low `length` bytes.
    pub payload: u64,
}

impl CompactPut {
    /// The record `body` that came on the ring of local rank `src`; `None` when it is not a
    /// well-formed compact put (any other op or flags, a length over 8, a non-zero reserved
    /// byte) or did not come from a local rank (the node engine never sends one). `body` is
    /// copied once before anything is checked: the sender can still write the ring.
    #[inline(always)]
    pub fn read(body: &[u8], src: Option<u32>) -> Option<CompactPut> {
        let c: [u8; COMPACT_LEN] = body.get(..COMPACT_LEN)?.try_into().ok()?;
        let src = src?;
        if c[0] != op::PUT || c[1] != flag::INLINE8 || c[4] > 8 || c[5..8] != [0; 3] {
            return None;
        }
        let word = |at: usize| {
            u64::from_le_bytes([
                c[at],
                c[at + 1],
                c[at + 2],
                c[at + 3],
                c[at + 4],
                c[at + 5],
                c[at + 6],
                c[at + 7],
            ])
        };
        Some(CompactPut {
            portal: u16::from_le_bytes([c[2], c[3]]),
            src,
            match_bits: word(8),
            length: u64::from(c[4]),
            payload: word(16),
        })
    }

    /// The header of the same put in its one-line form.
    pub fn hdr(&self) -> Hdr {
        Hdr {
            op: op::PUT,
            flags: flag::INLINE8,
            portal: self.portal,
            src: self.src,
            match_bits: self.match_bits,
            offset: 0,
            length: self.length,
            return_md: portals::NO_MD,
            aux: self.payload,
            hdr_data: 0,
        }
    }
}

/// Operation codes of the fabric (1..=4 are the portals operations).
pub mod op {
    /// Portals put.
    pub const PUT: u8 = 1;
    /// Portals get.
    pub const GET: u8 = 2;
    /// Portals reply (answer to a get).
    pub const REPLY: u8 = 3;
    /// Portals ack (answer to a put).
    pub const ACK: u8 = 4;
    /// QK internal: the receiver finished copying a large message out of the sender's buffer.
    pub const FIN: u8 = 16;
    /// QK internal: raw test record (checksummed payload), used by fabric tests and benchmarks.
    pub const RAW: u8 = 17;
}

/// Header flag bits.
pub mod flag {
    /// Put: acknowledgment requested.
    pub const ACK_REQ: u8 = 1;
    /// Ack/reply: the target truncated.
    pub const TRUNCATED: u8 = 2;
    /// The payload is not in the queue: `src_ref` is an offset into the sender's heap part.
    pub const HEAP: u8 = 4;
    /// The payload is not in the queue: `src_ref` is an address in the sender's process, to be
    /// read with cross-memory attach.
    pub const CMA: u8 = 8;
    /// Put of at most 8 bytes without ack: the payload travels in `aux`, so the whole message is
    /// one 64-byte record (one cache line).
    pub const INLINE8: u8 = 16;
    /// Every defined bit.
    pub const KNOWN: u8 = ACK_REQ | TRUNCATED | HEAP | CMA | INLINE8;
}

/// The fabric header. Field use by op:
///
/// | field | put | get | reply | ack | fin |
/// |---|---|---|---|---|---|
/// | `offset` | remote offset | remote offset | initiator offset | initiator offset | - |
/// | `length` | payload bytes | bytes wanted | payload bytes | bytes deposited | bytes copied |
/// | `aux` | source ref (large) | return offset | requested length | requested length | source ref |
/// | `hdr_data` | user data | user data | source ref (large) | user data | - |
/// | `return_md` | initiator MD cookie | initiator MD cookie | initiator MD cookie | initiator MD cookie | initiator MD cookie |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hdr {
    /// [`op`] code.
    pub op: u8,
    /// [`flag`] bits.
    pub flags: u8,
    /// Portal table index.
    pub portal: u16,
    /// Sender's world rank.
    pub src: u32,
    /// Match bits.
    pub match_bits: u64,
    /// See the table.
    pub offset: u64,
    /// See the table.
    pub length: u64,
    /// Initiator's memory descriptor cookie.
    pub return_md: u64,
    /// See the table.
    pub aux: u64,
    /// See the table.
    pub hdr_data: u64,
}

impl Hdr {
    /// The header of a put `a` from world rank `src`: the fabric form of the portals header
    /// [`portals::Engine::prepare_put`] builds for `a`, made straight from the arguments.
    #[inline]
    pub fn put(a: &portals::PutArgs, src: u32) -> Hdr {
        Hdr {
            op: op::PUT,
            flags: if a.ack { flag::ACK_REQ } else { 0 },
            portal: a.portal.min(u16::MAX as u32) as u16,
            src,
            match_bits: a.match_bits,
            offset: a.remote_offset,
            length: a.length,
            return_md: if a.ack {
                a.md.to_cookie()
            } else {
                portals::NO_MD
            },
            aux: a.local_offset,
            hdr_data: a.hdr_data,
        }
    }

    /// Encodes into 56 little-endian bytes.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.op;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.portal.to_le_bytes());
        b[4..8].copy_from_slice(&self.src.to_le_bytes());
        for (i, v) in [
            self.match_bits,
            self.offset,
            self.length,
            self.return_md,
            self.aux,
            self.hdr_data,
        ]
        .iter()
        .enumerate()
        {
            b[8 + 8 * i..16 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Decodes 56 bytes (no validation: see the endpoint's checks).
    pub fn decode(b: &[u8]) -> Option<Hdr> {
        HdrRef::new(b).map(|h| h.decode())
    }

    /// Bytes of payload that travel inside the queue with this header.
    pub fn inline_len(&self) -> u64 {
        match self.op {
            op::PUT | op::REPLY | op::RAW
                if self.flags & (flag::HEAP | flag::CMA | flag::INLINE8) == 0 =>
            {
                self.length
            }
            _ => 0,
        }
    }
}

/// A header read in place, where the record lies in its queue: each field is one load from the
/// record's line when it is asked for, instead of all of them copied into a [`Hdr`] first (the
/// receive path reads a one-line put's fields once each, straight from the line).
#[derive(Clone, Copy, Debug)]
pub struct HdrRef<'a>(&'a [u8; HDR_LEN]);

impl<'a> HdrRef<'a> {
    /// The header at the start of `b`; `None` when `b` is shorter than a header.
    #[inline(always)]
    pub fn new(b: &'a [u8]) -> Option<HdrRef<'a>> {
        // One length check, then constant offsets into a fixed-size array: no bounds check per
        // field on the receive path.
        Some(HdrRef(b.get(..HDR_LEN)?.try_into().ok()?))
    }

    #[inline(always)]
    fn word(&self, at: usize) -> u64 {
        let b = self.0;
        u64::from_le_bytes([
            b[at],
            b[at + 1],
            b[at + 2],
            b[at + 3],
            b[at + 4],
            b[at + 5],
            b[at + 6],
            b[at + 7],
        ])
    }

    /// [`Hdr::op`].
    #[inline(always)]
    pub fn op(&self) -> u8 {
        self.0[0]
    }

    /// [`Hdr::flags`].
    #[inline(always)]
    pub fn flags(&self) -> u8 {
        self.0[1]
    }

    /// [`Hdr::portal`].
    #[inline(always)]
    pub fn portal(&self) -> u16 {
        u16::from_le_bytes([self.0[2], self.0[3]])
    }

    /// [`Hdr::src`].
    #[inline(always)]
    pub fn src(&self) -> u32 {
        u32::from_le_bytes([self.0[4], self.0[5], self.0[6], self.0[7]])
    }

    /// [`Hdr::match_bits`].
    #[inline(always)]
    pub fn match_bits(&self) -> u64 {
        self.word(8)
    }

    /// [`Hdr::offset`].
    #[inline(always)]
    pub fn offset(&self) -> u64 {
        self.word(16)
    }

    /// [`Hdr::length`].
    #[inline(always)]
    pub fn length(&self) -> u64 {
        self.word(24)
    }

    /// [`Hdr::return_md`].
    #[inline(always)]
    pub fn return_md(&self) -> u64 {
        self.word(32)
    }

    /// [`Hdr::aux`].
    #[inline(always)]
    pub fn aux(&self) -> u64 {
        self.word(40)
    }

    /// [`Hdr::hdr_data`].
    #[inline(always)]
    pub fn hdr_data(&self) -> u64 {
        self.word(48)
    }

    /// Every field, copied out (no validation: see the endpoint's checks).
    #[inline]
    pub fn decode(&self) -> Hdr {
        Hdr {
            op: self.op(),
            flags: self.flags(),
            portal: self.portal(),
            src: self.src(),
            match_bits: self.match_bits(),
            offset: self.offset(),
            length: self.length(),
            return_md: self.return_md(),
            aux: self.aux(),
            hdr_data: self.hdr_data(),
        }
    }
}

/// A process's (or the node engine's) attachment to the node-local rings.
#[derive(Debug)]
pub struct Port {
    region: Region,
    me: u32,
    /// Per destination port: the ring, its producer state and the destination's block (for its
    /// sleeping flag).
    out: Vec<(ShmRing, Producer, PortBlock)>,
    inb: Vec<(ShmRing, Consumer)>,
    /// This port's own block (its counters).
    mine: PortBlock,
    next: usize,
    /// A record was sent since the last [`Port::poll`]: the next send is part of a burst.
    sent_since_poll: bool,
}

/// The header of an incoming record.
#[derive(Clone, Copy, Debug)]
pub enum Head<'a> {
    /// A 56-byte header, in place in the queue (not yet validated).
    Line(HdrRef<'a>),
    /// A compact put, copied out of the queue and checked ([`CompactPut::read`]).
    Compact(CompactPut),
}

/// A record handed to [`Port::poll`]'s handler.
#[derive(Clone, Copy)]
pub struct Incoming<'a> {
    /// Port it came from.
    pub from: u32,
    /// The header.
    pub head: Head<'a>,
    /// Record body after the header (may be longer than the header's payload; empty for a
    /// compact put).
    pub body: &'a [u8],
}

impl Incoming<'_> {
    /// The header, copied out of the queue (a compact put's in its one-line form).
    pub fn hdr(&self) -> Hdr {
        match self.head {
            Head::Line(h) => h.decode(),
            Head::Compact(c) => c.hdr(),
        }
    }
}

impl Port {
    /// Attaches port `me` of `region`.
    pub fn new(region: Region, me: u32) -> Port {
        let p = region.layout.ports;
        let out = (0..p)
            .map(|d| (region.ring(me, d), Producer::new(), region.port_block(d)))
            .collect();
        let inb = (0..p)
            .map(|s| (region.ring(s, me), Consumer::new()))
            .collect();
        Port {
            mine: region.port_block(me),
            region,
            me,
            out,
            inb,
            next: 0,
            sent_since_poll: false,
        }
    }

    /// The region.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// This port's number.
    pub fn me(&self) -> u32 {
        self.me
    }

    /// Tries to enqueue a record; `false` when the ring to `dst` is full.
    #[inline]
    pub fn try_send(&mut self, dst: u32, hdr: &Hdr, payload: &[u8]) -> bool {
        self.try_send_inner::<true>(dst, hdr, payload)
    }

    /// [`Port::try_send`] that never rings `dst`: for a sender that hands over a batch and then
    /// rings each sleeping receiver once itself (the node engine, after a fence). Ringing per
    /// record would make a futex call per record, and the woken rank on the engine's CPU could
    /// take the CPU after each one.
    #[inline]
    pub fn try_send_unrung(&mut self, dst: u32, hdr: &Hdr, payload: &[u8]) -> bool {
        self.try_send_inner::<false>(dst, hdr, payload)
    }

    #[inline(always)]
    fn try_send_inner<const RING: bool>(&mut self, dst: u32, hdr: &Hdr, payload: &[u8]) -> bool {
        let (ring, prod, _) = &mut self.out[dst as usize];
        let Some(r) = prod.reserve(ring, HDR_LEN + payload.len()) else {
            return false;
        };
        ring.write_array(r.body_off, &hdr.encode());
        if !payload.is_empty() {
            ring.write_bytes(r.body_off + HDR_LEN as u64, payload);
        }
        self.publish::<RING>(dst, r, payload.len() as u64);
        true
    }

    /// [`Port::try_send`] of a header already encoded (`head`, as [`Hdr::encode`] makes it)
    /// whose `aux` word is `aux`, with no payload after it: a one-line put whose header a sender
    /// keeps from one put to the next. The record is the one `try_send` makes of the decoded
    /// header with that `aux`.
    #[inline(always)]
    pub fn try_send_line(&mut self, dst: u32, head: &[u8; HDR_LEN], aux: u64) -> bool {
        let (ring, prod, _) = &mut self.out[dst as usize];
        let Some(r) = prod.reserve(ring, HDR_LEN) else {
            return false;
        };
        ring.write_array(r.body_off, head);
        ring.write_array(r.body_off + AUX_AT, &aux.to_le_bytes());
        self.publish::<true>(dst, r, 0);
        true
    }

    /// Enqueues a compact put ([`COMPACT_LEN`]): `word` from [`compact_word`], then the match
    /// bits and the payload word (`len` bytes of it count as sent); `false` when the ring to `dst`
    /// is full.
    #[inline(always)]
    pub fn try_send_compact(
        &mut self,
        dst: u32,
        word: u64,
        match_bits: u64,
        payload: u64,
        len: u64,
    ) -> bool {
        let (ring, prod, _) = &mut self.out[dst as usize];
        let Some(r) = prod.reserve(ring, COMPACT_LEN) else {
            return false;
        };
        let mut b = [0u8; COMPACT_LEN];
        b[..8].copy_from_slice(&word.to_le_bytes());
        b[8..16].copy_from_slice(&match_bits.to_le_bytes());
        b[16..].copy_from_slice(&payload.to_le_bytes());
        ring.write_array(r.body_off, &b);
        self.publish::<true>(dst, r, len);
        true
    }

    /// Publishes record `r` (written) to `dst`: the stamp, then the sender's bookkeeping.
    #[inline(always)]
    fn publish<const RING: bool>(
        &mut self,
        dst: u32,
        r: crate::ring::Reservation,
        payload_len: u64,
    ) {
        let (ring, prod, to) = &mut self.out[dst as usize];
        prod.publish(ring, r);
        // In a burst of sends (no poll in between, e.g. a window of non-blocking sends) fetch a
        // line ahead for writing: the consumer's core holds the ring's lines from the last lap,
        // and a store to one has to wait for it to give the line up. A ping-pong polls between
        // sends and skips this (there the extra ownership traffic cost latency).
        if self.sent_since_poll {
            prod.prefetch_ahead(ring, BURST_PREFETCH_LINES);
        } else {
            // Stored only when it changes: in a burst every store the sender saves leaves room
            // for more of its ring stores in the store buffer (see `BURST_PREFETCH_LINES`).
            self.sent_since_poll = true;
        }
        self.mine.bump(slot::SENT, 1);
        self.mine.bump(slot::SENT_BYTES, payload_len);
        // `Region::wake`, with the flag reached through the destination's block.
        if RING && to.sleeping().load(std::sync::atomic::Ordering::Relaxed) != 0 {
            self.region.ring_doorbell(dst);
        }
    }

    /// Adds to one of this port's counters ([`Region::bump`]; the port's owner is its one writer).
    #[inline(always)]
    pub fn bump(&self, s: usize, n: u64) {
        self.mine.bump(s, n);
    }

    /// Asks for the line the next record to `dst` starts on, for writing.
    #[inline(always)]
    pub fn prefetch_next(&self, dst: u32) {
        let (ring, prod, _) = &self.out[dst as usize];
        prod.prefetch_ahead(ring, 0);
    }

    /// Enqueues a record for world rank `dst_rank` on another node: it goes to the node engine's
    /// port with the destination in the 8 bytes after the header.
    pub fn try_send_routed(&mut self, dst_rank: u32, hdr: &Hdr, payload: &[u8]) -> bool {
        let dst = self.region.engine_port();
        let (ring, prod, _) = &mut self.out[dst as usize];
        let Some(r) = prod.reserve(ring, HDR_LEN + 8 + payload.len()) else {
            return false;
        };
        ring.write_bytes(r.body_off, &hdr.encode());
        ring.write_bytes(
            r.body_off + HDR_LEN as u64,
            &(dst_rank as u64).to_le_bytes(),
        );
        if !payload.is_empty() {
            ring.write_bytes(r.body_off + HDR_LEN as u64 + 8, payload);
        }
        prod.publish(ring, r);
        self.region.bump(self.me, slot::SENT, 1);
        self.region
            .bump(self.me, slot::SENT_BYTES, payload.len() as u64);
        self.region.wake(dst);
        true
    }

    /// Sends to any rank of the job: its port if local, else through the node engine.
    pub fn send_to_rank(&mut self, dst_rank: u32, hdr: &Hdr, payload: &[u8]) -> bool {
        match self.region.port_of_rank(dst_rank) {
            Some(p) => self.try_send(p, hdr, payload),
            None => self.try_send_routed(dst_rank, hdr, payload),
        }
    }

    /// Enqueues raw body bytes (used by tests to forge records).
    pub fn try_send_raw(&mut self, dst: u32, body: &[u8]) -> bool {
        let (ring, prod, _) = &mut self.out[dst as usize];
        if prod.try_push(ring, body).is_none() {
            return false;
        }
        self.region.wake(dst);
        true
    }

    /// True when any inbound ring holds a record (cheap check, used before sleeping).
    pub fn has_pending(&mut self) -> bool {
        self.inb
            .iter_mut()
            .any(|(ring, cons)| matches!(cons.peek(ring), Peek::Record(_)))
    }

    /// Hands up to `budget` inbound records to `f`, round-robin over source ports: up to
    /// [`POLL_BURST`] records from one port, then the next port (a busy sender cannot starve the
    /// others, and a stream of records does not pay a look at every idle queue per record).
    /// Corrupt rings are counted and abandoned. Returns the number of records handled.
    pub fn poll(&mut self, budget: usize, f: impl FnMut(Incoming<'_>)) -> usize {
        self.poll_inner::<false>(budget, f)
    }

    /// [`Port::poll`] for a waiter: the same, but it returns as soon as a source that gave it
    /// records runs dry, instead of looking at every other source once more (on a ping-pong those
    /// looks stand between the message and the answer). The next poll starts at the next source,
    /// so every source is still served in turn. When it finds a record it first asks for the
    /// line of the ring back to that record's source that the next record there starts on, for
    /// writing (a hint only: the answer a waiter is likely to send goes there).
    pub fn poll_run(&mut self, budget: usize, f: impl FnMut(Incoming<'_>)) -> usize {
        self.poll_inner::<true>(budget, f)
    }

    #[inline(always)]
    fn poll_inner<const RUN: bool>(
        &mut self,
        budget: usize,
        mut f: impl FnMut(Incoming<'_>),
    ) -> usize {
        self.sent_since_poll = false;
        let n = self.inb.len();
        let mut done = 0;
        let mut idle_rounds = 0;
        let mut burst = 0;
        while done < budget && idle_rounds < n {
            let i = self.next;
            let (ring, cons) = &mut self.inb[i];
            match cons.peek(ring) {
                Peek::Record(r) => {
                    idle_rounds = 0;
                    if RUN && done == 0 {
                        // A waiter's first record of the pass: ask now, for writing, for the line
                        // an answer to this source would go to. In a ping-pong the answer's
                        // stores wait for that line, which the source's core holds (it polls
                        // it); asked for here its transfer overlaps the whole delivery and the
                        // return to the caller, not only the answer's own `put`
                        // (`Port::prefetch_next`). Once per pass, so a stream of records costs
                        // one hint per run, and a hint changes nothing the rings hold.
                        let (oring, prod, _) = &self.out[i];
                        prod.prefetch_ahead(oring, 0);
                    }
                    let body = ring.body(r.body_off, r.body_len as usize);
                    let (head, rest) = if body.len() == COMPACT_LEN {
                        let src = self.region.ranks.get(i).copied();
                        (CompactPut::read(body, src).map(Head::Compact), &[][..])
                    } else {
                        (
                            HdrRef::new(body).map(Head::Line),
                            body.get(HDR_LEN..).unwrap_or(&[]),
                        )
                    };
                    match head {
                        Some(head) => f(Incoming {
                            from: i as u32,
                            head,
                            body: rest,
                        }),
                        None => self
                            .region
                            .count_drop(self.me, crate::counters::DropReason::Malformed),
                    }
                    // The head goes to the producer once per run of records from this queue (below,
                    // when the run ends), not per record.
                    cons.consume_deferred(ring, r);
                    done += 1;
                    burst += 1;
                    if burst == POLL_BURST {
                        burst = 0;
                        cons.publish(ring);
                        self.next = if i + 1 == n { 0 } else { i + 1 };
                    }
                }
                other => {
                    cons.publish(ring);
                    if matches!(other, Peek::Corrupt) {
                        self.region
                            .count_drop(self.me, crate::counters::DropReason::CorruptQueue);
                    }
                    idle_rounds += 1;
                    burst = 0;
                    self.next = if i + 1 == n { 0 } else { i + 1 };
                    if RUN && done > 0 {
                        // This ring is published (above) and `next` has moved on.
                        return done;
                    }
                }
            }
        }
        // A run cut short by the budget: publish it too, so no producer waits for space that is
        // free while this port does something else.
        let (ring, cons) = &mut self.inb[self.next];
        cons.publish(ring);
        done
    }
}

/// How many lines past its next record a sender in a burst fetches for writing
/// ([`Port::try_send`]). Measured with `puma-bench --only rate` (8 B, alternating builds): 1 and 2
/// lines ahead doubled the message rate when the two cores are far apart (4.9 -> 9.2 M/s), 4 lines
/// gave less (6.5-8.7), 8 nothing; with the cores close together no distance changed it.
pub const BURST_PREFETCH_LINES: u64 = 2;

/// Most records [`Port::poll`] takes from one source port before it looks at the next.
pub const POLL_BURST: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::RegionParams;

    fn region(local: u32) -> Region {
        let params = RegionParams {
            job: 3,
            world: local,
            node: 0,
            ranks: (0..local).collect(),
            ring_cap: 64 << 10,
            heap_per_rank: 64 << 10,
            eager_max: 4096,
            mode: 0,
            max_message: 1 << 20,
        };
        Region::create(&params, false).expect("region").1
    }

    fn raw(seq: u64) -> Hdr {
        Hdr {
            op: op::RAW,
            aux: seq,
            ..Hdr::default()
        }
    }

    #[test]
    fn poll_takes_a_bounded_burst_per_source_and_keeps_each_source_in_order() {
        let r = region(3);
        let (mut a, mut b, mut dst) = (
            Port::new(r.clone(), 0),
            Port::new(r.clone(), 1),
            Port::new(r, 2),
        );
        for s in 0..40 {
            assert!(a.try_send(2, &raw(s), &[]));
        }
        for s in 0..3 {
            assert!(b.try_send(2, &raw(100 + s), &[]));
        }
        let mut got = Vec::new();
        let n = dst.poll(usize::MAX, |m| got.push((m.from, m.hdr().aux)));
        assert_eq!(n, 43);
        // Source order is kept ...
        let from_a: Vec<u64> = got.iter().filter(|g| g.0 == 0).map(|g| g.1).collect();
        let from_b: Vec<u64> = got.iter().filter(|g| g.0 == 1).map(|g| g.1).collect();
        assert_eq!(from_a, (0..40).collect::<Vec<_>>());
        assert_eq!(from_b, vec![100, 101, 102]);
        // ... bursts from one source are at most POLL_BURST long while another has records ...
        let first_b = got.iter().position(|g| g.0 == 1).expect("b was served");
        assert!(first_b <= POLL_BURST, "b waited {first_b} records");
        // ... and a budget stops the poll.
        for s in 0..5 {
            assert!(a.try_send(2, &raw(s), &[]));
        }
        assert_eq!(dst.poll(2, |_| {}), 2);
        assert_eq!(dst.poll(usize::MAX, |_| {}), 3);
        assert_eq!(dst.poll(usize::MAX, |_| {}), 0);
    }

    #[test]
    fn poll_run_stops_when_its_source_runs_dry_and_the_next_poll_starts_at_the_next_source() {
        let r = region(3);
        let (mut a, mut b, mut dst) = (
            Port::new(r.clone(), 0),
            Port::new(r.clone(), 1),
            Port::new(r, 2),
        );
        for s in 0..3 {
            assert!(a.try_send(2, &raw(s), &[]));
            assert!(b.try_send(2, &raw(100 + s), &[]));
        }
        // The run from port 0 ends when it is dry: port 1's records wait for the next poll ...
        let mut got = Vec::new();
        assert_eq!(
            dst.poll_run(usize::MAX, |m| got.push((m.from, m.hdr().aux))),
            3
        );
        assert_eq!(got, vec![(0, 0), (0, 1), (0, 2)]);
        // ... which starts past port 0 (port 0 has a new record by then, served after port 1).
        assert!(a.try_send(2, &raw(3), &[]));
        got.clear();
        assert_eq!(
            dst.poll_run(usize::MAX, |m| got.push((m.from, m.hdr().aux))),
            3
        );
        assert_eq!(got, vec![(1, 100), (1, 101), (1, 102)]);
        got.clear();
        assert_eq!(
            dst.poll_run(usize::MAX, |m| got.push((m.from, m.hdr().aux))),
            1
        );
        assert_eq!(got, vec![(0, 3)]);
        assert_eq!(dst.poll_run(usize::MAX, |_| {}), 0);
        // The dry run's space went back to the producer: a ring's worth fits again.
        let fits = (64u64 << 10) / 64;
        for s in 0..fits {
            assert!(
                a.try_send(2, &raw(s), &[]),
                "record {s} of {fits} found the ring full"
            );
        }
    }

    #[test]
    fn a_put_of_up_to_8_bytes_is_one_aligned_line_stamp_included() {
        let r = region(2);
        let (mut a, mut b) = (Port::new(r.clone(), 0), Port::new(r, 1));
        let h = Hdr {
            op: op::PUT,
            flags: flag::INLINE8,
            length: 8,
            aux: u64::from_le_bytes(*b"8 bytes!"),
            ..Hdr::default()
        };
        for _ in 0..3 {
            assert!(a.try_send(1, &h, &[]));
        }
        let mut n = 0;
        b.poll(usize::MAX, |m| {
            // The record is stamp + header and nothing after it: the header ends exactly at the
            // end of a 64-byte line, so the stamp the receiver polls, the header and the payload
            // (in `aux`) cross between the cores as one line.
            assert!(m.body.is_empty(), "{} bytes after the header", m.body.len());
            assert_eq!(m.body.as_ptr() as usize % crate::ring::LINE, 0);
            assert_eq!(m.hdr().aux.to_le_bytes(), *b"8 bytes!");
            n += 1;
        });
        assert_eq!(n, 3);
        assert_eq!(crate::ring::record_len(HDR_LEN), crate::ring::LINE);
    }

    #[test]
    fn a_line_sent_from_an_encoded_header_is_the_record_of_that_header_with_its_aux() {
        let r = region(2);
        let (mut a, mut b) = (Port::new(r.clone(), 0), Port::new(r, 1));
        let h = Hdr {
            op: op::PUT,
            flags: flag::INLINE8,
            portal: 0x0203,
            src: 0x0405_0607,
            match_bits: 0x1111_2222_3333_4444,
            offset: 0x5555,
            length: 8,
            return_md: 0x6666_7777,
            aux: 0,
            hdr_data: 0x8888_9999_aaaa_bbbb,
        };
        let head = h.encode();
        let auxes = [u64::from_le_bytes(*b"8 bytes!"), 0, u64::MAX, 0x0102];
        for &aux in &auxes {
            assert!(a.try_send_line(1, &head, aux));
        }
        let mut got = Vec::new();
        b.poll(usize::MAX, |m| {
            assert!(m.body.is_empty(), "{} bytes after the header", m.body.len());
            got.push(m.hdr());
        });
        let want: Vec<Hdr> = auxes.iter().map(|&aux| Hdr { aux, ..h }).collect();
        assert_eq!(got, want);
        // Counted as `try_send` counts a header-only record.
        let s = a.region().stats(0);
        assert_eq!((s.sent, s.sent_bytes), (4, 0));
    }

    #[test]
    fn a_poll_releases_what_it_took_even_when_its_budget_cuts_a_run_short() {
        let r = region(2);
        let (mut a, mut b) = (Port::new(r.clone(), 0), Port::new(r, 1));
        let mut sent = 0u64;
        while a.try_send(1, &raw(sent), &[]) {
            sent += 1;
        }
        assert_eq!(sent, (64 << 10) / 64, "one line per header-only record");
        // Fewer records than a run: the producer must see their space once the poll returns.
        assert_eq!(b.poll(5, |_| {}), 5);
        for s in 0..5 {
            assert!(a.try_send(1, &raw(sent + s), &[]), "space of record {s}");
        }
        assert!(!a.try_send(1, &raw(0), &[]));
        // A whole run (and more) taken at once frees all of it.
        let mut got = Vec::new();
        assert_eq!(
            b.poll(3 * POLL_BURST, |m| got.push(m.hdr().aux)),
            3 * POLL_BURST
        );
        assert_eq!(got, (5..5 + 3 * POLL_BURST as u64).collect::<Vec<_>>());
        for s in 0..3 * POLL_BURST as u64 {
            assert!(a.try_send(1, &raw(sent + 5 + s), &[]));
        }
        assert!(!a.try_send(1, &raw(0), &[]));
        // Everything arrives once, in order.
        let mut rest = Vec::new();
        b.poll(usize::MAX, |m| rest.push(m.hdr().aux));
        let want: Vec<u64> =
            (5 + 3 * POLL_BURST as u64..sent + 5 + 3 * POLL_BURST as u64).collect();
        assert_eq!(rest, want);
    }

    #[test]
    fn only_a_send_that_follows_a_send_without_a_poll_is_in_a_burst() {
        let r = region(2);
        let (mut a, mut b) = (Port::new(r.clone(), 0), Port::new(r, 1));
        assert!(!a.sent_since_poll);
        assert!(a.try_send(1, &raw(0), &[]));
        // The next send of `a` would fetch ahead (ping-pong senders poll in between and do not).
        assert!(a.sent_since_poll);
        assert!(a.try_send(1, &raw(1), &[]));
        assert!(a.sent_since_poll);
        a.poll(usize::MAX, |_| {});
        assert!(!a.sent_since_poll);
        // Fetching ahead changes nothing the consumer sees: both records, in order.
        let mut got = Vec::new();
        b.poll(usize::MAX, |m| got.push(m.hdr().aux));
        assert_eq!(got, vec![0, 1]);
    }

    /// A plain put of `length` bytes as `Hdr::put` makes it (no ack, no offset, no user data).
    fn plain(length: u64) -> Hdr {
        Hdr {
            op: op::PUT,
            portal: 0x0203,
            match_bits: 0x1111_2222_3333_4444,
            length,
            return_md: portals::NO_MD,
            ..Hdr::default()
        }
    }

    #[test]
    fn a_compact_put_takes_one_slot_and_arrives_as_the_header_of_its_one_line_form() {
        let r = region(2);
        let (mut a, mut b) = (Port::new(r.clone(), 0), Port::new(r, 1));
        let h = plain(5);
        let w = compact_word(&h).expect("a plain put of 5 bytes has a compact form");
        let payloads = [u64::from_le_bytes(*b"12345\0\0\0"), 0, 7];
        for &p in &payloads {
            assert!(a.try_send_compact(1, w, h.match_bits, p, 5));
        }
        let mut got = Vec::new();
        b.poll(usize::MAX, |m| {
            assert!(m.body.is_empty(), "{} bytes after the header", m.body.len());
            got.push(m.hdr());
        });
        // What the receiver sees is the one-line record `try_send` makes of the same put, with
        // the source filled in from the ring (rank 0).
        let want: Vec<Hdr> = payloads
            .iter()
            .map(|&aux| Hdr {
                flags: flag::INLINE8,
                aux,
                ..h
            })
            .collect();
        assert_eq!(got, want);
        let s = a.region().stats(0);
        assert_eq!((s.sent, s.sent_bytes), (3, 15));
        // One 32-byte slot each: twice as many fit in a ring as one-line records.
        let mut n = 0u64;
        while a.try_send_compact(1, w, 0, 0, 5) {
            n += 1;
        }
        assert_eq!(n, (64 << 10) / crate::ring::SLOT as u64);
    }

    #[test]
    fn only_a_put_with_nothing_the_compact_form_leaves_out_has_one() {
        let base = plain(8);
        assert!(compact_word(&base).is_some());
        assert!(compact_word(&plain(0)).is_some());
        for h in [
            Hdr { offset: 1, ..base },
            Hdr {
                hdr_data: 1,
                ..base
            },
            Hdr {
                flags: flag::ACK_REQ,
                ..base
            },
            Hdr { length: 9, ..base },
            Hdr {
                op: op::GET,
                ..base
            },
        ] {
            assert_eq!(compact_word(&h), None, "{h:?}");
        }
    }

    #[test]
    fn a_malformed_compact_record_is_dropped_and_counted() {
        let r = region(2);
        let (mut a, mut b) = (Port::new(r.clone(), 0), Port::new(r.clone(), 1));
        let mut good = [0u8; COMPACT_LEN];
        good[..8].copy_from_slice(&compact_word(&plain(8)).expect("compact").to_le_bytes());
        // Another op, other flags, a length over 8, a reserved byte set.
        let mut sent = 0;
        for (at, val) in [
            (0, op::GET),
            (1, flag::INLINE8 | flag::ACK_REQ),
            (1, 0),
            (4, 9),
            (5, 1),
            (7, 0x80),
        ] {
            let mut v = good;
            v[at] = val;
            assert!(a.try_send_raw(1, &v));
            sent += 1;
        }
        assert!(a.try_send_raw(1, &good));
        let mut got = Vec::new();
        b.poll(usize::MAX, |m| got.push(m.hdr().length));
        assert_eq!(got, vec![8], "only the well-formed record is handed on");
        assert_eq!(
            r.stats(1).drops_for(crate::counters::DropReason::Malformed),
            sent
        );
    }

    #[test]
    fn a_compact_record_is_taken_only_from_a_local_rank() {
        let mut c = [0u8; COMPACT_LEN];
        c[..8].copy_from_slice(&compact_word(&plain(8)).expect("compact").to_le_bytes());
        assert_eq!(CompactPut::read(&c, Some(4)).map(|p| p.src), Some(4));
        // The node engine's port has no rank: it never sends one.
        assert!(CompactPut::read(&c, None).is_none());
        // Too short a body.
        assert!(CompactPut::read(&c[..16], Some(4)).is_none());
    }
}
