//! The Slurm path end to end: first with a stand-in `srun` (runs anywhere: yod
//! expands SLURM_JOB_NODELIST, starts the PCTs through `srun`, connects to them
//! over TCP and runs the job; the stand-in runs the step's command locally, on
//! loopback), then against a real private single-node Slurm (munged,
//! slurmctld, slurmd started by the test; needs root and slurm-wlm + munge,
//! skipped with a printed reason otherwise).

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

#[test]
fn yod_inside_an_allocation_starts_pcts_with_srun() {
    if Command::new("bash").arg("--version").output().is_err() {
        println!("SKIPPED: bash is needed for the stand-in srun");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let srun = dir.path().join("srun");
    std::fs::write(
        &srun,
        "#!/bin/bash\n# stand-in srun: drop the options, run the step here, loopback only\n\
         while [[ $1 == --* ]]; do shift; done\nexec \"${@//0.0.0.0/127.0.0.1}\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&srun, std::fs::Permissions::from_mode(0o755)).unwrap();
    let key = dir.path().join("cluster.key");
    assert!(Command::new(yod())
        .args(["keygen", "--out"])
        .arg(&key)
        .status()
        .unwrap()
        .success());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let hello = hello().display().to_string();
    let out = Command::new(yod())
        .args(["-n", "3", "--pct-port", &port, "-v", &hello])
        .env("PATH", path)
        .env("SLURM_JOB_NODELIST", "localhost")
        .env("PUMA_KEY", &key)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let so = text(&out.stdout);
    let se = text(&out.stderr);
    assert!(out.status.success(), "{so}\n{se}");
    assert!(se.contains("starting PCTs: srun --nodes=1"), "{se}");
    assert_eq!(so.lines().count(), 3, "{so}");
    assert!(so.lines().all(|l| l.contains("(localhost)")), "{so}");
    // The PCT was stopped politely and removed its run directory.
    // The PCT is named after the host (srun passes no --name).
    let uid = rustix::process::getuid().as_raw();
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let run = std::env::temp_dir().join(format!("puma-pct-{uid}-{host}"));
    assert!(
        wait_for(std::time::Duration::from_secs(2), || !run.exists()),
        "{} left behind",
        run.display()
    );
}

#[test]
fn a_bad_node_list_is_a_clear_error() {
    let out = Command::new(yod())
        .args(["-n", "1", "true"])
        .env("SLURM_JOB_NODELIST", "n[3-1]")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("bad Slurm node list"),
        "{}",
        text(&out.stderr)
    );
}

/// A private single-node Slurm (munged, slurmctld, slurmd) in a temporary
/// directory, on free loopback ports; torn down (daemons stopped, files
/// removed) when dropped.
struct PrivateSlurm {
    dir: tempfile::TempDir,
    conf: std::path::PathBuf,
    daemons: Vec<(&'static str, std::process::Child)>,
}

impl PrivateSlurm {
    fn logs(&self) -> String {
        let mut s = String::new();
        for f in ["munged.log", "slurmctld.log", "slurmd.log"] {
            let t = std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
            let tail: Vec<&str> = t.lines().rev().take(40).collect();
            s.push_str(&format!("---- {f} (last lines) ----\n"));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    fn spawn(&mut self, name: &'static str, cmd: &mut Command) {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = cmd
            .env("SLURM_CONF", &self.conf)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.daemons.push((name, child));
    }

    fn start() -> PrivateSlurm {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        // munged refuses a socket directory others cannot traverse.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
        for sub in ["state", "spool"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        let mut key = vec![0u8; 1024];
        pct::key::random_bytes(&mut key).unwrap();
        let munge_key = d.join("munge.key");
        std::fs::write(&munge_key, &key).unwrap();
        std::fs::set_permissions(&munge_key, std::fs::Permissions::from_mode(0o400)).unwrap();
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (ctld_port, slurmd_port) = (free(), free());
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let sock = d.join("munge.socket");
        let p = |f: &str| d.join(f).display().to_string();
        let conf = d.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=pumatest\n\
                 SlurmctldHost=localhost(127.0.0.1)\n\
                 SlurmctldPort={ctld_port}\n\
                 SlurmdPort={slurmd_port}\n\
                 SlurmUser=root\n\
                 SlurmdUser=root\n\
                 AuthType=auth/munge\n\
                 AuthInfo=socket={sock}\n\
                 CredType=cred/munge\n\
                 StateSaveLocation={state}\n\
                 SlurmdSpoolDir={spool}\n\
                 SlurmctldPidFile={ctld_pid}\n\
                 SlurmdPidFile={slurmd_pid}\n\
                 ProctrackType=proctrack/linuxproc\n\
                 TaskPlugin=task/none\n\
                 JobAcctGatherType=jobacct_gather/none\n\
                 AccountingStorageType=accounting_storage/none\n\
                 SelectType=select/linear\n\
                 SchedulerType=sched/builtin\n\
                 MpiDefault=none\n\
                 SwitchType=switch/none\n\
                 ReturnToService=2\n\
                 NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN\n\
                 PartitionName=puma Nodes=localhost Default=YES MaxTime=INFINITE State=UP\n",
                sock = sock.display(),
                state = p("state"),
                spool = p("spool"),
                ctld_pid = p("slurmctld.pid"),
                slurmd_pid = p("slurmd.pid"),
            ),
        )
        .unwrap();
        let mut s = PrivateSlurm {
            dir,
            conf: conf.clone(),
            daemons: Vec::new(),
        };
        s.spawn(
            "munged",
            Command::new("munged")
                .args(["--foreground", "--force"])
                .arg(format!("--key-file={}", munge_key.display()))
                .arg(format!("--socket={}", sock.display()))
                .arg(format!("--pid-file={}", p("munged.pid")))
                .arg(format!("--seed-file={}", p("munged.seed")))
                .arg(format!("--log-file={}", p("munged.file.log"))),
        );
        assert!(
            wait_for(std::time::Duration::from_secs(20), || sock.exists()),
            "munged did not create its socket\n{}",
            s.logs()
        );
        s.spawn(
            "slurmctld",
            Command::new("slurmctld")
                .args(["-D", "-i", "-f"])
                .arg(&conf),
        );
        s.spawn(
            "slurmd",
            Command::new("slurmd")
                .args(["-D", "-N", "localhost", "-f"])
                .arg(&conf),
        );
        let idle = wait_for(std::time::Duration::from_secs(90), || {
            Command::new("sinfo")
                .args(["-h", "-n", "localhost", "-o", "%t"])
                .env("SLURM_CONF", &conf)
                .output()
                .map(|o| text(&o.stdout).trim() == "idle")
                .unwrap_or(false)
        });
        assert!(
            idle,
            "the private Slurm's node never became idle\n{}",
            s.logs()
        );
        s
    }

    /// Runs `salloc -N1 ARGS...` with a generous timeout.
    fn salloc(&self, key: &std::path::Path, args: &[&str]) -> std::process::Output {
        let mut child = Command::new("salloc")
            .args(["-N1", "--time=5", "-J", "puma-yod-test"])
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .env("PUMA_KEY", key)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run salloc");
        let done = wait_for(std::time::Duration::from_secs(120), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !done {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            done,
            "salloc did not finish within 120 s\nstdout: {}\nstderr: {}\n{}",
            text(&out.stdout),
            text(&out.stderr),
            self.logs()
        );
        out
    }
}

impl Drop for PrivateSlurm {
    fn drop(&mut self) {
        // A failed test may leave its allocation (and a PCT step) behind: cancel
        // it while slurmctld still runs, so slurmd ends the steps.
        let cancelled = Command::new("scancel")
            .args(["--full", "-n", "puma-yod-test"])
            .env("SLURM_CONF", &self.conf)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if cancelled {
            let _ = wait_for(std::time::Duration::from_secs(5), || {
                Command::new("squeue")
                    .args(["-h", "-n", "puma-yod-test"])
                    .env("SLURM_CONF", &self.conf)
                    .output()
                    .map(|o| o.stdout.is_empty())
                    .unwrap_or(true)
            });
        }
        // Politely first (slurmd ends its steps), then for good; newest first.
        for (_, c) in self.daemons.iter().rev() {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        for (_, c) in self.daemons.iter_mut().rev() {
            let exited = wait_for(std::time::Duration::from_secs(10), || {
                matches!(c.try_wait(), Ok(Some(_)))
            });
            if !exited {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn missing_slurm_programs() -> Vec<&'static str> {
    ["munged", "slurmctld", "slurmd", "salloc", "srun", "sinfo"]
        .into_iter()
        .filter(|p| {
            !std::env::var_os("PATH")
                .map(|path| std::env::split_paths(&path).any(|d| d.join(p).is_file()))
                .unwrap_or(false)
        })
        .collect()
}

/// The real thing: a private single-node Slurm, `salloc -N1 yod -n 2 hello`. yod
/// must take the node list from the allocation and start the PCT as an srun
/// step (its parent is slurmstepd, its environment carries SLURM_STEP_ID), and
/// stop it so politely that it removes its run directory. Runs alone
/// (`exclusive_`): it starts daemons and a PCT with the host's default run dir.
#[test]
fn exclusive_real_slurm_salloc_yod_starts_the_pct_with_srun() {
    if rustix::process::getuid().as_raw() != 0 {
        println!("SKIPPED: a private Slurm (slurmd, munged) needs root");
        return;
    }
    let missing = missing_slurm_programs();
    if !missing.is_empty() {
        println!(
            "SKIPPED: Slurm is not installed (missing {}; apt-get install slurm-wlm munge)",
            missing.join(", ")
        );
        return;
    }
    let slurm = PrivateSlurm::start();
    let key = slurm.dir.path().join("cluster.key");
    assert!(Command::new(yod())
        .args(["keygen", "--out"])
        .arg(&key)
        .status()
        .unwrap()
        .success());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let hello = hello().display().to_string();

    let out = slurm.salloc(&key, &[yod(), "-n", "2", "-v", "--pct-port", &port, &hello]);
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}\n{}", slurm.logs());
    assert!(se.contains("Granted job allocation"), "{se}");
    assert!(
        se.contains("starting PCTs: srun --nodes=1") && se.contains("--nodelist=localhost"),
        "{se}"
    );
    assert_eq!(so.lines().count(), 2, "{so}\n{se}");
    for r in 0..2 {
        assert!(
            so.contains(&format!("hello from rank {r} of 2 on node 0 (localhost)")),
            "{so}"
        );
    }

    // Who started the PCT: each rank looks at its parent (the PCT) and the PCT's parent.
    // It also registers a name with its job credential at the PCT (which listens
    // on all interfaces; the rank reaches it on loopback).
    let probe = format!(
        "pp=$(cut -d' ' -f4 /proc/$PPID/stat); \
         echo rank $PUMA_RANK pct-parent $(cat /proc/$pp/comm) \
         step-env $(tr '\\0' '\\n' < /proc/$PPID/environ | grep -c '^SLURM_STEP_ID='); \
         {y} pct name register r$PUMA_RANK --portal 4 && echo rank $PUMA_RANK named via $PUMA_PCT",
        y = yod()
    );
    let out = slurm.salloc(
        &key,
        &[yod(), "-n", "2", "--pct-port", &port, "sh", "-c", &probe],
    );
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}\n{}", slurm.logs());
    for r in 0..2 {
        assert!(
            so.contains(&format!("rank {r} pct-parent slurmstepd step-env 1")),
            "{so}\n{se}"
        );
        assert!(
            so.contains(&format!("rank {r} named via tcp:127.0.0.1:{port}")),
            "{so}\n{se}"
        );
    }
    // yod stopped the step with SIGUSR1 (forwarded by srun), so the PCT removed
    // its run directory instead of being SIGKILLed by a cancelled step.
    assert!(
        !se.contains("forcing job termination"),
        "yod's srun step was killed instead of stopped: {se}"
    );
    let uid = rustix::process::getuid().as_raw();
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let run = std::env::temp_dir().join(format!("puma-pct-{uid}-{host}"));
    assert!(
        wait_for(std::time::Duration::from_secs(5), || !run.exists()),
        "{} left behind",
        run.display()
    );
}
