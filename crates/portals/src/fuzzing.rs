//! The fuzz body: arbitrary bytes drive the whole engine (setup calls,
//! header decoding, delivery, event polling, heap frees) and every plan is
//! checked against the invariants the fabric relies on. Used by the
//! cargo-fuzz target in `fuzz/` and by a proptest in the crate, so it runs
//! even where cargo-fuzz cannot.

use crate::{
    Acl, ArrayStore, Engine, Link, MatchSpec, MdHandle, MdKind, MdOptions, MdSpec, OffsetMode,
    Position, ProcessId, Region, Save, Segment, HEADER_LEN,
};

type FuzzStore = ArrayStore<4, 16, 8, 16, 2, 16, 16>;

const ME: ProcessId = ProcessId { group: 1, rank: 0 };

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn small(&mut self, max: u64) -> Option<u64> {
        Some(self.u8()? as u64 % (max + 1))
    }
}

/// The memory each descriptor was given, to check plans against.
#[derive(Clone, Copy)]
struct Known {
    md: MdHandle,
    lo: u64,
    hi: u64,
}

/// Run one fuzz case. Panics only if an invariant is broken (that is the
/// bug the fuzzer looks for); never on any input.
pub fn run(data: &[u8]) {
    let cfg = FuzzStore::config(ME, 4096);
    let Ok(mut e) = Engine::with_store(cfg, FuzzStore::new()) else {
        panic!("fuzz configuration rejected");
    };
    let mut input = Bytes(data);
    let mut mds: [Option<Known>; 8] = [None; 8];
    let mut entries = [crate::MatchHandle::NONE; 16];
    let mut n_entries = 0usize;
    let mut eqs = [crate::EqHandle::NONE; 2];
    let mut segs = [Segment {
        addr: 0,
        len: 0,
        msg_offset: 0,
    }; 16];
    while let Some(op) = input.u8() {
        match op % 12 {
            0 => {
                // Descriptor of some kind over [base, base+len).
                let Some(kind) = input.u8() else { return };
                let Some(len) = input.small(300) else { return };
                let base = 0x1000 * (kind as u64 + 1);
                let blocks = [
                    Region::new(base, len / 3),
                    Region::new(base + len / 3, len / 3),
                    Region::new(base + 2 * (len / 3), len - 2 * (len / 3)),
                ];
                let opts = MdOptions {
                    put: kind & 8 == 0,
                    get: kind & 16 == 0,
                    ack: kind & 32 != 0,
                    truncate: kind & 64 != 0,
                };
                let save = match kind / 3 % 3 {
                    0 => Save::Header,
                    1 => Save::Body,
                    _ => Save::Both,
                };
                let mode = if kind & 128 != 0 {
                    OffsetMode::Sender
                } else {
                    OffsetMode::Receiver
                };
                let k = match kind % 4 {
                    0 => MdKind::Single {
                        region: Region::new(base, len),
                        offset: mode,
                    },
                    1 => MdKind::Independent {
                        blocks: &blocks,
                        circular: kind & 128 != 0,
                        save,
                    },
                    2 => MdKind::Combined {
                        blocks: &blocks,
                        offset: mode,
                    },
                    _ => MdKind::Dynamic {
                        region: Region::new(base, len),
                        save,
                        max_messages: 1 + (kind as u32 % 5),
                    },
                };
                let eq = eqs.iter().copied().find(|q| *q != crate::EqHandle::NONE);
                if let Ok(md) = e.md_create(&MdSpec {
                    kind: k,
                    options: opts,
                    eq,
                }) {
                    mds[md.index() as usize] = Some(Known {
                        md,
                        lo: base,
                        hi: base + len,
                    });
                }
            }
            1 => {
                let Some(p) = input.u8() else { return };
                let Some(m) = input.u8() else { return };
                let Some(bits) = input.u8() else { return };
                let Some(k) = mds[m as usize % 8] else {
                    continue;
                };
                let mut spec =
                    MatchSpec::new(bits as u64 % 4).ignore(if bits & 4 != 0 { 1 } else { 0 });
                if bits & 8 != 0 {
                    spec = spec.from(ProcessId::new(2, 0).group, (bits as u32 >> 4) % 3);
                }
                if bits & 16 != 0 {
                    spec = spec.threshold(1 + (bits as u32 >> 5));
                }
                let r = if bits & 128 != 0 && n_entries > 0 {
                    let anchor = entries[(p as usize) % n_entries];
                    let pos = if bits & 64 != 0 {
                        Position::Before
                    } else {
                        Position::After
                    };
                    e.me_insert(anchor, pos, spec, k.md)
                } else {
                    e.me_append(p as u32 % 4, spec, k.md)
                };
                if let Ok(h) = r {
                    entries[n_entries % 16] = h;
                    n_entries = (n_entries + 1).min(16);
                }
            }
            2 => {
                let Some(p) = input.u8() else { return };
                let _ = e.portal_set_acl(
                    p as u32 % 4,
                    if p & 4 != 0 {
                        Acl::ALLOW_ALL
                    } else {
                        Acl {
                            group: 2,
                            rank: 1,
                            put: true,
                            get: p & 8 != 0,
                        }
                    },
                );
                let _ = if p & 16 != 0 {
                    e.portal_disable(p as u32 % 4)
                } else {
                    e.portal_enable(p as u32 % 4)
                };
            }
            3 => {
                let Some(x) = input.u8() else { return };
                if n_entries > 0 {
                    let h = entries[x as usize % n_entries];
                    let to = entries[(x as usize / 16) % n_entries];
                    let l = |v: u8| match v % 3 {
                        0 => Link::Next,
                        1 => Link::End,
                        _ => Link::Entry(to),
                    };
                    let _ = e.me_set_links(h, l(x), l(x / 3));
                    if x & 128 != 0 {
                        let _ = e.me_unlink(h);
                    }
                }
            }
            4 => {
                let Some(x) = input.u8() else { return };
                if let Some(k) = mds[x as usize % 8] {
                    if x & 8 != 0 {
                        let _ = e.md_release(k.md);
                    } else {
                        let _ = e.portal_attach_md(x as u32 / 16 % 4, k.md);
                    }
                }
            }
            5 => {
                let Some(x) = input.u8() else { return };
                let slot = x as usize % 2;
                if eqs[slot] == crate::EqHandle::NONE {
                    if let Ok(q) = e.eq_alloc(1 + x as u32 % 8) {
                        eqs[slot] = q;
                        let _ = e.portal_set_eq(x as u32 / 2 % 4, Some(q));
                    }
                } else {
                    for _ in 0..(x / 2) {
                        match e.eq_get(eqs[slot]) {
                            Ok(Some(ev)) => {
                                assert!(
                                    ev.mlength <= ev.rlength || ev.kind == crate::EventKind::Reply
                                );
                                if let Some(k) = mds.iter().flatten().find(|k| k.md == ev.md) {
                                    let _ = e.md_free(k.md, ev.offset);
                                }
                            }
                            Ok(None) => break,
                            Err(_) => {}
                        }
                    }
                }
            }
            _ => {
                // A header: raw bytes, lightly steered so that most decode.
                let mut raw = [0u8; HEADER_LEN];
                for b in raw.iter_mut() {
                    *b = input.u8().unwrap_or(0);
                }
                raw[0] = if op & 16 != 0 { raw[0] } else { 1 };
                raw[1] = if op & 32 != 0 { raw[1] } else { 1 + raw[1] % 4 };
                let portal = raw[4] as u32 % 5;
                raw[4..8].copy_from_slice(&portal.to_le_bytes());
                let rank = raw[8] % 3;
                raw[8..16].copy_from_slice(&[2, 0, 0, 0, rank, 0, 0, 0]);
                raw[16..24].copy_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
                let bits = raw[24] % 4;
                raw[24..32].copy_from_slice(&[bits, 0, 0, 0, 0, 0, 0, 0]);
                let off = raw[32] as u64 % 320;
                raw[32..40].copy_from_slice(&off.to_le_bytes());
                let len = input.small(320).unwrap_or(0);
                raw[40..48].copy_from_slice(&len.to_le_bytes());
                let rlen = if op & 64 != 0 {
                    len + (raw[48] as u64 % 4)
                } else {
                    len
                };
                raw[48..56].copy_from_slice(&rlen.to_le_bytes());
                if op & 128 == 0 {
                    let i = raw[56] as usize % 8;
                    if let Some(k) = mds[i] {
                        raw[56..64].copy_from_slice(&k.md.to_cookie().to_le_bytes());
                    }
                }
                let Ok(h) = e.decode(&raw) else { continue };
                let before = *e.counters();
                match e.deliver(&h) {
                    Ok(plan) => {
                        assert!(plan.mlength <= plan.rlength, "mlength > rlength");
                        assert_eq!(plan.body.len(), plan.mlength, "body length != mlength");
                        assert_eq!(e.counters().delivered, before.delivered + 1);
                        let known = mds.iter().flatten().find(|k| k.md == plan.md);
                        let Ok(n) = e.write_segments(&plan.body, &mut segs) else {
                            panic!("segments of a fresh plan must be readable");
                        };
                        let mut total = 0;
                        for s in &segs[..n] {
                            assert_eq!(s.msg_offset, total, "segments out of order");
                            total += s.len;
                            if let Some(k) = known {
                                assert!(
                                    s.addr >= k.lo && s.addr + s.len <= k.hi,
                                    "segment outside descriptor"
                                );
                            }
                        }
                        assert_eq!(total, plan.mlength);
                        if let (Some(at), Some(k)) = (plan.header_at, known) {
                            assert!(
                                at >= k.lo && at + HEADER_LEN as u64 <= k.hi,
                                "header outside descriptor"
                            );
                        }
                        if let crate::Response::Ack(a) | crate::Response::Reply(a) = plan.response {
                            assert!(a
                                .validate(&crate::Limits {
                                    portals: 4,
                                    max_message: 4096
                                })
                                .is_ok());
                        }
                    }
                    Err(d) => {
                        assert_eq!(
                            e.counters().drops(d.reason),
                            before.drops(d.reason) + 1,
                            "drop not counted"
                        );
                    }
                }
            }
        }
    }
}
