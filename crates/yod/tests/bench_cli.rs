//! `yod-bench` refuses counts that would measure nothing before it launches anything.

use std::process::Command;

#[test]
fn zero_repeats_or_a_zero_job_size_are_refused_before_any_launch() {
    for args in [
        &["--repeats", "0"][..],
        &["--ranks", "0"][..],
        &["--ranks", "8,0,64"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_yod-bench"))
            .args(args)
            .arg("--no-memory")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("must be at least 1"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?} printed a table");
    }
}
