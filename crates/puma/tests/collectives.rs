//! Every collective against a serial result (the `coll_check` example), for sizes from 0 to
//! 30000 elements (both sides of every algorithm switch), 1 to 8 ranks, one or several nodes.

mod common;
use common::*;

fn check(n: u32, yod_args: &[&str], seed: u64) {
    let s = seed.to_string();
    let so = ok(n, yod_args, "coll_check", &["--seed", &s]);
    assert!(
        so.contains(&format!("coll-check OK: {n} ranks")),
        "yod -n {n} {yod_args:?}: {so}"
    );
}

#[test]
fn collectives_on_1_to_4_ranks() {
    for n in 1..=4 {
        check(n, &[], 100 + n as u64);
    }
}

#[test]
fn collectives_on_5_to_8_ranks() {
    for n in 5..=8 {
        check(n, &[], 200 + n as u64);
    }
}

#[test]
fn collectives_node_aware_on_several_nodes() {
    check(6, &["--nodes", "2"], 7);
    check(7, &["--nodes", "3"], 8);
    check(8, &["--nodes", "4"], 9);
}

#[test]
fn mismatched_sizes_are_a_clear_error() {
    let out = yod(3, &[], "coll_check", &["--mismatch"]);
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(e.contains("size mismatch in all-reduce"), "{e}");
    assert!(!text(&out.stdout).contains("returned without error"));
}
