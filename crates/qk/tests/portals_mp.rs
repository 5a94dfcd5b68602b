//! Multi-process portals tests on one node: every descriptor kind, forged headers, job isolation,
//! integrity under load. Each rank is a separate process (`qk-test-rank`) given the job's memfd.

use std::process::{Child, Command, Stdio};

use qk::{CpuMode, JobFabricSpec, NodeFabric};

fn fabric(job: u32, heap: u64) -> NodeFabric {
    let mut s = JobFabricSpec::new(job, 2, vec![0, 1], CpuMode::Heater);
    s.queue_bytes = 256 * 1024;
    s.heap_bytes_per_rank = heap;
    s.lock_memory = false;
    NodeFabric::create(&s).expect("create fabric")
}

fn spawn(fab: &NodeFabric, port: u32, mode: &str, args: &[&str]) -> Child {
    let fd = fab.prepare_child_fd().expect("fd inheritable");
    let job = fab.spec().job_id.to_string();
    Command::new(env!("CARGO_BIN_EXE_qk-test-rank"))
        .args([
            "--fd",
            &fd.to_string(),
            "--port",
            &port.to_string(),
            "portals",
            "--job",
            &job,
            "--mode",
            mode,
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn test rank")
}

fn finish(c: Child) -> String {
    let out = c.wait_with_output().expect("wait");
    let so = String::from_utf8_lossy(&out.stdout).to_string();
    let se = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "rank failed: {so}{se}");
    so
}

fn kinds(mode: &str, private_path: &str) {
    let fab = fabric(11, 32 << 20);
    let large = (1u64 << 20).to_string();
    let t = spawn(
        &fab,
        1,
        mode,
        &["kinds-target", "--peer", "0", "--large", &large],
    );
    let i = spawn(
        &fab,
        0,
        mode,
        &[
            "kinds-initiator",
            "--peer",
            "1",
            "--large",
            &large,
            "--private-path",
            private_path,
        ],
    );
    let io = finish(i);
    let to = finish(t);
    assert!(io.contains("kinds initiator ok"), "{io}");
    assert!(to.contains("kinds target ok"), "{to}");
    let st = fab.stats();
    assert_eq!(st[0].total_drops() + st[1].total_drops(), 0, "{st:?}");
    // Four large puts and one large reply crossed without an intermediate copy.
    if private_path == "cma" {
        assert!(st[1].large_cma >= 4, "{st:?}");
    } else {
        assert!(st[1].large_direct >= 4, "{st:?}");
    }
    assert!(st[0].large_direct >= 1, "large reply: {st:?}");
}

#[test]
fn put_get_ack_into_every_descriptor_kind_inline() {
    kinds("heater", "shared");
}

#[test]
fn put_get_ack_into_every_descriptor_kind_coprocessor() {
    kinds("msg-coproc", "shared");
}

#[test]
fn large_messages_from_private_memory_bounce() {
    kinds("heater", "bounce");
}

#[test]
fn large_messages_from_private_memory_cross_memory_attach() {
    kinds("heater", "cma");
}

#[test]
fn forged_and_corrupted_headers_are_dropped_and_counted() {
    let fab = fabric(12, 4 << 20);
    let t = spawn(&fab, 1, "heater", &["forge-target", "--peer", "0"]);
    let f = spawn(&fab, 0, "heater", &["forge", "--peer", "1"]);
    finish(f);
    let out = finish(t);
    assert!(
        out.contains("first_bytes=[0, 0, 0, 0]"),
        "a forged record deposited bytes: {out}"
    );
    let st = &fab.stats()[1];
    use portals::DropReason as P;
    use qk::DropReason as D;
    // A header-and-payload record and a one-line (INLINE8) one claiming the target as source.
    assert_eq!(st.drops_for(D::ForgedSource), 2, "{st:?}");
    // Unknown op, undefined flags, oversized eager length, a 3-byte record (caught by the QK or,
    // once padded to a line, by the portals header check), and a one-line put of 9 bytes.
    assert_eq!(
        st.drops_for(D::Malformed) + st.drops_for(D::Portals(P::BadHeader)),
        5,
        "{st:?}"
    );
    assert_eq!(st.drops_for(D::BadReference), 1, "{st:?}");
    assert_eq!(st.drops_for(D::Portals(P::InvalidPortal)), 1, "{st:?}");
    // Disabled portal: a header-and-payload record and a one-line one.
    assert_eq!(st.drops_for(D::Portals(P::Disabled)), 2, "{st:?}");
    assert_eq!(st.drops_for(D::Portals(P::Forbidden)), 1, "{st:?}");
    assert_eq!(st.total_drops(), 12, "{st:?}");
    // The same counters through the CLI.
    let out = Command::new(env!("CARGO_BIN_EXE_qk-stat"))
        .args([
            "--pid",
            &std::process::id().to_string(),
            "--fd",
            &fab.fd().to_string(),
        ])
        .output()
        .expect("qk-stat");
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{so}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |want: &[&str]| {
        so.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == want)
    };
    assert!(
        line(&["drop", "forged_source", "2"]) && line(&["drop", "forbidden", "1"]),
        "{so}"
    );
    let js = Command::new(env!("CARGO_BIN_EXE_qk-stat"))
        .args([
            "--pid",
            &std::process::id().to_string(),
            "--fd",
            &fab.fd().to_string(),
            "--json",
        ])
        .output()
        .expect("qk-stat --json");
    let v: serde_json::Value = serde_json::from_slice(&js.stdout).expect("json");
    assert_eq!(v["job"], 12);
    assert_eq!(v["ports"][1]["drops"][1][1], 2, "{v}");
}

#[test]
fn qk_stat_explains_a_process_not_started_by_yod() {
    let out = Command::new(env!("CARGO_BIN_EXE_qk-stat"))
        .args(["--pid", &std::process::id().to_string()])
        .output()
        .expect("qk-stat");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no PUMA_QK_FD"));
}

#[test]
fn qk_stat_names_what_it_was_given_when_that_is_not_a_region() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_qk-stat"))
            .args(args)
            .output()
            .expect("qk-stat");
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // A pid that names no process.
    let gone = run(&["--pid", "4000000000"]);
    assert!(gone.contains("no process 4000000000"), "{gone}");
    let gone = run(&["--pid", "4000000000", "--fd", "3"]);
    assert!(gone.contains("no process 4000000000"), "{gone}");
    // --fd alone means nothing: it is a descriptor of the --pid process.
    let fd_only = run(&["--fd", "3"]);
    assert!(fd_only.contains("give --pid too"), "{fd_only}");
    // A directory, and a file that is not a region: the error names the path given.
    let dir = std::env::temp_dir();
    let d = run(&["--path", dir.to_str().expect("utf-8 temp dir")]);
    assert!(d.contains("is a directory"), "{d}");
    let f = std::env::temp_dir().join(format!("qk-stat-not-a-region-{}", std::process::id()));
    std::fs::write(&f, vec![7u8; 1 << 16]).expect("write");
    let bad = run(&["--path", f.to_str().expect("utf-8 path")]);
    std::fs::remove_file(&f).ok();
    assert!(
        bad.contains(f.to_str().expect("utf-8 path")) && bad.contains("not a QK job region"),
        "{bad}"
    );
}

#[test]
fn endpoint_from_env_says_what_is_missing() {
    let e = qk::Endpoint::from_env()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("PUMA_QK_FD") && e.contains("not started by yod"),
        "{e}"
    );
}

#[test]
fn a_process_of_another_job_cannot_attach_or_deposit() {
    let a = fabric(21, 1 << 20);
    let b = fabric(22, 1 << 20);
    // A job-22 process handed job 21's fd (say, by a confused launcher) is refused at attach.
    let fd = a.dup_fd().expect("dup");
    let e = qk::Endpoint::attach(
        fd,
        &qk::AttachSpec {
            lock_memory: false,
            ..qk::AttachSpec::new(22, 0, CpuMode::Heater)
        },
    );
    let msg = e.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("belongs to job 21"), "{msg}");
    // A job-22 forger sending to "rank 1" reaches only job 22's queues: job 21 sees nothing.
    let t = spawn(&b, 1, "heater", &["forge-target", "--peer", "0"]);
    let f = spawn(&b, 0, "heater", &["forge", "--peer", "1"]);
    finish(f);
    finish(t);
    let sa = a.stats();
    assert!(
        sa.iter().all(|s| s.delivered == 0 && s.total_drops() == 0),
        "{sa:?}"
    );
    assert!(b.stats()[1].total_drops() > 0);
}

#[test]
fn exclusive_integrity_under_load_a_million_messages() {
    let fab = fabric(13, 96 << 20);
    let count = std::env::var("QK_STRESS_COUNT").unwrap_or_else(|_| "1000000".into());
    let max = (4u64 << 20).to_string();
    let args = |s: &'static str| {
        vec![
            s, "--peer", "", "--count", "", "--max", "", "--seed", "12345",
        ]
    };
    let mut r = args("stress-recv");
    r[2] = "0";
    r[4] = &count;
    r[6] = &max;
    let mut s = args("stress-send");
    s[2] = "1";
    s[4] = &count;
    s[6] = &max;
    let t0 = std::time::Instant::now();
    let rc = spawn(&fab, 1, "heater", &r);
    let sc = spawn(&fab, 0, "heater", &s);
    let (so, ro) = (
        sc.wait_with_output().expect("wait"),
        rc.wait_with_output().expect("wait"),
    );
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert!(
        so.status.success() && ro.status.success(),
        "sender: {}\nreceiver: {}",
        text(&so),
        text(&ro)
    );
    let (so, ro) = (text(&so), text(&ro));
    eprintln!("{so}{ro}in {:?}", t0.elapsed());
    assert!(
        ro.contains(&format!("stress received {count} messages")),
        "{ro}"
    );
}

/// An idle waiter sleeps long instead of waking every millisecond (its core stays quiet: issue
/// "noise"), and no wake-up is lost: every signal, sent while the target sleeps deeply, ends its
/// wait. Before the membarrier fence a 300 ms wait cost ~300 sleeps; now ~10 short ones, then
/// sleeps of up to 100 ms.
#[test]
fn an_idle_waiter_sleeps_long_and_still_wakes_for_each_message() {
    for mode in ["heater", "msg-coproc"] {
        let fab = fabric(31, 1 << 20);
        let rounds = "5";
        let t = spawn(
            &fab,
            1,
            mode,
            &["idle-target", "--peer", "0", "--rounds", rounds],
        );
        let i = spawn(
            &fab,
            0,
            mode,
            &[
                "idle-initiator",
                "--peer",
                "1",
                "--rounds",
                rounds,
                "--gap-ms",
                "300",
            ],
        );
        finish(i);
        let out = finish(t);
        eprintln!("{mode}: {out}");
        let sleeps: u64 = out
            .split_whitespace()
            .skip_while(|w| *w != "sleeps")
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no sleep count in {out:?}"));
        assert!(
            sleeps < 5 * 60,
            "{mode}: the port slept {sleeps} times in 5 waits of 300 ms: {out}"
        );
    }
}
