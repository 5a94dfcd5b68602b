//! Two-node portals test program, run as pid 2 on node 0 and on node 1.
//!
//! Node 1 attaches match entries (bulk and ping) to portal 0 and tells node 0
//! it is ready. Node 0 then puts a 4000-byte block into node 1's bulk
//! descriptor and plays `rounds` ping-pongs of varying length; node 1
//! answers every ping with the same bytes XOR 0x5a. Both sides check every
//! byte. Node 1 blocks in `ptl_eq_wait` the whole time: its kernel deposits
//! the messages into its memory while it is not running.
#![no_std]
#![no_main]

use metal_ulib::{abi, errname, info, println, rdtsc, syscall};

const READY: u64 = 0x300;
const PING: u64 = 0x100;
const PONG: u64 = 0x200;
const BULK: u64 = 0x400;
const BULK_LEN: usize = 4000;
const MAX: usize = 4000;

static mut BUFS: [[u8; MAX]; 4] = [[0; MAX]; 4];

fn bufs() -> &'static mut [[u8; MAX]; 4] {
    // SAFETY: single-threaded program; only this reference exists at a time.
    unsafe { &mut *core::ptr::addr_of_mut!(BUFS) }
}

fn pattern(round: u64, i: usize) -> u8 {
    (round as usize * 131 + i * 7 + (i >> 8)) as u8
}

fn me(match_bits: u64, buf: &mut [u8]) -> Result<(), i64> {
    let spec = abi::MeSpec {
        match_bits,
        ignore_bits: 0,
        buf: buf.as_mut_ptr() as u64,
        len: buf.len() as u64,
        source_pid: u64::MAX,
        source_node: u64::MAX,
    };
    let r = syscall(abi::PTL_ME_APPEND, 0, &spec as *const _ as u64, 0, 0);
    if r < 0 {
        Err(r)
    } else {
        Ok(())
    }
}

fn put(node: u64, pid: u64, match_bits: u64, data: &[u8], hdr: u64) -> Result<(), i64> {
    let spec = abi::PutSpec {
        node,
        pid,
        portal: 0,
        match_bits,
        buf: data.as_ptr() as u64,
        len: data.len() as u64,
        hdr_data: hdr,
        ..Default::default()
    };
    // The ring may be momentarily full: retry.
    loop {
        let r = syscall(abi::PTL_PUT, &spec as *const _ as u64, 0, 0, 0);
        match r {
            0 => return Ok(()),
            abi::ENOMEM => {
                syscall(abi::YIELD, 0, 0, 0, 0);
            }
            e => return Err(e),
        }
    }
}

fn wait() -> Result<abi::Event, i64> {
    let mut ev = abi::Event::default();
    let r = syscall(abi::PTL_EQ_WAIT, &mut ev as *mut _ as u64, 0, 0, 0);
    if r < 0 {
        Err(r)
    } else {
        Ok(ev)
    }
}

fn len_of(round: u64) -> usize {
    16 + (round as usize * 397) % (MAX - 16)
}

fn node0(pid: u64, rounds: u64) -> Result<(), i64> {
    let [pong, ready, ping, bulk] = bufs();
    me(PONG, pong)?;
    me(READY, &mut ready[..16])?;
    let ev = wait()?;
    if ev.match_bits != READY {
        println!(
            "pingpong: expected READY, got match bits {:#x}",
            ev.match_bits
        );
        return Err(abi::EINVAL);
    }
    println!("pingpong: node 1 is ready");
    for (i, b) in bulk[..BULK_LEN].iter_mut().enumerate() {
        *b = pattern(999, i);
    }
    put(1, pid, BULK, &bulk[..BULK_LEN], 0)?;
    let mut rtts = [0u64; 256];
    let rounds = rounds.min(rtts.len() as u64);
    for round in 0..rounds {
        let n = len_of(round);
        for (i, b) in ping[..n].iter_mut().enumerate() {
            *b = pattern(round, i);
        }
        let t0 = rdtsc();
        put(1, pid, PING, &ping[..n], round)?;
        let ev = wait()?;
        rtts[round as usize] = rdtsc() - t0;
        if ev.match_bits != PONG || ev.hdr_data != round || ev.len != n as u64 || ev.src_node != 1 {
            println!("pingpong: round {round}: unexpected event {ev:?}");
            return Err(abi::EINVAL);
        }
        if let Some(i) = (0..n).find(|&i| pong[i] != pattern(round, i) ^ 0x5a) {
            println!("pingpong: round {round}: pong byte {i} is wrong");
            return Err(abi::EINVAL);
        }
    }
    let r = &mut rtts[..rounds as usize];
    r.sort_unstable();
    println!(
        "pingpong: node 0: {rounds} round trips with node 1, every byte checked; round trip in TSC ticks min {} median {} max {}",
        r[0],
        r[r.len() / 2],
        r[r.len() - 1]
    );
    Ok(())
}

fn node1(pid: u64, rounds: u64) -> Result<(), i64> {
    let [ping, bulk, pong, _] = bufs();
    me(BULK, &mut bulk[..BULK_LEN])?;
    me(PING, ping)?;
    put(0, pid, READY, b"ready", 0)?;
    let mut got = 0;
    let mut bulk_ok = false;
    let mut last = abi::Event::default();
    while got < rounds || !bulk_ok {
        let ev = wait()?;
        last = ev;
        match ev.match_bits {
            BULK => {
                if ev.len != BULK_LEN as u64 {
                    println!("pingpong: bulk put has {} bytes", ev.len);
                    return Err(abi::EINVAL);
                }
                if let Some(i) = (0..BULK_LEN).find(|&i| bulk[i] != pattern(999, i)) {
                    println!("pingpong: bulk byte {i} is wrong");
                    return Err(abi::EINVAL);
                }
                println!("pingpong: node 1: put of {BULK_LEN} bytes from node {} landed in the matched descriptor, every byte checked", ev.src_node);
                bulk_ok = true;
            }
            PING => {
                let round = ev.hdr_data;
                let n = ev.len as usize;
                if n != len_of(round) {
                    println!("pingpong: ping {round} has {n} bytes");
                    return Err(abi::EINVAL);
                }
                if let Some(i) = (0..n).find(|&i| ping[i] != pattern(round, i)) {
                    println!("pingpong: ping {round} byte {i} is wrong");
                    return Err(abi::EINVAL);
                }
                for i in 0..n {
                    pong[i] = ping[i] ^ 0x5a;
                }
                put(0, pid, PONG, &pong[..n], round)?;
                got += 1;
            }
            m => {
                println!("pingpong: unexpected match bits {m:#x}");
                return Err(abi::EINVAL);
            }
        }
    }
    println!(
        "pingpong: node 1: answered {got} pings, every byte checked; {} of {} messages were deposited by the kernel while this application was blocked",
        last.deposited_while_blocked,
        got + 1
    );
    Ok(())
}

#[unsafe(no_mangle)]
pub extern "C" fn umain(arg: u64) -> u64 {
    let (pid, node, nodes) = info();
    let rounds = if arg == 0 { 100 } else { arg };
    if nodes < 2 {
        println!("pingpong: needs two nodes (ivshmem), this node sees {nodes}");
        return 2;
    }
    let r = if node == 0 {
        node0(pid, rounds)
    } else {
        node1(pid, rounds)
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            println!("pingpong: failed: {}", errname(e));
            1
        }
    }
}
