//! `puma-coll-bench` refuses requests that measure nothing and fails when our side cannot run.

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_puma-coll-bench"))
        .args(args)
        .args(["--peers", "/nonexistent"])
        .output()
        .unwrap()
}

#[test]
fn bad_requests_are_refused_and_a_failed_run_is_an_error() {
    for (args, want) in [
        (&["--ranks", "0"][..], "0 is not in 2.."),
        (&["--ranks", "2,1"][..], "1 is not in 2.."),
        (&["--reps", "0"][..], "0 is not in 1.."),
        (&["--target-ms", "0"][..], "0 is not in 1.."),
        (
            &["--ops", "barrier,gather"][..],
            "--ops: unknown operation `gather`",
        ),
    ] {
        let out = bench(args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        // Refused before any launch: no table header.
        assert!(
            out.stdout.is_empty(),
            "{args:?} started: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // Our side missing: the table is empty and the exit status says so.
    let out = bench(&[
        "--bin-dir",
        "/nonexistent",
        "--ranks",
        "2",
        "--ops",
        "barrier",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("cannot run /nonexistent/yod"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("our runs failed"));
}
