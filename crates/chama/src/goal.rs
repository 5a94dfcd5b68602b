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
use crate::schedule::{OpKind, Schedule, ScheduleBuilder, ANY, IREQ_BIT, MAX_OPS};

/// Files at least this large are parsed by two threads (when the machine has two cores).
const SPLIT_MIN: u64 = 8 << 20;

/// Parse a GOAL file from disk, streaming it in 1 MiB chunks. A large file is cut in two at a
/// `rank` line near its middle and the second part is parsed on a second thread; the result,
/// errors and line numbers included, is always that of reading the file in order (the second
/// part is read again in order whenever the two parts do not join cleanly).
pub fn parse_goal_file(path: &str) -> Result<Schedule, InputError> {
    let two = std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
    parse_goal_file_split(path, two.then_some(SPLIT_MIN))
}

/// Parse `path`, on two threads if it holds at least `split_min` bytes; the cut is sought from
/// the middle of the file.
fn parse_goal_file_split(path: &str, split_min: Option<u64>) -> Result<Schedule, InputError> {
    let mut f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let split = match split_min {
        Some(min) if size >= min.max(1) => find_split(&f, size / 2),
        _ => None,
    };
    let mut p = GoalParser::new(path, size);
    match split {
        Some(split) => {
            parse_two_parts(&f, path, size, split, &mut p)?;
        }
        None => read_lines(&mut f, path, &mut p, &mut |_| true)?,
    }
    p.finish()
}

fn io_err(path: &str, e: std::io::Error) -> InputError {
    InputError::Io {
        path: path.to_string(),
        source: e,
    }
}

/// Offset of the first line starting with `rank ` after offset `from` (within 1 MiB of it).
fn find_split(f: &std::fs::File, from: u64) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut have = 0;
    while have < buf.len() {
        match f.read_at(&mut buf[have..], from + have as u64) {
            Ok(0) => break,
            Ok(n) => have += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    let at = memchr::memmem::find(&buf[..have], b"\nrank ")?;
    Some(from + at as u64 + 1)
}

/// Parse `f` as two parts, `..split` here and `split..` on a second thread, into `p`. `split`
/// must start a line. Returns whether the parts were joined (false: the second part was read
/// again after the first).
fn parse_two_parts(
    f: &std::fs::File,
    path: &str,
    size: u64,
    split: u64,
    p: &mut GoalParser<'_>,
) -> Result<bool, InputError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::channel::<u32>();
    let (first, second) = std::thread::scope(|sc| {
        let stop = &stop;
        // If no thread can be started, the second part is read in order below.
        let h = std::thread::Builder::new()
            .name("goal-parse".into())
            .spawn_scoped(sc, move || -> Option<Result<GoalParser<'_>, InputError>> {
                // The second part can start once the first has read `num_ranks`.
                let n = rx.recv().ok()?;
                let mut q = GoalParser::new(path, size - split);
                q.begin(n);
                let mut r = At { f, pos: split };
                let r = read_lines(&mut r, path, &mut q, &mut |_| !stop.load(Ordering::Relaxed));
                Some(r.map(|()| q))
            })
            .ok();
        let mut tx = Some(tx);
        let first = read_lines(&mut At { f, pos: 0 }.take(split), path, p, &mut |p| {
            if let (Some(b), Some(t)) = (&p.b, &tx) {
                // The receiver is gone only if the thread ended, which the join below sees.
                let _ = t.send(b.num_ranks());
                tx = None;
            }
            true
        });
        if first.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        // Without `num_ranks` in the first part the thread is told nothing and gives up.
        drop(tx);
        (first, h.and_then(|h| h.join().ok()).flatten())
    });
    first?;
    let clean = !p.in_comment && p.rank.is_none() && p.pending_brace.is_none();
    if let (true, Some(Ok(q))) = (clean, second) {
        if p.absorb(q) {
            return Ok(true);
        }
    }
    // Read the second part in order after the first, as a one-thread parse would.
    read_lines(&mut At { f, pos: split }, path, p, &mut |_| true)?;
    Ok(false)
}

/// Reads `f` from `pos` on with positioned reads, leaving the file's own offset alone, so two
/// threads can read one open file at different places.
struct At<'a> {
    f: &'a std::fs::File,
    pos: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.f.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
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
    read_lines(&mut r, path, &mut p, &mut |_| true)?;
    p.finish()
}

/// Feed every line of `r` to `p`: the common lines go through [`GoalParser::fast_at`], which
/// reads them in place in one pass; any other line is cut out with `memchr` and given to the
/// general parser ([`GoalParser::line`]).
/// `after_read(p)` runs after each read's lines; returning false stops reading there.
fn read_lines<R: Read>(
    r: &mut R,
    path: &str,
    p: &mut GoalParser<'_>,
    after_read: &mut dyn FnMut(&GoalParser<'_>) -> bool,
) -> Result<(), InputError> {
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
            return Ok(());
        }
        // Process every complete line; keep the tail.
        let data = &buf[..end];
        let mut start = 0;
        // Position of the first `/` at or after `start` (or the end): the fast path reads
        // only up to it.
        let mut slash = memchr::memchr(b'/', data).unwrap_or(end);
        loop {
            if slash < start {
                slash = memchr::memchr(b'/', &data[start..]).map_or(end, |k| start + k);
            }
            if let Some(next) = p.fast_at(&data[..slash], start)? {
                start = next;
                continue;
            }
            let Some(j) = memchr::memchr(b'\n', &data[start..]) else {
                break;
            };
            p.line(&data[start..start + j])?;
            start += j + 1;
        }
        buf.copy_within(start..end, 0);
        have = end - start;
        if !after_read(p) {
            return Ok(());
        }
    }
}

/// Per-rank label table: open addressing, generation-stamped so that starting a new rank
/// block costs nothing, no allocation per label. Labels of the form `l<N>` (N written without
/// leading zeros, below [`DENSE_MAX`]), which is what generators and `txt2bin`-style tools
/// write, live in a plain array indexed by N instead: no hashing, no string compare. A given
/// label always goes to the same table, so the split is invisible.
struct Labels {
    slots: Vec<Slot>,
    arena: Vec<u8>,
    gen: u32,
    count: usize,
    /// `(generation, op)` for label `l<index>`.
    dense: Vec<(u32, u32)>,
}

/// Labels `l0` .. `l<DENSE_MAX - 1>` use the dense array (at most 8 MiB).
const DENSE_MAX: u64 = 1 << 20;

/// `Some(N)` for a label `l<N>` in canonical decimal (no sign, no leading zero) below DENSE_MAX.
#[inline]
fn dense_index(key: &[u8]) -> Option<usize> {
    let (&first, digits) = key.split_first()?;
    if first != b'l' || digits.is_empty() || digits.len() > 7 {
        return None;
    }
    if digits[0] == b'0' && digits.len() > 1 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as u64;
    }
    (v < DENSE_MAX).then_some(v as usize)
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
            dense: Vec::new(),
        }
    }
    fn reset(&mut self) {
        self.gen = self.gen.wrapping_add(1);
        if self.gen == 0 {
            self.slots.iter_mut().for_each(|s| *s = Slot::default());
            self.dense.iter_mut().for_each(|d| *d = (0, 0));
            self.gen = 1;
        }
        self.arena.clear();
        self.count = 0;
    }
    #[inline]
    fn find(&self, key: &[u8]) -> Option<u32> {
        if let Some(i) = dense_index(key) {
            return match self.dense.get(i) {
                Some(&(g, op)) if g == self.gen => Some(op),
                _ => None,
            };
        }
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
    #[inline]
    fn insert(&mut self, key: &[u8], op: u32) -> bool {
        if let Some(i) = dense_index(key) {
            if i >= self.dense.len() {
                let n = (i + 1)
                    .max(self.dense.len() * 2)
                    .max(64)
                    .min(DENSE_MAX as usize);
                self.dense.resize(n, (0, 0));
            }
            let d = &mut self.dense[i];
            if d.0 == self.gen {
                return false;
            }
            *d = (self.gen, op);
            return true;
        }
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
    /// Try [`GoalParser::fast_at`] before the general statement parser (tests turn it off to
    /// compare the two).
    fast: bool,
    /// Lines the general parser handled.
    general_lines: u64,
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

/// The fast path's cursor: tokens of one line read straight from the input buffer, 8 bytes at
/// a time. `d` ends before the next `/` in the input (a comment may start there), so no token
/// it returns can hold one. It gives up (`None`) at the end of `d` (the line may continue
/// past it) and on any byte below `!` other than the separators; the general parser then
/// takes the line.
struct Cur<'a> {
    d: &'a [u8],
    i: usize,
}

/// Lanes of `w` holding a byte below 0x21 (`' '` and every control byte) get their top bit
/// set; lanes above the first such byte may be set spuriously (borrows), never lanes below,
/// so the lowest set bit marks the first one.
#[inline]
fn below_bang(w: u64) -> u64 {
    w.wrapping_sub(0x2121_2121_2121_2121) & !w & 0x8080_8080_8080_8080
}

impl<'a> Cur<'a> {
    /// Skip blanks: `Some(true)` at a token, `Some(false)` at the newline, `None` to give up.
    #[inline(always)]
    fn skip(&mut self) -> Option<bool> {
        loop {
            let c = *self.d.get(self.i)?;
            // Tests in the order of their frequency (a jump table here mispredicts).
            if c > b' ' {
                return Some(true);
            }
            if c == b' ' || c == b'\t' || c == b'\r' {
                self.i += 1;
            } else {
                // A newline ends the line; any other control byte starts a token, which
                // `word_here` refuses.
                return Some(c != b'\n');
            }
        }
    }
    /// The token at the cursor (call after `skip` returned `Some(true)`).
    #[inline(always)]
    fn word_here(&mut self) -> Option<&'a [u8]> {
        let st = self.i;
        let mut i = st;
        loop {
            let Some(eight) = self.d.get(i..i + 8) else {
                // The last bytes of `d`: one at a time.
                while *self.d.get(i)? > b' ' {
                    i += 1;
                }
                break;
            };
            let eight: [u8; 8] = eight.try_into().ok()?;
            let m = below_bang(u64::from_le_bytes(eight));
            if m != 0 {
                i += (m.trailing_zeros() / 8) as usize;
                break;
            }
            i += 8;
        }
        let c = self.d[i];
        if i == st || !(c == b' ' || c == b'\n' || c == b'\t' || c == b'\r') {
            return None;
        }
        self.i = i;
        Some(&self.d[st..i])
    }
    /// The next token, which must exist on this line.
    #[inline(always)]
    fn word(&mut self) -> Option<&'a [u8]> {
        if self.skip()? {
            self.word_here()
        } else {
            None
        }
    }
    /// `Some(Some(token))`, `Some(None)` at the end of the line, `None` to give up.
    #[inline(always)]
    fn maybe_word(&mut self) -> Option<Option<&'a [u8]>> {
        if self.skip()? {
            self.word_here().map(Some)
        } else {
            Some(None)
        }
    }
}

/// A line the fast path recognised, parsed but not yet applied.
enum Fast<'a> {
    Op {
        label: &'a [u8],
        kind: OpKind,
        peer: u32,
        tag: u32,
        size: u64,
        cpu: u8,
        nic: u8,
    },
    Dep {
        a: &'a [u8],
        b: &'a [u8],
        start_only: bool,
    },
    /// `}`
    Close,
    /// Nothing but blanks.
    Blank,
    /// `rank N {`
    Rank(u32),
}

/// The fast path's parse of the line at the cursor (see [`GoalParser::fast_at`]); on success
/// the cursor is at its newline. `None` for anything but a blank line, `}`, `rank N {`, a
/// well-formed labelled `send`/`recv`/`calc` (sizes `<N>b`, peers and tags not `-1`) or a
/// `requires`/`irequires` line between two labels.
#[inline]
fn fast_parse<'a>(c: &mut Cur<'a>) -> Option<Fast<'a>> {
    let Some(t0) = c.maybe_word()? else {
        return Some(Fast::Blank);
    };
    let Some(label) = t0.strip_suffix(b":") else {
        match t0 {
            b"}" => {
                return c.maybe_word()?.is_none().then_some(Fast::Close);
            }
            b"rank" => {
                let r = num(c.word()?).filter(|&r| r <= u32::MAX as u64)?;
                if c.word()? != b"{" || c.maybe_word()?.is_some() {
                    return None;
                }
                return Some(Fast::Rank(r as u32));
            }
            b"num_ranks" | b"{" | b"send" | b"recv" | b"calc" => return None,
            _ => {}
        }
        let start_only = match c.word()? {
            b"requires" => false,
            b"irequires" => true,
            _ => return None,
        };
        let b = c.word()?;
        if c.maybe_word()?.is_some() {
            return None;
        }
        return Some(Fast::Dep {
            a: t0,
            b,
            start_only,
        });
    };
    if label.is_empty() {
        return None;
    }
    let kind = match c.word()? {
        b"send" => OpKind::Send,
        b"recv" => OpKind::Recv,
        b"calc" => OpKind::Calc,
        _ => return None,
    };
    let sz = c.word()?;
    let (peer, size) = if kind == OpKind::Calc {
        (0u32, num(sz)?)
    } else {
        let size = num(sz.strip_suffix(b"b")?)?;
        let want: &[u8] = if kind == OpKind::Send { b"to" } else { b"from" };
        if c.word()? != want {
            return None;
        }
        let peer = num(c.word()?).filter(|&p| p < ANY as u64)? as u32;
        (peer, size)
    };
    let (mut tag, mut cpu, mut nic) = (0u32, 0u8, 0u8);
    while let Some(k) = c.maybe_word()? {
        let v = num(c.word()?)?;
        match k {
            b"tag" if kind != OpKind::Calc && v < ANY as u64 => tag = v as u32,
            b"cpu" if v < 255 => cpu = v as u8,
            b"nic" if v < 255 => nic = v as u8,
            _ => return None,
        }
    }
    Some(Fast::Op {
        label,
        kind,
        peer,
        tag,
        size,
        cpu,
        nic,
    })
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
            fast: true,
            general_lines: 0,
        }
    }

    fn err(&self, msg: impl Into<String>) -> InputError {
        InputError::Syntax {
            path: self.path.to_string(),
            line: self.line_no,
            msg: msg.into(),
        }
    }

    /// The fast path: parse the line starting at `data[pos..]` (`data` holds no `/`) in one
    /// pass over its bytes, straight into the builder. Returns the position after its newline, or `Ok(None)`,
    /// having changed nothing, for a line it does not handle, one the general parser would
    /// reject (which then handles the line and words the error), or one that may continue
    /// past `data`. So the result is always the general parser's.
    #[inline]
    fn fast_at(&mut self, data: &[u8], pos: usize) -> Result<Option<usize>, InputError> {
        if !self.fast || self.in_comment || self.pending_brace.is_some() {
            return Ok(None);
        }
        let mut c = Cur { d: data, i: pos };
        let Some(parsed) = fast_parse(&mut c) else {
            return Ok(None);
        };
        let next = c.i + 1;
        match (parsed, self.rank) {
            (Fast::Blank, _) => {}
            (Fast::Close, Some(_)) => self.rank = None,
            (Fast::Rank(r), None) => {
                if self.b.is_none() {
                    return Ok(None);
                }
                self.line_no += 1;
                self.open_rank(r)?;
                return Ok(Some(next));
            }
            (Fast::Dep { a, b, start_only }, Some(_)) => {
                let (Some(x), Some(y), Some(bld)) =
                    (self.labels.find(a), self.labels.find(b), self.b.as_mut())
                else {
                    return Ok(None);
                };
                if x == y {
                    return Ok(None);
                }
                bld.depend(x, y, start_only);
            }
            (
                Fast::Op {
                    label,
                    kind,
                    peer,
                    tag,
                    size,
                    cpu,
                    nic,
                },
                Some(rank),
            ) => {
                let Some(bld) = self.b.as_mut() else {
                    return Ok(None);
                };
                self.line_no += 1;
                let id = bld
                    .push(rank, kind, peer, tag, size, cpu, nic, kind as u8 + 1)
                    .map_err(|e| InputError::Syntax {
                        path: self.path.to_string(),
                        line: self.line_no,
                        msg: e.to_string(),
                    })?;
                if !self.labels.insert(label, id) {
                    return Err(self.err(format!(
                        "label `{}` defined twice in rank {rank}",
                        show(label)
                    )));
                }
                return Ok(Some(next));
            }
            _ => return Ok(None),
        }
        self.line_no += 1;
        Ok(Some(next))
    }

    fn line(&mut self, raw: &[u8]) -> Result<(), InputError> {
        self.line_no += 1;
        self.general_lines += 1;
        if self.in_comment || memchr::memchr(b'/', raw).is_some() {
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

    /// Start the schedule once the number of ranks is known.
    fn begin(&mut self, n: u32) {
        let mut b = ScheduleBuilder::new(n);
        // About 30 bytes of text per operation, one dependency per operation.
        let est = (self.size_hint / 30).min(1 << 31) as usize;
        b.reserve(est, est);
        self.seen = vec![false; n as usize];
        self.b = Some(b);
    }

    /// Append what `q` parsed from the text that follows this parser's, as if this parser had
    /// read it: `q` started with no rank block open and outside any comment, which the caller
    /// checked is where this parser stopped. Returns false, changing nothing, when the two
    /// parts conflict in a way only reading them in order words right (a rank opened in both,
    /// too many operations).
    fn absorb(&mut self, q: GoalParser<'_>) -> bool {
        let (Some(b), Some(qb)) = (self.b.as_mut(), q.b) else {
            return false;
        };
        if b.len() + qb.len() > MAX_OPS
            || b.num_ranks() != qb.num_ranks()
            || self.seen.iter().zip(&q.seen).any(|(&x, &y)| x && y)
        {
            return false;
        }
        b.append(qb);
        for (x, y) in self.seen.iter_mut().zip(q.seen) {
            *x |= y;
        }
        self.line_no += q.line_no;
        self.general_lines += q.general_lines;
        self.in_comment = q.in_comment;
        self.rank = q.rank;
        self.pending_brace = q.pending_brace;
        true
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
                self.begin(n as u32);
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A reader handing out at most `step` bytes per call, so lines straddle reads.
    struct Trickle<'a> {
        d: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.step.min(out.len()).min(self.d.len());
            out[..n].copy_from_slice(&self.d[..n]);
            self.d = &self.d[n..];
            Ok(n)
        }
    }

    /// A schedule as comparable text.
    fn describe(s: &Schedule) -> String {
        format!(
            "{} {:?} {:?} {:?} {:?} {} {}",
            s.num_ranks, s.ops, s.dep_start, s.dep_list, s.class_names, s.num_cpus, s.num_nics
        )
    }

    /// Parse with or without the fast path; a schedule as comparable parts, or the error text.
    fn parse(text: &[u8], fast: bool, step: usize) -> Result<String, String> {
        let mut p = GoalParser::new("<t>", text.len() as u64);
        p.fast = fast;
        let mut r = Trickle { d: text, step };
        read_lines(&mut r, "<t>", &mut p, &mut |_| true).map_err(|e| e.to_string())?;
        Ok(describe(&p.finish().map_err(|e| e.to_string())?))
    }

    /// Parse the file `path` in two parts cut at `split`; the schedule or error (with the
    /// path shown as `<t>`) and whether the parts were joined.
    fn parse_split(path: &str, split: u64) -> (Result<String, String>, bool) {
        let f = std::fs::File::open(path).expect("open");
        let size = f.metadata().expect("stat").len();
        let mut p = GoalParser::new(path, size);
        let mut joined = false;
        let r = parse_two_parts(&f, path, size, split, &mut p)
            .and_then(|j| {
                joined = j;
                p.finish()
            })
            .map(|s| describe(&s))
            .map_err(|e| e.to_string().replace(path, "<t>"));
        (r, joined)
    }

    fn tmp_file(name: &str, text: &str) -> String {
        let dir = std::env::temp_dir().join(format!("chama-goal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p.to_string_lossy().into_owned()
    }

    /// Cutting the file at any line start and parsing the second part on another thread gives
    /// what reading it in order gives; returns how many cuts were joined.
    fn split_agrees(name: &str, text: &str) -> usize {
        split_agrees_every(name, text, 1)
    }

    /// [`split_agrees`] at every `k`-th line start.
    fn split_agrees_every(name: &str, text: &str, k: usize) -> usize {
        let path = tmp_file(name, text);
        let want = parse(text.as_bytes(), false, usize::MAX);
        let mut joined = 0;
        for (i, _) in text.match_indices('\n').step_by(k) {
            let (got, j) = parse_split(&path, i as u64 + 1);
            assert_eq!(got, want, "cut at byte {}, input:\n{text}", i + 1);
            joined += j as usize;
        }
        let _ = std::fs::remove_file(&path);
        joined
    }

    /// The general parser alone (every line through `GoalParser::line`, as before the fast
    /// path existed) and the fast path agree, whatever the read sizes.
    fn agree(text: &str) -> Result<String, String> {
        let want = parse(text.as_bytes(), false, usize::MAX);
        for step in [usize::MAX, 1, 2, 3, 7, 16, 61] {
            let got = parse(text.as_bytes(), true, step);
            assert_eq!(got, want, "read size {step}, input:\n{text}");
        }
        want
    }

    const HEAD: &str = "num_ranks 4\nrank 0 {\n";

    #[test]
    fn fast_path_matches_general_parser_on_tricky_inputs() {
        let ok = [
            "num_ranks 2\nrank 0 {\nl1: send 8b to 1 tag 3\nl2: calc 5\nl2 requires l1\n}\nrank 1 {\nl1: recv 8b from 0 tag 3\n}\n",
            // CRLF, tabs, blank lines, no final newline.
            "num_ranks 2\r\n\r\nrank 0 {\r\n\tl1: send 8b to 1 tag 0\r\n  l2:\tcalc 7 cpu 2\r\nl2 irequires l1\r\n}\r\nrank 1\r\n{\r\nl1: recv 8b from -1 tag -1 nic 1\r\n}",
            // Comments everywhere, including across lines and inside a rank block.
            "// head\nnum_ranks 2 // two\n/* a\n b */ rank 0 { /* x */\nl1: send 8b to 1 // c\nl2/*y*/: calc 3\n}\n/*\nrank 1 {\n*/\nrank 1 {\nl1: recv 8 b from 0\n}\n",
            // Labels that are not l<N>, leading zeros, very long numbers, labels with `/`.
            "num_ranks 2\nrank 0 {\nl01: calc 1\nl1: calc 2\nfoo: calc 3\nl99999999: calc 4\na/b: calc 5\nl1 requires l01\nfoo irequires l1\nl99999999 requires foo\na/b requires l1\n}\nrank 1 {\n}\n",
            // `label :` form, unlabelled ops, reused labels in the next rank, `rank 1{`.
            "num_ranks 2\nrank 0 {\nx : calc 1\nsend 1b to 1\nl1: calc 2\nl1 requires x\n}\nrank 1{\nl1: recv 1b from 0\nx: calc 9\nx requires l1\n}\n",
            // Huge values, cpu/nic 254, keys in any order.
            "num_ranks 2\nrank 1 {\nl1: send 18446744073709551615b to 0 nic 254 cpu 254 tag 4294967294\nl2: calc 18446744073709551615\n}\nrank 0 {\nl1: recv 1b from 1 tag 4294967294\n}\n",
        ];
        for (k, t) in ok.iter().enumerate() {
            assert!(agree(t).is_ok(), "should parse:\n{t}");
            split_agrees(&format!("ok{k}.goal"), t);
        }
        let bad = [
            ("l1: send 8b to 9\n}\n", ":3:"),
            (
                "l1: calc 1\nl1: calc 2\n}\n",
                ":4: label `l1` defined twice in rank 0",
            ),
            ("l2 requires l1\n}\n", ":3: label `l2` is not defined"),
            (
                "l1: calc 1\nl1 requires l1\n}\n",
                ":4: `l1` depends on itself",
            ),
            (
                "l1: calc 1\nl2: calc 1\nl2 requires l1 x\n}\n",
                ":5: unexpected `x`",
            ),
            ("l1: send -1b to 1\n}\n", ":3: bad message size"),
            ("l1: send 1b to -1\n}\n", ":3: bad peer rank"),
            ("l1: calc 1 tag 2\n}\n", ":3: unexpected `tag`"),
            ("l1: calc 1 cpu 255\n}\n", ":3: bad cpu"),
            ("l1: calc 1 nic\n}\n", ":3: `nic` needs a value"),
            ("l1: calc 99999999999999999999\n}\n", ":3: bad calc time"),
            ("l1: calc 1\n", ":4: end of file inside rank 0"),
            ("l1: calc 1\n}\n}\n", ":5: `}` without"),
            ("l1: calc 1\n}\nrank 0 {\n}\n", ":5: rank 0 appears twice"),
            ("}\nrank 9 {\n}\n", ":4: rank 9 but num_ranks is 4"),
            ("rank 1 {\n", ":3: `rank` inside a rank block"),
            ("l1: calc 1 /* open\n}\n", "unterminated `/*`"),
            ("l1: sned 1b to 1\n}\n", ":3: expected `send`"),
        ];
        for (k, (body, want)) in bad.iter().enumerate() {
            let t = format!("{HEAD}{body}");
            split_agrees(&format!("bad{k}.goal"), &t);
            let e = agree(&t).expect_err(&t);
            assert!(e.contains(want), "error `{e}` should contain `{want}`");
        }
        // A vertical tab is no separator: it belongs to the label.
        assert!(agree(&format!("{HEAD}\x0bl1: calc 1\nl1 requires \x0bl1\n}}\n")).is_err());
        assert!(agree(&format!(
            "{HEAD}\x0bl1: calc 1\nl1: calc 2\nl1 requires \x0bl1\n}}\n"
        ))
        .is_ok());
        assert!(agree("rank 0 {\n}\n").is_err());
        assert!(agree("num_ranks 2\nnum_ranks 2\n").is_err());
    }

    /// Lines built from the GOAL vocabulary plus the odd comment, CR, tab and error.
    fn goal_line() -> impl Strategy<Value = String> {
        let label = prop::sample::select(vec!["l1", "l2", "l3", "l10", "l01", "x", "a/b", "l"]);
        let num = prop::sample::select(vec![
            "0",
            "1",
            "3",
            "-1",
            "42",
            "255",
            "99999999999999999999",
        ]);
        let sep = prop::sample::select(vec![" ", "  ", "\t", " \r"]);
        let op = (
            label.clone(),
            prop::sample::select(vec!["send", "recv", "calc", "sned"]),
            num.clone(),
            prop::sample::select(vec!["b", " b", ""]),
            prop::sample::select(vec!["to", "from"]),
            num.clone(),
            prop::sample::select(vec![
                "", " tag 1", " tag -1", " cpu 1", " nic 2", " tag", " cpu 255",
            ]),
            sep.clone(),
        )
            .prop_map(|(l, o, n, b, w, p, rest, s)| format!("{l}:{s}{o} {n}{b} {w} {p}{rest}"));
        let dep = (
            label.clone(),
            prop::sample::select(vec!["requires", "irequires", "needs"]),
            label,
            sep,
        )
            .prop_map(|(a, r, b, s)| format!("{a}{s}{r} {b}"));
        let rank = (
            prop::sample::select(vec!["0", "1", "2", "3", "4"]),
            prop::sample::select(vec![" {", "{", "", " { x"]),
        )
            .prop_map(|(r, b)| format!("rank {r}{b}"));
        let misc = prop::sample::select(vec![
            "}",
            "{",
            "",
            "   ",
            "// c",
            "/* c",
            "*/",
            "x /* y */",
            "\r",
            "num_ranks 4",
        ])
        .prop_map(str::to_string);
        let line = prop_oneof![4 => op, 2 => dep, 1 => rank, 1 => misc];
        (line, prop::sample::select(vec!["\n", "\r\n"])).prop_map(|(l, e)| l + e)
    }

    proptest! {
        #[test]
        fn fast_path_matches_general_parser(lines in prop::collection::vec(goal_line(), 0..40), tail in any::<bool>()) {
            let mut t = String::from(HEAD);
            for l in &lines {
                t.push_str(l);
            }
            if tail {
                t.push_str("}\n");
            }
            let _ = agree(&t);
            split_agrees_every("prop.goal", &t, 5);
        }
    }

    #[test]
    fn two_part_parse_joins_at_rank_lines_and_matches_one_part() {
        let text = "num_ranks 3\n// x\nrank 0 {\nl1: send 8b to 1 tag 0 cpu 2\nl2: calc 5\nl2 requires l1\n}\n\nrank 1 {\nl1: recv 8b from 0 tag 0\nl2: send 8b to 2 tag 1 nic 3\nl2 irequires l1\n}\nrank 2 {\nl1: recv 8b from -1 tag 1\n}\n";
        // Cuts outside rank blocks join: before the comment, `rank 0`, the blank line,
        // `rank 1`, `rank 2`, and at the very end.
        assert_eq!(split_agrees("join.goal", text), 6);
        // A rank opened on both sides, a comment open at the cut: read in order instead.
        let dup = "num_ranks 2\nrank 0 {\n}\nrank 1 {\n}\nrank 0 {\n}\n";
        assert_eq!(split_agrees("dup.goal", dup), 0);
        let comment = "num_ranks 2\n/*\nrank 0 {\n}\n*/\nrank 1 {\n}\n";
        split_agrees("comment.goal", comment);
        let path = tmp_file("whole.goal", text);
        assert_eq!(
            parse_goal_file_split(&path, Some(1))
                .map(|s| describe(&s))
                .map_err(|e| e.to_string()),
            parse(text.as_bytes(), true, usize::MAX)
        );
        let rank1 = text.find("rank 1").expect("rank 1") as u64;
        let f = std::fs::File::open(&path).expect("open");
        assert_eq!(find_split(&f, 20), Some(rank1));
        assert_eq!(find_split(&f, text.len() as u64 - 3), None);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn fast_path_takes_every_line_of_written_goal() {
        let mut b = ScheduleBuilder::new(3);
        let c = b.calc(0, 5, 0);
        let s0 = b.send(0, 1, 7, 64, 0);
        b.depend(s0, c, false);
        let r = b.recv(1, 0, 7, 64, 0);
        let s1 = b.send(1, 2, 0, 8, 0);
        b.depend(s1, r, true);
        b.recv(2, ANY, ANY, 8, 0);
        let s = b.finish().expect("valid");
        let mut text = Vec::new();
        write_goal(&s, &mut text).expect("write");
        let mut p = GoalParser::new("<t>", text.len() as u64);
        read_lines(&mut text.as_slice(), "<t>", &mut p, &mut |_| true).expect("parse");
        // Only `num_ranks` and the receive from `-1` (ANY) need the general parser.
        assert_eq!(p.general_lines, 2);
        let back = p.finish().expect("valid");
        // GOAL has no classes: the reader files operations by kind.
        let unclassed = |o: &[crate::schedule::Op]| {
            o.iter()
                .map(|&x| crate::schedule::Op { class: 0, ..x })
                .collect::<Vec<_>>()
        };
        assert_eq!(unclassed(&back.ops), unclassed(&s.ops));
        assert_eq!(back.dep_list, s.dep_list);
    }

    #[test]
    fn numbers_are_plain_decimal_u64() {
        assert_eq!(num(b"0"), Some(0));
        assert_eq!(num(b"007"), Some(7));
        assert_eq!(num(b"9999999999999999999"), Some(9_999_999_999_999_999_999));
        assert_eq!(num(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(num(b"18446744073709551616"), None);
        assert_eq!(num(b"99999999999999999999"), None);
        assert_eq!(num(b"000000000000000000001"), None);
        for t in [&b""[..], b"-1", b"+1", b"1b", b" 1", b"1/", b":", b"\x00"] {
            assert_eq!(num(t), None, "{}", show(t));
        }
    }

    #[test]
    fn dense_labels_only_take_canonical_l_numbers() {
        assert_eq!(dense_index(b"l0"), Some(0));
        assert_eq!(dense_index(b"l17"), Some(17));
        assert_eq!(dense_index(b"l1048575"), Some(1_048_575));
        for k in [
            &b"l"[..],
            b"l01",
            b"l1048576",
            b"m1",
            b"l1x",
            b"L1",
            b"l-1",
            b"",
        ] {
            assert_eq!(dense_index(k), None, "{}", show(k));
        }
        let mut l = Labels::new();
        assert!(l.insert(b"l5", 7));
        assert!(l.insert(b"l05", 8));
        assert!(!l.insert(b"l5", 9));
        assert_eq!((l.find(b"l5"), l.find(b"l05")), (Some(7), Some(8)));
        l.reset();
        assert_eq!(l.find(b"l5"), None);
    }
}
