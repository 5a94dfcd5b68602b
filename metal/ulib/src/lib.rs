//! The user library for QK programs: `_start`, the system-call wrappers, a
//! console writer and the panic handler. A program defines
//! `#[unsafe(no_mangle)] pub extern "C" fn umain(arg: u64) -> u64`.
#![no_std]

pub use metal_rt::abi;
pub use metal_rt::rdtsc;

use core::arch::{asm, global_asm};
use core::fmt::{self, Write};

global_asm!(
    r#"
    .section .text.start, "ax"
    .global _start
_start:
    and rsp, -16
    call {entry}
    ud2
"#,
    entry = sym start_rust,
);

unsafe extern "C" {
    fn umain(arg: u64) -> u64;
}

extern "C" fn start_rust(arg: u64) -> ! {
    // SAFETY: every program links exactly one `umain` with this signature.
    let status = unsafe { umain(arg) };
    exit(status)
}

/// Raw system call with up to four arguments.
#[inline(always)]
pub fn syscall(nr: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> i64 {
    let r: i64;
    // SAFETY: `syscall` enters the QK, which validates every argument and
    // clobbers only rcx and r11 (and rax for the result).
    unsafe {
        asm!("syscall", inlateout("rax") nr as i64 => r, in("rdi") a0, in("rsi") a1, in("rdx") a2,
             in("r10") a3, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    r
}

/// Writes bytes to the console.
pub fn write(b: &[u8]) -> i64 {
    syscall(abi::WRITE, b.as_ptr() as u64, b.len() as u64, 0, 0)
}

/// Ends the process.
pub fn exit(status: u64) -> ! {
    syscall(abi::EXIT, status, 0, 0, 0);
    loop {
        core::hint::spin_loop();
    }
}

/// `(pid, node, nodes)` of the caller.
pub fn info() -> (u64, u64, u64) {
    let v = syscall(abi::INFO, 0, 0, 0, 0) as u64;
    (v & 0xffff, (v >> 16) & 0xffff, v >> 32)
}

fn res(r: i64) -> Result<u64, i64> {
    if r < 0 {
        Err(r)
    } else {
        Ok(r as u64)
    }
}

/// Portals entry points (section 7 of the Puma report) as thin wrappers.
pub mod ptl {
    use super::{abi, res, syscall};

    /// Creates a memory descriptor; returns its handle.
    pub fn md_create(d: &abi::MdDesc) -> Result<u64, i64> {
        res(syscall(
            abi::PTL_MD,
            abi::MD_CREATE,
            d as *const _ as u64,
            0,
            0,
        ))
    }
    /// Releases a memory descriptor.
    pub fn md_release(md: u64) -> Result<u64, i64> {
        res(syscall(abi::PTL_MD, abi::MD_RELEASE, md, 0, 0))
    }
    /// Frees the message a dynamic descriptor holds at `offset`.
    pub fn md_free(md: u64, offset: u64) -> Result<u64, i64> {
        res(syscall(abi::PTL_MD, abi::MD_FREE, md, offset, 0))
    }
    /// Appends a match entry to `portal`'s list; returns its handle.
    pub fn me_append(portal: u64, d: &abi::MeDesc) -> Result<u64, i64> {
        res(syscall(
            abi::PTL_ME,
            abi::ME_APPEND,
            portal,
            d as *const _ as u64,
            0,
        ))
    }
    /// Inserts a match entry before (or after) `anchor`; returns its handle.
    pub fn me_insert(anchor: u64, before: bool, d: &abi::MeDesc) -> Result<u64, i64> {
        let op = if before {
            abi::ME_INSERT_BEFORE
        } else {
            abi::ME_INSERT_AFTER
        };
        res(syscall(abi::PTL_ME, op, anchor, d as *const _ as u64, 0))
    }
    /// Removes a match entry from its list.
    pub fn me_unlink(entry: u64) -> Result<u64, i64> {
        res(syscall(abi::PTL_ME, abi::ME_UNLINK, entry, 0, 0))
    }
    /// Sets an entry's second (too long) and third (invalid descriptor) links.
    pub fn me_set_links(entry: u64, links: &abi::MeLinks) -> Result<u64, i64> {
        res(syscall(
            abi::PTL_ME,
            abi::ME_SET_LINKS,
            entry,
            links as *const _ as u64,
            0,
        ))
    }
    /// Enables or disables a portal.
    pub fn portal_enable(portal: u64, on: bool) -> Result<u64, i64> {
        let op = if on {
            abi::PORTAL_ENABLE
        } else {
            abi::PORTAL_DISABLE
        };
        res(syscall(abi::PTL_PORTAL, op, portal, 0, 0))
    }
    /// Sets a portal's access control entry.
    pub fn portal_acl(portal: u64, acl: &abi::AclDesc) -> Result<u64, i64> {
        res(syscall(
            abi::PTL_PORTAL,
            abi::PORTAL_ACL,
            portal,
            acl as *const _ as u64,
            0,
        ))
    }
    /// Sends a put.
    pub fn put(s: &abi::PutSpec) -> Result<u64, i64> {
        res(syscall(abi::PTL_PUT, s as *const _ as u64, 0, 0, 0))
    }
    /// Sends a get.
    pub fn get(s: &abi::GetSpec) -> Result<u64, i64> {
        res(syscall(abi::PTL_GET, s as *const _ as u64, 0, 0, 0))
    }
    /// Blocks until an event arrives.
    pub fn eq_wait() -> Result<abi::Event, i64> {
        let mut ev = abi::Event::default();
        res(syscall(abi::PTL_EQ_WAIT, &mut ev as *mut _ as u64, 0, 0, 0)).map(|_| ev)
    }
    /// The next event, if any, without blocking.
    pub fn eq_poll() -> Result<Option<abi::Event>, i64> {
        let mut ev = abi::Event::default();
        match syscall(abi::PTL_EQ_POLL, &mut ev as *mut _ as u64, 0, 0, 0) {
            abi::EAGAIN => Ok(None),
            r => res(r).map(|_| Some(ev)),
        }
    }
    /// The caller's delivery and drop counters.
    pub fn counters() -> Result<abi::Counters, i64> {
        let mut c = abi::Counters::default();
        res(syscall(abi::PTL_COUNTERS, &mut c as *mut _ as u64, 0, 0, 0)).map(|_| c)
    }
}

/// A name for a QK error code.
pub fn errname(e: i64) -> &'static str {
    match e {
        abi::EPERM => "EPERM (not permitted at this level of trust)",
        abi::EINVAL => "EINVAL (bad argument)",
        abi::ENOMEM => "ENOMEM (out of resources)",
        abi::ENOENT => "ENOENT (no such object)",
        abi::EFAULT => "EFAULT (bad address)",
        abi::ECHILD => "ECHILD (no process to wait for)",
        abi::EAGAIN => "EAGAIN (nothing there yet)",
        _ => "unknown error",
    }
}

/// Buffered console writer: formats into a line buffer, one `write` per flush.
pub struct Console {
    buf: [u8; 512],
    len: usize,
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl Console {
    pub const fn new() -> Self {
        Console {
            buf: [0; 512],
            len: 0,
        }
    }
    pub fn flush(&mut self) {
        if self.len > 0 {
            write(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Formats and writes in one system call per line (up to 512 bytes).
pub fn print(args: fmt::Arguments) {
    let mut c = Console::new();
    // Console::write_str never fails.
    let _ = c.write_fmt(args);
}

#[macro_export]
macro_rules! println {
    ($($a:tt)*) => { $crate::print(format_args!("{}\n", format_args!($($a)*))) };
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    print(format_args!("panic: {info}\n"));
    exit(101)
}
