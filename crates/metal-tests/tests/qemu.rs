//! End-to-end tests of the bare-metal QK under QEMU (TCG). Each boots a fresh
//! node with a PCT script on the kernel command line and checks the serial
//! console. They skip with a printed reason when QEMU is not installed.
use std::path::PathBuf;
use std::time::Duration;

use metal_tests::{build_kernel, qemu_available, run};

const TIMEOUT: Duration = Duration::from_secs(40);

fn kernel() -> Option<PathBuf> {
    if !qemu_available() {
        eprintln!(
            "SKIP: {} not installed (apt-get install qemu-system-x86)",
            metal_tests::QEMU
        );
        return None;
    }
    match build_kernel() {
        Ok(k) => Some(k),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn boots_and_runs_hello_in_ring_3() {
    let Some(k) = kernel() else { return };
    let r = run(&k, "run=hello", TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(r.output.contains("qk: booted, long mode"), "{}", r.output);
    assert!(
        r.output.contains("hello from ring 3: pid 2 on node 0"),
        "{}",
        r.output
    );
    assert!(
        r.output.contains("pct: pid 2 exited with status 0"),
        "{}",
        r.output
    );
    assert!(r.clean_shutdown(), "status {:?}\n{}", r.status, r.output);
}

#[test]
fn pct_only_call_from_an_application_is_refused() {
    let Some(k) = kernel() else { return };
    let r = run(&k, "run=pctcall,hello", TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        r.output.matches("refused (EPERM)").count(),
        3,
        "{}",
        r.output
    );
    assert!(
        r.output.contains("mem_map(pid 1) returned -1"),
        "{}",
        r.output
    );
    assert!(
        r.output
            .contains("pctcall: 4 of 4 privileged calls refused; still running"),
        "{}",
        r.output
    );
    assert!(
        r.output.contains("pct: pid 2 exited with status 0"),
        "{}",
        r.output
    );
    // The node is intact afterwards: the next application runs.
    assert!(r.output.contains("hello from ring 3"), "{}", r.output);
    assert!(r.clean_shutdown(), "status {:?}\n{}", r.status, r.output);
}

#[test]
fn application_fault_is_contained_and_reported_by_the_pct() {
    let Some(k) = kernel() else { return };
    let r = run(&k, "run=fault,fault:1,fault:2,hello", TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        r.output
            .contains("pct: pid 2 killed by page fault (vector 14) at address 0x100000"),
        "{}",
        r.output
    );
    assert!(
        r.output
            .contains("pct: pid 2 killed by general protection fault (vector 13)"),
        "{}",
        r.output
    );
    assert!(
        r.output
            .contains("pct: pid 2 killed by divide error (vector 0)"),
        "{}",
        r.output
    );
    assert!(!r.output.contains("protection is broken"), "{}", r.output);
    let after = r
        .output
        .split("killed by page fault")
        .nth(1)
        .unwrap_or_default();
    assert!(
        after.contains("hello from ring 3"),
        "no application ran after the fault:\n{}",
        r.output
    );
    assert!(r.clean_shutdown(), "status {:?}\n{}", r.status, r.output);
}

#[test]
fn round_robin_interleaves_two_applications_with_a_user_mode_timer() {
    let Some(k) = kernel() else { return };
    let r =
        run(&k, "run=spin,spin policy=rr quantum=1000", TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        r.output
            .contains("qk: timer on (round-robin, quantum 1000 us)"),
        "{}",
        r.output
    );
    let steps: Vec<&str> = r
        .output
        .lines()
        .filter(|l| l.starts_with("spin: pid"))
        .collect();
    assert_eq!(steps.len(), 10, "{}", r.output);
    // Interleaved: the first application has not finished when the second starts printing.
    let last_of_2 = steps
        .iter()
        .rposition(|l| l.starts_with("spin: pid 2"))
        .unwrap_or(0);
    let first_of_3 = steps
        .iter()
        .position(|l| l.starts_with("spin: pid 3"))
        .unwrap_or(usize::MAX);
    assert!(first_of_3 < last_of_2, "no interleaving:\n{}", r.output);
    assert!(r.clean_shutdown(), "status {:?}\n{}", r.status, r.output);
}

#[test]
fn single_tasking_runs_without_a_timer() {
    let Some(k) = kernel() else { return };
    let r = run(&k, "run=spin,spin", TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(!r.output.contains("timer on"), "{}", r.output);
    let steps: Vec<&str> = r
        .output
        .lines()
        .filter(|l| l.starts_with("spin: pid"))
        .collect();
    assert_eq!(steps.len(), 10, "{}", r.output);
    assert!(
        steps[..5].iter().all(|l| l.starts_with("spin: pid 2")),
        "{}",
        r.output
    );
    assert!(r.clean_shutdown(), "status {:?}\n{}", r.status, r.output);
}

use metal_tests::{MIN_AMPLITUDE, PEAK_LIMIT};

/// Runs FTQ in virtual time (`-icount`): the guest's clock advances with the
/// instructions it executes, so host noise (other processes on the machine
/// QEMU runs on) cannot show up; what remains is the guest's own interference.
fn ftq(k: &std::path::Path, append: &str) -> Vec<f64> {
    let extra = ["-icount".to_string(), "shift=0".to_string()];
    let child = metal_tests::spawn(k, append, &extra).unwrap_or_else(|e| panic!("{e}"));
    let r = metal_tests::finish(child, TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(r.clean_shutdown(), "status {:?}\n{}", r.status, r.output);
    let counts = metal_tests::ftq_counts(&r.output);
    assert_eq!(counts.len(), 2000, "{}", r.output);
    counts
}

#[test]
fn exclusive_ftq_on_the_bare_kernel_has_no_periodic_peak() {
    let Some(k) = kernel() else { return };
    let counts = ftq(&k, "run=ftq:2000");
    let worst = metal_tests::interference(&counts, MIN_AMPLITUDE);
    eprintln!("bare FTQ: strongest line of significant amplitude: {worst:?}");
    if let Some(l) = worst {
        assert!(
            l.ratio < PEAK_LIMIT,
            "periodic interference on the bare kernel: {l:?}"
        );
    }

    // The detector does see a periodic interruption: FTQ sharing the CPU with
    // a spinner under round-robin (1 ms quantum) shows strong lines.
    let counts = ftq(&k, "run=ftq:2000,spin:20 policy=rr quantum=1000");
    let l = metal_tests::interference(&counts, MIN_AMPLITUDE)
        .unwrap_or_else(|| panic!("no line at all"));
    eprintln!("FTQ under round-robin: {l:?}");
    assert!(
        l.ratio > PEAK_LIMIT,
        "round-robin interference not detected: {l:?}"
    );
}

#[test]
fn two_nodes_put_and_ping_pong_over_ivshmem_with_data_checked() {
    let Some(k) = kernel() else { return };
    let (n0, n1) = metal_tests::run_two_nodes(&k, "run=pingpong:50", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let both = format!(
        "--- node 0 ---\n{}\n--- node 1 ---\n{}",
        n0.output, n1.output
    );
    assert!(n0.output.contains("this is node 0 of 2"), "{both}");
    assert!(n1.output.contains("this is node 1 of 2"), "{both}");
    assert!(
        n1.output.contains(
            "put of 4000 bytes from node 0 landed in the matched descriptor, every byte checked"
        ),
        "{both}"
    );
    assert!(
        n0.output
            .contains("50 round trips with node 1, every byte checked"),
        "{both}"
    );
    assert!(
        n1.output.contains("answered 50 pings, every byte checked"),
        "{both}"
    );
    // The receiver was blocked (not scheduled) while most messages landed.
    let line = n1
        .output
        .lines()
        .find(|l| l.contains("were deposited by the kernel"))
        .unwrap_or_default();
    let deposited: u64 = line
        .split(';')
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|w| w.parse().ok())
        .unwrap_or(0);
    assert!(
        deposited >= 40,
        "only {deposited} of 51 deposits while blocked: {both}"
    );
    assert!(n0.clean_shutdown() && n1.clean_shutdown(), "{both}");
}

#[test]
fn ping_pong_alone_reports_the_missing_second_node() {
    let Some(k) = kernel() else { return };
    let r = run(&k, "run=pingpong", TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        r.output
            .contains("pingpong: needs two nodes (ivshmem), this node sees 1"),
        "{}",
        r.output
    );
    assert!(
        r.output.contains("pct: pid 2 exited with status 2"),
        "{}",
        r.output
    );
}

#[test]
fn unknown_program_is_a_clear_error_and_the_node_continues() {
    let Some(k) = kernel() else { return };
    let r = run(&k, "run=nosuch,hello", TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        r.output
            .contains("pct: no program named 'nosuch' in the boot image"),
        "{}",
        r.output
    );
    assert!(r.output.contains("hello from ring 3"), "{}", r.output);
    assert!(r.output.contains("1 launch failures"), "{}", r.output);
    // isa-debug-exit: 0x11 * 2 + 1.
    assert_eq!(r.status, Some(35), "{}", r.output);
}

#[test]
fn portals_entry_points_cover_every_descriptor_kind_with_data_checked() {
    let Some(k) = kernel() else { return };
    let r = run(&k, "run=ptltest", TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    for line in [
        "single descriptor, sender-managed offset: ok",
        "single descriptor, receiver-managed offset: ok",
        "independent blocks (one message per block, full -> discarded): ok",
        "combined blocks (150 bytes scattered over 3 pieces): ok",
        "dynamic heap (header+body saved, full -> discarded, free reuses space): ok",
        "match bits 0x6000 ignoring 0xff: 0x6042 matched, 0x7042 dropped and counted: ok",
        "insert before + use-once + unlink: messages went z, y, x: ok",
        "second link: too-long message went to next, then the linked entry, then nowhere: ok",
        "portal disable/enable and access control (drops counted): ok",
        "put with ack: ok",
        "get with the reply deposited: ok",
        "truncating descriptor kept 16 of 40 bytes; released descriptor drops: ok",
        "64 KiB put: ok",
        "drops: disabled 1 forbidden 1 no_match 1 too_long 2",
        "ptltest: all checks passed",
        "pct: pid 2 exited with status 0",
    ] {
        assert!(r.output.contains(line), "missing {line:?}:\n{}", r.output);
    }
    assert!(r.clean_shutdown(), "status {:?}\n{}", r.status, r.output);
}

#[test]
fn bad_user_pointers_to_portals_calls_return_efault_and_the_app_continues() {
    let Some(k) = kernel() else { return };
    let r = run(&k, "run=ptltest:1,hello", TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        r.output.contains(
            "ptltest: 56 calls with kernel/MMIO/unmapped/non-canonical pointers returned EFAULT; still running"
        ),
        "{}",
        r.output
    );
    assert!(
        r.output.contains("pct: pid 2 exited with status 0"),
        "{}",
        r.output
    );
    assert!(!r.output.contains("killed by"), "{}", r.output);
    // The kernel survived: the next application runs.
    assert!(r.output.contains("hello from ring 3"), "{}", r.output);
    assert!(r.clean_shutdown(), "status {:?}\n{}", r.status, r.output);
}

#[test]
fn two_nodes_get_acked_put_dropped_puts_and_a_64k_put() {
    let Some(k) = kernel() else { return };
    let (n0, n1) =
        metal_tests::run_two_nodes(&k, "run=ptltest", TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let both = format!(
        "--- node 0 ---\n{}\n--- node 1 ---\n{}",
        n0.output, n1.output
    );
    for line in [
        "get of 3000 bytes from node 1 at offset 100, every byte checked",
        // 32568 bytes: the reply spans 9 ring slots.
        "get of 32568 bytes from node 1 at offset 200, every byte checked",
        "ack received for the acked put of 500 bytes",
        "ptltest: all checks passed",
    ] {
        assert!(n0.output.contains(line), "node 0 missing {line:?}:\n{both}");
    }
    for line in [
        "node 1: ack received for the ready put",
        // 65536 bytes: 17 ring slots, reassembled straight into the descriptor.
        "64 KiB put from node 0 landed, every byte checked",
        "gets served 2, acked put ok true, discard events 1, drops: forbidden 1 no_match 1",
        "forbidden and unmatched puts were dropped and counted",
        "ptltest: all checks passed",
    ] {
        assert!(n1.output.contains(line), "node 1 missing {line:?}:\n{both}");
    }
    assert!(n0.clean_shutdown() && n1.clean_shutdown(), "{both}");
}

#[test]
fn two_nodes_stream_64k_messages_both_ways_through_full_rings() {
    let Some(k) = kernel() else { return };
    let (n0, n1) =
        metal_tests::run_two_nodes(&k, "run=ptltest:2", TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let both = format!(
        "--- node 0 ---\n{}\n--- node 1 ---\n{}",
        n0.output, n1.output
    );
    let waits = |out: &str, node: u32| -> u64 {
        let line = out
            .lines()
            .find(|l| {
                l.contains(&format!(
                    "node {node}: sent and received 20 x 64 KiB concurrently, every byte checked"
                ))
            })
            .unwrap_or_else(|| panic!("node {node} did not finish:\n{both}"));
        assert!(line.ends_with("fabric lost 0"), "{both}");
        line.split("ring space ")
            .nth(1)
            .and_then(|t| t.split(';').next())
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("no wait count in {line:?}"))
    };
    // 20 messages of 17 slots into a 120-slot ring that the receiver drains
    // only while its own sends wait: some send must have found it full.
    let total = waits(&n0.output, 0) + waits(&n1.output, 1);
    assert!(total > 0, "no send ever waited for ring space:\n{both}");
    assert!(n0.clean_shutdown() && n1.clean_shutdown(), "{both}");
}
