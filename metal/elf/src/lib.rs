//! Minimal ELF64 little-endian x86-64 executable reader: the file header and
//! the loadable program headers, checked against the bytes actually present.
#![no_std]
#![forbid(unsafe_code)]

/// Why an image is not a loadable executable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElfError {
    /// Fewer bytes than the headers claim.
    Truncated,
    /// Not `\x7fELF`, not 64-bit little-endian, or not x86-64.
    NotElf64,
    /// Not an `ET_EXEC` executable (we do no relocation).
    NotExecutable,
    /// A segment's file size exceeds its memory size or its bytes run past the file.
    BadSegment,
}

impl ElfError {
    /// A short human-readable description.
    pub fn as_str(self) -> &'static str {
        match self {
            ElfError::Truncated => "image truncated",
            ElfError::NotElf64 => "not an ELF64 x86-64 image",
            ElfError::NotExecutable => "not a static executable (ET_EXEC)",
            ElfError::BadSegment => "malformed loadable segment",
        }
    }
}

/// The parts of the ELF file header a loader needs.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub entry: u64,
    pub phoff: u64,
    pub phentsize: u16,
    pub phnum: u16,
}

/// One `PT_LOAD` program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
    pub memsz: u64,
    pub flags: u32,
}

fn u16_at(b: &[u8], o: usize) -> Result<u16, ElfError> {
    let s = b.get(o..o + 2).ok_or(ElfError::Truncated)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}
fn u32_at(b: &[u8], o: usize) -> Result<u32, ElfError> {
    let s = b.get(o..o + 4).ok_or(ElfError::Truncated)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
fn u64_at(b: &[u8], o: usize) -> Result<u64, ElfError> {
    Ok(u64::from(u32_at(b, o)?) | (u64::from(u32_at(b, o + 4)?) << 32))
}

/// Size of the ELF64 file header.
pub const EHDR_SIZE: usize = 64;
/// Size of one ELF64 program header.
pub const PHDR_SIZE: usize = 56;

/// Parses the file header from the first [`EHDR_SIZE`] bytes.
pub fn header(b: &[u8]) -> Result<Header, ElfError> {
    if b.len() < EHDR_SIZE {
        return Err(ElfError::Truncated);
    }
    if &b[0..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 || u16_at(b, 18)? != 62 {
        return Err(ElfError::NotElf64);
    }
    if u16_at(b, 16)? != 2 {
        return Err(ElfError::NotExecutable);
    }
    let h = Header {
        entry: u64_at(b, 24)?,
        phoff: u64_at(b, 32)?,
        phentsize: u16_at(b, 54)?,
        phnum: u16_at(b, 56)?,
    };
    if usize::from(h.phentsize) < PHDR_SIZE && h.phnum > 0 {
        return Err(ElfError::Truncated);
    }
    Ok(h)
}

/// Parses one program header (the raw [`PHDR_SIZE`] bytes); `None` if it is
/// not `PT_LOAD`. `file_len` is the whole image's length, used to check bounds.
pub fn segment(ph: &[u8], file_len: u64) -> Result<Option<Segment>, ElfError> {
    if u32_at(ph, 0)? != 1 {
        return Ok(None);
    }
    let s = Segment {
        flags: u32_at(ph, 4)?,
        offset: u64_at(ph, 8)?,
        vaddr: u64_at(ph, 16)?,
        filesz: u64_at(ph, 32)?,
        memsz: u64_at(ph, 40)?,
    };
    let end = s.offset.checked_add(s.filesz).ok_or(ElfError::BadSegment)?;
    if s.filesz > s.memsz || end > file_len || s.vaddr.checked_add(s.memsz).is_none() {
        return Err(ElfError::BadSegment);
    }
    Ok(Some(s))
}
