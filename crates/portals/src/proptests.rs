//! Property tests: the engine against a small reference model of matching
//! and deposit, and the fuzz body driven by random bytes.

use crate::*;
use proptest::prelude::*;
use std::format;
use std::vec::Vec;

const ME: ProcessId = ProcessId::new(1, 0);

#[derive(Clone, Debug)]
enum ModelMd {
    /// Receiver-managed single block.
    Single {
        cap: u64,
        truncate: bool,
        local: u64,
    },
    /// Heap of `cap` bytes holding at most `max` messages, body only.
    Heap {
        cap: u64,
        max: usize,
        allocs: Vec<(u64, u64)>,
    },
}

#[derive(Clone, Debug)]
struct ModelEntry {
    group: u32,
    rank: u32,
    bits: u64,
    ignore: u64,
    threshold: Option<u32>,
    uses: u32,
    md: ModelMd,
    /// The descriptor was released (the third link applies).
    md_valid: bool,
    /// Second link (too long) and third link (invalid descriptor).
    too_long: MLink,
    invalid: MLink,
    /// Index into the engine-side handle table.
    id: usize,
}

/// A link in the model: forward jumps only (to an entry with a larger id),
/// so the model needs no cycle detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MLink {
    Next,
    End,
    To(usize),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Delivered {
        id: usize,
        offset: u64,
        mlength: u64,
        truncated: bool,
        unlinked: bool,
    },
    Dropped(DropReason),
}

/// The reference: walk entries in order; the first that matches and whose
/// descriptor takes the message wins; a descriptor that is too small sends
/// the search on (default second link).
fn model_deliver(list: &mut Vec<ModelEntry>, src: ProcessId, bits: u64, len: u64) -> Outcome {
    let mut miss = DropReason::NoMatch;
    let mut i = 0;
    while i < list.len() {
        let follow = |link: MLink, list: &Vec<ModelEntry>| match link {
            MLink::Next => Some(i + 1),
            MLink::End => None,
            MLink::To(id) => list.iter().position(|x| x.id == id),
        };
        let e = &mut list[i];
        let hit = (e.group == ANY || e.group == src.group)
            && (e.rank == ANY || e.rank == src.rank)
            && (e.bits & !e.ignore) == (bits & !e.ignore);
        if !hit {
            i += 1;
            continue;
        }
        if !e.md_valid {
            miss = DropReason::InvalidMd;
            let link = e.invalid;
            match follow(link, list) {
                Some(j) => i = j,
                None => break,
            }
            continue;
        }
        let placed = match &mut e.md {
            ModelMd::Single {
                cap,
                truncate,
                local,
            } => {
                let avail = *cap - *local;
                if len <= avail {
                    let at = *local;
                    *local += len;
                    Some((at, len, false))
                } else if *truncate {
                    let at = *local;
                    *local = *cap;
                    Some((at, avail, true))
                } else {
                    None
                }
            }
            ModelMd::Heap { cap, max, allocs } => {
                let need = len.max(1).div_ceil(8) * 8;
                if allocs.len() == *max {
                    None
                } else {
                    // Lowest address where `need` bytes are free.
                    let mut starts: Vec<u64> = allocs.iter().map(|(o, l)| o + l).collect();
                    starts.push(0);
                    starts.sort();
                    let at = starts.into_iter().find(|&c| {
                        c + need <= *cap && allocs.iter().all(|&(o, l)| c + need <= o || o + l <= c)
                    });
                    at.map(|c| {
                        allocs.push((c, need));
                        allocs.sort();
                        (c, len, false)
                    })
                }
            }
        };
        match placed {
            Some((offset, mlength, truncated)) => {
                e.uses += 1;
                let id = e.id;
                let unlinked = e.threshold.is_some_and(|t| e.uses >= t);
                if unlinked {
                    list.remove(i);
                }
                return Outcome::Delivered {
                    id,
                    offset,
                    mlength,
                    truncated,
                    unlinked,
                };
            }
            None => {
                miss = DropReason::TooLong;
                let link = e.too_long;
                match follow(link, list) {
                    Some(j) => i = j,
                    None => break,
                }
            }
        }
    }
    Outcome::Dropped(miss)
}

#[derive(Clone, Debug)]
struct EntryGen {
    group: u32,
    rank: u32,
    bits: u64,
    ignore: u64,
    threshold: Option<u32>,
    heap: bool,
    cap: u64,
    truncate: bool,
    max: usize,
    /// 0: next, 1: end, 2+: jump forward by (n - 1) entries.
    too_long: u8,
    invalid: u8,
}

fn entry_gen() -> impl Strategy<Value = EntryGen> {
    (
        prop_oneof![Just(ANY), 1u32..3],
        prop_oneof![Just(ANY), 0u32..3],
        0u64..4,
        prop_oneof![Just(0u64), Just(1u64)],
        prop_oneof![Just(None), (1u32..4).prop_map(Some)],
        any::<bool>(),
        0u64..200,
        any::<bool>(),
        1usize..4,
        (0u8..5, 0u8..5),
    )
        .prop_map(
            |(
                group,
                rank,
                bits,
                ignore,
                threshold,
                heap,
                cap,
                truncate,
                max,
                (too_long, invalid),
            )| EntryGen {
                too_long,
                invalid,
                group,
                rank,
                bits,
                ignore,
                threshold,
                heap,
                cap,
                truncate,
                max,
            },
        )
}

#[derive(Clone, Debug)]
enum Action {
    Msg {
        group: u32,
        rank: u32,
        bits: u64,
        len: u64,
    },
    /// Free the `k`-th live allocation of some heap (if any).
    Free(usize),
    /// Release the descriptor of entry `k % n`.
    Release(usize),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (1u32..3, 0u32..3, 0u64..4, 0u64..90)
            .prop_map(|(group, rank, bits, len)| Action::Msg { group, rank, bits, len }),
        1 => any::<usize>().prop_map(Action::Free),
        1 => any::<usize>().prop_map(Action::Release),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_reference_model(
        gens in proptest::collection::vec(entry_gen(), 1..7),
        actions in proptest::collection::vec(action(), 1..60),
    ) {
        let mut e = Engine::new(Config::small(ME)).unwrap();
        e.portal_set_acl(0, Acl::ALLOW_ALL).unwrap();
        e.portal_enable(0).unwrap();
        let mut model = Vec::new();
        let mut handles = Vec::new();
        let mut mds = Vec::new();
        for (id, g) in gens.iter().enumerate() {
            let base = 0x10_000 * (id as u64 + 1);
            let (kind, md) = if g.heap {
                (
                    MdKind::Dynamic { region: Region::new(base, g.cap), save: Save::Body, max_messages: g.max as u32 },
                    ModelMd::Heap { cap: g.cap, max: g.max, allocs: Vec::new() },
                )
            } else {
                (
                    MdKind::Single { region: Region::new(base, g.cap), offset: OffsetMode::Receiver },
                    ModelMd::Single { cap: g.cap, truncate: g.truncate, local: 0 },
                )
            };
            let options = MdOptions { truncate: g.truncate && !g.heap, ..MdOptions::PUT };
            let m = e.md_create(&MdSpec { kind, options, eq: None }).unwrap();
            let mut spec = MatchSpec::new(g.bits).from(g.group, g.rank).ignore(g.ignore);
            if let Some(t) = g.threshold {
                spec = spec.threshold(t);
            }
            handles.push(e.me_append(0, spec, m).unwrap());
            mds.push((m, base));
            model.push(ModelEntry {
                group: g.group, rank: g.rank, bits: g.bits, ignore: g.ignore,
                threshold: g.threshold, uses: 0, md, id,
                md_valid: true, too_long: MLink::Next, invalid: MLink::Next,
            });
        }
        // Links: forward jumps only (they may dangle once the target unlinks
        // itself; both sides then end the search).
        let n = gens.len();
        let to_link = |code: u8, id: usize| match code {
            0 => (MLink::Next, Link::Next),
            1 => (MLink::End, Link::End),
            c => {
                let j = id + (c as usize - 1);
                if j < n { (MLink::To(j), Link::Entry(handles[j])) } else { (MLink::End, Link::End) }
            }
        };
        for (id, g) in gens.iter().enumerate() {
            let (mt, et) = to_link(g.too_long, id);
            let (mi, ei) = to_link(g.invalid, id);
            e.me_set_links(handles[id], et, ei).unwrap();
            model[id].too_long = mt;
            model[id].invalid = mi;
        }
        for a in actions {
            match a {
                Action::Msg { group, rank, bits, len } => {
                    let src = ProcessId::new(group, rank);
                    let want = model_deliver(&mut model, src, bits, len);
                    let h = WireHeader {
                        version: WIRE_VERSION, op: Op::Put, flags: 0, portal: 0, src, dst: ME,
                        match_bits: bits, offset: 0, length: len, rlength: len,
                        return_md: NO_MD, return_offset: 0, hdr_data: 0,
                    };
                    let got = match e.deliver(&h) {
                        Ok(p) => {
                            let id = handles.iter().position(|x| *x == p.entry).unwrap();
                            prop_assert_eq!(p.md, mds[id].0);
                            prop_assert_eq!(p.body.first().addr, mds[id].1 + p.md_offset);
                            prop_assert_eq!(p.body.len(), p.mlength);
                            Outcome::Delivered {
                                id,
                                offset: p.md_offset,
                                mlength: p.mlength,
                                truncated: p.truncated,
                                unlinked: p.unlinked,
                            }
                        }
                        Err(d) => Outcome::Dropped(d.reason),
                    };
                    prop_assert_eq!(got, want);
                }
                Action::Release(k) => {
                    let id = k % n;
                    let released = e.md_release(mds[id].0).is_ok();
                    for m in model.iter_mut().filter(|m| m.id == id) {
                        prop_assert_eq!(released, m.md_valid);
                        m.md_valid = false;
                        if let ModelMd::Heap { allocs, .. } = &mut m.md {
                            allocs.clear();
                        }
                    }
                }
                Action::Free(k) => {
                    let live: Vec<(usize, u64)> = model
                        .iter()
                        .filter_map(|m| match &m.md {
                            ModelMd::Heap { allocs, .. } => Some(allocs.iter().map(move |a| (m.id, a.0))),
                            _ => None,
                        })
                        .flatten()
                        .collect();
                    if live.is_empty() {
                        continue;
                    }
                    let (id, off) = live[k % live.len()];
                    for m in model.iter_mut().filter(|m| m.id == id) {
                        if let ModelMd::Heap { allocs, .. } = &mut m.md {
                            allocs.retain(|a| a.0 != off);
                        }
                    }
                    prop_assert_eq!(e.md_free(mds[id].0, off), Ok(()));
                }
            }
        }
        let n = e.me_list(0, &mut [MatchHandle::NONE; 0]).unwrap();
        prop_assert_eq!(n, model.len());
    }

    /// `prepare_put_body` makes exactly the checks of building the put header and validating
    /// it (the way `prepare_put` worked before it existed), with the same accounting, and
    /// `sent_put` posts the event `sent` would.
    #[test]
    fn prepare_put_body_refuses_exactly_what_the_validated_header_refuses(
        local_offset in prop_oneof![0..80u64, Just(u64::MAX - 4)],
        length in prop_oneof![0..80u64, Just(u64::MAX), Just((1u64 << 30) + 1)],
        remote_offset in prop_oneof![0..1000u64, Just(u64::MAX - 10), Just(u64::MAX)],
        portal in prop_oneof![0..70u32, Just(u32::MAX - 1), Just(u32::MAX)],
        group in prop_oneof![Just(1u32), Just(ANY)],
        rank in prop_oneof![Just(3u32), Just(ANY)],
        ack in any::<bool>(),
        bits in any::<u64>(),
        hdr_data in any::<u64>(),
    ) {
        let mut e = Engine::new(Config::small(ME)).unwrap();
        let eq = e.eq_alloc(8).unwrap();
        let md = e
            .md_create(&MdSpec {
                kind: MdKind::Single { region: Region::new(0x4000, 64), offset: OffsetMode::Sender },
                options: MdOptions::PUT_GET,
                eq: Some(eq),
            })
            .unwrap();
        let a = PutArgs {
            md,
            local_offset,
            length,
            target: ProcessId::new(group, rank),
            portal,
            match_bits: bits,
            remote_offset,
            ack,
            hdr_data,
        };
        // The reference: the header prepare_put builds, validated as it was.
        let reference = || -> Result<(), Error> {
            if group == ANY || rank == ANY {
                return Err(Error::Invalid("target"));
            }
            let end = local_offset.checked_add(length);
            if length > (1 << 30) {
                return Err(Error::Invalid("length"));
            }
            if end.is_none_or(|x| x > 64) {
                return Err(Error::Invalid("bounds"));
            }
            let plan = e.put_plan(&a, Body::EMPTY);
            plan.header.validate(&Limits { portals: u32::MAX, max_message: 1 << 30 })?;
            Ok(())
        };
        let want_ok = reference().is_ok();
        let got = e.prepare_put_body(&a);
        prop_assert_eq!(got.is_ok(), want_ok, "{:?}", got);
        if let Ok(body) = got {
            prop_assert_eq!(body.len(), length);
            prop_assert_eq!(body.first(), Region::new(0x4000 + local_offset, length));
            let plan = e.put_plan(&a, body);
            prop_assert_eq!(e.sent_put(&a, &body), Ok(Posted::Queued(eq)));
            prop_assert_eq!(e.sent(&plan), Ok(Posted::Queued(eq)));
            let first = e.eq_get(eq).unwrap().unwrap();
            let second = e.eq_get(eq).unwrap().unwrap();
            prop_assert_eq!(Event { seq: second.seq, ..first }, second);
            prop_assert_eq!(second.seq, first.seq + 1);
            // An ack was accounted for: it is expected once, and only with `ack`.
            let ack_hdr = WireHeader {
                op: Op::Ack,
                flags: 0,
                src: ProcessId::new(1, 3),
                dst: ME,
                rlength: length,
                length,
                offset: 0,
                return_md: md.to_cookie(),
                return_offset: 0,
                ..plan.header
            };
            prop_assert_eq!(e.deliver(&ack_hdr).is_ok(), ack);
        }
    }

    #[test]
    fn fuzz_body_holds_its_invariants_on_random_bytes(
        data in proptest::collection::vec(any::<u8>(), 0..1500),
    ) {
        crate::fuzzing::run(&data);
    }

    #[test]
    fn decode_never_panics_and_round_trips(data in proptest::collection::vec(any::<u8>(), 0..100)) {
        let limits = Limits { portals: 64, max_message: 1 << 40 };
        if let Ok(h) = WireHeader::decode(&data, &limits) {
            prop_assert_eq!(&h.encode()[..], &data[..HEADER_LEN]);
        }
    }
}

/// The committed fuzz corpus replays clean (and stays readable).
#[test]
fn fuzz_corpus_replays_clean() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/deliver");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        crate::fuzzing::run(&data);
        n += 1;
    }
    assert!(n >= 5, "expected the committed corpus in {}", dir.display());
}

// ------------------------------------------------ the put fast path against the general one

type FastStore = ArrayStore<4, 12, 8, 16, 2, 12, 16>;

/// One descriptor of the random tables: kind 0 single block, 1 independent
/// blocks, 2 combined blocks, 3 dynamic heap.
#[derive(Clone, Debug)]
struct FastMd {
    kind: u8,
    len: u64,
    put: bool,
    truncate: bool,
    ack: bool,
    sender: bool,
    eq: u8,
}

/// One portal table entry: enabled, access (0 everyone, 1 group 2 only, 2 rank
/// (2, 1) only, 3 gets only), queue (0 none, 1, 2), handler, target (0 list,
/// 1 an attached descriptor, 2 nothing).
#[derive(Clone, Debug)]
struct FastPortal {
    enabled: bool,
    acl: u8,
    eq: u8,
    handler: bool,
    target: u8,
    md: usize,
}

#[derive(Clone, Debug)]
struct FastEntry {
    portal: u32,
    md: usize,
    bits: u64,
    ignore: bool,
    from: u8,
    threshold: u32,
}

impl FastEntry {
    /// The match entry this describes: its bits, one ignored bit or none, a source filter
    /// (`from`: 1 any rank of group 2, 2 rank 1 of group 2, 3 any rank of group 3, else anyone)
    /// and its threshold (0: none).
    fn spec(&self) -> MatchSpec {
        let mut spec = MatchSpec::new(self.bits).ignore(if self.ignore { 1 } else { 0 });
        spec = match self.from {
            1 => spec.from(2, ANY),
            2 => spec.from(2, 1),
            3 => spec.from(3, ANY),
            _ => spec,
        };
        if self.threshold > 0 {
            spec = spec.threshold(self.threshold);
        }
        spec
    }
}

/// A header, mostly a valid put, with every field sometimes wrong.
#[derive(Clone, Debug)]
struct FastHdr {
    version: u8,
    op: u8,
    flags: u16,
    portal: u32,
    src: u8,
    dst: u8,
    bits: u64,
    offset: u64,
    length: u64,
    rlength_differs: bool,
    return_offset: u64,
    return_md: bool,
    hdr_data: u64,
    /// Take one event from each queue before this header.
    drain: bool,
}

fn fast_md() -> impl Strategy<Value = FastMd> {
    // Mostly the fast path's kind (a single block, sender-managed, puts allowed).
    (0u8..8, 0u64..300, 0u8..8, any::<[bool; 2]>(), 0u8..3).prop_map(|(kind, len, odd, b, eq)| {
        FastMd {
            kind: kind.saturating_sub(4),
            len,
            put: odd != 0,
            truncate: b[0],
            ack: b[1],
            sender: odd != 1,
            eq,
        }
    })
}

fn fast_portal() -> impl Strategy<Value = FastPortal> {
    (0u8..12, 0u8..3, 0u8..8, 0usize..8).prop_map(|(odd, eq, target, md)| FastPortal {
        enabled: odd != 0,
        acl: match odd {
            1 => 1,
            2 => 2,
            3 => 3,
            _ => 0,
        },
        eq,
        handler: odd == 4,
        target: target.saturating_sub(5),
        md,
    })
}

fn fast_entry() -> impl Strategy<Value = FastEntry> {
    (0u32..4, 0usize..8, 0u64..2, any::<bool>(), 0u8..6, 0u32..8).prop_map(
        |(portal, md, bits, ignore, from, threshold)| FastEntry {
            portal,
            md,
            bits,
            ignore,
            from,
            threshold: threshold.saturating_sub(4),
        },
    )
}

fn fast_hdr() -> impl Strategy<Value = FastHdr> {
    // One fault at most per header (about half carry one), so that valid puts are common.
    (
        (0u8..28, 0u32..5, 0u8..3, 0u64..2),
        (0u64..330, 0u64..330, any::<u64>(), any::<[bool; 3]>()),
    )
        .prop_map(
            |((fault, portal, src, bits), (offset, length, data, b))| FastHdr {
                version: if fault == 0 { 2 } else { WIRE_VERSION },
                op: match fault {
                    1 => 2,
                    2 => 3,
                    3 => 4,
                    _ => 1,
                },
                flags: match fault {
                    4 => flags::ACK_REQ,
                    5 => flags::TRUNCATED,
                    6 => 0x40,
                    _ => 0,
                },
                portal: if fault == 7 { 4 + portal } else { portal % 4 },
                src: match fault {
                    8 => 0,
                    9 => 1,
                    10 => 2,
                    _ => 3 + src % 2,
                },
                dst: match fault {
                    11 => 0,
                    12 => 1,
                    _ => 2,
                },
                bits,
                offset: match fault {
                    13 => u64::MAX - 2,
                    17 => offset,
                    _ => offset % 40,
                },
                length: match fault {
                    14 => 5000,
                    18 => length,
                    _ => length % 40,
                },
                rlength_differs: fault == 15,
                return_offset: if fault == 16 { u64::MAX } else { 0 },
                return_md: b[0],
                hdr_data: data,
                drain: b[1] && b[2],
            },
        )
}

/// A put's arguments, mostly valid, with at most one fault.
#[derive(Clone, Debug)]
struct FastPutArgs {
    md: usize,
    fault: u8,
    local_offset: u64,
    length: u64,
    remote_offset: u64,
    portal: u32,
    bits: u64,
    data: u64,
    /// `send` fails (a full queue, unowned memory).
    send_fails: bool,
    drain: bool,
}

fn fast_put_args() -> impl Strategy<Value = FastPutArgs> {
    (
        (0usize..9, 0u8..24, 0u64..330, 0u64..330),
        (0u64..64, 0u32..4, any::<u64>(), 0u8..8, any::<bool>()),
    )
        .prop_map(
            |((md, fault, local_offset, length), (remote_offset, portal, data, fails, drain))| {
                FastPutArgs {
                    md,
                    fault,
                    local_offset,
                    length,
                    remote_offset,
                    portal,
                    bits: data & 1,
                    data,
                    send_fails: fails == 0,
                    drain,
                }
            },
        )
}

fn fast_put(g: &FastPutArgs, handles: &[Option<MdHandle>]) -> PutArgs {
    let md = match g.fault {
        // A descriptor that never existed, and a stale generation of one that did.
        1 => MdHandle::from_cookie(200),
        2 => handles
            .first()
            .copied()
            .flatten()
            .map_or(MdHandle::NONE, |h| {
                MdHandle::from_cookie(h.to_cookie() + (1 << 32))
            }),
        _ => handles
            .get(g.md % handles.len().max(1))
            .copied()
            .flatten()
            .unwrap_or(MdHandle::NONE),
    };
    PutArgs {
        md,
        local_offset: match g.fault {
            3 => u64::MAX - 2,
            4 => g.local_offset,
            _ => g.local_offset % 40,
        },
        length: match g.fault {
            5 => 5000,
            6 => g.length,
            _ => g.length % 40,
        },
        target: match g.fault {
            7 => ProcessId::new(ANY, 1),
            8 => ProcessId::new(2, ANY),
            _ => ProcessId::new(2, 1),
        },
        portal: if g.fault == 9 { u32::MAX } else { g.portal },
        match_bits: g.bits,
        remote_offset: if g.fault == 10 {
            u64::MAX - 2
        } else {
            g.remote_offset
        },
        ack: g.fault == 11 || g.fault == 12,
        hdr_data: g.data,
    }
}

fn fast_engine(
    mds: &[FastMd],
    portals: &[FastPortal],
    entries: &[FastEntry],
    release: &[usize],
) -> (Engine<FastStore>, [EqHandle; 2], Vec<Option<MdHandle>>) {
    let mut e = Engine::with_store(FastStore::config(ME, 4096), FastStore::new()).unwrap();
    let eqs = [e.eq_alloc(3).unwrap(), e.eq_alloc(9).unwrap()];
    let queue = |i: u8| match i {
        0 => None,
        i => Some(eqs[i as usize - 1]),
    };
    let mut handles = Vec::new();
    for (i, m) in mds.iter().enumerate() {
        let base = 0x10_000 * (i as u64 + 1);
        let blocks = [
            Region::new(base, m.len / 3),
            Region::new(base + m.len / 3, m.len - m.len / 3),
        ];
        let offset = if m.sender {
            OffsetMode::Sender
        } else {
            OffsetMode::Receiver
        };
        let kind = match m.kind {
            0 => MdKind::Single {
                region: Region::new(base, m.len),
                offset,
            },
            1 => MdKind::Independent {
                blocks: &blocks,
                circular: m.truncate,
                save: Save::Both,
            },
            2 => MdKind::Combined {
                blocks: &blocks,
                offset,
            },
            _ => MdKind::Dynamic {
                region: Region::new(base, m.len),
                save: Save::Body,
                max_messages: 3,
            },
        };
        let options = MdOptions {
            put: m.put,
            get: true,
            ack: m.ack,
            truncate: m.truncate,
        };
        handles.push(
            e.md_create(&MdSpec {
                kind,
                options,
                eq: queue(m.eq),
            })
            .ok(),
        );
    }
    let md = |i: usize| handles.get(i % handles.len().max(1)).copied().flatten();
    for (p, s) in portals.iter().enumerate() {
        let p = p as u32;
        if s.enabled {
            e.portal_enable(p).unwrap();
        }
        let acl = match s.acl {
            0 => Acl::ALLOW_ALL,
            1 => Acl::job(2),
            2 => Acl {
                group: 2,
                rank: 1,
                put: true,
                get: true,
            },
            _ => Acl {
                put: false,
                ..Acl::ALLOW_ALL
            },
        };
        e.portal_set_acl(p, acl).unwrap();
        e.portal_set_eq(p, queue(s.eq)).unwrap();
        if s.handler {
            e.portal_set_handler(p, Some(HandlerId(7))).unwrap();
        }
        if let (1, Some(h)) = (s.target, md(s.md)) {
            e.portal_attach_md(p, h).unwrap();
        }
    }
    for en in entries {
        let Some(h) = md(en.md) else { continue };
        if portals
            .get(en.portal as usize)
            .is_some_and(|p| p.target != 0)
        {
            continue;
        }
        let _ = e.me_append(en.portal, en.spec(), h);
    }
    for &r in release {
        if let Some(h) = md(r) {
            let _ = e.md_release(h);
        }
    }
    (e, eqs, handles)
}

fn fast_header(g: &FastHdr) -> WireHeader {
    let pid = |s: u8| match s {
        0 => ProcessId::new(ANY, 1),
        1 => ProcessId::new(2, ANY),
        2 => ProcessId::new(3, 0),
        3 => ProcessId::new(2, 0),
        _ => ProcessId::new(2, 1),
    };
    WireHeader {
        version: g.version,
        op: Op::from_u8(g.op).unwrap(),
        flags: g.flags,
        portal: g.portal,
        src: pid(g.src),
        dst: match g.dst {
            0 => ProcessId::new(1, ANY),
            1 => ProcessId::new(1, 1),
            _ => ME,
        },
        match_bits: g.bits,
        offset: g.offset,
        length: g.length,
        rlength: g.length + g.rlength_differs as u64,
        return_md: if g.return_md { 7 } else { NO_MD },
        return_offset: g.return_offset,
        hdr_data: g.hdr_data,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    /// On random portal tables and headers (invalid ones included), the fast
    /// path either leaves the engine exactly as the general path does, with the
    /// general plan's single deposit range and nothing else to do, or declines
    /// without touching anything (and the general path then decides).
    #[test]
    fn put_fast_path_has_exactly_the_general_paths_effects(
        mds in proptest::collection::vec(fast_md(), 1..8),
        portals in proptest::collection::vec(fast_portal(), 4),
        entries in proptest::collection::vec(fast_entry(), 0..13),
        release in proptest::collection::vec(0usize..16, 0..3),
        hdrs in proptest::collection::vec(fast_hdr(), 1..40),
    ) {
        let (mut e, eqs, _) = fast_engine(&mds, &portals, &entries, &release);
        for g in &hdrs {
            if g.drain {
                for q in eqs {
                    let _ = e.eq_get(q);
                }
            }
            let h = fast_header(g);
            let before = format!("{e:?}");
            let mut general = e.clone();
            let mut plan = DeliveryPlan::EMPTY;
            let result = general.deliver_into(&h, &mut plan);
            let mut to = Region::new(1, 1);
            if e.deliver_put_fast(&h, &mut to) {
                prop_assert!(result.is_ok(), "fast path took a header the general path drops: {:?}", result);
                prop_assert_eq!(plan.op, Op::Put);
                prop_assert!(plan.body.is_contiguous());
                prop_assert_eq!(plan.body.first(), to);
                prop_assert_eq!(plan.mlength, to.len);
                prop_assert_eq!(plan.header_at, None);
                prop_assert_eq!(plan.response, Response::None);
                prop_assert_eq!(plan.handler, None);
                prop_assert_eq!(format!("{e:?}"), format!("{general:?}"));
            } else {
                prop_assert_eq!(to, Region::new(1, 1));
                prop_assert_eq!(format!("{e:?}"), before);
                e = general;
            }
        }
    }
    /// The waiter's variant of the delivery fast path: on the same random tables
    /// and headers, with a random queue waited on (or none), it has exactly the
    /// effects of the general path followed by `eq_get_into` on that queue when it
    /// says it took the event (and hands out that very event), exactly the general
    /// path's effects when it delivered without taking, and none when it declined.
    /// It takes the event whenever the general path's event went to the waited-on
    /// queue and that queue had nothing older to report (no event, no loss).
    #[test]
    fn put_fast_path_taking_has_the_general_paths_effects_then_eq_get(
        mds in proptest::collection::vec(fast_md(), 1..8),
        portals in proptest::collection::vec(fast_portal(), 4),
        entries in proptest::collection::vec(fast_entry(), 0..13),
        release in proptest::collection::vec(0usize..16, 0..3),
        hdrs in proptest::collection::vec((fast_hdr(), 0u8..3, any::<bool>()), 1..40),
    ) {
        let (mut e, eqs, _) = fast_engine(&mds, &portals, &entries, &release);
        let untouched = Event { seq: 0xdead, ..Event::EMPTY };
        for (g, w, plain) in &hdrs {
            if g.drain {
                for q in eqs {
                    let _ = e.eq_get(q);
                }
            }
            let want = match w {
                0 => EqHandle::NONE,
                k => eqs[*k as usize - 1],
            };
            let h = fast_header(g);
            let before = format!("{e:?}");
            // Would the waiter's next take find nothing older (no event, no loss)?
            let was_clear = want != EqHandle::NONE && matches!(e.clone().eq_get(want), Ok(None));
            let mut general = e.clone();
            let mut plan = DeliveryPlan::EMPTY;
            let result = general.deliver_into(&h, &mut plan);
            let mut to = Region::new(1, 1);
            let mut ev = untouched;
            // Either entry: the full header, or (for a header that is a plain put) the plain form
            // a fabric decodes its one-line put into, which must make every remaining check.
            let fast = match (plain, PlainPut::from_wire(&h)) {
                (true, Some(p)) => e.deliver_plain_put_fast_taking(p, &mut to, want, &mut ev),
                _ => e.deliver_put_fast_taking(&h, &mut to, want, &mut ev),
            };
            match fast {
                None => {
                    prop_assert_eq!(to, Region::new(1, 1));
                    prop_assert_eq!(ev, untouched);
                    prop_assert_eq!(format!("{e:?}"), before);
                    e = general;
                }
                Some(taken) => {
                    prop_assert!(result.is_ok(), "fast path took a header the general path drops: {:?}", result);
                    prop_assert!(plan.body.is_contiguous());
                    prop_assert_eq!(plan.body.first(), to);
                    let to_want = was_clear && general.eq_len(want) == Ok(1);
                    prop_assert_eq!(taken, to_want);
                    if taken {
                        let mut next = Event::EMPTY;
                        prop_assert_eq!(general.eq_get_into(want, &mut next), Ok(true));
                        prop_assert_eq!(ev, next);
                        // A taken event goes to the waiter only: the slot it passed through on
                        // the general path is outside the queue's window, which nothing reads.
                        prop_assert_eq!(e.observable_state(), general.observable_state());
                    } else {
                        prop_assert_eq!(ev, untouched);
                        prop_assert_eq!(format!("{e:?}"), format!("{general:?}"));
                    }
                }
            }
        }
    }
    /// On random descriptor tables and put arguments (wrong ones included), the
    /// send fast path either has exactly the effects of the general path
    /// (`prepare_put_body`, then `sent_put` once the bytes are out) and hands
    /// `send` the general body's single block, or declines without calling
    /// `send` or touching anything. When `send` fails nothing changes. Every
    /// put without ack from a live single-block descriptor that the general
    /// path accepts is taken.
    #[test]
    fn send_fast_path_has_exactly_the_general_paths_effects(
        mds in proptest::collection::vec(fast_md(), 1..8),
        release in proptest::collection::vec(0usize..16, 0..3),
        puts in proptest::collection::vec(fast_put_args(), 1..40),
    ) {
        let (mut e, eqs, handles) = fast_engine(&mds, &[], &[], &release);
        for g in &puts {
            if g.drain {
                for q in eqs {
                    let _ = e.eq_get(q);
                }
            }
            let a = fast_put(g, &handles);
            let before = format!("{e:?}");
            let mut general = e.clone();
            let prepared = general.prepare_put_body(&a);
            let mut seen = None;
            let fast = e.put_fast(&a, |r| {
                seen = Some(r);
                if g.send_fails { Err(7u8) } else { Ok(()) }
            });
            match fast {
                None => {
                    prop_assert_eq!(seen, None);
                    prop_assert_eq!(format!("{e:?}"), before);
                    let single = mds[g.md % mds.len()].kind == 0;
                    prop_assert!(
                        a.ack || !single || prepared.is_err(),
                        "fast path declined a common put the general path takes: {:?}", a
                    );
                    if let Ok(body) = prepared {
                        general.sent_put(&a, &body).unwrap();
                    }
                    e = general;
                }
                Some(Err(code)) => {
                    prop_assert_eq!(code, 7);
                    prop_assert!(g.send_fails);
                    let body = prepared.unwrap();
                    prop_assert!(body.is_contiguous());
                    prop_assert_eq!(Some(body.first()), seen);
                    prop_assert_eq!(format!("{e:?}"), before);
                }
                Some(Ok(posted)) => {
                    prop_assert!(!g.send_fails);
                    let body = prepared.unwrap();
                    prop_assert!(body.is_contiguous());
                    prop_assert_eq!(Some(body.first()), seen);
                    prop_assert_eq!(general.sent_put(&a, &body).unwrap(), posted);
                    prop_assert_eq!(format!("{e:?}"), format!("{general:?}"));
                }
            }
        }
    }

    /// A ticket is issued for exactly the puts the send fast path takes, and repeats its put
    /// exactly: after any further puts, event takes, descriptor releases and new descriptors
    /// in the released slots (another block, another queue), `put_fast_again` with a ticket
    /// answers what `put_fast` of the ticket's arguments answers, hands `send` the same block
    /// and leaves the same engine (both decline, changing nothing, once the descriptor is gone).
    #[test]
    fn a_put_ticket_repeats_its_put_with_the_send_fast_paths_effects(
        mds in proptest::collection::vec(fast_md(), 1..8),
        release in proptest::collection::vec(0usize..16, 0..3),
        puts in proptest::collection::vec(fast_put_args(), 1..30),
        churn in proptest::collection::vec(proptest::option::of((0usize..8, 0u64..300)), 1..30),
    ) {
        let (mut e, eqs, handles) = fast_engine(&mds, &[], &[], &release);
        let mut tickets = Vec::new();
        for (i, g) in puts.iter().enumerate() {
            if g.drain {
                for q in eqs {
                    let _ = e.eq_get(q);
                }
            }
            let a = fast_put(g, &handles);
            let ticket = e.put_ticket(&a);
            let mut probe = e.clone();
            let taken = probe.put_fast(&a, |_| Ok::<(), u8>(())).is_some();
            prop_assert_eq!(ticket.is_some(), taken, "{:?}", a);
            if let Some(t) = ticket {
                prop_assert_eq!(t.args(), &a);
                tickets.push(t);
            }
            // Now and then a descriptor goes, and a new one (another block and queue) takes its
            // slot, so a stale ticket's index names a live descriptor of another generation.
            if let Some(Some((k, len))) = churn.get(i) {
                if let Some(h) = handles.get(k % handles.len()).copied().flatten() {
                    if e.md_release(h).is_ok() {
                        let made = e.md_create(&MdSpec {
                            kind: MdKind::Single {
                                region: Region::new(0x90_0000 + len, *len),
                                offset: OffsetMode::Sender,
                            },
                            options: MdOptions::PUT,
                            eq: Some(eqs[*k % 2]),
                        });
                        prop_assert_eq!(made.map(|m| m.idx), Ok(h.idx));
                    }
                }
            }
            for t in &tickets {
                let mut general = e.clone();
                let (mut sent_again, mut sent_fast) = (None, None);
                let again = e.put_fast_again(t, |r| {
                    sent_again = Some(r);
                    if g.send_fails { Err(7u8) } else { Ok(()) }
                });
                let fast = general.put_fast(t.args(), |r| {
                    sent_fast = Some(r);
                    if g.send_fails { Err(7u8) } else { Ok(()) }
                });
                prop_assert_eq!(again, fast);
                prop_assert_eq!(sent_again, sent_fast);
                if again.is_some() {
                    prop_assert_eq!(sent_again, Some(t.src()));
                }
                prop_assert_eq!(format!("{e:?}"), format!("{general:?}"));
            }
        }
    }
}

/// The fast path takes the common put (and posts its event), and leaves to the
/// general path an acked put, a put that unlinks its entry, and a wrong header.
#[test]
fn plain_put_form_is_exactly_the_plain_put_headers() {
    let p = PlainPut {
        portal: 3,
        src: ProcessId::new(2, 1),
        dst: ME,
        match_bits: 0x55,
        offset: 16,
        length: 8,
        hdr_data: 9,
    };
    let h = p.to_wire();
    assert_eq!(PlainPut::from_wire(&h), Some(p));
    // The return descriptor and offset of a put without ack are not part of it ...
    let acked_to = WireHeader {
        return_md: 7,
        return_offset: 4,
        ..h
    };
    assert_eq!(PlainPut::from_wire(&acked_to), Some(p));
    // ... but every other field that makes a header something else is.
    for other in [
        WireHeader {
            version: WIRE_VERSION + 1,
            ..h
        },
        WireHeader { op: Op::Get, ..h },
        WireHeader { op: Op::Reply, ..h },
        WireHeader {
            flags: flags::ACK_REQ,
            ..h
        },
        WireHeader {
            flags: flags::TRUNCATED,
            ..h
        },
        WireHeader { rlength: 9, ..h },
        WireHeader {
            return_offset: u64::MAX,
            ..h
        },
    ] {
        assert_eq!(PlainPut::from_wire(&other), None, "{other:?}");
    }
}

#[test]
fn put_fast_path_takes_the_common_put_only() {
    let mut e = Engine::with_store(FastStore::config(ME, 4096), FastStore::new()).unwrap();
    let eq = e.eq_alloc(8).unwrap();
    let md = e
        .md_create(&MdSpec {
            kind: MdKind::Single {
                region: Region::new(0x1000, 64),
                offset: OffsetMode::Sender,
            },
            options: MdOptions::PUT,
            eq: Some(eq),
        })
        .unwrap();
    e.portal_enable(0).unwrap();
    e.portal_set_acl(0, Acl::job(2)).unwrap();
    let me = e.me_append(0, MatchSpec::new(5), md).unwrap();
    let once = e.me_append(0, MatchSpec::new(6).use_once(), md).unwrap();
    let h = WireHeader {
        version: WIRE_VERSION,
        op: Op::Put,
        flags: 0,
        portal: 0,
        src: ProcessId::new(2, 1),
        dst: ME,
        match_bits: 5,
        offset: 8,
        length: 8,
        rlength: 8,
        return_md: NO_MD,
        return_offset: 0,
        hdr_data: 42,
    };
    let mut to = Region::EMPTY;
    assert!(e.deliver_put_fast(&h, &mut to));
    assert_eq!(to, Region::new(0x1008, 8));
    let ev = e.eq_get(eq).unwrap().unwrap();
    assert_eq!(
        (ev.kind, ev.entry, ev.offset, ev.hdr_data),
        (EventKind::Put, me, 8, 42)
    );
    assert_eq!(e.counters().delivered, 1);
    let acked = WireHeader {
        flags: flags::ACK_REQ,
        return_md: 3,
        ..h
    };
    assert!(!e.deliver_put_fast(&acked, &mut to));
    assert!(!e.deliver_put_fast(&WireHeader { match_bits: 6, ..h }, &mut to));
    assert_eq!(e.me_info(once).unwrap().uses, 0);
    assert!(!e.deliver_put_fast(&WireHeader { length: 9, ..h }, &mut to));
    assert!(!e.deliver_put_fast(
        &WireHeader {
            offset: 60,
            rlength: 8,
            ..h
        },
        &mut to
    ));
    assert_eq!(e.counters().delivered, 1);
    assert_eq!(e.eq_len(eq).unwrap(), 0);
}

/// One step of [`a_put_looked_up_from_the_last_match_has_the_full_look_ups_effects`]: a plain
/// put, or one of the calls that change what a put's look-up finds.
#[derive(Clone, Debug)]
enum Step {
    /// A plain put: portal, source (0 or 1), match bits (`None`: those of the put before, so
    /// that most puts repeat a key), offset, length, queue waited on.
    Put(Option<(u32, u8, u64)>, u64, u64, u8),
    /// One event taken from queue 0 or 1.
    Take(u8),
    Append(FastEntry),
    /// A new entry before (or after) the k-th entry made so far.
    Insert(usize, bool, FastEntry),
    Unlink(usize),
    Links(usize, u8),
    MdRelease(usize),
    /// A new single-block descriptor: length, puts allowed, truncate, sender-managed, queue.
    MdCreate(u64, bool, bool, bool, u8),
    Enable(u32, bool),
    Acl(u32, u8),
    PortalEq(u32, u8),
    Handler(u32, bool),
    Attach(u32, usize),
    Detach(u32),
    EqFree(u8),
    EqAlloc(u32),
}

fn step() -> impl Strategy<Value = Step> {
    use std::vec;
    // Mostly puts, most of them with the key of the put before; the changes lean towards
    // tables the fast path can take, so that puts keep reaching it after them.
    prop_oneof![
        24 => (0u8..4, 0u32..3, 0u8..2, 0u64..2, 0u64..40, 0u64..9, 0u8..3)
            .prop_map(|(new, p, s, b, o, l, w)| Step::Put((new == 0).then_some((p, s, b)), o, l, w)),
        2 => (0u8..2).prop_map(Step::Take),
        2 => fast_entry().prop_map(Step::Append),
        1 => (0usize..16, any::<bool>(), fast_entry()).prop_map(|(k, b, e)| Step::Insert(k, b, e)),
        1 => (0usize..16).prop_map(Step::Unlink),
        1 => (0usize..16, 0u8..4).prop_map(|(k, l)| Step::Links(k, l)),
        1 => (0usize..16).prop_map(Step::MdRelease),
        2 => (0u64..60, 0u8..4, any::<[bool; 2]>(), 0u8..3)
            .prop_map(|(l, odd, b, q)| Step::MdCreate(l, odd != 0, b[0], odd != 1 || b[1], q)),
        1 => (0u32..3, 0u8..4).prop_map(|(p, b)| Step::Enable(p, b != 0)),
        1 => (0u32..3, 0u8..8).prop_map(|(p, a)| Step::Acl(p, a.saturating_sub(4))),
        1 => (0u32..3, 0u8..3).prop_map(|(p, q)| Step::PortalEq(p, q)),
        1 => (0u32..3, 0u8..4).prop_map(|(p, b)| Step::Handler(p, b == 0)),
        1 => (0u32..3, 0usize..16).prop_map(|(p, k)| Step::Attach(p, k)),
        1 => (0u32..3).prop_map(Step::Detach),
        1 => (0u8..2).prop_map(Step::EqFree),
        1 => (1u32..6).prop_map(Step::EqAlloc),
    ]
}

/// Applies `s` to `e` (every step but a put), returning what the call answered, for comparing.
fn apply_step(
    e: &mut Engine<FastStore>,
    s: &Step,
    eqs: &mut [EqHandle; 2],
    mds: &mut Vec<MdHandle>,
    entries: &mut Vec<MatchHandle>,
) -> std::string::String {
    let md = |mds: &Vec<MdHandle>, k: usize| mds.get(k % mds.len().max(1)).copied();
    let entry =
        |entries: &Vec<MatchHandle>, k: usize| entries.get(k % entries.len().max(1)).copied();
    match s {
        Step::Put(..) => std::string::String::new(),
        Step::Take(q) => format!("{:?}", e.eq_get(eqs[*q as usize])),
        Step::Append(en) => {
            let Some(h) = md(mds, en.md) else {
                return "no md".into();
            };
            let r = e.me_append(en.portal % 3, en.spec(), h);
            if let Ok(m) = r {
                entries.push(m);
            }
            format!("{r:?}")
        }
        Step::Insert(k, after, en) => {
            let (Some(a), Some(h)) = (entry(entries, *k), md(mds, en.md)) else {
                return "none".into();
            };
            let pos = if *after {
                Position::After
            } else {
                Position::Before
            };
            let r = e.me_insert(a, pos, en.spec(), h);
            if let Ok(m) = r {
                entries.push(m);
            }
            format!("{r:?}")
        }
        Step::Unlink(k) => match entry(entries, *k) {
            Some(h) => format!("{:?}", e.me_unlink(h)),
            None => "none".into(),
        },
        Step::Links(k, l) => {
            let Some(h) = entry(entries, *k) else {
                return "none".into();
            };
            let link = match l {
                0 => Link::Next,
                1 => Link::End,
                _ => entry(entries, *k + *l as usize).map_or(Link::End, Link::Entry),
            };
            format!("{:?}", e.me_set_links(h, link, link))
        }
        Step::MdRelease(k) => match md(mds, *k) {
            Some(h) => format!("{:?}", e.md_release(h)),
            None => "none".into(),
        },
        Step::MdCreate(len, put, truncate, sender, q) => {
            let r = e.md_create(&MdSpec {
                kind: MdKind::Single {
                    region: Region::new(0x70_0000 + 0x1000 * mds.len() as u64, *len),
                    offset: if *sender {
                        OffsetMode::Sender
                    } else {
                        OffsetMode::Receiver
                    },
                },
                options: MdOptions {
                    put: *put,
                    get: true,
                    ack: false,
                    truncate: *truncate,
                },
                eq: match q {
                    0 => None,
                    q => Some(eqs[*q as usize - 1]),
                },
            });
            if let Ok(h) = r {
                mds.push(h);
            }
            format!("{r:?}")
        }
        Step::Enable(p, on) => format!(
            "{:?}",
            if *on {
                e.portal_enable(*p)
            } else {
                e.portal_disable(*p)
            }
        ),
        Step::Acl(p, a) => {
            let acl = match a {
                0 => Acl::ALLOW_ALL,
                1 => Acl::job(3),
                2 => Acl {
                    group: 2,
                    rank: 1,
                    put: true,
                    get: true,
                },
                _ => Acl {
                    put: false,
                    ..Acl::ALLOW_ALL
                },
            };
            format!("{:?}", e.portal_set_acl(*p, acl))
        }
        Step::PortalEq(p, q) => format!(
            "{:?}",
            e.portal_set_eq(*p, (*q > 0).then(|| eqs[*q as usize - 1]))
        ),
        Step::Handler(p, on) => {
            format!("{:?}", e.portal_set_handler(*p, on.then_some(HandlerId(7))))
        }
        Step::Attach(p, k) => match md(mds, *k) {
            Some(h) => format!("{:?}", e.portal_attach_md(*p, h)),
            None => "none".into(),
        },
        Step::Detach(p) => format!("{:?}", e.portal_detach_md(*p)),
        Step::EqFree(q) => format!("{:?}", e.eq_free(eqs[*q as usize])),
        Step::EqAlloc(cap) => {
            let r = e.eq_alloc(*cap);
            if let Ok(h) = r {
                // The new queue replaces the first one that is gone, if any.
                if let Some(q) = eqs.iter_mut().find(|q| e.eq_len(**q).is_err()) {
                    *q = h;
                }
            }
            format!("{r:?}")
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// The fast put path remembers its last look-up (portal, source and match bits to entry,
    /// descriptor and queue) until something it depends on changes. Over random sequences of
    /// puts and of every call that changes portals, entries, descriptors or queues, an engine
    /// that remembers answers every put exactly as one that looks each put up in full: the
    /// same outcome, range and event, and the same engine afterwards. A declined put goes to
    /// the general path on both (which may unlink an entry at its threshold).
    #[test]
    fn a_put_looked_up_from_the_last_match_has_the_full_look_ups_effects(
        mds in proptest::collection::vec(fast_md(), 1..6),
        queues in proptest::collection::vec(0u8..3, 3),
        entries in proptest::collection::vec(fast_entry(), 3..12),
        steps in proptest::collection::vec(step(), 1..80),
    ) {
        // Portals that start open to every put (the steps close them now and then).
        let portals: Vec<FastPortal> = queues
            .iter()
            .map(|&eq| FastPortal { enabled: true, acl: 0, eq, handler: false, target: 0, md: 0 })
            .collect();
        let (mut e, eqs0, handles) = fast_engine(&mds, &portals, &entries, &[]);
        let mut full = e.clone();
        let (mut eqs, mut eqs_full) = (eqs0, eqs0);
        let mut mdh: Vec<MdHandle> = handles.iter().flatten().copied().collect();
        let mut mdh_full = mdh.clone();
        let mut ents = Vec::new();
        for p in 0..3u32 {
            let mut hs = std::vec![MatchHandle::NONE; e.me_list(p, &mut []).unwrap_or(0)];
            let _ = e.me_list(p, &mut hs);
            ents.extend(hs);
        }
        let mut ents_full = ents.clone();
        let mut key = (0, 0, 0);
        for s in &steps {
            if let Step::Put(k, offset, length, w) = *s {
                key = k.unwrap_or(key);
                let (portal, src, bits) = key;
                let p = PlainPut {
                    portal,
                    src: ProcessId::new(2, src as u32),
                    dst: ME,
                    match_bits: bits,
                    offset,
                    length,
                    hdr_data: offset ^ 0x55,
                };
                let want = |q: &[EqHandle; 2]| match w {
                    0 => EqHandle::NONE,
                    k => q[k as usize - 1],
                };
                let (mut to, mut to_full) = (Region::new(1, 1), Region::new(1, 1));
                let (mut ev, mut ev_full) = (Event::EMPTY, Event::EMPTY);
                full.forget_last_match();
                let r = e.deliver_plain_put_fast_taking(p, &mut to, want(&eqs), &mut ev);
                let r_full = full.deliver_plain_put_fast_taking(p, &mut to_full, want(&eqs_full), &mut ev_full);
                prop_assert_eq!(r, r_full, "{:?}", s);
                prop_assert_eq!(to, to_full);
                prop_assert_eq!(ev, ev_full);
                if r.is_none() {
                    let h = p.to_wire();
                    let mut plan = DeliveryPlan::EMPTY;
                    let a = e.deliver_into(&h, &mut plan);
                    let mut plan_full = DeliveryPlan::EMPTY;
                    let b = full.deliver_into(&h, &mut plan_full);
                    prop_assert_eq!(a, b);
                }
            } else {
                let a = apply_step(&mut e, s, &mut eqs, &mut mdh, &mut ents);
                let b = apply_step(&mut full, s, &mut eqs_full, &mut mdh_full, &mut ents_full);
                prop_assert_eq!(a, b, "{:?}", s);
            }
            prop_assert_eq!(format!("{e:?}"), format!("{full:?}"), "{:?}", s);
        }
    }
}
