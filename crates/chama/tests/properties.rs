//! Property tests: causality and monotonicity under noise on random deadlock-free schedules.

use chama::noise::{LatencyNoise, Noise, NoiseSource};
use chama::schedule::{OpKind, Schedule, ScheduleBuilder};
use chama::sim::{simulate, Params, SimOptions};
use proptest::prelude::*;

/// A random message program: messages in a global order; every rank executes its part of that
/// order as a chain (`requires`), with computation sprinkled in. Deadlock-free by construction.
/// Each message has a unique tag so sends and receives can be paired.
fn build(ranks: u32, msgs: &[(u32, u32, u64, u64)], calcs: &[u64]) -> Schedule {
    let mut b = ScheduleBuilder::new(ranks);
    let mut last: Vec<Option<u32>> = vec![None; ranks as usize];
    let chain = |b: &mut ScheduleBuilder, last: &mut Vec<Option<u32>>, r: u32, op: u32| {
        if let Some(p) = last[r as usize] {
            b.depend(op, p, false);
        }
        last[r as usize] = Some(op);
    };
    for (k, &(src, dst, bytes, pre)) in msgs.iter().enumerate() {
        let dst = if dst == src { (dst + 1) % ranks } else { dst };
        if pre > 0 {
            let c = b.calc(src, pre + calcs[k % calcs.len()], 0);
            chain(&mut b, &mut last, src, c);
        }
        let s = b.send(src, dst, k as u32, bytes, 0);
        chain(&mut b, &mut last, src, s);
        let r = b.recv(dst, src, k as u32, bytes, 0);
        chain(&mut b, &mut last, dst, r);
    }
    b.finish().expect("valid schedule")
}

fn params() -> impl Strategy<Value = Params> {
    (
        0u64..5000,
        0u64..3000,
        0u64..3000,
        0u64..10_000,
        0u64..2000,
        prop_oneof![Just(65535u64), 0u64..5000],
    )
        .prop_map(|(l, o, g, big_g_ps, big_o_ps, s)| Params {
            l,
            o,
            g,
            big_g_ps,
            big_o_ps,
            s,
        })
}

fn noise() -> impl Strategy<Value = Noise> {
    let src = prop_oneof![
        (1000u64..200_000, 1u64..999).prop_map(|(i, f)| NoiseSource::Periodic {
            interval: i,
            detour: i * f / 1000
        }),
        (1000u64..200_000, 1u64..999).prop_map(|(i, f)| NoiseSource::Poisson {
            interval: i,
            detour: i * f / 1000
        }),
        (1000u64..200_000, 1u64..900, 0u64..500).prop_map(|(i, m, sd)| NoiseSource::Gaussian {
            interval: i,
            mean: i * m / 1000,
            sd: i * sd / 1000
        }),
        proptest::collection::vec((0u64..100_000, 1u64..20_000), 1..20)
            .prop_map(|d| { chama::noise::trace_source(d, 150_000, 1.0) }),
    ];
    let lat = prop_oneof![
        Just(LatencyNoise::None),
        (1u64..5000).prop_map(|m| LatencyNoise::Exp { mean: m }),
        (1u64..5000).prop_map(|m| LatencyNoise::Uniform { max: m }),
    ];
    (src, lat, any::<bool>(), any::<u64>()).prop_map(|(source, latency, coscheduled, seed)| Noise {
        source,
        coscheduled,
        latency,
        seed,
    })
}

/// (ranks, messages (src, dst, bytes, compute before), compute jitter).
type Program = (u32, Vec<(u32, u32, u64, u64)>, Vec<u64>);

fn program() -> impl Strategy<Value = Program> {
    (2u32..9).prop_flat_map(|p| {
        (
            Just(p),
            proptest::collection::vec((0..p, 0..p, 1u64..20_000, 0u64..5000), 1..60),
            proptest::collection::vec(0u64..3000, 1..8),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Everything completes, and no receive completes before its send started (indeed not
    /// before send start + o + L + o, the LogGOPS minimum), with or without noise.
    #[test]
    fn no_receive_completes_before_its_send_starts((p, msgs, calcs) in program(), pa in params(), nz in noise()) {
        let s = build(p, &msgs, &calcs);
        for n in [Noise::none(), nz] {
            let out = simulate(&s, &pa, &n, &SimOptions { record_start: true, ..SimOptions::default() });
            prop_assert_eq!(out.unfinished(), 0);
            let mut send_of_tag = vec![usize::MAX; msgs.len()];
            for op in 0..s.len() {
                if s.op_kind(op) == OpKind::Send {
                    send_of_tag[s.ops[op].tag as usize] = op;
                }
            }
            for op in 0..s.len() {
                if s.op_kind(op) == OpKind::Recv {
                    let snd = send_of_tag[s.ops[op].tag as usize];
                    let st = out.start[snd];
                    prop_assert!(out.st[op].end >= st + 2 * pa.o + pa.l,
                        "recv {} ended {} but its send started {}", op, out.st[op].end, st);
                    prop_assert!(out.st[op].end >= out.start[op]);
                }
            }
        }
    }

    /// Noise (detours and latency fluctuations) never makes any operation finish earlier.
    #[test]
    fn noise_never_makes_anything_faster((p, msgs, calcs) in program(), pa in params(), nz in noise()) {
        let s = build(p, &msgs, &calcs);
        let clean = simulate(&s, &pa, &Noise::none(), &SimOptions::default());
        let noisy = simulate(&s, &pa, &nz, &SimOptions::default());
        prop_assert!(noisy.completion >= clean.completion);
        for op in 0..s.len() {
            prop_assert!(noisy.st[op].end >= clean.st[op].end,
                "op {} ended at {} with noise, {} without", op, noisy.st[op].end, clean.st[op].end);
        }
    }

    /// Same seed, same result; the noise function itself is monotone and never shortens work.
    #[test]
    fn reproducible_and_noise_function_monotone(nz in noise(), t in 0u64..1_000_000, w in 0u64..50_000, dt in 0u64..10_000, rank in 0u32..1000) {
        let a = nz.finish(rank, t, w);
        prop_assert!(a >= t + w);
        prop_assert!(nz.finish(rank, t + dt, w) >= a);
        prop_assert_eq!(nz.finish(rank, t, w), a);
    }
}
