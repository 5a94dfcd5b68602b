//! A complete, if tiny, fabric: two processes whose "memory" is a byte
//! vector each, one engine per process, and a loop that carries headers
//! between them and performs the copies the engines plan.
//!
//! It runs the protocol of seed 002 section 7.7: a preposted receive, an
//! unexpected message caught by a dynamic descriptor, and a message whose
//! header only is kept once that heap is full; the receiver then fetches
//! the body again with a get.
//!
//! Run: `cargo run -p portals --example fabric`

use portals::*;

const RECV: ProcessId = ProcessId::new(1, 0);
const SEND: ProcessId = ProcessId::new(1, 1);

/// One process: its engine and its memory (addresses are offsets into it).
struct Node {
    engine: Engine<BoxStore>,
    mem: Vec<u8>,
}

/// Write `payload` where `plan` says, including the saved header.
fn deposit(
    node: &mut Node,
    plan: &DeliveryPlan,
    header: &WireHeader,
    payload: &[u8],
) -> Result<(), Error> {
    if let Some(at) = plan.header_at {
        let at = at as usize;
        node.mem[at..at + HEADER_LEN].copy_from_slice(&header.encode());
    }
    for s in node.engine.segments(&plan.body)? {
        let (dst, src) = (s.addr as usize, s.msg_offset as usize);
        node.mem[dst..dst + s.len as usize].copy_from_slice(&payload[src..src + s.len as usize]);
    }
    Ok(())
}

/// Read the bytes a plan (or a send) names.
fn gather(node: &Node, body: &Body) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    for s in node.engine.segments(body)? {
        out.extend_from_slice(&node.mem[s.addr as usize..(s.addr + s.len) as usize]);
    }
    Ok(out)
}

/// Carry one message from `from` to `to`: encode, decode (validating),
/// deliver, copy; then carry any reply back. Returns the receiver's plan.
fn carry(
    from: &mut Node,
    to: &mut Node,
    send: &SendPlan,
) -> Result<Option<DeliveryPlan>, Box<dyn std::error::Error>> {
    let payload = gather(from, &send.body)?;
    let wire = send.header.encode();
    from.engine.sent(send)?;
    let header = to.engine.decode(&wire)?;
    let plan = match to.engine.deliver(&header) {
        Ok(p) => p,
        Err(d) => {
            println!("  dropped: {}", d.reason);
            return Ok(None);
        }
    };
    // Puts write the body; gets read it (and send it back in the reply).
    if plan.op == Op::Put {
        deposit(to, &plan, &header, &payload)?;
    }
    if let Response::Reply(reply) = plan.response {
        let data = gather(to, &plan.body)?;
        let back = from.engine.decode(&reply.encode())?;
        if let Ok(rp) = from.engine.deliver(&back) {
            deposit(from, &rp, &back, &data)?;
        }
    }
    Ok(Some(plan))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut r = Node {
        engine: Engine::new(Config::small(RECV))?,
        mem: vec![0; 0x10000],
    };
    let mut s = Node {
        engine: Engine::new(Config::small(SEND))?,
        mem: vec![0; 0x10000],
    };

    // Receiver: portal 2 with the two catch-all heaps at the end of its list.
    let eq = r.engine.eq_alloc(32)?;
    r.engine.portal_set_eq(2, Some(eq))?;
    r.engine.portal_set_acl(2, Acl::job(1))?;
    r.engine.portal_enable(2)?;
    let heap = |addr, len, save| MdSpec {
        kind: MdKind::Dynamic {
            region: Region::new(addr, len),
            save,
            max_messages: 8,
        },
        options: MdOptions::PUT,
        eq: None,
    };
    let unexpected = r.engine.md_create(&heap(0x4000, 256, Save::Both))?;
    let headers = r.engine.md_create(&heap(0x8000, 1024, Save::Header))?;
    let catch_all = r.engine.me_append(2, MatchSpec::any(), unexpected)?;
    r.engine.me_append(2, MatchSpec::any(), headers)?;
    let user = r.engine.md_create(&MdSpec {
        kind: MdKind::Single {
            region: Region::new(0x1000, 64),
            offset: OffsetMode::Receiver,
        },
        options: MdOptions::PUT,
        eq: None,
    })?;
    r.engine.me_insert(
        catch_all,
        Position::Before,
        MatchSpec::new(1).use_once(),
        user,
    )?;

    // Sender: its outgoing buffer is also readable through portal 3.
    let out = s.engine.md_create(&MdSpec {
        kind: MdKind::Single {
            region: Region::new(0x100, 0x1000),
            offset: OffsetMode::Sender,
        },
        options: MdOptions::PUT_GET,
        eq: None,
    })?;
    s.engine.portal_set_acl(3, Acl::job(1))?;
    s.engine.portal_enable(3)?;
    s.engine.portal_attach_md(3, out)?;

    let messages: [(u64, &[u8]); 4] = [
        (1, b"preposted: lands straight in user memory"),
        (
            2,
            b"unexpected: kept with its header in the first heap, until it fills up....",
        ),
        (
            3,
            b"another unexpected one, the heap is now too full for the whole message",
        ),
        (
            4,
            b"and one more: only its header is kept; the body is fetched again later",
        ),
    ];
    for (tag, text) in messages {
        let at = 0x100 * tag;
        s.mem[(0x100 + at) as usize..(0x100 + at) as usize + text.len()].copy_from_slice(text);
        let send = s.engine.prepare_put(&PutArgs {
            md: out,
            local_offset: at,
            length: text.len() as u64,
            target: RECV,
            portal: 2,
            match_bits: tag,
            remote_offset: 0,
            ack: false,
            hdr_data: at,
        })?;
        if let Some(p) = carry(&mut s, &mut r, &send)? {
            println!(
                "tag {tag}: md {} offset {} mlength {} of {} header saved: {}",
                p.md.index(),
                p.md_offset,
                p.mlength,
                p.rlength,
                p.header_at.is_some()
            );
        }
    }

    // The application posts receives: it looks at the unexpected events
    // first; header-only ones are fetched again with a get.
    let dest = r.engine.md_create(&MdSpec {
        kind: MdKind::Single {
            region: Region::new(0xC000, 0x1000),
            offset: OffsetMode::Sender,
        },
        options: MdOptions::PUT,
        eq: Some(eq),
    })?;
    while let Ok(Some(ev)) = r.engine.eq_get(eq) {
        if ev.kind != EventKind::Put {
            continue;
        }
        if ev.md == user {
            let got = &r.mem[0x1000..0x1000 + ev.mlength as usize];
            println!(
                "received tag {}: {:?}",
                ev.match_bits,
                String::from_utf8_lossy(got)
            );
        } else if ev.md == unexpected {
            let body = (0x4000 + ev.offset) as usize + HEADER_LEN;
            let saved = r.engine.decode(&r.mem[body - HEADER_LEN..body])?;
            let got = &r.mem[body..body + ev.mlength as usize];
            println!(
                "unexpected tag {} (saved header says {} bytes): {:?}",
                saved.match_bits,
                saved.length,
                String::from_utf8_lossy(got)
            );
            r.engine.md_free(unexpected, ev.offset)?;
        } else if ev.md == headers {
            let get = r.engine.prepare_get(&GetArgs {
                md: dest,
                local_offset: 0,
                length: ev.rlength,
                target: ev.initiator,
                portal: 3,
                match_bits: 0,
                remote_offset: ev.hdr_data,
                hdr_data: 0,
            })?;
            r.engine.md_free(headers, ev.offset)?;
            carry(&mut r, &mut s, &get)?;
            let got = &r.mem[0xC000..0xC000 + ev.rlength as usize];
            println!(
                "header-only tag {}, body fetched again: {:?}",
                ev.match_bits,
                String::from_utf8_lossy(got)
            );
        }
    }
    let c = r.engine.counters();
    println!(
        "receiver: {} delivered, {} dropped",
        c.delivered,
        c.total_drops()
    );
    Ok(())
}
