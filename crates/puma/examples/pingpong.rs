//! Ping-pong between ranks 0 and 1: round-trip latency and bandwidth for 8 B .. 1 MiB, with the
//! data checked on every trip. Run: `yod -n 2 target/release/examples/pingpong --iters 1000`.

use clap::Parser;
use puma::{Error, Result};
use std::time::Instant;

/// Measure round trips between ranks 0 and 1.
#[derive(Parser)]
struct Args {
    /// Round trips per size.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    iters: u32,
    /// Largest message in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max: usize,
}

fn run(a: &Args) -> Result<()> {
    let u = puma::start()?;
    let w = u.world();
    if w.size() < 2 {
        return Err(Error::Invalid("ping-pong needs at least 2 ranks".into()));
    }
    let me = w.rank();
    if me == 0 {
        println!("{:>10} {:>12} {:>12}", "bytes", "half-rtt-us", "MB/s");
    }
    let mut n = 8;
    while n <= a.max {
        let msg: Vec<u8> = (0..n).map(|i| (i * 31 + n) as u8).collect();
        let mut buf = vec![0u8; n];
        w.barrier()?;
        let t0 = Instant::now();
        for _ in 0..a.iters {
            if me == 0 {
                w.send(&msg, 1, 1)?;
                w.recv_exact(&mut buf, 1, 2)?;
            } else if me == 1 {
                w.recv_exact(&mut buf, 0, 1)?;
                w.send(&buf, 0, 2)?;
            }
        }
        let dt = t0.elapsed().as_secs_f64();
        if me == 0 {
            if buf != msg {
                return Err(Error::Invalid(format!(
                    "{n}-byte message came back changed"
                )));
            }
            let half = dt / a.iters as f64 / 2.0;
            println!(
                "{n:>10} {:>12.2} {:>12.1}",
                half * 1e6,
                n as f64 / half / 1e6
            );
        }
        n *= 4;
    }
    if me == 0 {
        println!("pingpong OK");
    }
    Ok(())
}

fn main() {
    let a = Args::parse();
    if let Err(e) = run(&a) {
        puma::exit_with_error("pingpong", &e, 1);
    }
}
