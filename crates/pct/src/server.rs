//! The PCT daemon: listens on its control address, authenticates every peer,
//! runs one session per connection, serves names, and cleans up on exit.

use crate::config::PctConfig;
use crate::error::{PctError, Result};
use crate::job::{self, JobCmd, JobCtl, Sink};
use crate::key::ClusterKey;
use crate::names::{JobCredential, ENV_CRED, ENV_PCT};
use crate::policy::{CpuSplit, Policies, RunningJob, ServiceCpus};
use crate::proto::{
    accept_handshake_as, read_frame, Address, Conn, FromPct, NameEntry, NodeStatus, Peer, ToPct,
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
    names: Mutex<HashMap<String, Named>>,
    /// Credentials of the running jobs (serial, job id, secret): ranks prove
    /// them to reach the name server.
    creds: Mutex<Vec<(u64, String, [u8; 32])>>,
    next_cred: std::sync::atomic::AtomicU64,
    /// The address ranks reach this PCT at (`PUMA_PCT`), once listening.
    rank_addr: Mutex<Option<String>>,
    /// Process groups of live ranks, for emergency teardown.
    live: Mutex<HashSet<i32>>,
    /// Connections that have not proved the key yet.
    unproven: std::sync::atomic::AtomicUsize,
}

/// Who may change a name: the job whose credential registered it (its names go
/// when it ends), or a cluster-key holder (kept until unregistered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Cluster,
    Job(u64),
}

struct Named {
    entry: NameEntry,
    owner: Owner,
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
            creds: Mutex::new(Vec::new()),
            next_cred: std::sync::atomic::AtomicU64::new(1),
            rank_addr: Mutex::new(None),
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
        // The job's credential and names end with it (before yod hears JobDone).
        let serials: Vec<u64> = self
            .creds
            .lock()
            .map(|c| {
                c.iter()
                    .filter(|(_, j, _)| j == job)
                    .map(|(s, _, _)| *s)
                    .collect()
            })
            .unwrap_or_default();
        for s in serials {
            self.revoke(s);
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

    /// Records the address ranks use to reach this PCT (a wildcard TCP address
    /// becomes loopback: a rank always talks to its own node's PCT).
    pub fn set_listen_addr(&self, addr: &str) {
        let a = if let Some(port) = addr.strip_prefix("tcp:0.0.0.0:") {
            format!("tcp:127.0.0.1:{port}")
        } else if let Some(port) = addr.strip_prefix("tcp:[::]:") {
            format!("tcp:[::1]:{port}")
        } else {
            addr.to_string()
        };
        if let Ok(mut r) = self.rank_addr.lock() {
            *r = Some(a);
        }
    }

    /// A fresh credential for a job being started; revoked by [`Node::revoke`].
    fn issue_credential(&self, job: &str) -> Result<(u64, JobCredential)> {
        let cred = JobCredential::generate(job)?;
        let serial = self.next_cred.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut c) = self.creds.lock() {
            c.push((serial, job.to_string(), *cred.secret()));
        }
        Ok((serial, cred))
    }

    /// Forgets a job's credential and the names it registered.
    fn revoke(&self, serial: u64) {
        if let Ok(mut c) = self.creds.lock() {
            c.retain(|(s, _, _)| *s != serial);
        }
        if let Ok(mut t) = self.names.lock() {
            t.retain(|_, n| n.owner != Owner::Job(serial));
        }
    }

    fn job_secrets(&self, job: &str) -> Vec<(u64, [u8; 32])> {
        self.creds
            .lock()
            .map(|c| {
                c.iter()
                    .filter(|(_, j, _)| j == job)
                    .map(|(s, _, k)| (*s, *k))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Serves one name-server request from `owner`.
    fn name_request(&self, owner: Owner, msg: ToPct) -> FromPct {
        let refused = |reason: String| FromPct::Refused { reason };
        let Ok(mut t) = self.names.lock() else {
            return refused("name table poisoned".into());
        };
        match msg {
            ToPct::NameRegister { name, entry } => {
                if name.is_empty() || name.len() > 256 {
                    return refused("names are 1-256 bytes".into());
                }
                match t.get(&name) {
                    Some(n) if owner != Owner::Cluster && n.owner != owner => {
                        refused(format!("name {name:?} belongs to another job"))
                    }
                    _ => {
                        t.insert(name, Named { entry, owner });
                        FromPct::Ok
                    }
                }
            }
            ToPct::NameLookup { name } => FromPct::Name {
                entry: t.get(&name).map(|n| n.entry.clone()),
            },
            ToPct::NameUnregister { name } => match t.get(&name) {
                Some(n) if owner != Owner::Cluster && n.owner != owner => {
                    refused(format!("name {name:?} belongs to another job"))
                }
                _ => {
                    t.remove(&name);
                    FromPct::Ok
                }
            },
            _ => refused("not a name-server request".into()),
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
    let proved = accept_handshake_as(&mut conn, &node.key, &node.status(), &|j| {
        node.job_secrets(j)
    });
    node.unproven.fetch_sub(1, Ordering::AcqRel);
    let who = match proved {
        Ok(w) => w,
        Err(e) => {
            node.log(format!("rejected {peer}: {e}"));
            conn.shutdown();
            return;
        }
    };
    let owner = match &who {
        Peer::Cluster => Owner::Cluster,
        Peer::Job { serial, .. } => Owner::Job(*serial),
    };
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
        if let Peer::Job { job: j, .. } = &who {
            // A rank's credential reaches the name server and nothing else.
            let allowed = matches!(
                msg,
                ToPct::Heartbeat
                    | ToPct::Status
                    | ToPct::NameRegister { .. }
                    | ToPct::NameLookup { .. }
                    | ToPct::NameUnregister { .. }
            );
            if !allowed {
                node.log(format!(
                    "refused a control request from a rank of job {j} ({peer})"
                ));
                let _ = sink.send(&FromPct::Refused {
                    reason: "a job credential only reaches the name server".into(),
                });
                continue;
            }
        }
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
            m @ (ToPct::NameRegister { .. }
            | ToPct::NameLookup { .. }
            | ToPct::NameUnregister { .. }) => {
                let _ = sink.send(&node.name_request(owner, m));
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
    mut req: crate::proto::LoadRequest,
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
    // The ranks reach this PCT's name server with a credential of their own job
    // (never the cluster key); yod passes no PUMA_* variable, the PCT sets them.
    req.env.retain(|(k, _)| k != ENV_PCT && k != ENV_CRED);
    let (serial, cred) = node
        .issue_credential(&req.job)
        .inspect_err(|_| node.job_finished(&id))?;
    if let Some(a) = node.rank_addr.lock().ok().and_then(|a| a.clone()) {
        req.env.push((ENV_PCT.into(), a));
    }
    req.env.push((ENV_CRED.into(), cred.to_env()));
    let (wake_r, wake_w) = job::wake_pipe().inspect_err(|_| {
        node.revoke(serial);
        node.job_finished(&id);
    })?;
    let (tx, rx) = std::sync::mpsc::channel();
    let finished = Arc::new(AtomicBool::new(false));
    let (n, s, f) = (node.clone(), sink.clone(), finished.clone());
    let done_node = node.clone();
    let job_id = id.clone();
    let handle = std::thread::Builder::new()
        .name("pct-job".into())
        .spawn(move || {
            // Failures are reported to yod as `Refused`; nothing more to do here.
            let _ = job::run_job(n.clone(), req, s, rx, wake_r, &f, fabric_ip);
            n.revoke(serial);
            if let Ok(mut jobs) = done_node.jobs.lock() {
                jobs.retain(|j| j.job != job_id);
            }
        })
        .map_err(|e| {
            node.revoke(serial);
            node.job_finished(&id);
            PctError::io("starting the job thread", e)
        })?;
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
