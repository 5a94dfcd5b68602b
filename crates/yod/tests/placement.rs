//! Service CPUs vs application CPUs, through the real yod and PCT binaries: every thread of yod
//! and of its PCT runs on the service CPUs, the ranks on the application CPUs. Read from
//! `/proc/<pid>/task/*/status` (Cpus_allowed_list) by a rank while the job runs.

mod common;
use common::*;
use pct::policy::{format_cpu_list, parse_cpu_list};
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};

/// The CPUs this test process may use.
fn usable() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in /proc/self/status");
    parse_cpu_list(line.trim()).unwrap()
}

/// What a job saw: each rank's CPUs, and (pid role, thread name) → CPUs for yod's and the
/// PCT's threads.
struct Seen {
    ranks: BTreeMap<u32, Vec<usize>>,
    threads: Vec<(String, String, Vec<usize>)>,
}

/// Rank 0 waits until yod and the PCT have started all their threads, then lists every thread
/// of its parent (the PCT) and grandparent (yod) with its CPUs; every rank prints its own CPUs.
const SCRIPT: &str = r#"
cpus() { sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' "$1"; }
echo "rank $PUMA_RANK $(cpus /proc/self/status)"
if [ "$PUMA_RANK" = 0 ]; then
  sleep 1
  pct=$PPID
  yod=$(sed -n 's/^PPid:[[:space:]]*//p' /proc/$pct/status)
  for role in pct yod; do
    eval pid=\$$role
    for t in /proc/$pid/task/*; do
      echo "thread $role $pid $(tr ' ' _ < $t/comm) $(cpus $t/status)"
    done
  done
fi
"#;

fn run_job(extra: &[&str], n: u32) -> Seen {
    let ns = n.to_string();
    let mut args = vec!["-n", ns.as_str()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["sh", "-c", SCRIPT]);
    let child = Command::new(yod())
        .args(&args)
        .env_remove("PUMA_SERVICE_CPUS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start yod");
    let yod_pid = child.id();
    let out = child.wait_with_output().expect("wait for yod");
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "yod {args:?} failed: {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        text(&out.stderr)
    );
    let mut seen = Seen {
        ranks: BTreeMap::new(),
        threads: Vec::new(),
    };
    for line in stdout.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["rank", r, list] => {
                seen.ranks
                    .insert(r.parse().unwrap(), parse_cpu_list(list).unwrap());
            }
            ["thread", role, pid, name, list] => {
                if *role == "yod" {
                    assert_eq!(pid.parse::<u32>().unwrap(), yod_pid, "{line}");
                }
                seen.threads.push((
                    role.to_string(),
                    name.to_string(),
                    parse_cpu_list(list).unwrap(),
                ));
            }
            _ => panic!("unexpected line {line:?} in\n{stdout}"),
        }
    }
    assert_eq!(seen.ranks.len(), n as usize, "one line per rank:\n{stdout}");
    seen
}

fn names(seen: &Seen, role: &str) -> BTreeSet<String> {
    seen.threads
        .iter()
        .filter(|t| t.0 == role)
        .map(|t| t.1.clone())
        .collect()
}

/// Skips (with a reason) on a machine where the test may use only one CPU.
fn two_cpus() -> Option<Vec<usize>> {
    let u = usable();
    if u.len() < 2 {
        eprintln!("SKIP: service/application split needs 2 usable CPUs, have {u:?}");
        return None;
    }
    Some(u)
}

#[test]
fn yod_and_pct_threads_stay_on_the_service_cpu_and_ranks_on_application_cpus() {
    let Some(all) = two_cpus() else { return };
    let (service, app) = (vec![all[0]], all[1..].to_vec());
    let seen = run_job(&["--mode", "heater"], 1);
    // The threads that wake up periodically or per message must be among those checked.
    let pct = names(&seen, "pct");
    for want in ["pct-session", "pct-heartbeat", "pct-job", "pct-signals"] {
        assert!(pct.contains(want), "no {want} thread in the PCT: {pct:?}");
    }
    let yod = names(&seen, "yod");
    for want in ["yod-heartbeat", "yod-reader-0", "yod-signals"] {
        assert!(yod.contains(want), "no {want} thread in yod: {yod:?}");
    }
    for (role, name, cpus) in &seen.threads {
        assert_eq!(
            cpus,
            &service,
            "{role} thread {name} runs on CPUs {} instead of the service CPU {}",
            format_cpu_list(cpus),
            format_cpu_list(&service)
        );
    }
    assert_eq!(
        seen.ranks[&0],
        vec![app[0]],
        "the rank must get an application CPU"
    );
}

#[test]
fn a_job_needing_every_cpu_shares_the_service_cpu_last() {
    let Some(all) = two_cpus() else { return };
    let n = all.len() as u32;
    let seen = run_job(&["--mode", "heater"], n);
    // Heater: one CPU per rank; the application CPUs first, the service CPU for the last rank.
    let mut expect: Vec<usize> = all[1..].to_vec();
    expect.push(all[0]);
    for (r, cpus) in &seen.ranks {
        assert_eq!(cpus, &vec![expect[*r as usize]], "rank {r}");
    }
    // Our threads stay where they were.
    for (role, name, cpus) in &seen.threads {
        assert_eq!(cpus, &vec![all[0]], "{role} thread {name}");
    }
}

#[test]
fn service_cpus_none_keeps_the_old_shared_layout_and_a_list_moves_it() {
    let Some(all) = two_cpus() else { return };
    let seen = run_job(&["--service-cpus", "none"], 1);
    for (role, name, cpus) in &seen.threads {
        assert_eq!(cpus, &all, "{role} thread {name} with --service-cpus none");
    }
    assert_eq!(seen.ranks[&0], vec![all[0]]);

    let last = *all.last().unwrap();
    let seen = run_job(&["--service-cpus", &last.to_string()], 1);
    for (role, name, cpus) in &seen.threads {
        assert_eq!(cpus, &vec![last], "{role} thread {name}");
    }
    assert_eq!(
        seen.ranks[&0],
        vec![all[0]],
        "with the last CPU for service, rank 0 gets the first"
    );
}

#[test]
fn a_service_cpu_outside_the_machine_is_refused_with_the_usable_list() {
    let all = usable();
    let out = run_yod(&["--service-cpus", "1000", "-n", "1", "true"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("--service-cpus") && err.contains(&format_cpu_list(&all)),
        "unhelpful error: {err}"
    );
    let out = run_yod(&["--service-cpus", "0-", "-n", "1", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("bad CPU list"));
}
