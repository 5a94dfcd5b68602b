//! The ELF reader shared by the QK and the PCT (metal/elf) on good and bad
//! images: it must refuse, never panic, on anything malformed.
use metal_elf::{header, segment, ElfError, EHDR_SIZE, PHDR_SIZE};

fn image(phnum: u16, ty: u16) -> Vec<u8> {
    let mut b = vec![0u8; EHDR_SIZE + PHDR_SIZE * usize::from(phnum) + 64];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[16..18].copy_from_slice(&ty.to_le_bytes());
    b[18..20].copy_from_slice(&62u16.to_le_bytes());
    b[24..32].copy_from_slice(&0x4000_0000u64.to_le_bytes());
    b[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
    b[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    b[56..58].copy_from_slice(&phnum.to_le_bytes());
    b
}

fn phdr(ty: u32, offset: u64, vaddr: u64, filesz: u64, memsz: u64) -> Vec<u8> {
    let mut p = vec![0u8; PHDR_SIZE];
    p[0..4].copy_from_slice(&ty.to_le_bytes());
    p[4..8].copy_from_slice(&5u32.to_le_bytes());
    p[8..16].copy_from_slice(&offset.to_le_bytes());
    p[16..24].copy_from_slice(&vaddr.to_le_bytes());
    p[32..40].copy_from_slice(&filesz.to_le_bytes());
    p[40..48].copy_from_slice(&memsz.to_le_bytes());
    p
}

#[test]
fn reads_a_valid_header_and_load_segment() {
    let h = header(&image(1, 2)).unwrap();
    assert_eq!(
        (h.entry, h.phoff, h.phnum),
        (0x4000_0000, EHDR_SIZE as u64, 1)
    );
    let s = segment(&phdr(1, 0, 0x4000_0000, 100, 200), 1000)
        .unwrap()
        .unwrap();
    assert_eq!(
        (s.vaddr, s.filesz, s.memsz, s.flags),
        (0x4000_0000, 100, 200, 5)
    );
    assert_eq!(segment(&phdr(4, 0, 0, 0, 0), 1000).unwrap(), None);
}

#[test]
fn refuses_malformed_images() {
    assert_eq!(header(&[0u8; 10]).unwrap_err(), ElfError::Truncated);
    let mut bad = image(1, 2);
    bad[0] = b'X';
    assert_eq!(header(&bad).unwrap_err(), ElfError::NotElf64);
    let mut bad = image(1, 2);
    bad[4] = 1; // 32-bit
    assert_eq!(header(&bad).unwrap_err(), ElfError::NotElf64);
    assert_eq!(header(&image(1, 3)).unwrap_err(), ElfError::NotExecutable);
    // filesz > memsz, bytes past the end of the file, address overflow.
    assert_eq!(
        segment(&phdr(1, 0, 0, 300, 200), 1000).unwrap_err(),
        ElfError::BadSegment
    );
    assert_eq!(
        segment(&phdr(1, 900, 0, 200, 200), 1000).unwrap_err(),
        ElfError::BadSegment
    );
    assert_eq!(
        segment(&phdr(1, u64::MAX, 0, 2, 2), u64::MAX).unwrap_err(),
        ElfError::BadSegment
    );
    assert_eq!(
        segment(&phdr(1, 0, u64::MAX, 0, 2), 1000).unwrap_err(),
        ElfError::BadSegment
    );
    assert_eq!(
        segment(&[1, 0, 0, 0, 5], 1000).unwrap_err(),
        ElfError::Truncated
    );
}

#[test]
fn never_panics_on_arbitrary_bytes() {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for len in 0..400usize {
        let b: Vec<u8> = (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect();
        let _ = header(&b);
        if b.len() >= PHDR_SIZE {
            let _ = segment(&b[..PHDR_SIZE], b.len() as u64);
        }
    }
}
