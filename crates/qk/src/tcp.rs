//! The inter-node fabric: the node engine (run by the PCT on its service core) owns one
//! authenticated TCP connection per peer node for a job and carries the job's headers between the
//! node's shared-memory queues and the network.
//!
//! * Small messages travel eagerly: header and payload in one frame.
//! * Large messages use a get-based rendezvous: the sending node announces the message (RTS); the
//!   receiving node's engine, once it has staging room, asks for the bytes (GET); the sending
//!   engine streams them straight from the sender's buffer in the job heap (DATA) and tells the
//!   sending rank its buffer is free; the receiving engine hands the target rank a reference to
//!   the staged bytes, and the rank copies them once into the matched descriptor.
//! * The connection handshake is an HMAC-SHA256 challenge-response over fresh nonces with the
//!   cluster key: a host without the key cannot complete it, so it cannot inject a message.
//! * The [`Transport`] trait is the boundary: a libfabric backend is another implementation of it.
//!
//! Per-process state does not grow with the number of nodes: ranks only ever talk to their node's
//! engine through the queue they already have.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::counters::{slot, DropReason};
use crate::endpoint::{decode_ref, encode_ref, HeapAlloc};
use crate::fabric::{flag, op, Hdr, Port, HDR_LEN};
use crate::region::Region;
use crate::sys::Memfd;
use crate::QkError;

const HELLO_MAGIC: &[u8; 8] = b"PUMAQKT1";
const NONCE: usize = 32;
const MAC: usize = 32;

/// Frame kinds.
mod kind {
    pub const MSG: u8 = 1;
    pub const RTS: u8 = 2;
    pub const GET: u8 = 3;
    pub const DATA: u8 = 4;
    /// Never on the wire (a connection that sends it is cut): a DATA frame whose bytes the
    /// transport read straight into the place the engine gave for its token
    /// ([`super::Transport::poll_placing`]); the body is the token alone.
    pub const PLACED: u8 = 0x84;
}

/// Bytes of a DATA frame before its payload: length, kind and pad, job, destination, token.
const DATA_HEAD: usize = 4 + 12 + 8;

/// A DATA frame longer than this is read straight into its staging place when the engine gives
/// one: no receive-buffer copy and no frame copy of the payload.
const DIRECT_MIN: u64 = 64 << 10;

/// Where a large DATA frame's payload goes: called with (peer node, job, token, payload length)
/// once its head is in, and again on every later poll until the payload is in; returns the
/// place (exactly that long) or `None` to have the frame buffered and handed over as usual.
/// The place must stay the same until the transport hands over [`kind::PLACED`] for the token.
pub type Place<'a> = dyn FnMut(u32, u32, u64, u64) -> Option<&'a mut [u8]> + 'a;

/// A frame: kind, job, destination rank, then kind-specific bytes. On the wire it is preceded
/// by its length (u32, little-endian).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Frame kind.
    pub kind: u8,
    /// Job id.
    pub job: u32,
    /// Destination world rank.
    pub dst: u32,
    /// Kind-specific body.
    pub body: Vec<u8>,
}

impl Frame {
    /// Appends the frame's length, head and body to `v`, its length counting `extra` bytes of
    /// tail that follow it on the wire.
    fn encode_head_into(&self, v: &mut Vec<u8>, extra: usize) {
        let len = 12 + self.body.len() + extra;
        v.reserve(4 + 12 + self.body.len());
        v.extend_from_slice(&(len as u32).to_le_bytes());
        v.push(self.kind);
        v.extend_from_slice(&[0, 0, 0]);
        v.extend_from_slice(&self.job.to_le_bytes());
        v.extend_from_slice(&self.dst.to_le_bytes());
        v.extend_from_slice(&self.body);
    }

    fn decode(b: &[u8]) -> Option<Frame> {
        if b.len() < 12 {
            return None;
        }
        let job = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let dst = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        Some(Frame {
            kind: b[0],
            job,
            dst,
            body: b[12..].to_vec(),
        })
    }
}

/// The boundary between the node engine and a network. TCP is [`TcpTransport`]; a libfabric
/// backend would be another implementation.
pub trait Transport: Send {
    /// Sends `frame` to node `node`, followed by `tail` bytes (payload borrowed from shared memory).
    /// A transport may hold the frame back to send it with the next ones: it is on its way once
    /// [`Transport::flush`] returns. Frames to one node leave in the order they were given.
    fn send(&mut self, node: u32, frame: &Frame, tail: &[u8]) -> Result<(), QkError>;
    /// Sends every frame [`Transport::send`] held back. The engine calls it at the end of each
    /// batch of sends, before it looks for more work or sleeps.
    fn flush(&mut self) -> Result<(), QkError> {
        Ok(())
    }
    /// Hands every frame that has arrived to `f` (never blocks).
    fn poll(&mut self, f: &mut dyn FnMut(u32, Frame)) -> usize;
    /// As [`Transport::poll`], and the payload of a large DATA frame may be read straight into
    /// the place `place` gives for it, the frame then handed over as [`kind::PLACED`].
    fn poll_placing(&mut self, f: &mut dyn FnMut(u32, Frame), place: &mut Place<'_>) -> usize {
        let _ = place;
        self.poll(f)
    }
    /// The engine is about to sleep on its doorbell: arrange to be rung when frames arrive.
    /// Returns true when frames are already waiting (the engine must not sleep then).
    fn sleep_begin(&mut self) -> bool {
        false
    }
    /// The engine woke up.
    fn sleep_end(&mut self) {}
}

/// TCP transport: one authenticated connection per peer node, read and written by the engine
/// itself without blocking; one watcher thread rings the engine while it sleeps.
pub struct TcpTransport {
    conns: Vec<Conn>,
    max: u64,
    st: Arc<WakeState>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

fn proof(
    key: &[u8],
    prover: u32,
    verifier: u32,
    job: u32,
    challenge: &[u8],
    own: &[u8],
) -> Hmac<Sha256> {
    // A key of any length is accepted by HMAC.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(b"puma-qk-tcp-v1");
    m.update(&prover.to_le_bytes());
    m.update(&verifier.to_le_bytes());
    m.update(&job.to_le_bytes());
    m.update(challenge);
    m.update(own);
    m
}

/// Runs the key handshake on a fresh connection. Returns the peer's node id once the peer has
/// proved it holds `key` for `job` (and we have proved it to the peer).
pub fn handshake(
    s: &mut TcpStream,
    key: &[u8],
    me: u32,
    job: u32,
    expect: Option<u32>,
) -> Result<u32, QkError> {
    let peer_addr = s
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let fail = |why: String| QkError::Handshake {
        peer: peer_addr.clone(),
        why,
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| fail(e.to_string()))?;
    let mut nonce = [0u8; NONCE];
    crate::sys::random_bytes(&mut nonce).map_err(|e| fail(format!("no randomness: {e}")))?;
    let mut hello = Vec::with_capacity(8 + 8 + NONCE);
    hello.extend_from_slice(HELLO_MAGIC);
    hello.extend_from_slice(&me.to_le_bytes());
    hello.extend_from_slice(&job.to_le_bytes());
    hello.extend_from_slice(&nonce);
    s.write_all(&hello)
        .map_err(|e| fail(format!("sending hello: {e}")))?;
    let mut theirs = [0u8; 8 + 8 + NONCE];
    s.read_exact(&mut theirs)
        .map_err(|e| fail(format!("reading hello: {e}")))?;
    if &theirs[..8] != HELLO_MAGIC {
        return Err(fail("not a QK node engine (bad hello)".into()));
    }
    let peer = u32::from_le_bytes([theirs[8], theirs[9], theirs[10], theirs[11]]);
    let pjob = u32::from_le_bytes([theirs[12], theirs[13], theirs[14], theirs[15]]);
    let pnonce = &theirs[16..];
    if pjob != job {
        return Err(fail(format!("peer serves job {pjob}, not {job}")));
    }
    if let Some(e) = expect {
        if e != peer {
            return Err(fail(format!(
                "expected node {e}, peer says it is node {peer}"
            )));
        }
    }
    if pnonce == nonce {
        return Err(fail("peer echoed our nonce".into()));
    }
    let mine = proof(key, me, peer, job, pnonce, &nonce)
        .finalize()
        .into_bytes();
    s.write_all(&mine)
        .map_err(|e| fail(format!("sending proof: {e}")))?;
    let mut got = [0u8; MAC];
    s.read_exact(&mut got).map_err(|_| {
        fail("peer did not prove it holds the cluster key (connection closed)".into())
    })?;
    proof(key, peer, me, job, &nonce, pnonce)
        .verify_slice(&got)
        .map_err(|_| fail("peer does not hold the cluster key".into()))?;
    s.set_read_timeout(None).map_err(|e| fail(e.to_string()))?;
    let _ = s.set_nodelay(true);
    Ok(peer)
}

/// One peer connection, read by the engine itself without blocking.
struct Conn {
    node: u32,
    s: TcpStream,
    /// Receive buffer: `buf[..filled]` are bytes received and not yet made into frames; the rest
    /// is room already allocated (grown, never shrunk below 64 KiB, so polling does not allocate).
    buf: Vec<u8>,
    filled: usize,
    /// Frames taken off the socket and not yet handed to the engine.
    ready: VecDeque<Frame>,
    /// The peer closed or broke the connection, or sent a framing error: no more reads.
    dead: bool,
    /// Frames given to [`Transport::send`] and not written yet, in order: one pass of the engine
    /// leaves in one `write` per peer instead of one per frame (with `TCP_NODELAY` each write is
    /// a trip through both TCP stacks of its own).
    out: Vec<u8>,
    /// A large DATA frame being read straight into its place; while set, `buf[..filled]` holds
    /// the next bytes of its payload (read when no place was at hand) before anything else.
    direct: Option<Direct>,
}

/// A DATA frame whose payload is being read into the place the engine gave.
struct Direct {
    job: u32,
    dst: u32,
    token: u64,
    len: usize,
    got: usize,
}

impl Conn {
    fn new(node: u32, s: TcpStream) -> Conn {
        Conn {
            node,
            s,
            buf: vec![0; 64 << 10],
            filled: 0,
            ready: VecDeque::new(),
            dead: false,
            out: Vec::with_capacity(64 << 10),
            direct: None,
        }
    }

    /// Reads whatever the socket holds now and turns complete frames into `ready`. Never blocks.
    /// With `place`, a large DATA frame's payload goes straight to the place it gives.
    fn fill(&mut self, max: u64, mut place: Option<&mut Place<'_>>) -> usize {
        let mut got = 0;
        while !self.dead {
            if self.direct.is_some() {
                match self.fill_direct(place.as_deref_mut()) {
                    Some(true) => {
                        got += 1;
                        continue;
                    }
                    Some(false) => break,
                    // No place at hand: read into the buffer (the payload's next bytes).
                    None => {}
                }
            } else if self.filled > 0 {
                got += self.split(max, place.as_deref_mut());
                if self.direct.is_some() || self.dead {
                    continue;
                }
            }
            // Room for the whole frame being received (unless it may go to its place), at least
            // 64 KiB.
            let need = if self.direct.is_some() {
                // A payload with no place at hand (the engine waits to write, or is about to
                // sleep): take it all in all the same, or two engines writing large frames to
                // each other would wait on each other.
                self.filled + (64 << 10)
            } else {
                match self.frame_len() {
                    Some(l) if self.filled >= DATA_HEAD => (l as usize + 4).max(64 << 10),
                    _ => 64 << 10,
                }
            };
            if self.buf.len() < need {
                self.buf.resize(need, 0);
            }
            let room = self.buf.len() - self.filled;
            match self.s.read(&mut self.buf[self.filled..]) {
                Ok(0) => self.dead = true,
                Ok(n) => {
                    self.filled += n;
                    if self.direct.is_none() {
                        got += self.split(max, place.as_deref_mut());
                    }
                    if n < room && self.direct.is_none() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.dead = true,
            }
        }
        got
    }

    /// Moves the payload of the frame being placed into its place: first what the buffer holds,
    /// then straight from the socket. `Some(true)`: the frame is complete (handed over as
    /// PLACED); `Some(false)`: the socket has no more now; `None`: no place at hand.
    fn fill_direct(&mut self, place: Option<&mut Place<'_>>) -> Option<bool> {
        let d = self.direct.as_mut()?;
        let place = place?;
        let Some(to) = place(self.node, d.job, d.token, d.len as u64).filter(|t| t.len() == d.len)
        else {
            // The engine no longer has the place it gave: the stream cannot be followed.
            self.dead = true;
            return Some(false);
        };
        let take = self.filled.min(d.len - d.got);
        to[d.got..d.got + take].copy_from_slice(&self.buf[..take]);
        self.buf.copy_within(take..self.filled, 0);
        self.filled -= take;
        d.got += take;
        while d.got < d.len {
            match self.s.read(&mut to[d.got..]) {
                Ok(0) => {
                    self.dead = true;
                    return Some(false);
                }
                Ok(n) => d.got += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.dead = true;
                    return Some(false);
                }
            }
        }
        let f = Frame {
            kind: kind::PLACED,
            job: d.job,
            dst: d.dst,
            body: d.token.to_le_bytes().to_vec(),
        };
        self.ready.push_back(f);
        self.direct = None;
        Some(true)
    }

    /// Length field of the frame at the front of the buffer, once its 4 bytes are in.
    fn frame_len(&self) -> Option<u64> {
        if self.filled < 4 {
            return None;
        }
        let l = &self.buf[..4];
        Some(u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as u64)
    }

    /// Moves every complete frame from the buffer to `ready`. With `place`, a large DATA frame
    /// not yet complete whose head is in and for which `place` gives a place starts being read
    /// into it ([`Conn::direct`]).
    fn split(&mut self, max: u64, mut place: Option<&mut Place<'_>>) -> usize {
        let mut n = 0;
        let mut at = 0;
        loop {
            let rest = &self.buf[at..self.filled];
            if rest.len() < 4 {
                break;
            }
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as u64;
            if !(12..=max + 4096).contains(&len) {
                // A framing error from an authenticated peer: stop reading this connection.
                self.dead = true;
                break;
            }
            if rest.len() > 4 && rest[4] == kind::PLACED {
                // Local only: a peer sending it is broken or hostile.
                self.dead = true;
                break;
            }
            if rest.len() < 4 + len as usize {
                if rest.len() >= DATA_HEAD && rest[4] == kind::DATA && len > DIRECT_MIN {
                    if let Some(p) = place.as_deref_mut() {
                        let job = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]);
                        let dst = u32::from_le_bytes([rest[12], rest[13], rest[14], rest[15]]);
                        let token =
                            u64::from_le_bytes(rest[16..DATA_HEAD].try_into().unwrap_or([0; 8]));
                        let plen = len as usize + 4 - DATA_HEAD;
                        if p(self.node, job, token, plen as u64).is_some_and(|t| t.len() == plen) {
                            self.direct = Some(Direct {
                                job,
                                dst,
                                token,
                                len: plen,
                                got: 0,
                            });
                            at += DATA_HEAD;
                        }
                    }
                }
                break;
            }
            match Frame::decode(&rest[4..4 + len as usize]) {
                Some(f) => self.ready.push_back(f),
                None => {
                    self.dead = true;
                    break;
                }
            }
            at += 4 + len as usize;
            n += 1;
        }
        if at > 0 {
            self.buf.copy_within(at..self.filled, 0);
            self.filled -= at;
            // Kept up to `KEEP_RX` (a 4 MiB message used to reallocate and zero 4 MiB, page
            // faults included, every time).
            if self.filled == 0 && self.buf.len() > KEEP_RX {
                self.buf.truncate(64 << 10);
                self.buf.shrink_to_fit();
            }
        }
        n
    }
}

/// State shared between the engine and the thread that watches the sockets while it sleeps.
struct WakeState {
    /// 1 while the engine is asleep (or about to be): the watcher may poll the sockets.
    asleep: std::sync::atomic::AtomicU32,
    closed: AtomicBool,
    /// Per connection, in the watcher's order: stop watching (the engine saw it die).
    dead: Vec<AtomicBool>,
}

/// The watcher: while the engine sleeps, block in poll(2) on the connections and ring the engine
/// when one is readable; while the engine runs, wait for it to sleep again. It never reads.
fn watch(fds: Vec<std::os::fd::RawFd>, st: Arc<WakeState>, wake: impl Fn()) {
    use std::sync::atomic::Ordering::SeqCst;
    while !st.closed.load(SeqCst) {
        if st.asleep.load(SeqCst) == 0 {
            crate::sys::futex_wait(&st.asleep, 0, Duration::from_millis(100));
            continue;
        }
        let live: Vec<std::os::fd::RawFd> = fds
            .iter()
            .zip(&st.dead)
            .filter(|(_, d)| !d.load(SeqCst))
            .map(|(f, _)| *f)
            .collect();
        if live.is_empty() {
            crate::sys::futex_wait(&st.asleep, 1, Duration::from_millis(100));
            continue;
        }
        if crate::sys::poll_readable(&live, Duration::from_millis(100)) {
            wake();
            // Wait for the engine to wake up and take the bytes before polling again.
            while st.asleep.load(SeqCst) != 0 && !st.closed.load(SeqCst) {
                crate::sys::futex_wait(&st.asleep, 1, Duration::from_millis(1));
            }
        }
    }
}

impl TcpTransport {
    /// Connects to every peer: this node dials peers with a larger id and accepts the others, all
    /// through the key handshake. The engine reads the connections itself without blocking (busy
    /// polling while traffic flows); while it sleeps, a watcher thread blocked in poll(2) calls
    /// `wake` (which rings the engine) as soon as a connection has bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        listener: &TcpListener,
        me: u32,
        job: u32,
        peers: &[(u32, SocketAddr)],
        key: &[u8],
        max_message: u64,
        timeout: Duration,
        wake: impl Fn() + Clone + Send + 'static,
    ) -> Result<TcpTransport, QkError> {
        let mut out = HashMap::new();
        let deadline = Instant::now() + timeout;
        for &(id, addr) in peers.iter().filter(|p| p.0 > me) {
            let mut s = loop {
                match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => {
                        return Err(QkError::Transport(format!(
                            "cannot reach node {id} at {addr}: {e}"
                        )))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            handshake(&mut s, key, me, job, Some(id))?;
            out.insert(id, s);
        }
        let want: Vec<u32> = peers.iter().filter(|p| p.0 < me).map(|p| p.0).collect();
        listener
            .set_nonblocking(true)
            .map_err(|e| QkError::os("listener", e))?;
        while want.iter().any(|w| !out.contains_key(w)) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    // A failed handshake (no key, wrong job) just closes that connection.
                    if let Ok(id) = handshake(&mut s, key, me, job, None) {
                        if want.contains(&id) {
                            out.insert(id, s);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(QkError::Transport(format!(
                            "timed out waiting for nodes {:?} to connect",
                            want.iter()
                                .filter(|w| !out.contains_key(w))
                                .collect::<Vec<_>>()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(QkError::os("accepting a peer node", e)),
            }
        }
        let mut conns: Vec<Conn> = Vec::new();
        let mut ids: Vec<u32> = out.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let Some(s) = out.remove(&id) else { continue };
            s.set_nonblocking(true)
                .map_err(|e| QkError::os("making a peer connection non-blocking", e))?;
            conns.push(Conn::new(id, s));
        }
        use std::os::fd::AsRawFd;
        let fds: Vec<std::os::fd::RawFd> = conns.iter().map(|c| c.s.as_raw_fd()).collect();
        let st = Arc::new(WakeState {
            asleep: std::sync::atomic::AtomicU32::new(0),
            closed: AtomicBool::new(false),
            dead: conns.iter().map(|_| AtomicBool::new(false)).collect(),
        });
        let st2 = st.clone();
        let watcher = std::thread::Builder::new()
            .name(format!("qk-tcp-watch-{me}"))
            .spawn(move || watch(fds, st2, wake))
            .map_err(|e| QkError::os("starting the connection watcher thread", e))?;
        Ok(TcpTransport {
            conns,
            max: max_message,
            st,
            watcher: Some(watcher),
        })
    }

    fn conn(&mut self, node: u32) -> Result<usize, QkError> {
        self.conns
            .iter()
            .position(|c| c.node == node)
            .ok_or_else(|| QkError::Transport(format!("no connection to node {node}")))
    }

    fn poll_inner(
        &mut self,
        f: &mut dyn FnMut(u32, Frame),
        mut place: Option<&mut Place<'_>>,
    ) -> usize {
        let mut n = 0;
        let max = self.max;
        for (i, c) in self.conns.iter_mut().enumerate() {
            c.fill(max, place.as_deref_mut());
            if c.dead {
                self.st.dead[i].store(true, Ordering::Relaxed);
            }
            while let Some(fr) = c.ready.pop_front() {
                f(c.node, fr);
                n += 1;
            }
        }
        n
    }

    /// Writes connection `i`'s outgoing buffer.
    fn flush_conn(&mut self, i: usize) -> Result<(), QkError> {
        let out = std::mem::take(&mut self.conns[i].out);
        let r = self.write_all(i, &out);
        let mut out = out;
        out.clear();
        // Keep the allocation (polling must not allocate), unless one burst made it large.
        if out.capacity() > 4 * OUT_FLUSH {
            out = Vec::with_capacity(64 << 10);
        }
        self.conns[i].out = out;
        r
    }

    /// Writes all of `b` to connection `i`; while the socket is full, takes in what the peers
    /// send (two engines sending large frames to each other must not wait on each other).
    fn write_all(&mut self, i: usize, mut b: &[u8]) -> Result<(), QkError> {
        let start = Instant::now();
        while !b.is_empty() {
            let node = self.conns[i].node;
            match self.conns[i].s.write(b) {
                Ok(0) => {
                    return Err(QkError::Transport(format!(
                        "sending to node {node}: connection closed"
                    )))
                }
                Ok(n) => b = &b[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let max = self.max;
                    for c in &mut self.conns {
                        c.fill(max, None);
                    }
                    if start.elapsed() > Duration::from_micros(50) {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(QkError::Transport(format!("sending to node {node}: {e}"))),
            }
        }
        Ok(())
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.st.closed.store(true, Ordering::SeqCst);
        self.st.asleep.store(0, Ordering::SeqCst);
        crate::sys::futex_wake(&self.st.asleep);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}

impl Transport for TcpTransport {
    fn send(&mut self, node: u32, frame: &Frame, tail: &[u8]) -> Result<(), QkError> {
        let i = self.conn(node)?;
        // A small tail is copied behind its head in the connection's outgoing buffer, and the
        // whole buffer leaves in one write at the next flush: with TCP_NODELAY every write is a
        // segment of its own, a trip through both stacks (≈ 5 µs here), so a window of small
        // messages must not cost one write each.
        let c = &mut self.conns[i];
        frame.encode_head_into(&mut c.out, tail.len());
        if tail.len() <= SMALL_TAIL {
            c.out.extend_from_slice(tail);
            if c.out.len() < OUT_FLUSH {
                return Ok(());
            }
            return self.flush_conn(i);
        }
        // A large tail is written straight from shared memory, after what is queued before it.
        self.flush_conn(i)?;
        self.write_all(i, tail)
    }

    fn flush(&mut self) -> Result<(), QkError> {
        for i in 0..self.conns.len() {
            if !self.conns[i].out.is_empty() {
                self.flush_conn(i)?;
            }
        }
        Ok(())
    }

    fn poll(&mut self, f: &mut dyn FnMut(u32, Frame)) -> usize {
        self.poll_inner(f, None)
    }

    fn poll_placing(&mut self, f: &mut dyn FnMut(u32, Frame), place: &mut Place<'_>) -> usize {
        self.poll_inner(f, Some(place))
    }

    fn sleep_begin(&mut self) -> bool {
        self.st.asleep.store(1, Ordering::SeqCst);
        crate::sys::futex_wake(&self.st.asleep);
        // Bytes that came in before the watcher started watching must not be slept on.
        let max = self.max;
        let mut pending = false;
        for c in &mut self.conns {
            c.fill(max, None);
            // A payload read into the buffer for want of its place is not on the socket any more.
            pending |= !c.ready.is_empty() || (c.direct.is_some() && c.filled > 0);
        }
        pending
    }

    fn sleep_end(&mut self) {
        self.st.asleep.store(0, Ordering::SeqCst);
        crate::sys::futex_wake(&self.st.asleep);
    }
}

/// Largest frame tail (eager payload) copied behind the frame's head so both leave in one write.
const SMALL_TAIL: usize = 64 << 10;

/// A connection's receive buffer grown for a large frame is kept up to this size.
const KEEP_RX: usize = 64 << 20;

/// A connection's outgoing buffer is written at once when it holds this many bytes, without
/// waiting for the flush at the end of the engine's batch.
const OUT_FLUSH: usize = 256 << 10;

/// How long the node engine keeps polling its queues and connections after the last item before
/// it blocks: longer than a network round trip, so a ping-pong never pays a wake-up.
pub const ENGINE_SPIN: Duration = Duration::from_micros(500);

/// Configuration of a node engine for one job.
#[derive(Clone, Debug)]
pub struct NodeEngineSpec {
    /// Job id.
    pub job_id: u32,
    /// This node's id.
    pub node_id: u32,
    /// Address to listen on for peer nodes.
    pub listen: SocketAddr,
    /// Every other node of the job: (node id, address).
    pub peers: Vec<(u32, SocketAddr)>,
    /// Node id of every world rank (index = rank).
    pub rank_node: Vec<u32>,
    /// The cluster key (shared secret) both ends of every connection must hold.
    pub cluster_key: Vec<u8>,
    /// How long to wait for peers at start-up.
    pub connect_timeout: Duration,
}

struct Outgoing {
    from_port: u32,
    heap_off: u64,
    len: u64,
    rank_token: u64,
}

struct Staged {
    /// The node whose connection must bring the bytes.
    node: u32,
    hdr: Hdr,
    dst: u32,
    off: u64,
    len: u64,
    /// Its place in [`NodeEngine::to_local`] (a sequence number).
    slot: u64,
}

/// A place in the queue of records for local ranks, which keeps the order in which messages
/// arrived from the network.
enum Inbound {
    /// A record to hand to local port `.0`.
    Ready(u32, Hdr, Vec<u8>),
    /// A large message whose bytes are still coming: what arrived after it waits behind it, so
    /// an eager message cannot overtake a large one sent before it.
    Awaiting,
    /// A large message that was dropped while its bytes were coming: skipped.
    Gone,
}

/// The node's engine for one job: moves records between the node's queues and the other nodes.
/// The PCT creates it after [`crate::NodeFabric::create`] and runs it ([`NodeEngine::run`]) on its
/// service core, or starts it on a thread with [`NodeEngine::spawn`].
pub struct NodeEngine {
    region: Region,
    port: Port,
    spec: NodeEngineSpec,
    transport: Box<dyn Transport>,
    heap: HeapAlloc,
    outgoing: HashMap<u64, Outgoing>,
    staged: HashMap<u64, Staged>,
    /// Announcements of large messages waiting for staging room, with their places in
    /// `to_local`.
    waiting_rts: VecDeque<(u32, Frame, u64)>,
    /// Messages from other nodes for local ranks, in arrival order.
    to_local: VecDeque<Inbound>,
    /// Sequence number of `to_local`'s front place.
    to_local_base: u64,
    /// Records the engine itself sends to local ranks (the FIN that frees a sender's buffer):
    /// not ordered with the messages, so never held behind a large one.
    control: VecDeque<(u32, Hdr, Vec<u8>)>,
    next_id: u64,
    /// The last step rang a sleeping local rank.
    woke_rank: bool,
    _fd: Memfd,
}

/// A running node engine thread.
pub struct NodeEngineHandle {
    stop: Arc<AtomicBool>,
    region: Region,
    thread: Option<std::thread::JoinHandle<Result<(), QkError>>>,
}

impl NodeEngineHandle {
    /// Stops the engine and returns how its loop ended.
    pub fn stop(mut self) -> Result<(), QkError> {
        self.stop.store(true, Ordering::SeqCst);
        let p = self.region.engine_port();
        self.region.doorbell(p).fetch_add(1, Ordering::SeqCst);
        crate::sys::futex_wake(self.region.doorbell(p));
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(QkError::Transport("node engine thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl NodeEngine {
    /// Listens, connects to every peer node through the key handshake, and attaches to the job's
    /// region (`fd` from [`crate::NodeFabric::dup_fd`]).
    pub fn new(fd: Memfd, spec: NodeEngineSpec) -> Result<NodeEngine, QkError> {
        let listener = TcpListener::bind(spec.listen)
            .map_err(|e| QkError::os(format!("listening on {}", spec.listen), e))?;
        Self::with_listener(fd, spec, listener)
    }

    /// As [`NodeEngine::new`] with a listener the caller bound already.
    pub fn with_listener(
        fd: Memfd,
        spec: NodeEngineSpec,
        listener: TcpListener,
    ) -> Result<NodeEngine, QkError> {
        let region = Region::attach(&fd, true, false)?;
        if region.job != spec.job_id {
            return Err(QkError::BadRegion(format!(
                "region of job {} given to the engine of job {}",
                region.job, spec.job_id
            )));
        }
        if spec.rank_node.len() != region.world as usize {
            return Err(QkError::BadSpec(format!(
                "rank_node has {} entries, the job has {} ranks",
                spec.rank_node.len(),
                region.world
            )));
        }
        let r2 = region.clone();
        let p = region.engine_port();
        let wake = move || {
            r2.doorbell(p).fetch_add(1, Ordering::SeqCst);
            crate::sys::futex_wake(r2.doorbell(p));
        };
        let t = TcpTransport::connect(
            &listener,
            spec.node_id,
            spec.job_id,
            &spec.peers,
            &spec.cluster_key,
            region.max_message,
            spec.connect_timeout,
            wake,
        )?;
        Ok(Self::with_transport(fd, region, spec, Box::new(t)))
    }

    /// An engine over any transport (the boundary a libfabric backend plugs into).
    pub fn with_transport(
        fd: Memfd,
        region: Region,
        spec: NodeEngineSpec,
        transport: Box<dyn Transport>,
    ) -> NodeEngine {
        let port = Port::new(region.clone(), region.engine_port());
        let heap = HeapAlloc::new(region.layout.heap_per_rank);
        region.set_pid(region.engine_port(), std::process::id());
        NodeEngine {
            region,
            port,
            spec,
            transport,
            heap,
            outgoing: HashMap::new(),
            staged: HashMap::new(),
            waiting_rts: VecDeque::new(),
            to_local: VecDeque::new(),
            to_local_base: 0,
            control: VecDeque::new(),
            next_id: 1,
            woke_rank: false,
            _fd: fd,
        }
    }

    /// This engine's node id.
    pub fn node_id(&self) -> u32 {
        self.spec.node_id
    }

    /// Runs the engine on a thread of its own.
    pub fn spawn(self) -> Result<NodeEngineHandle, QkError> {
        self.spawn_on(None)
    }

    /// Runs the engine on a thread of its own, pinned to `cpu` when given (the PCT's service
    /// core; a failure to pin is returned before the thread starts work).
    pub fn spawn_on(mut self, cpu: Option<usize>) -> Result<NodeEngineHandle, QkError> {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let region = self.region.clone();
        let (tx, rx) = std::sync::mpsc::channel::<Result<(), QkError>>();
        let t = std::thread::Builder::new()
            .name(format!("qk-node-engine-{}", self.spec.node_id))
            .spawn(move || {
                if let Some(c) = cpu {
                    if let Err(e) = crate::sys::pin_to_cpu(c) {
                        let _ = tx.send(Err(QkError::os(
                            format!("pinning the node engine to cpu {c}"),
                            e,
                        )));
                        return Ok(());
                    }
                }
                let _ = tx.send(Ok(()));
                self.run(&s2)
            })
            .map_err(|e| QkError::os("starting the node engine", e))?;
        let started = rx
            .recv()
            .map_err(|_| QkError::Transport("node engine thread died at start".into()))
            .and_then(|r| r);
        if let Err(e) = started {
            let _ = t.join();
            return Err(e);
        }
        Ok(NodeEngineHandle {
            stop,
            region,
            thread: Some(t),
        })
    }

    /// The engine loop: until `stop`, carry records out and frames in; spin while busy, block on
    /// the doorbell when idle (bounded by [`crate::region::MAX_SLEEP`] for the first
    /// [`crate::region::DEEP_AFTER`] of idleness, then, after a fence, by
    /// [`crate::region::DEEP_SLEEP`]).
    ///
    /// While traffic flows it keeps polling for [`ENGINE_SPIN`] after the last item (a network
    /// round trip takes tens of microseconds). How it polls depends on the local ranks: while any
    /// of them is awake (it may share this core) every idle pass yields the core; while all of
    /// them sleep (waiting for the network, see `Endpoint::eq_wait_into`) it spins without
    /// yielding, since a yield would only hand the core to unrelated work and the reply would wait
    /// for it. Having woken a sleeping rank it yields once, so a rank on this core runs at once.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<(), QkError> {
        let p = self.region.engine_port();
        // When the last item was handled; `rested`: the engine slept since then and nothing came.
        let mut last = Instant::now();
        let mut rested = false;
        while !stop.load(Ordering::Relaxed) {
            self.publish_cpu();
            let n = self.step()?;
            if std::mem::take(&mut self.woke_rank) {
                std::thread::yield_now();
            }
            if n > 0 {
                last = Instant::now();
                rested = false;
                continue;
            }
            // A nap that ran out does not start another spin: an idle engine on a rank's core
            // would otherwise spin ENGINE_SPIN after every 1 ms nap (a third of that core).
            if !rested && last.elapsed() < ENGINE_SPIN {
                if self.local_rank_awake() {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            let bell = self.region.doorbell(p).load(Ordering::SeqCst);
            self.region.sleeping(p).store(1, Ordering::SeqCst);
            // Short naps while the ranks' unfenced rings may be missed; after DEEP_AFTER without
            // an item, one fence on their behalf and then long sleeps (as a waiting rank does).
            let nap = self.region.fence_before_sleep(last.elapsed());
            let frames_waiting = self.transport.sleep_begin();
            let slept = !frames_waiting && !self.port.has_pending() && !self.local_ready();
            if slept {
                self.region.count(p, slot::SLEEPS, 1);
                crate::sys::futex_wait(self.region.doorbell(p), bell, nap);
            }
            self.transport.sleep_end();
            self.region.sleeping(p).store(0, Ordering::SeqCst);
            if slept {
                // Rung (bytes or a record on the way): poll again as after an item. The nap ran
                // out: nothing came, so no spin before the next one.
                rested = self.region.doorbell(p).load(Ordering::SeqCst) == bell;
                if !rested {
                    last = Instant::now();
                }
            } else {
                // Work is waiting (records for a full queue): poll as after an item.
                last = Instant::now();
                rested = false;
            }
        }
        // Stopping: what the local ranks handed over before they finished still leaves (a rank's
        // last put may sit in the queue when the PCT stops the engine), within a bounded time.
        let start = Instant::now();
        let mut quiet = 0;
        while quiet < 3 && start.elapsed() < Duration::from_millis(200) {
            let n = self.step()?;
            let busy = n > 0 || self.port.has_pending() || self.local_ready();
            quiet = if busy { 0 } else { quiet + 1 };
        }
        Ok(())
    }

    /// Records the CPU this thread runs on in the engine port's control block (ranks read it).
    fn publish_cpu(&self) {
        if let Some(c) = crate::sys::current_cpu() {
            let hint = self.region.cpu_hint(self.region.engine_port());
            if hint.load(Ordering::Relaxed) != c + 1 {
                hint.store(c + 1, Ordering::Relaxed);
            }
        }
    }

    /// Whether records for local ranks are ready to go (not waiting for a large message's bytes).
    fn local_ready(&self) -> bool {
        !self.control.is_empty()
            || matches!(
                self.to_local.front(),
                Some(Inbound::Ready(..) | Inbound::Gone)
            )
    }

    /// Mutable access to the place with sequence number `slot` in `to_local`.
    fn place(&mut self, slot: u64) -> Option<&mut Inbound> {
        let i = usize::try_from(slot.checked_sub(self.to_local_base)?).ok()?;
        self.to_local.get_mut(i)
    }

    /// Takes a place at the end of `to_local` and returns its sequence number.
    fn push_local(&mut self, v: Inbound) -> u64 {
        self.to_local.push_back(v);
        self.to_local_base + self.to_local.len() as u64 - 1
    }

    /// A new id for an outgoing large message or a staged inbound one.
    fn fresh_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Whether any local rank's application is running (not blocked on its doorbell). Only the
    /// application's bit counts: a rank in co-processor mode whose engine thread sleeps may be
    /// spinning on this CPU, and an engine that stopped yielding would starve it (yod's virtual
    /// nodes in msg-coproc mode: ≈ 540 µs a hop, each waiting out the rank's spin).
    fn local_rank_awake(&self) -> bool {
        (0..self.region.layout.local).any(|r| self.region.application_awake(r))
    }

    fn drop_msg(&self, r: DropReason) {
        self.region.count_drop(self.region.engine_port(), r);
    }

    /// One round of work; returns how many items were handled.
    pub fn step(&mut self) -> Result<usize, QkError> {
        let mut n = 0;
        // Local ranks -> other nodes.
        let mut recs: Vec<(u32, Hdr, Vec<u8>)> = Vec::new();
        n += self
            .port
            .poll(64, |m| recs.push((m.from, m.hdr(), m.body.to_vec())));
        for (from, h, body) in recs {
            self.outbound(from, h, &body)?;
        }
        // Everything this pass took from the ranks leaves now, one write per peer node.
        self.transport.flush()?;
        // Other nodes -> local ranks.
        let mut frames = Vec::new();
        {
            // A large message's bytes go straight from the socket to its staging place (no
            // receive-buffer or frame copy of them): the place staged for that token, if the
            // frame comes from the node asked, for this job, with the length asked.
            let (staged, map, job) = (&self.staged, self.region.map(), self.spec.job_id);
            let heap = self.region.layout.heap(self.region.engine_port());
            let mut place = |node: u32, fjob: u32, token: u64, len: u64| {
                let s = staged.get(&token)?;
                if fjob != job || s.node != node || s.len != len {
                    return None;
                }
                Some(map.slice_mut((heap + s.off) as usize, len as usize))
            };
            n += self
                .transport
                .poll_placing(&mut |node, f| frames.push((node, f)), &mut place);
        }
        let retry: Vec<(u32, Frame, u64)> = self.waiting_rts.drain(..).collect();
        for (node, f, slot) in retry {
            self.stage(node, &f, slot)?;
        }
        for (node, f) in frames {
            self.inbound(node, f)?;
        }
        // The GETs (and small DATA) these answers made.
        self.transport.flush()?;
        // Ports handed a record (bit per port modulo 64). Records are handed over without
        // ringing (`try_send_unrung`); each sleeping rank is rung once after the batch: ringing
        // per record made a futex call per record, and the rank, woken on this CPU, could take
        // the CPU after each one (a window of 64 small messages cost ≈ 14 switches).
        let mut delivered = 0u64;
        while let Some((port, h, b)) = self.control.front() {
            if !self.port.try_send_unrung(*port, h, b) {
                break;
            }
            delivered |= 1u64 << (*port % 64);
            self.control.pop_front();
            n += 1;
        }
        loop {
            match self.to_local.front() {
                Some(Inbound::Ready(port, h, b)) => {
                    if !self.port.try_send_unrung(*port, h, b) {
                        break;
                    }
                    delivered |= 1u64 << (*port % 64);
                    n += 1;
                }
                Some(Inbound::Gone) => {}
                Some(Inbound::Awaiting) | None => break,
            }
            self.to_local.pop_front();
            self.to_local_base += 1;
        }
        self.woke_rank = false;
        if delivered != 0 {
            // Ring the ranks that sleep, after a full fence: a rank waiting for the network sleeps
            // on every message, so an unfenced look at its flag (a lost wake-up costs up to
            // `MAX_SLEEP`) is not good enough here. After the fence either the rank's sleeping
            // flag is visible, or the rank's look at its queue (after it set the flag) sees the
            // records. Ports are a bit mask modulo 64: a collision only rings a rank for nothing.
            std::sync::atomic::fence(Ordering::SeqCst);
            for r in 0..self.region.layout.local {
                if delivered & (1u64 << (r % 64)) != 0
                    && self.region.sleeping(r).load(Ordering::Relaxed) != 0
                {
                    self.region.doorbell(r).fetch_add(1, Ordering::SeqCst);
                    crate::sys::futex_wake(self.region.doorbell(r));
                    self.woke_rank = true;
                }
            }
        }
        Ok(n)
    }

    fn outbound(&mut self, from: u32, h: Hdr, body: &[u8]) -> Result<(), QkError> {
        // The queue's owner must be the header's source (a local rank).
        if from >= self.region.layout.local || self.region.ranks[from as usize] != h.src {
            self.drop_msg(DropReason::ForgedSource);
            return Ok(());
        }
        if body.len() < 8 {
            self.drop_msg(DropReason::Malformed);
            return Ok(());
        }
        let dst = u64::from_le_bytes(body[..8].try_into().unwrap_or([0; 8])) as u32;
        let payload = &body[8..];
        if dst as usize >= self.spec.rank_node.len() || self.region.port_of_rank(dst).is_some() {
            self.drop_msg(DropReason::Malformed);
            return Ok(());
        }
        if h.op == op::FIN {
            // The local target finished copying a staged message: free the staging space.
            if let Some(s) = self.staged.remove(&h.aux) {
                self.heap.free(s.off, s.len);
            } else {
                self.drop_msg(DropReason::UnknownToken);
            }
            return Ok(());
        }
        let node = self.spec.rank_node[dst as usize];
        let mut hb = h.encode().to_vec();
        if h.flags & flag::HEAP != 0 {
            let Some((addr, token)) = decode_ref(payload) else {
                self.drop_msg(DropReason::Malformed);
                return Ok(());
            };
            let base = self.region.layout.heap(from);
            if !(addr >= base
                && addr
                    .checked_add(h.length)
                    .is_some_and(|e| e <= base + self.region.layout.heap_per_rank))
            {
                self.drop_msg(DropReason::BadReference);
                return Ok(());
            }
            let id = self.fresh_id();
            self.outgoing.insert(
                id,
                Outgoing {
                    from_port: from,
                    heap_off: addr,
                    len: h.length,
                    rank_token: token,
                },
            );
            hb.extend_from_slice(&id.to_le_bytes());
            let f = Frame {
                kind: kind::RTS,
                job: self.spec.job_id,
                dst,
                body: hb,
            };
            self.transport.send(node, &f, &[])?;
        } else if h.flags & flag::CMA != 0 {
            self.drop_msg(DropReason::BadReference);
        } else {
            let f = Frame {
                kind: kind::MSG,
                job: self.spec.job_id,
                dst,
                body: hb,
            };
            let n = h.inline_len().min(payload.len() as u64) as usize;
            self.transport.send(node, &f, &payload[..n])?;
        }
        self.region.bump(self.region.engine_port(), slot::SENT, 1);
        Ok(())
    }

    /// A large message announced by `f` (an RTS that passed the checks of [`Self::inbound`]),
    /// holding place `slot`: once there is staging room, asks the sending node for its bytes.
    fn stage(&mut self, node: u32, f: &Frame, slot: u64) -> Result<(), QkError> {
        let (Some(h), Some(port)) = (Hdr::decode(&f.body), self.region.port_of_rank(f.dst)) else {
            // Checked when it arrived; cannot happen, but never leave its place blocking.
            if let Some(p) = self.place(slot) {
                *p = Inbound::Gone;
            }
            return Ok(());
        };
        let id = u64::from_le_bytes(f.body[HDR_LEN..HDR_LEN + 8].try_into().unwrap_or([0; 8]));
        let Some(off) = self.heap.alloc(h.length) else {
            // No staging room yet: ask again once earlier messages are copied out.
            self.waiting_rts.push_back((node, f.clone(), slot));
            return Ok(());
        };
        let token = self.fresh_id();
        self.staged.insert(
            token,
            Staged {
                node,
                hdr: h,
                dst: port,
                off,
                len: h.length,
                slot,
            },
        );
        let mut b = id.to_le_bytes().to_vec();
        b.extend_from_slice(&token.to_le_bytes());
        b.extend_from_slice(&f.dst.to_le_bytes());
        let g = Frame {
            kind: kind::GET,
            job: self.spec.job_id,
            dst: h.src,
            body: b,
        };
        self.transport.send(node, &g, &[])
    }

    fn inbound(&mut self, node: u32, f: Frame) -> Result<(), QkError> {
        if f.job != self.spec.job_id {
            self.drop_msg(DropReason::WrongJob);
            return Ok(());
        }
        match f.kind {
            kind::MSG | kind::RTS => {
                let Some(h) = Hdr::decode(&f.body) else {
                    self.drop_msg(DropReason::Malformed);
                    return Ok(());
                };
                // The source rank must live on the node the connection belongs to.
                if self.spec.rank_node.get(h.src as usize) != Some(&node) {
                    self.drop_msg(DropReason::ForgedSource);
                    return Ok(());
                }
                let Some(port) = self.region.port_of_rank(f.dst) else {
                    self.drop_msg(DropReason::Malformed);
                    return Ok(());
                };
                if f.kind == kind::MSG {
                    if h.flags & (flag::HEAP | flag::CMA) != 0 {
                        self.drop_msg(DropReason::Malformed);
                        return Ok(());
                    }
                    self.push_local(Inbound::Ready(port, h, f.body[HDR_LEN..].to_vec()));
                    return Ok(());
                }
                // A message larger than the whole staging heap would wait for room for ever
                // (and, holding its place, stop every message behind it).
                if f.body.len() < HDR_LEN + 8
                    || h.length > self.region.max_message
                    || h.length > self.region.layout.heap_per_rank
                {
                    self.drop_msg(DropReason::Malformed);
                    return Ok(());
                }
                let slot = self.push_local(Inbound::Awaiting);
                self.stage(node, &f, slot)?;
            }
            kind::GET => {
                if f.body.len() < 20 {
                    self.drop_msg(DropReason::Malformed);
                    return Ok(());
                }
                let id = u64::from_le_bytes(f.body[..8].try_into().unwrap_or([0; 8]));
                let token = &f.body[8..16];
                let target = u32::from_le_bytes(f.body[16..20].try_into().unwrap_or([0; 4]));
                let Some(o) = self.outgoing.remove(&id) else {
                    self.drop_msg(DropReason::UnknownToken);
                    return Ok(());
                };
                if self.spec.rank_node.get(target as usize) != Some(&node) {
                    self.drop_msg(DropReason::ForgedSource);
                    return Ok(());
                }
                let d = Frame {
                    kind: kind::DATA,
                    job: self.spec.job_id,
                    dst: f.dst,
                    body: token.to_vec(),
                };
                let data = self.region.map().slice(o.heap_off as usize, o.len as usize);
                self.transport.send(node, &d, data)?;
                // The bytes have left the sender's buffer: tell the sending rank.
                if o.rank_token != 0 {
                    let fin = Hdr {
                        op: op::FIN,
                        src: target,
                        aux: o.rank_token,
                        length: o.len,
                        ..Hdr::default()
                    };
                    self.control.push_back((o.from_port, fin, Vec::new()));
                }
            }
            kind::DATA | kind::PLACED => {
                if f.body.len() < 8 {
                    self.drop_msg(DropReason::Malformed);
                    return Ok(());
                }
                let token = u64::from_le_bytes(f.body[..8].try_into().unwrap_or([0; 8]));
                let Some(s) = self.staged.get(&token) else {
                    self.drop_msg(DropReason::UnknownToken);
                    return Ok(());
                };
                let (slot, off, len) = (s.slot, s.off, s.len);
                let data = &f.body[8..];
                // PLACED: the transport read exactly `len` bytes from `node` into this place
                // (it asked the engine for it, with these checks).
                let placed = f.kind == kind::PLACED;
                if s.node != node {
                    // Not the node asked: its bytes may be on their way into this place now.
                    self.drop_msg(DropReason::ForgedSource);
                    return Ok(());
                }
                if !placed && data.len() as u64 != len {
                    // The one answer to our GET is wrong: the message is lost; free its staging
                    // space and its place so what came after it moves on.
                    self.staged.remove(&token);
                    self.heap.free(off, len);
                    if let Some(p) = self.place(slot) {
                        *p = Inbound::Gone;
                    }
                    self.drop_msg(DropReason::Malformed);
                    return Ok(());
                }
                let at = self.region.layout.heap(self.region.engine_port()) + off;
                if !placed {
                    self.region.map().write(at as usize, data);
                }
                let mut h = s.hdr;
                h.flags |= flag::HEAP;
                let dst = s.dst;
                if let Some(p) = self.place(slot) {
                    *p = Inbound::Ready(dst, h, encode_ref(at, token));
                }
            }
            _ => self.drop_msg(DropReason::Malformed),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two transports joined over loopback through the key handshake: (node 0, node 1).
    fn pair(max: u64) -> (TcpTransport, TcpTransport) {
        let l0 = TcpListener::bind("127.0.0.1:0").expect("bind");
        let l1 = TcpListener::bind("127.0.0.1:0").expect("bind");
        let (a0, a1) = (
            l0.local_addr().expect("addr"),
            l1.local_addr().expect("addr"),
        );
        let t1 = std::thread::spawn(move || {
            TcpTransport::connect(
                &l1,
                1,
                5,
                &[(0, a0)],
                b"k",
                max,
                Duration::from_secs(10),
                || {},
            )
        });
        let t0 = TcpTransport::connect(
            &l0,
            0,
            5,
            &[(1, a1)],
            b"k",
            max,
            Duration::from_secs(10),
            || {},
        )
        .expect("node 0");
        (t0, t1.join().expect("join").expect("node 1"))
    }

    fn msg(i: u32) -> Frame {
        Frame {
            kind: kind::MSG,
            job: 5,
            dst: i,
            body: i.to_le_bytes().to_vec(),
        }
    }

    const TOKEN: u64 = 77;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Sends (from a thread of its own: the socket fills) `before` small frames, one DATA frame
    /// of `len` payload bytes, and `after` small frames, each small one a transport `send` held
    /// back; returns what node 1 received, in order, polling with a place for the payload on
    /// the polls `placing` picks (the others poll without one, as the engine's waits do).
    fn send_and_receive(
        before: u32,
        len: usize,
        after: u32,
        placing: impl Fn(usize) -> bool,
    ) -> (Vec<Frame>, Vec<u8>) {
        let (mut t0, mut t1) = pair(1 << 30);
        let data = pattern(len);
        let sender = std::thread::spawn(move || {
            for i in 0..before {
                t0.send(1, &msg(i), &[]).expect("send");
            }
            let d = Frame {
                kind: kind::DATA,
                job: 5,
                dst: 1,
                body: TOKEN.to_le_bytes().to_vec(),
            };
            t0.send(1, &d, &data).expect("send data");
            for i in before..before + after {
                t0.send(1, &msg(i), &[]).expect("send");
            }
            t0.flush().expect("flush");
            t0
        });
        // Shared memory, as the staging heap is (a place is handed out from a shared view).
        let fd = Memfd::create("qk-tcp-test", len as u64).expect("memfd");
        let map = crate::sys::Mapping::map(&fd, len, true).expect("map");
        let mut got = Vec::new();
        let want = (before + after + 1) as usize;
        let mut polls = 0usize;
        while got.len() < want {
            polls += 1;
            assert!(
                polls < 50_000_000,
                "only {} of {want} frames came",
                got.len()
            );
            if placing(polls) {
                let mut place = |node: u32, job: u32, token: u64, l: u64| {
                    (node == 0 && job == 5 && token == TOKEN && l == len as u64)
                        .then(|| map.slice_mut(0, len))
                };
                t1.poll_placing(&mut |_, f| got.push(f), &mut place);
            } else {
                t1.poll(&mut |_, f| got.push(f));
            }
            assert!(!t1.conns[0].dead, "the connection broke");
        }
        drop(sender.join().expect("sender"));
        (got, map.slice(0, len).to_vec())
    }

    fn check_order(got: &[Frame], before: u32, len: usize, after: u32, placed: &[u8]) {
        let data = pattern(len);
        for (i, f) in got.iter().enumerate() {
            let i = i as u32;
            if i == before {
                assert_eq!(
                    f.body[..8],
                    TOKEN.to_le_bytes(),
                    "the large frame is in its place"
                );
                match f.kind {
                    kind::PLACED => assert!(placed == &data[..], "placed bytes differ"),
                    kind::DATA => assert!(f.body[8..] == data[..], "buffered bytes differ"),
                    k => panic!("frame {i} is of kind {k}, not the large one"),
                }
            } else {
                let n = if i < before { i } else { i - 1 };
                assert_eq!((f.kind, f.dst), (kind::MSG, n), "frame {i} out of order");
            }
        }
        assert_eq!(got.len() as u32, before + after + 1);
    }

    /// Small frames held back for one write and a large frame written straight after them
    /// keep their order, and the large payload is read into its place byte-exact. Checked to
    /// fail when `send` does not flush the held-back frames before a large tail (the tail then
    /// overtakes them and the stream's framing breaks).
    #[test]
    fn held_back_frames_and_a_large_one_arrive_in_order_and_placed() {
        let (got, placed) = send_and_receive(300, 3 << 20, 300, |_| true);
        check_order(&got, 300, 3 << 20, 300, &placed);
        assert_eq!(
            got[300].kind,
            kind::PLACED,
            "a large payload with a place goes there"
        );
    }

    /// The same with polls that have no place for the payload (the engine's looks before it
    /// sleeps and while it waits to write) mixed in: whatever they read of the payload is put in
    /// its place first when a place is at hand again, and nothing is lost or reordered. Checked
    /// to fail when `fill_direct` does not first move what the buffer holds.
    #[test]
    fn a_large_payload_read_partly_without_its_place_is_still_whole_and_in_order() {
        for every in [2, 3, 7] {
            let (got, placed) = send_and_receive(50, (1 << 20) + 13, 50, |p| p % every == 0);
            check_order(&got, 50, (1 << 20) + 13, 50, &placed);
        }
    }

    /// A payload being placed whose place is not at hand (the engine waiting to write a large
    /// frame of its own, or about to sleep) is still taken in whole, so the sender's write
    /// completes: two engines writing large frames to each other must not wait on each other.
    /// Checked to fail when the buffer stops at 64 KiB while a payload waits for its place.
    #[test]
    fn a_payload_without_its_place_at_hand_is_still_taken_in() {
        // Far more than the socket buffers hold (up to 32 MiB received, 4 MiB sent here).
        let len = 160 << 20;
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut w = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (r, _) = l.accept().expect("accept");
        r.set_nonblocking(true).expect("nonblocking");
        w.set_nonblocking(true).expect("nonblocking");
        let mut c = Conn::new(0, r);
        let d = Frame {
            kind: kind::DATA,
            job: 5,
            dst: 1,
            body: TOKEN.to_le_bytes().to_vec(),
        };
        let mut stream = Vec::new();
        d.encode_head_into(&mut stream, len);
        stream.extend_from_slice(&pattern(len));
        let fd = Memfd::create("qk-tcp-test", len as u64).expect("memfd");
        let map = crate::sys::Mapping::map(&fd, len, true).expect("map");
        let mut place = |_: u32, _: u32, token: u64, l: u64| {
            (token == TOKEN && l == len as u64).then(|| map.slice_mut(0, len))
        };
        // The writer is this thread: `write` what the socket takes, then let the reader look.
        let mut sent = 0;
        let mut looks = 0;
        let mut write_then = |c: &mut Conn, with_place: bool, sent: &mut usize| {
            match w.write(&stream[*sent..]) {
                Ok(n) => *sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("write: {e}"),
            }
            looks += 1;
            assert!(
                looks < 1_000_000,
                "the writer is stuck: the payload is not taken in"
            );
            if with_place {
                c.fill(1 << 30, Some(&mut place));
            } else {
                c.fill(1 << 30, None);
            }
        };
        while c.direct.is_none() {
            write_then(&mut c, true, &mut sent);
        }
        // From here on no place: the writer must still get every byte out.
        while sent < stream.len() {
            write_then(&mut c, false, &mut sent);
        }
        while c.ready.is_empty() {
            write_then(&mut c, true, &mut sent);
        }
        assert!(!c.dead);
        assert_eq!(c.ready.len(), 1);
        assert_eq!(c.ready[0].kind, kind::PLACED);
        assert!(
            map.slice(0, len) == &pattern(len)[..],
            "placed bytes differ"
        );
    }

    /// A frame whose length field alone is in (4 bytes) is waited for, large or small, with
    /// or without a place: checked to fail (a panic) when the kind byte after the length is
    /// looked at before it is in.
    #[test]
    fn a_frame_whose_length_alone_is_in_is_waited_for() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut w = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (r, _) = l.accept().expect("accept");
        r.set_nonblocking(true).expect("nonblocking");
        w.set_nodelay(true).expect("nodelay");
        let mut c = Conn::new(0, r);
        let mut v = Vec::new();
        let d = Frame {
            kind: kind::DATA,
            job: 5,
            dst: 1,
            body: TOKEN.to_le_bytes().to_vec(),
        };
        let len = 1 << 20;
        d.encode_head_into(&mut v, len);
        v.extend_from_slice(&pattern(len));
        msg(3).encode_head_into(&mut v, 0);
        let mut place = |_: u32, _: u32, _: u64, _: u64| None;
        let mut sent = 0;
        for step in [4, 1, 19, v.len()] {
            let end = (sent + step).min(v.len());
            w.write_all(&v[sent..end]).expect("write");
            sent = end;
            let mut looks = 0;
            // Until the reader has every byte written so far.
            while c.filled + c.ready.iter().map(|f| 16 + f.body.len()).sum::<usize>() < sent {
                looks += 1;
                assert!(looks < 50_000_000, "the reader never got the bytes");
                if looks % 2 == 0 {
                    c.fill(1 << 30, Some(&mut place));
                } else {
                    c.fill(1 << 30, None);
                }
                assert!(!c.dead, "the connection was cut");
            }
        }
        assert_eq!(c.ready.len(), 2);
        assert!(c.ready[0].body[8..] == pattern(len)[..]);
        assert_eq!((c.ready[1].kind, c.ready[1].dst), (kind::MSG, 3));
    }

    /// The local-only kind never comes from the wire: a peer sending it is cut off, and no
    /// frame of it is handed over.
    #[test]
    fn a_placed_frame_from_the_wire_cuts_the_connection() {
        let (mut t0, mut t1) = pair(1 << 20);
        let f = Frame {
            kind: kind::PLACED,
            job: 5,
            dst: 1,
            body: TOKEN.to_le_bytes().to_vec(),
        };
        t0.send(1, &f, &[]).expect("send");
        t0.flush().expect("flush");
        let mut got = Vec::new();
        let mut polls = 0;
        while !t1.conns[0].dead {
            polls += 1;
            assert!(polls < 50_000_000, "the connection was not cut");
            t1.poll(&mut |_, f| got.push(f));
        }
        assert!(got.is_empty(), "{got:?}");
    }

    /// A transport that hands the engine the frames a test put in, once, and keeps what the
    /// engine sends.
    struct Injected {
        inbound: VecDeque<(u32, Frame)>,
        sent: Arc<std::sync::Mutex<Vec<(u32, Frame)>>>,
    }

    impl Transport for Injected {
        fn send(&mut self, node: u32, frame: &Frame, _tail: &[u8]) -> Result<(), QkError> {
            if let Ok(mut v) = self.sent.lock() {
                v.push((node, frame.clone()));
            }
            Ok(())
        }
        fn poll(&mut self, f: &mut dyn FnMut(u32, Frame)) -> usize {
            let n = self.inbound.len();
            for (node, fr) in self.inbound.drain(..) {
                f(node, fr);
            }
            n
        }
    }

    /// Frames from an authenticated peer node that are not what that node may send are each
    /// dropped and counted under their reason by the receiving node engine; nothing of them
    /// reaches the local rank, and a well-formed message among them still does.
    #[test]
    fn forged_frames_from_a_peer_node_are_dropped_and_counted_per_reason() {
        use crate::{CpuMode, JobFabricSpec, NodeFabric};
        const JOB: u32 = 61;
        // Rank 0 lives here (node 0), rank 1 on node 1; a third node 2 holds rank 2.
        let mut spec = JobFabricSpec::new(JOB, 3, vec![0], CpuMode::Heater);
        spec.node_id = 0;
        spec.lock_memory = false;
        let fab = NodeFabric::create(&spec).expect("fabric");
        let region = Region::attach(&fab.dup_fd().expect("fd"), true, false).expect("region");
        let put = |src: u32, flags: u8| {
            let h = Hdr {
                op: op::PUT,
                flags,
                src,
                length: 4,
                ..Hdr::default()
            };
            let mut b = h.encode().to_vec();
            b.extend_from_slice(b"data");
            b
        };
        let frame = |kind: u8, job: u32, dst: u32, body: Vec<u8>| Frame {
            kind,
            job,
            dst,
            body,
        };
        let token = 99u64.to_le_bytes().to_vec();
        let get_body = [5u64.to_le_bytes(), 6u64.to_le_bytes()].concat();
        let get_body = [get_body, 1u32.to_le_bytes().to_vec()].concat();
        let inbound: VecDeque<(u32, Frame)> = [
            // Another job's frame on this job's connection.
            (1, frame(kind::MSG, JOB + 1, 0, put(1, 0))),
            // Node 1 claims a source that lives on node 2.
            (1, frame(kind::MSG, JOB, 0, put(2, 0))),
            // A header too short to decode.
            (1, frame(kind::MSG, JOB, 0, vec![1, 2, 3])),
            // An eager message claiming to be a large reference.
            (1, frame(kind::MSG, JOB, 0, put(1, flag::HEAP))),
            // To a rank that is not on this node.
            (1, frame(kind::MSG, JOB, 1, put(1, 0))),
            // A GET for a send this node never announced.
            (1, frame(kind::GET, JOB, 0, get_body)),
            // DATA for a transfer this node never asked for.
            (1, frame(kind::DATA, JOB, 0, token)),
            // A kind that does not exist.
            (1, frame(9, JOB, 0, put(1, 0))),
            // The one good message.
            (1, frame(kind::MSG, JOB, 0, put(1, 0))),
        ]
        .into_iter()
        .collect();
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let ne = NodeEngineSpec {
            job_id: JOB,
            node_id: 0,
            listen: "127.0.0.1:0".parse().expect("addr"),
            peers: Vec::new(),
            rank_node: vec![0, 1, 2],
            cluster_key: b"k".to_vec(),
            connect_timeout: Duration::from_secs(1),
        };
        let transport = Injected {
            inbound,
            sent: sent.clone(),
        };
        let mut engine = NodeEngine::with_transport(
            fab.dup_fd().expect("fd"),
            region.clone(),
            ne,
            Box::new(transport),
        );
        for _ in 0..3 {
            engine.step().expect("step");
        }
        let st = region.stats(region.engine_port());
        let want = [
            (DropReason::WrongJob, 1),
            (DropReason::ForgedSource, 1),
            (DropReason::Malformed, 4),
            (DropReason::UnknownToken, 2),
        ];
        for (r, n) in want {
            assert_eq!(st.drops_for(r), n, "{r:?}: {st:?}");
        }
        assert_eq!(st.total_drops(), 8, "{st:?}");
        assert!(
            sent.lock().expect("sent").is_empty(),
            "the engine answered a forged frame"
        );
        // Only the good message reached rank 0's queue from the engine.
        let mut rank0 = Port::new(region.clone(), 0);
        let mut got = Vec::new();
        rank0.poll(usize::MAX, |m| {
            got.push((m.hdr().src, m.body[..4].to_vec()))
        });
        assert_eq!(got, vec![(1, b"data".to_vec())]);
    }
}
