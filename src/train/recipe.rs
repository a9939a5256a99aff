//! The whole training run, top to bottom: resolve the model, prepare the data, build the policy
//! (base + LoRA; the reference is the same network with LoRA off), then for each optimizer step
//! accumulate micro-batch gradients, clip, update, log; finally write the PEFT adapter.
use super::batch::{build_micro_batch, MicroBatch};
use super::metrics::MetricSums;
use super::optim::{clip_grads, collect_grads, global_norm, AdamW, AdamWParams};
use super::schedule::Schedule;
use super::step::run_micro_batch;
use crate::config::{Config, DType as CfgDType};
use crate::data::{self, KtoExample, PrepareOptions};
use crate::loss::{finalize_metrics, LossHead};
use crate::model::adapter::{load_adapter_weights, read_adapter_spec, save_adapter};
use crate::model::{load_llama, resolve_model, DropoutKey, Forward, Llama, LlamaConfig, LoraSpec};
use crate::util::atomic::{write_atomic, write_json_atomic};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub strict: bool,
    pub quiet: bool,
    pub verbose: bool,
    /// Replace a finished run in the output folder.
    pub overwrite: bool,
}

#[derive(Debug, Clone)]
pub struct RunSummary {
    pub output_dir: PathBuf,
    pub adapter_dir: PathBuf,
    pub steps: usize,
    pub final_metrics: std::collections::BTreeMap<String, f64>,
}

pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        d if d.starts_with("cuda") => {
            let idx = d
                .strip_prefix("cuda:")
                .map(|n| n.parse::<usize>())
                .transpose()?
                .unwrap_or(0);
            if !cfg!(feature = "cuda") {
                bail!("device `{d}` needs a build with the `cuda` cargo feature (cargo build --release --features cuda)");
            }
            Ok(Device::new_cuda(idx)?)
        }
        other => bail!("unknown device `{other}`"),
    }
}

pub fn dtype(d: CfgDType) -> DType {
    match d {
        CfgDType::F32 => DType::F32,
        CfgDType::F64 => DType::F64,
        CfgDType::Bf16 => DType::BF16,
    }
}

/// The model's tokenizer and EOS id (config.json's `eos_token_id`).
pub fn tokenizer_and_eos(
    cfg: &Config,
    files: &crate::model::ModelFiles,
) -> Result<(tokenizers::Tokenizer, u32)> {
    let path = match (&cfg.model.tokenizer, &files.tokenizer) {
        (Some(t), _) => PathBuf::from(t),
        (None, Some(t)) => t.clone(),
        (None, None) => bail!(
            "no tokenizer.json in {} and no model.tokenizer in the config",
            files.dir.display()
        ),
    };
    let tok = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
    let llama = LlamaConfig::from_file(&files.config)?;
    let eos = llama
        .eos_token_id
        .with_context(|| format!("{}: no `eos_token_id`", files.config.display()))?;
    Ok((tok, eos))
}

/// Builds the policy: fresh PEFT init, or the weights of `lora.init_from`.
pub fn build_policy(
    cfg: &Config,
    files: &crate::model::ModelFiles,
    dev: &Device,
) -> Result<(Llama, LoraSpec)> {
    let dt = dtype(cfg.train.dtype);
    match &cfg.lora.init_from {
        Some(dir) => {
            let dir = Path::new(dir);
            let (mut spec, _) = read_adapter_spec(dir)?;
            spec.dropout = cfg.lora.dropout;
            spec.seed = cfg.train.seed;
            let model = load_llama(files, dt, dev, Some(&spec))?;
            load_adapter_weights(&model, dir)?;
            Ok((model, spec))
        }
        None => {
            let spec = LoraSpec::from_config(&cfg.lora, cfg.train.seed);
            Ok((load_llama(files, dt, dev, Some(&spec))?, spec))
        }
    }
}

pub fn lora_vars(model: &Llama) -> Vec<Var> {
    model
        .lora_layers()
        .into_iter()
        .flat_map(|(_, l)| {
            let lora = l.lora.as_ref().expect("LoRA layer");
            [lora.a.clone(), lora.b.clone()]
        })
        .collect()
}

/// Micro-batches of one epoch, in `data::epoch_order`; a trailing micro-batch too small for the
/// KL pairs is dropped (as a DataLoader with drop_last would).
pub fn epoch_batches(
    examples: &[KtoExample],
    batch_size: usize,
    seed: u64,
    epoch: u64,
    min_batch: usize,
) -> Vec<Vec<&KtoExample>> {
    let order = data::epoch_order(examples, batch_size, seed, epoch);
    order
        .chunks(batch_size)
        .filter(|c| c.len() >= min_batch)
        .map(|c| c.iter().map(|&i| &examples[i]).collect())
        .collect()
}

struct Progress {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
}

impl Progress {
    fn new(total: usize, quiet: bool) -> Self {
        use std::io::IsTerminal;
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
                )
                .expect("template"),
            );
            b
        });
        Self { bar, quiet }
    }

    fn update(&self, step: usize, msg: &str) {
        match &self.bar {
            Some(b) => {
                b.set_position(step as u64);
                b.set_message(msg.to_string());
            }
            None if !self.quiet => eprintln!("step {step}: {msg}"),
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

pub fn train(cfg: &Config, opts: &RunOptions) -> Result<RunSummary> {
    let out_dir = cfg.output.dir.clone();
    let adapter_dir = out_dir.join("adapter");
    if adapter_dir
        .join(crate::model::adapter::CONFIG_FILE)
        .exists()
        && !opts.overwrite
    {
        bail!(
            "{} already holds a finished run; pass --overwrite to replace it or choose another output.dir",
            out_dir.display()
        );
    }
    let dev = device(&cfg.train.device)?;
    let files = resolve_model(&cfg.model.name_or_path, &cfg.model.revision)?;
    let (tokenizer, eos) = tokenizer_and_eos(cfg, &files)?;
    let tc = &cfg.train;
    let prepared = data::prepare(
        &cfg.data,
        &PrepareOptions {
            tokenizer: &tokenizer,
            eos_token_id: eos,
            max_length: tc.max_length,
            seed: tc.seed,
            strict: opts.strict,
        },
    )?;
    if prepared.train.is_empty() {
        bail!("the training split is empty: no examples survived data preparation");
    }
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create output folder {}", out_dir.display()))?;
    write_atomic(
        &out_dir.join("data_summary.txt"),
        prepared.summary_text.as_bytes(),
    )?;
    write_json_atomic(&out_dir.join("data_summary.json"), &prepared.summary_json)?;
    write_atomic(&out_dir.join("config.toml"), cfg.to_toml().as_bytes())?;
    if !opts.quiet {
        eprintln!("{}", prepared.summary_text);
    }

    let (model, spec) = build_policy(cfg, &files, &dev)?;
    let vars = lora_vars(&model);
    let mut head = LossHead::new(&cfg.loss);
    let min_batch = if head.needs_kl() { 2 } else { 1 };
    let batches_per_epoch =
        epoch_batches(&prepared.train, tc.batch_size, tc.seed, 0, min_batch).len();
    if batches_per_epoch == 0 {
        bail!(
            "{} training examples make no micro-batch of size {} (the KL pairs need at least 2)",
            prepared.train.len(),
            tc.batch_size
        );
    }
    let steps_per_epoch = batches_per_epoch.div_ceil(tc.grad_accum);
    let total_steps = tc.max_steps.unwrap_or(steps_per_epoch * tc.epochs);
    let warmup = if tc.warmup_steps > 0 {
        tc.warmup_steps
    } else {
        (tc.warmup_ratio * total_steps as f64).ceil() as usize
    };
    let schedule = Schedule {
        kind: tc.lr_schedule,
        base_lr: tc.lr,
        warmup_steps: warmup,
        total_steps,
    };
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWParams {
            beta1: tc.adam_beta1,
            beta2: tc.adam_beta2,
            eps: tc.adam_eps,
            weight_decay: tc.weight_decay,
        },
    )?;
    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(out_dir.join("metrics.jsonl"))?;
    let progress = Progress::new(total_steps, opts.quiet);
    let start = Instant::now();
    let mut interval = MetricSums::new();
    let mut interval_tokens = 0usize;
    let mut interval_start = Instant::now();
    let mut last_metrics = std::collections::BTreeMap::new();
    let mut step = 0usize;
    let mut epoch = 0u64;
    let mut skipped_nonfinite = 0usize;
    'outer: loop {
        let batches = epoch_batches(&prepared.train, tc.batch_size, tc.seed, epoch, min_batch);
        for group in batches.chunks(tc.grad_accum) {
            if step >= total_steps {
                break 'outer;
            }
            let mut acc: Option<Vec<Tensor>> = None;
            let mut step_metrics = MetricSums::new();
            for (mi, examples) in group.iter().enumerate() {
                let batch: MicroBatch = build_micro_batch(examples, tc.max_length, head.needs_kl());
                let pass = ((step * tc.grad_accum + mi) as u64) * 2;
                let key = |p| {
                    Forward::train(DropoutKey {
                        seed: tc.seed,
                        pass: p,
                    })
                };
                let out = run_micro_batch(
                    &model,
                    &mut head,
                    &batch,
                    key(pass),
                    key(pass + 1),
                    step as u64,
                    true,
                )?;
                interval_tokens += batch.n_tokens();
                step_metrics.merge(&out.loss.metrics);
                // Each micro-batch loss is divided by the accumulation count of its group.
                let scale = 1.0 / group.len() as f64;
                let g = collect_grads(&vars, out.grads.as_ref().expect("training step"))?;
                acc = Some(match acc {
                    None => g
                        .into_iter()
                        .map(|t| t * scale)
                        .collect::<candle_core::Result<_>>()?,
                    Some(a) => a
                        .iter()
                        .zip(g)
                        .map(|(a, t)| a + (t * scale)?)
                        .collect::<candle_core::Result<_>>()?,
                });
            }
            let mut grads = acc.expect("non-empty group");
            let norm = global_norm(&grads)?;
            let loss_mean = step_metrics.mean("loss").unwrap_or(f64::NAN);
            let lr = schedule.lr(step);
            if !norm.is_finite() || !loss_mean.is_finite() {
                skipped_nonfinite += 1;
                eprintln!("step {step}: non-finite loss or gradient (loss {loss_mean}, grad norm {norm}); update skipped");
            } else {
                clip_grads(&mut grads, norm, tc.max_grad_norm)?;
                opt.step(&grads, lr)?;
                interval.merge(&step_metrics);
                interval.add_value("grad_norm", norm);
            }
            step += 1;
            if step.is_multiple_of(tc.log_every) || step == total_steps {
                let elapsed = interval_start.elapsed().as_secs_f64();
                let mut m = finalize_metrics(&interval);
                m.insert("learning_rate".into(), lr);
                let line = serde_json::json!({
                    "step": step,
                    "epoch": epoch as f64 + 1.0,
                    "lr": lr,
                    "tokens_per_second": interval_tokens as f64 / elapsed.max(1e-9),
                    "elapsed_seconds": start.elapsed().as_secs_f64(),
                    "skipped_nonfinite": skipped_nonfinite,
                    "metrics": m,
                });
                writeln!(metrics_file, "{line}")?;
                metrics_file.flush()?;
                let msg = format!(
                    "loss {:.4} | {:.0} tok/s",
                    m.get("loss").copied().unwrap_or(f64::NAN),
                    interval_tokens as f64 / elapsed.max(1e-9)
                );
                progress.update(step, &msg);
                if opts.verbose {
                    eprintln!("{line}");
                }
                last_metrics = m;
                interval.clear();
                interval_tokens = 0;
                interval_start = Instant::now();
            }
        }
        epoch += 1;
        if tc.max_steps.is_none() && epoch as usize >= tc.epochs {
            break;
        }
    }
    progress.finish();
    save_adapter(&model, &spec, &files.name, &adapter_dir)?;
    if !opts.quiet {
        eprintln!("adapter written to {}", adapter_dir.display());
    }
    Ok(RunSummary {
        output_dir: out_dir,
        adapter_dir,
        steps: step,
        final_metrics: last_metrics,
    })
}
