//! How the one-node ops record themselves: their value is computed with ordinary ops outside the
//! graph, and the custom op's `cpu_fwd` (`cuda_fwd`) hands that value to candle as its output,
//! instead of recomputing the forward from raw storage.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

/// A forward value computed before its op is recorded, handed to candle once by `cpu_fwd`.
pub struct PrecomputedValue(std::sync::Mutex<Option<Tensor>>);

impl PrecomputedValue {
    pub fn new(value: Tensor) -> Self {
        Self(std::sync::Mutex::new(Some(value)))
    }

    fn take(&self, op: &str) -> Result<Tensor> {
        let value = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{op}: poisoned")))?
            .take();
        match value {
            Some(v) => Ok(v),
            None => candle_core::bail!("{op}: forward value already taken"),
        }
    }

    /// The value as an owned CPU buffer, once.
    pub(crate) fn take_cpu(&self, op: &str) -> Result<(CpuStorage, Shape)> {
        let value = self.take(op)?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(s) => Ok((owned_copy(s, layout)?, layout.shape().clone())),
            _ => candle_core::bail!("{op}: the value is not on the CPU"),
        }
    }

    /// The value as an owned CUDA buffer, once (a device-side copy).
    #[cfg(feature = "cuda")]
    pub(crate) fn take_cuda(&self, op: &str) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendDevice;
        let value = self.take(op)?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(s) => {
                // SAFETY: copy_strided_src writes every element of the new buffer.
                let mut out = unsafe { s.device().alloc_uninit(layout.shape(), s.dtype())? };
                s.copy_strided_src(&mut out, 0, layout)?;
                Ok((out, layout.shape().clone()))
            }
            _ => candle_core::bail!("{op}: the value is not on a CUDA device"),
        }
    }
}

/// An owned copy of the elements a contiguous layout addresses.
pub(crate) fn owned_copy(s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
    fn slice<T: Clone>(v: &[T], l: &Layout) -> Result<Vec<T>> {
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(v[a..b].to_vec()),
            None => candle_core::bail!("owned_copy: layout is not contiguous"),
        }
    }
    Ok(match s {
        CpuStorage::F32(v) => CpuStorage::F32(slice(v, l)?),
        CpuStorage::F64(v) => CpuStorage::F64(slice(v, l)?),
        CpuStorage::BF16(v) => CpuStorage::BF16(slice(v, l)?),
        CpuStorage::F16(v) => CpuStorage::F16(slice(v, l)?),
        _ => candle_core::bail!("owned_copy: unsupported dtype {:?}", s.dtype()),
    })
}
