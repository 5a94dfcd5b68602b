//! Copy sharing: the sender of a large message copies part of it for the receiver.
//!
//! A large put inside a node travels by reference: the receiver matches it, then copies the bytes
//! out of the sender's part of the job heap into its own buffer with one `memcpy`, and the sender
//! waits for the FIN. When the source was last written on the sender's core, every line of it
//! crosses between the cores during that copy, and one core alone pulls 1 MiB that way in 46–74 µs
//! on the machine these figures come from, while two cores, one copying each half, take 25–37 µs
//! (`crates/qk/bench-peers/pull_copy.c`). The sender is idle anyway: it is waiting for the FIN.
//!
//! So when the destination is in the receiver's own heap part (which the sender maps too), the
//! receiver opens a *board* in its port block, naming the copy (source and destination offsets in
//! the region, length, chunk size, the sender's token). A sender with a large send outstanding to
//! a port of its node looks at that port's board on each pass of its progress engine (one load of
//! a line that stays in its cache until the board changes). Both then take chunks until none is
//! left, each from its own [`End`] of the message; the receiver waits for the chunks the sender
//! took, and only then posts its event and sends the FIN.
//!
//! Which end a rank takes depends on the pair, not on who sends: the lower port of the two copies
//! from the front in both directions. When the pair sends the same buffers back and forth (a
//! ping-pong, a halo exchange), each core then copies the lines it copied last time, which are
//! still in its own cache, instead of pulling them out of the other core's. The model
//! `bench-peers/pull_copy.c`, 1 MiB near, median: halves split by role 43.6 µs, halves kept by
//! core 12.7 µs (mode 4); at 4 MiB, which no core's cache holds, both 51 µs.
//!
//! The contract, which [`Board`] keeps:
//! * The receiver never waits for the sender to *start*: a sender that is computing, or that looks
//!   late, finds every chunk claimed (or a newer copy on the board) and copies
//!   nothing. The receiver waits only for chunks the sender has claimed, and a claimed chunk is
//!   being copied right now (if the sender's process dies meanwhile, the receiver copies the
//!   unfinished chunks itself, see [`Board::copy_as_owner`]).
//! * A claim names the copy's generation, so a late helper can never take a chunk of a later copy
//!   with an earlier copy's offsets: it claims with a compare-and-swap of (generation, first and
//!   last unclaimed chunk) against the word it read before the offsets, and the owner closes the board (a new
//!   generation with no chunk to take) before it rewrites the offsets, so a helper that read any
//!   of the new offsets under an old word fails its claim. The loom model `tests/loom_board.rs`
//!   checks every interleaving of an owner sharing two copies with a helper looking twice; it
//!   found the interleaving the closing now prevents.
//! * Once the receiver has returned from [`Board::copy_as_owner`], no helper writes into the
//!   destination again: every claim of that generation was finished, and no new one can be made.
//! * The helper checks the board before it copies a byte: the source must lie inside the large send
//!   that the board's token names (its own bytes), the destination inside the board owner's heap
//!   part, the chunk count at most [`MAX_CHUNKS`] (see [`Board::help`]). A board is in shared
//!   memory any process of the job can write, so these checks are what keep a forged board from
//!   reading anything but the sender's own outstanding bytes or writing anywhere but the owner's
//!   heap part.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Words of a board (two cache lines: the claim word and the copy's description, then the done
/// mask the helper sets, kept apart so the helper's completions do not steal the claim line).
pub const BOARD_WORDS: usize = 16;
/// Messages at least this long are shared: with the default eager limit (16 KiB) every message
/// sent by reference. Near, one-way, against sharing from 64 KiB in 16 KiB chunks (three
/// alternated qk-only cycles): 24 KiB 3.2–3.7 → 2.0–2.3 µs, 32 KiB 4.4–5.1 → 2.4–2.9 µs.
pub const SHARE_MIN: u64 = 16 << 10;
/// Chunk size of messages of 1 MiB and more (1 MiB one-way latency near, per-run medians: 24–34 µs
/// with 128 KiB chunks, 31–36 µs with 64 KiB, 33–37 µs with 32 KiB, worse with 16 KiB, and worse
/// again with chunks shrinking as the copy goes on). Shorter messages are cut in quarters, of at
/// least [`SMALL_CHUNK`].
pub const MIN_CHUNK: u64 = 128 << 10;
/// Smallest chunk (8 KiB against 16 KiB: 64 KiB one-way 3.6–4.0 against 3.9–4.2 µs).
pub const SMALL_CHUNK: u64 = 8 << 10;
/// Most chunks of one copy (one bit each in the done mask).
pub const MAX_CHUNKS: u64 = 64;
/// How long the receiver waits for a helper's chunk before it checks that the helper still lives.
pub const ALIVE_CHECK: Duration = Duration::from_millis(100);
/// How long the receiver spins on a helper's chunk before each look yields the CPU (a chunk takes
/// 1–10 µs; a helper that shares the receiver's CPU, as ranks of an oversubscribed node or a
/// co-processor thread may, only finishes once the receiver lets it run).
pub const YIELD_AFTER: Duration = Duration::from_micros(50);

const CLAIM: usize = 0;
const SRC: usize = 1;
const DST: usize = 2;
const LEN: usize = 3;
const CHUNK: usize = 4;
const TOKEN: usize = 5;
const DONE: usize = 8;
/// The claim word: generation << 32 | front << 16 | back, the unclaimed chunks being
/// `front..back`. A closed board has none (front = back = 0).
const FRONT_SHIFT: u32 = 16;
const FIELD: u64 = 0xffff;

/// The end of a shared copy a rank takes its chunks from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// From chunk 0 up.
    Front,
    /// From the last chunk down.
    Back,
}

impl End {
    /// The end the rank on port `me` takes in a copy shared with the rank on port `other`: the
    /// lower port takes the front, whichever of the two receives.
    pub fn of(me: u32, other: u32) -> End {
        if me < other {
            End::Front
        } else {
            End::Back
        }
    }
}

/// The chunk the claim word `w` of a copy of `n` chunks leaves to `end`, and the word once it is
/// taken; `None` when no chunk is left or the word names chunks beyond `n` (a forged board).
fn take(w: u64, n: u64, end: End) -> Option<(u64, u64)> {
    let (front, back) = ((w >> FRONT_SHIFT) & FIELD, w & FIELD);
    if front >= back || back > n {
        return None;
    }
    Some(match end {
        End::Front => (front, w + (1 << FRONT_SHIFT)),
        End::Back => (back - 1, w - 1),
    })
}

/// One shared copy: offsets are region offsets (the same in every process of the job).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedCopy {
    /// Source offset (in the sender's heap part).
    pub src: u64,
    /// Destination offset (in the receiver's heap part).
    pub dst: u64,
    /// Bytes.
    pub len: u64,
    /// Bytes per chunk (the last may be shorter).
    pub chunk: u64,
    /// The sender's token of the large send.
    pub token: u64,
}

impl SharedCopy {
    /// The copy of `len` bytes from `src` to `dst` for the send `token`: quarters of at least
    /// [`SMALL_CHUNK`] up to 512 KiB, then [`MIN_CHUNK`]s, and at most [`MAX_CHUNKS`] chunks.
    pub fn new(src: u64, dst: u64, len: u64, token: u64) -> SharedCopy {
        let chunk = len
            .div_ceil(MAX_CHUNKS)
            .max((len / 4).min(MIN_CHUNK))
            .max(SMALL_CHUNK)
            .next_multiple_of(4096);
        SharedCopy {
            src,
            dst,
            len,
            chunk,
            token,
        }
    }

    /// Number of chunks (0 for a malformed copy with a zero chunk).
    pub fn chunks(&self) -> u64 {
        if self.chunk == 0 {
            return 0;
        }
        self.len.div_ceil(self.chunk)
    }

    /// Chunk `i`'s offset into the message and length.
    pub fn chunk_range(&self, i: u64) -> (u64, u64) {
        let at = i * self.chunk;
        (at, self.chunk.min(self.len - at))
    }
}

/// The [`BOARD_WORDS`] shared words a board lives in: atomics in a port block of the region, or
/// a model checker's (`tests/loom_board.rs`). Word `i` is always below [`BOARD_WORDS`].
pub trait BoardWords {
    /// Loads word `i`.
    fn load(&self, i: usize, o: Ordering) -> u64;
    /// Stores `v` into word `i`.
    fn store(&self, i: usize, v: u64, o: Ordering);
    /// Ors `v` into word `i`, returning the old value.
    fn fetch_or(&self, i: usize, v: u64, o: Ordering) -> u64;
    /// Replaces word `i` by `new` if it is `cur`; the value found either way.
    fn compare_exchange_weak(
        &self,
        i: usize,
        cur: u64,
        new: u64,
        ok: Ordering,
        fail: Ordering,
    ) -> Result<u64, u64>;
    /// One turn of a wait loop; `long`: the wait has gone on for [`YIELD_AFTER`], so the turn
    /// gives the CPU away (the helper may be a thread that shares it).
    fn spin(&self, long: bool) {
        if long {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

impl BoardWords for [AtomicU64; BOARD_WORDS] {
    #[inline]
    fn load(&self, i: usize, o: Ordering) -> u64 {
        self[i].load(o)
    }
    #[inline]
    fn store(&self, i: usize, v: u64, o: Ordering) {
        self[i].store(v, o)
    }
    #[inline]
    fn fetch_or(&self, i: usize, v: u64, o: Ordering) -> u64 {
        self[i].fetch_or(v, o)
    }
    #[inline]
    fn compare_exchange_weak(
        &self,
        i: usize,
        cur: u64,
        new: u64,
        ok: Ordering,
        fail: Ordering,
    ) -> Result<u64, u64> {
        self[i].compare_exchange_weak(cur, new, ok, fail)
    }
}

/// A port's copy board (see the module documentation), over [`BOARD_WORDS`] shared words.
#[derive(Clone, Copy, Debug)]
pub struct Board<'a, W: BoardWords + ?Sized = [AtomicU64; BOARD_WORDS]> {
    w: &'a W,
}

fn all_chunks(n: u64) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

impl<'a, W: BoardWords + ?Sized> Board<'a, W> {
    /// The board over `w`.
    pub fn new(w: &'a W) -> Board<'a, W> {
        Board { w }
    }

    /// The receiver (the board's owner) opens copy `c` and returns its generation. `c` must have
    /// at most [`MAX_CHUNKS`] chunks.
    pub fn open(&self, c: &SharedCopy) -> u32 {
        debug_assert!(c.chunks() <= MAX_CHUNKS);
        let gen = ((self.w.load(CLAIM, Ordering::Relaxed) >> 32) as u32).wrapping_add(1);
        // Closed first: a helper that read an earlier claim word and then any part of the new
        // description fails its claim, because each description word is stored with release
        // after this store and read with acquire, so its compare-and-swap sees this word (or a
        // later one). Without it a helper holding an old word with a chunk index below the new
        // chunk count could claim a chunk the owner would copy too, and not wait for (the loom
        // model `tests/loom_board.rs` found that interleaving).
        self.w.store(CLAIM, (gen as u64) << 32, Ordering::Relaxed);
        self.w.store(SRC, c.src, Ordering::Release);
        self.w.store(DST, c.dst, Ordering::Release);
        self.w.store(LEN, c.len, Ordering::Release);
        self.w.store(CHUNK, c.chunk, Ordering::Release);
        self.w.store(TOKEN, c.token, Ordering::Release);
        self.w.store(DONE, 0, Ordering::Relaxed);
        // Publishes the description: a helper that sees this word sees it too.
        self.w
            .store(CLAIM, ((gen as u64) << 32) | c.chunks(), Ordering::Release);
        gen
    }

    /// The receiver copies chunks of the open copy `c` from its `end` with `copy(offset, len)`
    /// until none is left, then waits for the chunks a helper claimed. Returns how many chunks the
    /// helper copied.
    ///
    /// `helper_alive` is asked after every [`ALIVE_CHECK`] of waiting: when it says the helper
    /// is gone, the receiver copies the chunks the helper claimed but did not finish (a dead
    /// process writes nothing more, and the bytes are the same).
    pub fn copy_as_owner(
        &self,
        c: &SharedCopy,
        end: End,
        mut copy: impl FnMut(u64, u64),
        mut helper_alive: impl FnMut() -> bool,
    ) -> u64 {
        let n = c.chunks();
        let mut mine = 0u64;
        let mut w = self.w.load(CLAIM, Ordering::Acquire);
        // Only the owner changes the generation, so the word's is this copy's throughout.
        while let Some((i, next)) = take(w, n, end) {
            match self
                .w
                .compare_exchange_weak(CLAIM, w, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    let (at, len) = c.chunk_range(i);
                    copy(at, len);
                    mine |= 1 << i;
                    w = self.w.load(CLAIM, Ordering::Acquire);
                }
                Err(now) => w = now,
            }
        }
        let theirs = all_chunks(n) & !mine;
        let start = Instant::now();
        let mut since = start;
        loop {
            let done = self.w.load(DONE, Ordering::Acquire);
            if done & theirs == theirs {
                return theirs.count_ones() as u64;
            }
            self.w.spin(start.elapsed() >= YIELD_AFTER);
            if since.elapsed() >= ALIVE_CHECK {
                if !helper_alive() {
                    let left = theirs & !self.w.load(DONE, Ordering::Acquire);
                    for i in 0..n {
                        if left & (1 << i) != 0 {
                            let (at, len) = c.chunk_range(i);
                            copy(at, len);
                        }
                    }
                    return (theirs & !left).count_ones() as u64;
                }
                since = Instant::now();
            }
        }
    }

    /// The sender looks at the board of a port it has a large send to: when a copy is open with
    /// chunks left and `valid` accepts it (its token names one of the sender's sends, the source
    /// lies inside that send, the destination inside the owner's heap part), it claims chunks one
    /// by one from its `end` and copies each with `copy(copy, offset, len)`. Returns the chunks it
    /// copied (0 when there is nothing to take or the copy is refused). One load of the board's
    /// first line when there is nothing to do.
    pub fn help(
        &self,
        end: End,
        valid: impl FnOnce(&SharedCopy) -> bool,
        mut copy: impl FnMut(&SharedCopy, u64, u64),
    ) -> u64 {
        let mut w = self.w.load(CLAIM, Ordering::Acquire);
        let gen = (w >> 32) as u32;
        // The description is generation `gen`'s for as long as the claim word shows `gen` with
        // chunks left: the owner rewrites it only after every chunk was claimed, and a claim
        // below compares the whole word, so a description read across a change is never used.
        let c = SharedCopy {
            src: self.w.load(SRC, Ordering::Acquire),
            dst: self.w.load(DST, Ordering::Acquire),
            len: self.w.load(LEN, Ordering::Acquire),
            chunk: self.w.load(CHUNK, Ordering::Acquire),
            token: self.w.load(TOKEN, Ordering::Acquire),
        };
        let n = c.chunks();
        if n > MAX_CHUNKS || take(w, n, end).is_none() || !valid(&c) {
            return 0;
        }
        let mut helped = 0;
        loop {
            let Some((i, next)) = take(w, n, end) else {
                return helped;
            };
            if (w >> 32) as u32 != gen {
                return helped;
            }
            match self
                .w
                .compare_exchange_weak(CLAIM, w, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    let (at, len) = c.chunk_range(i);
                    copy(&c, at, len);
                    self.w.fetch_or(DONE, 1 << i, Ordering::Release);
                    helped += 1;
                    w = self.w.load(CLAIM, Ordering::Acquire);
                }
                Err(now) => w = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn board_words() -> Arc<[AtomicU64; BOARD_WORDS]> {
        Arc::new(std::array::from_fn(|_| AtomicU64::new(0)))
    }

    #[test]
    fn chunks_are_quarters_then_128_kib_at_most_64_and_cover_the_message() {
        let c = SharedCopy::new(0, 0, 1 << 20, 1);
        assert_eq!((c.chunk, c.chunks()), (128 << 10, 8));
        let c = SharedCopy::new(0, 0, 2 << 20, 1);
        assert_eq!((c.chunk, c.chunks()), (128 << 10, 16));
        let c = SharedCopy::new(0, 0, (64 << 20) + 1, 1);
        assert!(c.chunks() <= MAX_CHUNKS);
        let c = SharedCopy::new(0, 0, 64 << 10, 1);
        assert_eq!((c.chunk, c.chunks()), (16 << 10, 4));
        let c = SharedCopy::new(0, 0, 20 << 10, 1);
        assert_eq!((c.chunk, c.chunks()), (8 << 10, 3));
        let c = SharedCopy::new(0, 0, 300_000, 1);
        assert_eq!(c.chunks(), 4);
        let total: u64 = (0..c.chunks()).map(|i| c.chunk_range(i).1).sum();
        assert_eq!(total, 300_000);
        let (at, len) = c.chunk_range(c.chunks() - 1);
        assert_eq!(at + len, 300_000);
    }

    #[test]
    fn the_two_ranks_of_a_pair_take_opposite_ends_whichever_receives() {
        for (a, b) in [(0, 1), (3, 1), (7, 2)] {
            assert_ne!(End::of(a, b), End::of(b, a));
        }
        assert_eq!(End::of(0, 1), End::Front);
    }

    #[test]
    fn owner_and_helper_take_chunks_from_their_own_ends_until_they_meet() {
        let w = board_words();
        let b = Board::new(&*w);
        let c = SharedCopy::new(0, 1 << 30, 1 << 20, 5);
        b.open(&c);
        // While the helper copies its third chunk from the front, the owner takes the rest from
        // the back, then waits for that chunk.
        let owned = std::sync::Mutex::new(Vec::new());
        let mut helped = Vec::new();
        std::thread::scope(|s| {
            let mut owner = None;
            b.help(
                End::Front,
                |_| true,
                |_, at, _| {
                    helped.push(at >> 17);
                    if helped.len() == 3 {
                        let (owned, words) = (&owned, &*w);
                        owner = Some(s.spawn(move || {
                            Board::new(words).copy_as_owner(
                                &c,
                                End::Back,
                                |at, _| owned.lock().unwrap().push(at >> 17),
                                || true,
                            )
                        }));
                        while owned.lock().unwrap().len() < 5 {
                            std::thread::yield_now();
                        }
                    }
                },
            );
            assert_eq!(owner.unwrap().join().unwrap(), 3);
        });
        assert_eq!(helped, [0, 1, 2]);
        assert_eq!(*owned.lock().unwrap(), [7, 6, 5, 4, 3]);
    }

    #[test]
    fn a_claim_word_naming_chunks_past_the_copy_gets_nothing_taken() {
        let w = board_words();
        let b = Board::new(&*w);
        let c = SharedCopy::new(0, 1 << 30, 1 << 20, 5);
        let gen = b.open(&c) as u64;
        w[CLAIM].store(gen << 32 | 40, Ordering::Release); // 40 chunks of 8
        for end in [End::Front, End::Back] {
            assert_eq!(b.help(end, |_| true, |_, _, _| panic!()), 0);
        }
    }

    #[test]
    fn a_helper_that_comes_after_the_owner_finished_copies_nothing() {
        let w = board_words();
        let b = Board::new(&*w);
        let c = SharedCopy::new(0, 1 << 30, 2 << 20, 7);
        let gen = b.open(&c);
        let mut owner = 0;
        assert_eq!(
            b.copy_as_owner(&c, End::Back, |_, l| owner += l, || true),
            0
        );
        assert_eq!(owner, 2 << 20);
        assert_eq!(
            b.help(End::Front, |_| true, |_, _, _| panic!("late helper copied")),
            0
        );
        // The next copy has a new generation, and a helper finds it.
        let gen2 = b.open(&c);
        assert_ne!(gen, gen2);
        assert_eq!(b.help(End::Front, |_| true, |_, _, _| {}), 16);
    }

    #[test]
    fn a_refused_or_forged_copy_gets_no_chunk_taken_and_the_owner_copies_it_all() {
        let w = board_words();
        let b = Board::new(&*w);
        let c = SharedCopy::new(4096, 1 << 30, 2 << 20, 7);
        b.open(&c);
        assert_eq!(b.help(End::Front, |x| x.token == 8, |_, _, _| panic!()), 0);
        assert_eq!(b.help(End::Front, |_| false, |_, _, _| panic!()), 0);
        // A description forged to have too many chunks is refused before any claim, as is one
        // with no chunk size.
        for chunk in [1, 0] {
            w[CHUNK].store(chunk, Ordering::Relaxed);
            assert_eq!(b.help(End::Front, |_| true, |_, _, _| panic!()), 0);
        }
        w[CHUNK].store(c.chunk, Ordering::Relaxed);
        let mut owner = 0;
        assert_eq!(
            b.copy_as_owner(&c, End::Back, |_, l| owner += l, || true),
            0
        );
        assert_eq!(owner, 2 << 20);
    }

    #[test]
    fn a_helper_that_runs_first_copies_everything_and_the_owner_only_waits() {
        let w = board_words();
        let b = Board::new(&*w);
        let c = SharedCopy::new(0, 1 << 30, 2 << 20, 3);
        b.open(&c);
        let mut helped = Vec::new();
        assert_eq!(
            b.help(End::Front, |x| *x == c, |_, at, l| helped.push((at, l))),
            16
        );
        assert_eq!(helped.len(), 16);
        assert_eq!(helped[15], (15 << 17, 128 << 10));
        assert_eq!(
            b.copy_as_owner(&c, End::Back, |_, _| panic!("owner copied"), || true),
            16
        );
    }

    #[test]
    fn when_the_helper_died_with_a_claimed_chunk_the_owner_copies_it() {
        let w = board_words();
        let b = Board::new(&*w);
        let c = SharedCopy::new(0, 1 << 30, 2 << 20, 3);
        b.open(&c);
        // The "helper" claims chunk 0 and never finishes it.
        w[CLAIM].fetch_add(1 << FRONT_SHIFT, Ordering::AcqRel);
        let mut copied = Vec::new();
        let helped = b.copy_as_owner(&c, End::Back, |at, _| copied.push(at), || false);
        assert_eq!(helped, 0);
        copied.sort();
        assert_eq!(copied, (0..16).map(|i| i * (128 << 10)).collect::<Vec<_>>());
    }

    #[test]
    fn the_owner_waits_for_a_chunk_the_helper_claimed_until_it_is_done() {
        let w = board_words();
        let b = Board::new(&*w);
        let c = SharedCopy::new(0, 1 << 30, 2 << 20, 3);
        b.open(&c);
        w[CLAIM].fetch_add(1 << FRONT_SHIFT, Ordering::AcqRel); // the helper took chunk 0 ...
        let finished = Arc::new(AtomicBool::new(false));
        let helper = {
            let (w, finished) = (w.clone(), finished.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50)); // ... and copies it slowly
                finished.store(true, Ordering::Relaxed);
                w[DONE].fetch_or(1, Ordering::Release);
            })
        };
        let mut owner = 0;
        assert_eq!(
            b.copy_as_owner(&c, End::Back, |_, _| owner += 1, || true),
            1
        );
        assert!(
            finished.load(Ordering::Relaxed),
            "the owner returned before chunk 0 was done"
        );
        assert_eq!(owner, 15);
        helper.join().unwrap();
    }

    #[test]
    fn a_helper_whose_copy_closed_and_reopened_while_it_looked_takes_nothing_of_the_new_one() {
        let w = board_words();
        let b = Board::new(&*w);
        let old = SharedCopy::new(0, 1 << 30, 2 << 20, 3);
        let new = SharedCopy::new(0, 2 << 30, 2 << 20, 4);
        b.open(&old);
        let helped = b.help(
            End::Front,
            |_| {
                // Between the helper's look and its first claim the owner copies it all and
                // opens the next copy, to another destination.
                b.copy_as_owner(&old, End::Back, |_, _| {}, || true);
                b.open(&new);
                true
            },
            |c, at, _| panic!("copied {at} with a stale description {c:?}"),
        );
        assert_eq!(helped, 0);
        assert_eq!(b.copy_as_owner(&new, End::Back, |_, _| {}, || true), 0);
    }

    /// An owner and a helper thread share many copies of real words, as a receiver and a sender
    /// polling its board would. After each copy the owner checks the destination and scribbles
    /// over it (as an application reusing its buffer would), then writes the next source: a
    /// helper that wrote after the owner returned, or copied with a stale description, shows up as
    /// a wrong word in a later check or as a stale source word.
    fn threads_share_copies(owner_end: End, helper_end: End) {
        const LEN: usize = 256 << 10;
        const COPIES: u64 = 300;
        let w = board_words();
        let src: Arc<Vec<AtomicU64>> = Arc::new((0..LEN / 8).map(|_| AtomicU64::new(0)).collect());
        let dst: Arc<Vec<AtomicU64>> = Arc::new((0..LEN / 8).map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let stale = Arc::new(AtomicU64::new(0));
        let helper = {
            let (w, src, dst, stop, stale) = (
                w.clone(),
                src.clone(),
                dst.clone(),
                stop.clone(),
                stale.clone(),
            );
            std::thread::spawn(move || {
                let b = Board::new(&*w);
                let mut helped = 0;
                while !stop.load(Ordering::Relaxed) {
                    helped += b.help(
                        helper_end,
                        |_| true,
                        |c, at, l| {
                            for k in (at / 8)..((at + l) / 8) {
                                let v = src[k as usize].load(Ordering::Relaxed);
                                // Source words name their copy's token.
                                if v >> 32 != c.token {
                                    stale.fetch_add(1, Ordering::Relaxed);
                                }
                                dst[k as usize].store(v, Ordering::Relaxed);
                            }
                        },
                    );
                    std::hint::spin_loop();
                }
                helped
            })
        };
        let b = Board::new(&*w);
        let mut owner_chunks = 0u64;
        for t in 1..=COPIES {
            for (k, s) in src.iter().enumerate() {
                s.store((t << 32) | k as u64, Ordering::Relaxed);
            }
            let mut c = SharedCopy::new(0, 0, LEN as u64, t);
            c.chunk = 16 << 10; // 16 chunks of this small message
            b.open(&c);
            b.copy_as_owner(
                &c,
                owner_end,
                |at, l| {
                    owner_chunks += 1;
                    for k in (at / 8)..((at + l) / 8) {
                        let v = src[k as usize].load(Ordering::Relaxed);
                        dst[k as usize].store(v, Ordering::Relaxed);
                    }
                },
                || true,
            );
            for (k, d) in dst.iter().enumerate() {
                assert_eq!(
                    d.load(Ordering::Relaxed),
                    (t << 32) | k as u64,
                    "copy {t} word {k}"
                );
                d.store(u64::MAX, Ordering::Relaxed);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::Relaxed);
        let helped = helper.join().unwrap();
        assert_eq!(
            stale.load(Ordering::Relaxed),
            0,
            "the helper read a stale source"
        );
        // Nothing written after the last check.
        assert!(dst.iter().all(|d| d.load(Ordering::Relaxed) == u64::MAX));
        assert_eq!(owner_chunks + helped, COPIES * 16);
        eprintln!("helper copied {helped} of {} chunks", COPIES * 16);
    }

    #[test]
    fn owner_and_helper_threads_copy_every_word_once_and_never_after_the_owner_returns() {
        threads_share_copies(End::Back, End::Front);
    }

    #[test]
    fn the_same_with_the_owner_at_the_front_and_the_helper_at_the_back() {
        threads_share_copies(End::Front, End::Back);
    }
}
