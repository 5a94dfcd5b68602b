//! Compare a noisy run with the noise-free run of the same schedule: slowdown, per-rank wait,
//! critical path, and per operation class how much noise and skew was absorbed or amplified.

use std::time::Instant;

use crate::noise::Noise;
use crate::schedule::{OpKind, Schedule};
use crate::sim::{critical_path, simulate, CriticalPath, Params, SimOptions, SimOutput};

/// Min / mean / max of a per-rank quantity.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Stats {
    /// Minimum.
    pub min: u64,
    /// Mean.
    pub mean: f64,
    /// Maximum.
    pub max: u64,
}

impl Stats {
    fn of(v: &[u64]) -> Stats {
        if v.is_empty() {
            return Stats::default();
        }
        let sum: u128 = v.iter().map(|&x| x as u128).sum();
        Stats {
            min: v.iter().copied().min().unwrap_or(0),
            mean: sum as f64 / v.len() as f64,
            max: v.iter().copied().max().unwrap_or(0),
        }
    }
}

/// Per (class, kind) noise and skew accounting.
///
/// For each operation: `delay_in` = how much later its dependencies were satisfied than without
/// noise, `delay_out` = how much later it completed, `noise` = detour time inside its own CPU
/// work. `absorbed` = max(0, delay_in + noise - delay_out) (slack swallowed delay);
/// `amplified` = max(0, delay_out - delay_in - noise) (delay appeared that neither came in nor was
/// injected here: a late partner, i.e. skew carried by a message, or CPU contention).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ClassRow {
    /// Class name (collective or phase).
    pub class: String,
    /// Operation kind.
    pub kind: String,
    /// Operations.
    pub ops: u64,
    /// Detour time injected into these operations (ns).
    pub noise_injected_ns: u64,
    /// Sum of input delays (ns).
    pub delay_in_ns: i128,
    /// Sum of output delays (ns).
    pub delay_out_ns: i128,
    /// Delay absorbed (ns).
    pub absorbed_ns: u128,
    /// Delay amplified (ns).
    pub amplified_ns: u128,
    /// Time receives of this class were posted before their message arrived, without noise (ns).
    pub wait_clean_ns: u64,
    /// The same with noise (ns): the skew between partners this class saw.
    pub wait_noisy_ns: u64,
}

/// Everything `chama run` reports.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    /// Input description.
    pub input: String,
    /// Ranks.
    pub ranks: u32,
    /// Operations.
    pub ops: u64,
    /// Dependencies.
    pub dependencies: u64,
    /// LogGOPS parameters.
    pub params: Option<Params>,
    /// Noise description.
    pub noise: String,
    /// Seed.
    pub seed: u64,
    /// Completion time with noise (ns).
    pub completion_ns: u64,
    /// Completion time without noise (ns).
    pub baseline_ns: u64,
    /// completion / baseline.
    pub slowdown: f64,
    /// Events processed (both runs).
    pub events: u64,
    /// Simulation wall time (both runs, run in parallel on two threads, s).
    pub sim_seconds: f64,
    /// Events per second of wall time (both runs together).
    pub events_per_second: f64,
    /// Per-rank wait (completion minus CPU busy time) with noise.
    pub rank_wait_ns: Stats,
    /// Per-rank completion time with noise.
    pub rank_end_ns: Stats,
    /// Critical path of the noisy run.
    pub critical_path: CriticalPath,
    /// Per class and kind.
    pub classes: Vec<ClassRow>,
    /// Operations that never completed (noisy run).
    pub unfinished_ops: u64,
    /// Receives left unmatched.
    pub unmatched_recvs: u64,
    /// Messages never received.
    pub unmatched_sends: u64,
    /// CPU time of the whole process (load + both runs on two threads + analysis, s), filled in
    /// by the command.
    pub cpu_seconds: f64,
    /// Peak resident memory of the process (KiB, VmHWM), filled in by the command.
    pub peak_memory_kib: u64,
    /// Per rank (only when requested): (end_clean, end_noisy, wait_noisy).
    #[serde(skip)]
    pub per_rank: Vec<(u64, u64, u64)>,
}

/// Run the noise-free and the noisy simulation and analyse them.
pub fn analyse(
    s: &Schedule,
    p: &Params,
    noise: &Noise,
    input: &str,
    noise_desc: &str,
    path_limit: usize,
    per_rank: bool,
) -> Report {
    let t0 = Instant::now();
    let busy = SimOptions {
        record_busy: true,
        ..SimOptions::default()
    };
    let noisy_opts = SimOptions {
        record_noise: true,
        record_busy: true,
        ..SimOptions::default()
    };
    // The noise-free and the noisy run are independent: run them on two threads.
    let (clean, noisy_run) = if noise.is_quiet() {
        (simulate(s, p, &Noise::none(), &busy), None)
    } else {
        std::thread::scope(|sc| {
            let h = sc.spawn(|| simulate(s, p, &Noise::none(), &busy));
            let n = simulate(s, p, noise, &noisy_opts);
            match h.join() {
                Ok(c) => (c, Some(n)),
                // The simulator does not panic on any input; if it did, run it again here so the
                // panic surfaces on this thread with its message.
                Err(_) => (simulate(s, p, &Noise::none(), &busy), Some(n)),
            }
        })
    };
    let noisy: &SimOutput = noisy_run.as_ref().unwrap_or(&clean);
    let secs = t0.elapsed().as_secs_f64();
    let events = clean.events + if noise.is_quiet() { 0 } else { noisy.events };
    let mut r = Report {
        input: input.to_string(),
        ranks: s.num_ranks,
        ops: s.len() as u64,
        dependencies: s.num_edges() as u64,
        params: Some(*p),
        noise: noise_desc.to_string(),
        seed: noise.seed,
        completion_ns: noisy.completion,
        baseline_ns: clean.completion,
        slowdown: if clean.completion > 0 {
            noisy.completion as f64 / clean.completion as f64
        } else {
            1.0
        },
        events,
        sim_seconds: secs,
        events_per_second: events as f64 / secs.max(1e-9),
        critical_path: critical_path(s, noisy, path_limit),
        unfinished_ops: noisy.unfinished(),
        unmatched_recvs: noisy.unmatched_recvs,
        unmatched_sends: noisy.unmatched_sends,
        ..Report::default()
    };
    let ends = noisy.rank_end(s);
    let waits = noisy.rank_wait(s);
    r.rank_end_ns = Stats::of(&ends);
    r.rank_wait_ns = Stats::of(&waits);
    if per_rank {
        let ce = clean.rank_end(s);
        r.per_rank = (0..s.num_ranks as usize)
            .map(|i| (ce[i], ends[i], waits[i]))
            .collect();
    }
    r.classes = class_rows(s, &clean, noisy);
    r
}

fn class_rows(s: &Schedule, clean: &SimOutput, noisy: &SimOutput) -> Vec<ClassRow> {
    let nclass = s.class_names.len();
    let mut rows: Vec<ClassRow> = Vec::with_capacity(nclass * 3);
    for c in 0..nclass {
        for k in [OpKind::Send, OpKind::Recv, OpKind::Calc] {
            rows.push(ClassRow {
                class: s.class_names[c].clone(),
                kind: k.name().to_string(),
                ..ClassRow::default()
            });
        }
    }
    for op in 0..s.len() {
        if clean.st[op].end == u64::MAX || noisy.st[op].end == u64::MAX {
            continue;
        }
        let row = &mut rows[s.ops[op].class as usize * 3 + s.ops[op].kind as usize];
        row.ops += 1;
        let n = if noisy.noise.is_empty() {
            0
        } else {
            noisy.noise[op] as i128
        };
        let din = noisy.st[op].ready as i128 - clean.st[op].ready as i128;
        let dout = noisy.st[op].end as i128 - clean.st[op].end as i128;
        row.noise_injected_ns += n as u64;
        row.delay_in_ns += din;
        row.delay_out_ns += dout;
        let absorbed = din + n - dout;
        if absorbed > 0 {
            row.absorbed_ns += absorbed as u128;
        } else {
            row.amplified_ns += (-absorbed) as u128;
        }
    }
    // Receive waits are accumulated per class by the simulator.
    for c in 0..nclass {
        let row = &mut rows[c * 3 + OpKind::Recv as usize];
        row.wait_clean_ns = clean.class_wait[c];
        row.wait_noisy_ns = noisy.class_wait[c];
    }
    rows.retain(|r| r.ops > 0);
    rows
}

/// Per-class table as CSV.
pub fn classes_csv(r: &Report) -> String {
    let mut s = String::from(
        "class,kind,ops,noise_injected_ns,delay_in_ns,delay_out_ns,absorbed_ns,amplified_ns,wait_clean_ns,wait_noisy_ns\n",
    );
    for c in &r.classes {
        s += &format!(
            "{},{},{},{},{},{},{},{},{},{}\n",
            c.class,
            c.kind,
            c.ops,
            c.noise_injected_ns,
            c.delay_in_ns,
            c.delay_out_ns,
            c.absorbed_ns,
            c.amplified_ns,
            c.wait_clean_ns,
            c.wait_noisy_ns
        );
    }
    s
}

/// Per-rank table as CSV.
pub fn ranks_csv(r: &Report) -> String {
    let mut s = String::from("rank,end_clean_ns,end_noisy_ns,wait_noisy_ns\n");
    for (i, (a, b, w)) in r.per_rank.iter().enumerate() {
        s += &format!("{i},{a},{b},{w}\n");
    }
    s
}

/// Human-readable summary.
pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    s += &format!(
        "input: {}\nranks: {}  operations: {}  dependencies: {}\nnoise: {} (seed {})\n",
        r.input, r.ranks, r.ops, r.dependencies, r.noise, r.seed
    );
    s += &format!(
        "completion: {} ns  noise-free: {} ns  slowdown: {:.4}\n",
        r.completion_ns, r.baseline_ns, r.slowdown
    );
    s += &format!(
        "rank end (ns): min {} mean {:.0} max {}\nrank wait (ns): min {} mean {:.0} max {}\n",
        r.rank_end_ns.min,
        r.rank_end_ns.mean,
        r.rank_end_ns.max,
        r.rank_wait_ns.min,
        r.rank_wait_ns.mean,
        r.rank_wait_ns.max
    );
    let cp = &r.critical_path;
    s += &format!(
        "critical path: {} ops, {} messages, {} CPU-contention edges, {} ranks, calc {} ns, noise {} ns\n",
        cp.length, cp.messages, cp.cpu_contention, cp.ranks_visited, cp.calc_ns, cp.noise_ns
    );
    s += &format!(
        "events: {} in {:.3} s ({:.2} M events/s)\n",
        r.events,
        r.sim_seconds,
        r.events_per_second / 1e6
    );
    if r.unfinished_ops > 0 {
        s += &format!(
            "WARNING: {} operations never completed ({} receives unmatched, {} messages never received)\n",
            r.unfinished_ops, r.unmatched_recvs, r.unmatched_sends
        );
    }
    s += "class          kind   ops        noise_ns     absorbed_ns  amplified_ns  wait_clean_ns wait_noisy_ns\n";
    for c in &r.classes {
        s += &format!(
            "{:<14} {:<6} {:<10} {:<12} {:<12} {:<13} {:<13} {}\n",
            c.class,
            c.kind,
            c.ops,
            c.noise_injected_ns,
            c.absorbed_ns,
            c.amplified_ns,
            c.wait_clean_ns,
            c.wait_noisy_ns
        );
    }
    s
}
