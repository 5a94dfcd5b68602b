//! `puma-noise`: measure operating-system interference and show its spectrum.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use noise::units::{parse_cpu_list, parse_duration_ns, InjectSpec};
use noise::{format, ftq, NoiseError};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "puma-noise",
    version,
    about = "Measure OS interference with FTQ (right-weight paper, Figure 2) and analyse its spectrum"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fixed time quantum: count work quanta in absolute, aligned intervals on each CPU.
    Ftq {
        /// CPUs to sample (e.g. `1`, `0,1`, `0-3`); one pinned sampler per CPU, common start.
        #[arg(long, default_value = "0")]
        cpu: String,
        /// Interval length Δ.
        #[arg(long, default_value = "1ms")]
        interval: String,
        /// How long to sample.
        #[arg(long, default_value = "10s")]
        duration: String,
        /// Target time of one work quantum (small against the interval).
        #[arg(long, default_value = "1us")]
        quantum: String,
        /// Built-in interferer on each sampled CPU, FREQ:BURN (e.g. `100Hz:200us`).
        #[arg(long)]
        inject: Option<InjectSpec>,
        /// Write the samples here (CSV; binary if the name ends in `.ftq` or `.bin`).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Command to run while sampling (killed if still running at the end).
        #[arg(last = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("puma-noise: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), NoiseError> {
    match cli.cmd {
        Cmd::Ftq {
            cpu,
            interval,
            duration,
            quantum,
            inject,
            output,
            command,
        } => {
            let cfg = ftq::FtqConfig {
                cpus: parse_cpu_list(&cpu)?,
                interval_ns: parse_duration_ns(&interval)?,
                duration_ns: parse_duration_ns(&duration)?,
                quantum_target_ns: parse_duration_ns(&quantum)?,
                inject,
                command,
                progress: true,
            };
            let run = ftq::run(&cfg)?;
            if let Some(p) = &output {
                format::save_ftq(&run, p)?;
            }
            println!("nominal_count={}", run.nominal_count);
            Ok(())
        }
    }
}
