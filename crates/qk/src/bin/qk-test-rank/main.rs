//! Test helper: a rank process used by the multi-process tests (started with the job's memfd).
//! Not meant for users; `--help` lists the scenarios.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use qk::fabric::{op, Hdr, Port};
use qk::region::Region;
use qk::sys::Memfd;
use qk::{AttachSpec, CpuMode, Endpoint};

#[derive(Parser)]
#[command(about = "QK test rank: runs one side of a multi-process fabric test")]
struct Cli {
    /// Inherited region fd.
    #[arg(long, default_value_t = -1)]
    fd: i32,
    /// This process's port (local rank).
    #[arg(long, default_value_t = 0)]
    port: u32,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send `count` raw checksummed records of random sizes to `to`.
    RawSend {
        #[arg(long)]
        to: u32,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        max: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Receive `count` raw records from `from`, checking order and checksums.
    RawRecv {
        #[arg(long)]
        from: u32,
        #[arg(long)]
        count: u64,
    },
    /// A miniature PCT for one node: creates the job's fabric, runs the node engine (TCP to the
    /// other nodes), starts this node's single rank with `rank_args`, reports its output.
    Node {
        #[arg(long)]
        job: u32,
        #[arg(long)]
        node: u32,
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Other nodes as id=addr.
        #[arg(long)]
        peer: Vec<String>,
        /// Node of each world rank, comma separated.
        #[arg(long)]
        rank_node: String,
        /// Cluster key.
        #[arg(long)]
        key: String,
        #[arg(long, default_value = "heater")]
        mode: String,
        /// Run the node engine and the rank on this CPU (one core per node, the layout in
        /// which the rank sleeps while it waits for the engine).
        #[arg(long)]
        cpu: Option<usize>,
        /// Arguments of the rank (a `portals` scenario).
        #[arg(last = true)]
        rank_args: Vec<String>,
    },
    /// Portals scenarios through a full endpoint (job id, mode given).
    Portals {
        #[arg(long)]
        job: u32,
        #[arg(long, default_value = "heater")]
        mode: String,
        #[command(subcommand)]
        scenario: Scenario,
    },
}

#[derive(Subcommand, Clone)]
enum Scenario {
    /// Target of the descriptor-kind test: exposes every kind, checks what lands.
    KindsTarget {
        #[arg(long)]
        peer: u32,
        #[arg(long)]
        large: u64,
    },
    /// Initiator of the descriptor-kind test: puts/gets into every kind, checks acks and replies.
    KindsInitiator {
        #[arg(long)]
        peer: u32,
        #[arg(long)]
        large: u64,
        #[arg(long, default_value = "bounce")]
        private_path: String,
    },
    /// Streams `count` messages of random sizes (mostly small, some up to `max`) to `peer`.
    StressSend {
        #[arg(long)]
        peer: u32,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        max: u64,
        #[arg(long)]
        seed: u64,
    },
    /// Receives the stream, verifying every byte and the order.
    StressRecv {
        #[arg(long)]
        peer: u32,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        max: u64,
        #[arg(long)]
        seed: u64,
    },
    /// Sends forged and corrupted records, then one valid put; expects the target to count drops.
    Forge {
        #[arg(long)]
        peer: u32,
    },
    /// Waits for the valid put after the forged ones and prints the drop counters.
    ForgeTarget {
        #[arg(long)]
        peer: u32,
    },
    /// Waits `rounds` times for a signal that comes `gap_ms` later, and prints how many times
    /// its port slept (an idle waiter should sleep long, not wake every millisecond).
    IdleTarget {
        #[arg(long)]
        peer: u32,
        #[arg(long)]
        rounds: u64,
    },
    /// Sends `rounds` signals, `gap_ms` apart, each after the target said it waits.
    IdleInitiator {
        #[arg(long)]
        peer: u32,
        #[arg(long)]
        rounds: u64,
        #[arg(long)]
        gap_ms: u64,
    },
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100000001b3)
    })
}

fn node(cli: &Cli) -> Result<String, String> {
    let Cmd::Node {
        job,
        node,
        listen,
        peer,
        rank_node,
        key,
        mode,
        cpu,
        rank_args,
    } = &cli.cmd
    else {
        return Err("not a node command".into());
    };
    let rank_node: Vec<u32> = rank_node
        .split(',')
        .map(|x| x.trim().parse().map_err(|_| format!("bad rank_node {x}")))
        .collect::<Result<_, _>>()?;
    let mut peers = Vec::new();
    for p in peer {
        let (id, addr) = p
            .split_once('=')
            .ok_or(format!("peer {p} is not id=addr"))?;
        peers.push((
            id.parse().map_err(|_| format!("bad node id {id}"))?,
            addr.parse().map_err(|_| format!("bad address {addr}"))?,
        ));
    }
    let local: Vec<u32> = (0..rank_node.len() as u32)
        .filter(|r| rank_node[*r as usize] == *node)
        .collect();
    let mut spec = qk::JobFabricSpec::new(
        *job,
        rank_node.len() as u32,
        local.clone(),
        mode.parse().map_err(|e: qk::QkError| e.to_string())?,
    );
    spec.node_id = *node;
    spec.heap_bytes_per_rank = 32 << 20;
    spec.lock_memory = false;
    let fab = qk::NodeFabric::create(&spec).map_err(|e| e.to_string())?;
    let es = qk::tcp::NodeEngineSpec {
        job_id: *job,
        node_id: *node,
        listen: *listen,
        peers,
        rank_node,
        cluster_key: key.as_bytes().to_vec(),
        connect_timeout: std::time::Duration::from_secs(20),
    };
    let engine = qk::tcp::NodeEngine::new(fab.dup_fd().map_err(|e| e.to_string())?, es)
        .map_err(|e| e.to_string())?;
    let handle = engine.spawn_on(*cpu).map_err(|e| e.to_string())?;
    // The rank inherits this thread's CPU.
    if let Some(c) = cpu {
        qk::sys::pin_to_cpu(*c).map_err(|e| format!("pinning to cpu {c}: {e}"))?;
    }
    let fd = fab.prepare_child_fd().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = std::process::Command::new(exe)
        .args([
            "--fd",
            &fd.to_string(),
            "--port",
            "0",
            "portals",
            "--job",
            &job.to_string(),
            "--mode",
            mode,
        ])
        .args(rank_args)
        .output()
        .map_err(|e| e.to_string())?;
    let stop = handle.stop();
    let so = String::from_utf8_lossy(&out.stdout).to_string();
    let se = String::from_utf8_lossy(&out.stderr).to_string();
    let st = fab.stats();
    let eng = &st[st.len() - 1];
    if !out.status.success() {
        return Err(format!(
            "rank failed: {so}{se}; engine drops {:?}",
            eng.drops
        ));
    }
    stop.map_err(|e| e.to_string())?;
    Ok(format!(
        "node {node}: rank said: {} engine sent {} drops {} engine sleeps {} rank sleeps {}",
        so.trim(),
        eng.sent,
        eng.total_drops(),
        eng.sleeps,
        st[0].sleeps
    ))
}

fn run(cli: Cli) -> Result<String, String> {
    if matches!(cli.cmd, Cmd::Node { .. }) {
        return node(&cli);
    }
    if let Cmd::Portals {
        job,
        mode,
        scenario,
    } = &cli.cmd
    {
        let fd = Memfd::from_inherited(cli.fd).map_err(|e| e.to_string())?;
        let mode: CpuMode = mode.parse().map_err(|e: qk::QkError| e.to_string())?;
        let mut spec = AttachSpec::new(*job, cli.port, mode);
        spec.lock_memory = false;
        let mut ep = Endpoint::attach(fd, &spec).map_err(|e| e.to_string())?;
        return scenarios::run(&mut ep, scenario.clone()).map_err(|e| e.to_string());
    }
    let fd = Memfd::from_inherited(cli.fd).map_err(|e| e.to_string())?;
    let region = Region::attach(&fd, true, false).map_err(|e| e.to_string())?;
    let mut port = Port::new(region, cli.port);
    match cli.cmd {
        Cmd::RawSend {
            to,
            count,
            max,
            seed,
        } => {
            let mut s = seed | 1;
            let mut buf = vec![0u8; max];
            for seq in 0..count {
                let len = (xorshift(&mut s) % (max as u64 + 1)) as usize;
                for b in buf[..len].iter_mut() {
                    *b = xorshift(&mut s) as u8;
                }
                let h = Hdr {
                    op: op::RAW,
                    length: len as u64,
                    aux: seq,
                    hdr_data: fnv(&buf[..len]),
                    ..Hdr::default()
                };
                let mut spins = 0u32;
                while !port.try_send(to, &h, &buf[..len]) {
                    spins += 1;
                    if spins > 200 {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
            Ok(format!("sent {count}"))
        }
        Cmd::RawRecv { from, count } => {
            let mut next = 0u64;
            let mut err = None;
            let start = std::time::Instant::now();
            while next < count && err.is_none() {
                let got = port.poll(64, |m| {
                    let h = m.hdr();
                    if m.from != from || h.op != op::RAW {
                        err = Some(format!(
                            "unexpected record from port {} op {}",
                            m.from, h.op
                        ));
                    } else if h.aux != next {
                        err = Some(format!(
                            "record {} arrived when {} was expected",
                            h.aux, next
                        ));
                    } else if h.length as usize > m.body.len()
                        || fnv(&m.body[..h.length as usize]) != h.hdr_data
                    {
                        err = Some(format!("record {next} failed its checksum"));
                    }
                    next += 1;
                });
                if got == 0 {
                    std::thread::yield_now();
                }
                if start.elapsed().as_secs() > 50 {
                    err = Some(format!("timed out after {next} records"));
                }
            }
            match err {
                Some(e) => Err(e),
                None => Ok(format!("received {count} in order, checksums ok")),
            }
        }
        Cmd::Portals { .. } | Cmd::Node { .. } => Err("unreachable".into()),
    }
}

mod scenarios;

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(s) => {
            println!("OK {s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("qk-test-rank: {e}");
            ExitCode::FAILURE
        }
    }
}
