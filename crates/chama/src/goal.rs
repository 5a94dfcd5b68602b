//! GOAL schedules: a streaming reader (straight into the simulator's [`Schedule`], no conversion
//! step, no string per token) and a writer.
//!
//! The accepted text is the one LogGOPSim's `txt2bin` reads:
//!
//! ```text
//! num_ranks 2
//! rank 0 {
//!   l1: calc 100 cpu 0
//!   l2: send 8b to 1 tag 0 cpu 0 nic 0
//!   l2 requires l1
//! }
//! rank 1 {
//!   l1: recv 8b from -1 tag -1     // -1: any source / any tag
//! }
//! ```
//!
//! `//` and `/* ... */` are comments. Labels are local to a rank block and must be defined before
//! a `requires` / `irequires` line names them. `a requires b`: `a` may start when `b` has completed;
//! `a irequires b`: `a` may start when `b` has started.

use std::io::{Read, Write};

use crate::error::InputError;
use crate::schedule::{OpKind, Schedule, ScheduleBuilder, ANY, IREQ_BIT};

/// Parse a GOAL file from disk, streaming it in 1 MiB chunks.
pub fn parse_goal_file(path: &str) -> Result<Schedule, InputError> {
    let f = std::fs::File::open(path).map_err(|e| InputError::Io {
        path: path.to_string(),
        source: e,
    })?;
    let hint = f.metadata().map(|m| m.len()).unwrap_or(0);
    parse_goal_reader(f, path, hint)
}

/// Parse GOAL text held in memory.
pub fn parse_goal_str(text: &str) -> Result<Schedule, InputError> {
    parse_goal_reader(text.as_bytes(), "<goal>", text.len() as u64)
}

/// Parse GOAL from any reader. `size_hint` (bytes, may be 0) pre-sizes the operation arrays.
pub fn parse_goal_reader<R: Read>(
    mut r: R,
    path: &str,
    size_hint: u64,
) -> Result<Schedule, InputError> {
    let mut p = GoalParser::new(path, size_hint);
    let mut buf = vec![0u8; 1 << 20];
    let mut have = 0usize;
    loop {
        if have == buf.len() {
            // A single line longer than the buffer: grow it.
            buf.resize(buf.len() * 2, 0);
        }
        let n = r.read(&mut buf[have..]).map_err(|e| InputError::Io {
            path: path.to_string(),
            source: e,
        })?;
        let end = have + n;
        if n == 0 {
            if end > 0 {
                p.line(&buf[..end])?;
            }
            break;
        }
        // Process every complete line; keep the tail.
        let last_nl = match buf[..end].iter().rposition(|&b| b == b'\n') {
            Some(i) => i,
            None => {
                have = end;
                continue;
            }
        };
        let mut start = 0;
        let chunk = &buf[..=last_nl];
        while start < chunk.len() {
            let nl = match chunk[start..].iter().position(|&b| b == b'\n') {
                Some(i) => start + i,
                None => chunk.len(),
            };
            p.line(&chunk[start..nl])?;
            start = nl + 1;
        }
        buf.copy_within(last_nl + 1..end, 0);
        have = end - last_nl - 1;
    }
    p.finish()
}

/// Per-rank label table: open addressing, generation-stamped so that starting a new rank
/// block costs nothing, no allocation per label.
struct Labels {
    slots: Vec<Slot>,
    arena: Vec<u8>,
    gen: u32,
    count: usize,
}

#[derive(Clone, Copy, Default)]
struct Slot {
    gen: u32,
    hash: u32,
    off: u32,
    len: u32,
    op: u32,
}

fn hash_label(s: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in s {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ (h >> 29)
}

impl Labels {
    fn new() -> Self {
        Labels {
            slots: vec![Slot::default(); 64],
            arena: Vec::with_capacity(1024),
            gen: 1,
            count: 0,
        }
    }
    fn reset(&mut self) {
        self.gen = self.gen.wrapping_add(1);
        if self.gen == 0 {
            self.slots.iter_mut().for_each(|s| *s = Slot::default());
            self.gen = 1;
        }
        self.arena.clear();
        self.count = 0;
    }
    fn find(&self, key: &[u8]) -> Option<u32> {
        let h = hash_label(key);
        let mask = self.slots.len() - 1;
        let mut i = (h as usize) & mask;
        loop {
            let s = &self.slots[i];
            if s.gen != self.gen {
                return None;
            }
            if s.hash == h as u32 && &self.arena[s.off as usize..(s.off + s.len) as usize] == key {
                return Some(s.op);
            }
            i = (i + 1) & mask;
        }
    }
    /// Insert; returns false if the label already exists.
    fn insert(&mut self, key: &[u8], op: u32) -> bool {
        if (self.count + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let h = hash_label(key);
        let mask = self.slots.len() - 1;
        let mut i = (h as usize) & mask;
        loop {
            let s = self.slots[i];
            if s.gen != self.gen {
                let off = self.arena.len() as u32;
                self.arena.extend_from_slice(key);
                self.slots[i] = Slot {
                    gen: self.gen,
                    hash: h as u32,
                    off,
                    len: key.len() as u32,
                    op,
                };
                self.count += 1;
                return true;
            }
            if s.hash == h as u32 && &self.arena[s.off as usize..(s.off + s.len) as usize] == key {
                return false;
            }
            i = (i + 1) & mask;
        }
    }
    fn grow(&mut self) {
        let old = std::mem::take(&mut self.slots);
        self.slots = vec![Slot::default(); old.len() * 2];
        let mask = self.slots.len() - 1;
        for s in old.into_iter().filter(|s| s.gen == self.gen) {
            let key = &self.arena[s.off as usize..(s.off + s.len) as usize];
            let mut i = (hash_label(key) as usize) & mask;
            while self.slots[i].gen == self.gen {
                i = (i + 1) & mask;
            }
            self.slots[i] = s;
        }
    }
}

struct GoalParser<'p> {
    path: &'p str,
    line_no: u64,
    b: Option<ScheduleBuilder>,
    size_hint: u64,
    rank: Option<u32>,
    pending_brace: Option<u32>,
    seen: Vec<bool>,
    in_comment: bool,
    labels: Labels,
    scratch: Vec<u8>,
}

/// Whitespace tokenizer over a byte slice (no allocation).
struct Toks<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Toks<'a> {
    #[inline]
    fn next(&mut self) -> Option<&'a [u8]> {
        let s = self.s;
        let mut i = self.i;
        while i < s.len() && (s[i] == b' ' || s[i] == b'\t' || s[i] == b'\r') {
            i += 1;
        }
        if i == s.len() {
            self.i = i;
            return None;
        }
        let st = i;
        while i < s.len() && !(s[i] == b' ' || s[i] == b'\t' || s[i] == b'\r') {
            i += 1;
        }
        self.i = i;
        Some(&s[st..i])
    }
}

#[inline]
fn num(t: &[u8]) -> Option<u64> {
    if t.is_empty() || t.len() > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in t {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((c - b'0') as u64)?;
    }
    Some(v)
}

fn show(t: &[u8]) -> String {
    String::from_utf8_lossy(t).into_owned()
}

impl<'p> GoalParser<'p> {
    fn new(path: &'p str, size_hint: u64) -> Self {
        GoalParser {
            path,
            line_no: 0,
            b: None,
            size_hint,
            rank: None,
            pending_brace: None,
            seen: Vec::new(),
            in_comment: false,
            labels: Labels::new(),
            scratch: Vec::new(),
        }
    }

    fn err(&self, msg: impl Into<String>) -> InputError {
        InputError::Syntax {
            path: self.path.to_string(),
            line: self.line_no,
            msg: msg.into(),
        }
    }

    fn line(&mut self, raw: &[u8]) -> Result<(), InputError> {
        self.line_no += 1;
        if self.in_comment || raw.contains(&b'/') {
            let mut clean = std::mem::take(&mut self.scratch);
            clean.clear();
            let mut i = 0;
            while i < raw.len() {
                if self.in_comment {
                    if raw[i] == b'*' && raw.get(i + 1) == Some(&b'/') {
                        self.in_comment = false;
                        clean.push(b' ');
                        i += 2;
                    } else {
                        i += 1;
                    }
                } else if raw[i] == b'/' && raw.get(i + 1) == Some(&b'/') {
                    break;
                } else if raw[i] == b'/' && raw.get(i + 1) == Some(&b'*') {
                    self.in_comment = true;
                    i += 2;
                } else {
                    clean.push(raw[i]);
                    i += 1;
                }
            }
            let r = self.statement(&clean);
            self.scratch = clean;
            r
        } else {
            self.statement(raw)
        }
    }

    fn builder(&mut self) -> Result<&mut ScheduleBuilder, InputError> {
        let (path, line) = (self.path, self.line_no);
        self.b.as_mut().ok_or_else(|| InputError::Syntax {
            path: path.to_string(),
            line,
            msg: "`num_ranks N` must come before the first rank block".into(),
        })
    }

    fn statement(&mut self, line: &[u8]) -> Result<(), InputError> {
        let mut t = Toks { s: line, i: 0 };
        let Some(t0) = t.next() else { return Ok(()) };
        if let Some(r) = self.pending_brace {
            if t0 != b"{" {
                return Err(self.err(format!("expected `{{` to open rank {r}")));
            }
            self.pending_brace = None;
            self.open_rank(r)?;
            return match t.next() {
                None => Ok(()),
                Some(x) => Err(self.err(format!("unexpected `{}` after `{{`", show(x)))),
            };
        }
        match t0 {
            b"num_ranks" => {
                let n = t
                    .next()
                    .and_then(num)
                    .filter(|&n| n >= 1 && n < u32::MAX as u64)
                    .ok_or_else(|| self.err("num_ranks needs a positive integer"))?;
                if self.b.is_some() {
                    return Err(self.err("num_ranks given twice"));
                }
                let mut b = ScheduleBuilder::new(n as u32);
                // About 30 bytes of text per operation, one dependency per operation.
                let est = (self.size_hint / 30).min(1 << 31) as usize;
                b.reserve(est, est);
                self.seen = vec![false; n as usize];
                self.b = Some(b);
                Ok(())
            }
            b"rank" => {
                if self.rank.is_some() {
                    return Err(self.err("`rank` inside a rank block (missing `}`?)"));
                }
                let tr = t.next().ok_or_else(|| self.err("rank needs a number"))?;
                let (num_part, brace) = match tr.strip_suffix(b"{") {
                    Some(x) => (x, true),
                    None => (tr, false),
                };
                let r = num(num_part)
                    .ok_or_else(|| self.err(format!("bad rank number `{}`", show(tr))))?;
                let brace = brace
                    || match t.next() {
                        Some(b"{") => true,
                        None => false,
                        Some(x) => {
                            return Err(self.err(format!("expected `{{`, found `{}`", show(x))))
                        }
                    };
                if r > u32::MAX as u64 {
                    return Err(self.err("rank number too large"));
                }
                if brace {
                    self.open_rank(r as u32)
                } else {
                    self.pending_brace = Some(r as u32);
                    Ok(())
                }
            }
            b"}" => {
                if self.rank.take().is_none() {
                    return Err(self.err("`}` without an open rank block"));
                }
                Ok(())
            }
            _ => self.op_or_dep(t0, t),
        }
    }

    fn open_rank(&mut self, r: u32) -> Result<(), InputError> {
        let n = self.builder()?.num_ranks();
        if r >= n {
            return Err(self.err(format!("rank {r} but num_ranks is {n}")));
        }
        if self.seen[r as usize] {
            return Err(self.err(format!("rank {r} appears twice")));
        }
        self.seen[r as usize] = true;
        self.rank = Some(r);
        self.labels.reset();
        Ok(())
    }

    fn op_or_dep(&mut self, t0: &[u8], mut t: Toks<'_>) -> Result<(), InputError> {
        let rank = self
            .rank
            .ok_or_else(|| self.err(format!("`{}` outside a rank block", show(t0))))?;
        let (label, opname): (Option<&[u8]>, &[u8]) = if let Some(l) = t0.strip_suffix(b":") {
            let op = t
                .next()
                .ok_or_else(|| self.err("label without operation"))?;
            (Some(l), op)
        } else {
            match t0 {
                b"send" | b"recv" | b"calc" => (None, t0),
                _ => {
                    let t1 = t
                        .next()
                        .ok_or_else(|| self.err(format!("unknown statement `{}`", show(t0))))?;
                    match t1 {
                        b":" => {
                            let op = t
                                .next()
                                .ok_or_else(|| self.err("label without operation"))?;
                            (Some(t0), op)
                        }
                        b"requires" | b"irequires" => {
                            let other = t
                                .next()
                                .ok_or_else(|| self.err(format!("`{}` needs a label", show(t1))))?;
                            if let Some(x) = t.next() {
                                return Err(self.err(format!("unexpected `{}`", show(x))));
                            }
                            let a = self.labels.find(t0).ok_or_else(|| {
                                self.err(format!("label `{}` is not defined", show(t0)))
                            })?;
                            let bb = self.labels.find(other).ok_or_else(|| {
                                self.err(format!("label `{}` is not defined", show(other)))
                            })?;
                            if a == bb {
                                return Err(self.err(format!("`{}` depends on itself", show(t0))));
                            }
                            self.builder()?.depend(a, bb, t1 == b"irequires");
                            return Ok(());
                        }
                        _ => {
                            return Err(self.err(format!(
                                "expected `:`, `requires` or `irequires` after `{}`, found `{}`",
                                show(t0),
                                show(t1)
                            )))
                        }
                    }
                }
            }
        };
        let kind = match opname {
            b"send" => OpKind::Send,
            b"recv" => OpKind::Recv,
            b"calc" => OpKind::Calc,
            _ => {
                return Err(self.err(format!(
                    "expected `send`, `recv` or `calc`, found `{}`",
                    show(opname)
                )))
            }
        };
        let sz_tok = t
            .next()
            .ok_or_else(|| self.err(format!("`{}` needs a size", kind.name())))?;
        let (peer, size) = if kind == OpKind::Calc {
            let v =
                num(sz_tok).ok_or_else(|| self.err(format!("bad calc time `{}`", show(sz_tok))))?;
            (0u32, v)
        } else {
            let digits = sz_tok.strip_suffix(b"b").unwrap_or(sz_tok);
            let v = num(digits)
                .ok_or_else(|| self.err(format!("bad message size `{}`", show(sz_tok))))?;
            let mut w = t.next();
            if digits.len() == sz_tok.len() && w == Some(b"b") {
                w = t.next();
            }
            let want: &[u8] = if kind == OpKind::Send { b"to" } else { b"from" };
            if w != Some(want) {
                return Err(self.err(format!(
                    "expected `{}` after the size of a {}",
                    show(want),
                    kind.name()
                )));
            }
            let pt = t.next().ok_or_else(|| self.err("missing peer rank"))?;
            let peer = if pt == b"-1" && kind == OpKind::Recv {
                ANY
            } else {
                num(pt)
                    .filter(|&p| p < ANY as u64)
                    .ok_or_else(|| self.err(format!("bad peer rank `{}`", show(pt))))?
                    as u32
            };
            (peer, v)
        };
        let mut tag = 0u32;
        let mut cpu = 0u8;
        let mut nic = 0u8;
        while let Some(k) = t.next() {
            let v = t
                .next()
                .ok_or_else(|| self.err(format!("`{}` needs a value", show(k))))?;
            match k {
                b"tag" if kind != OpKind::Calc => {
                    tag = if v == b"-1" && kind == OpKind::Recv {
                        ANY
                    } else {
                        num(v)
                            .filter(|&x| x < ANY as u64)
                            .ok_or_else(|| self.err(format!("bad tag `{}`", show(v))))?
                            as u32
                    };
                }
                b"cpu" => {
                    cpu = num(v)
                        .filter(|&x| x < 255)
                        .ok_or_else(|| self.err(format!("bad cpu `{}` (0..254)", show(v))))?
                        as u8
                }
                b"nic" => {
                    nic = num(v)
                        .filter(|&x| x < 255)
                        .ok_or_else(|| self.err(format!("bad nic `{}` (0..254)", show(v))))?
                        as u8
                }
                _ => return Err(self.err(format!("unexpected `{}`", show(k)))),
            }
        }
        let path = self.path;
        let line_no = self.line_no;
        let b = self.builder()?;
        let class = kind as u8 + 1;
        let id = b
            .push(rank, kind, peer, tag, size, cpu, nic, class)
            .map_err(|e| InputError::Syntax {
                path: path.to_string(),
                line: line_no,
                msg: e.to_string(),
            })?;
        if let Some(l) = label {
            if !self.labels.insert(l, id) {
                return Err(self.err(format!("label `{}` defined twice in rank {rank}", show(l))));
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Schedule, InputError> {
        self.line_no += 1;
        if self.in_comment {
            return Err(self.err("unterminated `/*` comment"));
        }
        if let Some(r) = self.rank.or(self.pending_brace) {
            return Err(self.err(format!("end of file inside rank {r} (missing `}}`)")));
        }
        let path = self.path.to_string();
        let mut b = self.b.ok_or_else(|| InputError::Syntax {
            path: path.clone(),
            line: 1,
            msg: "no `num_ranks` line: not a GOAL schedule".into(),
        })?;
        // Classes 1..=3 are the op kinds, so reports group GOAL ops by kind.
        b.class("send");
        b.class("recv");
        b.class("calc");
        b.finish()
            .map_err(|e| InputError::Schedule { path, source: e })
    }
}

/// Write `s` as GOAL text. Every dependency must stay within one rank (GOAL cannot express
/// anything else); labels are `l1`, `l2`, ... in program order.
pub fn write_goal<W: Write>(s: &Schedule, mut w: W) -> std::io::Result<()> {
    let (roff, rops) = s.ops_by_rank();
    // Position of each op within its rank (1-based label number).
    let mut pos = vec![0u32; s.len()];
    for r in 0..s.num_ranks as usize {
        for (k, &op) in rops[roff[r] as usize..roff[r + 1] as usize]
            .iter()
            .enumerate()
        {
            pos[op as usize] = k as u32 + 1;
        }
    }
    // Reverse CSR: dependencies of each op.
    let n = s.len();
    let mut rstart = vec![0u32; n + 1];
    for &d in &s.dep_list {
        rstart[(d & !IREQ_BIT) as usize + 1] += 1;
    }
    for i in 0..n {
        rstart[i + 1] += rstart[i];
    }
    let mut fill = rstart[..n].to_vec();
    let mut rlist = vec![0u32; s.dep_list.len()];
    for op in 0..n {
        for &d in s.dependents(op) {
            let to = (d & !IREQ_BIT) as usize;
            if s.ops[to].rank != s.ops[op].rank {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "a dependency crosses ranks; GOAL cannot express it",
                ));
            }
            rlist[fill[to] as usize] = op as u32 | (d & IREQ_BIT);
            fill[to] += 1;
        }
    }
    drop(fill);
    let mut line = Vec::with_capacity(128);
    writeln!(w, "num_ranks {}", s.num_ranks)?;
    for r in 0..s.num_ranks as usize {
        line.clear();
        line.extend_from_slice(b"\nrank ");
        push_u64(&mut line, r as u64);
        line.extend_from_slice(b" {\n");
        w.write_all(&line)?;
        let ops = &rops[roff[r] as usize..roff[r + 1] as usize];
        for &op in ops {
            let op = op as usize;
            line.clear();
            line.push(b'l');
            push_u64(&mut line, pos[op] as u64);
            line.extend_from_slice(b": ");
            match s.op_kind(op) {
                OpKind::Calc => {
                    line.extend_from_slice(b"calc ");
                    push_u64(&mut line, s.ops[op].size);
                }
                k => {
                    line.extend_from_slice(if k == OpKind::Send {
                        b"send "
                    } else {
                        b"recv "
                    });
                    push_u64(&mut line, s.ops[op].size);
                    line.extend_from_slice(if k == OpKind::Send {
                        b"b to "
                    } else {
                        b"b from "
                    });
                    push_i(&mut line, s.ops[op].peer);
                    line.extend_from_slice(b" tag ");
                    push_i(&mut line, s.ops[op].tag);
                }
            }
            if s.ops[op].cpu != 0 {
                line.extend_from_slice(b" cpu ");
                push_u64(&mut line, s.ops[op].cpu as u64);
            }
            if s.ops[op].nic != 0 && s.op_kind(op) != OpKind::Calc {
                line.extend_from_slice(b" nic ");
                push_u64(&mut line, s.ops[op].nic as u64);
            }
            line.push(b'\n');
            w.write_all(&line)?;
        }
        for &op in ops {
            let op = op as usize;
            for &d in &rlist[rstart[op] as usize..rstart[op + 1] as usize] {
                line.clear();
                line.push(b'l');
                push_u64(&mut line, pos[op] as u64);
                line.extend_from_slice(if d & IREQ_BIT != 0 {
                    b" irequires l"
                } else {
                    b" requires l"
                });
                push_u64(&mut line, pos[(d & !IREQ_BIT) as usize] as u64);
                line.push(b'\n');
                w.write_all(&line)?;
            }
        }
        w.write_all(b"}\n")?;
    }
    w.flush()
}

fn push_i(out: &mut Vec<u8>, v: u32) {
    if v == ANY {
        out.extend_from_slice(b"-1");
    } else {
        push_u64(out, v as u64);
    }
}

fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}
