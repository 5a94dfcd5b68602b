//! Point-to-point checks: any-source / any-tag matching keeps each sender's order, probe,
//! non-blocking requests with test / wait_all, messages from 0 bytes to several MiB, a flood of
//! unexpected large messages that overflows the unexpected-message heap (bodies then fetched
//! from the senders), one-sided put / fence / get, and — with `--truncate` — a receive buffer that is too small (an error).
//! Run: `yod -n 4 target/debug/examples/p2p_check`.

use clap::Parser;
use puma::{Error, Result, ANY_SOURCE, ANY_TAG};

/// Verify point-to-point messaging.
#[derive(Parser)]
struct Args {
    /// Messages per sender in the any-source test.
    #[arg(long, default_value_t = 200)]
    count: u32,
    /// Receive into a buffer that is too small (expects a clear error).
    #[arg(long)]
    truncate: bool,
    /// Rank 1 leaves at once while rank 0 waits for it (expects a "has died" error, not a hang).
    #[arg(long)]
    die: bool,
}

fn fail(s: String) -> Error {
    Error::Invalid(format!("check failed: {s}"))
}

fn pattern(src: u32, k: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| src.wrapping_mul(1_000_003) ^ k.wrapping_mul(7919) ^ i)
        .collect()
}

fn run(a: &Args) -> Result<()> {
    let u = puma::start()?;
    let w = u.world();
    let (me, p) = (w.rank(), w.size());
    if a.die {
        if me == 1 {
            std::process::exit(0);
        }
        if me == 0 {
            let mut x = [0u8; 4];
            w.recv(&mut x, 1, 1)?;
            println!("receive from a dead rank returned");
        }
        return Ok(());
    }
    if a.truncate {
        if p < 2 {
            return Err(fail("--truncate needs 2 ranks".into()));
        }
        if me == 1 {
            w.send(&[1u64; 10], 0, 3)?;
        } else if me == 0 {
            let mut small = [0u64; 4];
            w.recv(&mut small, 1, 3)?;
            println!("truncated receive returned without error");
        }
        return Ok(());
    }
    // 1. Any-source, any-tag: per-sender order is kept (non-overtaking).
    if me == 0 {
        let mut next = vec![0u32; p as usize];
        for _ in 0..a.count * (p - 1) {
            let mut m = [0u32; 2];
            let st = w.recv(&mut m, ANY_SOURCE, ANY_TAG)?;
            let s = st.source;
            if m[0] != s || m[1] != next[s as usize] || st.tag != (m[1] % 7) as i32 {
                return Err(fail(format!(
                    "from {s}: got {m:?} tag {}, expected seq {}",
                    st.tag, next[s as usize]
                )));
            }
            next[s as usize] += 1;
        }
    } else {
        for k in 0..a.count {
            w.send(&[me, k], 0, (k % 7) as i32)?;
        }
    }
    w.barrier()?;
    // 2. Sizes 0 B .. 4 MiB between neighbours with irecv / isend / wait_all / test.
    let next = (me + 1) % p;
    let prev = (me + p - 1) % p;
    for n in [0usize, 1, 100, 4096, 70_000, 1 << 20] {
        let data = pattern(me, n as u32, n);
        let mut got = vec![0u32; n];
        let mut r = w.irecv(&mut got, prev, 9)?;
        let s = w.isend(&data, next, 9)?;
        let mut polls = 0u64;
        let st = loop {
            if let Some(st) = r.test()? {
                break st;
            }
            polls += 1;
            if polls > 10_000_000 {
                return Err(fail("test() never completed".into()));
            }
            std::thread::yield_now();
        };
        drop(r);
        puma::wait_all(vec![s])?;
        if st.count::<u32>() != n || got != pattern(prev, n as u32, n) {
            return Err(fail(format!("{n} elements from {prev} arrived wrong")));
        }
    }
    // 3. Probe, then receive a message of unknown length.
    if p > 1 {
        if me == 1 {
            w.send(&pattern(1, 5, 777), 0, 42)?;
        } else if me == 0 {
            let st = w.probe(1, 42)?;
            if st.count::<u32>() != 777 || st.source != 1 || st.tag != 42 {
                return Err(fail(format!("probe said {st:?}")));
            }
            let (v, _) = w.recv_vec::<u32>(1, 42)?;
            if v != pattern(1, 5, 777) {
                return Err(fail("recv_vec data".into()));
            }
        }
    }
    w.barrier()?;
    // 4. Flood: 24 unexpected 1 MiB messages overflow the 8 MiB unexpected heap; later ones keep
    // only their header and their bodies are fetched from the sender when the receive comes.
    if p > 1 {
        let big = 1 << 18; // u32s = 1 MiB
        if me == 1 {
            let mut reqs = Vec::new();
            for k in 0..24 {
                reqs.push(w.isend(&pattern(1, k, big), 0, 100 + k as i32)?);
            }
            // Tell rank 0 all were sent (a different tag, after the flood: same pair, in order).
            w.send(&[0u8], 0, 99)?;
            puma::wait_all(reqs)?;
        } else if me == 0 {
            let mut x = [0u8];
            w.recv(&mut x, 1, 99)?;
            for k in (0..24).rev() {
                let mut v = vec![0u32; big];
                w.recv_exact(&mut v, 1, 100 + k)?;
                if v != pattern(1, k as u32, big) {
                    return Err(fail(format!("flood message {k} corrupted")));
                }
            }
        }
    }
    w.barrier()?;
    // 5. One-sided: each rank puts into its right neighbour's window, fences, then gets from its
    // left neighbour and checks.
    {
        let n = 1000usize;
        let mut win: puma::Window<u32> = puma::Window::new(&w, 2 * n)?;
        win.put_nb(next, n, &pattern(me, 77, n))?;
        win.fence()?;
        let local = win.read_local()?;
        if local[n..] != pattern(prev, 77, n)[..] || local[..n].iter().any(|&x| x != 0) {
            return Err(fail("window put landed wrong".into()));
        }
        win.write_local(&pattern(me, 78, n))?;
        w.barrier()?;
        let g = win.get(prev, 0, n)?;
        let got = win.wait_get(g)?;
        if got != pattern(prev, 78, n) {
            return Err(fail("window get returned wrong data".into()));
        }
        w.barrier()?;
    }
    if me == 0 {
        let st = u.stats();
        println!(
            "p2p-check OK: {p} ranks; unexpected whole {} header-only {} bodies fetched {}",
            st.unexpected_whole, st.unexpected_header_only, st.bodies_fetched
        );
    }
    Ok(())
}

fn main() {
    let a = Args::parse();
    if let Err(e) = run(&a) {
        puma::exit_with_error("p2p_check", &e, 1);
    }
}
