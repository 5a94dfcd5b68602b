//! Checks every collective against a serial computation, for many sizes, with random inputs.
//! Every rank draws the same pseudo-random data for every rank from `--seed`, so each can compute
//! the serial answer itself. Run: `yod -n 5 target/debug/examples/coll_check --seed 7`.
//! `--mismatch` makes the last rank pass a shorter buffer to an all-reduce (must be an error).

use clap::Parser;
use puma::{Comm, Error, Max, Min, Product, Result, Sum, UserOp};

/// Verify the collectives against serial results.
#[derive(Parser)]
struct Args {
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Element counts to try.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,1,3,17,255,1000,4099,30000"
    )]
    sizes: Vec<usize>,
    /// Make the last rank's all-reduce buffer shorter (expects a clear error).
    #[arg(long)]
    mismatch: bool,
    /// Elements of the other ranks' buffers in the `--mismatch` all-reduce (the last rank has 3
    /// fewer).
    #[arg(long, default_value_t = 8)]
    mismatch_len: usize,
    /// Make the `--mismatch` operation an all-to-all (blocks of `--mismatch-len` elements, the
    /// last rank's 3 shorter) instead of an all-reduce.
    #[arg(long)]
    mismatch_alltoall: bool,
    /// Make the `--mismatch` operation a broadcast from rank 0 (the last rank's buffer 3
    /// elements shorter) instead of an all-reduce.
    #[arg(long)]
    mismatch_bcast: bool,
    /// Make the last rank's buffer of the `--mismatch-bcast` broadcast this many elements longer
    /// instead of 3 shorter.
    #[arg(long)]
    mismatch_longer: Option<usize>,
    /// Element counts to check on a duplicate of the world communicator (which cannot have the
    /// stages the world communicator holds, so takes the other algorithms).
    #[arg(long, value_delimiter = ',', default_value = "100")]
    dup_sizes: Vec<usize>,
    /// Back-to-back broadcasts (each checked) from one root at a time, the root changing every
    /// `STREAK_BLOCK` operations, then a reduce and an all-reduce: the root runs ahead of its readers
    /// through every slot of the collective area and waits for them to free slots.
    #[arg(long, default_value_t = 200)]
    streak: usize,
    /// Back-to-back all-to-alls (each checked) with blocks of 2047, 2048 and 8193 i64 in turn
    /// (either side of the 16 KiB block from which all-to-all chooses its path by measured cost,
    /// and more than one stage piece): under the measured choice they take every path.
    #[arg(long, default_value_t = 0)]
    alltoall_streak: usize,
    /// Block sizes (i64) the `--alltoall-streak` takes in turn instead of 2047, 2048, 8193.
    #[arg(long, value_delimiter = ',', default_values_t = [2047, 2048, 8193])]
    alltoall_blocks: Vec<usize>,
    /// Before all-to-all `k` of the `--alltoall-streak`, rank `k mod p` sleeps this many µs
    /// (0: none), so each rank in turn arrives late, after the others published.
    #[arg(long, default_value_t = 0)]
    alltoall_late_us: u64,
    /// Back-to-back byte broadcasts and all-reduces (each checked) of every size in
    /// `LINE_SIZES`, this many operations per size (more than the area's 64 slots reuses each
    /// slot with that size).
    #[arg(long, default_value_t = 0)]
    line_streak: usize,
    /// Byte sizes for `--line-streak` instead of `LINE_SIZES`.
    #[arg(long, value_delimiter = ',')]
    line_sizes: Vec<usize>,
    /// `--line-streak` without its all-reduces (broadcasts only, e.g. to see which path they
    /// take from the stage counter).
    #[arg(long)]
    line_bcast_only: bool,
}

/// Byte payloads on either side of every cache-line boundary of a slot (a 16-byte header, then
/// the payload: the word's line holds 48 payload bytes, each further line 64), of the lines a
/// waiting reader asks for ahead (the first four: 240 bytes), of one slot (2032) and of the
/// slot path's end for broadcast and all-reduce (2033 goes through the stages), of two slots
/// and of the end of the slot path for broadcasts with more ranks than cores (8192; see
/// `puma::coll::CROWDED_BCAST_SLOTS_MAX`).
const LINE_SIZES: [usize; 26] = [
    1, 47, 48, 49, 63, 64, 65, 111, 112, 113, 175, 176, 177, 239, 240, 241, 1007, 1008, 1009, 2031,
    2032, 2033, 4064, 4065, 8192, 8193,
];

/// `len` pseudo-random bytes of `rank` for operation `salt`.
fn byte_data(seed: u64, rank: u32, len: usize, salt: u64) -> Vec<u8> {
    (0..len)
        .map(|i| mix(seed ^ (rank as u64) << 40 ^ (i as u64) << 16 ^ salt) as u8)
        .collect()
}

/// See `Args::line_streak`. Per size, `count` operations: byte broadcasts from one root (which
/// changes with the size; the others pause at operations 3, 1103, ... so the root runs ahead
/// through the slots, and through the 1024 line slots with a longer streak), every
/// third operation also a byte all-reduce (wrapping sum), every operation's data different, so a
/// reader that took a stale, half-written or overwritten slot fails the check.
fn line_streak(w: &Comm, a: &Args, checks: &mut u32) -> Result<()> {
    let (seed, count) = (a.seed, a.line_streak);
    let (me, p) = (w.rank(), w.size());
    let sizes: &[usize] = if a.line_sizes.is_empty() {
        &LINE_SIZES
    } else {
        &a.line_sizes
    };
    for (j, &len) in sizes.iter().enumerate() {
        let root = j as u32 % p;
        for k in 0..count {
            let salt = 0x11e5_0000_0000 ^ ((j as u64) << 20) ^ k as u64;
            if k % 1100 == 3 && me != root {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            let want = byte_data(seed, root, len, salt);
            let mut b = if me == root {
                want.clone()
            } else {
                vec![0xee; len]
            };
            w.broadcast(&mut b, root)?;
            expect(
                &format!("line broadcast {k} of {len} B from {root}"),
                &b,
                &want,
            )?;
            *checks += 1;
            if k % 3 == 2 && !a.line_bcast_only {
                let mine = byte_data(seed, me, len, salt ^ 1);
                let mut sum = byte_data(seed, 0, len, salt ^ 1);
                for r in 1..p {
                    for (a, x) in sum.iter_mut().zip(byte_data(seed, r, len, salt ^ 1)) {
                        *a = a.wrapping_add(x);
                    }
                }
                let mut got = vec![0xee; len];
                w.all_reduce(&mine, &mut got, Sum)?;
                expect(&format!("line all-reduce {k} of {len} B"), &got, &sum)?;
                *checks += 1;
            }
        }
    }
    Ok(())
}

/// See `Args::alltoall_streak`.
fn alltoall_streak(
    w: &Comm,
    seed: u64,
    count: usize,
    blocks: &[usize],
    late_us: u64,
    checks: &mut u32,
) -> Result<()> {
    if blocks.is_empty() {
        return Err(fail("--alltoall-blocks needs at least one size".into()));
    }
    for k in 0..count {
        let blk = blocks[k % blocks.len()];
        if late_us > 0 && w.rank() as usize == k % w.size() as usize {
            std::thread::sleep(std::time::Duration::from_micros(late_us));
        }
        let salt = 0xa2a0_0000 ^ k as u64;
        check_all_to_all(
            w,
            seed,
            blk,
            salt,
            &format!("streak all-to-all {k} ({blk} i64 blocks)"),
        )?;
    }
    *checks += count as u32;
    Ok(())
}

/// One all-to-all of `blk`-element blocks, checked: block j of rank i is
/// `data(i, salt ^ (j + 3))`.
fn check_all_to_all(w: &Comm, seed: u64, blk: usize, salt: u64, what: &str) -> Result<()> {
    let (me, p) = (w.rank(), w.size());
    let send: Vec<i64> = (0..p)
        .flat_map(|j| data(seed, me, blk, salt ^ (j as u64 + 3)))
        .collect();
    let mut recv = vec![0i64; send.len()];
    w.all_to_all(&send, &mut recv)?;
    let want: Vec<i64> = (0..p)
        .flat_map(|i| data(seed, i, blk, salt ^ (me as u64 + 3)))
        .collect();
    expect(what, &recv, &want)
}

/// `len` elements of broadcast `k` of the streak (what the root sends).
fn streak_data(seed: u64, k: usize, len: usize) -> Vec<i64> {
    data(seed, k as u32, len, 0x5eed ^ k as u64)
}

/// Operations per root in a streak: more than the collective area's 64 slots, so the root runs
/// out of free slots while the others pause.
const STREAK_BLOCK: usize = 90;

/// See `Args::streak`. Per block of `STREAK_BLOCK` operations from one root: all but the last are slot-path broadcasts
/// (0–6 elements and exactly one slot, 254 i64 = 2032 bytes) while the other ranks pause once
/// for 2 ms, so the root runs ahead through every slot; then one broadcast above a slot (through
/// the stages or in pieces), a reduce and an all-reduce of 255, 512 or 513 elements (both sides
/// of the 4 KiB slot-path limit), which bring everyone together again.
fn streak(w: &Comm, seed: u64, count: usize, checks: &mut u32) -> Result<()> {
    const SMALL: [usize; 9] = [1, 0, 2, 6, 3, 254, 1, 4, 5];
    const LAST: [usize; 3] = [255, 512, 513];
    let (me, p) = (w.rank(), w.size());
    for k in 0..count {
        let (block, pos) = (k / STREAK_BLOCK, k % STREAK_BLOCK);
        let root = block as u32 % p;
        let last = pos == STREAK_BLOCK - 1;
        let len = if last {
            LAST[block % LAST.len()]
        } else {
            SMALL[pos % SMALL.len()]
        };
        if pos == 2 && me != root {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let want = streak_data(seed, k, len);
        let mut b = if me == root {
            want.clone()
        } else {
            vec![-1; len]
        };
        w.broadcast(&mut b, root)?;
        expect(&format!("streak broadcast {k} from {root}"), &b, &want)?;
        if last {
            let mine = data(seed, me, len, k as u64);
            let sum = serial(p, seed, len, k as u64, |a, b| a.wrapping_add(b));
            let mut r = vec![0i64; len];
            w.reduce(&mine, (me == root).then_some(&mut r[..]), root, Sum)?;
            if me == root {
                expect(&format!("streak reduce {k}"), &r, &sum)?;
            }
            w.all_reduce(&mine, &mut r, Sum)?;
            expect(&format!("streak all-reduce {k}"), &r, &sum)?;
        }
    }
    *checks += count as u32;
    Ok(())
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn data(seed: u64, rank: u32, n: usize, salt: u64) -> Vec<i64> {
    (0..n)
        .map(|i| mix(seed ^ (rank as u64) << 40 ^ (i as u64) << 8 ^ salt) as i64 % 1000)
        .collect()
}

fn fail(what: String) -> Error {
    Error::Invalid(format!("check failed: {what}"))
}

fn expect<T: PartialEq + std::fmt::Debug>(what: &str, got: &[T], want: &[T]) -> Result<()> {
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
        return Err(fail(format!(
            "{what}: {} elements, first difference at {i}: {:?} vs {:?}",
            want.len(),
            got.get(i),
            want.get(i)
        )));
    }
    Ok(())
}

fn serial(p: u32, seed: u64, n: usize, salt: u64, f: impl Fn(i64, i64) -> i64) -> Vec<i64> {
    let mut acc = data(seed, 0, n, salt);
    for r in 1..p {
        for (a, b) in acc.iter_mut().zip(data(seed, r, n, salt)) {
            *a = f(*a, b);
        }
    }
    acc
}

fn check_size(w: &Comm, seed: u64, n: usize, checks: &mut u32) -> Result<()> {
    let (me, p) = (w.rank(), w.size());
    let salt = n as u64;
    let mine = data(seed, me, n, salt);
    let mut out = vec![0i64; n];
    w.all_reduce(&mine, &mut out, Sum)?;
    expect(
        "all-reduce sum",
        &out,
        &serial(p, seed, n, salt, |a, b| a.wrapping_add(b)),
    )?;
    w.all_reduce(&mine, &mut out, Min)?;
    expect(
        "all-reduce min",
        &out,
        &serial(p, seed, n, salt, |a, b| a.min(b)),
    )?;
    w.all_reduce(&mine, &mut out, Max)?;
    expect(
        "all-reduce max",
        &out,
        &serial(p, seed, n, salt, |a, b| a.max(b)),
    )?;
    w.all_reduce(&mine, &mut out, Product)?;
    expect(
        "all-reduce product",
        &out,
        &serial(p, seed, n, salt, |a, b| a.wrapping_mul(b)),
    )?;
    w.all_reduce(&mine, &mut out, UserOp(|a: i64, b: i64| a ^ b))?;
    expect(
        "all-reduce closure (xor)",
        &out,
        &serial(p, seed, n, salt, |a, b| a ^ b),
    )?;
    // Floating point: sums of small integers are exact.
    let fm: Vec<f64> = mine.iter().map(|&x| x as f64).collect();
    let mut fo = vec![0f64; n];
    w.all_reduce(&fm, &mut fo, Sum)?;
    let fw: Vec<f64> = serial(p, seed, n, salt, |a, b| a + b)
        .iter()
        .map(|&x| x as f64)
        .collect();
    expect("all-reduce f64 sum", &fo, &fw)?;
    *checks += 6;

    for root in [0, p - 1, p / 2] {
        let mut r = vec![0i64; n];
        w.reduce(&mine, (me == root).then_some(&mut r[..]), root, Sum)?;
        if me == root {
            expect(
                "reduce sum",
                &r,
                &serial(p, seed, n, salt, |a, b| a.wrapping_add(b)),
            )?;
        }
        let mut b = if me == root {
            data(seed, root, n, salt ^ 1)
        } else {
            vec![0; n]
        };
        w.broadcast(&mut b, root)?;
        expect("broadcast", &b, &data(seed, root, n, salt ^ 1))?;
        // Bytes, a length that is no multiple of 8.
        let want: Vec<u8> = data(seed, root, n + 1, salt ^ 5)
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .take(8 * n + 3)
            .collect();
        let mut b = if me == root {
            want.clone()
        } else {
            vec![0u8; want.len()]
        };
        w.broadcast(&mut b, root)?;
        expect("byte broadcast", &b, &want)?;
        let mut g = vec![0i64; n * p as usize];
        w.gather(&mine, (me == root).then_some(&mut g[..]), root)?;
        let all: Vec<i64> = (0..p).flat_map(|r| data(seed, r, n, salt)).collect();
        if me == root {
            expect("gather", &g, &all)?;
        }
        let src: Vec<i64> = (0..p).flat_map(|r| data(seed, r, n, salt ^ 2)).collect();
        let mut s = vec![0i64; n];
        w.scatter((me == root).then_some(&src[..]), &mut s, root)?;
        expect("scatter", &s, &data(seed, me, n, salt ^ 2))?;
        *checks += 4;
    }
    let mut ag = vec![0i64; n * p as usize];
    w.all_gather(&mine, &mut ag)?;
    let all: Vec<i64> = (0..p).flat_map(|r| data(seed, r, n, salt)).collect();
    expect("all-gather", &ag, &all)?;
    // All-to-all: block j of rank i is data(i, salt ^ (j+3)).
    let blk = n / p as usize + 1;
    check_all_to_all(w, seed, blk, salt, "all-to-all")?;
    w.barrier()?;
    *checks += 3;
    Ok(())
}

fn run(a: &Args) -> Result<()> {
    let u = puma::start()?;
    let w = u.world();
    let (me, p) = (w.rank(), w.size());
    if a.mismatch && a.mismatch_alltoall {
        let n = (a.mismatch_len - if me == p - 1 { 3 } else { 0 }) * p as usize;
        let mut out = vec![0u64; n];
        w.all_to_all(&vec![1u64; n], &mut out)?;
        println!("rank {me}: mismatched all-to-all returned without error");
        return Ok(());
    }
    if a.mismatch && a.mismatch_bcast {
        let n = match (me == p - 1, a.mismatch_longer) {
            (false, _) => a.mismatch_len,
            (true, None) => a.mismatch_len - 3,
            (true, Some(k)) => a.mismatch_len + k,
        };
        let mut b = vec![7u64; n];
        w.broadcast(&mut b, 0)?;
        if me == p - 1 {
            println!("rank {me}: mismatched broadcast returned without error");
        }
        return Ok(());
    }
    if a.mismatch {
        let n = a.mismatch_len - if me == p - 1 { 3 } else { 0 };
        let mut out = vec![0u32; n];
        w.all_reduce(&vec![1u32; n], &mut out, Sum)?;
        println!("rank {me}: mismatched all-reduce returned without error");
        return Ok(());
    }
    let mut checks = 0;
    for &n in &a.sizes {
        check_size(&w, a.seed, n, &mut checks)?;
    }
    streak(&w, a.seed, a.streak, &mut checks)?;
    alltoall_streak(
        &w,
        a.seed,
        a.alltoall_streak,
        &a.alltoall_blocks,
        a.alltoall_late_us,
        &mut checks,
    )?;
    line_streak(&w, a, &mut checks)?;
    // Sub-communicators: split by parity, ordered by descending rank; dup keeps traffic apart.
    let sub = w
        .split(Some(me % 2), -(me as i32))?
        .ok_or_else(|| fail("split gave None".into()))?;
    let members: Vec<u32> = (0..p).filter(|r| r % 2 == me % 2).rev().collect();
    if sub.size() as usize != members.len() || members[sub.rank() as usize] != me {
        return Err(fail(format!(
            "split: rank {} of {} for world rank {me}",
            sub.rank(),
            sub.size()
        )));
    }
    let mut s = [0u64];
    sub.all_reduce(&[me as u64], &mut s, Sum)?;
    if s[0] != members.iter().map(|&r| r as u64).sum::<u64>() {
        return Err(fail(format!("split all-reduce gave {}", s[0])));
    }
    let none = w.split(None, 0)?;
    if none.is_some() {
        return Err(fail("split(None) gave a communicator".into()));
    }
    let d = w.dup()?;
    if p > 1 {
        // Same tag on both communicators; receive in the opposite order: no mixing.
        if me == 0 {
            w.send(&[1u32], 1, 5)?;
            d.send(&[2u32], 1, 5)?;
        } else if me == 1 {
            let mut x = [0u32];
            d.recv(&mut x, 0, 5)?;
            let mut y = [0u32];
            w.recv(&mut y, 0, 5)?;
            if (x[0], y[0]) != (2, 1) {
                return Err(fail(format!("dup traffic mixed: {x:?} {y:?}")));
            }
        }
    }
    for &n in &a.dup_sizes {
        check_size(&d, a.seed + 1, n, &mut checks)?;
    }
    checks += 3;
    let mut total = [0u32];
    w.reduce(&[checks], Some(&mut total), 0, Sum)?;
    if me == 0 {
        let fabric = if u.routed() {
            "routed between nodes"
        } else {
            "one region"
        };
        println!(
            "coll-check OK: {p} ranks, {} checks passed (fabric: {fabric})",
            total[0]
        );
        println!("stage pieces: {}", u.stats().stage_pieces);
        println!("cma blocks: {}", u.stats().cma_blocks);
        println!("small ops: {}", u.stats().small_ops);
    }
    // Blocks written into another rank's receive buffer, over all ranks (any rank may push in a
    // crowded all-to-all, whichever runs first).
    let mut pushed = [0u64];
    w.all_reduce(&[u.stats().cma_pushed], &mut pushed, Sum)?;
    if w.rank() == 0 {
        println!("cma pushed: {}", pushed[0]);
    }
    Ok(())
}

fn main() {
    let a = Args::parse();
    if let Err(e) = run(&a) {
        puma::exit_with_error("coll_check", &e, 1);
    }
}
