//! `puma-bench` refuses a request it cannot measure before it starts anything.

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_puma-bench"))
        .args(args)
        // No peers there: a request that got past the checks would print "peer absent".
        .args(["--peers", "/nonexistent"])
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
