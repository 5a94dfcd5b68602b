//! A rank's attachment to the fabric: the portals engine of the rank, the memory it owns, and the
//! progress engine that moves its messages (inline in library calls, or on a co-processor thread).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use portals::{
    BoxStore, Config, EqHandle, Event, GetArgs, Op, ProcessId, PutArgs, Region as PRegion,
    Response, SendPlan, WireHeader, WIRE_VERSION,
};

use crate::copy_share;
use crate::counters::{slot, DropReason, PortStats};
use crate::fabric::{flag, op, CompactPut, Hdr, HdrRef, Head, Incoming, Port};
use crate::job::CpuMode;
use crate::region::Region;
use crate::sys::{Memfd, OwnedMemory, WordSpan};
use crate::QkError;

/// The portals engine type a rank runs.
pub type PortalsEngine = portals::Engine<BoxStore>;

/// How long a waiter spins before it blocks. Waking a blocked process on the other core costs
/// 20–40 µs on this class of machine, so spinning for about that long first is never worse than
/// twice the optimum (the classic competitive bound) and keeps short waits at cache-line latency.
pub const SPIN_BEFORE_BLOCK: Duration = Duration::from_micros(50);

/// How long a waiter in a multi-node job spins without giving up its core (after that it yields
/// between looks, so a node engine sharing the core can move the message).
pub const SPIN_BEFORE_YIELD: Duration = Duration::from_micros(5);

/// How many looks a waiter in an inline mode makes at its queues without a pause before it pauses
/// between looks ([`Endpoint::eq_wait_into`]'s spin). An empty look takes ≈ 27 ns here, a paused
/// one ≈ 90 ns (the `pause` is long on this CPU). With the cores close together (a cache line
/// crosses in ≈ 40 ns) a ping-pong's answer came within 7 looks in 99 % of waits, so these keep
/// its latency from waiting on a pause; 8 looks (≈ 215 ns) end before a far sender (≈ 220–250 ns
/// a crossing) can have seen the message it answers and claimed the line for its answer, the
/// window in which looks that do not pause slowed it (the eighteenth round's spin without any
/// pause: far 0 B +18 %).
pub const UNPAUSED_LOOKS: u32 = 8;
// At least one, and fewer than the 64 looks between the spin's clock checks.
const _: () = assert!(UNPAUSED_LOOKS > 0 && UNPAUSED_LOOKS < 64);

/// Bytes of the large-message reference that follows the header when the payload stays put.
const LARGE_REF: usize = 16;

/// A buffer the rank owns, usable as memory-descriptor memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Buf {
    /// Address in this process.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// True when it lives in the job-shared heap (large messages leave it with a single copy).
    pub shared: bool,
}

impl Buf {
    /// The whole buffer as a portals region.
    pub fn region(&self) -> PRegion {
        PRegion::new(self.addr, self.len)
    }

    /// A sub-range as a portals region (clamped to the buffer).
    pub fn sub(&self, off: u64, len: u64) -> PRegion {
        let off = off.min(self.len);
        PRegion::new(self.addr + off, len.min(self.len - off))
    }
}

/// How large payloads leave private (non-shared) memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PrivatePath {
    /// Copy into a job-heap bounce buffer, receiver copies out (two copies, both plain memcpy).
    #[default]
    Bounce,
    /// The receiver reads straight from the sender's process with `process_vm_readv`.
    CrossMemoryAttach,
}

impl PrivatePath {
    /// The default on this host: cross-memory attach where the kernel lets a process read a peer
    /// of the same user (no Yama ptrace restriction), else the bounce buffer. puma-bench measured
    /// CMA ahead of the bounce path at 1 MiB (one copy at ≈ 10 GB/s against two copies plus the
    /// bounce-buffer traffic), so it is preferred when it is allowed.
    pub fn for_this_host() -> PrivatePath {
        match std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope") {
            Ok(s) if s.trim() != "0" => PrivatePath::Bounce,
            _ => PrivatePath::CrossMemoryAttach,
        }
    }
}

/// First-fit allocator over the rank's part of the job heap (offsets relative to the part).
#[derive(Debug)]
pub(crate) struct HeapAlloc {
    free: Vec<(u64, u64)>,
}

impl HeapAlloc {
    pub(crate) fn new(total: u64) -> Self {
        HeapAlloc {
            free: vec![(0, total)],
        }
    }
    pub(crate) fn alloc(&mut self, len: u64) -> Option<u64> {
        let len = len.max(1).div_ceil(64) * 64;
        let i = self.free.iter().position(|&(_, l)| l >= len)?;
        let (o, l) = self.free[i];
        if l == len {
            self.free.remove(i);
        } else {
            self.free[i] = (o + len, l - len);
        }
        Some(o)
    }
    pub(crate) fn free(&mut self, off: u64, len: u64) {
        let len = len.max(1).div_ceil(64) * 64;
        let i = self.free.partition_point(|&(o, _)| o < off);
        self.free.insert(i, (off, len));
        // Coalesce with neighbours.
        if i + 1 < self.free.len() && self.free[i].0 + self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }
    fn free_bytes(&self) -> u64 {
        self.free.iter().map(|f| f.1).sum()
    }
}

/// A record waiting for queue space (responses are never allowed to block the engine).
#[derive(Debug)]
struct Pending {
    dst_rank: u32,
    hdr: Hdr,
    body: Vec<u8>,
    /// A large get reply not made yet: its bytes, in the target's descriptor. [`Inner::flush`]
    /// turns it into a reference ([`Inner::large_source`], as a large put's) before it leaves.
    reply_from: Option<portals::Body>,
}

impl Pending {
    /// A record ready to go.
    fn record(dst_rank: u32, hdr: Hdr, body: Vec<u8>) -> Pending {
        Pending {
            dst_rank,
            hdr,
            body,
            reply_from: None,
        }
    }
}

/// A large send waiting for the receiver's FIN.
#[derive(Debug)]
struct LargeSend {
    plan: Option<SendPlan>,
    bounce: Option<Buf>,
    /// Set when the receiver may ask this rank to share the copy ([`crate::copy_share`]).
    share: Option<ShareableSend>,
}

/// A large send from the heap to a rank of this node, whose copy the receiver may share with us.
#[derive(Clone, Copy, Debug)]
struct ShareableSend {
    /// The receiver's port.
    port: u32,
    /// The source bytes: a region offset (heap), or an address in this process (private memory
    /// sent by cross-memory attach), and the length.
    src: u64,
    len: u64,
    /// The source is private memory.
    private: bool,
}

/// A port this rank has shareable large sends to, with their number: the progress engine looks
/// at its copy board while any is outstanding.
#[derive(Debug)]
struct SharePort {
    port: u32,
    sends: u32,
    block: crate::region::PortBlock,
}

/// Everything behind the endpoint's lock.
struct Inner {
    port: Port,
    region: Region,
    me: ProcessId,
    engine: PortalsEngine,
    mem: OwnedMemory,
    heap: HeapAlloc,
    out: VecDeque<Pending>,
    large: TokenMap<LargeSend>,
    /// Ports with shareable large sends outstanding (see [`ShareableSend`]).
    share_ports: Vec<SharePort>,
    next_token: u64,
    private_path: PrivatePath,
    /// The delivery plan the engine writes each incoming message's placement into (one value kept
    /// and overwritten, instead of a ~300-byte plan built and moved per message).
    plan: Box<portals::DeliveryPlan>,
    /// The portals header of the record being delivered (filled for every record).
    wire: WireHeader,
    /// Where a progress pass with no waiter points [`Ctx::ev`] (never written then).
    scratch: Event,
    /// The last one-line put the fast path sent, ready to be sent again ([`SendLine`]).
    send_line: Option<SendLine>,
    /// The arguments of the last one-line put the fast path sent without a kept line: a second
    /// put with the same ones makes [`Inner::send_line`].
    last_put: Option<PutArgs>,
}

/// A one-line put (at most 8 bytes, no ack, to a rank of this node) kept by the sender: a
/// ping-pong or a stream sends the same put (descriptor, target, portal, match bits, offsets)
/// again and again. When the next put's arguments equal `ticket`'s, everything here still holds:
/// `dst` and `head` follow from the arguments alone (and this rank and region, fixed);
/// [`portals::Engine::put_fast_again`] makes the one check of the ticket that can change (the
/// descriptor still live), and [`OwnedMemory::read_word`] the one of the span (nothing freed
/// since). So the put reads its payload, writes `head`, the payload and the stamp, and posts its
/// send event; the checks and the header's assembly are not made again.
struct SendLine {
    ticket: portals::PutTicket,
    /// The destination port.
    dst: u32,
    /// The encoded fabric header (`INLINE8`, `aux` to be replaced by the payload).
    head: [u8; crate::fabric::HDR_LEN],
    /// The compact form's first word when the put has one ([`crate::fabric::compact_word`]):
    /// then the put goes as a compact record (one ring slot) instead of `head`.
    compact: Option<u64>,
    /// The match bits (the compact record's second word).
    match_bits: u64,
    /// The payload's bytes, checked owned.
    span: WordSpan,
}

/// The [`SendLine`] of one-line put `a` to port `dst`, just sent by the fast path (`None` if the
/// engine or the memory would not take it as it stands).
fn send_line(inner: &Inner, a: &PutArgs, dst: u32) -> Option<SendLine> {
    let ticket = inner.engine.put_ticket(a)?;
    let src = ticket.src();
    let span = inner.mem.word_span(src.addr, src.len)?;
    let hdr = Hdr::put(a, inner.me.rank);
    let head = Hdr {
        flags: hdr.flags | flag::INLINE8,
        aux: 0,
        ..hdr
    }
    .encode();
    Some(SendLine {
        ticket,
        dst,
        head,
        compact: crate::fabric::compact_word(&hdr),
        match_bits: hdr.match_bits,
        span,
    })
}

/// Access to [`Inner`]: owned outright in the inline modes (no lock, so no locked instruction and
/// no store-buffer drain on the message path), behind a mutex when a co-processor thread shares it.
enum G<'a> {
    Own(&'a mut Inner),
    Lock(MutexGuard<'a, Inner>),
}

impl std::ops::Deref for G<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        match self {
            G::Own(i) => i,
            G::Lock(g) => g,
        }
    }
}

impl std::ops::DerefMut for G<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        match self {
            G::Own(i) => i,
            G::Lock(g) => g,
        }
    }
}

struct Shared {
    inner: Option<Mutex<Inner>>,
    region: Region,
    port: u32,
    rank: u32,
    stop: AtomicBool,
    /// Bumped by the co-processor thread after it delivered something (app waiters block on it).
    delivered: AtomicU32,
    app_waiting: AtomicU32,
}

/// A rank's endpoint. Cheap to share between threads of the rank (`Send + Sync`).
pub struct Endpoint {
    own: Option<Box<Inner>>,
    shared: Arc<Shared>,
    mode: CpuMode,
    coproc: Mutex<Option<std::thread::JoinHandle<()>>>,
    started: AtomicBool,
    /// Set when an [`Endpoint::eq_wait`] ran out of time with no event: the start of that wait,
    /// so that a caller waiting in slices (to check its peers between them) is seen as idle for
    /// the whole wait, and sleeps long, rather than re-spinning every slice.
    idle_since: Option<Instant>,
    _fd: Memfd,
}

/// Attachment parameters for [`Endpoint::attach`].
#[derive(Clone, Debug)]
pub struct AttachSpec {
    /// Local rank (port) in the region.
    pub local_rank: u32,
    /// Expected job id (refuses a region of another job).
    pub job: u32,
    /// CPU mode (decides the progress engine).
    pub mode: CpuMode,
    /// Portals table sizes.
    pub portals: u32,
    /// Memory descriptors.
    pub mds: u32,
    /// Match entries.
    pub match_entries: u32,
    /// Event slots.
    pub events: u32,
    /// Lock and prefault this rank's part of the region ([`Region::lock_for_port`]).
    pub lock_memory: bool,
}

impl AttachSpec {
    /// Defaults for a local rank of job `job`.
    pub fn new(job: u32, local_rank: u32, mode: CpuMode) -> Self {
        AttachSpec {
            local_rank,
            job,
            mode,
            portals: 64,
            mds: 1024,
            match_entries: 4096,
            events: 1 << 16,
            lock_memory: true,
        }
    }
}

fn env(var: &'static str) -> Result<String, QkError> {
    std::env::var(var).map_err(|_| QkError::NotLaunched { var })
}

fn env_num(var: &'static str) -> Result<u32, QkError> {
    let v = env(var)?;
    v.parse().map_err(|_| QkError::BadEnv {
        var,
        value: v,
        why: "expected a non-negative integer",
    })
}

impl Endpoint {
    /// Attaches to the fabric the PCT prepared, from the environment yod/the PCT set
    /// (`PUMA_QK_FD`, `PUMA_JOB`, `PUMA_RANK`, `PUMA_LOCAL_RANK`, `PUMA_MODE`).
    pub fn from_env() -> Result<Endpoint, QkError> {
        let fd = env_num("PUMA_QK_FD")?;
        let job = env_num("PUMA_JOB")?;
        let rank = env_num("PUMA_RANK")?;
        let local = env_num("PUMA_LOCAL_RANK")?;
        let mode: CpuMode = match std::env::var("PUMA_MODE") {
            Ok(m) => m.parse()?,
            Err(_) => CpuMode::Heater,
        };
        let memfd = Memfd::from_inherited(fd as i32).map_err(|e| QkError::BadEnv {
            var: "PUMA_QK_FD",
            value: fd.to_string(),
            why: if e.to_string().contains("not an open") {
                "not an open file descriptor in this process"
            } else {
                "unusable"
            },
        })?;
        let ep = Endpoint::attach(memfd, &AttachSpec::new(job, local, mode))?;
        if ep.rank() != rank {
            return Err(QkError::BadRegion(format!(
                "PUMA_RANK={rank} but local rank {local} of this node's region is world rank {}",
                ep.rank()
            )));
        }
        Ok(ep)
    }

    /// Attaches local rank `spec.local_rank` to the region behind `fd`.
    pub fn attach(fd: Memfd, spec: &AttachSpec) -> Result<Endpoint, QkError> {
        let region = Region::attach(&fd, true, false)?;
        if region.job != spec.job {
            return Err(QkError::BadRegion(format!(
                "the region belongs to job {}, not job {}: a process may only attach to its own job's fabric",
                region.job, spec.job
            )));
        }
        let port = spec.local_rank;
        if port >= region.layout.local {
            return Err(QkError::BadRegion(format!(
                "local rank {port} out of range (node has {} ranks)",
                region.layout.local
            )));
        }
        if spec.lock_memory {
            region.lock_for_port(port)?;
        }
        let rank = region.ranks[port as usize];
        let me = ProcessId::new(region.job, rank);
        let cfg = Config {
            id: me,
            portals: spec.portals,
            match_entries: spec.match_entries,
            mds: spec.mds,
            blocks: spec.mds * 4,
            eqs: 64,
            events: spec.events,
            heap_records: spec.mds * 4,
            max_message: region.max_message,
        };
        let engine = PortalsEngine::new(cfg).map_err(|e| QkError::Portals(e.to_string()))?;
        let heap_part_off = region.layout.heap(port);
        let map = region_map_arc(&region);
        let mem = OwnedMemory::new(
            map,
            heap_part_off as usize,
            region.layout.heap_per_rank as usize,
        );
        region.set_pid(port, std::process::id());
        let inner = Inner {
            port: Port::new(region.clone(), port),
            region: region.clone(),
            me,
            engine,
            mem,
            heap: HeapAlloc::new(region.layout.heap_per_rank),
            out: VecDeque::new(),
            large: TokenMap::default(),
            share_ports: Vec::new(),
            next_token: 1,
            private_path: PrivatePath::for_this_host(),
            plan: Box::new(portals::DeliveryPlan::EMPTY),
            wire: EMPTY_WIRE,
            scratch: Event::EMPTY,
            send_line: None,
            last_put: None,
        };
        let coproc_mode = spec.mode.engine_on_own_core();
        let (own, inner) = if coproc_mode {
            (None, Some(inner))
        } else {
            (Some(Box::new(inner)), None)
        };
        let shared = Arc::new(Shared {
            inner: inner.map(Mutex::new),
            region: region.clone(),
            port,
            rank,
            stop: AtomicBool::new(false),
            delivered: AtomicU32::new(0),
            app_waiting: AtomicU32::new(0),
        });
        Ok(Endpoint {
            own,
            shared,
            mode: spec.mode,
            coproc: Mutex::new(None),
            started: AtomicBool::new(false),
            idle_since: None,
            _fd: fd,
        })
    }

    /// Starts the progress engine of the CPU mode: in message co-processor mode, the engine thread
    /// on the other core (from then on messages are deposited while the application computes). A
    /// no-op in the inline modes. Called implicitly by the first put, get or event wait, so the
    /// application can set up its portals before anything is delivered.
    #[inline]
    pub fn start_engine(&self) -> Result<(), QkError> {
        // Every put, get and event poll passes here: in the inline modes, and once the thread
        // runs, it is one flag test (no atomic read-modify-write, no call).
        if !self.mode.engine_on_own_core() || self.started.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.spawn_engine()
    }

    #[cold]
    fn spawn_engine(&self) -> Result<(), QkError> {
        if self.started.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let sh = self.shared.clone();
        // Put the engine on a core other than the one the application runs on now.
        let cpus = crate::sys::allowed_cpus();
        let here = current_cpu();
        let target = cpus.iter().copied().find(|&c| Some(c) != here);
        let h = std::thread::Builder::new()
            .name(format!("qk-engine-{}", sh.rank))
            .spawn(move || {
                if let Some(c) = target {
                    let _ = crate::sys::pin_to_cpu(c);
                }
                coproc_loop(&sh)
            })
            .map_err(|e| QkError::os("starting the co-processor engine thread", e))?;
        *self.coproc.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        Ok(())
    }

    /// This rank's world rank.
    pub fn rank(&self) -> u32 {
        self.shared.rank
    }

    /// Job id.
    pub fn job(&self) -> u32 {
        self.shared.region.job
    }

    /// World size.
    pub fn world_size(&self) -> u32 {
        self.shared.region.world
    }

    /// This rank's portals process id.
    pub fn id(&self) -> ProcessId {
        ProcessId::new(self.job(), self.rank())
    }

    /// CPU mode.
    pub fn mode(&self) -> CpuMode {
        self.mode
    }

    /// Largest message carried eagerly in the queue.
    pub fn eager_max(&self) -> u64 {
        self.shared.region.eager_max as u64
    }

    fn lock(&mut self) -> G<'_> {
        match (&mut self.own, &self.shared.inner) {
            (Some(b), _) => G::Own(b),
            (None, Some(m)) => G::Lock(m.lock().unwrap_or_else(|e| e.into_inner())),
            (None, None) => unreachable!("an endpoint always has owned or shared state"),
        }
    }

    /// Runs `f` with the rank's portals engine (portal table, match entries, descriptors, event
    /// queues). Descriptors must use memory from [`Endpoint::alloc_shared`] or
    /// [`Endpoint::alloc_private`]; deposits into anything else are refused and counted.
    pub fn with_engine<R>(&mut self, f: impl FnOnce(&mut PortalsEngine) -> R) -> R {
        let mut g = self.lock();
        // `f` may change anything in the engine (or replace it): the put kept for sending again
        // is made afresh by the next put that takes the fast path.
        g.send_line = None;
        f(&mut g.engine)
    }

    /// Chooses how large payloads leave private memory.
    pub fn set_private_path(&mut self, p: PrivatePath) {
        self.lock().private_path = p;
    }

    /// Allocates `len` bytes of the job-shared heap (large messages from/to it move with one copy).
    pub fn alloc_shared(&mut self, len: u64) -> Result<Buf, QkError> {
        let mut g = self.lock();
        let off = g.heap.alloc(len).ok_or(QkError::HeapExhausted {
            want: len,
            free: g.heap.free_bytes(),
        })?;
        let (base, _) = g.mem.heap_range();
        Ok(Buf {
            addr: base + off,
            len,
            shared: true,
        })
    }

    /// Bytes of this rank's part of the job heap free now, and the part's size. The QK takes its
    /// bounce buffers (private memory sent or read by reference) from the same part: a library
    /// that keeps some of it free leaves those room ([`Endpoint::alloc_shared`]).
    pub fn heap_room(&mut self) -> (u64, u64) {
        let total = self.shared.region.layout.heap_per_rank;
        (self.lock().heap.free_bytes(), total)
    }

    /// Allocates a private (zeroed) buffer of `len` bytes.
    pub fn alloc_private(&mut self, len: u64) -> Buf {
        let addr = self.lock().mem.alloc_private(len as usize);
        Buf {
            addr,
            len,
            shared: false,
        }
    }

    /// Frees a buffer. Descriptors still naming it make later deposits fail (counted as bad memory).
    pub fn free(&mut self, b: Buf) {
        let mut g = self.lock();
        if b.shared {
            let (base, _) = g.mem.heap_range();
            g.heap.free(b.addr - base, b.len);
        } else {
            g.mem.free_private(b.addr);
        }
    }

    /// Copies `src` into a buffer at `off`.
    pub fn write(&mut self, b: &Buf, off: u64, src: &[u8]) -> Result<(), QkError> {
        if off.checked_add(src.len() as u64).is_none_or(|e| e > b.len) {
            return Err(QkError::BadHandle("write beyond the buffer"));
        }
        if self.lock().mem.write(b.addr + off, src) {
            Ok(())
        } else {
            Err(QkError::BadHandle("buffer"))
        }
    }

    /// Copies from a buffer at `off` into `dst`.
    pub fn read(&mut self, b: &Buf, off: u64, dst: &mut [u8]) -> Result<(), QkError> {
        if off.checked_add(dst.len() as u64).is_none_or(|e| e > b.len) {
            return Err(QkError::BadHandle("read beyond the buffer"));
        }
        if self.lock().mem.read(b.addr + off, dst) {
            Ok(())
        } else {
            Err(QkError::BadHandle("buffer"))
        }
    }

    /// Runs `f` on a buffer's bytes (the engine does not deposit while `f` runs).
    pub fn with_bytes<R>(&mut self, b: &Buf, f: impl FnOnce(&mut [u8]) -> R) -> Result<R, QkError> {
        self.lock()
            .mem
            .with_slice_mut(b.addr, b.len, f)
            .ok_or(QkError::BadHandle("buffer"))
    }

    /// Starts a put (portals semantics). Small payloads are copied into the target's queue now;
    /// large ones leave the buffer when the target copies them (the send event says when).
    ///
    /// In the inline modes the put sent last, sent again ([`SendLine`]), is made here, in the
    /// caller, without a call; everything else goes to the out-of-line path.
    #[inline(always)]
    pub fn put(&mut self, a: &PutArgs) -> Result<(), QkError> {
        if let Some(inner) = self.own.as_deref_mut() {
            if inner.put_again(a) {
                return Ok(());
            }
        }
        self.put_slow(a)
    }

    /// [`Endpoint::put`] past its inlined first try.
    fn put_slow(&mut self, a: &PutArgs) -> Result<(), QkError> {
        if a.target.group != self.job() {
            return Err(QkError::Portals(format!(
                "target job {} is not this job ({})",
                a.target.group,
                self.job()
            )));
        }
        self.check_rank(a.target.rank)?;
        self.start_engine()?;
        let inline = self.mode != CpuMode::MsgCoproc;
        let mut g = self.lock();
        let inner = &mut *g;
        // The put sent last, again (the co-processor mode; the inline modes tried it already).
        if !inline && inner.put_again(a) {
            return Ok(());
        }
        // Fast path, the common small put (no ack, eager, to a rank of this node, from one block):
        // the portals checks, the payload copied once straight from the buffer into the queue,
        // then the send event, all in `put_fast`. Anything else, a full queue included, takes the
        // general path below (which repeats the checks and reports what is wrong).
        if let Some(d) = inner
            .region
            .port_of_rank(a.target.rank)
            .filter(|_| a.length <= inner.region.eager_max as u64)
        {
            inner.port.prefetch_next(d);
            let (mem, port, me) = (&inner.mem, &mut inner.port, inner.me.rank);
            let sent = inner.engine.put_fast(
                a,
                // Inlined: left to itself the compiler called it, spilling around the call
                // (callgrind: 8 instructions per message more).
                #[inline(always)]
                |src| {
                    let hdr = Hdr::put(a, me);
                    let ok = if src.len <= 8 {
                        // One slot (the compact form) or one line: the payload travels in the
                        // record's last word.
                        let Some(w) = mem.with_slice(src.addr, src.len, |s| {
                            let mut w = [0u8; 8];
                            w[..s.len()].copy_from_slice(s);
                            u64::from_le_bytes(w)
                        }) else {
                            return Err(Some(src));
                        };
                        if let Some(cw) = crate::fabric::compact_word(&hdr) {
                            port.try_send_compact(d, cw, hdr.match_bits, w, src.len)
                        } else {
                            let h8 = Hdr {
                                flags: hdr.flags | flag::INLINE8,
                                aux: w,
                                ..hdr
                            };
                            port.try_send(d, &h8, &[])
                        }
                    } else {
                        mem.with_slice(src.addr, src.len, |s| port.try_send(d, &hdr, s))
                            .ok_or(Some(src))?
                    };
                    // `None`: the queue is full (the general path waits for room).
                    ok.then_some(()).ok_or(None)
                },
            );
            match sent {
                Some(Ok(_)) => {
                    if a.length <= 8 {
                        // Kept once the same put is made twice in a row: puts that change
                        // every time pay one compare and one copy, not the making of a line
                        // they would never send again.
                        if inner.last_put.as_ref() == Some(a) {
                            inner.send_line = send_line(inner, a, d);
                        } else {
                            inner.last_put = Some(*a);
                        }
                    }
                    return Ok(());
                }
                Some(Err(Some(src))) => {
                    return Err(QkError::Portals(format!(
                        "memory descriptor names {} bytes at {:#x}, which this rank does not own",
                        src.len, src.addr
                    )))
                }
                Some(Err(None)) | None => {}
            }
        }
        // The portals checks and accounting of a put, without its portals header: the fabric
        // header is built straight from the arguments (`Hdr::put`, the same fields).
        let pbody = g
            .engine
            .prepare_put_body(a)
            .map_err(|e| QkError::Portals(e.to_string()))?;
        let hdr = Hdr::put(a, g.me.rank);
        let len = pbody.len();
        let local_dst = g.region.port_of_rank(a.target.rank);
        if let (true, Some(d)) = (
            len <= g.region.eager_max as u64 && pbody.is_contiguous(),
            local_dst,
        ) {
            // An acked small put (or one that found the queue full): still one lock and the
            // payload copied once, straight from the buffer into the queue.
            let first = pbody.first();
            let inner = &mut *g;
            match inner
                .mem
                .with_slice(first.addr, first.len, |s| inner.port.try_send(d, &hdr, s))
            {
                Some(true) => {
                    inner
                        .engine
                        .sent_put(a, &pbody)
                        .map_err(|e| QkError::Portals(e.to_string()))?;
                    return Ok(());
                }
                Some(false) => {}
                None => {
                    return Err(QkError::Portals(format!(
                        "memory descriptor names {} bytes at {:#x}, which this rank does not own",
                        first.len, first.addr
                    )))
                }
            }
        }
        let plan = g.engine.put_plan(a, pbody);
        if len <= g.region.eager_max as u64 {
            let body = g.gather(&plan.body)?;
            drop(g);
            self.send_blocking(a.target.rank, &hdr, &body, inline)?;
            let mut g = self.lock();
            g.engine
                .sent(&plan)
                .map_err(|e| QkError::Portals(e.to_string()))?;
            return Ok(());
        }
        // A bounce buffer may have to wait for earlier large messages to be copied out (their FIN
        // frees it): like a full queue, a full heap makes the sender wait, it never drops.
        // The clock is read only once the heap is found full: a put that does not wait reads it
        // not at all (with `send_blocking`'s, two clock reads were ≈ 30 ns of a 1 KiB put sent
        // by reference near, `crates/qk/notes-round21-kib.md`).
        let mut start = None;
        let (mut hdr, body) = loop {
            match g.large_source(hdr, &plan.body, Some(plan), a.target.rank) {
                Err(QkError::HeapExhausted { .. })
                    if !g.large.is_empty()
                        && start.get_or_insert_with(Instant::now).elapsed()
                            < Duration::from_secs(60) =>
                {
                    if inline {
                        g.progress(64);
                    }
                    drop(g);
                    backoff(*start.get_or_insert_with(Instant::now));
                    g = self.lock();
                }
                r => break r?,
            }
        };
        hdr.flags |= body.1;
        drop(g);
        self.send_blocking(a.target.rank, &hdr, &body.0, inline)
    }

    /// Starts a get (portals semantics): the reply lands in `a.md` and posts a reply event.
    pub fn get(&mut self, a: &GetArgs) -> Result<(), QkError> {
        if a.target.group != self.job() {
            return Err(QkError::Portals(format!(
                "target job {} is not this job ({})",
                a.target.group,
                self.job()
            )));
        }
        self.check_rank(a.target.rank)?;
        self.start_engine()?;
        let inline = self.mode != CpuMode::MsgCoproc;
        let plan = self
            .lock()
            .engine
            .prepare_get(a)
            .map_err(|e| QkError::Portals(e.to_string()))?;
        let hdr = hdr_from_wire(&plan.header);
        self.send_blocking(a.target.rank, &hdr, &[], inline)
    }

    fn check_rank(&self, r: u32) -> Result<(), QkError> {
        if r >= self.world_size() {
            return Err(QkError::NoSuchRank {
                rank: r,
                world: self.world_size(),
            });
        }
        Ok(())
    }

    /// Enqueues a record to `dst_rank`, waiting (and making progress) while the queue is full.
    fn send_blocking(
        &mut self,
        dst_rank: u32,
        hdr: &Hdr,
        body: &[u8],
        inline: bool,
    ) -> Result<(), QkError> {
        if dst_rank >= self.world_size() {
            return Err(QkError::NoSuchRank {
                rank: dst_rank,
                world: self.world_size(),
            });
        }
        // When the first try found the queue full: the clock is read only then, not per send.
        let mut start: Option<Instant> = None;
        loop {
            {
                let mut g = self.lock();
                if g.port.send_to_rank(dst_rank, hdr, body) {
                    return Ok(());
                }
                if start.is_none() {
                    start = Some(Instant::now());
                    let me = g.port.me();
                    g.region.count(me, slot::SEND_WAITS, 1);
                }
                if inline {
                    g.progress(64);
                }
            }
            backoff(*start.get_or_insert_with(Instant::now));
        }
    }

    /// Makes progress: delivers whatever arrived, sends pending responses. Returns records handled.
    /// (Inline mode calls this from every wait; co-processor mode runs it on the engine thread.)
    pub fn progress(&mut self) -> usize {
        self.lock().progress(256)
    }

    /// Takes the next event from `eq`, if any (makes progress first in inline mode).
    pub fn eq_poll(&mut self, eq: EqHandle) -> Result<Option<Event>, QkError> {
        self.poll_with(|e| e.eq_get(eq))
    }

    /// [`Endpoint::eq_poll`] into a caller's event: `Ok(true)` when one was taken and written to
    /// `out`. A loop that keeps one event avoids moving it through `Result<Option<Event>>`.
    ///
    /// An event already queued (the rest of a run a progress pass delivered) is taken here, in
    /// the caller, without a call: see [`Endpoint::take_queued`].
    #[inline(always)]
    pub fn eq_poll_into(&mut self, eq: EqHandle, out: &mut Event) -> Result<bool, QkError> {
        if self.take_queued(eq, out) {
            return Ok(true);
        }
        self.eq_poll_slow(eq, out)
    }

    /// In the inline modes, when `eq` holds an event and no loss to report: takes it into `out`
    /// (true). False otherwise, `out` untouched, and the poll path gives the full answer (the
    /// loss, a stale handle, or a progress pass). Inlined into the caller, so a waiter handed a
    /// run of events takes each with a few loads and one copy instead of a call into the poll.
    #[inline(always)]
    fn take_queued(&mut self, eq: EqHandle, out: &mut Event) -> bool {
        let Some(inner) = self.own.as_deref_mut() else {
            return false;
        };
        if !inner.engine.eq_take_queued_into(eq, out) {
            return false;
        }
        self.idle_since = None;
        true
    }

    /// [`Endpoint::eq_poll_into`] past its inlined first look.
    fn eq_poll_slow(&mut self, eq: EqHandle, out: &mut Event) -> Result<bool, QkError> {
        // Inline modes, an event already queued (a progress pass delivers a batch, the calls
        // after it only hand its events out): take it straight from the owned engine, without
        // the general path's mode tests and result wrapping.
        if let Some(inner) = self.own.as_deref_mut() {
            // Else (the inline modes own their engine, nothing to start) one progress pass;
            // what it delivers for `eq` first may come straight into `out`.
            let got = match inner.engine.eq_get_into(eq, out) {
                Ok(false) => inner.progress_into(eq, out),
                r => r,
            }
            .map_err(|e| QkError::Portals(e.to_string()))?;
            if got {
                self.idle_since = None;
            }
            return Ok(got);
        }
        self.poll_with(|e| e.eq_get_into(eq, out).map(|got| got.then_some(())))
            .map(|r| r.is_some())
    }

    /// Takes what `take` finds: queued events first, else after one progress pass.
    #[inline]
    fn poll_with<T>(
        &mut self,
        mut take: impl FnMut(&mut PortalsEngine) -> Result<Option<T>, portals::Error>,
    ) -> Result<Option<T>, QkError> {
        self.start_engine()?;
        let mut g = self.lock();
        // Events already queued first: one progress pass delivers a whole batch of records, the
        // following calls just hand out its events.
        let found = match take(&mut g.engine) {
            Ok(None) => {
                // Nothing queued: a progress pass of our own, in every mode. In co-processor
                // mode the engine thread has usually made it already, but when that thread
                // cannot run (asleep, or its core taken by another rank of an oversubscribed
                // node) a caller that only looked at its queue would wait for the scheduler.
                // The lock is held for the look anyway, so the engine thread loses nothing it
                // could have done meanwhile. `puma-bench --modes msg-coproc`, two ranks on two
                // cores (each engine thread on the other rank's core): 0 B one-way 5.3 / 7.8 µs
                // median before, 0.34 / 0.22 after; 8 B rate 0.52 / 0.41 M/s before, 18.4 / 5.7
                // after (ROUNDS.md, twenty-sixth round).
                g.progress(256);
                take(&mut g.engine).map_err(|e| QkError::Portals(e.to_string()))?
            }
            Ok(found) => found,
            Err(e) => return Err(QkError::Portals(e.to_string())),
        };
        drop(g);
        if found.is_some() {
            self.idle_since = None;
        }
        Ok(found)
    }

    /// Waits for the next event on `eq`: spins while the wait is short, then blocks (never a
    /// busy-poll of unbounded length on the application's core).
    pub fn eq_wait(&mut self, eq: EqHandle, timeout: Duration) -> Result<Event, QkError> {
        let mut ev = Event::EMPTY;
        self.eq_wait_into(eq, timeout, &mut ev)?;
        Ok(ev)
    }

    /// [`Endpoint::eq_wait`] into a caller's event (written when this returns `Ok`). An event
    /// already queued is taken in the caller, without a call ([`Endpoint::take_queued`]).
    #[inline(always)]
    pub fn eq_wait_into(
        &mut self,
        eq: EqHandle,
        timeout: Duration,
        out: &mut Event,
    ) -> Result<(), QkError> {
        if self.take_queued(eq, out) {
            return Ok(());
        }
        self.eq_wait_slow(eq, timeout, out)
    }

    /// [`Endpoint::eq_wait_into`] past its inlined first look.
    fn eq_wait_slow(
        &mut self,
        eq: EqHandle,
        timeout: Duration,
        out: &mut Event,
    ) -> Result<(), QkError> {
        if self.eq_poll_slow(eq, out)? {
            return Ok(());
        }
        let start = Instant::now();
        // A wait that continues an earlier one that timed out: no spinning, and the idle time
        // counts from the earlier wait's start.
        let continuing = self.idle_since.is_some();
        let waiting_since = self.idle_since.unwrap_or(start);
        let coproc = self.mode == CpuMode::MsgCoproc;
        let multi_node = (self.shared.region.ranks.len() as u32) < self.world_size();
        // The only rank of its node in a job that spans nodes, when the node engine runs on this
        // rank's CPU, sleeps at once instead of spinning: everything it can wait for comes
        // through the engine, which cannot run while the rank holds the core, and which rings
        // the rank when it hands over a record (after a fence, so no wake-up is lost). A
        // yielding spin instead gave the core to whatever else was runnable for as long as that
        // liked (sched_yield took 40-75 µs on average under load), once per hop. With other
        // local ranks (whose sends ring without a fence) the spin below stays.
        let engine_here = multi_node && self.shared.region.ranks.len() == 1 && {
            let r = &self.shared.region;
            crate::sys::current_cpu().is_some_and(|c| r.runs_on(r.engine_port(), c))
        };
        let mut polls = 0u32;
        loop {
            let seen = self.shared.delivered.load(Ordering::Acquire);
            if self.eq_poll_slow(eq, out)? {
                return Ok(());
            }
            polls = polls.wrapping_add(1);
            if polls % 64 != 0 && !engine_here {
                if spin_pauses(polls, coproc) {
                    std::hint::spin_loop();
                }
                continue;
            }
            let el = start.elapsed();
            if el > timeout {
                self.idle_since = Some(waiting_since);
                return Err(QkError::Timeout(timeout, "an event"));
            }
            // While one of our large messages is being copied by its receiver the wait is known to
            // be short (a copy, not an idle peer): keep spinning rather than pay a wake-up.
            // Likewise when the job spans nodes: an answer from another node is a network round
            // trip away (tens of microseconds), longer than the plain spin but far shorter than
            // idleness; the spin yields the core past its first microseconds, so the node engine
            // sharing it still runs.
            let spin = if engine_here {
                Duration::ZERO
            } else if !self.lock().large.is_empty() {
                SPIN_BEFORE_BLOCK * 20
            } else if multi_node {
                crate::tcp::ENGINE_SPIN
            } else {
                SPIN_BEFORE_BLOCK
            };
            if el < spin && !continuing {
                // In a job that spans nodes, past the first microseconds, let the node engine
                // that may share this core run between looks: the message we wait for needs it
                // to move. Node-local waits never yield: puma-bench measured that yielding hands
                // the core to unrelated work (builds) and made msg-coproc 8 B latency 2-5x worse.
                if multi_node && el > SPIN_BEFORE_YIELD {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            let left = timeout.saturating_sub(el);
            if coproc && engine_here {
                // The node engine shares this CPU and rings the port when it hands a record
                // over; the co-processor thread runs on another CPU. Sleep on the doorbell, as an
                // inline waiter does: the engine's ring then wakes this thread on this CPU, and
                // its look delivers the record (`poll_with`), instead of waking the co-processor
                // thread on the other CPU, which would then wake this one (two cross-CPU
                // wake-ups a message: `puma-bench --tcp --modes msg-coproc` 0 B ≈ 64 µs against
                // the heater's ≈ 13). The co-processor thread rings the doorbell when it
                // delivers while we sleep (`APP_ON_DOORBELL`), and a delivery it made just
                // before is seen in `delivered` (both sides sequentially consistent).
                self.shared
                    .app_waiting
                    .store(APP_ON_DOORBELL, Ordering::SeqCst);
                self.block_until_arrival(waiting_since.elapsed(), left, true, Some(seen));
                self.shared.app_waiting.store(0, Ordering::Relaxed);
            } else if coproc {
                // Both sides of this handshake are sequentially consistent (the engine bumps
                // `delivered`, then reads `app_waiting`), so no wake-up is lost: the bound only
                // keeps the timeout honest.
                self.shared
                    .app_waiting
                    .store(APP_ON_DELIVERED, Ordering::SeqCst);
                if self.shared.delivered.load(Ordering::SeqCst) == seen {
                    crate::sys::futex_wait(
                        &self.shared.delivered,
                        seen,
                        left.min(crate::region::DEEP_SLEEP),
                    );
                }
                self.shared.app_waiting.store(0, Ordering::Relaxed);
            } else {
                self.block_until_arrival(waiting_since.elapsed(), left, engine_here, None);
            }
        }
    }

    /// Blocks on this port's doorbell until a record arrives, for at most `max` and at most
    /// what [`crate::Region::fence_before_sleep`] allows after `idle` without traffic.
    ///
    /// `engine_rings`: every record this port can receive comes from the node engine, which
    /// fences before it looks at the sleeping flag and rings (see `NodeEngine::step`), so no
    /// wake-up is lost and the sleep needs no short bound: the waiter sleeps up to
    /// [`crate::region::DEEP_SLEEP`] at once. A 1 ms bound is not free here: arming and cancelling
    /// a timer that is the CPU's next one reprograms the timer device, which doubled the cost of
    /// each rank <-> engine hand-over (`bench-peers/handover.c`: 2.6-2.8 µs without a timeout,
    /// 5.6-6.9 µs with 1 ms).
    ///
    /// `delivered_seen`: a co-processor-mode waiter's count of the engine thread's deliveries
    /// when it last looked; if it has moved by the time the bell is read, an event may be queued,
    /// so no sleep.
    ///
    /// The application and, in co-processor mode, the engine thread may both sleep on the
    /// doorbell: each has its bit in the port's sleeping word ([`crate::Region::sleeping`]), and
    /// a sender rings while any is set.
    fn block_until_arrival(
        &mut self,
        idle: Duration,
        max: Duration,
        engine_rings: bool,
        delivered_seen: Option<u32>,
    ) {
        let sh = self.shared.clone();
        let r = &sh.region;
        let p = sh.port;
        let bell = r.doorbell(p).load(Ordering::SeqCst);
        r.sleeping(p)
            .fetch_or(crate::region::SLEEPER_APP, Ordering::SeqCst);
        let nap = if engine_rings {
            crate::region::DEEP_SLEEP.min(max)
        } else {
            r.fence_before_sleep(idle).min(max)
        };
        let (pending, stuck) = {
            let mut g = self.lock();
            (g.port.has_pending(), !g.out.is_empty())
        };
        // Responses waiting for room in a full queue: the peer that drains it rings no bell
        // here, so look again soon.
        let nap = if stuck {
            nap.min(crate::region::MAX_SLEEP)
        } else {
            nap
        };
        let delivered = delivered_seen.is_some_and(|d| sh.delivered.load(Ordering::SeqCst) != d);
        if !pending && !delivered {
            r.count(p, slot::SLEEPS, 1);
            crate::sys::futex_wait(r.doorbell(p), bell, nap);
        }
        r.sleeping(p)
            .fetch_and(!crate::region::SLEEPER_APP, Ordering::SeqCst);
    }

    /// Counters of this rank's port.
    pub fn stats(&self) -> PortStats {
        self.shared.region.stats(self.shared.port)
    }

    /// Counters of every port on the node.
    pub fn node_stats(&self) -> Vec<PortStats> {
        (0..self.shared.region.layout.ports)
            .map(|p| self.shared.region.stats(p))
            .collect()
    }

    /// Large sends still waiting for the receiver to copy them.
    pub fn large_in_flight(&mut self) -> usize {
        self.lock().large.len()
    }

    /// Test hook: enqueue a raw, possibly forged, record body to local rank `dst_rank`.
    pub fn send_raw_record(&mut self, dst_rank: u32, body: &[u8]) -> Result<(), QkError> {
        let dst = self
            .shared
            .region
            .port_of_rank(dst_rank)
            .ok_or(QkError::NoSuchRank {
                rank: dst_rank,
                world: self.world_size(),
            })?;
        let start = Instant::now();
        while !self.lock().port.try_send_raw(dst, body) {
            backoff(start);
        }
        Ok(())
    }
}

impl Endpoint {
    /// Test support: starts the co-processor engine thread (if the mode has one) and stops it for
    /// good, as a thread that never gets its core would be: from then on only the application's
    /// own calls make progress.
    #[cfg(test)]
    fn stop_engine_thread(&mut self) {
        self.start_engine().expect("engine thread");
        self.stop_coproc();
    }

    /// Stops the co-processor engine thread, if one runs, and waits for it to end.
    fn stop_coproc(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let r = &self.shared.region;
        r.doorbell(self.shared.port).fetch_add(1, Ordering::SeqCst);
        crate::sys::futex_wake(r.doorbell(self.shared.port));
        if let Some(h) = self
            .coproc
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = h.join();
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop_coproc();
    }
}

fn region_map_arc(region: &Region) -> Arc<crate::sys::Mapping> {
    region.map_arc()
}

fn current_cpu() -> Option<usize> {
    // /proc/self/stat field 39 is the CPU the thread last ran on.
    let s = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    let after = s.rsplit_once(')')?.1;
    after.split_whitespace().nth(36)?.parse().ok()
}

/// Whether a waiter pauses after the `look`th look of its spin (1 = the first). In the inline modes
/// the first [`UNPAUSED_LOOKS`] looks go without a pause: when the cores are close the answer comes
/// within them, and a pause would only delay seeing it. Past them the spin pauses between looks,
/// so a far waiter does not pull at the line its sender is about to write. A co-processor-mode
/// waiter always pauses (each of its looks takes the endpoint's lock, which the engine needs).
#[inline(always)]
fn spin_pauses(look: u32, coproc: bool) -> bool {
    coproc || look > UNPAUSED_LOOKS
}

/// Spin briefly, then yield, then sleep a little: used while a queue is full.
fn backoff(start: Instant) {
    let el = start.elapsed();
    if el < Duration::from_micros(20) {
        std::hint::spin_loop();
    } else if el < SPIN_BEFORE_BLOCK * 4 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// `Shared::app_waiting`: the application sleeps on `Shared::delivered` (woken by the
/// co-processor thread after a delivery).
const APP_ON_DELIVERED: u32 = 1;
/// `Shared::app_waiting`: the application sleeps on its port's doorbell (the node engine shares
/// its CPU and rings it; the co-processor thread rings it too after a delivery).
const APP_ON_DOORBELL: u32 = 2;

/// The co-processor engine: progress continuously while there is traffic; after
/// [`SPIN_BEFORE_BLOCK`] without any, block on the port's doorbell until a sender rings it.
fn coproc_loop(sh: &Shared) {
    let Some(inner) = &sh.inner else {
        return;
    };
    let r = &sh.region;
    let p = sh.port;
    let mut last = Instant::now();
    while !sh.stop.load(Ordering::Relaxed) {
        let n = {
            let mut g = inner.lock().unwrap_or_else(|e| e.into_inner());
            g.progress(256)
        };
        if n > 0 {
            last = Instant::now();
            sh.delivered.fetch_add(1, Ordering::SeqCst);
            match sh.app_waiting.load(Ordering::SeqCst) {
                APP_ON_DELIVERED => crate::sys::futex_wake(&sh.delivered),
                APP_ON_DOORBELL => r.ring_doorbell(p),
                _ => {}
            }
            continue;
        }
        if last.elapsed() < SPIN_BEFORE_BLOCK {
            std::hint::spin_loop();
            continue;
        }
        let bell = r.doorbell(p).load(Ordering::SeqCst);
        r.sleeping(p)
            .fetch_or(crate::region::SLEEPER_ENGINE_THREAD, Ordering::SeqCst);
        let nap = r.fence_before_sleep(last.elapsed());
        let pending = {
            let mut g = inner.lock().unwrap_or_else(|e| e.into_inner());
            g.port.has_pending() || !g.out.is_empty()
        };
        if !pending && !sh.stop.load(Ordering::SeqCst) {
            r.count(p, slot::SLEEPS, 1);
            crate::sys::futex_wait(r.doorbell(p), bell, nap);
        }
        r.sleeping(p)
            .fetch_and(!crate::region::SLEEPER_ENGINE_THREAD, Ordering::SeqCst);
        // `last` stays: a wake-up that brings work resets it in the loop (and the engine spins
        // again), one that brings nothing sends the engine straight back to sleep, so an idle
        // engine costs a wake-up per sleep and no spinning.
    }
}

/// Fabric header from a portals header (the job and destination are implied by the queue).
pub fn hdr_from_wire(h: &WireHeader) -> Hdr {
    let mut flags = 0;
    if h.flags & portals::flags::ACK_REQ != 0 {
        flags |= flag::ACK_REQ;
    }
    if h.flags & portals::flags::TRUNCATED != 0 {
        flags |= flag::TRUNCATED;
    }
    let (opc, aux) = match h.op {
        Op::Put => (op::PUT, h.return_offset),
        Op::Get => (op::GET, h.return_offset),
        Op::Reply => (op::REPLY, h.rlength),
        Op::Ack => (op::ACK, h.rlength),
    };
    Hdr {
        op: opc,
        flags,
        portal: h.portal.min(u16::MAX as u32) as u16,
        src: h.src.rank,
        match_bits: h.match_bits,
        offset: h.offset,
        length: h.length,
        return_md: h.return_md,
        aux,
        hdr_data: h.hdr_data,
    }
}

/// Portals header from a fabric header that arrived from `src` for `dst`.
pub fn wire_from_hdr(h: &Hdr, job: u32, dst: ProcessId) -> Option<WireHeader> {
    let mut w = EMPTY_WIRE;
    wire_from_hdr_into(h, job, dst, &mut w).then_some(w)
}

/// A header value to write over.
const EMPTY_WIRE: WireHeader = WireHeader {
    version: WIRE_VERSION,
    op: Op::Put,
    flags: 0,
    portal: 0,
    src: ProcessId::new(0, 0),
    dst: ProcessId::new(0, 0),
    match_bits: 0,
    offset: 0,
    length: 0,
    rlength: 0,
    return_md: portals::NO_MD,
    return_offset: 0,
    hdr_data: 0,
};

/// [`wire_from_hdr`] into `out`, field by field (false, `out` unspecified, for an op that is not
/// a portals operation). The delivery path keeps one header and fills it for every record: a
/// header built and then moved whole was read back with wide loads from its narrow stores.
#[inline(always)]
pub fn wire_from_hdr_into(h: &Hdr, job: u32, dst: ProcessId, out: &mut WireHeader) -> bool {
    // A put (nearly every record) is tested first with a plain compare: as one arm of the match
    // it went through a jump table, an indirect branch on every message.
    let (opv, rlength, return_offset) = if h.op == op::PUT {
        let inline8 = h.flags & flag::INLINE8 != 0;
        (Op::Put, h.length, if inline8 { 0 } else { h.aux })
    } else {
        match h.op {
            op::GET => (Op::Get, h.length, h.aux),
            op::REPLY => (Op::Reply, h.aux, 0),
            op::ACK => (Op::Ack, h.aux, 0),
            _ => return false,
        }
    };
    let mut flags = 0;
    if h.flags & flag::ACK_REQ != 0 {
        flags |= portals::flags::ACK_REQ;
    }
    if h.flags & flag::TRUNCATED != 0 {
        flags |= portals::flags::TRUNCATED;
    }
    out.version = WIRE_VERSION;
    out.op = opv;
    out.flags = flags;
    out.portal = h.portal as u32;
    out.src = ProcessId::new(job, h.src);
    out.dst = dst;
    out.match_bits = h.match_bits;
    out.offset = h.offset;
    out.length = h.length;
    out.rlength = rlength;
    out.return_md = h.return_md;
    out.return_offset = return_offset;
    out.hdr_data = if opv == Op::Reply { 0 } else { h.hdr_data };
    true
}

/// The portals form of a one-line put record `h` (op [`op::PUT`], flags exactly
/// [`flag::INLINE8`]), read in place, from world rank `src` of job `job` to `dst`: the
/// fields [`wire_from_hdr_into`] would write for it, but as a [`portals::PlainPut`], whose
/// `to_wire()` is that header (a test holds the two equal). Only the one-line put
/// is decoded this way: its flags carry no ack, truncation or large reference, so
/// the header is a plain put with `rlength == length` and no return offset.
///
/// `src` and `length` are the values the caller has already checked, passed in rather than
/// read again: the line lies in memory the sender can still write, so a second read of a
/// field could see another value than the one checked.
#[inline(always)]
pub fn plain_put_from_inline8(
    h: HdrRef<'_>,
    src: u32,
    length: u64,
    job: u32,
    dst: ProcessId,
) -> portals::PlainPut {
    debug_assert!(h.op() == op::PUT && h.flags() == flag::INLINE8);
    portals::PlainPut {
        portal: h.portal() as u32,
        src: ProcessId::new(job, src),
        dst,
        match_bits: h.match_bits(),
        offset: h.offset(),
        length,
        hdr_data: h.hdr_data(),
    }
}

/// Where the payload of a large message is: (flag bit, reference, token).
pub(crate) fn encode_ref(addr: u64, token: u64) -> Vec<u8> {
    ref_bytes(addr, token).to_vec()
}

/// Hashes a large send's token for [`TokenMap`]: one multiply. Tokens are this rank's own
/// sequence numbers (`Inner::next_token`), the only keys ever inserted, so they spread over the
/// table; a forged token in a FIN only looks one up. The std hasher (SipHash) cost two hashes per
/// large put, one at the send and one at its FIN.
#[derive(Default, Clone, Copy)]
struct TokenHasher(u64);

impl std::hash::Hasher for TokenHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: the high bits (hashbrown's control byte) and the low bits (its
        // bucket) both depend on every bit of the token.
        self.0 = (self.0.rotate_left(29) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The large sends waiting for their FIN, by token.
type TokenMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<TokenHasher>>;

/// [`encode_ref`] into an array (no allocation): what a large put's record carries after its
/// header.
fn ref_bytes(addr: u64, token: u64) -> [u8; LARGE_REF] {
    let mut b = [0u8; LARGE_REF];
    b[..8].copy_from_slice(&addr.to_le_bytes());
    b[8..].copy_from_slice(&token.to_le_bytes());
    b
}

pub(crate) fn decode_ref(b: &[u8]) -> Option<(u64, u64)> {
    if b.len() < LARGE_REF {
        return None;
    }
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    let mut t = [0u8; 8];
    t.copy_from_slice(&b[8..16]);
    Some((u64::from_le_bytes(a), u64::from_le_bytes(t)))
}

impl Inner {
    /// Sends `a` again when it is the put sent last ([`SendLine`]): true when it went, with its
    /// send event posted. False when it is another put, the queue is full, or the kept put no
    /// longer stands (its descriptor gone, memory freed: then it is dropped); the caller then
    /// takes the general path, which checks everything.
    #[inline(always)]
    fn put_again(&mut self, a: &PutArgs) -> bool {
        let Some(s) = self.send_line.as_ref().filter(|s| s.ticket.args() == a) else {
            return false;
        };
        self.port.prefetch_next(s.dst);
        let (mem, port) = (&self.mem, &mut self.port);
        let sent = self.engine.put_fast_again(
            &s.ticket,
            #[inline(always)]
            |_| match mem.read_word(&s.span) {
                Some(w) => match s.compact {
                    Some(cw) => port.try_send_compact(s.dst, cw, s.match_bits, w, s.span.len()),
                    None => port.try_send_line(s.dst, &s.head, w),
                }
                .then_some(())
                .ok_or(false),
                None => Err(true),
            },
        );
        match sent {
            Some(Ok(_)) => true,
            // The queue is full: the general path waits for room.
            Some(Err(false)) => false,
            // The descriptor is gone or memory was freed: the general path checks it all again.
            Some(Err(true)) | None => {
                self.send_line = None;
                false
            }
        }
    }

    /// Collects the bytes of a local body (for eager sends and replies).
    fn gather(&mut self, body: &portals::Body) -> Result<Vec<u8>, QkError> {
        let mut out = vec![0u8; body.len() as usize];
        let segs: Vec<portals::Segment> = self
            .engine
            .segments(body)
            .map_err(|e| QkError::Portals(e.to_string()))?
            .collect();
        for s in segs {
            let at = s.msg_offset as usize;
            if !self.mem.read(s.addr, &mut out[at..at + s.len as usize]) {
                return Err(QkError::Portals(format!(
                    "memory descriptor names {} bytes at {:#x}, which this rank does not own",
                    s.len, s.addr
                )));
            }
        }
        Ok(out)
    }

    /// Prepares a large payload to stay where it is: returns the reference body and the flag.
    /// A contiguous body in the job heap goes as is (single copy by the receiver); private memory
    /// goes by cross-memory attach or through a heap bounce buffer, per `private_path`.
    fn large_source(
        &mut self,
        hdr: Hdr,
        body: &portals::Body,
        plan: Option<SendPlan>,
        dst_rank: u32,
    ) -> Result<(Hdr, ([u8; LARGE_REF], u8)), QkError> {
        // Cross-memory attach only works on this node; the node engine reads the heap instead.
        let remote_ok_cma = self.region.port_of_rank(dst_rank).is_some();
        let token = self.next_token;
        self.next_token += 1;
        let first = body.first();
        let map_base = self.region.map().ptr() as u64;
        let (at, kind, bounce, share) =
            if body.is_contiguous() && self.mem.in_heap(first.addr, first.len) {
                let src = first.addr - map_base;
                let share = self.shareable(dst_rank, src, first.len);
                (src, flag::HEAP, None, share)
            } else if body.is_contiguous()
                && remote_ok_cma
                && self.private_path == PrivatePath::CrossMemoryAttach
                && self.mem.owns(first.addr, first.len)
            {
                let share = self
                    .shareable(dst_rank, first.addr, first.len)
                    .map(|s| ShareableSend { private: true, ..s });
                (first.addr, flag::CMA, None, share)
            } else {
                let bounce = self.bounce(body)?;
                let at = bounce.addr - map_base;
                let share = self.shareable(dst_rank, at, bounce.len);
                (at, flag::HEAP, Some(bounce), share)
            };
        self.large.insert(
            token,
            LargeSend {
                plan,
                bounce,
                share,
            },
        );
        Ok((hdr, (ref_bytes(at, token), kind)))
    }

    /// Copies `body` into a heap bounce buffer of its length (one `memcpy` when it is one run,
    /// gathered otherwise). Nothing stays allocated when it fails: the heap is full, or the
    /// bytes are not this rank's to read.
    fn bounce(&mut self, body: &portals::Body) -> Result<Buf, QkError> {
        let len = body.len();
        let off = self.heap.alloc(len).ok_or(QkError::HeapExhausted {
            want: len,
            free: self.heap.free_bytes(),
        })?;
        let (hb, _) = self.mem.heap_range();
        let bounce = Buf {
            addr: hb + off,
            len,
            shared: true,
        };
        let copied = if body.is_contiguous() {
            // One memcpy from the private buffer straight into the bounce buffer.
            let first = body.first();
            let map_base = self.region.map().ptr() as u64;
            let dst = self
                .region
                .map()
                .slice_mut((bounce.addr - map_base) as usize, len as usize);
            if self.mem.read(first.addr, dst) {
                Ok(())
            } else {
                Err(QkError::Portals(format!(
                    "memory descriptor names {} bytes at {:#x}, which this rank does not own",
                    first.len, first.addr
                )))
            }
        } else {
            self.gather(body)
                .map(|data| self.mem.write(bounce.addr, &data))
                .map(|_| ())
        };
        if let Err(e) = copied {
            self.heap.free(off, len);
            return Err(e);
        }
        Ok(bounce)
    }

    /// A heap send of `len` bytes at region offset `src` to world rank `dst_rank`: shareable
    /// when the receiver is another rank of this node and the message is long enough; then its
    /// port is watched ([`Inner::help_receivers`]) until the FIN.
    fn shareable(&mut self, dst_rank: u32, src: u64, len: u64) -> Option<ShareableSend> {
        let port = self.region.port_of_rank(dst_rank)?;
        if port == self.port.me() || len < copy_share::SHARE_MIN {
            return None;
        }
        match self.share_ports.iter_mut().find(|p| p.port == port) {
            Some(p) => p.sends += 1,
            None => self.share_ports.push(SharePort {
                port,
                sends: 1,
                block: self.region.port_block(port),
            }),
        }
        Some(ShareableSend {
            port,
            src,
            len,
            private: false,
        })
    }

    /// Takes chunks of the copies that receivers of this rank's large sends opened on their
    /// boards ([`copy_share::Board::help`]): only a copy whose token names one of those sends,
    /// reading inside that send's bytes and writing inside the receiver's heap part.
    #[inline(never)]
    fn help_receivers(&mut self) {
        let map = self.region.map();
        let heap_per_rank = self.region.layout.heap_per_rank;
        let me = self.port.me();
        for p in &self.share_ports {
            let owner_heap = self.region.layout.heap(p.port);
            let (large, mem) = (&self.large, &self.mem);
            let private = std::cell::Cell::new(false);
            p.block.board().help(
                copy_share::End::of(me, p.port),
                |c| {
                    let Some(s) = large.get(&c.token).and_then(|l| l.share) else {
                        return false;
                    };
                    private.set(s.private);
                    s.port == p.port
                        && range_within(c.src, c.len, s.src, s.len)
                        && range_within(c.dst, c.len, owner_heap, heap_per_rank)
                        && (!s.private || mem.owns(c.src, c.len))
                },
                |c, at, n| {
                    let (src, dst, n) = ((c.src + at) as usize, (c.dst + at) as usize, n as usize);
                    if private.get() {
                        // Our own private bytes (the send's, found owned above; nothing is
                        // freed while this runs) into the receiver's heap part.
                        let owned = mem.read(src as u64, map.slice_mut(dst, n));
                        debug_assert!(owned, "a shared private source was freed");
                    } else {
                        map.copy_within(src, dst, n);
                    }
                },
            );
        }
    }

    fn flush(&mut self) {
        while let Some(p) = self.out.front() {
            if let Some(body) = p.reply_from {
                if !self.make_large_reply(p.dst_rank, p.hdr, &body) {
                    break;
                }
                continue;
            }
            if !self.port.send_to_rank(p.dst_rank, &p.hdr, &p.body) {
                break;
            }
            self.out.pop_front();
        }
    }

    /// Makes the large get reply at the front of [`Inner::out`] (header `hdr`, bytes `body` in
    /// this rank's descriptor, to `dst_rank`) into a reference, as a large put's: one run of
    /// the job heap as it is, private memory by cross-memory attach to a rank of this node (per
    /// the private path), anything else (several blocks, private memory for another node)
    /// gathered into a heap bounce buffer. The reference carries a token, so the initiator's FIN
    /// frees the bounce buffer, and a receiver on this node may share the copy. False when the
    /// reply must wait: the heap has no room for its bounce buffer yet, while bounced sends of
    /// ours are in flight whose FINs will free some. A reply that can never be made is dropped
    /// and counted (its bytes are not this rank's to read, or the heap is full with nothing in
    /// flight).
    #[inline(never)]
    fn make_large_reply(&mut self, dst_rank: u32, hdr: Hdr, body: &portals::Body) -> bool {
        let made = match self.large_source(hdr, body, None, dst_rank) {
            Ok((mut hdr, (r, f))) => {
                hdr.flags |= f;
                Some((hdr, r))
            }
            Err(QkError::HeapExhausted { .. }) => {
                if self.large.values().any(|l| l.bounce.is_some()) {
                    return false;
                }
                self.region
                    .count_drop(self.port.me(), DropReason::NoHeapRoom);
                None
            }
            Err(_) => {
                self.region
                    .count_drop(self.port.me(), DropReason::BadMemory);
                None
            }
        };
        match (made, self.out.front_mut()) {
            (Some((hdr, r)), Some(p)) => {
                p.hdr = hdr;
                p.body = r.to_vec();
                p.reply_from = None;
            }
            _ => {
                self.out.pop_front();
            }
        }
        true
    }

    fn progress(&mut self, budget: usize) -> usize {
        self.progress_with::<false>(budget, EqHandle::NONE, None).0
    }

    /// A progress pass for a caller waiting on `eq`, then its next event into `out`: stops when
    /// the source that gave records runs dry ([`Port::poll_run`]), and when the first event the
    /// pass produces is a fast-path put's for `eq` with nothing older on it, that event goes
    /// straight into `out` ([`portals::Engine::deliver_put_fast_taking`]) instead of through
    /// its queue slot. `Ok(true)`: an event was written to `out`.
    ///
    /// Called after `eq_get_into(eq)` found the queue live, with nothing lost and nothing queued:
    /// a pass that handled no record changed none of that (only records post events), so the
    /// queue is not looked at again then (a spinning waiter makes one such pass per look).
    fn progress_into(&mut self, eq: EqHandle, out: &mut Event) -> Result<bool, portals::Error> {
        let (handled, taken) = self.progress_with::<true>(256, eq, Some(out));
        if taken {
            return Ok(true);
        }
        if handled == 0 {
            return Ok(false);
        }
        self.engine.eq_get_into(eq, out)
    }

    /// One progress pass: (records handled, whether an event was taken into `ev` for `want`).
    #[inline(always)]
    fn progress_with<const RUN: bool>(
        &mut self,
        budget: usize,
        want: EqHandle,
        ev: Option<&mut Event>,
    ) -> (usize, bool) {
        if !self.out.is_empty() {
            self.flush();
        }
        if !self.share_ports.is_empty() {
            self.help_receivers();
        }
        // Records are handled inside the poll callback: an eager payload is copied straight from
        // the queue into the descriptor.
        let Inner {
            port,
            region,
            me,
            engine,
            mem,
            out,
            large,
            share_ports,
            heap,
            plan,
            wire,
            scratch,
            ..
        } = self;
        let me_port = port.me();
        let mut ctx = Ctx {
            me_port,
            region,
            me: *me,
            engine,
            mem,
            out,
            large,
            share_ports,
            heap,
            plan,
            wire,
            want,
            ev: ev.unwrap_or(scratch),
            taken: false,
            delivered: 0,
            delivered_bytes: 0,
        };
        let handled = if RUN {
            port.poll_run(budget, |m| ctx.handle(m))
        } else {
            port.poll(budget, |m| ctx.handle(m))
        };
        if ctx.delivered > 0 {
            port.bump(slot::DELIVERED, ctx.delivered);
            port.bump(slot::DELIVERED_BYTES, ctx.delivered_bytes);
        }
        let taken = ctx.taken;
        if !self.out.is_empty() {
            self.flush();
        }
        (handled, taken)
    }
}

/// The pieces of [`Inner`] the delivery path needs while the port is borrowed by the poll.
struct Ctx<'a> {
    me_port: u32,
    region: &'a Region,
    me: ProcessId,
    engine: &'a mut PortalsEngine,
    mem: &'a mut OwnedMemory,
    out: &'a mut VecDeque<Pending>,
    large: &'a mut TokenMap<LargeSend>,
    share_ports: &'a mut Vec<SharePort>,
    heap: &'a mut HeapAlloc,
    plan: &'a mut portals::DeliveryPlan,
    wire: &'a mut WireHeader,
    /// The event queue a waiter waits on ([`EqHandle::NONE`]: none, or its event was taken).
    want: EqHandle,
    /// Where that waiter's event goes when the fast path can hand it over directly.
    ev: &'a mut Event,
    /// An event was written to `ev` (the waiter's first).
    taken: bool,
    /// Deliveries (and their bytes) of this poll on the eager path, added to the port's shared
    /// counters once when the poll ends rather than twice per message.
    delivered: u64,
    delivered_bytes: u64,
}

impl Ctx<'_> {
    fn drop_msg(&self, r: DropReason) {
        self.region.count_drop(self.me_port(), r);
    }

    fn me_port(&self) -> u32 {
        self.me_port
    }

    /// Portals' fast put delivery of the header in `self.wire`, handing its event straight to a
    /// waiter when it can (see [`Inner::progress_into`]). True when it delivered (`to` is then the
    /// payload's range).
    #[inline(always)]
    fn deliver_put_fast(&mut self, to: &mut PRegion) -> bool {
        let r = self
            .engine
            .deliver_put_fast_taking(self.wire, to, self.want, self.ev);
        self.note_fast_delivery(r)
    }

    /// Books a fast delivery's outcome (`None`: declined; `Some(true)`: the waiter took its
    /// event, so it wants no other). True when it delivered.
    #[inline(always)]
    fn note_fast_delivery(&mut self, r: Option<bool>) -> bool {
        match r {
            Some(taken) => {
                if taken {
                    self.taken = true;
                    self.want = EqHandle::NONE;
                }
                true
            }
            None => false,
        }
    }

    /// [`Ctx::deliver_put_fast`] for a put already in its plain form.
    #[inline(always)]
    fn deliver_plain_put_fast(&mut self, p: portals::PlainPut, to: &mut PRegion) -> bool {
        let r = self
            .engine
            .deliver_plain_put_fast_taking(p, to, self.want, self.ev);
        self.note_fast_delivery(r)
    }

    /// Validates and delivers one record.
    fn handle(&mut self, m: Incoming<'_>) {
        // The header is read where it lies in the queue's line, each field when it is needed:
        // the one-line put below reads each of its fields once, with no copy of the header made
        // first.
        let v = match m.head {
            Head::Line(v) => v,
            Head::Compact(c) => return self.handle_compact(c, m),
        };
        let src = v.src();
        // 1. The source must be the process that owns the queue it came on.
        let expected = self.region.ranks.get(m.from as usize).copied();
        match expected {
            Some(r) if r == src => {}
            Some(_) => return self.drop_msg(DropReason::ForgedSource),
            None => {
                // From the node engine: must be a rank of this job on another node.
                if src >= self.region.world || self.region.port_of_rank(src).is_some() {
                    return self.drop_msg(DropReason::ForgedSource);
                }
            }
        }
        // The one-line put (op PUT, flags exactly INLINE8: at most 8 bytes in `aux`, no ack, no
        // large reference), i.e. nearly every small message: one compare of op and flags stands
        // for the structure checks below, which such a record passes when its length is at
        // most 8. If portals declines the fast delivery the general path below handles it.
        if v.op() == op::PUT && v.flags() == flag::INLINE8 {
            let length = v.length();
            if length > 8 {
                return self.drop_msg(DropReason::Malformed);
            }
            // Decoded once, straight into the portals form of a plain put (no `WireHeader` built
            // and read back); portals makes the rest of the header's checks.
            let word = v.aux().to_le_bytes();
            let p = plain_put_from_inline8(v, src, length, self.region.job, self.me);
            if self.deliver_word_put(p, word) {
                return;
            }
        }
        // Every other record: the header copied out once, then read field by field. The source
        // is the value checked above, not a second read of the line (which the sender can still
        // write): a rank must not pass the check as itself and deliver as another.
        let mut hdr = v.decode();
        hdr.src = src;
        self.handle_hdr(&hdr, m)
    }

    /// A compact put ([`crate::fabric::COMPACT_LEN`]): its source is the rank that owns the ring
    /// it came on and its structure was checked when it was read ([`CompactPut::read`]), so it
    /// goes straight to the one-line put's fast delivery; if portals declines, the general path
    /// takes the header of its one-line form.
    #[inline(always)]
    fn handle_compact(&mut self, c: CompactPut, m: Incoming<'_>) {
        let p = portals::PlainPut {
            portal: u32::from(c.portal),
            src: ProcessId::new(self.region.job, c.src),
            dst: self.me,
            match_bits: c.match_bits,
            offset: 0,
            length: c.length,
            hdr_data: 0,
        };
        if self.deliver_word_put(p, c.payload.to_le_bytes()) {
            return;
        }
        self.handle_hdr(&c.hdr(), m)
    }

    /// The fast delivery of a put of at most 8 bytes whose payload is `word` (the one-line and
    /// the compact form): `false` when portals declines it untouched (the general path decides).
    #[inline(always)]
    fn deliver_word_put(&mut self, p: portals::PlainPut, word: [u8; 8]) -> bool {
        let length = p.length;
        let mut to = PRegion::EMPTY;
        if !self.deliver_plain_put_fast(p, &mut to) {
            return false;
        }
        let n = to.len as usize;
        if n > length as usize || !self.mem.write_word_prefix(to.addr, word, n) {
            self.drop_msg(DropReason::BadMemory);
        }
        self.delivered += 1;
        self.delivered_bytes += to.len;
        true
    }

    /// The general path of a record whose source is checked: structure, references, portals,
    /// then the bytes.
    fn handle_hdr(&mut self, h: &Hdr, m: Incoming<'_>) {
        // 2. Structure.
        if h.flags & !flag::KNOWN != 0 || (h.flags & flag::HEAP != 0 && h.flags & flag::CMA != 0) {
            return self.drop_msg(DropReason::Malformed);
        }
        let large = h.flags & (flag::HEAP | flag::CMA) != 0;
        if large && !matches!(h.op, op::PUT | op::REPLY) {
            return self.drop_msg(DropReason::Malformed);
        }
        if h.op == op::FIN {
            return self.fin(h);
        }
        let inline_len = h.inline_len();
        if inline_len > m.body.len() as u64 || inline_len > self.region.eager_max as u64 {
            return self.drop_msg(DropReason::Malformed);
        }
        let tiny = h.flags & flag::INLINE8 != 0;
        if tiny && (h.op != op::PUT || large || h.length > 8 || h.flags & flag::ACK_REQ != 0) {
            return self.drop_msg(DropReason::Malformed);
        }
        let word = h.aux.to_le_bytes();
        let body: &[u8] = if tiny {
            &word[..h.length as usize]
        } else {
            m.body
        };
        let lref = if large {
            match decode_ref(m.body) {
                Some(r) => Some(r),
                None => return self.drop_msg(DropReason::Malformed),
            }
        } else {
            None
        };
        // 3. Large references must point into the sender's own part of the heap.
        if let (Some((addr, _)), true) = (lref, h.flags & flag::HEAP != 0) {
            // The part of the queue's owner: a local rank's own part, or the node engine's staging part.
            let base = self.region.layout.heap(m.from);
            if !range_within(addr, h.length, base, self.region.layout.heap_per_rank) {
                return self.drop_msg(DropReason::BadReference);
            }
        }
        if !wire_from_hdr_into(h, self.region.job, self.me, self.wire) {
            return self.drop_msg(DropReason::Malformed);
        }
        // 4a. The common small put (no ack, no large reference, a match entry that stays linked,
        // a single sender-managed block): portals delivers it without writing a plan, with the
        // general path's checks, counters and event (a property test in portals holds the two
        // paths to the same effects), or declines having touched nothing.
        if lref.is_none() {
            let mut to = PRegion::EMPTY;
            if self.deliver_put_fast(&mut to) {
                let n = to.len as usize;
                if n > body.len() || !self.mem.write(to.addr, &body[..n]) {
                    self.drop_msg(DropReason::BadMemory);
                }
                self.delivered += 1;
                self.delivered_bytes += to.len;
                return;
            }
        }
        let w = &*self.wire;
        // 4. Portals: access control, matching, placement, events.
        if let Err(d) = self.engine.deliver_into_no_event(w, self.plan) {
            self.drop_msg(DropReason::from(d.reason));
            if let Some((_, token)) = lref {
                self.send_fin(h, token, 0);
            }
            return;
        }
        // The plan was just written field by field: read back what is needed field by field too
        // (copying its body out whole read those stores back with wider loads, a store-forwarding
        // stall on every message).
        let (pop, header_at, mlength) = {
            let p = &*self.plan;
            (p.op, p.header_at, p.mlength)
        };
        // 5. Move the bytes.
        if let Some(at) = header_at {
            if !self.mem.write(at, &w.encode()) {
                self.drop_msg(DropReason::BadMemory);
            }
        }
        match pop {
            Op::Put | Op::Reply if lref.is_none() && self.plan.body.is_contiguous() => {
                let (addr, n) = {
                    let b = &self.plan.body;
                    (b.first_addr(), b.first_len() as usize)
                };
                if n > body.len() || !self.mem.write(addr, &body[..n]) {
                    self.drop_msg(DropReason::BadMemory);
                }
                self.delivered += 1;
                self.delivered_bytes += mlength;
            }
            Op::Put | Op::Reply => {
                let pbody = self.plan.body;
                if !self.deposit_segments(h, m.from, body, lref, &pbody, mlength) {
                    return;
                }
            }
            Op::Get | Op::Ack => {
                self.delivered += 1;
            }
        }
        // 6. Respond (the response header is copied out of the plan only when there is one).
        match self.plan.response {
            Response::None => {}
            Response::Ack(a) => {
                let hdr = hdr_from_wire(&a);
                self.out.push_back(Pending::record(h.src, hdr, Vec::new()));
            }
            Response::Reply(r) => {
                let pbody = self.plan.body;
                self.reply(h, r, &pbody)
            }
        }
    }

    /// Deposits a body that is not one eager run into one region: several segments, or a large
    /// message copied from the sender's heap part or by cross-memory attach (kept out of the
    /// small-message path so that stays short). False when the descriptor is gone (dropped and
    /// counted; no response follows).
    #[inline(never)]
    fn deposit_segments(
        &mut self,
        h: &Hdr,
        from: u32,
        body: &[u8],
        lref: Option<(u64, u64)>,
        pbody: &portals::Body,
        mlength: u64,
    ) -> bool {
        let me_port = self.me_port();
        let shared = match lref {
            Some((src, token)) => {
                let cma = h.flags & flag::CMA != 0;
                self.copy_shared(from, src, cma, token, pbody, mlength)
            }
            None => None,
        };
        let ok = match shared {
            Some(good) => good,
            None => match self.copy_segments(h, from, body, lref, pbody) {
                Some(ok) => ok,
                None => {
                    self.drop_msg(DropReason::BadMemory);
                    return false;
                }
            },
        };
        if !ok {
            self.drop_msg(DropReason::BadMemory);
        }
        if let Some((_, token)) = lref {
            let counter = if h.flags & flag::HEAP != 0 {
                slot::LARGE_DIRECT
            } else {
                slot::LARGE_CMA
            };
            self.region.count(me_port, counter, 1);
            self.send_fin(h, token, mlength);
        }
        self.region.count(me_port, slot::DELIVERED, 1);
        self.region.count(me_port, slot::DELIVERED_BYTES, mlength);
        true
    }

    /// Copies a body segment by segment (from the queue, the sender's heap part or by cross-memory
    /// attach): whether every segment landed; `None` when the descriptor is gone.
    fn copy_segments(
        &mut self,
        h: &Hdr,
        from: u32,
        body: &[u8],
        lref: Option<(u64, u64)>,
        pbody: &portals::Body,
    ) -> Option<bool> {
        // The segments are walked as the engine yields them (no list of them collected per
        // message): the loop only reads the engine's tables and writes this rank's memory.
        let segs = self.engine.segments(pbody).ok()?;
        let mut ok = true;
        for s in segs {
            let good = match lref {
                None => {
                    let a = s.msg_offset as usize;
                    let b = a + s.len as usize;
                    b <= body.len() && self.mem.write(s.addr, &body[a..b])
                }
                Some((src, _)) if h.flags & flag::HEAP != 0 => {
                    let src = self
                        .region
                        .map()
                        .slice((src + s.msg_offset) as usize, s.len as usize);
                    self.mem.write(s.addr, src)
                }
                Some((src, _)) => {
                    let pid = self.region.pid(from) as i32;
                    self.mem
                        .cma_into(s.addr, s.len, pid, src + s.msg_offset)
                        .is_ok()
                }
            };
            ok &= good;
        }
        Some(ok)
    }

    /// Copies a large message with the sender's help ([`crate::copy_share`]) when it can be
    /// shared: a send with a token from another rank of this node, long enough, into one run of
    /// this rank's own heap part. `src` is an offset into the sender's heap part (checked against
    /// it), or with `cma` an address in the sender's process, which this rank's chunks read with
    /// cross-memory attach. `None` (nothing copied) when it cannot be shared; else whether every
    /// chunk of ours was read.
    fn copy_shared(
        &mut self,
        from: u32,
        src: u64,
        cma: bool,
        token: u64,
        pbody: &portals::Body,
        mlength: u64,
    ) -> Option<bool> {
        let first = pbody.first();
        if token == 0
            || mlength < copy_share::SHARE_MIN
            || from == self.me_port
            || from >= self.region.layout.local
            || !pbody.is_contiguous()
            || first.len != mlength
            || !self.mem.in_heap(first.addr, first.len)
        {
            return None;
        }
        let map = self.region.map();
        let dst = first.addr - map.ptr() as u64;
        let c = copy_share::SharedCopy::new(src, dst, mlength, token);
        let block = self.region.port_block(self.me_port);
        let board = block.board();
        board.open(&c);
        let pid = self.region.pid(from);
        let mem = &*self.mem;
        let mut good = true;
        let helped = board.copy_as_owner(
            &c,
            copy_share::End::of(self.me_port, from),
            |at, n| {
                if cma {
                    good &= mem
                        .cma_into(first.addr + at, n, pid as i32, src + at)
                        .is_ok();
                } else {
                    map.copy_within((src + at) as usize, (dst + at) as usize, n as usize);
                }
            },
            || crate::sys::process_exists(pid),
        );
        if helped > 0 {
            self.region.count(self.me_port, slot::LARGE_SHARED, 1);
        }
        Some(good)
    }

    /// Sends the reply to a get (eager from the descriptor, or a reference for a large one).
    #[inline(never)]
    fn reply(&mut self, h: &Hdr, r: WireHeader, pbody: &portals::Body) {
        let hdr = hdr_from_wire(&r);
        let len = pbody.len();
        if len <= self.region.eager_max as u64 {
            let mut data = vec![0u8; len as usize];
            let segs: Vec<portals::Segment> = match self.engine.segments(pbody) {
                Ok(s) => s.collect(),
                Err(_) => return self.drop_msg(DropReason::BadMemory),
            };
            for s in segs {
                let a = s.msg_offset as usize;
                if !self.mem.read(s.addr, &mut data[a..a + s.len as usize]) {
                    return self.drop_msg(DropReason::BadMemory);
                }
            }
            self.out.push_back(Pending::record(h.src, hdr, data));
        } else {
            // Made into a reference when the queue is flushed, after this pass's records
            // ([`Inner::make_large_reply`]): that needs the rank's heap and tokens, which the
            // delivery path does not hold.
            self.out.push_back(Pending {
                dst_rank: h.src,
                hdr,
                body: Vec::new(),
                reply_from: Some(*pbody),
            });
        }
    }

    fn send_fin(&mut self, h: &Hdr, token: u64, copied: u64) {
        if token == 0 {
            return;
        }
        let fin = Hdr {
            op: op::FIN,
            src: self.me.rank,
            return_md: h.return_md,
            aux: token,
            length: copied,
            ..Hdr::default()
        };
        self.out.push_back(Pending::record(h.src, fin, Vec::new()));
    }

    fn fin(&mut self, h: &Hdr) {
        let Some(ls) = self.large.remove(&h.aux) else {
            return self.drop_msg(DropReason::UnknownToken);
        };
        if let Some(plan) = ls.plan {
            let _ = self.engine.sent(&plan);
        }
        if let Some(b) = ls.bounce {
            let (base, _) = self.mem.heap_range();
            self.heap.free(b.addr - base, b.len);
        }
        if let Some(s) = ls.share {
            if let Some(i) = self.share_ports.iter().position(|p| p.port == s.port) {
                self.share_ports[i].sends -= 1;
                if self.share_ports[i].sends == 0 {
                    self.share_ports.swap_remove(i);
                }
            }
        }
    }
}

/// Whether `[off, off + len)` lies inside `[base, base + size)`.
fn range_within(off: u64, len: u64, base: u64, size: u64) -> bool {
    off >= base
        && off
            .checked_add(len)
            .is_some_and(|e| base.checked_add(size).is_some_and(|b| e <= b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{JobFabricSpec, NodeFabric};
    use portals::{Acl, EventKind, MatchSpec, MdKind, MdOptions, MdSpec, OffsetMode};

    #[test]
    fn large_send_tokens_spread_over_the_buckets_and_control_bytes_of_their_map() {
        use std::hash::BuildHasher;
        let b = std::hash::BuildHasherDefault::<TokenHasher>::default();
        // Tokens are handed out in sequence: 4096 of them must fall in 4096 different buckets of
        // a 4096-bucket table (hashbrown takes the low bits) ...
        let low: std::collections::HashSet<u64> =
            (1..=4096u64).map(|t| b.hash_one(t) & 4095).collect();
        assert_eq!(low.len(), 4096);
        // ... and use (nearly) all 128 values of the 7 top bits it keeps per entry to tell keys
        // of one group apart.
        let top: std::collections::HashSet<u64> =
            (1..=4096u64).map(|t| b.hash_one(t) >> 57).collect();
        assert!(top.len() >= 120, "{} control values", top.len());
        // The map finds each token once and no other.
        let mut m = TokenMap::default();
        for t in 1..=1000u64 {
            m.insert(t, t * 3);
        }
        assert_eq!(m.remove(&500), Some(1500));
        assert_eq!(m.remove(&500), None);
        assert_eq!(m.get(&1001), None);
        assert_eq!(m.len(), 999);
    }

    #[test]
    fn a_waiter_looks_without_pausing_only_for_its_first_looks_and_only_in_the_inline_modes() {
        for look in 1..=UNPAUSED_LOOKS {
            assert!(!spin_pauses(look, false), "inline look {look} paused");
            assert!(
                spin_pauses(look, true),
                "co-processor look {look} did not pause"
            );
        }
        for look in UNPAUSED_LOOKS + 1..UNPAUSED_LOOKS + 1000 {
            assert!(spin_pauses(look, false), "inline look {look} did not pause");
            assert!(
                spin_pauses(look, true),
                "co-processor look {look} did not pause"
            );
        }
    }

    /// Two endpoints of one job in this process (inline progress), rank 1 receiving on portal 1.
    type Pair = (
        NodeFabric,
        Endpoint,
        Endpoint,
        EqHandle,
        portals::MdHandle,
        Buf,
        Buf,
    );

    fn pair() -> Pair {
        pair_with(256, 1 << 20)
    }

    fn pair_with(len: u64, heap: u64) -> Pair {
        pair_in(CpuMode::Heater, len, heap)
    }

    /// Two ranks of job 41 on one node in `mode`: rank 0 sends from a heap buffer of `len` bytes
    /// through descriptor `smd`, rank 1 takes any put on portal 1 into a heap buffer of `len`
    /// bytes and posts its events to `eq`.
    fn pair_in(mode: CpuMode, len: u64, heap: u64) -> Pair {
        let mut spec = JobFabricSpec::new(41, 2, vec![0, 1], mode);
        spec.queue_bytes = 64 << 10;
        spec.heap_bytes_per_rank = heap;
        spec.lock_memory = false;
        let fab = NodeFabric::create(&spec).expect("fabric");
        let attach = |port| {
            Endpoint::attach(
                fab.dup_fd().expect("fd"),
                &AttachSpec {
                    lock_memory: false,
                    ..AttachSpec::new(41, port, mode)
                },
            )
            .expect("attach")
        };
        let (mut tx, mut rx) = (attach(0), attach(1));
        let sbuf = tx.alloc_shared(len).expect("send buffer");
        let rbuf = rx.alloc_shared(len).expect("receive buffer");
        let eq = rx.with_engine(|e| {
            let eq = e.eq_alloc(64).expect("eq");
            let md = e
                .md_create(&MdSpec {
                    kind: MdKind::Single {
                        region: rbuf.region(),
                        offset: OffsetMode::Sender,
                    },
                    options: MdOptions::PUT,
                    eq: Some(eq),
                })
                .expect("md");
            e.portal_set_acl(1, Acl::job(41)).expect("acl");
            e.portal_enable(1).expect("enable");
            e.me_append(1, MatchSpec::any(), md).expect("me");
            eq
        });
        let smd = tx.with_engine(|e| {
            e.md_create(&MdSpec {
                kind: MdKind::Single {
                    region: sbuf.region(),
                    offset: OffsetMode::Sender,
                },
                options: MdOptions::PUT,
                eq: None,
            })
            .expect("send md")
        });
        (fab, tx, rx, eq, smd, sbuf, rbuf)
    }

    #[test]
    fn a_co_processor_waiter_makes_progress_itself_when_its_engine_thread_cannot_run() {
        let (_fab, mut tx, mut rx, eq, smd, sbuf, rbuf) = pair_in(CpuMode::MsgCoproc, 256, 1 << 20);
        // The receiver's engine thread no longer runs, as on a node whose every core is taken
        // by a rank; the sender's still does.
        rx.stop_engine_thread();
        let to_rank1 = |bits: u64, length: u64| PutArgs {
            md: smd,
            local_offset: 0,
            length,
            target: ProcessId::new(41, 1),
            portal: 1,
            match_bits: bits,
            remote_offset: 0,
            ack: false,
            hdr_data: 0,
        };
        for i in 0..200u64 {
            let len = i % 17;
            let pattern: Vec<u8> = (0..16).map(|k| (i as u8).wrapping_mul(31) ^ k).collect();
            tx.with_bytes(&sbuf, |b| b[..16].copy_from_slice(&pattern))
                .expect("source");
            tx.put(&to_rank1(i, len)).expect("put");
            // Before, the waiter only looked at its queue, which nothing filled: a timeout.
            let ev = rx
                .eq_wait(eq, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("put {i}: {e}"));
            assert_eq!(
                (ev.kind, ev.match_bits, ev.mlength),
                (EventKind::Put, i, len)
            );
            let got = rx
                .with_bytes(&rbuf, |b| b[..len as usize].to_vec())
                .expect("dest");
            assert_eq!(got, pattern[..len as usize], "put {i}");
        }
        // A non-blocking look makes the pass too: nothing queued, one put sent, one event.
        assert!(rx.eq_poll(eq).expect("poll").is_none());
        tx.put(&to_rank1(7777, 0)).expect("put");
        let ev = rx.eq_poll(eq).expect("poll").expect("the put's event");
        assert_eq!(ev.match_bits, 7777);
    }

    #[test]
    fn the_put_header_made_from_the_arguments_is_the_one_made_from_the_portals_header() {
        let (_fab, mut tx, _rx, _eq, smd, _sbuf, _rbuf) = pair();
        for (ack, portal, len) in [(false, 1, 8), (true, 1, 0), (true, 70_000, 200)] {
            let a = PutArgs {
                md: smd,
                local_offset: 3,
                length: len,
                target: ProcessId::new(41, 1),
                portal,
                match_bits: 0xfeed_0000_0000_0001,
                remote_offset: 77,
                ack,
                hdr_data: 0xabc,
            };
            let (body, plan) = tx.with_engine(|e| {
                let body = e.prepare_put_body(&a).expect("put body");
                (body, e.put_plan(&a, body))
            });
            assert_eq!(body.len(), len);
            assert_eq!(Hdr::put(&a, 0), hdr_from_wire(&plan.header), "ack {ack}");
        }
    }

    #[test]
    fn a_one_line_puts_plain_form_is_the_portals_header_the_general_path_builds() {
        let dst = ProcessId::new(41, 1);
        for (portal, src, length, bits, offset, ret) in [
            (1u16, 0u32, 8u64, 7u64, 16u64, portals::NO_MD),
            (0, 3, 0, u64::MAX, 0, 42),
            (u16::MAX, u32::MAX, 5, 0, u64::MAX, 1),
        ] {
            let h = Hdr {
                op: op::PUT,
                flags: flag::INLINE8,
                portal,
                src,
                match_bits: bits,
                offset,
                length,
                return_md: ret,
                aux: 0x0102_0304_0506_0708,
                hdr_data: bits ^ 0x55,
            };
            let general = wire_from_hdr(&h, 41, dst).expect("a put converts");
            let line = h.encode();
            let plain = plain_put_from_inline8(
                HdrRef::new(&line).expect("a whole header"),
                h.src,
                h.length,
                41,
                dst,
            );
            // A put without ack never reads its return descriptor; everything else is the same.
            assert_eq!(
                plain.to_wire(),
                WireHeader {
                    return_md: portals::NO_MD,
                    ..general
                }
            );
            assert_eq!(portals::PlainPut::from_wire(&general), Some(plain));
        }
    }

    #[test]
    fn a_one_line_put_to_a_portal_its_job_may_not_use_is_dropped_as_forbidden() {
        let (_fab, mut tx, mut rx, eq, smd, sbuf, rbuf) = pair();
        tx.write(&sbuf, 0, &[9u8; 8]).expect("fill");
        let put = PutArgs {
            md: smd,
            local_offset: 0,
            length: 8,
            target: ProcessId::new(41, 1),
            portal: 1,
            match_bits: 1,
            remote_offset: 0,
            ack: false,
            hdr_data: 0,
        };
        rx.with_engine(|e| e.portal_set_acl(1, Acl::job(99)))
            .expect("acl");
        tx.put(&put).expect("put");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while rx.stats().total_drops() == 0 && std::time::Instant::now() < deadline {
            assert_eq!(
                rx.eq_poll(eq).expect("poll"),
                None,
                "no event for a refused put"
            );
        }
        let st = rx.stats();
        assert_eq!(
            st.drops_for(crate::DropReason::Portals(portals::DropReason::Forbidden)),
            1,
            "{st:?}"
        );
        let mut got = [0u8; 8];
        rx.read(&rbuf, 0, &mut got).expect("read");
        assert_eq!(got, [0u8; 8], "a refused put deposited bytes");
        // The same put once the job may use the portal is delivered (by the same fast route).
        rx.with_engine(|e| e.portal_set_acl(1, Acl::job(41)))
            .expect("acl");
        tx.put(&put).expect("put");
        let ev = rx.eq_wait(eq, Duration::from_secs(5)).expect("put event");
        assert_eq!((ev.kind, ev.mlength), (EventKind::Put, 8));
        rx.read(&rbuf, 0, &mut got).expect("read");
        assert_eq!(got, [9u8; 8]);
    }

    #[test]
    fn a_one_line_put_into_memory_the_receiver_does_not_own_is_dropped_as_bad_memory() {
        let (_fab, mut tx, mut rx, _eq, smd, sbuf, _rbuf) = pair();
        tx.write(&sbuf, 0, b"ABCDEFGH").expect("fill");
        // A descriptor over bytes of this test, outside the receiving endpoint's memory: were
        // the ownership check skipped, the put would land here.
        let outside = vec![0xEEu8; 64].into_boxed_slice();
        rx.with_engine(|e| {
            let md = e
                .md_create(&MdSpec {
                    kind: MdKind::Single {
                        region: portals::Region::new(outside.as_ptr() as u64, 64),
                        offset: OffsetMode::Sender,
                    },
                    options: MdOptions::PUT,
                    eq: None,
                })
                .expect("md");
            e.portal_set_acl(2, Acl::job(41)).expect("acl");
            e.portal_enable(2).expect("enable");
            e.me_append(2, MatchSpec::any(), md).expect("me");
        });
        for (i, len) in [0u64, 3, 8].into_iter().enumerate() {
            tx.put(&PutArgs {
                md: smd,
                local_offset: 0,
                length: len,
                target: ProcessId::new(41, 1),
                portal: 2,
                match_bits: 1,
                remote_offset: 8 * i as u64,
                ack: false,
                hdr_data: 0,
            })
            .expect("put");
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while rx.stats().drops_for(crate::DropReason::BadMemory) < i as u64 + 1
                && std::time::Instant::now() < deadline
            {
                rx.progress();
            }
            assert_eq!(
                rx.stats().drops_for(crate::DropReason::BadMemory),
                i as u64 + 1,
                "{len} B put"
            );
        }
        assert!(
            outside.iter().all(|&b| b == 0xEE),
            "a refused put wrote bytes"
        );
    }

    #[test]
    fn eq_poll_into_and_eq_wait_into_hand_out_each_put_once_with_its_bytes() {
        let (_fab, mut tx, mut rx, eq, smd, sbuf, rbuf) = pair();
        let mut ev = Event::EMPTY;
        assert!(!rx.eq_poll_into(eq, &mut ev).expect("poll"));
        assert_eq!(ev, Event::EMPTY, "nothing written when there is no event");
        for (n, len) in [(1u64, 0u64), (2, 8), (3, 100)] {
            let data: Vec<u8> = (0..len as u8).map(|b| b ^ n as u8).collect();
            tx.write(&sbuf, 0, &data).expect("fill");
            tx.put(&PutArgs {
                md: smd,
                local_offset: 0,
                length: len,
                target: ProcessId::new(41, 1),
                portal: 1,
                match_bits: n,
                remote_offset: 16,
                ack: false,
                hdr_data: 10 + n,
            })
            .expect("put");
            if n == 2 {
                rx.eq_wait_into(eq, Duration::from_secs(5), &mut ev)
                    .expect("wait");
            } else {
                assert!(rx.eq_poll_into(eq, &mut ev).expect("poll"));
            }
            assert_eq!(
                (ev.kind, ev.match_bits, ev.hdr_data, ev.mlength, ev.offset),
                (EventKind::Put, n, 10 + n, len, 16)
            );
            let mut got = vec![0u8; len as usize];
            rx.read(&rbuf, 16, &mut got).expect("read");
            assert_eq!(got, data);
            assert!(
                !rx.eq_poll_into(eq, &mut ev).expect("poll"),
                "each event once"
            );
        }
        assert_eq!(rx.eq_poll(eq).expect("poll"), None);
        assert_eq!(rx.stats().total_drops(), 0);
    }
    #[test]
    fn a_waiter_gets_its_events_in_order_whether_taken_directly_or_queued() {
        let (_fab, mut tx, mut rx, eq, smd, _sbuf, _rbuf) = pair();
        // A put asking for an ack takes the general delivery path, whose event is queued: a
        // fast-path put behind it in the same progress pass must not overtake it.
        let put_ack = |tx: &mut Endpoint, n: u64, len: u64, ack: bool| {
            tx.put(&PutArgs {
                md: smd,
                local_offset: 0,
                length: len,
                target: ProcessId::new(41, 1),
                portal: 1,
                match_bits: n,
                remote_offset: 0,
                ack,
                hdr_data: n,
            })
            .expect("put");
        };
        let put = |tx: &mut Endpoint, n: u64, len: u64| put_ack(tx, n, len, false);
        let mut ev = Event::EMPTY;
        let mut seen = Vec::new();
        // One at a time (each taken straight from the delivery), then runs of several (the first
        // taken directly, the rest queued behind it), then one more after a queued one is left.
        for (run, ack_first) in [
            (1u64, false),
            (1, false),
            (3, false),
            (5, false),
            (1, false),
            (3, true),
        ] {
            let first = seen.len() as u64;
            for k in 0..run {
                put_ack(
                    &mut tx,
                    first + k,
                    if k % 2 == 0 { 8 } else { 100 },
                    ack_first && k == 0,
                );
            }
            for _ in 0..run {
                rx.eq_wait_into(eq, Duration::from_secs(5), &mut ev)
                    .expect("wait");
                assert_eq!(ev.kind, EventKind::Put);
                seen.push((ev.match_bits, ev.seq));
            }
        }
        put(&mut tx, 100, 8);
        put(&mut tx, 101, 8);
        // 100 is taken straight from the delivery, 101 queued behind it; 102 arrives while 101
        // waits in the queue, so it must come after it.
        assert!(rx.eq_poll_into(eq, &mut ev).expect("poll"));
        seen.push((ev.match_bits, ev.seq));
        put(&mut tx, 102, 8);
        for _ in 0..2 {
            assert!(rx.eq_poll_into(eq, &mut ev).expect("poll"));
            seen.push((ev.match_bits, ev.seq));
        }
        assert!(!rx.eq_poll_into(eq, &mut ev).expect("poll"));
        let bits: Vec<u64> = seen.iter().map(|s| s.0).collect();
        let mut want: Vec<u64> = (0..14).collect();
        want.extend([100, 101, 102]);
        assert_eq!(bits, want);
        let seqs: Vec<u64> = seen.iter().map(|s| s.1).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "queue order: {seqs:?}"
        );
        assert_eq!(rx.stats().total_drops(), 0);
    }

    #[test]
    fn queued_events_taken_in_the_caller_report_a_loss_once_then_come_in_order() {
        let (_fab, mut tx, mut rx, eq, smd, _sbuf, _rbuf) = pair();
        // 70 puts delivered by one progress pass with no waiter: 64 events fill the queue, 6 are
        // lost. The waiter's calls then take them from the queue (the inlined path).
        for n in 0..70u64 {
            tx.put(&PutArgs {
                md: smd,
                local_offset: 0,
                length: 8,
                target: ProcessId::new(41, 1),
                portal: 1,
                match_bits: n,
                remote_offset: 0,
                ack: false,
                hdr_data: n,
            })
            .expect("put");
        }
        assert_eq!(rx.progress(), 70);
        let mut ev = Event::EMPTY;
        match rx.eq_wait_into(eq, Duration::from_secs(5), &mut ev) {
            Err(QkError::Portals(m)) => assert!(m.contains('6'), "{m}"),
            other => panic!("the loss must be reported first: {other:?}"),
        }
        let mut bits = Vec::new();
        for k in 0..64 {
            if k % 2 == 0 {
                rx.eq_wait_into(eq, Duration::from_secs(5), &mut ev)
                    .expect("wait");
            } else {
                assert!(rx.eq_poll_into(eq, &mut ev).expect("poll"));
            }
            bits.push(ev.match_bits);
        }
        assert_eq!(bits, (0..64).collect::<Vec<u64>>());
        assert!(!rx.eq_poll_into(eq, &mut ev).expect("poll"));
        // A freed queue: the poll reports the stale handle, as before.
        rx.with_engine(|e| e.eq_free(eq)).expect("free");
        assert!(matches!(
            rx.eq_poll_into(eq, &mut ev),
            Err(QkError::Portals(_))
        ));
        assert!(matches!(
            rx.eq_wait_into(eq, Duration::from_millis(1), &mut ev),
            Err(QkError::Portals(_))
        ));
    }

    #[test]
    fn a_small_put_posts_its_send_event_and_unowned_memory_is_refused_unsent() {
        let (_fab, mut tx, mut rx, eq, _smd, sbuf, _rbuf) = pair();
        let (seq, smd, bad) = tx.with_engine(|e| {
            let seq = e.eq_alloc(16).expect("send eq");
            let md = |e: &mut PortalsEngine, region| {
                e.md_create(&MdSpec {
                    kind: MdKind::Single {
                        region,
                        offset: OffsetMode::Sender,
                    },
                    options: MdOptions::PUT,
                    eq: Some(seq),
                })
                .expect("send md")
            };
            let smd = md(e, sbuf.region());
            let bad = md(e, portals::Region::new(0x1000, 256));
            (seq, smd, bad)
        });
        let put = |md, length, ack| PutArgs {
            md,
            local_offset: 4,
            length,
            target: ProcessId::new(41, 1),
            portal: 1,
            match_bits: length,
            remote_offset: 0,
            ack,
            hdr_data: 5,
        };
        // 0 and 8 B travel in one line, 100 B after the header, the acked put by the general route.
        for (len, ack) in [(0, false), (8, false), (100, false), (8, true)] {
            tx.put(&put(smd, len, ack)).expect("put");
            let ev = tx.eq_poll(seq).expect("poll").expect("send event");
            assert_eq!(
                (
                    ev.kind,
                    ev.md,
                    ev.mlength,
                    ev.rlength,
                    ev.offset,
                    ev.match_bits
                ),
                (EventKind::Send, smd, len, len, 4, len)
            );
            let got = rx.eq_wait(eq, Duration::from_secs(5)).expect("put event");
            assert_eq!((got.kind, got.mlength), (EventKind::Put, len));
        }
        let ack = tx.eq_wait(seq, Duration::from_secs(5)).expect("ack event");
        assert_eq!((ack.kind, ack.mlength), (EventKind::Ack, 8));
        let sent = tx.stats().sent;
        for len in [8, 100] {
            let err = tx.put(&put(bad, len, false)).expect_err("unowned memory");
            assert!(err.to_string().contains("does not own"), "{err}");
        }
        assert_eq!(tx.eq_poll(seq).expect("poll"), None, "no send event");
        assert_eq!(tx.stats().sent, sent, "nothing sent");
    }

    /// The put kept for sending again ([`SendLine`]): every repeat carries the payload as it is
    /// now and posts its send event; any change of the arguments is honoured; a released
    /// descriptor or a freed buffer is refused as before, with nothing sent.
    #[test]
    fn a_put_sent_again_carries_its_payload_as_it_is_now_and_honours_every_change() {
        let (_fab, mut tx, mut rx, eq, _smd, _sbuf, rbuf) = pair();
        let pbuf = tx.alloc_private(64);
        let (seq, smd) = tx.with_engine(|e| {
            let seq = e.eq_alloc(64).expect("send eq");
            let md = e
                .md_create(&MdSpec {
                    kind: MdKind::Single {
                        region: pbuf.region(),
                        offset: OffsetMode::Sender,
                    },
                    options: MdOptions::PUT,
                    eq: Some(seq),
                })
                .expect("send md");
            (seq, md)
        });
        let base = PutArgs {
            md: smd,
            local_offset: 8,
            length: 8,
            target: ProcessId::new(41, 1),
            portal: 1,
            match_bits: 3,
            remote_offset: 16,
            ack: false,
            hdr_data: 77,
        };
        let check = |tx: &mut Endpoint, rx: &mut Endpoint, a: PutArgs, round: u8| {
            let data: Vec<u8> = (0..64).map(|i| i ^ round.wrapping_mul(31)).collect();
            tx.write(&pbuf, 0, &data).expect("fill");
            tx.put(&a).expect("put");
            let sev = tx.eq_poll(seq).expect("poll").expect("send event");
            assert_eq!(
                (
                    sev.kind,
                    sev.mlength,
                    sev.offset,
                    sev.match_bits,
                    sev.hdr_data
                ),
                (
                    EventKind::Send,
                    a.length,
                    a.local_offset,
                    a.match_bits,
                    a.hdr_data
                ),
                "round {round}"
            );
            let ev = rx.eq_wait(eq, Duration::from_secs(5)).expect("put event");
            assert_eq!(
                (ev.kind, ev.mlength, ev.offset, ev.match_bits, ev.hdr_data),
                (
                    EventKind::Put,
                    a.length,
                    a.remote_offset,
                    a.match_bits,
                    a.hdr_data
                ),
                "round {round}"
            );
            let mut got = vec![0u8; a.length as usize];
            rx.read(&rbuf, a.remote_offset, &mut got).expect("read");
            let from = a.local_offset as usize;
            assert_eq!(got, data[from..from + a.length as usize], "round {round}");
        };
        let mut round = 0u8;
        let mut next = || {
            round += 1;
            round
        };
        for _ in 0..4 {
            check(&mut tx, &mut rx, base, next());
        }
        for a in [
            PutArgs {
                match_bits: 4,
                ..base
            },
            PutArgs {
                remote_offset: 40,
                ..base
            },
            PutArgs {
                local_offset: 1,
                ..base
            },
            PutArgs { length: 0, ..base },
            PutArgs { length: 3, ..base },
            PutArgs {
                hdr_data: 1,
                ..base
            },
            base,
        ] {
            // The first put of these arguments is remembered, the second keeps its line, the
            // third is sent from it.
            for _ in 0..3 {
                check(&mut tx, &mut rx, a, next());
            }
        }
        assert_eq!(rx.stats().total_drops(), 0);
        // The buffer freed: refused as memory this rank does not own, nothing sent, no event.
        let sent = tx.stats().sent;
        tx.free(pbuf);
        let err = tx.put(&base).expect_err("freed memory");
        assert!(err.to_string().contains("does not own"), "{err}");
        assert_eq!(tx.stats().sent, sent, "nothing sent");
        assert_eq!(tx.eq_poll(seq).expect("poll"), None, "no send event");
        // A released descriptor: the stale handle is refused, whichever put came before.
        let sbuf = tx.alloc_shared(64).expect("buffer");
        let smd2 = tx.with_engine(|e| {
            e.md_create(&MdSpec {
                kind: MdKind::Single {
                    region: sbuf.region(),
                    offset: OffsetMode::Sender,
                },
                options: MdOptions::PUT,
                eq: Some(seq),
            })
            .expect("md")
        });
        let a2 = PutArgs { md: smd2, ..base };
        for _ in 0..3 {
            tx.put(&a2).expect("put");
        }
        tx.with_engine(|e| e.md_release(smd2)).expect("release");
        let sent = tx.stats().sent;
        assert!(tx.put(&a2).is_err(), "a put from a released descriptor");
        assert_eq!(tx.stats().sent, sent, "nothing sent");
    }

    /// A large put into the receiver's heap is copied by the receiver, with the sender's help
    /// when the sender is polling (its thread spins on its progress until the FIN), and arrives
    /// whole and exact either way: every message's words are checked. The exchange goes on until
    /// the receiver has counted three shared copies, bounded by a deadline so that a machine too
    /// busy to run both threads at once still ends (and then fails, having never shared).
    #[test]
    fn large_puts_whose_copy_the_sender_shares_arrive_whole() {
        shared_copies_arrive_whole(false);
    }

    /// As above from private memory sent by cross-memory attach: the receiver's chunks are read
    /// with `process_vm_readv`, the sender's copied from its own buffer into the receiver's heap.
    #[test]
    fn large_puts_from_private_memory_whose_copy_the_sender_shares_arrive_whole() {
        shared_copies_arrive_whole(true);
    }

    /// A put of `len` bytes from `md` to rank 1's portal 1, match bits 1, no ack ([`pair_with`]).
    fn put_to_rank_1(md: portals::MdHandle, len: u64) -> PutArgs {
        PutArgs {
            md,
            local_offset: 0,
            length: len,
            target: ProcessId::new(41, 1),
            portal: 1,
            match_bits: 1,
            remote_offset: 0,
            ack: false,
            hdr_data: 0,
        }
    }

    /// The 8-byte word `k` of message `i` in the copy-sharing tests.
    fn word(i: u64, k: usize) -> u64 {
        (i << 40) | k as u64
    }

    /// Fills `buf` with message `i`'s words.
    fn fill_words(ep: &mut Endpoint, buf: &Buf, i: u64) {
        ep.with_bytes(buf, |b| {
            for (k, w) in b.chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&word(i, k).to_le_bytes());
            }
        })
        .expect("fill");
    }

    /// Asserts that `buf` holds message `i`'s words.
    fn check_words(ep: &mut Endpoint, buf: &Buf, i: u64) {
        ep.with_bytes(buf, |b| {
            for (k, w) in b.chunks_exact(8).enumerate() {
                let got = u64::from_le_bytes(w.try_into().expect("8 bytes"));
                assert_eq!(got, word(i, k), "message {i} word {k}");
            }
        })
        .expect("check");
    }

    fn shared_copies_arrive_whole(private: bool) {
        const LEN: u64 = 4 << 20;
        let (_fab, mut tx, mut rx, eq, smd, sbuf, rbuf) = pair_with(LEN, 8 << 20);
        let (smd, sbuf) = if private {
            tx.set_private_path(PrivatePath::CrossMemoryAttach);
            let pbuf = tx.alloc_private(LEN);
            let pmd = tx.with_engine(|e| {
                e.md_create(&MdSpec {
                    kind: MdKind::Single {
                        region: pbuf.region(),
                        offset: OffsetMode::Sender,
                    },
                    options: MdOptions::PUT,
                    eq: None,
                })
                .expect("private md")
            });
            (pmd, pbuf)
        } else {
            (smd, sbuf)
        };
        let put = put_to_rank_1(smd, LEN);
        let (go, next) = std::sync::mpsc::channel::<bool>();
        let sender = std::thread::spawn(move || {
            let mut i = 0u64;
            loop {
                i += 1;
                fill_words(&mut tx, &sbuf, i);
                tx.put(&put).expect("put");
                let t = Instant::now();
                while tx.large_in_flight() > 0 {
                    tx.progress();
                    assert!(t.elapsed() < Duration::from_secs(30), "no FIN");
                }
                if !next.recv().expect("receiver gone") {
                    return i;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut i = 0u64;
        loop {
            i += 1;
            let ev = rx.eq_wait(eq, Duration::from_secs(30)).expect("put event");
            assert_eq!((ev.kind, ev.mlength), (EventKind::Put, LEN), "{ev:?}");
            check_words(&mut rx, &rbuf, i);
            let more = rx.stats().large_shared < 3 && Instant::now() < deadline;
            go.send(more).expect("sender gone");
            if !more {
                break;
            }
        }
        assert_eq!(sender.join().expect("sender"), i);
        let st = rx.stats();
        let by_path = if private {
            st.large_cma
        } else {
            st.large_direct
        };
        assert_eq!(by_path, i, "{st:?}");
        assert!(st.large_shared >= 3, "never shared in {i} messages: {st:?}");
        assert_eq!(st.total_drops(), 0);
    }

    /// Target rank 1 of a [`pair_with`] answers gets on portal 2 from descriptor `kind` (match
    /// bits 7); initiator rank 0 takes the reply into its heap buffer `sbuf`. Returns the
    /// initiator's event queue and reply descriptor.
    fn get_setup(
        tx: &mut Endpoint,
        rx: &mut Endpoint,
        kind: MdKind<'_>,
        sbuf: Buf,
    ) -> (EqHandle, portals::MdHandle) {
        rx.with_engine(|e| {
            let md = e
                .md_create(&MdSpec {
                    kind,
                    options: MdOptions::GET,
                    eq: None,
                })
                .expect("target md");
            e.portal_set_acl(2, Acl::job(41)).expect("acl");
            e.portal_enable(2).expect("enable");
            e.me_append(2, MatchSpec::new(7), md).expect("me");
        });
        tx.with_engine(|e| {
            let eq = e.eq_alloc(64).expect("eq");
            let md = e
                .md_create(&MdSpec {
                    kind: MdKind::Single {
                        region: sbuf.region(),
                        offset: OffsetMode::Sender,
                    },
                    options: MdOptions::GET,
                    eq: Some(eq),
                })
                .expect("reply md");
            (eq, md)
        })
    }

    /// A combined descriptor over `blocks` whose offsets the initiator picks.
    fn combined(blocks: &[PRegion]) -> MdKind<'_> {
        MdKind::Combined {
            blocks,
            offset: OffsetMode::Sender,
        }
    }

    /// A get of `len` bytes into `md` from rank 1's portal 2, match bits 7 ([`get_setup`]).
    fn get_args(md: portals::MdHandle, len: u64) -> portals::GetArgs {
        portals::GetArgs {
            md,
            local_offset: 0,
            length: len,
            target: ProcessId::new(41, 1),
            portal: 2,
            match_bits: 7,
            remote_offset: 0,
            hdr_data: 0,
        }
    }

    /// Gets `len` bytes with `md` from rank 1, both endpoints progressed in turn here: the reply
    /// event, or `None` if none came within two seconds. Afterwards both sides have had the
    /// chance to finish (the initiator's FIN handled by the target).
    fn get_in_turn(
        tx: &mut Endpoint,
        rx: &mut Endpoint,
        eq: EqHandle,
        md: portals::MdHandle,
        len: u64,
    ) -> Option<Event> {
        tx.get(&get_args(md, len)).expect("get");
        let t = Instant::now();
        let mut got = None;
        while t.elapsed() < Duration::from_secs(2) {
            rx.progress();
            if got.is_none() {
                got = tx
                    .eq_poll(eq)
                    .expect("poll")
                    .filter(|e| e.kind == EventKind::Reply);
            } else {
                tx.progress();
                if rx.large_in_flight() == 0 {
                    break;
                }
            }
        }
        got
    }

    /// A large get from a descriptor whose bytes are no one run of the job heap (three private
    /// blocks of a combined descriptor) is answered through a heap bounce buffer, whole; the
    /// initiator's FIN frees that buffer, so twelve such gets pass through a heap that holds
    /// four. Before, such a get was dropped as bad memory and never answered.
    #[test]
    fn a_large_get_from_scattered_private_blocks_is_answered_whole_and_frees_its_bounce() {
        const LEN: u64 = 192 << 10;
        let (_fab, mut tx, mut rx, _eq, _smd, sbuf, _rbuf) = pair_with(LEN, 1 << 20);
        let parts = [
            rx.alloc_private(1000),
            rx.alloc_private(LEN / 2),
            rx.alloc_private(LEN),
        ];
        let blocks = [
            parts[0].region(),
            parts[1].region(),
            parts[2].sub(0, LEN - 1000 - LEN / 2),
        ];
        let (eq, md) = get_setup(&mut tx, &mut rx, combined(&blocks), sbuf);
        for i in 0..12u8 {
            let mut k = 0u64;
            for (p, b) in parts.iter().zip(&blocks) {
                let bytes: Vec<u8> = (0..b.len).map(|j| ((k + j) % 251) as u8 ^ i).collect();
                rx.write(p, 0, &bytes).expect("fill");
                k += b.len;
            }
            let ev = get_in_turn(&mut tx, &mut rx, eq, md, LEN)
                .unwrap_or_else(|| panic!("get {i} not answered: {:?}", rx.stats()));
            assert_eq!(ev.mlength, LEN, "{ev:?}");
            let mut got = vec![0u8; LEN as usize];
            tx.read(&sbuf, 0, &mut got).expect("read");
            for (j, b) in got.iter().enumerate() {
                assert_eq!(*b, (j % 251) as u8 ^ i, "get {i} byte {j}");
            }
            assert_eq!(rx.large_in_flight(), 0, "get {i}: the bounce is still held");
        }
        assert_eq!(rx.stats().total_drops(), 0, "{:?}", rx.stats());
        assert_eq!(tx.stats().large_direct, 12);
    }

    /// A large get from a heap descriptor: the reply is a reference with a token, so the
    /// initiator's copy is shared by the target like a large put's, and the FIN ends it.
    #[test]
    fn a_large_get_reply_from_the_heap_is_a_reference_the_target_helps_copy() {
        const LEN: u64 = 4 << 20;
        let (_fab, mut tx, mut rx, _eq, _smd, sbuf, rbuf) = pair_with(LEN, 8 << 20);
        let (eq, md) = get_setup(
            &mut tx,
            &mut rx,
            MdKind::Single {
                region: rbuf.region(),
                offset: OffsetMode::Sender,
            },
            sbuf,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (tell, told) = std::sync::mpsc::channel::<u64>();
        let (fill_next, filled) = std::sync::mpsc::channel::<()>();
        let stop2 = stop.clone();
        // The target only progresses: its help comes from its progress passes, on its own thread.
        let target = std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                if told.try_recv().is_ok() {
                    i += 1;
                    fill_words(&mut rx, &rbuf, i);
                    fill_next.send(()).expect("initiator gone");
                }
                rx.progress();
            }
            rx.stats()
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut i = 0u64;
        while tx.stats().large_shared < 3 && Instant::now() < deadline {
            i += 1;
            tell.send(i).expect("target gone");
            filled.recv().expect("target gone");
            tx.get(&get_args(md, LEN)).expect("get");
            let ev = tx
                .eq_wait(eq, Duration::from_secs(30))
                .expect("reply event");
            assert_eq!((ev.kind, ev.mlength), (EventKind::Reply, LEN), "{ev:?}");
            check_words(&mut tx, &sbuf, i);
        }
        // The last FIN reaches the target before it stops.
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::Relaxed);
        let rst = target.join().expect("target");
        let st = tx.stats();
        assert_eq!(st.large_direct, i, "{st:?}");
        assert!(st.large_shared >= 3, "never shared in {i} gets: {st:?}");
        assert_eq!(st.total_drops() + rst.total_drops(), 0, "{st:?} {rst:?}");
    }

    /// A large get whose bounce buffer cannot fit in the target's heap, with nothing in flight
    /// that would free room, is dropped and counted as `no_heap_room` (not left to wait for
    /// ever); the next get that fits is answered.
    #[test]
    fn a_large_get_whose_bounce_cannot_fit_is_dropped_as_no_heap_room() {
        const LEN: u64 = 192 << 10;
        let (_fab, mut tx, mut rx, _eq, _smd, sbuf, _rbuf) = pair_with(LEN, 1 << 20);
        // The target's heap: its receive buffer, then all but 128 KiB taken.
        let rest = rx.alloc_shared((1 << 20) - LEN - (128 << 10));
        assert!(rest.is_ok(), "{rest:?}");
        let parts = [rx.alloc_private(LEN / 2), rx.alloc_private(LEN / 2)];
        let blocks = [parts[0].region(), parts[1].region()];
        let (eq, md) = get_setup(&mut tx, &mut rx, combined(&blocks), sbuf);
        assert!(get_in_turn(&mut tx, &mut rx, eq, md, LEN).is_none());
        assert_eq!(
            rx.stats().drops_for(DropReason::NoHeapRoom),
            1,
            "{:?}",
            rx.stats()
        );
        let ev = get_in_turn(&mut tx, &mut rx, eq, md, 64 << 10).expect("a get that fits");
        assert_eq!(ev.mlength, 64 << 10);
        assert_eq!(rx.stats().total_drops(), 1);
    }

    /// A large put whose bytes cannot all be read (a block of its combined descriptor is not
    /// this rank's memory) is refused, and the bounce buffer taken for it goes back to the heap:
    /// ten refusals through a heap that holds three such buffers leave room for a good put.
    #[test]
    fn a_refused_bounced_put_gives_its_bounce_buffer_back() {
        const LEN: u64 = 192 << 10;
        let (_fab, mut tx, mut rx, eq, _smd, _sbuf, _rbuf) = pair_with(LEN, 1 << 20);
        let good = [tx.alloc_private(LEN / 2), tx.alloc_private(LEN / 2)];
        let blocks = [good[0].region(), good[1].region()];
        let bad_blocks = [good[0].region(), PRegion::new(0x1000, LEN / 2)];
        let (md, bad_md) = tx.with_engine(|e| {
            let mk = |e: &mut PortalsEngine, b: &[PRegion]| {
                e.md_create(&MdSpec {
                    kind: combined(b),
                    options: MdOptions::PUT,
                    eq: None,
                })
                .expect("md")
            };
            (mk(e, &blocks), mk(e, &bad_blocks))
        });
        let put = |md| put_to_rank_1(md, LEN);
        for i in 0..10 {
            let e = tx
                .put(&put(bad_md))
                .expect_err("unowned bytes must be refused");
            assert!(e.to_string().contains("does not own"), "refusal {i}: {e}");
        }
        tx.put(&put(md)).expect("a good put after the refusals");
        let ev = rx.eq_wait(eq, Duration::from_secs(5)).expect("put event");
        assert_eq!((ev.kind, ev.mlength), (EventKind::Put, LEN), "{ev:?}");
    }
}
