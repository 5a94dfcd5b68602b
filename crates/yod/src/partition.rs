//! Partition files: the machine's nodes, their control addresses, roles and
//! coordinates.
//!
//! ```toml
//! name = "lab"
//! key = "/etc/puma/cluster.key"      # optional; default $PUMA_KEY or ~/.config/puma/cluster.key
//!
//! [topology]
//! kind = "mesh"                      # mesh | torus (dims = [...]) | tree (arity = N)
//! dims = [2, 2]
//!
//! [[node]]
//! name = "svc0"
//! role = "service"                   # service | io | compute
//! coords = [0, 0]
//!
//! [[node]]
//! name = "c1"
//! address = "tcp:10.0.0.11:7070"     # the node's PCT (compute nodes need one)
//! role = "compute"
//! coords = [1, 0]
//! ```

use crate::error::{Result, YodError};
use crate::nodemap::Topology;
use pct::proto::Address;
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Logins, yod, services.
    Service,
    /// Nodes with disks and other devices.
    Io,
    /// Where jobs run: a PCT per node.
    Compute,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionNode {
    pub name: String,
    pub address: Option<String>,
    pub role: Role,
    pub coords: Vec<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    pub name: String,
    pub key: Option<PathBuf>,
    pub topology: Topology,
    #[serde(rename = "node")]
    pub nodes: Vec<PartitionNode>,
}

/// A compute node ready for allocation.
#[derive(Debug, Clone)]
pub struct ComputeNode {
    pub name: String,
    pub address: Address,
    pub coords: Vec<u32>,
}

impl Partition {
    pub fn load(path: &Path) -> Result<Partition> {
        let text = std::fs::read_to_string(path).map_err(|e| YodError::Partition {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text).map_err(|reason| YodError::Partition {
            path: path.display().to_string(),
            reason,
        })
    }

    /// Parses and validates a partition description.
    pub fn parse(text: &str) -> std::result::Result<Partition, String> {
        let p: Partition = toml::from_str(text).map_err(|e| e.to_string())?;
        if p.nodes.is_empty() {
            return Err("no [[node]] entries".into());
        }
        let mut names = HashSet::new();
        let mut coords = HashSet::new();
        for n in &p.nodes {
            if n.name.is_empty() || !names.insert(n.name.as_str()) {
                return Err(format!("node name {:?} is empty or repeated", n.name));
            }
            p.topology
                .check(&n.coords)
                .map_err(|e| format!("node {}: {e}", n.name))?;
            if !coords.insert(n.coords.clone()) {
                return Err(format!(
                    "node {}: coordinates {:?} used twice",
                    n.name, n.coords
                ));
            }
            match (&n.address, n.role) {
                (None, Role::Compute) => {
                    return Err(format!(
                        "compute node {} needs an address (its PCT)",
                        n.name
                    ))
                }
                (Some(a), _) => {
                    a.parse::<Address>()
                        .map_err(|e| format!("node {}: {e}", n.name))?;
                }
                _ => {}
            }
        }
        if !p.nodes.iter().any(|n| n.role == Role::Compute) {
            return Err("no compute nodes".into());
        }
        Ok(p)
    }

    /// The compute partition, in file order.
    pub fn compute_nodes(&self) -> Vec<ComputeNode> {
        self.nodes
            .iter()
            .filter(|n| n.role == Role::Compute)
            .filter_map(|n| {
                Some(ComputeNode {
                    name: n.name.clone(),
                    address: n.address.as_ref()?.parse().ok()?,
                    coords: n.coords.clone(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "lab"
[topology]
kind = "torus"
dims = [2, 2]
[[node]]
name = "svc"
role = "service"
coords = [0, 0]
[[node]]
name = "c1"
role = "compute"
address = "tcp:127.0.0.1:7071"
coords = [1, 0]
[[node]]
name = "c2"
role = "compute"
address = "unix:/tmp/c2.sock"
coords = [1, 1]
"#;

    #[test]
    fn parses_roles_and_compute_nodes() {
        let p = Partition::parse(GOOD).unwrap();
        let c = p.compute_nodes();
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].name, "c2");
        assert_eq!(p.topology.distance(&c[0].coords, &c[1].coords), 1);
    }

    #[test]
    fn rejects_bad_partitions() {
        let dup = GOOD.replace("name = \"c2\"", "name = \"c1\"");
        assert!(Partition::parse(&dup).unwrap_err().contains("repeated"));
        let out = GOOD.replace("coords = [1, 1]", "coords = [2, 1]");
        assert!(Partition::parse(&out).unwrap_err().contains("outside"));
        let noaddr = GOOD.replace("address = \"unix:/tmp/c2.sock\"\n", "");
        assert!(Partition::parse(&noaddr)
            .unwrap_err()
            .contains("needs an address"));
        assert!(Partition::parse("name = 3").is_err());
        let role = GOOD.replace("role = \"service\"", "role = \"login\"");
        assert!(Partition::parse(&role).is_err());
    }
}
