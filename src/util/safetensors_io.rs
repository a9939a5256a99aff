//! safetensors files written with the safetensors crate directly: candle's own writer adds no
//! metadata, and PEFT expects `{"format": "pt"}`.
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use safetensors::tensor::{Dtype, View};
use std::borrow::Cow;
use std::collections::HashMap;

pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

impl RawTensor {
    /// Little-endian bytes of `t` converted to `dtype` (F32, F16, BF16 or F64).
    pub fn from_tensor(t: &Tensor, dtype: DType) -> Result<Self> {
        let shape = t.dims().to_vec();
        let t = t.to_dtype(dtype)?.flatten_all()?;
        let (st, data) = match dtype {
            DType::F32 => (
                Dtype::F32,
                t.to_vec1::<f32>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            DType::F64 => (
                Dtype::F64,
                t.to_vec1::<f64>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            DType::BF16 => (
                Dtype::BF16,
                t.to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            DType::F16 => (
                Dtype::F16,
                t.to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            other => bail!("cannot write dtype {other:?} to safetensors"),
        };
        Ok(Self {
            dtype: st,
            shape,
            data,
        })
    }
}

/// Serializes named tensors with `{"format": "pt"}` metadata.
pub fn serialize_pt(tensors: &[(String, RawTensor)]) -> Result<Vec<u8>> {
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let items: Vec<(&str, &RawTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Ok(safetensors::tensor::serialize(items, Some(meta))?)
}

/// A candle tensor from a safetensors view (F32, F64, F16, BF16).
pub fn tensor_from_view(
    view: &safetensors::tensor::TensorView<'_>,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let shape = view.shape().to_vec();
    let data = view.data();
    let t = match view.dtype() {
        Dtype::F32 => Tensor::from_vec(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>(),
            shape,
            device,
        )?,
        Dtype::F64 => Tensor::from_vec(
            data.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>(),
            shape,
            device,
        )?,
        Dtype::BF16 => Tensor::from_vec(
            data.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                .collect::<Vec<_>>(),
            shape,
            device,
        )?,
        Dtype::F16 => Tensor::from_vec(
            data.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                .collect::<Vec<_>>(),
            shape,
            device,
        )?,
        other => bail!("unsupported dtype {other:?}"),
    };
    Ok(t)
}
