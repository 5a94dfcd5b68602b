//! The job's shared-memory region on one node: layout, creation and attachment.
//!
//! ```text
//! 0            header page: magic, version, job, sizes, offsets, world rank and pid of each local rank
//! port_off     one 1 KiB control block per port (local ranks 0..L, then the node engine = port L):
//!              doorbell futex word, sleeping flag, counters, copy board (`copy_share`)
//! ring_off     P*P rings (P = L+1), ring (src, dst) at index src*P+dst: a 64-byte line holding the
//!              consumer's head, then `ring_cap` bytes of records
//! heap_off     the job-shared heap: `heap_per_rank` bytes per port (local ranks, then the node
//!              engine's staging part); each allocates only from its own part; every rank maps all
//!              of it, so a receiver copies a large message straight from the sender's buffer with
//!              one memcpy
//! coll_off     the collective area (see `coll_area`): per-context, per-local-rank flag lines and
//!              small data slots for intra-node collectives
//! ```

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::counters::{slot, DropReason, PortStats};
use crate::ring::RingMem;
use crate::sys::{Mapping, Memfd};
use crate::QkError;

/// Magic number at offset 0 ("PUMAQK01").
pub const MAGIC: u64 = u64::from_le_bytes(*b"PUMAQK01");
/// Layout version. 2: ring records are made of 32-byte slots (compact puts, `ring::SLOT`); a
/// rank built for version 1 would misread them, so it cannot attach. 3: each port block holds a
/// copy board ([`crate::copy_share`]) and one more counter. 4: one more drop reason
/// (`no_heap_room`), so every portals reason's counter moved by one slot.
pub const VERSION: u32 = 4;
/// Most local ports (ranks on one node) a region supports.
pub const MAX_LOCAL: usize = 256;
const PORT_BLOCK: usize = 1024;
const PAGE: u64 = 4096;

// Header field offsets.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_LOCAL: usize = 12;
const H_JOB: usize = 16;
const H_WORLD: usize = 24;
const H_NODE: usize = 28;
const H_RING_CAP: usize = 32;
const H_HEAP_PER_RANK: usize = 40;
const H_EAGER: usize = 48;
const H_MODE: usize = 52;
const H_TOTAL: usize = 56;
const H_MAX_MSG: usize = 64;
/// Non-zero when some process of the job could not register for membarrier(2): idle waiters
/// then keep to bounded short sleeps (see [`Region::fence_before_sleep`]).
const H_NO_FENCE: usize = 72;
const H_RANKS: usize = 1024; // [u32; MAX_LOCAL]
const H_PIDS: usize = 2048; // [u32; MAX_LOCAL]
const HEADER_BYTES: u64 = 4096;
// Port block offsets.
const P_DOORBELL: usize = 0;
const P_SLEEPING: usize = 4;
const P_CPU: usize = 8;
const P_COUNTERS: usize = 64;
/// The port's copy board ([`crate::copy_share::Board`]): two lines of its own.
const P_BOARD: usize = 768;

/// Computed offsets of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Local ranks.
    pub local: u32,
    /// Ports = local ranks + the node engine.
    pub ports: u32,
    /// Bytes per ring.
    pub ring_cap: u64,
    /// Heap bytes per local rank.
    pub heap_per_rank: u64,
    /// Port control blocks.
    pub port_off: u64,
    /// First ring.
    pub ring_off: u64,
    /// Bytes per ring including its control line.
    pub ring_stride: u64,
    /// Heap start.
    pub heap_off: u64,
    /// Collective area start (after the heap).
    pub coll_off: u64,
    /// Total size.
    pub total: u64,
}

fn round_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Layout {
    /// Lays out a region for `local` ranks.
    pub fn new(local: u32, ring_cap: u64, heap_per_rank: u64) -> Result<Layout, QkError> {
        if local == 0 || local as usize > MAX_LOCAL - 1 {
            return Err(QkError::BadSpec(format!(
                "local rank count {local} must be 1..{}",
                MAX_LOCAL - 1
            )));
        }
        if !ring_cap.is_power_of_two() || !(4096..=(1 << 30)).contains(&ring_cap) {
            return Err(QkError::BadSpec(format!(
                "queue size {ring_cap} must be a power of two between 4 KiB and 1 GiB"
            )));
        }
        let ports = local + 1;
        let port_off = HEADER_BYTES;
        let ring_off = round_up(port_off + ports as u64 * PORT_BLOCK as u64, PAGE);
        let ring_stride = 64 + ring_cap;
        let heap_off = round_up(ring_off + (ports as u64 * ports as u64) * ring_stride, PAGE);
        let heap_per_rank = round_up(heap_per_rank, PAGE);
        let coll_off = heap_off
            .checked_add(
                heap_per_rank
                    .checked_mul(ports as u64)
                    .ok_or_else(|| QkError::BadSpec("heap too large".into()))?,
            )
            .ok_or_else(|| QkError::BadSpec("heap too large".into()))?;
        let total = coll_off
            .checked_add(crate::coll_area::bytes(local))
            .ok_or_else(|| QkError::BadSpec("heap too large".into()))?;
        Ok(Layout {
            local,
            ports,
            ring_cap,
            heap_per_rank,
            port_off,
            ring_off,
            ring_stride,
            heap_off,
            coll_off,
            total,
        })
    }

    /// Offset of ring (src, dst)'s control line.
    pub fn ring(&self, src: u32, dst: u32) -> u64 {
        self.ring_off + (src as u64 * self.ports as u64 + dst as u64) * self.ring_stride
    }

    /// Offset of local rank `r`'s heap part.
    pub fn heap(&self, r: u32) -> u64 {
        self.heap_off + r as u64 * self.heap_per_rank
    }

    /// Offset of port `p`'s control block.
    #[inline]
    pub fn port(&self, p: u32) -> u64 {
        self.port_off + p as u64 * PORT_BLOCK as u64
    }
}

/// Parameters written into a region's header at creation.
#[derive(Clone, Debug)]
pub struct RegionParams {
    /// Job id.
    pub job: u32,
    /// Ranks in the whole job.
    pub world: u32,
    /// Node id.
    pub node: u32,
    /// World rank of each local rank.
    pub ranks: Vec<u32>,
    /// Bytes per queue.
    pub ring_cap: u64,
    /// Heap bytes per local rank.
    pub heap_per_rank: u64,
    /// Largest message carried eagerly (inside the queue).
    pub eager_max: u32,
    /// CPU mode code.
    pub mode: u32,
    /// Largest message the job may send.
    pub max_message: u64,
}

/// An attached region: the mapping plus its decoded layout. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Region {
    map: Arc<Mapping>,
    /// Layout.
    pub layout: Layout,
    /// Job id.
    pub job: u32,
    /// World size.
    pub world: u32,
    /// Node id.
    pub node: u32,
    /// Eager limit.
    pub eager_max: u32,
    /// CPU mode code.
    pub mode: u32,
    /// Largest message.
    pub max_message: u64,
    /// World rank of each local port (the node engine is not listed).
    pub ranks: Vec<u32>,
}

impl Region {
    /// Creates, maps, locks and initialises a region. Returns the memfd and the region.
    pub fn create(p: &RegionParams, lock: bool) -> Result<(Memfd, Region), QkError> {
        let layout = Layout::new(p.ranks.len() as u32, p.ring_cap, p.heap_per_rank)?;
        if p.eager_max as u64 + 64 > ring_cap_limit(p.ring_cap) {
            return Err(QkError::BadSpec(format!(
                "eager limit {} does not fit a queue of {} bytes (at most half the queue minus one line)",
                p.eager_max, p.ring_cap
            )));
        }
        let fd = Memfd::create(&format!("puma-qk-job{}", p.job), layout.total).map_err(|e| {
            QkError::os(
                format!("creating a {}-byte memfd for job {}", layout.total, p.job),
                e,
            )
        })?;
        let map = Mapping::map(&fd, layout.total as usize, true)
            .map_err(|e| QkError::os("mapping the job's shared memory", e))?;
        if lock {
            lock_map(&map, layout.total)?;
        }
        map.atomic_u32(H_VERSION).store(VERSION, Ordering::Relaxed);
        map.atomic_u32(H_LOCAL)
            .store(layout.local, Ordering::Relaxed);
        map.atomic_u64(H_JOB).store(p.job as u64, Ordering::Relaxed);
        map.atomic_u32(H_WORLD).store(p.world, Ordering::Relaxed);
        map.atomic_u32(H_NODE).store(p.node, Ordering::Relaxed);
        map.atomic_u64(H_RING_CAP)
            .store(p.ring_cap, Ordering::Relaxed);
        map.atomic_u64(H_HEAP_PER_RANK)
            .store(layout.heap_per_rank, Ordering::Relaxed);
        map.atomic_u32(H_EAGER)
            .store(p.eager_max, Ordering::Relaxed);
        map.atomic_u32(H_MODE).store(p.mode, Ordering::Relaxed);
        map.atomic_u64(H_TOTAL)
            .store(layout.total, Ordering::Relaxed);
        map.atomic_u64(H_MAX_MSG)
            .store(p.max_message, Ordering::Relaxed);
        for (i, r) in p.ranks.iter().enumerate() {
            map.atomic_u32(H_RANKS + 4 * i).store(*r, Ordering::Relaxed);
        }
        map.atomic_u64(H_MAGIC).store(MAGIC, Ordering::Release);
        let region = Region {
            map: Arc::new(map),
            layout,
            job: p.job,
            world: p.world,
            node: p.node,
            eager_max: p.eager_max,
            mode: p.mode,
            max_message: p.max_message,
            ranks: p.ranks.clone(),
        };
        region.register_fence();
        Ok((fd, region))
    }

    /// Maps an existing region (from an inherited fd) and checks its header. `lock` locks and
    /// prefaults it in this process too.
    pub fn attach(fd: &Memfd, write: bool, lock: bool) -> Result<Region, QkError> {
        let len = fd
            .size()
            .map_err(|e| QkError::os("reading the size of the QK region fd", e))?;
        if len < HEADER_BYTES {
            return Err(QkError::BadRegion(format!(
                "fd {} is {len} bytes, smaller than a QK region header",
                fd.raw()
            )));
        }
        let map = Mapping::map(fd, len as usize, write)
            .map_err(|e| QkError::os("mapping the QK region", e))?;
        if map.atomic_u64(H_MAGIC).load(Ordering::Acquire) != MAGIC {
            return Err(QkError::BadRegion(format!(
                "fd {} is not a QK job region (bad magic)",
                fd.raw()
            )));
        }
        let version = map.atomic_u32(H_VERSION).load(Ordering::Relaxed);
        if version != VERSION {
            return Err(QkError::BadRegion(format!(
                "region layout version {version}, this QK speaks {VERSION}"
            )));
        }
        let local = map.atomic_u32(H_LOCAL).load(Ordering::Relaxed);
        let ring_cap = map.atomic_u64(H_RING_CAP).load(Ordering::Relaxed);
        let heap = map.atomic_u64(H_HEAP_PER_RANK).load(Ordering::Relaxed);
        let layout = Layout::new(local, ring_cap, heap)?;
        if layout.total != len || map.atomic_u64(H_TOTAL).load(Ordering::Relaxed) != len {
            return Err(QkError::BadRegion(format!(
                "region is {len} bytes but its header describes {}",
                layout.total
            )));
        }
        if lock {
            lock_map(&map, len)?;
        }
        let ranks = (0..local as usize)
            .map(|i| map.atomic_u32(H_RANKS + 4 * i).load(Ordering::Relaxed))
            .collect();
        let region = Region {
            layout,
            job: map.atomic_u64(H_JOB).load(Ordering::Relaxed) as u32,
            world: map.atomic_u32(H_WORLD).load(Ordering::Relaxed),
            node: map.atomic_u32(H_NODE).load(Ordering::Relaxed),
            eager_max: map.atomic_u32(H_EAGER).load(Ordering::Relaxed),
            mode: map.atomic_u32(H_MODE).load(Ordering::Relaxed),
            max_message: map.atomic_u64(H_MAX_MSG).load(Ordering::Relaxed),
            ranks,
            map: Arc::new(map),
        };
        if write {
            // A process that can write can send, so it must take part in the sleep fence.
            region.register_fence();
        }
        Ok(region)
    }

    /// Locks and prefaults, in this process, the part of the region port `port` receives into
    /// or writes most: the header and port blocks, every queue into the port, every queue out of
    /// it, its heap part and its blocks and stage of the collective area. Each attached rank locks its own part, so every page of the region
    /// is locked by the rank it belongs to while the work per rank stays proportional to the
    /// node's rank count (locking the whole region in every rank made attaching quadratic:
    /// seconds at 64 ranks per node). Pages of other ranks are resident (the PCT allocated them
    /// all and their owners lock them); the first touch of one costs a minor fault, never I/O.
    pub fn lock_for_port(&self, port: u32) -> Result<(), QkError> {
        let l = &self.layout;
        if port >= l.ports {
            return Err(QkError::BadRegion(format!(
                "port {port} out of range (region has {} ports)",
                l.ports
            )));
        }
        let stride = l.ring_stride as usize;
        let mut ranges: Vec<(usize, usize)> = vec![
            (0, l.ring_off as usize),
            (l.ring(port, 0) as usize, stride * l.ports as usize),
            (l.heap(port) as usize, l.heap_per_rank as usize),
        ];
        ranges.extend((0..l.ports).map(|src| (l.ring(src, port) as usize, stride)));
        if port < l.local {
            ranges.extend((0..crate::coll_area::CONTEXTS).map(|ctx| {
                let off = crate::coll_area::block_offset(l.coll_off as usize, l.local, ctx, port);
                (off, crate::coll_area::BLOCK)
            }));
            let stage = crate::coll_area::stage_offset(l.coll_off as usize, l.local, port);
            ranges.push((stage, crate::coll_area::STAGE));
        }
        for (off, len) in ranges {
            self.map
                .lock_and_prefault_range(off, len)
                .map_err(|e| memlock_error(e, len as u64))?;
        }
        Ok(())
    }

    /// The mapping.
    pub fn map(&self) -> &Mapping {
        &self.map
    }

    /// The mapping, shared.
    pub fn map_arc(&self) -> Arc<Mapping> {
        self.map.clone()
    }

    /// The node-engine port number.
    pub fn engine_port(&self) -> u32 {
        self.layout.local
    }

    /// The port a record for world rank `rank` goes to: the rank's own port on this node, or the
    /// node engine's port for a rank elsewhere (None = not in the job).
    pub fn route(&self, rank: u32) -> Option<u32> {
        match self.port_of_rank(rank) {
            Some(p) => Some(p),
            None if rank < self.world => Some(self.engine_port()),
            None => None,
        }
    }

    /// Local port of a world rank, if it lives on this node.
    pub fn port_of_rank(&self, rank: u32) -> Option<u32> {
        self.ranks.iter().position(|&r| r == rank).map(|p| p as u32)
    }

    /// The ring carrying records from port `src` to port `dst`.
    pub fn ring(&self, src: u32, dst: u32) -> ShmRing {
        let off = self.layout.ring(src, dst) as usize;
        let cap = self.layout.ring_cap;
        let data = off + 64;
        // What `ShmRing::word` relies on: the head word and the whole data area inside the
        // mapping, the data area 8-aligned, its size a power of two (the layout guarantees all of
        // it; checked once here rather than at every access).
        assert!(
            cap.is_power_of_two()
                && cap >= 64
                && off % 8 == 0
                && (data as u64)
                    .checked_add(cap)
                    .is_some_and(|e| e <= self.map.len() as u64),
            "ring {src}->{dst} outside the region"
        );
        ShmRing {
            // SAFETY: `data` is inside the mapping (checked above).
            base: unsafe { self.map.ptr().add(data) },
            map: self.map.clone(),
            head: off,
            data,
            cap,
            prefetchw: crate::sys::has_prefetchw(),
        }
    }

    /// Records a process id for a port (rank attach), used for cross-memory attach and `qk-stat`.
    pub fn set_pid(&self, port: u32, pid: u32) {
        self.map
            .atomic_u32(H_PIDS + 4 * port as usize)
            .store(pid, Ordering::Release);
    }

    /// Process id recorded for a port (0 = not attached).
    pub fn pid(&self, port: u32) -> u32 {
        self.map
            .atomic_u32(H_PIDS + 4 * port as usize)
            .load(Ordering::Acquire)
    }

    /// Port `p`'s doorbell futex word.
    pub fn doorbell(&self, p: u32) -> &AtomicU32 {
        self.map
            .atomic_u32(self.layout.port(p) as usize + P_DOORBELL)
    }

    /// Which of port `p`'s threads sleep on its doorbell: [`SLEEPER_APP`] (the application
    /// waiting; the node engine's own port uses it for itself) and [`SLEEPER_ENGINE_THREAD`] (the
    /// co-processor thread). Senders ring the doorbell while it is not 0; the node engine takes a
    /// rank whose application bit is clear for one that is running.
    pub fn sleeping(&self, p: u32) -> &AtomicU32 {
        self.map
            .atomic_u32(self.layout.port(p) as usize + P_SLEEPING)
    }

    /// Whether port `p`'s application thread is running, i.e. not asleep on the doorbell. Its
    /// co-processor thread's sleep does not count: the application may be spinning meanwhile.
    pub fn application_awake(&self, p: u32) -> bool {
        self.sleeping(p).load(Ordering::Relaxed) & SLEEPER_APP == 0
    }

    /// The CPU port `p`'s progress thread last ran on, plus one (0 = not known). The node engine
    /// publishes it so that a rank sharing that CPU sleeps instead of spinning while it waits for
    /// the engine (see `Endpoint::eq_wait_into`).
    pub fn cpu_hint(&self, p: u32) -> &AtomicU32 {
        self.map.atomic_u32(self.layout.port(p) as usize + P_CPU)
    }

    /// Whether port `p`'s progress thread was last seen on CPU `cpu`.
    pub fn runs_on(&self, p: u32, cpu: u32) -> bool {
        self.cpu_hint(p).load(Ordering::Relaxed) == cpu + 1
    }

    /// Counter `slot` of port `p`.
    #[inline(always)]
    pub fn counter(&self, p: u32, s: usize) -> &AtomicU64 {
        self.map
            .atomic_u64(self.layout.port(p) as usize + P_COUNTERS + 8 * s)
    }

    /// Adds to a counter.
    #[inline]
    pub fn count(&self, p: u32, s: usize, n: u64) {
        self.counter(p, s).fetch_add(n, Ordering::Relaxed);
    }

    /// Adds to a counter that only one thread writes at a time (the port's owner, under its
    /// endpoint lock): a plain load and store, no locked instruction on the message path.
    #[inline]
    pub fn bump(&self, p: u32, s: usize, n: u64) {
        let c = self.counter(p, s);
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    /// Counts a drop at port `p`.
    pub fn count_drop(&self, p: u32, r: DropReason) {
        self.count(p, slot::DROP0 + r.index(), 1);
    }

    /// Snapshot of port `p`'s counters.
    pub fn stats(&self, p: u32) -> PortStats {
        let c = |s| self.counter(p, s).load(Ordering::Relaxed);
        PortStats {
            port: p,
            rank: self.ranks.get(p as usize).copied().unwrap_or(u32::MAX),
            sent: c(slot::SENT),
            sent_bytes: c(slot::SENT_BYTES),
            delivered: c(slot::DELIVERED),
            delivered_bytes: c(slot::DELIVERED_BYTES),
            send_waits: c(slot::SEND_WAITS),
            large_direct: c(slot::LARGE_DIRECT),
            large_shared: c(slot::LARGE_SHARED),
            large_cma: c(slot::LARGE_CMA),
            sleeps: c(slot::SLEEPS),
            drops: DropReason::ALL
                .iter()
                .map(|r| (r.name().to_string(), c(slot::DROP0 + r.index())))
                .collect(),
        }
    }

    /// How long a waiter on one of this region's doorbells may sleep, having been idle for
    /// `idle`. Call after storing 1 to the port's sleeping flag and *before* the last look at the
    /// inbound rings.
    ///
    /// Senders publish a record and then read the sleeping flag with no fence between
    /// ([`Region::wake`]), so a waiter can miss a record published just as it decides to sleep;
    /// short sleeps ([`MAX_SLEEP`]) bound that cost while traffic is bursty. Once the waiter has
    /// been idle for [`DEEP_AFTER`] it issues the fence on the senders' behalf: membarrier(2)
    /// makes every running thread of every attached process execute a full fence, after which a
    /// sender either has its record visible to the waiter's last look or sees the sleeping flag
    /// and rings the doorbell. The waiter may then sleep [`DEEP_SLEEP`]. One fence (an IPI to
    /// the CPUs running attached processes) per idle period, instead of a fence per message.
    pub fn fence_before_sleep(&self, idle: std::time::Duration) -> std::time::Duration {
        if idle < DEEP_AFTER || self.map.atomic_u32(H_NO_FENCE).load(Ordering::SeqCst) != 0 {
            return MAX_SLEEP;
        }
        if crate::sys::membarrier_global() {
            DEEP_SLEEP
        } else {
            MAX_SLEEP
        }
    }

    /// Registers this process for the fence of [`Region::fence_before_sleep`]; where the kernel
    /// does not allow it, marks the region so that no waiter relies on the fence.
    fn register_fence(&self) {
        if !crate::sys::membarrier_register() {
            self.map.atomic_u32(H_NO_FENCE).store(1, Ordering::SeqCst);
        }
    }

    /// Rings the doorbell of port `p` if its engine sleeps. Call after publishing a record.
    ///
    /// No fence on this path: a full fence per message would drain the store buffer and serialise
    /// every record on a cross-core round trip (it cut the message rate five-fold). The price is a
    /// rare lost wake-up when the receiver decides to sleep in the ~100 ns before our record becomes
    /// visible; every sleep is therefore bounded ([`MAX_SLEEP`]), so such a message waits at most
    /// that long instead of forever.
    #[inline]
    pub fn wake(&self, p: u32) {
        if self.sleeping(p).load(Ordering::Relaxed) != 0 {
            self.ring_doorbell(p);
        }
    }

    /// The doorbell half of [`Region::wake`], for a caller that already saw port `p` asleep.
    #[cold]
    pub fn ring_doorbell(&self, p: u32) {
        self.doorbell(p).fetch_add(1, Ordering::SeqCst);
        crate::sys::futex_wake(self.doorbell(p));
    }

    /// Port `p`'s block (its counters and its sleeping flag) reached through one pointer checked
    /// here, once: the message path bumps counters and looks at a receiver's flag per record, and
    /// [`Region::counter`] / [`Region::sleeping`] recompute and check the offset on every call.
    pub fn port_block(&self, p: u32) -> PortBlock {
        let off = self.layout.port(p) as usize;
        assert!(
            off % 8 == 0
                && off
                    .checked_add(PORT_BLOCK)
                    .is_some_and(|e| e <= self.map.len()),
            "port {p}'s block outside the region"
        );
        PortBlock {
            // SAFETY: `off..off + PORT_BLOCK` is inside the mapping (checked above).
            base: unsafe { self.map.ptr().add(off) },
            _map: self.map.clone(),
        }
    }
}

// Every counter slot and the sleeping flag lie inside a port's block, before its copy board, which
// fills whole lines of the block.
const _: () = assert!(
    P_COUNTERS + 8 * slot::COUNT <= P_BOARD
        && P_SLEEPING + 4 <= P_COUNTERS
        && P_BOARD % 64 == 0
        && P_BOARD + 8 * crate::copy_share::BOARD_WORDS <= PORT_BLOCK
);

/// One port's block of the region (see [`Region::port_block`]): its counters and its "engine is
/// asleep" flag without an offset computation and bounds check per access.
#[derive(Debug)]
pub struct PortBlock {
    /// Start of the block (8-aligned, `PORT_BLOCK` bytes inside the mapping `_map` keeps alive).
    base: *mut u8,
    _map: Arc<Mapping>,
}

// SAFETY: `base` points into the shared mapping that `_map` keeps alive, and the block is reached
// only through atomics, exactly like `Mapping` itself, which is `Send` and `Sync`.
unsafe impl Send for PortBlock {}
// SAFETY: as above.
unsafe impl Sync for PortBlock {}

impl PortBlock {
    /// Counter `s` of this port ([`slot`]).
    #[inline(always)]
    pub fn counter(&self, s: usize) -> &AtomicU64 {
        assert!(s < slot::COUNT, "counter slot {s} out of range");
        // SAFETY: the block is inside the mapping and 8-aligned (`Region::port_block`), and slot
        // `s < slot::COUNT` is inside the block (the const assertion above); `AtomicU64` has the
        // layout of `u64`; `_map` keeps the memory alive as long as `self`.
        unsafe { &*(self.base.add(P_COUNTERS + 8 * s) as *const AtomicU64) }
    }

    /// [`Region::bump`] for this port: a plain load and store (one writer, the port's owner).
    #[inline(always)]
    pub fn bump(&self, s: usize, n: u64) {
        let c = self.counter(s);
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    /// This port's copy board ([`crate::copy_share`]).
    #[inline]
    pub fn board(&self) -> crate::copy_share::Board<'_> {
        // SAFETY: the board's words lie inside the block (the const assertion above), which is
        // inside the mapping and 8-aligned (`Region::port_block`), with `P_BOARD` a multiple of
        // 64; `[AtomicU64; N]` has the layout of `[u64; N]`; `_map` keeps the memory alive as long
        // as `self`, and the words are only reached through atomics.
        let w = unsafe {
            &*(self.base.add(P_BOARD) as *const [AtomicU64; crate::copy_share::BOARD_WORDS])
        };
        crate::copy_share::Board::new(w)
    }

    /// Which of this port's threads sleep on its doorbell ([`Region::sleeping`]).
    #[inline(always)]
    pub fn sleeping(&self) -> &AtomicU32 {
        // SAFETY: as in `counter`; the flag's offset is 4-aligned and inside the block.
        unsafe { &*(self.base.add(P_SLEEPING) as *const AtomicU32) }
    }
}

/// [`Region::sleeping`] bit: the port's application thread sleeps on the doorbell.
pub const SLEEPER_APP: u32 = 1;
/// [`Region::sleeping`] bit: the port's co-processor engine thread sleeps on the doorbell.
pub const SLEEPER_ENGINE_THREAD: u32 = 2;

/// Longest a sleeping engine or waiter blocks before it looks again (bounds the cost of a lost
/// wake-up, see [`Region::wake`]).
pub const MAX_SLEEP: std::time::Duration = std::time::Duration::from_millis(1);
/// Idle time after which a waiter fences and sleeps [`DEEP_SLEEP`] instead of [`MAX_SLEEP`].
pub const DEEP_AFTER: std::time::Duration = std::time::Duration::from_millis(10);
/// Longest sleep of a waiter that has fenced (a safety bound only: with the fence no wake-up is
/// lost). An idle engine or rank then wakes once a second instead of 1000 times: at 100 ms the
/// wake-ups still showed as a 10 Hz line in FTQ on the waiter's core.
pub const DEEP_SLEEP: std::time::Duration = std::time::Duration::from_secs(1);

fn ring_cap_limit(cap: u64) -> u64 {
    (cap / 2).min(crate::ring::MAX_RECORD as u64)
}

fn lock_map(map: &Mapping, len: u64) -> Result<(), QkError> {
    map.lock_and_prefault().map_err(|e| memlock_error(e, len))
}

fn memlock_error(e: crate::sys::LockError, len: u64) -> QkError {
    match e {
        crate::sys::LockError::Mlock(source) => QkError::Memlock {
            bytes: len,
            limit: match crate::sys::memlock_limit() {
                Some(l) => format!("{} KiB", l / 1024),
                None => "unlimited".into(),
            },
            source,
        },
    }
}

/// One ring inside a region, as [`RingMem`].
#[derive(Clone, Debug)]
pub struct ShmRing {
    /// Start of the data area (`map.ptr() + data`), kept so that the stamp and line-start words
    /// are reached without a bounds check per access.
    base: *mut u8,
    map: Arc<Mapping>,
    head: usize,
    data: usize,
    cap: u64,
    /// The CPU has `prefetchw` ([`crate::sys::has_prefetchw`], looked up when the ring is made).
    prefetchw: bool,
}

// SAFETY: `base` points into the shared mapping that `map` keeps alive; the ring only reaches
// that memory through atomics or the mapping's own (thread-safe) accessors, exactly as
// `Mapping` itself, which is `Send` and `Sync`.
unsafe impl Send for ShmRing {}
// SAFETY: as above.
unsafe impl Sync for ShmRing {}

impl ShmRing {
    /// The data area's word at `off` (a stamp or a line's first word): the ring code passes only
    /// multiples of 8 below the capacity; the mask keeps any other value inside the area too.
    #[inline(always)]
    fn word(&self, off: u64) -> &AtomicU64 {
        debug_assert!(
            off % 8 == 0 && off < self.cap,
            "ring word {off} out of range"
        );
        let off = (off & (self.cap - 1) & !7) as usize;
        // SAFETY: `base` is the start of this ring's data area of `cap` bytes inside the mapping,
        // which `map` keeps alive (checked in `Region::ring`); `off` is a multiple of 8 below
        // `cap` (the mask), so the word is in the area and aligned (the mapping is page-aligned,
        // the data area starts at a multiple of 8); `AtomicU64` has the layout of `u64`.
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    /// Copies a fixed-size block to `off` in the data area: with the size known the copy is a few
    /// moves instead of a `memcpy` call and the mapping's per-write bounds check (one compare
    /// against the ring's capacity instead).
    #[inline(always)]
    pub fn write_array<const N: usize>(&self, off: u64, src: &[u8; N]) {
        assert!(
            off.checked_add(N as u64).is_some_and(|e| e <= self.cap),
            "ring write of {N} bytes at {off} outside the data area"
        );
        // SAFETY: `base` is the start of this ring's data area of `cap` bytes inside the mapping,
        // which `map` keeps alive (checked in `Region::ring`), and `off + N <= cap` (above); the
        // source is a local array, which cannot overlap the shared mapping.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.add(off as usize), N) };
    }

    /// The body bytes of a record, borrowed from shared memory: checked against the data area
    /// and reached through `base` (no walk through the mapping's `Arc` per record).
    #[inline]
    pub fn body(&self, off: u64, len: usize) -> &[u8] {
        assert!(
            off.checked_add(len as u64).is_some_and(|e| e <= self.cap),
            "ring body of {len} bytes at {off} outside the data area"
        );
        // SAFETY: `base` is the start of this ring's data area of `cap` bytes inside the mapping,
        // which `map` keeps alive for as long as `&self` (checked in `Region::ring`), and
        // `off + len <= cap` (above), so the bytes are inside the area.
        unsafe { std::slice::from_raw_parts(self.base.add(off as usize), len) }
    }
}

impl RingMem for ShmRing {
    #[inline]
    fn cap(&self) -> u64 {
        self.cap
    }
    #[inline]
    fn load_acquire(&self, off: u64) -> u64 {
        self.word(off).load(Ordering::Acquire)
    }
    #[inline]
    fn store_release(&self, off: u64, v: u64) {
        self.word(off).store(v, Ordering::Release)
    }
    #[inline]
    fn zero_word(&self, off: u64) {
        self.word(off).store(0, Ordering::Relaxed)
    }
    #[inline]
    fn write_bytes(&self, off: u64, src: &[u8]) {
        self.map.write(self.data + off as usize, src)
    }
    #[inline]
    fn read_bytes(&self, off: u64, dst: &mut [u8]) {
        self.map.read(self.data + off as usize, dst)
    }
    #[inline]
    fn prefetch(&self, off: u64) {
        // Masked into the data area, like `word` (a prefetch never faults, but a stray one would
        // fetch someone else's line).
        crate::sys::prefetch_line(self.base.wrapping_add((off & (self.cap - 1)) as usize))
    }
    #[inline]
    fn prefetch_write(&self, off: u64) {
        crate::sys::prefetch_line_for_write(
            self.base.wrapping_add((off & (self.cap - 1)) as usize),
            self.prefetchw,
        )
    }
    #[inline]
    fn load_head(&self) -> u64 {
        self.map.atomic_u64(self.head).load(Ordering::Acquire)
    }
    #[inline]
    fn store_head(&self, v: u64) {
        self.map.atomic_u64(self.head).store(v, Ordering::Release)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locked_bytes() -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = s.lines().find(|l| l.starts_with("VmLck:")).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    /// Job 7, all `world` ranks on this node, CPU mode code `mode`, 1 MiB of heap per rank.
    fn params(world: u32, mode: u32) -> RegionParams {
        RegionParams {
            job: 7,
            world,
            node: 0,
            ranks: (0..world).collect(),
            ring_cap: 64 << 10,
            heap_per_rank: 1 << 20,
            eager_max: 4096,
            mode,
            max_message: 1 << 20,
        }
    }

    #[test]
    fn a_rank_is_awake_unless_its_application_sleeps_and_any_sleeper_is_rung_for() {
        let (fd, _creator) = Region::create(&params(2, 1), false).unwrap();
        let r = Region::attach(&fd, true, false).unwrap();
        let rang = |r: &Region| {
            let before = r.doorbell(1).load(Ordering::SeqCst);
            r.wake(1);
            r.doorbell(1).load(Ordering::SeqCst) != before
        };
        assert!(r.application_awake(1) && !rang(&r));
        // Only the co-processor thread sleeps: the application may be spinning on its CPU, and
        // a sender still rings for the thread.
        r.sleeping(1)
            .fetch_or(SLEEPER_ENGINE_THREAD, Ordering::SeqCst);
        assert!(r.application_awake(1) && rang(&r));
        // Both sleep; then the thread wakes and the application's bit stays.
        r.sleeping(1).fetch_or(SLEEPER_APP, Ordering::SeqCst);
        assert!(!r.application_awake(1) && rang(&r));
        r.sleeping(1)
            .fetch_and(!SLEEPER_ENGINE_THREAD, Ordering::SeqCst);
        assert!(!r.application_awake(1) && rang(&r));
        r.sleeping(1).fetch_and(!SLEEPER_APP, Ordering::SeqCst);
        assert!(r.application_awake(1) && !rang(&r));
        assert!(r.application_awake(0));
    }

    #[test]
    fn a_rank_locks_its_own_part_of_the_region_not_all_of_it() {
        let (fd, _creator) = Region::create(&params(8, 0), false).unwrap();
        let r = Region::attach(&fd, true, false).unwrap();
        let l = r.layout;
        let before = locked_bytes();
        match r.lock_for_port(3) {
            Ok(()) => {}
            Err(QkError::Memlock { .. }) => {
                eprintln!("skipped: RLIMIT_MEMLOCK too low to lock a few MiB here");
                return;
            }
            Err(e) => panic!("{e}"),
        }
        let locked = locked_bytes() - before;
        // Its heap part, its incoming and its outgoing queues at least ...
        assert!(
            locked >= l.heap_per_rank + 2 * (l.ports as u64 - 1) * l.ring_cap,
            "locked only {locked} bytes"
        );
        // ... but far from the whole region (9 ports' heaps and 81 queues).
        assert!(locked < l.total / 3, "locked {locked} of {} bytes", l.total);
        assert!(matches!(
            r.lock_for_port(l.ports),
            Err(QkError::BadRegion(_))
        ));
    }

    /// A region of two ports, one rank each, attached.
    fn two_port_region(job: u32) -> Region {
        let params = RegionParams {
            job,
            world: 2,
            node: 0,
            ranks: vec![0, 1],
            ring_cap: 64 << 10,
            heap_per_rank: 64 << 10,
            eager_max: 4096,
            mode: 0,
            max_message: 1 << 20,
        };
        let (fd, _creator) = Region::create(&params, false).unwrap();
        Region::attach(&fd, true, false).unwrap()
    }

    #[test]
    fn a_ring_body_is_the_data_area_s_bytes_up_to_its_last() {
        let r = two_port_region(9);
        let ring = r.ring(0, 1);
        let cap = ring.cap();
        ring.write_array(cap - 16, &[7u8; 16]);
        assert_eq!(ring.body(cap - 16, 16), &[7u8; 16]);
        assert_eq!(ring.body(cap, 0), &[] as &[u8]);
    }

    #[test]
    #[should_panic(expected = "outside the data area")]
    fn a_ring_body_past_the_data_area_is_refused() {
        // The ring that follows in the mapping starts right after: without the check this
        // would read its head line instead.
        let r = two_port_region(9);
        let ring = r.ring(0, 1);
        let cap = ring.cap();
        let _ = ring.body(cap - 8, 16);
    }

    #[test]
    #[should_panic(expected = "outside the data area")]
    fn a_ring_body_whose_end_overflows_is_refused() {
        let r = two_port_region(9);
        let _ = r.ring(0, 1).body(u64::MAX - 7, 16);
    }

    #[test]
    fn a_waiter_sleeps_long_only_when_idle_and_every_process_takes_the_fence() {
        let r = two_port_region(8);
        let short = std::time::Duration::from_millis(1);
        assert_eq!(r.fence_before_sleep(short), MAX_SLEEP);
        if !crate::sys::membarrier_register() {
            eprintln!("this kernel has no expedited global membarrier: waiters keep short sleeps");
            assert_eq!(r.fence_before_sleep(DEEP_AFTER * 2), MAX_SLEEP);
            return;
        }
        assert_eq!(r.fence_before_sleep(DEEP_AFTER * 2), DEEP_SLEEP);
        // A process that could not register marks the region: nobody relies on the fence.
        r.map.atomic_u32(H_NO_FENCE).store(1, Ordering::SeqCst);
        assert_eq!(r.fence_before_sleep(DEEP_AFTER * 2), MAX_SLEEP);
    }
}
