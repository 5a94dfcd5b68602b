//! Drives the bare-metal QK from hosted tests: builds `metal/` with its own
//! script and target directory, boots it in QEMU (TCG, serial on stdio,
//! isa-debug-exit for the status), and analyses FTQ counts.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What went wrong while building or running the QK.
#[derive(Debug, thiserror::Error)]
pub enum MetalError {
    /// `metal/build.sh` could not be started or failed.
    #[error("building the QK failed: {0}")]
    Build(String),
    /// QEMU could not be started.
    #[error("cannot start {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    /// QEMU did not finish in time (it was killed).
    #[error("QEMU ran longer than {0:?} and was killed; output so far:\n{1}")]
    Timeout(Duration, String),
    /// I/O on QEMU's pipes failed.
    #[error("I/O with QEMU failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The QEMU binary the tests use.
pub const QEMU: &str = "qemu-system-x86_64";

/// Is QEMU installed? Tests skip with a printed reason when it is not.
pub fn qemu_available() -> bool {
    Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The `metal/` directory of this repository.
pub fn metal_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../metal")
}

/// Builds the QK image (user programs embedded) and returns its path.
pub fn build_kernel() -> Result<PathBuf, MetalError> {
    let script = metal_dir().join("build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .map_err(|e| MetalError::Build(format!("cannot run {}: {e}", script.display())))?;
    if !out.status.success() {
        return Err(MetalError::Build(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned();
    if path.is_empty() || !Path::new(&path).exists() {
        return Err(MetalError::Build(format!(
            "build.sh printed no kernel path (got {path:?})"
        )));
    }
    Ok(PathBuf::from(path))
}

/// How one QEMU run ended.
#[derive(Debug, Clone)]
pub struct Run {
    /// Serial console output.
    pub output: String,
    /// QEMU's exit status (`code * 2 + 1` for isa-debug-exit writes).
    pub status: Option<i32>,
}

impl Run {
    /// Did the PCT finish its script and shut the node down normally (code 0x10)?
    pub fn clean_shutdown(&self) -> bool {
        self.status == Some(0x10 * 2 + 1)
    }
}

/// The QEMU command line for one node booting `kernel` with `append`.
pub fn qemu_command(kernel: &Path, append: &str, extra: &[String]) -> Command {
    let mut c = Command::new(QEMU);
    c.args([
        "-machine", "pc", "-cpu", "qemu64", "-m", "256M", "-accel", "tcg", "-display", "none",
    ])
    .args([
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-no-reboot",
        "-nodefaults",
    ])
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
    .arg("-kernel")
    .arg(kernel)
    .args(["-append", append])
    .args(extra)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

/// Spawns QEMU (see [`qemu_command`]).
pub fn spawn(kernel: &Path, append: &str, extra: &[String]) -> Result<Child, MetalError> {
    qemu_command(kernel, append, extra)
        .spawn()
        .map_err(|source| MetalError::Spawn {
            cmd: QEMU.into(),
            source,
        })
}

/// Waits for a spawned QEMU with a deadline, killing it when the deadline passes.
pub fn finish(mut child: Child, timeout: Duration) -> Result<Run, MetalError> {
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("no stdout pipe"))?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or_else(|| std::io::Error::other("no stderr pipe"))?;
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    let ereader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut output = String::from_utf8_lossy(&reader.join().unwrap_or_default()).into_owned();
    let err = String::from_utf8_lossy(&ereader.join().unwrap_or_default()).into_owned();
    if !err.trim().is_empty() {
        output.push_str("\n[qemu stderr] ");
        output.push_str(&err);
    }
    match status {
        None => Err(MetalError::Timeout(timeout, output)),
        Some(st) => Ok(Run {
            output,
            status: st.code(),
        }),
    }
}

/// Boots one node and waits for it.
pub fn run(kernel: &Path, append: &str, timeout: Duration) -> Result<Run, MetalError> {
    finish(spawn(kernel, append, &[])?, timeout)
}

/// A shared-memory file for ivshmem between two QEMU instances, removed on drop.
pub struct SharedMemory {
    path: PathBuf,
}

impl SharedMemory {
    /// Creates a zeroed file of `size` bytes in /dev/shm (or the temp dir).
    pub fn create(tag: &str, size: u64) -> Result<Self, MetalError> {
        let dir = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("metal-{tag}-{}", std::process::id()));
        let f = std::fs::File::create(&path)?;
        f.set_len(size)?;
        Ok(SharedMemory { path })
    }

    /// QEMU arguments that attach this file as an ivshmem-plain device.
    pub fn qemu_args(&self) -> Vec<String> {
        vec![
            "-object".into(),
            format!(
                "memory-backend-file,id=shm,share=on,mem-path={},size=1M",
                self.path.display()
            ),
            "-device".into(),
            "ivshmem-plain,memdev=shm".into(),
        ]
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Boots two nodes sharing one ivshmem region, both with `append` plus
/// `node=<n>`, and waits for both.
pub fn run_two_nodes(
    kernel: &Path,
    append: &str,
    timeout: Duration,
) -> Result<(Run, Run), MetalError> {
    let shm = SharedMemory::create("2node", 1 << 20)?;
    let extra = shm.qemu_args();
    let a = spawn(kernel, &format!("node=0 {append}"), &extra)?;
    let b = match spawn(kernel, &format!("node=1 {append}"), &extra) {
        Ok(b) => b,
        Err(e) => {
            let _ = finish(a, Duration::from_millis(1));
            return Err(e);
        }
    };
    let ra = finish(a, timeout);
    let rb = finish(b, timeout);
    drop(shm);
    Ok((ra?, rb?))
}

/// Power spectrum of `x` (mean removed) by a direct DFT: bins 1..n/2.
pub fn power_spectrum(x: &[f64]) -> Vec<f64> {
    let n = x.len();
    if n < 4 {
        return Vec::new();
    }
    let mean = x.iter().sum::<f64>() / n as f64;
    (1..=n / 2)
        .map(|k| {
            let (mut re, mut im) = (0.0, 0.0);
            for (t, v) in x.iter().enumerate() {
                let a = -2.0 * std::f64::consts::PI * (k * t % n) as f64 / n as f64;
                re += (v - mean) * a.cos();
                im += (v - mean) * a.sin();
            }
            (re * re + im * im) / n as f64
        })
        .collect()
}

/// Lowest DFT bin considered: a periodic interference must repeat at least
/// this many times in the run; slower changes (warm-up, drift) are trends.
pub const MIN_BIN: usize = 8;

/// One line of an FTQ spectrum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Line {
    /// DFT bin (cycles per run).
    pub bin: usize,
    /// Power divided by the median power of bins >= [`MIN_BIN`].
    pub ratio: f64,
    /// Amplitude of the sinusoid at this bin relative to the mean count: how
    /// much work the periodic component takes away, as a fraction.
    pub rel_amplitude: f64,
}

/// All lines at or above [`MIN_BIN`], strongest first.
pub fn lines(x: &[f64]) -> Vec<Line> {
    let p = power_spectrum(x);
    if p.len() <= MIN_BIN {
        return Vec::new();
    }
    let n = x.len() as f64;
    let mean = (x.iter().sum::<f64>() / n).abs().max(f64::MIN_POSITIVE);
    let mut sorted = p[MIN_BIN - 1..].to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2].max(f64::MIN_POSITIVE);
    let mut out: Vec<Line> = p
        .iter()
        .enumerate()
        .skip(MIN_BIN - 1)
        .map(|(i, v)| Line {
            bin: i + 1,
            ratio: v / median,
            rel_amplitude: 2.0 * (v / n).sqrt() / mean,
        })
        .collect();
    out.sort_by(|a, b| b.ratio.total_cmp(&a.ratio));
    out
}

/// A line this many times above the median power counts as periodic ...
pub const PEAK_LIMIT: f64 = 60.0;
/// ... when its amplitude is at least this fraction of the mean count (0.1 %).
pub const MIN_AMPLITUDE: f64 = 1e-3;

/// The strongest periodic interference: the line with the highest ratio
/// among those whose amplitude is at least `min_rel_amplitude` of the mean
/// (smaller ones cost nothing measurable, e.g. the +-1 count aliasing of a
/// loop against the quantum).
pub fn interference(x: &[f64], min_rel_amplitude: f64) -> Option<Line> {
    lines(x)
        .into_iter()
        .find(|l| l.rel_amplitude >= min_rel_amplitude)
}

/// The strongest line at or above [`MIN_BIN`]: `(bin, power / median power)`.
pub fn peak_ratio(x: &[f64]) -> Option<(usize, f64)> {
    lines(x).first().map(|l| (l.bin, l.ratio))
}

/// FTQ quantum in TSC ticks; the same value as the bare-metal sampler
/// (metal/user/src/bin/ftq.rs).
pub const FTQ_QUANTUM_TSC: u64 = 250_000;

fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the time-stamp counter; it is available on
    // every x86-64 CPU and user-readable under Linux.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The FTQ sampler of metal/user/src/bin/ftq.rs, run as a Linux process:
/// counts loop iterations in `n` back-to-back quanta of [`FTQ_QUANTUM_TSC`].
pub fn ftq_linux(n: usize) -> Vec<f64> {
    let mut counts = Vec::with_capacity(n);
    let mut end = rdtsc() + FTQ_QUANTUM_TSC;
    for _ in 0..n {
        let mut work = 0u32;
        while rdtsc() < end {
            work = work.wrapping_add(1);
            std::hint::black_box(work);
        }
        counts.push(f64::from(work));
        end += FTQ_QUANTUM_TSC;
    }
    counts
}

/// Extracts FTQ counts from lines `ftq: count <n>` ... in QEMU output.
pub fn ftq_counts(output: &str) -> Vec<f64> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("ftq: counts "))
        .flat_map(|l| l.split_whitespace().filter_map(|w| w.parse::<f64>().ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spectrum_finds_a_periodic_dip_and_not_noise() {
        // Deterministic pseudo-noise plus a dip every 10th sample.
        let mut s = 12345u64;
        let noise: Vec<f64> = (0..1000)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                1000.0 + ((s >> 33) % 50) as f64
            })
            .collect();
        let (_, flat) = peak_ratio(&noise).unwrap();
        let ticked: Vec<f64> = noise
            .iter()
            .enumerate()
            .map(|(i, v)| if i % 10 == 0 { v - 100.0 } else { *v })
            .collect();
        let (bin, peak) = peak_ratio(&ticked).unwrap();
        assert!(flat < 30.0, "noise alone gave ratio {flat}");
        assert!(peak > 100.0, "tick gave ratio {peak}");
        assert_eq!(
            bin % 100,
            0,
            "peak at bin {bin}, expected a multiple of n/10"
        );
    }

    #[test]
    fn counts_are_parsed() {
        assert_eq!(
            ftq_counts("x\nftq: counts 1 2 3\nftq: counts 4\n"),
            vec![1.0, 2.0, 3.0, 4.0]
        );
    }
}
