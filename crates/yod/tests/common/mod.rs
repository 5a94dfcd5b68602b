//! Helpers for the end-to-end tests: build the hello example, run the real yod,
//! look for leftovers in /proc and /dev/shm.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn yod() -> &'static str {
    env!("CARGO_BIN_EXE_yod")
}

/// target/<profile>/examples/hello, built on first use.
pub fn hello() -> PathBuf {
    static HELLO: OnceLock<PathBuf> = OnceLock::new();
    HELLO.get_or_init(|| example("puma", "hello")).clone()
}

/// target/<profile>/examples/qk_attach (a rank that attaches to the QK fabric).
pub fn qk_attach() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| example("pct", "qk_attach")).clone()
}

/// target/<profile>/qk-test-rank (the QK's test rank, run here as a real rank).
pub fn qk_test_rank() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| build("qk", "--bin", "qk-test-rank"))
        .clone()
}

/// A shell script for 2 ranks: rank 0 is the target, rank 1 the initiator of the
/// QK's "kinds" scenario (puts, gets, acks, large messages) through the fabric.
pub fn qk_pair_script() -> String {
    let b = qk_test_rank().display().to_string();
    format!(
        "if [ $PUMA_RANK = 0 ]; then exec {b} --fd $PUMA_QK_FD --port $PUMA_LOCAL_RANK portals --job $PUMA_JOB kinds-target --peer 1 --large 65536; \
         else exec {b} --fd $PUMA_QK_FD --port $PUMA_LOCAL_RANK portals --job $PUMA_JOB kinds-initiator --peer 0 --large 65536; fi"
    )
}

fn example(pkg: &str, name: &str) -> PathBuf {
    build(pkg, "--example", name)
}

fn build(pkg: &str, kind: &str, name: &str) -> PathBuf {
    {
        {
            let bin = Path::new(yod()).parent().unwrap().to_path_buf();
            let target_dir = bin.parent().unwrap().to_path_buf();
            let profile = bin.file_name().unwrap().to_str().unwrap().to_string();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--quiet", "-p", pkg, kind, name])
                .arg("--target-dir")
                .arg(&target_dir);
            if profile == "release" {
                cmd.arg("--release");
            }
            let st = cmd.status().expect("run cargo to build the hello example");
            assert!(st.success(), "building {name} failed");
            let p = if kind == "--example" {
                bin.join("examples").join(name)
            } else {
                bin.join(name)
            };
            assert!(p.is_file(), "{} missing", p.display());
            p
        }
    }
}

pub fn run_yod(args: &[&str]) -> Output {
    Command::new(yod())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run yod")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A unique marker to find a test's processes in /proc by their command line.
pub fn marker(tag: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("puma-test-{tag}-{}-{t}", std::process::id())
}

/// Pids whose command line contains `needle`.
pub fn procs_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let me = std::process::id();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&c).contains(needle) {
                // Zombies awaiting their reaper are not "left behind" once reaped; count them too.
                out.push(pid);
            }
        }
    }
    out
}

/// memfds of the runtime (`memfd:puma-job-<id>` job segments, `memfd:puma-qk-job<id>`
/// QK regions) whose name contains `job_part`, held by any process.
pub fn memfds_with(job_part: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(l) = std::fs::read_link(fd.path()) {
                let l = l.to_string_lossy().into_owned();
                if l.contains("memfd:puma-") && l.contains(job_part) {
                    out.push(format!("{}: {l}", e.path().display()));
                }
            }
        }
    }
    out
}

/// Runtime memfds held by the given processes.
pub fn memfds_held_by(pids: &[u32]) -> Vec<String> {
    let mut out = Vec::new();
    for p in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{p}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(l) = std::fs::read_link(fd.path()) {
                let l = l.to_string_lossy().into_owned();
                if l.contains("memfd:puma-") {
                    out.push(format!("{p}: {l}"));
                }
            }
        }
    }
    out
}

/// Entries of /dev/shm that look like ours.
pub fn shm_entries() -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("puma"))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `f` holds or the timeout passes; returns whether it held.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pids whose environment contains `KEY=VALUE` (our tests mark jobs this way;
/// ranks, their children, yod and its PCTs all inherit it).
pub fn procs_with_env(kv: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let me = std::process::id();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(env) = std::fs::read(e.path().join("environ")) {
            if env.split(|&b| b == 0).any(|v| v == kv.as_bytes()) {
                out.push(pid);
            }
        }
    }
    out
}

/// The job id from yod's "ending job ID" / "tearing down job ID" message.
pub fn job_id_from(stderr: &str) -> Option<String> {
    stderr
        .split_whitespace()
        .skip_while(|w| *w != "job")
        .nth(1)
        .map(|s| {
            s.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
}
