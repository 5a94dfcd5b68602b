//! One-sided communication: a window is memory every rank exposes; others put into it and get
//! from it at offsets they choose (portals single-block descriptors with sender-managed offsets),
//! and learn of completion from the acknowledgment or reply.

use std::marker::PhantomData;

use bytemuck::Pod;
use qk::portals::{MatchHandle, MdHandle};
use qk::Buf;

use crate::comm::Comm;
use crate::core::match_bits;
use crate::error::{Error, Result};

/// A window of `len` elements of `T` on every rank of a communicator.
pub struct Window<T: Pod> {
    comm: Comm,
    wid: u32,
    buf: Buf,
    md: MdHandle,
    me: MatchHandle,
    len: usize,
    pending: Vec<u64>,
    _t: PhantomData<T>,
}

/// A one-sided operation in flight.
#[must_use = "wait for the operation (or call Window::flush)"]
pub struct RmaRequest {
    id: u64,
}

impl<T: Pod> Window<T> {
    /// Collective: every rank of `comm` exposes `len` zeroed elements (lengths may differ).
    pub fn new(comm: &Comm, len: usize) -> Result<Window<T>> {
        let wid = comm.win_seq.get();
        comm.win_seq.set(wid + 1);
        let bytes = (len * std::mem::size_of::<T>()) as u64;
        let core = &comm.core;
        let shared = core.ep().alloc_shared(bytes.max(64));
        let buf = match shared {
            Ok(b) => b,
            Err(_) => core.ep().alloc_private(bytes.max(64)),
        };
        core.ep().with_bytes(&buf, |b| b.fill(0))?;
        let (md, me) = core.expose(comm.ctx, wid, buf)?;
        comm.barrier()?;
        Ok(Window {
            comm: comm.clone(),
            wid,
            buf,
            md,
            me,
            len,
            pending: Vec::new(),
            _t: PhantomData,
        })
    }

    fn bits(&self) -> u64 {
        match_bits(self.comm.ctx, self.wid)
    }

    fn target(&self, rank: u32) -> Result<u32> {
        self.comm.world_rank(rank)
    }

    /// Starts writing `data` at element `offset` of rank `target`'s window.
    pub fn put(&self, target: u32, offset: usize, data: &[T]) -> Result<RmaRequest> {
        let w = self.target(target)?;
        let off = (offset * std::mem::size_of::<T>()) as u64;
        let id = self
            .comm
            .core
            .rma_put(w, self.bits(), off, bytemuck::cast_slice(data))?;
        Ok(RmaRequest { id })
    }

    /// Starts reading `len` elements at `offset` of rank `target`'s window.
    pub fn get(&self, target: u32, offset: usize, len: usize) -> Result<RmaGet<T>> {
        let w = self.target(target)?;
        let sz = std::mem::size_of::<T>();
        let id = self
            .comm
            .core
            .rma_get(w, self.bits(), (offset * sz) as u64, (len * sz) as u64)?;
        Ok(RmaGet {
            id,
            len,
            _t: PhantomData,
        })
    }

    /// Waits for a put: the data is in the target's window.
    pub fn wait(&self, r: RmaRequest) -> Result<()> {
        let id = r.id;
        self.comm.core.complete(id, None, self.comm.peers(), &|| {
            format!("one-sided put {id}")
        })?;
        Ok(())
    }

    /// Waits for a get and returns the data.
    pub fn wait_get(&self, r: RmaGet<T>) -> Result<Vec<T>> {
        let mut v = vec![T::zeroed(); r.len];
        let id = r.id;
        let st = self.comm.core.complete(
            id,
            Some(bytemuck::cast_slice_mut(&mut v)),
            self.comm.peers(),
            &|| format!("one-sided get {id}"),
        )?;
        if st.bytes as usize != r.len * std::mem::size_of::<T>() {
            return Err(Error::SizeMismatch {
                op: "window get",
                detail: format!(
                    "asked for {} bytes, the target's window gave {} (offset past its end?)",
                    r.len * std::mem::size_of::<T>(),
                    st.bytes
                ),
            });
        }
        Ok(v)
    }

    /// Puts and remembers the operation for [`Window::flush`] / [`Window::fence`].
    pub fn put_nb(&mut self, target: u32, offset: usize, data: &[T]) -> Result<()> {
        let r = self.put(target, offset, data)?;
        self.pending.push(r.id);
        Ok(())
    }

    /// Waits for every operation started with [`Window::put_nb`].
    pub fn flush(&mut self) -> Result<()> {
        for id in std::mem::take(&mut self.pending) {
            self.wait(RmaRequest { id })?;
        }
        Ok(())
    }

    /// Collective: completes this rank's operations, then waits for every rank to do the same;
    /// afterwards every put of the epoch is visible in its target's window.
    pub fn fence(&mut self) -> Result<()> {
        self.flush()?;
        self.comm.barrier()
    }

    /// Bytes remote puts have deposited into this rank's window so far.
    pub fn deposited(&self) -> Result<u64> {
        self.comm.core.drain()?;
        Ok(self
            .comm
            .core
            .st
            .borrow()
            .win_bytes
            .get(&self.wid)
            .copied()
            .unwrap_or(0))
    }

    /// Waits until remote puts have deposited at least `bytes` bytes into this window (the
    /// reader of the parallel file server does not need to know how many writers there are).
    pub fn wait_deposited(&self, bytes: u64) -> Result<()> {
        let wid = self.wid;
        self.comm.core.wait_until(
            &|| format!("{bytes} bytes in window {wid}"),
            self.comm.peers(),
            |st| st.win_bytes.get(&wid).copied().unwrap_or(0) >= bytes,
        )
    }

    /// A copy of this rank's window.
    pub fn read_local(&self) -> Result<Vec<T>> {
        let mut v = vec![T::zeroed(); self.len];
        self.comm
            .core
            .ep()
            .read(&self.buf, 0, bytemuck::cast_slice_mut(&mut v))?;
        Ok(v)
    }

    /// Overwrites this rank's window from `data` (at most `len` elements).
    pub fn write_local(&self, data: &[T]) -> Result<()> {
        if data.len() > self.len {
            return Err(Error::Invalid(format!(
                "{} elements do not fit a window of {}",
                data.len(),
                self.len
            )));
        }
        self.comm
            .core
            .ep()
            .write(&self.buf, 0, bytemuck::cast_slice(data))?;
        Ok(())
    }

    /// Elements in this rank's window.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty window.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T: Pod> Drop for Window<T> {
    fn drop(&mut self) {
        let _ = self.flush();
        self.comm.core.unexpose(self.md, self.me, self.wid);
    }
}

/// A get in flight.
#[must_use = "wait for the get with Window::wait_get"]
pub struct RmaGet<T> {
    id: u64,
    len: usize,
    _t: PhantomData<T>,
}
