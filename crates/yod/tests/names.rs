//! The name server from inside ranks, through yod: a job registers a name that
//! its other ranks and another job look up; the other job can neither
//! overwrite nor unregister it; the name goes when its job ends. Both jobs run
//! on one multi-tasking PCT named in a partition file.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

struct Pct(std::process::Child);

impl Drop for Pct {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_pct(dir: &Path, key: &Path) -> (Pct, String) {
    let cfg = dir.join("pct.toml");
    std::fs::write(&cfg, "tasking = \"multi\"\nfabric = \"memfd\"\n").unwrap();
    let addr = format!("unix:{}", dir.join("pct.sock").display());
    let mut child = Command::new(yod())
        .args(["pct", "serve", "--name", "n0", "--listen", &addr, "--key"])
        .arg(key)
        .arg("--config")
        .arg(&cfg)
        .arg("--run-dir")
        .arg(dir.join("run"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("listening on"), "{line}");
    (Pct(child), addr)
}

fn yod_on(dir: &Path, part: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(yod());
    c.arg("--partition")
        .arg(part)
        .args(args)
        .env("XDG_STATE_HOME", dir.join("state"))
        .stdin(Stdio::null());
    c
}

#[test]
fn ranks_register_and_look_up_names_and_another_job_cannot_take_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = d.join("cluster.key");
    assert!(Command::new(yod())
        .args(["keygen", "--out"])
        .arg(&key)
        .status()
        .unwrap()
        .success());
    let (_pct, addr) = start_pct(d, &key);
    let part = d.join("partition.toml");
    std::fs::write(
        &part,
        format!(
            "name = \"names{}\"\nkey = \"{}\"\n[topology]\nkind = \"mesh\"\ndims = [1]\n\n\
             [[node]]\nname = \"n0\"\nrole = \"compute\"\naddress = \"{addr}\"\ncoords = [0]\n",
            std::process::id(),
            key.display()
        ),
    )
    .unwrap();
    let y = yod();
    let (registered, stop) = (d.join("registered"), d.join("stop"));
    // Job A: rank 0 registers "svc" (portal 7); rank 1 waits until it can look it
    // up; both stay until the test says stop.
    let job_a = format!(
        "if [ $PUMA_RANK = 0 ]; then {y} pct name register svc --portal 7 || exit 10; touch {reg}; \
         else i=0; until {y} pct name lookup svc; do i=$((i+1)); [ $i -gt 400 ] && exit 11; sleep 0.05; done; fi; \
         i=0; while [ ! -e {stop} ]; do i=$((i+1)); [ $i -gt 1200 ] && exit 12; sleep 0.05; done",
        reg = registered.display(),
        stop = stop.display()
    );
    let a = yod_on(d, &part, &["-n", "2", "--label", "sh", "-c", &job_a])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let up = wait_for(Duration::from_secs(30), || registered.exists());
    if !up {
        let out = a.wait_with_output().unwrap();
        panic!(
            "job A never registered its name\n{}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    // Job B (another job on the same PCT): sees the name, cannot take it.
    let job_b = format!(
        "{y} pct name lookup svc; \
         {y} pct name register svc --portal 9 && echo OVERWROTE; \
         {y} pct name unregister svc && echo UNREGISTERED; \
         {y} pct name register mine --portal 3 && echo registered-mine; \
         {y} pct name lookup svc"
    );
    let b = yod_on(d, &part, &["-n", "1", "sh", "-c", &job_b])
        .output()
        .unwrap();
    std::fs::write(&stop, "").unwrap();
    let (bo, be) = (text(&b.stdout), text(&b.stderr));
    assert!(b.status.success(), "{bo}\n{be}");
    assert!(
        !bo.contains("OVERWROTE") && !bo.contains("UNREGISTERED"),
        "{bo}\n{be}"
    );
    assert!(bo.contains("registered-mine"), "{bo}\n{be}");
    assert_eq!(
        bo.lines().filter(|l| l.contains(r#""portal":7"#)).count(),
        2,
        "{bo}\n{be}"
    );
    assert_eq!(
        be.matches("belongs to another job").count(),
        2,
        "{bo}\n{be}"
    );

    let a = a.wait_with_output().unwrap();
    let (ao, ae) = (text(&a.stdout), text(&a.stderr));
    assert!(a.status.success(), "{ao}\n{ae}");
    // Rank 1 found rank 0's entry: node 0, portal 7.
    assert!(
        ao.lines().any(|l| l.starts_with("1: ")
            && l.contains(r#""node":"0""#)
            && l.contains(r#""portal":7"#)),
        "{ao}\n{ae}"
    );

    // Both jobs are over: their names went with them (the administrator, with
    // the cluster key, finds neither).
    for name in ["svc", "mine"] {
        let look = Command::new(y)
            .args(["pct", "name", "--connect", &addr, "--key"])
            .arg(&key)
            .args(["lookup", name])
            .output()
            .unwrap();
        assert_eq!(look.status.code(), Some(1), "{name}: {look:?}");
    }
    // Outside a rank there is no job credential: a clear error, not a crash.
    let bare = Command::new(y)
        .args(["pct", "name", "lookup", "svc"])
        .env_remove("PUMA_PCT")
        .env_remove("PUMA_JOB_CRED")
        .output()
        .unwrap();
    assert_eq!(bare.status.code(), Some(1));
    assert!(
        text(&bare.stderr).contains("PUMA_"),
        "{}",
        text(&bare.stderr)
    );
}
