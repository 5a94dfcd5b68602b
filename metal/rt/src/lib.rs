//! The few symbols the precompiled `core` expects from a C runtime: `memcpy`,
//! `memmove`, `memset`, `memcmp`, `bcmp`, and an (unused) `rust_eh_personality`.
//! Copies use `rep movsb`/`rep stosb` so the compiler cannot turn them back
//! into calls to themselves.
#![no_std]

use core::arch::asm;

/// Copies `n` bytes forward.
///
/// # Safety
/// `d` and `s` must be valid for `n` bytes and must not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for `n` bytes; the
    // direction flag is clear in both kernel and user code (FMASK clears it).
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") d => _, inout("rsi") s => _,
             options(nostack, preserves_flags));
    }
    d
}

/// Copies `n` bytes, ranges may overlap.
///
/// # Safety
/// `d` and `s` must be valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) <= (s as usize) || (d as usize) >= (s as usize).wrapping_add(n) {
        // SAFETY: forward copy is correct when the destination starts before the
        // source or does not overlap it; validity is the caller's promise.
        unsafe { memcpy(d, s, n) }
    } else {
        // SAFETY: backward copy from the last byte; std/cld bracket the copy so
        // the direction flag is clear again afterwards.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rcx") n => _, inout("rdi") d.add(n - 1) => _, inout("rsi") s.add(n - 1) => _,
                 options(nostack));
        }
        d
    }
}

/// Fills `n` bytes with `c`.
///
/// # Safety
/// `d` must be valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid for `n` bytes.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") d => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    d
}

/// Compares `n` bytes.
///
/// # Safety
/// Both ranges must be valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: `i < n` and both ranges are valid for `n` bytes.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// Equality-only comparison, same contract as [`memcmp`].
///
/// # Safety
/// Both ranges must be valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Never called: everything is built with `panic = "abort"`, but the
/// precompiled `core` still names the symbol.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

/// Never called, for the same reason as [`rust_eh_personality`].
#[unsafe(no_mangle)]
pub extern "C" fn _Unwind_Resume() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads a counter (CR4.TSD is clear, so ring 3 may too).
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The system-call interface shared by the QK and its user programs.
///
/// Calling convention: `syscall` with the number in `rax`, arguments in `rdi`,
/// `rsi`, `rdx`, `r10`, `r8`, `r9`; result in `rax` (negative = error code).
pub mod abi {
    // --- every process ---
    /// `write(buf, len)`: bytes to the serial console; returns `len`.
    pub const WRITE: u64 = 0;
    /// `exit(status)`: ends the calling process.
    pub const EXIT: u64 = 1;
    /// `yield()`: lets the scheduler pick another ready process.
    pub const YIELD: u64 = 2;
    /// `info()`: `pid | node << 16 | nodes << 32`.
    pub const INFO: u64 = 3;
    /// `mem_map(pid, vaddr, len)`: memory service; backs the range with zeroed
    /// 2 MiB pages. Applications may only name themselves (`pid` 0 = self).
    pub const MEM_MAP: u64 = 4;
    /// `ptl_me_append(portal, &MeSpec)`: attach a match entry + memory descriptor
    /// to one of the caller's portals; returns the entry handle.
    pub const PTL_ME_APPEND: u64 = 8;
    /// `ptl_put(&PutSpec)`: send a put to `(node, pid, portal, match_bits)`.
    pub const PTL_PUT: u64 = 9;
    /// `ptl_eq_wait(&mut Event)`: block until the caller's event queue has an
    /// event, then return it.
    pub const PTL_EQ_WAIT: u64 = 10;

    // --- PCT only (levels of trust: QK > PCT > applications) ---
    /// First PCT-only number; every call at or above it is refused to applications.
    pub const PCT_ONLY_BASE: u64 = 16;
    /// `boot_args(buf, len)`: copies the kernel command line; returns its length.
    pub const BOOT_ARGS: u64 = 16;
    /// `image_find(name, len)`: index of an embedded program image.
    pub const IMAGE_FIND: u64 = 17;
    /// `image_read(index, offset, buf, len)`: bytes of an embedded image.
    pub const IMAGE_READ: u64 = 18;
    /// `proc_create(name, len)`: new empty process (address space); returns pid.
    pub const PROC_CREATE: u64 = 19;
    /// `mem_write(pid, vaddr, src, len)`: copy from the PCT into a process.
    pub const MEM_WRITE: u64 = 20;
    /// `proc_start(pid, entry, stack_top, arg)`: make a process runnable.
    pub const PROC_START: u64 = 21;
    /// `proc_wait(&mut WaitRecord)`: block until a process ends; returns its pid.
    pub const PROC_WAIT: u64 = 22;
    /// `sched_policy(policy, quantum_us)`: 0 = single-tasking, 1 = round-robin.
    pub const SCHED_POLICY: u64 = 23;
    /// `shutdown(code)`: power off the node (QEMU exits with `code*2+1`).
    pub const SHUTDOWN: u64 = 24;

    /// Not permitted at the caller's level of trust.
    pub const EPERM: i64 = -1;
    /// Bad argument.
    pub const EINVAL: i64 = -2;
    /// Out of frames, process slots or portal resources.
    pub const ENOMEM: i64 = -3;
    /// No such image, process or system call.
    pub const ENOENT: i64 = -4;
    /// A buffer outside the caller's mapped memory.
    pub const EFAULT: i64 = -5;
    /// No process left to wait for.
    pub const ECHILD: i64 = -6;

    /// Scheduling policy: run one application to completion, no timer.
    pub const POLICY_SINGLE: u64 = 0;
    /// Scheduling policy: round-robin with a timer taken from user mode.
    pub const POLICY_ROUND_ROBIN: u64 = 1;

    /// Start of every process's user region (1 GiB).
    pub const USER_BASE: u64 = 0x4000_0000;
    /// End of the user region (2 GiB, exclusive).
    pub const USER_END: u64 = 0x8000_0000;
    /// The page size of every mapping.
    pub const PAGE: u64 = 2 << 20;

    /// How a process ended, as reported to the PCT by `proc_wait`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct WaitRecord {
        /// Process id.
        pub pid: u64,
        /// 0 = exited, 1 = killed by a fault.
        pub kind: u64,
        /// Exit status, or the exception vector for a fault.
        pub status: u64,
        /// Faulting address (CR2) for a page fault.
        pub addr: u64,
        /// Instruction pointer at the fault.
        pub rip: u64,
        /// Error code pushed by the CPU.
        pub error: u64,
    }

    /// Match entry + memory descriptor description for `ptl_me_append`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct MeSpec {
        pub match_bits: u64,
        pub ignore_bits: u64,
        pub buf: u64,
        pub len: u64,
        /// Process allowed to put here (`u64::MAX` = any).
        pub source_pid: u64,
        /// Node allowed to put here (`u64::MAX` = any).
        pub source_node: u64,
    }

    /// A put request for `ptl_put`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct PutSpec {
        pub node: u64,
        pub pid: u64,
        pub portal: u64,
        pub match_bits: u64,
        pub buf: u64,
        pub len: u64,
        pub hdr_data: u64,
    }

    /// A portals event as returned by `ptl_eq_wait`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct Event {
        /// 1 = put landed.
        pub kind: u64,
        pub portal: u64,
        pub match_bits: u64,
        pub offset: u64,
        pub len: u64,
        pub src_node: u64,
        pub src_pid: u64,
        pub hdr_data: u64,
        /// Times the kernel polled/deposited while this process was not running.
        pub deposited_while_blocked: u64,
    }
}
