#![allow(dead_code)]
//! The benchmark work unit shared by benches/step.rs and benches/gemm.rs: one optimizer step on
//! SmolLM2-360M's exact shapes (random weights), batch 2 of prompt + completion tokens, LoRA on
//! all seven projections (alpha = 2r), KTO with KL pairs.
use candle_core::{DType, Device};
use kto_train::config::LossConfig;
use kto_train::config::{GemmSetting, Projection};
use kto_train::hub::local_model_files;
use kto_train::kernels::gemm::{self, GemmMode};
use kto_train::kernels::KernelSettings;
use kto_train::loss::LossHead;
use kto_train::model::logprobs::Sequence;
use kto_train::model::{Llama, LlamaConfig, LoraSpec};
use kto_train::train::batch::MicroBatch;
use kto_train::train::optim::{AdamW, AdamWParams};
use kto_train::train::step::{run_micro_batch, MicroBatchMode};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// The value after `name` on the command line.
pub fn arg_str(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

pub fn arg(name: &str, default: usize) -> usize {
    arg_str(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where the unit runs and how big its batch is: `--device cpu|cuda|cuda:N` (default cpu),
/// `--dtype f32|bf16` (default f32), `--batch N` (default 2; the configs' micro-batch).
pub struct Placement {
    pub device: Device,
    pub dtype: DType,
    pub batch: usize,
}

impl Placement {
    pub fn from_args() -> anyhow::Result<Self> {
        let device: kto_train::config::DeviceSpec = arg_str("--device")
            .unwrap_or_else(|| "cpu".into())
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--device: {e}"))?;
        let dtype = match arg_str("--dtype").as_deref() {
            None | Some("f32") => DType::F32,
            Some("bf16") => DType::BF16,
            Some(d) => anyhow::bail!("--dtype {d}: f32 or bf16"),
        };
        Ok(Self {
            device: device.open()?,
            dtype,
            batch: arg("--batch", 2).max(1),
        })
    }
}

pub struct WorkUnit {
    /// The network as loaded (f32 frozen weights), kept only when the GEMM mode will change
    /// (benches/gemm.rs); `model` is it with the current kernels.
    base: Option<Llama>,
    pub model: Llama,
    pub opt: AdamW,
    pub head: LossHead,
    pub batch: MicroBatch,
    device: Device,
    steps_done: u64,
}

impl WorkUnit {
    /// Writes the random model to $TMPDIR once, then builds the policy and a fixed batch.
    /// `checkpointing`: activation checkpointing of the policy pass. The GEMM mode is
    /// `KTO_TRAIN_GEMM`'s (`train.gemm = "auto"`); as in a training run, the frozen weights are
    /// kept in bf16 when it is bf16 (Llama::with_kernels).
    pub fn new(
        prompt: usize,
        completion: usize,
        rank: usize,
        checkpointing: bool,
        keep_base: bool,
        place: &Placement,
    ) -> anyhow::Result<Self> {
        let (device, dtype) = (&place.device, place.dtype);
        let dir = std::env::temp_dir().join("kto-train-bench-smollm2-360m");
        if !dir.join("model.safetensors").exists() {
            eprintln!(
                "writing a random SmolLM2-360M-shaped model to {}",
                dir.display()
            );
            kto_train::model::tiny::write_random_model(
                &dir,
                &LlamaConfig::smollm2_360m(),
                0,
                DType::BF16,
            )?;
        }
        let files = local_model_files(&dir, "random-smollm2-360m")?;
        let spec = LoraSpec {
            r: rank,
            alpha: 2.0 * rank as f64,
            dropout: 0.0,
            target_modules: Projection::ALL.to_vec(),
            use_rslora: false,
            seed: 42,
        };
        let kernels = KernelSettings {
            fused_ops: true,
            activation_checkpointing: checkpointing,
            gemm: gemm::resolve(GemmSetting::Auto),
        };
        // As a training run loads (recipe::build_policy): frozen weights straight into bf16 for
        // bf16 products, unless the f32 network is kept for other modes.
        let frozen = if keep_base {
            dtype
        } else {
            kernels.frozen_dtype(dtype, device)
        };
        let base =
            kto_train::model::load_llama_frozen_in(&files, dtype, frozen, device, Some(&spec))?;
        // Without `keep_base` the f32 weights are converted in place, as in a training run, so
        // that the peak memory is a training run's.
        let (base, model) = if keep_base {
            (Some(base.clone()), base.with_kernels(kernels)?)
        } else {
            (None, base.with_kernels(kernels)?)
        };
        let opt = AdamW::new(
            model.lora_vars(),
            AdamWParams {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
        )?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut seq = || -> Vec<u32> {
            (0..prompt + completion)
                .map(|_| rng.random_range(3..49152u32))
                .collect()
        };
        let rows: Vec<Vec<u32>> = (0..place.batch).map(|_| seq()).collect();
        let mk = |x: &Vec<u32>| Sequence {
            tokens: x.clone(),
            prompt_len: prompt,
        };
        // KL pairs: prompt i with the completion of the next row (cyclic), labels alternating.
        let n = rows.len();
        let kl = |i: usize| Sequence {
            tokens: rows[i][..prompt]
                .iter()
                .chain(&rows[(i + 1) % n][prompt..])
                .copied()
                .collect(),
            prompt_len: prompt,
        };
        let batch = MicroBatch {
            seqs: rows.iter().map(mk).collect(),
            kl_seqs: Some((0..n).map(kl).collect()),
            labels: (0..n).map(|i| i % 2 == 0).collect(),
        };
        Ok(Self {
            base,
            model,
            opt,
            head: LossHead::new(&LossConfig::default()),
            batch,
            device: device.clone(),
            steps_done: 0,
        })
    }

    /// The products of later steps in `mode` (the LoRA weights and optimizer state carry over).
    pub fn set_gemm_mode(&mut self, mode: GemmMode) -> anyhow::Result<()> {
        let kernels = KernelSettings {
            gemm: mode,
            ..self.model.kernels()
        };
        let base = self
            .base
            .as_ref()
            .expect("WorkUnit::new(.., keep_base = true)");
        self.model = base.clone().with_kernels(kernels)?;
        Ok(())
    }

    /// One optimizer step; returns (seconds, loss).
    pub fn step(&mut self) -> anyhow::Result<(f64, f64)> {
        let t0 = Instant::now();
        let i = self.steps_done;
        // The same dropout key for the policy and its KL pass, as the benchmark always did.
        let mut mode = MicroBatchMode::training(42, i, i);
        mode.kl = mode.policy;
        let out = run_micro_batch(&self.model, &mut self.head, &self.batch, mode, None)?;
        let grads = out.grads.expect("training step").into_vec();
        self.opt.step(&grads, 2e-4)?;
        // A GPU queues work: the step is over when the device has done it.
        self.device.synchronize()?;
        self.steps_done += 1;
        Ok((t0.elapsed().as_secs_f64(), out.loss.loss))
    }
}
