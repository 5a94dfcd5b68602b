//! The inbound queue: a bounded, lock-free, single-producer single-consumer byte ring of
//! variable-length records, one per ordered pair of ports on a node.
//!
//! A record is an 8-byte *stamp* followed by its body, padded to whole 32-byte *slots*. The stamp
//! carries the record's absolute position in the stream (48 bits), a padding flag and the record
//! length in 8-byte units, so the consumer knows a record is complete by one acquire load of the
//! word it is about to read: no separate tail counter crosses between cores. A 56-byte header plus
//! stamp is exactly one cache line (two slots); a compact put (a stamp and 24 bytes, see
//! `fabric::COMPACT_LEN`) is one slot, so two of them share a line. A record of more than one slot
//! starts on a line (the producer pads the slot before it), so a header record stays one line and
//! a payload's lines are whole.
//!
//! Why two messages a line: a sender's store into a ring line the consumer has read must wait for
//! the consumer's core to give the line up, and on the development machine that wait held the
//! sender's store buffer at one line transfer per message in a stream (`puma-bench` rate ≈ 6 M/s
//! when a line crossing took ≈ 150 ns); half as many lines per message, half as many waits
//! (ROUNDS.md, twenty-first round).
//!
//! What a slot start the consumer is about to read can hold when the producer has not yet
//! rewritten it in the current lap:
//! * 0 (never written);
//! * the stamp of a record of an earlier lap: its position is behind the consumer's by a whole
//!   number of laps, so it reads as "empty", never as a record (positions only grow);
//! * the first word of a *later* slot of an earlier lap's record, i.e. old header or payload bytes
//!   that could look like anything, including a valid stamp (the loom model test found exactly
//!   that hazard). The consumer therefore zeroes the first word of every slot of a consumed record
//!   except its first (which holds the stamp).
//!
//! So a compact record costs the consumer a read of its line and no write; a one-line header
//! record one zeroing store into the line it has just read.
//! The producer writes the body, then the stamp with release ordering. The consumer reads the body,
//! then publishes its head with release ordering — once per run of records it takes
//! ([`Consumer::consume_deferred`], [`Consumer::publish`]), not per record; the producer only
//! re-reads that head when its cached copy says the ring is full, and then waits (a full ring never
//! drops a record). The head lives on its own line, written only by the consumer. One producer per ring means per-pair order
//! is the ring's order.
//!
//! The algorithm is written against [`RingMem`] so the same code runs on shared memory and in the
//! loom model test (`tests/loom_ring.rs`).

/// Largest record (stamp + body) a ring accepts: the length field holds 15 bits of 8-byte units.
pub const MAX_RECORD: usize = 0x7fff * 8;
const POS_MASK: u64 = (1 << 48) - 1;
const PAD_FLAG: u64 = 1 << 15;
const LEN_MASK: u64 = 0x7fff;

/// The memory a ring lives in. Offsets are byte offsets into the data area, 8-aligned.
pub trait RingMem {
    /// Data capacity in bytes (a power of two, at least 256).
    fn cap(&self) -> u64;
    /// Loads the word at `off` with acquire ordering.
    fn load_acquire(&self, off: u64) -> u64;
    /// Stores the word at `off` with release ordering.
    fn store_release(&self, off: u64, v: u64);
    /// Stores 0 at `off` (relaxed): the consumer clearing a consumed line start.
    fn zero_word(&self, off: u64);
    /// Copies `src` to `off` (never wraps; the ring pads instead).
    fn write_bytes(&self, off: u64, src: &[u8]);
    /// Copies from `off` into `dst`.
    fn read_bytes(&self, off: u64, dst: &mut [u8]);
    /// Hints that the line at `off` will be read soon (a no-op by default).
    fn prefetch(&self, _off: u64) {}
    /// Hints that the line at `off` will be written soon (a no-op by default).
    fn prefetch_write(&self, _off: u64) {}
    /// The consumer's published head (acquire).
    fn load_head(&self) -> u64;
    /// Publishes the consumer's head (release).
    fn store_head(&self, v: u64);
}

fn stamp(pos: u64, len: u64, pad: bool) -> u64 {
    ((pos & POS_MASK) << 16) | if pad { PAD_FLAG } else { 0 } | (len / 8)
}

/// Bytes a record with a `body`-byte body occupies: stamp plus body, rounded up to whole slots.
pub fn record_len(body: usize) -> usize {
    (8 + body).div_ceil(SLOT) * SLOT
}

/// Records are made of whole slots of this many bytes.
pub const SLOT: usize = 32;

/// A cache line: records of more than one slot start on one, and prefetches ask for them.
pub const LINE: usize = 64;

/// How many lines after its first the consumer asks for at once when it sees a record of several
/// lines ([`Consumer::peek`]): a 1 KiB payload's 16.
pub const RECORD_PREFETCH_LINES: u64 = 16;

/// Producer-side state (private to the one sending process/thread).
#[derive(Debug, Default, Clone)]
pub struct Producer {
    tail: u64,
    cached_head: u64,
}

/// A space reservation: write the body at `body_off` (`len` bytes), then [`Producer::publish`].
#[derive(Debug, Clone, Copy)]
pub struct Reservation {
    pos: u64,
    rec_len: u64,
    /// Offset of the body in the data area.
    pub body_off: u64,
}

impl Producer {
    /// A producer starting at position 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reserves room for a body of `body` bytes, padding past the end of the ring if needed.
    /// Returns `None` when the ring is full (the caller waits and retries).
    #[inline(always)]
    pub fn reserve<M: RingMem>(&mut self, mem: &M, body: usize) -> Option<Reservation> {
        let cap = mem.cap();
        let rec = record_len(body) as u64;
        assert!(
            rec as usize <= MAX_RECORD && rec <= cap / 2,
            "record too large for ring"
        );
        let off = self.tail & (cap - 1);
        // A record of more than one slot starts on a line: a slot left before it is padded.
        let align = if rec > SLOT as u64 && off % LINE as u64 != 0 {
            SLOT as u64
        } else {
            0
        };
        let pad = if off + align + rec > cap {
            cap - off
        } else {
            align
        };
        let need = pad + rec;
        if self.tail + need - self.cached_head > cap {
            self.cached_head = mem.load_head();
            if self.tail + need - self.cached_head > cap {
                return None;
            }
        }
        if pad > 0 {
            mem.store_release(off, stamp(self.tail, pad, true));
            self.tail += pad;
        }
        let pos = self.tail;
        Some(Reservation {
            pos,
            rec_len: rec,
            body_off: (pos & (cap - 1)) + 8,
        })
    }

    /// Makes a reserved record visible to the consumer.
    pub fn publish<M: RingMem>(&mut self, mem: &M, r: Reservation) {
        mem.store_release(r.pos & (mem.cap() - 1), stamp(r.pos, r.rec_len, false));
        self.tail = r.pos + r.rec_len;
    }

    /// Hints the line `lines` lines past the next record's start for writing (see
    /// [`RingMem::prefetch_write`]): a sender in a burst asks for its next lines before it needs
    /// them, so its stores do not each wait for the consumer's core to give a line up.
    #[inline]
    pub fn prefetch_ahead<M: RingMem>(&self, mem: &M, lines: u64) {
        mem.prefetch_write((self.tail + lines * LINE as u64) & (mem.cap() - 1));
    }

    /// Convenience: reserve, copy `body`, publish. `None` = ring full.
    pub fn try_push<M: RingMem>(&mut self, mem: &M, body: &[u8]) -> Option<()> {
        let r = self.reserve(mem, body.len())?;
        mem.write_bytes(r.body_off, body);
        self.publish(mem, r);
        Some(())
    }
}

/// Consumer-side state (private to the receiving engine).
#[derive(Debug, Default, Clone)]
pub struct Consumer {
    head: u64,
    /// The head as last stored for the producer (behind `head` after [`Consumer::consume_deferred`]).
    published: u64,
    broken: bool,
}

/// A complete record seen by the consumer.
#[derive(Debug, Clone, Copy)]
pub struct Record {
    /// Offset of the body in the data area.
    pub body_off: u64,
    /// Body capacity in bytes (rounded up to 8; the header says how much is meaningful).
    pub body_len: u64,
    next: u64,
}

/// What [`Consumer::peek`] found.
#[derive(Debug)]
pub enum Peek {
    /// Nothing new.
    Empty,
    /// A record; read it, then [`Consumer::consume`] it.
    Record(Record),
    /// The producer wrote a stamp that cannot be valid; the ring is abandoned from now on.
    Corrupt,
}

impl Consumer {
    /// A consumer starting at position 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// True after a corrupt stamp was seen.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Looks for the next complete record.
    #[inline(always)]
    pub fn peek<M: RingMem>(&mut self, mem: &M) -> Peek {
        if self.broken {
            return Peek::Empty;
        }
        let cap = mem.cap();
        loop {
            let off = self.head & (cap - 1);
            let w = mem.load_acquire(off);
            if w == 0 {
                return Peek::Empty;
            }
            let pos = w >> 16;
            if pos != (self.head & POS_MASK) {
                // The stamp of the record the previous lap left here (consumed, not yet rewritten):
                // exactly one lap behind ours, as every line of a lap is either a record's first
                // line (its stamp) or cleared when consumed. Anything else is not a stamp the
                // producer could have written.
                if self.head.wrapping_sub(pos) & POS_MASK == cap {
                    return Peek::Empty;
                }
                self.broken = true;
                return Peek::Corrupt;
            }
            let len = (w & LEN_MASK) * 8;
            if len == 0 || len % SLOT as u64 != 0 || off + len > cap {
                self.broken = true;
                return Peek::Corrupt;
            }
            if w & PAD_FLAG != 0 {
                // Padding runs to the ring's end, or is the one slot before a line.
                if off + len != cap && !(len == SLOT as u64 && off % LINE as u64 == SLOT as u64) {
                    self.broken = true;
                    return Peek::Corrupt;
                }
                clear_later_slots(mem, off, len);
                self.head += len;
                self.publish(mem);
                continue;
            }
            // A record of several lines (a payload past 8 bytes): its lines are all written (the
            // stamp is published last), so ask for every later line now, at once, instead of
            // letting the payload copy walk them one transfer after another; the transfers
            // overlap each other and the header's validation and matching. At most
            // `RECORD_PREFETCH_LINES`: past that the copy's own stream keeps the lines coming.
            let mut l = off + LINE as u64;
            let end = off + len.min((1 + RECORD_PREFETCH_LINES) * LINE as u64);
            while l < end {
                mem.prefetch(l);
                l += LINE as u64;
            }
            // Start fetching the lines the next records begin on while this one is handled: in
            // a stream they are usually written already, and the fetches overlap the delivery
            // work. One line ahead hides a crossing when the cores are close (≈ 40 ns); when
            // they are far apart (≈ 200 ns, four or five records of delivery work) the lines 3
            // and 5 ahead are asked for too, each line so being asked for again as it comes
            // closer (an early fetch of a line the sender has not written yet brings the old
            // one). `puma-bench` rate, far state: +1 alone 10.6, +1/+5 11.5, +1/+3/+5 12.9–14.1
            // M/s (paired runs); near state unchanged (0.99×).
            mem.prefetch((off + len) & (cap - 1));
            mem.prefetch((off + len + 2 * LINE as u64) & (cap - 1));
            mem.prefetch((off + len + 4 * LINE as u64) & (cap - 1));
            return Peek::Record(Record {
                body_off: off + 8,
                body_len: len - 8,
                next: self.head + len,
            });
        }
    }

    /// Releases a record's space to the producer.
    #[inline]
    pub fn consume<M: RingMem>(&mut self, mem: &M, r: Record) {
        self.consume_deferred(mem, r);
        self.publish(mem);
    }

    /// Moves past a record without telling the producer yet: its space is released by the next
    /// [`Consumer::publish`] (or [`Consumer::consume`]). A consumer taking a run of records
    /// publishes once for the run instead of storing its head per record; it must publish before
    /// it stops polling, or a producer that found the ring full would wait for space that is free.
    #[inline]
    pub fn consume_deferred<M: RingMem>(&mut self, mem: &M, r: Record) {
        clear_later_slots(mem, r.body_off - 8, r.body_len + 8);
        self.head = r.next;
    }

    /// Publishes the head (release) if records were consumed since the last publication: the
    /// line-start clears of those records are ordered before it.
    #[inline]
    pub fn publish<M: RingMem>(&mut self, mem: &M) {
        if self.published != self.head {
            self.published = self.head;
            mem.store_head(self.head);
        }
    }

    /// True when consumed records are not yet published to the producer.
    pub fn unpublished(&self) -> bool {
        self.published != self.head
    }
}

/// Zeroes the first word of every slot of the record at `off` (`len` bytes) but its first: those
/// words are header or payload bytes (or nothing) that a later lap must never take for a stamp.
/// The first slot's stamp stays: in the next lap it reads as an old stamp, i.e. "empty".
#[inline(always)]
fn clear_later_slots<M: RingMem>(mem: &M, off: u64, len: u64) {
    let mut o = off + SLOT as u64;
    while o < off + len {
        mem.zero_word(o);
        o += SLOT as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// Single-threaded ring memory (the concurrent model is `tests/loom_ring.rs`).
    struct Mem {
        words: RefCell<Vec<u64>>,
        head: Cell<u64>,
        /// Offsets handed to `prefetch_write`.
        write_hints: RefCell<Vec<u64>>,
        /// Offsets handed to `prefetch`.
        read_hints: RefCell<Vec<u64>>,
    }

    impl Mem {
        fn new(cap: usize) -> Mem {
            Mem {
                words: RefCell::new(vec![0; cap / 8]),
                head: Cell::new(0),
                write_hints: RefCell::new(Vec::new()),
                read_hints: RefCell::new(Vec::new()),
            }
        }
        fn word(&self, off: u64) -> u64 {
            self.words.borrow()[off as usize / 8]
        }
    }

    impl RingMem for Mem {
        fn cap(&self) -> u64 {
            (self.words.borrow().len() * 8) as u64
        }
        fn load_acquire(&self, off: u64) -> u64 {
            self.word(off)
        }
        fn store_release(&self, off: u64, v: u64) {
            self.words.borrow_mut()[off as usize / 8] = v;
        }
        fn zero_word(&self, off: u64) {
            self.words.borrow_mut()[off as usize / 8] = 0;
        }
        fn write_bytes(&self, off: u64, src: &[u8]) {
            let mut w = self.words.borrow_mut();
            for (i, b) in src.iter().enumerate() {
                let at = off as usize + i;
                let mut bytes = w[at / 8].to_le_bytes();
                bytes[at % 8] = *b;
                w[at / 8] = u64::from_le_bytes(bytes);
            }
        }
        fn read_bytes(&self, off: u64, dst: &mut [u8]) {
            let w = self.words.borrow();
            for (i, b) in dst.iter_mut().enumerate() {
                let at = off as usize + i;
                *b = w[at / 8].to_le_bytes()[at % 8];
            }
        }
        fn load_head(&self) -> u64 {
            self.head.get()
        }
        fn prefetch_write(&self, off: u64) {
            self.write_hints.borrow_mut().push(off)
        }
        fn prefetch(&self, off: u64) {
            self.read_hints.borrow_mut().push(off)
        }
        fn store_head(&self, v: u64) {
            self.head.set(v)
        }
    }

    fn take(c: &mut Consumer, m: &Mem) -> Option<Vec<u8>> {
        match c.peek(m) {
            Peek::Record(r) => {
                let mut b = vec![0u8; r.body_len as usize];
                m.read_bytes(r.body_off, &mut b);
                c.consume(m, r);
                Some(b)
            }
            Peek::Empty => None,
            Peek::Corrupt => panic!("corrupt"),
        }
    }

    #[test]
    fn a_consumed_one_slot_record_is_not_written_by_the_consumer_and_reads_empty_next_lap() {
        let m = Mem::new(256);
        let (mut p, mut c) = (Producer::new(), Consumer::new());
        for lap in 0..3u8 {
            // Eight one-slot records a lap, two to a line.
            for i in 0..8u8 {
                let at = i as u64 * SLOT as u64;
                let before = m.word(at);
                assert!(p.try_push(&m, &[lap, i]).is_some());
                assert_ne!(m.word(at), before, "a new stamp every lap");
                let stamp = m.word(at);
                assert_eq!(
                    take(&mut c, &m).map(|b| b[..2].to_vec()),
                    Some(vec![lap, i])
                );
                // The consumer left the stamp alone (no store to the slot) ...
                assert_eq!(m.word(at), stamp);
                // ... and it does not read it again as a record.
                assert!(take(&mut c, &m).is_none());
            }
        }
        assert!(!c.is_broken());
    }

    #[test]
    fn a_record_of_several_slots_starts_on_a_line_and_its_later_slots_are_cleared() {
        let m = Mem::new(256);
        let (mut p, mut c) = (Producer::new(), Consumer::new());
        // A one-slot record at 0, then a 56-byte body (two slots): the slot at 32 is padded so
        // the record takes line 64..128 whole.
        assert!(p.try_push(&m, &[1]).is_some());
        let body: Vec<u8> = (0..56u8).collect();
        assert!(p.try_push(&m, &body).is_some());
        assert_eq!(m.word(32), stamp(32, 32, true));
        assert_eq!(m.word(64) >> 16, 64, "the record's stamp is on the line");
        assert_eq!(
            take(&mut c, &m),
            Some(vec![
                1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            ])
        );
        assert_eq!(take(&mut c, &m), Some(body.clone()));
        // Consumed: the record's second slot start (header bytes 24..32 before) is cleared, its
        // stamp stays.
        assert_eq!(m.word(96), 0);
        assert_eq!(m.word(64) >> 16, 64);
        // A record that fits the line it starts on needs no padding.
        assert!(p.try_push(&m, &body).is_some());
        assert_eq!(m.word(128) >> 16, 128);
        assert_eq!(take(&mut c, &m), Some(body));
        assert!(!c.is_broken());
    }

    #[test]
    fn mid_ring_padding_is_only_the_one_slot_before_a_line() {
        // Padding at 0 that does not run to the ring's end: corrupt.
        let m = Mem::new(256);
        let mut c = Consumer::new();
        m.store_release(0, stamp(0, 32, true));
        assert!(matches!(c.peek(&m), Peek::Corrupt));
        // After a one-slot record at 0: padding of two slots at 32 is corrupt, of one slot is
        // skipped (the consumer then waits at 64).
        for (len, ok) in [(64u64, false), (32, true)] {
            let m = Mem::new(256);
            let (mut p, mut c) = (Producer::new(), Consumer::new());
            assert!(p.try_push(&m, &[1]).is_some());
            assert!(take(&mut c, &m).is_some());
            m.store_release(32, stamp(32, len, true));
            let got = c.peek(&m);
            assert_eq!(
                matches!(got, Peek::Empty),
                ok,
                "padding of {len} at 32: {got:?}"
            );
            assert_eq!(c.is_broken(), !ok);
        }
    }

    #[test]
    fn old_payload_that_looks_like_a_future_stamp_is_never_taken_for_one() {
        let m = Mem::new(256);
        let (mut p, mut c) = (Producer::new(), Consumer::new());
        // Record 0 covers slots 0-3 (positions 0..128). The first words of its slots 1, 2 and 3
        // are payload made to equal exactly the stamps one-slot records at positions 256+32,
        // 256+64 and 256+96 would carry next lap.
        let mut body = vec![0u8; 120];
        for k in 1..4u64 {
            let forged = stamp(256 + 32 * k, 32, false);
            let at = 32 * k as usize - 8;
            body[at..at + 8].copy_from_slice(&forged.to_le_bytes());
        }
        assert!(p.try_push(&m, &body).is_some());
        assert_eq!(m.word(64), stamp(256 + 64, 32, false));
        assert_eq!(take(&mut c, &m), Some(body.clone()));
        // Consumed: the later slots' first words are gone, the first slot's stamp stays.
        assert_eq!((m.word(32), m.word(64), m.word(96)), (0, 0, 0));
        assert_ne!(m.word(0), 0);
        // Fill the rest of the lap, then one record at position 256 (slot 0 of the next lap).
        for i in 0..4u8 {
            assert!(p.try_push(&m, &[i]).is_some());
            assert!(take(&mut c, &m).is_some());
        }
        assert!(p.try_push(&m, &[9]).is_some());
        assert_eq!(take(&mut c, &m).map(|b| b[0]), Some(9));
        // Position 288 (slot 1) has not been written in this lap: it must read empty.
        assert!(matches!(c.peek(&m), Peek::Empty));
        assert!(!c.is_broken());
    }

    #[test]
    fn a_stamp_with_a_position_that_is_not_ours_or_a_whole_lap_behind_breaks_the_ring() {
        for bad in [
            stamp(64, 64, false),
            stamp(512, 64, false),
            stamp(8, 64, false),
            stamp(POS_MASK + 1 - 512, 64, false),
        ] {
            let m = Mem::new(256);
            let mut c = Consumer::new();
            m.store_release(0, bad);
            assert!(matches!(c.peek(&m), Peek::Corrupt), "{bad:#x}");
            assert!(c.is_broken());
            assert!(matches!(c.peek(&m), Peek::Empty));
        }
    }

    #[test]
    fn padding_at_the_end_of_the_ring_wraps_records_intact() {
        let m = Mem::new(256);
        let (mut p, mut c) = (Producer::new(), Consumer::new());
        for n in 0..40u8 {
            let len = if n % 3 == 0 { 100 } else { 20 };
            let body: Vec<u8> = (0..len).map(|i| n.wrapping_add(i)).collect();
            assert!(p.try_push(&m, &body).is_some(), "record {n}");
            assert_eq!(
                take(&mut c, &m).map(|b| b[..len as usize].to_vec()),
                Some(body)
            );
        }
        assert!(!c.is_broken());
    }

    #[test]
    fn a_full_ring_refuses_until_the_consumer_frees_space() {
        let m = Mem::new(256);
        let (mut p, mut c) = (Producer::new(), Consumer::new());
        for i in 0..8u8 {
            assert!(p.try_push(&m, &[i]).is_some());
        }
        assert!(p.try_push(&m, &[8]).is_none());
        assert_eq!(take(&mut c, &m).map(|b| b[0]), Some(0));
        assert!(p.try_push(&m, &[8]).is_some());
        for i in 1..9u8 {
            assert_eq!(take(&mut c, &m).map(|b| b[0]), Some(i));
        }
    }

    #[test]
    fn deferred_consumption_frees_space_only_when_published() {
        let m = Mem::new(256);
        let (mut p, mut c) = (Producer::new(), Consumer::new());
        for i in 0..8u8 {
            assert!(p.try_push(&m, &[i]).is_some());
        }
        for i in 0..3u8 {
            match c.peek(&m) {
                Peek::Record(r) => {
                    let mut b = [0u8; 1];
                    m.read_bytes(r.body_off, &mut b);
                    assert_eq!(b[0], i);
                    c.consume_deferred(&m, r);
                }
                other => panic!("{other:?}"),
            }
        }
        // Three records taken, none released: the producer still finds the ring full, and the
        // head word was never written.
        assert!(c.unpublished());
        assert_eq!(m.load_head(), 0);
        assert!(p.try_push(&m, &[8]).is_none());
        c.publish(&m);
        assert!(!c.unpublished());
        assert_eq!(m.load_head(), 3 * SLOT as u64);
        // Publishing again stores nothing new; the producer now has three slots.
        m.store_head(7);
        c.publish(&m);
        assert_eq!(m.load_head(), 7);
        m.store_head(3 * SLOT as u64);
        for i in 8..11u8 {
            assert!(p.try_push(&m, &[i]).is_some());
        }
        assert!(p.try_push(&m, &[11]).is_none());
        for i in 3..11u8 {
            assert_eq!(take(&mut c, &m).map(|b| b[0]), Some(i));
        }
        assert!(!c.unpublished());
    }

    #[test]
    fn prefetch_ahead_names_the_line_past_the_next_record_and_wraps() {
        let m = Mem::new(256);
        let (mut p, mut c) = (Producer::new(), Consumer::new());
        p.prefetch_ahead(&m, 2);
        for i in 0..3u8 {
            assert!(p.try_push(&m, &[i]).is_some());
            assert!(take(&mut c, &m).is_some());
        }
        // Next record at 96: two lines past it is 224; after four more, 224 + 128 = 352, i.e. 96
        // in a 256-byte ring.
        p.prefetch_ahead(&m, 2);
        for i in 3..7u8 {
            assert!(p.try_push(&m, &[i]).is_some());
            assert!(take(&mut c, &m).is_some());
        }
        p.prefetch_ahead(&m, 2);
        assert_eq!(*m.write_hints.borrow(), vec![128, 224, 96]);
        // A hint writes nothing: the ring still reads empty and then carries the next record.
        assert!(matches!(c.peek(&m), Peek::Empty));
        assert!(p.try_push(&m, &[7]).is_some());
        assert_eq!(take(&mut c, &m).map(|b| b[0]), Some(7));
    }

    #[test]
    fn peek_asks_for_every_later_line_of_a_multi_line_record_up_to_the_limit() {
        let m = Mem::new(8192);
        let (mut p, mut c) = (Producer::new(), Consumer::new());
        // A one-slot record: only the lines of the records after it (from its end, then 2 and 4
        // lines on).
        assert!(p.try_push(&m, &[1]).is_some());
        assert!(take(&mut c, &m).is_some());
        assert_eq!(*m.read_hints.borrow(), vec![32, 160, 288]);
        m.read_hints.borrow_mut().clear();
        // A five-slot record (padded to start on line 64): its lines 2 and 3 (128, 192) first,
        // then the lines ahead of its end (224).
        let body: Vec<u8> = (0..150u8).collect();
        assert!(p.try_push(&m, &body).is_some());
        assert_eq!(take(&mut c, &m), Some([&body[..], &[0; 2]].concat()));
        assert_eq!(*m.read_hints.borrow(), vec![128, 192, 224, 352, 480]);
        m.read_hints.borrow_mut().clear();
        // A record longer than the limit: only `RECORD_PREFETCH_LINES` of its later lines (it
        // too starts on the next line, 256).
        let big = vec![7u8; 40 * LINE];
        assert!(p.try_push(&m, &big).is_some());
        let at = 4 * LINE as u64;
        assert!(take(&mut c, &m).is_some());
        let hints = m.read_hints.borrow();
        let own: Vec<u64> = (1..=RECORD_PREFETCH_LINES).map(|l| at + l * 64).collect();
        assert_eq!(hints[..own.len()], own[..]);
        assert_eq!(hints.len(), own.len() + 3);
        // Hints changed nothing: the ring is empty and carries the next record intact.
        drop(hints);
        assert!(matches!(c.peek(&m), Peek::Empty));
        assert!(p.try_push(&m, &[9]).is_some());
        assert_eq!(take(&mut c, &m).map(|b| b[0]), Some(9));
        assert!(!c.is_broken());
    }
}
