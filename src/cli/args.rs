//! Every command's arguments (clap types live here and nowhere else). Values that the config also
//! holds (device, benchmark task) are parsed by the config's own types.
use crate::config::{BenchmarkTask, DeviceSpec};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// `--version`: the version, the build's cargo features and the products this CPU runs.
fn long_version() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        let on = |b: bool| if b { "on" } else { "off" };
        format!(
            "{}\nfeatures: cuda {}, fast-gemm {}, mpi {}, nccl {}\nmatrix products on this machine: {}",
            env!("CARGO_PKG_VERSION"),
            on(cfg!(feature = "cuda")),
            on(cfg!(feature = "fast-gemm")),
            on(cfg!(feature = "mpi")),
            on(cfg!(feature = "nccl")),
            crate::kernels::gemm::machine_summary()
        )
    })
}

#[derive(Parser, Debug)]
#[command(
    name = "kto-train",
    version,
    long_version = long_version(),
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
    /// Replace the run in the output folder (finished or not) as a whole, once the new run's
    /// config, model and data were checked.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Continue the run in the output folder from its newest checkpoint (with the same config);
    /// a finished run whose train.max_steps or train.epochs was raised is extended.
    #[arg(long)]
    pub resume: bool,
    /// Continue from this checkpoint of the run (checkpoints/step-N) instead of the newest; the
    /// later checkpoints and metrics lines are dropped.
    #[arg(long, value_name = "CHECKPOINT", conflicts_with = "overwrite")]
    pub resume_from: Option<PathBuf>,
    /// With --resume: config keys (or tables, e.g. `train.lr`, `data`) that may differ from the
    /// run's; the change is recorded in the run folder.
    #[arg(long, value_name = "KEY", num_args = 1..)]
    pub allow_config_change: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a LoRA adapter (the default action).
    Train(TrainArgs),
    /// Write a tiny random Llama model folder (config.json, model.safetensors, tokenizer.json).
    InitTiny(InitTinyArgs),
    /// Print the data mix of a config (tokenizer only, no model weights).
    Data(DataArgs),
    /// Print a config as the run would use it: every key, defaults filled in, TRL's key names
    /// under kto-train's, paths resolved; a bad config is refused as a run would refuse it.
    Config(ConfigArgs),
    /// Completion log-probs of JSONL records ({prompt, completion} or {prompt_ids, completion_ids}).
    Score(ScoreArgs),
    /// Generate text from a model (and adapter): greedy or sampled, with a KV cache.
    Generate(GenerateArgs),
    /// Redraw a run folder's plots (plots/*.png) and its adapter's model card (adapter/README.md).
    Plot {
        /// Run folder (the training config's output.dir).
        run_dir: PathBuf,
    },
    /// Benchmark scoring (HellaSwag, TruthfulQA MC2, MMLU) with the evaluation harness's method.
    Eval(EvalArgs),
    /// Fold a LoRA adapter into the base weights: a plain Hugging Face model folder.
    Merge(MergeArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ConfigArgs {
    /// Run config (TOML).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Override any config key, e.g. --set train.lr=1e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct InitTinyArgs {
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write SmolLM2-360M's exact shapes instead of the tiny ones (for benchmarks).
    #[arg(long)]
    pub smollm2_360m: bool,
}

#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Run config (TOML).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Override any config key, e.g. --set data.max_interactions_per_source=100 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Also write the prepared examples as JSONL here (with split and decoded text).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Fail on the first bad data record instead of skipping and counting it.
    #[arg(long)]
    pub strict: bool,
}

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Model folder, hub id or .gguf file.
    #[arg(long)]
    pub model: String,
    /// Hub revision (branch, tag or commit).
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// PEFT adapter folder to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// One prompt; the completion is printed on stdout.
    #[arg(long, conflicts_with = "input", required_unless_present = "input")]
    pub prompt: Option<String>,
    /// JSONL of {"prompt": TEXT or [messages]} records; one {"prompt", "completion",
    /// "completion_tokens", "stop"} line each on stdout (or --output).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Write the JSONL here instead of stdout.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Render text prompts as a user message through the model's chat template (message-list
    /// prompts always are).
    #[arg(long)]
    pub chat: bool,
    /// Most new tokens per prompt.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy (transformers' do_sample=False); above 0, sampled at this temperature.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling threshold (with --temperature > 0).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

#[derive(Args, Debug, Clone)]
pub struct ScoreArgs {
    /// Model folder or hub id.
    #[arg(long)]
    pub model: String,
    /// PEFT adapter folder to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Input JSONL.
    #[arg(long)]
    pub input: PathBuf,
    /// Output JSONL (default: stdout).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Append the model's EOS token to text completions (as training does).
    #[arg(long)]
    pub append_eos: bool,
    /// cpu or cuda[:N] (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Hub revision when --model is a hub id.
    #[arg(long, default_value = "main")]
    pub revision: String,
}

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Model folder or hub id.
    #[arg(long)]
    pub model: String,
    /// PEFT adapter folder to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Benchmark to score: hellaswag, truthfulqa_mc2 or mmlu.
    #[arg(long)]
    pub task: BenchmarkTask,
    /// The task's published file: HellaSwag JSONL, TruthfulQA mc_task.json, MMLU CSV or folder.
    #[arg(long)]
    pub data: PathBuf,
    /// Few-shot examples per question (default: HellaSwag 10, TruthfulQA MC2 0, MMLU 5).
    #[arg(long)]
    pub shots: Option<usize>,
    /// Where few-shot examples come from: HellaSwag's train JSONL; MMLU's dev folder or file
    /// (default: the dev/ folder next to the test files).
    #[arg(long)]
    pub fewshot_data: Option<PathBuf>,
    /// Only the first N questions (per subject for MMLU).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Continuations per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Write the scores, per question too, as JSON here.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Seed of the few-shot draw (the harness's default is 1234).
    #[arg(long, default_value_t = crate::eval::tasks::DEFAULT_FEWSHOT_SEED)]
    pub seed: u64,
    /// cpu or cuda[:N] (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Hub revision when --model is a hub id.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// No progress bar or notes on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    /// Base model folder or hub id.
    #[arg(long)]
    pub model: String,
    /// PEFT LoRA adapter folder.
    #[arg(long)]
    pub adapter: PathBuf,
    /// New folder for the merged model.
    #[arg(long)]
    pub out: PathBuf,
    /// dtype of the merged weights: auto (the base's, unless rounding to it loses more than a
    /// tenth of the adapter's change; f32 then), f32 or bf16.
    #[arg(long, default_value = "auto")]
    pub dtype: crate::model::adapter::merge::MergeDtype,
    /// Hub revision when --model is a hub id.
    #[arg(long, default_value = "main")]
    pub revision: String,
}
