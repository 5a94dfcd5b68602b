//! Running inside a Slurm allocation: the nodes come from `SLURM_JOB_NODELIST`,
//! the PCTs are started with one `srun` step (one task per node).

use crate::error::{Result, YodError};
use crate::hostlist;
use crate::launch::Target;
use pct::proto::Address;
use std::path::Path;

/// The allocation's nodes, if yod runs inside one.
pub fn nodes_from_env() -> Option<Result<Vec<String>>> {
    let list = std::env::var("SLURM_JOB_NODELIST")
        .or_else(|_| std::env::var("SLURM_NODELIST"))
        .ok()?;
    Some(hostlist::expand(&list))
}

/// The `srun` command line that starts one PCT per node of the allocation.
pub fn srun_argv(
    pct: &Path,
    pre: &[String],
    hosts: &[String],
    port: u16,
    key: &Path,
) -> Vec<String> {
    let mut v = vec![
        "srun".to_string(),
        format!("--nodes={}", hosts.len()),
        format!("--ntasks={}", hosts.len()),
        "--ntasks-per-node=1".into(),
        format!("--nodelist={}", hosts.join(",")),
        "--overlap".into(),
        "--kill-on-bad-exit=0".into(),
        pct.display().to_string(),
    ];
    v.extend(pre.iter().cloned());
    v.extend([
        "serve".into(),
        "--listen".into(),
        format!("tcp:0.0.0.0:{port}"),
        "--key".into(),
        key.display().to_string(),
        "--exit-with-parent".into(),
    ]);
    v
}

/// Targets for the hosts: `tcp:HOST:PORT`, coordinates = position in the list.
pub fn targets(hosts: &[String], port: u16) -> Result<Vec<Target>> {
    hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let address: Address = format!("tcp:{h}:{port}")
                .parse()
                .map_err(|e: pct::PctError| YodError::Usage(e.to_string()))?;
            Ok(Target {
                name: h.clone(),
                address,
                coords: vec![i as u32],
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn srun_line_and_targets() {
        let hosts = hostlist::expand("c[1-2]").unwrap();
        let a = srun_argv(Path::new("/opt/pct"), &[], &hosts, 7070, Path::new("/h/k"));
        assert_eq!(a[0], "srun");
        assert!(a.contains(&"--nodes=2".to_string()));
        assert!(a.contains(&"--nodelist=c1,c2".to_string()));
        assert!(a.contains(&"tcp:0.0.0.0:7070".to_string()));
        let t = targets(&hosts, 7070).unwrap();
        assert_eq!(t[1].address, Address::Tcp("c2:7070".into()));
    }
}
