//! The GPU backend: NCCL through cudarc (feature `cuda`).
//!
//! Rank 0 creates the NCCL unique id and publishes it through the rendezvous store; every rank
//! builds its communicator on the communication thread, which owns it for the whole run (a
//! communicator is not `Send`). Reductions run as candle custom ops on the device's stream, so
//! they are ordered after the kernels that produced the gradients. Small byte exchanges
//! (fingerprints, hashes) go through the store and never touch the GPU.

use std::time::Duration;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use cudarc::nccl::safe::{Comm, Id, ReduceOp as NcclOp};
use rendezvous::StoreClient;

use super::{Collective, DistError, DistResult, ReduceOp};

pub struct Nccl {
    comm: Comm,
    store: StoreClient,
    prefix: String,
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Sequence number of store-based exchanges, identical on all ranks.
    seq: u64,
}

fn nccl_err(e: impl std::fmt::Debug) -> DistError {
    DistError::Nccl(format!("{e:?}"))
}

impl Nccl {
    /// Builds this rank's communicator on `device` (must be CUDA). Call on the thread that will
    /// own it.
    pub fn connect(
        mut store: StoreClient,
        prefix: &str,
        rank: usize,
        world: usize,
        device: &Device,
        timeout: Duration,
    ) -> DistResult<Self> {
        let Device::Cuda(dev) = device else {
            return Err(DistError::Nccl(
                "the NCCL backend needs model.device = \"cuda\"".into(),
            ));
        };
        let stream = dev.cuda_stream();
        stream.context().bind_to_thread().map_err(nccl_err)?;
        let key = format!("{prefix}/nccl-id");
        let id = if rank == 0 {
            let id = Id::new().map_err(nccl_err)?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            store.set(&key, &bytes)?;
            id
        } else {
            let bytes = store.get(&key, timeout)?;
            if bytes.len() != 128 {
                return Err(DistError::Rendezvous(format!(
                    "NCCL unique id has {} bytes, expected 128",
                    bytes.len()
                )));
            }
            let mut internal = [0 as std::ffi::c_char; 128];
            for (d, s) in internal.iter_mut().zip(&bytes) {
                *d = *s as std::ffi::c_char;
            }
            Id::uninit(internal)
        };
        let comm = Comm::from_rank(stream, rank, world, id).map_err(nccl_err)?;
        Ok(Self {
            comm,
            store,
            prefix: prefix.to_string(),
            rank,
            world,
            timeout,
            seq: 0,
        })
    }
}

/// What a [`NcclOp1`] does.
enum Kind {
    AllReduce(ReduceOp),
    Broadcast(usize),
}

/// One NCCL collective as a candle op on a contiguous CUDA tensor.
struct NcclOp1<'a> {
    comm: &'a Comm,
    kind: Kind,
}

impl NcclOp1<'_> {
    fn run<T>(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<CudaStorage>
    where
        T: candle_core::cuda_backend::CudaDType
            + cudarc::nccl::safe::NcclType
            + cudarc::driver::DeviceRepr,
    {
        let dev = s.device().clone();
        let src = s.as_cuda_slice::<T>()?;
        let (o1, o2) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("NCCL needs a contiguous tensor".into()))?;
        let src = src.slice(o1..o2);
        // Safety: NCCL writes every element of `dst` before anything reads it.
        let mut dst = unsafe { dev.alloc::<T>(o2 - o1)? };
        let to_candle = |e| candle_core::Error::Msg(format!("NCCL: {e:?}"));
        match self.kind {
            Kind::AllReduce(op) => {
                let op = match op {
                    ReduceOp::Sum => NcclOp::Sum,
                    ReduceOp::Mean => NcclOp::Avg,
                };
                self.comm
                    .all_reduce(&src, &mut dst, &op)
                    .map_err(to_candle)?;
            }
            Kind::Broadcast(root) => {
                let send = (self.comm.rank() == root).then_some(&src);
                self.comm
                    .broadcast(send, &mut dst, root as i32)
                    .map_err(to_candle)?;
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(dst, dev))
    }
}

impl CustomOp1 for NcclOp1<'_> {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(candle_core::Error::Msg(
            "the NCCL backend needs CUDA tensors".into(),
        ))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = match s.dtype() {
            DType::F32 => self.run::<f32>(s, l)?,
            DType::F64 => self.run::<f64>(s, l)?,
            DType::BF16 => self.run::<half::bf16>(s, l)?,
            other => {
                return Err(candle_core::Error::Msg(format!(
                    "NCCL collectives support f32, f64 and bf16, not {other:?}"
                )))
            }
        };
        Ok((out, l.shape().clone()))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce(&mut self, t: &Tensor, op: ReduceOp) -> DistResult<Tensor> {
        let t = t.contiguous()?;
        Ok(t.apply_op1_no_bwd(&NcclOp1 {
            comm: &self.comm,
            kind: Kind::AllReduce(op),
        })?)
    }

    fn broadcast(&mut self, t: &Tensor, root: usize) -> DistResult<Tensor> {
        let t = t.contiguous()?;
        Ok(t.apply_op1_no_bwd(&NcclOp1 {
            comm: &self.comm,
            kind: Kind::Broadcast(root),
        })?)
    }

    fn all_gather_bytes(&mut self, mine: &[u8]) -> DistResult<Vec<Vec<u8>>> {
        self.seq += 1;
        let base = format!("{}/gather/{}", self.prefix, self.seq);
        self.store.set(&format!("{base}/{}", self.rank), mine)?;
        (0..self.world)
            .map(|r| Ok(self.store.get(&format!("{base}/{r}"), self.timeout)?))
            .collect()
    }
}
