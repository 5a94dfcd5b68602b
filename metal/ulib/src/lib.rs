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

/// A name for a QK error code.
pub fn errname(e: i64) -> &'static str {
    match e {
        abi::EPERM => "EPERM (not permitted at this level of trust)",
        abi::EINVAL => "EINVAL (bad argument)",
        abi::ENOMEM => "ENOMEM (out of resources)",
        abi::ENOENT => "ENOENT (no such object)",
        abi::EFAULT => "EFAULT (bad address)",
        abi::ECHILD => "ECHILD (no process to wait for)",
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
