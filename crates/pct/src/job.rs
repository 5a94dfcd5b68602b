//! Running one job's share on this node: resources, environment, pinning,
//! spawning, forwarding output line by line, reaping, tearing down.

use crate::error::{PctError, Result};
use crate::policy::{unix_ns, RankRecord};
use crate::proto::{Conn, FromPct, LoadRequest, RankStatus, Stream};
use crate::server::Node;
use crate::sys;
use rustix::event::{poll, PollFd, PollFlags};
use rustix::fs::{fcntl_setfl, OFlags};
use rustix::process::{kill_process_group, pidfd_open, Pid, PidfdFlags, Signal, WaitOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest partial line kept back waiting for its newline.
const MAX_LINE: usize = 64 * 1024;

/// Writes frames to yod; shared by the job, the session and the heartbeat.
#[derive(Clone)]
pub struct Sink(pub Arc<Mutex<Conn>>);

impl Sink {
    pub fn send(&self, msg: &FromPct) -> Result<()> {
        let mut c = self.0.lock().map_err(|_| PctError::Closed)?;
        crate::proto::write_frame(&mut *c, msg)
    }
}

/// Commands from the session to a running job.
#[derive(Debug)]
pub enum JobCmd {
    /// Every node's fabric address (multi-node jobs).
    Peers(Vec<(u32, String)>),
    Stdin(Vec<u8>),
    StdinEof,
    Kill(i32),
}

/// The session's handle on a job thread.
pub struct JobCtl {
    pub tx: Sender<JobCmd>,
    pub wake: OwnedFd,
    /// Set once every rank has been reaped (just before `JobDone`).
    pub finished: Arc<std::sync::atomic::AtomicBool>,
}

impl JobCtl {
    pub fn send(&self, cmd: JobCmd) {
        if self.tx.send(cmd).is_ok() {
            let _ = rustix::io::write(&self.wake, &[1]);
        }
    }
}

struct OutPipe {
    fd: OwnedFd,
    buf: Vec<u8>,
    stream: Stream,
}

struct Rank {
    rank: u32,
    pid: Pid,
    pidfd: Option<OwnedFd>,
    pipes: Vec<OutPipe>,
    cpus: Option<Vec<usize>>,
    start_ns: u128,
    trace: Option<String>,
    done: bool,
}

fn set_nonblocking(fd: &OwnedFd) -> Result<()> {
    fcntl_setfl(fd, OFlags::NONBLOCK)?;
    Ok(())
}

fn output_msg(rank: u32, stream: Stream, data: Vec<u8>) -> FromPct {
    match String::from_utf8(data) {
        Ok(text) => FromPct::Output {
            rank,
            stream,
            text: Some(text),
            bytes: None,
        },
        Err(e) => FromPct::Output {
            rank,
            stream,
            text: None,
            bytes: Some(e.into_bytes()),
        },
    }
}

/// Reads what is available; sends complete lines. Returns false at end of file.
fn pump(rank: u32, p: &mut OutPipe, sink: &Sink) -> bool {
    let mut chunk = [0u8; 16384];
    let mut open = true;
    for _ in 0..8 {
        match rustix::io::read(&p.fd, &mut chunk) {
            Ok(0) => {
                open = false;
                break;
            }
            Ok(n) => p.buf.extend_from_slice(&chunk[..n]),
            Err(rustix::io::Errno::AGAIN) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => {
                open = false;
                break;
            }
        }
    }
    let cut = if !open || p.buf.len() > MAX_LINE {
        p.buf.len()
    } else {
        p.buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
    };
    if cut > 0 {
        let rest = p.buf.split_off(cut);
        let data = std::mem::replace(&mut p.buf, rest);
        let _ = sink.send(&output_msg(rank, p.stream, data));
    }
    open
}

/// Reads everything left in a pipe (until it would block or ends) and sends it.
fn drain(rank: u32, p: &mut OutPipe, sink: &Sink) {
    let mut chunk = [0u8; 16384];
    loop {
        match rustix::io::read(&p.fd, &mut chunk) {
            Ok(0) => break,
            Ok(n) => p.buf.extend_from_slice(&chunk[..n]),
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => break,
        }
    }
    if !p.buf.is_empty() {
        let data = std::mem::take(&mut p.buf);
        let _ = sink.send(&output_msg(rank, p.stream, data));
    }
}

/// CPU time (user, system) in ns of a not-yet-reaped process, from /proc.
fn cpu_times(pid: Pid) -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_pid())) else {
        return (0, 0);
    };
    let Some(after) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return (0, 0);
    };
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = 1_000_000_000 / rustix::param::clock_ticks_per_second().max(1);
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * tick;
    // Fields 14 and 15 of stat; `after` starts at field 3.
    (get(11), get(12))
}

/// Removes a job directory we created (node map file).
fn remove_job_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

/// The job's directory on this node (node map file).
fn job_dir_of(node: &Node, req: &LoadRequest) -> PathBuf {
    node.run_dir.join(format!("job-{}-{}", req.job, req.node))
}

/// Runs the job to its end. Always sends `JobDone` (or `Refused`) before returning.
pub fn run_job(
    node: Arc<Node>,
    req: LoadRequest,
    sink: Sink,
    cmds: Receiver<JobCmd>,
    wake: OwnedFd,
    finished: &std::sync::atomic::AtomicBool,
    fabric_ip: std::net::IpAddr,
) -> Result<()> {
    let job_dir = node.run_dir.join(format!("job-{}-{}", req.job, req.node));
    let res = start_and_run(&node, &req, &sink, &cmds, &wake, finished, fabric_ip);
    remove_job_dir(&job_dir);
    node.job_finished(&req.job);
    if let Err(e) = &res {
        let _ = sink.send(&FromPct::Refused {
            reason: format!("node {}: {e}", node.name),
        });
    }
    res
}

fn start_and_run(
    node: &Arc<Node>,
    req: &LoadRequest,
    sink: &Sink,
    cmds: &Receiver<JobCmd>,
    wake: &OwnedFd,
    finished: &std::sync::atomic::AtomicBool,
    fabric_ip: std::net::IpAddr,
) -> Result<()> {
    let job_dir = &job_dir_of(node, req);
    std::fs::create_dir_all(job_dir)
        .map_err(|e| PctError::io(format!("creating {}", job_dir.display()), e))?;
    let map_path = job_dir.join("nodemap.json");
    std::fs::write(&map_path, &req.node_map)
        .map_err(|e| PctError::io(format!("writing {}", map_path.display()), e))?;
    let mut resources = node.resources.create(req)?;
    // A job on several nodes: build the inter-node fabric before any rank runs.
    let mut early = Vec::new();
    let (job_nodes, rank_node) = job_layout(&req.node_map, req.size)?;
    // The ranks' CPUs first: the node engine's CPU is chosen knowing them
    // (`policy::engine_cpu`).
    let local_size = req.ranks.len();
    let offered = node.split.rank_cpus(local_size * req.mode.cores_per_rank());
    let placements: Vec<Option<Vec<usize>>> = (0..local_size)
        .map(|lr| {
            node.policies
                .placement
                .cpus_for(lr, local_size, req.mode, &offered)
        })
        .collect();
    if job_nodes > 1 {
        let listener =
            if resources.wants_node_engine() {
                Some(std::net::TcpListener::bind((fabric_ip, 0)).map_err(|e| {
                    PctError::io(format!("binding the node engine on {fabric_ip}"), e)
                })?)
            } else {
                None
            };
        let addr = listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.to_string());
        let _ = sink.send(&FromPct::FabricReady { addr });
        let peers = wait_for_peers(cmds, &mut early)?;
        if let Some(listener) = listener {
            let mut list = Vec::new();
            for (n, a) in peers {
                if n == req.node {
                    continue;
                }
                let sa = a
                    .parse()
                    .map_err(|_| PctError::BadRequest(format!("peer address {a:?} of node {n}")))?;
                list.push((n, sa));
            }
            resources.start_node_engine(crate::resources::EngineStart {
                job_id: crate::resources::qk_job_id(&req.job),
                node_id: req.node,
                listener,
                peers: list,
                rank_node,
                cluster_key: node.key.bytes().to_vec(),
                connect_timeout: Duration::from_secs(20),
                cpu: crate::policy::engine_cpu(&node.split, &placements),
            })?;
        }
    }
    let cwd = if Path::new(&req.cwd).is_dir() {
        PathBuf::from(&req.cwd)
    } else {
        PathBuf::from("/")
    };
    let mut ranks: Vec<Rank> = Vec::with_capacity(local_size);
    let mut stdin_tx: Option<Sender<Option<Vec<u8>>>> = None;
    let nice = node.policies.scheduling.nice_for(req.priority);

    for (lr, &rank) in req.ranks.iter().enumerate() {
        let mut cmd = Command::new(&req.program);
        cmd.args(&req.args)
            .env_clear()
            .envs(req.env.iter().map(|(k, v)| (k, v)))
            .env("PUMA_JOB", &req.job)
            .env("PUMA_RANK", rank.to_string())
            .env("PUMA_SIZE", req.size.to_string())
            .env("PUMA_NODE", req.node.to_string())
            .env("PUMA_LOCAL_RANK", lr.to_string())
            .env("PUMA_LOCAL_SIZE", local_size.to_string())
            .env("PUMA_MODE", req.mode.as_str())
            .env("PUMA_NODE_MAP", &map_path)
            .current_dir(&cwd)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if req.stdin_rank == Some(rank) {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .process_group(0);
        for (k, v) in resources.rank_env(lr as u32) {
            cmd.env(k, v);
        }
        let mut trace = None;
        for (k, v) in node.policies.variant.rank_env(&req.job, rank) {
            if k == "PUMA_TRACE" {
                trace = Some(v.clone());
            }
            cmd.env(k, v);
        }
        let cpus = placements[lr].clone();
        if let Some(c) = &cpus {
            cmd.env(
                "PUMA_CPUS",
                c.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            );
        }
        // Unpinned ranks still leave the PCT's own (service) mask for the whole node.
        let mask = cpus.as_deref().unwrap_or(&offered);
        sys::prepare_rank(&mut cmd, mask, resources.inherited_fds());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                kill_all(node, &ranks, Signal::KILL);
                reap_all(&mut ranks);
                return Err(PctError::Spawn {
                    rank,
                    program: req.program.clone(),
                    source,
                });
            }
        };
        let pid = Pid::from_child(&child);
        node.track(pid, true);
        if let Some(n) = nice {
            let _ = rustix::process::setpriority_process(Some(pid), n);
        }
        let pidfd = pidfd_open(pid, PidfdFlags::empty())?;
        let mut pipes = Vec::with_capacity(2);
        if let Some(o) = child.stdout.take() {
            let fd = OwnedFd::from(o);
            set_nonblocking(&fd)?;
            pipes.push(OutPipe {
                fd,
                buf: Vec::new(),
                stream: Stream::Stdout,
            });
        }
        if let Some(e) = child.stderr.take() {
            let fd = OwnedFd::from(e);
            set_nonblocking(&fd)?;
            pipes.push(OutPipe {
                fd,
                buf: Vec::new(),
                stream: Stream::Stderr,
            });
        }
        if let Some(mut input) = child.stdin.take() {
            let (tx, rx) = std::sync::mpsc::channel::<Option<Vec<u8>>>();
            stdin_tx = Some(tx);
            std::thread::Builder::new()
                .name("pct-stdin".into())
                .stack_size(64 * 1024)
                .spawn(move || {
                    while let Ok(Some(data)) = rx.recv() {
                        if input.write_all(&data).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| PctError::io("starting the stdin thread", e))?;
        }
        ranks.push(Rank {
            rank,
            pid,
            pidfd: Some(pidfd),
            pipes,
            cpus,
            start_ns: unix_ns(),
            trace,
            done: false,
        });
        // `child` is dropped without waiting: we reap through the pidfd below.
    }
    let _ = sink.send(&FromPct::Started {
        pids: ranks
            .iter()
            .map(|r| (r.rank, r.pid.as_raw_pid() as u32))
            .collect(),
    });

    // Input that arrived while the fabric was being built.
    for c in early {
        match c {
            JobCmd::Stdin(d) => {
                if let Some(tx) = &stdin_tx {
                    let _ = tx.send(Some(d));
                }
            }
            JobCmd::StdinEof => {
                if let Some(tx) = stdin_tx.take() {
                    let _ = tx.send(None);
                }
            }
            _ => {}
        }
    }
    let grace = Duration::from_millis(node.kill_grace_ms);
    let mut escalate: Option<Instant> = None;
    loop {
        if ranks.iter().all(|r| r.done) {
            break;
        }
        // index map: (rank index, Some(pipe index) | None = pidfd)
        let mut which: Vec<(usize, Option<usize>)> = Vec::new();
        let mut fds: Vec<PollFd> = vec![PollFd::new(wake, PollFlags::IN)];
        for (i, r) in ranks.iter().enumerate() {
            for (j, p) in r.pipes.iter().enumerate() {
                fds.push(PollFd::new(&p.fd, PollFlags::IN));
                which.push((i, Some(j)));
            }
            if let Some(pf) = &r.pidfd {
                fds.push(PollFd::new(pf, PollFlags::IN));
                which.push((i, None));
            }
        }
        let timeout = match escalate {
            Some(t) => t.saturating_duration_since(Instant::now()),
            None => Duration::from_secs(1),
        };
        let ts = rustix::event::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: timeout.subsec_nanos() as i64,
        };
        match poll(&mut fds, Some(&ts)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        let wake_ready = !fds[0].revents().is_empty();
        let ready: Vec<(usize, Option<usize>)> = fds[1..]
            .iter()
            .zip(which.iter())
            .filter(|(f, _)| !f.revents().is_empty())
            .map(|(_, w)| *w)
            .collect();
        drop(fds);

        if wake_ready {
            let mut b = [0u8; 64];
            let _ = rustix::io::read(wake, &mut b);
            while let Ok(c) = cmds.try_recv() {
                match c {
                    JobCmd::Stdin(d) => {
                        if let Some(tx) = &stdin_tx {
                            let _ = tx.send(Some(d));
                        }
                    }
                    JobCmd::StdinEof => {
                        if let Some(tx) = stdin_tx.take() {
                            let _ = tx.send(None);
                        }
                    }
                    JobCmd::Peers(_) => {}
                    JobCmd::Kill(sig) => {
                        let s = Signal::from_named_raw(sig).unwrap_or(Signal::KILL);
                        kill_all(node, &ranks, s);
                        if s != Signal::KILL && escalate.is_none() {
                            escalate = Some(Instant::now() + grace);
                        }
                    }
                }
            }
        }
        // Pipes first, so a rank's last words go out before its exit report.
        let mut exited = Vec::new();
        for (i, p) in ready {
            match p {
                Some(j) => {
                    let r = &mut ranks[i];
                    if j < r.pipes.len() && !pump(r.rank, &mut r.pipes[j], sink) {
                        r.pipes.remove(j);
                    }
                }
                None => exited.push(i),
            }
        }
        for i in exited {
            reap(node, req, &mut ranks[i], sink);
        }
        if let Some(t) = escalate {
            if Instant::now() >= t {
                kill_all(node, &ranks, Signal::KILL);
                escalate = None;
            }
        }
    }
    drop(stdin_tx);
    node.policies.variant.job_done(req);
    drop(resources);
    node.job_finished(&req.job);
    finished.store(true, std::sync::atomic::Ordering::Release);
    let _ = sink.send(&FromPct::JobDone);
    Ok(())
}

/// Number of nodes of the job and the node of every rank, from the node map.
fn job_layout(node_map: &str, size: u32) -> Result<(usize, Vec<u32>)> {
    let v: serde_json::Value = serde_json::from_str(node_map)
        .map_err(|e| PctError::BadRequest(format!("node map: {e}")))?;
    let nodes = v
        .get("nodes")
        .and_then(|n| n.as_array())
        .map_or(1, |a| a.len().max(1));
    let rank_node: Vec<u32> = v
        .get("ranks")
        .and_then(|r| r.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|r| r.get("node").and_then(|n| n.as_u64()).map(|n| n as u32))
                .collect()
        })
        .unwrap_or_default();
    if nodes > 1 && rank_node.len() != size as usize {
        return Err(PctError::BadRequest(
            "node map does not give the node of every rank".into(),
        ));
    }
    Ok((nodes, rank_node))
}

/// Waits (30 s at most) for yod's list of fabric addresses; keeps early input.
fn wait_for_peers(cmds: &Receiver<JobCmd>, early: &mut Vec<JobCmd>) -> Result<Vec<(u32, String)>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match cmds.recv_timeout(left) {
            Ok(JobCmd::Peers(p)) => return Ok(p),
            Ok(JobCmd::Kill(_)) => {
                return Err(PctError::Refused(
                    "job ended before its fabric was complete".into(),
                ))
            }
            Ok(other) => early.push(other),
            Err(_) => {
                return Err(PctError::Refused(
                    "no peer list from yod within 30 s".into(),
                ))
            }
        }
    }
}

fn reap(node: &Node, req: &LoadRequest, r: &mut Rank, sink: &Sink) {
    let (user, sys_ns) = cpu_times(r.pid);
    let status = match rustix::process::waitpid(Some(r.pid), WaitOptions::NOHANG) {
        Ok(Some((_, st))) => {
            if let Some(sig) = st.terminating_signal() {
                RankStatus::Signaled(sig)
            } else {
                RankStatus::Exited(st.exit_status().unwrap_or(0))
            }
        }
        Ok(None) => return, // spurious wake-up: not exited yet
        Err(_) => RankStatus::Exited(255),
    };
    r.pidfd = None;
    // Whatever the rank wrote before dying is in its pipes now.
    for mut p in std::mem::take(&mut r.pipes) {
        drain(r.rank, &mut p, sink);
    }
    // Nothing of a rank outlives it: its whole process group goes.
    let _ = kill_process_group(r.pid, Signal::KILL);
    node.track(r.pid, false);
    r.done = true;
    node.policies.variant.rank_done(&RankRecord {
        job: req.job.clone(),
        rank: r.rank,
        node: req.node,
        pid: r.pid.as_raw_pid() as u32,
        cpus: r.cpus.clone(),
        start_unix_ns: r.start_ns,
        end_unix_ns: unix_ns(),
        user_cpu_ns: user,
        system_cpu_ns: sys_ns,
        status,
        message_trace: r.trace.clone(),
    });
    let _ = sink.send(&FromPct::Exited {
        rank: r.rank,
        pid: r.pid.as_raw_pid() as u32,
        status,
    });
}

fn kill_all(_node: &Node, ranks: &[Rank], sig: Signal) {
    for r in ranks.iter().filter(|r| !r.done) {
        let _ = kill_process_group(r.pid, sig);
    }
}

fn reap_all(ranks: &mut [Rank]) {
    for r in ranks.iter_mut().filter(|r| !r.done) {
        let _ = rustix::process::waitpid(Some(r.pid), WaitOptions::empty());
        r.done = true;
    }
}

/// Makes a pipe for waking a job's poll loop.
pub fn wake_pipe() -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = rustix::pipe::pipe_with(
        rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
    )?;
    Ok((r, w))
}

/// Kills, by scanning /proc, every process of job `job` on node `node` (the
/// ranks and anything they started): they carry `PUMA_JOB` and `PUMA_NODE` in
/// their environment. Used when the PCT that owned the ranks is gone: by yod for
/// a lost local virtual node, and by a restarted PCT for the jobs of its previous
/// life. Returns how many processes were signalled.
pub fn kill_job_leftovers(job: &str, node: u32) -> usize {
    let want_job = format!("PUMA_JOB={job}");
    let want_node = format!("PUMA_NODE={node}");
    let me = rustix::process::getpid().as_raw_pid();
    let mut n = 0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let has = |w: &str| env.split(|&b| b == 0).any(|v| v == w.as_bytes());
        if has(&want_job) && has(&want_node) {
            if let Some(p) = Pid::from_raw(pid) {
                if rustix::process::kill_process(p, Signal::KILL).is_ok() {
                    n += 1;
                }
            }
        }
    }
    n
}

/// Cleans job directories left by an earlier PCT that died without cleaning up:
/// kills their leftover processes and removes the directories.
pub fn reap_previous_life(run_dir: &Path) -> usize {
    let mut killed = 0;
    let Ok(dir) = std::fs::read_dir(run_dir) else {
        return 0;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("job-") else {
            continue;
        };
        if let Some((job, node)) = rest.rsplit_once('-') {
            if let Ok(node) = node.parse() {
                killed += kill_job_leftovers(job, node);
            }
        }
        let _ = std::fs::remove_dir_all(e.path());
    }
    killed
}
