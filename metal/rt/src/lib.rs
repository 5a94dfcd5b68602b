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
    /// `ptl_md(op, a, b)`: memory descriptors. `MD_CREATE` (`a` = `&MdDesc`)
    /// returns a handle; `MD_RELEASE` (`a` = handle); `MD_FREE` (`a` =
    /// handle, `b` = the event's offset) frees a message in a dynamic heap.
    pub const PTL_MD: u64 = 5;
    /// `ptl_me(op, a, &MeDesc)`: match entries. `ME_APPEND` (`a` = portal),
    /// `ME_INSERT_BEFORE` / `ME_INSERT_AFTER` (`a` = anchor entry) return the
    /// new entry's handle; `ME_UNLINK` (`a` = entry).
    pub const PTL_ME: u64 = 6;
    /// `ptl_portal(op, portal, &AclDesc)`: `PORTAL_ENABLE`, `PORTAL_DISABLE`,
    /// `PORTAL_ACL` (access control entry).
    pub const PTL_PORTAL: u64 = 7;
    /// `ptl_get(&GetSpec)`: read from a remote descriptor; the reply lands in
    /// the caller's descriptor and posts a reply event.
    pub const PTL_GET: u64 = 11;
    /// `ptl_eq_poll(&mut Event)`: like `ptl_eq_wait` but returns `EAGAIN` at
    /// once when the queue is empty.
    pub const PTL_EQ_POLL: u64 = 12;
    /// `ptl_counters(&mut Counters)`: the caller's delivery and drop counters.
    pub const PTL_COUNTERS: u64 = 13;

    /// `ptl_md` operations.
    pub const MD_CREATE: u64 = 0;
    pub const MD_RELEASE: u64 = 1;
    pub const MD_FREE: u64 = 2;
    /// `ptl_me` operations.
    pub const ME_APPEND: u64 = 0;
    pub const ME_INSERT_BEFORE: u64 = 1;
    pub const ME_INSERT_AFTER: u64 = 2;
    pub const ME_UNLINK: u64 = 3;
    /// `ptl_me(ME_SET_LINKS, entry, &MeLinks)`: where the search goes when
    /// the entry's descriptor is too short (second link) or not valid (third).
    pub const ME_SET_LINKS: u64 = 4;
    /// `MeLinks` values: follow list order / end the search; any other
    /// value is an entry handle of the same portal.
    pub const LINK_NEXT: u64 = u64::MAX;
    pub const LINK_END: u64 = u64::MAX - 1;
    /// `ptl_portal` operations.
    pub const PORTAL_ENABLE: u64 = 0;
    pub const PORTAL_DISABLE: u64 = 1;
    pub const PORTAL_ACL: u64 = 2;

    /// `MdDesc::kind`: one region (7.2).
    pub const MD_SINGLE: u64 = 0;
    /// `MdDesc::kind`: independent blocks, one message per block (7.3).
    pub const MD_INDEPENDENT: u64 = 1;
    /// `MdDesc::kind`: combined blocks forming one buffer (7.4).
    pub const MD_COMBINED: u64 = 2;
    /// `MdDesc::kind`: a heap the kernel allocates from per message (7.5).
    pub const MD_DYNAMIC: u64 = 3;
    /// `MdDesc::options` bits.
    pub const MDO_PUT: u64 = 1;
    pub const MDO_GET: u64 = 2;
    pub const MDO_ACK: u64 = 4;
    pub const MDO_TRUNCATE: u64 = 8;
    /// Receiver-managed offset (single, combined); default sender-managed.
    pub const MDO_RECEIVER_OFFSET: u64 = 16;
    /// Independent blocks wrap around.
    pub const MDO_CIRCULAR: u64 = 32;
    /// `MdDesc::save` for independent and dynamic descriptors.
    pub const SAVE_HEADER: u64 = 0;
    pub const SAVE_BODY: u64 = 1;
    pub const SAVE_BOTH: u64 = 2;
    /// Most blocks in one independent or combined descriptor.
    pub const MAX_BLOCKS: usize = 8;
    /// `PutSpec::flags`: send from the descriptor `md` instead of `buf`.
    pub const PUT_FROM_MD: u64 = 1;
    /// `PutSpec::flags`: ask for an acknowledgment (needs `PUT_FROM_MD`).
    pub const PUT_ACK: u64 = 2;
    /// Largest message (put payload or get length); larger than one ring
    /// slot, so the fabric fragments it.
    pub const MAX_MESSAGE: u64 = 128 * 1024;
    /// Wire header length (carried before every payload; saved by
    /// descriptors that keep headers).
    pub const HEADER_LEN: u64 = 80;
    /// Event kinds.
    pub const EV_PUT: u64 = 1;
    pub const EV_GET: u64 = 2;
    pub const EV_REPLY: u64 = 3;
    pub const EV_ACK: u64 = 4;
    pub const EV_UNLINK: u64 = 6;
    pub const EV_DISCARD: u64 = 7;
    /// Drop reasons, the index into `Counters::drops` (the engine's order).
    pub const DROP_REASONS: [&str; 10] = [
        "bad_header",
        "wrong_destination",
        "invalid_portal",
        "disabled",
        "forbidden",
        "no_match",
        "too_long",
        "invalid_md",
        "link_loop",
        "unexpected",
    ];
    pub const DROP_DISABLED: usize = 3;
    pub const DROP_FORBIDDEN: usize = 4;
    pub const DROP_NO_MATCH: usize = 5;
    pub const DROP_TOO_LONG: usize = 6;
    pub const DROP_INVALID_MD: usize = 7;

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
    /// Nothing there yet (`ptl_eq_poll`).
    pub const EAGAIN: i64 = -7;

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
        /// `PUT_FROM_MD`, `PUT_ACK`.
        pub flags: u64,
        /// Descriptor handle (with `PUT_FROM_MD`): the payload is its bytes
        /// `local_offset..local_offset+len`; acks are posted for it.
        pub md: u64,
        pub local_offset: u64,
        /// Offset at the target (sender-managed descriptors).
        pub remote_offset: u64,
    }

    /// A get request for `ptl_get`: `len` bytes from the target's matched
    /// descriptor (at `remote_offset` when it is sender-managed) into the
    /// caller's descriptor `md` at `local_offset`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct GetSpec {
        pub node: u64,
        pub pid: u64,
        pub portal: u64,
        pub match_bits: u64,
        pub md: u64,
        pub local_offset: u64,
        pub remote_offset: u64,
        pub len: u64,
        pub hdr_data: u64,
    }

    /// A memory descriptor for `ptl_md(MD_CREATE)`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct MdDesc {
        /// `MD_SINGLE`, `MD_INDEPENDENT`, `MD_COMBINED`, `MD_DYNAMIC`.
        pub kind: u64,
        /// `MDO_*` bits.
        pub options: u64,
        /// Region (single, dynamic).
        pub buf: u64,
        pub len: u64,
        /// Blocks (independent, combined): address of `nblocks` `[addr, len]` pairs.
        pub blocks: u64,
        pub nblocks: u64,
        /// `SAVE_*` (independent, dynamic).
        pub save: u64,
        /// Most messages a dynamic heap holds at once.
        pub max_messages: u64,
    }

    /// A match entry for `ptl_me`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct MeDesc {
        /// The descriptor messages matching this entry land in.
        pub md: u64,
        pub match_bits: u64,
        /// Bits set here are not compared.
        pub ignore_bits: u64,
        /// Accepted source (`u64::MAX` = any).
        pub source_node: u64,
        pub source_pid: u64,
        /// Unlink after this many messages (0 = never).
        pub threshold: u64,
    }

    /// The second and third links of a match entry (`ME_SET_LINKS`).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct MeLinks {
        /// Followed when the message is too long for the descriptor.
        pub too_long: u64,
        /// Followed when the descriptor is not valid (released, used up,
        /// or not permitting the operation).
        pub invalid: u64,
    }

    /// Access control entry for `ptl_portal(PORTAL_ACL)`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct AclDesc {
        /// Allowed job (`u64::MAX` = any; applications are job 1).
        pub job: u64,
        /// Allowed source (`u64::MAX` = any).
        pub node: u64,
        pub pid: u64,
        /// 1 = puts allowed.
        pub put: u64,
        /// 1 = gets allowed.
        pub get: u64,
    }

    /// Delivery and drop counters of the caller's portals.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct Counters {
        pub delivered: u64,
        pub bytes: u64,
        pub eq_overflows: u64,
        /// Per drop reason, indexed as `DROP_REASONS`.
        pub drops: [u64; 10],
        /// Messages this node's fabric could not send (ring full too long).
        pub fabric_lost: u64,
        /// Sends on this node that found the other node's ring full and
        /// waited (draining their own ring meanwhile).
        pub fabric_waits: u64,
    }

    /// A portals event as returned by `ptl_eq_wait`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct Event {
        /// `EV_*`.
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
        /// Length the initiator asked for.
        pub rlength: u64,
        /// The local descriptor (target side: where it landed; initiator: the
        /// one the ack/reply is for).
        pub md: u64,
        /// Drop reason index for `EV_DISCARD` (else `u64::MAX`).
        pub reason: u64,
        /// 1 if the message was truncated.
        pub truncated: u64,
    }
}
