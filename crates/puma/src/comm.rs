//! Communicators and point-to-point messaging.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use bytemuck::Pod;

use crate::core::{match_bits, Core, Status, TAG_MASK};
use crate::env::World;
use crate::error::{Error, Result};

/// Receive from any rank.
pub const ANY_SOURCE: Source = Source::Any;
/// Receive any tag.
pub const ANY_TAG: i32 = -1;

/// Which sender a receive or probe accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Any rank of the communicator.
    Any,
    /// This rank of the communicator.
    Rank(u32),
}

impl From<u32> for Source {
    fn from(r: u32) -> Source {
        Source::Rank(r)
    }
}

/// The running job as seen by one rank: start-up information and the world communicator.
pub struct Universe {
    /// Rank, size, node map and CPU mode (from the PCT's environment).
    pub info: World,
    world: Comm,
    finalized: bool,
}

impl Drop for Universe {
    fn drop(&mut self) {
        if !self.finalized {
            // Let sends still waiting for their receivers finish (briefly: this may run on an
            // error path where a peer will never receive).
            self.world.core.flush_sends(Duration::from_secs(2));
        }
    }
}

impl std::ops::Deref for Universe {
    type Target = World;
    fn deref(&self) -> &World {
        &self.info
    }
}

impl Universe {
    /// The communicator of every rank of the job.
    pub fn world(&self) -> Comm {
        self.world.clone()
    }

    /// Ends messaging: waits until every rank got here, so no rank leaves while a peer still
    /// needs it (acknowledgments, fetched bodies). Dropping the universe does the same and
    /// ignores errors.
    pub fn finalize(mut self) -> Result<()> {
        self.finalized = true;
        self.world.barrier()?;
        self.world.core.flush_sends(self.world.core.timeout);
        self.world.core.drain()
    }

    /// True when the job spans nodes whose QK fabrics are joined by their node engines (ranks on
    /// other nodes are reached through the engine), false when one region holds every rank.
    pub fn routed(&self) -> bool {
        self.world.core.routed()
    }

    /// This rank's messaging counters (unexpected messages, header-only saves, fetched bodies,
    /// pieces of large collectives through the stages).
    pub fn stats(&self) -> crate::MsgStats {
        self.world.core.st.borrow().stats
    }
}

/// Start-up options for [`start_with`].
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Longest any wait may last (default: `PUMA_TIMEOUT_MS`, else 60 s). A dead peer is
    /// reported sooner.
    pub timeout: Option<Duration>,
}

/// Starts messaging: reads the environment ([`crate::init`]), attaches to the job's QK fabric and
/// synchronises with every rank. Fails clearly when the program was not started by yod.
pub fn start() -> Result<Universe> {
    start_with(Options::default())
}

/// [`start`] with options.
pub fn start_with(opts: Options) -> Result<Universe> {
    let info = crate::env::init()?;
    let timeout = opts.timeout.unwrap_or_else(|| {
        Duration::from_millis(
            std::env::var("PUMA_TIMEOUT_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(60_000),
        )
    });
    let att = crate::fabric::attach(&info, timeout)?;
    // Ranks sharing this machine's cores: the node's ranks, or every rank when the library-side
    // fabric holds the whole job (all virtual nodes on this machine).
    let local = if att.fabric.is_some() || att.library_fabric {
        info.size
    } else {
        info.local_size
    };
    let core = Rc::new(Core::new(att, timeout, local)?);
    let ranks: Vec<u32> = (0..info.size).collect();
    let nodes: Vec<u32> = info.node_map.ranks.iter().map(|r| r.node).collect();
    let world = Comm::build(core.clone(), 0, ranks, nodes);
    world.barrier()?;
    // Every local rank has attached (its pid is in the region): see how they are placed.
    core.settle_placement();
    if info.rank == 0 {
        crate::fabric::unpublish(&info);
    }
    Ok(Universe {
        info,
        world,
        finalized: false,
    })
}

pub(crate) struct Group {
    /// World rank of each member.
    pub ranks: Vec<u32>,
    /// Node (node-map index) of each member.
    pub nodes: Vec<u32>,
    /// Comm rank of each world rank.
    pub index: HashMap<u32, u32>,
}

/// A communicator: a group of ranks and a context that keeps its traffic apart from every
/// other communicator's. Cheap to clone (clones share the context).
#[derive(Clone)]
pub struct Comm {
    pub(crate) core: Rc<Core>,
    pub(crate) ctx: u16,
    pub(crate) group: Rc<Group>,
    pub(crate) rank: u32,
    pub(crate) coll_seq: Rc<std::cell::Cell<u32>>,
    pub(crate) win_seq: Rc<std::cell::Cell<u32>>,
    /// The node-local group on the region's collective area (decided on the first collective).
    pub(crate) node: Rc<std::cell::OnceCell<Option<crate::shm::NodeColl>>>,
}

/// A non-blocking operation in flight. Receives borrow their buffer until waited for.
pub struct Request<'a> {
    core: Rc<Core>,
    id: u64,
    dst: Option<&'a mut [u8]>,
    group: Rc<Group>,
    peer: Option<u32>,
    collected: bool,
}

impl Request<'_> {
    /// Waits for completion.
    pub fn wait(mut self) -> Result<Status> {
        let peers: Vec<u32> = match self.peer {
            Some(p) => vec![p],
            None => self.group.ranks.clone(),
        };
        let id = self.id;
        let st = self.core.complete(id, self.dst.take(), &peers, &|| {
            format!("request {id} (a send, receive or one-sided operation)")
        });
        self.collected = true;
        self.translate(st?)
    }

    /// Completion without blocking: `Some(status)` once done (the request is then spent).
    pub fn test(&mut self) -> Result<Option<Status>> {
        if self.collected {
            return Err(Error::Invalid("request already completed".into()));
        }
        self.core.drain()?;
        if !self.core.is_done(self.id) {
            return Ok(None);
        }
        self.collected = true;
        let st = self.core.finish(self.id, self.dst.take())?;
        self.translate(st).map(Some)
    }

    fn translate(&self, mut st: Status) -> Result<Status> {
        st.source = self
            .group
            .index
            .get(&st.source)
            .copied()
            .unwrap_or(st.source);
        Ok(st)
    }
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        if !self.collected {
            self.core.orphan(self.id);
        }
    }
}

/// Waits for every request; returns their statuses in order (the first error wins, after all
/// were waited for).
pub fn wait_all(reqs: Vec<Request<'_>>) -> Result<Vec<Status>> {
    let mut out = Vec::with_capacity(reqs.len());
    let mut err = None;
    for r in reqs {
        match r.wait() {
            Ok(s) => out.push(s),
            Err(e) => {
                if err.is_none() {
                    err = Some(e)
                }
            }
        }
    }
    match err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

fn check_tag(tag: i32) -> Result<u32> {
    if tag < 0 {
        return Err(Error::BadTag(tag));
    }
    Ok(tag as u32)
}

impl Comm {
    pub(crate) fn build(core: Rc<Core>, ctx: u16, ranks: Vec<u32>, nodes: Vec<u32>) -> Comm {
        let me = core.world_rank();
        let index: HashMap<u32, u32> = ranks
            .iter()
            .enumerate()
            .map(|(i, &w)| (w, i as u32))
            .collect();
        let rank = index.get(&me).copied().unwrap_or(u32::MAX);
        Comm {
            core,
            ctx,
            group: Rc::new(Group {
                ranks,
                nodes,
                index,
            }),
            rank,
            coll_seq: Rc::new(std::cell::Cell::new(0)),
            win_seq: Rc::new(std::cell::Cell::new(0)),
            node: Rc::new(std::cell::OnceCell::new()),
        }
    }

    /// This rank's number in the communicator.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> u32 {
        self.group.ranks.len() as u32
    }

    /// World rank of communicator rank `r`.
    pub fn world_rank(&self, r: u32) -> Result<u32> {
        self.group
            .ranks
            .get(r as usize)
            .copied()
            // ok_or_else: an eagerly built error would be built and dropped on every send.
            .ok_or_else(|| Error::BadRank {
                rank: r,
                size: self.size(),
            })
    }

    /// Node (node-map index) of communicator rank `r`.
    pub fn node_of(&self, r: u32) -> Result<u32> {
        self.group
            .nodes
            .get(r as usize)
            .copied()
            // ok_or_else: an eagerly built error would be built and dropped on every send.
            .ok_or_else(|| Error::BadRank {
                rank: r,
                size: self.size(),
            })
    }

    /// Context id (point-to-point; collectives use the next one).
    pub fn context(&self) -> u16 {
        self.ctx
    }

    pub(crate) fn peers(&self) -> &[u32] {
        &self.group.ranks
    }

    fn request<'a>(&self, id: u64, dst: Option<&'a mut [u8]>, peer: Option<u32>) -> Request<'a> {
        Request {
            core: self.core.clone(),
            id,
            dst,
            group: self.group.clone(),
            peer,
            collected: false,
        }
    }

    // --------------------------------------------------------------- raw bytes

    pub(crate) fn isend_bytes(
        &self,
        data: &[u8],
        dest: u32,
        ctx: u16,
        tag: u32,
    ) -> Result<Request<'static>> {
        let w = self.world_rank(dest)?;
        let id = self.core.isend(w, match_bits(ctx, tag), data)?;
        Ok(self.request(id, None, Some(w)))
    }

    pub(crate) fn irecv_bytes<'a>(
        &self,
        buf: &'a mut [u8],
        src: Source,
        ctx: u16,
        tag: i32,
    ) -> Result<Request<'a>> {
        let (wsrc, peer) = match src {
            Source::Any => (None, None),
            Source::Rank(r) => {
                let w = self.world_rank(r)?;
                (Some(w), Some(w))
            }
        };
        let (bits, ignore) = if tag == ANY_TAG {
            (match_bits(ctx, 0), TAG_MASK)
        } else {
            (match_bits(ctx, check_tag(tag)?), 0)
        };
        let id = self.core.irecv(wsrc, bits, ignore, buf.len() as u64)?;
        Ok(self.request(id, Some(buf), peer))
    }

    // --------------------------------------------------------------- typed point-to-point

    /// Starts a send of `data` to `dest` with `tag` (≥ 0). The data is copied out before this
    /// returns; wait on the request to know the receiver has it (large messages).
    pub fn isend<T: Pod>(&self, data: &[T], dest: u32, tag: i32) -> Result<Request<'static>> {
        self.isend_bytes(bytemuck::cast_slice(data), dest, self.ctx, check_tag(tag)?)
    }

    /// Blocking send: returns once `data` may be reused (small messages at once; larger ones when
    /// the receiver holds them).
    pub fn send<T: Pod>(&self, data: &[T], dest: u32, tag: i32) -> Result<()> {
        self.isend(data, dest, tag)?.wait().map(|_| ())
    }

    /// Starts a receive into `buf` from `src` ([`ANY_SOURCE`] or a rank) with `tag` or
    /// [`ANY_TAG`]. A longer message is an error ([`Error::Truncated`]); a shorter one fills the
    /// front of `buf` (see [`Status::count`]).
    pub fn irecv<'a, T: Pod>(
        &self,
        buf: &'a mut [T],
        src: impl Into<Source>,
        tag: i32,
    ) -> Result<Request<'a>> {
        self.irecv_bytes(bytemuck::cast_slice_mut(buf), src.into(), self.ctx, tag)
    }

    /// Blocking receive.
    pub fn recv<T: Pod>(&self, buf: &mut [T], src: impl Into<Source>, tag: i32) -> Result<Status> {
        let st = self.irecv(buf, src, tag)?.wait()?;
        if st.bytes % std::mem::size_of::<T>().max(1) as u64 != 0 {
            return Err(Error::NotWhole {
                bytes: st.bytes,
                elem: std::mem::size_of::<T>(),
            });
        }
        Ok(st)
    }

    /// Blocking receive that insists on exactly `buf.len()` elements.
    pub fn recv_exact<T: Pod>(
        &self,
        buf: &mut [T],
        src: impl Into<Source>,
        tag: i32,
    ) -> Result<Status> {
        let want = std::mem::size_of_val(buf) as u64;
        let st = self.recv(buf, src, tag)?;
        if st.bytes != want {
            return Err(Error::SizeMismatch {
                op: "recv_exact",
                detail: format!(
                    "rank {} sent {} bytes, the receive expects exactly {want}",
                    st.source, st.bytes
                ),
            });
        }
        Ok(st)
    }

    /// Receives a message of any length into a new vector.
    pub fn recv_vec<T: Pod>(&self, src: impl Into<Source>, tag: i32) -> Result<(Vec<T>, Status)> {
        let src = src.into();
        let st = self.probe(src, tag)?;
        let n = st.bytes as usize / std::mem::size_of::<T>().max(1);
        let mut v = vec![T::zeroed(); n];
        // Receive exactly the probed message: same source, same tag.
        let st = self.recv(&mut v, st.source, st.tag)?;
        Ok((v, st))
    }

    /// Sends `data` to `dest` and receives into `buf` from `src`, without deadlock.
    pub fn sendrecv<T: Pod, U: Pod>(
        &self,
        data: &[T],
        dest: u32,
        stag: i32,
        buf: &mut [U],
        src: impl Into<Source>,
        rtag: i32,
    ) -> Result<Status> {
        let r = self.irecv(buf, src, rtag)?;
        let s = self.isend(data, dest, stag)?;
        let st = r.wait()?;
        s.wait()?;
        Ok(st)
    }

    /// Checks for a message without receiving it.
    pub fn iprobe(&self, src: impl Into<Source>, tag: i32) -> Result<Option<Status>> {
        let wsrc = match src.into() {
            Source::Any => None,
            Source::Rank(r) => Some(self.world_rank(r)?),
        };
        let (bits, ignore) = if tag == ANY_TAG {
            (match_bits(self.ctx, 0), TAG_MASK)
        } else {
            (match_bits(self.ctx, check_tag(tag)?), 0)
        };
        Ok(self
            .core
            .iprobe(wsrc, bits, ignore)?
            .map(|(w, b, len)| Status {
                source: self.group.index.get(&w).copied().unwrap_or(w),
                tag: (b & TAG_MASK) as u32 as i32,
                bytes: len,
            }))
    }

    /// Waits until a matching message is there; returns its status without receiving it.
    pub fn probe(&self, src: impl Into<Source>, tag: i32) -> Result<Status> {
        let src = src.into();
        if let Some(s) = self.iprobe(src, tag)? {
            return Ok(s);
        }
        let peers: Vec<u32> = match src {
            Source::Any => self.group.ranks.clone(),
            Source::Rank(r) => vec![self.world_rank(r)?],
        };
        let wsrc = match src {
            Source::Any => None,
            Source::Rank(r) => Some(self.world_rank(r)?),
        };
        let (bits, ignore) = if tag == ANY_TAG {
            (match_bits(self.ctx, 0), TAG_MASK)
        } else {
            (match_bits(self.ctx, check_tag(tag)?), 0)
        };
        let what = || format!("a message from {src:?} with tag {tag} (probe)");
        let (w, b, len) = self.core.probe(wsrc, bits, ignore, &peers, &what)?;
        Ok(Status {
            source: self.group.index.get(&w).copied().unwrap_or(w),
            tag: (b & TAG_MASK) as u32 as i32,
            bytes: len,
        })
    }

    // --------------------------------------------------------------- communicators

    /// A new communicator with the same ranks and a new context.
    pub fn dup(&self) -> Result<Comm> {
        let ctx = self.agree_context()?;
        Ok(Comm::build(
            self.core.clone(),
            ctx,
            self.group.ranks.clone(),
            self.group.nodes.clone(),
        ))
    }

    /// Splits by `colour`: ranks with the same colour form a communicator, ordered by `key` then
    /// by rank. `None` takes no part and gets `None`.
    pub fn split(&self, colour: Option<u32>, key: i32) -> Result<Option<Comm>> {
        let ctx = self.agree_context()?;
        let mine = [
            colour.map(|c| c as i64).unwrap_or(-1),
            key as i64,
            self.rank as i64,
        ];
        let mut all = vec![0i64; 3 * self.size() as usize];
        self.all_gather(&mine, &mut all)?;
        let Some(c) = colour else { return Ok(None) };
        let mut members: Vec<(i64, i64)> = all
            .chunks(3)
            .filter(|t| t[0] == c as i64)
            .map(|t| (t[1], t[2]))
            .collect();
        members.sort();
        let ranks = members
            .iter()
            .map(|&(_, r)| self.group.ranks[r as usize])
            .collect();
        let nodes = members
            .iter()
            .map(|&(_, r)| self.group.nodes[r as usize])
            .collect();
        Ok(Some(Comm::build(self.core.clone(), ctx, ranks, nodes)))
    }

    /// Every member proposes its next free context; all take the largest.
    fn agree_context(&self) -> Result<u16> {
        let mine = [self.core.next_ctx.get() as u32];
        let mut out = [0u32];
        self.all_reduce(&mine, &mut out, crate::ops::Max)?;
        let ctx = out[0];
        if ctx + 2 >= u16::MAX as u32 {
            return Err(Error::Invalid("out of communicator context ids".into()));
        }
        self.core.next_ctx.set(ctx as u16 + 2);
        Ok(ctx as u16)
    }
}
