//! End-to-end tests of the `puma-noise` command line.

use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_puma-noise"))
}

fn last_cpu() -> usize {
    *noise::sys::allowed_cpus().last().unwrap_or(&0)
}

#[test]
fn exclusive_ftq_writes_aligned_csv_that_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run.csv");
    let cpu = last_cpu();
    let st = bin()
        .args([
            "ftq",
            "--cpu",
            &cpu.to_string(),
            "--duration",
            "300ms",
            "--interval",
            "1ms",
            "-o",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.starts_with("# puma-noise ftq v1\n"));
    let run = noise::format::load_ftq(&out).unwrap();
    assert_eq!(run.interval_ns, 1_000_000);
    assert_eq!(run.cpus, vec![cpu]);
    assert_eq!(run.counts[0].len(), 300);
    // A 1 ms interval of ~1 µs quanta holds roughly a thousand quanta.
    assert!(
        (500..2000).contains(&run.nominal_count),
        "nominal {}",
        run.nominal_count
    );
    assert!(run.quantum_ns > 500.0 && run.quantum_ns < 2000.0);
}

#[test]
fn bad_arguments_give_clear_errors() {
    let out = bin()
        .args(["ftq", "--duration", "ten seconds"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid duration"), "{err}");
    let out = bin()
        .args(["ftq", "--cpu", "4096", "--duration", "10ms"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not available"));
    assert!(!Path::new("nonexistent").exists());
}
