//! The gradient all-reduce on the GPUs (the `nccl` feature): one NCCL communicator per run,
//! bootstrapped the standard way (rank 0 makes the unique id, MPI broadcasts it), then one
//! all-reduce of all LoRA gradients, concatenated, per optimizer step, on the device's stream.
use super::Comm;
use anyhow::{Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm as NcclComm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use std::sync::{Mutex, OnceLock};

struct Shared(NcclComm);
// SAFETY: the communicator is used by the training loop's thread only, behind the mutex.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

static NCCL: OnceLock<Mutex<Shared>> = OnceLock::new();

fn communicator(world: &dyn Comm, device: &Device) -> Result<&'static Mutex<Shared>> {
    if let Some(c) = NCCL.get() {
        return Ok(c);
    }
    let Device::Cuda(dev) = device else {
        anyhow::bail!("NCCL needs the gradients on a CUDA device");
    };
    let mine = if world.rank() == 0 {
        let id = Id::new().map_err(|e| anyhow::anyhow!("NCCL unique id: {e:?}"))?;
        id.internal().iter().map(|&c| c as u8).collect::<Vec<u8>>()
    } else {
        vec![0u8; 128]
    };
    let bytes = world.broadcast(&mine)?;
    let mut internal = [0 as std::ffi::c_char; 128];
    for (d, s) in internal.iter_mut().zip(&bytes) {
        *d = *s as std::ffi::c_char;
    }
    let comm = NcclComm::from_rank(
        dev.cuda_stream(),
        world.rank(),
        world.size(),
        Id::uninit(internal),
    )
    .map_err(|e| anyhow::anyhow!("NCCL communicator of rank {}: {e:?}", world.rank()))?;
    let _ = NCCL.set(Mutex::new(Shared(comm)));
    Ok(NCCL.get().expect("just set"))
}

/// The gradients summed over the ranks on their GPUs; None when they are not on a CUDA device
/// (the caller then sums them over MPI).
pub fn all_reduce(world: &dyn Comm, grads: &[Tensor]) -> Result<Option<Vec<Tensor>>> {
    let Some(first) = grads.first() else {
        return Ok(Some(Vec::new()));
    };
    if !first.device().is_cuda() {
        return Ok(None);
    }
    let comm = communicator(world, first.device())?;
    let dtype = first.dtype();
    let flat: Vec<Tensor> = grads
        .iter()
        .map(|g| g.to_dtype(dtype)?.flatten_all())
        .collect::<candle_core::Result<_>>()?;
    let all = Tensor::cat(&flat, 0)?;
    let guard = comm.lock().map_err(|_| anyhow::anyhow!("NCCL: poisoned"))?;
    let summed = all
        .apply_op1_no_bwd(&AllReduce(&guard.0))
        .context("NCCL all-reduce of the LoRA gradients")?;
    let mut at = 0;
    let out = grads
        .iter()
        .map(|g| {
            let n = g.elem_count();
            let t = summed
                .narrow(0, at, n)?
                .reshape(g.shape())?
                .to_dtype(g.dtype())?;
            at += n;
            Ok(t)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(out))
}

/// Sums a contiguous device buffer over the ranks into a new one.
struct AllReduce<'a>(&'a NcclComm);

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }
    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("nccl-all-reduce: CUDA tensors only")
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("nccl-all-reduce: input is not contiguous");
        };
        let dev = s.device().clone();
        let err = |e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}"));
        let out = match s.dtype() {
            DType::F32 => {
                let src = s.as_cuda_slice::<f32>()?.slice(a..b);
                // SAFETY: the all-reduce writes every element.
                let mut dst = unsafe { dev.alloc::<f32>(b - a)? };
                self.0
                    .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                    .map_err(err)?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }
            DType::BF16 => {
                let src = s.as_cuda_slice::<half::bf16>()?.slice(a..b);
                // SAFETY: as above.
                let mut dst = unsafe { dev.alloc::<half::bf16>(b - a)? };
                self.0
                    .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                    .map_err(err)?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }
            d => candle_core::bail!("nccl-all-reduce: {d:?} gradients"),
        };
        Ok((out, l.shape().clone()))
    }
}
