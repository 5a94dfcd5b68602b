//! Static memory map. Physical memory is identity-mapped for the kernel with
//! 2 MiB pages (0-1 GiB RAM, 3-4 GiB MMIO, supervisor only). Each process has
//! its own three page-table pages (PML4, PDPT, PD) from a static pool and a
//! user region at 1-2 GiB backed by whole 2 MiB frames, mapped eagerly (no
//! demand paging). Frames come from a static bitmap above the kernel image.
use core::ptr::{addr_of, addr_of_mut};
use metal_rt::abi::{PAGE, USER_BASE, USER_END};

use crate::proc::MAX_PROCS;

/// One 4 KiB page-table page.
#[repr(C, align(4096))]
pub struct Table(pub [u64; 512]);

#[unsafe(no_mangle)]
pub static mut BOOT_PML4: Table = Table([0; 512]);
#[unsafe(no_mangle)]
pub static mut BOOT_PDPT: Table = Table([0; 512]);
#[unsafe(no_mangle)]
pub static mut BOOT_PD0: Table = Table([0; 512]);
#[unsafe(no_mangle)]
pub static mut BOOT_PD3: Table = Table([0; 512]);

struct Space {
    pml4: Table,
    pdpt: Table,
    pd: Table,
}

static mut SPACES: [Space; MAX_PROCS] = [const {
    Space {
        pml4: Table([0; 512]),
        pdpt: Table([0; 512]),
        pd: Table([0; 512]),
    }
}; MAX_PROCS];

/// First physical address handed out as a user frame.
const FRAME_BASE: u64 = 32 << 20;
const MAX_FRAMES: usize = 512;
static mut FRAME_USED: [bool; MAX_FRAMES] = [true; MAX_FRAMES];

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const PS: u64 = 0x80;

/// Marks the frames between 32 MiB and the top of RAM (max 1 GiB) free.
pub fn init(mem_top: u64) {
    let top = mem_top.min(1 << 30);
    // SAFETY: boot-time, single core; nothing else references the bitmap.
    let used = unsafe { &mut *addr_of_mut!(FRAME_USED) };
    for (i, u) in used.iter_mut().enumerate() {
        let base = i as u64 * PAGE;
        *u = !(base >= FRAME_BASE && base + PAGE <= top);
    }
}

/// Number of free 2 MiB frames.
pub fn free_frames() -> usize {
    // SAFETY: read-only snapshot, single core, kernel code is never reentered.
    unsafe { (*addr_of!(FRAME_USED)).iter().filter(|u| !**u).count() }
}

fn space(slot: usize) -> &'static mut Space {
    // SAFETY: each slot belongs to one process; the kernel is single-threaded
    // and non-reentrant, so no two live references to one slot exist.
    unsafe { &mut (*addr_of_mut!(SPACES))[slot] }
}

/// Builds an empty address space for process slot `slot`; returns its CR3.
pub fn space_init(slot: usize) -> u64 {
    let s = space(slot);
    s.pml4.0 = [0; 512];
    s.pdpt.0 = [0; 512];
    s.pd.0 = [0; 512];
    s.pml4.0[0] = addr_of!(s.pdpt) as u64 | P | RW | US;
    s.pdpt.0[0] = addr_of!(BOOT_PD0) as u64 | P | RW;
    s.pdpt.0[1] = addr_of!(s.pd) as u64 | P | RW | US;
    s.pdpt.0[3] = addr_of!(BOOT_PD3) as u64 | P | RW;
    addr_of!(s.pml4) as u64
}

/// Why a memory request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemError {
    /// Range outside the user region or not mapped.
    Fault,
    /// No free frame left.
    NoMemory,
}

fn user_range(va: u64, len: u64) -> Result<(u64, u64), MemError> {
    let end = va.checked_add(len).ok_or(MemError::Fault)?;
    if va < USER_BASE || end > USER_END {
        return Err(MemError::Fault);
    }
    Ok((va, end))
}

/// Backs `[va, va+len)` of `slot` with zeroed frames (already-mapped pages stay).
pub fn map(slot: usize, va: u64, len: u64) -> Result<(), MemError> {
    let (start, end) = user_range(va, len)?;
    let s = space(slot);
    let first = (start - USER_BASE) / PAGE;
    let last = (end - USER_BASE).div_ceil(PAGE);
    // SAFETY: single-threaded kernel; no other reference to the bitmap is live.
    let used = unsafe { &mut *addr_of_mut!(FRAME_USED) };
    for i in first..last {
        let e = &mut s.pd.0[i as usize];
        if *e & P != 0 {
            continue;
        }
        let f = used.iter().position(|u| !*u).ok_or(MemError::NoMemory)?;
        used[f] = true;
        let phys = f as u64 * PAGE;
        // SAFETY: the frame is free RAM inside the kernel's identity map and
        // now owned by this process only.
        unsafe { core::ptr::write_bytes(phys as *mut u8, 0, PAGE as usize) };
        *e = phys | P | RW | US | PS;
    }
    Ok(())
}

/// Returns every frame of `slot` to the pool.
pub fn unmap_all(slot: usize) {
    let s = space(slot);
    // SAFETY: single-threaded kernel; no other reference to the bitmap is live.
    let used = unsafe { &mut *addr_of_mut!(FRAME_USED) };
    for e in s.pd.0.iter_mut() {
        if *e & P != 0 {
            used[((*e & !0x1f_ffff) / PAGE) as usize] = false;
            *e = 0;
        }
    }
}

/// Physical address behind `va` in `slot`, if mapped.
fn translate(slot: usize, va: u64) -> Option<u64> {
    if !(USER_BASE..USER_END).contains(&va) {
        return None;
    }
    let e = space(slot).pd.0[((va - USER_BASE) / PAGE) as usize];
    (e & P != 0).then(|| (e & !0x1f_ffff) + (va % PAGE))
}

/// Checks that `[va, va+len)` is fully mapped in `slot`.
pub fn check(slot: usize, va: u64, len: u64) -> Result<(), MemError> {
    let (start, end) = user_range(va, len)?;
    let mut a = start & !(PAGE - 1);
    while a < end {
        translate(slot, a).ok_or(MemError::Fault)?;
        a += PAGE;
    }
    Ok(())
}

/// Walks `[va, va+len)` of `slot` page by page, calling `f(phys, offset, n)`.
fn walk(
    slot: usize,
    va: u64,
    len: usize,
    mut f: impl FnMut(*mut u8, usize, usize),
) -> Result<(), MemError> {
    check(slot, va, len as u64)?;
    let mut done = 0usize;
    while done < len {
        let a = va + done as u64;
        let phys = translate(slot, a).ok_or(MemError::Fault)?;
        let n = ((PAGE - a % PAGE) as usize).min(len - done);
        f(phys as *mut u8, done, n);
        done += n;
    }
    Ok(())
}

/// Copies `src` into process memory.
pub fn copy_out(slot: usize, va: u64, src: &[u8]) -> Result<(), MemError> {
    walk(slot, va, src.len(), |p, off, n| {
        // SAFETY: `p..p+n` is a frame owned by the process, identity-mapped
        // for the kernel; `src[off..off+n]` is in bounds by construction.
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr().add(off), p, n) }
    })
}

/// Copies process memory into `dst`.
pub fn copy_in(slot: usize, va: u64, dst: &mut [u8]) -> Result<(), MemError> {
    let d = dst.as_mut_ptr();
    walk(slot, va, dst.len(), |p, off, n| {
        // SAFETY: as in copy_out, with source and destination swapped.
        unsafe { core::ptr::copy_nonoverlapping(p, d.add(off), n) }
    })
}

/// Copies between two processes (used by the PCT's `mem_write`).
pub fn copy_between(
    from: usize,
    from_va: u64,
    to: usize,
    to_va: u64,
    len: usize,
) -> Result<(), MemError> {
    check(to, to_va, len as u64)?;
    let mut buf = [0u8; 4096];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len());
        copy_in(from, from_va + done as u64, &mut buf[..n])?;
        copy_out(to, to_va + done as u64, &buf[..n])?;
        done += n;
    }
    Ok(())
}

/// Reads a plain-old-data value from process memory.
pub fn read_pod<T: Copy + Default>(slot: usize, va: u64) -> Result<T, MemError> {
    let mut v = T::default();
    // SAFETY: T is Copy plain data (the abi structs: only u64 fields), so any
    // byte pattern is valid; the slice covers exactly `v`.
    let bytes = unsafe {
        core::slice::from_raw_parts_mut(addr_of_mut!(v) as *mut u8, core::mem::size_of::<T>())
    };
    copy_in(slot, va, bytes)?;
    Ok(v)
}

/// Writes a plain-old-data value into process memory.
pub fn write_pod<T: Copy>(slot: usize, va: u64, v: &T) -> Result<(), MemError> {
    // SAFETY: reading the bytes of a Copy value of u64 fields (no padding).
    let bytes = unsafe {
        core::slice::from_raw_parts(v as *const T as *const u8, core::mem::size_of::<T>())
    };
    copy_out(slot, va, bytes)
}
