//! Loom model test of copy sharing's board (`qk::copy_share`): every interleaving (within loom's
//! bounds) of a receiver that shares two copies in turn and a sender that keeps looking at the
//! board. Chunk copies are modelled as one word each, written with the copy's token: after each
//! copy the receiver finds every chunk of it written by that copy, and a write it did not expect
//! (a helper still copying after the receiver returned, or a chunk of the second copy taken with
//! the first copy's description) shows as a wrong word.

use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::Arc;
use qk::copy_share::{Board, BoardWords, End, SharedCopy, BOARD_WORDS};

struct LoomWords([AtomicU64; BOARD_WORDS]);

impl BoardWords for LoomWords {
    fn load(&self, i: usize, o: Ordering) -> u64 {
        self.0[i].load(o)
    }
    fn store(&self, i: usize, v: u64, o: Ordering) {
        self.0[i].store(v, o)
    }
    fn fetch_or(&self, i: usize, v: u64, o: Ordering) -> u64 {
        self.0[i].fetch_or(v, o)
    }
    fn compare_exchange_weak(
        &self,
        i: usize,
        cur: u64,
        new: u64,
        ok: Ordering,
        fail: Ordering,
    ) -> Result<u64, u64> {
        self.0[i].compare_exchange_weak(cur, new, ok, fail)
    }
    fn spin(&self, _long: bool) {
        loom::thread::yield_now();
    }
}

/// Bytes per modelled chunk: chunk `k` of a copy to `dst` is memory word `dst / CHUNK + k`.
const CHUNK: u64 = 4096;

/// A copy of two chunks to `dst`, for the send `token`.
fn copy(dst: u64, token: u64) -> SharedCopy {
    SharedCopy {
        src: 0,
        dst,
        len: 2 * CHUNK,
        chunk: CHUNK,
        token,
    }
}

#[test]
fn loom_board_copies_each_chunk_once_and_nothing_after_the_owner_returns() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(2);
    builder.check(|| {
        let words = Arc::new(LoomWords(std::array::from_fn(|_| AtomicU64::new(0))));
        // Destination memory: words 0-1 for the first copy, 2-3 for the second.
        let mem: Arc<Vec<AtomicU64>> = Arc::new((0..4).map(|_| AtomicU64::new(0)).collect());
        let first = copy(0, 1);
        let second = copy(2 * CHUNK, 2);
        let helper = {
            let (words, mem) = (words.clone(), mem.clone());
            loom::thread::spawn(move || {
                let b = Board::new(&*words);
                // The sender looks twice, as two progress passes would.
                for _ in 0..2 {
                    b.help(
                        End::Front,
                        |c| c.token == 1 || c.token == 2,
                        |c, at, _| {
                            let w = ((c.dst + at) / CHUNK) as usize;
                            mem[w].store(c.token, Ordering::Relaxed);
                        },
                    );
                }
            })
        };
        let b = Board::new(&*words);
        let mine = |c: &SharedCopy| {
            let mem = mem.clone();
            let c = *c;
            move |at: u64, _len: u64| {
                let w = ((c.dst + at) / CHUNK) as usize;
                mem[w].store(c.token, Ordering::Relaxed);
            }
        };
        b.open(&first);
        b.copy_as_owner(&first, End::Back, mine(&first), || true);
        assert_eq!(mem[0].load(Ordering::Relaxed), 1);
        assert_eq!(mem[1].load(Ordering::Relaxed), 1);
        // The application reuses its buffer.
        mem[0].store(9, Ordering::Relaxed);
        mem[1].store(9, Ordering::Relaxed);
        b.open(&second);
        b.copy_as_owner(&second, End::Back, mine(&second), || true);
        assert_eq!(mem[2].load(Ordering::Relaxed), 2);
        assert_eq!(mem[3].load(Ordering::Relaxed), 2);
        helper.join().unwrap();
        // Nothing of the first copy was written after the owner returned from it.
        assert_eq!(mem[0].load(Ordering::Relaxed), 9);
        assert_eq!(mem[1].load(Ordering::Relaxed), 9);
    });
}
