//! The benchmark work unit shared by benches/step.rs and benches/gemm.rs: one optimizer step on
//! SmolLM2-360M's exact shapes (random weights), batch 2 of prompt + completion tokens, LoRA on
//! all seven projections (alpha = 2r), KTO with KL pairs.
use candle_core::{DType, Device};
use kto_train::config::LossConfig;
use kto_train::loss::LossHead;
use kto_train::model::gemm::{self, GemmMode};
use kto_train::model::loading::local_model_files;
use kto_train::model::logprobs::Sequence;
use kto_train::model::{load_llama, DropoutKey, Forward, Llama, LlamaConfig, LoraSpec};
use kto_train::train::batch::MicroBatch;
use kto_train::train::optim::{collect_grads, AdamW, AdamWParams};
use kto_train::train::recipe::lora_vars;
use kto_train::train::step::run_micro_batch;
use rand::{Rng, SeedableRng};
use std::time::Instant;

pub fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub struct WorkUnit {
    pub model: Llama,
    pub opt: AdamW,
    pub head: LossHead,
    pub batch: MicroBatch,
    steps_done: u64,
}

impl WorkUnit {
    /// Writes the random model to $TMPDIR once, then builds the policy and a fixed batch.
    /// `checkpointing`: activation checkpointing of the policy pass. As in a training run, the
    /// frozen weights are kept in bf16 when the GEMM mode is bf16 (src/train/recipe.rs).
    pub fn new(
        prompt: usize,
        completion: usize,
        rank: usize,
        checkpointing: bool,
    ) -> anyhow::Result<Self> {
        // As the kto-train binary does at start (src/util/alloc.rs).
        kto_train::util::alloc::tune_for_training();
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
            target_modules: kto_train::config::ALL_TARGET_MODULES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            use_rslora: false,
            seed: 42,
        };
        let mut model = load_llama(&files, DType::F32, &Device::Cpu, Some(&spec))?;
        model.activation_checkpointing = checkpointing;
        if gemm::effective_mode(gemm::gemm_mode()) == GemmMode::Bf16 {
            model.keep_frozen_weights_in(DType::BF16)?;
        }
        let opt = AdamW::new(
            lora_vars(&model),
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
        let (a, b) = (seq(), seq());
        let mk = |x: &Vec<u32>| Sequence {
            tokens: x.clone(),
            prompt_len: prompt,
        };
        // KL pairs: prompt i with completion i-1.
        let kl = |p: &Vec<u32>, c: &Vec<u32>| Sequence {
            tokens: p[..prompt].iter().chain(&c[prompt..]).copied().collect(),
            prompt_len: prompt,
        };
        let batch = MicroBatch {
            seqs: vec![mk(&a), mk(&b)],
            kl_seqs: Some(vec![kl(&a, &b), kl(&b, &a)]),
            labels: vec![true, false],
        };
        Ok(Self {
            model,
            opt,
            head: LossHead::new(&LossConfig::default()),
            batch,
            steps_done: 0,
        })
    }

    /// One optimizer step; returns (seconds, loss).
    pub fn step(&mut self) -> anyhow::Result<(f64, f64)> {
        let t0 = Instant::now();
        let i = self.steps_done;
        let fwd = Forward::train(DropoutKey { seed: 42, pass: i });
        let out = run_micro_batch(
            &self.model,
            &mut self.head,
            &self.batch,
            fwd,
            fwd,
            i,
            true,
            None,
        )?;
        let grads = collect_grads(&self.opt.vars, out.grads.as_ref().expect("training step"))?;
        self.opt.step(&grads, 2e-4)?;
        self.steps_done += 1;
        Ok((t0.elapsed().as_secs_f64(), out.loss.loss))
    }
}
