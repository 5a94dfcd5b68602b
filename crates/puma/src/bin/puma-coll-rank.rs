//! One rank of the collective benchmark (started by `puma-coll-bench` through yod; the MPI peer
//! `bench-peers/coll_peer.c` does exactly the same through MPI). For every operation and size it
//! times trial loops of doubling length until one fills a tenth of `--target-ms` (at least
//! 1 ms) at no more than twice the previous loop's time per call, picks from it an iteration
//! count filling about `--target-ms` (rank 0 decides and broadcasts it), then times `--reps`
//! repetitions of that many calls. Every rank times its own loop; a repetition's figure is the
//! slowest rank's time per call (as IMB's t_max). Rank 0 prints
//! `<op> <bytes> <min_us> <median_us> <max_us>` per operation and size over the repetitions.

use clap::Parser;
use puma::{Comm, Max, Result, Sum};
use std::time::Instant;

/// A rank of the OSU-style collective benchmark.
#[derive(Parser)]
struct Args {
    /// Operations: barrier, bcast, allreduce, alltoall.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "barrier,bcast,allreduce,alltoall"
    )]
    ops: Vec<String>,
    /// Largest size in bytes (sizes go 8, 64, 512, ... by 8x, plus the maximum).
    #[arg(long, default_value_t = 1 << 20)]
    max: usize,
    /// Largest all-to-all block in bytes.
    #[arg(long, default_value_t = 64 << 10)]
    max_alltoall: usize,
    /// Repetitions per size.
    #[arg(long, default_value_t = 7)]
    reps: usize,
    /// Wall time one repetition aims for.
    #[arg(long, default_value_t = 20)]
    target_ms: u64,
}

fn sizes(max: usize) -> Vec<usize> {
    let mut v = Vec::new();
    let mut s = 8;
    while s < max {
        v.push(s);
        s *= 8;
    }
    v.push(max);
    v
}

fn once(
    w: &Comm,
    op: &str,
    bytes: usize,
    a: &mut [u8],
    b: &mut [u8],
    f: &[f32],
    g: &mut [f32],
) -> Result<()> {
    match op {
        "barrier" => w.barrier(),
        "bcast" => w.broadcast(&mut a[..bytes], 0),
        "allreduce" => w.all_reduce(&f[..bytes / 4], &mut g[..bytes / 4], Sum),
        "alltoall" => {
            let n = bytes * w.size() as usize;
            w.all_to_all(&a[..n], &mut b[..n])
        }
        other => Err(puma::Error::Invalid(format!("unknown operation {other}"))),
    }
}

fn run(args: &Args) -> Result<()> {
    let u = puma::start()?;
    let w = u.world();
    let p = w.size() as usize;
    let big = args.max.max(args.max_alltoall * p);
    let mut a = vec![1u8; big];
    let mut b = vec![0u8; big];
    let f = vec![1.0f32; args.max / 4 + 1];
    let mut g = vec![0.0f32; args.max / 4 + 1];
    for op in &args.ops {
        let list = match op.as_str() {
            "barrier" => vec![0],
            "alltoall" => sizes(args.max_alltoall),
            _ => sizes(args.max),
        };
        for &bytes in &list {
            // Iterations per repetition, from trial loops of 1, 2, 4 … calls that double until
            // one lasts a tenth of the target (at least 1 ms): timing only the first calls let a
            // disturbance (cold caches, the previous line's print waking yod) set the count, and
            // a count of a few calls keeps that disturbance in every repetition. Rank 0 decides
            // and broadcasts, so every rank runs the same loops.
            //
            // A loop that lasts long enough decides only if its time per call is at most twice
            // the previous loop's: under load the first call of a size often waited 2.6-12 ms
            // for a descheduled rank (one call, ~10 µs of work), and the count of 2-3 calls
            // per repetition that followed measured mostly that disturbance and the barrier (and
            // a path chooser's first tries). After 5 targets of trial loops the next long
            // enough loop decides anyway.
            let target = args.target_ms as f64 / 1e3;
            let floor = (target / 10.0).max(1e-3);
            let mut trial: u32 = 1;
            let (mut prev, mut total) = (0.0, 0.0);
            let iters = loop {
                w.barrier()?;
                let t0 = Instant::now();
                for _ in 0..trial {
                    once(&w, op, bytes, &mut a, &mut b, &f, &mut g)?;
                }
                let spent = t0.elapsed().as_secs_f64();
                let one = spent / f64::from(trial);
                total += spent;
                let steady = one <= 2.0 * prev || total >= 5.0 * target;
                prev = one;
                let mut decided = [0u32];
                if w.rank() == 0 && ((spent >= floor && steady) || trial >= 20_000) {
                    decided[0] = (target / one.max(1e-7)).clamp(2.0, 20_000.0) as u32;
                }
                w.broadcast(&mut decided, 0)?;
                if decided[0] != 0 {
                    break decided;
                }
                trial *= 2;
            };
            let mut times = Vec::new();
            for _ in 0..args.reps {
                w.barrier()?;
                let t0 = Instant::now();
                for _ in 0..iters[0] {
                    once(&w, op, bytes, &mut a, &mut b, &f, &mut g)?;
                }
                let mine = [t0.elapsed().as_secs_f64() * 1e6 / iters[0] as f64];
                // The slowest rank's time per call (IMB's t_max): a collective is done when
                // every rank has its result, and a root that runs ahead on buffered sends would
                // otherwise report only how fast it can hand data off.
                let mut slowest = [0.0f64];
                w.all_reduce(&mine, &mut slowest, Max)?;
                times.push(slowest[0]);
            }
            times.sort_by(f64::total_cmp);
            if w.rank() == 0 {
                println!(
                    "{op} {bytes} {:.3} {:.3} {:.3}",
                    times[0],
                    times[times.len() / 2],
                    times[times.len() - 1]
                );
            }
        }
    }
    Ok(())
}

fn main() {
    let a = Args::parse();
    if let Err(e) = run(&a) {
        eprintln!("puma-coll-rank: {e}");
        std::process::exit(1);
    }
}
