//! Inter-node fabric: the key handshake, and two "hosts" in network namespaces joined by a veth
//! pair that the test creates and removes (root only; skipped with a reason otherwise).

use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::time::Duration;

use qk::tcp::{handshake, TcpTransport};

#[test]
fn a_connection_without_the_cluster_key_is_refused() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = l.local_addr().expect("addr");
    let server = node_1_of_job_9(l, b"the cluster key", 3);
    // An outsider with the wrong key.
    let mut s = TcpStream::connect(addr).expect("connect");
    let e = handshake(&mut s, b"a guess", 0, 9, Some(1)).expect_err("wrong key must fail");
    assert!(e.to_string().contains("cluster key"), "{e}");
    // An outsider speaking garbage.
    let mut g = TcpStream::connect(addr).expect("connect");
    use std::io::Write;
    let _ = g.write_all(&[0u8; 64]);
    // The engine never accepted either: it gives up waiting for a real node 1.
    let r = server.join().expect("server thread");
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("timed out waiting for nodes [0]"), "{msg}");
}

/// Node 1 of job 9 waiting, on a thread, up to `secs` seconds for node 0 to connect to `l`
/// with cluster key `key`.
fn node_1_of_job_9(
    l: TcpListener,
    key: &'static [u8],
    secs: u64,
) -> std::thread::JoinHandle<Result<(), qk::QkError>> {
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        TcpTransport::connect(
            &l,
            1,
            9,
            &[(0, addr)],
            key,
            1 << 20,
            Duration::from_secs(secs),
            || {},
        )
        .map(|_| ())
    })
}

/// The node engine of another job cannot connect to this job's engine, not even with the
/// cluster key: the handshake names the job on both sides, and the proofs cover it.
#[test]
fn an_engine_of_another_job_is_refused_even_with_the_key() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = l.local_addr().expect("addr");
    let server = node_1_of_job_9(l, b"k", 3);
    let mut s = TcpStream::connect(addr).expect("connect");
    let e = handshake(&mut s, b"k", 0, 10, Some(1)).expect_err("another job must fail");
    assert!(e.to_string().contains("job 9, not 10"), "{e}");
    let msg = server
        .join()
        .expect("server thread")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.contains("timed out waiting for nodes [0]"), "{msg}");
}

#[test]
fn the_right_key_connects() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = l.local_addr().expect("addr");
    let server = node_1_of_job_9(l, b"k", 5);
    let mut s = TcpStream::connect(addr).expect("connect");
    assert_eq!(
        handshake(&mut s, b"k", 0, 9, Some(1)).expect("handshake"),
        1
    );
    server
        .join()
        .expect("join")
        .expect("server accepted the keyed peer");
}

struct Netns {
    names: Vec<String>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Two "hosts": network namespaces joined by a veth pair, removed when the guard drops. `None`
/// (after printing why) when not root or without iproute2.
struct Hosts {
    guard: Netns,
    a: String,
    b: String,
    ipa: String,
    ipb: String,
}

fn two_hosts(test: &str, tag: u32) -> Option<Hosts> {
    // Root check: the Uid line of /proc/self/status.
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if !root || !ip(&["-V"]) {
        eprintln!("SKIP {test}: needs root and iproute2 (ip netns)");
        return None;
    }
    let id = std::process::id() % 100 + 20 + 110 * tag;
    let (a, b) = (format!("qkA{id}"), format!("qkB{id}"));
    let guard = Netns {
        names: vec![a.clone(), b.clone()],
    };
    let (va, vb) = (format!("qkva{id}"), format!("qkvb{id}"));
    // Each pair of namespaces has its own veth, so addresses need only be valid octets.
    let (ipa, ipb) = (
        format!("10.231.{}.1", id % 250),
        format!("10.231.{}.2", id % 250),
    );
    assert!(
        ip(&["netns", "add", &a]) && ip(&["netns", "add", &b]),
        "creating namespaces"
    );
    assert!(
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]),
        "creating veth pair"
    );
    assert!(ip(&["link", "set", &va, "netns", &a]) && ip(&["link", "set", &vb, "netns", &b]));
    for (ns, dev, addr) in [(&a, &va, &ipa), (&b, &vb, &ipb)] {
        assert!(ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            dev
        ]));
        assert!(ip(&["-n", ns, "link", "set", dev, "up"]));
        assert!(ip(&["-n", ns, "link", "set", "lo", "up"]));
    }
    Some(Hosts {
        guard,
        a,
        b,
        ipa,
        ipb,
    })
}

/// Runs one miniature PCT (`qk-test-rank node`) in namespace `ns`: node `me` of a two-node job,
/// its engine listening on `listen`, the rank running `args`.
fn node(ns: &str, me: u32, listen: &str, peer: String, extra: &[String], args: &[&str]) -> Output {
    let bin = env!("CARGO_BIN_EXE_qk-test-rank");
    Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            bin,
            "node",
            "--job",
            "31",
            "--node",
            &me.to_string(),
        ])
        .args([
            "--listen",
            listen,
            "--peer",
            &peer,
            "--rank-node",
            "0,1",
            "--key",
            "ci-cluster-key",
        ])
        .args(extra)
        .arg("--")
        .args(args)
        .output()
        .expect("run node")
}

fn namespace_gone(name: &str) -> bool {
    !Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(name))
        .unwrap_or(true)
}

#[test]
fn tcp_between_two_hosts_in_network_namespaces() {
    let Some(Hosts {
        guard,
        a,
        b,
        ipa,
        ipb,
    }) = two_hosts("tcp_between_two_hosts_in_network_namespaces", 0)
    else {
        return;
    };
    let la = format!("{ipa}:47300");
    let lb = format!("{ipb}:47300");
    let pa = format!("1={lb}");
    let pb = format!("0={la}");
    let t = {
        let a = a.clone();
        std::thread::spawn(move || {
            node(
                &a,
                0,
                &la,
                pa,
                &[],
                &["kinds-target", "--peer", "1", "--large", "1048576"],
            )
        })
    };
    let i = node(
        &b,
        1,
        &lb,
        pb,
        &[],
        &["kinds-initiator", "--peer", "0", "--large", "1048576"],
    );
    let t = t.join().expect("join");
    let (so_i, so_t) = (
        String::from_utf8_lossy(&i.stdout),
        String::from_utf8_lossy(&t.stdout),
    );
    let (se_i, se_t) = (
        String::from_utf8_lossy(&i.stderr),
        String::from_utf8_lossy(&t.stderr),
    );
    assert!(
        i.status.success() && so_i.contains("kinds initiator ok"),
        "initiator: {so_i}{se_i}"
    );
    assert!(
        t.status.success() && so_t.contains("kinds target ok"),
        "target: {so_t}{se_t}"
    );
    assert!(
        so_t.contains("drops 0") && so_i.contains("drops 0"),
        "{so_t}{so_i}"
    );
    drop(guard);
    assert!(namespace_gone(&a));
}

/// The sender's and the receiver's reports of a stress stream of `count` messages, checked: both
/// ranks succeeded, every message arrived (the receiver verified bytes and order), and neither
/// node dropped anything.
fn stream_reports(s: &Output, r: &Output, count: &str) -> (String, String) {
    let (so_s, so_r) = (
        String::from_utf8_lossy(&s.stdout).into_owned(),
        String::from_utf8_lossy(&r.stdout).into_owned(),
    );
    let (se_s, se_r) = (
        String::from_utf8_lossy(&s.stderr),
        String::from_utf8_lossy(&r.stderr),
    );
    assert!(
        s.status.success(),
        "sender: {so_s}{se_s} receiver: {so_r}{se_r}"
    );
    assert!(
        r.status.success() && so_r.contains(&format!("stress received {count} messages")),
        "receiver: {so_r}{se_r}"
    );
    assert!(
        so_r.contains("drops 0 ") && so_s.contains("drops 0 "),
        "{so_r}{so_s}"
    );
    (so_s, so_r)
}

/// Each node engine on its rank's CPU (one core per node): the rank then sleeps whenever it
/// waits for the engine, and the engine rings it after a fence. A stream of 20 000 messages
/// (0 B to 256 KiB, small ones eager, large ones through the rendezvous) with the receiver's
/// batch signals going back must arrive complete, in order and byte-exact, with no drop; the
/// receiving rank must have slept (the path under test was taken).
#[test]
fn tcp_stream_in_order_with_each_engine_on_its_ranks_cpu() {
    let Some(Hosts {
        guard,
        a,
        b,
        ipa,
        ipb,
    }) = two_hosts("tcp_stream_in_order_with_each_engine_on_its_ranks_cpu", 1)
    else {
        return;
    };
    let cpus: Vec<usize> = qk::sys::allowed_cpus();
    let cpu = |i: usize| vec!["--cpu".to_string(), cpus[i % cpus.len()].to_string()];
    let (la, lb) = (format!("{ipa}:47301"), format!("{ipb}:47301"));
    let (pa, pb) = (format!("1={lb}"), format!("0={la}"));
    let count = "20000";
    let common = [
        "--peer", "1", "--count", count, "--max", "262144", "--seed", "7",
    ];
    let recv = {
        let a = a.clone();
        let extra = cpu(0);
        std::thread::spawn(move || {
            let mut args = vec!["stress-recv"];
            args.extend(common);
            node(&a, 0, &la, pa, &extra, &args)
        })
    };
    let mut args = vec!["stress-send"];
    args.extend(common);
    args[2] = "0";
    let s = node(&b, 1, &lb, pb, &cpu(1), &args);
    let r = recv.join().expect("join");
    let (so_s, so_r) = stream_reports(&s, &r, count);
    eprintln!("{so_r}{so_s}");
    let sleeps: u64 = so_r
        .rsplit("rank sleeps ")
        .next()
        .and_then(|x| x.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        sleeps >= 10,
        "the receiving rank never slept waiting for its engine: {so_r}"
    );
    drop(guard);
    assert!(namespace_gone(&a) && namespace_gone(&b));
}

/// Integrity under load between two hosts: a million messages (`QK_STRESS_COUNT` overrides) of
/// random sizes from 0 B to 4 MiB, small ones eager and large ones through the rendezvous, each
/// checked byte for byte and in order by the receiving rank, with no drop on either node.
#[test]
fn exclusive_tcp_integrity_under_load_a_million_messages() {
    let Some(Hosts {
        guard,
        a,
        b,
        ipa,
        ipb,
    }) = two_hosts("exclusive_tcp_integrity_under_load_a_million_messages", 4)
    else {
        return;
    };
    let (la, lb) = (format!("{ipa}:47304"), format!("{ipb}:47304"));
    let (pa, pb) = (format!("1={lb}"), format!("0={la}"));
    let count = std::env::var("QK_STRESS_COUNT").unwrap_or_else(|_| "1000000".into());
    let max = (4u64 << 20).to_string();
    let common = |role: &'static str, peer: &'static str| -> Vec<String> {
        [
            role, "--peer", peer, "--count", &count, "--max", &max, "--seed", "4242",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let recv_args = common("stress-recv", "1");
    let send_args = common("stress-send", "0");
    let started = std::time::Instant::now();
    let recv = {
        let a = a.clone();
        std::thread::spawn(move || {
            let args: Vec<&str> = recv_args.iter().map(String::as_str).collect();
            node(&a, 0, &la, pa, &[], &args)
        })
    };
    let args: Vec<&str> = send_args.iter().map(String::as_str).collect();
    let s = node(&b, 1, &lb, pb, &[], &args);
    let r = recv.join().expect("join");
    let (so_s, so_r) = stream_reports(&s, &r, &count);
    eprintln!("{so_r}{so_s}in {:?}", started.elapsed());
    drop(guard);
    assert!(namespace_gone(&a) && namespace_gone(&b));
}

/// Two nodes, each engine on its rank's CPU: the rank of node 0 waits `rounds` times for a signal
/// from node 1's rank that comes `gap_ms` later. Returns both nodes' reports (target first).
fn idle_pair(test: &str, tag: u32, port: u16, rounds: u64, gap_ms: u64) -> (String, String) {
    let Some(Hosts {
        guard,
        a,
        b,
        ipa,
        ipb,
    }) = two_hosts(test, tag)
    else {
        return (String::new(), String::new());
    };
    let cpus: Vec<usize> = qk::sys::allowed_cpus();
    let cpu = |i: usize| vec!["--cpu".to_string(), cpus[i % cpus.len()].to_string()];
    let (la, lb) = (format!("{ipa}:{port}"), format!("{ipb}:{port}"));
    let (pa, pb) = (format!("1={lb}"), format!("0={la}"));
    let target = {
        let a = a.clone();
        let extra = cpu(0);
        let r = rounds.to_string();
        std::thread::spawn(move || {
            node(
                &a,
                0,
                &la,
                pa,
                &extra,
                &["idle-target", "--peer", "1", "--rounds", &r],
            )
        })
    };
    let (r, g) = (rounds.to_string(), gap_ms.to_string());
    let i = node(
        &b,
        1,
        &lb,
        pb,
        &cpu(1),
        &[
            "idle-initiator",
            "--peer",
            "0",
            "--rounds",
            &r,
            "--gap-ms",
            &g,
        ],
    );
    let t = target.join().expect("join");
    let (so_i, so_t) = (
        String::from_utf8_lossy(&i.stdout).to_string(),
        String::from_utf8_lossy(&t.stdout).to_string(),
    );
    let (se_i, se_t) = (
        String::from_utf8_lossy(&i.stderr),
        String::from_utf8_lossy(&t.stderr),
    );
    assert!(i.status.success(), "initiator: {so_i}{se_i}");
    assert!(
        t.status.success() && so_t.contains(&format!("idle rounds {rounds} ")),
        "target: {so_t}{se_t}"
    );
    eprintln!("{so_t}{so_i}");
    drop(guard);
    assert!(namespace_gone(&a) && namespace_gone(&b));
    (so_t, so_i)
}

/// The number after `what` in a node's report (`u64::MAX` when missing).
fn count_after(out: &str, what: &str) -> u64 {
    out.split(what)
        .nth(1)
        .and_then(|x| x.split_whitespace().next())
        .and_then(|x| x.parse().ok())
        .unwrap_or(u64::MAX)
}

/// The only rank of its node, its engine on its CPU, waits for a signal from the other node that
/// comes 30 ms later, five times: each wait is one sleep that the engine's ring ends (the engine
/// fences before it rings, so the rank needs no 1 ms bound on its sleep, whose timer doubled the
/// cost of every rank <-> engine hand-over), not ~10 naps of 1 ms; and every signal still wakes it.
#[test]
fn a_rank_waiting_on_its_node_engine_sleeps_once_per_wait_and_is_woken() {
    let test = "a_rank_waiting_on_its_node_engine_sleeps_once_per_wait_and_is_woken";
    let rounds = 5;
    let (so_t, _) = idle_pair(test, 2, 47302, rounds, 30);
    if so_t.is_empty() {
        return;
    }
    let sleeps = count_after(&so_t, "idle rounds 5 sleeps ");
    assert!(
        sleeps <= 2 * rounds,
        "the waiting rank slept {sleeps} times in {rounds} waits of 30 ms: its sleeps are cut short \
         instead of lasting until the engine rings: {so_t}"
    );
}

/// Both node engines idle for three gaps of 200 ms (their ranks waiting, or away): each takes
/// 1 ms naps for its first 10 ms of idleness, then fences and sleeps until rung, and does not
/// spin again after a nap that ran out. Before, each nap was followed by 500 µs of spinning on
/// the rank's core, and the naps never grew: ~130 naps per gap.
#[test]
fn an_idle_node_engine_stops_napping_and_spinning() {
    let test = "an_idle_node_engine_stops_napping_and_spinning";
    let rounds = 3;
    let (so_t, so_i) = idle_pair(test, 3, 47303, rounds, 200);
    if so_t.is_empty() {
        return;
    }
    for out in [&so_t, &so_i] {
        let sleeps = count_after(out, "engine sleeps ");
        assert!(
            sleeps <= 30 * rounds,
            "a node engine slept {sleeps} times in {rounds} idle gaps of 200 ms: it keeps taking \
             1 ms naps instead of sleeping until rung: {out}"
        );
    }
}
