//! `puma-bench` refuses a request it cannot measure before it starts anything.

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_puma-bench"))
        // No peers there: a request that got past the checks would print "peer absent". (Given
        // first, so that it stays an option of the benchmark when `args` name a subcommand.)
        .args(["--peers", "/nonexistent"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn requests_that_select_nothing_are_refused_before_any_run() {
    for (args, want) in [
        (&["--sizes", "x"][..], "--sizes wants byte counts"),
        (&["--only", "latency"][..], "unknown measurement `latency`"),
        (
            &["--only", "rate", "--sizes", "3"][..],
            "nothing to measure",
        ),
        (
            &["--sizes", "99999999999"][..],
            "more than this benchmark sends",
        ),
        (&["--reps", "0"][..], "--reps must be at least 1"),
        (&["--scale", "0"][..], "--scale must be a number above 0"),
        (&["--scale=-1"][..], "--scale must be a number above 0"),
        (&["--scale", "nan"][..], "--scale must be a number above 0"),
        (&["--scale", "inf"][..], "--scale must be a number above 0"),
        (&["--modes", "boiler"][..], "--modes: unknown mode `boiler`"),
        (&["--modes", ","][..], "--modes names no mode"),
        (&["--sources", ""][..], "--sources names no source"),
        (&["--sources", "disk"][..], "--sources: unknown source"),
        (&["--queue-bytes", "3000"][..], "--queue-bytes: "),
        (&["cost", "--window", "0"][..], "must be at least 1"),
        (&["cost", "--reps", "0"][..], "must be at least 1"),
        (&["ring", "--iters", "0"][..], "must be at least 1"),
    ] {
        let out = bench(args);
        let err = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            !stdout.contains("peer absent"),
            "{args:?} looked for peers: {stdout}"
        );
    }
}

/// A contender that fails is reported, the others' figures are still printed, and the exit status
/// says the tables are incomplete. The failing contender is an "MPICH" whose launcher (a script
/// first on PATH) exits with an error.
#[test]
fn a_failed_run_is_reported_and_makes_the_exit_status_non_zero() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("puma-bench-fail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let launcher = dir.join("mpirun.mpich");
    std::fs::write(&launcher, "#!/bin/sh\necho launcher refuses >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&launcher, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.join("mpi_peer.mpich"), "").unwrap();
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_puma-bench"))
        .args(["--peers"])
        .arg(&dir)
        .args([
            "--reps", "2", "--scale", "0.01", "--only", "lat", "--sizes", "0",
        ])
        .args(["--modes", "heater"])
        .env("PATH", path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}\n{err}");
    assert!(err.contains("MPICH one-way latency 0 B"), "{err}");
    assert!(err.contains("2 of 4 runs failed"), "{err}");
    assert!(
        stdout.contains("MPICH") && stdout.contains("no result"),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("qk heater") && l.contains("median")),
        "{stdout}"
    );
}

/// `ring` bounces real records through qk's rings (each side checks every payload it takes) and
/// prints the one-way time.
#[test]
fn the_ring_floor_bounces_checked_messages_between_the_two_cpus() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        println!("skipped: `puma-bench ring` needs two CPUs, this machine offers {cpus}");
        return;
    }
    let out = bench(&["ring", "--iters", "2000", "--reps", "2"]);
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{so}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        so.contains("qk ring ping-pong") && so.contains("one-way min"),
        "{so}"
    );
}
