//! Unit tests of the engine: every descriptor kind, every link of the match
//! list, the portal checks, event queues, handles, exhaustion, the
//! initiator side and the protocol of section 7.7.

use crate::*;
use std::vec::Vec;

const ME: ProcessId = ProcessId::new(1, 0);
const PEER: ProcessId = ProcessId::new(1, 1);

fn engine() -> Engine<BoxStore> {
    Engine::new(Config::small(ME)).unwrap()
}

/// Enable `portal` for everybody with a 32-event queue.
fn open(e: &mut Engine<BoxStore>, portal: u32) -> EqHandle {
    let eq = e.eq_alloc(32).unwrap();
    e.portal_set_eq(portal, Some(eq)).unwrap();
    e.portal_set_acl(portal, Acl::ALLOW_ALL).unwrap();
    e.portal_enable(portal).unwrap();
    eq
}

fn put(portal: u32, bits: u64, len: u64) -> WireHeader {
    WireHeader {
        version: WIRE_VERSION,
        op: Op::Put,
        flags: 0,
        portal,
        src: PEER,
        dst: ME,
        match_bits: bits,
        offset: 0,
        length: len,
        rlength: len,
        return_md: NO_MD,
        return_offset: 0,
        hdr_data: 0,
    }
}

fn put_at(portal: u32, offset: u64, len: u64) -> WireHeader {
    WireHeader {
        offset,
        ..put(portal, 0, len)
    }
}

fn get(portal: u32, offset: u64, len: u64) -> WireHeader {
    WireHeader {
        op: Op::Get,
        offset,
        return_md: 77,
        return_offset: 5,
        ..put(portal, 0, len)
    }
}

fn md(e: &mut Engine<BoxStore>, kind: MdKind<'_>, options: MdOptions) -> MdHandle {
    e.md_create(&MdSpec {
        kind,
        options,
        eq: None,
    })
    .unwrap()
}

fn single(addr: u64, len: u64, offset: OffsetMode) -> MdKind<'static> {
    MdKind::Single {
        region: Region::new(addr, len),
        offset,
    }
}

fn segs(e: &Engine<BoxStore>, b: &Body) -> Vec<Segment> {
    e.segments(b).unwrap().collect()
}

fn seg(addr: u64, len: u64, msg_offset: u64) -> Segment {
    Segment {
        addr,
        len,
        msg_offset,
    }
}

fn drop_reason(e: &mut Engine<BoxStore>, h: &WireHeader) -> DropReason {
    e.deliver(h).unwrap_err().reason
}

// ------------------------------------------------------------ single block

#[test]
fn single_block_sender_offset_exact_fit_zero_length_and_one_over() {
    let mut e = engine();
    let eq = open(&mut e, 0);
    let m = md(
        &mut e,
        single(0x1000, 100, OffsetMode::Sender),
        MdOptions::PUT,
    );
    e.portal_attach_md(0, m).unwrap();

    let p = e.deliver(&put_at(0, 40, 60)).unwrap();
    assert_eq!(p.body.first(), Region::new(0x1000 + 40, 60));
    assert_eq!((p.md_offset, p.mlength, p.truncated), (40, 60, false));
    assert_eq!(p.response, Response::None);

    let p = e.deliver(&put_at(0, 0, 100)).unwrap();
    assert_eq!(p.body.first(), Region::new(0x1000, 100));

    let p = e.deliver(&put_at(0, 100, 0)).unwrap();
    assert_eq!((p.mlength, p.body.len()), (0, 0));
    assert_eq!(segs(&e, &p.body), []);

    assert_eq!(drop_reason(&mut e, &put_at(0, 41, 60)), DropReason::TooLong);
    assert_eq!(drop_reason(&mut e, &put_at(0, 101, 0)), DropReason::TooLong);
    assert_eq!(e.counters().drops(DropReason::TooLong), 2);
    assert_eq!(e.counters().delivered, 3);

    let kinds: Vec<_> = core::iter::from_fn(|| e.eq_get(eq).unwrap())
        .map(|ev| ev.kind)
        .collect();
    use EventKind::*;
    assert_eq!(kinds, [Put, Put, Put, Discard, Discard]);
}

#[test]
fn single_block_receiver_offset_advances_and_truncates() {
    let mut e = engine();
    open(&mut e, 0);
    let m = md(
        &mut e,
        single(0x1000, 100, OffsetMode::Receiver),
        MdOptions::PUT.truncating(),
    );
    e.portal_attach_md(0, m).unwrap();
    // The sender's offset is ignored.
    let p = e.deliver(&put_at(0, 70, 30)).unwrap();
    assert_eq!(p.body.first(), Region::new(0x1000, 30));
    let p = e.deliver(&put(0, 0, 50)).unwrap();
    assert_eq!(p.body.first(), Region::new(0x1000 + 30, 50));
    assert_eq!(e.md_local_offset(m).unwrap(), 80);
    // 30 more do not fit: truncated to the 20 left.
    let p = e.deliver(&put(0, 0, 30)).unwrap();
    assert_eq!((p.mlength, p.rlength, p.truncated), (20, 30, true));
    assert!(p.event.truncated);
    // Full: zero bytes, still delivered (truncation), zero-length segments.
    let p = e.deliver(&put(0, 0, 1)).unwrap();
    assert_eq!((p.mlength, p.truncated), (0, true));
}

#[test]
fn single_block_get_replies_and_respects_permissions() {
    let mut e = engine();
    open(&mut e, 0);
    open(&mut e, 1);
    let m = md(
        &mut e,
        single(0x1000, 100, OffsetMode::Sender),
        MdOptions::GET,
    );
    e.portal_attach_md(0, m).unwrap();
    let p = e.deliver(&get(0, 10, 20)).unwrap();
    assert_eq!(p.op, Op::Get);
    assert_eq!(p.body.first(), Region::new(0x100A, 20));
    let Response::Reply(r) = p.response else {
        panic!("get must reply")
    };
    assert_eq!((r.op, r.src, r.dst), (Op::Reply, ME, PEER));
    assert_eq!(
        (r.offset, r.length, r.rlength, r.return_md),
        (5, 20, 20, 77)
    );
    assert_eq!(p.event.kind, EventKind::Get);
    // A put on a get-only descriptor: invalid descriptor.
    assert_eq!(drop_reason(&mut e, &put(0, 0, 1)), DropReason::InvalidMd);
    // A get on a put-only descriptor: invalid too.
    let w = md(
        &mut e,
        single(0x2000, 10, OffsetMode::Sender),
        MdOptions::PUT,
    );
    e.portal_attach_md(1, w).unwrap();
    assert_eq!(drop_reason(&mut e, &get(1, 0, 1)), DropReason::InvalidMd);
}

#[test]
fn ack_only_when_asked_and_allowed() {
    let mut e = engine();
    open(&mut e, 0);
    open(&mut e, 1);
    let m = md(
        &mut e,
        single(0x1000, 10, OffsetMode::Sender),
        MdOptions::PUT.truncating(),
    );
    e.portal_attach_md(0, m).unwrap();
    let mut h = put(0, 9, 16);
    h.flags = flags::ACK_REQ;
    h.return_md = 1234;
    h.hdr_data = 99;
    let p = e.deliver(&h).unwrap();
    let Response::Ack(a) = p.response else {
        panic!("ack expected")
    };
    assert_eq!((a.op, a.src, a.dst, a.match_bits), (Op::Ack, ME, PEER, 9));
    assert_eq!(
        (a.length, a.rlength, a.return_md, a.hdr_data),
        (10, 16, 1234, 99)
    );
    assert!(a.truncated());
    assert_eq!(e.deliver(&put(0, 0, 1)).unwrap().response, Response::None);

    let no_ack = MdOptions {
        ack: false,
        ..MdOptions::PUT
    };
    let n = md(&mut e, single(0x2000, 10, OffsetMode::Sender), no_ack);
    e.portal_attach_md(1, n).unwrap();
    h.portal = 1;
    h.length = 4;
    h.rlength = 4;
    assert_eq!(e.deliver(&h).unwrap().response, Response::None);
}

// ------------------------------------------------------ independent blocks

fn blocks3() -> [Region; 3] {
    [
        Region::new(0x1000, 200),
        Region::new(0x2000, 100),
        Region::new(0x3000, 300),
    ]
}

#[test]
fn independent_linear_one_message_per_block_then_exhausted() {
    let mut e = engine();
    let eq = open(&mut e, 0);
    let b = blocks3();
    let m = md(
        &mut e,
        MdKind::Independent {
            blocks: &b,
            circular: false,
            save: Save::Body,
        },
        MdOptions::PUT,
    );
    e.portal_attach_md(0, m).unwrap();
    let p = e.deliver(&put(0, 0, 200)).unwrap(); // exact fit
    assert_eq!(
        (p.body.first(), p.md_offset, p.header_at),
        (Region::new(0x1000, 200), 0, None)
    );
    // One byte over the second block: discarded with an error event, the block stays free.
    assert_eq!(drop_reason(&mut e, &put(0, 0, 101)), DropReason::TooLong);
    let p = e.deliver(&put(0, 0, 0)).unwrap(); // zero length takes a block
    assert_eq!((p.body.first(), p.md_offset), (Region::new(0x2000, 0), 1));
    let p = e.deliver(&put(0, 0, 7)).unwrap();
    assert_eq!((p.body.first(), p.md_offset), (Region::new(0x3000, 7), 2));
    // Linear and used up: the descriptor is no longer valid.
    assert_eq!(drop_reason(&mut e, &put(0, 0, 1)), DropReason::InvalidMd);
    let evs: Vec<_> = core::iter::from_fn(|| e.eq_get(eq).unwrap()).collect();
    assert_eq!(evs[1].kind, EventKind::Discard);
    assert_eq!(evs[1].reason, Some(DropReason::TooLong));
    assert_eq!(evs[4].reason, Some(DropReason::InvalidMd));
}

#[test]
fn independent_circular_wraps_and_saves_header_and_body() {
    let mut e = engine();
    open(&mut e, 0);
    let b = blocks3();
    let m = md(
        &mut e,
        MdKind::Independent {
            blocks: &b,
            circular: true,
            save: Save::Both,
        },
        MdOptions::PUT,
    );
    e.portal_attach_md(0, m).unwrap();
    let hl = HEADER_LEN as u64;
    let mut idx = Vec::new();
    for _ in 0..5 {
        let p = e.deliver(&put(0, 0, 20)).unwrap();
        let block = b[p.md_offset as usize];
        assert_eq!(p.header_at, Some(block.addr));
        assert_eq!(p.body.first(), Region::new(block.addr + hl, 20));
        assert!(p.event.header_saved);
        idx.push(p.md_offset);
    }
    assert_eq!(idx, [0, 1, 2, 0, 1]);
    // Next is block 2 (300 bytes): header + 221 is exact fit, + 222 is one over.
    assert_eq!(
        drop_reason(&mut e, &put(0, 0, 300 - hl + 1)),
        DropReason::TooLong
    );
    let p = e.deliver(&put(0, 0, 300 - hl)).unwrap();
    assert_eq!(p.md_offset, 2);
}

#[test]
fn independent_header_only_keeps_no_body() {
    let mut e = engine();
    open(&mut e, 0);
    let b = [
        Region::new(0x1000, HEADER_LEN as u64),
        Region::new(0x2000, 10),
    ];
    let m = md(
        &mut e,
        MdKind::Independent {
            blocks: &b,
            circular: false,
            save: Save::Header,
        },
        MdOptions::PUT,
    );
    e.portal_attach_md(0, m).unwrap();
    let p = e.deliver(&put(0, 0, 5000)).unwrap();
    assert_eq!((p.header_at, p.mlength, p.rlength), (Some(0x1000), 0, 5000));
    // The second block cannot hold a header at all.
    assert_eq!(drop_reason(&mut e, &put(0, 0, 0)), DropReason::TooLong);
}

// --------------------------------------------------------- combined blocks

#[test]
fn combined_scatters_put_and_gathers_get() {
    let mut e = engine();
    open(&mut e, 0);
    let b = blocks3(); // 200 + 100 + 300
    let m = md(
        &mut e,
        MdKind::Combined {
            blocks: &b,
            offset: OffsetMode::Sender,
        },
        MdOptions::PUT_GET,
    );
    e.portal_attach_md(0, m).unwrap();
    let p = e.deliver(&put_at(0, 150, 400)).unwrap();
    assert!(!p.body.is_contiguous());
    assert_eq!(
        segs(&e, &p.body),
        [
            seg(0x1000 + 150, 50, 0),
            seg(0x2000, 100, 50),
            seg(0x3000, 250, 150)
        ]
    );
    let mut out = [seg(0, 0, 0); 2];
    assert_eq!(
        e.write_segments(&p.body, &mut out),
        Err(Error::SegmentBuffer(2))
    );
    let mut out = [seg(0, 0, 0); 3];
    assert_eq!(e.write_segments(&p.body, &mut out), Ok(3));
    // Exact fit of the whole buffer, one byte over.
    assert_eq!(e.deliver(&put_at(0, 0, 600)).unwrap().body.len(), 600);
    assert_eq!(drop_reason(&mut e, &put_at(0, 0, 601)), DropReason::TooLong);
    // Starting exactly on a block boundary.
    let p = e.deliver(&put_at(0, 200, 100)).unwrap();
    assert_eq!(segs(&e, &p.body), [seg(0x2000, 100, 0)]);
    // Get gathers.
    let p = e.deliver(&get(0, 250, 100)).unwrap();
    assert_eq!(
        segs(&e, &p.body),
        [seg(0x2000 + 50, 50, 0), seg(0x3000, 50, 50)]
    );
    // Zero length at the very end.
    assert_eq!(e.deliver(&put_at(0, 600, 0)).unwrap().mlength, 0);
    // Segments of a released descriptor are refused.
    e.md_release(m).unwrap();
    let p2 = p;
    assert_eq!(
        e.segments(&p2.body).map(|_| ()),
        Err(Error::StaleHandle("memory descriptor"))
    );
}

#[test]
fn combined_receiver_offset_continues_across_blocks() {
    let mut e = engine();
    open(&mut e, 0);
    let b = [Region::new(0x100, 10), Region::new(0x200, 10)];
    let m = md(
        &mut e,
        MdKind::Combined {
            blocks: &b,
            offset: OffsetMode::Receiver,
        },
        MdOptions::PUT.truncating(),
    );
    e.portal_attach_md(0, m).unwrap();
    let p = e.deliver(&put(0, 0, 8)).unwrap();
    assert_eq!(segs(&e, &p.body), [seg(0x100, 8, 0)]);
    let p = e.deliver(&put(0, 0, 8)).unwrap();
    assert_eq!(segs(&e, &p.body), [seg(0x108, 2, 0), seg(0x200, 6, 2)]);
    let p = e.deliver(&put(0, 0, 8)).unwrap();
    assert_eq!((p.mlength, p.truncated), (4, true));
    assert_eq!(segs(&e, &p.body), [seg(0x206, 4, 0)]);
}

// -------------------------------------------------------------- dynamic

#[test]
fn dynamic_heap_allocates_fills_and_frees() {
    let mut e = engine();
    let eq = open(&mut e, 0);
    let m = md(
        &mut e,
        MdKind::Dynamic {
            region: Region::new(0x8000, 64),
            save: Save::Body,
            max_messages: 3,
        },
        MdOptions::PUT,
    );
    e.portal_attach_md(0, m).unwrap();
    let a = e.deliver(&put(0, 0, 20)).unwrap(); // 24 bytes
    assert_eq!(a.body.first(), Region::new(0x8000, 20));
    let b = e.deliver(&put(0, 0, 0)).unwrap(); // 8 bytes, still distinct
    assert_eq!(b.md_offset, 24);
    // Full heap: 32 left, 33 needed.
    assert_eq!(drop_reason(&mut e, &put(0, 0, 33)), DropReason::TooLong);
    let c = e.deliver(&put(0, 0, 32)).unwrap(); // exact fit
    assert_eq!(c.body.first(), Region::new(0x8000 + 32, 32));
    assert_eq!(e.md_heap_usage(m).unwrap(), (3, 64));
    // Records exhausted even for a tiny message.
    e.md_free(m, 24).unwrap();
    assert_eq!(e.md_free(m, 24), Err(Error::NoAllocation(24)));
    // The freed hole (8 bytes) is reused first-fit.
    let d = e.deliver(&put(0, 0, 8)).unwrap();
    assert_eq!(d.md_offset, 24);
    assert_eq!(drop_reason(&mut e, &put(0, 0, 0)), DropReason::TooLong);
    e.md_free(m, a.md_offset).unwrap();
    let f = e.deliver(&put(0, 0, 24)).unwrap();
    assert_eq!(f.md_offset, 0);
    // Events say where each message is, for freeing.
    let first = e.eq_get(eq).unwrap().unwrap();
    assert_eq!((first.md, first.offset, first.mlength), (m, 0, 20));
    // Gets are not served from a heap.
    e.portal_set_acl(0, Acl::ALLOW_ALL).unwrap();
    assert_eq!(drop_reason(&mut e, &get(0, 0, 1)), DropReason::InvalidMd);
    let not_dynamic = e
        .md_create(&MdSpec {
            kind: single(0, 1, OffsetMode::Sender),
            options: MdOptions::PUT,
            eq: None,
        })
        .unwrap();
    assert!(matches!(
        e.md_free(not_dynamic, 0),
        Err(Error::Unsupported(_))
    ));
}

// ------------------------------------------------------------ match lists

fn sink(e: &mut Engine<BoxStore>, addr: u64, len: u64) -> MdHandle {
    md(e, single(addr, len, OffsetMode::Receiver), MdOptions::PUT)
}

#[test]
fn matching_on_bits_ignore_mask_and_wildcards() {
    let mut e = engine();
    open(&mut e, 0);
    let a = sink(&mut e, 0x100, 1000);
    let b = sink(&mut e, 0x200, 1000);
    let c = sink(&mut e, 0x300, 1000);
    let d = sink(&mut e, 0x400, 1000);
    e.me_append(0, MatchSpec::new(0xAB00).ignore(0xFF), a)
        .unwrap();
    e.me_append(0, MatchSpec::new(1).from(1, 5), b).unwrap();
    e.me_append(0, MatchSpec::new(1).from(2, ANY), c).unwrap();
    e.me_append(0, MatchSpec::new(1).from(ANY, 1), d).unwrap();
    assert_eq!(e.deliver(&put(0, 0xAB37, 1)).unwrap().md, a);
    assert_eq!(drop_reason(&mut e, &put(0, 0xAC37, 1)), DropReason::NoMatch);
    // From (1, 1): not rank 5, not group 2, but rank 1 of any group.
    assert_eq!(e.deliver(&put(0, 1, 1)).unwrap().md, d);
    let mut h = put(0, 1, 1);
    h.src = ProcessId::new(2, 9);
    assert_eq!(e.deliver(&h).unwrap().md, c);
    h.src = ProcessId::new(1, 5);
    assert_eq!(e.deliver(&h).unwrap().md, b);
}

#[test]
fn insert_before_after_and_unlink_keep_list_order() {
    let mut e = engine();
    open(&mut e, 0);
    let m = sink(&mut e, 0, 1 << 20);
    let x = e.me_append(0, MatchSpec::any(), m).unwrap();
    let a = e
        .me_insert(x, Position::Before, MatchSpec::any(), m)
        .unwrap();
    let z = e
        .me_insert(x, Position::After, MatchSpec::any(), m)
        .unwrap();
    let y = e
        .me_insert(z, Position::Before, MatchSpec::any(), m)
        .unwrap();
    let mut out = [MatchHandle::NONE; 8];
    let n = e.me_list(0, &mut out).unwrap();
    assert_eq!(&out[..n], [a, x, y, z]);
    assert_eq!(e.deliver(&put(0, 0, 1)).unwrap().entry, a);
    e.me_unlink(a).unwrap();
    e.me_unlink(z).unwrap();
    let n = e.me_list(0, &mut out).unwrap();
    assert_eq!(&out[..n], [x, y]);
    assert_eq!(e.deliver(&put(0, 0, 1)).unwrap().entry, x);
    assert_eq!(e.me_unlink(a), Err(Error::StaleHandle("match entry")));
    e.me_unlink(x).unwrap();
    e.me_unlink(y).unwrap();
    assert_eq!(e.portal_info(0).unwrap().entries, 0);
    assert_eq!(drop_reason(&mut e, &put(0, 0, 1)), DropReason::NoMatch);
    // A portal with a list cannot take a direct descriptor, and vice versa.
    e.me_append(0, MatchSpec::any(), m).unwrap();
    assert!(matches!(
        e.portal_attach_md(0, m),
        Err(Error::PortalBusy { .. })
    ));
    e.portal_attach_md(1, m).unwrap();
    assert!(matches!(
        e.me_append(1, MatchSpec::any(), m),
        Err(Error::PortalBusy { .. })
    ));
}

#[test]
fn second_link_followed_when_too_long() {
    let mut e = engine();
    open(&mut e, 0);
    let small = md(
        &mut e,
        single(0x100, 10, OffsetMode::Sender),
        MdOptions::PUT,
    );
    let skipped = sink(&mut e, 0x200, 100);
    let big = sink(&mut e, 0x300, 100);
    let first = e.me_append(0, MatchSpec::any(), small).unwrap();
    let mid = e.me_append(0, MatchSpec::any(), skipped).unwrap();
    let last = e.me_append(0, MatchSpec::any(), big).unwrap();
    // Default: too long goes to the next entry.
    assert_eq!(e.deliver(&put(0, 0, 11)).unwrap().entry, mid);
    // Explicit: jump over `mid`.
    e.me_set_links(first, Link::Entry(last), Link::Next)
        .unwrap();
    assert_eq!(e.deliver(&put(0, 0, 11)).unwrap().entry, last);
    // Fits: no link followed.
    assert_eq!(e.deliver(&put(0, 0, 10)).unwrap().entry, first);
    // End: discarded as too long.
    e.me_set_links(first, Link::End, Link::Next).unwrap();
    assert_eq!(drop_reason(&mut e, &put(0, 0, 11)), DropReason::TooLong);
    // A link to an entry that was unlinked ends the search.
    e.me_set_links(first, Link::Entry(last), Link::Next)
        .unwrap();
    e.me_unlink(last).unwrap();
    assert_eq!(drop_reason(&mut e, &put(0, 0, 11)), DropReason::TooLong);
}

#[test]
fn third_link_followed_when_descriptor_invalid() {
    let mut e = engine();
    open(&mut e, 0);
    let gone = sink(&mut e, 0x100, 100);
    let next = sink(&mut e, 0x200, 100);
    let target = sink(&mut e, 0x300, 100);
    let first = e.me_append(0, MatchSpec::any(), gone).unwrap();
    let mid = e.me_append(0, MatchSpec::any(), next).unwrap();
    let last = e.me_append(0, MatchSpec::any(), target).unwrap();
    e.md_release(gone).unwrap();
    assert_eq!(e.deliver(&put(0, 0, 1)).unwrap().entry, mid);
    e.me_set_links(first, Link::Next, Link::Entry(last))
        .unwrap();
    assert_eq!(e.deliver(&put(0, 0, 1)).unwrap().entry, last);
    e.me_set_links(first, Link::Next, Link::End).unwrap();
    assert_eq!(drop_reason(&mut e, &put(0, 0, 1)), DropReason::InvalidMd);
    // A link may not point into another portal's list.
    open(&mut e, 1);
    let other = e.me_append(1, MatchSpec::any(), target).unwrap();
    assert!(matches!(
        e.me_set_links(first, Link::Entry(other), Link::Next),
        Err(Error::Invalid(_))
    ));
}

#[test]
fn link_cycle_is_detected_not_looped() {
    let mut e = engine();
    open(&mut e, 0);
    let tiny = md(&mut e, single(0, 1, OffsetMode::Sender), MdOptions::PUT);
    let a = e.me_append(0, MatchSpec::any(), tiny).unwrap();
    let b = e.me_append(0, MatchSpec::any(), tiny).unwrap();
    e.me_set_links(a, Link::Entry(b), Link::Next).unwrap();
    e.me_set_links(b, Link::Entry(a), Link::Next).unwrap();
    assert_eq!(drop_reason(&mut e, &put(0, 0, 2)), DropReason::LinkLoop);
    assert_eq!(e.counters().drops(DropReason::LinkLoop), 1);
}

#[test]
fn use_once_and_threshold_unlink() {
    let mut e = engine();
    let eq = open(&mut e, 0);
    let m = sink(&mut e, 0, 1000);
    let once = e.me_append(0, MatchSpec::new(1).use_once(), m).unwrap();
    let thrice = e.me_append(0, MatchSpec::new(2).threshold(3), m).unwrap();
    let p = e.deliver(&put(0, 1, 1)).unwrap();
    assert!(p.unlinked);
    assert_eq!(p.entry, once);
    assert_eq!(e.me_info(once), Err(Error::StaleHandle("match entry")));
    assert_eq!(drop_reason(&mut e, &put(0, 1, 1)), DropReason::NoMatch);
    assert!(!e.deliver(&put(0, 2, 1)).unwrap().unlinked);
    assert!(!e.deliver(&put(0, 2, 1)).unwrap().unlinked);
    assert_eq!(e.me_info(thrice).unwrap().uses, 2);
    assert!(e.deliver(&put(0, 2, 1)).unwrap().unlinked);
    let kinds: Vec<_> = core::iter::from_fn(|| e.eq_get(eq).unwrap())
        .map(|ev| ev.kind)
        .collect();
    use EventKind::*;
    assert_eq!(kinds, [Put, Unlink, Discard, Put, Put, Put, Unlink]);
    assert!(matches!(
        e.me_append(0, MatchSpec::any().threshold(0), m),
        Err(Error::Invalid(_))
    ));
}

// ------------------------------------------------------------ portal checks

#[test]
fn disabled_forbidden_invalid_and_misaddressed_messages_are_counted() {
    let mut e = engine();
    let eq = open(&mut e, 0);
    let m = sink(&mut e, 0, 100);
    e.portal_attach_md(0, m).unwrap();
    e.portal_disable(0).unwrap();
    assert_eq!(drop_reason(&mut e, &put(0, 0, 1)), DropReason::Disabled);
    e.portal_enable(0).unwrap();
    // Only rank 3 of job 1 may put; nobody may get.
    e.portal_set_acl(
        0,
        Acl {
            group: 1,
            rank: 3,
            put: true,
            get: false,
        },
    )
    .unwrap();
    assert_eq!(drop_reason(&mut e, &put(0, 0, 1)), DropReason::Forbidden);
    let mut h = put(0, 0, 1);
    h.src = ProcessId::new(1, 3);
    assert!(e.deliver(&h).is_ok());
    h.src = ProcessId::new(2, 3);
    assert_eq!(drop_reason(&mut e, &h), DropReason::Forbidden);
    let mut g = get(0, 0, 1);
    g.src = ProcessId::new(1, 3);
    assert_eq!(drop_reason(&mut e, &g), DropReason::Forbidden);
    // Portal index outside the table (16 entries).
    let d = e.deliver(&put(16, 0, 1)).unwrap_err();
    assert_eq!(d.reason, DropReason::InvalidPortal);
    assert!(matches!(d.header, Some(HeaderError::Portal { .. })));
    // An enabled portal with nothing attached.
    e.portal_set_acl(3, Acl::ALLOW_ALL).unwrap();
    e.portal_enable(3).unwrap();
    assert_eq!(drop_reason(&mut e, &put(3, 0, 1)), DropReason::NoMatch);
    // Addressed to someone else; malformed.
    let mut w = put(0, 0, 1);
    w.dst = ProcessId::new(1, 7);
    assert_eq!(drop_reason(&mut e, &w), DropReason::WrongDestination);
    let mut bad = put(0, 0, 1);
    bad.version = 9;
    assert_eq!(drop_reason(&mut e, &bad), DropReason::BadHeader);
    let c = e.counters();
    for (r, n) in [
        (DropReason::Disabled, 1),
        (DropReason::Forbidden, 3),
        (DropReason::InvalidPortal, 1),
        (DropReason::NoMatch, 1),
        (DropReason::WrongDestination, 1),
        (DropReason::BadHeader, 1),
    ] {
        assert_eq!(c.drops(r), n, "{r:?}");
    }
    assert_eq!(c.total_drops(), 8);
    assert_eq!(c.iter_drops().count(), DropReason::COUNT);
    // Disabled and forbidden messages produce no event (no user code runs
    // for senders the portal does not admit); the rest did.
    let evs: Vec<_> = core::iter::from_fn(|| e.eq_get(eq).unwrap()).collect();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].kind, EventKind::Put);
    assert_eq!(
        e.portal_enable(16),
        Err(Error::PortalIndex {
            portal: 16,
            size: 16
        })
    );
}

// ------------------------------------------------------------ event queues

#[test]
fn full_event_queue_overflow_is_reported() {
    let mut e = engine();
    open(&mut e, 0);
    let q = e.eq_alloc(2).unwrap();
    e.portal_set_eq(0, Some(q)).unwrap();
    let m = sink(&mut e, 0, 100);
    e.portal_attach_md(0, m).unwrap();
    assert_eq!(e.deliver(&put(0, 0, 1)).unwrap().posted, Posted::Queued(q));
    assert_eq!(e.deliver(&put(0, 0, 1)).unwrap().posted, Posted::Queued(q));
    let p = e.deliver(&put(0, 0, 1)).unwrap();
    assert_eq!(p.posted, Posted::Overflowed(q));
    assert_eq!(p.mlength, 1, "the data is still delivered");
    assert_eq!(
        e.deliver(&put(0, 0, 1)).unwrap().posted,
        Posted::Overflowed(q)
    );
    assert_eq!(e.counters().eq_overflows, 2);
    assert_eq!(e.eq_len(q).unwrap(), 2);
    assert_eq!(e.eq_get(q), Err(Error::EventsDropped(2)));
    assert_eq!(e.eq_get(q).unwrap().unwrap().seq, 0);
    assert_eq!(e.deliver(&put(0, 0, 1)).unwrap().posted, Posted::Queued(q));
    assert_eq!(e.eq_get(q).unwrap().unwrap().seq, 1);
    // Sequence numbers show the gap.
    assert_eq!(e.eq_get(q).unwrap().unwrap().seq, 4);
    assert_eq!(e.eq_get(q).unwrap(), None);
}

#[test]
fn ring_wraps_around() {
    let mut e = engine();
    let q = e.eq_alloc(3).unwrap();
    open(&mut e, 0);
    e.portal_set_eq(0, Some(q)).unwrap();
    let m = sink(&mut e, 0, 1000);
    e.portal_attach_md(0, m).unwrap();
    for i in 0..10u64 {
        e.deliver(&WireHeader {
            hdr_data: i,
            ..put(0, 0, 1)
        })
        .unwrap();
        assert_eq!(e.eq_get(q).unwrap().unwrap().hdr_data, i);
    }
}

// -------------------------------------------------------- handles, sizes

#[test]
fn stale_handles_are_rejected() {
    let mut e = engine();
    open(&mut e, 0);
    let m = sink(&mut e, 0, 10);
    e.md_release(m).unwrap();
    let m2 = sink(&mut e, 0, 10);
    assert_eq!(m2.index(), m.index(), "slot reused");
    assert_ne!(m2.generation(), m.generation());
    assert_eq!(
        e.md_release(m),
        Err(Error::StaleHandle("memory descriptor"))
    );
    assert_eq!(
        e.portal_attach_md(0, m),
        Err(Error::StaleHandle("memory descriptor"))
    );
    assert_eq!(
        e.me_append(0, MatchSpec::any(), m),
        Err(Error::StaleHandle("memory descriptor"))
    );
    let q = e.eq_alloc(1).unwrap();
    e.eq_free(q).unwrap();
    assert_eq!(e.eq_get(q), Err(Error::StaleHandle("event queue")));
    assert_eq!(
        e.portal_set_eq(0, Some(q)),
        Err(Error::StaleHandle("event queue"))
    );
    let h = e.me_append(0, MatchSpec::any(), m2).unwrap();
    e.me_unlink(h).unwrap();
    let h2 = e.me_append(0, MatchSpec::any(), m2).unwrap();
    assert_eq!(h2.index(), h.index());
    assert_eq!(
        e.me_set_links(h, Link::End, Link::End),
        Err(Error::StaleHandle("match entry"))
    );
    assert_eq!(
        e.me_insert(h, Position::After, MatchSpec::any(), m2),
        Err(Error::StaleHandle("match entry"))
    );
    assert_eq!(MdHandle::from_cookie(m2.to_cookie()), m2);
}

#[test]
fn exhaustion_is_an_error_never_growth() {
    let cfg = Config {
        portals: 1,
        match_entries: 2,
        mds: 2,
        blocks: 3,
        eqs: 1,
        events: 4,
        heap_records: 2,
        ..Config::small(ME)
    };
    let mut e = Engine::new(cfg).unwrap();
    let b = [Region::new(0, 1), Region::new(1, 1)];
    let m = e
        .md_create(&MdSpec {
            kind: MdKind::Combined {
                blocks: &b,
                offset: OffsetMode::Sender,
            },
            options: MdOptions::PUT,
            eq: None,
        })
        .unwrap();
    // Bad regions and arguments.
    assert!(matches!(
        e.md_create(&MdSpec {
            kind: single(u64::MAX, 2, OffsetMode::Sender),
            options: MdOptions::PUT,
            eq: None
        }),
        Err(Error::BadRegion { .. })
    ));
    assert!(matches!(
        e.md_create(&MdSpec {
            kind: MdKind::Combined {
                blocks: &[],
                offset: OffsetMode::Sender
            },
            options: MdOptions::PUT,
            eq: None
        }),
        Err(Error::Invalid(_))
    ));
    // Two blocks used, one left: a two-block descriptor does not fit.
    let r = e.md_create(&MdSpec {
        kind: MdKind::Independent {
            blocks: &b,
            circular: false,
            save: Save::Body,
        },
        options: MdOptions::PUT,
        eq: None,
    });
    assert_eq!(
        r,
        Err(Error::Exhausted {
            table: "block",
            capacity: 3
        })
    );
    let r = e.md_create(&MdSpec {
        kind: MdKind::Dynamic {
            region: Region::new(0, 100),
            save: Save::Body,
            max_messages: 3,
        },
        options: MdOptions::PUT,
        eq: None,
    });
    assert_eq!(
        r,
        Err(Error::Exhausted {
            table: "heap record",
            capacity: 2
        })
    );
    let m2 = e
        .md_create(&MdSpec {
            kind: single(0, 1, OffsetMode::Sender),
            options: MdOptions::PUT,
            eq: None,
        })
        .unwrap();
    let r = e.md_create(&MdSpec {
        kind: single(0, 1, OffsetMode::Sender),
        options: MdOptions::PUT,
        eq: None,
    });
    assert_eq!(
        r,
        Err(Error::Exhausted {
            table: "memory descriptor",
            capacity: 2
        })
    );
    // Releasing frees both the slot and its blocks.
    e.md_release(m).unwrap();
    let r = e.md_create(&MdSpec {
        kind: MdKind::Independent {
            blocks: &[Region::new(0, 1); 3],
            circular: false,
            save: Save::Body,
        },
        options: MdOptions::PUT,
        eq: None,
    });
    assert!(r.is_ok());
    e.me_append(0, MatchSpec::any(), m2).unwrap();
    e.me_append(0, MatchSpec::any(), m2).unwrap();
    assert_eq!(
        e.me_append(0, MatchSpec::any(), m2),
        Err(Error::Exhausted {
            table: "match entry",
            capacity: 2
        })
    );
    assert_eq!(
        e.eq_alloc(5),
        Err(Error::Exhausted {
            table: "event",
            capacity: 4
        })
    );
    e.eq_alloc(4).unwrap();
    assert_eq!(
        e.eq_alloc(1),
        Err(Error::Exhausted {
            table: "event queue",
            capacity: 1
        })
    );
}

#[test]
fn event_pool_ranges_are_reused_after_free() {
    let cfg = Config {
        eqs: 3,
        events: 6,
        ..Config::small(ME)
    };
    let mut e = Engine::new(cfg).unwrap();
    let a = e.eq_alloc(2).unwrap();
    let b = e.eq_alloc(2).unwrap();
    let _c = e.eq_alloc(2).unwrap();
    e.eq_free(b).unwrap();
    let _b2 = e.eq_alloc(2).unwrap();
    e.eq_free(a).unwrap();
    // Two free slots at the start, three asked for.
    assert_eq!(
        e.eq_alloc(3),
        Err(Error::Exhausted {
            table: "event",
            capacity: 6
        })
    );
    e.eq_alloc(2).unwrap();
}

#[test]
fn store_kinds_without_allocator() {
    type Small = ArrayStore<2, 4, 4, 4, 1, 8, 4>;
    let cfg = Small::config(ME, 1024);
    let mut e = Engine::with_store(cfg, Small::new()).unwrap();
    let q = e.eq_alloc(8).unwrap();
    let m = e
        .md_create(&MdSpec {
            kind: single(0x40, 16, OffsetMode::Receiver),
            options: MdOptions::PUT,
            eq: Some(q),
        })
        .unwrap();
    e.portal_set_acl(1, Acl::ALLOW_ALL).unwrap();
    e.portal_enable(1).unwrap();
    e.me_append(1, MatchSpec::any(), m).unwrap();
    let p = e.deliver(&put(1, 0, 16)).unwrap();
    assert_eq!(p.body.first(), Region::new(0x40, 16));
    assert_eq!(e.eq_get(q).unwrap().unwrap().kind, EventKind::Put);

    // Caller-provided slices.
    let mut portals = [PortalSlot::EMPTY; 1];
    let mut entries = [EntrySlot::EMPTY; 1];
    let mut mds = [MdSlot::EMPTY; 1];
    let mut blocks = [Region::EMPTY; 0];
    let mut eqs = [EqSlot::EMPTY; 0];
    let mut events = [Event::EMPTY; 0];
    let mut chunks = [HeapChunk::EMPTY; 0];
    let store = SliceStore(Tables {
        portals: &mut portals,
        entries: &mut entries,
        mds: &mut mds,
        blocks: &mut blocks,
        eqs: &mut eqs,
        events: &mut events,
        chunks: &mut chunks,
    });
    let cfg = Config {
        id: ME,
        portals: 1,
        match_entries: 1,
        mds: 1,
        blocks: 0,
        eqs: 0,
        events: 0,
        heap_records: 0,
        max_message: 64,
    };
    let mut e = Engine::with_store(cfg, store).unwrap();
    let m = e
        .md_create(&MdSpec {
            kind: single(0, 64, OffsetMode::Sender),
            options: MdOptions::PUT,
            eq: None,
        })
        .unwrap();
    e.portal_set_acl(0, Acl::ALLOW_ALL).unwrap();
    e.portal_enable(0).unwrap();
    e.portal_attach_md(0, m).unwrap();
    assert_eq!(e.deliver(&put(0, 0, 64)).unwrap().posted, Posted::NoQueue);
    assert_eq!(
        e.deliver(&put(0, 0, 65)).unwrap_err().reason,
        DropReason::BadHeader
    );
    assert_eq!(
        e.eq_alloc(1),
        Err(Error::Exhausted {
            table: "event queue",
            capacity: 0
        })
    );

    // A store smaller than the configuration is refused.
    let r = Engine::with_store(Config::small(ME), Small::new());
    assert!(matches!(r, Err(Error::StoreTooSmall { .. })));
}

// ------------------------------------------------------- event handlers

#[derive(Default)]
struct Log(Vec<(HandlerId, EventKind, u64)>);

impl EventHandler for Log {
    fn handle(&mut self, id: HandlerId, ev: &Event) {
        self.0.push((id, ev.kind, ev.mlength));
    }
}

#[test]
fn portal_event_handler_runs_after_deposit_and_discard() {
    let mut e = engine();
    open(&mut e, 0);
    let m = md(&mut e, single(0, 10, OffsetMode::Sender), MdOptions::PUT);
    e.portal_attach_md(0, m).unwrap();
    e.portal_set_handler(0, Some(HandlerId(3))).unwrap();
    let mut log = Log::default();
    let p = e.deliver(&put(0, 0, 4)).unwrap();
    assert_eq!(p.handler, Some(HandlerId(3)));
    // The fabric copies, then runs the handler.
    p.run_handler(&mut log);
    e.deliver(&put(0, 0, 11)).unwrap_err().run_handler(&mut log);
    assert_eq!(
        log.0,
        [
            (HandlerId(3), EventKind::Put, 4),
            (HandlerId(3), EventKind::Discard, 0)
        ]
    );
    // Disabled portals run nothing.
    e.portal_disable(0).unwrap();
    e.deliver(&put(0, 0, 1)).unwrap_err().run_handler(&mut log);
    assert_eq!(log.0.len(), 2);
    e.portal_enable(0).unwrap();
    e.portal_set_handler(0, None).unwrap();
    e.deliver(&put(0, 0, 1)).unwrap().run_handler(&mut log);
    assert_eq!(log.0.len(), 2);
}

/// `deliver_into_no_event` still hands a handler its event, and otherwise leaves the plan's
/// event alone while the queued event is the full one.
#[test]
fn deliver_into_no_event_writes_the_plan_event_only_for_a_handler() {
    let mut e = engine();
    let eq = open(&mut e, 0);
    let m = md(&mut e, single(0, 64, OffsetMode::Sender), MdOptions::PUT);
    e.portal_attach_md(0, m).unwrap();
    e.portal_set_handler(0, Some(HandlerId(5))).unwrap();
    let mut plan = DeliveryPlan::EMPTY;
    let mut log = Log::default();
    e.deliver_into_no_event(&put(0, 0, 4), &mut plan).unwrap();
    plan.run_handler(&mut log);
    assert_eq!(log.0, [(HandlerId(5), EventKind::Put, 4)]);
    assert_eq!(plan.event, e.eq_get(eq).unwrap().unwrap());
    e.portal_set_handler(0, None).unwrap();
    let before = plan.event;
    e.deliver_into_no_event(&put(0, 0, 6), &mut plan).unwrap();
    assert_eq!(
        plan.event, before,
        "no handler: the plan's event is left as it was"
    );
    assert_eq!(plan.mlength, 6);
    let queued = e.eq_get(eq).unwrap().unwrap();
    assert_eq!(
        (queued.kind, queued.mlength, queued.seq),
        (EventKind::Put, 6, 1)
    );
}

// ------------------------------------------------------------ initiator

const OTHER: ProcessId = PEER;

#[test]
fn put_with_ack_and_get_with_reply_between_two_engines() {
    // `a` is ME = (1,0), `b` is PEER = (1,1).
    let mut a = engine();
    let mut b = Engine::new(Config::small(OTHER)).unwrap();
    let qa = a.eq_alloc(16).unwrap();
    let src = a
        .md_create(&MdSpec {
            kind: MdKind::Combined {
                blocks: &[Region::new(0xA000, 8), Region::new(0xB000, 100)],
                offset: OffsetMode::Sender,
            },
            options: MdOptions::PUT_GET,
            eq: Some(qa),
        })
        .unwrap();
    let qb = b.eq_alloc(16).unwrap();
    b.portal_set_eq(4, Some(qb)).unwrap();
    b.portal_set_acl(4, Acl::job(1)).unwrap();
    b.portal_enable(4).unwrap();
    let dst = b
        .md_create(&MdSpec {
            kind: single(0x5000, 64, OffsetMode::Sender),
            options: MdOptions::PUT_GET,
            eq: None,
        })
        .unwrap();
    b.me_append(4, MatchSpec::new(0x77), dst).unwrap();

    let send = a
        .prepare_put(&PutArgs {
            md: src,
            local_offset: 4,
            length: 20,
            target: OTHER,
            portal: 4,
            match_bits: 0x77,
            remote_offset: 8,
            ack: true,
            hdr_data: 5,
        })
        .unwrap();
    assert_eq!(
        segs(&a, &send.body),
        [seg(0xA004, 4, 0), seg(0xB000, 16, 4)]
    );
    // Over the wire and back.
    let wire = send.header.encode();
    let h = b.decode(&wire).unwrap();
    assert_eq!(a.sent(&send).unwrap(), Posted::Queued(qa));
    let plan = b.deliver(&h).unwrap();
    assert_eq!(plan.body.first(), Region::new(0x5008, 20));
    assert_eq!(plan.event.hdr_data, 5);
    let Response::Ack(ack) = plan.response else {
        panic!("ack expected")
    };
    let ack = a.decode(&ack.encode()).unwrap();
    let ap = a.deliver(&ack).unwrap();
    assert_eq!((ap.op, ap.mlength, ap.md_offset), (Op::Ack, 20, 8));
    // A second (forged or duplicate) ack is unexpected.
    assert_eq!(a.deliver(&ack).unwrap_err().reason, DropReason::Unexpected);

    let req = a
        .prepare_get(&GetArgs {
            md: src,
            local_offset: 2,
            length: 30,
            target: OTHER,
            portal: 4,
            match_bits: 0x77,
            remote_offset: 10,
            hdr_data: 6,
        })
        .unwrap();
    let gp = b.deliver(&req.header).unwrap();
    assert_eq!(gp.body.first(), Region::new(0x500A, 30));
    let Response::Reply(reply) = gp.response else {
        panic!("reply expected")
    };
    let rp = a.deliver(&reply).unwrap();
    assert_eq!(rp.op, Op::Reply);
    assert_eq!(segs(&a, &rp.body), [seg(0xA002, 6, 0), seg(0xB000, 24, 6)]);
    assert_eq!(
        a.deliver(&reply).unwrap_err().reason,
        DropReason::Unexpected
    );

    let kinds: Vec<_> = core::iter::from_fn(|| a.eq_get(qa).unwrap())
        .map(|ev| ev.kind)
        .collect();
    assert_eq!(kinds, [EventKind::Send, EventKind::Ack, EventKind::Reply]);
    let kinds: Vec<_> = core::iter::from_fn(|| b.eq_get(qb).unwrap())
        .map(|ev| ev.kind)
        .collect();
    assert_eq!(kinds, [EventKind::Put, EventKind::Get]);

    // Initiator argument checks.
    let mut bad = PutArgs {
        md: src,
        local_offset: 100,
        length: 9,
        target: OTHER,
        portal: 4,
        match_bits: 0,
        remote_offset: 0,
        ack: false,
        hdr_data: 0,
    };
    assert!(matches!(
        a.prepare_put(&bad),
        Err(Error::OutOfBounds { .. })
    ));
    bad.local_offset = 0;
    bad.target = ProcessId::new(ANY, 0);
    assert!(matches!(a.prepare_put(&bad), Err(Error::Invalid(_))));
    a.md_release(src).unwrap();
    bad.target = OTHER;
    assert_eq!(
        a.prepare_put(&bad),
        Err(Error::StaleHandle("memory descriptor"))
    );
}

// ------------------------------------------------------------ section 7.7

#[test]
fn section_7_7_protocol_preposted_unexpected_and_header_only() {
    let mut recv = engine(); // ME
    let mut sender = Engine::new(Config::small(PEER)).unwrap();
    let eq = open(&mut recv, 2);
    let unexpected = md(
        &mut recv,
        MdKind::Dynamic {
            region: Region::new(0x10_000, 512),
            save: Save::Both,
            max_messages: 8,
        },
        MdOptions::PUT,
    );
    let headers = md(
        &mut recv,
        MdKind::Dynamic {
            region: Region::new(0x20_000, 4096),
            save: Save::Header,
            max_messages: 32,
        },
        MdOptions::PUT,
    );
    let catch_all = recv.me_append(2, MatchSpec::any(), unexpected).unwrap();
    recv.me_append(2, MatchSpec::any(), headers).unwrap();

    // Sender side: its message buffer, readable by gets (for re-requests).
    let sq = sender.eq_alloc(16).unwrap();
    sender.portal_set_acl(3, Acl::job(1)).unwrap();
    sender.portal_enable(3).unwrap();
    let sbuf = sender
        .md_create(&MdSpec {
            kind: single(0x9000, 4096, OffsetMode::Sender),
            options: MdOptions::PUT_GET,
            eq: Some(sq),
        })
        .unwrap();
    sender.portal_attach_md(3, sbuf).unwrap();
    let send = |s: &mut Engine<BoxStore>, tag: u64, len: u64| {
        s.prepare_put(&PutArgs {
            md: sbuf,
            local_offset: tag * 200,
            length: len,
            target: ME,
            portal: 2,
            match_bits: tag,
            remote_offset: 0,
            ack: false,
            hdr_data: tag * 200, // where the body lives at the sender
        })
        .unwrap()
        .header
    };

    // 1. A preposted receive: matched, deposited straight into user memory.
    let user = md(
        &mut recv,
        single(0x1000, 150, OffsetMode::Receiver),
        MdOptions::PUT,
    );
    recv.me_insert(
        catch_all,
        Position::Before,
        MatchSpec::new(1).from(1, 1).use_once(),
        user,
    )
    .unwrap();
    let p = recv.deliver(&send(&mut sender, 1, 150)).unwrap();
    assert_eq!((p.md, p.body.first()), (user, Region::new(0x1000, 150)));

    // 2. Unexpected messages pile up in the first heap, header + body...
    for tag in [2u64, 3] {
        let p = recv.deliver(&send(&mut sender, tag, 150)).unwrap();
        assert_eq!(p.md, unexpected);
        assert!(p.header_at.is_some() && p.mlength == 150);
    }
    // 3. ...until it is full (2 x 232 used, 48 left): then only the header
    // is saved, in the second heap.
    let p = recv.deliver(&send(&mut sender, 4, 150)).unwrap();
    assert_eq!((p.md, p.mlength, p.rlength), (headers, 0, 150));
    let header_addr = p.header_at.unwrap();
    assert_eq!(header_addr, 0x20_000);

    // 4. The application posts a receive for tag 4: it searches the
    // unexpected events first (user level), finds a header-only one...
    let evs: Vec<_> = core::iter::from_fn(|| recv.eq_get(eq).unwrap()).collect();
    let saved = evs.iter().find(|ev| ev.match_bits == 4).unwrap();
    assert!(saved.header_saved && saved.mlength == 0 && saved.md == headers);
    // ...and asks the sender for the body again with a get.
    let dest = recv
        .md_create(&MdSpec {
            kind: single(0x3000, 150, OffsetMode::Sender),
            options: MdOptions::PUT,
            eq: Some(eq),
        })
        .unwrap();
    let get = recv
        .prepare_get(&GetArgs {
            md: dest,
            local_offset: 0,
            length: saved.rlength,
            target: saved.initiator,
            portal: 3,
            match_bits: 0,
            remote_offset: saved.hdr_data,
            hdr_data: 0,
        })
        .unwrap();
    recv.md_free(headers, saved.offset).unwrap();
    let gp = sender.deliver(&get.header).unwrap();
    assert_eq!(gp.body.first(), Region::new(0x9000 + 800, 150));
    let Response::Reply(reply) = gp.response else {
        panic!("reply expected")
    };
    let rp = recv.deliver(&reply).unwrap();
    assert_eq!((rp.md, rp.body.first()), (dest, Region::new(0x3000, 150)));

    // 5. Freeing the first heap lets full messages in again.
    for ev in evs.iter().filter(|ev| ev.md == unexpected) {
        recv.md_free(unexpected, ev.offset).unwrap();
    }
    assert_eq!(
        recv.deliver(&send(&mut sender, 5, 150)).unwrap().md,
        unexpected
    );
    assert_eq!(recv.counters().total_drops(), 0);
}

#[test]
fn independent_blocks_serve_gets_one_block_each() {
    let mut e = engine();
    open(&mut e, 0);
    let b = blocks3();
    let m = md(
        &mut e,
        MdKind::Independent {
            blocks: &b,
            circular: false,
            save: Save::Both,
        },
        MdOptions::GET.truncating(),
    );
    e.portal_attach_md(0, m).unwrap();
    // Reads start at the block (no header on the read side), the sender's
    // offset is ignored, and a long read is truncated to the block.
    let p = e.deliver(&get(0, 999, 50)).unwrap();
    assert_eq!(
        (p.body.first(), p.header_at, p.md_offset),
        (Region::new(0x1000, 50), None, 0)
    );
    let p = e.deliver(&get(0, 0, 150)).unwrap();
    assert_eq!(
        (p.body.first(), p.truncated),
        (Region::new(0x2000, 100), true)
    );
    let Response::Reply(r) = p.response else {
        panic!("reply expected")
    };
    assert_eq!((r.length, r.rlength, r.truncated()), (100, 150, true));
    assert_eq!(drop_reason(&mut e, &put(0, 0, 1)), DropReason::InvalidMd);
}

#[test]
fn deliver_bytes_counts_undecodable_headers() {
    let mut e = engine();
    open(&mut e, 0);
    let m = sink(&mut e, 0x100, 100);
    e.portal_attach_md(0, m).unwrap();
    let (h, p) = e.deliver_bytes(&put(0, 0, 10).encode()).unwrap();
    assert_eq!((h.length, p.body.first()), (10, Region::new(0x100, 10)));
    let d = e.deliver_bytes(&[1, 2, 3]).unwrap_err();
    assert_eq!(
        (d.reason, d.header),
        (DropReason::BadHeader, Some(HeaderError::Short(3)))
    );
    let mut raw = put(0, 0, 10).encode();
    raw[4] = 200; // portal 200 of 16
    assert_eq!(
        e.deliver_bytes(&raw).unwrap_err().reason,
        DropReason::InvalidPortal
    );
    raw[4] = 0;
    raw[1] = 17; // unknown op
    assert_eq!(
        e.deliver_bytes(&raw).unwrap_err().reason,
        DropReason::BadHeader
    );
    assert_eq!(e.counters().drops(DropReason::BadHeader), 2);
    assert_eq!(e.counters().drops(DropReason::InvalidPortal), 1);
}

// ------------------------------------------------------- plan written in place

/// One engine's deliveries through `deliver`, its twin's through `deliver_into` with one plan
/// reused for every message (so a field left over from the previous message would show): every
/// plan, drop and queued event must be the same.
#[test]
fn deliver_into_a_reused_plan_equals_deliver() {
    fn setup() -> (Engine<BoxStore>, EqHandle, EqHandle, MdHandle) {
        let mut e = engine();
        let eq = open(&mut e, 0);
        open(&mut e, 1);
        let m = md(
            &mut e,
            single(0x1000, 64, OffsetMode::Receiver),
            MdOptions::PUT_GET.truncating(),
        );
        e.me_append(0, MatchSpec::new(1).threshold(2), m).unwrap();
        e.me_append(0, MatchSpec::new(2), m).unwrap();
        let local_eq = e.eq_alloc(16).unwrap();
        let local = e
            .md_create(&MdSpec {
                kind: single(0x9000, 32, OffsetMode::Sender),
                options: MdOptions::PUT_GET,
                eq: Some(local_eq),
            })
            .unwrap();
        e.portal_attach_md(1, local).unwrap();
        (e, eq, local_eq, local)
    }
    let (mut a, qa, la_eq, la) = setup();
    let (mut b, qb, lb_eq, lb) = setup();
    let (mut c, qc, lc_eq, lc) = setup();
    assert_eq!(la, lb);
    assert_eq!(la, lc);
    // Outstanding ack and reply on the local descriptor, so both arrive expected.
    for e in [&mut a, &mut b, &mut c] {
        let target = ProcessId::new(1, 1);
        e.prepare_put(&PutArgs {
            md: la,
            local_offset: 0,
            length: 8,
            target,
            portal: 0,
            match_bits: 0,
            remote_offset: 0,
            ack: true,
            hdr_data: 0,
        })
        .unwrap();
        e.prepare_get(&GetArgs {
            md: la,
            local_offset: 4,
            length: 16,
            target,
            portal: 0,
            match_bits: 0,
            remote_offset: 0,
            hdr_data: 0,
        })
        .unwrap();
    }
    let mut acked = put(0, 1, 40);
    acked.flags = flags::ACK_REQ;
    acked.return_md = 55;
    acked.hdr_data = 3;
    let ack = WireHeader {
        op: Op::Ack,
        return_md: la.to_cookie(),
        length: 8,
        rlength: 8,
        offset: 2,
        ..put(9, 0, 8)
    };
    let reply = WireHeader {
        op: Op::Reply,
        return_md: la.to_cookie(),
        offset: 4,
        length: 16,
        rlength: 16,
        ..put(9, 0, 16)
    };
    let msgs = [
        acked, // ack response, truncated, match entry 1
        WireHeader {
            match_bits: 1,
            ..get(0, 0, 10)
        }, // reply response, unlinks entry 1 (threshold 2)
        put(0, 2, 8), // no response, entry 2
        put(0, 7, 8), // no match: dropped
        ack,   // initiator side: ack
        reply, // initiator side: reply
        put(0, 2, 100), // truncated to what is left
        put(5, 2, 8), // disabled portal: dropped
        WireHeader {
            version: 9,
            ..put(0, 2, 8)
        }, // bad header
    ];
    let mut plan = DeliveryPlan::EMPTY;
    // The third engine's plan never gets an event (no handlers here): all else must match.
    let mut plan_c = DeliveryPlan::EMPTY;
    let mut outcome = Vec::new();
    for (i, h) in msgs.iter().enumerate() {
        let want = a.deliver(h);
        let got = b.deliver_into(h, &mut plan);
        let got_c = c.deliver_into_no_event(h, &mut plan_c);
        assert_eq!(got, got_c, "message {i}");
        match want {
            Ok(p) => {
                assert_eq!(got, Ok(()), "message {i}");
                assert_eq!(plan, p, "message {i}");
                assert_eq!(plan_c.event, Event::EMPTY, "message {i}");
                assert_eq!(
                    plan_c,
                    DeliveryPlan {
                        event: Event::EMPTY,
                        ..p
                    },
                    "message {i}"
                );
                outcome.push((p.op, p.truncated, p.unlinked, p.response != Response::None));
            }
            Err(d) => {
                assert_eq!(got, Err(d), "message {i}");
                outcome.push((h.op, false, false, false));
            }
        }
    }
    // The sequence covers what it claims to.
    assert_eq!(
        outcome,
        [
            (Op::Put, false, false, true),
            (Op::Get, false, true, true),
            (Op::Put, false, false, false),
            (Op::Put, false, false, false),
            (Op::Ack, false, false, false),
            (Op::Reply, false, false, false),
            (Op::Put, true, false, false),
            (Op::Put, false, false, false),
            (Op::Put, false, false, false),
        ]
    );
    assert_eq!(a.counters().total_drops(), 3);
    assert_eq!(a.counters(), b.counters());
    assert_eq!(a.counters(), c.counters());
    for (qa, qb, qc) in [(qa, qb, qc), (la_eq, lb_eq, lc_eq)] {
        let ea: Vec<_> = core::iter::from_fn(|| a.eq_get(qa).ok().flatten()).collect();
        let eb: Vec<_> = core::iter::from_fn(|| b.eq_get(qb).ok().flatten()).collect();
        let ec: Vec<_> = core::iter::from_fn(|| c.eq_get(qc).ok().flatten()).collect();
        assert!(!ea.is_empty());
        assert_eq!(ea, eb);
        assert_eq!(ea, ec);
    }
}

#[test]
fn eq_get_into_takes_the_same_events_as_eq_get_and_leaves_out_alone_when_empty() {
    let mut e = engine();
    open(&mut e, 0);
    let q = e.eq_alloc(2).unwrap();
    e.portal_set_eq(0, Some(q)).unwrap();
    let m = sink(&mut e, 0, 100);
    e.portal_attach_md(0, m).unwrap();
    let mut out = Event {
        hdr_data: 0xdead,
        ..Event::EMPTY
    };
    assert_eq!(e.eq_get_into(q, &mut out), Ok(false));
    assert_eq!(out.hdr_data, 0xdead, "untouched when empty");
    for n in 1..=3 {
        e.deliver(&WireHeader {
            hdr_data: n,
            ..put(0, 0, 1)
        })
        .unwrap();
    }
    assert_eq!(e.eq_get_into(q, &mut out), Err(Error::EventsDropped(1)));
    assert_eq!(e.eq_get_into(q, &mut out), Ok(true));
    assert_eq!((out.kind, out.hdr_data, out.seq), (EventKind::Put, 1, 0));
    let next = e.eq_get(q).unwrap().unwrap();
    assert_eq!((next.hdr_data, next.seq), (2, 1));
    assert_eq!(e.eq_get_into(q, &mut out), Ok(false));
    assert_eq!(out.hdr_data, 1);
    e.eq_free(q).unwrap();
    assert_eq!(
        e.eq_get_into(q, &mut out),
        Err(Error::StaleHandle("event queue"))
    );
}

#[test]
fn eq_take_queued_into_takes_what_eq_get_into_would_and_leaves_the_rest_to_it() {
    // Two engines fed the same deliveries: `a` polled with eq_get_into, `b` with
    // eq_take_queued_into first and eq_get_into only when that declines.
    let mut a = engine();
    let mut b = engine();
    let mut qs = Vec::new();
    for e in [&mut a, &mut b] {
        open(e, 0);
        let q = e.eq_alloc(2).unwrap();
        e.portal_set_eq(0, Some(q)).unwrap();
        let m = sink(e, 0, 100);
        e.portal_attach_md(0, m).unwrap();
        qs.push(q);
    }
    let (qa, qb) = (qs[0], qs[1]);
    let mut n = 0;
    // Each step: `delivers` puts to both, then one poll of each; `fast` says whether b's
    // event came from eq_take_queued_into.
    let mut step =
        |a: &mut Engine<BoxStore>, b: &mut Engine<BoxStore>, delivers: u64, fast: bool| {
            for _ in 0..delivers {
                let h = WireHeader {
                    hdr_data: n,
                    ..put(0, 0, 1)
                };
                n += 1;
                a.deliver(&h).unwrap();
                b.deliver(&h).unwrap();
            }
            let (mut ea, mut eb) = (
                Event::EMPTY,
                Event {
                    hdr_data: 0xdead,
                    ..Event::EMPTY
                },
            );
            let ra = a.eq_get_into(qa, &mut ea);
            let took = b.eq_take_queued_into(qb, &mut eb);
            assert_eq!(took, fast, "{ra:?}");
            let rb = if took {
                Ok(true)
            } else {
                assert_eq!(eb.hdr_data, 0xdead, "declined: out untouched");
                b.eq_get_into(qb, &mut eb)
            };
            assert_eq!(ra, rb);
            if ra == Ok(true) {
                assert_eq!(ea, eb);
            }
            ra
        };
    assert_eq!(step(&mut a, &mut b, 0, false), Ok(false));
    assert_eq!(step(&mut a, &mut b, 1, true), Ok(true));
    assert_eq!(step(&mut a, &mut b, 0, false), Ok(false));
    // Three into two slots: the loss goes to eq_get_into, then both events come the fast way.
    assert_eq!(step(&mut a, &mut b, 3, false), Err(Error::EventsDropped(1)));
    assert_eq!(step(&mut a, &mut b, 0, true), Ok(true));
    assert_eq!(step(&mut a, &mut b, 0, true), Ok(true));
    assert_eq!(step(&mut a, &mut b, 0, false), Ok(false));
    // The queue wraps: two more in, both out.
    assert_eq!(step(&mut a, &mut b, 2, true), Ok(true));
    assert_eq!(step(&mut a, &mut b, 0, true), Ok(true));
    // A freed queue: declined, and eq_get_into reports the stale handle.
    a.eq_free(qa).unwrap();
    b.eq_free(qb).unwrap();
    assert_eq!(
        step(&mut a, &mut b, 0, false),
        Err(Error::StaleHandle("event queue"))
    );
    let mut ev = Event::EMPTY;
    assert!(!b.eq_take_queued_into(EqHandle::NONE, &mut ev));
}
