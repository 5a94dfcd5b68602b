//! Jobs whose ranks span nodes use the PCTs' QK fabrics joined by their node engines (TCP
//! between nodes), with no switch to set: virtual nodes of the embedded partition, and real PCTs
//! in network namespaces (needs root and `ip`; skips with a reason otherwise).

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

#[test]
fn virtual_nodes_route_through_the_node_engines() {
    let so = ok(7, &["--nodes", "3"], "coll_check", &["--seed", "11"]);
    assert!(
        so.contains("coll-check OK: 7 ranks") && so.contains("fabric: routed between nodes"),
        "{so}"
    );
    // One node: one region holds every rank.
    let so = ok(3, &[], "coll_check", &["--seed", "12", "--sizes", "1,100"]);
    assert!(so.contains("fabric: one region"), "{so}");
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Net {
    hub: String,
    nodes: Vec<String>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in self.nodes.iter().chain(std::iter::once(&self.hub)) {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn addr(i: usize) -> String {
    format!("10.232.0.{}", 11 + i)
}

/// `k` node namespaces on a bridge in a hub namespace (where yod runs).
fn setup(k: usize) -> Result<Net, String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| e.to_string())?;
    if text(&uid.stdout).trim() != "0" {
        return Err("not root".into());
    }
    let tag = std::process::id() % 100_000;
    let net = Net {
        hub: format!("pumc{tag}h"),
        nodes: (0..k).map(|i| format!("pumc{tag}n{i}")).collect(),
    };
    ip(&["netns", "add", &net.hub])?;
    for n in &net.nodes {
        ip(&["netns", "add", n])?;
    }
    let h = net.hub.as_str();
    ip(&["-n", h, "link", "set", "lo", "up"])?;
    ip(&["-n", h, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", h, "addr", "add", "10.232.0.1/24", "dev", "br0"])?;
    ip(&["-n", h, "link", "set", "br0", "up"])?;
    for (i, n) in net.nodes.iter().enumerate() {
        let a = format!("vc{tag}a{i}");
        let b = format!("vc{tag}b{i}");
        ip(&[
            "link", "add", &a, "netns", h, "type", "veth", "peer", "name", &b, "netns", n,
        ])?;
        ip(&["-n", h, "link", "set", &a, "master", "br0"])?;
        ip(&["-n", h, "link", "set", &a, "up"])?;
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        let cidr = format!("{}/24", addr(i));
        ip(&["-n", n, "addr", "add", &cidr, "dev", &b])?;
        ip(&["-n", n, "link", "set", &b, "up"])?;
    }
    Ok(net)
}

fn yod_bin() -> String {
    bins().join("yod").display().to_string()
}

/// `yod pct serve` inside namespace `ns`, once it says it listens.
fn start_pct(ns: &str, i: usize, key: &Path, dir: &Path) -> Child {
    let mut c = Command::new("ip")
        .args(["netns", "exec", ns, &yod_bin(), "pct", "serve", "--listen"])
        .arg(format!("tcp:{}:7070", addr(i)))
        .arg("--key")
        .arg(key)
        .arg("--name")
        .arg(format!("n{i}"))
        .arg("--run-dir")
        .arg(dir.join(format!("run{i}")))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.contains("listening"),
        "PCT n{i} did not start: {line:?}"
    );
    c
}

fn partition(dir: &Path, key: &Path, k: usize) -> PathBuf {
    let mut s = format!(
        "name = \"pumatest{}\"\nkey = \"{}\"\n[topology]\nkind = \"mesh\"\ndims = [{}]\n\n\
         [[node]]\nname = \"svc\"\nrole = \"service\"\ncoords = [0]\n",
        std::process::id(),
        key.display(),
        k + 1
    );
    for i in 0..k {
        s += &format!(
            "\n[[node]]\nname = \"n{i}\"\nrole = \"compute\"\naddress = \"tcp:{}:7070\"\ncoords = [{}]\n",
            addr(i),
            i + 1
        );
    }
    let p = dir.join("partition.toml");
    std::fs::write(&p, s).unwrap();
    p
}

#[test]
fn exclusive_collectives_across_pcts_in_network_namespaces() {
    let net = match setup(3) {
        Ok(n) => n,
        Err(why) => {
            println!("SKIPPED: network namespaces unavailable ({why})");
            return;
        }
    };
    let dir = TempDir(std::env::temp_dir().join(format!("puma-mn-{}", std::process::id())));
    std::fs::create_dir_all(dir.path()).unwrap();
    let key = dir.path().join("cluster.key");
    let kg = Command::new(yod_bin())
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(kg.status.success(), "{}", text(&kg.stderr));
    let mut pcts: Vec<Child> = (0..3)
        .map(|i| start_pct(&net.nodes[i], i, &key, dir.path()))
        .collect();
    let part = partition(dir.path(), &key, 3).display().to_string();
    // 7 ranks on 3 nodes (3 + 2 + 2): node-local shared memory first, then the node engines.
    let out = Command::new("ip")
        .args(["netns", "exec", &net.hub, &yod_bin()])
        .args(["-n", "7", "--partition", &part])
        .arg(example("coll_check"))
        .args(["--seed", "21", "--sizes", "0,1,7,100,3000,30000"])
        .env("XDG_STATE_HOME", dir.path().join("state"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    for p in &mut pcts {
        let _ = p.kill();
        let _ = p.wait();
    }
    let so = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{so}\nstderr:\n{}",
        text(&out.stderr)
    );
    assert!(
        so.contains("coll-check OK: 7 ranks") && so.contains("fabric: routed between nodes"),
        "{so}"
    );
}
