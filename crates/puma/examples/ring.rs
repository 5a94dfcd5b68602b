//! A token goes round the ring of ranks `--laps` times; every rank adds its rank to it.
//! Run: `yod -n 4 target/debug/examples/ring --laps 3`.
//! Prints the final token at rank 0 and checks it against the formula.

use clap::Parser;

/// Pass a token round the ring of ranks.
#[derive(Parser)]
struct Args {
    /// Trips round the ring.
    #[arg(long, default_value_t = 1)]
    laps: u64,
}

fn run(args: &Args) -> puma::Result<()> {
    let u = puma::start()?;
    let w = u.world();
    let (me, n) = (w.rank(), w.size());
    let next = (me + 1) % n;
    let prev = (me + n - 1) % n;
    let mut token = [0u64];
    for lap in 0..args.laps {
        if me == 0 {
            token[0] += 0;
            w.send(&token, next, lap as i32)?;
            w.recv_exact(&mut token, prev, lap as i32)?;
        } else {
            w.recv_exact(&mut token, prev, lap as i32)?;
            token[0] += me as u64;
            w.send(&token, next, lap as i32)?;
        }
    }
    if me == 0 {
        let want = args.laps * (n as u64 * (n as u64 - 1) / 2);
        println!(
            "ring: {n} ranks, {} laps, token {} (expected {want})",
            args.laps, token[0]
        );
        if token[0] != want {
            return Err(puma::Error::Invalid("token has the wrong value".into()));
        }
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        puma::exit_with_error("ring", &e, 1);
    }
}
