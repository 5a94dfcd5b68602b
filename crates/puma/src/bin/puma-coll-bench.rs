//! OSU-style collective benchmark: barrier, broadcast, all-reduce (8 B – 1 MiB) and all-to-all
//! for 2, 4 and 8 ranks, ours (puma through yod) against MPICH and Open MPI in the same run.
//!
//! Build: `cargo build --release -p puma -p yod -p pct` and the peers with
//! `bash crates/puma/bench-peers/install.sh`; run: `target/release/puma-coll-bench`.
//! Prints, per rank count, operation and size, the time per call at the slowest rank (median, with min–max over the
//! repetitions) of each contender and the ratio of ours to the best peer (< 1: we are faster).

use clap::Parser;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Compare puma's collectives with MPICH and Open MPI.
#[derive(Parser)]
struct Cli {
    /// Rank counts (each at least 2: a collective of one rank measures nothing).
    #[arg(long, value_delimiter = ',', default_value = "2,4,8",
          value_parser = clap::value_parser!(u32).range(2..))]
    ranks: Vec<u32>,
    /// Operations.
    #[arg(long, default_value = "barrier,bcast,allreduce,alltoall")]
    ops: String,
    /// Largest broadcast / all-reduce size in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max: usize,
    /// Largest all-to-all block in bytes.
    #[arg(long, default_value_t = 64 << 10)]
    max_alltoall: usize,
    /// Repetitions per size.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u64).range(1..))]
    reps: u64,
    /// Wall time per repetition in ms.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    target_ms: u64,
    /// Directory of coll_peer.mpich / coll_peer.openmpi.
    #[arg(long, default_value = "target/bench-peers")]
    peers: PathBuf,
    /// Directory of yod and puma-coll-rank (default: this program's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// (op, bytes) -> (min, median, max) µs per call.
type Results = BTreeMap<(String, usize), (f64, f64, f64)>;

fn parse(out: &str) -> Results {
    let mut r = Results::new();
    for line in out.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() != 5 {
            continue;
        }
        let nums: Vec<f64> = w[2..].iter().filter_map(|x| x.parse().ok()).collect();
        if let (Ok(b), 3) = (w[1].parse::<usize>(), nums.len()) {
            r.insert((w[0].to_string(), b), (nums[0], nums[1], nums[2]));
        }
    }
    r
}

fn run(mut c: Command, name: &str) -> Option<Results> {
    let out = match c.stdin(Stdio::null()).output() {
        Ok(o) => o,
        Err(e) => {
            println!(
                "{name}: cannot run {}: {e}",
                c.get_program().to_string_lossy()
            );
            return None;
        }
    };
    if !out.status.success() {
        println!(
            "{name}: failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .take(3)
                .collect::<Vec<_>>()
                .join(" | ")
        );
        return None;
    }
    Some(parse(&String::from_utf8_lossy(&out.stdout)))
}

fn which(p: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|d| d.join(p).is_file()))
        .unwrap_or(false)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // An operation the ranks do not know would fail every run of every contender; say so first.
    const OPS: [&str; 4] = ["barrier", "bcast", "allreduce", "alltoall"];
    let ops: Vec<&str> = cli.ops.split(',').map(str::trim).collect();
    if let Some(bad) = ops.iter().find(|o| !OPS.contains(o)) {
        eprintln!(
            "puma-coll-bench: --ops: unknown operation `{bad}` (give a comma list of {})",
            OPS.join(", ")
        );
        return std::process::ExitCode::from(2);
    }
    let mut ours_failed = false;
    let dir = cli.bin_dir.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("."))
    });
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u32;
    let args = |c: &mut Command| {
        c.arg(&cli.ops)
            .arg(cli.max.to_string())
            .arg(cli.max_alltoall.to_string())
            .arg(cli.reps.to_string())
            .arg(cli.target_ms.to_string());
    };
    println!(
        "puma-coll-bench: {cores} cores; µs per call at the slowest rank, median (min–max) over {} repetitions of ~{} ms",
        cli.reps, cli.target_ms
    );
    for &n in &cli.ranks {
        let over = n > cores;
        let mut contenders: Vec<(&str, Results)> = Vec::new();
        let mut ours = Command::new(dir.join("yod"));
        ours.arg("-n")
            .arg(n.to_string())
            .arg(dir.join("puma-coll-rank"))
            .arg("--ops")
            .arg(&cli.ops)
            .arg("--max")
            .arg(cli.max.to_string())
            .arg("--max-alltoall")
            .arg(cli.max_alltoall.to_string())
            .arg("--reps")
            .arg(cli.reps.to_string())
            .arg("--target-ms")
            .arg(cli.target_ms.to_string());
        match run(ours, "puma") {
            Some(r) => contenders.push(("puma", r)),
            None => ours_failed = true,
        }
        let mpich = cli.peers.join("coll_peer.mpich");
        if mpich.exists() && which("mpirun.mpich") {
            let mut c = Command::new("mpirun.mpich");
            c.arg("-n").arg(n.to_string());
            if !over {
                c.args(["-bind-to", "core"]);
            }
            c.arg(&mpich);
            args(&mut c);
            if let Some(r) = run(c, "MPICH") {
                contenders.push(("MPICH", r));
            }
        } else {
            println!("peer absent: MPICH ({} or mpirun.mpich missing; run crates/puma/bench-peers/install.sh)", mpich.display());
        }
        let ompi = cli.peers.join("coll_peer.openmpi");
        if ompi.exists() && which("mpirun.openmpi") {
            let mut c = Command::new("mpirun.openmpi");
            c.args(["--allow-run-as-root", "-n"]).arg(n.to_string());
            if over {
                c.args(["--oversubscribe", "--bind-to", "none"]);
            } else {
                c.args(["--bind-to", "core"]);
            }
            c.arg(&ompi);
            args(&mut c);
            if let Some(r) = run(c, "Open MPI") {
                contenders.push(("Open MPI", r));
            }
        } else {
            println!(
                "peer absent: Open MPI ({} or mpirun.openmpi missing)",
                ompi.display()
            );
        }
        println!(
            "\n## {n} ranks{}",
            if over { " (oversubscribed)" } else { "" }
        );
        let mut head = format!("| {:<9} | {:>7} |", "op", "bytes");
        for (name, _) in &contenders {
            head += &format!(" {name:>26} |");
        }
        head += " ours/best peer |";
        println!("{head}");
        println!("|{}", "---|".repeat(3 + contenders.len()));
        let keys: Vec<(String, usize)> = contenders
            .iter()
            .flat_map(|(_, r)| r.keys().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for k in keys {
            let mut line = format!("| {:<9} | {:>7} |", k.0, k.1);
            for (_, r) in &contenders {
                match r.get(&k) {
                    Some((lo, med, hi)) => line += &format!(" {med:>9.2} ({lo:.2}–{hi:.2}) |"),
                    None => line += &format!(" {:>26} |", "-"),
                }
            }
            let ours = contenders
                .iter()
                .find(|c| c.0 == "puma")
                .and_then(|c| c.1.get(&k));
            let best = contenders
                .iter()
                .filter(|c| c.0 != "puma")
                .filter_map(|c| c.1.get(&k).map(|x| x.1))
                .fold(f64::INFINITY, f64::min);
            match ours {
                Some(o) if best.is_finite() => line += &format!(" {:>14.2} |", o.1 / best),
                _ => line += &format!(" {:>14} |", "-"),
            }
            println!("{line}");
        }
    }
    if ours_failed {
        eprintln!("puma-coll-bench: our runs failed (see above)");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
