//! The control link between yod and a PCT.
//!
//! Transport: a Unix stream socket (`unix:/path`) or TCP (`tcp:HOST:PORT`).
//! Framing: a 4-byte big-endian length, then that many bytes of JSON. Frames larger
//! than [`MAX_FRAME`] (or [`MAX_HELLO_FRAME`] before authentication) are refused
//! and end the connection.
//!
//! Authentication (both directions, HMAC-SHA256 over the cluster key):
//! 1. PCT → yod: `Challenge { version, nonce_p }` (32 random bytes, hex)
//! 2. yod → PCT: `Proof { nonce_y, mac = HMAC(key, "puma-yod" ‖ nonce_p ‖ nonce_y) }`
//! 3. PCT checks the MAC in constant time; on failure it logs and hangs up without
//!    reading anything else. On success: `Welcome { mac = HMAC(key, "puma-pct" ‖
//!    nonce_y ‖ nonce_p), status }`, which yod checks before sending any request.

use crate::error::{PctError, Result};
use crate::key::{hex, random_bytes, unhex, ClusterKey};
use hmac::{Hmac, Mac};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::Sha256;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// Protocol version carried in the challenge.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest frame accepted after authentication (16 MiB).
pub const MAX_FRAME: usize = 16 << 20;
/// Largest frame accepted before the peer proved the key.
pub const MAX_HELLO_FRAME: usize = 1024;
/// How often each side sends a heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);
/// Silence after which the other side is declared dead.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(1500);

/// Where a PCT listens / where yod connects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Address {
    Unix(PathBuf),
    Tcp(String),
}

impl std::str::FromStr for Address {
    type Err = PctError;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(PctError::Address(s.into()));
            }
            Ok(Address::Unix(PathBuf::from(p)))
        } else {
            let hp = s.strip_prefix("tcp:").unwrap_or(s);
            match hp.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                    Ok(Address::Tcp(hp.to_string()))
                }
                _ => Err(PctError::Address(s.into())),
            }
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A connected control link (either transport).
#[derive(Debug)]
pub enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    /// Connects with a timeout.
    pub fn connect(addr: &Address, timeout: Duration) -> Result<Conn> {
        match addr {
            Address::Unix(p) => {
                let s = UnixStream::connect(p)
                    .map_err(|e| PctError::io(format!("connecting to {addr}"), e))?;
                Ok(Conn::Unix(s))
            }
            Address::Tcp(hp) => {
                let mut last = None;
                let addrs = hp
                    .to_socket_addrs()
                    .map_err(|e| PctError::io(format!("resolving {hp}"), e))?;
                for a in addrs {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            return Ok(Conn::Tcp(s));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(PctError::io(
                    format!("connecting to {addr}"),
                    last.unwrap_or_else(|| io::Error::other("no address")),
                ))
            }
        }
    }

    pub fn try_clone(&self) -> Result<Conn> {
        match self {
            Conn::Unix(s) => s.try_clone().map(Conn::Unix),
            Conn::Tcp(s) => s.try_clone().map(Conn::Tcp),
        }
        .map_err(|e| PctError::io("cloning a socket", e))
    }

    pub fn set_read_timeout(&self, d: Option<Duration>) -> Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(d),
            Conn::Tcp(s) => s.set_read_timeout(d),
        }
        .map_err(|e| PctError::io("setting a socket timeout", e))
    }

    pub fn set_write_timeout(&self, d: Option<Duration>) -> Result<()> {
        match self {
            Conn::Unix(s) => s.set_write_timeout(d),
            Conn::Tcp(s) => s.set_write_timeout(d),
        }
        .map_err(|e| PctError::io("setting a socket timeout", e))
    }

    /// Shuts both directions down (wakes a reader blocked on the other clone).
    pub fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// A printable description of the peer, for logs.
    /// Our own IP on this link (127.0.0.1 for a Unix socket): where peer nodes
    /// can reach this node's fabric.
    pub fn local_ip(&self) -> std::net::IpAddr {
        match self {
            Conn::Tcp(s) => s
                .local_addr()
                .map(|a| a.ip())
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
            Conn::Unix(_) => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        }
    }

    pub fn peer(&self) -> String {
        match self {
            Conn::Unix(_) => "local peer (unix socket)".into(),
            Conn::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "unknown tcp peer".into()),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

/// Writes one frame (length prefix + JSON).
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<()> {
    let body = serde_json::to_vec(msg).map_err(|e| PctError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(PctError::FrameTooLarge {
            size: body.len(),
            limit: MAX_FRAME,
        });
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).map_err(map_io("sending a frame"))?;
    Ok(())
}

fn map_io(ctx: &'static str) -> impl Fn(io::Error) -> PctError {
    move |e| match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => PctError::Closed,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => PctError::Timeout(0),
        _ => PctError::io(ctx, e),
    }
}

/// Reads one frame of at most `limit` bytes and decodes it.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R, limit: usize) -> Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(map_io("reading a frame"))?;
    let n = u32::from_be_bytes(len) as usize;
    if n > limit {
        return Err(PctError::FrameTooLarge { size: n, limit });
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).map_err(map_io("reading a frame"))?;
    serde_json::from_slice(&body).map_err(|e| PctError::Malformed(e.to_string()))
}

/// The CPU mode chosen at load time (seed 000); the QK defines it.
pub use qk::CpuMode;

/// What a node says about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    pub name: String,
    /// CPUs this PCT may place ranks on.
    pub cpus: u32,
    /// Jobs currently running.
    pub jobs: u32,
    /// Owner (uid) of the running jobs, if any.
    pub user: Option<u32>,
    /// `single` or `multi`.
    pub tasking: String,
    /// `performance` or `profiling`.
    pub variant: String,
}

/// A load request: everything a PCT needs to start its share of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadRequest {
    pub job: String,
    pub uid: u32,
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub size: u32,
    /// This node's index in the node map.
    pub node: u32,
    /// Global ranks placed on this node, in local-rank order.
    pub ranks: Vec<u32>,
    pub mode: CpuMode,
    /// The node map, JSON text (see yod's README).
    pub node_map: String,
    /// The rank (if on this node) whose stdin yod forwards.
    pub stdin_rank: Option<u32>,
    /// Scheduling priority between jobs (higher runs first under `priority`).
    pub priority: i32,
}

/// Largest job one request may describe.
pub const MAX_RANKS: u32 = 1 << 16;

impl LoadRequest {
    /// Checks every field a hostile or buggy peer could get wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(PctError::BadRequest(m));
        let clean = |s: &str| !s.contains('\0');
        if self.job.is_empty()
            || self.job.len() > 64
            || !self
                .job
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(format!(
                "job id {:?} must be 1-64 of [A-Za-z0-9_-]",
                self.job
            ));
        }
        if self.program.is_empty() || !clean(&self.program) {
            return bad("program must be a non-empty path without NUL".into());
        }
        if !self.args.iter().all(|a| clean(a)) || !clean(&self.cwd) {
            return bad("arguments and cwd must not contain NUL".into());
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || !clean(k) || !clean(v) {
                return bad(format!("bad environment variable name {k:?}"));
            }
        }
        if self.size == 0 || self.size > MAX_RANKS {
            return bad(format!("size {} out of 1..={MAX_RANKS}", self.size));
        }
        if self.ranks.is_empty() {
            return bad("no ranks for this node".into());
        }
        let mut seen = std::collections::HashSet::new();
        for &r in &self.ranks {
            if r >= self.size || !seen.insert(r) {
                return bad(format!("rank {r} out of range or repeated"));
            }
        }
        if let Some(r) = self.stdin_rank {
            if !self.ranks.contains(&r) {
                return bad(format!("stdin rank {r} is not on this node"));
            }
        }
        if serde_json::from_str::<serde_json::Value>(&self.node_map).is_err() {
            return bad("node map is not JSON".into());
        }
        if !(-20..=20).contains(&self.priority) {
            return bad("priority must be in -20..=20".into());
        }
        Ok(())
    }
}

/// An entry of the name server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NameEntry {
    pub node: String,
    pub pid: u32,
    pub portal: u32,
}

/// Messages yod (or a tool) sends to a PCT after authentication.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ToPct {
    Status,
    /// For a job on several nodes: every node's fabric address (node id, `IP:PORT`),
    /// sent once all nodes reported `FabricReady`.
    Peers {
        peers: Vec<(u32, String)>,
    },
    Load(Box<LoadRequest>),
    Stdin {
        data: Vec<u8>,
    },
    StdinEof,
    /// Signal every rank of the job on this node (then SIGKILL after a grace).
    Kill {
        signal: i32,
    },
    Heartbeat,
    NameRegister {
        name: String,
        entry: NameEntry,
    },
    NameLookup {
        name: String,
    },
    NameUnregister {
        name: String,
    },
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How a rank ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RankStatus {
    Exited(i32),
    Signaled(i32),
}

impl RankStatus {
    pub fn success(self) -> bool {
        self == RankStatus::Exited(0)
    }
    /// Shell-style status: the code, or 128 + signal.
    pub fn code(self) -> i32 {
        match self {
            RankStatus::Exited(c) => c,
            RankStatus::Signaled(s) => 128 + s,
        }
    }
}

/// Messages a PCT sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum FromPct {
    Status(NodeStatus),
    Started {
        pids: Vec<(u32, u32)>,
    },
    /// A job on several nodes: the node's fabric is built and listens at `addr`
    /// (None: no inter-node engine); the PCT waits for `Peers` before spawning.
    FabricReady {
        addr: Option<String>,
    },
    /// Complete lines (or the final fragment at end of stream).
    Output {
        rank: u32,
        stream: Stream,
        text: Option<String>,
        bytes: Option<Vec<u8>>,
    },
    Exited {
        rank: u32,
        pid: u32,
        status: RankStatus,
    },
    JobDone,
    Refused {
        reason: String,
    },
    Heartbeat,
    Name {
        entry: Option<NameEntry>,
    },
    Ok,
}

#[derive(Serialize, Deserialize)]
struct Challenge {
    version: u32,
    nonce: String,
}

#[derive(Serialize, Deserialize)]
struct Proof {
    nonce: String,
    mac: String,
    /// Set by a rank proving its job's credential instead of the cluster key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    job: Option<String>,
}

/// Who proved what in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Proved the cluster key (yod, an administrator's `pct` command).
    Cluster,
    /// Proved the credential of a running job: may only use the name server.
    Job {
        /// The PCT's serial number of the credential (names are owned by it).
        serial: u64,
        job: String,
    },
}

#[derive(Serialize, Deserialize)]
struct Welcome {
    mac: String,
    status: NodeStatus,
}

const NONCE_LEN: usize = 32;

fn mac(key: &[u8], label: &[u8], a: &[u8], b: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; this cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC-SHA256 takes any key length"));
    m.update(label);
    m.update(a);
    m.update(b);
    m
}

fn nonce_from_hex(s: &str) -> Result<Vec<u8>> {
    match unhex(s) {
        Some(v) if v.len() == NONCE_LEN => Ok(v),
        _ => Err(PctError::Auth("nonce is not 32 hex-encoded bytes".into())),
    }
}

/// Server side of the handshake (the PCT). Returns only if the peer proved the key.
pub fn accept_handshake(conn: &mut Conn, key: &ClusterKey, status: &NodeStatus) -> Result<()> {
    match accept_handshake_as(conn, key, status, &|_| Vec::new())? {
        Peer::Cluster => Ok(()),
        Peer::Job { .. } => Err(PctError::Auth(
            "job credentials are not accepted here".into(),
        )),
    }
}

/// Looks up the (serial, secret) credentials of the running jobs with an id.
pub type JobSecrets<'a> = dyn Fn(&str) -> Vec<(u64, [u8; 32])> + 'a;

/// Server side of the handshake, also accepting job credentials: `job_secrets(job)`
/// lists the (serial, secret) pairs of the running jobs with that id. Returns who
/// the peer proved to be; returns only after a valid proof.
pub fn accept_handshake_as(
    conn: &mut Conn,
    key: &ClusterKey,
    status: &NodeStatus,
    job_secrets: &JobSecrets,
) -> Result<Peer> {
    let mut np = [0u8; NONCE_LEN];
    random_bytes(&mut np)?;
    write_frame(
        conn,
        &Challenge {
            version: PROTOCOL_VERSION,
            nonce: hex(&np),
        },
    )?;
    let proof: Proof = read_frame(conn, MAX_HELLO_FRAME)?;
    let ny = nonce_from_hex(&proof.nonce)?;
    let theirs = unhex(&proof.mac).ok_or_else(|| PctError::Auth("MAC is not hex".into()))?;
    let (peer, secret): (Peer, Vec<u8>) = match proof.job {
        None => {
            mac(key.bytes(), b"puma-yod", &np, &ny)
                .verify_slice(&theirs)
                .map_err(|_| PctError::Auth("peer did not prove the cluster key".into()))?;
            (Peer::Cluster, key.bytes().to_vec())
        }
        Some(job) => {
            let found = job_secrets(&job)
                .into_iter()
                .find(|(_, s)| mac(s, b"puma-job", &np, &ny).verify_slice(&theirs).is_ok());
            match found {
                Some((serial, s)) => (Peer::Job { serial, job }, s.to_vec()),
                None => {
                    return Err(PctError::Auth(format!(
                        "peer did not prove the credential of a running job {:?}",
                        job.chars().take(64).collect::<String>()
                    )))
                }
            }
        }
    };
    let ours = mac(&secret, b"puma-pct", &ny, &np).finalize().into_bytes();
    write_frame(
        conn,
        &Welcome {
            mac: hex(&ours),
            status: status.clone(),
        },
    )?;
    Ok(peer)
}

/// Client side of the handshake (yod). Returns the node's status once the PCT proved the key.
pub fn connect_handshake(conn: &mut Conn, key: &ClusterKey) -> Result<NodeStatus> {
    client_handshake(conn, key.bytes(), None)
}

/// Client side of the handshake for a rank: proves the credential of job `job`
/// (the secret the PCT put in the rank's environment) instead of the cluster key.
pub fn connect_job_handshake(conn: &mut Conn, job: &str, secret: &[u8]) -> Result<NodeStatus> {
    client_handshake(conn, secret, Some(job))
}

fn client_handshake(conn: &mut Conn, secret: &[u8], job: Option<&str>) -> Result<NodeStatus> {
    let what = if job.is_some() {
        "the job credential"
    } else {
        "our cluster key"
    };
    let ch: Challenge = match read_frame(conn, MAX_HELLO_FRAME) {
        Ok(c) => c,
        Err(PctError::Closed) => {
            return Err(PctError::Auth(
                "the PCT hung up before its challenge (busy, or not a PCT)".into(),
            ))
        }
        Err(e) => return Err(e),
    };
    if ch.version != PROTOCOL_VERSION {
        return Err(PctError::Auth(format!(
            "PCT speaks protocol version {}, this yod speaks {PROTOCOL_VERSION}",
            ch.version
        )));
    }
    let np = nonce_from_hex(&ch.nonce)?;
    let mut ny = [0u8; NONCE_LEN];
    random_bytes(&mut ny)?;
    let label: &[u8] = if job.is_some() {
        b"puma-job"
    } else {
        b"puma-yod"
    };
    let m = mac(secret, label, &np, &ny).finalize().into_bytes();
    write_frame(
        conn,
        &Proof {
            nonce: hex(&ny),
            mac: hex(&m),
            job: job.map(str::to_string),
        },
    )?;
    let w: Welcome = match read_frame(conn, MAX_FRAME) {
        Ok(w) => w,
        Err(PctError::Closed) => {
            return Err(PctError::Auth(format!(
                "the PCT hung up: it does not accept {what}"
            )))
        }
        Err(e) => return Err(e),
    };
    let theirs = unhex(&w.mac).ok_or_else(|| PctError::Auth("MAC is not hex".into()))?;
    mac(secret, b"puma-pct", &ny, &np)
        .verify_slice(&theirs)
        .map_err(|_| PctError::Auth(format!("the PCT did not prove {what}")))?;
    Ok(w.status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "unix:/tmp/x".parse::<Address>().unwrap(),
            Address::Unix("/tmp/x".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:7070".parse::<Address>().unwrap(),
            Address::Tcp("127.0.0.1:7070".into())
        );
        assert!("tcp:nohost".parse::<Address>().is_err());
        assert!("unix:".parse::<Address>().is_err());
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors_not_panics() {
        let mut big: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        assert!(matches!(
            read_frame::<_, ToPct>(&mut big, MAX_FRAME),
            Err(PctError::FrameTooLarge { .. })
        ));
        let mut junk: &[u8] = &[0, 0, 0, 3, b'x', b'y', b'z'];
        assert!(matches!(
            read_frame::<_, ToPct>(&mut junk, MAX_FRAME),
            Err(PctError::Malformed(_))
        ));
        let mut short: &[u8] = &[0, 0, 0, 9, b'{'];
        assert!(matches!(
            read_frame::<_, ToPct>(&mut short, MAX_FRAME),
            Err(PctError::Closed)
        ));
    }

    #[test]
    fn handshake_accepts_same_key_and_refuses_other() {
        for same in [true, false] {
            let (a, b) = UnixStream::pair().unwrap();
            let k1 = ClusterKey::generate().unwrap();
            let k2 = if same {
                k1.clone()
            } else {
                ClusterKey::generate().unwrap()
            };
            let st = NodeStatus {
                name: "n0".into(),
                cpus: 2,
                jobs: 0,
                user: None,
                tasking: "single".into(),
                variant: "performance".into(),
            };
            let server = std::thread::spawn(move || {
                let mut c = Conn::Unix(a);
                let r = accept_handshake(&mut c, &k1, &st);
                drop(c);
                r
            });
            let mut c = Conn::Unix(b);
            let client = connect_handshake(&mut c, &k2);
            let server = server.join().unwrap();
            assert_eq!(client.is_ok(), same);
            assert_eq!(server.is_ok(), same);
        }
    }

    #[test]
    fn load_request_validation() {
        let mut r = LoadRequest {
            job: "j1".into(),
            uid: 0,
            program: "/bin/true".into(),
            args: vec![],
            env: vec![("A".into(), "b".into())],
            cwd: "/".into(),
            size: 2,
            node: 0,
            ranks: vec![0, 1],
            mode: CpuMode::Heater,
            node_map: "{}".into(),
            stdin_rank: Some(0),
            priority: 0,
        };
        assert!(r.validate().is_ok());
        r.ranks = vec![0, 2];
        assert!(r.validate().is_err());
        r.ranks = vec![1, 1];
        assert!(r.validate().is_err());
        r.ranks = vec![1];
        assert!(r.validate().is_err(), "stdin rank 0 not here");
        r.stdin_rank = None;
        r.job = "../etc".into();
        assert!(r.validate().is_err());
    }
}
