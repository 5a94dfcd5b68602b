//! Every system call and raw-memory operation of the hosted QK lives here.
//!
//! The rest of the crate deals in safe handles: [`Memfd`], [`Mapping`], and a few free functions.
//! Each `unsafe` block states why it is sound.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64};

/// An anonymous, sealed-size shared-memory file (Linux `memfd_create`). Nothing is left in
/// `/dev/shm` when the last holder exits.
#[derive(Debug)]
pub struct Memfd {
    fd: OwnedFd,
}

impl Memfd {
    /// Creates a memfd of `len` bytes. The fd is created close-on-exec; [`Memfd::inheritable`]
    /// clears the flag for the launcher that hands it to a rank.
    pub fn create(name: &str, len: u64) -> io::Result<Memfd> {
        let cname =
            std::ffi::CString::new(name).map_err(|_| io::Error::other("memfd name has NUL"))?;
        // SAFETY: cname is a valid NUL-terminated string; flags are constants.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by memfd_create and is owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let len_off =
            libc::off_t::try_from(len).map_err(|_| io::Error::other("region too large"))?;
        // SAFETY: fd is a valid open memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len_off) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Memfd { fd })
    }

    /// Takes ownership of an fd inherited from the launcher (e.g. `PUMA_QK_FD`). Fails when the
    /// number is not an open file descriptor.
    pub fn from_inherited(fd: RawFd) -> io::Result<Memfd> {
        // SAFETY: F_GETFD only queries the descriptor table; no memory is touched.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(io::Error::other(format!(
                "fd {fd} is not an open file descriptor"
            )));
        }
        // SAFETY: the launcher handed this descriptor to us for our exclusive use; we checked it is
        // open. Nothing else in this process owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Memfd { fd })
    }

    /// Opens a file (e.g. `/proc/<pid>/fd/<n>`) read-write or read-only as a region fd.
    pub fn open_path(path: &std::path::Path, write: bool) -> io::Result<Memfd> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)?;
        Ok(Memfd {
            fd: OwnedFd::from(f),
        })
    }

    /// Size of the file in bytes.
    pub fn size(&self) -> io::Result<u64> {
        let f = std::fs::File::from(self.fd.try_clone()?);
        Ok(f.metadata()?.len())
    }

    /// The raw descriptor number.
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Clears close-on-exec so a child started with `exec` inherits this descriptor.
    pub fn inheritable(&self) -> io::Result<()> {
        set_cloexec(self.fd.as_raw_fd(), false)
    }

    /// Duplicates the descriptor (both refer to the same memory).
    pub fn try_clone(&self) -> io::Result<Memfd> {
        Ok(Memfd {
            fd: self.fd.try_clone()?,
        })
    }
}

/// Sets or clears `FD_CLOEXEC` on a descriptor.
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor number only manipulates the descriptor table.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let new = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, new) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A shared mapping of a [`Memfd`]. Unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all concurrent access to it goes through atomics or
// through copies whose ordering is established by the ring protocol (release/acquire stamps).
unsafe impl Send for Mapping {}
// SAFETY: see above.
unsafe impl Sync for Mapping {}

/// The page size this code assumes (x86_64 Linux); ranges to lock are widened to it.
pub const PAGE_SIZE: usize = 4096;

/// Why locking memory failed.
#[derive(Debug)]
pub enum LockError {
    /// `mlock` failed (usually `RLIMIT_MEMLOCK`).
    Mlock(io::Error),
}

impl Mapping {
    /// Maps `len` bytes of `fd` shared, read-write (or read-only).
    pub fn map(fd: &Memfd, len: usize, write: bool) -> io::Result<Mapping> {
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: we ask the kernel for a fresh mapping (addr = NULL); fd is an open file of at least
        // len bytes (checked by callers); the result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.raw(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    /// Locks the mapping into RAM and touches every page so no message ever takes a page fault.
    pub fn lock_and_prefault(&self) -> Result<(), LockError> {
        self.lock_and_prefault_range(0, self.len)
    }

    /// Locks bytes `off..off + len` of the mapping (widened to whole pages, clamped to the
    /// mapping) into RAM and maps every page of them writable in this process.
    pub fn lock_and_prefault_range(&self, off: usize, len: usize) -> Result<(), LockError> {
        let page = PAGE_SIZE;
        let start = (off / page * page).min(self.len);
        let end = off
            .saturating_add(len)
            .div_ceil(page)
            .saturating_mul(page)
            .min(self.len);
        if end <= start {
            return Ok(());
        }
        // SAFETY: start..end lies inside the mapping we own (clamped above).
        let p = unsafe { self.ptr.add(start) };
        // SAFETY: p/end-start describe part of a mapping we own.
        if unsafe { libc::mlock(p.cast(), end - start) } != 0 {
            return Err(LockError::Mlock(io::Error::last_os_error()));
        }
        // mlock faults pages in already; MADV_POPULATE_WRITE makes sure they are writable-mapped
        // (ignored by older kernels, hence the error is not fatal).
        // SAFETY: as above; madvise does not change the contents.
        unsafe {
            libc::madvise(p.cast(), end - start, 23 /* MADV_POPULATE_WRITE */)
        };
        Ok(())
    }

    /// Base address.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the mapping is empty (never, in practice).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hints the CPU to start fetching the cache line holding byte `off` (no effect on contents;
    /// an offset outside the mapping is ignored).
    #[inline]
    pub fn prefetch(&self, off: usize) {
        if off < self.len {
            prefetch_line(self.ptr.wrapping_add(off));
        }
    }

    /// Hints the CPU to fetch the cache line holding byte `off` for writing (`prefetchw`: the line
    /// arrives owned, so the stores that follow do not wait for another core to give it up). A
    /// plain read prefetch on CPUs without the instruction; an offset outside the mapping is
    /// ignored.
    #[inline]
    pub fn prefetch_write(&self, off: usize) {
        if off < self.len {
            prefetch_line_for_write(self.ptr.wrapping_add(off), has_prefetchw());
        }
    }

    /// An atomic u64 at byte offset `off` (must be 8-aligned and in bounds; checked).
    #[inline]
    pub fn atomic_u64(&self, off: usize) -> &AtomicU64 {
        assert!(
            off % 8 == 0 && off + 8 <= self.len,
            "atomic_u64 out of bounds"
        );
        // SAFETY: in bounds and aligned (mmap returns page-aligned memory); AtomicU64 has the same
        // layout as u64; the memory lives as long as &self.
        unsafe { &*(self.ptr.add(off) as *const AtomicU64) }
    }

    /// An atomic u32 at byte offset `off` (4-aligned, in bounds; checked).
    #[inline]
    pub fn atomic_u32(&self, off: usize) -> &AtomicU32 {
        assert!(
            off % 4 == 0 && off + 4 <= self.len,
            "atomic_u32 out of bounds"
        );
        // SAFETY: in bounds and aligned; same layout; lives as long as &self.
        unsafe { &*(self.ptr.add(off) as *const AtomicU32) }
    }

    /// Copies `src` into the mapping at `off` (bounds checked).
    #[inline]
    pub fn write(&self, off: usize, src: &[u8]) {
        assert!(
            off.checked_add(src.len()).is_some_and(|e| e <= self.len),
            "write out of bounds"
        );
        // SAFETY: destination range is inside the mapping; source is a valid slice that cannot
        // overlap the mapping's range we write (callers never pass a slice of the same bytes).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(off), src.len()) };
    }

    /// Copies from the mapping at `off` into `dst` (bounds checked).
    #[inline]
    pub fn read(&self, off: usize, dst: &mut [u8]) {
        assert!(
            off.checked_add(dst.len()).is_some_and(|e| e <= self.len),
            "read out of bounds"
        );
        // SAFETY: source range is inside the mapping; dst is a valid exclusive slice.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), dst.as_mut_ptr(), dst.len()) };
    }

    /// Copies `len` bytes inside the mapping from `src` to `dst` (ranges checked; may not overlap).
    pub fn copy_within(&self, src: usize, dst: usize, len: usize) {
        let ok = |o: usize| o.checked_add(len).is_some_and(|e| e <= self.len);
        assert!(ok(src) && ok(dst), "copy_within out of bounds");
        assert!(
            src + len <= dst || dst + len <= src || len == 0,
            "copy_within overlaps"
        );
        // SAFETY: both ranges are inside the mapping and do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(src), self.ptr.add(dst), len) };
    }

    /// A shared view of `len` bytes at `off` (bounds checked). The caller must know no one writes
    /// these bytes concurrently (the protocol guarantees it for message buffers in flight).
    #[inline]
    pub fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len),
            "slice out of bounds"
        );
        // SAFETY: in bounds; lifetime tied to &self; see the contract above.
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) }
    }

    /// A mutable view of `len` bytes at `off` (bounds checked). Heap buffers handed out by the
    /// allocator are disjoint, so two views of different buffers never alias.
    #[allow(clippy::mut_from_ref)]
    pub fn slice_mut(&self, off: usize, len: usize) -> &mut [u8] {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len),
            "slice_mut out of bounds"
        );
        // SAFETY: in bounds; callers obtain disjoint ranges from the per-rank heap allocator.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from a successful mmap and are unmapped exactly once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Copies `len` bytes between two raw addresses the caller has validated.
///
/// # Safety
/// `src..src+len` must be readable, `dst..dst+len` writable, and the ranges must not overlap.
pub unsafe fn raw_copy(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

/// Blocks while `*word == expected` (shared futex, works across processes), for at most `timeout`.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: std::time::Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: word points to a live, aligned u32 in a shared mapping; FUTEX_WAIT only reads it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
}

/// Blocks until one of `fds` is readable (or hung up), for at most `timeout`. True when one is.
pub fn poll_readable(fds: &[std::os::fd::RawFd], timeout: std::time::Duration) -> bool {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: p is a live array of p.len() pollfd structures that poll(2) may write.
    let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
    n > 0 && p.iter().any(|x| x.revents != 0)
}

/// Moves the calling thread into the network namespace at `path` (e.g. `/var/run/netns/NAME`):
/// sockets it creates from then on belong to that namespace (needs CAP_SYS_ADMIN).
pub fn enter_netns(path: &std::path::Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    // SAFETY: setns only reads the descriptor, which stays open for the call.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// membarrier(2) commands (linux/membarrier.h).
const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
const MEMBARRIER_CMD_GLOBAL_EXPEDITED: libc::c_int = 1 << 1;
const MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED: libc::c_int = 1 << 2;

fn membarrier(cmd: libc::c_int) -> libc::c_long {
    // SAFETY: membarrier takes two integer arguments (command, flags) and no pointers.
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_int) }
}

/// Registers this process for expedited global memory barriers
/// (`MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED`, Linux 4.16): from then on a
/// [`membarrier_global`] issued by any process makes this process's running threads execute a
/// full fence. Done once per process; false when the kernel does not offer it.
pub fn membarrier_register() -> bool {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REGISTERED.get_or_init(|| {
        let offered = membarrier(MEMBARRIER_CMD_QUERY);
        offered >= 0
            && offered & libc::c_long::from(MEMBARRIER_CMD_GLOBAL_EXPEDITED) != 0
            && membarrier(MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED) == 0
    })
}

/// A full memory fence on every CPU that runs a thread of a process registered with
/// [`membarrier_register`] (and on this one). False when the call failed.
pub fn membarrier_global() -> bool {
    membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED) == 0
}

/// Wakes every waiter blocked on `word`.
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: word is a live aligned u32; FUTEX_WAKE does not touch memory.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
}

/// The CPU the calling thread is running on now (`None` if the kernel cannot say).
pub fn current_cpu() -> Option<u32> {
    // SAFETY: sched_getcpu takes no arguments and touches no caller memory.
    let c = unsafe { libc::sched_getcpu() };
    u32::try_from(c).ok()
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return Err(io::Error::other(format!("cpu {cpu} out of range")));
    }
    // SAFETY: cpu is within the set's capacity (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: set is a valid cpu_set_t of the size we pass; 0 = calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPUs process `pid` may run on (its affinity mask; any process of the same user, or any
/// with the right capability, may be asked).
pub fn cpus_of(pid: u32) -> io::Result<Vec<usize>> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::other(format!("process id {pid} out of range")))?;
    // SAFETY: zeroed cpu_set_t is valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid out-parameter of the given size.
    let rc =
        unsafe { libc::sched_getaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: i is below CPU_SETSIZE.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect())
}

/// CPUs online on this machine (whatever this process's affinity mask says; at least 1).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf only reads system configuration.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// The `struct sched_attr` of `sched_setattr(2)` (the first, 48-byte version).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// Asks for a scheduler time slice of `ns` nanoseconds for the calling thread, keeping its
/// policy and nice value. On Linux 6.12 and later a normal (`SCHED_OTHER` / `SCHED_BATCH`) task's
/// `sched_runtime` is its EEVDF slice (the kernel clamps it to 0.1–100 ms): a thread with a short
/// slice gets an earlier deadline, so when it wakes it preempts a CPU-bound task sooner. Older
/// kernels ignore the value. Returns the slice the kernel reports afterwards (0: none reported),
/// or `Ok(None)` when the thread has another policy (real-time, deadline), which is left alone.
pub fn set_sched_slice(ns: u64) -> io::Result<Option<u64>> {
    let mut a = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as u32;
    // SAFETY: a is a valid, writable sched_attr of `size` bytes; pid 0 = calling thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut a as *mut SchedAttr,
            size,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let normal = a.policy == libc::SCHED_OTHER as u32 || a.policy == libc::SCHED_BATCH as u32;
    if !normal {
        return Ok(None);
    }
    a.size = size;
    a.flags = 0;
    a.runtime = ns;
    // SAFETY: a is a valid sched_attr of `size` bytes that the kernel only reads.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &a as *const SchedAttr, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut b = SchedAttr::default();
    // SAFETY: as for the first call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut b as *mut SchedAttr,
            size,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(b.runtime))
}

/// A thread's scheduling class: `libc::SCHED_*` policy and static (real-time) priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadSched {
    /// `libc::SCHED_OTHER`, `SCHED_FIFO`, `SCHED_RR`, ...
    pub policy: i32,
    /// 1–99 for the real-time policies, 0 otherwise.
    pub priority: i32,
}

impl ThreadSched {
    /// The normal class (`SCHED_OTHER`).
    pub const NORMAL: ThreadSched = ThreadSched {
        policy: libc::SCHED_OTHER,
        priority: 0,
    };

    /// True for `SCHED_FIFO` and `SCHED_RR`: the thread runs before every normal thread of its
    /// CPU, kernel threads such as `ksoftirqd` included.
    pub fn is_real_time(self) -> bool {
        self.policy == libc::SCHED_FIFO || self.policy == libc::SCHED_RR
    }
}

/// The calling thread's scheduling class (threads and processes it starts inherit it).
pub fn thread_sched() -> io::Result<ThreadSched> {
    // SAFETY: sched_getscheduler takes no caller memory; 0 = the calling thread.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut p = libc::sched_param { sched_priority: 0 };
    // SAFETY: p is a valid, writable sched_param; 0 = the calling thread.
    if unsafe { libc::sched_getparam(0, &mut p) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ThreadSched {
        policy: policy & !libc::SCHED_RESET_ON_FORK,
        priority: p.sched_priority,
    })
}

/// Sets the calling thread's scheduling class (real-time classes need `CAP_SYS_NICE`).
pub fn set_thread_sched(s: ThreadSched) -> io::Result<()> {
    let p = libc::sched_param {
        sched_priority: s.priority,
    };
    // SAFETY: p is a valid sched_param that the kernel only reads; 0 = the calling thread.
    if unsafe { libc::sched_setscheduler(0, s.policy, &p) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Number of CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: zeroed cpu_set_t is valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid out-parameter of the given size.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return vec![0];
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: i is below CPU_SETSIZE.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

/// Reads `len` bytes at address `remote` of process `pid` into `dst` with one cross-memory-attach
/// call (`process_vm_readv`). Returns the number of bytes read.
pub fn cma_read(pid: i32, remote: u64, dst: &mut [u8]) -> io::Result<usize> {
    let local = libc::iovec {
        iov_base: dst.as_mut_ptr().cast(),
        iov_len: dst.len(),
    };
    let rem = libc::iovec {
        iov_base: remote as usize as *mut libc::c_void,
        iov_len: dst.len(),
    };
    // SAFETY: local describes our exclusive slice; the kernel validates the remote range and
    // permission (ptrace access) and fails cleanly otherwise.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &rem, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Writes `src` to address `remote` of process `pid` with one cross-memory-attach call
/// (`process_vm_writev`). Returns the number of bytes written.
pub fn cma_write(pid: i32, remote: u64, src: &[u8]) -> io::Result<usize> {
    let local = libc::iovec {
        iov_base: src.as_ptr() as *mut libc::c_void,
        iov_len: src.len(),
    };
    let rem = libc::iovec {
        iov_base: remote as usize as *mut libc::c_void,
        iov_len: src.len(),
    };
    // SAFETY: local describes our slice, which the kernel only reads; the kernel validates the
    // remote range and permission (ptrace access) and fails cleanly otherwise.
    let n = unsafe { libc::process_vm_writev(pid, &local, 1, &rem, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Copies `src` into `dst` (equal lengths) with non-temporal stores: the destination lines go
/// to memory and are dropped from every cache (including another core's copy) without being
/// read first. For a buffer this process writes and another core then reads once, such as a
/// collective stage: when the two vCPUs sit far apart (a cache line crossing in ~215 ns), a
/// plain store must first take each line back from the reader's cache, and the writer managed
/// ~6 GB/s; with these stores ~26 GB/s (the reader then reads from memory, ~20 GB/s instead of
/// ~14 from the far cache, or ~36 from a near one). Ends with a store fence, so a release store
/// after it publishes the data. Unaligned heads and tails and non-x86-64 targets use a plain copy.
pub fn copy_nontemporal(dst: &mut [u8], src: &[u8]) {
    assert_eq!(
        dst.len(),
        src.len(),
        "copy between buffers of different lengths"
    );
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        let head = dst.as_ptr().align_offset(16).min(dst.len());
        let body = (dst.len() - head) / 64 * 64;
        dst[..head].copy_from_slice(&src[..head]);
        let (d, s) = (&mut dst[head..head + body], &src[head..head + body]);
        for (dc, sc) in d.chunks_exact_mut(64).zip(s.chunks_exact(64)) {
            let dp = dc.as_mut_ptr().cast::<__m128i>();
            let sp = sc.as_ptr().cast::<__m128i>();
            // SAFETY: SSE2 is part of the x86-64 baseline. `sp` points at 64 readable bytes of
            // `src` (unaligned loads are allowed); `dp` at 64 writable bytes of `dst`, 16-byte
            // aligned (`head` made the body start on a 16-byte boundary, chunks are 64 bytes).
            unsafe {
                let a = _mm_loadu_si128(sp);
                let b = _mm_loadu_si128(sp.add(1));
                let c = _mm_loadu_si128(sp.add(2));
                let e = _mm_loadu_si128(sp.add(3));
                _mm_stream_si128(dp, a);
                _mm_stream_si128(dp.add(1), b);
                _mm_stream_si128(dp.add(2), c);
                _mm_stream_si128(dp.add(3), e);
            }
        }
        dst[head + body..].copy_from_slice(&src[head + body..]);
        // SAFETY: a store fence has no memory operands; it orders the streaming stores above
        // before any later store (the caller's release store that publishes them).
        unsafe { _mm_sfence() };
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// Fills `buf` with random bytes from the kernel.
pub fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer/length describe the unfilled tail of our exclusive slice.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// This process's id.
pub fn getpid() -> i32 {
    std::process::id() as i32
}

/// Current `RLIMIT_MEMLOCK` soft limit in bytes (None = unlimited or unknown).
pub fn memlock_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: r is a valid out-parameter.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0
        || r.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(r.rlim_cur)
}

/// Spin-loop hint.
#[inline(always)]
pub fn cpu_relax() {
    std::hint::spin_loop();
}

/// Raw descriptor number helper for `Command` users.
pub fn raw_fd_of(fd: &impl AsRawFd) -> RawFd {
    fd.as_raw_fd()
}

/// The memory a rank's engine may deposit into or read from: its part of the job heap (through
/// the region mapping) and private buffers it allocated. Every raw access is checked against these
/// ranges first, so a memory descriptor naming any other address is refused, never dereferenced.
#[derive(Debug, Default)]
pub struct OwnedMemory {
    heap: Option<(std::sync::Arc<Mapping>, usize, usize)>, // mapping, offset, len
    private: Vec<Box<[u8]>>,
    /// Bumped whenever memory stops being owned (a private buffer freed): a [`WordSpan`] checked
    /// under another value may name memory that is gone.
    freed: u64,
}

/// At most 8 bytes [`OwnedMemory::word_span`] found owned, with the memory's state at the time:
/// [`OwnedMemory::read_word`] reads them again without a new range check for as long as no owned
/// memory has been freed since.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WordSpan {
    addr: u64,
    len: u8,
    freed: u64,
}

impl WordSpan {
    /// The span's length in bytes (at most 8).
    #[inline(always)]
    pub fn len(&self) -> u64 {
        u64::from(self.len)
    }

    /// True for a span of no bytes (a 0-byte put).
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl OwnedMemory {
    /// Memory consisting of `len` bytes of `map` at `off` (the rank's heap part).
    pub fn new(map: std::sync::Arc<Mapping>, off: usize, len: usize) -> OwnedMemory {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= map.len()),
            "heap part outside mapping"
        );
        OwnedMemory {
            heap: Some((map, off, len)),
            private: Vec::new(),
            freed: 0,
        }
    }

    /// Address range of the heap part in this process.
    pub fn heap_range(&self) -> (u64, u64) {
        match &self.heap {
            Some((m, off, len)) => (m.ptr() as u64 + *off as u64, *len as u64),
            None => (0, 0),
        }
    }

    /// Allocates a private (not shared) zeroed buffer; returns its address.
    pub fn alloc_private(&mut self, len: usize) -> u64 {
        let b = vec![0u8; len.max(1)].into_boxed_slice();
        let a = b.as_ptr() as u64;
        self.private.push(b);
        a
    }

    /// Frees a private buffer by address. Returns false if it was not one.
    pub fn free_private(&mut self, addr: u64) -> bool {
        match self.private.iter().position(|b| b.as_ptr() as u64 == addr) {
            Some(i) => {
                self.private.swap_remove(i);
                self.freed += 1;
                true
            }
            None => false,
        }
    }

    /// True when `addr..addr+len` lies inside memory we own.
    #[inline]
    pub fn owns(&self, addr: u64, len: u64) -> bool {
        let inside = |base: u64, blen: u64| {
            addr >= base && addr.checked_add(len).is_some_and(|e| e <= base + blen)
        };
        let (hb, hl) = self.heap_range();
        inside(hb, hl)
            || self
                .private
                .iter()
                .any(|b| inside(b.as_ptr() as u64, b.len() as u64))
    }

    /// True when `addr..addr+len` lies inside the heap part.
    #[inline]
    pub fn in_heap(&self, addr: u64, len: u64) -> bool {
        let (hb, hl) = self.heap_range();
        addr >= hb && addr.checked_add(len).is_some_and(|e| e <= hb + hl)
    }

    /// Copies `src` to owned address `addr`. False (nothing copied) if the range is not owned.
    #[inline]
    pub fn write(&self, addr: u64, src: &[u8]) -> bool {
        if !self.owns(addr, src.len() as u64) {
            return false;
        }
        // SAFETY: the destination lies in memory this table owns (checked above) and stays alive
        // while &self lives; ptr::copy tolerates overlap (a rank putting to itself).
        unsafe { std::ptr::copy(src.as_ptr(), addr as usize as *mut u8, src.len()) };
        true
    }

    /// [`OwnedMemory::write`] of the first `n` bytes of `word` (`n` > 8 writes nothing and is
    /// refused): a whole word is one store and no bytes no store, instead of a copy call.
    #[inline]
    pub fn write_word_prefix(&self, addr: u64, word: [u8; 8], n: usize) -> bool {
        if n > 8 || !self.owns(addr, n as u64) {
            return false;
        }
        let to = addr as usize as *mut u8;
        match n {
            0 => {}
            // SAFETY: the 8 destination bytes lie in memory this table owns (checked above) and
            // stay alive while &self lives; the source is a local value, so nothing overlaps.
            8 => unsafe { std::ptr::write_unaligned(to as *mut [u8; 8], word) },
            // SAFETY: as above, for the `n` (< 8) bytes checked.
            _ => unsafe { std::ptr::copy_nonoverlapping(word.as_ptr(), to, n) },
        }
        true
    }

    /// `addr..addr+len` (at most 8 bytes) when it is owned now, for [`OwnedMemory::read_word`].
    pub fn word_span(&self, addr: u64, len: u64) -> Option<WordSpan> {
        (len <= 8 && self.owns(addr, len)).then_some(WordSpan {
            addr,
            len: len as u8,
            freed: self.freed,
        })
    }

    /// The bytes of `s` as a little-endian word (zero past its length), or `None` when owned
    /// memory was freed since `s` was checked (check the range again with
    /// [`OwnedMemory::word_span`]). The heap part is owned for the life of this table and private
    /// buffers only leave through [`OwnedMemory::free_private`], which bumps `freed`: so an
    /// unchanged count means the range checked for `s` is still owned.
    #[inline(always)]
    pub fn read_word(&self, s: &WordSpan) -> Option<u64> {
        if s.freed != self.freed {
            return None;
        }
        let from = s.addr as usize as *const u8;
        Some(match s.len {
            0 => 0,
            // SAFETY: the 8 bytes at `addr` were owned when `s` was made (`word_span`) and still
            // are (the count above: nothing freed since); owned memory stays mapped while &self
            // lives. An unaligned read of plain bytes.
            8 => u64::from_le(unsafe { std::ptr::read_unaligned(from as *const u64) }),
            n => {
                let mut w = [0u8; 8];
                // SAFETY: as above, for the `n` (< 8) bytes of `s`; the destination is a local
                // array, so nothing overlaps.
                unsafe { std::ptr::copy_nonoverlapping(from, w.as_mut_ptr(), n as usize) };
                u64::from_le_bytes(w)
            }
        })
    }

    /// Copies from owned address `addr` into `dst`. False if the range is not owned.
    pub fn read(&self, addr: u64, dst: &mut [u8]) -> bool {
        if !self.owns(addr, dst.len() as u64) {
            return false;
        }
        // SAFETY: the source lies in owned memory (checked); dst is an exclusive slice.
        unsafe { std::ptr::copy(addr as usize as *const u8, dst.as_mut_ptr(), dst.len()) };
        true
    }

    /// Runs `f` on the owned bytes at `addr..addr+len`, or returns None if not owned.
    pub fn with_slice<R>(&self, addr: u64, len: u64, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        if !self.owns(addr, len) {
            return None;
        }
        // SAFETY: owned range (checked), alive while &self lives; the engine lock the caller holds
        // keeps deposits out while `f` runs.
        Some(f(unsafe {
            std::slice::from_raw_parts(addr as usize as *const u8, len as usize)
        }))
    }

    /// Runs `f` on the owned bytes mutably. `&mut self` keeps every other access out.
    pub fn with_slice_mut<R>(
        &mut self,
        addr: u64,
        len: u64,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Option<R> {
        if !self.owns(addr, len) {
            return None;
        }
        // SAFETY: owned range (checked); exclusive because we hold &mut self.
        Some(f(unsafe {
            std::slice::from_raw_parts_mut(addr as usize as *mut u8, len as usize)
        }))
    }

    /// Reads `len` bytes of process `pid` at `remote` into owned address `addr` with cross-memory
    /// attach. Returns bytes read, or an error (range not owned, or the kernel refused).
    pub fn cma_into(&self, addr: u64, len: u64, pid: i32, remote: u64) -> io::Result<usize> {
        if !self.owns(addr, len) {
            return Err(io::Error::other("destination not owned"));
        }
        // SAFETY: owned range (checked), alive while &self lives.
        let dst = unsafe { std::slice::from_raw_parts_mut(addr as usize as *mut u8, len as usize) };
        let mut done = 0;
        while done < dst.len() {
            let n = cma_read(pid, remote + done as u64, &mut dst[done..])?;
            if n == 0 {
                return Err(io::Error::other("cross-memory attach read 0 bytes"));
            }
            done += n;
        }
        Ok(done)
    }
}

/// Hints the CPU to start fetching the cache line holding `at` (no effect on memory or flags, and
/// never a fault, whatever the address).
#[inline(always)]
pub fn prefetch_line(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults (any address), never changes memory, and SSE
    // (which provides it) is part of the x86_64 baseline.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(at as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// Hints the CPU to fetch the cache line holding `at` for writing: `prefetchw` when `prefetchw`
/// says the CPU has it ([`has_prefetchw`], looked up once by the caller), else a read prefetch.
#[inline(always)]
pub fn prefetch_line_for_write(at: *const u8, prefetchw: bool) {
    #[cfg(target_arch = "x86_64")]
    if prefetchw {
        // SAFETY: `prefetchw` is a hint: it never faults (any address), never changes memory or
        // flags; it is issued only when CPUID reported it (the caller's `prefetchw`, from
        // `has_prefetchw`).
        unsafe {
            std::arch::asm!("prefetchw [{0}]", in(reg) at, options(nostack, preserves_flags, readonly));
        }
        return;
    }
    let _ = prefetchw;
    prefetch_line(at);
}

/// True when the CPU has `prefetchw` (CPUID 0x8000_0001 ECX bit 8, "3DNowPrefetch"/PRFCHW),
/// looked up once.
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn has_prefetchw() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    // 0 = not looked up yet, 1 = absent, 2 = present.
    static STATE: AtomicU8 = AtomicU8::new(0);
    match STATE.load(Ordering::Relaxed) {
        0 => {
            // Leaf 0x8000_0000 tells whether the extended leaf 0x8000_0001 exists.
            use std::arch::x86_64::__cpuid;
            let present =
                __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 8) != 0;
            STATE.store(if present { 2 } else { 1 }, Ordering::Relaxed);
            present
        }
        v => v == 2,
    }
}

/// No `prefetchw` off x86_64 (write prefetches fall back to read prefetches, which are no-ops
/// there).
#[cfg(not(target_arch = "x86_64"))]
pub fn has_prefetchw() -> bool {
    false
}

/// Whether process `pid` still exists (a zombie counts as gone only once reaped; signal 0 checks
/// existence without sending anything).
pub fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only reports whether `pid` exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {

    #[test]
    fn nontemporal_copy_copies_every_byte_at_any_alignment() {
        let src: Vec<u8> = (0..70_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for (doff, soff, len) in [
            (0, 0, 0),
            (3, 0, 15),
            (1, 5, 64),
            (16, 0, 65_536),
            (5, 9, 69_000),
        ] {
            let mut dst = vec![0xAAu8; len + doff + 8];
            copy_nontemporal(&mut dst[doff..doff + len], &src[soff..soff + len]);
            assert_eq!(
                &dst[doff..doff + len],
                &src[soff..soff + len],
                "{doff} {soff} {len}"
            );
            assert!(dst[..doff]
                .iter()
                .chain(&dst[doff + len..])
                .all(|&b| b == 0xAA));
        }
    }
    use super::*;

    #[test]
    fn affinity_of_this_process_by_pid_matches_its_own_view() {
        let mine = cpus_of(std::process::id()).unwrap();
        assert_eq!(mine, allowed_cpus());
        assert!(!mine.is_empty());
        assert!(online_cpus() >= mine.len());
        assert!(cpus_of(u32::MAX).is_err());
    }

    #[test]
    fn a_requested_slice_is_what_the_kernel_reports_or_nothing() {
        // In a thread of its own: the slice belongs to the calling thread.
        let got = std::thread::spawn(|| set_sched_slice(300_000))
            .join()
            .unwrap()
            .unwrap();
        // Normal policy here; kernels before 6.12 report no slice, later ones the one asked for.
        let v = got.expect("test threads run under SCHED_OTHER");
        assert!(v == 0 || v == 300_000, "slice reported as {v} ns");
    }

    #[test]
    fn a_word_prefix_writes_exactly_its_bytes_and_only_into_owned_memory() {
        use super::{Mapping, Memfd, OwnedMemory};
        let fd = Memfd::create("qk-word-prefix-test", 4096).expect("memfd");
        let map = std::sync::Arc::new(Mapping::map(&fd, 4096, true).expect("map"));
        // The heap part is bytes 1024..2048 of the mapping.
        let mem = OwnedMemory::new(map.clone(), 1024, 1024);
        let (base, len) = mem.heap_range();
        let word = *b"ABCDEFGH";
        for n in 0..=8usize {
            // Odd addresses too: the one-store case must not need alignment.
            for at in [base, base + 3, base + len - 8] {
                map.write(
                    at as usize - map.ptr() as usize,
                    &[0xEE; 16][..(base + len - at).min(16) as usize],
                );
                assert!(
                    mem.write_word_prefix(at, word, n),
                    "n = {n} at {}",
                    at - base
                );
                let mut back = [0u8; 8];
                assert!(mem.read(at, &mut back));
                assert_eq!(&back[..n], &word[..n], "n = {n}");
                assert!(
                    back[n..].iter().all(|&b| b == 0xEE),
                    "n = {n}: a byte past the prefix changed"
                );
            }
        }
        // Ranges not owned are refused with nothing written: before, across the end, after.
        for (at, n) in [
            (base - 8, 8),
            (base + len - 4, 8),
            (base + len - 7, 8),
            (base + len, 1),
            (base - 1, 1),
        ] {
            let before = {
                let mut b = vec![0u8; 4096];
                map.read(0, &mut b);
                b
            };
            assert!(!mem.write_word_prefix(at, word, n), "n = {n} at {at:#x}");
            let mut after = vec![0u8; 4096];
            map.read(0, &mut after);
            assert_eq!(before, after, "a refused write changed the mapping");
        }
        // More than a word is refused.
        assert!(!mem.write_word_prefix(base, word, 9));
    }

    #[test]
    fn a_word_span_reads_its_bytes_while_owned_and_nothing_once_memory_is_freed() {
        use super::{Mapping, Memfd, OwnedMemory};
        let fd = Memfd::create("qk-word-span-test", 4096).expect("memfd");
        let map = std::sync::Arc::new(Mapping::map(&fd, 4096, true).expect("map"));
        let mut mem = OwnedMemory::new(map.clone(), 1024, 1024);
        let (base, len) = mem.heap_range();
        map.write(1024, b"0123456789abcdef");
        for n in 0..=8u64 {
            for at in [base, base + 3, base + len - 8] {
                let s = mem.word_span(at, n).expect("owned");
                let mut want = [0u8; 8];
                assert!(mem.read(at, &mut want[..n as usize]));
                assert_eq!(
                    mem.read_word(&s),
                    Some(u64::from_le_bytes(want)),
                    "{n} at {at:#x}"
                );
            }
        }
        // The word is read when asked for, not when the span is made.
        let s = mem.word_span(base, 8).expect("owned");
        map.write(1024, b"ABCDEFGH");
        assert_eq!(mem.read_word(&s), Some(u64::from_le_bytes(*b"ABCDEFGH")));
        // Not owned, or longer than a word: no span.
        for (at, n) in [
            (base - 8, 8),
            (base + len - 4, 8),
            (base + len, 1),
            (base, 9),
        ] {
            assert_eq!(mem.word_span(at, n), None, "{n} at {at:#x}");
        }
        // A private buffer's span reads until the buffer is freed; then every span made before
        // (the heap's too) must be checked again, and the freed buffer's is refused.
        let p = mem.alloc_private(16);
        assert!(mem.write(p, b"private!"));
        let ps = mem.word_span(p, 8).expect("owned");
        assert_eq!(mem.read_word(&ps), Some(u64::from_le_bytes(*b"private!")));
        assert!(mem.free_private(p));
        assert_eq!(mem.read_word(&ps), None);
        assert_eq!(mem.read_word(&s), None);
        let s = mem.word_span(base, 8).expect("the heap is still owned");
        assert_eq!(mem.read_word(&s), Some(u64::from_le_bytes(*b"ABCDEFGH")));
    }

    #[test]
    fn prefetch_hints_leave_the_mapping_unchanged_and_ignore_offsets_outside_it() {
        let fd = Memfd::create("qk-prefetch-test", 4096).expect("memfd");
        let m = Mapping::map(&fd, 4096, true).expect("map");
        let pattern: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        m.write(0, &pattern);
        for off in [0, 63, 64, 4095, 4096, usize::MAX] {
            m.prefetch(off);
            m.prefetch_write(off);
        }
        let mut back = vec![0u8; 4096];
        m.read(0, &mut back);
        assert_eq!(back, pattern);
    }
}
