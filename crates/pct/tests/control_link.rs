//! The real `pct` binary on a loopback TCP port: hostile peers are refused and
//! nothing is spawned for them; a peer with the key runs a job.

use pct::key::ClusterKey;
use pct::proto::{
    connect_handshake, read_frame, write_frame, Address, Conn, CpuMode, FromPct, LoadRequest,
    RankStatus, ToPct, MAX_FRAME,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Daemon {
    child: Child,
    addr: Address,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, key: &Path) -> Daemon {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pct"))
        .args(["serve", "--listen", "tcp:127.0.0.1:0", "--name", "t0"])
        .arg("--key")
        .arg(key)
        .arg("--run-dir")
        .arg(dir.join("run"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().parse().unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    Daemon {
        child,
        addr,
        stderr: rx,
    }
}

fn load(program: &str, args: &[&str]) -> LoadRequest {
    LoadRequest {
        job: "jtest".into(),
        uid: 0,
        program: program.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: "/".into(),
        size: 1,
        node: 0,
        ranks: vec![0],
        mode: CpuMode::Heater,
        node_map: "{}".into(),
        stdin_rank: None,
        priority: 0,
    }
}

fn frame(msg: &ToPct) -> Vec<u8> {
    let mut v = Vec::new();
    write_frame(&mut v, msg).unwrap();
    v
}

fn setup() -> (tempfile::TempDir, std::path::PathBuf, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    ClusterKey::generate().unwrap().write(&key, false).unwrap();
    let d = start(dir.path(), &key);
    (dir, key, d)
}

fn expect_rejected(d: &Daemon) {
    let line = d
        .stderr
        .recv_timeout(Duration::from_secs(5))
        .expect("the PCT logs the rejection");
    assert!(line.contains("rejected"), "{line}");
}

#[test]
fn wrong_key_is_refused_and_nothing_spawned() {
    let (dir, _key, mut d) = setup();
    let witness = dir.path().join("spawned");
    let other = ClusterKey::generate().unwrap();
    let mut c = Conn::connect(&d.addr, Duration::from_secs(2)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let e = connect_handshake(&mut c, &other).unwrap_err();
    assert!(e.to_string().contains("cluster key"), "{e}");
    // Push a load request anyway.
    let _ = c.write_all(&frame(&ToPct::Load(Box::new(load(
        "/bin/sh",
        &["-c", &format!("touch {}", witness.display())],
    )))));
    expect_rejected(&d);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !witness.exists(),
        "a rank was spawned for a peer without the key"
    );
    assert!(d.child.try_wait().unwrap().is_none(), "the PCT died");
}

#[test]
fn no_key_load_request_is_refused() {
    let (dir, _key, mut d) = setup();
    let witness = dir.path().join("spawned");
    let mut c = Conn::connect(&d.addr, Duration::from_secs(2)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _challenge: serde_json::Value = read_frame(&mut c, MAX_FRAME).unwrap();
    c.write_all(&frame(&ToPct::Load(Box::new(load(
        "/bin/sh",
        &["-c", &format!("touch {}", witness.display())],
    )))))
    .unwrap();
    expect_rejected(&d);
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the PCT answered a peer without the key");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!witness.exists());
    assert!(d.child.try_wait().unwrap().is_none(), "the PCT died");
}

#[test]
fn random_bytes_are_rejected_without_a_crash_then_a_keyed_peer_runs_a_job() {
    let (_dir, key, mut d) = setup();
    // Garbage of several shapes: random bytes, a huge length, a short frame, nothing.
    let mut junk = vec![0u8; 4096];
    pct::key::random_bytes(&mut junk).unwrap();
    let attempts: Vec<Vec<u8>> = vec![
        junk,
        vec![0xff, 0xff, 0xff, 0xf0, 1, 2, 3],
        vec![0, 0, 0, 5, b'{', b'}', b'x', b'y', b'z'],
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
    ];
    for a in &attempts {
        let mut c = Conn::connect(&d.addr, Duration::from_secs(2)).unwrap();
        let _ = c.write_all(a);
        expect_rejected(&d);
    }
    assert!(d.child.try_wait().unwrap().is_none(), "the PCT died");

    // Positive control: with the key, a job runs and reports.
    let key = ClusterKey::load(&key).unwrap();
    let mut c = Conn::connect(&d.addr, Duration::from_secs(2)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let st = connect_handshake(&mut c, &key).unwrap();
    assert_eq!(st.name, "t0");
    write_frame(
        &mut c,
        &ToPct::Load(Box::new(load(
            "/bin/sh",
            &["-c", "echo hi from $PUMA_RANK; exit 3"],
        ))),
    )
    .unwrap();
    let (mut out, mut status, mut done) = (String::new(), None, false);
    while !done {
        match read_frame::<_, FromPct>(&mut c, MAX_FRAME).unwrap() {
            FromPct::Output { text: Some(t), .. } => out.push_str(&t),
            FromPct::Exited { status: s, .. } => status = Some(s),
            FromPct::JobDone => done = true,
            FromPct::Refused { reason } => panic!("refused: {reason}"),
            _ => {}
        }
    }
    assert_eq!(out, "hi from 0\n");
    assert_eq!(status, Some(RankStatus::Exited(3)));
}

#[test]
fn invalid_load_request_is_refused_by_an_authenticated_peer() {
    let (_dir, key, _d) = setup();
    let key = ClusterKey::load(&key).unwrap();
    let mut c = Conn::connect(&_d.addr, Duration::from_secs(2)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    connect_handshake(&mut c, &key).unwrap();
    let mut bad = load("/bin/true", &[]);
    bad.ranks = vec![0, 0];
    write_frame(&mut c, &ToPct::Load(Box::new(bad))).unwrap();
    loop {
        match read_frame::<_, FromPct>(&mut c, MAX_FRAME).unwrap() {
            FromPct::Refused { reason } => {
                assert!(reason.contains("repeated"), "{reason}");
                break;
            }
            FromPct::Heartbeat => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn name_server_register_and_lookup_through_the_cli() {
    let (_dir, key, d) = setup();
    let pct = env!("CARGO_BIN_EXE_pct");
    let a = d.addr.to_string();
    let k = key.display().to_string();
    let reg = Command::new(pct)
        .args([
            "name",
            "--connect",
            &a,
            "--key",
            &k,
            "register",
            "fs-server",
            "--node",
            "io0",
            "--pid",
            "42",
            "--portal",
            "7",
        ])
        .output()
        .unwrap();
    assert!(
        reg.status.success(),
        "{}",
        String::from_utf8_lossy(&reg.stderr)
    );
    let look = Command::new(pct)
        .args(["name", "--connect", &a, "--key", &k, "lookup", "fs-server"])
        .output()
        .unwrap();
    assert!(look.status.success());
    assert_eq!(
        String::from_utf8_lossy(&look.stdout).trim(),
        r#"{"node":"io0","pid":42,"portal":7}"#
    );
    let miss = Command::new(pct)
        .args(["name", "--connect", &a, "--key", &k, "lookup", "nobody"])
        .output()
        .unwrap();
    assert_eq!(miss.status.code(), Some(1));
}

#[test]
fn keygen_writes_a_private_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k");
    let out = Command::new(env!("CARGO_BIN_EXE_pct"))
        .args(["keygen", "--out"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(ClusterKey::load(&p).is_ok());
}

#[test]
fn single_tasking_node_refuses_a_second_job() {
    let (_dir, key, d) = setup();
    let key = ClusterKey::load(&key).unwrap();
    let open = || {
        let mut c = Conn::connect(&d.addr, Duration::from_secs(2)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        connect_handshake(&mut c, &key).unwrap();
        c
    };
    let mut first = open();
    write_frame(
        &mut first,
        &ToPct::Load(Box::new(load("/bin/sh", &["-c", "sleep 5"]))),
    )
    .unwrap();
    loop {
        match read_frame::<_, FromPct>(&mut first, MAX_FRAME).unwrap() {
            FromPct::Started { .. } => break,
            FromPct::Heartbeat => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut second = open();
    let mut req = load("/bin/true", &[]);
    req.job = "jsecond".into();
    write_frame(&mut second, &ToPct::Load(Box::new(req))).unwrap();
    loop {
        match read_frame::<_, FromPct>(&mut second, MAX_FRAME).unwrap() {
            FromPct::Refused { reason } => {
                assert!(reason.contains("single-tasking"), "{reason}");
                break;
            }
            FromPct::Heartbeat => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // Closing the first link ends its job.
    first.shutdown();
}

/// Runs a one-rank job through a keyed control link; returns its output and status.
fn run_job(d: &Daemon, key: &Path, req: LoadRequest) -> (String, Option<RankStatus>) {
    let key = ClusterKey::load(key).unwrap();
    let mut c = Conn::connect(&d.addr, Duration::from_secs(2)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    connect_handshake(&mut c, &key).unwrap();
    write_frame(&mut c, &ToPct::Load(Box::new(req))).unwrap();
    let (mut out, mut status) = (String::new(), None);
    loop {
        match read_frame::<_, FromPct>(&mut c, MAX_FRAME).unwrap() {
            FromPct::Output { text: Some(t), .. } => out.push_str(&t),
            FromPct::Exited { status: s, .. } => status = Some(s),
            FromPct::JobDone => return (out, status),
            FromPct::Refused { reason } => panic!("refused: {reason}"),
            _ => {}
        }
    }
}

#[test]
fn a_rank_reaches_the_name_server_with_its_job_credential_only() {
    let (_dir, key, mut d) = setup();
    let pct = env!("CARGO_BIN_EXE_pct");
    let zeros = "0".repeat(64);
    // Registers and looks up with the job's credential; a forged credential is refused.
    let script = format!(
        "echo pct=$PUMA_PCT; {pct} name register svc --portal 5 || exit 10; \
         {pct} name lookup svc || exit 11; \
         PUMA_JOB_CRED={zeros} {pct} name register forged --portal 1 && exit 12; \
         exit 0"
    );
    let (out, status) = run_job(&d, &key, load("/bin/sh", &["-c", &script]));
    assert_eq!(status, Some(RankStatus::Exited(0)), "{out}");
    assert!(out.contains(&format!("pct={}", d.addr)), "{out}");
    assert!(
        out.contains(r#""node":"0""#) && out.contains(r#""portal":5"#),
        "{out}"
    );
    let mut log = Vec::new();
    while let Ok(l) = d.stderr.recv_timeout(Duration::from_millis(500)) {
        log.push(l);
    }
    assert!(
        log.iter()
            .any(|l| l.contains("rejected") && l.contains("credential of a running job")),
        "{log:?}"
    );
    // The job is over: its credential and its names are gone.
    let k = key.display().to_string();
    let look = Command::new(pct)
        .args([
            "name",
            "--connect",
            &d.addr.to_string(),
            "--key",
            &k,
            "lookup",
            "svc",
        ])
        .output()
        .unwrap();
    assert_eq!(look.status.code(), Some(1), "{look:?}");
    assert!(d.child.try_wait().unwrap().is_none(), "the PCT died");
}

#[test]
fn the_name_client_library_proves_a_credential_and_names_stay_with_their_owner() {
    use pct::names::{JobCredential, NameClient};
    use pct::proto::NameEntry;
    let (_dir, key, _d) = setup();
    let admin = NameClient::with_cluster_key(_d.addr.clone(), ClusterKey::load(&key).unwrap());
    let e = NameEntry {
        node: "io0".into(),
        pid: 9,
        portal: 3,
    };
    admin.register("fs", &e).unwrap();
    assert_eq!(admin.lookup("fs").unwrap(), Some(e.clone()));
    // No job runs, so no job credential is valid.
    let stranger =
        NameClient::with_credential(_d.addr.clone(), JobCredential::generate("jtest").unwrap());
    let err = stranger.lookup("fs").unwrap_err().to_string();
    assert!(err.contains("does not accept the job credential"), "{err}");
    admin.unregister("fs").unwrap();
    assert_eq!(admin.lookup("fs").unwrap(), None);
}

#[test]
fn a_job_credential_reaches_the_name_server_and_nothing_else() {
    use pct::proto::connect_job_handshake;
    let (dir, key, d) = setup();
    let witness = dir.path().join("spawned");
    // A rank that shows its credential (as a compromised rank could) and waits.
    let key_c = ClusterKey::load(&key).unwrap();
    let mut yodc = Conn::connect(&d.addr, Duration::from_secs(2)).unwrap();
    yodc.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    connect_handshake(&mut yodc, &key_c).unwrap();
    write_frame(
        &mut yodc,
        &ToPct::Load(Box::new(load(
            "/bin/sh",
            &["-c", "echo cred=$PUMA_JOB_CRED; sleep 20"],
        ))),
    )
    .unwrap();
    let cred = loop {
        match read_frame::<_, FromPct>(&mut yodc, MAX_FRAME).unwrap() {
            FromPct::Output { text: Some(t), .. } => {
                break t.trim().strip_prefix("cred=").unwrap().to_string()
            }
            FromPct::Refused { reason } => panic!("refused: {reason}"),
            _ => {}
        }
    };
    let secret: Vec<u8> = (0..cred.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&cred[i..i + 2], 16).unwrap())
        .collect();
    assert_eq!(secret.len(), 32, "{cred}");
    let mut c = Conn::connect(&d.addr, Duration::from_secs(2)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    connect_job_handshake(&mut c, "jtest", &secret).unwrap();
    let reply = |c: &mut Conn, msg: &ToPct| -> FromPct {
        write_frame(c, msg).unwrap();
        loop {
            match read_frame::<_, FromPct>(c, MAX_FRAME).unwrap() {
                FromPct::Heartbeat => continue,
                r => return r,
            }
        }
    };
    let mut other = load("/bin/sh", &["-c", &format!("touch {}", witness.display())]);
    other.job = "jother".into();
    for msg in [
        ToPct::Load(Box::new(other)),
        ToPct::Kill { signal: 9 },
        ToPct::Stdin {
            data: b"x\n".to_vec(),
        },
    ] {
        match reply(&mut c, &msg) {
            FromPct::Refused { reason } => {
                assert!(reason.contains("only reaches the name server"), "{reason}")
            }
            r => panic!("{msg:?} was not refused: {r:?}"),
        }
    }
    // The name server does answer it.
    assert!(matches!(
        reply(&mut c, &ToPct::NameLookup { name: "x".into() }),
        FromPct::Name { entry: None }
    ));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!witness.exists(), "a job credential started a job");
    // The job is still running (the Kill above was refused): end it as yod would.
    write_frame(&mut yodc, &ToPct::Kill { signal: 9 }).unwrap();
    loop {
        match read_frame::<_, FromPct>(&mut yodc, MAX_FRAME).unwrap() {
            FromPct::Exited { status, .. } => {
                assert_eq!(status, RankStatus::Signaled(9));
            }
            FromPct::JobDone => break,
            _ => {}
        }
    }
    // With the job gone, so is its credential.
    let mut c = Conn::connect(&d.addr, Duration::from_secs(2)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(connect_job_handshake(&mut c, "jtest", &secret).is_err());
}

#[test]
fn a_pct_whose_starter_is_already_gone_refuses_to_serve() {
    // The starter died before the PCT armed its parent-death signal: the PCT must notice
    // instead of serving forever as an orphan.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    ClusterKey::generate().unwrap().write(&key, false).unwrap();
    let mut gone = Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pct"))
        .args(["serve", "--listen", "tcp:127.0.0.1:0", "--name", "orphan"])
        .arg("--key")
        .arg(&key)
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .args(["--exit-with-parent", "--parent-pid", &gone_pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the PCT kept serving although its starter {gone_pid} is gone");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("already gone"), "stderr: {err}");
}
