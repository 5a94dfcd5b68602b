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
//! by the owner), then `SLOTS` slots of `SLOT_BYTES`: a length word, the
//! 80-byte wire header, the payload.
use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

use metal_rt::abi;
use portals::{
    Acl, ArrayStore, Engine, EqHandle, EventKind, MatchSpec, MdKind, MdOptions, MdSpec, OffsetMode,
    ProcessId, PutArgs, Region, WireHeader, HEADER_LEN,
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

type Store = ArrayStore<4, 8, 8, 8, 2, 32, 8>;

struct Endpoint {
    engine: Engine<Store>,
    eq: EqHandle,
    enabled: [bool; PORTALS as usize],
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
const SLOTS: u64 = 48;
const SLOT_BYTES: u64 = 4096;
const RING_BYTES: u64 = 128 + SLOTS * SLOT_BYTES;
/// Largest payload one message carries.
pub const MAX_PAYLOAD: u64 = SLOT_BYTES - 8 - HEADER_LEN as u64;

struct Fabric {
    node: u32,
    nodes: u32,
    shm: u64,
}

static mut FABRIC: Fabric = Fabric {
    node: 0,
    nodes: 1,
    shm: 0,
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

/// Puts `header` + payload into `dst`'s inbound ring. False if the ring is full.
fn send_remote(dst: u32, header: &[u8; HEADER_LEN], payload: &[u8]) -> bool {
    let r = ring(dst);
    let head = rd(r);
    let tail = rd(r + 64);
    if head - tail >= SLOTS {
        return false;
    }
    let slot = r + 128 + (head % SLOTS) * SLOT_BYTES;
    wr(slot, (HEADER_LEN + payload.len()) as u64);
    // SAFETY: the slot is SLOT_BYTES long inside the BAR and the length is
    // bounded by MAX_PAYLOAD; the consumer does not read it until head moves.
    unsafe {
        core::ptr::copy_nonoverlapping(header.as_ptr(), (slot + 8) as *mut u8, HEADER_LEN);
        core::ptr::copy_nonoverlapping(
            payload.as_ptr(),
            (slot + 8 + HEADER_LEN as u64) as *mut u8,
            payload.len(),
        );
    }
    fence(Ordering::SeqCst);
    wr(r, head + 1);
    true
}

/// Drains this node's inbound ring: every message is delivered (or dropped)
/// through the destination process's portals engine.
pub fn poll() {
    let f = fabric();
    if f.nodes < 2 {
        return;
    }
    let r = ring(f.node);
    let mut buf = [0u8; SLOT_BYTES as usize];
    loop {
        let tail = rd(r + 64);
        if tail == rd(r) {
            return;
        }
        fence(Ordering::SeqCst);
        let slot = r + 128 + (tail % SLOTS) * SLOT_BYTES;
        let len = rd(slot).min(SLOT_BYTES - 8) as usize;
        // SAFETY: reading `len` bytes of a published slot inside the BAR.
        unsafe { core::ptr::copy_nonoverlapping((slot + 8) as *const u8, buf.as_mut_ptr(), len) };
        fence(Ordering::SeqCst);
        wr(r + 64, tail + 1);
        if len >= HEADER_LEN {
            incoming(&buf[..HEADER_LEN], &buf[HEADER_LEN..len]);
        }
    }
}

fn local_slot(id: ProcessId) -> Option<usize> {
    if id.group != JOB || id.rank / RANKS_PER_NODE != fabric().node {
        return None;
    }
    slot_of(u64::from(id.rank % RANKS_PER_NODE))
}

/// One message arrived: match it, deposit the bytes, post and hand out the event.
fn incoming(hdr: &[u8], payload: &[u8]) {
    let limits = portals::Limits {
        portals: PORTALS,
        max_message: MAX_PAYLOAD,
    };
    let h = match WireHeader::decode(hdr, &limits) {
        Ok(h) => h,
        Err(e) => {
            kprintln!("qk: dropped a malformed message: {e:?}");
            return;
        }
    };
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
    let plan = match ep.engine.deliver(&h) {
        Ok(p) => p,
        Err(d) => {
            kprintln!(
                "qk: portals dropped a message for pid {}: {}",
                pid_of(slot),
                d.reason.name()
            );
            return;
        }
    };
    if let Ok(segs) = ep.engine.segments(&plan.body) {
        for s in segs {
            let from = s.msg_offset as usize;
            let to = (from + s.len as usize).min(payload.len());
            if from < to && mm::copy_out(slot, s.addr, &payload[from..to]).is_err() {
                kprintln!(
                    "qk: deposit into pid {} at {:#x} faulted; message lost",
                    pid_of(slot),
                    s.addr
                );
            }
        }
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

fn endpoint(slot: usize) -> Result<&'static mut Endpoint, i64> {
    let eps = endpoints();
    if eps[slot].is_none() {
        let id = ProcessId::new(JOB, fabric().node * RANKS_PER_NODE + pid_of(slot) as u32);
        let mut engine = Engine::with_store(Store::config(id, MAX_PAYLOAD), Store::new())
            .map_err(|_| abi::ENOMEM)?;
        let eq = engine.eq_alloc(32).map_err(|_| abi::ENOMEM)?;
        eps[slot] = Some(Endpoint {
            engine,
            eq,
            enabled: [false; PORTALS as usize],
        });
    }
    eps[slot].as_mut().ok_or(abi::ENOMEM)
}

/// `ptl_me_append(portal, &MeSpec)`.
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
    let ep = match endpoint(cur) {
        Ok(e) => e,
        Err(e) => return e,
    };
    let p = portal as u32;
    let e = &mut ep.engine;
    if !ep.enabled[p as usize] {
        if e.portal_set_eq(p, Some(ep.eq)).is_err()
            || e.portal_set_acl(p, Acl::job(JOB)).is_err()
            || e.portal_enable(p).is_err()
        {
            return abi::EINVAL;
        }
        ep.enabled[p as usize] = true;
    }
    let md = match e.md_create(&MdSpec {
        kind: MdKind::Single {
            region: Region::new(s.buf, s.len),
            offset: OffsetMode::Sender,
        },
        options: MdOptions::PUT,
        eq: None,
    }) {
        Ok(m) => m,
        Err(_) => return abi::ENOMEM,
    };
    let mut m = MatchSpec::new(s.match_bits).ignore(s.ignore_bits);
    if s.source_node != u64::MAX || s.source_pid != u64::MAX {
        let rank = if s.source_node == u64::MAX || s.source_pid == u64::MAX {
            portals::ANY
        } else {
            (s.source_node * u64::from(RANKS_PER_NODE) + s.source_pid) as u32
        };
        m = m.from(JOB, rank);
    }
    match e.me_append(p, m, md) {
        Ok(h) => (h.to_cookie() & (i64::MAX as u64)) as i64,
        Err(_) => {
            let _ = e.md_release(md);
            abi::ENOMEM
        }
    }
}

/// `ptl_put(&PutSpec)`: one copy from the sender into the fabric.
pub fn put(cur: usize, spec: u64) -> i64 {
    let s: abi::PutSpec = match mm::read_pod(cur, spec) {
        Ok(s) => s,
        Err(_) => return abi::EFAULT,
    };
    if s.len > MAX_PAYLOAD || s.node >= nodes() || s.pid == 0 || s.pid > RANKS_PER_NODE as u64 {
        return abi::EINVAL;
    }
    let mut payload = [0u8; MAX_PAYLOAD as usize];
    let payload = &mut payload[..s.len as usize];
    if mm::copy_in(cur, s.buf, payload).is_err() {
        return abi::EFAULT;
    }
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
        Err(_) => return abi::ENOMEM,
    };
    let target = ProcessId::new(JOB, (s.node * u64::from(RANKS_PER_NODE) + s.pid) as u32);
    let plan = e.prepare_put(&PutArgs {
        md,
        local_offset: 0,
        length: s.len,
        target,
        portal: s.portal as u32,
        match_bits: s.match_bits,
        remote_offset: 0,
        ack: false,
        hdr_data: s.hdr_data,
    });
    let r = match plan {
        Err(_) => abi::EINVAL,
        Ok(plan) => {
            let hdr = plan.header.encode();
            let _ = e.sent(&plan);
            if s.node == node() {
                incoming(&hdr, payload);
                0
            } else if send_remote(s.node as u32, &hdr, payload) {
                0
            } else {
                abi::ENOMEM
            }
        }
    };
    let _ = e.md_release(md);
    r
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
    for _ in 0..64 {
        match ep.engine.eq_get(ep.eq) {
            Ok(Some(ev)) => {
                let kind = match ev.kind {
                    EventKind::Put => 1,
                    EventKind::Send => continue,
                    EventKind::Unlink => continue,
                    _ => 2,
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
