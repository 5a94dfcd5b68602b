//! Hand-computed schedules: exact completion times.

use chama::goal::parse_goal_str;
use chama::noise::Noise;
use chama::sim::{simulate, Params, SimOptions};

fn run(text: &str, p: Params) -> chama::sim::SimOutput {
    let s = parse_goal_str(text).expect("valid GOAL");
    simulate(&s, &p, &Noise::none(), &SimOptions::default())
}

/// One eager message: o + L + o = 1500 + 2500 + 1500 (G is per byte beyond the first).
#[test]
fn single_eager_message() {
    let out = run(
        "num_ranks 2\nrank 0 {\nl1: send 1b to 1 tag 0\n}\nrank 1 {\nl1: recv 1b from 0 tag 0\n}\n",
        Params::default(),
    );
    assert_eq!(out.completion, 5500);
    assert_eq!(out.unfinished(), 0);
}

/// 1001 bytes: sender o, wire (z-1)G = 1000 * 6 = 6000, L, receiver o.
#[test]
fn eager_message_pays_per_byte_gap() {
    let out = run(
        "num_ranks 2\nrank 0 {\nl1: send 1001b to 1 tag 0\n}\nrank 1 {\nl1: recv 1001b from 0 tag 0\n}\n",
        Params::default(),
    );
    assert_eq!(out.completion, 1500 + 6000 + 2500 + 1500);
}

/// Rendezvous (100000 bytes > S = 65535):
/// RTS: sender o (0..1500), L -> 4000; receiver o -> 5500; CTS L -> 8000;
/// data: sender o (8000..9500), L + (z-1)G = 2500 + 599994 -> 611994; receiver o -> 613494.
#[test]
fn rendezvous_three_legs() {
    let out = run(
        "num_ranks 2\nrank 0 {\nl1: send 100000b to 1 tag 0\n}\nrank 1 {\nl1: recv 100000b from 0 tag 0\n}\n",
        Params::default(),
    );
    assert_eq!(out.completion, 613_494);
    // The send completes after its data leg.
    assert_eq!(out.st[0].end, 9500);
}

/// calc 1000 then send 8b; receiver computes 500 after the receive.
/// send: 1000..2500, arrival 2500 + 2500 + 7*6 = 5042; recv 5042..6542; calc -> 7042.
#[test]
fn requires_chains_calc_and_messages() {
    let out = run(
        "num_ranks 2
rank 0 {
l1: calc 1000
l2: send 8b to 1 tag 5
l2 requires l1
}
rank 1 {
l1: recv 8b from 0 tag 5
l2: calc 500
l2 requires l1
}
",
        Params::default(),
    );
    assert_eq!(out.completion, 7042);
    assert_eq!(out.ends(), vec![1000, 2500, 6542, 7042]);
}

/// Two messages with the same source and tag match the receives in posting order.
/// send1 0..1500 arr 4000; send2 1500..3000 (NIC free at 1000) arr 5506.
/// recv1 matched 4000 -> 5500; recv2 matched 5506 -> 7006.
#[test]
fn identical_receives_match_in_posting_order() {
    let out = run(
        "num_ranks 2
rank 0 {
l1: send 1b to 1 tag 7
l2: send 2b to 1 tag 7
}
rank 1 {
l1: recv 1b from 0 tag 7
l2: recv 2b from -1 tag -1
}
",
        Params::default(),
    );
    assert_eq!(out.ends(), vec![1500, 3000, 5500, 7006]);
}

/// `irequires`: the send may start as soon as the receive is posted (time 0), so the
/// exchange costs one message time, not two.
#[test]
fn irequires_overlaps_receive_and_send() {
    let text = |dep: &str| {
        format!(
            "num_ranks 2
rank 0 {{
l1: recv 1b from 1 tag 0
l2: send 1b to 1 tag 0
l2 {dep} l1
}}
rank 1 {{
l1: recv 1b from 0 tag 0
l2: send 1b to 0 tag 0
l2 {dep} l1
}}
"
        )
    };
    let p = Params::default();
    // Both send at 0..1500, arrive 4000, receive 4000..5500.
    assert_eq!(run(&text("irequires"), p).completion, 5500);
    // With `requires`, each send waits for its receive: deadlock, nothing finishes.
    let out = run(&text("requires"), p);
    assert_eq!(out.unfinished(), 4);
    assert_eq!(out.unmatched_recvs, 2);
}

/// LogGOPSim's README: its dissemination_16 example takes 22000 ns with default parameters
/// (4 rounds of o + L + o = 5500).
#[test]
fn dissemination_16_matches_loggopsim_example() {
    let mut t = String::from("num_ranks 16\n");
    for r in 0..16u32 {
        t += &format!("rank {r} {{\n");
        for k in 0..4u32 {
            let d = 1 << k;
            t += &format!("s{k}: send 1b to {} tag {k}\n", (r + d) % 16);
            t += &format!("r{k}: recv 1b from {} tag {k}\n", (r + 16 - d) % 16);
            if k > 0 {
                t += &format!("s{k} requires r{}\nr{k} requires r{}\n", k - 1, k - 1);
            }
        }
        t += "}\n";
    }
    let out = run(&t, Params::default());
    assert_eq!(out.completion, 22_000);
    assert_eq!(out.unfinished(), 0);
}
