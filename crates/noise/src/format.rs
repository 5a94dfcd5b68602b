//! The file formats `puma-noise` writes and reads (documented in the crate README):
//!
//! * FTQ CSV (`# puma-noise ftq v1`): metadata comment lines, then `cpu,index,start_ns,count`.
//! * FTQ binary (magic `PNFTQ\0\0\x01`): the same metadata as text, then little-endian `u32` counts.
//! * Detour trace (`# puma-noise detour v1`): `start_ns<TAB>duration_ns` lines.
//!
//! Every writer writes to a temporary file beside the target and renames it into place, so a
//! failed run never leaves a half-written file under the requested name.

use crate::error::{NoiseError, Result};
use crate::ftq::FtqRun;
use crate::units::{format_cpu_list, parse_cpu_list};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

/// First line of an FTQ CSV file.
pub const FTQ_CSV_MAGIC: &str = "# puma-noise ftq v1";
/// Header line of the FTQ CSV table.
pub const FTQ_CSV_HEADER: &str = "cpu,index,start_ns,count";
/// First eight bytes of an FTQ binary file.
pub const FTQ_BIN_MAGIC: &[u8; 8] = b"PNFTQ\0\0\x01";
/// First line of a detour trace.
pub const DETOUR_MAGIC: &str = "# puma-noise detour v1";

/// The running kernel's release string (for metadata), or `unknown`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Check, before a measurement starts, that `path` can later be written by [`write_atomic`]:
/// it must not be a directory, its directory must exist, and a file can be created there (see
/// `outfile::check_writable`). A run of minutes must not end in "cannot write" with its data
/// lost.
pub fn check_writable(path: &Path) -> Result<()> {
    outfile::check_writable(path).map_err(|e| NoiseError::io(path, e))
}

/// Check, before a measurement starts, that a report can be written into `dir`: create it if
/// missing and probe that a file can be made in it.
pub fn check_report_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| NoiseError::io(dir, e))?;
    check_writable(&dir.join("report.html"))
}

/// Write `path` whole or not at all, synced before the rename (a regular file; a device such
/// as `/dev/null` or a FIFO is written in place, see the `outfile` crate).
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    outfile::write(path, outfile::Durability::SyncThenRename, fill)
        .map_err(|e| NoiseError::io(path, e))
}

fn metadata_lines(run: &FtqRun) -> Vec<String> {
    let mut lines = vec![
        format!("interval_ns={}", run.interval_ns),
        format!("quantum_ns={:.3}", run.quantum_ns),
        format!("nominal_count={}", run.nominal_count),
        format!("cpus={}", format_cpu_list(&run.cpus)),
    ];
    for (k, v) in &run.meta {
        // Keep one line per entry whatever the value holds.
        lines.push(format!("{k}={}", v.replace(['\n', '\r'], " ")));
    }
    lines
}

/// Write an FTQ run as CSV.
pub fn write_ftq_csv(run: &FtqRun, w: &mut dyn Write) -> std::io::Result<()> {
    writeln!(w, "{FTQ_CSV_MAGIC}")?;
    for l in metadata_lines(run) {
        writeln!(w, "# {l}")?;
    }
    writeln!(w, "{FTQ_CSV_HEADER}")?;
    for (cpu, series) in run.cpus.iter().zip(&run.counts) {
        for (i, c) in series.iter().enumerate() {
            writeln!(w, "{cpu},{i},{},{c}", i as u64 * run.interval_ns)?;
        }
    }
    Ok(())
}

/// Write an FTQ run in the compact binary format.
pub fn write_ftq_bin(run: &FtqRun, w: &mut dyn Write) -> std::io::Result<()> {
    let text = metadata_lines(run).join("\n");
    w.write_all(FTQ_BIN_MAGIC)?;
    w.write_all(&(text.len() as u32).to_le_bytes())?;
    w.write_all(text.as_bytes())?;
    for series in &run.counts {
        w.write_all(&(series.len() as u64).to_le_bytes())?;
        for c in series {
            w.write_all(&c.to_le_bytes())?;
        }
    }
    Ok(())
}

/// Save an FTQ run; the binary format is used when the name ends in `.ftq` or `.bin`.
pub fn save_ftq(run: &FtqRun, path: &Path) -> Result<()> {
    let binary = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("ftq") | Some("bin")
    );
    write_atomic(path, |w| {
        if binary {
            write_ftq_bin(run, w)
        } else {
            write_ftq_csv(run, w)
        }
    })
}

/// Builds an [`FtqRun`] from `key=value` metadata lines.
struct MetaParser {
    interval_ns: Option<u64>,
    quantum_ns: Option<f64>,
    nominal_count: Option<u64>,
    cpus: Option<Vec<usize>>,
    meta: Vec<(String, String)>,
}

impl MetaParser {
    fn new() -> Self {
        MetaParser {
            interval_ns: None,
            quantum_ns: None,
            nominal_count: None,
            cpus: None,
            meta: Vec::new(),
        }
    }
    fn line(&mut self, path: &Path, lineno: usize, text: &str) -> Result<()> {
        let Some((k, v)) = text.split_once('=') else {
            return Ok(()); // free-form comment
        };
        let (k, v) = (k.trim(), v.trim());
        let bad = |why: String| NoiseError::Format {
            path: path.to_path_buf(),
            line: lineno,
            why,
        };
        match k {
            "interval_ns" => {
                self.interval_ns = Some(
                    v.parse()
                        .map_err(|_| bad(format!("interval_ns `{v}` is not an integer")))?,
                )
            }
            "quantum_ns" => {
                self.quantum_ns = Some(
                    v.parse()
                        .map_err(|_| bad(format!("quantum_ns `{v}` is not a number")))?,
                )
            }
            "nominal_count" => {
                self.nominal_count = Some(
                    v.parse()
                        .map_err(|_| bad(format!("nominal_count `{v}` is not an integer")))?,
                )
            }
            "cpus" => self.cpus = Some(parse_cpu_list(v).map_err(|e| bad(e.to_string()))?),
            _ => self.meta.push((k.to_string(), v.to_string())),
        }
        Ok(())
    }
    fn finish(self, path: &Path, counts: Vec<Vec<u32>>) -> Result<FtqRun> {
        let missing = |what: &str| NoiseError::Format {
            path: path.to_path_buf(),
            line: 1,
            why: format!("metadata line `# {what}=...` is missing"),
        };
        let interval_ns = self.interval_ns.ok_or_else(|| missing("interval_ns"))?;
        if interval_ns == 0 {
            return Err(NoiseError::Format {
                path: path.to_path_buf(),
                line: 1,
                why: "interval_ns must be positive".into(),
            });
        }
        Ok(FtqRun {
            interval_ns,
            quantum_ns: self.quantum_ns.ok_or_else(|| missing("quantum_ns"))?,
            nominal_count: self.nominal_count.ok_or_else(|| missing("nominal_count"))?,
            cpus: self.cpus.ok_or_else(|| missing("cpus"))?,
            counts,
            meta: self.meta,
        })
    }
}

/// Read an FTQ CSV from `r` (`path` is for error messages).
pub fn read_ftq_csv(path: &Path, r: impl Read) -> Result<FtqRun> {
    let mut lines = BufReader::new(r).lines().enumerate();
    let mut mp = MetaParser::new();
    let first = match lines.next() {
        Some((_, l)) => l.map_err(|e| NoiseError::io(path, e))?,
        None => String::new(),
    };
    if first.trim() != FTQ_CSV_MAGIC {
        return Err(NoiseError::Format {
            path: path.to_path_buf(),
            line: 1,
            why: format!("expected `{FTQ_CSV_MAGIC}` as the first line"),
        });
    }
    let mut header_seen = false;
    let mut rows: Vec<(usize, usize, u32)> = Vec::new();
    for (idx, line) in lines {
        let lineno = idx + 1;
        let line = line.map_err(|e| NoiseError::io(path, e))?;
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        if let Some(c) = t.strip_prefix('#') {
            mp.line(path, lineno, c.trim())?;
            continue;
        }
        if !header_seen {
            if t != FTQ_CSV_HEADER {
                return Err(NoiseError::Format {
                    path: path.to_path_buf(),
                    line: lineno,
                    why: format!("expected header `{FTQ_CSV_HEADER}`"),
                });
            }
            header_seen = true;
            continue;
        }
        let f: Vec<&str> = t.split(',').collect();
        let parsed = (f.len() == 4)
            .then(|| Some((f[0].parse().ok()?, f[1].parse().ok()?, f[3].parse().ok()?)))
            .flatten();
        let Some(row) = parsed else {
            return Err(NoiseError::Format {
                path: path.to_path_buf(),
                line: lineno,
                why: format!("expected `cpu,index,start_ns,count` with integers, got `{t}`"),
            });
        };
        rows.push(row);
    }
    let cpus = mp.cpus.clone().unwrap_or_default();
    let mut counts: Vec<Vec<u32>> = vec![Vec::new(); cpus.len()];
    let nrows = rows.len();
    for (k, (cpu, index, count)) in rows.into_iter().enumerate() {
        if index >= nrows {
            return Err(NoiseError::Format {
                path: path.to_path_buf(),
                line: k + 1,
                why: format!("interval index {index} but the file has only {nrows} rows"),
            });
        }
        let Some(slot) = cpus.iter().position(|&c| c == cpu) else {
            return Err(NoiseError::Format {
                path: path.to_path_buf(),
                line: k + 1,
                why: format!("row for cpu {cpu}, which is not in the `cpus` metadata"),
            });
        };
        let s = &mut counts[slot];
        if index >= s.len() {
            s.resize(index + 1, 0);
        }
        s[index] = count;
    }
    mp.finish(path, counts)
}

/// Read an FTQ binary file from `r`.
pub fn read_ftq_bin(path: &Path, mut r: impl Read) -> Result<FtqRun> {
    let io = |e| NoiseError::io(path, e);
    let bad = |why: &str| NoiseError::Format {
        path: path.to_path_buf(),
        line: 1,
        why: why.to_string(),
    };
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(io)?;
    if &magic != FTQ_BIN_MAGIC {
        return Err(bad("not a puma-noise FTQ binary file (bad magic)"));
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(io)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > 1 << 20 {
        return Err(bad("metadata block larger than 1 MiB"));
    }
    let mut text = vec![0u8; len];
    r.read_exact(&mut text)
        .map_err(|_| bad("file ends inside the metadata block"))?;
    let text = String::from_utf8(text).map_err(|_| bad("metadata is not UTF-8"))?;
    let mut mp = MetaParser::new();
    for (i, l) in text.lines().enumerate() {
        mp.line(path, i + 1, l)?;
    }
    let ncpu = mp.cpus.as_ref().map_or(0, Vec::len);
    let mut counts = Vec::with_capacity(ncpu);
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).map_err(io)?;
    let mut off = 0usize;
    for _ in 0..ncpu {
        let Some(nb) = rest.get(off..off + 8) else {
            return Err(bad("file ends before a series length"));
        };
        let n = u64::from_le_bytes(nb.try_into().map_err(|_| bad("short length"))?) as usize;
        off += 8;
        let bytes = n
            .checked_mul(4)
            .and_then(|b| rest.get(off..off.checked_add(b)?))
            .ok_or_else(|| bad("file ends inside a series"))?;
        counts.push(
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        );
        off += n * 4;
    }
    mp.finish(path, counts)
}

/// Load an FTQ run from a CSV or binary file (recognised by content).
pub fn load_ftq(path: &Path) -> Result<FtqRun> {
    let mut f = std::fs::File::open(path).map_err(|e| NoiseError::io(path, e))?;
    let mut head = [0u8; 8];
    let n = f.read(&mut head).map_err(|e| NoiseError::io(path, e))?;
    let f = std::fs::File::open(path).map_err(|e| NoiseError::io(path, e))?;
    if n == 8 && &head == FTQ_BIN_MAGIC {
        read_ftq_bin(path, f)
    } else {
        read_ftq_csv(path, f)
    }
}

/// A detour trace: gaps in a selfish-detour loop (or any source), nanoseconds since run start.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DetourTrace {
    /// `(start_ns, duration_ns)` per detour, in start order.
    pub detours: Vec<(u64, u64)>,
    /// Metadata `key=value` pairs (e.g. `cpu`, `duration_ns`, `threshold_ns`).
    pub meta: Vec<(String, String)>,
}

impl DetourTrace {
    /// Look up a metadata value.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.meta
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Write a detour trace.
pub fn write_detours(trace: &DetourTrace, w: &mut dyn Write) -> std::io::Result<()> {
    writeln!(w, "{DETOUR_MAGIC}")?;
    for (k, v) in &trace.meta {
        writeln!(w, "# {k}={}", v.replace(['\n', '\r'], " "))?;
    }
    for (s, d) in &trace.detours {
        writeln!(w, "{s}\t{d}")?;
    }
    Ok(())
}

/// Read a detour trace (`#` lines are metadata/comments; data lines `start<TAB>duration`).
pub fn read_detours(path: &Path, r: impl Read) -> Result<DetourTrace> {
    let mut t = DetourTrace::default();
    for (idx, line) in BufReader::new(r).lines().enumerate() {
        let line = line.map_err(|e| NoiseError::io(path, e))?;
        let s = line.trim();
        if s.is_empty() {
            continue;
        }
        if let Some(c) = s.strip_prefix('#') {
            if let Some((k, v)) = c.trim().split_once('=') {
                t.meta.push((k.trim().to_string(), v.trim().to_string()));
            }
            continue;
        }
        let mut it = s.split_whitespace();
        let parsed = match (it.next(), it.next(), it.next()) {
            (Some(a), Some(b), None) => a.parse().ok().zip(b.parse().ok()),
            _ => None,
        };
        let Some(pair) = parsed else {
            return Err(NoiseError::Format {
                path: path.to_path_buf(),
                line: idx + 1,
                why: format!("expected `start_ns<TAB>duration_ns`, got `{s}`"),
            });
        };
        t.detours.push(pair);
    }
    Ok(t)
}

/// Load a detour trace file.
pub fn load_detours(path: &Path) -> Result<DetourTrace> {
    let f = std::fs::File::open(path).map_err(|e| NoiseError::io(path, e))?;
    read_detours(path, f)
}

/// True if the file starts like a detour trace.
pub fn is_detour_file(path: &Path) -> bool {
    std::fs::File::open(path)
        .ok()
        .and_then(|f| BufReader::new(f).lines().next()?.ok())
        .is_some_and(|l| l.trim() == DETOUR_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_that_cannot_be_written_are_refused_before_a_run_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("run.csv");
        check_writable(&ok).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "probe left behind"
        );
        let missing = dir.path().join("no/such/dir/run.csv");
        let e = check_writable(&missing).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = check_writable(dir.path()).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        // A report directory is created when missing, and only the directory stays.
        let rep = dir.path().join("rep/sub");
        check_report_dir(&rep).unwrap();
        assert!(rep.is_dir());
        assert_eq!(std::fs::read_dir(&rep).unwrap().count(), 0);
        // A report "directory" that is a file cannot be used.
        assert!(check_report_dir(&ok.with_extension("x")).is_ok());
        std::fs::write(dir.path().join("plain"), b"x").unwrap();
        assert!(check_report_dir(&dir.path().join("plain")).is_err());
    }

    fn sample() -> FtqRun {
        FtqRun {
            interval_ns: 1_000_000,
            quantum_ns: 1000.5,
            nominal_count: 998,
            cpus: vec![0, 3],
            counts: vec![vec![998, 0, 500, 997], vec![998, 998, 10, 999]],
            meta: vec![
                ("mode".into(), "ftq".into()),
                ("inject".into(), "100Hz:200us".into()),
            ],
        }
    }

    #[test]
    fn csv_round_trip() {
        let run = sample();
        let mut buf = Vec::new();
        write_ftq_csv(&run, &mut buf).unwrap();
        let text = String::from_utf8(buf.clone()).unwrap();
        assert!(text.starts_with("# puma-noise ftq v1\n# interval_ns=1000000\n"));
        assert!(text.contains("\ncpu,index,start_ns,count\n0,0,0,998\n"));
        assert!(text.contains("\n3,2,2000000,10\n"));
        let back = read_ftq_csv(Path::new("x.csv"), &buf[..]).unwrap();
        assert_eq!(back.counts, run.counts);
        assert_eq!(back.cpus, run.cpus);
        assert_eq!(back.meta("inject"), Some("100Hz:200us"));
        assert!((back.quantum_ns - 1000.5).abs() < 1e-9);
    }

    #[test]
    fn binary_round_trip_and_truncation() {
        let run = sample();
        let mut buf = Vec::new();
        write_ftq_bin(&run, &mut buf).unwrap();
        let back = read_ftq_bin(Path::new("x.ftq"), &buf[..]).unwrap();
        assert_eq!(back.counts, run.counts);
        assert_eq!(back.nominal_count, 998);
        let cut = &buf[..buf.len() - 3];
        assert!(read_ftq_bin(Path::new("x.ftq"), cut).is_err());
    }

    #[test]
    fn bad_csv_is_reported_with_line() {
        let text = "# puma-noise ftq v1\n# interval_ns=1000\n# quantum_ns=1\n# nominal_count=5\n# cpus=0\ncpu,index,start_ns,count\n0,0,0,five\n";
        let e = read_ftq_csv(Path::new("b.csv"), text.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("line 7"), "{e}");
        let e = read_ftq_csv(Path::new("b.csv"), "hello\n".as_bytes()).unwrap_err();
        assert!(e.to_string().contains("first line"), "{e}");
        let missing = "# puma-noise ftq v1\n# interval_ns=1000\ncpu,index,start_ns,count\n";
        let e = read_ftq_csv(Path::new("b.csv"), missing.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("quantum_ns"), "{e}");
        let huge = "# puma-noise ftq v1\n# interval_ns=1000\n# quantum_ns=1\n# nominal_count=5\n# cpus=0\ncpu,index,start_ns,count\n0,999999999999,0,5\n";
        let e = read_ftq_csv(Path::new("b.csv"), huge.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("only 1 rows"), "{e}");
    }

    #[test]
    fn detour_round_trip() {
        let t = DetourTrace {
            detours: vec![(10, 2000), (5000, 300)],
            meta: vec![("cpu".into(), "1".into())],
        };
        let mut buf = Vec::new();
        write_detours(&t, &mut buf).unwrap();
        let s = String::from_utf8(buf.clone()).unwrap();
        assert!(s.starts_with("# puma-noise detour v1\n# cpu=1\n10\t2000\n"));
        assert_eq!(read_detours(Path::new("t"), &buf[..]).unwrap(), t);
        assert!(read_detours(Path::new("t"), "1\t2\t3\n".as_bytes()).is_err());
    }
}
