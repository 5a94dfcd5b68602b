//! Known results reproduce qualitatively.

use chama::gen::{generate, GenParams, Pattern};
use chama::noise::{Noise, NoiseSource};
use chama::schedule::Schedule;
use chama::sim::{simulate, Params, SimOptions};

fn slowdown(s: &Schedule, source: NoiseSource, coscheduled: bool, seed: u64) -> f64 {
    let p = Params::default();
    let clean = simulate(s, &p, &Noise::none(), &SimOptions::default());
    assert_eq!(clean.unfinished(), 0);
    let noise = Noise {
        source,
        coscheduled,
        latency: Default::default(),
        seed,
    };
    let noisy = simulate(s, &p, &noise, &SimOptions::default());
    assert_eq!(noisy.unfinished(), 0);
    noisy.completion as f64 / clean.completion as f64
}

/// At the same noise fraction (2.5 %), rare long detours (250 us every 10 ms) slow a 4096-rank
/// all-reduce far more than frequent short ones (2.5 us every 100 us): with many ranks, some rank
/// is almost surely inside a long detour, and the collective waits for it.
#[test]
fn rare_long_detours_hurt_a_large_collective_more_than_frequent_short_ones() {
    let s = generate(
        Pattern::AllreduceRd,
        &GenParams {
            ranks: 4096,
            ..GenParams::default()
        },
    )
    .expect("generator");
    for seed in [1, 2, 3] {
        let short = slowdown(
            &s,
            NoiseSource::Periodic {
                interval: 100_000,
                detour: 2_500,
            },
            false,
            seed,
        );
        let long = slowdown(
            &s,
            NoiseSource::Periodic {
                interval: 10_000_000,
                detour: 250_000,
            },
            false,
            seed,
        );
        let short_p = slowdown(
            &s,
            NoiseSource::Poisson {
                interval: 100_000,
                detour: 2_500,
            },
            false,
            seed,
        );
        let long_p = slowdown(
            &s,
            NoiseSource::Poisson {
                interval: 10_000_000,
                detour: 250_000,
            },
            false,
            seed,
        );
        eprintln!("seed {seed}: periodic short {short:.3} long {long:.3}; poisson short {short_p:.3} long {long_p:.3}");
        assert!(
            long - 1.0 > 5.0 * (short - 1.0),
            "periodic: long {long} vs short {short}"
        );
        assert!(
            long_p - 1.0 > 5.0 * (short_p - 1.0),
            "poisson: long {long_p} vs short {short_p}"
        );
        assert!(
            long > 2.0,
            "a 250 us detour should at least double a ~70 us all-reduce: {long}"
        );
    }
}

/// Co-scheduled noise (every rank detours at the same instant) hurts a bulk-synchronous
/// stencil far less than the same noise with uncoordinated phases.
#[test]
fn coscheduled_noise_hurts_far_less_than_uncoordinated() {
    let s = generate(
        Pattern::Stencil2d,
        &GenParams {
            ranks: 1024,
            iterations: 20,
            compute_ns: 50_000,
            allreduce_every: 1,
            ..GenParams::default()
        },
    )
    .expect("generator");
    for src in [
        NoiseSource::Periodic {
            interval: 1_000_000,
            detour: 50_000,
        },
        NoiseSource::Gaussian {
            interval: 1_000_000,
            mean: 50_000,
            sd: 10_000,
        },
        NoiseSource::Poisson {
            interval: 1_000_000,
            detour: 50_000,
        },
    ] {
        let cos = slowdown(&s, src.clone(), true, 7);
        let unc = slowdown(&s, src.clone(), false, 7);
        eprintln!("{src:?}: co-scheduled {cos:.4} uncoordinated {unc:.4}");
        assert!(cos >= 1.0);
        assert!(
            unc - 1.0 > 3.0 * (cos - 1.0),
            "co-scheduled {cos} vs uncoordinated {unc}"
        );
    }
}

/// Noise-free runs are identical whatever the seed; noisy runs are reproducible from the seed
/// and differ between seeds.
#[test]
fn runs_are_reproducible_from_the_seed() {
    let s = generate(
        Pattern::AllreduceRab,
        &GenParams {
            ranks: 512,
            ..GenParams::default()
        },
    )
    .expect("generator");
    let src = NoiseSource::Poisson {
        interval: 200_000,
        detour: 20_000,
    };
    let a = slowdown(&s, src.clone(), false, 11);
    let b = slowdown(&s, src.clone(), false, 11);
    let c = slowdown(&s, src, false, 12);
    assert_eq!(a, b);
    assert_ne!(a, c);
}
