//! Ranks that wait: every rank but the last blocks in a receive from the last rank while it
//! sleeps, then the last rank wakes them with one message each and all meet at a barrier. (Rank 0
//! waits because yod places it on the first application CPU, the one worth measuring.)
//! Run: `yod -n 2 target/release/examples/wait --seconds 10 [--op barrier]`.
//!
//! This is the job `crates/noise/scripts/self-noise.sh` runs to check that a rank blocked in the
//! library (and its QK engine) gives its core back: FTQ on the waiting rank's core should see no
//! more lost work than with nothing running.

use clap::Parser;
use std::time::{Duration, Instant};

/// Block every rank but the last in a receive for a while.
#[derive(Parser)]
struct Args {
    /// How long the last rank sleeps before it sends (seconds, fractions allowed).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Where the other ranks wait: `recv` (a point-to-point receive, blocked in the QK) or
    /// `barrier` (a node-local barrier in the shared collective area).
    #[arg(long, default_value = "recv", value_parser = ["recv", "barrier"])]
    op: String,
}

fn run(args: &Args) -> puma::Result<()> {
    if !(args.seconds.is_finite() && args.seconds >= 0.0) {
        return Err(puma::Error::Invalid(format!(
            "--seconds must be a non-negative number, not {}",
            args.seconds
        )));
    }
    let u = puma::start()?;
    let w = u.world();
    let (me, n) = (w.rank(), w.size());
    let began = Instant::now();
    let last = n - 1;
    let mut word = [0u64];
    if args.op == "barrier" {
        if me == last {
            std::thread::sleep(Duration::from_secs_f64(args.seconds));
        }
        w.barrier()?;
    } else if me == last {
        std::thread::sleep(Duration::from_secs_f64(args.seconds));
        for r in 0..last {
            word[0] = u64::from(r);
            w.send(&word, r, 7)?;
        }
    } else {
        w.recv_exact(&mut word, last, 7)?;
        if word[0] != u64::from(me) {
            return Err(puma::Error::Invalid(format!(
                "rank {me} received {} instead of its rank",
                word[0]
            )));
        }
    }
    w.barrier()?;
    if me == 0 {
        println!(
            "wait: {n} ranks, {} waited {:.3} s in a {}",
            n - 1,
            began.elapsed().as_secs_f64(),
            if args.op == "barrier" {
                "barrier"
            } else {
                "receive"
            }
        );
    }
    u.finalize()
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        puma::exit_with_error("wait", &e, 1);
    }
}
