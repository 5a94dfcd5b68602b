//! Start-up: who am I? `puma::init()` reads what the PCT put in the environment
//! and the node map file yod built.
//!
//! The environment contract (set by the PCT for every rank):
//! `PUMA_JOB`, `PUMA_RANK`, `PUMA_SIZE`, `PUMA_NODE` (index in the node map),
//! `PUMA_LOCAL_RANK`, `PUMA_LOCAL_SIZE`, `PUMA_MODE`
//! (`heater` | `msg-coproc` | `compute-coproc` | `virtual-node`) and
//! `PUMA_NODE_MAP` (path of the JSON node map).

use serde::Deserialize;
use std::path::PathBuf;

/// Why `init` failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("this program was not started by yod ({0} is not set); run it as `yod -n N PROGRAM`")]
    NotLaunchedByYod(&'static str),
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    BadVariable {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("cannot read the node map {path}: {reason}")]
    NodeMap { path: String, reason: String },
}

/// CPU mode chosen at load time (defined by the QK).
pub use qk::CpuMode;

/// Machine shape the coordinates live in.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Topology {
    Mesh { dims: Vec<u32> },
    Torus { dims: Vec<u32> },
    Tree { arity: u32 },
}

/// A node of the job.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MapNode {
    pub id: u32,
    pub name: String,
    pub coords: Vec<u32>,
    pub ranks: Vec<u32>,
}

/// Where a rank runs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MapRank {
    pub rank: u32,
    pub node: u32,
    pub local_rank: u32,
}

/// The node map: every rank's node, every node's coordinates, all distances.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NodeMap {
    pub version: u32,
    pub job: String,
    pub size: u32,
    pub mode: String,
    pub topology: Topology,
    pub nodes: Vec<MapNode>,
    pub ranks: Vec<MapRank>,
    pub distances: Vec<Vec<u32>>,
}

impl NodeMap {
    /// Parses and checks a node map.
    pub fn from_json(text: &str) -> Result<NodeMap, String> {
        let m: NodeMap = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let k = m.nodes.len();
        if m.ranks.len() != m.size as usize
            || m.ranks
                .iter()
                .enumerate()
                .any(|(i, r)| r.rank as usize != i || r.node as usize >= k)
        {
            return Err("ranks do not list 0..size with valid nodes".into());
        }
        if m.distances.len() != k || m.distances.iter().any(|row| row.len() != k) {
            return Err("distance matrix is not nodes x nodes".into());
        }
        Ok(m)
    }

    /// The node a rank runs on.
    pub fn node_of(&self, rank: u32) -> Option<&MapNode> {
        let r = self.ranks.get(rank as usize)?;
        self.nodes.get(r.node as usize)
    }

    /// Hops between the nodes of two ranks (0 on the same node).
    pub fn rank_distance(&self, a: u32, b: u32) -> Option<u32> {
        let na = self.ranks.get(a as usize)?.node as usize;
        let nb = self.ranks.get(b as usize)?.node as usize;
        self.distances.get(na)?.get(nb).copied()
    }
}

/// What a rank knows about itself and its job.
#[derive(Debug, Clone)]
pub struct World {
    pub job: String,
    pub rank: u32,
    pub size: u32,
    /// Index of this rank's node in the node map.
    pub node: u32,
    pub local_rank: u32,
    pub local_size: u32,
    pub mode: CpuMode,
    pub node_map: NodeMap,
    pub node_map_path: PathBuf,
}

impl World {
    /// This rank's node entry.
    pub fn my_node(&self) -> &MapNode {
        // init() checked that `node` indexes the map.
        &self.node_map.nodes[self.node as usize]
    }
}

fn var(name: &'static str) -> Result<String, InitError> {
    std::env::var(name).map_err(|_| InitError::NotLaunchedByYod(name))
}

fn num(name: &'static str) -> Result<u32, InitError> {
    let v = var(name)?;
    v.parse()
        .map_err(|e: std::num::ParseIntError| InitError::BadVariable {
            name,
            value: v.clone(),
            reason: e.to_string(),
        })
}

/// Reads the rank environment and node map. Fails with
/// [`InitError::NotLaunchedByYod`] when the program was started by hand.
pub fn init() -> Result<World, InitError> {
    let rank = num("PUMA_RANK")?;
    let job = var("PUMA_JOB")?;
    let size = num("PUMA_SIZE")?;
    let node = num("PUMA_NODE")?;
    let local_rank = num("PUMA_LOCAL_RANK")?;
    let local_size = num("PUMA_LOCAL_SIZE")?;
    let m = var("PUMA_MODE")?;
    let mode = m.parse::<CpuMode>().ok().ok_or(InitError::BadVariable {
        name: "PUMA_MODE",
        value: m.clone(),
        reason: "expected heater, msg-coproc, compute-coproc or virtual-node".into(),
    })?;
    let path = PathBuf::from(var("PUMA_NODE_MAP")?);
    let text = std::fs::read_to_string(&path).map_err(|e| InitError::NodeMap {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let node_map = NodeMap::from_json(&text).map_err(|reason| InitError::NodeMap {
        path: path.display().to_string(),
        reason,
    })?;
    let bad = |name: &'static str, value: u32, reason: &str| InitError::BadVariable {
        name,
        value: value.to_string(),
        reason: reason.into(),
    };
    if rank >= size || node_map.size != size {
        return Err(bad("PUMA_RANK", rank, "outside the job / node map size"));
    }
    if node_map.ranks[rank as usize].node != node {
        return Err(bad("PUMA_NODE", node, "disagrees with the node map"));
    }
    if local_rank >= local_size {
        return Err(bad(
            "PUMA_LOCAL_RANK",
            local_rank,
            "not below PUMA_LOCAL_SIZE",
        ));
    }
    Ok(World {
        job,
        rank,
        size,
        node,
        local_rank,
        local_size,
        mode,
        node_map,
        node_map_path: path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = r#"{"version":1,"job":"j","size":2,"mode":"heater",
      "topology":{"kind":"mesh","dims":[2]},
      "nodes":[{"id":0,"name":"a","coords":[0],"ranks":[0]},{"id":1,"name":"b","coords":[1],"ranks":[1]}],
      "ranks":[{"rank":0,"node":0,"local_rank":0},{"rank":1,"node":1,"local_rank":0}],
      "distances":[[0,1],[1,0]]}"#;

    #[test]
    fn node_map_parses_and_answers() {
        let m = NodeMap::from_json(MAP).unwrap();
        assert_eq!(m.node_of(1).unwrap().name, "b");
        assert_eq!(m.rank_distance(0, 1), Some(1));
        assert_eq!(m.rank_distance(0, 5), None);
        assert!(NodeMap::from_json(&MAP.replace("[[0,1],[1,0]]", "[[0,1]]")).is_err());
        assert!(NodeMap::from_json("{").is_err());
    }
}
