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

/// Long runs of back-to-back broadcasts from one root (the root changing every 45), each checked,
/// with reduces and all-reduces mixed in: the root runs ahead of its readers through all 64 slots
/// of the collective area and must wait for each slot to be free (and a little longer, see
/// `NodeColl::wait_reuse`). Sizes on both sides of the slot size and of the 4 KiB slot-path limit;
/// 1 to 8 ranks (8 on this 2-core machine is oversubscribed), and across nodes.
#[test]
fn streaks_of_small_broadcasts_reuse_slots_safely() {
    for (n, nodes) in [(1, 1), (2, 1), (3, 1), (5, 1), (8, 1), (5, 2)] {
        let s = (40 + n).to_string();
        let k = nodes.to_string();
        let yod_args: &[&str] = if nodes > 1 { &["--nodes", &k] } else { &[] };
        let args = ["--seed", &s, "--sizes", "1", "--streak", "600"];
        let so = ok(n, yod_args, "coll_check", &args);
        assert!(so.contains(&format!("coll-check OK: {n} ranks")), "{so}");
    }
}

/// Byte broadcasts and all-reduces of sizes on either side of every cache-line boundary of a slot
/// (and of the lines a waiting reader asks for with the word, and of one slot), 70 back-to-back
/// operations per size so every slot is reused at that size, each checked against its own data:
/// a reader must never take a stale, half-written or overwritten slot, whatever lines it fetched
/// early and whatever lines the writer took back ahead. 2, 3 and 5 ranks on one node, 8
/// (oversubscribed) and 5 on two nodes.
#[test]
fn small_payloads_at_every_line_boundary_through_reused_slots() {
    for (n, nodes) in [(2, 1), (3, 1), (5, 1), (8, 1), (5, 2)] {
        let s = (70 + n).to_string();
        let k = nodes.to_string();
        let yod_args: &[&str] = if nodes > 1 { &["--nodes", &k] } else { &[] };
        let args = [
            "--seed",
            &s,
            "--sizes",
            "1",
            "--streak",
            "0",
            "--dup-sizes",
            "0",
            "--line-streak",
            "70",
        ];
        let so = ok(n, yod_args, "coll_check", &args);
        assert!(so.contains(&format!("coll-check OK: {n} ranks")), "{so}");
    }
}

/// With more ranks than cores (8 on this 2-core machine), broadcasts up to 8 KiB take the slots
/// in pieces instead of the stage (which lets a root run only 3 operations ahead of a
/// descheduled reader); 8193 bytes take the stage again. With a core per rank (2 ranks) the
/// stage carries all sizes above one slot. 70 back-to-back broadcasts per size, each checked,
/// so the multi-piece slot path wraps the 64 slots several times.
#[test]
fn crowded_nodes_broadcast_a_few_kib_through_the_slots() {
    for (n, sizes, slots_only) in [
        (8, "2033,4064,4065,8192", true),
        (8, "8193", false),
        (2, "4096", false),
    ] {
        let so = bcast_streak(n, "91", "70", sizes);
        assert_eq!(
            so.contains("stage pieces: 0\n"),
            slots_only && crowded(n),
            "{n} ranks, {sizes}: {so}"
        );
    }
}

/// With more ranks than cores (8 on this 2-core machine), broadcasts of at most 112 bytes take
/// the 1024 small slots: 2200 back-to-back broadcasts per size, each checked, the readers pausing
/// twice so the root runs ahead through the whole ring and waits for small slots to be freed,
/// and wraps it twice. With a core per rank (2 ranks) they keep the slots. 113 bytes (one
/// byte over a small slot's payload) never takes the small slots.
#[test]
fn crowded_small_broadcasts_go_through_the_small_slots_and_wrap() {
    for (n, sizes, small) in [
        (8, "0,1,8,47,48,49,64,111,112", true),
        (8, "113", false),
        (2, "8,112", false),
    ] {
        let so = bcast_streak(n, "93", "2200", sizes);
        // Rank 0 takes part in every broadcast of the streaks (the other checks of coll_check
        // add a few small-slot operations of their own).
        let streaks = 2200 * sizes.split(',').count() as u64;
        let ops = stat(&so, "small ops");
        let small = small && crowded(n);
        assert_eq!(ops >= streaks, small, "{n} ranks, {sizes}: {so}");
        assert!(small || ops < 100, "{n} ranks, {sizes}: {so}");
    }
    // Small-slot broadcasts (0-6 i64) mixed with slot broadcasts (254 i64), reduces and
    // all-reduces (5 ranks on 2 cores: crowded), the root changing every 90 operations.
    let so = ok(5, &[], "coll_check", &["--seed", "94", "--streak", "2500"]);
    assert!(so.contains("coll-check OK: 5 ranks"), "{so}");
}

/// A crowded broadcast (8 ranks on this 2-core machine) whose ranks pass lengths on either side
/// of the small slots' 112 bytes (or both in them) fails with a size mismatch on the reader,
/// whichever kind of slot the root took, also when the reader's length takes the stage.
#[test]
fn mismatched_crowded_small_broadcast_is_a_clear_error() {
    if !crowded(8) {
        eprintln!("SKIP: needs more ranks (8) than this host's online cores");
        return;
    }
    // u64 elements: 14 (112 B) against 11 (88 B), both small slots; 15 (120 B, a slot) against
    // 12 (96 B, a small slot); 13 (104 B) against 16 (128 B, a slot) or 2013 (16104 B, the
    // stage); 3 (24 B) against 6 (48 B).
    for (len, longer) in [
        ("14", None),
        ("15", None),
        ("13", Some("3")),
        ("13", Some("2000")),
        ("3", Some("3")),
    ] {
        let mut args = vec!["--mismatch", "--mismatch-bcast", "--mismatch-len", len];
        if let Some(k) = longer {
            args.extend(["--mismatch-longer", k]);
        }
        let out = yod_env(8, &[], "coll_check", &args, &[]);
        assert!(!out.status.success(), "{len} {longer:?}");
        let e = text(&out.stderr);
        assert!(
            e.contains("size mismatch in broadcast"),
            "{len} {longer:?}: {e}"
        );
        assert!(!text(&out.stdout).contains("returned without error"));
    }
}

/// Large payloads on one node go through the stages in pieces of 8192 i64 (64 KiB): sizes on
/// both sides of the slot/stage switch (254/255 elements), of a piece boundary, and more pieces
/// than stage segments (so segments are reused), on 2 to 8 ranks (odd counts cut uneven slices).
/// All-to-all (blocks of n/p + 1 elements) goes through the stages above one slot (2032 bytes)
/// per rank; the duplicate, without stages, through the slots in pieces up to 64 KiB per rank
/// (2000 elements: 16 KiB; 8191 and 8192 fall on either side of 64 KiB on 2 and 8 ranks) and
/// through portals above. All-to-all blocks from 64 KiB (32 KiB with more ranks than cores) go by
/// cross-memory attach unless `PUMACOLL_CMA=0`.
/// The duplicate communicator cannot get the stages and takes the portals algorithms.
#[test]
fn large_collectives_through_the_stages() {
    let sizes = "254,255,8191,8192,8193,40963";
    for (n, seed) in [(2, 31), (3, 32), (5, 33), (8, 34)] {
        let s = seed.to_string();
        let dup = "100,2000,8191,8192,20000";
        let args = ["--seed", &s, "--sizes", sizes, "--dup-sizes", dup];
        let so = ok(n, &[], "coll_check", &args);
        assert!(so.contains(&format!("coll-check OK: {n} ranks")), "{so}");
        assert!(!so.contains("stage pieces: 0\n"), "{so}");
    }
    // All-to-all through the stages in both stream orders (rotated: the default with a core per
    // rank; destination order: with more ranks than cores), cross-memory attach off so the
    // largest blocks take the stages too.
    for (n, rotate) in [(2, "0"), (3, "1"), (5, "1"), (8, "1")] {
        let args = ["--seed", "36", "--sizes", sizes, "--dup-sizes", "0"];
        let env = [("PUMACOLL_STAGE_ROTATE", rotate), ("PUMACOLL_CMA", "0")];
        let so = checked_env(n, &args, &env);
        assert!(so.contains("cma blocks: 0\n"), "{so}");
    }
    // Turned off, the same checks pass without them.
    let args = ["--seed", "35", "--sizes", sizes];
    let so = checked_env(3, &args, &[("PUMACOLL_STAGE", "0")]);
    assert!(so.contains("stage pieces: 0\n"), "{so}");
}

/// All-to-all blocks may be read straight from the other ranks' send buffers by cross-memory
/// attach: on a communicator with the stages (the world here) from 16 KiB blocks when it
/// measures cheapest or `PUMACOLL_LARGE=cma` forces it, as here; on one without them (the
/// duplicate) from 64 KiB (32 KiB with more ranks than cores: 8 ranks here). coll_check's blocks
/// are n/p + 1 i64: 4093/4094 elements fall on either side of 16 KiB on 2 ranks, 16381/16382 of
/// 64 KiB, 32759/32760 of 32 KiB on 8; 3 ranks cut uneven blocks. Each run must pass and rank 0
/// must have read blocks that way; `PUMACOLL_CMA_MIN` forces the path down to small blocks,
/// `PUMACOLL_CMA=0` turns it off (the stages carry the same sizes).
#[test]
fn large_all_to_all_by_cross_memory_attach() {
    for (n, seed, sizes, dup) in [
        (2, 61, "4093,4094,50000", "16381,16382"),
        (3, 62, "16381,30000,70001", "70001"),
        (8, 63, "32759,32760,70000", "32759,32760"),
    ] {
        let s = seed.to_string();
        let args = ["--seed", &s, "--sizes", sizes, "--dup-sizes", dup];
        let so = checked_env(n, &args, &[("PUMACOLL_LARGE", "cma")]);
        assert!(!so.contains("cma blocks: 0\n"), "{so}");
    }
    let args = ["--seed", "64", "--sizes", "1,17,300,1000,30000"];
    for (env, val, off) in [
        ("PUMACOLL_CMA_MIN", "8", false),
        ("PUMACOLL_CMA", "0", true),
    ] {
        let so = checked_env(3, &args, &[(env, val)]);
        assert_eq!(so.contains("cma blocks: 0\n"), off, "{env}={val}: {so}");
    }
}

/// Large broadcasts and all-reduces on one node take the stages (plain or non-temporal stores)
/// or the single-copy path (cross-memory attach), chosen by the root / member 0 by measured cost
/// unless `PUMACOLL_LARGE` forces one. Each forced path and the measured choice, against serial results on 2/3/5/8
/// ranks: sizes on both sides of the 64 KiB single-copy limit (8191/8192 i64), of a stage piece
/// (8193), several pieces and odd slices (40963, 131073); the byte broadcasts of coll_check add
/// lengths that are no multiple of 8. The 200-broadcast streak switches roots under the chooser.
/// `PUMACOLL_CMA_MIN=8` takes the single-copy path down to the smallest staged sizes (255 i64).
#[test]
fn large_broadcast_and_all_reduce_by_either_path() {
    let sizes = "254,255,8191,8192,8193,40963,131073";
    let runs = [
        (2, "cma", "8"),
        (5, "cma", "8"),
        (3, "stage", ""),
        (8, "stage", ""),
        (2, "nt", ""),
        (5, "nt", ""),
    ];
    let both = [2, 3, 5, 8]
        .iter()
        .flat_map(|&n| [(n, "cma", ""), (n, "", "")]);
    for (n, path, min) in runs.into_iter().chain(both) {
        let s = (70 + n).to_string();
        let args = ["--seed", &s, "--sizes", sizes, "--dup-sizes", "0"];
        {
            let mut env = vec![("PUMACOLL_LARGE", path)];
            if !min.is_empty() {
                env.push(("PUMACOLL_CMA_MIN", min));
            }
            let so = checked_env(n, &args, &env);
            let pieces = stat(&so, "stage pieces");
            let cma = stat(&so, "cma blocks");
            match (path, min) {
                // Everything from one slot up goes by cross-memory attach (all-to-all too).
                ("cma", "8") => assert!(pieces == 0 && cma > 0, "{env:?}: {so}"),
                // Up to 64 KiB the stages, above one copy.
                ("cma", _) => assert!(pieces > 0 && cma > 0, "{env:?}: {so}"),
                // Only the all-to-alls of 64 KiB blocks (2 ranks: 131073/2 + 1 i64) read others.
                ("stage" | "nt", _) => assert!(pieces > 0 && cma <= 2 * n as u64, "{env:?}: {so}"),
                // Measured: both paths were tried.
                _ => assert!(pieces > 0 && cma > 2 * n as u64, "{env:?}: {so}"),
            }
        }
    }
}

/// Large all-to-alls on one node with a core per rank (blocks from 16 KiB) take the stages
/// (plain or non-temporal stores) or the single copy, chosen by member 0 by measured cost unless
/// `PUMACOLL_LARGE` forces one; smaller blocks always take the plain stages. With more ranks than
/// cores (3 to 8 ranks on this 2-core host) the choice from 32 KiB blocks is between the plain
/// stages and the single copy. Each forced path and the measured
/// choice against serial results on 2/3/5/8 ranks: the sizes of coll_check (blocks n/p + 1 i64,
/// uneven on 3 and 5 ranks) and a streak of 60 all-to-alls with blocks of 2047, 2048 (16 KiB)
/// and 8193 i64 (more than one stage piece) in turn, under which the choice takes every path.
#[test]
fn large_all_to_all_by_every_path() {
    for n in [2, 3, 5, 8] {
        for path in ["stage", "nt", "cma", ""] {
            let env = [("PUMACOLL_LARGE", path)];
            let so = alltoall_streak(n, 90 + n, "255,4099,40963", 60, &[], &env);
            let (pieces, cma) = (stat(&so, "stage pieces"), stat(&so, "cma blocks"));
            match path {
                "stage" | "nt" => assert!(pieces > 0 && cma == 0, "{env:?}: {so}"),
                // Blocks below 16 KiB still take the stages.
                "cma" => assert!(pieces > 0 && cma >= 20 * (n as u64 - 1), "{env:?}: {so}"),
                // Measured: every path was tried (the single copy at least twice per size class).
                _ => assert!(pieces > 0 && cma >= 2 * (n as u64 - 1), "{env:?}: {so}"),
            }
        }
    }
}

/// With more ranks than cores, all-to-alls of 64 KiB blocks (8193 i64), each checked: member 0
/// picks the plain stages or the single copy by measured cost (with more than two ranks per CPU,
/// 5 and 8 on this 2-core host, the readers-only one; with at most two, 3 and 4, the claims,
/// decided one operation ahead), so both were taken (every path is tried first).
#[test]
fn crowded_large_all_to_all_chooses_between_stages_and_single_copy() {
    for n in [3, 4, 5, 8] {
        if !crowded(n) {
            continue;
        }
        let so = alltoall_streak(n, 130 + n, "1", 40, &["--alltoall-blocks", "8193"], &[]);
        let (pieces, cma) = (stat(&so, "stage pieces"), stat(&so, "cma blocks"));
        assert!(cma > 0 && pieces > 0, "{n} ranks: {so}");
    }
}

/// With at most two ranks per CPU (3 and 4 on this 2-core host) a crowded all-to-all of blocks
/// from 32 KiB takes the path member 0 named in the previous one of the same length: 120
/// all-to-alls, each checked, with blocks of 8193 and 4096 i64 in turn (two lengths, each with
/// its own path named ahead), each rank in turn arriving 300 µs late. Both the stages and the
/// claims (blocks pushed to a core-mate) were taken, and every operation's members agreed on
/// its path: a member that finds another on the other path fails the run with an error.
#[test]
fn crowded_all_to_all_takes_the_path_named_one_operation_ahead() {
    let cpus = qk::sys::online_cpus() as u32;
    for n in [3, 4] {
        if !crowded(n) || n > 2 * cpus {
            continue;
        }
        let extra = [
            "--alltoall-blocks",
            "8193,4096",
            "--alltoall-late-us",
            "300",
        ];
        let so = alltoall_streak(n, 150 + n, "1", 120, &extra, &[]);
        let (pieces, pushed) = (stat(&so, "stage pieces"), stat(&so, "cma pushed"));
        assert!(pieces > 0 && pushed > 0, "{n} ranks: {so}");
    }
}

/// With more ranks than cores, an all-to-all by cross-memory attach moves each block once, by
/// whichever of its two ranks runs first once both have published (reading it out of the
/// sender's send buffer, or, when the two share a CPU, writing it into the receiver's receive
/// buffer): 150 back-to-back all-to-alls (one slot each, so the 64 slots wrap twice) with
/// blocks of 2047, 2048 and 8193 i64, all on that path (`PUMACOLL_CMA_MIN=8`), each checked,
/// and coll_check's sizes (uneven blocks). With at most two ranks per CPU (3 and 4 on this
/// 2-core host) blocks must have been written by their senders (summed over the ranks); with
/// more (5, 8) only when `PUMACOLL_CMA_CLAIM=1` asks for it; `PUMACOLL_CMA_CLAIM=0` keeps the
/// readers-only protocol, which writes none, and so does a core per rank (2 ranks).
#[test]
fn crowded_all_to_all_moves_each_block_by_whichever_rank_runs() {
    let cpus = qk::sys::online_cpus() as u32;
    for (n, claims) in [
        (3, ""),
        (4, ""),
        (5, ""),
        (5, "1"),
        (8, "1"),
        (8, "0"),
        (2, "1"),
    ] {
        let env = [
            ("PUMACOLL_CMA_MIN", "8"),
            ("PUMACOLL_LARGE", "cma"),
            ("PUMACOLL_CMA_CLAIM", claims),
        ];
        let so = alltoall_streak(n, 110 + n, "17,4099,40963", 150, &[], &env);
        assert!(stat(&so, "cma blocks") >= 150 * (n as u64 - 1) / 2, "{so}");
        let pushed = stat(&so, "cma pushed");
        let want = crowded(n) && (claims == "1" || (claims.is_empty() && n <= 2 * cpus));
        assert_eq!(pushed > 0, want, "{n} ranks, {env:?}: {so}");
    }
}

/// coll_check with only back-to-back broadcasts: `streak` of each of `sizes` (bytes, comma
/// separated), each checked; returns rank 0's output after checking the run passed.
fn bcast_streak(n: u32, seed: &str, streak: &str, sizes: &str) -> String {
    let args = [
        "--seed",
        seed,
        "--sizes",
        "1",
        "--streak",
        "0",
        "--dup-sizes",
        "0",
        "--line-streak",
        streak,
        "--line-bcast-only",
        "--line-sizes",
        sizes,
    ];
    let so = ok(n, &[], "coll_check", &args);
    assert!(so.contains(&format!("coll-check OK: {n} ranks")), "{so}");
    so
}

/// `coll_check` on `n` ranks (no yod options) with `env` set: asserts that it passed (exit
/// status and its OK line, naming the ranks and the environment otherwise) and returns its
/// standard output.
fn checked_env(n: u32, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = yod_env(n, &[], "coll_check", args, env);
    let so = text(&out.stdout);
    assert!(
        out.status.success() && so.contains(&format!("coll-check OK: {n} ranks")),
        "{n} ranks, {env:?}: {so} {}",
        text(&out.stderr)
    );
    so
}

/// coll_check with its sizes (`sizes`, one round, no duplicate-communicator sizes, no broadcast
/// streak) and `count` back-to-back all-to-alls, each checked, plus `extra` arguments, under
/// `env`; returns rank 0's output after checking the run passed.
fn alltoall_streak(
    n: u32,
    seed: u32,
    sizes: &str,
    count: u32,
    extra: &[&str],
    env: &[(&str, &str)],
) -> String {
    let (seed, count) = (seed.to_string(), count.to_string());
    let mut args = vec![
        "--seed",
        &seed,
        "--sizes",
        sizes,
        "--dup-sizes",
        "0",
        "--streak",
        "0",
        "--alltoall-streak",
        &count,
    ];
    args.extend_from_slice(extra);
    checked_env(n, &args, env)
}

/// True when `ranks` ranks on this host are more than its online cores: the library's test for
/// a crowded node (`qk::sys::online_cpus`). The crowded paths' tests expect them only then, so
/// they also hold on hosts with more cores than the 2 of the project machine.
fn crowded(ranks: u32) -> bool {
    ranks as usize > qk::sys::online_cpus()
}

/// The value of a `name: N` line of coll_check's output.
fn stat(out: &str, name: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": ")?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {out}"))
}

/// A broadcast whose ranks pass different lengths fails with a clear error on every path.
#[test]
fn mismatched_large_broadcast_is_a_clear_error() {
    for path in ["cma", "stage", ""] {
        let args = ["--mismatch", "--mismatch-bcast", "--mismatch-len", "100000"];
        let out = yod_env(3, &[], "coll_check", &args, &[("PUMACOLL_LARGE", path)]);
        assert!(!out.status.success());
        let e = text(&out.stderr);
        assert!(e.contains("size mismatch in broadcast"), "{path}: {e}");
        assert!(!text(&out.stdout).contains("returned without error"));
    }
    // All-reduce by cross-memory attach: every member sees the mismatch before reading.
    let args = ["--mismatch", "--mismatch-len", "100000"];
    let out = yod_env(3, &[], "coll_check", &args, &[("PUMACOLL_LARGE", "cma")]);
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(e.contains("size mismatch in all-reduce"), "{e}");
    assert!(!text(&out.stdout).contains("returned without error"));
}

#[test]
fn mismatched_all_to_all_by_cross_memory_attach_is_a_clear_error() {
    let args = [
        "--mismatch",
        "--mismatch-alltoall",
        "--mismatch-len",
        "20000",
    ];
    for (n, path) in [
        (3, "cma"),
        (3, "stage"),
        (3, "nt"),
        (3, ""),
        (8, "cma"),
        (5, ""),
    ] {
        let out = yod_env(n, &[], "coll_check", &args, &[("PUMACOLL_LARGE", path)]);
        assert!(!out.status.success());
        let e = text(&out.stderr);
        assert!(
            e.contains("size mismatch in all-to-all"),
            "{n} ranks, {path}: {e}"
        );
        assert!(!text(&out.stdout).contains("returned without error"));
    }
}

#[test]
fn mismatched_sizes_in_the_stages_are_a_clear_error() {
    let out = yod(
        3,
        &[],
        "coll_check",
        &["--mismatch", "--mismatch-len", "100000"],
    );
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(e.contains("size mismatch in all-reduce"), "{e}");
    assert!(!text(&out.stdout).contains("returned without error"));
}

#[test]
fn mismatched_sizes_are_a_clear_error() {
    let out = yod(3, &[], "coll_check", &["--mismatch"]);
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(e.contains("size mismatch in all-reduce"), "{e}");
    assert!(!text(&out.stdout).contains("returned without error"));
}
