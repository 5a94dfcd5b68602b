//! Exit codes, signals, faults and teardown through the real binaries.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MARK: &str = "YODTEST_MARK";

fn yod_marked(mark: &str, args: &[&str]) -> Command {
    let mut c = Command::new(yod());
    c.args(args).env(MARK, mark).stdin(Stdio::null());
    c
}

fn assert_nothing_left(mark: &str, job: Option<&str>) {
    let kv = format!("{MARK}={mark}");
    let gone = wait_for(Duration::from_secs(2), || procs_with_env(&kv).is_empty());
    assert!(
        gone,
        "processes of the job remain: {:?}",
        procs_with_env(&kv)
            .into_iter()
            .map(|p| {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                let cmd = std::fs::read(format!("/proc/{p}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                    .unwrap_or_default();
                format!("{stat} [{cmd}]")
            })
            .collect::<Vec<_>>()
    );
    if let Some(j) = job {
        assert!(
            memfds_with(j).is_empty(),
            "segments remain: {:?}",
            memfds_with(j)
        );
    }
    assert!(
        shm_entries().is_empty(),
        "/dev/shm entries: {:?}",
        shm_entries()
    );
}

#[test]
fn exit_code_of_the_failing_rank() {
    let m = marker("exit");
    let out = yod_marked(
        &m,
        &[
            "-n",
            "3",
            "sh",
            "-c",
            "if [ $PUMA_RANK = 2 ]; then exit 7; fi; sleep 20",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("rank 2 on node local0 exited with status 7"),
        "{err}"
    );
    assert_nothing_left(&m, job_id_from(&err).as_deref());
}

#[test]
fn success_is_zero() {
    let out = run_yod(&["-n", "4", "--nodes", "2", "true"]);
    assert_eq!(out.status.code(), Some(0));
}

/// Seconds since the epoch when the failing rank wrote `file` (just before its
/// fault) to now: the time the job took to end because of the fault, without
/// the launch before it (which a loaded machine may stretch).
fn since_fault(file: &std::path::Path) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let t: f64 = std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("the failing rank wrote no time to {}: {e}", file.display()))
        .trim()
        .parse()
        .unwrap();
    now.saturating_sub(Duration::from_secs_f64(t))
}

#[test]
fn exclusive_segfault_ends_the_job_within_a_second() {
    let m = marker("segv");
    let dir = tempfile::tempdir().unwrap();
    let stamp = dir.path().join("fault-time");
    let script = format!(
        "if [ $PUMA_RANK = 3 ]; then sleep 0.2; date +%s.%N > {}; kill -SEGV $$; fi; sleep 30",
        stamp.display()
    );
    let t = Instant::now();
    let out = yod_marked(&m, &["-n", "4", "--nodes", "2", "sh", "-c", &script])
        .output()
        .unwrap();
    let (took, after_fault) = (t.elapsed(), since_fault(&stamp));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 11), "{err}");
    assert!(
        err.contains("rank 3 on node local1 was killed by signal 11 (SIGSEGV)"),
        "{err}"
    );
    assert!(
        after_fault < Duration::from_secs(1),
        "the job ended {after_fault:?} after the fault (yod ran {took:?}): {err}"
    );
    assert_nothing_left(&m, job_id_from(&err).as_deref());
}

#[test]
fn exclusive_abort_ends_the_job_within_a_second() {
    let m = marker("abrt");
    let dir = tempfile::tempdir().unwrap();
    let stamp = dir.path().join("fault-time");
    let script = format!(
        "if [ $PUMA_RANK = 0 ]; then sleep 0.2; date +%s.%N > {}; kill -ABRT $$; fi; sleep 30 & wait",
        stamp.display()
    );
    let t = Instant::now();
    let out = yod_marked(&m, &["-n", "3", "sh", "-c", &script])
        .output()
        .unwrap();
    let (took, after_fault) = (t.elapsed(), since_fault(&stamp));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 6), "{err}");
    assert!(
        err.contains("rank 0 on node local0 was killed by signal 6 (SIGABRT)"),
        "{err}"
    );
    assert!(
        after_fault < Duration::from_secs(1),
        "the job ended {after_fault:?} after the fault (yod ran {took:?}): {err}"
    );
    assert_nothing_left(&m, job_id_from(&err).as_deref());
}

#[test]
fn continue_policy_lets_the_rest_finish() {
    let out = run_yod(&[
        "-n",
        "3",
        "--fault",
        "continue",
        "sh",
        "-c",
        "if [ $PUMA_RANK = 1 ]; then exit 5; fi; sleep 0.3; echo finished $PUMA_RANK",
    ]);
    assert_eq!(out.status.code(), Some(5));
    let mut l: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    l.sort();
    assert_eq!(l, ["finished 0", "finished 2"]);
}

fn wait_running(mark: &str, n: usize) {
    let kv = format!("{MARK}={mark}");
    assert!(
        wait_for(Duration::from_secs(5), || {
            procs_with_env(&kv)
                .iter()
                .filter(|p| {
                    std::fs::read(format!("/proc/{p}/environ"))
                        .map(|e| String::from_utf8_lossy(&e).contains("PUMA_RANK="))
                        .unwrap_or(false)
                })
                .count()
                >= n
        }),
        "ranks did not start"
    );
}

#[test]
fn yod_sigkilled_mid_job_leaves_nothing_behind() {
    let m = marker("kill9");
    let mut child = yod_marked(
        &m,
        &["-n", "4", "--nodes", "2", "sh", "-c", "sleep 30 & wait"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    wait_running(&m, 4);
    // The job's QK regions exist now (held by the ranks) — the check below can see them.
    let held = memfds_held_by(&procs_with_env(&format!("{MARK}={m}")));
    assert!(
        !held.is_empty(),
        "no runtime memfd found while the job runs"
    );
    let yod_pid = child.id();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_nothing_left(&m, None);
    let job = held[0]
        .rsplit("job")
        .next()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    assert!(
        memfds_with(&job).is_empty(),
        "segments of job {job} remain: {:?}",
        memfds_with(&job)
    );
    // The embedded partition's private directory (key, sockets, node maps) is gone too.
    let prefix = format!("yod-{yod_pid}-");
    let mut dirs = vec![std::env::temp_dir()];
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        dirs.push(x.into());
    }
    let gone = wait_for(Duration::from_secs(2), || {
        dirs.iter().all(|d| {
            std::fs::read_dir(d)
                .map(|r| {
                    !r.flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                })
                .unwrap_or(true)
        })
    });
    assert!(gone, "yod's private directory {prefix}* was left behind");
}

#[test]
fn sigint_tears_the_job_down() {
    let m = marker("int");
    let child = yod_marked(&m, &["-n", "3", "sh", "-c", "sleep 30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_running(&m, 3);
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("caught SIGINT"), "{err}");
    assert_nothing_left(&m, job_id_from(&err).as_deref());
}

#[test]
fn exclusive_lost_local_pct_is_reported_within_2s() {
    let m = marker("lost");
    let child = yod_marked(&m, &["-n", "4", "--nodes", "2", "sh", "-c", "sleep 30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_running(&m, 4);
    // Find the PCT of virtual node local1 and kill it hard.
    let kv = format!("{MARK}={m}");
    let pct = procs_with_env(&kv)
        .into_iter()
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c).to_string();
                    c.contains("serve") && c.contains("local1")
                })
                .unwrap_or(false)
        })
        .expect("PCT local1 process");
    let t = Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pct as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let took = t.elapsed();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{err}");
    assert!(err.contains("node local1 lost"), "{err}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_nothing_left(&m, job_id_from(&err).as_deref());
}

#[test]
fn missing_program_is_a_clear_error() {
    let out = run_yod(&["-n", "2", "/no/such/program"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot start rank") && err.contains("/no/such/program"),
        "{err}"
    );
}
