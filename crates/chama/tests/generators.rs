//! Every built-in generator's schedule completes (no receive left unmatched) at 16, 256 and
//! 65,536 ranks, and round-trips through GOAL text.

use chama::gen::{generate, GenParams, Pattern};
use chama::goal::{parse_goal_str, write_goal};
use chama::noise::{parse_latency, parse_noise_source, Noise};
use chama::sim::{simulate, Params, SimOptions};
use chama::stream::{ring_total_ops, simulate_ring_segmented};

fn completes(p: Pattern, ranks: u32) {
    let gp = GenParams {
        ranks,
        iterations: 2,
        allreduce_every: 2,
        compute_ns: 10_000,
        ..GenParams::default()
    };
    let s = generate(p, &gp).expect("generator");
    let out = simulate(
        &s,
        &Params::default(),
        &Noise::none(),
        &SimOptions::default(),
    );
    assert_eq!(
        out.unfinished(),
        0,
        "{} at {ranks} ranks: {} ops unfinished",
        p.name(),
        out.unfinished()
    );
    assert_eq!(out.unmatched_recvs, 0);
    assert_eq!(out.unmatched_sends, 0);
    assert!(out.completion > 0 || ranks == 1);
    // Every rank does something.
    let ends = out.rank_end(&s);
    if ranks > 1 {
        assert!(
            ends.iter().all(|&e| e > 0),
            "{}: a rank had nothing to do",
            p.name()
        );
    }
}

macro_rules! scale_test {
    ($name:ident, $pat:expr, [$($n:expr),*]) => {
        #[test]
        fn $name() {
            for n in [$($n),*] {
                completes($pat, n);
            }
        }
    };
}

scale_test!(
    barrier_completes,
    Pattern::Barrier,
    [1, 16, 256, 1000, 65536]
);
scale_test!(bcast_completes, Pattern::Bcast, [1, 16, 256, 1000, 65536]);
scale_test!(
    allreduce_rd_completes,
    Pattern::AllreduceRd,
    [1, 16, 256, 1000, 65536]
);
scale_test!(
    allreduce_rab_completes,
    Pattern::AllreduceRab,
    [1, 16, 256, 1000, 65536]
);
scale_test!(
    stencil2d_completes,
    Pattern::Stencil2d,
    [1, 2, 16, 256, 1000, 65536]
);
scale_test!(
    stencil3d_completes,
    Pattern::Stencil3d,
    [1, 2, 16, 256, 1000, 65536]
);
// A ring all-reduce has 2(P-1) steps: at 65,536 ranks that is 1.7e10 operations, beyond what a
// 2^31-operation schedule can hold; materialised, it is tested up to 1000 ranks, and the
// segmented simulation (which `chama run` uses beyond that) is checked against it below.
scale_test!(
    allreduce_ring_completes,
    Pattern::AllreduceRing,
    [1, 16, 256, 1000]
);

#[test]
fn ring_at_65536_ranks_is_refused_as_one_schedule() {
    let e = generate(
        Pattern::AllreduceRing,
        &GenParams {
            ranks: 65536,
            ..GenParams::default()
        },
    )
    .expect_err("too big");
    assert!(e.to_string().contains("operations"), "{e}");
    assert!(e.to_string().contains("segments"), "{e}");
}

/// The segmented ring gives exactly what the whole materialised ring gives: same events, same
/// completion per rank, same CPU busy time, same wait and noise per class.
fn segmented_matches_whole(ranks: u32, bytes: u64, reduce: u64, noise: &Noise, seg_ops: u64) {
    let gp = GenParams {
        ranks,
        bytes,
        reduce_ps_per_byte: reduce,
        ..GenParams::default()
    };
    let p = Params::default();
    let opts = SimOptions {
        record_busy: true,
        ..SimOptions::default()
    };
    let s = generate(Pattern::AllreduceRing, &gp).expect("generator");
    let whole = simulate(&s, &p, noise, &opts);
    let seg = simulate_ring_segmented(&gp, &p, noise, &opts, seg_ops).expect("segmented");
    assert!(seg.segments > 2, "the test must cross segment boundaries");
    assert_eq!(seg.ops, s.len() as u64);
    assert_eq!(seg.ops, ring_total_ops(&gp));
    assert_eq!(seg.unfinished(), 0);
    assert_eq!(seg.unmatched_recvs, 0);
    assert_eq!(seg.unmatched_sends, 0);
    assert_eq!(seg.events, whole.events);
    assert_eq!(seg.completion, whole.completion);
    assert_eq!(seg.rank_end, whole.rank_end(&s));
    assert_eq!(seg.rank_busy, whole.rank_busy);
    assert_eq!(seg.class_wait, whole.class_wait);
    assert_eq!(seg.class_noise, whole.class_noise);
}

#[test]
fn segmented_ring_equals_whole_ring_without_noise() {
    // 37 ranks: 36 steps per phase; segments of 5 steps leave a shorter last segment.
    segmented_matches_whole(37, 8, 0, &Noise::none(), 5 * 37 * 2);
    segmented_matches_whole(64, 1 << 20, 500, &Noise::none(), 3 * 64 * 3);
}

#[test]
fn segmented_ring_equals_whole_ring_with_noise_and_latency_fluctuations() {
    for (seed, coscheduled) in [(1, false), (2, true), (3, false)] {
        let noise = Noise {
            source: parse_noise_source("poisson:interval=20us,detour=3us").expect("spec"),
            coscheduled,
            latency: parse_latency("exp:mean=300ns").expect("spec"),
            seed,
        };
        segmented_matches_whole(37, 4096, 200, &noise, 4 * 37 * 3);
        segmented_matches_whole(50, 8, 0, &noise, 7 * 50 * 2);
    }
}

#[test]
fn segmented_ring_completes_at_4096_ranks_in_bounded_segments() {
    // 4096 ranks: 50 M operations in segments of at most 1 M (the whole ring would need 3.6 GB).
    let gp = GenParams {
        ranks: 4096,
        ..GenParams::default()
    };
    let out = simulate_ring_segmented(
        &gp,
        &Params::default(),
        &Noise::none(),
        &SimOptions::default(),
        1 << 20,
    )
    .expect("segmented");
    assert_eq!(out.ops, ring_total_ops(&gp));
    assert_eq!(out.unfinished(), 0);
    assert_eq!(out.unmatched_recvs, 0);
    assert_eq!(out.unmatched_sends, 0);
    assert!(out.max_segment_ops <= 1 << 20);
    assert!(out.rank_end.iter().all(|&e| e > 0));
}

#[test]
fn segmented_ring_refuses_rendezvous_chunks() {
    let gp = GenParams {
        ranks: 4,
        bytes: 1 << 20,
        ..GenParams::default()
    };
    let e = simulate_ring_segmented(
        &gp,
        &Params::default(),
        &Noise::none(),
        &SimOptions::default(),
        1000,
    )
    .expect_err("rendezvous");
    assert!(e.to_string().contains("rendezvous"), "{e}");
}

#[test]
fn every_generator_round_trips_through_goal_text() {
    for p in Pattern::all() {
        let s = generate(
            p,
            &GenParams {
                ranks: 37,
                iterations: 3,
                ..GenParams::default()
            },
        )
        .expect("generator");
        let mut text = Vec::new();
        write_goal(&s, &mut text).expect("write");
        let text = String::from_utf8(text).expect("utf8");
        let back = parse_goal_str(&text).expect("parse back");
        assert_eq!(back.len(), s.len());
        assert_eq!(back.num_edges(), s.num_edges());
        let pa = Params::default();
        let a = simulate(&s, &pa, &Noise::none(), &SimOptions::default());
        let b = simulate(&back, &pa, &Noise::none(), &SimOptions::default());
        assert_eq!(a.completion, b.completion, "{}", p.name());
        assert_eq!(b.unfinished(), 0);
    }
}
