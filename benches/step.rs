//! One optimizer step on SmolLM2-360M's exact shapes (random weights): batch 2 of prompt 256 +
//! completion 256 tokens, LoRA r 16 alpha 32 on all seven projections, KTO with KL pairs.
//!
//!     cargo bench --bench step -- [--steps 3] [--warmup 1] [--prompt 256] [--completion 256] [--rank 16] [--json]
use candle_core::{DType, Device, Tensor};
use kto_train::config::LossConfig;
use kto_train::loss::LossHead;
use kto_train::model::loading::local_model_files;
use kto_train::model::logprobs::Sequence;
use kto_train::model::{load_llama, DropoutKey, Forward, LlamaConfig, LoraSpec};
use kto_train::train::batch::MicroBatch;
use kto_train::train::optim::{collect_grads, AdamW, AdamWParams};
use kto_train::train::recipe::lora_vars;
use kto_train::train::step::run_micro_batch;
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() -> anyhow::Result<()> {
    let steps = arg("--steps", 3);
    let warmup = arg("--warmup", 1);
    let (pl, cl) = (arg("--prompt", 256), arg("--completion", 256));
    let rank = arg("--rank", 16);
    let json = std::env::args().any(|a| a == "--json");
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
    let model = load_llama(&files, DType::F32, &Device::Cpu, Some(&spec))?;
    let vars = lora_vars(&model);
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    let mut head = LossHead::new(&LossConfig::default());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut seq = || -> Vec<u32> {
        (0..pl + cl)
            .map(|_| rng.random_range(3..49152u32))
            .collect()
    };
    let (a, b) = (seq(), seq());
    let mk = |x: &Vec<u32>| Sequence {
        tokens: x.clone(),
        prompt_len: pl,
    };
    // KL pairs: prompt i with completion i-1.
    let kl = |p: &Vec<u32>, c: &Vec<u32>| Sequence {
        tokens: p[..pl].iter().chain(&c[pl..]).copied().collect(),
        prompt_len: pl,
    };
    let batch = MicroBatch {
        seqs: vec![mk(&a), mk(&b)],
        kl_seqs: Some(vec![kl(&a, &b), kl(&b, &a)]),
        labels: vec![true, false],
    };
    let mut times = Vec::new();
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        let fwd = Forward::train(DropoutKey {
            seed: 42,
            pass: i as u64,
        });
        let out = run_micro_batch(&model, &mut head, &batch, fwd, fwd, i as u64, true, None)?;
        let grads = collect_grads(&vars, out.grads.as_ref().unwrap())?;
        opt.step(&grads, 2e-4)?;
        let dt = t0.elapsed().as_secs_f64();
        eprintln!("step {i}: {dt:.2} s (loss {:.4})", out.loss.loss);
        if i >= warmup {
            times.push(dt);
        }
        let _ = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = times[times.len() / 2];
    let tokens = 2 * (pl + cl);
    let rss = peak_rss_mb();
    if json {
        println!(
            "{}",
            serde_json::json!({"s_per_step": med, "tokens_per_s": tokens as f64 / med, "peak_rss_mb": rss,
                "prompt": pl, "completion": cl, "rank": rank, "steps": steps})
        );
    } else {
        println!("| tokens/step | rank | s/step (median) | policy tokens/s | peak RSS |");
        println!("|---|---|---|---|---|");
        println!(
            "| {tokens} | {rank} | {med:.2} | {:.0} | {:.2} GB |",
            tokens as f64 / med,
            rss / 1024.0
        );
    }
    Ok(())
}
