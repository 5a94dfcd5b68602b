//! The QK's few entry points. Arguments come from the saved frame (rdi, rsi,
//! rdx, r10, r8); the result goes to its rax. Every user pointer is checked
//! against the caller's mapped user region before use.
use metal_rt::abi::{self, WaitRecord};

use crate::mm::{self, MemError};
use crate::proc::{self, k, pid_of, slot_of, State, Wait};
use crate::{arch, images, kprintln, net, serial};

fn mem_err(e: MemError) -> i64 {
    match e {
        MemError::Fault => abi::EFAULT,
        MemError::NoMemory => abi::ENOMEM,
    }
}

/// Handles the system call saved in `cur`'s frame.
pub fn dispatch(cur: usize) {
    let f = k().procs[cur].frame;
    let (nr, a0, a1, a2, a3) = (f.rax, f.rdi, f.rsi, f.rdx, f.r10);
    let r: i64 = if nr >= abi::PCT_ONLY_BASE && !k().procs[cur].pct {
        kprintln!(
            "qk: pid {} ({}) called PCT-only entry point {nr}: refused (EPERM)",
            pid_of(cur),
            k().procs[cur].name()
        );
        abi::EPERM
    } else {
        match nr {
            abi::WRITE => write(cur, a0, a1),
            abi::EXIT => {
                let rec = WaitRecord {
                    pid: pid_of(cur),
                    kind: 0,
                    status: a0,
                    ..Default::default()
                };
                proc::end(cur, rec);
                return;
            }
            abi::YIELD => 0,
            abi::INFO => (pid_of(cur) | (net::node() << 16) | (net::nodes() << 32)) as i64,
            abi::MEM_MAP => mem_map(cur, a0, a1, a2),
            abi::PTL_ME_APPEND => net::me_append(cur, a0, a1),
            abi::PTL_PUT => net::put(cur, a0),
            abi::PTL_GET => net::get(cur, a0),
            abi::PTL_MD => net::md(cur, a0, a1, a2),
            abi::PTL_ME => net::me(cur, a0, a1, a2),
            abi::PTL_PORTAL => net::portal(cur, a0, a1, a2),
            abi::PTL_COUNTERS => net::counters(cur, a0),
            abi::PTL_EQ_POLL => net::poll_then_eq(cur, a0).unwrap_or(abi::EAGAIN),
            abi::PTL_EQ_WAIT => match net::poll_then_eq(cur, a0) {
                Some(r) => r,
                None => {
                    k().procs[cur].state = State::Blocked(Wait::Event(a0));
                    return;
                }
            },
            abi::BOOT_ARGS => {
                let c = crate::cmdline();
                let n = c.len().min(a1 as usize);
                match mm::copy_out(cur, a0, &c[..n]) {
                    Ok(()) => c.len() as i64,
                    Err(e) => mem_err(e),
                }
            }
            abi::IMAGE_FIND => image_find(cur, a0, a1),
            abi::IMAGE_READ => image_read(cur, a0, a1, a2, a3),
            abi::PROC_CREATE => {
                let mut name = [0u8; 16];
                let n = (a1 as usize).min(15);
                match mm::copy_in(cur, a0, &mut name[..n]) {
                    Err(e) => mem_err(e),
                    Ok(()) => {
                        proc::create(&name[..n], false).map_or(abi::ENOMEM, |s| pid_of(s) as i64)
                    }
                }
            }
            abi::MEM_WRITE => match target(a0, State::Embryo) {
                Some(t) => {
                    mm::copy_between(cur, a2, t, a1, a3 as usize).map_or_else(mem_err, |_| 0)
                }
                None => abi::ENOENT,
            },
            abi::PROC_START => match target(a0, State::Embryo) {
                // Entry and stack must lie in the user region: a non-canonical
                // or kernel address would fault in ring 0 on the way out.
                Some(_)
                    if !(abi::USER_BASE..abi::USER_END).contains(&a1)
                        || !(abi::USER_BASE..=abi::USER_END).contains(&a2) =>
                {
                    abi::EINVAL
                }
                Some(t) => {
                    let p = &mut k().procs[t];
                    p.frame = arch::Frame::user(a1, a2, a3);
                    p.state = State::Ready;
                    0
                }
                None => abi::ENOENT,
            },
            abi::PROC_WAIT => {
                if let Err(e) = mm::check(cur, a0, core::mem::size_of::<WaitRecord>() as u64) {
                    mem_err(e)
                } else if let Some(z) = k().procs.iter().position(|p| p.state == State::Zombie) {
                    proc::reap(cur, z, a0)
                } else if k().procs.iter().any(|p| !p.pct && p.state != State::Free) {
                    k().procs[cur].state = State::Blocked(Wait::Child(a0));
                    return;
                } else {
                    abi::ECHILD
                }
            }
            abi::SCHED_POLICY => match a0 {
                abi::POLICY_SINGLE | abi::POLICY_ROUND_ROBIN
                    if (100..=1_000_000).contains(&a1) || a0 == 0 =>
                {
                    k().policy = a0;
                    if a1 != 0 {
                        k().quantum_us = a1;
                    }
                    0
                }
                _ => abi::EINVAL,
            },
            abi::SHUTDOWN => crate::shutdown(a0 as u8),
            _ => abi::ENOENT,
        }
    };
    k().procs[cur].frame.rax = r as u64;
}

fn target(pid: u64, want: State) -> Option<usize> {
    slot_of(pid).filter(|&s| k().procs[s].state == want && !k().procs[s].pct)
}

fn write(cur: usize, buf: u64, len: u64) -> i64 {
    let mut tmp = [0u8; 256];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(tmp.len() as u64) as usize;
        if let Err(e) = mm::copy_in(cur, buf + done, &mut tmp[..n]) {
            return mem_err(e);
        }
        serial::write_bytes(&tmp[..n]);
        done += n as u64;
    }
    len as i64
}

fn mem_map(cur: usize, pid: u64, va: u64, len: u64) -> i64 {
    let slot = if pid == 0 || pid == pid_of(cur) {
        cur
    } else if !k().procs[cur].pct {
        return abi::EPERM;
    } else {
        match target(pid, State::Embryo) {
            Some(s) => s,
            None => return abi::ENOENT,
        }
    };
    mm::map(slot, va, len).map_or_else(mem_err, |_| 0)
}

fn image_find(cur: usize, name: u64, len: u64) -> i64 {
    let mut buf = [0u8; 32];
    if len > buf.len() as u64 {
        return abi::EINVAL;
    }
    if let Err(e) = mm::copy_in(cur, name, &mut buf[..len as usize]) {
        return mem_err(e);
    }
    let want = &buf[..len as usize];
    images::IMAGES
        .iter()
        .position(|(n, _)| n.as_bytes() == want)
        .map_or(abi::ENOENT, |i| i as i64)
}

fn image_read(cur: usize, idx: u64, off: u64, buf: u64, len: u64) -> i64 {
    let Some(&(_, img)) = images::IMAGES.get(idx as usize) else {
        return abi::ENOENT;
    };
    if off > img.len() as u64 {
        return abi::EINVAL;
    }
    let n = (img.len() as u64 - off).min(len) as usize;
    let off = off as usize;
    mm::copy_out(cur, buf, &img[off..off + n]).map_or_else(mem_err, |_| n as i64)
}
