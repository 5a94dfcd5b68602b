//! Runs the FTQ sampler on the bare-metal QK (under QEMU) and the same
//! sampler as a Linux process, and prints both spectra side by side.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use metal_tests::{
    build_kernel, finish, ftq_counts, ftq_linux, interference, lines, spawn, MIN_AMPLITUDE,
    PEAK_LIMIT,
};

/// Compare FTQ noise on the bare QK with the same sampler on Linux.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Number of quanta (each 250 000 TSC ticks) per run (max 8192).
    #[arg(long, default_value_t = 2000)]
    samples: usize,
    /// Kernel image to boot (default: build metal/ with metal/build.sh).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Number of strongest spectral lines to print per run.
    #[arg(long, default_value_t = 5)]
    lines: usize,
}

fn stats(c: &[f64]) -> String {
    let mut s = c.to_vec();
    s.sort_by(f64::total_cmp);
    let mean = c.iter().sum::<f64>() / c.len().max(1) as f64;
    format!(
        "min {:.0} median {:.0} max {:.0} mean {:.1}",
        s.first().copied().unwrap_or(0.0),
        s.get(s.len() / 2).copied().unwrap_or(0.0),
        s.last().copied().unwrap_or(0.0),
        mean
    )
}

fn report(name: &str, c: &[f64], k: usize) {
    println!("{name}: {} samples, counts {}", c.len(), stats(c));
    match interference(c, MIN_AMPLITUDE) {
        Some(l) if l.ratio > PEAK_LIMIT => println!(
            "  periodic interference: bin {} (period {:.1} quanta), {:.3e} x median, amplitude {:.3}% of mean",
            l.bin,
            c.len() as f64 / l.bin as f64,
            l.ratio,
            100.0 * l.rel_amplitude
        ),
        _ => println!("  no line above {PEAK_LIMIT} x median power with amplitude >= {}% of mean", 100.0 * MIN_AMPLITUDE),
    }
    for l in lines(c).iter().take(k) {
        println!(
            "  line at bin {:5} (period {:7.1} quanta): {:10.3e} x median power, amplitude {:.4}% of mean",
            l.bin,
            c.len() as f64 / l.bin as f64,
            l.ratio,
            100.0 * l.rel_amplitude
        );
    }
}

fn main() -> ExitCode {
    let a = Args::parse();
    if a.samples < 64 || a.samples > 8192 {
        eprintln!("metal-ftq: --samples must be between 64 and 8192");
        return ExitCode::FAILURE;
    }
    let kernel = match a.kernel.map_or_else(build_kernel, Ok) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("metal-ftq: {e}");
            return ExitCode::FAILURE;
        }
    };
    let alone = format!("run=ftq:{}", a.samples);
    let shared = format!("run=ftq:{},spin:20 policy=rr quantum=1000", a.samples);
    let icount = || vec!["-icount".to_string(), "shift=0".to_string()];
    for (name, append, extra) in [
        (
            "bare QK, QEMU TCG, real time (host noise leaks in)",
            &alone,
            vec![],
        ),
        (
            "bare QK, QEMU TCG, -icount shift=0 (guest time = instructions)",
            &alone,
            icount(),
        ),
        (
            "for contrast: bare QK, -icount, FTQ round-robin with a spinner (1 ms PIT tick)",
            &shared,
            icount(),
        ),
    ] {
        let counts = match spawn(&kernel, append, &extra)
            .and_then(|c| finish(c, Duration::from_secs(120)))
        {
            Ok(r) => ftq_counts(&r.output),
            Err(e) => {
                eprintln!("metal-ftq: {e}");
                return ExitCode::FAILURE;
            }
        };
        if counts.len() != a.samples {
            eprintln!(
                "metal-ftq: the bare-metal run printed {} of {} counts",
                counts.len(),
                a.samples
            );
            return ExitCode::FAILURE;
        }
        report(name, &counts, a.lines);
    }
    let linux = ftq_linux(a.samples);
    report("Linux process", &linux, a.lines);
    ExitCode::SUCCESS
}
