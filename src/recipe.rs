//! The whole training run, top to bottom (torchtune's recipe + config split: every knob is in the
//! config, every step of the run is here):
//!
//! 1. the run folder decides how the run starts (fresh, resumed, overwriting);
//! 2. set-up: model files, data, the policy (base + LoRA; the reference is the same network with
//!    LoRA off), loss head, optimizer, schedule, reference cache;
//! 3. resume: weights, optimizer moments, loss-head state, data position, pooled metrics;
//! 4. the loop: one optimizer step per group of `grad_accum` micro-batches, then log, evaluate,
//!    checkpoint;
//! 5. finish: the PEFT adapter, the benchmarks, plots and the model card.
use crate::config::Config;
use crate::data::{self, KtoExample, PreparedData};
use crate::dist::shard_rows;
use crate::hub::ModelFiles;
use crate::kernels::{gemm, KernelSettings};
use crate::loss::{finalize_metrics, weight_ratio_warning, LossHead};
use crate::model::adapter::{adapter_files, read_adapter_spec, tokenizer_files};
use crate::model::{load_adapted, load_llama_frozen_in, Llama, LoraSpec};
use crate::train::batch::build_micro_batch;
use crate::train::checkpoint::{self, Checkpoint, TrainState};
use crate::train::optim::{clip_grads, global_norm, AdamW, AdamWParams, AdamWState};
use crate::train::progress::Progress;
use crate::train::refcache::{self, RefCache};
use crate::train::run_dir::{MetricsWriter, RunDir, Start, StartRequest};
use crate::train::schedule::Schedule;
use crate::train::step::{run_micro_batch_shard, MicroBatchMode};
use crate::train::{signals, validation, Stopped};
use crate::util::atomic::write_json_atomic;
use crate::util::metric_sums::MetricSums;
use crate::util::profile;
use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub strict: bool,
    pub quiet: bool,
    pub verbose: bool,
    /// How the run starts in its folder: fresh, `--resume`, `--overwrite`.
    pub start: StartRequest,
}

#[derive(Debug, Clone)]
pub struct RunSummary {
    pub output_dir: PathBuf,
    pub adapter_dir: PathBuf,
    pub steps: usize,
    pub final_metrics: BTreeMap<String, f64>,
}

pub fn train(cfg: &Config, opts: &RunOptions) -> Result<RunSummary> {
    let world = crate::dist::world_ref();
    if world.size() == 1 {
        return train_in(cfg, opts, world);
    }
    // Only rank 0 writes the run folder; the others write into a scratch folder of their own
    // (removed at the end) and take rank 0's decision of how the run starts.
    let scratch = std::env::temp_dir().join(format!(
        "kto-train-rank{}-{}",
        world.rank(),
        std::process::id()
    ));
    let result = if world.rank() == 0 {
        train_in(cfg, opts, world)
    } else {
        let mut own = cfg.clone();
        own.output.dir = scratch.clone();
        let mut own_opts = opts.clone();
        own_opts.quiet = true;
        own_opts.start = crate::train::run_dir::StartRequest {
            overwrite: true,
            ..Default::default()
        };
        train_in(&own, &own_opts, world)
    };
    if world.rank() > 0 {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    result
}

/// [`train`] on one rank of `world` (ranks above 0: with their scratch folder as output.dir).
fn train_in(
    cfg: &Config,
    opts: &RunOptions,
    world: &'static dyn crate::dist::Comm,
) -> Result<RunSummary> {
    let dir = RunDir::lock(&cfg.output.dir)?;
    // Everything is read and checked before the folder changes: a typo in a path, a bad data
    // file or benchmark file costs nothing.
    let checked = validate(cfg, opts).and_then(|v| {
        let start = dir.begin(&opts.start, &cfg.to_toml(), &v.data, v.plan.total_steps)?;
        Ok((v, start))
    });
    let (validated, mut start) = match checked {
        Ok(ok) => ok,
        Err(e) => {
            dir.abandon();
            return Err(e);
        }
    };
    if world.size() > 1 {
        // Rank 0's decision for every rank. A checkpoint is in rank 0's run folder, which must
        // be visible to the others at the same path (one machine, or a shared file system).
        start = crate::dist::decode(&world.broadcast(&crate::dist::encode(&start)?)?)?;
    }
    let resume_from = match start {
        Start::Fresh => None,
        Start::Resume(checkpoint) => Some(checkpoint),
        Start::AlreadyFinished => {
            if !opts.quiet {
                eprintln!(
                    "{} holds a finished run: nothing to resume",
                    dir.root().display()
                );
            }
            return Ok(RunSummary {
                output_dir: dir.root().to_path_buf(),
                adapter_dir: dir.adapter_dir(),
                steps: 0,
                final_metrics: BTreeMap::new(),
            });
        }
    };
    let mut run = Run::new(cfg, opts, dir, validated, world)?;
    let mut state = run.start(resume_from)?;
    let last_metrics = run.train_loop(&mut state)?;
    run.finish(state, last_metrics)
}

/// How many optimizer steps the run makes, and their learning rates.
struct Plan {
    /// Smallest micro-batch the loss can use (the KL pairs need two examples).
    min_batch: usize,
    total_steps: usize,
    schedule: Schedule,
}

/// Everything a run needs, read and checked before its folder is touched.
struct Validated {
    files: ModelFiles,
    data: PreparedData,
    tokenizer: tokenizers::Tokenizer,
    /// Saved beside every adapter the run writes.
    tokenizer_files: Vec<(String, Vec<u8>)>,
    benchmarks: Vec<crate::eval::tasks::TaskItems>,
    model: Llama,
    spec: LoraSpec,
    head: LossHead,
    plan: Plan,
}

/// Reads the model's files, tokenizer and data, the benchmark files and the weights, and checks
/// that they fit together.
fn validate(cfg: &Config, opts: &RunOptions) -> Result<Validated> {
    let dev = cfg.train.device.open()?;
    let files = crate::hub::resolve_model(&cfg.model.name_or_path, &cfg.model.revision)?;
    let (data, tok_info) = data::prepare_for_run(cfg, opts.strict)?;
    if data.train.is_empty() {
        bail!("the training split is empty: no examples survived data preparation");
    }
    let benchmarks = crate::eval::load_benchmarks(&cfg.eval)?;
    let (model, spec) = build_policy(cfg, &files, &dev)?;
    check_token_ids(&data, &model, &tok_info.tokenizer_path)?;
    let n_d = data.train.iter().filter(|e| e.label).count();
    let mut loss_cfg = cfg.loss.clone();
    let auto_weights = loss_cfg.resolve_auto_weights(n_d, data.train.len() - n_d);
    let head = LossHead::new(&loss_cfg);
    let plan = plan(cfg, &data.train, &head)?;
    if !opts.quiet {
        eprintln!("{}", data.summary_text);
        if dev.is_cpu() {
            eprintln!("{}", gemm::startup_line(model.kernels().gemm));
        }
    }
    if let (Some(line), false) = (&auto_weights, opts.quiet) {
        eprintln!("{line}");
    }
    if let Some(w) = weight_ratio_warning(n_d, data.train.len() - n_d, &loss_cfg) {
        eprintln!("warning: {w}");
    }
    if !data.validation.is_empty() && data.validation.len() < plan.min_batch {
        eprintln!(
            "warning: the validation split has {} example, fewer than the {} an evaluation \
             micro-batch needs: no validation loss will be computed (raise \
             data.validation_fraction)",
            data.validation.len(),
            plan.min_batch
        );
    }
    let tokenizer_files = tokenizer_files(&files, Some(&tok_info.tokenizer_path))?;
    Ok(Validated {
        files,
        data,
        tokenizer: tok_info.tokenizer,
        tokenizer_files,
        benchmarks,
        model,
        spec,
        head,
        plan,
    })
}

/// Every token id the data holds is a row of the model's embedding: a tokenizer larger than the
/// model (another model's tokenizer.json) would otherwise fail deep inside the first forward.
fn check_token_ids(data: &PreparedData, model: &Llama, tokenizer: &std::path::Path) -> Result<()> {
    let vocab = model.cfg().vocab_size;
    let bad = data
        .train
        .iter()
        .chain(&data.validation)
        .flat_map(|e| e.prompt_ids.iter().chain(&e.completion_ids))
        .copied()
        .find(|&id| id as usize >= vocab);
    if let Some(id) = bad {
        bail!(
            "the tokenizer {} produces token id {id}, but the model has only {vocab} token \
             embeddings (vocab_size in its config.json): the tokenizer does not belong to this model",
            tokenizer.display()
        );
    }
    Ok(())
}

/// Everything a run holds between its steps.
struct Run<'a> {
    cfg: &'a Config,
    opts: &'a RunOptions,
    dir: RunDir,
    files: ModelFiles,
    /// Shared with the loop's micro-batches, which borrow examples while the run updates itself.
    data: Rc<PreparedData>,
    tokenizer: tokenizers::Tokenizer,
    tokenizer_files: Vec<(String, Vec<u8>)>,
    /// The chat template `train.sample_prompts` go through (None: none, or no samples asked).
    sample_template: Option<crate::data::ModelChatTemplate>,
    benchmarks: Vec<crate::eval::tasks::TaskItems>,
    model: Llama,
    spec: LoraSpec,
    vars: Vec<Var>,
    head: LossHead,
    opt: AdamW,
    plan: Plan,
    refcache: Option<RefCache>,
    metrics: Option<MetricsWriter>,
    tensorboard: Option<crate::report::tensorboard::EventWriter>,
    progress: Progress,
    clock: Instant,
    /// The processes of the run (a world of one without MPI).
    world: &'static dyn crate::dist::Comm,
    /// The training config with `batch_size` the global micro-batch: per-rank batch x ranks.
    global: crate::config::TrainConfig,
}

impl<'a> Run<'a> {
    fn new(
        cfg: &'a Config,
        opts: &'a RunOptions,
        dir: RunDir,
        v: Validated,
        world: &'static dyn crate::dist::Comm,
    ) -> Result<Self> {
        let vars = v.model.lora_vars();
        let t = &cfg.train;
        let sample_template = if t.sample_prompts.is_empty() {
            None
        } else {
            let eos = v.model.cfg().eos_token_id.unwrap_or(0);
            crate::data::tokenizer::chat_template_of(&v.files, &v.tokenizer, eos)?
        };
        let adam = AdamWParams {
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_eps,
            weight_decay: t.weight_decay,
        };
        let opt = AdamW::new(vars.clone(), adam)?;
        // The cache only saves time: a folder that cannot hold it must not stop the run.
        let refcache =
            match refcache::open_for_run(&t.reference_cache, dir.root(), &v.files, &v.model) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("warning: reference cache unavailable ({e:#}); running without it");
                    None
                }
            };
        Ok(Self {
            cfg,
            opts,
            dir,
            files: v.files,
            data: Rc::new(v.data),
            tokenizer: v.tokenizer,
            tokenizer_files: v.tokenizer_files,
            sample_template,
            benchmarks: v.benchmarks,
            model: v.model,
            spec: v.spec,
            vars,
            head: v.head,
            opt,
            plan: v.plan,
            refcache,
            metrics: None,
            tensorboard: None,
            progress: Progress::new(0, 0, true),
            clock: Instant::now(),
            world,
            global: global_train_config(&cfg.train, world.size()),
        })
    }

    /// The state to continue from: a checkpoint's, or a fresh one.
    fn start(&mut self, resume_from: Option<PathBuf>) -> Result<TrainState> {
        let mut state = match &resume_from {
            Some(dir) => self.restore(dir)?,
            None => TrainState::fresh(self.head.state()),
        };
        if resume_from.is_some() && state.world_size != self.world.size() {
            self.regroup(&mut state);
        }
        // Ranks above 0 write their logs into a fresh scratch folder of their own.
        let resumed_at = (resume_from.is_some() && self.world.rank() == 0).then_some(state.step);
        self.metrics = Some(self.dir.open_metrics(resumed_at)?);
        self.dir.cut_samples(resumed_at.unwrap_or(0))?;
        if self.cfg.output.tensorboard {
            let dir = self
                .dir
                .root()
                .join(crate::report::tensorboard::TENSORBOARD_DIR);
            self.tensorboard = Some(crate::report::tensorboard::EventWriter::create(&dir)?);
        }
        signals::install()?;
        self.progress = Progress::new(self.plan.total_steps, state.step, self.opts.quiet);
        self.clock = Instant::now() - std::time::Duration::from_secs_f64(state.elapsed_seconds);
        Ok(state)
    }

    /// A checkpoint of a run with another number of ranks: its position in the epoch counted
    /// groups of that run's global micro-batches. This run continues after as many examples
    /// (rounded up to its own groups), and its step count becomes the equivalent one, so that
    /// the plan and the learning-rate schedule (made for this run's global batch) continue
    /// from the same point of the data. With `data_order = "balanced"` the epoch's order
    /// depends on the batch size, so the rest of the epoch is not exactly the examples the
    /// other run had left.
    fn regroup(&mut self, state: &mut TrainState) {
        let t = &self.cfg.train;
        let per_group = |ranks: usize| t.batch_size * t.grad_accum * ranks;
        let examples = state.next_group * per_group(state.world_size);
        let groups_now = epoch_batches(
            &self.data.train,
            &self.global,
            state.epoch,
            self.plan.min_batch,
        )
        .len()
        .div_ceil(t.grad_accum);
        let next_group = examples.div_ceil(per_group(self.world.size()));
        let step = state.epoch as usize * groups_now + next_group.min(groups_now);
        if !self.opts.quiet {
            eprintln!(
                "the checkpoint was written by {} rank(s), this run has {}: the global batch \
                 changes from {} to {} examples; continuing after example {examples} of epoch {} \
                 (step {} becomes step {step})",
                state.world_size,
                self.world.size(),
                per_group(state.world_size),
                per_group(self.world.size()),
                state.epoch,
                state.step
            );
        }
        state.next_group = next_group;
        state.step = step;
        state.world_size = self.world.size();
    }

    /// Weights, optimizer moments and loss-head state of the checkpoint in `dir`.
    fn restore(&mut self, dir: &std::path::Path) -> Result<TrainState> {
        let checkpoint = checkpoint::load(dir, self.model.device())?;
        if checkpoint.lora.len() != self.vars.len() {
            bail!(
                "{}: checkpoint has {} LoRA tensors, this config builds {}",
                dir.display(),
                checkpoint.lora.len(),
                self.vars.len()
            );
        }
        for (i, (v, t)) in self.vars.iter().zip(&checkpoint.lora).enumerate() {
            if v.dims() != t.dims() {
                bail!(
                    "{}: LoRA tensor {i} has shape {:?}, this config builds {:?}",
                    dir.display(),
                    t.dims(),
                    v.dims()
                );
            }
            v.set(t)?;
        }
        self.opt.restore(AdamWState {
            m: checkpoint.adam_m,
            v: checkpoint.adam_v,
            t: checkpoint.state.adam_t,
        })?;
        self.head.restore(checkpoint.state.loss_state);
        if !self.opts.quiet {
            eprintln!(
                "resuming from {} (step {})",
                dir.display(),
                checkpoint.state.step
            );
        }
        Ok(checkpoint.state)
    }

    /// Optimizer steps until the plan's last; returns the last logged metrics.
    fn train_loop(&mut self, state: &mut TrainState) -> Result<BTreeMap<String, f64>> {
        let t = &self.cfg.train;
        let mut last_metrics = BTreeMap::new();
        let mut interval_start = Instant::now();
        let data = self.data.clone();
        let mut grace_checked = false;
        if t.eval_on_start && state.step == 0 {
            self.validate(state, 0.0)?;
        }
        while state.step < self.plan.total_steps {
            let batches =
                epoch_batches(&data.train, &self.global, state.epoch, self.plan.min_batch);
            let groups: Vec<&[Vec<&KtoExample>]> = batches.chunks(t.grad_accum).collect();
            if state.next_group >= groups.len() {
                state.epoch += 1;
                state.next_group = 0;
                continue;
            }
            let lr = self.plan.schedule.lr(state.step);
            let step_start = Instant::now();
            self.optimizer_step(state, groups[state.next_group], lr)?;
            if !grace_checked {
                grace_checked = true;
                self.check_kill_grace(step_start.elapsed().as_secs_f64());
            }
            let last = state.step == self.plan.total_steps;
            // Epochs done, as a fraction (HF Trainer's `epoch`), for training and evaluation lines.
            let epoch = state.epoch as f64 + state.next_group as f64 / groups.len() as f64;
            if state.step.is_multiple_of(t.log_every) || last {
                last_metrics = self.log_interval(state, lr, epoch, interval_start)?;
                interval_start = Instant::now();
            }
            if (t.eval_every > 0 && state.step.is_multiple_of(t.eval_every)) || last {
                self.validate(state, epoch)?;
            }
            let stop_early = t
                .early_stopping_patience
                .is_some_and(|p| state.evals_since_best >= p);
            self.checkpoint_if_due(state, last || stop_early)?;
            if stop_early && !last {
                self.progress.println(&format!(
                    "early stopping at step {}: {} evaluations without a lower eval_loss than {:.4}",
                    state.step,
                    state.evals_since_best,
                    state.best_eval_loss.unwrap_or(f64::NAN)
                ));
                break;
            }
        }
        self.progress.finish();
        Ok(last_metrics)
    }

    /// A SIGINT to mpirun must leave the ranks time to finish the step and checkpoint (README,
    /// "Stopping"); rank 0 says so after the first step when Open MPI's grace is shorter.
    fn check_kill_grace(&self, step_s: f64) {
        if self.world.size() < 2 || self.world.rank() != 0 {
            return;
        }
        let notice = crate::dist::launcher_kill_grace_s()
            .and_then(|g| crate::dist::kill_grace_notice(g, step_s));
        if let Some(n) = notice {
            self.progress.warn(&n);
        }
    }

    /// One optimizer step over `group`: accumulate its micro-batches' gradients, then update, or
    /// skip a non-finite step (stopping after `max_consecutive_nonfinite` in a row).
    fn optimizer_step(
        &mut self,
        state: &mut TrainState,
        group: &[Vec<&KtoExample>],
        lr: f64,
    ) -> Result<()> {
        crate::util::fault::pause("KTO_TRAIN_FAULT_STEP_PAUSE_MS");
        let t = &self.cfg.train;
        let step = state.step;
        let mut sum: Option<Vec<Tensor>> = None;
        let mut step_metrics = MetricSums::new();
        for (mi, examples) in group.iter().enumerate() {
            // The global micro-batch (KL pairs formed over all of it, as one process would),
            // of which this rank runs its rows.
            let batch = build_micro_batch(examples, t.max_length, self.head.needs_kl());
            let (rank, ranks) = (self.world.rank(), self.world.size());
            let mine = shard_rows(batch.len(), rank, ranks);
            // Dropout masks are a function of (seed, pass): resumable without generator state;
            // each rank draws its own (a world of one draws what it always did).
            let pass = (((step * t.grad_accum + mi) * ranks + rank) as u64) * 2;
            let mode = MicroBatchMode::training(t.seed, pass, step as u64);
            let out = run_micro_batch_shard(
                &self.model,
                &mut self.head,
                &batch,
                mine,
                mode,
                self.refcache.as_mut(),
                self.world,
            )?;
            state.interval_tokens += batch.n_tokens();
            step_metrics.merge(&out.loss.metrics);
            // Each micro-batch loss is divided by the number of micro-batches in its step.
            let scale = 1.0 / group.len() as f64;
            let grads = out
                .grads
                .expect("a training micro-batch has gradients")
                .into_vec();
            sum = Some(accumulate(sum, grads, scale)?);
        }
        let mut grads = sum.expect("non-empty group");
        if self.world.size() > 1 {
            let _p = profile::phase("gradient all-reduce");
            grads = all_reduce_grads(self.world, grads)?;
        }
        if forced_nonfinite(step) {
            grads[0] = (&grads[0] * f64::NAN)?;
        }
        let norm = global_norm(&grads)?;
        let loss_mean = step_metrics.mean("loss").unwrap_or(f64::NAN);
        state.step += 1;
        state.next_group += 1;
        if norm.is_finite() && loss_mean.is_finite() {
            state.consecutive_nonfinite = 0;
            let _p = profile::phase("optimizer");
            clip_grads(&mut grads, norm, t.max_grad_norm)?;
            self.opt.step(&grads, lr)?;
            state.interval.merge(&step_metrics);
            state.interval.add_value("grad_norm", norm);
            return Ok(());
        }
        state.skipped_nonfinite += 1;
        state.consecutive_nonfinite += 1;
        self.progress.warn(&format!(
            "warning: step {}: non-finite loss or gradient (loss {loss_mean}, grad norm {norm}); update skipped ({} so far)",
            state.step, state.skipped_nonfinite
        ));
        if state.consecutive_nonfinite >= t.max_consecutive_nonfinite {
            let checkpoint = self.save_checkpoint(state)?;
            return Err(Stopped::NonFinite {
                count: state.consecutive_nonfinite,
                step: state.step,
                checkpoint: checkpoint.display().to_string(),
            }
            .into());
        }
        Ok(())
    }

    /// One metrics line for the steps since the last, the progress line, and the plots.
    fn log_interval(
        &mut self,
        state: &mut TrainState,
        lr: f64,
        epoch: f64,
        interval_start: Instant,
    ) -> Result<BTreeMap<String, f64>> {
        let elapsed = interval_start.elapsed().as_secs_f64();
        let mut m = finalize_metrics(&state.interval);
        m.insert("learning_rate".into(), lr);
        let tps = state.interval_tokens as f64 / elapsed.max(1e-9);
        self.write_metrics(&serde_json::json!({
            "step": state.step,
            "epoch": epoch,
            "lr": lr,
            "loss": m.get("loss"),
            "grad_norm": m.get("grad_norm"),
            "tokens_per_second": tps,
            "elapsed_seconds": self.clock.elapsed().as_secs_f64(),
            "skipped_nonfinite": state.skipped_nonfinite,
            "metrics": m,
        }))?;
        let msg = format!(
            "loss {:.4} | {:.0} tok/s | epoch {}",
            m.get("loss").copied().unwrap_or(f64::NAN),
            tps,
            state.epoch + 1
        );
        self.progress
            .update(state.step, self.plan.total_steps, &msg);
        if self.opts.verbose {
            self.progress.println(&serde_json::to_string(&m)?);
        }
        // A plot failure must not stop a long run.
        if let Err(e) = crate::report::draw_plots(self.dir.root())
            .and_then(|_| crate::report::write_metrics_csv(self.dir.root()))
        {
            self.progress.warn(&format!(
                "warning: cannot draw plots or write metrics.csv: {e:#}"
            ));
        }
        state.interval.clear();
        state.interval_tokens = 0;
        Ok(m)
    }

    /// The validation loss; a new lowest one writes `best/`.
    fn validate(&mut self, state: &mut TrainState, epoch: f64) -> Result<()> {
        if self.world.rank() == 0 {
            self.write_samples(state.step)?;
        }
        let t = &self.cfg.train;
        let eval_batch_size = self
            .global
            .eval_batch_size
            .unwrap_or(self.global.batch_size);
        let Some(m) = validation::evaluate(
            self.world,
            &self.model,
            &mut self.head,
            &self.data.validation,
            eval_batch_size,
            t.max_length,
            state.step,
            self.refcache.as_mut(),
        )?
        else {
            return Ok(());
        };
        self.write_metrics(&serde_json::json!({
            "step": state.step, "epoch": epoch, "eval": true, "metrics": m,
        }))?;
        // A non-finite loss is never the best one.
        match m.get("eval_loss").filter(|l| l.is_finite()) {
            Some(&l) if state.best_eval_loss.is_none_or(|b| l < b) => {
                state.best_eval_loss = Some(l);
                state.evals_since_best = 0;
                self.write_adapter(&self.dir.best_dir())?;
            }
            _ => state.evals_since_best += 1,
        }
        self.progress.println(&format!(
            "step {}: eval_loss {:.4}",
            state.step,
            m.get("eval_loss").copied().unwrap_or(f64::NAN)
        ));
        Ok(())
    }

    /// Greedy completions of `train.sample_prompts` by the model as it is, into samples.jsonl:
    /// as a user message through the model's chat template when it has one (found once, at
    /// start), else as plain text.
    fn write_samples(&mut self, step: usize) -> Result<()> {
        use crate::eval::generate::{complete, GenerateOptions, Prompt};
        let t = &self.cfg.train;
        if t.sample_prompts.is_empty() {
            return Ok(());
        }
        let template = self.sample_template.as_ref().map(|t| &*t.template);
        let opts = GenerateOptions {
            max_new_tokens: t.sample_max_new_tokens,
            stop_ids: self.model.cfg().eos_token_id.into_iter().collect(),
            ..Default::default()
        };
        let mut lines = Vec::new();
        for prompt in &t.sample_prompts {
            let p = match template {
                Some(_) => Prompt::Messages(vec![crate::data::Msg::new("user", prompt.clone())]),
                None => Prompt::Text(prompt.clone()),
            };
            let c = complete(&self.model, &self.tokenizer, template, &p, &opts)
                .context("train.sample_prompts")?;
            lines.push(serde_json::json!({"step": step, "prompt": prompt, "completion": c.text}));
        }
        self.dir.append_samples(&lines)
    }

    /// A checkpoint every `save_every` steps, at the last step and after a signal; a signal then
    /// stops the run.
    fn checkpoint_if_due(&mut self, state: &mut TrainState, last: bool) -> Result<()> {
        let save_every = self.cfg.train.save_every;
        let signal = self.agreed_signal()?;
        if !((save_every > 0 && state.step.is_multiple_of(save_every)) || last || signal.is_some())
        {
            return Ok(());
        }
        self.save_reference_cache();
        let checkpoint = self.save_checkpoint(state)?;
        if let Some(s) = signal {
            self.progress.finish();
            return Err(Stopped::Interrupted {
                signal: signals::name(s),
                code: 128 + s,
                step: state.step,
                checkpoint: checkpoint.display().to_string(),
            }
            .into());
        }
        Ok(())
    }

    /// The signal any rank received (all ranks stop after the same step; rank 0 checkpoints).
    fn agreed_signal(&self) -> Result<Option<i32>> {
        let mine = signals::received();
        if self.world.size() == 1 {
            return Ok(mine);
        }
        let all = self.world.all_gather(&crate::dist::encode(&mine)?)?;
        for b in all {
            if let Some(s) = crate::dist::decode::<Option<i32>>(&b)? {
                return Ok(Some(s));
            }
        }
        Ok(None)
    }

    fn save_checkpoint(&self, state: &mut TrainState) -> Result<PathBuf> {
        state.elapsed_seconds = self.clock.elapsed().as_secs_f64();
        state.loss_state = self.head.state();
        state.world_size = self.world.size();
        let opt = self.opt.state();
        state.adam_t = opt.t;
        let checkpoint = Checkpoint {
            state: state.clone(),
            lora: self.vars.iter().map(|v| v.as_tensor().clone()).collect(),
            adam_m: opt.m,
            adam_v: opt.v,
            adapter: self.adapter_files()?,
        };
        self.dir
            .save_checkpoint(&checkpoint, self.cfg.train.keep_checkpoints)
    }

    /// The PEFT adapter folder's files with the tokenizer's beside them.
    fn adapter_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut files = adapter_files(&self.model, &self.spec, &self.files.name)?;
        files.extend(self.tokenizer_files.iter().cloned());
        Ok(files)
    }

    /// Writes the adapter (and the tokenizer files) into `dir`, each file atomically.
    fn write_adapter(&self, dir: &std::path::Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (name, bytes) in self.adapter_files()? {
            crate::util::atomic::write_atomic(&dir.join(name), &bytes)?;
        }
        Ok(())
    }

    fn write_metrics(&mut self, line: &serde_json::Value) -> Result<()> {
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.metrics_line(line)?;
        }
        self.metrics
            .as_mut()
            .expect("the metrics log is open once the run has started")
            .write(line)
    }

    /// Saves the reference cache; a cache that cannot be written (full disk, read-only folder)
    /// is dropped with a warning rather than stopping the run.
    fn save_reference_cache(&mut self) {
        if let Some(c) = self.refcache.as_mut() {
            if let Err(e) = c.save() {
                self.progress.warn(&format!(
                    "warning: cannot write the reference cache ({e:#}); continuing without it"
                ));
                self.refcache = None;
            }
        }
    }

    /// The adapter in PEFT's layout, the benchmarks, the plots and the model card, then the
    /// finished mark. Refused, with the checkpoint kept, when the run made no finite update or
    /// its weights diverged; a benchmark without a valid score fails the run after the rest is
    /// written.
    fn finish(
        mut self,
        state: TrainState,
        last_metrics: BTreeMap<String, f64>,
    ) -> Result<RunSummary> {
        let quiet = self.opts.quiet;
        if let Some(table) = profile::report(state.step as u64) {
            eprintln!("{table}");
        }
        self.check_trained(&state)?;
        self.save_reference_cache();
        if let Some(c) = self.refcache.as_ref().filter(|_| self.opts.verbose) {
            eprintln!(
                "reference cache {}: {} hits, {} computed",
                c.path().display(),
                c.hits,
                c.misses
            );
        }
        let adapter_dir = self.dir.adapter_dir();
        self.write_adapter(&adapter_dir)?;
        crate::util::fault::pause("KTO_TRAIN_FAULT_FINISH_PAUSE_MS");
        let mut problems = Vec::new();
        // Every rank scores its share of the benchmarks; rank 0 writes the reports.
        let scored = if self.benchmarks.is_empty() {
            None
        } else {
            Some(crate::eval::score_benchmarks(
                self.world,
                &self.cfg.eval,
                &self.benchmarks,
                &self.model,
                &self.tokenizer,
                quiet,
            )?)
        };
        if self.world.rank() > 0 {
            return Ok(RunSummary {
                output_dir: self.dir.root().to_path_buf(),
                adapter_dir,
                steps: state.step,
                final_metrics: last_metrics,
            });
        }
        if let Some((results, invalid)) = scored {
            write_json_atomic(&self.dir.eval_results_path(), &results)?;
            problems = invalid;
        }
        crate::report::draw_plots(self.dir.root())?;
        crate::report::write_metrics_csv(self.dir.root())?;
        crate::report::write_model_card(self.dir.root(), &adapter_dir)?;
        if !problems.is_empty() {
            return Err(Stopped::InvalidScores {
                problems: problems.join("; "),
            }
            .into());
        }
        self.dir.mark_finished()?;
        if !quiet {
            eprintln!(
                "adapter and model card written to {}",
                adapter_dir.display()
            );
        }
        Ok(RunSummary {
            output_dir: self.dir.root().to_path_buf(),
            adapter_dir,
            steps: state.step,
            final_metrics: last_metrics,
        })
    }

    /// A run that never made a finite update, or whose weights are no longer finite or sane,
    /// has no adapter to offer: its last checkpoint stays for inspection.
    fn check_trained(&self, state: &TrainState) -> Result<()> {
        let checkpoint = checkpoint::list(&self.dir.checkpoints_dir())?
            .pop()
            .map(|(_, p)| p.display().to_string())
            .unwrap_or_default();
        if self.opt.steps_taken() == 0 {
            return Err(Stopped::NoFiniteUpdate {
                steps: state.step,
                checkpoint,
            }
            .into());
        }
        let mut largest: f64 = 0.0;
        for v in &self.vars {
            let m = v
                .as_tensor()
                .abs()?
                .max_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            largest = if m.is_nan() { f64::NAN } else { largest.max(m) };
        }
        if largest.is_nan() || largest > MAX_LORA_WEIGHT {
            return Err(Stopped::Diverged {
                largest,
                checkpoint,
            }
            .into());
        }
        Ok(())
    }
}

/// Largest LoRA weight magnitude a run may end with. Adam moves a weight by about lr per step, so
/// a healthy run stays orders of magnitude below this; beyond it the run has diverged.
const MAX_LORA_WEIGHT: f64 = 1e4;

/// The policy: fresh PEFT init, or the weights of `lora.init_from`, computing with the kernels
/// the config asks for, its LoRA dropout off under `train.disable_dropout` (the returned spec
/// keeps the configured dropout: it is what adapter_config.json records, as PEFT's would).
pub fn build_policy(
    cfg: &Config,
    files: &ModelFiles,
    dev: &candle_core::Device,
) -> Result<(Llama, LoraSpec)> {
    let dt = cfg.train.dtype.to_candle();
    let kernels = KernelSettings {
        fused_ops: true,
        activation_checkpointing: cfg.train.activation_checkpointing,
        gemm: gemm::resolve(cfg.train.gemm),
    };
    let (model, spec) = match &cfg.lora.init_from {
        Some(dir) => {
            let dir = std::path::Path::new(dir);
            let (mut spec, _) = read_adapter_spec(dir)?;
            check_init_from(&cfg.lora, &spec, dir)?;
            spec.dropout = cfg.lora.dropout;
            spec.seed = cfg.train.seed;
            (load_adapted(files, dt, dev, dir, &spec)?, spec)
        }
        None => {
            let spec = LoraSpec::from_config(&cfg.lora, cfg.train.seed);
            // Frozen weights read straight into the dtype the kernels hold them in: no f32
            // copy of the network at load when the products are bf16.
            let frozen = kernels.frozen_dtype(dt, dev);
            (
                load_llama_frozen_in(files, dt, frozen, dev, Some(&spec))?,
                spec,
            )
        }
    };
    let model = if cfg.train.disable_dropout {
        model.without_lora_dropout()
    } else {
        model
    };
    Ok((model.with_kernels(kernels)?, spec))
}

/// `lora.init_from` continues an adapter as it is: the config's rank, alpha, rsLoRA and target
/// modules must be the adapter's (silently using the adapter's would make the config lie).
fn check_init_from(
    lora: &crate::config::LoraConfig,
    spec: &LoraSpec,
    dir: &std::path::Path,
) -> Result<()> {
    let mut differ = Vec::new();
    if lora.r != spec.r {
        differ.push(format!("r = {} (adapter: {})", lora.r, spec.r));
    }
    if lora.alpha != spec.alpha {
        differ.push(format!("alpha = {} (adapter: {})", lora.alpha, spec.alpha));
    }
    if lora.use_rslora != spec.use_rslora {
        differ.push(format!(
            "use_rslora = {} (adapter: {})",
            lora.use_rslora, spec.use_rslora
        ));
    }
    let set = |v: &[crate::config::Projection]| {
        let mut v: Vec<&str> = v.iter().map(|p| p.name()).collect();
        v.sort();
        v
    };
    if set(&lora.target_modules) != set(&spec.target_modules) {
        differ.push(format!(
            "target_modules = {:?} (adapter: {:?})",
            set(&lora.target_modules),
            set(&spec.target_modules)
        ));
    }
    if !differ.is_empty() {
        bail!(
            "[lora] init_from = {}: the adapter's settings differ from [lora]'s: {}; set them \
             to the adapter's (an adapter is continued as it was trained)",
            dir.display(),
            differ.join(", ")
        );
    }
    Ok(())
}

/// Steps per epoch, total steps and the learning-rate schedule.
fn plan(cfg: &Config, train: &[KtoExample], head: &LossHead) -> Result<Plan> {
    // Over several processes an epoch is made of global micro-batches (batch x ranks).
    let t = &global_train_config(&cfg.train, crate::dist::world_ref().size());
    let min_batch = if head.needs_kl() { 2 } else { 1 };
    let batches_per_epoch = epoch_batches(train, t, 0, min_batch).len();
    if batches_per_epoch == 0 {
        bail!(
            "{} training examples make no micro-batch of size {} (the KL pairs need at least 2)",
            train.len(),
            t.batch_size
        );
    }
    let steps_per_epoch = batches_per_epoch.div_ceil(t.grad_accum);
    let total_steps = t.max_steps.unwrap_or(steps_per_epoch * t.epochs);
    let warmup_steps = if t.warmup_steps > 0 {
        t.warmup_steps
    } else {
        (t.warmup_ratio * total_steps as f64).ceil() as usize
    };
    Ok(Plan {
        min_batch,
        total_steps,
        schedule: Schedule {
            kind: t.lr_schedule,
            base_lr: t.lr,
            warmup_steps,
            total_steps,
        },
    })
}

/// Micro-batches of one epoch, in the order `train.data_order` asks for; a trailing micro-batch
/// too small for the KL pairs is dropped (as a DataLoader with drop_last would).
pub fn epoch_batches<'e>(
    examples: &'e [KtoExample],
    t: &crate::config::TrainConfig,
    epoch: u64,
    min_batch: usize,
) -> Vec<Vec<&'e KtoExample>> {
    let batch_size = t.batch_size;
    let order = data::order::epoch_order_for(t.data_order, examples, batch_size, t.seed, epoch);
    order
        .chunks(batch_size)
        .filter(|c| c.len() >= min_batch)
        .map(|c| c.iter().map(|&i| &examples[i]).collect())
        .collect()
}

/// `t` with `batch_size` the global micro-batch of `ranks` processes (per-rank batch x ranks):
/// what the epoch's micro-batches and the plan are made of. One process with that batch size
/// trains the same model.
fn global_train_config(t: &crate::config::TrainConfig, ranks: usize) -> crate::config::TrainConfig {
    let mut g = t.clone();
    g.batch_size = t.batch_size * ranks;
    g.eval_batch_size = t.eval_batch_size.map(|b| b * ranks);
    g
}

/// The LoRA gradients summed over the ranks, back in each tensor's dtype and shape: over MPI as
/// f64 sums (the order of the ranks then costs nothing measurable); with the `nccl` feature and
/// gradients on GPUs, by NCCL on the devices in their dtype.
fn all_reduce_grads(world: &dyn crate::dist::Comm, grads: Vec<Tensor>) -> Result<Vec<Tensor>> {
    #[cfg(feature = "nccl")]
    if let Some(summed) = crate::dist::nccl::all_reduce(world, &grads)? {
        return Ok(summed);
    }
    let mut flat = Vec::new();
    for g in &grads {
        flat.extend(
            g.flatten_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_vec1::<f64>()?,
        );
    }
    world.all_reduce_sum(&mut flat)?;
    let mut at = 0;
    grads
        .iter()
        .map(|g| {
            let n = g.elem_count();
            let t = Tensor::from_slice(&flat[at..at + n], g.shape(), g.device())?
                .to_dtype(g.dtype())?;
            at += n;
            Ok(t)
        })
        .collect()
}

/// `sum + scale * grads`, elementwise over the LoRA tensors (`grads` scaled alone at first).
fn accumulate(sum: Option<Vec<Tensor>>, grads: Vec<Tensor>, scale: f64) -> Result<Vec<Tensor>> {
    Ok(match sum {
        None => grads
            .into_iter()
            .map(|t| t * scale)
            .collect::<candle_core::Result<_>>()?,
        Some(a) => a
            .iter()
            .zip(grads)
            .map(|(a, t)| a + (t * scale)?)
            .collect::<candle_core::Result<_>>()?,
    })
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
