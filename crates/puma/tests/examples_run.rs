//! The example programs, end to end through yod.

mod common;
use common::*;

#[test]
fn ring_on_1_to_5_ranks_and_two_nodes() {
    for n in [1u32, 2, 3, 5] {
        let so = ok(n, &[], "ring", &["--laps", "3"]);
        let want = 3 * (n as u64 * (n as u64 - 1) / 2);
        assert!(
            so.contains(&format!("token {want} (expected {want})")),
            "{so}"
        );
    }
    let so = ok(4, &["--nodes", "2"], "ring", &["--laps", "50"]);
    assert!(so.contains("token 300 (expected 300)"), "{so}");
}

#[test]
fn example_without_yod_says_so() {
    let out = std::process::Command::new(example("ring"))
        .env_remove("PUMA_RANK")
        .output()
        .expect("run ring directly");
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(e.contains("not started by yod"), "{e}");
}

#[test]
fn pingpong_checks_every_size() {
    let so = ok(2, &[], "pingpong", &["--iters", "20"]);
    assert!(so.contains("pingpong OK"), "{so}");
    assert!(so.contains("524288"), "{so}");
}

#[test]
fn heat_matches_the_serial_solve_on_several_process_grids() {
    for (n, extra) in [
        (1u32, &[][..]),
        (4, &[][..]),
        (6, &[][..]),
        (5, &["--nodes", "2"][..]),
    ] {
        let so = ok(n, extra, "heat", &["--n", "40", "--iters", "50"]);
        assert!(
            so.contains("max difference from serial 0e0"),
            "{n} ranks: {so}"
        );
    }
}

#[test]
fn sample_sort_orders_and_keeps_every_key() {
    for n in [1u32, 3, 8] {
        let so = ok(n, &[], "sort", &["--keys", "20000"]);
        assert!(
            so.contains(&format!("sort OK: {} keys on {n} ranks", 20000 * n)),
            "{so}"
        );
    }
}

#[test]
fn parallel_file_server_fills_one_descriptor() {
    for (n, args) in [
        (2u32, &["--size", "1000000"][..]),
        (5, &["--size", "3000001", "--stripe", "65536"][..]),
        (8, &["--size", "777777", "--stripe", "4099"][..]),
    ] {
        let so = ok(n, &[], "fileserver", args);
        assert!(so.contains("fileserver OK"), "{so}");
    }
}
