//! Collective operations. Every call takes the communicator's collective context (its context
//! id + 1) and a fresh sequence number as tag, so collectives never match point-to-point
//! traffic nor each other.
//!
//! Algorithm choice (`n` = bytes per rank, `p` = ranks, "node group" = the members on one node of
//! the node map, "multi-node" = the communicator spans more than one node).
//!
//! **Inside a node** (any node group with several members) barrier, broadcast, reduce and
//! all-reduce do not use messages at all: they go through the collective area of the node's QK
//! region (see `crate::shm`): per-rank arrival words and 2 KiB data slots, 64 per rank, used in
//! turn. Payloads larger than a slot go piece by piece. The portals algorithms below then run only
//! among one *leader* per node (the root on its node, else the node's first member), so every
//! collective is "intra-node first, then across nodes":
//!
//! | operation  | node group (shared memory)                                        | leaders (portals)   |
//! |------------|-------------------------------------------------------------------|---------------------|
//! | barrier    | everyone waits for everyone's arrival word (one node); multi-node: leader waits, leaders' dissemination barrier, leader's release word | dissemination |
//! | broadcast  | the leader publishes each piece, the others copy it (the root may run 63 operations ahead; with more ranks than CPUs, payloads up to 112 bytes go through the 1024 small slots: 1023 ahead) | binomial tree |
//! | reduce     | everyone publishes, the leader combines in rank order               | binomial tree       |
//! | all-reduce | one node: everyone publishes and everyone combines all slots in rank order (bitwise-identical results everywhere); multi-node: the leader combines, then publishes the leaders' result | recursive doubling |
//! | all-to-all | one node only: everyone publishes its send buffer piece by piece (through the stages above one slot, else the slots up to [`ALLTOALL_SHM`] per rank), each copies its block out of the others' pieces; large blocks may instead be read straight from the others' send buffers by cross-memory attach (with the stages: from [`ALLTOALL_CHOICE`] when it measures cheapest; without: from [`ALLTOALL_CMA`], [`ALLTOALL_CMA_OVERSUBSCRIBED`] with more ranks than cores) | — (portals algorithms below) |
//!
//! **Large payloads inside one node** (the whole communicator on one node, more than
//! [`STAGE_MIN`] bytes per rank) go through the *stages* of the region instead: one 256 KiB buffer
//! per rank, given at setup to one communicator per process for the process's life (the first
//! one on one node that runs a collective; others use the paths below), cut in four 64 KiB segments that successive
//! pieces of a payload use in turn (a writer may run three pieces ahead of its slowest reader).
//! Per piece, all-reduce is a reduce-scatter and all-gather in shared memory: every rank copies
//! the slices the others reduce into its stage, rank `i` combines slice `i` of every rank in rank
//! order (its own straight from its send buffer) and publishes the result, and every rank copies
//! the others' results out: two handshakes and about two copies of the payload per rank, no
//! messages and no allocation. Broadcast: the root copies each piece into its stage, the others
//! copy it out. `PUMACOLL_STAGE=0` turns the stages off, `PUMACOLL_STAGE_MIN=<bytes>` moves the
//! limit (for measurements). Large broadcasts and all-reduces can also write the stages with
//! non-temporal stores (from [`LARGE_NT`]) or skip them: the readers copy straight out of the
//! other ranks' buffers by cross-memory attach (from [`LARGE_CMA`]). Which is cheapest depends on
//! where the host put the vCPUs, which changes at run time, so the root (broadcast) or member 0
//! (all-reduce; all-to-all from [`ALLTOALL_CHOICE`] bytes per block) picks by measured cost
//! (`crate::shm::Chooser`) and names the path in its slot; `PUMACOLL_LARGE=stage|nt|cma` forces
//! one.
//!
//! The slot path is taken for payloads up to [`SHM_LONG`] (64 KiB), but only up to
//! [`SHM_LONG_DEDICATED`] (4 KiB) when the whole communicator is on one node with a core per rank:
//! there the portals algorithms, one copy per message and no handshake per 2 KiB piece, are faster
//! for larger payloads, while with more ranks than cores (or across nodes) the slots win up to
//! 64 KiB because no rank has to be scheduled to match a message. `PUMACOLL_SHM=0`
//! turns it off, `PUMACOLL_SHM_MAX=<bytes>` sets the limit (for measurements). A communicator
//! whose members all sit on different nodes, or whose area context is taken (more than 8 live
//! communicators with common members), uses the portals algorithms throughout:
//!
//! | operation   | small (`n ≤` limit)                                   | large                                      | limit   |
//! |-------------|--------------------------------------------------------|--------------------------------------------|---------|
//! | barrier     | dissemination (⌈log₂ p⌉ rounds)                        | —                                          | —       |
//! | broadcast   | binomial tree; multi-node: leaders first, then per node | scatter + ring all-gather                  | 64 KiB  |
//! | reduce      | binomial tree; multi-node: per node first, then leaders | ring reduce-scatter + gather to the root   | 64 KiB  |
//! | all-reduce  | recursive doubling (non-powers of two fold the extra ranks in); multi-node: node reduce, doubling among leaders, node broadcast | ring reduce-scatter + ring all-gather, ranks ordered by node | 16 KiB |
//! | gather      | binomial tree                                          | direct (root receives from everyone)       | 64 KiB total |
//! | scatter     | binomial tree                                          | direct                                     | 64 KiB total |
//! | all-gather  | binomial gather + binomial broadcast                   | ring                                       | 64 KiB total |
//! | all-to-all  | all messages posted at once                            | pairwise exchange (p − 1 steps)            | 1 KiB per block |

use bytemuck::Pod;

use crate::comm::{wait_all, Comm, Request, Source};
use crate::error::{Error, Result};
use crate::ops::Operation;
use crate::shm::{copy_bytes, copy_elems, copy_to_stage, LargeOp, LargePath, NodeColl};
use std::cell::RefCell;
use std::time::{Duration, Instant};

/// Broadcast and reduce switch algorithms above this many bytes.
pub const BCAST_LONG: usize = 64 * 1024;
/// All-reduce switches to the ring above this many bytes.
pub const ALLREDUCE_LONG: usize = 16 * 1024;
/// Gather, scatter and all-gather switch above this many bytes in total.
pub const GATHER_LONG: usize = 64 * 1024;
/// All-to-all switches to pairwise exchange above this many bytes per block.
pub const ALLTOALL_LONG: usize = 1024;
/// All-to-all of a communicator on one node without the stages goes through the slots up to this
/// many bytes per rank (its whole send buffer), in slot-sized pieces.
pub const ALLTOALL_SHM: usize = 64 * 1024;

fn bytes<T: Pod>(v: &[T]) -> &[u8] {
    bytemuck::cast_slice(v)
}
fn bytes_mut<T: Pod>(v: &mut [T]) -> &mut [u8] {
    bytemuck::cast_slice_mut(v)
}

/// Element range of chunk `i` of `n` elements cut in `k` pieces.
fn chunk(n: usize, k: usize, i: usize) -> std::ops::Range<usize> {
    (i * n / k)..((i + 1) * n / k)
}

impl Comm {
    fn coll_tag(&self) -> u32 {
        let t = self.coll_seq.get();
        self.coll_seq.set(t.wrapping_add(1));
        t & 0x7fff_ffff
    }

    fn xsend(&self, data: &[u8], to: u32, tag: u32) -> Result<Request<'static>> {
        self.isend_bytes(data, to, self.ctx + 1, tag)
    }

    fn xirecv<'a>(&self, buf: &'a mut [u8], from: u32, tag: u32) -> Result<Request<'a>> {
        self.irecv_bytes(buf, Source::Rank(from), self.ctx + 1, tag as i32)
    }

    fn check(op: &'static str, r: Result<crate::Status>, want: usize) -> Result<()> {
        match r {
            Ok(st) if st.bytes == want as u64 => Ok(()),
            Ok(st) => Err(Error::SizeMismatch {
                op,
                detail: format!(
                    "rank {} contributed {} bytes where this rank expects {want}",
                    st.source, st.bytes
                ),
            }),
            Err(Error::Truncated {
                from, sent, cap, ..
            }) => Err(Error::SizeMismatch {
                op,
                detail: format!(
                    "rank {from} contributed {sent} bytes where this rank expects {cap}"
                ),
            }),
            Err(e) => Err(e),
        }
    }

    fn xrecv(&self, buf: &mut [u8], from: u32, tag: u32, op: &'static str) -> Result<()> {
        let want = buf.len();
        let r = self.xirecv(buf, from, tag)?.wait();
        Self::check(op, r, want)
    }

    #[allow(clippy::too_many_arguments)]
    fn xsendrecv(
        &self,
        data: &[u8],
        to: u32,
        buf: &mut [u8],
        from: u32,
        tag: u32,
        op: &'static str,
    ) -> Result<()> {
        let want = buf.len();
        let r = self.xirecv(buf, from, tag)?;
        let s = self.xsend(data, to, tag)?;
        Self::check(op, r.wait(), want)?;
        s.wait().map(|_| ())
    }

    /// Members grouped by node, in order of first appearance; each group in rank order.
    fn node_groups(&self) -> Vec<Vec<u32>> {
        let mut groups: Vec<(u32, Vec<u32>)> = Vec::new();
        for (r, &n) in self.group.nodes.iter().enumerate() {
            match groups.iter_mut().find(|g| g.0 == n) {
                Some(g) => g.1.push(r as u32),
                None => groups.push((n, vec![r as u32])),
            }
        }
        groups.into_iter().map(|g| g.1).collect()
    }

    /// Node groups when a two-level algorithm pays (several nodes, some with several ranks).
    fn hierarchy(&self) -> Option<Vec<Vec<u32>>> {
        let g = self.node_groups();
        (g.len() > 1 && g.len() < self.size() as usize).then_some(g)
    }

    /// Members ordered node by node (rings cross each node boundary once).
    fn node_order(&self) -> Vec<u32> {
        self.node_groups().concat()
    }

    fn pos(members: &[u32], r: u32) -> usize {
        members.iter().position(|&m| m == r).unwrap_or(0)
    }

    // ---------------------------------------------------------------- building blocks

    fn tree_bcast(&self, members: &[u32], root: usize, buf: &mut [u8], tag: u32) -> Result<()> {
        let g = members.len();
        if g <= 1 {
            return Ok(());
        }
        let rel = (Self::pos(members, self.rank) + g - root) % g;
        let mut mask = 1;
        while mask < g {
            if rel & mask != 0 {
                let src = members[(rel - mask + root) % g];
                self.xrecv(buf, src, tag, "broadcast")?;
                break;
            }
            mask <<= 1;
        }
        mask >>= 1;
        let mut reqs = Vec::new();
        while mask > 0 {
            if rel + mask < g {
                reqs.push(self.xsend(buf, members[(rel + mask + root) % g], tag)?);
            }
            mask >>= 1;
        }
        wait_all(reqs).map(|_| ())
    }

    fn tree_reduce<T: Pod>(
        &self,
        members: &[u32],
        root: usize,
        acc: &mut [T],
        op: &dyn Operation<T>,
        tag: u32,
    ) -> Result<()> {
        let g = members.len();
        let rel = (Self::pos(members, self.rank) + g - root) % g;
        let mut tmp = vec![T::zeroed(); acc.len()];
        let mut mask = 1;
        while mask < g {
            if rel & mask == 0 {
                let src = rel | mask;
                if src < g {
                    self.xrecv(
                        bytes_mut(&mut tmp),
                        members[(src + root) % g],
                        tag,
                        "reduce",
                    )?;
                    op.combine(acc, &tmp);
                }
            } else {
                let dst = members[((rel & !mask) + root) % g];
                self.xsend(bytes(acc), dst, tag)?.wait()?;
                break;
            }
            mask <<= 1;
        }
        Ok(())
    }

    fn rd_allreduce<T: Pod>(
        &self,
        members: &[u32],
        acc: &mut [T],
        op: &dyn Operation<T>,
        tag: u32,
    ) -> Result<()> {
        let g = members.len();
        if g <= 1 {
            return Ok(());
        }
        let me = Self::pos(members, self.rank);
        let mut pof2 = 1;
        while pof2 * 2 <= g {
            pof2 *= 2;
        }
        let rem = g - pof2;
        let mut tmp = vec![T::zeroed(); acc.len()];
        let newrank = if me < 2 * rem {
            if me % 2 == 0 {
                self.xsend(bytes(acc), members[me + 1], tag)?.wait()?;
                None
            } else {
                self.xrecv(bytes_mut(&mut tmp), members[me - 1], tag, "all-reduce")?;
                op.combine(acc, &tmp);
                Some(me / 2)
            }
        } else {
            Some(me - rem)
        };
        if let Some(nr) = newrank {
            let mut mask = 1;
            while mask < pof2 {
                let pn = nr ^ mask;
                let p = members[if pn < rem { pn * 2 + 1 } else { pn + rem }];
                self.xsendrecv(bytes(acc), p, bytes_mut(&mut tmp), p, tag, "all-reduce")?;
                op.combine(acc, &tmp);
                mask <<= 1;
            }
        }
        if me < 2 * rem {
            if me % 2 == 1 {
                self.xsend(bytes(acc), members[me - 1], tag)?.wait()?;
            } else {
                self.xrecv(bytes_mut(acc), members[me + 1], tag, "all-reduce")?;
            }
        }
        Ok(())
    }

    /// Ring reduce-scatter: afterwards this rank holds the reduced chunk `(pos + 1) % g`.
    fn ring_reduce_scatter<T: Pod>(
        &self,
        members: &[u32],
        acc: &mut [T],
        op: &dyn Operation<T>,
        tag: u32,
    ) -> Result<usize> {
        let g = members.len();
        let n = acc.len();
        let me = Self::pos(members, self.rank);
        let next = members[(me + 1) % g];
        let prev = members[(me + g - 1) % g];
        let mut tmp = vec![T::zeroed(); n / g + 1];
        for step in 0..g - 1 {
            let s = chunk(n, g, (me + g - step) % g);
            let r = chunk(n, g, (me + 2 * g - step - 1) % g);
            let t = &mut tmp[..r.len()];
            let rq = self.xirecv(bytes_mut(t), prev, tag)?;
            let sq = self.xsend(bytes(&acc[s]), next, tag)?;
            Self::check("reduce", rq.wait(), r.len() * std::mem::size_of::<T>())?;
            sq.wait()?;
            op.combine(&mut acc[r.clone()], &tmp[..r.len()]);
        }
        Ok((me + 1) % g)
    }

    /// Ring all-gather of chunks: this rank starts with chunk `first` complete.
    fn ring_allgather_chunks(
        &self,
        members: &[u32],
        buf: &mut [u8],
        elem: usize,
        first: usize,
        tag: u32,
    ) -> Result<()> {
        let g = members.len();
        let n = buf.len() / elem.max(1);
        let me = Self::pos(members, self.rank);
        let next = members[(me + 1) % g];
        let prev = members[(me + g - 1) % g];
        let mut tmp = vec![0u8; (n / g + 1) * elem];
        let span = |c: usize| {
            let r = chunk(n, g, c);
            r.start * elem..r.end * elem
        };
        for step in 0..g - 1 {
            let s = span((first + g - step) % g);
            let r = span((first + 2 * g - step - 1) % g);
            let t = &mut tmp[..r.len()];
            let rq = self.xirecv(t, prev, tag)?;
            let sq = self.xsend(&buf[s], next, tag)?;
            Self::check("all-gather", rq.wait(), r.len())?;
            sq.wait()?;
            copy_bytes(&mut buf[r.clone()], &tmp[..r.len()]);
        }
        Ok(())
    }

    // ---------------------------------------------------------------- the collectives

    /// Waits until every rank of the communicator has called `barrier`.
    pub fn barrier(&self) -> Result<()> {
        let tag = self.coll_tag();
        if let Some(n) = self.node(tag)? {
            return self.node_barrier(n, tag);
        }
        let g = self.size() as usize;
        let me = self.rank as usize;
        let mut k = 1;
        while k < g {
            let to = ((me + k) % g) as u32;
            let from = ((me + g - k) % g) as u32;
            self.xsendrecv(&[], to, &mut [], from, tag, "barrier")?;
            k <<= 1;
        }
        Ok(())
    }

    /// Copies `buf` of rank `root` into `buf` of every rank (all must pass the same length).
    pub fn broadcast<T: Pod>(&self, buf: &mut [T], root: u32) -> Result<()> {
        self.world_rank(root)?;
        let tag = self.coll_tag();
        let g = self.size() as usize;
        let b = bytes_mut(buf);
        // With more ranks than CPUs, a few KiB go through the slots, not the stage: a stage
        // root runs at most STAGE_SEGS - 1 broadcasts ahead of its slowest reader (a slot root
        // SLOTS - 1 pieces), so back-to-back broadcasts would wait for a descheduled reader
        // every few calls. Every rank of the node decides alike (`crowded` is never revised).
        let slots_first = self.core.crowded() && b.len() <= CROWDED_BCAST_SLOTS_MAX;
        if g > 1 && !slots_first {
            if let Some(n) = self.node_stage(b.len(), 1, tag)? {
                return Self::large_bcast(n, b, root);
            }
        }
        if let Some(n) = self.node_for(b.len(), 1, tag)? {
            return self.node_bcast(n, b, root, tag);
        }
        if b.len() <= BCAST_LONG || g <= 2 {
            let all: Vec<u32> = (0..g as u32).collect();
            match self.hierarchy() {
                None => self.tree_bcast(&all, root as usize, b, tag),
                Some(groups) => {
                    let leaders: Vec<u32> = groups
                        .iter()
                        .map(|m| if m.contains(&root) { root } else { m[0] })
                        .collect();
                    let mine = groups
                        .iter()
                        .position(|m| m.contains(&self.rank))
                        .unwrap_or(0);
                    let my_leader = leaders[mine];
                    if my_leader == self.rank {
                        let rp = Self::pos(&leaders, root);
                        self.tree_bcast(&leaders, rp, b, tag)?;
                    }
                    let local = &groups[mine];
                    self.tree_bcast(local, Self::pos(local, my_leader), b, tag)
                }
            }
        } else {
            // Scatter the chunks from the root, then ring all-gather them.
            let order: Vec<u32> = (0..g as u32).collect();
            let elem = std::mem::size_of::<T>().max(1);
            let n = b.len() / elem;
            let span = |c: usize| {
                let r = chunk(n, g, c);
                r.start * elem..r.end * elem
            };
            // Chunk i goes to rank i; the ring starts with each rank's own chunk.
            if self.rank == root {
                let mut reqs = Vec::new();
                for i in 0..g {
                    if i as u32 != root {
                        reqs.push(self.xsend(&b[span(i)], i as u32, tag)?);
                    }
                }
                wait_all(reqs)?;
            } else {
                let s = span(self.rank as usize);
                self.xrecv(&mut b[s], root, tag, "broadcast")?;
            }
            self.ring_allgather_chunks(&order, b, elem, self.rank as usize, tag)
        }
    }

    /// Combines `send` of every rank with `op`; the result lands in `recv` of `root` (other
    /// ranks pass `None`).
    pub fn reduce<T: Pod>(
        &self,
        send: &[T],
        recv: Option<&mut [T]>,
        root: u32,
        op: impl Operation<T>,
    ) -> Result<()> {
        self.world_rank(root)?;
        let tag = self.coll_tag();
        let g = self.size() as usize;
        let mut acc = send.to_vec();
        let n = acc.len();
        let elem = std::mem::size_of::<T>();
        if let Some(nc) = self.node_for(n * elem, elem, tag)? {
            self.node_reduce(nc, &mut acc, root, &op, tag)?;
        } else if n * elem <= BCAST_LONG || n < g {
            let all: Vec<u32> = (0..g as u32).collect();
            match self.hierarchy() {
                None => self.tree_reduce(&all, root as usize, &mut acc, &op, tag)?,
                Some(groups) => {
                    let leaders: Vec<u32> = groups
                        .iter()
                        .map(|m| if m.contains(&root) { root } else { m[0] })
                        .collect();
                    let mine = groups
                        .iter()
                        .position(|m| m.contains(&self.rank))
                        .unwrap_or(0);
                    let local = &groups[mine];
                    let my_leader = leaders[mine];
                    self.tree_reduce(local, Self::pos(local, my_leader), &mut acc, &op, tag)?;
                    if my_leader == self.rank {
                        self.tree_reduce(&leaders, Self::pos(&leaders, root), &mut acc, &op, tag)?;
                    }
                }
            }
        } else {
            let order = self.node_order();
            let own = self.ring_reduce_scatter(&order, &mut acc, &op, tag)?;
            if self.rank != root {
                self.xsend(bytes(&acc[chunk(n, g, own)]), root, tag)?
                    .wait()?;
            } else {
                let mut reqs = Vec::new();
                let mut rest: &mut [T] = &mut acc;
                let mut base = 0;
                // Receive every other chunk straight into place (chunks in index order).
                let mut pieces = Vec::new();
                for c in 0..g {
                    let r = chunk(n, g, c);
                    let (head, tail) = rest.split_at_mut(r.end - base);
                    base = r.end;
                    rest = tail;
                    pieces.push(head);
                }
                for (c, piece) in pieces.into_iter().enumerate() {
                    if c == own {
                        continue;
                    }
                    // Owner of chunk c is the member at position c - 1 of the ring order.
                    let owner = order[(c + g - 1) % g];
                    let want = std::mem::size_of_val(piece);
                    reqs.push((want, self.xirecv(bytes_mut(piece), owner, tag)?));
                }
                for (want, r) in reqs {
                    Self::check("reduce", r.wait(), want)?;
                }
            }
        }
        if let Some(out) = recv {
            if self.rank == root {
                if out.len() != n {
                    return Err(Error::SizeMismatch {
                        op: "reduce",
                        detail: format!(
                            "receive buffer holds {} elements, data has {n}",
                            out.len()
                        ),
                    });
                }
                copy_elems(out, &acc);
            }
        }
        Ok(())
    }

    /// Combines `send` of every rank with `op`; every rank gets the result in `recv`.
    pub fn all_reduce<T: Pod>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: impl Operation<T>,
    ) -> Result<()> {
        if send.len() != recv.len() {
            return Err(Error::SizeMismatch {
                op: "all-reduce",
                detail: format!("send has {} elements, receive {}", send.len(), recv.len()),
            });
        }
        let tag = self.coll_tag();
        let g = self.size() as usize;
        if g > 1 {
            if let Some(nc) =
                self.node_stage(std::mem::size_of_val(recv), std::mem::size_of::<T>(), tag)?
            {
                return Self::large_allreduce(nc, send, recv, &op);
            }
        }
        copy_elems(recv, send);
        if g == 1 {
            return Ok(());
        }
        let n = recv.len();
        let elem = std::mem::size_of::<T>();
        if let Some(nc) = self.node_for(std::mem::size_of_val(recv), elem, tag)? {
            return self.node_allreduce(nc, recv, &op, tag);
        }
        let all: Vec<u32> = (0..g as u32).collect();
        if std::mem::size_of_val(recv) <= ALLREDUCE_LONG || n < g {
            match self.hierarchy() {
                None => self.rd_allreduce(&all, recv, &op, tag),
                Some(groups) => {
                    let mine = groups
                        .iter()
                        .position(|m| m.contains(&self.rank))
                        .unwrap_or(0);
                    let local = &groups[mine];
                    self.tree_reduce(local, 0, recv, &op, tag)?;
                    if local[0] == self.rank {
                        let leaders: Vec<u32> = groups.iter().map(|m| m[0]).collect();
                        self.rd_allreduce(&leaders, recv, &op, tag)?;
                    }
                    self.tree_bcast(local, 0, bytes_mut(recv), tag)
                }
            }
        } else {
            let order = self.node_order();
            let own = self.ring_reduce_scatter(&order, recv, &op, tag)?;
            let elem = std::mem::size_of::<T>();
            self.ring_allgather_chunks(&order, bytes_mut(recv), elem, own, tag)
        }
    }

    /// Collects `send` (same length on every rank) of every rank, in rank order, into `recv` of
    /// `root` (`size × send.len()` elements; other ranks pass `None`).
    pub fn gather<T: Pod>(&self, send: &[T], recv: Option<&mut [T]>, root: u32) -> Result<()> {
        self.world_rank(root)?;
        let tag = self.coll_tag();
        let g = self.size() as usize;
        let blk = std::mem::size_of_val(send);
        let mut out = recv;
        if self.rank == root {
            let have = out.as_ref().map(|o| o.len()).unwrap_or(0);
            if have != send.len() * g {
                return Err(Error::SizeMismatch {
                    op: "gather",
                    detail: format!(
                        "the root's receive buffer holds {have} elements, {g} ranks x {} are coming",
                        send.len()
                    ),
                });
            }
        }
        if blk * g <= GATHER_LONG {
            // Binomial: each subtree's blocks travel together, in relative-rank order.
            let rel = (self.rank as usize + g - root as usize) % g;
            let cnt = binomial_subtree_len(rel, g);
            let mut tmp = vec![0u8; cnt * blk];
            tmp[..blk].copy_from_slice(bytes(send));
            let mut mask = 1;
            while mask < g {
                if rel & mask == 0 {
                    let src = rel | mask;
                    if src < g {
                        let c = mask.min(g - src);
                        let at = mask * blk;
                        let from = ((src + root as usize) % g) as u32;
                        self.xrecv(&mut tmp[at..at + c * blk], from, tag, "gather")?;
                    }
                } else {
                    let dst = (((rel & !mask) + root as usize) % g) as u32;
                    self.xsend(&tmp, dst, tag)?.wait()?;
                    break;
                }
                mask <<= 1;
            }
            if self.rank == root {
                if let Some(o) = out.as_deref_mut() {
                    let ob = bytes_mut(o);
                    for r in 0..g {
                        let real = (r + root as usize) % g;
                        ob[real * blk..(real + 1) * blk]
                            .copy_from_slice(&tmp[r * blk..(r + 1) * blk]);
                    }
                }
            }
            Ok(())
        } else if self.rank == root {
            let o = out.map(bytes_mut).unwrap_or_default();
            let mut reqs = Vec::new();
            for (r, piece) in o.chunks_mut(blk.max(1)).enumerate() {
                if r as u32 == root {
                    piece.copy_from_slice(bytes(send));
                } else {
                    reqs.push((r, self.xirecv(piece, r as u32, tag)?));
                }
            }
            for (_, q) in reqs {
                Self::check("gather", q.wait(), blk)?;
            }
            Ok(())
        } else {
            self.xsend(bytes(send), root, tag)?.wait().map(|_| ())
        }
    }

    /// Hands block `i` of `send` at `root` (`size × recv.len()` elements; others pass `None`)
    /// to rank `i`'s `recv`.
    pub fn scatter<T: Pod>(&self, send: Option<&[T]>, recv: &mut [T], root: u32) -> Result<()> {
        self.world_rank(root)?;
        let tag = self.coll_tag();
        let g = self.size() as usize;
        let blk = std::mem::size_of_val(recv);
        if self.rank == root {
            let have = send.map(|s| s.len()).unwrap_or(0);
            if have != recv.len() * g {
                return Err(Error::SizeMismatch {
                    op: "scatter",
                    detail: format!(
                        "the root sends {have} elements, {g} ranks x {} are expected",
                        recv.len()
                    ),
                });
            }
        }
        if blk * g <= GATHER_LONG {
            let rel = (self.rank as usize + g - root as usize) % g;
            let cnt = binomial_subtree_len(rel, g);
            let mut tmp = vec![0u8; cnt * blk];
            let mut mask = 1;
            if rel == 0 {
                let sb = bytes(send.unwrap_or_default());
                for r in 0..g {
                    let real = (r + root as usize) % g;
                    tmp[r * blk..(r + 1) * blk].copy_from_slice(&sb[real * blk..(real + 1) * blk]);
                }
                while mask < g {
                    mask <<= 1;
                }
            } else {
                while mask < g {
                    if rel & mask != 0 {
                        let from = (((rel & !mask) + root as usize) % g) as u32;
                        self.xrecv(&mut tmp, from, tag, "scatter")?;
                        break;
                    }
                    mask <<= 1;
                }
            }
            mask >>= 1;
            let mut reqs = Vec::new();
            while mask > 0 {
                if rel + mask < g {
                    let c = mask.min(g - rel - mask);
                    let to = ((rel + mask + root as usize) % g) as u32;
                    reqs.push(self.xsend(&tmp[mask * blk..(mask + c) * blk], to, tag)?);
                }
                mask >>= 1;
            }
            wait_all(reqs)?;
            bytes_mut(recv).copy_from_slice(&tmp[..blk]);
            Ok(())
        } else if self.rank == root {
            let sb = bytes(send.unwrap_or_default());
            let mut reqs = Vec::new();
            for (r, piece) in sb.chunks(blk.max(1)).enumerate() {
                if r as u32 == root {
                    bytes_mut(recv).copy_from_slice(piece);
                } else {
                    reqs.push(self.xsend(piece, r as u32, tag)?);
                }
            }
            wait_all(reqs).map(|_| ())
        } else {
            self.xrecv(bytes_mut(recv), root, tag, "scatter")
        }
    }

    /// Every rank gets every rank's `send`, in rank order (`recv` holds `size × send.len()`).
    pub fn all_gather<T: Pod>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let g = self.size() as usize;
        if recv.len() != send.len() * g {
            return Err(Error::SizeMismatch {
                op: "all-gather",
                detail: format!(
                    "receive buffer holds {} elements, {g} ranks x {} are coming",
                    recv.len(),
                    send.len()
                ),
            });
        }
        if std::mem::size_of_val(recv) <= GATHER_LONG {
            self.gather(send, Some(recv), 0)?;
            return self.broadcast(recv, 0);
        }
        let tag = self.coll_tag();
        let n = send.len();
        let me = self.rank as usize;
        copy_elems(&mut recv[me * n..(me + 1) * n], send);
        let order: Vec<u32> = (0..g as u32).collect();
        // Blocks are equal, so chunk i of the whole buffer is rank i's block.
        let elem = std::mem::size_of_val(send);
        self.ring_allgather_chunks(&order, bytes_mut(recv), elem, me, tag)
    }

    /// Block `j` of `send` goes to rank `j`; block `i` of `recv` comes from rank `i`.
    pub fn all_to_all<T: Pod>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let g = self.size() as usize;
        if send.len() != recv.len() || send.len() % g != 0 {
            return Err(Error::SizeMismatch {
                op: "all-to-all",
                detail: format!(
                    "send has {} and receive {} elements; both must be {g} equal blocks",
                    send.len(),
                    recv.len()
                ),
            });
        }
        let tag = self.coll_tag();
        let n = send.len() / g;
        let me = self.rank as usize;
        let blk = n * std::mem::size_of::<T>();
        let total = std::mem::size_of_val(send);
        if g > 1 {
            // Above one slot on one node with the stages: through the stages or straight out of
            // the others' send buffers, by measured cost (they copy their own block meanwhile).
            if let Some(nd) = self.node_stage(total, 1, tag)? {
                let over = self.core.oversubscribed();
                let rotate = stage_rotate().unwrap_or(!over);
                return Self::large_alltoall(nd, bytes(send), bytes_mut(recv), rotate, over);
            }
        }
        copy_elems(&mut recv[me * n..(me + 1) * n], &send[me * n..(me + 1) * n]);
        if g > 1 {
            // Without the stages, large blocks are read straight out of the others' send buffers.
            if let Some(nd) = self.node_cma(blk, tag)? {
                return Self::cma_alltoall(nd, bytes(send), bytes_mut(recv), false, false);
            }
            if total <= ALLTOALL_SHM {
                if let Some(nd) = self.node(tag)?.filter(|nd| nd.groups.len() == 1) {
                    return Self::node_alltoall(nd, bytes(send), bytes_mut(recv));
                }
            }
        }
        let sb = bytes(send);
        if blk <= ALLTOALL_LONG {
            let mut rq = Vec::new();
            for (i, piece) in bytes_mut(recv).chunks_mut(blk.max(1)).enumerate().take(g) {
                if i != me {
                    rq.push(self.xirecv(piece, i as u32, tag)?);
                }
            }
            let mut sq = Vec::new();
            for k in 1..g {
                let j = (me + k) % g;
                sq.push(self.xsend(&sb[j * blk..(j + 1) * blk], j as u32, tag)?);
            }
            for q in rq {
                Self::check("all-to-all", q.wait(), blk)?;
            }
            wait_all(sq).map(|_| ())
        } else {
            let rb = bytes_mut(recv);
            for k in 1..g {
                let to = (me + k) % g;
                let from = (me + g - k) % g;
                let (s, r) = (to * blk..(to + 1) * blk, from * blk..(from + 1) * blk);
                self.xsendrecv(
                    &sb[s],
                    to as u32,
                    &mut rb[r],
                    from as u32,
                    tag,
                    "all-to-all",
                )?;
            }
            Ok(())
        }
    }
}

/// Ranks in the binomial subtree rooted at relative rank `rel` of a `g`-rank tree (the blocks a
/// rank holds once its gather children have sent, or before it scatters to them).
fn binomial_subtree_len(rel: usize, g: usize) -> usize {
    let mut span = 1;
    while rel & span == 0 && span < g {
        span <<= 1;
    }
    span.min(g - rel)
}

// -------------------------------------------------------------------- intra-node (shared memory)

/// Largest payload (bytes per rank) that barrier-free node-local broadcast, reduce and
/// all-reduce carry through the collective area, in slot-sized pieces; larger ones take the
/// portals algorithms.
pub const SHM_LONG: usize = 64 * 1024;
/// With more ranks than CPUs on the node, broadcasts up to this many bytes take the slots even
/// where the stage would take them (see `Comm::broadcast`).
pub const CROWDED_BCAST_SLOTS_MAX: usize = 8 * 1024;
/// The limit for a communicator on one node with a core per rank: there the portals algorithms
/// (one copy per message, no per-piece handshake) win above a few KiB.
pub const SHM_LONG_DEDICATED: usize = 4 * 1024;

/// All-to-all of a communicator on one node reads blocks of at least this many bytes straight
/// from the other ranks' send buffers (cross-memory attach, one copy) when its ranks outnumber the
/// cores, rather than through the stages (two copies, and one hand-off per 64 KiB piece that costs
/// a context switch when four ranks share a core).
pub const ALLTOALL_CMA_OVERSUBSCRIBED: usize = 32 * 1024;
/// The same with a core per rank.
pub const ALLTOALL_CMA: usize = 64 * 1024;
/// All-to-all of a communicator on one node with the stages chooses by measured cost among the
/// stages, the non-temporal stages and cross-memory attach from blocks of this many bytes (the
/// fixed limits above apply to communicators without the stages); smaller blocks take the
/// stages with plain stores.
pub const ALLTOALL_CHOICE: usize = 16 * 1024;

/// Large node-local broadcasts and all-reduces of at least this many bytes per rank may take the
/// single-copy path (cross-memory attach) when it measures cheaper than the stages (each
/// `process_vm_readv` costs ~3 µs here, and below this the stages win in every placement).
pub const LARGE_CMA: usize = 64 * 1024;

/// `PUMACOLL_CMA_MIN=<bytes>`: one lower limit for every cross-memory-attach path (tests and
/// measurements).
fn cma_min() -> Option<usize> {
    static MIN: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| {
        std::env::var("PUMACOLL_CMA_MIN")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

/// Large node-local broadcasts and all-reduces of at least this many bytes per rank may write
/// the stages with non-temporal stores when that measures cheaper (see
/// [`crate::shm::copy_to_stage`]).
pub const LARGE_NT: usize = 16 * 1024;

/// `PUMACOLL_LARGE=stage|nt|cma` forces the path of large node-local broadcasts and
/// all-reduces (else None: chosen by measured cost).
fn large_forced() -> Option<LargePath> {
    static P: std::sync::OnceLock<Option<LargePath>> = std::sync::OnceLock::new();
    *P.get_or_init(|| match std::env::var("PUMACOLL_LARGE").as_deref() {
        Ok("stage") => Some(LargePath::Stage),
        Ok("nt") => Some(LargePath::StageNt),
        Ok("cma") => Some(LargePath::Cma),
        _ => None,
    })
}

/// `PUMACOLL_STAGE_NT=0` keeps non-temporal stores out of the choice (measurements).
fn stage_nt_allowed() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| !std::env::var("PUMACOLL_STAGE_NT").is_ok_and(|v| v == "0"))
}

/// Cross-memory attach between local ranks is allowed on this host (no Yama ptrace restriction)
/// and not turned off with `PUMACOLL_CMA=0`.
fn cma_allowed() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        !std::env::var("PUMACOLL_CMA").is_ok_and(|v| v == "0")
            && qk::PrivatePath::for_this_host() == qk::PrivatePath::CrossMemoryAttach
    })
}

/// The online CPUs, read once per process: `sysconf` opens, reads and closes a sysfs file each
/// time, which cost a crowded all-to-all ~15 µs per call when every large one asked (4 ranks on
/// 2 cores, 512-byte blocks: 22 µs against 5-7).
fn online_cpus() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(qk::sys::online_cpus)
}

/// `PUMACOLL_CMA_CLAIM=1|0` makes every crowded all-to-all by cross-memory attach (at most 64
/// members) take `Comm::cma_alltoall_crowded` or none (`Comm::cma_alltoall`, readers only),
/// instead of only those with at most two members per CPU (measurements and tests).
fn crowded_claims() -> Option<bool> {
    static V: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    *V.get_or_init(|| match std::env::var("PUMACOLL_CMA_CLAIM").as_deref() {
        Ok("1") => Some(true),
        Ok("0") => Some(false),
        _ => None,
    })
}

/// `PUMACOLL_CMA_PUSH=all|none` lets a crowded all-to-all push blocks to every member or to none
/// (only receivers move blocks) instead of only to those sharing the pusher's core
/// (measurements; see `Comm::cma_alltoall_crowded`).
fn crowded_push() -> Option<bool> {
    static V: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    *V.get_or_init(|| match std::env::var("PUMACOLL_CMA_PUSH").as_deref() {
        Ok("all") => Some(true),
        Ok("none") => Some(false),
        _ => None,
    })
}

/// `PUMACOLL_STAGE_ROTATE=1|0` forces the stream order of all-to-all through the stages (see
/// [`Comm::stage_alltoall`]; tests and measurements), else None: rotated with a core per rank.
fn stage_rotate() -> Option<bool> {
    static ROT: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    *ROT.get_or_init(|| match std::env::var("PUMACOLL_STAGE_ROTATE").as_deref() {
        Ok("1") => Some(true),
        Ok("0") => Some(false),
        _ => None,
    })
}

/// Pieces of `n` elements, `per` at a time (at least one piece, possibly empty, so every member
/// takes the same steps and a length mismatch is seen).
fn pieces(n: usize, per: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let k = n.div_ceil(per).max(1);
    (0..k).map(move |i| (i * per).min(n)..((i + 1) * per).min(n))
}

impl Comm {
    /// The communicator's node group on the collective area, set up on the first collective:
    /// every member agrees (one portals all-reduce) that its node's members all live in its
    /// region and that the area context is free for them.
    fn node(&self, tag: u32) -> Result<Option<&NodeColl>> {
        if self.node.get().is_none() {
            let v = self.setup_node(tag)?;
            let _ = self.node.set(v);
        }
        Ok(self.node.get().and_then(|o| o.as_ref()))
    }

    fn setup_node(&self, tag: u32) -> Result<Option<NodeColl>> {
        let g = self.size() as usize;
        let groups = self.node_groups();
        if g == 1
            || groups.iter().all(|m| m.len() == 1)
            || std::env::var("PUMACOLL_SHM").is_ok_and(|v| v == "0")
        {
            return Ok(None);
        }
        let mine = groups
            .iter()
            .position(|m| m.contains(&self.rank))
            .unwrap_or(0);
        let world: Vec<u32> = groups[mine]
            .iter()
            .map(|&r| self.group.ranks[r as usize])
            .collect();
        let ports: Option<Vec<u32>> = world.iter().map(|&w| self.core.port_of(w)).collect();
        let c = self.core.shm().and_then(|s| s.free_context(self.ctx));
        // The stages serve communicators on one node; each process's stage goes to one of them.
        let stage = groups.len() == 1 && self.core.shm().is_some_and(|s| s.stage_free());
        let all: Vec<u32> = (0..g as u32).collect();
        let mut bad = [
            u32::from(ports.is_none() || c.is_none()),
            u32::from(!stage),
            u32::from(!cma_allowed()),
        ];
        self.rd_allreduce(&all, &mut bad, &crate::ops::Max, tag)?;
        let (Some(ports), Some(c), 0) = (ports, c, bad[0]) else {
            return Ok(None);
        };
        let me = Self::pos(&groups[mine], self.rank);
        Ok(NodeColl::claim(
            self.core.clone(),
            c,
            self.ctx,
            ports,
            world,
            groups,
            mine,
            me,
            bad[1] == 0,
            bad[2] == 0,
        ))
    }

    /// Dissemination barrier among `members` (communicator ranks) through portals.
    fn dissemination(&self, members: &[u32], tag: u32) -> Result<()> {
        let g = members.len();
        let me = Self::pos(members, self.rank);
        let mut k = 1;
        while k < g {
            let to = members[(me + k) % g];
            let from = members[(me + g - k) % g];
            self.xsendrecv(&[], to, &mut [], from, tag, "barrier")?;
            k <<= 1;
        }
        Ok(())
    }

    /// Barrier: node members meet on their arrival words; across nodes the first member of each
    /// node runs a dissemination barrier and then releases its node.
    fn node_barrier(&self, n: &NodeColl, tag: u32) -> Result<()> {
        let s = n.next();
        n.arrive(s);
        if n.groups.len() == 1 {
            return n.wait_all(s, "barrier");
        }
        if n.me == 0 {
            n.wait_all(s, "barrier")?;
            let leaders: Vec<u32> = n.groups.iter().map(|m| m[0]).collect();
            self.dissemination(&leaders, tag)?;
            n.release(s);
            Ok(())
        } else {
            n.wait_release(0, s, "barrier")
        }
    }

    /// All-reduce piece by piece through the slots. One node: everyone publishes and everyone
    /// combines every slot in rank order (identical results everywhere). Several nodes: the
    /// first member of each node combines its node, the leaders all-reduce through portals
    /// (recursive doubling), and each leader publishes the result to its node.
    fn node_allreduce<T: Pod>(
        &self,
        n: &NodeColl,
        recv: &mut [T],
        op: &dyn Operation<T>,
        tag: u32,
    ) -> Result<()> {
        const OP: &str = "all-reduce";
        let per = crate::shm::SLOT_BYTES / std::mem::size_of::<T>();
        let total = std::mem::size_of_val(recv) as u64;
        let k = per.min(recv.len());
        let (mut tmp, mut own) = (vec![T::zeroed(); k], vec![T::zeroed(); k]);
        let multi = n.groups.len() > 1;
        let leaders: Vec<u32> = n.groups.iter().map(|m| m[0]).collect();
        for r in pieces(recv.len(), per) {
            let piece = &mut recv[r];
            let m = piece.len();
            let s = n.next();
            if !multi {
                n.publish(s, bytes(piece), total, OP)?;
                n.arrive(s);
                n.wait_all_slots_data(s, std::mem::size_of_val(piece), OP)?;
                n.check_all(s, total, "all-reduce")?;
                n.combine_all(s, piece, &mut tmp[..m], &mut own[..m], op);
            } else if n.me != 0 {
                n.publish(s, bytes(piece), total, OP)?;
                n.arrive(s);
                n.wait_release(0, s, OP)?;
                n.check_len(0, s, total, "all-reduce")?;
                n.read(0, s, bytes_mut(piece));
            } else {
                n.arrive(s);
                n.wait_all(s, OP)?;
                n.check_all(s, total, "all-reduce")?;
                n.combine_all(s, piece, &mut tmp[..m], &mut own[..m], op);
                self.rd_allreduce(&leaders, piece, op, tag)?;
                n.publish(s, bytes(piece), total, OP)?;
                n.release(s);
            }
        }
        Ok(())
    }

    /// The member of this node that talks to the other nodes for a rooted operation: the root
    /// on its own node, else the node's first member. Returns my leader's index in my node's
    /// group, and the leaders of all nodes (communicator ranks) when there are several nodes
    /// (none on one node: the common case allocates nothing).
    fn node_leaders(n: &NodeColl, root: u32) -> (usize, Option<Vec<u32>>) {
        let leader = |m: &Vec<u32>| if m.contains(&root) { root } else { m[0] };
        let mine = &n.groups[n.mine];
        let lead = Self::pos(mine, leader(mine));
        let all = (n.groups.len() > 1).then(|| n.groups.iter().map(leader).collect());
        (lead, all)
    }

    /// Reduce: members publish, the node leader combines its node in rank order, and the leaders
    /// reduce to the root through portals (binomial tree).
    fn node_reduce<T: Pod>(
        &self,
        n: &NodeColl,
        acc: &mut [T],
        root: u32,
        op: &dyn Operation<T>,
        tag: u32,
    ) -> Result<()> {
        const OP: &str = "reduce";
        let per = crate::shm::SLOT_BYTES / std::mem::size_of::<T>();
        let total = std::mem::size_of_val(acc) as u64;
        let k = per.min(acc.len());
        let (mut tmp, mut own) = (vec![T::zeroed(); k], vec![T::zeroed(); k]);
        let (lead, leaders) = Self::node_leaders(n, root);
        for r in pieces(acc.len(), per) {
            let piece = &mut acc[r];
            let m = piece.len();
            let s = n.next();
            if n.me != lead {
                n.publish(s, bytes(piece), total, OP)?;
                n.arrive(s);
                continue;
            }
            n.arrive(s);
            n.wait_all(s, OP)?;
            n.check_all(s, total, "reduce")?;
            n.combine_all(s, piece, &mut tmp[..m], &mut own[..m], op);
            if let Some(leaders) = &leaders {
                self.tree_reduce(leaders, Self::pos(leaders, root), piece, op, tag)?;
            }
        }
        Ok(())
    }

    /// Broadcast: the leaders get the data through portals (binomial tree from the root), then
    /// each leader publishes it piece by piece and its node copies it out.
    fn node_bcast(&self, n: &NodeColl, b: &mut [u8], root: u32, tag: u32) -> Result<()> {
        const OP: &str = "broadcast";
        let (lead, leaders) = Self::node_leaders(n, root);
        let total = b.len() as u64;
        if let (true, Some(leaders)) = (n.me == lead, &leaders) {
            self.tree_bcast(leaders, Self::pos(leaders, root), b, tag)?;
        }
        // With more ranks than CPUs a payload of at most 112 bytes goes through the small slots:
        // the leader runs up to 1023 broadcasts ahead of a descheduled reader instead of 63, so
        // the ranks sharing a core take turns 16 times less often per broadcast (every rank of the
        // node decides alike: `crowded` is never revised; the readers check the length).
        let crowded = self.core.crowded();
        if crowded && b.len() <= crate::shm::SMALL_BYTES {
            let s = n.next();
            if n.me == lead {
                n.publish_small(s, b, OP)?;
                n.arrive(s);
            } else {
                n.arrive(s);
                n.take_small(lead, s, b, OP)?;
            }
            return Ok(());
        }
        for (k, r) in pieces(b.len(), crate::shm::SLOT_BYTES).enumerate() {
            let piece = &mut b[r];
            let s = n.next();
            if n.me == lead {
                n.publish(s, piece, total, OP)?;
                n.arrive(s);
            } else {
                n.arrive(s);
                if crowded && k == 0 {
                    n.wait_slot_data_not_small(lead, s, piece.len(), total, OP)?;
                } else {
                    n.wait_slot_data(lead, s, piece.len(), OP)?;
                }
                n.check_len(lead, s, total, "broadcast")?;
                n.read(lead, s, piece);
            }
        }
        Ok(())
    }

    /// All-to-all inside one node through the slots (`PUMACOLL_SHM=0` turns it off with the
    /// rest of the area). The send buffers go in slot-sized pieces; per piece every member
    /// publishes its piece and arrives, then copies out of every other member's slot the part of
    /// the piece that holds its own block (members whose block lies elsewhere do not wait). On
    /// the first piece everyone waits for everyone and checks the lengths, so a mismatch is an
    /// error everywhere before the piece counts part. `recv` holds this rank's own block already.
    fn node_alltoall(n: &NodeColl, sb: &[u8], rb: &mut [u8]) -> Result<()> {
        const OP: &str = "all-to-all";
        let p = n.len();
        let (me, blk) = (n.me, sb.len() / p);
        let total = sb.len() as u64;
        let mine = me * blk..(me + 1) * blk;
        for (k, r) in pieces(sb.len(), crate::shm::SLOT_BYTES).enumerate() {
            let s = n.next();
            n.publish(s, &sb[r.clone()], total, OP)?;
            n.arrive(s);
            if k == 0 {
                n.wait_all_slots_data(s, r.len(), OP)?;
                n.check_all(s, total, OP)?;
            }
            let (lo, hi) = (r.start.max(mine.start), r.end.min(mine.end));
            if lo >= hi {
                continue;
            }
            for j in (0..p).filter(|&j| j != me) {
                if k != 0 {
                    n.wait_slot_data(j, s, r.len(), OP)?;
                }
                let at = j * blk + (lo - mine.start);
                n.read_at(j, s, lo - r.start, &mut rb[at..at + (hi - lo)]);
            }
        }
        Ok(())
    }

    /// The node group, when a payload of `bytes` with elements of `elem` bytes goes through the
    /// area: up to [`SHM_LONG`], or up to [`SHM_LONG_DEDICATED`] when the whole communicator is
    /// on one node that has a core per rank (`PUMACOLL_SHM_MAX` bytes overrides both).
    fn node_for(&self, bytes: usize, elem: usize, tag: u32) -> Result<Option<&NodeColl>> {
        static LIMIT: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
        let forced = *LIMIT.get_or_init(|| {
            std::env::var("PUMACOLL_SHM_MAX")
                .ok()
                .and_then(|v| v.parse().ok())
        });
        if elem == 0 || elem > crate::shm::SLOT_BYTES {
            return Ok(None);
        }
        if bytes > forced.unwrap_or(SHM_LONG) {
            return Ok(None);
        }
        let Some(n) = self.node(tag)? else {
            return Ok(None);
        };
        let one_node_with_cores = n.groups.len() == 1 && !self.core.oversubscribed();
        let limit = forced.unwrap_or(if one_node_with_cores {
            SHM_LONG_DEDICATED
        } else {
            SHM_LONG
        });
        Ok((bytes <= limit).then_some(n))
    }
}

// ------------------------------------------------------------ intra-node, large (the stages)

/// Payloads above this many bytes (per rank) go through the stages when the communicator lives
/// on one node; smaller ones through the slots (one handshake instead of two per piece).
pub const STAGE_MIN: usize = crate::shm::SLOT_BYTES;

/// Bytes of one piece through the stages: a whole segment, or less with
/// `PUMACOLL_STAGE_PIECE=<bytes>` (for measurements; at least 64).
fn stage_piece_bytes() -> usize {
    static PIECE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PIECE.get_or_init(|| {
        std::env::var("PUMACOLL_STAGE_PIECE")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(crate::shm::STAGE_SEG, |b: usize| {
                b.clamp(64, crate::shm::STAGE_SEG)
            })
    })
}

/// `b` as elements of `T` (stage offsets are multiples of the element size from a page-aligned
/// base, so this only fails on a broken invariant).
fn elems<T: Pod>(b: &[u8]) -> Result<&[T]> {
    bytemuck::try_cast_slice(b)
        .map_err(|e| Error::Invalid(format!("stage bytes are not whole elements: {e}")))
}

impl Comm {
    /// The node group, when a payload of `bytes` per rank goes through the stages: the whole
    /// communicator on one node whose members gave it their stages, elements of `elem` bytes that
    /// fit a piece, and more than [`STAGE_MIN`] bytes (`PUMACOLL_STAGE=0` turns the path off, `PUMACOLL_STAGE_MIN=<bytes>`
    /// moves the limit, for measurements).
    fn node_stage(&self, bytes: usize, elem: usize, tag: u32) -> Result<Option<&NodeColl>> {
        static MIN: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
        let min = *MIN.get_or_init(|| {
            if std::env::var("PUMACOLL_STAGE").is_ok_and(|v| v == "0") {
                return None;
            }
            Some(
                std::env::var("PUMACOLL_STAGE_MIN")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(STAGE_MIN),
            )
        });
        match min {
            Some(m) if bytes > m && elem > 0 && elem <= stage_piece_bytes() => {}
            _ => return Ok(None),
        }
        Ok(self.node(tag)?.filter(|n| n.stage && n.groups.len() == 1))
    }

    /// All-reduce through the stages, piece by piece (a piece is at most one stage segment).
    /// Each piece is cut in one slice per member. Every member copies the slices of the others
    /// into its stage and arrives; member `i` then combines slice `i` of every member in rank
    /// order (its own straight from `send`), writes the result into `recv` and into its stage,
    /// and arrives again; finally each member copies the other members' results into `recv`.
    /// Every element is combined by one member in rank order, so all ranks get identical bits.
    fn stage_allreduce<T: Pod>(
        n: &NodeColl,
        send: &[T],
        recv: &mut [T],
        op: &dyn Operation<T>,
        path: LargePath,
    ) -> Result<()> {
        let nt = path == LargePath::StageNt;
        const OP: &str = "all-reduce";
        let elem = std::mem::size_of::<T>();
        let total = std::mem::size_of_val(send) as u64;
        let (p, me) = (n.len(), n.me);
        let per = (stage_piece_bytes() / elem).max(1);
        for (k, r) in pieces(send.len(), per).enumerate() {
            let m = r.len();
            let (src, dst) = (&send[r.clone()], &mut recv[r]);
            let (off, s) = n.stage_piece(true, OP)?;
            if k == 0 {
                // Before the copy: the other members wait for member 0's header to learn the path.
                n.publish_header(s, path.word(), total, OP)?;
            }
            for j in (0..p).filter(|&j| j != me) {
                let c = chunk(m, p, j);
                let seg = n.stage_mine(off + c.start * elem, c.len() * elem);
                copy_to_stage(seg, bytes(&src[c]), nt);
            }
            n.arrive(s);
            n.wait_all(s, OP)?;
            if k == 0 {
                n.check_all(s, total, OP)?;
            }
            let c = chunk(m, p, me);
            let out = &mut dst[c.clone()];
            let at = off + c.start * elem;
            for j in 0..p {
                let part: &[T] = if j == me {
                    &src[c.clone()]
                } else {
                    elems(n.stage_of(j, at, c.len() * elem))?
                };
                if j == 0 {
                    copy_elems(out, part);
                } else {
                    op.combine(out, part);
                }
            }
            copy_to_stage(n.stage_mine(at, c.len() * elem), bytes(out), nt);
            let s2 = n.next();
            n.arrive(s2);
            n.wait_all(s2, OP)?;
            for j in (0..p).filter(|&j| j != me) {
                let c = chunk(m, p, j);
                let theirs = n.stage_of(j, off + c.start * elem, c.len() * elem);
                copy_bytes(bytes_mut(&mut dst[c]), theirs);
            }
        }
        Ok(())
    }

    /// The node group when an all-to-all with blocks of `blk` bytes goes by cross-memory attach:
    /// the whole communicator on one node, every member able to read the others, blocks of at
    /// least [`ALLTOALL_CMA_OVERSUBSCRIBED`] bytes with more ranks than cores, else
    /// [`ALLTOALL_CMA`] (`PUMACOLL_CMA_MIN=<bytes>` sets one limit for both, for measurements).
    fn node_cma(&self, blk: usize, tag: u32) -> Result<Option<&NodeColl>> {
        let forced = cma_min();
        if blk == 0 || blk < forced.unwrap_or(ALLTOALL_CMA_OVERSUBSCRIBED.min(ALLTOALL_CMA)) {
            return Ok(None);
        }
        let Some(n) = self.node(tag)?.filter(|n| n.cma && n.groups.len() == 1) else {
            return Ok(None);
        };
        let min = forced.unwrap_or(if self.core.oversubscribed() {
            ALLTOALL_CMA_OVERSUBSCRIBED
        } else {
            ALLTOALL_CMA
        });
        Ok((blk >= min).then_some(n))
    }

    /// All-to-all by cross-memory attach: every member publishes where its send buffer lives and
    /// arrives; each then reads its block out of every other member's send buffer into its
    /// receive buffer, one copy per block and no staging, taking the members in the order they
    /// published (starting after itself, so the readers spread over the senders) and waiting only
    /// when none it still needs has (so a rank that runs while others sharing its core do not
    /// reads what is there instead of handing the core over at once). Each member's length is
    /// checked before anything is read from it; every member sees any mismatch (someone differs
    /// from it) and reports it. Then everyone arrives once more and waits for all, so no send
    /// buffer is handed back to its caller while a member may still read it. With `own` this
    /// rank copies its own block between those two steps (while the others may still read from
    /// it), else `recv` holds it already. `published`: this rank's slot of the operation already
    /// says where `sb` lives.
    fn cma_alltoall(
        n: &NodeColl,
        sb: &[u8],
        rb: &mut [u8],
        own: bool,
        published: bool,
    ) -> Result<()> {
        const OP: &str = "all-to-all";
        let p = n.len();
        let (me, blk) = (n.me, sb.len() / p);
        let total = sb.len() as u64;
        let s = n.next();
        if !published {
            n.publish_remote(s, LargePath::Cma.word(), &[sb], total, OP)?;
        }
        n.arrive(s);
        let mut todo: Vec<usize> = (1..p).map(|k| (me + k) % p).collect();
        let mut read = || -> Result<()> {
            while let Some(&first) = todo.first() {
                let before = todo.len();
                let mut err = None;
                todo.retain(|&j| {
                    if err.is_some() || !n.slot_ready(j, s) {
                        return true;
                    }
                    let r = n.check_len(j, s, total, OP).and_then(|()| {
                        n.read_remote(j, s, 0, me * blk, &mut rb[j * blk..(j + 1) * blk], OP)
                    });
                    err = r.err();
                    false
                });
                if let Some(e) = err {
                    return Err(e);
                }
                if todo.len() == before {
                    n.wait_slot(first, s, OP)?;
                }
            }
            Ok(())
        };
        let read = read();
        // Arrive even after a failed read or check: the others must not wait for this rank in
        // vain (they report the same mismatch, or time out on a peer that died).
        let done = n.next();
        n.arrive(done);
        if own {
            let mine = me * blk..(me + 1) * blk;
            copy_bytes(&mut rb[mine.clone()], &sb[mine]);
        }
        n.wait_all(done, OP)?;
        read
    }

    /// All-to-all by cross-memory attach with more ranks than cores: each block moves once, by
    /// whichever of its two ranks runs first once both have published. Every member publishes its
    /// send and receive buffers (see [`NodeColl::publish_exchange`]) and copies its own block;
    /// then, for every member `j` that has published, it claims the block `j` sends it (bit
    /// `me` of `j`'s claim mask) and reads it out of `j`'s send buffer, and, when `j` is pinned to
    /// this rank's CPU (`PUMACOLL_CMA_PUSH=all|none`: always, never), claims the block it sends
    /// `j` (bit `j` of its own mask) and writes it into `j`'s receive buffer. A claim someone
    /// else won is that member's to move (a receiver always tries its incoming blocks, so every
    /// block moves whatever each side decides about pushing). A member that moved blocks with `j` counts
    /// them down, in one step, from `j`'s pending moves (which start at `2 (p - 1)`); a rank
    /// returns when the moves left there equal those it did itself (every block to and from it
    /// moved, so nobody reads its send buffer or writes its receive buffer any more), taking
    /// newly published members while it waits. So a rank that holds a core moves everything it
    /// can instead of handing the core to a rank that would move the same bytes, and the
    /// operation has one hand-off instead of two. Lengths: a member whose length differs is left
    /// alone (both sides count their two moves with it done) and every member then reports the
    /// mismatch it sees. At most 64 members (one claim word each).
    ///
    /// `header` is the word this rank publishes (naming this path, and for member 0 the next
    /// operation's, see [`Comm::crowded_alltoall_ahead`]); every member's is checked to name
    /// this path before anything else of its slot is used. Returns member 0's header word (on
    /// member 0: `header`).
    fn cma_alltoall_crowded(n: &NodeColl, sb: &[u8], rb: &mut [u8], header: u64) -> Result<u64> {
        const OP: &str = "all-to-all";
        let p = n.len();
        let (me, blk) = (n.me, sb.len() / p);
        let total = sb.len() as u64;
        let s = n.next();
        n.publish_exchange(s, header, sb, rb, 2 * (p as u64 - 1), OP)?;
        // Member 0's header word, once read.
        let lead = std::cell::Cell::new((me == 0).then_some(header));
        let own = me * blk..(me + 1) * blk;
        copy_bytes(&mut rb[own.clone()], &sb[own]);
        let rb = RefCell::new(rb);
        let todo = RefCell::new((1..p).map(|k| (me + k) % p).collect::<Vec<_>>());
        let failed: RefCell<Option<Error>> = RefCell::new(None);
        // Moves this rank did (its own count, which the others' counts leave out).
        let mine = std::cell::Cell::new(0u64);
        let mode = crowded_push();
        let push = |j: usize| mode == Some(true) || (mode.is_none() && n.shares_core(j));
        // Moves every block between this rank and the members that published since the last look.
        let step = || {
            todo.borrow_mut().retain(|&j| {
                if !n.slot_ready(j, s) {
                    return true;
                }
                // Both protocols publish the length at the same place: a length mismatch is
                // reported as such whatever path j took.
                if n.check_len(j, s, total, OP).is_err() {
                    // Reported after the wait (check_all); j counts its own two moves likewise.
                    mine.set(mine.get() + 2);
                    return false;
                }
                match n.check_path(j, s, LargePath::Cma, OP) {
                    Ok(w) if j == 0 => lead.set(Some(w)),
                    Ok(_) => {}
                    Err(e) => {
                        // j takes another protocol: it moves nothing with this rank, which
                        // counts both moves itself and reports the disagreement.
                        failed.borrow_mut().get_or_insert(e);
                        mine.set(mine.get() + 2);
                        return false;
                    }
                }
                let (mut r, mut moved) = (Ok(()), 0);
                if n.claim_move(j, s, me) {
                    let mut rb = rb.borrow_mut();
                    r = n.read_remote(j, s, 0, me * blk, &mut rb[j * blk..(j + 1) * blk], OP);
                    moved += 1;
                }
                if push(j) && n.claim_move(me, s, j) {
                    let w = n.write_remote(j, s, 1, me * blk, &sb[j * blk..(j + 1) * blk], OP);
                    r = r.and(w);
                    moved += 1;
                }
                if moved > 0 {
                    n.complete(j, s, moved);
                    mine.set(mine.get() + moved);
                }
                if let Err(e) = r {
                    failed.borrow_mut().get_or_insert(e);
                }
                false
            });
            n.pending(s) == mine.get()
        };
        let who = (me + 1) % p;
        let waited = n.wait_for(s, who, OP, step);
        // Every move to and from this rank is done (or the wait failed): nothing of this
        // operation touches the others' slots any more.
        n.arrive(s);
        waited?;
        if let Some(e) = failed.into_inner() {
            return Err(e);
        }
        n.check_all(s, total, OP)?;
        match lead.get() {
            Some(w) => Ok(w),
            // Member 0 moved both blocks it shares with this rank, so it had published: its
            // header is there to read (once).
            None => n.check_path(0, s, LargePath::Cma, OP),
        }
    }

    /// All-to-all through the stages (send buffers above one slot). Each member sends a *stream*
    /// of blocks through its stage, in stage pieces: per piece every member copies its part of
    /// the stream into its stage and arrives, then copies out of the other members' stages the
    /// parts that hold blocks for it, once those members arrived. As in [`Comm::node_alltoall`],
    /// the first piece brings everyone together and checks the lengths; each member copies its
    /// own block while it waits for the others to write the first piece, and names `path` (plain
    /// or non-temporal stores into the stage, see [`copy_to_stage`]) in its first slot before it
    /// writes anything (the others wait for member 0's, see [`Comm::large_alltoall`]).
    ///
    /// With more ranks than cores the stream is the send buffer (blocks in destination order,
    /// without the member's own block): a piece then holds the blocks of few destinations, only
    /// they read it and the others go on to the next piece without waiting for anyone, which
    /// spares context switches. With a core per rank the stream of member `i` is its blocks for
    /// members `i + 1, i + 2, ...` (mod p): all members stand at the same stream positions, so
    /// every piece gives each as much to write as to read and they copy at the same time (in
    /// destination order two ranks with 64 KiB blocks took two pieces, each one rank writing and
    /// then the other reading: four copies one after the other instead of two).
    ///
    /// `header` is the word this rank publishes in its first slot (naming `path`, and for
    /// member 0 of a crowded group the next operation's, see [`Comm::crowded_alltoall_ahead`]);
    /// every member's is checked to name `path` before its stage is read. Returns member 0's
    /// header word (on member 0: `header`).
    fn stage_alltoall(
        n: &NodeColl,
        sb: &[u8],
        rb: &mut [u8],
        rotate: bool,
        path: LargePath,
        header: u64,
    ) -> Result<u64> {
        const OP: &str = "all-to-all";
        let nt = path == LargePath::StageNt;
        let p = n.len();
        let (me, blk) = (n.me, sb.len() / p);
        let total = sb.len() as u64;
        let blocks = if rotate { p - 1 } else { p };
        let mut lead = header;
        // (block t of the stream, offset in it, length, offset in the piece) for stream bytes `r`.
        let spans = |r: std::ops::Range<usize>| {
            let mut x = r.start;
            std::iter::from_fn(move || {
                (x < r.end).then(|| {
                    let (t, o) = (x / blk, x % blk);
                    let len = (blk - o).min(r.end - x);
                    let at = x - r.start;
                    x += len;
                    (t, o, len, at)
                })
            })
        };
        for (k, r) in pieces(blocks * blk, stage_piece_bytes()).enumerate() {
            let (off, s) = n.stage_piece(true, OP)?;
            if k == 0 {
                n.publish_header(s, header, total, OP)?;
            }
            for (t, o, len, at) in spans(r.clone()) {
                let to = if rotate { (me + 1 + t) % p } else { t };
                if to != me {
                    let src = &sb[to * blk + o..to * blk + o + len];
                    copy_to_stage(n.stage_mine(off + at, len), src, nt);
                }
            }
            n.arrive(s);
            if k == 0 {
                let mine = me * blk..(me + 1) * blk;
                copy_bytes(&mut rb[mine.clone()], &sb[mine]);
                n.wait_all(s, OP)?;
                n.check_all(s, total, OP)?;
                for j in (0..p).filter(|&j| j != me) {
                    let w = n.check_path(j, s, path, OP)?;
                    if j == 0 {
                        lead = w;
                    }
                }
            }
            for (t, o, len, at) in spans(r) {
                // Members whose block t is for this rank: rotated, the one with j + 1 + t = me
                // (mod p); else all others when t is this rank's block.
                let from = if rotate {
                    (me + p - 1 - t % p) % p..(me + p - 1 - t % p) % p + 1
                } else if t == me {
                    0..p
                } else {
                    0..0
                };
                for j in from.filter(|&j| j != me) {
                    if k != 0 {
                        n.wait_arrival(j, s, OP)?;
                    }
                    let dst = &mut rb[j * blk + o..j * blk + o + len];
                    copy_bytes(dst, n.stage_of(j, off + at, len));
                }
            }
        }
        Ok(lead)
    }

    /// All-to-all of more than one slot per rank inside one node with the stages: with a core per
    /// rank member 0 picks the path (see [`Comm::large_path`]; from blocks of
    /// [`ALLTOALL_CHOICE`] bytes, below them the plain stages) and names it in the header word of its slot of the
    /// operation's first sequence number before it copies anything; the others wait for that
    /// slot, then follow. With more ranks than cores (`over`) blocks from
    /// [`ALLTOALL_CMA_OVERSUBSCRIBED`] take the single copy by claims or the stages (plain or
    /// non-temporal) with at most two ranks per CPU, chosen one operation ahead
    /// ([`Comm::crowded_alltoall_ahead`]), else member 0 chooses between the readers-only single
    /// copy and the plain stages; smaller ones the stages. Every
    /// member copies its own block itself, on either path while it waits for the others.
    fn large_alltoall(
        n: &NodeColl,
        sb: &[u8],
        rb: &mut [u8],
        rotate: bool,
        over: bool,
    ) -> Result<()> {
        const OP: &str = "all-to-all";
        let blk = sb.len() / n.len();
        let forced_nt = large_forced() == Some(LargePath::StageNt);
        let allowed = if over {
            let cma = n.cma && blk >= cma_min().unwrap_or(ALLTOALL_CMA_OVERSUBSCRIBED);
            Self::large_allowed(forced_nt && stage_nt_allowed(), cma)
        } else {
            // Smaller blocks keep the plain stages without a choice (the non-temporal stores
            // gain nothing on a few KiB, and the others would wait for member 0's word).
            let nt = (blk >= ALLTOALL_CHOICE || forced_nt) && stage_nt_allowed();
            let cma = n.cma && blk >= cma_min().unwrap_or(ALLTOALL_CHOICE);
            Self::large_allowed(nt, cma)
        };
        // More ranks than cores, from ALLTOALL_CMA_OVERSUBSCRIBED: with at most two per CPU the
        // single copy by claims, the plain or the non-temporal stages, chosen one operation
        // ahead (4 ranks on 2 cores, 64 KiB blocks: the stages ~47 µs with the two vCPUs near,
        // ~114 far, the claims ~80 in either placement; a choice made in the operation itself
        // cost the others a wait for member 0's word, 8-16 % more); with more, member 0 picks
        // the plain stages or the readers-only single copy by measured cost (8 ranks on 2
        // cores, 64 KiB blocks: the stages ~210 µs near, ~550 far, the single copy ~340 in
        // either placement). `claims` rests only on what every member sees alike.
        let claims =
            over && allowed.contains(&LargePath::Cma) && n.len() <= 64 && Self::claims_pay(n);
        let fixed = Self::fixed_path(&allowed);
        if claims && fixed.is_none() {
            // The non-temporal stages join this choice: with the two vCPUs far apart they beat
            // the claims at 32 KiB blocks (4 ranks: ~40 µs against ~50).
            let allowed = Self::large_allowed(stage_nt_allowed(), true);
            return Self::crowded_alltoall_ahead(n, sb, rb, rotate, &allowed);
        }
        let (path, timed, published) = match fixed {
            // No choice (every member with the same length knows): nobody waits for member 0.
            Some(p) => (p, false, false),
            None if n.me == 0 => {
                let p = n.chooser(LargeOp::AllToAll).pick(sb.len(), &allowed);
                (p, true, false)
            }
            None => {
                let s = n.peek();
                // Where this rank's send buffer lives, before it learns the path: should member 0
                // take the single copy, it reads this rank's block at once instead of a line
                // crossing later (the stage paths publish their header in the same slot again).
                let pre = allowed.contains(&LargePath::Cma);
                if pre {
                    n.publish_remote(s, LargePath::Cma.word(), &[sb], sb.len() as u64, OP)?;
                }
                n.wait_slot(0, s, OP)?;
                (LargePath::from_word(n.header(0, s)), false, pre)
            }
        };
        let t0 = Instant::now();
        if path.staged() {
            Self::stage_alltoall(n, sb, rb, rotate, path, path.word())?;
        } else if claims {
            Self::cma_alltoall_crowded(n, sb, rb, path.word())?;
        } else {
            Self::cma_alltoall(n, sb, rb, true, published)?;
        }
        if timed {
            let ns = t0.elapsed().as_nanos() as f64;
            n.chooser(LargeOp::AllToAll).record(sb.len(), path, ns);
        }
        Ok(())
    }

    /// A crowded all-to-all whose group would take the single copy by claims
    /// ([`Comm::cma_alltoall_crowded`]; at most two members per online CPU) chooses among it
    /// and the stages (`allowed`) by measured cost *one operation ahead*, so that no
    /// member waits for member 0 before it starts: member 0 picks the path of the group's next
    /// crowded all-to-all of the same length and names it in the header word of this one's
    /// first slot ([`LargePath::word_with_next`]), where every member reads it (once) while it
    /// checks that every member took its own path; each remembers it per length
    /// ([`NodeColl::set_ahead`]) and takes it next time. The first operation of a length, and
    /// any after a failed one (which forgets every named path on the members it fails on), take
    /// the claims. The choice rests only on what every member read alike, and a member that
    /// finds another on the other path reports it (no protocol reads the other's slots).
    /// Member 0 times each operation for its chooser.
    fn crowded_alltoall_ahead(
        n: &NodeColl,
        sb: &[u8],
        rb: &mut [u8],
        rotate: bool,
        allowed: &[LargePath],
    ) -> Result<()> {
        let total = sb.len() as u64;
        let path = n.ahead(total).unwrap_or(LargePath::Cma);
        let next = (n.me == 0).then(|| n.chooser(LargeOp::AllToAll).pick(sb.len(), allowed));
        let header = path.word_with_next(next);
        let t0 = Instant::now();
        let lead = if path.staged() {
            Self::stage_alltoall(n, sb, rb, rotate, path, header)
        } else {
            Self::cma_alltoall_crowded(n, sb, rb, header)
        };
        let lead = match lead {
            Ok(w) => w,
            Err(e) => {
                n.forget_ahead();
                return Err(e);
            }
        };
        if n.me == 0 {
            let ns = t0.elapsed().as_nanos() as f64;
            n.chooser(LargeOp::AllToAll).record(sb.len(), path, ns);
        }
        n.set_ahead(total, LargePath::next_of(lead));
        Ok(())
    }

    /// Whether a crowded all-to-all by cross-memory attach lets the running rank move blocks both
    /// ways ([`Comm::cma_alltoall_crowded`]): with at most two members per online CPU (4 ranks
    /// on 2 cores, all-to-all 64 KiB per block: 86-92 µs against 104, the spread halved); with
    /// four per CPU (8 ranks on 2 cores) it measured 2-15 % slower than the readers-only
    /// protocol, so those keep it. The two protocols do not mix (a member waiting for its
    /// blocks to be counted would wait for ever on one that only reads), so the choice rests
    /// only on what every member sees alike: the group's size, the online CPUs (as for
    /// [`crate::core::Core::crowded`]) and the environment, which yod gives every rank. Not on
    /// affinity masks, which a rank may change and the others read at different times; they
    /// only decide who pushes ([`NodeColl::shares_core`]), which each rank may choose alone.
    fn claims_pay(n: &NodeColl) -> bool {
        crowded_claims().unwrap_or_else(|| n.len() <= 2 * online_cpus())
    }

    /// Large broadcast inside one node: the root picks the path (see [`Comm::large_path`]) and
    /// names it in the header word of its slot of the operation's first sequence number; the
    /// others wait for that slot, then follow.
    fn large_bcast(n: &NodeColl, b: &mut [u8], root: u32) -> Result<()> {
        const OP: &str = "broadcast";
        let lead = Self::pos(&n.groups[n.mine], root);
        let total = b.len() as u64;
        if n.me == lead {
            let cma = n.cma && b.len() >= cma_min().unwrap_or(LARGE_CMA);
            let (path, timed) = Self::large_path(n, LargeOp::Broadcast, b.len(), cma);
            let t0 = Instant::now();
            let tail = if path.staged() {
                Self::stage_bcast_root(n, b, path)?
            } else {
                Self::cma_bcast_root(n, b)?;
                Duration::ZERO
            };
            if timed {
                let ns = (t0.elapsed() + tail).as_nanos() as f64;
                n.chooser(LargeOp::Broadcast).record(b.len(), path, ns);
            }
            return Ok(());
        }
        let s = n.peek();
        if n.crowded() {
            // A root with a small payload would have put it in its small slot.
            n.wait_slot_data_not_small(lead, s, 0, total, OP)?;
        } else {
            n.wait_slot(lead, s, OP)?;
        }
        match LargePath::from_word(n.header(lead, s)) {
            LargePath::Stage | LargePath::StageNt => {
                n.check_len(lead, s, total, OP)?;
                Self::stage_bcast_reader(n, b, lead)
            }
            LargePath::Cma => {
                let s = n.next();
                let done = n.next();
                let r = n
                    .check_len(lead, s, total, OP)
                    .and_then(|()| n.read_remote(lead, s, 0, 0, b, OP));
                // Arrive even after a failed check or read: the root waits for it.
                n.arrive(done);
                r
            }
        }
    }

    /// Broadcast through the root's stage, the root's side: it copies each piece in and arrives
    /// (up to three pieces ahead of its readers); the first piece's slot carries the header.
    /// Returns how long the last piece took to copy in: the readers still copy it out when the
    /// root returns, so the root adds that to its measured time.
    fn stage_bcast_root(n: &NodeColl, b: &[u8], path: LargePath) -> Result<Duration> {
        const OP: &str = "broadcast";
        let total = b.len() as u64;
        let mut last = Duration::ZERO;
        for (k, r) in pieces(b.len(), stage_piece_bytes()).enumerate() {
            let piece = &b[r];
            let (off, s) = n.stage_piece(true, OP)?;
            let t = Instant::now();
            copy_to_stage(
                n.stage_mine(off, piece.len()),
                piece,
                path == LargePath::StageNt,
            );
            last = t.elapsed();
            if k == 0 {
                n.publish_header(s, path.word(), total, OP)?;
            }
            n.arrive(s);
        }
        Ok(last)
    }

    /// Broadcast through the root's stage, a reader's side (the root's first slot, already
    /// checked, says the first piece is in): it waits for each later piece and copies it out.
    fn stage_bcast_reader(n: &NodeColl, b: &mut [u8], lead: usize) -> Result<()> {
        const OP: &str = "broadcast";
        for (k, r) in pieces(b.len(), stage_piece_bytes()).enumerate() {
            let piece = &mut b[r];
            let (off, s) = n.stage_piece(false, OP)?;
            n.arrive(s);
            if k != 0 {
                n.wait_arrival(lead, s, OP)?;
            }
            copy_bytes(piece, n.stage_of(lead, off, piece.len()));
        }
        Ok(())
    }

    /// Broadcast by cross-memory attach, the root's side: it publishes where its buffer lives and
    /// waits until every reader has copied it straight into its own buffer (one copy, no stage,
    /// one hand-off each way).
    fn cma_bcast_root(n: &NodeColl, b: &[u8]) -> Result<()> {
        const OP: &str = "broadcast";
        let s = n.next();
        n.publish_remote(s, LargePath::Cma.word(), &[b], b.len() as u64, OP)?;
        n.arrive(s);
        let done = n.next();
        n.wait_all(done, OP)?;
        n.arrive(done);
        Ok(())
    }

    /// The path of a large node-local operation `op` of `bytes` per rank, decided by the root /
    /// member 0, and whether to time it for the chooser. The stages with plain stores always
    /// qualify; with non-temporal stores from [`LARGE_NT`] bytes (`PUMACOLL_STAGE_NT=0` never);
    /// cross-memory attach when `cma` (the caller checked that every member can read the others,
    /// agreed at setup, and the operation's size limit, `PUMACOLL_CMA_MIN`).
    /// `PUMACOLL_LARGE=stage|nt|cma` forces one (if it qualifies; tests and measurements), else
    /// the cheapest by measured cost ([`crate::shm::Chooser`], one per kind of operation).
    fn large_path(n: &NodeColl, op: LargeOp, bytes: usize, cma: bool) -> (LargePath, bool) {
        let allowed = Self::large_allowed(bytes >= LARGE_NT && stage_nt_allowed(), cma);
        match Self::fixed_path(&allowed) {
            Some(p) => (p, false),
            None => (n.chooser(op).pick(bytes, &allowed), true),
        }
    }

    /// The paths a large node-local operation may take: the stages, and with `nt` / `cma` the
    /// non-temporal stages / the single copy (see [`Comm::large_path`]).
    fn large_allowed(nt: bool, cma: bool) -> Vec<LargePath> {
        let mut allowed = Vec::with_capacity(3);
        allowed.push(LargePath::Stage);
        if nt {
            allowed.push(LargePath::StageNt);
        }
        if cma {
            allowed.push(LargePath::Cma);
        }
        allowed
    }

    /// The path when there is nothing to choose among `allowed`: the one `PUMACOLL_LARGE`
    /// forces (the stages if it does not qualify), or the stages when they are all there is.
    fn fixed_path(allowed: &[LargePath]) -> Option<LargePath> {
        match large_forced() {
            Some(p) if allowed.contains(&p) => Some(p),
            Some(_) => Some(LargePath::Stage),
            None if allowed.len() == 1 => Some(LargePath::Stage),
            None => None,
        }
    }

    /// Large all-reduce inside one node: member 0 picks the path and names it in the header word
    /// of its slot of the operation's first sequence number (before it copies anything); the
    /// others wait for that slot, then follow.
    fn large_allreduce<T: Pod>(
        n: &NodeColl,
        send: &[T],
        recv: &mut [T],
        op: &dyn Operation<T>,
    ) -> Result<()> {
        const OP: &str = "all-reduce";
        let bytes = std::mem::size_of_val(send);
        let (path, timed) = if n.me == 0 {
            let cma = send.len() >= n.len() && n.cma && bytes >= cma_min().unwrap_or(LARGE_CMA);
            Self::large_path(n, LargeOp::AllReduce, bytes, cma)
        } else {
            let s = n.peek();
            n.wait_slot(0, s, OP)?;
            (LargePath::from_word(n.header(0, s)), false)
        };
        let t0 = Instant::now();
        if path.staged() {
            Self::stage_allreduce(n, send, recv, op, path)?;
        } else {
            Self::cma_allreduce(n, send, recv, op)?;
        }
        if timed {
            let ns = t0.elapsed().as_nanos() as f64;
            n.chooser(LargeOp::AllReduce).record(bytes, path, ns);
        }
        Ok(())
    }

    /// All-reduce by cross-memory attach: a reduce-scatter reading the others' send buffers, then
    /// an all-gather reading their results out of their receive buffers, one copy of each byte
    /// and three hand-offs in all. Every member publishes the addresses of its send and receive
    /// buffers and arrives; member `i` reads slice `i` of every other member's send buffer and
    /// combines it with its own (the first one read lands in `recv` directly, the others in a
    /// scratch buffer; ops are commutative, and each slice is combined by one member only, so
    /// every rank gets the same bits), arrives, waits for everyone, reads the other slices out of
    /// their owners' receive buffers, arrives again and waits for everyone before it returns
    /// (nobody may change a buffer another still reads). Every member sees a length mismatch
    /// (someone differs from it) and returns the error before reading anything.
    fn cma_allreduce<T: Pod>(
        n: &NodeColl,
        send: &[T],
        recv: &mut [T],
        op: &dyn Operation<T>,
    ) -> Result<()> {
        const OP: &str = "all-reduce";
        /// Bytes read from a member's send buffer at a time into the scratch buffer (3+ ranks).
        const SCRATCH: usize = 128 * 1024;
        let (p, me) = (n.len(), n.me);
        let elem = std::mem::size_of::<T>();
        let total = std::mem::size_of_val(send) as u64;
        let s = n.next();
        n.publish_remote(
            s,
            LargePath::Cma.word(),
            &[bytes(send), bytes(recv)],
            total,
            OP,
        )?;
        n.arrive(s);
        let (red, done) = (n.next(), n.next());
        n.wait_all_slots(s, OP)?;
        if let Err(e) = n.check_all(s, total, OP) {
            n.arrive(done);
            return Err(e);
        }
        let c = chunk(recv.len(), p, me);
        let reduced = (|| -> Result<()> {
            let out = &mut recv[c.clone()];
            let first = usize::from(me == 0);
            n.read_remote(first, s, 0, c.start * elem, bytes_mut(out), OP)?;
            let step = (SCRATCH / elem).max(1).min(out.len().max(1));
            let mut tmp: Vec<T> = Vec::new();
            for j in (0..p).filter(|&j| j != first) {
                if j == me {
                    op.combine(out, &send[c.clone()]);
                    continue;
                }
                if tmp.is_empty() {
                    tmp = vec![T::zeroed(); step];
                }
                for at in (0..out.len()).step_by(step) {
                    let k = step.min(out.len() - at);
                    let t = &mut tmp[..k];
                    n.read_remote(j, s, 0, (c.start + at) * elem, bytes_mut(t), OP)?;
                    op.combine(&mut out[at..at + k], t);
                }
            }
            Ok(())
        })();
        let gathered = reduced.and_then(|()| {
            n.arrive(red);
            n.wait_all(red, OP)?;
            for j in (0..p).filter(|&j| j != me) {
                let cj = chunk(recv.len(), p, j);
                let at = cj.start * elem;
                n.read_remote(j, s, 1, at, bytes_mut(&mut recv[cj]), OP)?;
            }
            Ok(())
        });
        n.arrive(done);
        let waited = n.wait_all(done, OP);
        gathered.and(waited)
    }
}
