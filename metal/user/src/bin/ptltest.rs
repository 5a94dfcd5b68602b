//! Exercises every portals entry point of the QK and checks the data.
//!
//! `ptltest` (argument 0, one node): the process puts and gets to itself,
//! through the same engine path a remote message takes, with all four
//! descriptor kinds, match bits under an ignore mask, insert/unlink and
//! use-once entries, portal disable and access control (drops counted),
//! acked puts, gets with the reply deposited, a 64 KiB put, and user
//! pointers that name kernel, MMIO or unmapped memory (each must return
//! EFAULT while the program keeps running).
//!
//! `ptltest:1` runs only the bad-pointer checks. `ptltest:2` on two nodes
//! streams 20 x 64 KiB each way at once (both rings fill up).
//!
//! `ptltest` on two nodes (ivshmem): node 1 serves descriptors and counts;
//! node 0 gets from node 1's descriptor (small and fragmented), sends an
//! acked put, a put the access control forbids, a put no entry matches and
//! a 64 KiB put, then DONE; node 1 checks data and drop counters.
#![no_std]
#![no_main]

use metal_ulib::abi::{self, AclDesc, GetSpec, MdDesc, MeDesc, PutSpec};
use metal_ulib::{errname, info, println, ptl};

const ARENA: usize = 512 * 1024;
static mut MEM: [u8; ARENA] = [0; ARENA];
static mut USED: usize = 0;

/// A fresh zeroed buffer from the static arena (never freed).
fn buf(n: usize) -> &'static mut [u8] {
    // SAFETY: single-threaded program; every slice handed out is disjoint
    // (the bump pointer only grows) and the arena lives forever.
    unsafe {
        let at = *core::ptr::addr_of!(USED);
        assert!(at + n <= ARENA, "arena exhausted");
        *core::ptr::addr_of_mut!(USED) = (at + n + 15) & !15;
        core::slice::from_raw_parts_mut(core::ptr::addr_of_mut!(MEM).cast::<u8>().add(at), n)
    }
}

fn pattern(seed: u64, i: usize) -> u8 {
    (seed as usize * 31 + i * 7 + (i >> 8) * 3) as u8
}

fn fill(b: &mut [u8], seed: u64) {
    for (i, x) in b.iter_mut().enumerate() {
        *x = pattern(seed, i);
    }
}

type R<T> = Result<T, &'static str>;

fn ok<T>(what: &'static str, r: Result<T, i64>) -> R<T> {
    r.map_err(|e| {
        println!("ptltest: {what} failed: {}", errname(e));
        what
    })
}

fn check(cond: bool, what: &'static str) -> R<()> {
    if cond {
        Ok(())
    } else {
        println!("ptltest: check failed: {what}");
        Err(what)
    }
}

fn single(b: &[u8], opts: u64) -> MdDesc {
    MdDesc {
        kind: abi::MD_SINGLE,
        options: opts,
        buf: b.as_ptr() as u64,
        len: b.len() as u64,
        ..Default::default()
    }
}

fn me_desc(md: u64, bits: u64) -> MeDesc {
    MeDesc {
        md,
        match_bits: bits,
        ignore_bits: 0,
        source_node: u64::MAX,
        source_pid: u64::MAX,
        threshold: 0,
    }
}

struct Peer {
    node: u64,
    pid: u64,
}

impl Peer {
    fn put(&self, portal: u64, bits: u64, data: &[u8], remote_offset: u64) -> Result<u64, i64> {
        ptl::put(&PutSpec {
            node: self.node,
            pid: self.pid,
            portal,
            match_bits: bits,
            buf: data.as_ptr() as u64,
            len: data.len() as u64,
            hdr_data: bits,
            remote_offset,
            ..Default::default()
        })
    }
    fn put_md(&self, portal: u64, bits: u64, md: u64, len: u64, ack: bool) -> Result<u64, i64> {
        ptl::put(&PutSpec {
            node: self.node,
            pid: self.pid,
            portal,
            match_bits: bits,
            len,
            md,
            flags: abi::PUT_FROM_MD | if ack { abi::PUT_ACK } else { 0 },
            ..Default::default()
        })
    }
    fn get(&self, portal: u64, bits: u64, md: u64, len: u64, remote_offset: u64) -> R<u64> {
        ok(
            "get",
            ptl::get(&GetSpec {
                node: self.node,
                pid: self.pid,
                portal,
                match_bits: bits,
                md,
                len,
                remote_offset,
                ..Default::default()
            }),
        )
    }
}

/// Waits for the next event of `kind`; other events are skipped (and shown).
fn wait_kind(kind: u64) -> R<abi::Event> {
    loop {
        let ev = ok("eq_wait", ptl::eq_wait())?;
        if ev.kind == kind {
            return Ok(ev);
        }
        println!(
            "ptltest: (skipping event kind {} bits {:#x} while waiting for kind {kind})",
            ev.kind, ev.match_bits
        );
    }
}

fn drops(reason: usize) -> R<u64> {
    Ok(ok("counters", ptl::counters())?.drops[reason])
}

fn local() -> R<()> {
    let (pid, node, _) = info();
    let me = Peer { node, pid };

    // Nothing queued yet: polling returns at once.
    check(
        ok("eq_poll", ptl::eq_poll())?.is_none(),
        "empty queue polls empty",
    )?;

    // 1. Single descriptor, sender-managed offset.
    let a = buf(256);
    let md = ok("md_create single", ptl::md_create(&single(a, abi::MDO_PUT)))?;
    ok("me_append", ptl::me_append(0, &me_desc(md, 0x10)))?;
    let data = buf(100);
    fill(data, 1);
    ok("put", me.put(0, 0x10, data, 50))?;
    let ev = wait_kind(abi::EV_PUT)?;
    check(
        ev.offset == 50 && ev.len == 100 && ev.md == md,
        "single/sender event",
    )?;
    check(
        a[50..150] == data[..] && a[..50].iter().all(|&x| x == 0),
        "single/sender data",
    )?;
    println!("ptltest: single descriptor, sender-managed offset: ok");

    // 2. Single descriptor, receiver-managed offset: messages land back to back.
    let b = buf(256);
    let md = ok(
        "md_create",
        ptl::md_create(&single(b, abi::MDO_PUT | abi::MDO_RECEIVER_OFFSET)),
    )?;
    ok("me_append", ptl::me_append(0, &me_desc(md, 0x20)))?;
    let d1 = buf(60);
    fill(d1, 2);
    let d2 = buf(70);
    fill(d2, 3);
    ok("put", me.put(0, 0x20, d1, 999))?;
    ok("put", me.put(0, 0x20, d2, 999))?;
    let e1 = wait_kind(abi::EV_PUT)?;
    let e2 = wait_kind(abi::EV_PUT)?;
    check(e1.offset == 0 && e2.offset == 60, "receiver offsets")?;
    check(b[..60] == d1[..] && b[60..130] == d2[..], "receiver data")?;
    println!("ptltest: single descriptor, receiver-managed offset: ok");

    // 3. Independent blocks: one message per block, body only.
    let blocks = [buf(128), buf(128), buf(128)];
    let pairs: [[u64; 2]; 3] = core::array::from_fn(|i| [blocks[i].as_ptr() as u64, 128]);
    let md = ok(
        "md_create independent",
        ptl::md_create(&MdDesc {
            kind: abi::MD_INDEPENDENT,
            options: abi::MDO_PUT,
            blocks: pairs.as_ptr() as u64,
            nblocks: 3,
            save: abi::SAVE_BODY,
            ..Default::default()
        }),
    )?;
    ok("me_append", ptl::me_append(0, &me_desc(md, 0x30)))?;
    let mut msgs = [buf(100), buf(50), buf(120)];
    for (i, m) in msgs.iter_mut().enumerate() {
        fill(m, 10 + i as u64);
    }
    for m in msgs.iter() {
        ok("put", me.put(0, 0x30, m, 0))?;
        wait_kind(abi::EV_PUT)?;
    }
    for i in 0..3 {
        check(
            blocks[i][..msgs[i].len()] == msgs[i][..],
            "independent block data",
        )?;
    }
    // A fourth message finds every block used (descriptor exhausted):
    // discarded and counted.
    let before = drops(abi::DROP_INVALID_MD)?;
    ok("put", me.put(0, 0x30, msgs[1], 0))?;
    let ev = wait_kind(abi::EV_DISCARD)?;
    check(
        ev.reason == abi::DROP_INVALID_MD as u64 && drops(abi::DROP_INVALID_MD)? == before + 1,
        "full independent descriptor discards",
    )?;
    println!("ptltest: independent blocks (one message per block, full -> discarded): ok");

    // 4. Combined blocks: one buffer over three separate pieces.
    let parts = [buf(40), buf(100), buf(60)];
    let pairs: [[u64; 2]; 3] =
        core::array::from_fn(|i| [parts[i].as_ptr() as u64, parts[i].len() as u64]);
    let md = ok(
        "md_create combined",
        ptl::md_create(&MdDesc {
            kind: abi::MD_COMBINED,
            options: abi::MDO_PUT,
            blocks: pairs.as_ptr() as u64,
            nblocks: 3,
            ..Default::default()
        }),
    )?;
    ok("me_append", ptl::me_append(0, &me_desc(md, 0x40)))?;
    let m = buf(150);
    fill(m, 20);
    ok("put", me.put(0, 0x40, m, 20))?;
    let ev = wait_kind(abi::EV_PUT)?;
    let mut whole = [0u8; 200];
    whole[..40].copy_from_slice(parts[0]);
    whole[40..140].copy_from_slice(parts[1]);
    whole[140..].copy_from_slice(parts[2]);
    check(ev.len == 150 && whole[20..170] == m[..], "combined scatter")?;
    check(
        whole[..20].iter().chain(&whole[170..]).all(|&x| x == 0),
        "combined bounds",
    )?;
    println!("ptltest: combined blocks (150 bytes scattered over 3 pieces): ok");

    // 5. Dynamic heap: header + body per message; free returns the space.
    let heap = buf(512);
    let md = ok(
        "md_create dynamic",
        ptl::md_create(&MdDesc {
            kind: abi::MD_DYNAMIC,
            options: abi::MDO_PUT,
            buf: heap.as_ptr() as u64,
            len: heap.len() as u64,
            save: abi::SAVE_BOTH,
            max_messages: 4,
            ..Default::default()
        }),
    )?;
    ok("me_append", ptl::me_append(0, &me_desc(md, 0x50)))?;
    let m = buf(150);
    fill(m, 30);
    let before = drops(abi::DROP_TOO_LONG)?;
    let mut offs = [0u64; 2];
    for o in offs.iter_mut() {
        ok("put", me.put(0, 0x50, m, 0))?;
        let ev = wait_kind(abi::EV_PUT)?;
        *o = ev.offset;
        let at = ev.offset as usize;
        let h = abi::HEADER_LEN as usize;
        check(heap[at + h..at + h + 150] == m[..], "dynamic body")?;
        check(
            heap[at..at + h].iter().any(|&x| x != 0),
            "dynamic header saved",
        )?;
    }
    // A third 230-byte message does not fit in the 512-byte heap.
    ok("put", me.put(0, 0x50, m, 0))?;
    let ev = wait_kind(abi::EV_DISCARD)?;
    check(
        ev.reason == abi::DROP_TOO_LONG as u64 && drops(abi::DROP_TOO_LONG)? == before + 1,
        "full heap discards",
    )?;
    ok("md_free", ptl::md_free(md, offs[0]))?;
    check(ptl::md_free(md, offs[0]).is_err(), "double free refused")?;
    ok("put", me.put(0, 0x50, m, 0))?;
    let ev = wait_kind(abi::EV_PUT)?;
    check(ev.offset == offs[0], "freed space reused")?;
    println!("ptltest: dynamic heap (header+body saved, full -> discarded, free reuses space): ok");

    // 6. Match bits under an ignore mask; a miss is dropped and counted.
    let c = buf(64);
    let md = ok("md_create", ptl::md_create(&single(c, abi::MDO_PUT)))?;
    let mut d = me_desc(md, 0x6000);
    d.ignore_bits = 0xff;
    ok("me_append", ptl::me_append(1, &d))?;
    let m = buf(32);
    fill(m, 40);
    ok("put", me.put(1, 0x6042, m, 0))?;
    let ev = wait_kind(abi::EV_PUT)?;
    check(
        ev.match_bits == 0x6042 && c[..32] == m[..],
        "ignore mask match",
    )?;
    let before = drops(abi::DROP_NO_MATCH)?;
    ok("put", me.put(1, 0x7042, m, 0))?;
    let ev = wait_kind(abi::EV_DISCARD)?;
    check(
        ev.reason == abi::DROP_NO_MATCH as u64,
        "no-match discard event",
    )?;
    check(drops(abi::DROP_NO_MATCH)? == before + 1, "no-match counted")?;
    println!(
        "ptltest: match bits 0x6000 ignoring 0xff: 0x6042 matched, 0x7042 dropped and counted: ok"
    );

    // 7. Insert before, use-once threshold, unlink.
    let (x, y, z) = (buf(16), buf(16), buf(16));
    let mx = ok("md_create", ptl::md_create(&single(x, abi::MDO_PUT)))?;
    let my = ok("md_create", ptl::md_create(&single(y, abi::MDO_PUT)))?;
    let mz = ok("md_create", ptl::md_create(&single(z, abi::MDO_PUT)))?;
    let ex = ok("me_append", ptl::me_append(2, &me_desc(mx, 7)))?;
    let ey = ok("me_insert", ptl::me_insert(ex, true, &me_desc(my, 7)))?;
    let mut once = me_desc(mz, 7);
    once.threshold = 1;
    ok("me_insert", ptl::me_insert(ey, true, &once))?;
    let mut landed = [0u64; 3];
    for l in landed.iter_mut() {
        ok("put", me.put(2, 7, b"sixteen bytes!!!", 0))?;
        *l = wait_kind(abi::EV_PUT)?.md;
        if *l == my {
            ok("me_unlink", ptl::me_unlink(ey))?;
        }
    }
    check(landed == [mz, my, mx], "list order, use-once, unlink")?;
    check(&x[..] == b"sixteen bytes!!!", "data after unlink")?;
    check(ptl::me_unlink(ey).is_err(), "stale entry refused")?;
    println!("ptltest: insert before + use-once + unlink: messages went z, y, x: ok");

    // Second link: a message too long for S goes to the next entry (T) by
    // default, to U once S's second link names U, nowhere once it says end.
    let (s8, t8, u8_) = (buf(8), buf(64), buf(64));
    let ms = ok("md_create", ptl::md_create(&single(s8, abi::MDO_PUT)))?;
    let mt = ok("md_create", ptl::md_create(&single(t8, abi::MDO_PUT)))?;
    let mu = ok("md_create", ptl::md_create(&single(u8_, abi::MDO_PUT)))?;
    let es = ok("me_append", ptl::me_append(2, &me_desc(ms, 0x99)))?;
    ok("me_append", ptl::me_append(2, &me_desc(mt, 0x99)))?;
    let eu = ok("me_append", ptl::me_append(2, &me_desc(mu, 0x99)))?;
    let m = buf(20);
    fill(m, 45);
    ok("put", me.put(2, 0x99, m, 0))?;
    check(wait_kind(abi::EV_PUT)?.md == mt, "too long: next entry")?;
    let links = |too_long| abi::MeLinks {
        too_long,
        invalid: abi::LINK_NEXT,
    };
    ok("me_set_links", ptl::me_set_links(es, &links(eu)))?;
    ok("put", me.put(2, 0x99, m, 0))?;
    check(
        wait_kind(abi::EV_PUT)?.md == mu && u8_[..20] == m[..],
        "too long: linked entry",
    )?;
    ok("me_set_links", ptl::me_set_links(es, &links(abi::LINK_END)))?;
    let before = drops(abi::DROP_TOO_LONG)?;
    ok("put", me.put(2, 0x99, m, 0))?;
    check(
        wait_kind(abi::EV_DISCARD)?.reason == abi::DROP_TOO_LONG as u64
            && drops(abi::DROP_TOO_LONG)? == before + 1,
        "too long: end of search",
    )?;
    check(s8.iter().all(|&x| x == 0), "short descriptor untouched")?;
    println!("ptltest: second link: too-long message went to next, then the linked entry, then nowhere: ok");

    // 8. Portal disable / enable.
    let w = buf(16);
    let mw = ok("md_create", ptl::md_create(&single(w, abi::MDO_PUT)))?;
    ok("me_append", ptl::me_append(3, &me_desc(mw, 9)))?;
    ok("disable", ptl::portal_enable(3, false))?;
    let before = drops(abi::DROP_DISABLED)?;
    ok("put", me.put(3, 9, b"xx", 0))?;
    check(
        drops(abi::DROP_DISABLED)? == before + 1,
        "disabled portal drops",
    )?;
    ok("enable", ptl::portal_enable(3, true))?;
    ok("put", me.put(3, 9, b"ok", 0))?;
    wait_kind(abi::EV_PUT)?;
    check(&w[..2] == b"ok", "enabled portal delivers")?;

    // 9. Access control: only (node, pid 9) may put; we are refused.
    let acl = |pid: u64| AclDesc {
        job: 1,
        node,
        pid,
        put: 1,
        get: 1,
    };
    ok("acl", ptl::portal_acl(3, &acl(9)))?;
    let before = drops(abi::DROP_FORBIDDEN)?;
    ok("put", me.put(3, 9, b"no", 0))?;
    check(
        drops(abi::DROP_FORBIDDEN)? == before + 1,
        "forbidden counted",
    )?;
    check(&w[..2] == b"ok", "forbidden put left no bytes")?;
    ok("acl", ptl::portal_acl(3, &acl(pid)))?;
    ok("put", me.put(3, 9, b"in", 0))?;
    wait_kind(abi::EV_PUT)?;
    check(&w[..2] == b"in", "admitted after acl change")?;
    println!("ptltest: portal disable/enable and access control (drops counted): ok");

    // 10. Put with ack request: the target's put event and our ack event.
    let src = buf(64);
    fill(src, 50);
    let ms = ok("md_create", ptl::md_create(&single(src, abi::MDO_PUT)))?;
    let t = buf(64);
    let mt = ok(
        "md_create",
        ptl::md_create(&single(t, abi::MDO_PUT | abi::MDO_ACK)),
    )?;
    ok("me_append", ptl::me_append(0, &me_desc(mt, 0xa0)))?;
    ok("put+ack", me.put_md(0, 0xa0, ms, 64, true))?;
    let p = wait_kind(abi::EV_PUT)?;
    let a = wait_kind(abi::EV_ACK)?;
    check(p.md == mt && a.md == ms && a.len == 64, "ack event")?;
    check(t[..] == src[..], "acked put data")?;
    println!("ptltest: put with ack: ok");

    // 11. Get: the reply lands in our descriptor.
    let remote = buf(300);
    fill(remote, 60);
    let mr = ok("md_create", ptl::md_create(&single(remote, abi::MDO_GET)))?;
    ok("me_append", ptl::me_append(0, &me_desc(mr, 0xb0)))?;
    let into = buf(256);
    let mi = ok("md_create", ptl::md_create(&single(into, abi::MDO_PUT)))?;
    me.get(0, 0xb0, mi, 200, 10)?;
    let g = wait_kind(abi::EV_GET)?;
    let r = wait_kind(abi::EV_REPLY)?;
    check(g.md == mr && r.md == mi && r.len == 200, "get/reply events")?;
    check(into[..200] == remote[10..210], "reply data")?;
    println!("ptltest: get with the reply deposited: ok");

    // Truncation: a 40-byte put into a 16-byte truncating descriptor keeps 16.
    let tb = buf(32);
    let mtr = ok(
        "md_create",
        ptl::md_create(&single(&tb[..16], abi::MDO_PUT | abi::MDO_TRUNCATE)),
    )?;
    ok("me_append", ptl::me_append(0, &me_desc(mtr, 0xb8)))?;
    let m = buf(40);
    fill(m, 65);
    ok("put", me.put(0, 0xb8, m, 0))?;
    let ev = wait_kind(abi::EV_PUT)?;
    check(
        ev.truncated == 1 && ev.len == 16 && ev.rlength == 40,
        "truncated event",
    )?;
    check(
        tb[..16] == m[..16] && tb[16..].iter().all(|&x| x == 0),
        "truncated data",
    )?;
    // Releasing the descriptor: the next message finds no valid one.
    ok("md_release", ptl::md_release(mtr))?;
    check(ptl::md_release(mtr) == Err(abi::ENOENT), "stale md refused")?;
    let before = drops(abi::DROP_INVALID_MD)?;
    ok("put", me.put(0, 0xb8, m, 0))?;
    check(
        wait_kind(abi::EV_DISCARD)?.reason == abi::DROP_INVALID_MD as u64
            && drops(abi::DROP_INVALID_MD)? == before + 1,
        "released md drops",
    )?;
    println!("ptltest: truncating descriptor kept 16 of 40 bytes; released descriptor drops: ok");

    // 12. 64 KiB put.
    let big_src = buf(65536);
    fill(big_src, 70);
    let big = buf(65536);
    let mb = ok("md_create", ptl::md_create(&single(big, abi::MDO_PUT)))?;
    ok("me_append", ptl::me_append(0, &me_desc(mb, 0xc0)))?;
    ok("put 64K", me.put(0, 0xc0, big_src, 0))?;
    let ev = wait_kind(abi::EV_PUT)?;
    check(ev.len == 65536 && big[..] == big_src[..], "64 KiB data")?;
    println!("ptltest: 64 KiB put: ok");

    // 13. A message over the largest size is refused.
    let huge = ptl::put(&PutSpec {
        node,
        pid,
        buf: big_src.as_ptr() as u64,
        len: abi::MAX_MESSAGE + 1,
        ..Default::default()
    });
    check(huge == Err(abi::EINVAL), "oversized put refused")?;
    bad_pointers()?;

    let c = ok("counters", ptl::counters())?;
    println!(
        "ptltest: counters: delivered {} bytes {} drops: disabled {} forbidden {} no_match {} too_long {}",
        c.delivered,
        c.bytes,
        c.drops[abi::DROP_DISABLED],
        c.drops[abi::DROP_FORBIDDEN],
        c.drops[abi::DROP_NO_MATCH],
        c.drops[abi::DROP_TOO_LONG]
    );
    Ok(())
}

/// User pointers naming kernel, MMIO, unmapped or non-canonical memory, or
/// ranges that run off the user region: every entry point returns EFAULT.
fn bad_pointers() -> R<()> {
    let (pid, node, _) = info();
    // 13. Bad user pointers: kernel, MMIO, unmapped, non-canonical, overflowing.
    let bad = [
        0x10_0000u64,
        0xC000_0000,
        0x7000_0000,
        0xffff_8000_0000_0000,
        abi::USER_END - 8,
    ];
    let mut refused = 0;
    for &p in &bad {
        let d = MdDesc {
            buf: p,
            len: 64,
            ..single(&[], abi::MDO_PUT)
        };
        let results = [
            ptl::md_create(&d),
            ptl::put(&PutSpec {
                node,
                pid,
                buf: p,
                len: 64,
                ..Default::default()
            }),
            res(metal_ulib::syscall(abi::PTL_PUT, p, 0, 0, 0)),
            res(metal_ulib::syscall(abi::PTL_EQ_WAIT, p, 0, 0, 0)),
            res(metal_ulib::syscall(abi::PTL_COUNTERS, p, 0, 0, 0)),
            res(metal_ulib::syscall(abi::PTL_GET, p, 0, 0, 0)),
            res(metal_ulib::syscall(abi::PTL_MD, abi::MD_CREATE, p, 0, 0)),
            res(metal_ulib::syscall(abi::PTL_ME, abi::ME_APPEND, 0, p, 0)),
            res(metal_ulib::syscall(
                abi::PTL_PORTAL,
                abi::PORTAL_ACL,
                0,
                p,
                0,
            )),
            ptl::md_create(&MdDesc {
                kind: abi::MD_COMBINED,
                options: abi::MDO_PUT,
                blocks: p,
                nblocks: 1,
                ..Default::default()
            }),
            ptl::md_create(&MdDesc {
                kind: abi::MD_INDEPENDENT,
                options: abi::MDO_PUT,
                blocks: [[p, 64u64]].as_ptr() as u64,
                nblocks: 1,
                ..Default::default()
            }),
        ];
        for (i, r) in results.iter().enumerate() {
            if *r != Err(abi::EFAULT) {
                println!("ptltest: pointer {p:#x}, call {i}: expected EFAULT, got {r:?}");
                return Err("bad pointer accepted");
            }
            refused += 1;
        }
    }
    // Huge lengths that wrap around.
    let wrap = ptl::md_create(&MdDesc {
        buf: abi::USER_BASE,
        len: u64::MAX,
        ..single(&[], abi::MDO_PUT)
    });
    check(wrap == Err(abi::EFAULT), "wrapping length refused")?;
    println!(
        "ptltest: {} calls with kernel/MMIO/unmapped/non-canonical pointers returned EFAULT; still running",
        refused + 1
    );

    Ok(())
}

fn res(r: i64) -> Result<u64, i64> {
    if r < 0 {
        Err(r)
    } else {
        Ok(r as u64)
    }
}

const READY: u64 = 0x300;
const GETME: u64 = 0x310;
const ACKME: u64 = 0x320;
const BIG: u64 = 0x330;
const DONE: u64 = 0x340;
const GET_LEN: usize = 32768;
const BIG_LEN: usize = 65536;

fn node0(pid: u64) -> R<()> {
    let peer = Peer { node: 1, pid };
    let ready = buf(16);
    let md = ok(
        "md_create",
        ptl::md_create(&single(ready, abi::MDO_PUT | abi::MDO_ACK)),
    )?;
    ok("me_append", ptl::me_append(0, &me_desc(md, READY)))?;
    let ev = wait_kind(abi::EV_PUT)?;
    check(
        ev.match_bits == READY && ev.src_node == 1,
        "ready from node 1",
    )?;
    println!("ptltest: node 0: node 1 is ready");

    // Gets from node 1's descriptor: one small, one fragmented over 9 slots.
    let into = buf(GET_LEN);
    let mi = ok("md_create", ptl::md_create(&single(into, abi::MDO_PUT)))?;
    for (len, off) in [(3000usize, 100u64), (GET_LEN - 200, 200)] {
        peer.get(0, GETME, mi, len as u64, off)?;
        let r = wait_kind(abi::EV_REPLY)?;
        check(
            r.len == len as u64 && r.src_node == 1,
            "reply event from node 1",
        )?;
        let bad = (0..len).find(|&i| into[i] != pattern(80, i + off as usize));
        if let Some(i) = bad {
            println!("ptltest: node 0: get of {len} bytes: byte {i} is wrong");
            return Err("get data");
        }
        println!(
            "ptltest: node 0: get of {len} bytes from node 1 at offset {off}, every byte checked"
        );
    }

    // Acked put.
    let src = buf(500);
    fill(src, 90);
    let ms = ok("md_create", ptl::md_create(&single(src, abi::MDO_PUT)))?;
    ok("put+ack", peer.put_md(0, ACKME, ms, 500, true))?;
    let a = wait_kind(abi::EV_ACK)?;
    check(
        a.md == ms && a.len == 500 && a.src_node == 1,
        "ack from node 1",
    )?;
    println!("ptltest: node 0: ack received for the acked put of 500 bytes");

    // A put node 1's access control forbids, one no entry matches.
    ok("put", peer.put(1, 0x1, b"forbidden", 0))?;
    ok("put", peer.put(2, 0x78, b"unmatched", 0))?;

    // 64 KiB: 17 ring slots.
    let big = buf(BIG_LEN);
    fill(big, 100);
    ok("put 64K", peer.put(0, BIG, big, 0))?;
    ok("put", peer.put(0, DONE, b"done", 0))?;
    println!("ptltest: node 0: sent forbidden, unmatched, 64 KiB and done puts");
    Ok(())
}

fn node1(pid: u64) -> R<()> {
    let peer = Peer { node: 0, pid };
    let src = buf(GET_LEN);
    fill(src, 80);
    let mg = ok("md_create", ptl::md_create(&single(src, abi::MDO_GET)))?;
    ok("me_append", ptl::me_append(0, &me_desc(mg, GETME)))?;
    let acked = buf(500);
    let ma = ok(
        "md_create",
        ptl::md_create(&single(acked, abi::MDO_PUT | abi::MDO_ACK)),
    )?;
    ok("me_append", ptl::me_append(0, &me_desc(ma, ACKME)))?;
    let big = buf(BIG_LEN);
    let mb = ok("md_create", ptl::md_create(&single(big, abi::MDO_PUT)))?;
    ok("me_append", ptl::me_append(0, &me_desc(mb, BIG)))?;
    let done = buf(8);
    let md = ok("md_create", ptl::md_create(&single(done, abi::MDO_PUT)))?;
    ok("me_append", ptl::me_append(0, &me_desc(md, DONE)))?;
    // Portal 1: only ourselves may put. Portal 2: only match bits 0x77.
    let small = buf(32);
    let m1 = ok("md_create", ptl::md_create(&single(small, abi::MDO_PUT)))?;
    ok("me_append", ptl::me_append(1, &me_desc(m1, 0x1)))?;
    ok("me_append", ptl::me_append(2, &me_desc(m1, 0x77)))?;
    ok(
        "acl",
        ptl::portal_acl(
            1,
            &AclDesc {
                job: 1,
                node: 1,
                pid,
                put: 1,
                get: 1,
            },
        ),
    )?;

    let hello = buf(8);
    hello.copy_from_slice(b"ready!!!");
    let mh = ok("md_create", ptl::md_create(&single(hello, abi::MDO_PUT)))?;
    ok("put+ack", peer.put_md(0, READY, mh, 8, true))?;
    let (mut gets, mut big_ok, mut acked_ok, mut discards) = (0, false, false, 0);
    loop {
        let ev = ok("eq_wait", ptl::eq_wait())?;
        match (ev.kind, ev.match_bits) {
            (abi::EV_ACK, READY) => println!("ptltest: node 1: ack received for the ready put"),
            (abi::EV_GET, GETME) => gets += 1,
            (abi::EV_PUT, ACKME) => {
                let exp = (0..500).all(|i| acked[i] == pattern(90, i));
                check(ev.len == 500 && exp, "acked put data")?;
                acked_ok = true;
            }
            (abi::EV_PUT, BIG) => {
                check(ev.len == BIG_LEN as u64, "64 KiB length")?;
                if let Some(i) = (0..BIG_LEN).find(|&i| big[i] != pattern(100, i)) {
                    println!("ptltest: node 1: 64 KiB put: byte {i} is wrong");
                    return Err("64 KiB data");
                }
                println!("ptltest: node 1: 64 KiB put from node 0 landed, every byte checked");
                big_ok = true;
            }
            (abi::EV_DISCARD, _) => discards += 1,
            (abi::EV_PUT, DONE) => break,
            (k, b) => println!("ptltest: node 1: event kind {k} bits {b:#x}"),
        }
    }
    let c = ok("counters", ptl::counters())?;
    println!(
        "ptltest: node 1: gets served {gets}, acked put ok {acked_ok}, discard events {discards}, drops: forbidden {} no_match {}",
        c.drops[abi::DROP_FORBIDDEN],
        c.drops[abi::DROP_NO_MATCH]
    );
    check(gets == 2 && acked_ok && big_ok, "all node 0 traffic seen")?;
    check(
        c.drops[abi::DROP_FORBIDDEN] == 1 && c.drops[abi::DROP_NO_MATCH] == 1 && discards == 1,
        "one forbidden and one unmatched put dropped and counted",
    )?;
    check(small.iter().all(|&x| x == 0), "dropped puts left no bytes")?;
    println!("ptltest: node 1: forbidden and unmatched puts were dropped and counted");
    Ok(())
}

const STREAM: u64 = 0x400;
const STREAM_MSGS: usize = 20;
const STREAM_AT: u64 = 0x6000_0000;

/// Both nodes put `STREAM_MSGS` 64 KiB messages to each other at once. Each
/// ring holds 7 such messages, so both senders find the other's ring full
/// and must drain their own while they wait; every byte is checked after.
fn stream(pid: u64, node: u64) -> R<()> {
    let peer = Peer {
        node: 1 - node,
        pid,
    };
    let total = (STREAM_MSGS * BIG_LEN) as u64;
    ok(
        "mem_map",
        res(metal_ulib::syscall(
            abi::MEM_MAP,
            0,
            STREAM_AT,
            2 * total.next_multiple_of(abi::PAGE),
            0,
        )),
    )?;
    // SAFETY: the memory service just mapped these bytes for this process;
    // nothing else refers to them.
    let (inbox, out) = unsafe {
        (
            core::slice::from_raw_parts_mut(STREAM_AT as *mut u8, total as usize),
            core::slice::from_raw_parts_mut(
                (STREAM_AT + total.next_multiple_of(abi::PAGE)) as *mut u8,
                BIG_LEN,
            ),
        )
    };
    let mi = ok(
        "md_create",
        ptl::md_create(&single(inbox, abi::MDO_PUT | abi::MDO_RECEIVER_OFFSET)),
    )?;
    ok("me_append", ptl::me_append(0, &me_desc(mi, STREAM)))?;
    let t0 = metal_ulib::rdtsc();
    let mut got = 0usize;
    for i in 0..STREAM_MSGS {
        fill(out, node * 100 + i as u64);
        // No polling between puts: this node's ring is drained only by its
        // kernel while a put waits for room in the other node's ring.
        ok("put 64K", peer.put(0, STREAM, out, 0))?;
    }
    while got < STREAM_MSGS {
        got += usize::from(ok("eq_wait", ptl::eq_wait())?.kind == abi::EV_PUT);
    }
    let ticks = metal_ulib::rdtsc() - t0;
    let from = peer.node * 100;
    for i in 0..STREAM_MSGS {
        let m = &inbox[i * BIG_LEN..(i + 1) * BIG_LEN];
        if let Some(j) = (0..BIG_LEN).find(|&j| m[j] != pattern(from + i as u64, j)) {
            println!("ptltest: stream message {i} byte {j} is wrong");
            return Err("stream data");
        }
    }
    let c = ok("counters", ptl::counters())?;
    println!(
        "ptltest: node {node}: sent and received {STREAM_MSGS} x 64 KiB concurrently, every byte checked; {ticks} TSC ticks; sends that waited for ring space {}; fabric lost {}",
        c.fabric_waits, c.fabric_lost
    );
    check(c.fabric_lost == 0, "nothing lost")
}

#[unsafe(no_mangle)]
pub extern "C" fn umain(arg: u64) -> u64 {
    let (pid, node, nodes) = info();
    let r = if arg == 1 {
        bad_pointers()
    } else if arg == 2 && nodes == 2 {
        stream(pid, node)
    } else if nodes < 2 {
        local()
    } else if node == 0 {
        node0(pid)
    } else {
        node1(pid)
    };
    match r {
        Ok(()) => {
            println!("ptltest: all checks passed");
            0
        }
        Err(what) => {
            println!("ptltest: FAILED: {what}");
            1
        }
    }
}
