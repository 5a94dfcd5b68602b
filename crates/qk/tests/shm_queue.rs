//! Multi-process tests of the node-local queues: real processes attached through an inherited memfd.

use std::process::{Command, Stdio};

use qk::{CpuMode, JobFabricSpec, NodeFabric};

fn rank_bin() -> &'static str {
    env!("CARGO_BIN_EXE_qk-test-rank")
}

fn spec(local: u32) -> JobFabricSpec {
    let mut s = JobFabricSpec::new(7, local, (0..local).collect(), CpuMode::Heater);
    s.queue_bytes = 64 * 1024;
    s.heap_bytes_per_rank = 1 << 20;
    s
}

fn spawn(fab: &NodeFabric, port: u32, args: &[String]) -> std::process::Child {
    let fd = fab.prepare_child_fd().expect("fd inheritable");
    Command::new(rank_bin())
        .args(["--fd", &fd.to_string(), "--port", &port.to_string()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn test rank")
}

fn finish(c: std::process::Child) -> String {
    let out = c.wait_with_output().expect("wait");
    let so = String::from_utf8_lossy(&out.stdout).to_string();
    let se = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "rank failed: {so}{se}");
    so
}

#[test]
fn queue_carries_records_between_processes_in_order() {
    let fab = NodeFabric::create(&spec(2)).expect("create fabric");
    let s: Vec<String> = [
        "raw-send", "--to", "1", "--count", "200000", "--max", "3000", "--seed", "9",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let r: Vec<String> = ["raw-recv", "--from", "0", "--count", "200000"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let recv = spawn(&fab, 1, &r);
    let send = spawn(&fab, 0, &s);
    finish(send);
    let out = finish(recv);
    assert!(out.contains("received 200000 in order"), "{out}");
    let st = fab.stats();
    assert_eq!(st[0].sent, 200000);
    assert_eq!(st[1].total_drops(), 0);
}

#[test]
fn region_fd_is_not_in_dev_shm_and_has_a_clear_layout_error() {
    let fab = NodeFabric::create(&spec(2)).expect("create fabric");
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fab.fd())).expect("readlink");
    assert!(link.to_string_lossy().starts_with("/memfd:"), "{link:?}");
    let mut bad = spec(2);
    bad.queue_bytes = 5000;
    let e = NodeFabric::create(&bad).expect_err("non power of two queue");
    assert!(e.to_string().contains("power of two"), "{e}");
}
