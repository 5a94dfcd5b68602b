//! Processes and the scheduler mechanism. The policy (single-tasking or
//! round-robin) is chosen by the PCT through `sched_policy`; the kernel only
//! enforces it. One trap stack, no kernel threads: every entry runs to
//! completion and returns to whichever process the scheduler picks.
use core::ptr::addr_of_mut;
use metal_rt::abi::{self, WaitRecord, PAGE, USER_END};

use crate::arch::{self, Frame, VEC_SYSCALL, VEC_TIMER};
use crate::{images, kprintln, mm, net, syscall};

/// Process slots (PCT + applications). Static size, like everything in the QK.
pub const MAX_PROCS: usize = 4;

/// Why a process is not running.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Wait {
    /// In `proc_wait`, with the user address of the record to fill.
    Child(u64),
    /// In `ptl_eq_wait`, with the user address of the event to fill.
    Event(u64),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum State {
    Free,
    /// Created by the PCT, address space being built.
    Embryo,
    Ready,
    Blocked(Wait),
    /// Ended; its record waits for the PCT's `proc_wait`.
    Zombie,
}

#[derive(Clone, Copy)]
pub struct Proc {
    pub state: State,
    pub pct: bool,
    pub cr3: u64,
    pub frame: Frame,
    pub name: [u8; 16],
    pub record: WaitRecord,
    /// Deposits the kernel made for this process while it was not running.
    pub deposits_while_blocked: u64,
}

impl Proc {
    const EMPTY: Proc = Proc {
        state: State::Free,
        pct: false,
        cr3: 0,
        frame: Frame::user(0, 0, 0),
        name: [0; 16],
        record: WaitRecord {
            pid: 0,
            kind: 0,
            status: 0,
            addr: 0,
            rip: 0,
            error: 0,
        },
        deposits_while_blocked: 0,
    };

    pub fn name(&self) -> &str {
        let n = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        core::str::from_utf8(&self.name[..n]).unwrap_or("?")
    }
}

/// Global kernel state. Accessed only from the single, non-reentrant kernel path.
pub struct Kernel {
    pub procs: [Proc; MAX_PROCS],
    pub current: usize,
    pub policy: u64,
    pub quantum_us: u64,
    pub timer_on: bool,
    pub ticks: u64,
}

static mut KERNEL: Kernel = Kernel {
    procs: [Proc::EMPTY; MAX_PROCS],
    current: 0,
    policy: abi::POLICY_SINGLE,
    quantum_us: 10_000,
    timer_on: false,
    ticks: 0,
};

/// The kernel state. Sound because the kernel runs with interrupts off on one
/// core and never re-enters itself; callers must not hold two results at once.
pub fn k() -> &'static mut Kernel {
    // SAFETY: see above: exactly one kernel control path exists at any time,
    // and callers use the reference only within one entry.
    unsafe { &mut *addr_of_mut!(KERNEL) }
}

/// Pid as seen by user space: slot index + 1 (0 means "self" in calls).
pub fn pid_of(slot: usize) -> u64 {
    slot as u64 + 1
}

/// Slot for a user-given pid.
pub fn slot_of(pid: u64) -> Option<usize> {
    let s = usize::try_from(pid.checked_sub(1)?).ok()?;
    (s < MAX_PROCS).then_some(s)
}

/// Allocates a process slot with an empty address space.
pub fn create(name: &[u8], pct: bool) -> Option<usize> {
    let kk = k();
    let slot = kk.procs.iter().position(|p| p.state == State::Free)?;
    let cr3 = mm::space_init(slot);
    let p = &mut kk.procs[slot];
    *p = Proc::EMPTY;
    p.state = State::Embryo;
    p.pct = pct;
    p.cr3 = cr3;
    let n = name.len().min(15);
    p.name[..n].copy_from_slice(&name[..n]);
    Some(slot)
}

/// Ends process `slot` and reports it to the PCT (or shuts down if it was the PCT).
pub fn end(slot: usize, rec: WaitRecord) {
    let kk = k();
    if kk.procs[slot].pct {
        kprintln!(
            "qk: the PCT ended (kind {} status {}); nothing left to run",
            rec.kind,
            rec.status
        );
        crate::shutdown(if rec.kind == 0 && rec.status == 0 {
            0x10
        } else {
            0x11
        });
    }
    mm::unmap_all(slot);
    net::forget(slot);
    kk.procs[slot].state = State::Zombie;
    kk.procs[slot].record = rec;
    // Wake a PCT blocked in proc_wait.
    if let Some(pct) = kk.procs.iter().position(|p| p.pct) {
        if let State::Blocked(Wait::Child(buf)) = kk.procs[pct].state {
            let r = reap(pct, slot, buf);
            kk.procs[pct].frame.rax = r as u64;
            kk.procs[pct].state = State::Ready;
        }
    }
}

/// Hands a zombie's record to the PCT at `buf` and frees the slot.
pub fn reap(pct: usize, slot: usize, buf: u64) -> i64 {
    let rec = k().procs[slot].record;
    k().procs[slot].state = State::Free;
    match mm::write_pod(pct, buf, &rec) {
        Ok(()) => rec.pid as i64,
        Err(_) => abi::EFAULT,
    }
}

/// Loads the PCT image (the only ELF the kernel loads itself) and runs it.
pub fn start_pct() -> ! {
    let Some(&(_, img)) = images::IMAGES.iter().find(|(n, _)| *n == "pct") else {
        kprintln!("qk: no PCT image embedded (build with metal/build.sh)");
        crate::shutdown(0x12);
    };
    let Some(slot) = create(b"pct", true) else {
        crate::shutdown(0x12)
    };
    let entry = match load_elf(slot, img) {
        Ok(e) => e,
        Err(m) => {
            kprintln!("qk: cannot load the PCT: {m}");
            crate::shutdown(0x12);
        }
    };
    let stack_top = USER_END;
    if mm::map(slot, stack_top - PAGE, PAGE).is_err() {
        crate::shutdown(0x12);
    }
    let kk = k();
    kk.procs[slot].frame = Frame::user(entry, stack_top - 64, 0);
    kk.procs[slot].state = State::Ready;
    kk.current = slot;
    kprintln!("qk: starting PCT (pid {}), entry {entry:#x}", pid_of(slot));
    // SAFETY: the process's tables map the kernel exactly like the boot tables.
    unsafe { arch::load_cr3(kk.procs[slot].cr3) };
    arch::enter_user(&kk.procs[slot].frame)
}

fn load_elf(slot: usize, img: &[u8]) -> Result<u64, &'static str> {
    let h = metal_elf::header(img).map_err(|e| e.as_str())?;
    for i in 0..u64::from(h.phnum) {
        let off = usize::try_from(h.phoff + i * u64::from(h.phentsize)).map_err(|_| "bad phoff")?;
        let ph = img
            .get(off..off + metal_elf::PHDR_SIZE)
            .ok_or("truncated program headers")?;
        if let Some(s) = metal_elf::segment(ph, img.len() as u64).map_err(|e| e.as_str())? {
            mm::map(slot, s.vaddr, s.memsz)
                .map_err(|_| "segment outside the user region or no memory")?;
            let data = &img[s.offset as usize..(s.offset + s.filesz) as usize];
            mm::copy_out(slot, s.vaddr, data).map_err(|_| "copy failed")?;
        }
    }
    Ok(h.entry)
}

/// Every kernel entry from ring 3 lands here with the saved user context.
/// On return, `f` holds the context of the process to resume.
pub extern "C" fn trap(f: &mut Frame) {
    if f.cs & 3 == 0 {
        kprintln!(
            "qk: exception {} in kernel mode at rip {:#x}, error {:#x}, cr2 {:#x}",
            f.vector,
            f.rip,
            f.error,
            arch::cr2()
        );
        crate::shutdown(0x7e);
    }
    let cur = k().current;
    k().procs[cur].frame = *f;
    match f.vector {
        VEC_SYSCALL => syscall::dispatch(cur),
        VEC_TIMER => {
            arch::eoi();
            k().ticks += 1;
            if k().policy == abi::POLICY_ROUND_ROBIN {
                rotate(cur);
            }
        }
        33..=47 => {
            if f.vector >= 40 {
                arch::outb(0xA0, 0x20);
            }
            arch::eoi();
        }
        v => {
            let rec = WaitRecord {
                pid: pid_of(cur),
                kind: 1,
                status: v,
                addr: if v == 14 { arch::cr2() } else { 0 },
                rip: f.rip,
                error: f.error,
            };
            kprintln!(
                "qk: pid {} ({}) took exception {v} at rip {:#x} (addr {:#x}); ending it",
                rec.pid,
                k().procs[cur].name(),
                rec.rip,
                rec.addr
            );
            end(cur, rec);
        }
    }
    let next = schedule();
    let kk = k();
    if next != kk.current || kk.procs[next].cr3 != kk.procs[cur].cr3 {
        // SAFETY: every process's tables map the kernel like the boot tables.
        unsafe { arch::load_cr3(kk.procs[next].cr3) };
    }
    kk.current = next;
    update_timer();
    *f = kk.procs[next].frame;
}

/// Round-robin: move `cur` behind the other ready processes.
fn rotate(cur: usize) {
    let kk = k();
    for d in 1..MAX_PROCS {
        let s = (cur + d) % MAX_PROCS;
        if kk.procs[s].state == State::Ready && !kk.procs[s].pct {
            kk.current = s;
            return;
        }
    }
}

/// Picks the process to resume. Single-tasking: the current one as long as
/// it is ready. When nothing is ready the kernel polls the network (it is the
/// only thing that can make progress) until something is.
fn schedule() -> usize {
    loop {
        let kk = k();
        let cur = kk.current;
        if kk.procs[cur].state == State::Ready {
            return cur;
        }
        // Prefer applications over the PCT, in slot order after the current one.
        let order = (1..=MAX_PROCS).map(|d| (cur + d) % MAX_PROCS);
        if let Some(s) = order
            .clone()
            .find(|&s| kk.procs[s].state == State::Ready && !kk.procs[s].pct)
        {
            return s;
        }
        if let Some(s) = order.clone().find(|&s| kk.procs[s].state == State::Ready) {
            return s;
        }
        if !kk
            .procs
            .iter()
            .any(|p| matches!(p.state, State::Blocked(Wait::Event(_))))
        {
            kprintln!("qk: deadlock: no process can run");
            crate::shutdown(0x13);
        }
        net::poll();
    }
}

/// The tick runs only under round-robin with at least two applications ready.
fn update_timer() {
    let kk = k();
    let apps = kk
        .procs
        .iter()
        .filter(|p| !p.pct && matches!(p.state, State::Ready | State::Blocked(_)))
        .count();
    let want = kk.policy == abi::POLICY_ROUND_ROBIN && apps >= 2;
    if want != kk.timer_on {
        arch::timer(want.then_some(kk.quantum_us));
        kk.timer_on = want;
        if want {
            kprintln!("qk: timer on (round-robin, quantum {} us)", kk.quantum_us);
        } else {
            kprintln!("qk: timer off after {} ticks", kk.ticks);
        }
    }
}
