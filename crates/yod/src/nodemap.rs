//! The node map handed to every application (seed 002: "Puma builds a node map
//! that gives the application exact information about the location and distances
//! of each node"). Written as JSON; the format is documented in the README and
//! read by `puma::init()`.

use serde::{Deserialize, Serialize};

/// Shape of the machine the coordinates live in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Topology {
    /// A mesh of the given extents; distance = Manhattan distance.
    Mesh { dims: Vec<u32> },
    /// A torus (mesh with wrap-around links); distance = shortest way round per axis.
    Torus { dims: Vec<u32> },
    /// A tree of the given fan-out whose leaves are the nodes; coordinates are
    /// `[leaf index]`; distance = hops up to the common ancestor and back down.
    Tree { arity: u32 },
}

impl Topology {
    /// Number of coordinates a node has.
    pub fn rank(&self) -> usize {
        match self {
            Topology::Mesh { dims } | Topology::Torus { dims } => dims.len(),
            Topology::Tree { .. } => 1,
        }
    }

    /// Checks coordinates against the extents.
    pub fn check(&self, c: &[u32]) -> Result<(), String> {
        if c.len() != self.rank() {
            return Err(format!(
                "coordinates {c:?} need {} component(s) for this topology",
                self.rank()
            ));
        }
        if let Topology::Mesh { dims } | Topology::Torus { dims } = self {
            if let Some((i, (&x, &d))) = c.iter().zip(dims).enumerate().find(|(_, (x, d))| x >= d) {
                return Err(format!("coordinate {i} of {c:?} is {x}, outside 0..{d}"));
            }
        }
        Ok(())
    }

    /// Distance in network hops between two nodes.
    pub fn distance(&self, a: &[u32], b: &[u32]) -> u32 {
        match self {
            Topology::Mesh { .. } => a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).sum(),
            Topology::Torus { dims } => a
                .iter()
                .zip(b)
                .zip(dims)
                .map(|((x, y), d)| {
                    let s = x.abs_diff(*y);
                    s.min(d.saturating_sub(s))
                })
                .sum(),
            Topology::Tree { arity } => {
                let k = (*arity).max(2);
                let (mut x, mut y) = (
                    a.first().copied().unwrap_or(0),
                    b.first().copied().unwrap_or(0),
                );
                let mut up = 0;
                while x != y {
                    x /= k;
                    y /= k;
                    up += 1;
                }
                2 * up
            }
        }
    }
}

/// One node of the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapNode {
    /// Index of the node in this map (what `PUMA_NODE` holds).
    pub id: u32,
    pub name: String,
    pub coords: Vec<u32>,
    /// Global ranks on this node.
    pub ranks: Vec<u32>,
}

/// Where one rank runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapRank {
    pub rank: u32,
    pub node: u32,
    pub local_rank: u32,
}

/// The whole node map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMap {
    pub version: u32,
    pub job: String,
    pub size: u32,
    pub mode: String,
    pub topology: Topology,
    pub nodes: Vec<MapNode>,
    pub ranks: Vec<MapRank>,
    /// `distances[a][b]`: hops from node a to node b.
    pub distances: Vec<Vec<u32>>,
}

impl NodeMap {
    /// Builds the map: `placement[i]` = (name, coords, ranks) of job node i.
    pub fn build(
        job: &str,
        mode: &str,
        topology: Topology,
        placement: &[(String, Vec<u32>, Vec<u32>)],
    ) -> NodeMap {
        let nodes: Vec<MapNode> = placement
            .iter()
            .enumerate()
            .map(|(i, (name, coords, ranks))| MapNode {
                id: i as u32,
                name: name.clone(),
                coords: coords.clone(),
                ranks: ranks.clone(),
            })
            .collect();
        let mut ranks: Vec<MapRank> = nodes
            .iter()
            .flat_map(|n| {
                n.ranks.iter().enumerate().map(move |(lr, &r)| MapRank {
                    rank: r,
                    node: n.id,
                    local_rank: lr as u32,
                })
            })
            .collect();
        ranks.sort_by_key(|r| r.rank);
        let distances = nodes
            .iter()
            .map(|a| {
                nodes
                    .iter()
                    .map(|b| topology.distance(&a.coords, &b.coords))
                    .collect()
            })
            .collect();
        NodeMap {
            version: 1,
            job: job.into(),
            size: ranks.len() as u32,
            mode: mode.into(),
            topology,
            nodes,
            ranks,
            distances,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_per_topology() {
        let m = Topology::Mesh { dims: vec![4, 4] };
        assert_eq!(m.distance(&[0, 0], &[3, 3]), 6);
        let t = Topology::Torus { dims: vec![4, 4] };
        assert_eq!(t.distance(&[0, 0], &[3, 3]), 2);
        let tr = Topology::Tree { arity: 2 };
        assert_eq!(tr.distance(&[0], &[1]), 2);
        assert_eq!(tr.distance(&[0], &[2]), 4);
        assert_eq!(tr.distance(&[5], &[5]), 0);
        assert!(m.check(&[4, 0]).is_err());
        assert!(m.check(&[1]).is_err());
    }

    #[test]
    fn build_orders_ranks_and_fills_distances() {
        let map = NodeMap::build(
            "j",
            "heater",
            Topology::Mesh { dims: vec![3] },
            &[
                ("a".into(), vec![0], vec![0, 1]),
                ("b".into(), vec![2], vec![2]),
            ],
        );
        assert_eq!(map.size, 3);
        assert_eq!(map.ranks[2].node, 1);
        assert_eq!(map.ranks[1].local_rank, 1);
        assert_eq!(map.distances, vec![vec![0, 2], vec![2, 0]]);
    }
}
