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
