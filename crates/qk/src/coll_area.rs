//! The collective area of a job region: per-communicator, per-local-rank cache lines and small
//! data slots that libraries use for intra-node collectives without going through the queues.
//!
//! ```text
//! coll_off   CONTEXTS contexts; context c holds, for each local port p, a block of
//!            BLOCK bytes: line 0 = arrival word (u64), line 1 = release word (u64), then
//!            SLOTS data slots of SLOT bytes each (operation s uses slot s mod SLOTS, so a writer may run up to
//!            SLOTS - 1 operations ahead of its slowest reader), then SMALLS small slots of
//!            SMALL bytes each (an operation s with a payload that fits one may use small slot
//!            s mod SMALLS instead, so a writer of small payloads may run SMALLS - 1 ahead)
//! stage_off  (page aligned, after the contexts) one staging buffer of STAGE bytes per local port,
//!            for large intra-node collectives (one communicator at a time uses a port's stage;
//!            it is written only by its port and read by the others)
//! ```
//!
//! The QK gives the memory and its addresses; the protocol on top (who writes which word when)
//! belongs to the library. Every access is bounds-checked by [`Mapping`]; words are 8-aligned.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::region::Region;
use crate::sys::Mapping;

/// Contexts (communicators that can use the area at the same time).
pub const CONTEXTS: u32 = 8;
/// Bytes of one data slot.
pub const SLOT: usize = 2048;
/// Data slots per port and context. 32 rather than 8: with more ranks than cores a broadcast
/// root that can run 31 small operations ahead of a reader that is not scheduled took 5 µs per
/// 8-byte broadcast at 8 ranks on 2 cores instead of 12-18 µs (puma-coll-bench). 64 rather than
/// 32 halves the hand-offs (context switches) per small broadcast once more: 8-byte broadcast
/// 0.29 → 0.20 µs at 4 ranks, 0.63–0.85 → 0.39 at 8 (same session). Costs 1 MiB of the region
/// per local rank (8 contexts of 64 slots).
pub const SLOTS: u32 = 64;
const HEAD: usize = 128;
/// Bytes of one small slot: two cache lines (the operation's word, the length and up to 112
/// bytes), aligned to 128 bytes so a core that fetches a line's pair fetches its own slot.
pub const SMALL: usize = 128;
/// Small slots per port and context, a ring for payloads of up to 112 bytes: a broadcast root
/// with more ranks than cores runs up to `SMALLS - 1` such broadcasts ahead of a descheduled
/// reader instead of `SLOTS - 1`, so its readers copy 16 times longer batches per turn on a core
/// and the ranks sharing a core take turns 16 times less often per broadcast. 8 ranks on 2 cores,
/// 8-64 B broadcasts (puma-coll-bench loops, 22 cycles): 0.70 µs per call with the slots, 0.35
/// with 512 small slots, 0.30 with 1024. Costs 128 KiB of the region per local rank and context.
pub const SMALLS: u32 = 1024;
/// Bytes one port owns in one context: two control lines, the slots and the small slots.
pub const BLOCK: usize = HEAD + SLOTS as usize * SLOT + SMALLS as usize * SMALL;

/// Bytes of one port's staging buffer (large collectives go through it in pieces).
pub const STAGE: usize = 256 * 1024;

/// Bytes of the per-context blocks for `local` ports, rounded up to a page (the stages follow).
fn blocks_bytes(local: u32) -> usize {
    (CONTEXTS as usize * local as usize * BLOCK).div_ceil(4096) * 4096
}

/// Bytes of the collective area for `local` ranks.
pub fn bytes(local: u32) -> u64 {
    (blocks_bytes(local) + local as usize * STAGE) as u64
}

/// Byte offset of port `port`'s block in context `ctx`, for an area at `coll_off` with
/// `local` ports.
pub(crate) fn block_offset(coll_off: usize, local: u32, ctx: u32, port: u32) -> usize {
    coll_off + (ctx as usize * local as usize + port as usize) * BLOCK
}

/// Byte offset of port `port`'s staging buffer, for an area at `coll_off` with `local` ports.
pub(crate) fn stage_offset(coll_off: usize, local: u32, port: u32) -> usize {
    coll_off + blocks_bytes(local) + port as usize * STAGE
}

/// A view of a region's collective area. Cheap to clone.
#[derive(Clone, Debug)]
pub struct CollArea {
    map: Arc<Mapping>,
    off: usize,
    local: u32,
}

impl CollArea {
    /// The collective area of `region`.
    pub fn of(region: &Region) -> CollArea {
        CollArea {
            map: region.map_arc(),
            off: region.layout.coll_off as usize,
            local: region.layout.local,
        }
    }

    /// Local ranks (ports) the area has blocks for.
    pub fn local(&self) -> u32 {
        self.local
    }

    fn block(&self, ctx: u32, port: u32) -> usize {
        assert!(
            ctx < CONTEXTS && port < self.local,
            "collective area: context {ctx} / port {port} out of range"
        );
        block_offset(self.off, self.local, ctx, port)
    }

    /// Port `port`'s arrival word in context `ctx` (written only by that port).
    pub fn arrival(&self, ctx: u32, port: u32) -> &AtomicU64 {
        self.map.atomic_u64(self.block(ctx, port))
    }

    /// Port `port`'s release word in context `ctx` (written only by that port).
    pub fn release(&self, ctx: u32, port: u32) -> &AtomicU64 {
        self.map.atomic_u64(self.block(ctx, port) + 64)
    }

    fn slot(&self, ctx: u32, port: u32, which: u32, off: usize, len: usize) -> usize {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= SLOT),
            "collective slot access {off}+{len} beyond {SLOT} bytes"
        );
        self.block(ctx, port) + HEAD + (which % SLOTS) as usize * SLOT + off
    }

    /// The first 8 bytes of slot `which` of `port` in `ctx` as a word (its writer may store there
    /// with release what the rest of the slot holds).
    pub fn slot_word(&self, ctx: u32, port: u32, which: u32) -> &AtomicU64 {
        self.map.atomic_u64(self.slot(ctx, port, which, 0, 8))
    }

    /// The 8 bytes at `off` (8-aligned) of slot `which` of `port` in `ctx` as a word, for
    /// members to update together once its writer has published the slot (claims, counters).
    pub fn slot_atomic(&self, ctx: u32, port: u32, which: u32, off: usize) -> &AtomicU64 {
        self.map.atomic_u64(self.slot(ctx, port, which, off, 8))
    }

    /// Copies `src` into slot `which` (taken mod [`SLOTS`]) of `port` in `ctx`, at `off`. Publish it with a
    /// release store to a word afterwards.
    pub fn write(&self, ctx: u32, port: u32, which: u32, off: usize, src: &[u8]) {
        let at = self.slot(ctx, port, which, off, src.len());
        self.map.write(at, src);
    }

    /// Copies from slot `which` of `port` in `ctx` at `off` into `dst` (after an acquire load
    /// of the word that published it).
    pub fn read(&self, ctx: u32, port: u32, which: u32, off: usize, dst: &mut [u8]) {
        let at = self.slot(ctx, port, which, off, dst.len());
        self.map.read(at, dst);
    }

    fn small(&self, ctx: u32, port: u32, which: u32, off: usize, len: usize) -> usize {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= SMALL),
            "collective small slot access {off}+{len} beyond {SMALL} bytes"
        );
        self.block(ctx, port)
            + HEAD
            + SLOTS as usize * SLOT
            + (which % SMALLS) as usize * SMALL
            + off
    }

    /// The first 8 bytes of small slot `which` (taken mod [`SMALLS`]) of `port` in `ctx` as a word
    /// (its writer stores there with release, after the rest of the line).
    pub fn small_word(&self, ctx: u32, port: u32, which: u32) -> &AtomicU64 {
        self.map.atomic_u64(self.small(ctx, port, which, 0, 8))
    }

    /// Copies `src` into small slot `which` (taken mod [`SMALLS`]) of `port` in `ctx`, at `off`.
    /// Publish it with a release store to its word afterwards.
    pub fn write_small(&self, ctx: u32, port: u32, which: u32, off: usize, src: &[u8]) {
        let at = self.small(ctx, port, which, off, src.len());
        self.map.write(at, src);
    }

    /// Copies from small slot `which` of `port` in `ctx` at `off` into `dst` (after an acquire
    /// load of its word).
    pub fn read_small(&self, ctx: u32, port: u32, which: u32, off: usize, dst: &mut [u8]) {
        let at = self.small(ctx, port, which, off, dst.len());
        self.map.read(at, dst);
    }

    /// Hints the CPU to take the cache lines of the first `len` bytes of small slot `which` of
    /// `port` in `ctx` owned for writing (see [`CollArea::prefetch`]). No effect on the contents.
    pub fn prefetch_small_write(&self, ctx: u32, port: u32, which: u32, len: usize) {
        let at = self.small(ctx, port, which, 0, len);
        let mut line = at;
        while line < at + len {
            self.map.prefetch_write(line);
            line += 64;
        }
    }

    /// Hints the CPU to start fetching the cache lines of bytes `off..off + len` of slot `which`
    /// of `port` in `ctx`: for reading, or owned for writing when `write` (so the stores that
    /// follow do not wait for another core to give the lines up). No effect on the contents; a
    /// reader may ask for lines whose writer has not published them yet.
    pub fn prefetch(&self, ctx: u32, port: u32, which: u32, off: usize, len: usize, write: bool) {
        if len == 0 {
            return;
        }
        let at = self.slot(ctx, port, which, off, len);
        let mut line = at & !63;
        while line < at + len {
            if write {
                self.map.prefetch_write(line);
            } else {
                self.map.prefetch(line);
            }
            line += 64;
        }
    }

    fn stage_at(&self, port: u32, off: usize, len: usize) -> usize {
        assert!(
            port < self.local && off.checked_add(len).is_some_and(|e| e <= STAGE),
            "stage access {off}+{len} of port {port} beyond {STAGE} bytes or {} ports",
            self.local
        );
        stage_offset(self.off, self.local, port) + off
    }

    /// `len` bytes at `off` of port `port`'s stage, to read after an acquire load of the word
    /// that published them. The protocol must guarantee that no one writes them meanwhile.
    pub fn stage(&self, port: u32, off: usize, len: usize) -> &[u8] {
        self.map.slice(self.stage_at(port, off, len), len)
    }

    /// `len` bytes at `off` of port `port`'s stage to write (only port `port` writes its stage,
    /// and only while no reader looks at those bytes; publish them with a release store
    /// afterwards). Two views must not overlap.
    #[allow(clippy::mut_from_ref)]
    pub fn stage_mut(&self, port: u32, off: usize, len: usize) -> &mut [u8] {
        self.map.slice_mut(self.stage_at(port, off, len), len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::RegionParams;
    use std::sync::atomic::Ordering;

    #[test]
    fn area_follows_the_heap_and_blocks_do_not_overlap() {
        let p = RegionParams {
            job: 7,
            world: 3,
            node: 0,
            ranks: vec![0, 1, 2],
            ring_cap: 4096,
            heap_per_rank: 8192,
            eager_max: 1024,
            mode: 0,
            max_message: 1 << 20,
        };
        let (_fd, r) = Region::create(&p, false).unwrap();
        let l = r.layout;
        assert_eq!(l.coll_off, l.heap_off + 4 * l.heap_per_rank);
        assert_eq!(l.total, l.coll_off + bytes(3));
        let a = CollArea::of(&r);
        // Stages are page aligned, follow the blocks and end with the region.
        let first = stage_offset(l.coll_off as usize, 3, 0);
        assert_eq!(first % 4096, 0);
        assert!(first >= block_offset(l.coll_off as usize, 3, CONTEXTS - 1, 2) + BLOCK);
        assert_eq!(
            stage_offset(l.coll_off as usize, 3, 2) + STAGE,
            l.total as usize
        );
        for p in 0..3 {
            a.stage_mut(p, 0, STAGE).fill(0x40 + p as u8);
        }
        // Every word and slot of every (context, port) is its own memory.
        for c in 0..CONTEXTS {
            for p in 0..3 {
                let v = (c as u64) << 8 | p as u64;
                a.arrival(c, p).store(v + 1, Ordering::Relaxed);
                a.release(c, p).store(v + 2, Ordering::Relaxed);
                for k in 0..SLOTS {
                    a.write(c, p, k, 0, &[(v as u8) ^ k as u8; SLOT]);
                }
                for k in 0..SMALLS {
                    a.write_small(c, p, k, 0, &small_fill(v, k));
                }
            }
        }
        for c in 0..CONTEXTS {
            for p in 0..3 {
                let v = (c as u64) << 8 | p as u64;
                assert_eq!(a.arrival(c, p).load(Ordering::Relaxed), v + 1);
                assert_eq!(a.release(c, p).load(Ordering::Relaxed), v + 2);
                for k in 0..SLOTS {
                    let mut s = vec![0u8; SLOT];
                    // `which` wraps: slot k + SLOTS is slot k.
                    a.read(c, p, k + SLOTS, 0, &mut s);
                    assert!(s.iter().all(|&b| b == (v as u8) ^ k as u8));
                }
                for k in 0..SMALLS {
                    let mut l = [0u8; SMALL];
                    // Small slots wrap too: k + SMALLS is k.
                    a.read_small(c, p, k + SMALLS, 0, &mut l);
                    assert_eq!(l, small_fill(v, k), "context {c} port {p} line {k}");
                    let w = a.small_word(c, p, k).load(Ordering::Relaxed);
                    assert_eq!(w.to_le_bytes()[..], small_fill(v, k)[..8]);
                }
            }
        }
        for p in 0..3 {
            assert!(a.stage(p, 0, STAGE).iter().all(|&b| b == 0x40 + p as u8));
        }
    }

    /// What the layout test writes into small slot `k` of the block numbered `v`: different for
    /// every block and line, and byte by byte within the line.
    fn small_fill(v: u64, k: u32) -> [u8; SMALL] {
        std::array::from_fn(|i| {
            (v as u8).wrapping_mul(31) ^ (k as u8) ^ ((k >> 8) as u8) << 5 ^ (i as u8) << 2
        })
    }

    #[test]
    fn small_slots_are_aligned_and_take_the_block_end() {
        let (_fd, r) = small_region(2);
        let a = CollArea::of(&r);
        let last = block_offset(r.layout.coll_off as usize, 2, 0, 1) + BLOCK;
        let first_line = a.small(0, 1, 0, 0, SMALL);
        assert_eq!(first_line % SMALL, 0);
        assert_eq!(a.small(0, 1, SMALLS - 1, 0, SMALL) + SMALL, last);
        // The small slots start where the slots end.
        assert_eq!(a.slot(0, 1, SLOTS - 1, 0, SLOT) + SLOT, first_line);
        // A write prefetch changes nothing.
        a.write_small(0, 1, 5, 0, &[0x33; SMALL]);
        for len in [0, 1, 64, 65, SMALL] {
            a.prefetch_small_write(0, 1, 5, len);
        }
        let mut l = [0u8; SMALL];
        a.read_small(0, 1, 5, 0, &mut l);
        assert_eq!(l, [0x33; SMALL]);
    }

    #[test]
    #[should_panic(expected = "beyond")]
    fn small_slot_access_past_its_end_is_refused() {
        let (_fd, r) = small_region(1);
        CollArea::of(&r).write_small(0, 0, 0, SMALL - 8, &[0; 9]);
    }

    /// A minimal region of `ranks` local ranks (job 1).
    fn small_region(ranks: u32) -> (crate::sys::Memfd, Region) {
        let p = RegionParams {
            job: 1,
            world: ranks,
            node: 0,
            ranks: (0..ranks).collect(),
            ring_cap: 4096,
            heap_per_rank: 4096,
            eager_max: 1024,
            mode: 0,
            max_message: 1 << 20,
        };
        Region::create(&p, false).unwrap()
    }

    #[test]
    #[should_panic(expected = "beyond")]
    fn stage_access_past_the_end_is_refused() {
        let (_fd, r) = small_region(2);
        CollArea::of(&r).stage(1, STAGE - 4, 8);
    }

    #[test]
    #[should_panic(expected = "beyond")]
    fn slot_access_past_the_end_is_refused() {
        let (_fd, r) = small_region(1);
        CollArea::of(&r).write(0, 0, 0, SLOT - 1, &[1, 2]);
    }

    #[test]
    fn prefetching_slot_lines_changes_nothing() {
        let (_fd, r) = small_region(2);
        let a = CollArea::of(&r);
        a.write(1, 1, 3, 0, &[0x5a; SLOT]);
        for (off, len) in [(0, SLOT), (1, 63), (64, 65), (SLOT - 1, 1), (0, 0)] {
            a.prefetch(1, 1, 3, off, len, false);
            a.prefetch(1, 1, 3, off, len, true);
        }
        let mut s = vec![0u8; SLOT];
        a.read(1, 1, 3, 0, &mut s);
        assert!(s.iter().all(|&b| b == 0x5a));
    }

    #[test]
    #[should_panic(expected = "beyond")]
    fn prefetch_past_the_slot_is_refused() {
        let (_fd, r) = small_region(1);
        CollArea::of(&r).prefetch(0, 0, 0, SLOT - 64, 65, true);
    }
}
