//! The Slurm path end to end with a stand-in `srun` (Slurm itself is not
//! installed here): yod expands SLURM_JOB_NODELIST, starts the PCTs through
//! `srun`, connects to them over TCP and runs the job. The stand-in runs the
//! step's command locally, on loopback instead of all interfaces.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

#[test]
fn yod_inside_an_allocation_starts_pcts_with_srun() {
    if Command::new("bash").arg("--version").output().is_err() {
        println!("SKIPPED: bash is needed for the stand-in srun");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let srun = dir.path().join("srun");
    std::fs::write(
        &srun,
        "#!/bin/bash\n# stand-in srun: drop the options, run the step here, loopback only\n\
         while [[ $1 == --* ]]; do shift; done\nexec \"${@//0.0.0.0/127.0.0.1}\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&srun, std::fs::Permissions::from_mode(0o755)).unwrap();
    let key = dir.path().join("cluster.key");
    assert!(Command::new(yod())
        .args(["keygen", "--out"])
        .arg(&key)
        .status()
        .unwrap()
        .success());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let hello = hello().display().to_string();
    let out = Command::new(yod())
        .args(["-n", "3", "--pct-port", &port, "-v", &hello])
        .env("PATH", path)
        .env("SLURM_JOB_NODELIST", "localhost")
        .env("PUMA_KEY", &key)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let so = text(&out.stdout);
    let se = text(&out.stderr);
    assert!(out.status.success(), "{so}\n{se}");
    assert!(se.contains("starting PCTs: srun --nodes=1"), "{se}");
    assert_eq!(so.lines().count(), 3, "{so}");
    assert!(so.lines().all(|l| l.contains("(localhost)")), "{so}");
    // The PCT was stopped politely and removed its run directory.
    let uid = rustix::process::getuid().as_raw();
    let run = std::env::temp_dir().join(format!("puma-pct-{uid}-localhost"));
    assert!(
        wait_for(std::time::Duration::from_secs(2), || !run.exists()),
        "{} left behind",
        run.display()
    );
}

#[test]
fn a_bad_node_list_is_a_clear_error() {
    let out = Command::new(yod())
        .args(["-n", "1", "true"])
        .env("SLURM_JOB_NODELIST", "n[3-1]")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("bad Slurm node list"),
        "{}",
        text(&out.stderr)
    );
}
