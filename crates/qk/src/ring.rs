//! The inbound queue: a bounded, lock-free, single-producer single-consumer byte ring of
//! variable-length records, one per ordered pair of ports on a node.
//!
//! A record is an 8-byte *stamp* followed by its body, padded to whole 64-byte lines. The stamp
//! carries the record's absolute position in the stream (48 bits), a padding flag and the record
//! length in 8-byte units, so the consumer knows a record is complete by one acquire load of the
//! word it is about to read: no separate tail counter crosses between cores, and a 56-byte header
//! plus stamp is exactly one cache line. The consumer zeroes the first word of every line it
//! consumed, so a line start not yet rewritten in the current lap always reads 0 and old payload
//! can never be mistaken for a stamp (the loom model test found exactly that hazard).
//! The producer writes the body, then the stamp with release ordering. The consumer reads the body,
//! then publishes its head with release ordering; the producer only re-reads that head when its
//! cached copy says the ring is full, and then waits (a full ring never drops a record). One
//! producer per ring means per-pair order is the ring's order.
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
    /// The consumer's published head (acquire).
    fn load_head(&self) -> u64;
    /// Publishes the consumer's head (release).
    fn store_head(&self, v: u64);
}

fn stamp(pos: u64, len: u64, pad: bool) -> u64 {
    ((pos & POS_MASK) << 16) | if pad { PAD_FLAG } else { 0 } | (len / 8)
}

/// Bytes a record with a `body`-byte body occupies: stamp plus body, rounded up to 64-byte lines.
pub fn record_len(body: usize) -> usize {
    (8 + body).div_ceil(LINE) * LINE
}

/// Records are made of whole lines of this many bytes.
pub const LINE: usize = 64;

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
    pub fn reserve<M: RingMem>(&mut self, mem: &M, body: usize) -> Option<Reservation> {
        let cap = mem.cap();
        let rec = record_len(body) as u64;
        assert!(
            rec as usize <= MAX_RECORD && rec <= cap / 2,
            "record too large for ring"
        );
        let off = self.tail & (cap - 1);
        let pad = if off + rec > cap { cap - off } else { 0 };
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
            let len = (w & LEN_MASK) * 8;
            if (w >> 16) != (self.head & POS_MASK)
                || len == 0
                || len % LINE as u64 != 0
                || off + len > cap
            {
                self.broken = true;
                return Peek::Corrupt;
            }
            if w & PAD_FLAG != 0 {
                if off + len != cap {
                    self.broken = true;
                    return Peek::Corrupt;
                }
                clear_lines(mem, off, len);
                self.head += len;
                mem.store_head(self.head);
                continue;
            }
            return Peek::Record(Record {
                body_off: off + 8,
                body_len: len - 8,
                next: self.head + len,
            });
        }
    }

    /// Releases a record's space to the producer.
    pub fn consume<M: RingMem>(&mut self, mem: &M, r: Record) {
        clear_lines(mem, r.body_off - 8, r.body_len + 8);
        self.head = r.next;
        mem.store_head(self.head);
    }
}

fn clear_lines<M: RingMem>(mem: &M, off: u64, len: u64) {
    let mut o = off;
    while o < off + len {
        mem.zero_word(o);
        o += LINE as u64;
    }
}
