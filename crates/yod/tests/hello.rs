//! hello on 1, 2, 8 and 64 ranks through the real yod and PCT binaries.

mod common;
use common::*;
use std::collections::BTreeMap;

/// Runs hello and checks: one line per rank, the right size, node and
/// distance, and the whole output present.
fn check_hello(n: u32, extra: &[&str], expect_nodes: u32) {
    let hello = hello();
    let ns = n.to_string();
    let mut args = vec!["-n", &ns];
    args.extend_from_slice(extra);
    let h = hello.display().to_string();
    args.push(&h);
    let out = run_yod(&args);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "yod {args:?} failed: {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        text(&out.stderr)
    );
    let mut seen = BTreeMap::new();
    for line in stdout.lines() {
        // hello from rank R of N on node K (NAME) coords [..] mode M distance-to-rank0 D
        let w: Vec<&str> = line.split_whitespace().collect();
        assert!(w.len() >= 16 && w[0] == "hello", "malformed line {line:?}");
        let rank: u32 = w[3].parse().unwrap();
        assert_eq!(w[5], ns, "size in {line:?}");
        let node: u32 = w[8].parse().unwrap();
        assert!(node < expect_nodes, "{line:?}");
        let d = w[w.len() - 1].to_string();
        assert!(seen.insert(rank, (node, d)).is_none(), "rank {rank} twice");
    }
    assert_eq!(
        seen.len(),
        n as usize,
        "every rank must print exactly once:\n{stdout}"
    );
    // Block distribution over the nodes: node of rank r is monotone, distance = |node - 0|.
    let mut last = 0;
    for (r, (node, d)) in &seen {
        assert!(*node >= last, "rank {r} placed out of order");
        last = *node;
        assert_eq!(
            d,
            &node.to_string(),
            "distance of rank {r} to rank 0 on a 1-D mesh"
        );
    }
    assert_eq!(last + 1, expect_nodes.min(n));
}

#[test]
fn hello_1_rank() {
    check_hello(1, &[], 1);
}

#[test]
fn hello_2_ranks() {
    check_hello(2, &[], 1);
}

#[test]
fn hello_8_ranks_on_2_virtual_nodes() {
    check_hello(8, &["--nodes", "2"], 2);
}

#[test]
fn hello_64_ranks_oversubscribed_on_4_virtual_nodes() {
    check_hello(64, &["--nodes", "4", "--mode", "virtual-node"], 4);
}

#[test]
fn hello_ppn_decides_node_count() {
    check_hello(6, &["--ppn", "2"], 3);
}

#[test]
fn hello_without_yod_says_so() {
    let out = std::process::Command::new(hello())
        .env_remove("PUMA_RANK")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not started by yod"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn label_prefixes_every_line_and_lines_never_mix() {
    // 8 ranks each print 200 long lines at once; every line must arrive whole.
    let script =
        "i=0; while [ $i -lt 200 ]; do printf 'r%s-%s-%0500d\\n' $PUMA_RANK $i 0; i=$((i+1)); done";
    let out = run_yod(&["-n", "8", "--nodes", "2", "--label", "sh", "-c", script]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines.len(), 1600);
    for l in lines {
        let (label, body) = l.split_once(": ").expect("label");
        assert!(body.starts_with(&format!("r{label}-")), "mixed line {l:?}");
        assert_eq!(
            body.len(),
            format!("r{label}-").len() + body.split('-').nth(1).unwrap().len() + 501
        );
        assert!(body.ends_with(&"0".repeat(500)), "truncated line {l:?}");
    }
}

#[test]
fn environment_passes_through_and_rank_env_is_set() {
    let out = std::process::Command::new(yod())
        .args(["-n", "2", "--mode", "msg-coproc", "sh", "-c"])
        .arg("echo $PUMA_RANK $PUMA_SIZE $PUMA_LOCAL_RANK $PUMA_LOCAL_SIZE $PUMA_MODE $MY_TEST_VAR $PUMA_TIMEOUT_MS ${PUMA_JOB_SEGMENT_FD:-none}; test -s $PUMA_NODE_MAP")
        .env("MY_TEST_VAR", "passed-through")
        // Tuning variables reach the ranks; a caller's rank identity never does.
        .env("PUMA_TIMEOUT_MS", "1234")
        .env("PUMA_RANK", "99")
        .env("PUMA_JOB_SEGMENT_FD", "42")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut lines: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "0 2 0 2 msg-coproc passed-through 1234 none",
            "1 2 1 2 msg-coproc passed-through 1234 none"
        ]
    );
}

#[test]
fn stdin_goes_to_rank_0_only() {
    use std::io::Write;
    let mut child = std::process::Command::new(yod())
        .args(["-n", "3", "--label", "sh", "-c", "cat | wc -l"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"a\nb\nc\n").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let mut lines: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| l.replace(' ', ""))
        .collect();
    lines.sort();
    assert_eq!(lines, ["0:3", "1:0", "2:0"]);
}

#[test]
fn ranks_attach_to_the_qk_fabric_their_pct_created() {
    let prog = qk_attach().display().to_string();
    let out = run_yod(&["-n", "6", "--nodes", "2", "--mode", "msg-coproc", &prog]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut l: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    l.sort();
    let want: Vec<String> = (0..6)
        .map(|r| format!("rank {r} attached to the QK fabric"))
        .collect();
    assert_eq!(l, want);
}

#[test]
fn profiling_variant_records_every_rank_and_pinning_follows_the_mode() {
    let dir = tempfile::tempdir().unwrap();
    let traces = dir.path().join("traces");
    let cfg = dir.path().join("pct.toml");
    std::fs::write(
        &cfg,
        format!(
            "variant = \"profiling\"\nplacement = \"compact\"\ntrace_dir = \"{}\"\n",
            traces.display()
        ),
    )
    .unwrap();
    // Each rank appends one message record, as the library will.
    let script = "printf '%s\\tsend\\t0\\t1\\t8\\t100\\t200\\n' $PUMA_RANK >> $PUMA_TRACE; \
                  echo $PUMA_RANK $(grep Cpus_allowed_list /proc/self/status | cut -f2)";
    let c = cfg.display().to_string();
    let out = run_yod(&[
        "-n",
        "4",
        "--nodes",
        "2",
        "--mode",
        "msg-coproc",
        "--pct-config",
        &c,
        "sh",
        "-c",
        script,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // msg-coproc: each rank gets two cores (wrapping on small machines).
    let cpus = pct::server::usable_cpus();
    for line in text(&out.stdout).lines() {
        let (r, list) = line.split_once(' ').unwrap();
        let local: usize = r.parse::<usize>().unwrap() % 2;
        let want: Vec<usize> = (0..2.min(cpus.len()))
            .map(|k| cpus[(local * 2 + k) % cpus.len()])
            .collect();
        let mut got: Vec<usize> = list
            .split(',')
            .flat_map(|p| match p.split_once('-') {
                Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect::<Vec<usize>>(),
                None => vec![p.parse().unwrap()],
            })
            .collect();
        got.sort();
        let mut want = want;
        want.sort();
        want.dedup();
        assert_eq!(got, want, "rank {r} pinned wrongly");
    }
    let jobs: Vec<_> = std::fs::read_dir(&traces).unwrap().flatten().collect();
    assert_eq!(jobs.len(), 1);
    let jd = jobs[0].path();
    let recs = std::fs::read_to_string(jd.join("ranks.jsonl")).unwrap();
    assert_eq!(recs.lines().count(), 4, "{recs}");
    for l in recs.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["status"]["exited"], 0);
        assert!(v["end_unix_ns"].as_u64().unwrap() >= v["start_unix_ns"].as_u64().unwrap());
    }
    for node in 0..2 {
        let t = std::fs::read_to_string(jd.join(format!("node-{node}.trace"))).unwrap();
        let mut lines = t.lines();
        assert_eq!(lines.next(), Some("# chama-trace v1"));
        assert_eq!(lines.next(), Some("# ranks=4"));
        let recs: Vec<&str> = t
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("rank\t"))
            .collect();
        assert_eq!(recs.len(), 2, "{t}");
        assert!(recs.iter().all(|r| r.split('\t').count() == 7));
    }
}

#[test]
fn ranks_on_two_virtual_nodes_exchange_messages_through_the_qk_node_engines() {
    // Rank 0 on local0, rank 1 on local1: every message crosses the PCTs' node
    // engines (TCP on loopback), set up by the two-phase load.
    let out = run_yod(&[
        "-n",
        "2",
        "--nodes",
        "2",
        "--label",
        "sh",
        "-c",
        &qk_pair_script(),
    ]);
    let so = text(&out.stdout);
    assert!(out.status.success(), "{so}\n{}", text(&out.stderr));
    assert!(so.contains("0: OK kinds target ok"), "{so}");
    assert!(so.contains("1: OK kinds initiator ok"), "{so}");
}

#[test]
fn requests_that_cannot_hold_the_job_are_refused_and_extra_nodes_or_an_unused_key_noted() {
    let h = hello().display().to_string();
    for (args, want) in [
        (
            &["-n", "8", "--nodes", "2", "--ppn", "2"][..],
            "--nodes 2 x --ppn 2 cannot hold 8 ranks",
        ),
        (
            &["-n", "3", "--nodes", "2", "--ppn", "1"][..],
            "--nodes 2 x --ppn 1 cannot hold 3 ranks",
        ),
        // Said once by yod, not once per node by every PCT that was asked.
        (
            &["-n", "99999"][..],
            "-n 99999 is more ranks than a job may have (65536)",
        ),
    ] {
        let mut a = args.to_vec();
        a.push(&h);
        let out = run_yod(&a);
        assert!(!out.status.success(), "{a:?}");
        assert!(out.stdout.is_empty(), "{a:?} started ranks");
        assert_eq!(
            text(&out.stderr).lines().count(),
            1,
            "{a:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains(want),
            "{a:?}: {}",
            text(&out.stderr)
        );
    }
    // A key given to the embedded partition is not used, and yod says so.
    let out = run_yod(&[
        "--local",
        "--key",
        "/nonexistent/cluster.key",
        "-n",
        "2",
        &h,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--key /nonexistent/cluster.key is not used"),
        "{}",
        text(&out.stderr)
    );
    // More nodes than ranks: the job runs, one rank per node, and yod says so.
    let out = run_yod(&["-n", "3", "--nodes", "5", &h]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).lines().count(), 3);
    assert!(
        text(&out.stderr).contains("the job uses 3 node(s)"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_closed_stderr_does_not_make_yod_panic_or_lose_the_exit_status() {
    // `yod ... 2>&1 | head` closes yod's stderr early; yod's own messages must not panic
    // (exit 101) but end the job and return the failing rank's status.
    let mut child = std::process::Command::new(yod())
        .args(["-n", "4", "/bin/sh", "-c", "echo bad args >&2; exit 2"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(2), "{st:?}");
}
