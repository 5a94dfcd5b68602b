//! x86-64 mechanics: port I/O, GDT/TSS, IDT and the naked entry stubs,
//! `syscall` MSRs, the 8259 PIC and the PIT (used only for round-robin).
use core::arch::{asm, global_asm, naked_asm};
use core::ptr::addr_of;

use crate::{Stack, STACK_SIZE};

/// Kernel code selector.
pub const KCODE: u16 = 0x08;
/// User data selector (RPL 3).
pub const UDATA: u64 = 0x1b;
/// User 64-bit code selector (RPL 3).
pub const UCODE: u64 = 0x23;
const TSS_SEL: u16 = 0x28;
/// Pseudo vector recorded in the frame for a `syscall` entry.
pub const VEC_SYSCALL: u64 = 0x100;
/// Vector of IRQ0 (PIT) after remapping the PIC.
pub const VEC_TIMER: u64 = 32;

/// The complete user context saved at every kernel entry: SSE/x87 state,
/// general registers, and the interrupt-return frame. Its layout matches the
/// pushes in `isr_common`.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct Frame {
    pub fx: [u8; 512],
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl Frame {
    /// A fresh ring-3 context: default x87/SSE state, interrupts enabled.
    pub const fn user(entry: u64, stack: u64, arg: u64) -> Frame {
        let mut fx = [0u8; 512];
        fx[0] = 0x7f; // FCW = 0x037f
        fx[1] = 0x03;
        fx[24] = 0x80; // MXCSR = 0x1f80
        fx[25] = 0x1f;
        Frame {
            fx,
            r15: 0,
            r14: 0,
            r13: 0,
            r12: 0,
            r11: 0,
            r10: 0,
            r9: 0,
            r8: 0,
            rbp: 0,
            rdi: arg,
            rsi: 0,
            rdx: 0,
            rcx: 0,
            rbx: 0,
            rax: 0,
            vector: 0,
            error: 0,
            rip: entry,
            cs: UCODE,
            rflags: 0x202,
            rsp: stack,
            ss: UDATA,
        }
    }
}

/// Stack for every kernel entry from ring 3 (TSS.rsp0 and the syscall stub).
#[unsafe(no_mangle)]
pub static mut TRAP_STACK: Stack = Stack([0; STACK_SIZE]);
/// Scratch slot for the user stack pointer during `syscall` entry.
#[unsafe(no_mangle)]
static mut SYSCALL_USER_RSP: u64 = 0;

// Common entry path: save registers and SSE state into a Frame on the trap
// stack, call `trap`, restore from the (possibly replaced) Frame, iretq.
global_asm!(
    r#"
    .global isr_common
isr_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    sub rsp, 512
    fxsave [rsp]
    mov rdi, rsp
    call {trap}
    .global isr_restore
isr_restore:
    fxrstor [rsp]
    add rsp, 512
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq

    .global syscall_entry
syscall_entry:
    mov [rip + SYSCALL_USER_RSP], rsp
    lea rsp, [rip + TRAP_STACK + {size}]
    push {udata}
    push qword ptr [rip + SYSCALL_USER_RSP]
    push r11
    push {ucode}
    push rcx
    push 0
    push {vsys}
    jmp isr_common
"#,
    trap = sym crate::proc::trap,
    size = const STACK_SIZE,
    udata = const UDATA,
    ucode = const UCODE,
    vsys = const VEC_SYSCALL,
);

unsafe extern "C" {
    fn syscall_entry();
    fn isr_common();
}

/// Enters ring 3 with `f` as the context (used once, for the first process).
pub fn enter_user(f: &Frame) -> ! {
    let top = addr_of!(TRAP_STACK) as usize + STACK_SIZE;
    let slot = (top - core::mem::size_of::<Frame>()) as *mut Frame;
    // SAFETY: the slot is the top of the trap stack, exactly where
    // isr_common keeps its Frame; nothing else uses the trap stack before the
    // first entry. isr_restore pops that Frame and irets to ring 3.
    unsafe {
        slot.write(*f);
        asm!("mov rsp, {s}", "jmp isr_restore", s = in(reg) slot, options(noreturn));
    }
}

macro_rules! stubs {
    ($($name:ident $vec:literal $err:ident),* $(,)?) => {
        $(
            #[unsafe(naked)]
            extern "C" fn $name() {
                stubs!(@body $vec $err)
            }
        )*
        const STUBS: &[(u8, extern "C" fn())] = &[$(($vec, $name)),*];
    };
    (@body $vec:literal noerr) => {
        naked_asm!("push 0", concat!("push ", $vec), "jmp {c}", c = sym isr_common)
    };
    (@body $vec:literal err) => {
        naked_asm!(concat!("push ", $vec), "jmp {c}", c = sym isr_common)
    };
}

stubs! {
    v0 0 noerr, v1 1 noerr, v2 2 noerr, v3 3 noerr, v4 4 noerr, v5 5 noerr, v6 6 noerr,
    v7 7 noerr, v8 8 err, v9 9 noerr, v10 10 err, v11 11 err, v12 12 err, v13 13 err,
    v14 14 err, v16 16 noerr, v17 17 err, v18 18 noerr, v19 19 noerr, v20 20 noerr,
    v21 21 err, v32 32 noerr, v33 33 noerr, v34 34 noerr, v35 35 noerr, v36 36 noerr,
    v37 37 noerr, v38 38 noerr, v39 39 noerr, v40 40 noerr, v41 41 noerr, v42 42 noerr,
    v43 43 noerr, v44 44 noerr, v45 45 noerr, v46 46 noerr, v47 47 noerr,
}

#[repr(C, packed)]
struct Tss {
    _r0: u32,
    rsp0: u64,
    rsp1: u64,
    rsp2: u64,
    _r1: u64,
    ist: [u64; 7],
    _r2: u64,
    _r3: u16,
    iomap: u16,
}

static mut TSS: Tss = Tss {
    _r0: 0,
    rsp0: 0,
    rsp1: 0,
    rsp2: 0,
    _r1: 0,
    ist: [0; 7],
    _r2: 0,
    _r3: 0,
    iomap: 104,
};

// null, kernel code, kernel data, user data, user code (64-bit), TSS (2 slots).
static mut GDT: [u64; 7] = [
    0,
    0x00AF_9A00_0000_FFFF,
    0x00CF_9200_0000_FFFF,
    0x00CF_F200_0000_FFFF,
    0x00AF_FA00_0000_FFFF,
    0,
    0,
];

#[repr(C, align(16))]
struct Idt([u64; 512]);
static mut IDT: Idt = Idt([0; 512]);

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

/// Loads GDT/TSS/IDT, enables `syscall`, remaps and masks the PIC.
pub fn init() {
    // SAFETY: single core, called once at boot with interrupts off; the
    // tables are statics that live for the whole run; selectors match the
    // GDT layout above (STAR expects user data at +8 and code at +16 of 0x10).
    unsafe {
        let tss = addr_of!(TSS) as u64;
        TSS.rsp0 = addr_of!(TRAP_STACK) as u64 + STACK_SIZE as u64;
        let limit = core::mem::size_of::<Tss>() as u64 - 1;
        GDT[5] = (limit & 0xffff)
            | ((tss & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((tss >> 24) & 0xff) << 56);
        GDT[6] = tss >> 32;
        let gdtr = Pointer {
            limit: (core::mem::size_of::<[u64; 7]>() - 1) as u16,
            base: addr_of!(GDT) as u64,
        };
        asm!("lgdt [{}]", in(reg) &gdtr, options(nostack));
        asm!(
            "push {cs}",
            "lea {t}, [rip + 2f]",
            "push {t}",
            "retfq",
            "2:",
            "mov ax, 0x10",
            "mov ds, ax",
            "mov es, ax",
            "mov ss, ax",
            "xor eax, eax",
            "mov fs, ax",
            "mov gs, ax",
            cs = const KCODE as u64,
            t = out(reg) _,
            out("rax") _,
        );
        asm!("ltr {0:x}", in(reg) TSS_SEL, options(nostack));

        for &(vec, f) in STUBS {
            let a = f as usize as u64;
            let i = usize::from(vec) * 2;
            IDT.0[i] = (a & 0xffff)
                | (u64::from(KCODE) << 16)
                | (0x8E << 40)
                | (((a >> 16) & 0xffff) << 48);
            IDT.0[i + 1] = a >> 32;
        }
        let idtr = Pointer {
            limit: (256 * 16 - 1) as u16,
            base: addr_of!(IDT) as u64,
        };
        asm!("lidt [{}]", in(reg) &idtr, options(nostack));

        wrmsr(0xC000_0081, (0x10u64 << 48) | (u64::from(KCODE) << 32));
        wrmsr(0xC000_0082, syscall_entry as *const () as u64);
        // FMASK: clear IF, DF, TF and AC on entry: the kernel runs with interrupts off.
        wrmsr(0xC000_0084, 0x4_0700);
    }
    // 8259: remap to 32..47, mask everything. No tick unless round-robin.
    outb(0x20, 0x11);
    outb(0xA0, 0x11);
    outb(0x21, 32);
    outb(0xA1, 40);
    outb(0x21, 4);
    outb(0xA1, 2);
    outb(0x21, 1);
    outb(0xA1, 1);
    outb(0x21, 0xff);
    outb(0xA1, 0xff);
}

/// Starts (Some(period in µs)) or stops (None) the PIT tick on IRQ0.
pub fn timer(period_us: Option<u64>) {
    match period_us {
        Some(us) => {
            let div = (1_193_182 * us / 1_000_000).clamp(2, 65535) as u16;
            outb(0x43, 0x34);
            outb(0x40, div as u8);
            outb(0x40, (div >> 8) as u8);
            outb(0x21, 0xfe);
        }
        None => outb(0x21, 0xff),
    }
}

/// Acknowledges an interrupt from the master PIC.
pub fn eoi() {
    outb(0x20, 0x20);
}

/// Writes a model-specific register.
///
/// # Safety
/// `msr` must exist and `v` must be a valid value for it.
pub unsafe fn wrmsr(msr: u32, v: u64) {
    // SAFETY: the caller vouches for the register and value.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack))
    };
}

/// Writes a byte to an I/O port.
pub fn outb(port: u16, v: u8) {
    // SAFETY: the kernel owns all I/O ports; the ports used are the UART,
    // PIC, PIT, PCI configuration and debug-exit devices.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: see outb.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a dword to an I/O port.
pub fn outl(port: u16, v: u32) {
    // SAFETY: see outb.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a dword from an I/O port.
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: see outb.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// The faulting address of the last page fault.
pub fn cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Switches to the page tables rooted at `pml4` (a physical address).
///
/// # Safety
/// `pml4` must root a table that maps the kernel exactly as the boot tables do.
pub unsafe fn load_cr3(pml4: u64) {
    // SAFETY: the caller guarantees the kernel stays mapped.
    unsafe { asm!("mov cr3, {}", in(reg) pml4, options(nostack, preserves_flags)) };
}

/// Waits for an interrupt (with IF clear: only until NMI; used after shutdown).
pub fn halt() {
    // SAFETY: hlt only stops the CPU until the next interrupt.
    unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) };
}
