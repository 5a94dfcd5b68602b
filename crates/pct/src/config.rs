//! Per-node configuration: which policies this PCT runs.
//!
//! ```toml
//! name = "n0"                 # node name reported to yod (default: host name)
//! tasking = "single"          # single | multi
//! scheduling = "round-robin"  # round-robin | priority
//! placement = "compact"       # compact | spread | none
//! variant = "performance"     # performance | profiling
//! trace_dir = "/var/tmp/puma-traces"   # profiling variant: where per-rank traces go
//! kill_grace_ms = 300         # SIGTERM → SIGKILL grace when a job is torn down
//! fabric = "qk"               # qk (the QK's node fabric, PUMA_QK_FD) | memfd (plain job segment)
//! queue_bytes = 65536         # QK inbound queue size (default: fit 64 MiB of queues per node)
//! heap_bytes_per_rank = 16777216  # QK job heap per local rank (default 16 MiB)
//! lock_memory = true          # lock and prefault the QK region (falls back if RLIMIT_MEMLOCK is low)
//! service_cpus = "0"          # CPUs for the PCT's own threads: auto | none | a list like 0,2-3
//! ```
//!
//! `service_cpus` (overridden by `$PUMA_SERVICE_CPUS`, itself overridden by `pct serve
//! --service-cpus`) keeps every thread of the PCT (control link, heartbeats, output forwarding,
//! the job and node-engine threads) on the service CPUs and places ranks on the others, the
//! application CPUs. `auto` (the default) takes the first usable CPU as the service CPU when the
//! node has two or more. When a job needs more cores than the application CPUs have (say
//! `-n 2` in heater mode on a 2-CPU node), the ranks placed last share the service CPUs.

use crate::error::{PctError, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Tasking {
    /// One job per node at a time (Puma's default for high performance).
    #[default]
    Single,
    /// Several jobs of the same user may share the node.
    Multi,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduling {
    /// Jobs on a node get equal shares.
    #[default]
    RoundRobin,
    /// A job's priority (yod --priority) sets its share.
    Priority,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PlacementKind {
    /// Ranks pinned to consecutive cores.
    #[default]
    Compact,
    /// Ranks pinned spread out over the cores (stride).
    Spread,
    /// No pinning (the kernel places ranks).
    None,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FabricKind {
    /// The QK's node fabric (`qk::NodeFabric`).
    #[default]
    Qk,
    /// A plain memfd segment holding the node map (no QK).
    Memfd,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum VariantKind {
    #[default]
    Performance,
    /// Records a per-rank trace of every job.
    Profiling,
}

/// A PCT's configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PctConfig {
    pub name: Option<String>,
    #[serde(default)]
    pub tasking: Tasking,
    #[serde(default)]
    pub scheduling: Scheduling,
    #[serde(default)]
    pub placement: PlacementKind,
    #[serde(default)]
    pub variant: VariantKind,
    pub trace_dir: Option<PathBuf>,
    pub kill_grace_ms: Option<u64>,
    #[serde(default)]
    pub fabric: FabricKind,
    pub queue_bytes: Option<u64>,
    pub heap_bytes_per_rank: Option<u64>,
    pub lock_memory: Option<bool>,
    /// Service CPUs: `auto`, `none` or a CPU list (see the module docs).
    pub service_cpus: Option<String>,
}

impl PctConfig {
    /// The job resources this configuration asks for.
    pub fn job_resources(&self) -> Box<dyn crate::resources::JobResources> {
        use crate::resources::{MemfdSegment, QkFabric};
        match self.fabric {
            FabricKind::Memfd => Box::new(MemfdSegment),
            FabricKind::Qk => Box::new(QkFabric {
                queue_bytes: self.queue_bytes,
                heap_bytes_per_rank: self.heap_bytes_per_rank.unwrap_or(QkFabric::DEFAULT_HEAP),
                lock_memory: self.lock_memory.unwrap_or(true),
            }),
        }
    }

    /// The service CPUs this configuration asks for (`auto` when unset).
    pub fn service_cpus(&self) -> std::result::Result<crate::policy::ServiceCpus, String> {
        self.service_cpus
            .as_deref()
            .map_or(Ok(crate::policy::ServiceCpus::Auto), str::parse)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let err = |reason: String| PctError::Config {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: PctConfig = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        cfg.service_cpus()
            .map_err(|e| err(format!("service_cpus: {e}")))?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_unknown_keys() {
        let c: PctConfig = toml::from_str(
            "tasking = \"multi\"\nscheduling = \"priority\"\nvariant = \"profiling\"",
        )
        .unwrap();
        assert_eq!(c.tasking, Tasking::Multi);
        assert_eq!(c.scheduling, Scheduling::Priority);
        assert_eq!(c.variant, VariantKind::Profiling);
        assert!(toml::from_str::<PctConfig>("taskng = \"multi\"").is_err());
        assert!(toml::from_str::<PctConfig>("tasking = \"several\"").is_err());
    }
}
