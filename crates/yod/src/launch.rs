//! Running a job: allocate nodes, build the node map, load the ranks through the
//! PCTs, forward stdin/stdout/stderr, watch heartbeats, propagate the exit status.

use crate::error::{Result, YodError};
use crate::nodemap::{NodeMap, Topology};
use pct::key::ClusterKey;
use pct::proto::{
    connect_handshake, read_frame, write_frame, Address, Conn, CpuMode, FromPct, LoadRequest,
    NodeStatus, RankStatus, Stream, ToPct, HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, MAX_FRAME,
};
use std::io::{Read, Write};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Exit status when a node is lost.
pub const EXIT_NODE_LOST: i32 = 255;
/// Exit status when the job could not be started.
pub const EXIT_LAUNCH_FAILED: i32 = 1;

/// A node yod may run ranks on.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub address: Address,
    pub coords: Vec<u32>,
}

/// What happens when a rank fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultPolicy {
    /// The first failing rank ends the whole job (default).
    EndJob,
    /// Let the other ranks finish; the status is still the first failure's.
    Continue,
}

/// Everything about the job itself.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub n: u32,
    pub ppn: Option<u32>,
    pub nodes: Option<u32>,
    pub label: bool,
    pub mode: CpuMode,
    pub fault: FaultPolicy,
    pub priority: i32,
    pub program: String,
    pub args: Vec<String>,
    pub verbose: bool,
    /// The nodes are virtual nodes of this machine (embedded partition): if one's
    /// PCT dies, yod itself kills what its ranks left behind.
    pub local: bool,
}

/// Variables the runtime sets for each rank (who it is, its fabric, its PCT). yod never
/// forwards the caller's values of these (a yod started inside a rank would otherwise hand
/// its own identity down); every other variable, `PUMA_HEAP_MB` or `PUMA_TIMEOUT_MS` included,
/// reaches the ranks.
pub const RANK_IDENTITY_VARS: &[&str] = &[
    "PUMA_JOB",
    "PUMA_JOB_CRED",
    "PUMA_RANK",
    "PUMA_SIZE",
    "PUMA_NODE",
    "PUMA_LOCAL_RANK",
    "PUMA_LOCAL_SIZE",
    "PUMA_MODE",
    "PUMA_NODE_MAP",
    "PUMA_CPUS",
    "PUMA_PCT",
    "PUMA_TRACE",
    "PUMA_QK_FD",
    "PUMA_JOB_SEGMENT_FD",
    "PUMA_KEY",
];

/// An authenticated link to one PCT.
pub struct Link {
    pub target: Target,
    pub status: NodeStatus,
    reader: Conn,
    writer: Arc<Mutex<Conn>>,
}

impl Link {
    /// Connects and authenticates (both ways).
    pub fn open(target: Target, key: &ClusterKey, timeout: Duration) -> Result<Link> {
        let conn = Conn::connect(&target.address, timeout)?;
        Self::over(target, conn, key)
    }

    /// Authenticates over an already connected stream.
    pub fn over(target: Target, mut conn: Conn, key: &ClusterKey) -> Result<Link> {
        conn.set_read_timeout(Some(Duration::from_secs(3)))?;
        conn.set_write_timeout(Some(Duration::from_secs(5)))?;
        let status = connect_handshake(&mut conn, key)?;
        conn.set_read_timeout(Some(HEARTBEAT_TIMEOUT))?;
        let writer = Arc::new(Mutex::new(conn.try_clone()?));
        Ok(Link {
            target,
            status,
            reader: conn,
            writer,
        })
    }
}

enum Ev {
    Msg(usize, FromPct),
    Lost(usize, String),
    Signal(i32),
}

/// Splits `n` ranks over `k` nodes: blocks of `ppn` if given, else as evenly as possible.
pub fn distribute(n: u32, k: usize, ppn: Option<u32>) -> Vec<Vec<u32>> {
    match ppn {
        Some(p) => (0..n)
            .collect::<Vec<_>>()
            .chunks(p.max(1) as usize)
            .map(|c| c.to_vec())
            .collect(),
        None => {
            let k = k.clamp(1, n.max(1) as usize) as u32;
            let (base, extra) = (n / k, n % k);
            let mut next = 0;
            (0..k)
                .map(|i| {
                    let cnt = base + u32::from(i < extra);
                    let v = (next..next + cnt).collect();
                    next += cnt;
                    v
                })
                .collect()
        }
    }
}

/// How many nodes a job needs, given how many are offered.
pub fn nodes_needed(spec: &JobSpec, available: usize) -> Result<usize> {
    let n = spec.n;
    if n == 0 {
        return Err(YodError::Usage("-n must be at least 1".into()));
    }
    let need = match (spec.nodes, spec.ppn) {
        (Some(k), Some(p)) => {
            if u64::from(k) * u64::from(p) < u64::from(n) {
                return Err(YodError::Usage(format!(
                    "--nodes {k} x --ppn {p} cannot hold {n} ranks"
                )));
            }
            n.div_ceil(p).min(k) as usize
        }
        (Some(k), None) => (k.min(n)) as usize,
        (None, Some(p)) => n.div_ceil(p.max(1)) as usize,
        (None, None) => available.min(n as usize).max(1),
    };
    if need == 0 {
        return Err(YodError::Usage(
            "--nodes and --ppn must be at least 1".into(),
        ));
    }
    Ok(need)
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => "signal",
    }
}

/// Human words for how a rank ended.
pub fn describe(status: RankStatus) -> String {
    match status {
        RankStatus::Exited(c) => format!("exited with status {c}"),
        RankStatus::Signaled(s) => format!("was killed by signal {s} ({})", signal_name(s)),
    }
}

fn emit(label: bool, rank: u32, stream: Stream, data: &[u8]) {
    let mut out = Vec::with_capacity(data.len() + 16);
    if label {
        for line in data.split_inclusive(|&b| b == b'\n') {
            out.extend_from_slice(format!("{rank}: ").as_bytes());
            out.extend_from_slice(line);
        }
    } else {
        out.extend_from_slice(data);
    }
    if !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    // One write_all under the lock: lines of different ranks never mix.
    let _ = match stream {
        Stream::Stdout => {
            let mut o = std::io::stdout().lock();
            o.write_all(&out).and_then(|_| o.flush())
        }
        Stream::Stderr => std::io::stderr().lock().write_all(&out),
    };
}

/// Makes a job id: a random non-zero 32-bit number in decimal (the QK uses it as
/// the portals job id, so it must be numeric).
pub fn new_job_id() -> String {
    let mut b = [0u8; 4];
    let n = pct::key::random_bytes(&mut b)
        .map(|_| u32::from_le_bytes(b))
        .unwrap_or_else(|_| std::process::id());
    n.max(1).to_string()
}

/// Where yod found its nodes.
pub struct Allocation {
    pub links: Vec<Link>,
    pub topology: Topology,
    /// Names of nodes found down while allocating (for the partition's records).
    pub down: Vec<String>,
}

/// Opens links to candidates in order until `spec` has enough free nodes.
pub fn allocate(
    spec: &JobSpec,
    candidates: Vec<Target>,
    key: &ClusterKey,
    topology: Topology,
) -> Result<Allocation> {
    let my_uid = rustix::process::getuid().as_raw();
    let total = candidates.len();
    let mut links = Vec::new();
    let mut down = Vec::new();
    let mut busy = Vec::new();
    let want_all = spec.nodes.is_none() && spec.ppn.is_none();
    let need_fixed = if want_all {
        None
    } else {
        Some(nodes_needed(spec, total)?)
    };
    for t in candidates {
        if let Some(k) = need_fixed {
            if links.len() >= k {
                break;
            }
        }
        match Link::open(t.clone(), key, Duration::from_secs(1)) {
            Ok(l) => {
                let free = l.status.jobs == 0
                    || (l.status.tasking == "multi" && l.status.user == Some(my_uid));
                if free {
                    links.push(l);
                } else {
                    busy.push(format!("{} (user {:?})", t.name, l.status.user));
                }
            }
            Err(e) => {
                crate::say!("yod: node {} is down ({e}); skipping it", t.name);
                down.push(t.name.clone());
            }
        }
    }
    let need = need_fixed.unwrap_or_else(|| links.len().min(spec.n as usize).max(1));
    if links.len() < need {
        return Err(YodError::Allocation(format!(
            "the job needs {need} compute node(s) but only {} of {total} are free{}{}",
            links.len(),
            if down.is_empty() {
                String::new()
            } else {
                format!("; down: {}", down.join(", "))
            },
            if busy.is_empty() {
                String::new()
            } else {
                format!("; allocated to others: {}", busy.join(", "))
            },
        )));
    }
    links.truncate(need);
    Ok(Allocation {
        links,
        topology,
        down,
    })
}

/// Outcome of a job.
pub struct Outcome {
    pub code: i32,
    /// Nodes lost during the job.
    pub lost: Vec<String>,
}

/// Runs the job on allocated links; returns the exit status for yod.
pub fn run(spec: &JobSpec, alloc: Allocation) -> Result<Outcome> {
    let Allocation {
        links, topology, ..
    } = alloc;
    let job = new_job_id();
    let placement = distribute(spec.n, links.len(), spec.ppn);
    if placement.len() > links.len() {
        return Err(YodError::Allocation(format!(
            "{} ranks{} need {} nodes, have {}",
            spec.n,
            spec.ppn
                .map(|p| format!(" at --ppn {p}"))
                .unwrap_or_default(),
            placement.len(),
            links.len()
        )));
    }
    let links: Vec<Link> = links.into_iter().take(placement.len()).collect();
    let map = NodeMap::build(
        &job,
        spec.mode.as_str(),
        topology,
        &links
            .iter()
            .zip(&placement)
            .map(|(l, r)| (l.target.name.clone(), l.target.coords.clone(), r.clone()))
            .collect::<Vec<_>>(),
    );
    let map_json = serde_json::to_string(&map)
        .map_err(|e| YodError::Usage(format!("cannot encode the node map: {e}")))?;
    let env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| !RANK_IDENTITY_VARS.contains(&k.as_str()))
        .collect();
    let cwd = std::env::current_dir()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/".into());
    let uid = rustix::process::getuid().as_raw();
    if spec.verbose {
        for (l, r) in links.iter().zip(&placement) {
            crate::say!("yod: job {job}: node {} gets ranks {:?}", l.target.name, r);
        }
    }

    let (tx, rx) = channel::<Ev>();
    // Readers first, so nothing a PCT says is missed.
    let mut writers = Vec::new();
    let mut names = Vec::new();
    for (i, l) in links.into_iter().enumerate() {
        let Link {
            target,
            reader,
            writer,
            ..
        } = l;
        names.push(target.name.clone());
        writers.push(writer);
        spawn_reader(i, reader, tx.clone())?;
    }
    let send_to = |i: usize, msg: &ToPct| -> bool {
        writers[i]
            .lock()
            .ok()
            .and_then(|mut w| write_frame(&mut *w, msg).ok())
            .is_some()
    };
    for (i, ranks) in placement.iter().enumerate() {
        let req = LoadRequest {
            job: job.clone(),
            uid,
            program: spec.program.clone(),
            args: spec.args.clone(),
            env: env.clone(),
            cwd: cwd.clone(),
            size: spec.n,
            node: i as u32,
            ranks: ranks.clone(),
            mode: spec.mode,
            node_map: map_json.clone(),
            stdin_rank: if ranks.contains(&0) { Some(0) } else { None },
            priority: spec.priority,
        };
        if !send_to(i, &ToPct::Load(Box::new(req))) {
            let _ = tx.send(Ev::Lost(i, "control link failed while loading".into()));
        }
    }
    // Heartbeats on the control link.
    {
        let writers = writers.clone();
        std::thread::Builder::new()
            .name("yod-heartbeat".into())
            .spawn(move || loop {
                std::thread::sleep(HEARTBEAT_INTERVAL);
                for w in &writers {
                    if let Ok(mut w) = w.lock() {
                        let _ = write_frame(&mut *w, &ToPct::Heartbeat);
                    }
                }
            })
            .map_err(|e| YodError::io("starting the heartbeat thread", e))?;
    }
    // Signals: Ctrl-C / SIGTERM / SIGHUP tear the job down.
    {
        let tx = tx.clone();
        let mut sigs = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ])
        .map_err(|e| YodError::io("installing signal handlers", e))?;
        std::thread::Builder::new()
            .name("yod-signals".into())
            .spawn(move || {
                for s in sigs.forever() {
                    if tx.send(Ev::Signal(s)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| YodError::io("starting the signal thread", e))?;
    }
    // stdin goes to rank 0.
    if let Some(i0) = placement.iter().position(|r| r.contains(&0)) {
        let w = writers[i0].clone();
        std::thread::Builder::new()
            .name("yod-stdin".into())
            .spawn(move || {
                let mut buf = vec![0u8; 32768];
                let mut input = std::io::stdin().lock();
                loop {
                    let msg = match input.read(&mut buf) {
                        Ok(0) | Err(_) => ToPct::StdinEof,
                        Ok(n) => ToPct::Stdin {
                            data: buf[..n].to_vec(),
                        },
                    };
                    let eof = matches!(msg, ToPct::StdinEof);
                    let ok = w
                        .lock()
                        .ok()
                        .and_then(|mut w| write_frame(&mut *w, &msg).ok())
                        .is_some();
                    if eof || !ok {
                        break;
                    }
                }
            })
            .map_err(|e| YodError::io("starting the stdin thread", e))?;
    }
    drop(tx);

    let k = names.len();
    let mut done = vec![false; k];
    let mut lost = Vec::new();
    let mut first_failure: Option<i32> = None;
    let mut code_override: Option<i32> = None;
    let mut teardown: Option<Instant> = None;
    let mut exited = 0u32;
    // Multi-node jobs: fabric addresses, sent to everyone once all are known.
    let mut fabric: Vec<Option<Option<String>>> = vec![None; k];
    let kill_all = |sig: i32, done: &[bool]| {
        for (i, d) in done.iter().enumerate() {
            if !d {
                send_to(i, &ToPct::Kill { signal: sig });
            }
        }
    };
    while done.iter().any(|d| !d) {
        let ev = match teardown {
            Some(t) => match rx.recv_timeout(t.saturating_duration_since(Instant::now())) {
                Ok(ev) => ev,
                Err(_) => {
                    crate::say!(
                        "yod: nodes did not confirm the teardown in time; giving up on them"
                    );
                    break;
                }
            },
            None => match rx.recv() {
                Ok(ev) => ev,
                Err(_) => break,
            },
        };
        match ev {
            Ev::Msg(
                _,
                FromPct::Output {
                    rank,
                    stream,
                    text,
                    bytes,
                },
            ) => {
                let data = text.map(String::into_bytes).or(bytes).unwrap_or_default();
                emit(spec.label, rank, stream, &data);
            }
            Ev::Msg(i, FromPct::Exited { rank, status, .. }) => {
                exited += 1;
                if !status.success() && first_failure.is_none() && teardown.is_none() {
                    first_failure = Some(status.code());
                    crate::say!(
                        "yod: rank {rank} on node {} {}{}",
                        names[i],
                        describe(status),
                        if spec.fault == FaultPolicy::EndJob {
                            format!("; ending job {job}")
                        } else {
                            String::new()
                        }
                    );
                    if spec.fault == FaultPolicy::EndJob {
                        kill_all(15, &done);
                        teardown = Some(Instant::now() + Duration::from_secs(3));
                    }
                }
            }
            Ev::Msg(i, FromPct::FabricReady { addr }) => {
                fabric[i] = Some(addr);
                if fabric.iter().all(Option::is_some) {
                    let peers: Vec<(u32, String)> = fabric
                        .iter()
                        .enumerate()
                        .filter_map(|(n, a)| Some((n as u32, a.clone()??)))
                        .collect();
                    for n in 0..k {
                        send_to(
                            n,
                            &ToPct::Peers {
                                peers: peers.clone(),
                            },
                        );
                    }
                }
            }
            Ev::Msg(i, FromPct::JobDone) => done[i] = true,
            Ev::Msg(i, FromPct::Refused { reason }) => {
                crate::say!("yod: {reason}");
                done[i] = true;
                if code_override.is_none() {
                    code_override = Some(EXIT_LAUNCH_FAILED);
                }
                if teardown.is_none() {
                    kill_all(9, &done);
                    teardown = Some(Instant::now() + Duration::from_secs(3));
                }
            }
            Ev::Msg(_, _) => {}
            Ev::Lost(i, why) => {
                if done[i] {
                    continue;
                }
                done[i] = true;
                lost.push(names[i].clone());
                crate::say!("yod: node {} lost ({why}); ending job {job}", names[i]);
                if spec.local {
                    pct::job::kill_job_leftovers(&job, i as u32);
                }
                if code_override.is_none() && first_failure.is_none() {
                    code_override = Some(EXIT_NODE_LOST);
                }
                if teardown.is_none() {
                    kill_all(9, &done);
                    teardown = Some(Instant::now() + Duration::from_secs(3));
                }
            }
            Ev::Signal(s) => {
                if teardown.is_some() && code_override == Some(128 + s) {
                    kill_all(9, &done);
                    break;
                }
                crate::say!("yod: caught {}; tearing down job {job}", signal_name(s));
                code_override = Some(128 + s);
                kill_all(s, &done);
                teardown = Some(Instant::now() + Duration::from_secs(3));
            }
        }
    }
    if spec.verbose {
        crate::say!("yod: job {job}: {exited} rank exit(s) reported");
    }
    let code = match (code_override, first_failure) {
        (Some(c), None) => c,
        (_, Some(f)) => f,
        (None, None) => 0,
    };
    // A signal code wins over the rank failures it caused.
    let code = match code_override {
        Some(c) if c > 128 && c < 160 => c,
        _ => code,
    };
    Ok(Outcome { code, lost })
}

fn spawn_reader(i: usize, mut conn: Conn, tx: Sender<Ev>) -> Result<()> {
    std::thread::Builder::new()
        .name(format!("yod-reader-{i}"))
        .spawn(move || loop {
            match read_frame::<_, FromPct>(&mut conn, MAX_FRAME) {
                Ok(FromPct::Heartbeat) => {}
                Ok(m) => {
                    let last = matches!(m, FromPct::JobDone);
                    if tx.send(Ev::Msg(i, m)).is_err() || last {
                        // Keep the link open (quietly) until yod exits.
                        if last {
                            continue;
                        }
                        break;
                    }
                }
                Err(e) => {
                    let why = match e {
                        pct::PctError::Timeout(_) => {
                            format!("no heartbeat for {} ms", HEARTBEAT_TIMEOUT.as_millis())
                        }
                        pct::PctError::Closed => "its PCT closed the control link".into(),
                        other => other.to_string(),
                    };
                    let _ = tx.send(Ev::Lost(i, why));
                    break;
                }
            }
        })
        .map_err(|e| YodError::io("starting a reader thread", e))?;
    Ok(())
}
