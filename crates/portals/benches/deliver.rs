//! Delivery throughput: `Engine::deliver` for a put arriving at a portal whose
//! match list has 1, 16 or 256 entries, hitting the head or the tail.
//!
//! Two parts:
//! 1. criterion groups (`deliver/head/N`, `deliver/tail/N`, `deliver/head_eq/1`);
//! 2. a plain repeated measurement that prints min/median/max deliveries per
//!    second over 11 runs of 2^20 deliveries each, next to a naive peer: an
//!    MPICH-style posted-receive queue (a `Vec` scanned linearly for
//!    (tag, source) with a mask), doing the same search without portals'
//!    descriptor, access-control and event work.
//!
//! Run: `cargo bench -p portals --bench deliver` (add `-- --quick` for a
//! shorter criterion run; `PORTALS_BENCH_SKIP_CRITERION=1` for part 2 only,
//! `PORTALS_BENCH_ONLY="head hit, list 1"` for one row of it).

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use portals::*;

const ME: ProcessId = ProcessId::new(1, 0);
const PEER: ProcessId = ProcessId::new(1, 1);

/// An engine whose portal 0 has `n` entries; entry `i` matches bits `i`.
fn setup(n: u32, with_eq: bool) -> (Engine<BoxStore>, Option<EqHandle>) {
    let cfg = Config {
        match_entries: n.max(1),
        ..Config::small(ME)
    };
    let mut e = Engine::new(cfg).expect("bench config");
    let md = e
        .md_create(&MdSpec {
            kind: MdKind::Single {
                region: Region::new(0x10_0000, 1 << 20),
                offset: OffsetMode::Sender,
            },
            options: MdOptions::PUT,
            eq: None,
        })
        .expect("md");
    for i in 0..n {
        e.me_append(0, MatchSpec::new(i as u64).from(1, ANY), md)
            .expect("entry");
    }
    e.portal_set_acl(0, Acl::job(1)).expect("acl");
    e.portal_enable(0).expect("enable");
    let eq = with_eq.then(|| {
        let q = e.eq_alloc(64).expect("eq");
        e.portal_set_eq(0, Some(q)).expect("set eq");
        q
    });
    (e, eq)
}

fn header(bits: u64) -> WireHeader {
    WireHeader {
        version: WIRE_VERSION,
        op: Op::Put,
        flags: 0,
        portal: 0,
        src: PEER,
        dst: ME,
        match_bits: bits,
        offset: 64,
        length: 1024,
        rlength: 1024,
        return_md: NO_MD,
        return_offset: 0,
        hdr_data: 0,
    }
}

fn criterion_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("deliver");
    g.throughput(Throughput::Elements(1));
    for n in [1u32, 16, 256] {
        for (name, bits) in [("head", 0u64), ("tail", n as u64 - 1)] {
            let (mut e, _) = setup(n, false);
            let h = header(bits);
            g.bench_with_input(BenchmarkId::new(name, n), &h, |b, h| {
                b.iter(|| {
                    let p = e.deliver(black_box(h));
                    black_box(p.is_ok())
                })
            });
        }
    }
    let (mut e, eq) = setup(1, true);
    let q = eq.expect("eq");
    let h = header(0);
    g.bench_function(BenchmarkId::new("head_eq", 1), |b| {
        b.iter(|| {
            let p = e.deliver(black_box(&h));
            black_box(p.is_ok());
            black_box(e.eq_get(q).ok())
        })
    });
    g.finish();
}

criterion_group!(benches, criterion_benches);

/// The peer: a posted-receive queue as MPICH keeps it (linked list / vector
/// of (tag, source, mask) scanned in order), plus the offset/length check.
struct PostedQueue {
    entries: Vec<(u64, u64, u32, u64, u64)>, // tag, ignore mask, source rank (MAX = any), addr, len
}

impl PostedQueue {
    fn new(n: u32) -> Self {
        PostedQueue {
            entries: (0..n)
                .map(|i| (i as u64, 0, u32::MAX, 0x10_0000, 1 << 20))
                .collect(),
        }
    }
    #[inline(never)]
    fn find(&self, tag: u64, src: u32, offset: u64, len: u64) -> Option<(u64, u64)> {
        for &(t, mask, s, addr, cap) in &self.entries {
            if (t ^ tag) & !mask == 0 && (s == u32::MAX || s == src) {
                if offset + len <= cap {
                    return Some((addr + offset, len));
                }
                return None;
            }
        }
        None
    }
}

const ITERS: u32 = 1 << 20;
const RUNS: usize = 11;

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// Nanoseconds this thread has spent on a CPU (Linux schedstat), so that a
/// loaded machine (other jobs sharing the cores) does not count the time we
/// were descheduled. `None` where the kernel does not provide it.
fn cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Deliveries per second of on-CPU time (wall time where schedstat is
/// missing), min / median / max over `RUNS` runs, and the median share of
/// wall time the thread was actually running.
fn measure(mut f: impl FnMut() -> bool) -> (f64, f64, f64, f64) {
    let mut rates = Vec::with_capacity(RUNS);
    let mut shares = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let c0 = cpu_ns();
        let t = Instant::now();
        let mut ok = 0u32;
        for _ in 0..ITERS {
            ok += f() as u32;
        }
        let wall = t.elapsed().as_secs_f64();
        let cpu = match (c0, cpu_ns()) {
            (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
            _ => wall,
        };
        assert_eq!(ok, ITERS, "every delivery must succeed");
        rates.push(ITERS as f64 / cpu);
        shares.push(cpu / wall);
    }
    let (lo, med, hi) = stats(rates);
    (lo, med, hi, stats(shares).1)
}

/// `PORTALS_BENCH_ONLY=<text>` limits the table to cases whose label contains it.
fn selected(label: &str) -> bool {
    std::env::var("PORTALS_BENCH_ONLY").map_or(true, |only| label.contains(&only))
}

fn repeated() {
    println!();
    println!(
        "deliveries per second of on-CPU time, {RUNS} runs x {ITERS} deliveries (min / median / max), one thread"
    );
    println!(
        "{:<22} {:>12} {:>12} {:>12} {:>14} {:>8} {:>7}",
        "case", "min M/s", "median M/s", "max M/s", "peer median", "ratio", "on-CPU"
    );
    for n in [1u32, 16, 256] {
        for (name, bits) in [("head", 0u64), ("tail", n as u64 - 1)] {
            let label = format!("{name} hit, list {n}");
            if !selected(&label) {
                continue;
            }
            let (mut e, _) = setup(n, false);
            let h = header(bits);
            let (lo, med, hi, share) = measure(|| e.deliver(black_box(&h)).is_ok());
            let peer = PostedQueue::new(n);
            let (_, pmed, _, _) = measure(|| peer.find(black_box(bits), 1, 64, 1024).is_some());
            println!(
                "{:<22} {:>12.1} {:>12.1} {:>12.1} {:>14.1} {:>8.2} {:>6.0}%",
                label,
                lo / 1e6,
                med / 1e6,
                hi / 1e6,
                pmed / 1e6,
                med / pmed,
                share * 100.0
            );
        }
    }
    if !selected("head + event poll, 1") {
        return;
    }
    let (mut e, eq) = setup(1, true);
    let q = eq.expect("eq");
    let h = header(0);
    let (lo, med, hi, share) = measure(|| {
        let ok = e.deliver(black_box(&h)).is_ok();
        ok & matches!(e.eq_get(q), Ok(Some(_)))
    });
    println!(
        "{:<22} {:>12.1} {:>12.1} {:>12.1} {:>14} {:>8} {:>6.0}%",
        "head + event poll, 1",
        lo / 1e6,
        med / 1e6,
        hi / 1e6,
        "-",
        "-",
        share * 100.0
    );
    println!(
        "(ratio = portals median / peer median; the peer does only the search and bounds check;"
    );
    println!(
        " on-CPU = median share of wall time the thread ran; below 100% the cores were shared)"
    );
}

fn main() {
    if std::env::var_os("PORTALS_BENCH_SKIP_CRITERION").is_none() {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
    repeated();
}
