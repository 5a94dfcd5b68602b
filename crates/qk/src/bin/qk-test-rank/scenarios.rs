//! Portals-level test scenarios, one side each.

use std::time::Duration;

use qk::fabric::{flag, op, Hdr};
use qk::portals::{
    Acl, EqHandle, Event, EventKind, GetArgs, MatchSpec, MdHandle, MdKind, MdOptions, MdSpec,
    OffsetMode, ProcessId, PutArgs, Region, Save,
};
use qk::{Buf, Endpoint, PrivatePath, QkError};

use super::Scenario;

const P_CTRL: u32 = 0;
const P_DATA: u32 = 1;
const P_LOCKED: u32 = 2;
const WAIT: Duration = Duration::from_secs(40);

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn pe<E: std::fmt::Display>(e: E) -> QkError {
    QkError::Portals(e.to_string())
}

/// Control channel: a catch-all portal for barriers and credits.
struct Ctl {
    eq: EqHandle,
    src: MdHandle,
    peer: ProcessId,
}

fn ctl(ep: &mut Endpoint, peer: u32) -> R<Ctl> {
    let job = ep.job();
    let land = ep.alloc_private(64);
    let srcb = ep.alloc_private(8);
    let c = ep.with_engine(|e| -> Result<Ctl, QkError> {
        let eq = e.eq_alloc(4096).map_err(pe)?;
        let md = e
            .md_create(&MdSpec {
                kind: MdKind::Single {
                    region: land.region(),
                    offset: OffsetMode::Sender,
                },
                options: MdOptions::PUT.truncating(),
                eq: Some(eq),
            })
            .map_err(pe)?;
        e.portal_enable(P_CTRL).map_err(pe)?;
        e.portal_set_acl(P_CTRL, Acl::job(job)).map_err(pe)?;
        e.me_append(P_CTRL, MatchSpec::any(), md).map_err(pe)?;
        let src = e
            .md_create(&MdSpec {
                kind: MdKind::Single {
                    region: srcb.region(),
                    offset: OffsetMode::Sender,
                },
                options: MdOptions::PUT,
                eq: None,
            })
            .map_err(pe)?;
        Ok(Ctl {
            eq,
            src,
            peer: ProcessId::new(job, peer),
        })
    })?;
    Ok(c)
}

fn signal(ep: &mut Endpoint, c: &Ctl, bits: u64, data: u64) -> R<()> {
    ep.put(&PutArgs {
        md: c.src,
        local_offset: 0,
        length: 0,
        target: c.peer,
        portal: P_CTRL,
        match_bits: bits,
        remote_offset: 0,
        ack: false,
        hdr_data: data,
    })?;
    Ok(())
}

fn wait_signal(ep: &mut Endpoint, c: &Ctl, bits: u64) -> R<Event> {
    loop {
        let ev = ep.eq_wait(c.eq, WAIT)?;
        if ev.kind == EventKind::Put && ev.match_bits == bits {
            return Ok(ev);
        }
    }
}

fn pattern(bits: u64, n: u64, i: u64) -> u8 {
    (i.wrapping_mul(7) ^ bits.wrapping_mul(13) ^ n.wrapping_mul(3) ^ (i >> 9)) as u8
}

fn fill(ep: &mut Endpoint, b: &Buf, off: u64, bits: u64, n: u64) -> R<()> {
    let v: Vec<u8> = (0..n).map(|i| pattern(bits, n, i)).collect();
    ep.write(b, off, &v)?;
    Ok(())
}

fn check(ep: &mut Endpoint, b: &Buf, off: u64, bits: u64, n: u64, what: &str) -> R<()> {
    let mut v = vec![0u8; n as usize];
    ep.read(b, off, &mut v)?;
    if let Some(i) = (0..n).find(|&i| v[i as usize] != pattern(bits, n, i)) {
        return Err(format!("{what}: byte {i} of {n} wrong").into());
    }
    Ok(())
}

pub fn run(ep: &mut Endpoint, s: Scenario) -> R<String> {
    match s {
        Scenario::KindsTarget { peer, large } => kinds_target(ep, peer, large),
        Scenario::KindsInitiator {
            peer,
            large,
            private_path,
        } => kinds_initiator(ep, peer, large, &private_path),
        Scenario::StressSend {
            peer,
            count,
            max,
            seed,
        } => stress_send(ep, peer, count, max, seed),
        Scenario::StressRecv {
            peer,
            count,
            max,
            seed,
        } => stress_recv(ep, peer, count, max, seed),
        Scenario::Forge { peer } => forge(ep, peer),
        Scenario::ForgeTarget { peer } => forge_target(ep, peer),
        Scenario::IdleTarget { peer, rounds } => idle_target(ep, peer, rounds),
        Scenario::IdleInitiator {
            peer,
            rounds,
            gap_ms,
        } => idle_initiator(ep, peer, rounds, gap_ms),
    }
}

fn idle_target(ep: &mut Endpoint, peer: u32, rounds: u64) -> R<String> {
    let c = ctl(ep, peer)?;
    let mut waits = Vec::new();
    let before = ep.stats().sleeps;
    for k in 0..rounds {
        signal(ep, &c, 2 * k, 0)?;
        let t = std::time::Instant::now();
        wait_signal(ep, &c, 2 * k + 1)?;
        waits.push(t.elapsed().as_millis());
    }
    let sleeps = ep.stats().sleeps - before;
    Ok(format!(
        "idle rounds {rounds} sleeps {sleeps} waits_ms {waits:?}"
    ))
}

fn idle_initiator(ep: &mut Endpoint, peer: u32, rounds: u64, gap_ms: u64) -> R<String> {
    let c = ctl(ep, peer)?;
    for k in 0..rounds {
        wait_signal(ep, &c, 2 * k)?;
        std::thread::sleep(Duration::from_millis(gap_ms));
        signal(ep, &c, 2 * k + 1, 0)?;
    }
    Ok(format!("sent {rounds} signals {gap_ms} ms apart"))
}

const SMALL: u64 = 1000;

fn kinds_target(ep: &mut Endpoint, peer: u32, large: u64) -> R<String> {
    let c = ctl(ep, peer)?;
    let job = ep.job();
    let single = ep.alloc_shared(SMALL + large)?;
    let indep = ep.alloc_private(2 * large);
    let comb = ep.alloc_shared(3000 + large)?;
    let dynb = ep.alloc_shared(4 * large)?;
    let getb = ep.alloc_shared(large)?;
    fill(ep, &getb, 0, 5, large)?;
    // A second get source in two private blocks (no run of the job heap): its reply goes
    // through a heap bounce buffer, on this node and to another.
    let cut = large / 3;
    let gparts = [ep.alloc_private(cut), ep.alloc_private(large - cut)];
    let gbytes: Vec<u8> = (0..large).map(|i| pattern(6, large, i)).collect();
    ep.write(&gparts[0], 0, &gbytes[..cut as usize])?;
    ep.write(&gparts[1], 0, &gbytes[cut as usize..])?;
    let (eq, mds) = ep.with_engine(|e| -> Result<_, QkError> {
        let eq = e.eq_alloc(1024).map_err(pe)?;
        e.portal_enable(P_DATA).map_err(pe)?;
        e.portal_set_acl(P_DATA, Acl::job(job)).map_err(pe)?;
        let blocks = [indep.sub(0, large), indep.sub(large, large)];
        let cblocks = [
            comb.sub(0, 3000),
            comb.sub(3000, large / 2),
            comb.sub(3000 + large / 2, large - large / 2),
        ];
        let specs = [
            MdKind::Single {
                region: single.region(),
                offset: OffsetMode::Receiver,
            },
            MdKind::Independent {
                blocks: &blocks,
                circular: false,
                save: Save::Body,
            },
            MdKind::Combined {
                blocks: &cblocks,
                offset: OffsetMode::Receiver,
            },
            MdKind::Dynamic {
                region: dynb.region(),
                save: Save::Both,
                max_messages: 16,
            },
        ];
        let mut mds = Vec::new();
        for (i, k) in specs.iter().enumerate() {
            let md = e
                .md_create(&MdSpec {
                    kind: *k,
                    options: MdOptions::PUT_GET,
                    eq: Some(eq),
                })
                .map_err(pe)?;
            e.me_append(P_DATA, MatchSpec::new(i as u64 + 1).from(job, peer), md)
                .map_err(pe)?;
            mds.push(md);
        }
        let gmd = e
            .md_create(&MdSpec {
                kind: MdKind::Single {
                    region: getb.region(),
                    offset: OffsetMode::Sender,
                },
                options: MdOptions::GET,
                eq: Some(eq),
            })
            .map_err(pe)?;
        e.me_append(P_DATA, MatchSpec::new(5), gmd).map_err(pe)?;
        let gblocks = [gparts[0].region(), gparts[1].region()];
        let gmd2 = e
            .md_create(&MdSpec {
                kind: MdKind::Combined {
                    blocks: &gblocks,
                    offset: OffsetMode::Sender,
                },
                options: MdOptions::GET,
                eq: Some(eq),
            })
            .map_err(pe)?;
        e.me_append(P_DATA, MatchSpec::new(6), gmd2).map_err(pe)?;
        Ok((eq, mds))
    })?;
    signal(ep, &c, 100, 0)?;
    let mut puts = Vec::new();
    let mut gets = 0;
    while puts.len() < 8 || gets < 3 {
        let ev = ep.eq_wait(eq, WAIT)?;
        match ev.kind {
            EventKind::Put => puts.push(ev),
            EventKind::Get => gets += 1,
            _ => {}
        }
    }
    let mut dyn_seen = 0;
    for ev in &puts {
        let n = ev.mlength;
        let bits = ev.match_bits;
        if n != SMALL && n != large {
            return Err(format!("put with bits {bits} deposited {n} bytes").into());
        }
        match bits {
            1 => check(ep, &single, ev.offset, bits, n, "single")?,
            2 => check(ep, &indep, ev.offset * large, bits, n, "independent")?,
            3 => check(ep, &comb, ev.offset, bits, n, "combined")?,
            4 => {
                // Save::Both: the 80-byte portals header, then the payload.
                check(
                    ep,
                    &dynb,
                    ev.offset + qk::portals::HEADER_LEN as u64,
                    bits,
                    n,
                    "dynamic",
                )?;
                ep.with_engine(|e| e.md_free(mds[3], ev.offset))
                    .map_err(pe)?;
                dyn_seen += 1;
            }
            _ => return Err(format!("unexpected match bits {bits}").into()),
        }
    }
    signal(ep, &c, 101, dyn_seen)?;
    wait_signal(ep, &c, 102)?;
    let st = ep.stats();
    Ok(format!(
        "kinds target ok: 8 puts, 3 gets, large_direct={} large_cma={}",
        st.large_direct, st.large_cma
    ))
}

fn kinds_initiator(ep: &mut Endpoint, peer: u32, large: u64, private_path: &str) -> R<String> {
    let c = ctl(ep, peer)?;
    let job = ep.job();
    let private = private_path != "shared";
    match private_path {
        "cma" => ep.set_private_path(PrivatePath::CrossMemoryAttach),
        "bounce" => ep.set_private_path(PrivatePath::Bounce),
        _ => {}
    }
    let eq = ep.with_engine(|e| e.eq_alloc(1024)).map_err(pe)?;
    let mut srcs = Vec::new();
    for bits in 1..=4u64 {
        for n in [SMALL, large] {
            let b = if private {
                ep.alloc_private(n)
            } else {
                ep.alloc_shared(n)?
            };
            fill(ep, &b, 0, bits, n)?;
            let md = ep
                .with_engine(|e| {
                    e.md_create(&MdSpec {
                        kind: MdKind::Single {
                            region: b.region(),
                            offset: OffsetMode::Sender,
                        },
                        options: MdOptions::PUT,
                        eq: Some(eq),
                    })
                })
                .map_err(pe)?;
            srcs.push((bits, n, md));
        }
    }
    let landb = ep.alloc_shared(SMALL + large)?;
    let land = ep
        .with_engine(|e| {
            e.md_create(&MdSpec {
                kind: MdKind::Single {
                    region: landb.region(),
                    offset: OffsetMode::Sender,
                },
                options: MdOptions::PUT_GET,
                eq: Some(eq),
            })
        })
        .map_err(pe)?;
    let land2b = ep.alloc_shared(large)?;
    let land2 = ep
        .with_engine(|e| {
            e.md_create(&MdSpec {
                kind: MdKind::Single {
                    region: land2b.region(),
                    offset: OffsetMode::Sender,
                },
                options: MdOptions::GET,
                eq: Some(eq),
            })
        })
        .map_err(pe)?;
    wait_signal(ep, &c, 100)?;
    let target = ProcessId::new(job, peer);
    for &(bits, n, md) in &srcs {
        ep.put(&PutArgs {
            md,
            local_offset: 0,
            length: n,
            target,
            portal: P_DATA,
            match_bits: bits,
            remote_offset: 0,
            ack: true,
            hdr_data: bits,
        })?;
    }
    for (off, n) in [(0, SMALL), (SMALL, large)] {
        ep.get(&GetArgs {
            md: land,
            local_offset: off,
            length: n,
            target,
            portal: P_DATA,
            match_bits: 5,
            remote_offset: 0,
            hdr_data: 0,
        })?;
    }
    ep.get(&GetArgs {
        md: land2,
        local_offset: 0,
        length: large,
        target,
        portal: P_DATA,
        match_bits: 6,
        remote_offset: 0,
        hdr_data: 0,
    })?;
    let (mut sends, mut acks, mut replies) = (0, 0, 0);
    while sends < 8 || acks < 8 || replies < 3 {
        let ev = ep.eq_wait(eq, WAIT)?;
        match ev.kind {
            EventKind::Send => sends += 1,
            EventKind::Ack => {
                if ev.mlength != SMALL && ev.mlength != large {
                    return Err(format!("ack reports {} bytes", ev.mlength).into());
                }
                acks += 1
            }
            EventKind::Reply => replies += 1,
            k => return Err(format!("unexpected event {k:?}").into()),
        }
    }
    // The get source is pattern(5, large) from offset 0: both replies hold its first bytes.
    let mut a = vec![0u8; SMALL as usize];
    ep.read(&landb, 0, &mut a)?;
    let mut b = vec![0u8; large as usize];
    ep.read(&landb, SMALL, &mut b)?;
    for (i, x) in a.iter().enumerate() {
        if *x != pattern(5, large, i as u64) {
            return Err(format!("small reply byte {i} wrong").into());
        }
    }
    for (i, x) in b.iter().enumerate() {
        if *x != pattern(5, large, i as u64) {
            return Err(format!("large reply byte {i} wrong").into());
        }
    }
    check(ep, &land2b, 0, 6, large, "large reply from private blocks")?;
    let done = wait_signal(ep, &c, 101)?;
    if done.hdr_data != 2 {
        return Err(format!("target saw {} dynamic deposits, expected 2", done.hdr_data).into());
    }
    signal(ep, &c, 102, 0)?;
    // Keep serving until the bye has left (inline progress).
    for _ in 0..100 {
        ep.progress();
    }
    Ok(format!(
        "kinds initiator ok: 8 sends, 8 acks, 3 replies, large in flight {}",
        ep.large_in_flight()
    ))
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The message size sequence both sides regenerate: 90% up to 1 KiB, 9% up to 64 KiB, 1% up to
/// `max` (sometimes exactly 0 or `max`).
fn size_of(r: &mut Rng, max: u64) -> u64 {
    let p = r.next() % 1000;
    let v = r.next();
    match p {
        0 => 0,
        1 => max,
        2..=900 => v % 1025,
        901..=990 => v % 65537,
        _ => v % (max + 1),
    }
}

fn pool(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    let mut v = vec![0u8; len];
    for c in v.chunks_mut(8) {
        let w = r.next().to_le_bytes();
        c.copy_from_slice(&w[..c.len()]);
    }
    v
}

const BATCH_MSGS: u64 = 1024;

fn batch_bytes(max: u64) -> u64 {
    4 * max
}

fn stress_send(ep: &mut Endpoint, peer: u32, count: u64, max: u64, seed: u64) -> R<String> {
    let c = ctl(ep, peer)?;
    let poolv = pool(seed, (max + 65536) as usize);
    let pb = ep.alloc_shared(poolv.len() as u64)?;
    ep.write(&pb, 0, &poolv)?;
    let md = ep
        .with_engine(|e| {
            e.md_create(&MdSpec {
                kind: MdKind::Single {
                    region: pb.region(),
                    offset: OffsetMode::Sender,
                },
                options: MdOptions::PUT,
                eq: None,
            })
        })
        .map_err(pe)?;
    wait_signal(ep, &c, 100)?;
    let target = ProcessId::new(ep.job(), peer);
    let mut sizes = Rng(seed ^ 0x9e37_79b9);
    let (mut in_batch, mut batch_b, mut batch) = (0u64, 0u64, 0u64);
    let mut total = 0u64;
    for seq in 0..count {
        let n = size_of(&mut sizes, max);
        if in_batch == BATCH_MSGS || batch_b + n > batch_bytes(max) {
            wait_signal(ep, &c, 1000 + batch)?;
            batch += 1;
            in_batch = 0;
            batch_b = 0;
        }
        let off = sizes.next() % (poolv.len() as u64 - n + 1);
        ep.put(&PutArgs {
            md,
            local_offset: off,
            length: n,
            target,
            portal: P_DATA,
            match_bits: 7,
            remote_offset: 0,
            ack: false,
            hdr_data: seq,
        })?;
        in_batch += 1;
        batch_b += n;
        total += n;
    }
    wait_signal(ep, &c, 999)?;
    Ok(format!("stress sent {count} messages, {total} bytes"))
}

fn stress_recv(ep: &mut Endpoint, peer: u32, count: u64, max: u64, seed: u64) -> R<String> {
    let c = ctl(ep, peer)?;
    let poolv = pool(seed, (max + 65536) as usize);
    let heap = ep.alloc_shared(batch_bytes(max) + BATCH_MSGS * 64 + 65536)?;
    let job = ep.job();
    let (eq, md) = ep.with_engine(|e| -> Result<_, QkError> {
        let eq = e.eq_alloc(4 * BATCH_MSGS as u32).map_err(pe)?;
        let md = e
            .md_create(&MdSpec {
                kind: MdKind::Dynamic {
                    region: heap.region(),
                    save: Save::Body,
                    max_messages: BATCH_MSGS as u32 + 8,
                },
                options: MdOptions::PUT,
                eq: Some(eq),
            })
            .map_err(pe)?;
        e.portal_enable(P_DATA).map_err(pe)?;
        e.portal_set_acl(P_DATA, Acl::job(job)).map_err(pe)?;
        e.me_append(P_DATA, MatchSpec::new(7), md).map_err(pe)?;
        Ok((eq, md))
    })?;
    signal(ep, &c, 100, 0)?;
    let mut sizes = Rng(seed ^ 0x9e37_79b9);
    let (mut in_batch, mut batch_b, mut batch) = (0u64, 0u64, 0u64);
    let mut total = 0u64;
    for seq in 0..count {
        let n = size_of(&mut sizes, max);
        if in_batch == BATCH_MSGS || batch_b + n > batch_bytes(max) {
            signal(ep, &c, 1000 + batch, 0)?;
            batch += 1;
            in_batch = 0;
            batch_b = 0;
        }
        let off = sizes.next() % (poolv.len() as u64 - n + 1);
        let ev = match ep.eq_wait(eq, WAIT) {
            Ok(ev) => ev,
            Err(e) => {
                let st = ep.stats();
                let d: Vec<_> = st.drops.iter().filter(|d| d.1 > 0).collect();
                return Err(format!("message {seq}: {e}; drops {d:?}").into());
            }
        };
        if ev.kind != EventKind::Put {
            return Err(format!("message {seq}: unexpected event {:?}", ev.kind).into());
        }
        if ev.hdr_data != seq {
            let st = ep.stats();
            let d: Vec<_> = st.drops.iter().filter(|d| d.1 > 0).collect();
            return Err(format!(
                "message {} ({} bytes) arrived when {seq} ({n} bytes) was expected (reordered or lost); drops {d:?}",
                ev.hdr_data, ev.mlength
            )
            .into());
        }
        if ev.mlength != n {
            return Err(format!("message {seq}: {} bytes arrived, {n} sent", ev.mlength).into());
        }
        let want = &poolv[off as usize..(off + n) as usize];
        let same = ep.with_bytes(&heap, |h| {
            &h[ev.offset as usize..(ev.offset + n) as usize] == want
        })?;
        if !same {
            return Err(format!("message {seq} of {n} bytes corrupted").into());
        }
        ep.with_engine(|e| e.md_free(md, ev.offset)).map_err(pe)?;
        in_batch += 1;
        batch_b += n;
        total += n;
    }
    signal(ep, &c, 999, 0)?;
    for _ in 0..100 {
        ep.progress();
    }
    let st = ep.stats();
    if st.total_drops() != 0 {
        return Err(format!("drops counted: {:?}", st.drops).into());
    }
    Ok(format!(
        "stress received {count} messages, {total} bytes, all verified in order; large_direct={}",
        st.large_direct
    ))
}

fn raw(h: &Hdr, extra: &[u8]) -> Vec<u8> {
    let mut v = h.encode().to_vec();
    v.extend_from_slice(extra);
    v
}

fn forge(ep: &mut Endpoint, peer: u32) -> R<String> {
    let c = ctl(ep, peer)?;
    wait_signal(ep, &c, 100)?;
    let me = ep.rank();
    let good = Hdr {
        op: op::PUT,
        portal: P_DATA as u16,
        src: me,
        match_bits: 9,
        length: 4,
        aux: 0,
        ..Hdr::default()
    };
    let bad = [
        // Claims to come from the target itself.
        raw(&Hdr { src: peer, ..good }, b"evil"),
        // Unknown operation.
        raw(&Hdr { op: 99, ..good }, b"evil"),
        // Undefined flag bits.
        raw(
            &Hdr {
                flags: 0x80,
                ..good
            },
            b"evil",
        ),
        // Eager length larger than the record.
        raw(
            &Hdr {
                length: 1 << 20,
                ..good
            },
            b"evil",
        ),
        // Large reference into the target's own heap part (not the sender's).
        raw(
            &Hdr {
                flags: flag::HEAP,
                length: 4096,
                ..good
            },
            &{
                let mut r = 0u64.to_le_bytes().to_vec();
                r.extend_from_slice(&1u64.to_le_bytes());
                r
            },
        ),
        // Portal outside the table.
        raw(
            &Hdr {
                portal: 60000,
                ..good
            },
            b"evil",
        ),
        // Portal that is not enabled.
        raw(&Hdr { portal: 40, ..good }, b"evil"),
        // Portal whose access control admits only rank 12345.
        raw(
            &Hdr {
                portal: P_LOCKED as u16,
                ..good
            },
            b"evil",
        ),
        // Shorter than a header.
        vec![1, 2, 3],
        // One-line puts (payload in `aux`), which the receiver checks on a path of their own:
        // a length beyond the 8 bytes `aux` holds ...
        raw(
            &Hdr {
                flags: flag::INLINE8,
                length: 9,
                aux: u64::from_le_bytes(*b"evilevil"),
                ..good
            },
            &[],
        ),
        // ... a forged source ...
        raw(
            &Hdr {
                flags: flag::INLINE8,
                src: peer,
                aux: u64::from_le_bytes(*b"evilevil"),
                ..good
            },
            &[],
        ),
        // ... and a portal that is not enabled (the fast delivery declines, the general path
        // drops it).
        raw(
            &Hdr {
                flags: flag::INLINE8,
                portal: 40,
                aux: u64::from_le_bytes(*b"evilevil"),
                ..good
            },
            &[],
        ),
    ];
    for b in &bad {
        ep.send_raw_record(peer, b)?;
    }
    // Then a valid message the target waits for.
    signal(ep, &c, 103, 0)?;
    wait_signal(ep, &c, 104)?;
    Ok("forger done".into())
}

fn forge_target(ep: &mut Endpoint, peer: u32) -> R<String> {
    let c = ctl(ep, peer)?;
    let job = ep.job();
    let b = ep.alloc_shared(1 << 16)?;
    ep.with_engine(|e| -> Result<(), QkError> {
        let md = e
            .md_create(&MdSpec {
                kind: MdKind::Single {
                    region: b.region(),
                    offset: OffsetMode::Receiver,
                },
                options: MdOptions::PUT.truncating(),
                eq: None,
            })
            .map_err(pe)?;
        e.portal_enable(P_DATA).map_err(pe)?;
        e.portal_set_acl(P_DATA, Acl::job(job)).map_err(pe)?;
        e.me_append(P_DATA, MatchSpec::any(), md).map_err(pe)?;
        e.portal_enable(P_LOCKED).map_err(pe)?;
        e.portal_set_acl(
            P_LOCKED,
            Acl {
                group: job,
                rank: 12345,
                put: true,
                get: true,
            },
        )
        .map_err(pe)?;
        e.me_append(P_LOCKED, MatchSpec::any(), md).map_err(pe)?;
        Ok(())
    })?;
    signal(ep, &c, 100, 0)?;
    wait_signal(ep, &c, 103)?;
    let st = ep.stats();
    let mut v = vec![0u8; 4];
    ep.read(&b, 0, &mut v)?;
    signal(ep, &c, 104, 0)?;
    for _ in 0..100 {
        ep.progress();
    }
    let drops: Vec<String> = st
        .drops
        .iter()
        .filter(|d| d.1 > 0)
        .map(|d| format!("{}={}", d.0, d.1))
        .collect();
    Ok(format!(
        "forge target: delivered={} first_bytes={:?} drops {}",
        st.delivered,
        v,
        drops.join(",")
    ))
}

#[allow(dead_code)]
fn unused(_: Region) {}
