//! The few operating-system services the samplers need: a monotonic nanosecond clock, absolute
//! sleeps on that clock, and pinning the calling thread to one CPU.

use crate::error::{NoiseError, Result};
use rustix::thread::{ClockId, CpuSet, Timespec};

/// Nanoseconds on CLOCK_MONOTONIC (vDSO read; tens of nanoseconds).
#[inline(always)]
pub fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(ClockId::Monotonic);
    (t.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(t.tv_nsec as u64)
}

/// Sleep until the absolute CLOCK_MONOTONIC time `t_ns` (returns at once if it has passed).
pub fn sleep_until(t_ns: u64) {
    let ts = Timespec {
        tv_sec: (t_ns / 1_000_000_000) as i64,
        tv_nsec: (t_ns % 1_000_000_000) as _,
    };
    // EINTR: loop until the time has come; other errors cannot happen for a valid timespec.
    while now_ns() < t_ns {
        if rustix::thread::clock_nanosleep_absolute(ClockId::Monotonic, &ts).is_ok() {
            break;
        }
    }
}

/// Sleep on the absolute clock until shortly before `t_ns`, then spin to it exactly.
pub fn wait_until_precise(t_ns: u64) {
    const SPIN_NS: u64 = 300_000;
    if t_ns > SPIN_NS {
        sleep_until(t_ns - SPIN_NS);
    }
    while now_ns() < t_ns {
        std::hint::spin_loop();
    }
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    match rustix::thread::sched_getaffinity(None) {
        Ok(set) => (0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect(),
        Err(_) => (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect(),
    }
}

/// Check that every CPU in `cpus` is in this process's affinity mask.
pub fn check_cpus(cpus: &[usize]) -> Result<()> {
    let allowed = allowed_cpus();
    for &cpu in cpus {
        if !allowed.contains(&cpu) {
            return Err(NoiseError::CpuUnavailable {
                cpu,
                allowed: crate::units::format_cpu_list(&allowed),
            });
        }
    }
    Ok(())
}

/// Pin the calling thread to `cpu`.
pub fn pin_to(cpu: usize) -> Result<()> {
    if cpu >= CpuSet::MAX_CPU {
        return Err(NoiseError::CpuUnavailable {
            cpu,
            allowed: crate::units::format_cpu_list(&allowed_cpus()),
        });
    }
    let mut set = CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).map_err(|e| NoiseError::Pin {
        cpu,
        source: e.into(),
    })
}

/// While alive, keeps the calling thread (the coordinator that waits for the samplers) off the
/// sampled CPUs, so its own wake-ups never land on them; restores its mask on drop. Does nothing
/// when every allowed CPU is sampled.
pub struct OffSampledCpus {
    previous: Option<CpuSet>,
}

impl OffSampledCpus {
    /// Move the calling thread to the allowed CPUs outside `sampled`.
    pub fn enter(sampled: &[usize]) -> OffSampledCpus {
        let Ok(previous) = rustix::thread::sched_getaffinity(None) else {
            return OffSampledCpus { previous: None };
        };
        let mut away = CpuSet::new();
        let mut any = false;
        for c in (0..CpuSet::MAX_CPU).filter(|&c| previous.is_set(c) && !sampled.contains(&c)) {
            away.set(c);
            any = true;
        }
        if any && rustix::thread::sched_setaffinity(None, &away).is_ok() {
            OffSampledCpus {
                previous: Some(previous),
            }
        } else {
            OffSampledCpus { previous: None }
        }
    }
}

impl Drop for OffSampledCpus {
    fn drop(&mut self) {
        if let Some(p) = &self.previous {
            let _ = rustix::thread::sched_setaffinity(None, p);
        }
    }
}

/// Set the calling thread's nice value (Linux nice is per thread). Negative values need
/// CAP_SYS_NICE (root). Used so that ordinary background processes take less of the sampled CPU
/// than the interference being measured.
pub fn set_thread_nice(nice: i32) -> Result<()> {
    let tid = rustix::thread::gettid();
    rustix::process::setpriority_process(Some(tid), nice).map_err(|e| NoiseError::Nice {
        nice,
        source: e.into(),
    })
}

/// While alive, holds this session's scheduler autogroup at a given nice value and restores the
/// previous value on drop. With `kernel.sched_autogroup_enabled=1` a thread's nice value only
/// weighs against threads of its own session; other sessions' processes share the CPU group
/// against group, so `--nice` must lower the group's nice too to mean anything.
pub struct AutogroupNice {
    previous: Option<i32>,
}

impl AutogroupNice {
    /// Set the autogroup nice (does nothing where autogroups are off or not writable).
    pub fn set(nice: i32) -> AutogroupNice {
        let enabled = std::fs::read_to_string("/proc/sys/kernel/sched_autogroup_enabled")
            .map(|s| s.trim() == "1")
            .unwrap_or(false);
        if !enabled {
            return AutogroupNice { previous: None };
        }
        let previous = std::fs::read_to_string("/proc/self/autogroup")
            .ok()
            .and_then(|s| s.split_whitespace().last()?.parse::<i32>().ok());
        match previous {
            Some(p) if std::fs::write("/proc/self/autogroup", nice.to_string()).is_ok() => {
                AutogroupNice { previous: Some(p) }
            }
            _ => AutogroupNice { previous: None },
        }
    }
}

impl Drop for AutogroupNice {
    fn drop(&mut self) {
        if let Some(p) = self.previous {
            let _ = std::fs::write("/proc/self/autogroup", p.to_string());
        }
    }
}
