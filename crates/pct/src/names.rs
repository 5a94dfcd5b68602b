//! The name server seen from a rank: "a job or service registers a name, others
//! look it up (node, process, portal)".
//!
//! Every PCT keeps its node's name table. When it starts a job it gives each rank
//! the PCT's address (`PUMA_PCT`) and a credential of the job (`PUMA_JOB_CRED`: a
//! fresh 32-byte secret, hex). A rank proves that credential in the control link's
//! handshake (HMAC-SHA256, as yod proves the cluster key) and may then use the name
//! server, nothing else. A name belongs to the job that registered it: another
//! job can look it up but neither overwrite nor unregister it, and it disappears
//! when its job ends. Holders of the cluster key (administrators' `pct name`) may
//! change any name.
//!
//! ```no_run
//! # fn main() -> pct::Result<()> {
//! let ns = pct::names::NameClient::from_env()?;
//! ns.register("solver", &pct::names::this_process(4)?)?;
//! if let Some(e) = ns.lookup("io-service")? {
//!     println!("io-service: node {} pid {} portal {}", e.node, e.pid, e.portal);
//! }
//! # Ok(()) }
//! ```

use crate::error::{PctError, Result};
use crate::key::{hex, random_bytes, unhex, ClusterKey};
use crate::proto::{
    connect_handshake, connect_job_handshake, read_frame, write_frame, Address, Conn, FromPct,
    NameEntry, ToPct, MAX_FRAME,
};
use std::time::{Duration, Instant};

/// Rank environment: the address of this node's PCT (`unix:/path` or `tcp:HOST:PORT`).
pub const ENV_PCT: &str = "PUMA_PCT";
/// Rank environment: the job's credential (64 hex digits).
pub const ENV_CRED: &str = "PUMA_JOB_CRED";

/// A job's credential: the job id and the secret its PCT issued.
#[derive(Clone)]
pub struct JobCredential {
    job: String,
    secret: [u8; 32],
}

impl std::fmt::Debug for JobCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JobCredential({}, <secret>)", self.job)
    }
}

impl JobCredential {
    /// A fresh random credential for `job`.
    pub fn generate(job: &str) -> Result<Self> {
        let mut secret = [0u8; 32];
        random_bytes(&mut secret)?;
        Ok(JobCredential {
            job: job.to_string(),
            secret,
        })
    }

    /// A credential from its parts (`secret_hex`: 64 hex digits).
    pub fn new(job: &str, secret_hex: &str) -> Result<Self> {
        let bytes = unhex(secret_hex.trim())
            .filter(|b| b.len() == 32)
            .ok_or_else(|| PctError::Auth(format!("{ENV_CRED} is not 64 hex digits")))?;
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&bytes);
        Ok(JobCredential {
            job: job.to_string(),
            secret,
        })
    }

    /// The credential of the job this process is a rank of (`PUMA_JOB`, `PUMA_JOB_CRED`).
    pub fn from_env() -> Result<Self> {
        let job = env_var("PUMA_JOB")?;
        JobCredential::new(&job, &env_var(ENV_CRED)?)
    }

    pub fn job(&self) -> &str {
        &self.job
    }

    pub(crate) fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// The value of `PUMA_JOB_CRED`.
    pub fn to_env(&self) -> String {
        hex(&self.secret)
    }
}

fn env_var(name: &str) -> Result<String> {
    std::env::var(name).map_err(|_| {
        PctError::Auth(format!(
            "${name} is not set: the name server is reached from a rank started by yod (or with --connect and the cluster key)"
        ))
    })
}

/// The entry for this process: node = `$PUMA_NODE` (the node-map index), pid = ours.
pub fn this_process(portal: u32) -> Result<NameEntry> {
    Ok(NameEntry {
        node: env_var("PUMA_NODE")?,
        pid: std::process::id(),
        portal,
    })
}

enum Proof {
    Job(JobCredential),
    Cluster(ClusterKey),
}

/// A client of one PCT's name server. Each call opens its own authenticated
/// connection (a rank may keep the client for the whole job; nothing idles).
pub struct NameClient {
    addr: Address,
    proof: Proof,
    /// How long to keep retrying a PCT that turns connections away because too
    /// many are in the handshake (many ranks starting at once).
    pub busy_retry: Duration,
}

impl NameClient {
    /// The client of a rank: this node's PCT, proving the job's credential.
    pub fn from_env() -> Result<Self> {
        let addr: Address = env_var(ENV_PCT)?.parse()?;
        Ok(NameClient::with_credential(
            addr,
            JobCredential::from_env()?,
        ))
    }

    /// A client proving a job credential.
    pub fn with_credential(addr: Address, cred: JobCredential) -> Self {
        NameClient {
            addr,
            proof: Proof::Job(cred),
            busy_retry: Duration::from_secs(10),
        }
    }

    /// A client proving the cluster key (may change every name).
    pub fn with_cluster_key(addr: Address, key: ClusterKey) -> Self {
        NameClient {
            addr,
            proof: Proof::Cluster(key),
            busy_retry: Duration::from_secs(10),
        }
    }

    fn connect(&self) -> Result<Conn> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(5);
        loop {
            let attempt = Conn::connect(&self.addr, Duration::from_secs(3)).and_then(|mut c| {
                c.set_read_timeout(Some(Duration::from_secs(5)))?;
                c.set_write_timeout(Some(Duration::from_secs(5)))?;
                match &self.proof {
                    Proof::Job(cred) => connect_job_handshake(&mut c, &cred.job, &cred.secret)?,
                    Proof::Cluster(key) => connect_handshake(&mut c, key)?,
                };
                Ok(c)
            });
            match attempt {
                Err(PctError::Auth(m))
                    if m.contains("before its challenge") && start.elapsed() < self.busy_retry =>
                {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    fn request(&self, msg: &ToPct) -> Result<FromPct> {
        let mut c = self.connect()?;
        write_frame(&mut c, msg)?;
        let reply = loop {
            match read_frame::<_, FromPct>(&mut c, MAX_FRAME)? {
                FromPct::Heartbeat => continue,
                other => break other,
            }
        };
        c.shutdown();
        match reply {
            FromPct::Refused { reason } => Err(PctError::Refused(reason)),
            r => Ok(r),
        }
    }

    /// Registers (or, if this job already owns it, replaces) `name`.
    pub fn register(&self, name: &str, entry: &NameEntry) -> Result<()> {
        match self.request(&ToPct::NameRegister {
            name: name.into(),
            entry: entry.clone(),
        })? {
            FromPct::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Looks `name` up; `None` if nobody registered it.
    pub fn lookup(&self, name: &str) -> Result<Option<NameEntry>> {
        match self.request(&ToPct::NameLookup { name: name.into() })? {
            FromPct::Name { entry } => Ok(entry),
            other => Err(unexpected(other)),
        }
    }

    /// Looks `name` up until it appears or `timeout` passes (a rank waiting for a
    /// service another rank or job registers).
    pub fn wait_for(&self, name: &str, timeout: Duration) -> Result<Option<NameEntry>> {
        let start = Instant::now();
        loop {
            if let Some(e) = self.lookup(name)? {
                return Ok(Some(e));
            }
            if start.elapsed() >= timeout {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes `name` (only its owner job, or a cluster-key holder, may).
    pub fn unregister(&self, name: &str) -> Result<()> {
        match self.request(&ToPct::NameUnregister { name: name.into() })? {
            FromPct::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(r: FromPct) -> PctError {
    PctError::Malformed(format!("unexpected reply {r:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_round_trips_through_its_env_form_and_rejects_garbage() {
        let c = JobCredential::generate("42").unwrap();
        let back = JobCredential::new("42", &c.to_env()).unwrap();
        assert_eq!(back.secret(), c.secret());
        assert!(!format!("{c:?}").contains(&c.to_env()));
        assert!(JobCredential::new("42", "abc").is_err());
        assert!(JobCredential::new("42", &"zz".repeat(32)).is_err());
    }
}
