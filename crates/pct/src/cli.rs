//! The `pct` command line (also reachable as `yod pct ...`).

use crate::config::PctConfig;
use crate::error::{PctError, Result};
use crate::key::{default_key_path, ClusterKey};
use crate::names::NameClient;
use crate::policy::{format_cpu_list, CpuSplit, SERVICE_CPUS_ENV};
use crate::proto::{
    connect_handshake, read_frame, write_frame, Address, Conn, FromPct, NameEntry, ToPct, MAX_FRAME,
};
use crate::server::{serve, usable_cpus, Listener, Node};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Puma process control thread: the per-node daemon that loads, pins, runs and
/// reaps the ranks of jobs started by yod, and keeps the node's name table.
#[derive(Parser, Debug)]
#[command(name = "pct", version)]
pub struct PctCli {
    #[command(subcommand)]
    pub cmd: PctCmd,
}

#[derive(Subcommand, Debug)]
pub enum PctCmd {
    /// Run the daemon.
    Serve(ServeArgs),
    /// Create a cluster key file (mode 0600) shared by every PCT and yod.
    Keygen {
        /// Where to write it [default: $PUMA_KEY or ~/.config/puma/cluster.key]
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Replace an existing key.
        #[arg(long)]
        force: bool,
    },
    /// Ask a PCT for its status (proves the key first).
    Status {
        #[arg(long)]
        connect: String,
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Name server: register or look up a name on a PCT. Inside a rank (no
    /// --connect) it reaches the rank's own PCT ($PUMA_PCT) with the job's
    /// credential ($PUMA_JOB_CRED); with --connect it proves the cluster key.
    Name {
        #[arg(long)]
        connect: Option<String>,
        #[arg(long)]
        key: Option<PathBuf>,
        #[command(subcommand)]
        op: NameOp,
    },
}

#[derive(Subcommand, Debug)]
pub enum NameOp {
    /// Register NAME → (node, pid, portal).
    Register {
        name: String,
        /// Node [default: $PUMA_NODE]
        #[arg(long)]
        node: Option<String>,
        /// Process [default: the process that ran this command, e.g. the rank's shell]
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long)]
        portal: u32,
    },
    /// Print the entry for NAME as JSON (exit 1 if unknown).
    Lookup { name: String },
    /// Remove NAME.
    Unregister { name: String },
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Control address: unix:/path (default for local use) or tcp:HOST:PORT.
    #[arg(long)]
    pub listen: String,
    /// Cluster key file [default: $PUMA_KEY or ~/.config/puma/cluster.key]
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Policy configuration (TOML; see the README).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Node name reported to yod [default: config `name`, else the host name].
    #[arg(long)]
    pub name: Option<String>,
    /// Directory for job files (node maps) [default: $TMPDIR/puma-pct-<uid>-<name>].
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Exit (killing all ranks) when the process that started us dies.
    #[arg(long)]
    pub exit_with_parent: bool,
    /// With --exit-with-parent: the pid of the process that started us. Closes the
    /// race where that process dies before we arm the parent-death signal (we would
    /// otherwise take the reaper that adopted us for our parent and never exit).
    #[arg(long, value_name = "PID", requires = "exit_with_parent")]
    pub parent_pid: Option<u32>,
    /// Also remove this directory when the daemon is stopped (used by yod's
    /// embedded partition for its private directory).
    #[arg(long, hide = true)]
    pub remove_on_exit: Option<PathBuf>,
    /// CPUs for the PCT's own threads: `auto` (CPU 0 when the node has two or more),
    /// `none` (no split) or a list like `0,2-3`. Ranks go to the other CPUs
    /// [default: $PUMA_SERVICE_CPUS, else the config's `service_cpus`, else auto].
    #[arg(long, value_name = "LIST")]
    pub service_cpus: Option<String>,
}

fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// Runs the daemon until SIGTERM/SIGINT (or parent death with --exit-with-parent).
pub fn run_serve(a: ServeArgs) -> Result<()> {
    let parent = match a.parent_pid {
        Some(pid) => rustix::process::Pid::from_raw(pid as i32),
        None => rustix::process::getppid(),
    };
    if a.exit_with_parent {
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))?;
        if rustix::process::getppid() != parent {
            return Err(PctError::Refused(
                "the process that started this PCT (--exit-with-parent) is already gone".into(),
            ));
        }
    }
    let mut cfg = match &a.config {
        Some(p) => PctConfig::load(p)?,
        None => PctConfig::default(),
    };
    // Service CPUs: the command line, then the environment, then the configuration file.
    let (origin, setting) = match (&a.service_cpus, std::env::var(SERVICE_CPUS_ENV).ok()) {
        (Some(s), _) => ("--service-cpus".to_string(), Some(s.clone())),
        (None, Some(s)) => (format!("${SERVICE_CPUS_ENV}"), Some(s)),
        (None, None) => ("service_cpus".to_string(), cfg.service_cpus.clone()),
    };
    cfg.service_cpus = setting;
    let spec = cfg.service_cpus().map_err(|reason| PctError::Config {
        path: origin.clone(),
        reason,
    })?;
    CpuSplit::new(&usable_cpus(), &spec).map_err(|reason| PctError::Config {
        path: origin,
        reason,
    })?;
    let key_path = a.key.clone().unwrap_or_else(default_key_path);
    let key = ClusterKey::load(&key_path)?;
    let name = a
        .name
        .clone()
        .or(cfg.name.clone())
        .unwrap_or_else(host_name);
    let addr: Address = a.listen.parse()?;
    let uid = rustix::process::getuid().as_raw();
    let run_dir = a
        .run_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("puma-pct-{uid}-{name}")));
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| PctError::io(format!("creating {}", run_dir.display()), e))?;
    let leftovers = crate::job::reap_previous_life(&run_dir);
    if leftovers > 0 {
        eprintln!("pct[{name}]: killed {leftovers} process(es) left by an earlier PCT");
    }
    if let Some(q) = cfg.queue_bytes {
        if !q.is_power_of_two() || !(4096..=(1 << 30)).contains(&q) {
            return Err(PctError::Config {
                path: a
                    .config
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                reason: format!("queue_bytes {q} must be a power of two between 4 KiB and 1 GiB"),
            });
        }
    }
    let node = Arc::new(Node::new(
        name,
        key,
        &cfg,
        run_dir.clone(),
        cfg.job_resources(),
    ));
    // Every thread the PCT starts from here on inherits the service CPUs (ranks are given
    // their own mask when they are spawned).
    if let Err(e) = node.split.pin_here_to_service() {
        eprintln!(
            "pct[{}]: cannot pin to service CPUs {}: {e}; our threads may run on application CPUs",
            node.name,
            format_cpu_list(&node.split.service)
        );
    }
    let listener = Arc::new(Listener::bind(&addr)?);

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
        // srun forwards SIGUSR1 to its tasks, but answers SIGTERM by killing the
        // step with SIGKILL: yod stops the PCTs of a Slurm job with SIGUSR1.
        signal_hook::consts::SIGUSR1,
    ])
    .map_err(|e| PctError::io("installing signal handlers", e))?;
    {
        let (node, listener) = (node.clone(), listener.clone());
        let extra = a.remove_on_exit.clone();
        std::thread::Builder::new()
            .name("pct-signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    node.kill_everything();
                    listener.cleanup();
                    let _ = std::fs::remove_dir_all(&node.run_dir);
                    if let Some(d) = &extra {
                        let _ = std::fs::remove_dir_all(d);
                    }
                    std::process::exit(128 + sig);
                }
            })
            .map_err(|e| PctError::io("starting the signal thread", e))?;
    }
    node.set_listen_addr(&listener.local_addr());
    if !a.exit_with_parent {
        println!("pct[{}]: listening on {}", node.name, listener.local_addr());
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    serve(node, &listener)
}

fn client(connect: &str, key: Option<PathBuf>) -> Result<Conn> {
    let addr: Address = connect.parse()?;
    let key = ClusterKey::load(&key.unwrap_or_else(default_key_path))?;
    let mut c = Conn::connect(&addr, Duration::from_secs(3))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    connect_handshake(&mut c, &key)?;
    Ok(c)
}

fn request(c: &mut Conn, msg: &ToPct) -> Result<FromPct> {
    write_frame(c, msg)?;
    loop {
        match read_frame::<_, FromPct>(c, MAX_FRAME)? {
            FromPct::Heartbeat => continue,
            other => return Ok(other),
        }
    }
}

fn name_command(connect: Option<String>, key: Option<PathBuf>, op: NameOp) -> Result<i32> {
    let ns = match connect {
        Some(c) => {
            let key = ClusterKey::load(&key.unwrap_or_else(default_key_path))?;
            NameClient::with_cluster_key(c.parse()?, key)
        }
        None => NameClient::from_env()?,
    };
    match op {
        NameOp::Register {
            name,
            node,
            pid,
            portal,
        } => {
            let node = match node {
                Some(n) => n,
                None => std::env::var("PUMA_NODE")
                    .map_err(|_| PctError::BadRequest("--node is needed outside a rank".into()))?,
            };
            let pid = pid.unwrap_or_else(|| {
                rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get() as u32)
            });
            ns.register(&name, &NameEntry { node, pid, portal })?;
            Ok(0)
        }
        NameOp::Lookup { name } => match ns.lookup(&name)? {
            Some(e) => {
                println!("{}", serde_json::to_string(&e).unwrap_or_default());
                Ok(0)
            }
            None => {
                eprintln!("pct: no such name {name:?}");
                Ok(1)
            }
        },
        NameOp::Unregister { name } => ns.unregister(&name).map(|_| 0),
    }
}

/// Entry point of the `pct` binary. Returns the process exit code.
pub fn main_with(cli: PctCli) -> i32 {
    let res: Result<i32> = match cli.cmd {
        PctCmd::Serve(a) => run_serve(a).map(|_| 0),
        PctCmd::Keygen { out, force } => {
            let p = out.unwrap_or_else(default_key_path);
            ClusterKey::generate()
                .and_then(|k| k.write(&p, force))
                .map(|_| {
                    println!(
                        "wrote cluster key {} (mode 0600); copy it to every node",
                        p.display()
                    );
                    0
                })
        }
        PctCmd::Status { connect, key } => {
            client(&connect, key).and_then(|mut c| match request(&mut c, &ToPct::Status)? {
                FromPct::Status(s) => {
                    println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                    Ok(0)
                }
                other => Err(PctError::Malformed(format!("unexpected reply {other:?}"))),
            })
        }
        PctCmd::Name { connect, key, op } => name_command(connect, key, op),
    };
    match res {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pct: {e}");
            1
        }
    }
}
