//! The process control thread (PCT): a ring-3 process with more privileges
//! than applications. It reads its orders from the kernel command line
//! (`run=prog[:arg][,prog[:arg]...] policy=single|rr quantum=<us> arg=<default>`), loads each
//! application ELF through QK calls (create, map, write, start), chooses the
//! scheduling policy, and reports how every application ended, including
//! faults. The QK only enforces; every decision here is policy.
#![no_std]
#![no_main]

use metal_elf::{EHDR_SIZE, PHDR_SIZE};
use metal_ulib::{abi, errname, println, syscall};

const CHUNK: usize = 64 * 1024;
static mut BUF: [u8; CHUNK] = [0; CHUNK];
const STACK_TOP: u64 = abi::USER_END;

fn buf() -> &'static mut [u8; CHUNK] {
    // SAFETY: the PCT is single-threaded and uses BUF from one call at a time.
    unsafe { &mut *core::ptr::addr_of_mut!(BUF) }
}

fn check(what: &str, r: i64) -> Result<u64, ()> {
    if r < 0 {
        println!("pct: {what} failed: {}", errname(r));
        Err(())
    } else {
        Ok(r as u64)
    }
}

/// Loads `name` into a new process and starts it; returns its pid.
fn launch(name: &[u8], arg: u64) -> Result<u64, ()> {
    let nm = core::str::from_utf8(name).unwrap_or("?");
    let idx = check(
        "image_find",
        syscall(
            abi::IMAGE_FIND,
            name.as_ptr() as u64,
            name.len() as u64,
            0,
            0,
        ),
    )
    .inspect_err(|_| println!("pct: no program named '{nm}' in the boot image"))?;
    let b = buf();
    let read = |off: u64, len: usize, b: &mut [u8]| {
        syscall(abi::IMAGE_READ, idx, off, b.as_mut_ptr() as u64, len as u64)
    };
    if check("image_read", read(0, EHDR_SIZE, &mut b[..]))? < EHDR_SIZE as u64 {
        println!("pct: '{nm}' is too short to be an ELF image");
        return Err(());
    }
    let h =
        metal_elf::header(&b[..EHDR_SIZE]).map_err(|e| println!("pct: '{nm}': {}", e.as_str()))?;
    let total = usize::from(h.phnum) * usize::from(h.phentsize);
    if total > 4096 {
        println!("pct: '{nm}': too many program headers");
        return Err(());
    }
    let mut ph = [0u8; 4096];
    if check("image_read", read(h.phoff, total, &mut ph))? < total as u64 {
        println!("pct: '{nm}': program headers truncated");
        return Err(());
    }
    let pid = check(
        "proc_create",
        syscall(
            abi::PROC_CREATE,
            name.as_ptr() as u64,
            name.len() as u64,
            0,
            0,
        ),
    )?;
    let file_len = u64::MAX;
    for i in 0..usize::from(h.phnum) {
        let at = i * usize::from(h.phentsize);
        let Some(s) = metal_elf::segment(&ph[at..at + PHDR_SIZE], file_len)
            .map_err(|e| println!("pct: '{nm}': {}", e.as_str()))?
        else {
            continue;
        };
        check("mem_map", syscall(abi::MEM_MAP, pid, s.vaddr, s.memsz, 0))?;
        let mut done = 0u64;
        while done < s.filesz {
            let n = (s.filesz - done).min(CHUNK as u64) as usize;
            let got = check("image_read", read(s.offset + done, n, &mut b[..]))?;
            if got < n as u64 {
                println!("pct: '{nm}': segment runs past the image");
                return Err(());
            }
            check(
                "mem_write",
                syscall(
                    abi::MEM_WRITE,
                    pid,
                    s.vaddr + done,
                    b.as_ptr() as u64,
                    n as u64,
                ),
            )?;
            done += n as u64;
        }
    }
    check(
        "mem_map(stack)",
        syscall(abi::MEM_MAP, pid, STACK_TOP - abi::PAGE, abi::PAGE, 0),
    )?;
    check(
        "proc_start",
        syscall(abi::PROC_START, pid, h.entry, STACK_TOP - 64, arg),
    )?;
    println!("pct: loaded '{nm}' as pid {pid} (entry {:#x})", h.entry);
    Ok(pid)
}

/// Waits for one application to end and reports how.
fn wait_one() -> Option<abi::WaitRecord> {
    let mut rec = abi::WaitRecord::default();
    let r = syscall(abi::PROC_WAIT, &mut rec as *mut _ as u64, 0, 0, 0);
    if r < 0 {
        return None;
    }
    if rec.kind == 0 {
        println!("pct: pid {} exited with status {}", rec.pid, rec.status);
    } else {
        let what = match rec.status {
            14 => "page fault",
            13 => "general protection fault",
            6 => "invalid opcode",
            0 => "divide error",
            _ => "exception",
        };
        println!(
            "pct: pid {} killed by {what} (vector {}) at address {:#x}, rip {:#x}, error {:#x}; application ended, node continues",
            rec.pid, rec.status, rec.addr, rec.rip, rec.error
        );
    }
    Some(rec)
}

fn arg<'a>(cmd: &'a [u8], key: &str) -> Option<&'a [u8]> {
    cmd.split(|&b| b == b' ').find_map(|w| {
        let k = key.as_bytes();
        (w.len() > k.len() && w.starts_with(k) && w[k.len()] == b'=').then(|| &w[k.len() + 1..])
    })
}

/// `name:arg` -> (name, arg); plain `name` gets the default argument.
fn split_arg(item: &[u8], default: u64) -> (&[u8], u64) {
    match item.iter().position(|&b| b == b':') {
        Some(i) => (&item[..i], num(&item[i + 1..]).unwrap_or(default)),
        None => (item, default),
    }
}

fn num(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v = 0u64;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some(v)
}

#[unsafe(no_mangle)]
pub extern "C" fn umain(_arg: u64) -> u64 {
    let mut cmd = [0u8; 256];
    let n = syscall(
        abi::BOOT_ARGS,
        cmd.as_mut_ptr() as u64,
        cmd.len() as u64,
        0,
        0,
    )
    .clamp(0, 256) as usize;
    let cmd = &cmd[..n];
    let run = arg(cmd, "run").unwrap_or(b"hello");
    let rr = arg(cmd, "policy") == Some(b"rr");
    let quantum = arg(cmd, "quantum").and_then(num).unwrap_or(10_000);
    let apparg = arg(cmd, "arg").and_then(num).unwrap_or(0);
    println!(
        "pct: running as pid {}, policy {}",
        metal_ulib::info().0,
        if rr { "round-robin" } else { "single-tasking" }
    );
    let mut failures = 0u8;
    if rr {
        if check(
            "sched_policy",
            syscall(abi::SCHED_POLICY, abi::POLICY_ROUND_ROBIN, quantum, 0, 0),
        )
        .is_err()
        {
            failures += 1;
        }
        let mut started = 0;
        for item in run.split(|&b| b == b',') {
            let (name, a) = split_arg(item, apparg);
            match launch(name, a) {
                Ok(_) => started += 1,
                Err(()) => failures += 1,
            }
        }
        for _ in 0..started {
            if wait_one().is_none() {
                failures += 1;
            }
        }
        syscall(abi::SCHED_POLICY, abi::POLICY_SINGLE, 0, 0, 0);
    } else {
        for item in run.split(|&b| b == b',') {
            let (name, a) = split_arg(item, apparg);
            match launch(name, a) {
                Ok(_) => {
                    if wait_one().is_none() {
                        failures += 1;
                    }
                }
                Err(()) => failures += 1,
            }
        }
    }
    println!("pct: all applications done, {failures} launch failures; shutting down");
    syscall(
        abi::SHUTDOWN,
        if failures == 0 { 0x10 } else { 0x11 },
        0,
        0,
        0,
    );
    0
}
