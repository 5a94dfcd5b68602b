//! The quintessential kernel (QK): small, static size, run-to-completion,
//! interrupts off while it runs. It boots from QEMU's multiboot loader, sets up
//! long mode with identity-mapped 2 MiB pages, then loads the PCT (a ring-3
//! process) and enforces what the PCT decides. See ../README.md.
#![no_std]
#![no_main]

extern crate metal_rt;

mod arch;
mod mm;
mod net;
mod proc;
mod serial;
mod syscall;

use core::arch::global_asm;
use core::panic::PanicInfo;

/// The user program images embedded at build time (see build.rs).
mod images {
    include!(concat!(env!("OUT_DIR"), "/images.rs"));
}

/// Size of the boot stack (kmain) and of the trap stack (every kernel entry).
pub const STACK_SIZE: usize = 64 * 1024;

#[repr(C, align(4096))]
pub struct Stack(pub [u8; STACK_SIZE]);

/// Stack used by `kmain` until the first process starts.
#[unsafe(no_mangle)]
pub static mut BOOT_STACK: Stack = Stack([0; STACK_SIZE]);

/// Multiboot information pointer saved by the boot stub.
#[unsafe(no_mangle)]
pub static mut MB_INFO: u32 = 0;

// 32-bit entry from the multiboot loader: build the boot page tables
// (identity map of 0-1 GiB and 3-4 GiB with 2 MiB pages), enable SSE, PAE,
// long mode and paging, then jump to 64-bit code and `kmain`.
global_asm!(
    r#"
    .section .multiboot, "a"
    .balign 4
mb_header:
    .long 0x1BADB002
    .long 0x00010003
    .long -(0x1BADB002 + 0x00010003)
    .long mb_header
    .long __load_start
    .long __load_end
    .long __bss_end
    .long _start32

    .section .text.boot, "ax"
    .code32
    .global _start32
_start32:
    cli
    cld
    movl %ebx, MB_INFO
    movl $BOOT_PDPT, %eax
    orl $3, %eax
    movl %eax, BOOT_PML4
    movl $BOOT_PD0, %eax
    orl $3, %eax
    movl %eax, BOOT_PDPT
    movl $BOOT_PD3, %eax
    orl $3, %eax
    movl %eax, BOOT_PDPT + 24
    xorl %ecx, %ecx
1:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, BOOT_PD0(,%ecx,8)
    movl %ecx, %eax
    shll $21, %eax
    addl $0xC0000000, %eax
    orl $0x9B, %eax
    movl %eax, BOOT_PD3(,%ecx,8)
    incl %ecx
    cmpl $512, %ecx
    jne 1b
    movl %cr4, %eax
    orl $0x620, %eax
    movl %eax, %cr4
    movl $BOOT_PML4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x101, %eax
    wrmsr
    movl %cr0, %eax
    andl $0xFFFFFFFB, %eax
    orl $0x80000022, %eax
    movl %eax, %cr0
    lgdt boot_gdtr
    ljmp $0x08, $start64

    .code64
start64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movq $BOOT_STACK + {stack_size}, %rsp
    call kmain
2:
    hlt
    jmp 2b

    .balign 8
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF
    .quad 0x00CF92000000FFFF
boot_gdtr:
    .word 23
    .long boot_gdt
    .text
"#,
    stack_size = const STACK_SIZE,
    options(att_syntax)
);

/// Print to the serial console.
#[macro_export]
macro_rules! kprint {
    ($($a:tt)*) => { $crate::serial::print(format_args!($($a)*)) };
}

/// Print a line to the serial console.
#[macro_export]
macro_rules! kprintln {
    ($($a:tt)*) => { $crate::serial::print(format_args!("{}\n", format_args!($($a)*))) };
}

/// The kernel command line handed over by the loader (`-append`).
pub fn cmdline() -> &'static [u8] {
    // SAFETY: written once in kmain before any reader runs; single core.
    unsafe {
        let len = CMDLINE_LEN;
        &(&*core::ptr::addr_of!(CMDLINE))[..len]
    }
}

static mut CMDLINE: [u8; 256] = [0; 256];
static mut CMDLINE_LEN: usize = 0;

/// Value of `key=value` in the command line, if present.
pub fn boot_arg(key: &str) -> Option<&'static [u8]> {
    cmdline().split(|&b| b == b' ').find_map(|w| {
        let k = key.as_bytes();
        (w.len() > k.len() && w.starts_with(k) && w[k.len()] == b'=').then(|| &w[k.len() + 1..])
    })
}

/// Parses a small decimal number.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &c| {
        c.is_ascii_digit()
            .then(|| acc.checked_mul(10)?.checked_add(u64::from(c - b'0')))?
    })
}

fn read_multiboot() -> u64 {
    // SAFETY: MB_INFO was stored by the boot stub; the multiboot information
    // structure and command line lie in identity-mapped low memory, and we
    // only read the fields the flags say are valid.
    unsafe {
        let mbi = MB_INFO as usize as *const u32;
        if mbi.is_null() {
            return 64 << 20;
        }
        let flags = mbi.read();
        if flags & 4 != 0 {
            let p = mbi.add(4).read() as usize as *const u8;
            let mut n = 0;
            while n < 255 && p.add(n).read() != 0 {
                CMDLINE[n] = p.add(n).read();
                n += 1;
            }
            CMDLINE_LEN = n;
        }
        if flags & 1 != 0 {
            // mem_upper is in KiB above 1 MiB.
            (1 << 20) + u64::from(mbi.add(2).read()) * 1024
        } else {
            64 << 20
        }
    }
}

/// Rust entry point, called by the boot stub in long mode.
#[unsafe(no_mangle)]
pub extern "C" fn kmain() -> ! {
    serial::init();
    let mem_top = read_multiboot();
    arch::init();
    mm::init(mem_top);
    kprintln!(
        "qk: booted, long mode, {} MiB RAM, {} user frames of 2 MiB, cmdline \"{}\"",
        mem_top >> 20,
        mm::free_frames(),
        core::str::from_utf8(cmdline()).unwrap_or("?")
    );
    net::init();
    proc::start_pct()
}

/// Ends the QEMU run through the isa-debug-exit device: QEMU exits with
/// status `code * 2 + 1`.
pub fn shutdown(code: u8) -> ! {
    kprintln!("qk: shutdown({code})");
    arch::outb(0xf4, code);
    loop {
        arch::halt();
    }
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    kprintln!("qk: PANIC: {info}");
    shutdown(0x7f)
}
