//! Loom model test of the inbound queue: every interleaving (within loom's bounds) of one producer
//! and one consumer on a tiny ring, with wrap-around padding and a full ring, must deliver every
//! record intact and in order.

use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::Arc;
use qk::ring::{Consumer, Peek, Producer, RingMem};

struct LoomMem {
    words: Vec<AtomicU64>,
    head: AtomicU64,
}

impl LoomMem {
    fn new(cap: usize) -> Self {
        LoomMem {
            words: (0..cap / 8).map(|_| AtomicU64::new(0)).collect(),
            head: AtomicU64::new(0),
        }
    }
}

impl RingMem for LoomMem {
    fn cap(&self) -> u64 {
        (self.words.len() * 8) as u64
    }
    fn load_acquire(&self, off: u64) -> u64 {
        self.words[off as usize / 8].load(Ordering::Acquire)
    }
    fn store_release(&self, off: u64, v: u64) {
        self.words[off as usize / 8].store(v, Ordering::Release)
    }
    fn zero_word(&self, off: u64) {
        self.words[off as usize / 8].store(0, Ordering::Relaxed)
    }
    fn write_bytes(&self, off: u64, src: &[u8]) {
        // Payload words are plain (relaxed) stores: only the stamp's release/acquire may order them.
        for (i, chunk) in src.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.words[off as usize / 8 + i].store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
    }
    fn read_bytes(&self, off: u64, dst: &mut [u8]) {
        for (i, chunk) in dst.chunks_mut(8).enumerate() {
            let w = self.words[off as usize / 8 + i]
                .load(Ordering::Relaxed)
                .to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
    }
    fn load_head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }
    fn store_head(&self, v: u64) {
        self.head.store(v, Ordering::Release)
    }
}

fn body(seq: u8) -> Vec<u8> {
    // Bodies of 60 and 30 bytes (+1 sequence byte) make records of 96 and 64 bytes (three and two
    // slots) on a 256-byte ring: the second record is padded to start on a line, the third to
    // the ring's end, the ring wraps and fills up.
    let n = if seq % 2 == 0 { 60 } else { 30 };
    (0..n)
        .map(|i| seq.wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

#[test]
fn loom_ring_delivers_everything_in_order() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(|| {
        const N: u8 = 4;
        let mem = Arc::new(LoomMem::new(256));
        let m2 = mem.clone();
        let producer = loom::thread::spawn(move || {
            let mut p = Producer::new();
            for seq in 0..N {
                // A one-byte sequence number leads the body so the consumer can check order.
                let mut rec = vec![seq];
                rec.extend_from_slice(&body(seq));
                loop {
                    if let Some(r) = p.reserve(&*m2, rec.len()) {
                        m2.write_bytes(r.body_off, &rec);
                        p.publish(&*m2, r);
                        break;
                    }
                    loom::thread::yield_now();
                }
            }
        });
        let mut c = Consumer::new();
        let mut next = 0u8;
        while next < N {
            match c.peek(&*mem) {
                Peek::Record(r) => {
                    let want = body(next);
                    let mut got = vec![0u8; 1 + want.len()];
                    assert!(
                        r.body_len as usize >= got.len(),
                        "record shorter than its body"
                    );
                    mem.read_bytes(r.body_off, &mut got);
                    assert_eq!(got[0], next, "records out of order");
                    assert_eq!(&got[1..], &want[..], "record {next} corrupted");
                    c.consume(&*mem, r);
                    next += 1;
                }
                Peek::Empty => loom::thread::yield_now(),
                Peek::Corrupt => panic!("consumer saw a corrupt stamp"),
            }
        }
        producer.join().unwrap();
    });
}

/// The stamp a one-slot record at `pos` carries (the layout documented in `qk::ring`).
fn one_slot_stamp(pos: u64) -> u64 {
    (pos << 16) | 4
}

#[test]
fn loom_ring_never_takes_an_old_stamp_or_old_payload_for_a_record() {
    // The consumer leaves each record's stamp slot alone and only clears later slots. On a
    // 256-byte ring: record 0 spans slots 0-3 and its payload puts, at the starts of slots 1 and
    // 2, the exact stamps records 6 and 7 (one slot each, positions 288 and 320 = slots 1 and 2
    // of the next lap) will carry. Records 1-7 are one slot each, so the consumer meets the
    // previous lap's stamps and those forged words while the producer may not have rewritten
    // them yet.
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(|| {
        const N: u8 = 8;
        let rec = |seq: u8| -> Vec<u8> {
            if seq == 0 {
                let mut b = vec![0u8; 120];
                b[24..32].copy_from_slice(&one_slot_stamp(288).to_le_bytes());
                b[56..64].copy_from_slice(&one_slot_stamp(320).to_le_bytes());
                b
            } else {
                vec![seq; 8]
            }
        };
        let mem = Arc::new(LoomMem::new(256));
        let m2 = mem.clone();
        let producer = loom::thread::spawn(move || {
            let mut p = Producer::new();
            for seq in 0..N {
                let body = rec(seq);
                loop {
                    if let Some(r) = p.reserve(&*m2, body.len()) {
                        m2.write_bytes(r.body_off, &body);
                        p.publish(&*m2, r);
                        break;
                    }
                    loom::thread::yield_now();
                }
            }
        });
        let mut c = Consumer::new();
        let mut next = 0u8;
        while next < N {
            match c.peek(&*mem) {
                Peek::Record(r) => {
                    let want = rec(next);
                    let mut got = vec![0u8; want.len()];
                    mem.read_bytes(r.body_off, &mut got);
                    assert_eq!(got, want, "record {next} wrong or out of order");
                    c.consume(&*mem, r);
                    next += 1;
                }
                Peek::Empty => loom::thread::yield_now(),
                Peek::Corrupt => panic!("consumer saw a corrupt stamp"),
            }
        }
        producer.join().unwrap();
    });
}

#[test]
fn loom_ring_with_the_head_published_once_per_run_delivers_everything_in_order() {
    // The consumer as `Port::poll` drives it: records are taken with `consume_deferred` and the
    // head is published only when a run ends (every second record, or when the ring reads
    // empty). The producer must still see every freed byte eventually (no deadlock on a full
    // ring) and never overwrite a record the consumer has not taken.
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(|| {
        const N: u8 = 5;
        let mem = Arc::new(LoomMem::new(256));
        let m2 = mem.clone();
        let producer = loom::thread::spawn(move || {
            let mut p = Producer::new();
            for seq in 0..N {
                let mut rec = vec![seq];
                rec.extend_from_slice(&body(seq));
                loop {
                    if let Some(r) = p.reserve(&*m2, rec.len()) {
                        m2.write_bytes(r.body_off, &rec);
                        p.publish(&*m2, r);
                        break;
                    }
                    loom::thread::yield_now();
                }
            }
        });
        let mut c = Consumer::new();
        let mut next = 0u8;
        let mut run = 0;
        while next < N {
            match c.peek(&*mem) {
                Peek::Record(r) => {
                    let want = body(next);
                    let mut got = vec![0u8; 1 + want.len()];
                    mem.read_bytes(r.body_off, &mut got);
                    assert_eq!(got[0], next, "records out of order");
                    assert_eq!(&got[1..], &want[..], "record {next} corrupted");
                    c.consume_deferred(&*mem, r);
                    next += 1;
                    run += 1;
                    if run == 2 {
                        run = 0;
                        c.publish(&*mem);
                    }
                }
                Peek::Empty => {
                    run = 0;
                    c.publish(&*mem);
                    loom::thread::yield_now();
                }
                Peek::Corrupt => panic!("consumer saw a corrupt stamp"),
            }
        }
        c.publish(&*mem);
        producer.join().unwrap();
    });
}
