//! Where and how the network computes: device, dtype and matrix-product backend, parsed once from
//! their config strings (`train.device`, `train.dtype`, `train.gemm`) and from the same strings
//! on the command line.
use serde::{Deserialize, Serialize};

/// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    /// Refuses a CUDA device in a build without the `cuda` feature, naming the build command.
    pub(crate) fn check_build(self) -> anyhow::Result<()> {
        if let DeviceSpec::Cuda(_) = self {
            if !cfg!(feature = "cuda") {
                anyhow::bail!(
                    "device `{self}` needs a build with the `cuda` cargo feature \
                     (cargo build --release --features cuda)"
                );
            }
        }
        Ok(())
    }

    /// Opens the device. One rank per GPU: in a run of several processes, `cuda:N` is GPU
    /// N + the rank's local rank on its node (`cuda` = `cuda:0`: rank r of a node takes GPU r).
    pub fn open(self) -> anyhow::Result<candle_core::Device> {
        self.check_build()?;
        let ranks = crate::dist::launched_size().unwrap_or(1);
        let local = if ranks > 1 {
            crate::dist::local_rank()
        } else {
            0
        };
        Ok(match self {
            DeviceSpec::Cpu => candle_core::Device::Cpu,
            DeviceSpec::Cuda(i) => candle_core::Device::new_cuda(i + local).map_err(|e| {
                let i = i + local;
                anyhow::anyhow!(
                    "cannot open CUDA device {i} ({e}); is there an NVIDIA GPU with its driver \
                     here (nvidia-smi)? device = \"cpu\" runs without one"
                )
            })?,
        })
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("device = `{s}`: allowed are `cpu`, `cuda`, `cuda:N`");
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(bad),
        }
    }
}

/// Compute dtype of the network.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F64,
    Bf16,
}

impl DType {
    pub fn to_candle(self) -> candle_core::DType {
        match self {
            DType::F32 => candle_core::DType::F32,
            DType::F64 => candle_core::DType::F64,
            DType::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// `train.gemm`: how the matrix products run (src/kernels/gemm).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmSetting {
    /// `$KTO_TRAIN_GEMM`, else `f32`.
    #[default]
    Auto,
    Candle,
    F32,
    Bf16,
}

impl GemmSetting {
    pub fn as_str(self) -> &'static str {
        match self {
            GemmSetting::Auto => "auto",
            GemmSetting::Candle => "candle",
            GemmSetting::F32 => "f32",
            GemmSetting::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for GemmSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(GemmSetting::Auto),
            "candle" => Ok(GemmSetting::Candle),
            "f32" => Ok(GemmSetting::F32),
            "bf16" => Ok(GemmSetting::Bf16),
            other => Err(format!(
                "gemm = \"{other}\": allowed are auto, candle, f32, bf16"
            )),
        }
    }
}

/// Serialized as the strings users write; parsed with `FromStr`, so the message names the key.
macro_rules! serde_as_string {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_string())
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use serde_as_string;

impl std::fmt::Display for GemmSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

serde_as_string!(DeviceSpec);
serde_as_string!(GemmSetting);
