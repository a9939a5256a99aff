//! Command-line interface: `kto-train --config FILE` trains; subcommands for everything else.
use crate::config::Config;
use crate::model::adapter::{load_adapter_weights, read_adapter_spec};
use crate::model::tiny::{write_tiny_model, TinySpec};
use crate::model::{load_llama, resolve_model};
use crate::train::recipe::{device, dtype, RunOptions};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "kto-train",
    version,
    about = "LoRA training of Llama-family models with (Enhanced) KTO; writes PEFT adapters",
    long_about = "LoRA training of Llama-family models with (Enhanced) KTO; writes PEFT adapters.\n\n\
                  `kto-train --config FILE` trains (the same as `kto-train train --config FILE`).",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Args, Debug, Clone, Default)]
pub struct TrainArgs {
    /// Run config (TOML); see configs/ and the README for every key.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Override any config key, e.g. --set train.lr=1e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Fail on the first bad data record instead of skipping and counting it.
    #[arg(long)]
    pub strict: bool,
    /// Only errors on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// Every metrics line on stderr.
    #[arg(long, short)]
    pub verbose: bool,
    /// Replace a finished run in the output folder.
    #[arg(long)]
    pub overwrite: bool,
    /// Continue from the newest checkpoint in the output folder.
    #[arg(long)]
    pub resume: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a LoRA adapter (the default action).
    Train(TrainArgs),
    /// Write a tiny random Llama model folder (config.json, model.safetensors, tokenizer.json).
    InitTiny {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Write SmolLM2-360M's exact shapes instead of the tiny ones (for benchmarks).
        #[arg(long)]
        smollm2_360m: bool,
    },
    /// Print the data mix of a config (tokenizer only, no model weights).
    Data {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Also write the prepared examples as JSONL here.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        strict: bool,
    },
    /// Completion log-probs of JSONL records ({prompt, completion} or {prompt_ids, completion_ids}).
    Score {
        /// Model folder or hub id.
        #[arg(long)]
        model: String,
        /// PEFT adapter folder to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Input JSONL.
        #[arg(long)]
        input: PathBuf,
        /// Output JSONL (default: stdout).
        #[arg(long)]
        output: Option<PathBuf>,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Append the model's EOS token to text completions (as training does).
        #[arg(long)]
        append_eos: bool,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value = "main")]
        revision: String,
    },
    /// Redraw a run folder's plots (plots/*.png) and its adapter's model card (adapter/README.md).
    Plot {
        /// Run folder (the training config's output.dir).
        run_dir: PathBuf,
    },
    /// Benchmark scoring (HellaSwag, TruthfulQA MC2, MMLU) with the evaluation harness's method.
    Eval(crate::eval::tasks::runner::EvalArgs),
    /// Fold a LoRA adapter into the base weights: a plain Hugging Face model folder.
    Merge(crate::eval::merge::MergeArgs),
}

/// Exit codes a script can rely on (README, "Exit codes").
pub fn exit_code(e: &anyhow::Error) -> i32 {
    match e.downcast_ref::<crate::train::Stopped>() {
        Some(crate::train::Stopped::Interrupted { code, .. }) => *code,
        Some(crate::train::Stopped::NonFinite { .. }) => 3,
        None => 1,
    }
}

pub fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => run_train(&cli.train),
        Some(Command::Train(a)) => run_train(&a),
        Some(Command::InitTiny {
            out,
            seed,
            smollm2_360m,
        }) => {
            if smollm2_360m {
                crate::model::tiny::write_random_model(
                    &out,
                    &crate::model::LlamaConfig::smollm2_360m(),
                    seed,
                    candle_core::DType::BF16,
                )?;
            } else {
                write_tiny_model(
                    &out,
                    &TinySpec {
                        seed,
                        ..TinySpec::default()
                    },
                )?;
            }
            eprintln!("wrote model folder {}", out.display());
            Ok(())
        }
        Some(Command::Data {
            config,
            set,
            out,
            strict,
        }) => {
            let cfg = Config::load(&config, &set)?;
            crate::data::run_data_command(&cfg, out.as_deref(), strict)
        }
        Some(Command::Score {
            model,
            adapter,
            input,
            output,
            batch_size,
            append_eos,
            device: dev,
            revision,
        }) => {
            let dev = device(&dev)?;
            let files = resolve_model(&model, &revision)?;
            let spec = match &adapter {
                Some(dir) => Some(read_adapter_spec(dir)?.0),
                None => None,
            };
            let m = load_llama(
                &files,
                dtype(crate::config::DType::F32),
                &dev,
                spec.as_ref(),
            )?;
            if let Some(dir) = &adapter {
                load_adapter_weights(&m, dir)?;
            }
            let tok = files
                .tokenizer
                .as_deref()
                .map(crate::data::load_tokenizer)
                .transpose()?;
            let eos = if append_eos {
                Some(m.cfg.eos_token_id.with_context(|| {
                    format!(
                        "--append-eos: {} has no eos_token_id",
                        files.config.display()
                    )
                })?)
            } else {
                None
            };
            match output {
                Some(p) => {
                    let mut buf = Vec::new();
                    crate::eval::score::score_jsonl(
                        &m,
                        tok.as_ref(),
                        &input,
                        &mut buf,
                        batch_size,
                        eos,
                    )?;
                    crate::util::atomic::write_atomic(&p, &buf)?;
                }
                None => {
                    let stdout = std::io::stdout();
                    let mut lock = stdout.lock();
                    crate::eval::score::score_jsonl(
                        &m,
                        tok.as_ref(),
                        &input,
                        &mut lock,
                        batch_size,
                        eos,
                    )?;
                }
            }
            Ok(())
        }
        Some(Command::Plot { run_dir }) => crate::report::run_plot_command(&run_dir),
        Some(Command::Eval(a)) => crate::eval::tasks::runner::run_eval_command(&a).map(|_| ()),
        Some(Command::Merge(a)) => crate::eval::merge::run_merge_command(&a).map(|_| ()),
    }
}

fn run_train(a: &TrainArgs) -> Result<()> {
    let Some(config) = &a.config else {
        bail!("no config given: run `kto-train --config configs/smoke.toml` (see --help)");
    };
    let cfg = Config::load(config, &a.set)?;
    let summary = crate::train::train(
        &cfg,
        &RunOptions {
            strict: a.strict,
            quiet: a.quiet,
            verbose: a.verbose,
            overwrite: a.overwrite,
            resume: a.resume,
        },
    )?;
    if !a.quiet {
        eprintln!(
            "done: {} steps; adapter in {}",
            summary.steps,
            summary.adapter_dir.display()
        );
    }
    Ok(())
}
