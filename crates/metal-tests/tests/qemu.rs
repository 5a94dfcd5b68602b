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
    let r = run(&k, "run=fault,hello", TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        r.output
            .contains("pct: pid 2 killed by page fault (vector 14) at address 0x100000"),
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
