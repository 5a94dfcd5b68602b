//! Input formats: GOAL errors, runtime traces, measured noise files, the command line.

use std::process::Command;

use chama::goal::parse_goal_str;
use chama::noise::{parse_noise_source, read_detour_trace, read_ftq, Noise, NoiseSource};
use chama::sim::{simulate, Params, SimOptions};
use chama::trace::{read_trace, trace_to_schedule};

fn tmp(name: &str, text: &str) -> String {
    let dir = std::env::temp_dir().join(format!("chama-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write tmp");
    p.to_string_lossy().into_owned()
}

#[test]
fn goal_accepts_loggopsim_syntax() {
    let s = parse_goal_str(
        "// comment\nnum_ranks 2\n/* block\ncomment */\nrank 0 {\nl1: calc 100 cpu 1\nl2: send 8b to 1 tag 3 cpu 1 nic 1\nl2 requires l1\n}\nrank 1\n{\nlabel_x : recv 8 b from -1 tag -1 nic 1\nsend 1b to 0\n}\n",
    )
    .expect("valid");
    assert_eq!(s.len(), 4);
    assert_eq!(s.num_cpus, 2);
    assert_eq!(s.num_nics, 2);
    assert_eq!(s.ops[2].peer, chama::schedule::ANY);
}

#[test]
fn goal_errors_name_the_line_and_the_problem() {
    let cases = [
        ("rank 0 {\n}\n", "num_ranks"),
        (
            "num_ranks 2\nrank 0 {\nl1: send 8b to 5 tag 0\n}\n",
            "only 2 ranks",
        ),
        ("num_ranks 2\nrank 0 {\nl2 requires l1\n}\n", "not defined"),
        (
            "num_ranks 2\nrank 0 {\nl1: sned 8b to 1\n}\n",
            "expected `send`",
        ),
        (
            "num_ranks 2\nrank 0 {\nl1: send 8b from 1\n}\n",
            "expected `to`",
        ),
        ("num_ranks 2\nrank 0 {\nl1: calc 1\n", "missing `}`"),
        (
            "num_ranks 2\nrank 0 {\nl1: calc 1\nl1: calc 2\n}\n",
            "defined twice",
        ),
        (
            "num_ranks 2\nrank 0 {\nl1: calc 99999999999999999999999\n}\n",
            "bad calc time",
        ),
        ("num_ranks 2\nrank 0 {\n}\nrank 0 {\n}\n", "appears twice"),
    ];
    for (text, want) in cases {
        let e = parse_goal_str(text).expect_err(text).to_string();
        assert!(e.contains(want), "error `{e}` should mention `{want}`");
        assert!(e.contains("<goal>:"), "error `{e}` should name the line");
    }
}

#[test]
fn trace_converts_and_simulates() {
    let t = tmp(
        "t.trace",
        "# chama-trace v1\n# ranks=3\nrank\top\tpeer\ttag\tbytes\tstart_ns\tend_ns\tclass\n\
0\tsend\t1\t0\t8\t1000\t2000\tbcast\n0\tisend\t2\t0\t8\t2000\t2100\tbcast\n\
1\trecv\t0\t0\t8\t500\t5000\tbcast\n1\tirecv\t-1\t-1\t64\t10000\t20000\thalo\n1\tsend\t2\t1\t64\t12000\t13000\thalo\n\
2\trecv\t0\t0\t8\t0\t6000\tbcast\n2\trecv\t1\t1\t64\t9000\t15000\thalo\n2\tsend\t1\t5\t64\t16000\t17000\thalo\n",
    );
    let tr = read_trace(&t).expect("trace");
    assert_eq!(tr.ranks, 3);
    assert_eq!(tr.events.len(), 8);
    let s = trace_to_schedule(&tr, &t).expect("schedule");
    // Rank 1: recv, calc(5000), irecv, calc(2000), send => 5 ops; compute gaps become calcs.
    let calcs: Vec<u64> = s
        .ops
        .iter()
        .filter(|o| o.kind == 2)
        .map(|o| o.size)
        .collect();
    assert!(
        calcs.contains(&5000) && calcs.contains(&2000) && calcs.contains(&3000),
        "{calcs:?}"
    );
    assert!(s.class_names.iter().any(|c| c == "halo"));
    let out = simulate(
        &s,
        &Params::default(),
        &Noise::none(),
        &SimOptions::default(),
    );
    assert_eq!(out.unfinished(), 0);
}

/// With a `wait` line, the time spent waiting is not replayed as computation.
#[test]
fn trace_wait_lines_separate_waiting_from_computing() {
    let t = tmp(
        "w.trace",
        "# chama-trace v1\n0\tirecv\t1\t0\t8\t1000\t9000\n0\twait\t-1\t-1\t0\t3000\t9000\n0\tsend\t1\t1\t8\t9500\t9600\n\
1\tsend\t0\t0\t8\t0\t100\n1\trecv\t0\t1\t8\t200\t20000\n",
    );
    let tr = read_trace(&t).expect("trace");
    assert_eq!(tr.ranks, 2);
    let s = trace_to_schedule(&tr, &t).expect("schedule");
    let calcs: Vec<u64> = s
        .ops
        .iter()
        .filter(|o| o.rank == 0 && o.kind == 2)
        .map(|o| o.size)
        .collect();
    // 2000 ns computing before the wait, a zero-length join for the wait, 500 ns after it;
    // the 6000 ns inside the wait are not computation.
    assert_eq!(calcs, vec![2000, 0, 500]);
    let out = simulate(
        &s,
        &Params::default(),
        &Noise::none(),
        &SimOptions::default(),
    );
    assert_eq!(out.unfinished(), 0);
}

#[test]
fn trace_errors_are_clear() {
    let bad = tmp("bad.trace", "# chama-trace v1\n0\tsend\t1\t0\t8\t100\t50\n");
    let e = read_trace(&bad).expect_err("end before start").to_string();
    assert!(e.contains("before start_ns") && e.contains(":2:"), "{e}");
    let bad = tmp("bad2.trace", "# chama-trace v1\n0\tsend\t-1\t0\t8\t1\t2\n");
    assert!(read_trace(&bad)
        .expect_err("any-source send")
        .to_string()
        .contains("bad peer"));
    let bad = tmp("bad3.trace", "hello\n");
    assert!(read_trace(&bad)
        .expect_err("no magic")
        .to_string()
        .contains("chama-trace v1"));
}

#[test]
fn detour_trace_and_ftq_files_are_read_as_specified() {
    let d = tmp(
        "d.txt",
        "# puma-noise detour v1\n# duration_ns=1000000\n100\t50\n5000\t2000\n",
    );
    let (det, span) = read_detour_trace(&d).expect("detours");
    assert_eq!(det, vec![(100, 50), (5000, 2000)]);
    assert_eq!(span, 1_000_000);
    // Lost work = (nominal - count) * quantum, placed at the interval; clamped at 0.
    let f = tmp(
        "f.csv",
        "# puma-noise ftq v1\n# interval_ns=1000\n# quantum_ns=2.5\n# nominal_count=100\n# cpus=0,1\ncpu,index,start_ns,count\n0,0,0,100\n0,1,1000,60\n0,2,2000,120\n1,0,0,10\n",
    );
    let (det, span) = read_ftq(&f, None).expect("ftq");
    assert_eq!(det, vec![(1000, 100)]);
    assert_eq!(span, 3000);
    let (det1, _) = read_ftq(&f, Some(1)).expect("ftq cpu 1");
    assert_eq!(det1, vec![(0, 225)]);
    // Replayed: 1000 ns of work starting at the detour (phase 0 when co-scheduled with span
    // phase 0 is not guaranteed, so check the invariant instead): never faster than 1000 ns.
    let src = parse_noise_source(&format!("ftq:{f}")).expect("spec");
    assert!(matches!(src, NoiseSource::Trace { .. }));
    let n = Noise {
        source: src,
        coscheduled: true,
        latency: Default::default(),
        seed: 3,
    };
    let total: u64 = (0..3000).map(|t| n.finish(0, t, 1000) - t - 1000).sum();
    // Over one whole span, the average extra time is about the lost fraction.
    assert!(total > 0, "replayed FTQ noise must delay some work");
    let e = parse_noise_source("ftq:/nonexistent/x.csv")
        .expect_err("missing")
        .to_string();
    assert!(e.contains("/nonexistent/x.csv"), "{e}");
    let e = read_ftq(&d, None).expect_err("not ftq").to_string();
    assert!(e.contains("puma-noise ftq v1"), "{e}");
}

#[test]
fn noise_specs_reject_nonsense() {
    for bad in [
        "periodic:interval=1ms",
        "periodic:interval=1ms,detour=2ms",
        "poisson:interval=0,detour=0",
        "gaussian:interval=1ms,mean=1us",
        "bogus",
        "periodic:interval=1ms,detour=5us,colour=blue",
        "detours:",
    ] {
        assert!(parse_noise_source(bad).is_err(), "{bad} should be rejected");
    }
    assert!(parse_noise_source("periodic:interval=1ms,detour=25us").is_ok());
}

fn chama() -> Command {
    Command::new(env!("CARGO_BIN_EXE_chama"))
}

/// Runs chama with `args`, requires a failure status, and returns its stderr.
fn refused(args: &[&str]) -> String {
    let out = chama().args(args).output().expect("run chama");
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn command_line_end_to_end() {
    let dir = std::env::temp_dir().join(format!("chama-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let goal = dir.join("b.goal");
    let st = chama()
        .args(["gen", "bcast", "--ranks", "64", "-o"])
        .arg(&goal)
        .status()
        .expect("run gen");
    assert!(st.success());
    let json = dir.join("r.json");
    let out = chama()
        .args(["run", "--goal"])
        .arg(&goal)
        .args(["--noise", "poisson:interval=100us,detour=10us", "--json"])
        .arg(&json)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json")).expect("parse json");
    assert!(v["slowdown"].as_f64().expect("slowdown") >= 1.0);
    assert_eq!(v["ranks"], 64);
    assert!(v["critical_path"]["length"].as_u64().expect("path") > 1);
    let svg = dir.join("s.svg");
    let out = chama()
        .args([
            "sweep",
            "--gen",
            "allreduce-rd",
            "--ranks-list",
            "16,64,256",
            "--noise",
            "periodic:interval=1ms,detour=100us",
            "--svg",
        ])
        .arg(&svg)
        .output()
        .expect("sweep");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&svg).expect("svg");
    assert!(text.starts_with("<svg") && text.contains("polyline") && text.contains("co-scheduled"));
    // A bad file gives a clear error and a failure status, no panic.
    let err = refused(&["run", "--goal", "/nonexistent.goal"]);
    assert!(
        err.contains("/nonexistent.goal") && !err.contains("panicked"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cli_segmented_ring_reports_what_the_whole_ring_reports() {
    let args = [
        "run",
        "--gen",
        "allreduce-ring",
        "--ranks",
        "48",
        "--noise",
        "poisson:interval=30us,detour=4us",
        "--latency-noise",
        "exp:mean=200ns",
        "--seed",
        "9",
        "--json",
        "-",
        "-q",
    ];
    let whole = chama().args(args).output().expect("run");
    assert!(
        whole.status.success(),
        "{}",
        String::from_utf8_lossy(&whole.stderr)
    );
    let whole: serde_json::Value = serde_json::from_slice(&whole.stdout).expect("json");
    let seg = chama()
        .args(args)
        .args(["--segmented", "--segment-ops", "400"])
        .output()
        .expect("run");
    assert!(
        seg.status.success(),
        "{}",
        String::from_utf8_lossy(&seg.stderr)
    );
    let seg: serde_json::Value = serde_json::from_slice(&seg.stdout).expect("json");
    assert!(seg["segments"].as_u64().expect("segments") > 2);
    assert_eq!(seg["completion_ns"], whole["completion_ns"]);
    assert_eq!(seg["clean_completion_ns"], whole["baseline_ns"]);
    assert_eq!(seg["unfinished_ops"], 0);
    // The report counts the events of both runs.
    assert_eq!(seg["events_all_runs"], whole["events"]);
    // --segmented is for the ring only.
    assert!(refused(&["run", "--gen", "bcast", "--segmented"]).contains("allreduce-ring"));
}

/// `--threads 1` and `--threads 2` give the same report on a schedule large enough for two
/// threads (4.5 M operations), with detours and latency noise; `--threads 0` is refused.
#[test]
fn cli_two_threads_report_what_one_thread_reports() {
    let args = [
        "run",
        "--gen",
        "allreduce-rd",
        "--ranks",
        "131072",
        "--noise",
        "poisson:interval=20us,detour=3us",
        "--latency-noise",
        "exp:mean=300ns",
        "--seed",
        "4",
        "--json",
        "-",
        "-q",
    ];
    let report = |threads: &str| {
        let out = chama()
            .args(args)
            .args(["--threads", threads])
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let m = v.as_object_mut().expect("object");
        m.retain(|k, _| !k.contains("second") && k != "peak_memory_kib");
        v
    };
    let one = report("1");
    assert!(one["ops"].as_u64().expect("ops") >= 1 << 22);
    assert!(one["slowdown"].as_f64().expect("slowdown") > 1.0);
    assert_eq!(one, report("2"));
    let e = chama()
        .args(args)
        .args(["--threads", "0"])
        .output()
        .expect("run");
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("--threads"));
}

#[test]
fn unwritable_outputs_are_refused_before_the_simulation() {
    let dir = std::env::temp_dir().join(format!("chama-unwritable-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("no/such/dir/out.json");
    let m = missing.to_str().unwrap();
    let d = dir.to_str().unwrap();
    // A million-rank noisy run would take seconds and gigabytes before writing: the refusal
    // must come first, so these finish at once and leave nothing behind.
    for args in [
        vec![
            "run",
            "--gen",
            "allreduce-rd",
            "--ranks",
            "1048576",
            "--noise",
            "periodic:interval=1ms,detour=25us",
            "--json",
            m,
        ],
        vec![
            "run",
            "--gen",
            "allreduce-rd",
            "--ranks",
            "1048576",
            "--ranks-csv",
            d,
        ],
        vec!["gen", "allreduce-rd", "--ranks", "1048576", "-o", m],
        vec![
            "sweep",
            "--gen",
            "barrier",
            "--noise",
            "periodic:interval=1ms,detour=25us",
            "--svg",
            m,
        ],
    ] {
        let t0 = std::time::Instant::now();
        let err = refused(&args);
        assert!(err.contains("cannot write"), "{args:?}: {err}");
        assert!(t0.elapsed().as_secs() < 5, "{args:?} ran before refusing");
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    std::fs::remove_dir(&dir).unwrap();
    assert!(refused(&["bench", "--repeats", "0"]).contains("at least 1"));
}

/// Without the address space for the operation states (here a 1 GiB limit on it, against the
/// 2 GiB a million-rank all-reduce's state template asks for), a run stops at once with an
/// error that says what the memory was for, instead of aborting on an allocation.
#[test]
fn memory_short_for_the_states_is_a_clear_error() {
    let out = Command::new("sh")
        .args([
            "-c",
            "ulimit -v 1048576 && exec \"$0\" \"$@\"",
            env!("CARGO_BIN_EXE_chama"),
            "run",
            "--gen",
            "allreduce-rd",
            "--ranks",
            "1048576",
            "--noise",
            "periodic:interval=1ms,detour=25us",
            "-q",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot get") && err.contains("GiB of memory for the operation states"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("allocation"),
        "{err}"
    );
}

/// `--ranks-csv /dev/null` (a common way to discard an output) writes into the device and
/// leaves it a device; a link to a file keeps the link and replaces the file. The device is a
/// null device made for the test (root), so a regression cannot replace the machine's.
#[test]
fn outputs_into_a_device_or_through_a_link_keep_what_is_there() {
    use std::os::unix::fs::FileTypeExt;
    let real = std::path::PathBuf::from(tmp("link-target.json", "old"));
    let link = real.with_file_name("link.json");
    let null = real.with_file_name("null");
    let _ = std::fs::remove_file(&link);
    let _ = std::fs::remove_file(&null);
    let made = Command::new("mknod")
        .arg(&null)
        .args(["c", "1", "3"])
        .status();
    if !matches!(made, Ok(s) if s.success()) {
        println!("SKIP: cannot make a character device here (mknod needs root)");
        return;
    }
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let out = chama()
        .args(["run", "--gen", "bcast", "--ranks", "16", "-q", "--json"])
        .arg(&link)
        .arg("--ranks-csv")
        .arg(&null)
        .output()
        .expect("run chama");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = std::fs::symlink_metadata(&null).expect("meta");
    assert!(m.file_type().is_char_device(), "the device was replaced");
    let link_meta = std::fs::symlink_metadata(&link).expect("meta");
    assert!(link_meta.file_type().is_symlink(), "the link was replaced");
    let json = std::fs::read_to_string(&real).expect("the link's file");
    assert!(json.contains("\"ranks\""), "{json}");
}
