//! yod-bench: launch time of a hello job through yod against MPICH's `mpiexec`
//! (hydra), interleaved in one run, plus PCT resident memory and the memory the
//! runtime adds per rank.
//!
//! ```text
//! cargo build --release -p yod -p puma --bins --example hello
//! cargo build --release -p pct --example qk_attach   # optional: ranks that attach to the QK fabric
//! target/release/yod-bench --ranks 1,8,64,256 --repeats 7
//! ```

use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Launch-time and memory benchmark of yod/PCT against MPICH's mpiexec.
#[derive(Parser, Debug)]
#[command(name = "yod-bench")]
struct Args {
    /// Job sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,256")]
    ranks: Vec<u32>,
    /// Repeats per size and launcher (interleaved).
    #[arg(long, default_value_t = 7)]
    repeats: usize,
    /// yod binary [default: next to this program].
    #[arg(long)]
    yod: Option<PathBuf>,
    /// The puma hello example [default: examples/hello next to this program].
    #[arg(long)]
    hello: Option<PathBuf>,
    /// A rank that attaches to the QK fabric (maps, locks and prefaults the
    /// node's region) [default: examples/qk_attach next to this program, if built
    /// with `cargo build --release -p pct --example qk_attach`].
    #[arg(long)]
    attach: Option<PathBuf>,
    /// MPICH's mpiexec to compare with [default: mpiexec.hydra, else mpiexec.mpich].
    #[arg(long)]
    mpiexec: Option<String>,
    /// Skip the memory measurements.
    #[arg(long)]
    no_memory: bool,
}

struct Stats {
    min: f64,
    median: f64,
    max: f64,
}

fn stats(v: &mut [f64]) -> Stats {
    v.sort_by(|a, b| a.total_cmp(b));
    Stats {
        min: v[0],
        median: v[v.len() / 2],
        max: v[v.len() - 1],
    }
}

/// Runs a launcher command, checks it printed `n` lines, returns seconds.
fn time_once(cmd: &mut Command, n: u32) -> Result<f64, String> {
    let t = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let dt = t.elapsed().as_secs_f64();
    let lines = out.stdout.iter().filter(|&&b| b == b'\n').count();
    if !out.status.success() || lines != n as usize {
        return Err(format!(
            "{cmd:?}: status {:?}, {lines} of {n} lines; stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(dt)
}

fn have(prog: &str) -> bool {
    Command::new(prog)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn kib(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| kib(&s, "VmRSS:"))
        .unwrap_or(0)
}

fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(c.split_whitespace().filter_map(|v| v.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// Bytes of job segments (memfds) a process holds, each segment counted once however many
/// descriptors of it the process has (a multi-node job's node engine holds its own).
fn memfd_bytes(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            let is_memfd = std::fs::read_link(fd.path())
                .map(|l| l.to_string_lossy().starts_with("/memfd:"))
                .unwrap_or(false);
            if is_memfd {
                if let Ok(m) = std::fs::metadata(fd.path()) {
                    if seen.insert((m.dev(), m.ino())) {
                        total += m.len();
                    }
                }
            }
        }
    }
    total
}

struct Mem {
    yod_kib: u64,
    pct_kib: u64,
    segment_bytes: u64,
}

/// Starts a job of `n` sleeping ranks and measures yod, PCT and segment sizes.
fn memory_during_job(yod: &Path, n: u32, extra: &[&str]) -> Result<Mem, String> {
    let mut child = Command::new(yod)
        .args(["-n", &n.to_string()])
        .args(extra)
        .args(["sh", "-c", "sleep 3"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let ypid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut result = Err(format!("ranks of the {n}-rank job did not all start"));
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let pcts = children(ypid);
        let ranks: usize = pcts.iter().map(|p| children(*p).len()).sum();
        if ranks >= n as usize {
            std::thread::sleep(Duration::from_millis(200));
            result = Ok(Mem {
                yod_kib: rss_kib(ypid),
                pct_kib: pcts.iter().map(|p| rss_kib(*p)).sum(),
                segment_bytes: pcts.iter().map(|p| memfd_bytes(*p)).sum(),
            });
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn idle_pct_rss(yod: &Path) -> Result<u64, String> {
    let dir = std::env::temp_dir().join(format!("yod-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let key = dir.join("key");
    let st = Command::new(yod)
        .args(["keygen", "--force", "--out"])
        .arg(&key)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err("keygen failed".into());
    }
    let mut c = Command::new(yod)
        .args(["pct", "serve", "--name", "bench", "--listen"])
        .arg(format!("unix:{}", dir.join("s").display()))
        .arg("--key")
        .arg(&key)
        .arg("--run-dir")
        .arg(dir.join("run"))
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(300));
    let r = rss_kib(c.id());
    let _ = c.kill();
    let _ = c.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(r)
}

fn main() {
    let a = Args::parse();
    if a.repeats == 0 || a.ranks.is_empty() || a.ranks.contains(&0) {
        eprintln!("yod-bench: --repeats and every job size in --ranks must be at least 1");
        std::process::exit(2);
    }
    let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("yod-bench"));
    let yod = a.yod.clone().unwrap_or_else(|| me.with_file_name("yod"));
    let hello = a
        .hello
        .clone()
        .unwrap_or_else(|| me.with_file_name("examples").join("hello"));
    if !hello.is_file() {
        eprintln!(
            "yod-bench: {} not found; build it with `cargo build --release -p puma --example hello`",
            hello.display()
        );
        std::process::exit(2);
    }
    let attach = a
        .attach
        .clone()
        .unwrap_or_else(|| me.with_file_name("examples").join("qk_attach"));
    let attach = attach.is_file().then_some(attach);
    let mpiexec = a.mpiexec.clone().unwrap_or_else(|| {
        ["mpiexec.hydra", "mpiexec.mpich"]
            .into_iter()
            .find(|p| have(p))
            .unwrap_or("mpiexec.hydra")
            .to_string()
    });
    let mpi = have(&mpiexec);
    if mpi {
        println!("peer: {mpiexec} (MPICH hydra)");
    } else {
        println!(
            "NOTE: {mpiexec} not found: MPICH is absent, so no comparison (apt-get install -y mpich)"
        );
    }
    let memfd_cfg =
        std::env::temp_dir().join(format!("yod-bench-memfd-{}.toml", std::process::id()));
    let _ = std::fs::write(&memfd_cfg, "fabric = \"memfd\"\n");
    let memfd_arg = memfd_cfg.display().to_string();
    println!(
        "launch time of a hello job, seconds (min / median / max over {} runs, interleaved)",
        a.repeats
    );
    println!(
        "{:>6}  {:>26}  {:>26}  {:>26}  {:>26}  {:>8}  {:>8}  {:>26}",
        "ranks",
        "yod puma-hello (QK fabric)",
        "yod sh-echo (QK fabric)",
        "yod sh-echo (memfd)",
        "mpiexec sh-echo",
        "ratio",
        "ratio",
        if attach.is_some() {
            "yod qk_attach (QK fabric)"
        } else {
            ""
        }
    );
    for &n in &a.ranks {
        let ns = n.to_string();
        let mut series: Vec<Vec<f64>> = vec![Vec::new(); 5];
        for _ in 0..a.repeats {
            let mut cmds: Vec<Command> = Vec::new();
            let mut c = Command::new(&yod);
            c.args(["-n", &ns]).arg(&hello);
            cmds.push(c);
            let mut c = Command::new(&yod);
            c.args(["-n", &ns, "sh", "-c", "echo hello from $PUMA_RANK"]);
            cmds.push(c);
            let mut c = Command::new(&yod);
            c.args([
                "-n",
                &ns,
                "--pct-config",
                &memfd_arg,
                "sh",
                "-c",
                "echo hello from $PUMA_RANK",
            ]);
            cmds.push(c);
            let mut slot = vec![0, 1, 2];
            if mpi {
                let mut c = Command::new(&mpiexec);
                c.args(["-n", &ns, "sh", "-c", "echo hello from $PMI_RANK"]);
                cmds.push(c);
                slot.push(3);
            }
            if let Some(p) = &attach {
                let mut c = Command::new(&yod);
                c.args(["-n", &ns]).arg(p);
                cmds.push(c);
                slot.push(4);
            }
            for (i, c) in cmds.iter_mut().enumerate() {
                match time_once(c, n) {
                    Ok(t) => series[slot[i]].push(t),
                    Err(e) => {
                        eprintln!("yod-bench: {e}");
                        let _ = std::fs::remove_file(&memfd_cfg);
                        std::process::exit(1);
                    }
                }
            }
        }
        let fmt = |v: &mut Vec<f64>| -> (String, f64) {
            if v.is_empty() {
                return ("-".into(), f64::NAN);
            }
            let s = stats(v);
            (
                format!("{:.4}/{:.4}/{:.4}", s.min, s.median, s.max),
                s.median,
            )
        };
        let (a0, _) = fmt(&mut series[0]);
        let (a1, m1) = fmt(&mut series[1]);
        let (a2, m2) = fmt(&mut series[2]);
        let (a3, m3) = fmt(&mut series[3]);
        let (a4, _) = if attach.is_some() {
            fmt(&mut series[4])
        } else {
            (String::new(), f64::NAN)
        };
        let r = |m: f64| {
            if mpi {
                format!("{:.2}x", m3 / m)
            } else {
                "-".into()
            }
        };
        let (ratio, ratio2) = (r(m1), r(m2));
        println!(
            "{n:>6}  {a0:>26}  {a1:>26}  {a2:>26}  {a3:>26}  {ratio:>8}  {ratio2:>8}  {a4:>26}"
        );
    }
    println!("ratio = median mpiexec / median yod for the same sh-echo program (QK fabric, memfd segment); > 1 means yod is faster");
    if attach.is_some() {
        println!("qk_attach: every rank maps, locks and prefaults its node's QK region (qk::Endpoint::from_env), as a messaging rank will");
    }
    let _ = std::fs::remove_file(&memfd_cfg);
    if a.no_memory {
        return;
    }
    let idle = match idle_pct_rss(&yod) {
        Ok(r) => {
            println!("\nPCT resident memory, idle: {r} KiB");
            r
        }
        Err(e) => {
            println!("\nPCT idle RSS: not measured ({e})");
            0
        }
    };
    println!("memory while a job of sleeping ranks runs (with 2 PCTs the QK node engine maps the region, which then counts in PCT KiB):");
    println!(
        "{:>6}  {:>10}  {:>10}  {:>14}  {:>22}  {:>16}",
        "ranks", "yod KiB", "PCT KiB", "segment KiB", "(PCT - idle) KiB/rank", "segment KiB/rank"
    );
    for n in [8u32, 256] {
        for (label, extra) in [
            ("qk", vec![]),
            ("memfd", vec!["--pct-config", memfd_arg.as_str()]),
        ] {
            let _ = std::fs::write(&memfd_cfg, "fabric = \"memfd\"\n");
            match memory_during_job(&yod, n, &extra) {
                Ok(m) => {
                    let nodes = n.div_ceil(pct::resources::MAX_LOCAL_RANKS) as u64;
                    let own = m.pct_kib as f64 - (idle * nodes) as f64;
                    println!(
                        "{n:>6}  {:>10}  {:>10}  {:>14}  {:>22.1}  {:>16.1}   ({label}, {nodes} PCT)",
                        m.yod_kib,
                        m.pct_kib,
                        m.segment_bytes / 1024,
                        own / n as f64,
                        m.segment_bytes as f64 / 1024.0 / n as f64
                    )
                }
                Err(e) => println!("{n:>6}  not measured: {e}"),
            }
        }
    }
    let _ = std::fs::remove_file(&memfd_cfg);
}
