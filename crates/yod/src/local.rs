//! The embedded local partition: with no configuration, yod starts the PCT(s) it
//! needs on this machine, each listening on a private Unix socket, and stops them
//! when the job ends. `--nodes K` splits the machine into K virtual nodes.

use crate::error::{Result, YodError};
use crate::launch::Target;
use pct::key::ClusterKey;
use pct::proto::{Address, Conn};
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to run a PCT: a program and leading arguments before `serve ...`.
/// `$PUMA_PCT` names a `pct` binary; otherwise yod runs its own copy of the PCT
/// (`yod pct serve ...`), so yod and its PCTs can never be of different versions.
pub fn pct_command() -> (PathBuf, Vec<String>) {
    if let Some(p) = std::env::var_os("PUMA_PCT") {
        return (PathBuf::from(p), vec![]);
    }
    match std::env::current_exe() {
        Ok(me) => (me, vec!["pct".into()]),
        Err(_) => (PathBuf::from("pct"), vec![]),
    }
}

/// K local PCTs and their private directory (key, sockets, job files).
pub struct LocalPartition {
    dir: PathBuf,
    children: Vec<Child>,
    pub targets: Vec<Target>,
    pub key: ClusterKey,
}

impl LocalPartition {
    /// Starts `k` PCTs with policy `config` and service CPUs `service_cpus` (as
    /// `pct serve --service-cpus` takes them).
    pub fn start(
        k: usize,
        config: Option<&std::path::Path>,
        service_cpus: Option<&str>,
    ) -> Result<LocalPartition> {
        let mut rnd = [0u8; 6];
        pct::key::random_bytes(&mut rnd)?;
        let tag: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("yod-{}-{tag}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| YodError::io(format!("creating {}", dir.display()), e))?;
        let key = ClusterKey::generate()?;
        let key_path = dir.join("cluster.key");
        let mut lp = LocalPartition {
            dir: dir.clone(),
            children: Vec::new(),
            targets: Vec::new(),
            key: key.clone(),
        };
        key.write(&key_path, false)?;
        let (prog, pre) = pct_command();
        for i in 0..k {
            let sock = dir.join(format!("node{i}.sock"));
            let mut cmd = Command::new(&prog);
            cmd.args(&pre).arg("serve");
            if let Some(s) = service_cpus {
                cmd.arg("--service-cpus").arg(s);
            }
            if let Some(c) = config {
                cmd.arg("--config").arg(c);
            }
            let child = cmd
                .arg("--listen")
                .arg(format!("unix:{}", sock.display()))
                .arg("--key")
                .arg(&key_path)
                .arg("--name")
                .arg(format!("local{i}"))
                .arg("--run-dir")
                .arg(dir.join(format!("run{i}")))
                .arg("--exit-with-parent")
                .arg("--parent-pid")
                .arg(std::process::id().to_string())
                .arg("--remove-on-exit")
                .arg(&dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| YodError::LocalPct(format!("{}: {e}", prog.display())))?;
            lp.children.push(child);
            lp.targets.push(Target {
                name: format!("local{i}"),
                address: Address::Unix(sock),
                coords: vec![i as u32],
            });
        }
        Ok(lp)
    }

    /// Connects to local PCT `i`, waiting for it to come up (5 s at most).
    pub fn wait_ready(&mut self, i: usize) -> Result<Conn> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let addr = self.targets[i].address.clone();
        loop {
            if let Address::Unix(p) = &addr {
                if p.exists() {
                    if let Ok(c) = Conn::connect(&addr, Duration::from_secs(1)) {
                        return Ok(c);
                    }
                }
            }
            if let Ok(Some(st)) = self.children[i].try_wait() {
                return Err(YodError::LocalPct(format!(
                    "PCT local{i} exited early ({st})"
                )));
            }
            if Instant::now() > deadline {
                return Err(YodError::LocalPct(format!(
                    "PCT local{i} did not come up within 5 s"
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops the PCTs and removes the directory.
    pub fn stop(&mut self) {
        for c in &mut self.children {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        self.children.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for LocalPartition {
    fn drop(&mut self) {
        self.stop();
    }
}
