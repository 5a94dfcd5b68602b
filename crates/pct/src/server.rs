//! The PCT daemon: listens on its control address, authenticates every peer,
//! runs one session per connection, serves names, and cleans up on exit.

use crate::config::PctConfig;
use crate::error::{PctError, Result};
use crate::job::{self, JobCmd, JobCtl, Sink};
use crate::key::ClusterKey;
use crate::policy::{CpuSplit, Policies, RunningJob, ServiceCpus};
use crate::proto::{
    accept_handshake, read_frame, Address, Conn, FromPct, NameEntry, NodeStatus, ToPct,
    HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, MAX_FRAME,
};
use crate::resources::{JobResources, MemfdSegment};
use rustix::process::{kill_process_group, Pid, Signal};
use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Everything one PCT knows about its node.
pub struct Node {
    pub name: String,
    pub key: ClusterKey,
    pub policies: Policies,
    pub resources: Box<dyn JobResources>,
    /// Every CPU of the node we may use.
    pub cpus: Vec<usize>,
    /// The node's CPUs split into service CPUs (ours) and application CPUs (the ranks').
    pub split: CpuSplit,
    /// Where job directories (node map files) are created.
    pub run_dir: PathBuf,
    pub kill_grace_ms: u64,
    jobs: Mutex<Vec<RunningJob>>,
    names: Mutex<HashMap<String, NameEntry>>,
    /// Process groups of live ranks, for emergency teardown.
    live: Mutex<HashSet<i32>>,
    /// Connections that have not proved the key yet.
    unproven: std::sync::atomic::AtomicUsize,
}

/// Most connections allowed to be in the handshake at once (a flood of idle
/// connections cannot exhaust the PCT's threads).
pub const MAX_UNPROVEN: usize = 32;

impl Node {
    pub fn new(
        name: String,
        key: ClusterKey,
        cfg: &PctConfig,
        run_dir: PathBuf,
        resources: Box<dyn JobResources>,
    ) -> Self {
        let cpus = usable_cpus();
        // `run_serve` has checked the setting; a bad one in a hand-made Node falls back to auto.
        let split = cfg
            .service_cpus()
            .and_then(|s| CpuSplit::new(&cpus, &s))
            .or_else(|_| CpuSplit::new(&cpus, &ServiceCpus::Auto))
            .unwrap_or_else(|_| CpuSplit {
                all: cpus.clone(),
                service: cpus.clone(),
                app: cpus.clone(),
            });
        Node {
            name,
            key,
            policies: Policies::from_config(cfg),
            resources,
            cpus,
            split,
            run_dir,
            kill_grace_ms: cfg.kill_grace_ms.unwrap_or(300).min(10_000),
            jobs: Mutex::new(Vec::new()),
            names: Mutex::new(HashMap::new()),
            live: Mutex::new(HashSet::new()),
            unproven: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// A node with the default (memfd) job resources.
    pub fn with_defaults(name: String, key: ClusterKey, cfg: &PctConfig, run_dir: PathBuf) -> Self {
        Self::new(name, key, cfg, run_dir, Box::new(MemfdSegment))
    }

    pub fn status(&self) -> NodeStatus {
        let jobs = self.jobs.lock().map(|j| j.clone()).unwrap_or_default();
        NodeStatus {
            name: self.name.clone(),
            cpus: self.cpus.len() as u32,
            jobs: jobs.len() as u32,
            user: jobs.first().map(|j| j.uid),
            tasking: self.policies.admission.name().into(),
            variant: self.policies.variant.name().into(),
        }
    }

    /// Forgets a job (called before `JobDone` is sent, so the node is free the
    /// moment yod learns the job has ended).
    pub(crate) fn job_finished(&self, job: &str) {
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.retain(|j| j.job != job);
        }
    }

    pub(crate) fn track(&self, pid: Pid, alive: bool) {
        if let Ok(mut l) = self.live.lock() {
            if alive {
                l.insert(pid.as_raw_pid());
            } else {
                l.remove(&pid.as_raw_pid());
            }
        }
    }

    /// Kills every rank this PCT started (used when the PCT is told to stop).
    pub fn kill_everything(&self) {
        if let Ok(l) = self.live.lock() {
            for &p in l.iter() {
                if let Some(pid) = Pid::from_raw(p) {
                    let _ = kill_process_group(pid, Signal::KILL);
                }
            }
        }
    }

    fn log(&self, msg: impl std::fmt::Display) {
        eprintln!("pct[{}]: {msg}", self.name);
    }
}

/// CPUs in our affinity mask.
pub fn usable_cpus() -> Vec<usize> {
    match rustix::thread::sched_getaffinity(None) {
        Ok(set) => (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| set.is_set(c))
            .collect(),
        Err(_) => (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect(),
    }
}

/// A bound control socket.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds; a Unix socket is created mode 0600 (a stale socket file is replaced).
    pub fn bind(addr: &Address) -> Result<Listener> {
        match addr {
            Address::Unix(p) => {
                if p.exists() && std::os::unix::net::UnixStream::connect(p).is_err() {
                    let _ = std::fs::remove_file(p);
                }
                let l = UnixListener::bind(p)
                    .map_err(|e| PctError::io(format!("binding {addr}"), e))?;
                let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600));
                Ok(Listener::Unix(l, p.clone()))
            }
            Address::Tcp(hp) => {
                let l = TcpListener::bind(hp.as_str())
                    .map_err(|e| PctError::io(format!("binding {addr}"), e))?;
                Ok(Listener::Tcp(l))
            }
        }
    }

    pub fn local_addr(&self) -> String {
        match self {
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| format!("tcp:{a}"))
                .unwrap_or_else(|_| "tcp:?".into()),
        }
    }

    fn accept(&self) -> std::io::Result<Conn> {
        match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Conn::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
        }
    }

    /// Removes the socket file, if any.
    pub fn cleanup(&self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Accepts connections forever, one thread per session.
pub fn serve(node: Arc<Node>, listener: &Listener) -> Result<()> {
    loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                node.log(format!("accept failed: {e}"));
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if node.unproven.fetch_add(1, Ordering::AcqRel) >= MAX_UNPROVEN {
            node.unproven.fetch_sub(1, Ordering::AcqRel);
            node.log(format!(
                "rejected {}: {MAX_UNPROVEN} connections already in the handshake",
                conn.peer()
            ));
            conn.shutdown();
            continue;
        }
        let n = node.clone();
        let spawned = std::thread::Builder::new()
            .name("pct-session".into())
            .spawn(move || session(n, conn));
        if let Err(e) = spawned {
            node.unproven.fetch_sub(1, Ordering::AcqRel);
            node.log(format!("cannot start a session thread: {e}"));
        }
    }
}

/// One control connection: handshake, then requests until the peer leaves.
pub fn session(node: Arc<Node>, mut conn: Conn) {
    let peer = conn.peer();
    let _ = conn.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(3)));
    let proved = accept_handshake(&mut conn, &node.key, &node.status());
    node.unproven.fetch_sub(1, Ordering::AcqRel);
    if let Err(e) = proved {
        node.log(format!("rejected {peer}: {e}"));
        conn.shutdown();
        return;
    }
    let _ = conn.set_read_timeout(Some(HEARTBEAT_TIMEOUT));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
    let writer = match conn.try_clone() {
        Ok(w) => w,
        Err(e) => {
            node.log(e);
            return;
        }
    };
    let sink = Sink(Arc::new(Mutex::new(writer)));
    let stop = Arc::new(AtomicBool::new(false));
    let hb = {
        let (sink, stop) = (sink.clone(), stop.clone());
        std::thread::Builder::new()
            .name("pct-heartbeat".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if sink.send(&FromPct::Heartbeat).is_err() {
                        break;
                    }
                    std::thread::sleep(HEARTBEAT_INTERVAL);
                }
            })
            .ok()
    };
    let mut job: Option<(JobCtl, std::thread::JoinHandle<()>, String)> = None;
    let reason = loop {
        let msg: ToPct = match read_frame(&mut conn, MAX_FRAME) {
            Ok(m) => m,
            Err(PctError::Closed) => break "yod closed the control link".to_string(),
            Err(PctError::Timeout(_)) => {
                break format!(
                    "no heartbeat from yod for {} ms",
                    HEARTBEAT_TIMEOUT.as_millis()
                )
            }
            Err(e) => break format!("bad message from {peer}: {e}"),
        };
        match msg {
            ToPct::Heartbeat => {}
            ToPct::Status => {
                let _ = sink.send(&FromPct::Status(node.status()));
            }
            ToPct::Load(req) => {
                if job.is_some() {
                    let _ = sink.send(&FromPct::Refused {
                        reason: "this control link already runs a job".into(),
                    });
                    continue;
                }
                match admit_and_start(&node, *req, &sink, conn.local_ip()) {
                    Ok(j) => job = Some(j),
                    Err(e) => {
                        let _ = sink.send(&FromPct::Refused {
                            reason: format!("node {}: {e}", node.name),
                        });
                    }
                }
            }
            ToPct::Peers { peers } => {
                if let Some((ctl, _, _)) = &job {
                    ctl.send(JobCmd::Peers(peers));
                }
            }
            ToPct::Stdin { data } => {
                if let Some((ctl, _, _)) = &job {
                    ctl.send(JobCmd::Stdin(data));
                }
            }
            ToPct::StdinEof => {
                if let Some((ctl, _, _)) = &job {
                    ctl.send(JobCmd::StdinEof);
                }
            }
            ToPct::Kill { signal } => {
                if let Some((ctl, _, _)) = &job {
                    ctl.send(JobCmd::Kill(signal));
                }
            }
            ToPct::NameRegister { name, entry } => {
                let ok = name.len() <= 256 && !name.is_empty();
                if ok {
                    if let Ok(mut t) = node.names.lock() {
                        t.insert(name, entry);
                    }
                    let _ = sink.send(&FromPct::Ok);
                } else {
                    let _ = sink.send(&FromPct::Refused {
                        reason: "names are 1-256 bytes".into(),
                    });
                }
            }
            ToPct::NameLookup { name } => {
                let entry = node.names.lock().ok().and_then(|t| t.get(&name).cloned());
                let _ = sink.send(&FromPct::Name { entry });
            }
            ToPct::NameUnregister { name } => {
                if let Ok(mut t) = node.names.lock() {
                    t.remove(&name);
                }
                let _ = sink.send(&FromPct::Ok);
            }
        }
    };
    if let Some((ctl, handle, id)) = job.take() {
        if !handle.is_finished() && !ctl.finished.load(Ordering::Acquire) {
            node.log(format!("{reason}; ending job {id}"));
            ctl.send(JobCmd::Kill(Signal::KILL.as_raw()));
        }
        let _ = handle.join();
        if let Ok(mut jobs) = node.jobs.lock() {
            jobs.retain(|j| j.job != id);
        }
    }
    stop.store(true, Ordering::Relaxed);
    conn.shutdown();
    if let Some(h) = hb {
        let _ = h.join();
    }
}

fn admit_and_start(
    node: &Arc<Node>,
    req: crate::proto::LoadRequest,
    sink: &Sink,
    fabric_ip: std::net::IpAddr,
) -> Result<(JobCtl, std::thread::JoinHandle<()>, String)> {
    req.validate()?;
    {
        let mut jobs = node
            .jobs
            .lock()
            .map_err(|_| PctError::Refused("node state poisoned".into()))?;
        // A finished job of an earlier session may still be listed for a moment.
        node.policies
            .admission
            .admit(&jobs, &req)
            .map_err(PctError::Refused)?;
        jobs.push(RunningJob {
            job: req.job.clone(),
            uid: req.uid,
            priority: req.priority,
        });
    }
    let id = req.job.clone();
    let (wake_r, wake_w) = job::wake_pipe()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let finished = Arc::new(AtomicBool::new(false));
    let (n, s, f) = (node.clone(), sink.clone(), finished.clone());
    let done_node = node.clone();
    let job_id = id.clone();
    let handle = std::thread::Builder::new()
        .name("pct-job".into())
        .spawn(move || {
            // Failures are reported to yod as `Refused`; nothing more to do here.
            let _ = job::run_job(n, req, s, rx, wake_r, &f, fabric_ip);
            if let Ok(mut jobs) = done_node.jobs.lock() {
                jobs.retain(|j| j.job != job_id);
            }
        })
        .map_err(|e| PctError::io("starting the job thread", e))?;
    Ok((
        JobCtl {
            tx,
            wake: wake_w,
            finished,
        },
        handle,
        id,
    ))
}
