//! The messaging engine under every communicator: portals descriptors and match entries through
//! the QK endpoint, one event queue, the unexpected-message queue, requests.
//!
//! Portals used (all with access for the job's own ranks only):
//! * [`P_MSG`] — two-sided messages. Its match list holds the posted receives (use-once entries,
//!   each with a single-block descriptor over the receive buffer), then two catch-all entries for
//!   unexpected messages (seed 002, 7.7): a dynamic descriptor keeping header and body, and behind
//!   it a dynamic descriptor keeping only the header. A message that finds the first one full
//!   falls through to the second; its body is then re-requested from the sender with a get when a
//!   receive matches it.
//! * [`P_RDV`] — every send's source descriptor, matchable by the send's id (carried in the
//!   header data), so a receiver that kept only the header can fetch the body.
//! * [`P_WIN`] — one-sided windows (single-block descriptors with sender-managed offsets).
//!
//! Match bits: context id in bits 63..48, tag (or window id) in bits 31..0. Each communicator
//! owns a context id for point-to-point and the next one for collectives, so traffic never mixes.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use qk::portals::{
    Acl, EqHandle, Event, EventKind, GetArgs, MatchHandle, MatchSpec, MdHandle, MdKind, MdOptions,
    MdSpec, OffsetMode, Position, ProcessId, PutArgs, Save, ANY, HEADER_LEN,
};
use qk::{Buf, Endpoint, PrivatePath, QkError};

use crate::error::{Error, Result};
use crate::fabric::{pid_dead, Attached};

pub(crate) const P_MSG: u32 = 1;
pub(crate) const P_RDV: u32 = 2;
pub(crate) const P_WIN: u32 = 3;

/// Bits carrying the tag.
pub(crate) const TAG_MASK: u64 = 0xffff_ffff;

/// Match bit of the "body copied" notice on [`P_RDV`].
const DONE_BIT: u64 = 1 << 63;

/// Sends up to this size complete as soon as the payload is copied out of the user's buffer;
/// larger blocking sends wait until the receiver has the body.
pub(crate) const EAGER_COMPLETE: u64 = 64 * 1024;

/// Most sends to one destination whose body the receiver does not hold yet; a sender that
/// runs further ahead waits (the receiver's unexpected descriptors stay bounded, nothing drops).
const SEND_WINDOW: u32 = 512;

/// Below this job heap per rank, large private payloads go by cross-memory attach.
const SMALL_HEAP: u64 = 16 << 20;

/// How often a blocked waiter checks that the peers it waits for live (a dead peer is an error,
/// not a hang; the PCT ends a job whose rank dies sooner than this anyway). Also the longest
/// slice an idle waiter sleeps in the QK, so it sets how often such a rank wakes.
const PEER_CHECK: Duration = Duration::from_secs(1);

/// Scheduler slice an oversubscribed rank asks for (see [`Core::settle_placement`]). At 8 ranks
/// on 2 cores with one CPU-bound process on core 0 (puma-coll-bench, 6 Dec 2026): 8-rank barrier
/// 190 µs instead of 1.6–2.5 ms, 8-byte broadcast 22 µs instead of 115; unchanged without it.
const OVERSUBSCRIBED_SLICE: Duration = Duration::from_micros(100);

/// How long an oversubscribed waiter polls and yields before it blocks in the QK.
const YIELD_PHASE: Duration = Duration::from_millis(5);

/// Bytes of the unexpected-message heap (header + body per message).
const UNEX_HEAP: u64 = 8 << 20;
const UNEX_MAX: u32 = 4096;
const UNEX_HDR_MAX: u32 = 4096;

pub(crate) fn match_bits(ctx: u16, tag: u32) -> u64 {
    ((ctx as u64) << 48) | tag as u64
}

/// What a completed receive reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// Sender's rank in the communicator of the receive.
    pub source: u32,
    /// The message's tag.
    pub tag: i32,
    /// Bytes received.
    pub bytes: u64,
}

impl Status {
    /// Elements of type `T` received.
    pub fn count<T>(&self) -> usize {
        let s = std::mem::size_of::<T>().max(1);
        (self.bytes / s as u64) as usize
    }
}

/// A message that arrived before its receive was posted.
#[derive(Debug)]
pub(crate) struct Unexpected {
    pub src: u32,
    pub bits: u64,
    pub len: u64,
    send_id: u64,
    /// Where header and body sit in the unexpected heap, or `None` when only the header was
    /// saved.
    data: Option<u64>,
}

#[derive(Debug)]
enum Kind {
    Send,
    Recv,
    Put,
    Get,
}

#[derive(Debug)]
struct Req {
    kind: Kind,
    md: MdHandle,
    me: MatchHandle,
    buf: Option<Buf>,
    /// Receive capacity / send length.
    len: u64,
    /// The user may go on (send payload copied out, or receive/one-sided op finished).
    done: bool,
    /// Resources can be released (send body delivered).
    finished: bool,
    status: Status,
    /// World rank of the sender (receives).
    src_world: u32,
    /// Message length the sender meant (receives).
    sent: u64,
    /// Body already here (unexpected, fully saved).
    data: Option<Vec<u8>>,
    /// The application dropped the handle.
    orphan: bool,
    /// Receives whose body was fetched: the sender's id, to tell it when the copy is done.
    fetched_from: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
enum Owner {
    Req(u64),
    Window(u32),
}

pub(crate) struct State {
    unexpected: VecDeque<Unexpected>,
    reqs: HashMap<u64, Req>,
    owners: HashMap<u64, Owner>,
    next_id: u64,
    pool: HashMap<u64, Vec<Buf>>,
    /// Buffers of sends whose body a receiver fetched with a get; reused once no large transfer
    /// of this rank is still in flight.
    deferred: Vec<Buf>,
    /// Bytes deposited into each window by remote puts.
    pub win_bytes: HashMap<u32, u64>,
    errors: VecDeque<Error>,
    pub stats: MsgStats,
}

/// Counters of the messaging layer of this rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsgStats {
    /// Unexpected messages kept whole in the dynamic descriptor.
    pub unexpected_whole: u64,
    /// Unexpected messages of which only the header was kept (the dynamic descriptor was full).
    pub unexpected_header_only: u64,
    /// Bodies fetched from their senders with a get after a header-only save.
    pub bodies_fetched: u64,
    /// Pieces of large node-local collectives carried through the stages of the QK region.
    pub stage_pieces: u64,
    /// Blocks of node-local collectives moved by cross-memory attach: read straight from another
    /// rank's buffer, or (crowded all-to-all) written straight into another rank's receive buffer.
    pub cma_blocks: u64,
    /// Of `cma_blocks`, those this rank wrote into another rank's receive buffer (a crowded
    /// all-to-all moves a block by whichever of its two ranks runs first).
    pub cma_pushed: u64,
    /// Node-local operations of at most 112 bytes carried through the small slots of the
    /// collective area (broadcasts with more ranks than cores; publications and copies alike).
    pub small_ops: u64,
}

/// The per-process engine shared by every communicator.
pub(crate) struct Core {
    ep: RefCell<Endpoint>,
    region: qk::region::Region,
    pub job: u32,
    pub eq: EqHandle,
    pub st: RefCell<State>,
    pub timeout: Duration,
    unex_md: MdHandle,
    unex_buf: Buf,
    unex_me: MatchHandle,
    unex_hdr_md: MdHandle,
    done_md: MdHandle,
    zero_md: MdHandle,
    pub next_ctx: Cell<u16>,
    /// Sends per destination whose body the receiver does not hold yet (flow control).
    unfinished: RefCell<HashMap<u32, u32>>,
    /// More ranks on this machine than cores for them: waiters yield instead of spinning.
    /// A first guess (ranks against online CPUs) until [`Core::settle_placement`].
    oversubscribed: Cell<bool>,
    /// Ranks sharing this machine's cores.
    local_ranks: u32,
    /// More ranks on this machine than online CPUs: unlike `oversubscribed`, never revised, so
    /// every rank of a node sees the same value and may use it to pick a collective's path.
    crowded: bool,
    /// The job heap is too small for bounce copies (cross-memory attach is the private path).
    small_heap: bool,
    /// The region's collective area (intra-node collectives).
    shm: Option<crate::shm::ShmCore>,
    _fabric: Option<qk::NodeFabric>,
}

fn pe<T>(r: std::result::Result<T, qk::portals::Error>) -> Result<T> {
    r.map_err(Error::portals)
}

impl Core {
    pub fn new(a: Attached, timeout: Duration, local_ranks: u32) -> Result<Core> {
        // Not available_parallelism(): it counts this process's affinity mask, and a rank the
        // PCT pinned to one core would take itself for oversubscribed.
        let cores = qk::sys::online_cpus() as u32;
        let Attached {
            mut ep,
            region,
            fabric,
            ..
        } = a;
        let job = ep.job();
        // A small job heap (the PCT's default is 1 MiB per rank) cannot hold bounce copies of
        // large messages: let receivers read private buffers straight from this process.
        let small_heap = region.layout.heap_per_rank < SMALL_HEAP;
        if small_heap {
            ep.set_private_path(PrivatePath::CrossMemoryAttach);
        }
        let unex_buf = ep.alloc_private(UNEX_HEAP);
        let unex_hdr_buf = ep.alloc_private(UNEX_HDR_MAX as u64 * (HEADER_LEN as u64 + 8));
        let done_buf = ep.alloc_private(1024 * (HEADER_LEN as u64 + 8));
        let zero_buf = ep.alloc_private(64);
        let (eq, unex_md, unex_me, unex_hdr_md, done_md, zero_md) =
            ep.with_engine(|e| -> Result<_> {
                let eq = pe(e.eq_alloc(60_000))?;
                for p in [P_MSG, P_RDV, P_WIN] {
                    // Discards land in our queue and become errors, never silent losses.
                    pe(e.portal_set_eq(p, Some(eq)))?;
                    pe(e.portal_set_acl(p, Acl::job(job)))?;
                    pe(e.portal_enable(p))?;
                }
                let unex_md = pe(e.md_create(&MdSpec {
                    kind: MdKind::Dynamic {
                        region: unex_buf.region(),
                        save: Save::Both,
                        max_messages: UNEX_MAX,
                    },
                    options: MdOptions::PUT,
                    eq: Some(eq),
                }))?;
                let hdr_md = pe(e.md_create(&MdSpec {
                    kind: MdKind::Dynamic {
                        region: unex_hdr_buf.region(),
                        save: Save::Header,
                        max_messages: UNEX_HDR_MAX,
                    },
                    options: MdOptions::PUT,
                    eq: Some(eq),
                }))?;
                // Receivers tell a sender that they finished copying a fetched body (its buffer may
                // then be reused) with an empty put whose match bits are the send id | DONE_BIT.
                let done_md = pe(e.md_create(&MdSpec {
                    kind: MdKind::Dynamic {
                        region: done_buf.region(),
                        save: Save::Header,
                        max_messages: 1024,
                    },
                    options: MdOptions::PUT,
                    eq: Some(eq),
                }))?;
                pe(e.me_append(
                    P_RDV,
                    MatchSpec::new(DONE_BIT).ignore(!DONE_BIT).from(job, ANY),
                    done_md,
                ))?;
                let zero_md = pe(e.md_create(&MdSpec {
                    kind: MdKind::Single {
                        region: zero_buf.region(),
                        offset: OffsetMode::Receiver,
                    },
                    options: MdOptions::GET,
                    eq: None,
                }))?;
                let any = MatchSpec::any().from(job, ANY);
                let me = pe(e.me_append(P_MSG, any, unex_md))?;
                pe(e.me_append(P_MSG, any, hdr_md))?;
                Ok((eq, unex_md, me, hdr_md, done_md, zero_md))
            })?;
        ep.start_engine()?;
        let shm = Some(crate::shm::ShmCore::new(qk::coll_area::CollArea::of(
            &region,
        )));
        Ok(Core {
            ep: RefCell::new(ep),
            region,
            job,
            eq,
            st: RefCell::new(State {
                unexpected: VecDeque::new(),
                reqs: HashMap::new(),
                owners: HashMap::new(),
                next_id: 1,
                pool: HashMap::new(),
                deferred: Vec::new(),
                win_bytes: HashMap::new(),
                errors: VecDeque::new(),
                stats: MsgStats::default(),
            }),
            timeout,
            unex_md,
            unex_buf,
            unex_me,
            unex_hdr_md,
            done_md,
            zero_md,
            next_ctx: Cell::new(2),
            oversubscribed: Cell::new(local_ranks > cores),
            local_ranks,
            crowded: local_ranks > cores,
            small_heap,
            unfinished: RefCell::new(HashMap::new()),
            shm,
            _fabric: fabric,
        })
    }

    /// The collective area, when the region has one.
    pub fn shm(&self) -> Option<&crate::shm::ShmCore> {
        self.shm.as_ref()
    }

    /// Port of a world rank in this rank's region (None: another node's region).
    pub fn port_of(&self, world: u32) -> Option<u32> {
        self.region.port_of_rank(world)
    }

    /// Some ranks of the job live in other nodes' regions: records to them go through the QK
    /// node engine (TCP between nodes).
    pub fn routed(&self) -> bool {
        (self.region.ranks.len() as u32) < self.region.world
    }

    /// The process id the rank on local port `port` registered when it attached (0: none yet).
    pub fn pid_of(&self, port: u32) -> u32 {
        self.region.pid(port)
    }

    /// The one CPU the rank on local port `port` is pinned to (None: several, or its mask is
    /// unreadable).
    pub fn pinned_cpu(&self, port: u32) -> Option<usize> {
        let pid = self.region.pid(port);
        match qk::sys::cpus_of(pid).ok()?.as_slice() {
            [one] if pid != 0 => Some(*one),
            _ => None,
        }
    }

    /// More ranks share this machine's cores than it has.
    pub fn oversubscribed(&self) -> bool {
        self.oversubscribed.get()
    }

    /// More ranks on this machine than online CPUs (the same answer on every rank of the node,
    /// see the field).
    pub fn crowded(&self) -> bool {
        self.crowded
    }

    /// Once every local rank has attached (after the start-up barrier): counts the cores the
    /// local ranks may run on (the union of their affinity masks, as the PCT pinned them) and
    /// decides whether they outnumber them. An oversubscribed rank then asks the kernel for a
    /// short scheduler slice ([`OVERSUBSCRIBED_SLICE`], `PUMA_SLICE_US` overrides, 0 keeps the
    /// kernel's): its waiters nap, and with the default slice (about 3 ms) a napping rank that
    /// wakes on a core held by a CPU-bound process of someone else waits for that process's
    /// whole slice before it runs, so every collective step paid milliseconds on a loaded
    /// machine. Returns the slice the kernel reports (None: unchanged).
    pub fn settle_placement(&self) -> Option<u64> {
        let mut cpus: Vec<usize> = Vec::new();
        for port in 0..self.region.layout.local {
            let pid = self.region.pid(port);
            if pid == 0 {
                continue;
            }
            match qk::sys::cpus_of(pid) {
                Ok(c) => cpus.extend(c),
                // A rank that already left, or a mask we may not read: keep the first guess.
                Err(_) => return None,
            }
        }
        cpus.sort_unstable();
        cpus.dedup();
        if !cpus.is_empty() {
            let cores = (cpus.len() as u32).min(qk::sys::online_cpus() as u32);
            self.oversubscribed.set(self.local_ranks > cores);
        }
        if !self.oversubscribed.get() {
            return None;
        }
        let us = std::env::var("PUMA_SLICE_US")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(OVERSUBSCRIBED_SLICE.as_micros() as u64);
        if us == 0 {
            return None;
        }
        // Best effort: a kernel without custom slices ignores it, a refusal changes nothing.
        qk::sys::set_sched_slice(us * 1000).ok().flatten()
    }

    pub fn world_rank(&self) -> u32 {
        self.ep().rank()
    }

    /// The endpoint (never borrowed across a call that may borrow it again).
    pub fn ep(&self) -> std::cell::RefMut<'_, Endpoint> {
        self.ep.borrow_mut()
    }

    fn pid(&self, id: u32) -> ProcessId {
        ProcessId::new(self.job, id)
    }

    // ------------------------------------------------------------------ buffers

    pub fn take_buf(&self, len: u64) -> Result<Buf> {
        let class = len.max(64).next_power_of_two();
        if let Some(b) = self.st.borrow_mut().pool.get_mut(&class).and_then(Vec::pop) {
            return Ok(b);
        }
        if class >= self.ep().eager_max() {
            let shared = || {
                self.heap_leaves_reserve(class)
                    .then(|| self.ep().alloc_shared(class).ok())
                    .flatten()
            };
            if let Some(b) = shared() {
                return Ok(b);
            }
            // Give the cached shared buffers back to the heap and try again.
            self.release_cached_shared();
            if let Some(b) = shared() {
                return Ok(b);
            }
        }
        Ok(self.ep().alloc_private(class))
    }

    /// Whether `len` more bytes of this rank's heap part leave a quarter of it free. The QK takes
    /// its bounce buffers from the same part (a private buffer read from another node by a get,
    /// e.g. the body of an unexpected message fetched later), and drops such a reply when the
    /// part is full with nothing of its own in flight to free some. Buffers this library keeps
    /// there (sends waiting for their receiver, cached for reuse) wait for exactly those replies:
    /// yod `--nodes 2 --mode msg-coproc p2p_check`'s flood of 24 × 1 MiB sends filled the 16 MiB
    /// part with send copies, and the reply for a later one, from private memory, was dropped
    /// (`no_heap_room`, the receiver waiting for ever; about 1 run in 15).
    fn heap_leaves_reserve(&self, len: u64) -> bool {
        let (free, total) = self.ep().heap_room();
        free >= len.saturating_add(total / 4)
    }

    pub fn give_buf(&self, st: &mut State, b: Buf) {
        let v = st.pool.entry(b.len).or_default();
        if v.len() < 16 {
            v.push(b);
        } else {
            self.ep().free(b);
        }
    }

    // ------------------------------------------------------------------ events

    /// Handles every event waiting in the queue.
    pub fn drain(&self) -> Result<()> {
        // One event kept across the loop: the inlined poll takes an already-queued one (the rest
        // of a batch a progress pass delivered) straight into it, without a call.
        let mut ev = Event::EMPTY;
        while self.ep().eq_poll_into(self.eq, &mut ev)? {
            self.dispatch(ev)?;
        }
        let mut st = self.st.borrow_mut();
        if !st.deferred.is_empty() && self.ep().large_in_flight() == 0 {
            let d = std::mem::take(&mut st.deferred);
            for b in d {
                self.give_buf(&mut st, b);
            }
        }
        match st.errors.pop_front() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn release(&self, md: MdHandle, me: Option<MatchHandle>) {
        self.ep().with_engine(|e| {
            if let Some(me) = me {
                let _ = e.me_unlink(me);
            }
            let _ = e.md_release(md);
        });
    }

    fn dispatch(&self, ev: Event) -> Result<()> {
        if ev.kind == EventKind::Discard {
            self.st.borrow_mut().errors.push_back(Error::Discarded {
                portal: ev.portal,
                from: ev.initiator.rank,
                reason: ev
                    .reason
                    .map(|r| r.name().to_string())
                    .unwrap_or_else(|| "unknown".into()),
            });
            return Ok(());
        }
        if matches!(ev.kind, EventKind::Send | EventKind::Unlink) {
            return Ok(());
        }
        if ev.md == self.unex_md || ev.md == self.unex_hdr_md {
            if ev.kind != EventKind::Put {
                return Ok(());
            }
            // A whole message stays in the dynamic descriptor until a receive takes it; a
            // header-only record is freed at once (the event carries everything needed).
            let data = if ev.md == self.unex_md {
                Some(ev.offset)
            } else {
                let md = ev.md;
                pe(self.ep().with_engine(|e| e.md_free(md, ev.offset)))?;
                None
            };
            let mut st = self.st.borrow_mut();
            if data.is_some() {
                st.stats.unexpected_whole += 1;
            } else {
                st.stats.unexpected_header_only += 1;
            }
            st.unexpected.push_back(Unexpected {
                src: ev.initiator.rank,
                bits: ev.match_bits,
                len: ev.rlength,
                send_id: ev.hdr_data,
                data,
            });
            return Ok(());
        }
        if ev.md == self.done_md {
            if ev.kind == EventKind::Put {
                let md = ev.md;
                pe(self.ep().with_engine(|e| e.md_free(md, ev.offset)))?;
                let id = ev.match_bits & !DONE_BIT;
                let mut st = self.st.borrow_mut();
                let (buf, remove) = match st.reqs.get_mut(&id) {
                    Some(r) if matches!(r.kind, Kind::Send) => {
                        r.finished = true;
                        let dst = r.src_world;
                        let out = (r.buf.take(), r.orphan);
                        self.one_less(dst);
                        out
                    }
                    _ => (None, false),
                };
                if remove {
                    st.reqs.remove(&id);
                }
                if let Some(b) = buf {
                    self.give_buf(&mut st, b);
                }
            }
            return Ok(());
        }
        let mut st = self.st.borrow_mut();
        let owner = st.owners.get(&ev.md.to_cookie()).copied();
        match owner {
            None => Ok(()),
            Some(Owner::Window(w)) => {
                if ev.kind == EventKind::Put {
                    *st.win_bytes.entry(w).or_default() += ev.mlength;
                }
                Ok(())
            }
            Some(Owner::Req(id)) => {
                let Some(r) = st.reqs.get_mut(&id) else {
                    return Ok(());
                };
                let mut release = false;
                match (&r.kind, ev.kind) {
                    (Kind::Send, EventKind::Ack) if ev.mlength == ev.rlength || ev.truncated => {
                        r.done = true;
                        r.finished = true;
                        release = true;
                        let dst = r.src_world;
                        self.one_less(dst);
                    }
                    (Kind::Send, EventKind::Get) => {
                        // The receiver copies the body from our buffer after this: keep the
                        // buffer until its "done" notice.
                        r.done = true;
                        release = true;
                    }
                    (Kind::Recv, EventKind::Put) => {
                        r.done = true;
                        r.finished = true;
                        r.src_world = ev.initiator.rank;
                        r.sent = ev.rlength;
                        r.status.tag = (ev.match_bits & TAG_MASK) as u32 as i32;
                        r.status.bytes = ev.mlength;
                        release = true;
                    }
                    (Kind::Recv, EventKind::Reply) | (Kind::Get, EventKind::Reply) => {
                        r.done = true;
                        r.finished = true;
                        r.status.bytes = ev.mlength;
                        release = true;
                    }
                    (Kind::Put, EventKind::Ack) => {
                        r.done = true;
                        r.finished = true;
                        release = true;
                    }
                    _ => {}
                }
                if release {
                    let (md, me) = (r.md, r.me);
                    let is_send = matches!(r.kind, Kind::Send);
                    let orphan = r.orphan && r.finished;
                    let buf = if (is_send && r.finished) || orphan {
                        r.buf.take()
                    } else {
                        None
                    };
                    let notify = if ev.kind == EventKind::Reply {
                        r.fetched_from.map(|sid| (sid, r.src_world))
                    } else {
                        None
                    };
                    if orphan {
                        st.reqs.remove(&id);
                    }
                    st.owners.remove(&md.to_cookie());
                    if let Some(b) = buf {
                        self.give_buf(&mut st, b);
                    }
                    drop(st);
                    self.release(md, (me != MatchHandle::NONE).then_some(me));
                    if let Some((sid, src)) = notify {
                        // The body is here: the sender may reuse its buffer.
                        let args = PutArgs {
                            md: self.zero_md,
                            local_offset: 0,
                            length: 0,
                            target: self.pid(src),
                            portal: P_RDV,
                            match_bits: sid | DONE_BIT,
                            remote_offset: 0,
                            ack: false,
                            hdr_data: 0,
                        };
                        self.ep().put(&args)?;
                    }
                }
                Ok(())
            }
        }
    }

    // ------------------------------------------------------------------ waiting

    /// Waits until `cond` holds, handling events; spins briefly then blocks in the QK (the core
    /// is given up while waiting). Checks that the peers in `peers` (world ranks) live.
    pub fn wait_until(
        &self,
        what: &dyn Fn() -> String,
        peers: &[u32],
        mut cond: impl FnMut(&mut State) -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        let mut next_check = PEER_CHECK;
        let mut ev = Event::EMPTY;
        loop {
            self.drain()?;
            if cond(&mut self.st.borrow_mut()) {
                return Ok(());
            }
            if self.oversubscribed.get() && start.elapsed() < YIELD_PHASE {
                // More ranks than cores: hand the core to a peer (it is probably the one we wait
                // for) instead of spinning, then look again.
                std::thread::yield_now();
                continue;
            }
            // Slices as long as the peer-check period: an idle waiter then wakes once a second
            // (the QK sleeps long once a wait has been idle, see Region::fence_before_sleep).
            let got = self.ep().eq_wait_into(self.eq, PEER_CHECK, &mut ev);
            match got {
                Ok(()) => self.dispatch(ev)?,
                Err(QkError::Timeout(..)) => {}
                Err(e) => return Err(e.into()),
            }
            let el = start.elapsed();
            if el > next_check {
                next_check = el + PEER_CHECK;
                self.check_peers(peers, what)?;
            }
            if el > self.timeout {
                return Err(Error::Timeout(self.timeout, what()));
            }
        }
    }

    /// Waits up to `limit` for every send to be fully delivered (errors ignored).
    pub fn flush_sends(&self, limit: Duration) {
        let start = Instant::now();
        let mut ev = Event::EMPTY;
        loop {
            if self.drain().is_err() {
                return;
            }
            let busy = self
                .st
                .borrow()
                .reqs
                .values()
                .any(|r| matches!(r.kind, Kind::Send) && !r.finished);
            if !busy || start.elapsed() > limit {
                return;
            }
            let got = self
                .ep()
                .eq_wait_into(self.eq, Duration::from_millis(20), &mut ev);
            if got.is_ok() {
                let _ = self.dispatch(ev);
            }
        }
    }

    pub(crate) fn check_peers(&self, peers: &[u32], what: &dyn Fn() -> String) -> Result<()> {
        for &r in peers {
            if let Some(port) = self.region.port_of_rank(r) {
                let pid = self.region.pid(port);
                if pid != 0 && pid_dead(pid) {
                    return Err(Error::PeerDied {
                        rank: r,
                        pid,
                        what: what(),
                    });
                }
            }
        }
        Ok(())
    }

    fn ahead(&self, dst: u32) -> u32 {
        self.unfinished.borrow().get(&dst).copied().unwrap_or(0)
    }

    fn one_less(&self, dst: u32) {
        if let Some(c) = self.unfinished.borrow_mut().get_mut(&dst) {
            *c = c.saturating_sub(1);
        }
    }

    fn new_id(st: &mut State) -> u64 {
        let id = st.next_id;
        st.next_id += 1;
        id
    }

    // ------------------------------------------------------------------ two-sided

    /// Starts a send of `data` to world rank `dst`. The payload is copied out at once.
    pub fn isend(&self, dst: u32, bits: u64, data: &[u8]) -> Result<u64> {
        let len = data.len() as u64;
        let ahead = self.ahead(dst);
        if ahead >= SEND_WINDOW {
            self.wait_until(
                &|| format!("rank {dst} to take some of the {ahead} messages sent to it"),
                &[dst],
                |_| self.ahead(dst) < SEND_WINDOW,
            )?;
        }
        let buf = self.take_buf(len)?;
        if len > 0 {
            self.ep().write(&buf, 0, data)?;
        }
        let id = Self::new_id(&mut self.st.borrow_mut());
        let job = self.job;
        let eq = self.eq;
        let (md, me) = self.ep().with_engine(|e| -> Result<_> {
            let md = pe(e.md_create(&MdSpec {
                kind: MdKind::Single {
                    region: buf.sub(0, len.max(1)),
                    offset: OffsetMode::Receiver,
                },
                options: MdOptions::GET,
                eq: Some(eq),
            }))?;
            let me = match e.me_append(P_RDV, MatchSpec::new(id).from(job, dst).use_once(), md) {
                Ok(m) => m,
                Err(err) => {
                    let _ = e.md_release(md);
                    return Err(Error::portals(err));
                }
            };
            Ok((md, me))
        })?;
        {
            let mut st = self.st.borrow_mut();
            *self.unfinished.borrow_mut().entry(dst).or_default() += 1;
            st.owners.insert(md.to_cookie(), Owner::Req(id));
            st.reqs.insert(
                id,
                Req {
                    kind: Kind::Send,
                    md,
                    me,
                    buf: Some(buf),
                    len,
                    done: len <= EAGER_COMPLETE,
                    finished: false,
                    status: Status {
                        source: 0,
                        tag: 0,
                        bytes: len,
                    },
                    src_world: dst,
                    sent: len,
                    data: None,
                    orphan: false,
                    fetched_from: None,
                },
            );
        }
        let args = PutArgs {
            md,
            local_offset: 0,
            length: len,
            target: self.pid(dst),
            portal: P_MSG,
            match_bits: bits,
            remote_offset: 0,
            ack: true,
            hdr_data: id,
        };
        let r = self.put(&args, buf);
        if let Err(e) = r {
            let mut st = self.st.borrow_mut();
            st.owners.remove(&md.to_cookie());
            st.reqs.remove(&id);
            self.one_less(dst);
            self.release(md, Some(me));
            self.give_buf(&mut st, buf);
            return Err(e.into());
        }
        Ok(id)
    }

    /// A put; when the job heap is full (many large sends in flight) the target reads a private
    /// buffer straight from this process instead of through a heap bounce buffer. A target on
    /// another node cannot read this process: then the put waits (driving progress, which frees
    /// the staging of earlier sends) until the heap has room, at most the job's timeout.
    fn put(&self, args: &PutArgs, buf: Buf) -> Result<(), QkError> {
        let start = Instant::now();
        loop {
            match self.put_once(args, buf) {
                // More than the whole heap can never fit (a message to another node is staged
                // in it): fail at once instead of waiting out the timeout.
                Err(e @ QkError::HeapExhausted { want, .. })
                    if want > self.region.layout.heap_per_rank =>
                {
                    return Err(e);
                }
                Err(QkError::HeapExhausted { .. }) if start.elapsed() < self.timeout => {
                    self.release_cached_shared();
                    if let Err(e) = self.drain() {
                        self.st.borrow_mut().errors.push_front(e);
                    }
                    std::thread::yield_now();
                }
                r => return r,
            }
        }
    }

    /// Gives the pooled shared buffers back to the job heap.
    fn release_cached_shared(&self) {
        let cached: Vec<Buf> = {
            let mut st = self.st.borrow_mut();
            let mut out = Vec::new();
            for v in st.pool.values_mut() {
                v.retain(|b| {
                    if b.shared {
                        out.push(*b);
                    }
                    !b.shared
                });
            }
            out
        };
        for b in cached {
            self.ep().free(b);
        }
    }

    fn put_once(&self, args: &PutArgs, buf: Buf) -> Result<(), QkError> {
        let first = self.ep().put(args);
        match first {
            Err(QkError::HeapExhausted { .. }) if !buf.shared => {
                self.ep().set_private_path(PrivatePath::CrossMemoryAttach);
                let r = self.ep().put(args);
                if !self.small_heap {
                    self.ep().set_private_path(PrivatePath::Bounce);
                }
                r
            }
            r => r,
        }
    }

    fn find_unexpected(st: &State, src: Option<u32>, bits: u64, ignore: u64) -> Option<usize> {
        st.unexpected
            .iter()
            .position(|u| src.is_none_or(|s| s == u.src) && (u.bits ^ bits) & !ignore == 0)
    }

    /// Posts a receive of up to `cap` bytes from world rank `src` (or anybody).
    pub fn irecv(&self, src: Option<u32>, bits: u64, ignore: u64, cap: u64) -> Result<u64> {
        let id = Self::new_id(&mut self.st.borrow_mut());
        let mk = |buf: Option<Buf>, md: MdHandle, me: MatchHandle| Req {
            kind: Kind::Recv,
            md,
            me,
            buf,
            len: cap,
            done: false,
            finished: false,
            status: Status {
                source: 0,
                tag: 0,
                bytes: 0,
            },
            src_world: 0,
            sent: 0,
            data: None,
            orphan: false,
            fetched_from: None,
        };
        loop {
            self.drain()?;
            let hit = {
                let mut st = self.st.borrow_mut();
                Self::find_unexpected(&st, src, bits, ignore).and_then(|i| st.unexpected.remove(i))
            };
            if let Some(u) = hit {
                let tag = (u.bits & TAG_MASK) as u32 as i32;
                if let Some(at) = u.data {
                    let mut d = vec![0u8; u.len.min(cap) as usize];
                    self.ep()
                        .read(&self.unex_buf, at + HEADER_LEN as u64, &mut d)?;
                    let md = self.unex_md;
                    pe(self.ep().with_engine(|e| e.md_free(md, at)))?;
                    let mut r = mk(None, MdHandle::NONE, MatchHandle::NONE);
                    r.done = true;
                    r.finished = true;
                    r.src_world = u.src;
                    r.sent = u.len;
                    r.status.tag = tag;
                    r.status.bytes = u.len.min(cap);
                    r.data = Some(d);
                    self.st.borrow_mut().reqs.insert(id, r);
                    return Ok(id);
                }
                // Only the header was kept: fetch the body from the sender's descriptor.
                let want = u.len.min(cap);
                let buf = self.take_buf(want)?;
                let eq = self.eq;
                let md = pe(self.ep().with_engine(|e| {
                    e.md_create(&MdSpec {
                        kind: MdKind::Single {
                            region: buf.sub(0, want.max(1)),
                            offset: OffsetMode::Receiver,
                        },
                        options: MdOptions::PUT,
                        eq: Some(eq),
                    })
                }))?;
                let mut r = mk(Some(buf), md, MatchHandle::NONE);
                r.fetched_from = Some(u.send_id);
                self.st.borrow_mut().stats.bodies_fetched += 1;
                r.src_world = u.src;
                r.sent = u.len;
                r.status.tag = tag;
                {
                    let mut st = self.st.borrow_mut();
                    st.owners.insert(md.to_cookie(), Owner::Req(id));
                    st.reqs.insert(id, r);
                }
                self.ep().get(&GetArgs {
                    md,
                    local_offset: 0,
                    length: want,
                    target: self.pid(u.src),
                    portal: P_RDV,
                    match_bits: u.send_id,
                    remote_offset: 0,
                    hdr_data: 0,
                })?;
                return Ok(id);
            }
            let buf = self.take_buf(cap)?;
            let (eq, anchor, job) = (self.eq, self.unex_me, self.job);
            let spec = MatchSpec::new(bits)
                .from(job, src.unwrap_or(ANY))
                .ignore(ignore)
                .use_once();
            let posted = self
                .ep()
                .with_engine(|e| -> Result<Option<(MdHandle, MatchHandle)>> {
                    // Something arrived since the drain (co-processor engine): look again first.
                    if pe(e.eq_len(eq))? > 0 {
                        return Ok(None);
                    }
                    let md = pe(e.md_create(&MdSpec {
                        kind: MdKind::Single {
                            region: buf.sub(0, cap.max(1)),
                            offset: OffsetMode::Receiver,
                        },
                        options: MdOptions::PUT.truncating(),
                        eq: Some(eq),
                    }))?;
                    match e.me_insert(anchor, Position::Before, spec, md) {
                        Ok(me) => Ok(Some((md, me))),
                        Err(err) => {
                            let _ = e.md_release(md);
                            Err(Error::portals(err))
                        }
                    }
                });
            match posted {
                Ok(Some((md, me))) => {
                    let mut st = self.st.borrow_mut();
                    st.owners.insert(md.to_cookie(), Owner::Req(id));
                    st.reqs.insert(id, mk(Some(buf), md, me));
                    return Ok(id);
                }
                Ok(None) => {
                    let mut st = self.st.borrow_mut();
                    self.give_buf(&mut st, buf);
                }
                Err(e) => {
                    let mut st = self.st.borrow_mut();
                    self.give_buf(&mut st, buf);
                    return Err(e);
                }
            }
        }
    }

    /// True when request `id` lets the user go on.
    pub fn is_done(&self, id: u64) -> bool {
        self.st.borrow().reqs.get(&id).is_none_or(|r| r.done)
    }

    /// Waits for request `id`; for receives copies the body into `dst`. Returns the status with
    /// the world rank of the sender in `source`.
    pub fn complete(
        &self,
        id: u64,
        dst: Option<&mut [u8]>,
        peers: &[u32],
        what: &dyn Fn() -> String,
    ) -> Result<Status> {
        self.wait_until(what, peers, |st| st.reqs.get(&id).is_none_or(|r| r.done))?;
        self.finish(id, dst)
    }

    /// Collects a finished request.
    pub fn finish(&self, id: u64, dst: Option<&mut [u8]>) -> Result<Status> {
        let mut st = self.st.borrow_mut();
        let Some(r) = st.reqs.get(&id) else {
            return Ok(Status {
                source: 0,
                tag: 0,
                bytes: 0,
            });
        };
        if matches!(r.kind, Kind::Send) && !r.finished {
            // Eagerly completed send: resources go when the ack arrives.
            if let Some(r) = st.reqs.get_mut(&id) {
                r.orphan = true;
                return Ok(r.status);
            }
        }
        let Some(r) = st.reqs.remove(&id) else {
            unreachable!("checked above")
        };
        let mut status = r.status;
        status.source = r.src_world;
        if matches!(r.kind, Kind::Recv) && r.sent > r.len {
            if let Some(b) = r.buf {
                self.give_buf(&mut st, b);
            }
            return Err(Error::Truncated {
                from: r.src_world,
                tag: status.tag,
                sent: r.sent,
                cap: r.len,
            });
        }
        if let Some(dst) = dst {
            let n = (status.bytes as usize).min(dst.len());
            if let Some(d) = &r.data {
                dst[..n].copy_from_slice(&d[..n]);
            } else if let Some(b) = &r.buf {
                if n > 0 {
                    self.ep().read(b, 0, &mut dst[..n])?;
                }
            }
        }
        if let Some(b) = r.buf {
            self.give_buf(&mut st, b);
        }
        Ok(status)
    }

    /// The application dropped an unfinished request.
    pub fn orphan(&self, id: u64) {
        let mut st = self.st.borrow_mut();
        let remove = match st.reqs.get_mut(&id) {
            Some(r) if r.finished => true,
            Some(r) => {
                r.orphan = true;
                false
            }
            None => false,
        };
        if remove {
            if let Some(b) = st.reqs.remove(&id).and_then(|r| r.buf) {
                self.give_buf(&mut st, b);
            }
        }
    }

    /// Looks for an unexpected message; returns (world source, bits, length).
    pub fn iprobe(
        &self,
        src: Option<u32>,
        bits: u64,
        ignore: u64,
    ) -> Result<Option<(u32, u64, u64)>> {
        self.drain()?;
        let st = self.st.borrow();
        Ok(Self::find_unexpected(&st, src, bits, ignore).map(|i| {
            let u = &st.unexpected[i];
            (u.src, u.bits, u.len)
        }))
    }

    /// Waits for an unexpected message; returns (world source, bits, length).
    pub fn probe(
        &self,
        src: Option<u32>,
        bits: u64,
        ignore: u64,
        peers: &[u32],
        what: &dyn Fn() -> String,
    ) -> Result<(u32, u64, u64)> {
        let mut found = None;
        self.wait_until(what, peers, |st| {
            found = Self::find_unexpected(st, src, bits, ignore).map(|i| {
                let u = &st.unexpected[i];
                (u.src, u.bits, u.len)
            });
            found.is_some()
        })?;
        found.ok_or_else(|| Error::Invalid("probe ended without a message".into()))
    }

    // ------------------------------------------------------------------ one-sided

    /// Exposes `buf` as window `wid` of context `ctx`.
    pub fn expose(&self, ctx: u16, wid: u32, buf: Buf) -> Result<(MdHandle, MatchHandle)> {
        let (eq, job) = (self.eq, self.job);
        let r = self.ep().with_engine(|e| -> Result<_> {
            let md = pe(e.md_create(&MdSpec {
                kind: MdKind::Single {
                    region: buf.region(),
                    offset: OffsetMode::Sender,
                },
                options: MdOptions::PUT_GET,
                eq: Some(eq),
            }))?;
            let me = pe(e.me_append(
                P_WIN,
                MatchSpec::new(match_bits(ctx, wid)).from(job, ANY),
                md,
            ))?;
            Ok((md, me))
        })?;
        let mut st = self.st.borrow_mut();
        st.owners.insert(r.0.to_cookie(), Owner::Window(wid));
        st.win_bytes.insert(wid, 0);
        Ok(r)
    }

    pub fn unexpose(&self, md: MdHandle, me: MatchHandle, wid: u32) {
        {
            let mut st = self.st.borrow_mut();
            st.owners.remove(&md.to_cookie());
            st.win_bytes.remove(&wid);
        }
        self.release(md, Some(me));
    }

    /// Starts a put of `data` into window `bits` of world rank `dst` at byte `offset`.
    pub fn rma_put(&self, dst: u32, bits: u64, offset: u64, data: &[u8]) -> Result<u64> {
        let len = data.len() as u64;
        let buf = self.take_buf(len)?;
        self.ep().write(&buf, 0, data)?;
        let id = self.rma_md(Kind::Put, buf, len)?;
        let md = self.st.borrow().reqs[&id].md;
        let args = PutArgs {
            md,
            local_offset: 0,
            length: len,
            target: self.pid(dst),
            portal: P_WIN,
            match_bits: bits,
            remote_offset: offset,
            ack: true,
            hdr_data: 0,
        };
        self.put(&args, buf)?;
        Ok(id)
    }

    /// Starts a get of `len` bytes from window `bits` of world rank `dst` at byte `offset`.
    pub fn rma_get(&self, dst: u32, bits: u64, offset: u64, len: u64) -> Result<u64> {
        let buf = self.take_buf(len)?;
        let id = self.rma_md(Kind::Get, buf, len)?;
        let md = self.st.borrow().reqs[&id].md;
        self.ep().get(&GetArgs {
            md,
            local_offset: 0,
            length: len,
            target: self.pid(dst),
            portal: P_WIN,
            match_bits: bits,
            remote_offset: offset,
            hdr_data: 0,
        })?;
        Ok(id)
    }

    fn rma_md(&self, kind: Kind, buf: Buf, len: u64) -> Result<u64> {
        let eq = self.eq;
        let md = pe(self.ep().with_engine(|e| {
            e.md_create(&MdSpec {
                kind: MdKind::Single {
                    region: buf.sub(0, len.max(1)),
                    offset: OffsetMode::Receiver,
                },
                options: MdOptions::PUT,
                eq: Some(eq),
            })
        }))?;
        let mut st = self.st.borrow_mut();
        let id = Self::new_id(&mut st);
        st.owners.insert(md.to_cookie(), Owner::Req(id));
        st.reqs.insert(
            id,
            Req {
                kind,
                md,
                me: MatchHandle::NONE,
                buf: Some(buf),
                len,
                done: false,
                finished: false,
                status: Status {
                    source: 0,
                    tag: 0,
                    bytes: 0,
                },
                src_world: 0,
                sent: len,
                data: None,
                orphan: false,
                fetched_from: None,
            },
        );
        Ok(id)
    }
}
