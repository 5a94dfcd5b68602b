//! Parallel sample sort of random 64-bit keys: sample, all-gather the samples, pick splitters,
//! all-to-all the bucket sizes, exchange the buckets, sort locally, then check that the result is
//! globally ordered and holds exactly the original keys (count and checksum).
//! Run: `yod -n 4 target/debug/examples/sort --keys 100000`.

use clap::Parser;
use puma::{Error, Result, Sum, UserOp};

/// Sort random keys across the ranks.
#[derive(Parser)]
struct Args {
    /// Keys per rank.
    #[arg(long, default_value_t = 50_000)]
    keys: usize,
    /// Seed.
    #[arg(long, default_value_t = 11)]
    seed: u64,
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn run(a: &Args) -> Result<()> {
    let u = puma::start()?;
    let w = u.world();
    let (me, p) = (w.rank(), w.size() as usize);
    let keys: Vec<u64> = (0..a.keys)
        .map(|i| mix(a.seed ^ ((me as u64) << 48) ^ i as u64))
        .collect();
    let mut sums = [0u64; 2];
    w.all_reduce(
        &[
            keys.len() as u64,
            keys.iter().fold(0u64, |s, &k| s.wrapping_add(k)),
        ],
        &mut sums,
        Sum,
    )?;
    // Samples: p per rank from the locally sorted keys.
    let mut local = keys;
    local.sort_unstable();
    let s = p.min(local.len().max(1));
    let samples: Vec<u64> = (0..p)
        .map(|i| local.get(i * local.len() / s).copied().unwrap_or(u64::MAX))
        .collect();
    let mut all = vec![0u64; p * p];
    w.all_gather(&samples, &mut all)?;
    all.sort_unstable();
    let splitters: Vec<u64> = (1..p).map(|i| all[i * p]).collect();
    // Buckets.
    let mut buckets: Vec<Vec<u64>> = vec![Vec::new(); p];
    for k in local {
        let b = splitters.partition_point(|&s| s <= k);
        buckets[b].push(k);
    }
    let counts: Vec<u64> = buckets.iter().map(|b| b.len() as u64).collect();
    let mut incoming = vec![0u64; p];
    w.all_to_all(&counts, &mut incoming)?;
    let mut reqs = Vec::new();
    for (j, b) in buckets.iter().enumerate() {
        if j != me as usize {
            reqs.push(w.isend(b, j as u32, 7)?);
        }
    }
    let mut mine = std::mem::take(&mut buckets[me as usize]);
    for (j, &cnt) in incoming.iter().enumerate() {
        if j != me as usize {
            let mut v = vec![0u64; cnt as usize];
            w.recv_exact(&mut v, j as u32, 7)?;
            mine.extend_from_slice(&v);
        }
    }
    puma::wait_all(reqs)?;
    mine.sort_unstable();
    // Checks: ordered within, ordered across neighbours, nothing lost or invented.
    let lo = mine.first().copied().unwrap_or(u64::MAX);
    let hi = mine.last().copied().unwrap_or(0);
    let mut ends = vec![0u64; 2 * p];
    w.all_gather(&[lo, hi], &mut ends)?;
    let mut prev_hi = 0u64;
    for r in 0..p {
        let (l, h) = (ends[2 * r], ends[2 * r + 1]);
        if l == u64::MAX && h == 0 {
            continue; // empty rank
        }
        if l < prev_hi {
            return Err(Error::Invalid(format!(
                "rank {r} starts below its predecessor's end"
            )));
        }
        prev_hi = h;
    }
    let mut after = [0u64; 2];
    w.all_reduce(
        &[
            mine.len() as u64,
            mine.iter().fold(0u64, |s, &k| s.wrapping_add(k)),
        ],
        &mut after,
        UserOp(|x: u64, y: u64| x.wrapping_add(y)),
    )?;
    if after != sums {
        return Err(Error::Invalid(format!(
            "keys lost or changed: {sums:?} before, {after:?} after"
        )));
    }
    let mut most = [0u64];
    w.all_reduce(&[mine.len() as u64], &mut most, puma::Max)?;
    if me == 0 {
        println!(
            "sort OK: {} keys on {p} ranks, globally ordered, checksum {:#x}, largest bucket {}",
            sums[0], sums[1], most[0]
        );
    }
    Ok(())
}

fn main() {
    let a = Args::parse();
    if let Err(e) = run(&a) {
        puma::exit_with_error("sort", &e, 1);
    }
}
