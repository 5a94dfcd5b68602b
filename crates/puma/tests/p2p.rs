//! Point-to-point through yod: any-source order, probe, requests, 0 B to 4 MiB, the
//! unexpected-message flood (header-only saves and fetched bodies), windows (put, fence, get),
//! truncation errors, dead peers.

mod common;
use common::*;

#[test]
fn any_source_order_probe_sizes_and_flood() {
    for n in [1u32, 2, 3, 5] {
        let so = ok(n, &[], "p2p_check", &[]);
        assert!(so.contains(&format!("p2p-check OK: {n} ranks")), "{so}");
        if n > 1 {
            // 24 MiB of unexpected messages cannot all fit the 8 MiB unexpected heap.
            let h: u64 = so
                .split("header-only ")
                .nth(1)
                .and_then(|t| t.split_whitespace().next())
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            assert!(h > 0, "no header-only save happened: {so}");
            assert!(so.contains(&format!("bodies fetched {h}")), "{so}");
        }
    }
}

#[test]
fn too_small_receive_buffer_is_a_clear_error() {
    let out = yod(2, &[], "p2p_check", &["--truncate"]);
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(
        e.contains("message truncated: rank 1 sent 80 bytes with tag 3 but the receive buffer holds only 32 bytes"),
        "{e}"
    );
}

#[test]
fn messaging_across_two_virtual_nodes() {
    let so = ok(4, &["--nodes", "2"], "p2p_check", &["--count", "50"]);
    assert!(so.contains("p2p-check OK: 4 ranks"), "{so}");
}

#[test]
fn messaging_in_msg_coproc_mode() {
    let so = ok(
        3,
        &["--mode", "msg-coproc"],
        "p2p_check",
        &["--count", "50"],
    );
    assert!(so.contains("p2p-check OK: 3 ranks"), "{so}");
}

#[test]
fn messaging_in_msg_coproc_mode_with_one_rank_per_virtual_node() {
    // Each rank is alone on its node, so it waits for its node engine (which may share its CPU
    // and then rings the rank's port) as well as for its co-processor thread.
    let so = ok(
        2,
        &["--nodes", "2", "--mode", "msg-coproc"],
        "p2p_check",
        &["--count", "200"],
    );
    assert!(so.contains("p2p-check OK: 2 ranks"), "{so}");
}

#[test]
fn unexpected_bodies_fetched_from_another_node_fit_beside_the_senders_buffers() {
    // A 4 MiB heap per rank: the flood's 1 MiB send copies could fill it, and the replies for
    // the bodies fetched later (from private memory, through bounce buffers in the same heap)
    // were dropped as no_heap_room, the receiver waiting until its timeout. The library now
    // leaves a quarter of the heap to the QK.
    let cfg = std::env::temp_dir().join(format!("puma-heap4-{}.toml", std::process::id()));
    std::fs::write(&cfg, "heap_bytes_per_rank = 4194304\n").expect("config");
    for mode in ["heater", "msg-coproc"] {
        let out = yod_env(
            2,
            &[
                "--nodes",
                "2",
                "--mode",
                mode,
                "--pct-config",
                cfg.to_str().expect("utf-8 path"),
            ],
            "p2p_check",
            &["--count", "20"],
            &[("PUMA_TIMEOUT_MS", "20000")],
        );
        let so = text(&out.stdout);
        assert!(
            out.status.success() && so.contains("p2p-check OK: 2 ranks"),
            "{mode}: {so}\n{}",
            text(&out.stderr)
        );
    }
    std::fs::remove_file(&cfg).ok();
}

#[test]
fn a_dead_peer_is_an_error_not_a_hang() {
    let t0 = std::time::Instant::now();
    let out = yod(2, &[], "p2p_check", &["--die"]);
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(e.contains("rank 1 (pid") && e.contains("has died"), "{e}");
    assert!(t0.elapsed().as_secs() < 30, "took {:?}", t0.elapsed());
}
