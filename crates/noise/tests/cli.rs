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
    // A zero interval is named as the fault, not the duration it cannot divide.
    let out = bin()
        .args(["ftq", "--duration", "1s", "--interval", "0ns"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid interval"), "{err}");
    // A run of no time at all is refused rather than reported as a machine without noise.
    for mode in ["detour", "fwq", "fig1"] {
        let out = bin().args([mode, "--duration", "0s"]).output().unwrap();
        assert!(!out.status.success(), "{mode}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("invalid duration `0 ns`"), "{mode}: {err}");
    }
}

#[test]
fn unwritable_outputs_are_refused_before_sampling_starts() {
    // An hour-long run must not end in "cannot write": each of these would sample for an hour
    // if the output were not checked first, so a quick refusal is the proof.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/run.csv");
    for mode in ["ftq", "detour", "fwq", "fig1"] {
        let t0 = std::time::Instant::now();
        let out = bin()
            .args([
                mode,
                "--cpu",
                &last_cpu().to_string(),
                "--duration",
                "3600s",
            ])
            .arg("-o")
            .arg(&missing)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{mode}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("does not exist"), "{mode}: {err}");
        assert!(
            t0.elapsed().as_secs() < 60,
            "{mode} sampled before refusing"
        );
    }
    // A report directory below a plain file cannot be made.
    std::fs::write(dir.path().join("file-not-dir"), b"x").unwrap();
    let out = bin()
        .args([
            "ftq",
            "--cpu",
            &last_cpu().to_string(),
            "--duration",
            "3600s",
        ])
        .arg("--report")
        .arg(dir.path().join("file-not-dir/rep"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("file-not-dir"));
}

fn synthetic_run(path: &Path, trains: &[noise::analysis::PulseTrain]) {
    let counts = noise::analysis::synth_counts(8000, 1_000_000, 1000, trains);
    let run = noise::FtqRun {
        interval_ns: 1_000_000,
        quantum_ns: 1000.0,
        nominal_count: 1000,
        cpus: vec![0],
        counts: vec![counts],
        meta: vec![("mode".into(), "ftq".into())],
    };
    noise::format::save_ftq(&run, path).unwrap();
}

#[test]
fn analyze_report_compare_and_convert_end_to_end() {
    use noise::analysis::PulseTrain;
    let dir = tempfile::tempdir().unwrap();
    let quiet = dir.path().join("quiet.csv");
    let noisy = dir.path().join("noisy.csv");
    synthetic_run(&quiet, &[]);
    synthetic_run(
        &noisy,
        &[PulseTrain {
            freq_hz: 100.0,
            width_ns: 200e3,
            phase_ns: 2e6,
        }],
    );
    let rep = dir.path().join("report");
    let out = bin()
        .arg("analyze")
        .arg(&noisy)
        .arg("--report")
        .arg(&rep)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("noise fraction 2.000 %"), "{text}");
    assert!(text.contains("100.000"), "{text}");
    for f in [
        "report.html",
        "series.svg",
        "spectrum.svg",
        "cepstrum.svg",
        "detours.svg",
    ] {
        let body = std::fs::read_to_string(rep.join(f)).unwrap();
        assert!(body.len() > 200, "{f} too small");
    }
    let html = std::fs::read_to_string(rep.join("report.html")).unwrap();
    assert!(html.contains("<img src=\"spectrum.svg\"") && html.contains("100.000 Hz"));

    // Binary conversion round trip keeps the analysis identical.
    let bin_path = dir.path().join("noisy.ftq");
    assert!(bin()
        .arg("convert")
        .arg(&noisy)
        .arg(&bin_path)
        .status()
        .unwrap()
        .success());
    let again = bin().arg("analyze").arg(&bin_path).output().unwrap();
    let summary = text.split("\nreport:").next().unwrap();
    assert_eq!(String::from_utf8_lossy(&again.stdout), summary);

    // Compare: the 100 Hz source is new, 2 % added; with a 0.1 % limit that is a FAIL (exit 3).
    let out = bin()
        .arg("compare")
        .arg(&quiet)
        .arg(&noisy)
        .args(["--max-added", "0.1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("NEW in B") && text.contains("FAIL"), "{text}");
    let out = bin()
        .arg("compare")
        .arg(&quiet)
        .arg(&quiet)
        .args(["--max-added", "0.1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A file that is not ours is refused with a clear message, not a panic.
    let junk = dir.path().join("junk.csv");
    std::fs::write(&junk, "hello\n").unwrap();
    let out = bin().arg("analyze").arg(&junk).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("puma-noise ftq v1"));
}

#[test]
fn ftq_runs_a_command_while_sampling_and_records_its_exit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cmd.csv");
    let st = bin()
        .args(["ftq", "--quiet", "--duration", "300ms", "--cpu"])
        .arg(last_cpu().to_string())
        .arg("-o")
        .arg(&out)
        .args(["--", "sh", "-c", "exit 7"])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let run = noise::format::load_ftq(&out).unwrap();
    assert_eq!(run.meta("command"), Some("sh -c exit 7"));
    assert!(run.meta("command_exit").unwrap().contains('7'));
    // The command runs for the whole sampling time, not just its start: a command that outlives
    // the first moments of sampling is stopped only at the end (with --quiet, where nothing
    // polls the samplers, as without).
    let mark = dir.path().join("still-there");
    let st = bin()
        .args(["ftq", "--quiet", "--duration", "1500ms", "--cpu"])
        .arg(last_cpu().to_string())
        .arg("-o")
        .arg(dir.path().join("long.csv"))
        .args(["--", "sh", "-c"])
        .arg(format!("sleep 0.3 && touch {} && sleep 30", mark.display()))
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert!(
        mark.exists(),
        "the command was stopped before sampling ended"
    );
    let run = noise::format::load_ftq(&dir.path().join("long.csv")).unwrap();
    assert!(
        run.meta("command_exit")
            .unwrap()
            .starts_with("still running at end of sampling"),
        "{:?}",
        run.meta("command_exit")
    );
    let st = bin()
        .args(["ftq", "--quiet", "--duration", "300ms", "-o"])
        .arg(dir.path().join("x.csv"))
        .args(["--", "/nonexistent/program"])
        .output()
        .unwrap();
    assert!(!st.status.success());
    assert!(String::from_utf8_lossy(&st.stderr).contains("cannot start command"));
    assert!(!dir.path().join("x.csv").exists(), "no half-written output");
}

#[test]
fn exclusive_detour_and_fwq_modes_write_their_formats() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("d.txt");
    let cpu = last_cpu().to_string();
    // At nice -20 when root, so that other sessions' processes do not swallow the injections.
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    let mut cmd = bin();
    cmd.args([
        "detour",
        "--quiet",
        "--duration",
        "500ms",
        "--threshold",
        "2us",
        "--cpu",
        &cpu,
    ])
    .arg("-o")
    .arg(&trace)
    .args(["--inject", "100Hz:200us"]);
    if root {
        cmd.args(["--nice", "-20"]);
    }
    assert!(cmd.status().unwrap().success());
    let text = std::fs::read_to_string(&trace).unwrap();
    assert!(text.starts_with("# puma-noise detour v1\n"));
    assert!(text.contains(&format!("# cpu={cpu}\n")));
    let t = noise::format::load_detours(&trace).unwrap();
    // ~49 injected 200 us burns in 500 ms (the first wake is one period in).
    let long = t.detours.iter().filter(|d| d.1 >= 150_000).count();
    assert!(
        long >= 15,
        "only {long} long detours: {:?}",
        &t.detours[..t.detours.len().min(20)]
    );
    assert!(t.detours.windows(2).all(|w| w[0].0 <= w[1].0));
    let fwq = dir.path().join("f.csv");
    let st = bin()
        .args(["fwq", "--quiet", "--duration", "200ms", "--cpu", &cpu, "-o"])
        .arg(&fwq)
        .status()
        .unwrap();
    assert!(st.success());
    let text = std::fs::read_to_string(&fwq).unwrap();
    assert!(
        text.starts_with("# puma-noise fwq v1\n")
            && text.contains("\ncpu,index,start_ns,duration_ns\n")
    );
}

/// SIGINT in the middle of a run ends it early: what was sampled is written (and reads back, with
/// the time actually sampled), the message says so, and the exit status is 130.
#[test]
fn an_interrupted_run_keeps_what_it_sampled() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    for (mode, file) in [("ftq", "run.csv"), ("detour", "detours.txt")] {
        let out = dir.path().join(file);
        let mut child = bin()
            .args([mode, "--duration", "60s", "--quiet", "-o"])
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let pid = child.id().to_string();
        assert!(Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success());
        let asked = Instant::now();
        while child.try_wait().unwrap().is_none() {
            assert!(
                asked.elapsed() < Duration::from_secs(20),
                "{mode} did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let done = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&done.stderr);
        assert_eq!(done.status.code(), Some(130), "{mode}: {err}");
        assert!(err.contains("interrupted: kept"), "{mode}: {err}");
        let back = bin().arg("analyze").arg(&out).output().unwrap();
        let text = String::from_utf8_lossy(&back.stdout);
        assert!(back.status.success(), "{mode}: {text}");
        let saved = std::fs::read_to_string(&out).unwrap();
        assert!(saved.contains("interrupted=after"), "{mode}");
        if mode == "ftq" {
            // "FTQ: N intervals of 1.000 ms ...": fewer than the 60 000 asked, more than none.
            let n: usize = text
                .split_whitespace()
                .nth(1)
                .and_then(|w| w.parse().ok())
                .unwrap_or(0);
            assert!((1..60_000).contains(&n), "{text}");
        } else {
            // "... noise fraction X % of Y s ...": the time sampled, not the 60 s asked.
            let secs: f64 = text
                .split(" of ")
                .nth(1)
                .and_then(|t| t.split_whitespace().next())
                .and_then(|w| w.parse().ok())
                .unwrap_or(f64::NAN);
            assert!(secs > 0.0 && secs < 30.0, "{text}");
        }
    }
}
