//! Command-line interface: `kto-train --config FILE` trains; subcommands for everything else.
//! Each command reads its arguments ([`args`]) and calls one entry point of the layer that does
//! the work.
pub mod args;

use crate::config::{Config, DType};
use crate::eval::tasks::runner::{self, EvalReport};
use crate::eval::tasks::{load_task, LoadOptions};
use crate::model::tiny::{write_random_model, write_tiny_model, TinySpec};
use crate::model::{load_with_adapter, LlamaConfig, PassMode};
use crate::recipe::RunOptions;
use anyhow::{bail, Context, Result};
use args::{Cli, Command, EvalArgs, GenerateArgs, InitTinyArgs, MergeArgs, ScoreArgs, TrainArgs};
use clap::Parser;

/// Exit codes a script can rely on (README, "Exit codes").
pub fn exit_code(e: &anyhow::Error) -> i32 {
    match e.downcast_ref::<crate::train::Stopped>() {
        Some(crate::train::Stopped::Interrupted { code, .. }) => *code,
        Some(
            crate::train::Stopped::NonFinite { .. }
            | crate::train::Stopped::NoFiniteUpdate { .. }
            | crate::train::Stopped::Diverged { .. }
            | crate::train::Stopped::InvalidScores { .. },
        ) => 3,
        None => 1,
    }
}

/// A stop all ranks of a run reach together (a signal, after the same step).
pub fn is_agreed_stop(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<crate::train::Stopped>(),
        Some(crate::train::Stopped::Interrupted { .. })
    )
}

pub fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => train(&cli.train),
        Some(Command::Train(a)) => train(&a),
        Some(Command::InitTiny(a)) => init_tiny(&a),
        Some(Command::Data(a)) => {
            let cfg = Config::load(&a.config, &a.set)?;
            crate::data::run_data_command(&cfg, a.out.as_deref(), a.strict)
        }
        Some(Command::Config(a)) => {
            print!("{}", Config::load(&a.config, &a.set)?.to_toml());
            Ok(())
        }
        Some(Command::Score(a)) => score(&a),
        Some(Command::Generate(a)) => generate(&a),
        Some(Command::Plot { run_dir }) => crate::report::run_plot_command(&run_dir),
        Some(Command::Eval(a)) => eval(&a).map(|_| ()),
        Some(Command::Merge(a)) => merge(&a),
    }
}

fn train(a: &TrainArgs) -> Result<()> {
    let Some(config) = &a.config else {
        bail!("no config given: run `kto-train --config configs/smoke.toml` (see --help)");
    };
    if !(a.allow_config_change.is_empty() || a.resume || a.resume_from.is_some()) {
        bail!("--allow-config-change applies to a resumed run: add --resume or --resume-from");
    }
    // Under mpirun/srun: join the other processes of the run (src/dist).
    let world = crate::dist::init()?;
    if world.size() > 1 && world.rank() == 0 && !a.quiet {
        eprintln!(
            "{}: each rank runs its share of every global micro-batch (batch_size x ranks); \
             rank 0 writes the run folder",
            world.describe()
        );
    }
    let cfg = Config::load(config, &a.set)?;
    let options = RunOptions {
        strict: a.strict,
        quiet: a.quiet,
        verbose: a.verbose,
        start: crate::train::run_dir::StartRequest {
            resume: a.resume || a.resume_from.is_some(),
            overwrite: a.overwrite,
            resume_from: a.resume_from.clone(),
            allow_config_change: a.allow_config_change.clone(),
        },
    };
    let summary = crate::recipe::train(&cfg, &options)?;
    if !a.quiet {
        eprintln!(
            "done: {} steps; adapter in {}",
            summary.steps,
            summary.adapter_dir.display()
        );
    }
    Ok(())
}

fn init_tiny(a: &InitTinyArgs) -> Result<()> {
    let non_empty = std::fs::read_dir(&a.out).is_ok_and(|mut rd| rd.next().is_some());
    if non_empty || a.out.is_file() {
        bail!(
            "--out {} exists and is not empty: init-tiny writes a new model folder and would \
             replace the weights of what is there; give a new folder",
            a.out.display()
        );
    }
    if a.smollm2_360m {
        write_random_model(
            &a.out,
            &LlamaConfig::smollm2_360m(),
            a.seed,
            candle_core::DType::BF16,
        )?;
    } else {
        let spec = TinySpec {
            seed: a.seed,
            ..TinySpec::default()
        };
        write_tiny_model(&a.out, &spec)?;
    }
    eprintln!("wrote model folder {}", a.out.display());
    Ok(())
}

/// The model (and adapter) that `score` and `eval` run, in f32.
fn load_for_scoring(
    model: &str,
    revision: &str,
    adapter: Option<&std::path::Path>,
    device: crate::config::DeviceSpec,
) -> Result<(crate::hub::ModelFiles, crate::model::Llama)> {
    let dev = device.open()?;
    let files = crate::hub::resolve_model(model, revision)?;
    let model = load_with_adapter(&files, DType::F32.to_candle(), &dev, adapter)?;
    Ok((files, model))
}

fn score(a: &ScoreArgs) -> Result<()> {
    let (files, model) = load_for_scoring(&a.model, &a.revision, a.adapter.as_deref(), a.device)?;
    let tok = crate::data::tokenizer::model_tokenizer(&files)?;
    let eos = if a.append_eos {
        Some(model.cfg().eos_token_id.with_context(|| {
            format!(
                "--append-eos: {} has no eos_token_id",
                files.config.display()
            )
        })?)
    } else {
        None
    };
    let run = |out: &mut dyn std::io::Write| {
        crate::eval::score::score_jsonl(&model, tok.as_ref(), &a.input, out, a.batch_size, eos)
    };
    match &a.output {
        Some(p) => {
            let mut buf = Vec::new();
            run(&mut buf)?;
            crate::util::atomic::write_atomic(p, &buf)
        }
        None => run(&mut std::io::stdout().lock()).map(|_| ()),
    }
}

/// `kto-train generate`: one prompt to stdout, or a JSONL of prompts to JSONL.
fn generate(a: &GenerateArgs) -> Result<()> {
    use crate::data::Msg;
    use crate::eval::generate::{complete, GenerateOptions, Prompt};
    let (files, model) = load_for_scoring(&a.model, &a.revision, a.adapter.as_deref(), a.device)?;
    let tok = crate::data::tokenizer::model_tokenizer(&files)?
        .with_context(|| format!("model {} has no tokenizer", files.config.display()))?;
    let eos = model.cfg().eos_token_id;
    let template = crate::data::tokenizer::chat_template_of(&files, &tok, eos.unwrap_or(0))?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        stop_ids: eos.into_iter().collect(),
    };
    let template = template.as_ref().map(|t| &*t.template);
    let run = |prompt: &serde_json::Value| -> Result<(String, usize, &'static str)> {
        let prompt = match prompt {
            serde_json::Value::String(s) if a.chat => {
                Prompt::Messages(vec![Msg::new("user", s.clone())])
            }
            serde_json::Value::String(s) => Prompt::Text(s.clone()),
            serde_json::Value::Array(list) => Prompt::Messages(
                list.iter()
                    .map(|m| {
                        let field = |k: &str| m[k].as_str().map(str::to_string);
                        match (field("role"), field("content")) {
                            (Some(r), Some(c)) => Ok(Msg::new(&r, c)),
                            _ => bail!("a message needs string `role` and `content`: {m}"),
                        }
                    })
                    .collect::<Result<_>>()?,
            ),
            other => bail!("`prompt` must be a string or a list of messages, got {other}"),
        };
        let c = complete(&model, &tok, template, &prompt, &opts)
            .with_context(|| format!("model {}", files.config.display()))?;
        Ok((c.text, c.tokens, if c.stopped { "eos" } else { "length" }))
    };
    if let Some(p) = &a.prompt {
        let (completion, _, _) = run(&serde_json::Value::String(p.clone()))?;
        println!("{completion}");
        return Ok(());
    }
    let input = a.input.as_ref().expect("clap: --prompt or --input");
    let text = std::fs::read_to_string(input)
        .with_context(|| format!("cannot read {}", input.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", input.display(), i + 1);
        let rec: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", at()))?;
        let prompt = rec
            .get("prompt")
            .with_context(|| format!("{}: field `prompt` missing", at()))?;
        let (completion, n, stop) = run(prompt).with_context(at)?;
        let row = serde_json::json!({
            "prompt": prompt, "completion": completion, "completion_tokens": n, "stop": stop,
        });
        out.extend_from_slice(format!("{row}\n").as_bytes());
        if a.output.is_none() {
            use std::io::Write;
            std::io::stdout().write_all(format!("{row}\n").as_bytes())?;
        }
    }
    if let Some(p) = &a.output {
        crate::util::atomic::write_atomic(p, &out)?;
    }
    Ok(())
}

/// `kto-train eval`: prints the table on stdout, writes JSON when asked.
pub fn eval(a: &EvalArgs) -> Result<EvalReport> {
    let options = LoadOptions {
        shots: a.shots,
        fewshot_data: a.fewshot_data.clone(),
        limit: a.limit,
        seed: a.seed,
    };
    let task = load_task(a.task, &a.data, &options)?;
    let (files, model) = load_for_scoring(&a.model, &a.revision, a.adapter.as_deref(), a.device)?;
    let tok = crate::data::tokenizer::model_tokenizer(&files)?
        .with_context(|| format!("model {} has no tokenizer", files.config.display()))?;
    if !a.quiet {
        let n: usize = task.items.iter().map(|i| i.choices.len()).sum();
        eprintln!(
            "{}: {} questions, {n} continuations, {}-shot",
            a.task.name(),
            task.items.len(),
            task.shots
        );
    }
    let eval_options = runner::EvalOptions {
        batch_size: a.batch_size,
        pass: PassMode::POLICY_EVAL,
        progress: !a.quiet,
    };
    let report = runner::evaluate(&model, &tok, &task, &eval_options)?;
    print!("{}", runner::format_table(std::slice::from_ref(&report)));
    let groups = runner::format_group_table(&report);
    if !groups.is_empty() {
        print!("\n{groups}");
    }
    if let Some(out) = &a.output {
        let run = serde_json::json!({
            "model": a.model,
            "adapter": a.adapter,
            "data": a.data,
            "fewshot_data": a.fewshot_data,
            "limit": a.limit,
            "seed": a.seed,
            "batch_size": a.batch_size,
        });
        crate::util::atomic::write_json_atomic(out, &runner::report_json(&report, run))?;
        if !a.quiet {
            eprintln!("wrote {}", out.display());
        }
    }
    if let Some(why) = report.invalid_reason() {
        bail!("{why}");
    }
    Ok(report)
}

fn merge(a: &MergeArgs) -> Result<()> {
    let files = crate::hub::resolve_model(&a.model, &a.revision)?;
    use crate::model::adapter::merge::{merge_adapter_with, MAX_LOST_FRACTION};
    let s = merge_adapter_with(&files, &a.adapter, &a.out, a.dtype)?;
    eprintln!(
        "merged {} projections into {:?} weights (rounding lost {:.2e} of the adapter's change); \
         wrote {} files to {}",
        s.merged,
        s.dtype,
        s.lost_fraction,
        s.files.len(),
        a.out.display()
    );
    if s.lost_fraction > MAX_LOST_FRACTION {
        eprintln!(
            "warning: {:?} weights keep only {:.0}% of the adapter's change \
             (|round(W + dW) - (W + dW)| / |dW| = {:.3}); merge with --dtype f32 to keep it",
            s.dtype,
            100.0 * (1.0 - s.lost_fraction).max(0.0),
            s.lost_fraction
        );
    }
    Ok(())
}
