//! Runs the example programs through the real yod (and the PCT it starts).
//!
//! Cargo gives integration tests only their own package's binaries, so the first test to need
//! them runs `cargo build -p yod -p pct -p puma --bins --examples` into this test's target
//! directory (a no-op when they are fresh; cargo's lock serialises concurrent test processes).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// target/<profile>, found from this test executable (target/<profile>/deps/<test>).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps layout")
        .to_path_buf()
}

/// Builds yod, the PCT and the examples once per test process.
pub fn bins() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = profile_dir();
        let target = dir.parent().expect("target dir").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "yod",
            "-p",
            "pct",
            "-p",
            "puma",
            "--bins",
            "--examples",
        ])
        .arg("--target-dir")
        .arg(&target);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let st = cmd
            .status()
            .expect("run cargo build for yod and the examples");
        assert!(
            st.success(),
            "building yod, pct and the puma examples failed"
        );
        dir
    })
}

pub fn example(name: &str) -> String {
    bins().join("examples").join(name).display().to_string()
}

/// `yod -n N [yod args] EXAMPLE [args]`.
pub fn yod(n: u32, yod_args: &[&str], name: &str, args: &[&str]) -> Output {
    yod_env(n, yod_args, name, args, &[])
}

pub fn yod_env(
    n: u32,
    yod_args: &[&str],
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let yod = bins().join("yod");
    Command::new(yod)
        .arg("-n")
        .arg(n.to_string())
        .args(yod_args)
        .arg(example(name))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run yod")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs and insists on success; returns stdout.
pub fn ok(n: u32, yod_args: &[&str], name: &str, args: &[&str]) -> String {
    let out = yod(n, yod_args, name, args);
    let so = text(&out.stdout);
    assert!(
        out.status.success(),
        "yod -n {n} {yod_args:?} {name} {args:?} failed: {:?}\nstdout:\n{so}\nstderr:\n{}",
        out.status,
        text(&out.stderr)
    );
    so
}
