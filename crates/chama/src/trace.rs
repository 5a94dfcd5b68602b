//! Our runtime's message trace (`chama-trace v1`, see `TRACE_FORMAT.md`): reader, writer and
//! the conversion into a simulator schedule.
//!
//! Conversion rebuilds each rank's program: the gaps between message calls become `calc`
//! operations, blocking calls (`send`, `recv`) form a chain, non-blocking calls (`isend`,
//! `irecv`) are posted in program order and waited for by the first call that starts after the
//! recorded completion. The recorded durations of message calls are *not* replayed: the
//! simulator recomputes them with the LogGOPS model, which is what lets noise act on them.
//! Only time differences within one rank are used, so rank clocks need not be synchronised.

use std::io::{BufRead, BufReader, Write};

use crate::error::InputError;
use crate::schedule::{OpKind, Schedule, ScheduleBuilder, ANY};

/// First line of every trace.
pub const TRACE_MAGIC: &str = "# chama-trace v1";
/// Column header line.
pub const TRACE_HEADER: &str = "rank\top\tpeer\ttag\tbytes\tstart_ns\tend_ns\tclass";

/// A traced message call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceOp {
    /// Blocking send.
    Send,
    /// Blocking receive.
    Recv,
    /// Non-blocking send (end = when its wait/test returned).
    Isend,
    /// Non-blocking receive (end = when its wait/test returned).
    Irecv,
    /// A wait (or waitall / successful test) call: [start, end] is the time spent in it. Optional:
    /// it lets the converter tell waiting from computing. Peer, tag and bytes are ignored.
    Wait,
}

impl TraceOp {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "send" => TraceOp::Send,
            "recv" => TraceOp::Recv,
            "isend" => TraceOp::Isend,
            "irecv" => TraceOp::Irecv,
            "wait" => TraceOp::Wait,
            _ => return None,
        })
    }
    /// Name in the trace.
    pub fn name(self) -> &'static str {
        match self {
            TraceOp::Send => "send",
            TraceOp::Recv => "recv",
            TraceOp::Isend => "isend",
            TraceOp::Irecv => "irecv",
            TraceOp::Wait => "wait",
        }
    }
    fn blocking(self) -> bool {
        matches!(self, TraceOp::Send | TraceOp::Recv)
    }
    fn is_send(self) -> bool {
        matches!(self, TraceOp::Send | TraceOp::Isend)
    }
}

/// One trace record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    /// Rank that made the call.
    pub rank: u32,
    /// The call.
    pub op: TraceOp,
    /// Destination (sends) or source (receives; [`ANY`] = any source).
    pub peer: u32,
    /// Tag ([`ANY`] = any tag, receives only).
    pub tag: u32,
    /// Bytes.
    pub bytes: u64,
    /// Call entry (ns, rank-local clock).
    pub start_ns: u64,
    /// Call exit, or completion for non-blocking calls (ns).
    pub end_ns: u64,
    /// Operation class (collective or phase); "p2p" when absent.
    pub class: String,
}

/// A whole trace.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// Number of ranks (`# ranks=N`, or 1 + the largest rank/peer seen).
    pub ranks: u32,
    /// Records in file order.
    pub events: Vec<TraceEvent>,
}

fn syn(path: &str, line: u64, msg: impl Into<String>) -> InputError {
    InputError::Syntax {
        path: path.to_string(),
        line,
        msg: msg.into(),
    }
}

fn signed(s: &str, what: &str, path: &str, ln: u64, allow_any: bool) -> Result<u32, InputError> {
    if allow_any && s == "-1" {
        return Ok(ANY);
    }
    s.parse::<u32>()
        .ok()
        .filter(|&v| v != ANY)
        .ok_or_else(|| syn(path, ln, format!("bad {what} `{s}`")))
}

/// Read a trace from a file.
pub fn read_trace(path: &str) -> Result<Trace, InputError> {
    let f = std::fs::File::open(path).map_err(|e| InputError::Io {
        path: path.to_string(),
        source: e,
    })?;
    read_trace_from(BufReader::new(f), path)
}

/// Read a trace from any buffered reader.
pub fn read_trace_from<R: BufRead>(r: R, path: &str) -> Result<Trace, InputError> {
    let mut t = Trace::default();
    let mut declared: Option<u32> = None;
    let mut max_rank = 0u32;
    for (i, line) in r.lines().enumerate() {
        let line = line.map_err(|e| InputError::Io {
            path: path.to_string(),
            source: e,
        })?;
        let ln = i as u64 + 1;
        let l = line.trim_end_matches(['\r', '\n']);
        if i == 0 && l.trim() != TRACE_MAGIC {
            return Err(syn(
                path,
                1,
                format!("not a chama trace (first line must be `{TRACE_MAGIC}`)"),
            ));
        }
        if l.trim().is_empty() {
            continue;
        }
        if let Some(c) = l.strip_prefix('#') {
            if let Some(v) = c.trim().strip_prefix("ranks=") {
                declared = Some(
                    v.trim()
                        .parse()
                        .ok()
                        .filter(|&n: &u32| n >= 1)
                        .ok_or_else(|| syn(path, ln, format!("bad ranks `{v}`")))?,
                );
            }
            continue;
        }
        if l.starts_with("rank\t") || l.starts_with("rank ") {
            continue; // header
        }
        let cols: Vec<&str> = l.split('\t').map(str::trim).collect();
        if cols.len() != 7 && cols.len() != 8 {
            return Err(syn(
                path,
                ln,
                format!(
                    "expected 7 or 8 tab-separated columns ({TRACE_HEADER}), found {}",
                    cols.len()
                ),
            ));
        }
        let rank = signed(cols[0], "rank", path, ln, false)?;
        let op = TraceOp::parse(cols[1]).ok_or_else(|| {
            syn(
                path,
                ln,
                format!("bad op `{}` (send, recv, isend, irecv)", cols[1]),
            )
        })?;
        let recv = !op.is_send();
        let any_ok = recv || op == TraceOp::Wait;
        let peer = signed(cols[2], "peer", path, ln, any_ok)?;
        let tag = signed(cols[3], "tag", path, ln, any_ok)?;
        let bytes: u64 = cols[4]
            .parse()
            .map_err(|_| syn(path, ln, format!("bad bytes `{}`", cols[4])))?;
        let start_ns: u64 = cols[5]
            .parse()
            .map_err(|_| syn(path, ln, format!("bad start_ns `{}`", cols[5])))?;
        let end_ns: u64 = cols[6]
            .parse()
            .map_err(|_| syn(path, ln, format!("bad end_ns `{}`", cols[6])))?;
        if end_ns < start_ns {
            return Err(syn(path, ln, "end_ns is before start_ns"));
        }
        let class = cols
            .get(7)
            .filter(|c| !c.is_empty())
            .unwrap_or(&"p2p")
            .to_string();
        max_rank = max_rank.max(rank);
        if peer != ANY && op != TraceOp::Wait {
            max_rank = max_rank.max(peer);
        }
        t.events.push(TraceEvent {
            rank,
            op,
            peer,
            tag,
            bytes,
            start_ns,
            end_ns,
            class,
        });
    }
    t.ranks = match declared {
        Some(n) if n <= max_rank && !t.events.is_empty() => {
            return Err(syn(
                path,
                1,
                format!("ranks={n} but rank {max_rank} appears"),
            ))
        }
        Some(n) => n,
        None => max_rank + 1,
    };
    Ok(t)
}

/// Write a trace (what the PCT's profiling mode produces).
pub fn write_trace<W: Write>(t: &Trace, mut w: W) -> std::io::Result<()> {
    writeln!(w, "{TRACE_MAGIC}")?;
    writeln!(w, "# ranks={}", t.ranks)?;
    writeln!(w, "{TRACE_HEADER}")?;
    let sh = |v: u32| {
        if v == ANY {
            "-1".to_string()
        } else {
            v.to_string()
        }
    };
    for e in &t.events {
        writeln!(
            w,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            e.rank,
            e.op.name(),
            sh(e.peer),
            sh(e.tag),
            e.bytes,
            e.start_ns,
            e.end_ns,
            e.class
        )?;
    }
    w.flush()
}

/// Convert a trace into a schedule (see the module documentation for the rules).
pub fn trace_to_schedule(t: &Trace, path: &str) -> Result<Schedule, InputError> {
    let mut b = ScheduleBuilder::new(t.ranks.max(1));
    let compute = b.class("compute");
    // Events of each rank in call order (stable: ties keep file order).
    let mut order: Vec<u32> = (0..t.events.len() as u32).collect();
    order.sort_by_key(|&i| {
        let e = &t.events[i as usize];
        (e.rank, e.start_ns)
    });
    let mk = |e: crate::error::ScheduleError| InputError::Schedule {
        path: path.to_string(),
        source: e,
    };
    let mut i = 0;
    let mut pending: Vec<(u32, u64)> = Vec::new();
    while i < order.len() {
        let rank = t.events[order[i] as usize].rank;
        let mut j = i;
        while j < order.len() && t.events[order[j] as usize].rank == rank {
            j += 1;
        }
        pending.clear();
        // (op, is_irequires): what the next call must follow.
        let mut chain: Option<(u32, bool)> = None;
        let mut cursor = t.events[order[i] as usize].start_ns;
        for &ei in &order[i..j] {
            let e = &t.events[ei as usize];
            let gap = e.start_ns.saturating_sub(cursor);
            let waited: Vec<u32> = {
                let mut w = Vec::new();
                pending.retain(|&(op, end)| {
                    if end <= e.start_ns {
                        w.push(op);
                        false
                    } else {
                        true
                    }
                });
                w
            };
            if gap > 0 || !waited.is_empty() {
                let c = b
                    .push(rank, OpKind::Calc, 0, 0, gap, 0, 0, compute)
                    .map_err(mk)?;
                if let Some((prev, ireq)) = chain {
                    b.depend(c, prev, ireq);
                }
                for w in waited {
                    b.depend(c, w, false);
                }
                chain = Some((c, false));
            }
            if e.op == TraceOp::Wait {
                // Everything completed by this wait must finish before the program goes on;
                // the time spent inside the wait is not computation.
                let mut done = Vec::new();
                pending.retain(|&(op, end)| {
                    if end <= e.end_ns {
                        done.push(op);
                        false
                    } else {
                        true
                    }
                });
                let join = b
                    .push(rank, OpKind::Calc, 0, 0, 0, 0, 0, compute)
                    .map_err(mk)?;
                if let Some((prev, ireq)) = chain {
                    b.depend(join, prev, ireq);
                }
                for d in done {
                    b.depend(join, d, false);
                }
                chain = Some((join, false));
                cursor = cursor.max(e.end_ns);
                continue;
            }
            let class = b.class(&e.class);
            let kind = if e.op.is_send() {
                OpKind::Send
            } else {
                OpKind::Recv
            };
            let op = b
                .push(rank, kind, e.peer, e.tag, e.bytes, 0, 0, class)
                .map_err(mk)?;
            if let Some((prev, ireq)) = chain {
                b.depend(op, prev, ireq);
            }
            if e.op.blocking() {
                chain = Some((op, false));
                cursor = cursor.max(e.end_ns);
            } else {
                pending.push((op, e.end_ns));
                chain = Some((op, true));
                cursor = cursor.max(e.start_ns);
            }
        }
        i = j;
    }
    b.finish().map_err(mk)
}
