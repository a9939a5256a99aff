//! The whole training run, top to bottom: resolve the model, prepare the data, build the policy
//! (base + LoRA; the reference is the same network with LoRA off), then for each optimizer step
//! accumulate micro-batch gradients, clip, update, log, evaluate and checkpoint; finally write
//! the PEFT adapter (and the best one by validation loss).
use super::batch::build_micro_batch;
use super::checkpoint::{self, Checkpoint, TrainState};
use super::metrics::MetricSums;
use super::optim::{clip_grads, collect_grads, global_norm, AdamW, AdamWParams};
use super::refcache::{self, RefCache};
use super::schedule::Schedule;
use super::signals;
use super::step::run_micro_batch;
use crate::config::{Config, DType as CfgDType};
use crate::data::{self, KtoExample};
use crate::loss::{finalize_metrics, weight_ratio_warning, LossHead};
use crate::model::adapter::{load_adapter_weights, read_adapter_spec, save_adapter};
use crate::model::gemm::{self, GemmMode};
use crate::model::{load_llama, resolve_model, DropoutKey, Forward, Llama, LoraSpec};
use crate::util::atomic::{write_atomic, write_json_atomic};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::BTreeMap;
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
    /// Continue from the newest checkpoint in the output folder.
    pub resume: bool,
}

#[derive(Debug, Clone)]
pub struct RunSummary {
    pub output_dir: PathBuf,
    pub adapter_dir: PathBuf,
    pub steps: usize,
    pub final_metrics: BTreeMap<String, f64>,
}

/// Why a run stopped early; the CLI turns these into documented exit codes.
#[derive(Debug, thiserror::Error)]
pub enum Stopped {
    #[error("interrupted by {signal} after step {step}; checkpoint written to {checkpoint}; continue with --resume")]
    Interrupted {
        signal: &'static str,
        code: i32,
        step: usize,
        checkpoint: String,
    },
    #[error("{count} consecutive steps had a non-finite loss or gradient (last: step {step}); stopped with a checkpoint in {checkpoint}")]
    NonFinite {
        count: usize,
        step: usize,
        checkpoint: String,
    },
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

/// Builds the policy: fresh PEFT init, or the weights of `lora.init_from`.
pub fn build_policy(
    cfg: &Config,
    files: &crate::model::ModelFiles,
    dev: &Device,
) -> Result<(Llama, LoraSpec)> {
    let dt = dtype(cfg.train.dtype);
    let (mut model, spec) = match &cfg.lora.init_from {
        Some(dir) => {
            let dir = Path::new(dir);
            let (mut spec, _) = read_adapter_spec(dir)?;
            spec.dropout = cfg.lora.dropout;
            spec.seed = cfg.train.seed;
            let model = load_llama(files, dt, dev, Some(&spec))?;
            load_adapter_weights(&model, dir)?;
            (model, spec)
        }
        None => {
            let spec = LoraSpec::from_config(&cfg.lora, cfg.train.seed);
            (load_llama(files, dt, dev, Some(&spec))?, spec)
        }
    };
    model.activation_checkpointing = cfg.train.activation_checkpointing;
    if model.device.is_cpu()
        && model.dtype == DType::F32
        && gemm::effective_mode(gemm::gemm_mode()) == GemmMode::Bf16
    {
        // bf16 products round the frozen weights anyway: keep only their bf16 copy.
        model.keep_frozen_weights_in(DType::BF16)?;
    }
    Ok((model, spec))
}

/// Applies `train.gemm` to the process-wide GEMM mode (`auto` leaves the environment's choice).
pub fn apply_gemm_setting(cfg: &Config) -> Result<()> {
    if cfg.train.gemm != "auto" {
        let mode: GemmMode = cfg.train.gemm.parse().map_err(anyhow::Error::msg)?;
        gemm::set_gemm_mode(mode);
    }
    Ok(())
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

/// Evaluation over the whole validation split, metrics prefixed `eval_` (TRL's names).
pub fn evaluate(
    model: &Llama,
    head: &mut LossHead,
    examples: &[KtoExample],
    batch_size: usize,
    max_length: usize,
    step: usize,
    mut cache: Option<&mut RefCache>,
) -> Result<Option<BTreeMap<String, f64>>> {
    let min_batch = if head.needs_kl() { 2 } else { 1 };
    let mut m = MetricSums::new();
    for batch in examples.chunks(batch_size).filter(|c| c.len() >= min_batch) {
        let refs: Vec<&KtoExample> = batch.iter().collect();
        let mb = build_micro_batch(&refs, max_length, head.needs_kl());
        let out = run_micro_batch(
            model,
            head,
            &mb,
            Forward::POLICY_EVAL,
            Forward::POLICY_EVAL,
            step as u64,
            false,
            cache.as_deref_mut(),
        )?;
        m.merge(&out.loss.metrics);
    }
    if m.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        finalize_metrics(&m)
            .into_iter()
            .map(|(k, v)| (format!("eval_{k}"), v))
            .collect(),
    ))
}

struct Progress {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
}

impl Progress {
    fn new(total: usize, done: usize, quiet: bool) -> Self {
        use std::io::IsTerminal;
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
                )
                .expect("template"),
            );
            b.set_position(done as u64);
            b
        });
        Self { bar, quiet }
    }

    fn update(&self, step: usize, total: usize, msg: &str) {
        match &self.bar {
            Some(b) => {
                b.set_position(step as u64);
                b.set_message(msg.to_string());
            }
            None if !self.quiet => eprintln!("step {step}/{total}: {msg}"),
            None => {}
        }
    }

    fn println(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None if !self.quiet => eprintln!("{msg}"),
            None => {}
        }
    }

    /// Printed even with --quiet.
    fn warn(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

/// Test hook: `KTO_TRAIN_FAULT_NONFINITE_STEPS=2,3` poisons the gradient at those steps.
fn forced_nonfinite(step: usize) -> bool {
    std::env::var("KTO_TRAIN_FAULT_NONFINITE_STEPS")
        .map(|v| {
            v.split(',')
                .any(|s| s.trim().parse::<usize>().ok() == Some(step))
        })
        .unwrap_or(false)
}

/// metrics.jsonl cut back to the lines up to `step` (the lines a resumed run will not rewrite).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())
}

/// The reference log-prob cache of this model and compute setting (None with `off`).
fn open_reference_cache(
    cfg: &Config,
    files: &crate::model::ModelFiles,
    model: &Llama,
) -> Result<Option<RefCache>> {
    let dir = match cfg.train.reference_cache.as_str() {
        "off" => return Ok(None),
        "auto" => match std::env::var_os("KTO_TRAIN_CACHE_DIR").filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => {
                let out = crate::config::normalize_path(&cfg.output.dir);
                let parent = out.parent().map(Path::to_path_buf).unwrap_or_default();
                parent.join(".kto-train-cache")
            }
        },
        path => PathBuf::from(path),
    };
    let mut inputs: Vec<&Path> = files.weights.iter().map(PathBuf::as_path).collect();
    inputs.push(&files.config);
    let compute = format!(
        "kto-train {} dtype={:?} fused={} device={:?} gemm={}",
        env!("CARGO_PKG_VERSION"),
        model.dtype,
        model.use_fused_ops,
        model.device.location(),
        gemm::effective_mode(gemm::gemm_mode()).as_str()
    );
    let key = refcache::network_key(&inputs, &compute)?;
    Ok(Some(RefCache::open(&dir, key)?))
}

/// The `[eval]` benchmarks with the trained adapter, as rows of the model card's table.
fn run_benchmarks(
    cfg: &Config,
    model: &Llama,
    tok: &tokenizers::Tokenizer,
    quiet: bool,
) -> Result<serde_json::Value> {
    use crate::eval::tasks::{load_task, runner, LoadOptions, TaskKind, DEFAULT_FEWSHOT_SEED};
    let mut rows = Vec::new();
    let mut reports = Vec::new();
    for b in &cfg.eval.benchmarks {
        let kind = match b.task.as_str() {
            "hellaswag" => TaskKind::Hellaswag,
            "truthfulqa_mc2" => TaskKind::TruthfulqaMc2,
            _ => TaskKind::Mmlu,
        };
        let task = load_task(
            kind,
            &b.data,
            &LoadOptions {
                shots: b.shots,
                fewshot_data: b.fewshot_data.clone(),
                limit: b.limit,
                seed: DEFAULT_FEWSHOT_SEED,
            },
        )?;
        let report = runner::evaluate(
            model,
            tok,
            &task,
            &runner::EvalOptions {
                batch_size: cfg.eval.batch_size,
                forward: Forward::POLICY_EVAL,
                progress: !quiet,
            },
        )?;
        for m in &report.metrics {
            rows.push(serde_json::json!({
                "task": kind.display_name(), "shots": report.shots, "metric": m.name,
                "value": m.value, "stderr": m.stderr, "n": report.n(),
            }));
        }
        reports.push(report);
    }
    if !quiet {
        eprintln!("{}", runner::format_table(&reports));
    }
    Ok(serde_json::json!({ "results": rows }))
}

pub fn train(cfg: &Config, opts: &RunOptions) -> Result<RunSummary> {
    apply_gemm_setting(cfg)?;
    // 1. The run folder: refuse to clobber a finished run; find the checkpoint to resume.
    let out_dir = cfg.output.dir.clone();
    let adapter_dir = out_dir.join("adapter");
    let ckpt_dir = out_dir.join("checkpoints");
    let finished = adapter_dir
        .join(crate::model::adapter::CONFIG_FILE)
        .exists();
    if finished && !opts.overwrite {
        bail!(
            "{} already holds a finished run; pass --overwrite to replace it or choose another output.dir",
            out_dir.display()
        );
    }
    let resume_from = if opts.resume {
        let all = checkpoint::list(&ckpt_dir)?;
        match all.last() {
            Some((_, p)) => Some(p.clone()),
            None => {
                // Killed before its first checkpoint: there is nothing to lose by starting over.
                if !opts.quiet {
                    eprintln!(
                        "--resume: no checkpoint in {} yet; starting from the beginning",
                        ckpt_dir.display()
                    );
                }
                None
            }
        }
    } else {
        None
    };
    if finished && opts.overwrite {
        std::fs::remove_dir_all(&adapter_dir).ok();
    }
    if resume_from.is_none() && ckpt_dir.exists() {
        std::fs::remove_dir_all(&ckpt_dir)
            .with_context(|| format!("cannot clear old checkpoints in {}", ckpt_dir.display()))?;
    }

    // 2. Model files, tokenizer, data.
    let dev = device(&cfg.train.device)?;
    let files = resolve_model(&cfg.model.name_or_path, &cfg.model.revision)?;
    let tc = &cfg.train;
    let (prepared, tok_info) = data::prepare_for_run(cfg, opts.strict)?;
    if prepared.train.is_empty() {
        bail!("the training split is empty: no examples survived data preparation");
    }
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create output folder {}", out_dir.display()))?;
    data::write_summary(&out_dir, &prepared)?;
    write_atomic(&out_dir.join("config.toml"), cfg.to_toml().as_bytes())?;
    let progress_quiet = opts.quiet;
    if !progress_quiet {
        eprintln!("{}", prepared.summary_text);
    }
    let n_d = prepared.train.iter().filter(|e| e.label).count();
    if let Some(w) = weight_ratio_warning(n_d, prepared.train.len() - n_d, &cfg.loss) {
        eprintln!("warning: {w}");
    }

    // 3. Policy (base + LoRA), loss head, optimizer, schedule.
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

    // 4. Resume: weights, optimizer moments, loss-head state, position, pooled metrics.
    let mut st = TrainState {
        step: 0,
        epoch: 0,
        next_group: 0,
        loss_state: head.state(),
        interval: MetricSums::new(),
        interval_tokens: 0,
        skipped_nonfinite: 0,
        consecutive_nonfinite: 0,
        best_eval_loss: None,
        elapsed_seconds: 0.0,
        adam_t: 0,
    };
    let metrics_path = out_dir.join("metrics.jsonl");
    if let Some(dir) = &resume_from {
        let ck = checkpoint::load(dir, &dev)?;
        if ck.lora.len() != vars.len() || ck.adam_m.len() != vars.len() {
            bail!(
                "{}: checkpoint has {} LoRA tensors, this config builds {}",
                dir.display(),
                ck.lora.len(),
                vars.len()
            );
        }
        for (v, t) in vars.iter().zip(&ck.lora) {
            v.set(t)?;
        }
        opt.m = ck.adam_m;
        opt.v = ck.adam_v;
        opt.t = ck.state.adam_t;
        head.restore(ck.state.loss_state);
        st = ck.state;
        truncate_metrics(&metrics_path, st.step)?;
        if !opts.quiet {
            eprintln!("resuming from {} (step {})", dir.display(), st.step);
        }
    } else {
        write_atomic(&metrics_path, b"")?;
    }
    let mut metrics_file = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)?;
    // One write per line, so a reader never sees a line cut in the middle (only, at worst, a
    // last line still being written).
    let mut log_line = |v: serde_json::Value| -> Result<()> {
        metrics_file.write_all(format!("{v}\n").as_bytes())?;
        metrics_file.flush()?;
        Ok(())
    };
    let save_ck = |st: &TrainState, opt: &AdamW| -> Result<PathBuf> {
        let ck = Checkpoint {
            state: st.clone(),
            lora: vars.iter().map(|v| v.as_tensor().clone()).collect(),
            adam_m: opt.m.clone(),
            adam_v: opt.v.clone(),
        };
        checkpoint::save(&ckpt_dir, &ck, tc.keep_checkpoints)
    };
    let eval_bs = tc.eval_batch_size.unwrap_or(tc.batch_size);
    let mut refcache = open_reference_cache(cfg, &files, &model)?;
    signals::install();

    // 5. The loop: one optimizer step per group of grad_accum micro-batches.
    let progress = Progress::new(total_steps, st.step, opts.quiet);
    let run_start = Instant::now() - std::time::Duration::from_secs_f64(st.elapsed_seconds);
    let mut interval_start = Instant::now();
    let mut last_metrics = BTreeMap::new();
    while st.step < total_steps {
        let batches = epoch_batches(&prepared.train, tc.batch_size, tc.seed, st.epoch, min_batch);
        let groups: Vec<&[Vec<&KtoExample>]> = batches.chunks(tc.grad_accum).collect();
        if st.next_group >= groups.len() {
            st.epoch += 1;
            st.next_group = 0;
            continue;
        }
        let group = groups[st.next_group];
        let step = st.step;
        let mut acc: Option<Vec<Tensor>> = None;
        let mut step_metrics = MetricSums::new();
        for (mi, examples) in group.iter().enumerate() {
            let batch = build_micro_batch(examples, tc.max_length, head.needs_kl());
            // Dropout masks are a function of (seed, pass): resumable without generator state.
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
                refcache.as_mut(),
            )?;
            st.interval_tokens += batch.n_tokens();
            step_metrics.merge(&out.loss.metrics);
            // Each micro-batch loss is divided by the number of micro-batches in its step.
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
        if forced_nonfinite(step) {
            grads[0] = (&grads[0] * f64::NAN)?;
        }
        let norm = global_norm(&grads)?;
        let loss_mean = step_metrics.mean("loss").unwrap_or(f64::NAN);
        let lr = schedule.lr(step);
        st.step += 1;
        st.next_group += 1;
        if !norm.is_finite() || !loss_mean.is_finite() {
            st.skipped_nonfinite += 1;
            st.consecutive_nonfinite += 1;
            progress.warn(&format!(
                "warning: step {}: non-finite loss or gradient (loss {loss_mean}, grad norm {norm}); update skipped ({} so far)",
                st.step, st.skipped_nonfinite
            ));
            if st.consecutive_nonfinite >= tc.max_consecutive_nonfinite {
                st.elapsed_seconds = run_start.elapsed().as_secs_f64();
                st.loss_state = head.state();
                st.adam_t = opt.t;
                let ck = save_ck(&st, &opt)?;
                return Err(Stopped::NonFinite {
                    count: st.consecutive_nonfinite,
                    step: st.step,
                    checkpoint: ck.display().to_string(),
                }
                .into());
            }
        } else {
            st.consecutive_nonfinite = 0;
            clip_grads(&mut grads, norm, tc.max_grad_norm)?;
            opt.step(&grads, lr)?;
            st.interval.merge(&step_metrics);
            st.interval.add_value("grad_norm", norm);
        }

        if st.step.is_multiple_of(tc.log_every) || st.step == total_steps {
            let elapsed = interval_start.elapsed().as_secs_f64();
            let mut m = finalize_metrics(&st.interval);
            m.insert("learning_rate".into(), lr);
            let tps = st.interval_tokens as f64 / elapsed.max(1e-9);
            log_line(serde_json::json!({
                "step": st.step,
                "epoch": st.epoch as f64 + st.next_group as f64 / groups.len() as f64,
                "lr": lr,
                "loss": m.get("loss"),
                "grad_norm": m.get("grad_norm"),
                "tokens_per_second": tps,
                "elapsed_seconds": run_start.elapsed().as_secs_f64(),
                "skipped_nonfinite": st.skipped_nonfinite,
                "metrics": m,
            }))?;
            let msg = format!(
                "loss {:.4} | {:.0} tok/s | epoch {}",
                m.get("loss").copied().unwrap_or(f64::NAN),
                tps,
                st.epoch + 1
            );
            progress.update(st.step, total_steps, &msg);
            if opts.verbose {
                progress.println(&serde_json::to_string(&m)?);
            }
            last_metrics = m;
            // A plot failure must not stop a long run.
            if let Err(e) = crate::report::draw_plots(&out_dir) {
                progress.warn(&format!("warning: cannot draw plots: {e:#}"));
            }
            st.interval.clear();
            st.interval_tokens = 0;
            interval_start = Instant::now();
        }
        let last = st.step == total_steps;
        if (tc.eval_every > 0 && st.step.is_multiple_of(tc.eval_every)) || last {
            if let Some(m) = evaluate(
                &model,
                &mut head,
                &prepared.validation,
                eval_bs,
                tc.max_length,
                st.step,
                refcache.as_mut(),
            )? {
                log_line(serde_json::json!({
                    "step": st.step, "epoch": st.epoch as f64 + 1.0, "eval": true, "metrics": m,
                }))?;
                if let Some(&l) = m.get("eval_loss") {
                    if st.best_eval_loss.is_none_or(|b| l < b) {
                        st.best_eval_loss = Some(l);
                        save_adapter(&model, &spec, &files.name, &out_dir.join("best"))?;
                    }
                }
                progress.println(&format!(
                    "step {}: eval_loss {:.4}",
                    st.step,
                    m.get("eval_loss").copied().unwrap_or(f64::NAN)
                ));
            }
        }
        let sig = signals::received();
        if (tc.save_every > 0 && st.step.is_multiple_of(tc.save_every)) || last || sig.is_some() {
            st.elapsed_seconds = run_start.elapsed().as_secs_f64();
            st.loss_state = head.state();
            st.adam_t = opt.t;
            if let Some(c) = refcache.as_mut() {
                c.save()?;
            }
            let ck = save_ck(&st, &opt)?;
            if let Some(s) = sig {
                progress.finish();
                return Err(Stopped::Interrupted {
                    signal: signals::name(s),
                    code: 128 + s,
                    step: st.step,
                    checkpoint: ck.display().to_string(),
                }
                .into());
            }
        }
    }
    progress.finish();

    if let Some(c) = refcache.as_mut() {
        c.save()?;
        if opts.verbose {
            eprintln!(
                "reference cache {}: {} hits, {} computed",
                c.path().display(),
                c.hits,
                c.misses
            );
        }
    }

    // 6. The adapter, in PEFT's layout.
    save_adapter(&model, &spec, &files.name, &adapter_dir)?;
    if !cfg.eval.benchmarks.is_empty() {
        let results = run_benchmarks(cfg, &model, &tok_info.tokenizer, opts.quiet)?;
        write_json_atomic(&out_dir.join("eval_results.json"), &results)?;
    }
    crate::report::draw_plots(&out_dir)?;
    crate::report::write_model_card(&out_dir, &adapter_dir)?;
    if !opts.quiet {
        eprintln!(
            "adapter and model card written to {}",
            adapter_dir.display()
        );
    }
    Ok(RunSummary {
        output_dir: out_dir,
        adapter_dir,
        steps: st.step,
        final_metrics: last_metrics,
    })
}
