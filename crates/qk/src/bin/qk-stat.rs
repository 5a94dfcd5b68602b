//! `qk-stat`: show the QK counters of a running job on this node (messages, bytes, large-message
//! paths, idle sleeps, and drops per reason) for every port: each local rank and the node engine.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qk::region::Region;
use qk::sys::Memfd;

#[derive(Parser)]
#[command(
    about = "Show the hosted QK's per-rank counters and drops of a running job",
    long_about = "Reads the counters the QK keeps in a job's shared-memory region. Point it at any \
                  process of the job (a rank started by yod/the PCT): qk-stat finds the region through \
                  the process's PUMA_QK_FD. Reading needs the same rights as reading /proc/<pid>/fd."
)]
struct Cli {
    /// A process of the job (a rank, or the PCT holding the fabric).
    #[arg(long)]
    pid: Option<u32>,
    /// The region's descriptor number in that process (default: its PUMA_QK_FD).
    #[arg(long)]
    fd: Option<i32>,
    /// Or a path to the region (e.g. /proc/<pid>/fd/<n>).
    #[arg(long, conflicts_with_all = ["pid", "fd"])]
    path: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also list drop reasons whose counter is zero.
    #[arg(long)]
    all: bool,
}

fn fd_from_environ(pid: u32) -> Result<i32, String> {
    check_process(pid)?;
    let env = std::fs::read(format!("/proc/{pid}/environ"))
        .map_err(|e| format!("cannot read the environment of process {pid}: {e}"))?;
    for var in env.split(|b| *b == 0) {
        if let Some(v) = var.strip_prefix(b"PUMA_QK_FD=") {
            return String::from_utf8_lossy(v)
                .parse()
                .map_err(|_| format!("process {pid} has an unparsable PUMA_QK_FD"));
        }
    }
    Err(format!(
        "process {pid} has no PUMA_QK_FD: it was not started by yod/the PCT (give --fd)"
    ))
}

/// Says "no such process" for a pid that names none, rather than a missing /proc file.
fn check_process(pid: u32) -> Result<(), String> {
    if std::path::Path::new(&format!("/proc/{pid}")).is_dir() {
        Ok(())
    } else {
        Err(format!("no process {pid} on this node"))
    }
}

fn run(cli: &Cli) -> Result<String, String> {
    let path = match (&cli.path, cli.pid) {
        (Some(p), _) => p.clone(),
        (None, Some(pid)) => {
            let fd = match cli.fd {
                Some(f) => {
                    check_process(pid)?;
                    f
                }
                None => fd_from_environ(pid)?,
            };
            PathBuf::from(format!("/proc/{pid}/fd/{fd}"))
        }
        (None, None) if cli.fd.is_some() => {
            return Err(
                "--fd names a descriptor of the process given with --pid: give --pid too".into(),
            )
        }
        (None, None) => return Err("give --pid of a process of the job (or --path)".into()),
    };
    if path.is_dir() {
        return Err(format!(
            "{} is a directory, not a QK job region",
            path.display()
        ));
    }
    let memfd = Memfd::open_path(&path, false)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // The region's own errors name the descriptor qk-stat opened; say which file that was.
    let region =
        Region::attach(&memfd, false, false).map_err(|e| format!("{}: {e}", path.display()))?;
    let stats: Vec<qk::PortStats> = (0..region.layout.ports).map(|p| region.stats(p)).collect();
    if cli.json {
        let v = serde_json::json!({
            "job": region.job,
            "node": region.node,
            "world_size": region.world,
            "mode": qk::CpuMode::from_code(region.mode).as_str(),
            "ports": stats,
        });
        return serde_json::to_string_pretty(&v).map_err(|e| e.to_string());
    }
    let mut out = format!(
        "job {} node {} world size {} mode {}\n{:<8} {:>6} {:>12} {:>14} {:>12} {:>14} {:>10} {:>9} {:>7} {:>9} {:>8}\n",
        region.job,
        region.node,
        region.world,
        qk::CpuMode::from_code(region.mode),
        "port",
        "rank",
        "sent",
        "sent_bytes",
        "delivered",
        "deliv_bytes",
        "send_wait",
        "large_1cp",
        "shared",
        "large_cma",
        "drops"
    );
    for s in &stats {
        let name = if s.rank == u32::MAX {
            "engine".to_string()
        } else {
            s.port.to_string()
        };
        let rank = if s.rank == u32::MAX {
            "-".to_string()
        } else {
            s.rank.to_string()
        };
        out += &format!(
            "{:<8} {:>6} {:>12} {:>14} {:>12} {:>14} {:>10} {:>9} {:>7} {:>9} {:>8}\n",
            name,
            rank,
            s.sent,
            s.sent_bytes,
            s.delivered,
            s.delivered_bytes,
            s.send_waits,
            s.large_direct,
            s.large_shared,
            s.large_cma,
            s.total_drops()
        );
        for (reason, n) in &s.drops {
            if *n > 0 || cli.all {
                out += &format!("           drop {reason:<18} {n}\n");
            }
        }
    }
    Ok(out)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(s) => {
            print!("{s}");
            if !s.ends_with('\n') {
                println!();
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("qk-stat: {e}");
            ExitCode::FAILURE
        }
    }
}
