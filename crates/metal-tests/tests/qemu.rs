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
