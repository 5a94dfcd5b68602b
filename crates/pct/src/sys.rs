//! The one place the PCT needs `unsafe`: work done in a rank between `fork` and
//! `exec` (parent-death signal, core pinning, handing down job resource fds); and the
//! (safe) pinning of our own threads to the service CPUs.
#![allow(unsafe_code)]

use rustix::process::{getppid, set_parent_process_death_signal, Signal};
use rustix::thread::{sched_setaffinity, CpuSet};
use std::os::fd::{BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

fn cpu_set(cpus: &[usize]) -> CpuSet {
    let mut s = CpuSet::new();
    for &c in cpus {
        if c < CpuSet::MAX_CPU {
            s.set(c);
        }
    }
    s
}

/// Pins the calling thread to `cpus`. Threads it starts later inherit the mask.
pub fn pin_current_thread(cpus: &[usize]) -> std::io::Result<()> {
    sched_setaffinity(None, &cpu_set(cpus)).map_err(std::io::Error::from)
}

/// Arranges for the child to (1) die with SIGKILL when the PCT thread that spawned
/// it goes away, so no rank outlives its PCT, (2) run on `cpus` (the PCT itself runs
/// on the service CPUs, so a rank always gets a mask of its own, never the PCT's),
/// (3) inherit `fds`.
pub fn prepare_rank(cmd: &mut Command, cpus: &[usize], fds: Vec<RawFd>) {
    let set = (!cpus.is_empty()).then(|| cpu_set(cpus));
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the forked child before exec. It performs only
    // raw system calls (prctl, getppid, sched_setaffinity, fcntl), which are
    // async-signal-safe, takes no locks and does not allocate (errors are built
    // from raw errno values). The fds it borrows are owned by the PCT's job
    // resources, which outlive the spawn call, so they are open in the child.
    unsafe {
        cmd.pre_exec(move || {
            set_parent_process_death_signal(Some(Signal::KILL))?;
            // The PCT may have died between fork and prctl: then nobody would kill us.
            if getppid() != Some(parent) {
                return Err(std::io::Error::from_raw_os_error(libc_esrch()));
            }
            if let Some(s) = &set {
                // Pinning is best effort: a CPU may be outside our cgroup.
                let _ = sched_setaffinity(None, s);
            }
            for &fd in &fds {
                let b = BorrowedFd::borrow_raw(fd);
                rustix::io::fcntl_setfd(b, rustix::io::FdFlags::empty())?;
            }
            Ok(())
        })
    };
}

fn libc_esrch() -> i32 {
    rustix::io::Errno::SRCH.raw_os_error()
}
