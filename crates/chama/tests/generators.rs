//! Every built-in generator's schedule completes (no receive left unmatched) at 16, 256 and
//! 65,536 ranks, and round-trips through GOAL text.

use chama::gen::{generate, GenParams, Pattern};
use chama::goal::{parse_goal_str, write_goal};
use chama::noise::Noise;
use chama::sim::{simulate, Params, SimOptions};

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
// A ring all-reduce has 2(P-1) steps: at 65,536 ranks that is 8.6e9 operations, beyond what a
// test (or a 2^31-operation schedule) can hold; 4096 ranks is 67 M events.
scale_test!(
    allreduce_ring_completes,
    Pattern::AllreduceRing,
    [1, 16, 256, 1000]
);

#[test]
fn ring_at_65536_ranks_is_refused_with_a_clear_error() {
    let e = generate(
        Pattern::AllreduceRing,
        &GenParams {
            ranks: 65536,
            ..GenParams::default()
        },
    )
    .expect_err("too big");
    assert!(e.to_string().contains("operations"), "{e}");
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
