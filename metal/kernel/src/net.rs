//! Portals on the bare-metal QK, through the shared `portals` engine, and the
//! inter-node fabric: QEMU's ivshmem-plain device, a shared-memory BAR that
//! two QEMU instances map from the same host file.
//!
//! Every process that uses portals gets one `portals::Engine` in static
//! storage (no allocation). Its process id is `(group 1 = the job, rank =
//! node * 16 + pid)`. A put goes: the sender's engine plans it
//! (`prepare_put`), the QK copies the header and the payload once into the
//! destination node's inbound ring; the receiving node's QK drains its ring
//! when nothing is runnable or when an application waits for an event, and
//! `Engine::deliver` says where the bytes go: the QK writes them straight
//! into the matched memory descriptor of the receiving process, which is not
//! running meanwhile, posts the event and wakes it.
//!
//! Shared memory layout (1 MiB): page 0 unused, then one inbound ring per
//! node. Ring: `head` (written only by the other node), `tail` (written only
//! by the owner), then `SLOTS` slots of `SLOT_BYTES`. A message takes one or
//! more consecutive slots: the first holds a length word, the 80-byte wire
//! header and the start of the payload, each further slot a length word and
//! the next part of the payload. The sender publishes all slots of a
//! message at once (one `head` update), so the receiver always sees whole
//! messages, and copies the payload straight from the slots into the
//! receiving process's descriptor: no reassembly buffer. Acks and replies
//! (the reply carries the data of a get) travel the same way.
use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

use metal_rt::abi;
use portals::{
    Acl, ArrayStore, Engine, EqHandle, EventKind, GetArgs, Link, MatchHandle, MatchSpec, MdHandle,
    MdKind, MdOptions, MdSpec, OffsetMode, Op, Position, ProcessId, PutArgs, Region, Response,
    Save, Segment, WireHeader, HEADER_LEN,
};

use crate::arch::{inl, outl};
use crate::proc::{k, pid_of, slot_of, State, Wait, MAX_PROCS};
use crate::{kprintln, mm};

/// The job every application belongs to (portal ACLs admit this group).
const JOB: u32 = 1;
/// Ranks are `node * RANKS_PER_NODE + pid`.
const RANKS_PER_NODE: u32 = 16;
/// Portal table size per process.
const PORTALS: u32 = 4;

/// Per process: 4 portals, 16 match entries, 24 descriptors, 32 blocks,
/// 2 event queues, 64 events, 32 heap records.
type Store = ArrayStore<4, 16, 24, 32, 2, 64, 32>;

struct Endpoint {
    engine: Engine<Store>,
    eq: EqHandle,
}

static mut ENDPOINTS: [Option<Endpoint>; MAX_PROCS] = [const { None }; MAX_PROCS];

fn endpoints() -> &'static mut [Option<Endpoint>; MAX_PROCS] {
    // SAFETY: only the single, non-reentrant kernel path touches them.
    unsafe { &mut *addr_of_mut!(ENDPOINTS) }
}

// ----- the fabric -----

const SHM_SIZE: u64 = 1 << 20;
const SHM_PHYS: u64 = 0xC000_0000;
const RING_BASE: u64 = 0x1000;
const SLOTS: u64 = 120;
const SLOT_BYTES: u64 = 4096;
const RING_BYTES: u64 = 128 + SLOTS * SLOT_BYTES;
/// Payload bytes in a message's first slot (after length word and header).
const FIRST_CAP: u64 = SLOT_BYTES - 8 - HEADER_LEN as u64;
/// Payload bytes in each following slot (after the length word).
const NEXT_CAP: u64 = SLOT_BYTES - 8;
/// Largest message: fragmented over up to 33 slots.
pub const MAX_MESSAGE: u64 = abi::MAX_MESSAGE;
/// How long a send waits for room in the other node's ring (TSC ticks).
const SEND_PATIENCE: u64 = 4_000_000_000;
/// Most segments one body is split into (blocks of a combined descriptor).
const MAX_SEGS: usize = 16;

struct Fabric {
    node: u32,
    nodes: u32,
    shm: u64,
    /// True while the inbound ring is being drained (no nested drains).
    polling: bool,
    /// Messages (mostly acks and replies) given up on: the ring stayed full.
    lost: u64,
    /// Sends that found the destination ring full and had to wait.
    waits: u64,
}

static mut FABRIC: Fabric = Fabric {
    node: 0,
    nodes: 1,
    shm: 0,
    polling: false,
    lost: 0,
    waits: 0,
};

fn fabric() -> &'static mut Fabric {
    // SAFETY: as for ENDPOINTS.
    unsafe { &mut *addr_of_mut!(FABRIC) }
}

fn pci_read(bus: u32, dev: u32, func: u32, off: u32) -> u32 {
    outl(
        0xCF8,
        0x8000_0000 | (bus << 16) | (dev << 11) | (func << 8) | (off & 0xfc),
    );
    inl(0xCFC)
}

fn pci_write(bus: u32, dev: u32, func: u32, off: u32, v: u32) {
    outl(
        0xCF8,
        0x8000_0000 | (bus << 16) | (dev << 11) | (func << 8) | (off & 0xfc),
    );
    outl(0xCFC, v);
}

/// Finds the ivshmem device and maps its shared memory at `SHM_PHYS`.
pub fn init() {
    let f = fabric();
    f.node = crate::boot_arg("node")
        .and_then(crate::parse_u64)
        .unwrap_or(0)
        .min(1) as u32;
    for dev in 0..32 {
        let id = pci_read(0, dev, 0, 0);
        if id != 0x1110_1af4 {
            continue;
        }
        let bar2 = pci_read(0, dev, 0, 0x18);
        // Size the BAR, then place it (64-bit memory BAR) in the 3-4 GiB hole
        // the kernel maps with 2 MiB pages.
        pci_write(0, dev, 0, 0x18, 0xffff_ffff);
        let size = u64::from(!(pci_read(0, dev, 0, 0x18) & !0xf)) + 1;
        if size < SHM_SIZE || bar2 & 0x6 != 0x4 {
            kprintln!("qk: ivshmem BAR2 too small ({size} bytes) or not 64-bit; single node");
            return;
        }
        pci_write(0, dev, 0, 0x18, SHM_PHYS as u32 | (bar2 & 0xf));
        pci_write(0, dev, 0, 0x1c, 0);
        let cmd = pci_read(0, dev, 0, 0x04);
        pci_write(0, dev, 0, 0x04, cmd | 0x2);
        f.shm = SHM_PHYS;
        f.nodes = 2;
        kprintln!(
            "qk: ivshmem at pci 0:{dev}, {} KiB shared at {:#x}; this is node {} of 2",
            size >> 10,
            SHM_PHYS,
            f.node
        );
        return;
    }
    kprintln!("qk: no ivshmem device; single node");
}

/// This node's number.
pub fn node() -> u64 {
    u64::from(fabric().node)
}

/// Number of nodes reachable.
pub fn nodes() -> u64 {
    u64::from(fabric().nodes)
}

fn ring(node: u32) -> u64 {
    fabric().shm + RING_BASE + u64::from(node) * RING_BYTES
}

fn rd(addr: u64) -> u64 {
    // SAFETY: `addr` lies in the ivshmem BAR (mapped by the boot tables,
    // uncached) at an 8-byte aligned ring field.
    unsafe { read_volatile(addr as *const u64) }
}

fn wr(addr: u64, v: u64) {
    // SAFETY: as in rd.
    unsafe { write_volatile(addr as *mut u64, v) }
}

/// Payload bytes that follow a header on the wire (acks and gets carry none).
fn payload_len(h: &WireHeader) -> u64 {
    match h.op {
        Op::Put | Op::Reply => h.length,
        Op::Get | Op::Ack => 0,
    }
}

/// Ring slots a message with `len` payload bytes takes.
fn frags(len: u64) -> u64 {
    1 + len.saturating_sub(FIRST_CAP).div_ceil(NEXT_CAP)
}

/// Where the payload of a message is read from.
enum Src<'a> {
    /// Published slots of this node's inbound ring, starting at slot index `first`.
    Ring { ring: u64, first: u64 },
    /// A local process's memory, as the engine's segments of a body.
    Proc { slot: usize, segs: &'a [Segment] },
    /// No payload.
    Empty,
}

impl Src<'_> {
    /// Copies payload bytes `off..off+out.len()` into `out`.
    fn read(&self, off: u64, out: &mut [u8]) -> Result<(), ()> {
        let mut done = 0usize;
        while done < out.len() {
            let i = off + done as u64;
            let n = match *self {
                Src::Ring { ring, first } => {
                    let (k, within, avail) = if i < FIRST_CAP {
                        (0, 8 + HEADER_LEN as u64 + i, FIRST_CAP - i)
                    } else {
                        let j = i - FIRST_CAP;
                        (1 + j / NEXT_CAP, 8 + j % NEXT_CAP, NEXT_CAP - j % NEXT_CAP)
                    };
                    let at = ring + 128 + ((first + k) % SLOTS) * SLOT_BYTES + within;
                    let n = (avail as usize).min(out.len() - done);
                    // SAFETY: `at..at+n` lies inside one published slot of
                    // the ivshmem BAR (within + n <= SLOT_BYTES); the other
                    // node does not write it until we move `tail`.
                    unsafe {
                        core::ptr::copy_nonoverlapping(at as *const u8, out[done..].as_mut_ptr(), n)
                    };
                    n
                }
                Src::Proc { slot, segs } => {
                    let s = segs
                        .iter()
                        .find(|s| s.msg_offset <= i && i < s.msg_offset + s.len)
                        .ok_or(())?;
                    let within = i - s.msg_offset;
                    let n = ((s.len - within) as usize).min(out.len() - done);
                    mm::copy_in(slot, s.addr + within, &mut out[done..done + n]).map_err(|_| ())?;
                    n
                }
                Src::Empty => return Err(()),
            };
            done += n;
        }
        Ok(())
    }
}

/// Sends one message (header, then `len` payload bytes from `src`) into
/// `dst`'s inbound ring. Waits for room, draining this node's own ring
/// meanwhile (unless already draining) so two nodes sending to each other
/// cannot deadlock; gives up after `SEND_PATIENCE`.
fn send_remote(dst: u32, header: &[u8; HEADER_LEN], len: u64, src: &Src) -> Result<(), i64> {
    let n = frags(len);
    if n > SLOTS {
        return Err(abi::EINVAL);
    }
    let r = ring(dst);
    let t0 = metal_rt::rdtsc();
    let mut waited = false;
    let head = loop {
        let head = rd(r);
        // The other node owns `tail`; a value ahead of `head` or more than a
        // ring behind means the shared memory is corrupt: do not write.
        let used = head.checked_sub(rd(r + 64)).filter(|&u| u <= SLOTS);
        let Some(used) = used else {
            return Err(abi::EINVAL);
        };
        if used + n <= SLOTS {
            break head;
        }
        if !waited {
            waited = true;
            fabric().waits += 1;
        }
        if metal_rt::rdtsc() - t0 > SEND_PATIENCE {
            return Err(abi::ENOMEM);
        }
        if !fabric().polling {
            poll();
        }
        core::hint::spin_loop();
    };
    let mut off = 0u64;
    for k in 0..n {
        let slot = r + 128 + ((head + k) % SLOTS) * SLOT_BYTES;
        let (data, cap) = if k == 0 {
            // SAFETY: the slot is ours until `head` moves past it; the header
            // fits in the slot after the length word.
            unsafe {
                core::ptr::copy_nonoverlapping(header.as_ptr(), (slot + 8) as *mut u8, HEADER_LEN)
            };
            (slot + 8 + HEADER_LEN as u64, FIRST_CAP)
        } else {
            (slot + 8, NEXT_CAP)
        };
        let part = (len - off).min(cap);
        // SAFETY: `data..data+part` lies inside this free slot of the BAR
        // (part <= cap); nothing else refers to it while we fill it.
        let dst = unsafe { core::slice::from_raw_parts_mut(data as *mut u8, part as usize) };
        if src.read(off, dst).is_err() {
            return Err(abi::EFAULT);
        }
        let hl = if k == 0 { HEADER_LEN as u64 } else { 0 };
        wr(slot, hl + part);
        off += part;
    }
    fence(Ordering::SeqCst);
    wr(r, head + n);
    Ok(())
}

/// Sends a message to its destination: straight into the local engine when
/// it is on this node, through the fabric otherwise.
fn send(h: &WireHeader, src: &Src) -> Result<(), i64> {
    let node = h.dst.rank / RANKS_PER_NODE;
    if node == fabric().node {
        incoming(h, src);
        Ok(())
    } else if node < fabric().nodes {
        send_remote(node, &h.encode(), payload_len(h), src)
    } else {
        Err(abi::EINVAL)
    }
}

/// Drains this node's inbound ring: every message is delivered (or dropped)
/// through the destination process's portals engine.
pub fn poll() {
    let f = fabric();
    if f.nodes < 2 || f.polling {
        return;
    }
    f.polling = true;
    let r = ring(f.node);
    let limits = portals::Limits {
        portals: PORTALS,
        max_message: MAX_MESSAGE,
    };
    loop {
        let tail = rd(r + 64);
        let head = rd(r);
        if tail == head {
            break;
        }
        if head < tail || head - tail > SLOTS {
            // Only the other node writes `head`: garbage there must not make
            // us walk the ring forever. Skip whatever it claims.
            kprintln!("qk: inbound ring head {head} / tail {tail} inconsistent; resynchronised");
            wr(r + 64, head);
            break;
        }
        fence(Ordering::SeqCst);
        let slot = r + 128 + (tail % SLOTS) * SLOT_BYTES;
        let len = rd(slot);
        let mut hdr = [0u8; HEADER_LEN];
        let mut used = 1;
        if (HEADER_LEN as u64..=SLOT_BYTES - 8).contains(&len) {
            // SAFETY: reading the header of a published slot inside the BAR.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    (slot + 8) as *const u8,
                    hdr.as_mut_ptr(),
                    HEADER_LEN,
                )
            };
            match WireHeader::decode(&hdr, &limits) {
                Ok(h) if frags(payload_len(&h)) <= head - tail => {
                    used = frags(payload_len(&h));
                    incoming(
                        &h,
                        &Src::Ring {
                            ring: r,
                            first: tail,
                        },
                    );
                }
                Ok(h) => kprintln!("qk: dropped a message whose fragments are missing: {h:?}"),
                Err(e) => kprintln!("qk: dropped a malformed message: {e:?}"),
            }
        } else {
            kprintln!("qk: dropped a ring slot with length {len}");
        }
        fence(Ordering::SeqCst);
        wr(r + 64, tail + used);
    }
    fabric().polling = false;
}

fn local_slot(id: ProcessId) -> Option<usize> {
    if id.group != JOB || id.rank / RANKS_PER_NODE != fabric().node {
        return None;
    }
    slot_of(u64::from(id.rank % RANKS_PER_NODE))
}

/// Copies the payload from `src` into the destination segments.
fn deposit(slot: usize, segs: &[Segment], src: &Src) -> Result<(), ()> {
    let mut bounce = [0u8; 1024];
    for s in segs {
        let mut done = 0u64;
        while done < s.len {
            let n = (s.len - done).min(bounce.len() as u64) as usize;
            src.read(s.msg_offset + done, &mut bounce[..n])?;
            mm::copy_out(slot, s.addr + done, &bounce[..n]).map_err(|_| ())?;
            done += n as u64;
        }
    }
    Ok(())
}

/// One message arrived: match it, deposit the bytes (or, for a get, send the
/// reply with the bytes), post and hand out the event, send any ack.
fn incoming(h: &WireHeader, src: &Src) {
    let Some(slot) = local_slot(h.dst)
        .filter(|&s| matches!(k().procs[s].state, State::Ready | State::Blocked(_)))
    else {
        kprintln!(
            "qk: dropped a message for {:?}: no such process here",
            h.dst
        );
        return;
    };
    let Some(ep) = endpoints()[slot].as_mut() else {
        kprintln!(
            "qk: dropped a message for pid {}: it has no portals",
            pid_of(slot)
        );
        return;
    };
    let plan = match ep.engine.deliver(h) {
        Ok(p) => p,
        Err(d) => {
            kprintln!(
                "qk: portals dropped a message for pid {}: {}",
                pid_of(slot),
                d.reason.name()
            );
            wake(slot);
            return;
        }
    };
    let mut segs = [Segment {
        addr: 0,
        len: 0,
        msg_offset: 0,
    }; MAX_SEGS];
    let nsegs = match ep.engine.write_segments(&plan.body, &mut segs) {
        Ok(n) => n,
        Err(e) => {
            kprintln!("qk: cannot lay out a body for pid {}: {e:?}", pid_of(slot));
            0
        }
    };
    let segs = &segs[..nsegs];
    if let Some(at) = plan.header_at {
        if mm::copy_out(slot, at, &h.encode()).is_err() {
            kprintln!("qk: saving a header into pid {} faulted", pid_of(slot));
        }
    }
    if matches!(h.op, Op::Put | Op::Reply) && deposit(slot, segs, src).is_err() {
        kprintln!(
            "qk: deposit into pid {} faulted; message lost",
            pid_of(slot)
        );
    }
    // `ep` is not used past this point: replies may re-enter the engine.
    match plan.response {
        Response::Reply(r) => {
            if let Err(e) = send(&r, &Src::Proc { slot, segs }) {
                fabric().lost += 1;
                kprintln!("qk: reply to {:?} not sent ({e})", r.dst);
            }
        }
        Response::Ack(a) => {
            if let Err(e) = send(&a, &Src::Empty) {
                fabric().lost += 1;
                kprintln!("qk: ack to {:?} not sent ({e})", a.dst);
            }
        }
        Response::None => {}
    }
    // The receiving process is not running while its message lands: it is
    // blocked, or another process is current, or the kernel is idle.
    let p = &mut k().procs[slot];
    if matches!(p.state, State::Blocked(_)) || k().current != slot {
        p.deposits_while_blocked += 1;
    }
    wake(slot);
}

/// If `slot` waits for an event and one is queued, hand it over and make it ready.
fn wake(slot: usize) {
    if let State::Blocked(Wait::Event(buf)) = k().procs[slot].state {
        if let Some(r) = eq_poll(slot, buf) {
            k().procs[slot].frame.rax = r as u64;
            k().procs[slot].state = State::Ready;
        }
    }
}

/// Drops the process's portals state when it ends.
pub fn forget(slot: usize) {
    endpoints()[slot] = None;
}

/// The caller's portals, created on first use: one event queue that every
/// portal and descriptor posts to, every portal enabled with an access
/// control entry admitting the job.
fn endpoint(slot: usize) -> Result<&'static mut Endpoint, i64> {
    if endpoints()[slot].is_none() {
        create_endpoint(slot)?;
    }
    endpoints()[slot].as_mut().ok_or(abi::ENOMEM)
}

/// Builds a process's engine. Kept out of line: the engine is built on the
/// stack before it moves into its static slot (tens of KiB of frame), and
/// only the first portals call of a process needs that frame; the delivery
/// path (nested sends, replies) must not carry it.
#[inline(never)]
#[cold]
fn create_endpoint(slot: usize) -> Result<(), i64> {
    let id = ProcessId::new(JOB, fabric().node * RANKS_PER_NODE + pid_of(slot) as u32);
    let mut engine = Engine::with_store(Store::config(id, MAX_MESSAGE), Store::new())
        .map_err(|_| abi::ENOMEM)?;
    let eq = engine.eq_alloc(64).map_err(|_| abi::ENOMEM)?;
    for p in 0..PORTALS {
        engine
            .portal_set_eq(p, Some(eq))
            .and_then(|_| engine.portal_set_acl(p, Acl::job(JOB)))
            .and_then(|_| engine.portal_enable(p))
            .map_err(|_| abi::ENOMEM)?;
    }
    endpoints()[slot] = Some(Endpoint { engine, eq });
    Ok(())
}

fn engine_err(e: portals::Error) -> i64 {
    match e {
        portals::Error::Exhausted { .. } => abi::ENOMEM,
        portals::Error::StaleHandle(_) => abi::ENOENT,
        _ => abi::EINVAL,
    }
}

/// Encodes a handle for user space (non-negative).
fn cookie(c: u64) -> i64 {
    (c & (i64::MAX as u64)) as i64
}

/// The rank of `(node, pid)`, or `ANY` when either is `u64::MAX`.
fn rank_of(node: u64, pid: u64) -> Result<u32, i64> {
    if node == u64::MAX || pid == u64::MAX {
        return Ok(portals::ANY);
    }
    if node >= nodes() || pid >= u64::from(RANKS_PER_NODE) {
        return Err(abi::EINVAL);
    }
    Ok((node * u64::from(RANKS_PER_NODE) + pid) as u32)
}

/// `ptl_me_append(portal, &MeSpec)`: a match entry with its own single,
/// sender-managed descriptor (the simple form).
pub fn me_append(cur: usize, portal: u64, spec: u64) -> i64 {
    let s: abi::MeSpec = match mm::read_pod(cur, spec) {
        Ok(s) => s,
        Err(_) => return abi::EFAULT,
    };
    if portal >= u64::from(PORTALS) {
        return abi::EINVAL;
    }
    if mm::check(cur, s.buf, s.len).is_err() {
        return abi::EFAULT;
    }
    let rank = match rank_of(s.source_node, s.source_pid) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let ep = match endpoint(cur) {
        Ok(e) => e,
        Err(e) => return e,
    };
    let e = &mut ep.engine;
    let md = match e.md_create(&MdSpec {
        kind: MdKind::Single {
            region: Region::new(s.buf, s.len),
            offset: OffsetMode::Sender,
        },
        options: MdOptions::PUT,
        eq: None,
    }) {
        Ok(m) => m,
        Err(err) => return engine_err(err),
    };
    let mut m = MatchSpec::new(s.match_bits).ignore(s.ignore_bits);
    if rank != portals::ANY {
        m = m.from(JOB, rank);
    }
    match e.me_append(portal as u32, m, md) {
        Ok(h) => cookie(h.to_cookie()),
        Err(err) => {
            let _ = e.md_release(md);
            engine_err(err)
        }
    }
}

/// `ptl_md(op, a, b)`: create, release, or free in a dynamic heap.
pub fn md(cur: usize, op: u64, a: u64, b: u64) -> i64 {
    match op {
        abi::MD_CREATE => md_create(cur, a),
        abi::MD_RELEASE | abi::MD_FREE => {
            let ep = match endpoint(cur) {
                Ok(e) => e,
                Err(e) => return e,
            };
            let h = MdHandle::from_cookie(a);
            let r = if op == abi::MD_RELEASE {
                ep.engine.md_release(h)
            } else {
                ep.engine.md_free(h, b)
            };
            r.map_or_else(engine_err, |_| 0)
        }
        _ => abi::EINVAL,
    }
}

fn md_create(cur: usize, desc: u64) -> i64 {
    let d: abi::MdDesc = match mm::read_pod(cur, desc) {
        Ok(d) => d,
        Err(_) => return abi::EFAULT,
    };
    let options = MdOptions {
        put: d.options & abi::MDO_PUT != 0,
        get: d.options & abi::MDO_GET != 0,
        ack: d.options & abi::MDO_ACK != 0,
        truncate: d.options & abi::MDO_TRUNCATE != 0,
    };
    let offset = if d.options & abi::MDO_RECEIVER_OFFSET != 0 {
        OffsetMode::Receiver
    } else {
        OffsetMode::Sender
    };
    let save = match d.save {
        abi::SAVE_HEADER => Save::Header,
        abi::SAVE_BODY => Save::Body,
        abi::SAVE_BOTH => Save::Both,
        _ => return abi::EINVAL,
    };
    let mut blocks = [Region::EMPTY; abi::MAX_BLOCKS];
    let nblocks = d.nblocks as usize;
    if matches!(d.kind, abi::MD_INDEPENDENT | abi::MD_COMBINED) {
        if nblocks == 0 || nblocks > abi::MAX_BLOCKS {
            return abi::EINVAL;
        }
        for (i, b) in blocks[..nblocks].iter_mut().enumerate() {
            let pair: [u64; 2] = match mm::read_pod(cur, d.blocks.wrapping_add(16 * i as u64)) {
                Ok(p) => p,
                Err(_) => return abi::EFAULT,
            };
            if mm::check(cur, pair[0], pair[1]).is_err() {
                return abi::EFAULT;
            }
            *b = Region::new(pair[0], pair[1]);
        }
    } else if mm::check(cur, d.buf, d.len).is_err() {
        return abi::EFAULT;
    }
    let region = Region::new(d.buf, d.len);
    let kind = match d.kind {
        abi::MD_SINGLE => MdKind::Single { region, offset },
        abi::MD_INDEPENDENT => MdKind::Independent {
            blocks: &blocks[..nblocks],
            circular: d.options & abi::MDO_CIRCULAR != 0,
            save,
        },
        abi::MD_COMBINED => MdKind::Combined {
            blocks: &blocks[..nblocks],
            offset,
        },
        abi::MD_DYNAMIC => MdKind::Dynamic {
            region,
            save,
            max_messages: d.max_messages.min(32) as u32,
        },
        _ => return abi::EINVAL,
    };
    let ep = match endpoint(cur) {
        Ok(e) => e,
        Err(e) => return e,
    };
    let eq = Some(ep.eq);
    ep.engine
        .md_create(&MdSpec { kind, options, eq })
        .map_or_else(engine_err, |h| cookie(h.to_cookie()))
}

/// `ptl_me(op, a, &MeDesc)`: append, insert before/after, unlink, set links.
pub fn me(cur: usize, op: u64, a: u64, desc: u64) -> i64 {
    let ep = match endpoint(cur) {
        Ok(e) => e,
        Err(e) => return e,
    };
    if op == abi::ME_UNLINK {
        return ep
            .engine
            .me_unlink(MatchHandle::from_cookie(a))
            .map_or_else(engine_err, |_| 0);
    }
    if op == abi::ME_SET_LINKS {
        let l: abi::MeLinks = match mm::read_pod(cur, desc) {
            Ok(l) => l,
            Err(_) => return abi::EFAULT,
        };
        let link = |v: u64| match v {
            abi::LINK_NEXT => Link::Next,
            abi::LINK_END => Link::End,
            h => Link::Entry(MatchHandle::from_cookie(h)),
        };
        return ep
            .engine
            .me_set_links(
                MatchHandle::from_cookie(a),
                link(l.too_long),
                link(l.invalid),
            )
            .map_or_else(engine_err, |_| 0);
    }
    let d: abi::MeDesc = match mm::read_pod(cur, desc) {
        Ok(d) => d,
        Err(_) => return abi::EFAULT,
    };
    let rank = match rank_of(d.source_node, d.source_pid) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let mut m = MatchSpec::new(d.match_bits).ignore(d.ignore_bits);
    if rank != portals::ANY {
        m = m.from(JOB, rank);
    }
    if d.threshold != 0 {
        m = m.threshold(d.threshold.min(u64::from(u32::MAX)) as u32);
    }
    let md = MdHandle::from_cookie(d.md);
    let r = match op {
        abi::ME_APPEND if a < u64::from(PORTALS) => ep.engine.me_append(a as u32, m, md),
        abi::ME_INSERT_BEFORE | abi::ME_INSERT_AFTER => {
            let pos = if op == abi::ME_INSERT_BEFORE {
                Position::Before
            } else {
                Position::After
            };
            ep.engine.me_insert(MatchHandle::from_cookie(a), pos, m, md)
        }
        _ => return abi::EINVAL,
    };
    r.map_or_else(engine_err, |h| cookie(h.to_cookie()))
}

/// `ptl_portal(op, portal, &AclDesc)`: enable, disable, access control.
pub fn portal(cur: usize, op: u64, portal: u64, acl: u64) -> i64 {
    if portal >= u64::from(PORTALS) {
        return abi::EINVAL;
    }
    let p = portal as u32;
    let r = match op {
        abi::PORTAL_ENABLE | abi::PORTAL_DISABLE => {
            let ep = match endpoint(cur) {
                Ok(e) => e,
                Err(e) => return e,
            };
            if op == abi::PORTAL_ENABLE {
                ep.engine.portal_enable(p)
            } else {
                ep.engine.portal_disable(p)
            }
        }
        abi::PORTAL_ACL => {
            let d: abi::AclDesc = match mm::read_pod(cur, acl) {
                Ok(d) => d,
                Err(_) => return abi::EFAULT,
            };
            let rank = match rank_of(d.node, d.pid) {
                Ok(r) => r,
                Err(e) => return e,
            };
            let group = if d.job == u64::MAX {
                portals::ANY
            } else {
                d.job.min(u64::from(u32::MAX - 1)) as u32
            };
            let ep = match endpoint(cur) {
                Ok(e) => e,
                Err(e) => return e,
            };
            ep.engine.portal_set_acl(
                p,
                Acl {
                    group,
                    rank,
                    put: d.put != 0,
                    get: d.get != 0,
                },
            )
        }
        _ => return abi::EINVAL,
    };
    r.map_or_else(engine_err, |_| 0)
}

/// The target process id of `(node, pid)`.
fn target(node: u64, pid: u64) -> Result<ProcessId, i64> {
    if node >= nodes() || pid == 0 || pid >= u64::from(RANKS_PER_NODE) {
        return Err(abi::EINVAL);
    }
    Ok(ProcessId::new(
        JOB,
        (node * u64::from(RANKS_PER_NODE) + pid) as u32,
    ))
}

/// `ptl_put(&PutSpec)`: one copy from the sender's memory into the fabric
/// (or straight into the local receiver's descriptor).
pub fn put(cur: usize, spec: u64) -> i64 {
    let s: abi::PutSpec = match mm::read_pod(cur, spec) {
        Ok(s) => s,
        Err(_) => return abi::EFAULT,
    };
    if s.len > MAX_MESSAGE || s.portal >= u64::from(PORTALS) {
        return abi::EINVAL;
    }
    let target = match target(s.node, s.pid) {
        Ok(t) => t,
        Err(e) => return e,
    };
    let from_md = s.flags & abi::PUT_FROM_MD != 0;
    let ack = s.flags & abi::PUT_ACK != 0;
    if ack && !from_md {
        return abi::EINVAL;
    }
    if !from_md && mm::check(cur, s.buf, s.len).is_err() {
        return abi::EFAULT;
    }
    let ep = match endpoint(cur) {
        Ok(e) => e,
        Err(e) => return e,
    };
    let e = &mut ep.engine;
    let (md, local_offset) = if from_md {
        (MdHandle::from_cookie(s.md), s.local_offset)
    } else {
        match e.md_create(&MdSpec {
            kind: MdKind::Single {
                region: Region::new(s.buf, s.len),
                offset: OffsetMode::Sender,
            },
            options: MdOptions::PUT,
            eq: None,
        }) {
            Ok(m) => (m, 0),
            Err(err) => return engine_err(err),
        }
    };
    let plan = e.prepare_put(&PutArgs {
        md,
        local_offset,
        length: s.len,
        target,
        portal: s.portal as u32,
        match_bits: s.match_bits,
        remote_offset: s.remote_offset,
        ack,
        hdr_data: s.hdr_data,
    });
    let mut segs = [Segment {
        addr: 0,
        len: 0,
        msg_offset: 0,
    }; MAX_SEGS];
    let r = match plan {
        Err(err) => Err(engine_err(err)),
        Ok(plan) => match e.write_segments(&plan.body, &mut segs) {
            Err(err) => Err(engine_err(err)),
            Ok(n) => Ok((plan.header, n)),
        },
    };
    // Sending may drain the ring and re-enter engines: no borrow held across.
    let r = match r {
        Ok((header, n)) => send(
            &header,
            &Src::Proc {
                slot: cur,
                segs: &segs[..n],
            },
        )
        .map(|_| 0),
        Err(e) => Err(e),
    };
    if !from_md {
        if let Some(ep) = endpoints()[cur].as_mut() {
            let _ = ep.engine.md_release(md);
        }
    }
    r.unwrap_or_else(|e| e)
}

/// `ptl_get(&GetSpec)`: ask the target for bytes; the reply lands in the
/// caller's descriptor and posts a reply event.
pub fn get(cur: usize, spec: u64) -> i64 {
    let s: abi::GetSpec = match mm::read_pod(cur, spec) {
        Ok(s) => s,
        Err(_) => return abi::EFAULT,
    };
    if s.len > MAX_MESSAGE || s.portal >= u64::from(PORTALS) {
        return abi::EINVAL;
    }
    let target = match target(s.node, s.pid) {
        Ok(t) => t,
        Err(e) => return e,
    };
    let ep = match endpoint(cur) {
        Ok(e) => e,
        Err(e) => return e,
    };
    let plan = ep.engine.prepare_get(&GetArgs {
        md: MdHandle::from_cookie(s.md),
        local_offset: s.local_offset,
        length: s.len,
        target,
        portal: s.portal as u32,
        match_bits: s.match_bits,
        remote_offset: s.remote_offset,
        hdr_data: s.hdr_data,
    });
    match plan {
        Err(e) => engine_err(e),
        Ok(plan) => send(&plan.header, &Src::Empty).map_or_else(|e| e, |_| 0),
    }
}

/// `ptl_counters(&mut Counters)`.
pub fn counters(cur: usize, out: u64) -> i64 {
    let (lost, waits) = (fabric().lost, fabric().waits);
    let ep = match endpoint(cur) {
        Ok(e) => e,
        Err(e) => return e,
    };
    let c = ep.engine.counters();
    let mut u = abi::Counters {
        delivered: c.delivered,
        bytes: c.bytes,
        eq_overflows: c.eq_overflows,
        fabric_lost: lost,
        fabric_waits: waits,
        ..Default::default()
    };
    for (r, n) in c.iter_drops() {
        if let Some(d) = u.drops.get_mut(r as usize) {
            *d = n;
        }
    }
    mm::write_pod(cur, out, &u).map_or(abi::EFAULT, |_| 0)
}

/// `ptl_eq_wait`: drain the fabric first, then look for an event.
pub fn poll_then_eq(cur: usize, out: u64) -> Option<i64> {
    poll();
    eq_poll(cur, out)
}

/// `ptl_eq_wait(&mut Event)` without blocking: `Some(result)` if an event was
/// handed over (or the call failed), `None` if the caller must wait.
pub fn eq_poll(cur: usize, out: u64) -> Option<i64> {
    if mm::check(cur, out, core::mem::size_of::<abi::Event>() as u64).is_err() {
        return Some(abi::EFAULT);
    }
    let deposits = k().procs[cur].deposits_while_blocked;
    let ep = match endpoint(cur) {
        Ok(e) => e,
        Err(e) => return Some(e),
    };
    for _ in 0..128 {
        match ep.engine.eq_get(ep.eq) {
            Ok(Some(ev)) => {
                let kind = match ev.kind {
                    EventKind::Put => abi::EV_PUT,
                    EventKind::Get => abi::EV_GET,
                    EventKind::Reply => abi::EV_REPLY,
                    EventKind::Ack => abi::EV_ACK,
                    EventKind::Unlink => abi::EV_UNLINK,
                    EventKind::Discard => abi::EV_DISCARD,
                    EventKind::Send => continue,
                };
                let u = abi::Event {
                    kind,
                    portal: u64::from(ev.portal),
                    match_bits: ev.match_bits,
                    offset: ev.offset,
                    len: ev.mlength,
                    src_node: u64::from(ev.initiator.rank / RANKS_PER_NODE),
                    src_pid: u64::from(ev.initiator.rank % RANKS_PER_NODE),
                    hdr_data: ev.hdr_data,
                    deposited_while_blocked: deposits,
                    rlength: ev.rlength,
                    md: ev.md.to_cookie() & (i64::MAX as u64),
                    reason: ev.reason.map_or(u64::MAX, |r| r as u64),
                    truncated: u64::from(ev.truncated),
                };
                return Some(mm::write_pod(cur, out, &u).map_or(abi::EFAULT, |_| 0));
            }
            Ok(None) => return None,
            // Lost events are reported once; the next call returns the next event.
            Err(portals::Error::EventsDropped(_)) => continue,
            Err(_) => return Some(abi::EINVAL),
        }
    }
    None
}
