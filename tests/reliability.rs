//! Never lose a user's work, never report a wrong result as success: one test per rule of the
//! reliability issue, each written against what the binary did before (deleted, mixed up or
//! accepted) and what it must do now.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn kto(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kto-train"));
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// The smoke run (tiny model, shipped samples) into `out`, 4 steps, checkpoint at every step,
/// no benchmarks unless `extra` sets them.
fn smoke(out: &Path, extra: &[&str]) -> Command {
    let cfg = repo().join("configs/smoke.toml");
    let mut args: Vec<String> = vec![
        "--config".into(),
        cfg.display().to_string(),
        "--set".into(),
        format!("output.dir={}", out.display()),
    ];
    for s in [
        "train.max_steps=4",
        "train.save_every=1",
        "train.eval_every=2",
        "train.max_length=64",
        "eval.benchmarks=[]",
        // LoRA dropout on (TRL's disable_dropout off): resumed runs must redraw the same masks.
        "train.disable_dropout=false",
    ] {
        args.push("--set".into());
        args.push(s.into());
    }
    args.push("--quiet".into());
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    kto(&refs)
}

fn run(mut c: Command) -> Output {
    c.output().unwrap()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_refused(o: &Output, needles: &[&str]) {
    let e = err(o);
    assert!(!o.status.success(), "expected a refusal, got success:\n{e}");
    for n in needles {
        assert!(e.contains(n), "the message lacks `{n}`:\n{e}");
    }
}

fn assert_ok(o: &Output) {
    assert!(o.status.success(), "{}", err(o));
}

/// Every file below `dir` with its bytes (for "nothing changed" checks).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n != ".kto-train.lock") {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn metrics_lines(out: &Path) -> usize {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    text[..text.rfind('\n').map_or(0, |i| i + 1)]
        .lines()
        .count()
}

fn wait_for(child: &mut Child, what: &str, cond: impl Fn() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "run ended before {what}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An unfinished run: killed after its second checkpoint.
fn unfinished_run(out: &Path) {
    let mut child = smoke(out, &[]).spawn().unwrap();
    wait_for(&mut child, "two checkpoints", || {
        kto_train::train::checkpoint::list(&out.join("checkpoints")).is_ok_and(|l| l.len() >= 2)
    });
    child.kill().unwrap();
    child.wait().unwrap();
}

// ---------------------------------------------------------------- rule 1

#[test]
fn rule1_nothing_is_touched_before_everything_is_validated() {
    let tmp = tempfile::tempdir().unwrap();
    // An unfinished run, then a start with a typo in the model path: its checkpoints stay.
    let out = tmp.path().join("unfinished");
    unfinished_run(&out);
    let before = snapshot(&out);
    let o = run(smoke(&out, &["--set", "model.name_or_path=/no/such/model"]));
    assert_refused(&o, &["/no/such/model"]);
    assert_eq!(
        snapshot(&out),
        before,
        "a refused start changed the run folder"
    );
    // Neither --resume nor --overwrite: the unfinished run is not thrown away.
    let o = run(smoke(&out, &[]));
    assert_refused(&o, &["unfinished run", "--resume", "--overwrite"]);
    assert_eq!(snapshot(&out), before);

    // A finished run, replaced with --overwrite by a run whose data file is missing: the
    // finished run stays whole.
    let done = tmp.path().join("finished");
    assert_ok(&run(smoke(&done, &[])));
    let before = snapshot(&done);
    let o = run(smoke(
        &done,
        &[
            "--overwrite",
            "--set",
            "data.sources=[{kind = \"unpaired\", files = [\"/no/such.jsonl\"]}]",
        ],
    ));
    assert_refused(&o, &["/no/such.jsonl"]);
    assert_eq!(snapshot(&done), before);

    // --overwrite replaces the run as a whole: nothing of the old run (its benchmark scores,
    // its best adapter) survives into the new one.
    let scored = tmp.path().join("scored");
    let bench = format!(
        "eval.benchmarks=[{{task = \"truthfulqa_mc2\", data = \"{}\", limit = 2}}]",
        repo()
            .join("data/samples/eval/truthfulqa/data/mc_task.json")
            .display()
    );
    assert_ok(&run(smoke(&scored, &["--set", &bench])));
    assert!(scored.join("eval_results.json").is_file() && scored.join("best").is_dir());
    assert_ok(&run(smoke(
        &scored,
        &["--overwrite", "--set", "data.validation_fraction=0.0"],
    )));
    assert!(
        !scored.join("eval_results.json").exists(),
        "old scores kept"
    );
    assert!(!scored.join("best").exists(), "old best/ kept");
    let card = std::fs::read_to_string(scored.join("adapter/README.md")).unwrap();
    assert!(
        !card.contains("## Evaluation"),
        "the new card shows the old scores"
    );

    // A folder kto-train did not write is never cleared, not even with --overwrite.
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir_all(foreign.join("checkpoints")).unwrap();
    std::fs::write(foreign.join("checkpoints/model.pt"), "another tool's").unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let before = snapshot(&foreign);
    for extra in [&[][..], &["--overwrite"][..]] {
        let o = run(smoke(&foreign, extra));
        assert_refused(&o, &["no kto-train run wrote", "notes.txt"]);
        assert_eq!(snapshot(&foreign), before);
    }
}

// ---------------------------------------------------------------- rule 2

#[test]
fn rule2_one_writer_per_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // The first run is slowed at its checkpoint writes, so that it holds the folder for a while.
    let mut first = smoke(&out, &[])
        .env("KTO_TRAIN_FAULT_CHECKPOINT_PAUSE_MS", "1500")
        .spawn()
        .unwrap();
    wait_for(&mut first, "the first run's lock", || {
        metrics_lines(&out) >= 1
    });
    let t = Instant::now();
    let o = run(smoke(&out, &[]));
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "the second run did not fail at once"
    );
    assert_refused(
        &o,
        &[
            "in use by another kto-train run",
            &format!("pid {}", first.id()),
        ],
    );
    // The first one dies; its lock dies with it and blocks nobody.
    first.kill().unwrap();
    first.wait().unwrap();
    assert_ok(&run(smoke(&out, &["--resume"])));
    // An unrelated file named like the lock (left by a dead process) does not block either.
    assert!(out.join(".kto-train.lock").is_file());
    assert_ok(&run(smoke(&out, &["--overwrite"])));
}

// ---------------------------------------------------------------- rule 3

#[test]
fn rule3_a_resumed_run_is_the_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    unfinished_run(&out);
    let config_before = std::fs::read(out.join("config.toml")).unwrap();
    // A training setting changed: refused, naming the key and both values.
    let o = run(smoke(&out, &["--resume", "--set", "train.lr=0.5"]));
    assert_refused(
        &o,
        &["train.lr", "0.001 -> 0.5", "--allow-config-change train.lr"],
    );
    let o = run(smoke(
        &out,
        &[
            "--resume",
            "--set",
            "train.seed=7",
            "--set",
            "loss.beta=0.2",
        ],
    ));
    assert_refused(&o, &["train.seed", "loss.beta"]);
    assert_eq!(
        std::fs::read(out.join("config.toml")).unwrap(),
        config_before
    );
    // Explicitly accepted: runs, and the change is recorded.
    let o = run(smoke(
        &out,
        &[
            "--resume",
            "--set",
            "train.lr=0.002",
            "--set",
            "train.log_every=2",
            "--allow-config-change",
            "train.lr",
        ],
    ));
    assert_ok(&o);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("kto-train-run.json")).unwrap()).unwrap();
    let changes = manifest["config_changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{manifest}");
    assert_eq!(changes[0]["key"], "train.lr");
    assert_eq!(changes[0]["to"], "0.002");
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(config.contains("lr = 0.002"), "{config}");

    // What cannot change the result needs no permission.
    let out = tmp.path().join("cadence");
    unfinished_run(&out);
    assert_ok(&run(smoke(
        &out,
        &[
            "--resume",
            "--set",
            "train.log_every=3",
            "--set",
            "train.eval_every=1",
        ],
    )));
}

// ---------------------------------------------------------------- rule 4

#[test]
fn rule4_non_finite_is_failure() {
    let tmp = tempfile::tempdir().unwrap();
    // Every step non-finite: no finite update, so no adapter and a non-zero exit.
    let out = tmp.path().join("all-nan");
    let mut c = smoke(&out, &["--set", "train.max_consecutive_nonfinite=100"]);
    c.env("KTO_TRAIN_FAULT_NONFINITE_STEPS", "0,1,2,3");
    let o = run(c);
    assert_eq!(o.status.code(), Some(3), "{}", err(&o));
    assert!(
        err(&o).contains("none of the 4 steps made a finite update"),
        "{}",
        err(&o)
    );
    assert!(!out.join("adapter").exists());

    // A diverging run (lr 1e30: the first update makes the weights overflow): its NaN validation
    // loss is never "best", and it does not end as a success.
    let out = tmp.path().join("diverged");
    let o = run(smoke(
        &out,
        &[
            "--set",
            "train.lr=1e30",
            "--set",
            "train.eval_every=1",
            "--set",
            "train.max_consecutive_nonfinite=100",
        ],
    ));
    assert_eq!(o.status.code(), Some(3), "{}", err(&o));
    assert!(!out.join("adapter").exists());
    for line in std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v.get("eval").is_some()
            && !v["metrics"]["eval_loss"]
                .as_f64()
                .is_some_and(f64::is_finite)
        {
            assert!(
                !out.join("best").exists(),
                "best/ chosen by a non-finite eval_loss"
            );
        }
    }
    // Resuming after a non-finite stop cannot finish with diverged weights either.
    let out = tmp.path().join("stopped");
    let o = run(smoke(
        &out,
        &[
            "--set",
            "train.lr=1e30",
            "--set",
            "train.max_consecutive_nonfinite=2",
        ],
    ));
    assert_eq!(o.status.code(), Some(3), "{}", err(&o));
    let o = run(smoke(
        &out,
        &[
            "--resume",
            "--set",
            "train.lr=1e30",
            "--set",
            "train.max_consecutive_nonfinite=100",
        ],
    ));
    assert_ne!(o.status.code(), Some(0), "{}", err(&o));
    assert!(!out.join("adapter").exists());

    // Benchmark scores are never computed from non-finite log-likelihoods.
    let adapter = tmp.path().join("huge-adapter");
    huge_adapter(&adapter);
    let o = run(kto(&[
        "eval",
        "--model",
        fixture("tiny-llama").to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--task",
        "truthfulqa_mc2",
        "--data",
        repo()
            .join("data/samples/eval/truthfulqa/data/mc_task.json")
            .to_str()
            .unwrap(),
        "--limit",
        "2",
        "--quiet",
    ]));
    assert_refused(&o, &["non-finite log-likelihoods"]);
}

/// The fixture adapter with lora_A and lora_B scaled by 1e30: finite values whose products
/// overflow f32 (the RMSNorms would rescale anything that stays finite).
fn huge_adapter(dir: &Path) {
    use kto_train::util::safetensors_io::{serialize_pt, tensor_from_view, RawTensor};
    std::fs::create_dir_all(dir).unwrap();
    let src = fixture("peft-adapter");
    std::fs::copy(
        src.join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, RawTensor)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let t = tensor_from_view(&v, &candle_core::Device::Cpu).unwrap();
            let t = (t * 1e30).unwrap();
            (
                n,
                RawTensor::from_tensor(&t, candle_core::DType::F32).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        serialize_pt(&tensors).unwrap(),
    )
    .unwrap();
}

// ---------------------------------------------------------------- rule 5

#[test]
fn rule5_inconsistent_inputs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // lora.init_from whose adapter disagrees with [lora].
    let adapter = fixture("peft-adapter");
    let init = format!("lora.init_from={}", adapter.display());
    let o = run(smoke(&out, &["--set", &init, "--set", "lora.r=16"]));
    assert_refused(&o, &["init_from", "r = 16 (adapter: 8)"]);
    // Matching settings continue it.
    assert_ok(&run(smoke(&out, &["--set", &init])));

    // A config.json that declares fewer layers than the weights hold.
    let model = tmp.path().join("one-layer");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("tiny-llama").join(f), model.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(fixture("tiny-llama/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["num_hidden_layers"] = 1.into();
    std::fs::write(model.join("config.json"), v.to_string()).unwrap();
    let set = format!("model.name_or_path={}", model.display());
    let o = run(smoke(&tmp.path().join("r2"), &["--set", &set]));
    assert_refused(&o, &["2 decoder layers", "num_hidden_layers = 1"]);

    // eval_batch_size = 1 with a KL loss would silently never evaluate.
    let o = run(smoke(
        &tmp.path().join("r3"),
        &["--set", "train.eval_batch_size=1"],
    ));
    assert_refused(&o, &["eval_batch_size = 1"]);

    // Token ids beyond the vocabulary: the file and line, not an index-select error.
    let input = tmp.path().join("ids.jsonl");
    std::fs::write(&input, "{\"prompt_ids\": [1, 2], \"completion_ids\": [3]}\n{\"prompt_ids\": [1], \"completion_ids\": [99999]}\n").unwrap();
    let o = run(kto(&[
        "score",
        "--model",
        fixture("tiny-llama").to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]));
    assert_refused(&o, &["ids.jsonl:2", "99999", "49152"]);
    // (score, eval and merge accepting and refusing the same adapter files: tests/peft_format.rs)
}

// ---------------------------------------------------------------- rule 6

#[test]
fn rule6_corrupt_parquet_costs_bounded_memory_and_names_the_file() {
    use rand::{Rng, SeedableRng};
    let tmp = tempfile::tempdir().unwrap();
    let src = std::fs::read(repo().join("tests/data/oasst1-first3trees.parquet")).unwrap();
    let footer = u32::from_le_bytes(src[src.len() - 8..src.len() - 4].try_into().unwrap()) as usize;
    let data_end = src.len() - 8 - footer;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
    let (mut refused, mut read) = (0, 0);
    for k in 0..24 {
        let mut bytes = src.clone();
        // Pages only: the footer stays intact, as in a file cut or damaged in its data.
        for _ in 0..[1, 4, 16, 64][k % 4] {
            let p = rng.random_range(4..data_end);
            bytes[p] = rng.random();
        }
        let file = tmp.path().join(format!("c{k}.parquet"));
        std::fs::write(&file, &bytes).unwrap();
        let cfg = tmp.path().join(format!("c{k}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[model]\nname_or_path = \"{}\"\n[data]\n[[data.sources]]\nkind = \"oasst\"\nfiles = [\"{}\"]\n",
                fixture("tiny-llama").display(),
                file.display()
            ),
        )
        .unwrap();
        // 2 GB of address space and 60 s: a decoder that grows without bound hits either.
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -v 2000000; exec timeout 60 {} data --config {}",
                env!("CARGO_BIN_EXE_kto-train"),
                cfg.display()
            ))
            .output()
            .unwrap();
        let e = err(&o);
        match o.status.code() {
            Some(0) => read += 1,
            Some(1) => {
                refused += 1;
                let named =
                    e.contains(&format!("c{k}.parquet")) || e.contains("no training example");
                assert!(named, "variant {k}: the error does not name the file:\n{e}");
            }
            c => panic!("variant {k}: exit {c:?} (a panic, a timeout or out of memory):\n{e}"),
        }
    }
    assert!(
        refused > 0,
        "no variant was corrupt enough to test anything ({read} read)"
    );
}

// ---------------------------------------------------------------- rule 7

#[test]
fn rule7_no_command_overwrites_what_it_did_not_create() {
    let tmp = tempfile::tempdir().unwrap();
    // init-tiny into an existing model folder.
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("model.safetensors"), "precious").unwrap();
    let o = run(kto(&["init-tiny", "--out", model.to_str().unwrap()]));
    assert_refused(&o, &["not empty"]);
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        b"precious"
    );

    // output.dir = "." next to a config named config.toml, and output.dir = "".
    let d = tmp.path().join("project");
    std::fs::create_dir_all(&d).unwrap();
    let smoke_text = std::fs::read_to_string(repo().join("configs/smoke.toml")).unwrap();
    let text = smoke_text
        .replace("\"../", &format!("\"{}/", repo().display()))
        .replace(
            &format!("dir = \"{}/runs/smoke\"", repo().display()),
            "dir = \".\"",
        );
    assert!(text.contains("dir = \".\""));
    let cfg = d.join("config.toml");
    std::fs::write(&cfg, &text).unwrap();
    let o = run(kto(&["--config", cfg.to_str().unwrap(), "--quiet"]));
    assert_refused(&o, &["folder of the config file"]);
    assert_eq!(
        std::fs::read_to_string(&cfg).unwrap(),
        text,
        "the user's config was replaced"
    );
    std::fs::write(&cfg, text.replace("dir = \".\"", "dir = \"\"")).unwrap();
    let o = run(kto(&["--config", cfg.to_str().unwrap(), "--quiet"]));
    assert_refused(&o, &["output"]);
    // A --set that lost its quotes or its value in the shell.
    for bad in ["output.dir=", "output.dir=\"runs/x", "output.dir='runs/x"] {
        let o = run(kto(&[
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            bad,
            "--quiet",
        ]));
        assert_refused(&o, &["--set"]);
    }
    let names: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["config.toml"], "a refused run left files behind");
}

// ---------------------------------------------------------------- rule 8

#[test]
fn rule8_a_run_is_finished_only_when_everything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let bench = format!(
        "eval.benchmarks=[{{task = \"truthfulqa_mc2\", data = \"{}\", limit = 2}}]",
        repo()
            .join("data/samples/eval/truthfulqa/data/mc_task.json")
            .display()
    );
    let reference = tmp.path().join("reference");
    assert_ok(&run(smoke(&reference, &["--set", &bench])));
    // Killed during the final writes (adapter written, scores and card not yet): not finished,
    // and --resume completes it to the same files.
    let out = tmp.path().join("killed");
    let mut child = smoke(&out, &["--set", &bench])
        .env("KTO_TRAIN_FAULT_FINISH_PAUSE_MS", "5000")
        .spawn()
        .unwrap();
    wait_for(&mut child, "the adapter", || {
        out.join("adapter/adapter_model.safetensors").is_file()
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let manifest = std::fs::read_to_string(out.join("kto-train-run.json")).unwrap();
    assert!(manifest.contains("\"finished\": false"), "{manifest}");
    assert_ok(&run(smoke(&out, &["--set", &bench, "--resume"])));
    for f in [
        "adapter/adapter_model.safetensors",
        "eval_results.json",
        "best/adapter_model.safetensors",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(reference.join(f)).unwrap(),
            "{f}"
        );
    }
    assert!(out.join("adapter/README.md").is_file());

    // A benchmark file that does not exist is found before training, not after it.
    let missing = "eval.benchmarks=[{task = \"hellaswag\", data = \"/no/such/hellaswag.jsonl\"}]";
    let out = tmp.path().join("missing-bench");
    let o = run(smoke(&out, &["--set", missing]));
    assert_refused(&o, &["/no/such/hellaswag.jsonl"]);
    assert!(
        !out.join("metrics.jsonl").exists(),
        "training ran before the check"
    );

    // A reference cache that cannot be written does not stop a run.
    let blocker = tmp.path().join("a-file");
    std::fs::write(&blocker, "x").unwrap();
    let cache = format!("train.reference_cache={}", blocker.join("cache").display());
    let out = tmp.path().join("no-cache");
    let o = run(smoke(&out, &["--set", &cache]));
    assert_ok(&o);
    assert!(err(&o).contains("reference cache"), "{}", err(&o));
}

// ---------------------------------------------------------------- rule 9

#[test]
fn rule9_errors_name_the_key_and_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo().join("configs/smoke.toml")).unwrap();
    let cfg = tmp.path().join("typed.toml");
    std::fs::write(&cfg, text.replace("lr = 1e-3", "lr = \"fast\"")).unwrap();
    let line = 1 + text[..text.find("lr = 1e-3").unwrap()]
        .matches('\n')
        .count();
    let o = run(kto(&["--config", cfg.to_str().unwrap()]));
    assert_refused(
        &o,
        &[&format!("typed.toml:{line}"), "train.lr", "expected f64"],
    );
    // A range error names the line too; a --set names itself.
    std::fs::write(&cfg, text.replace("lr = 1e-3", "lr = -1.0")).unwrap();
    let o = run(kto(&["--config", cfg.to_str().unwrap()]));
    assert_refused(&o, &[&format!("typed.toml:{line}"), "lr = -1"]);
    let o = run(kto(&[
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "train.seed=\"x\"",
    ]));
    assert_refused(&o, &["--set train.seed=\"x\""]);

    // A symlink loop is not "does not exist".
    let lp = tmp.path().join("loop");
    std::os::unix::fs::symlink(&lp, &lp).unwrap();
    let o = run(smoke(
        &tmp.path().join("r"),
        &["--set", &format!("model.name_or_path={}", lp.display())],
    ));
    assert_refused(&o, &["symbolic links"]);
    assert!(!err(&o).contains("does not exist"), "{}", err(&o));
}

// ------------------------------------------------------- checkpoints a user can use (TRL-style)

fn adapter_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

#[test]
fn checkpoints_hold_a_peft_adapter_with_the_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    assert_ok(&run(smoke(&out, &["--set", "train.keep_checkpoints=10"])));
    let cks = kto_train::train::checkpoint::list(&out.join("checkpoints")).unwrap();
    assert_eq!(cks.len(), 4);
    for (step, dir) in &cks {
        let a = dir.join("adapter");
        for f in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "tokenizer.json",
        ] {
            assert!(a.join(f).is_file(), "step {step}: {f} missing");
        }
        // The adapter is the checkpoint's LoRA weights in PEFT's layout: it loads as one.
        let (spec, _) = kto_train::model::adapter::read_adapter_spec(&a).unwrap();
        assert_eq!(spec.r, 8);
        let ck = kto_train::train::checkpoint::load(dir, &candle_core::Device::Cpu).unwrap();
        let w = kto_train::model::adapter::read_adapter_weights(&a, &spec).unwrap();
        assert_eq!(
            2 * w.len(),
            ck.lora.len(),
            "an A and a B per adapted projection"
        );
    }
    // The last checkpoint's adapter is the run's final adapter, byte for byte, and the final
    // adapter has the tokenizer beside it.
    let last = &cks.last().unwrap().1;
    assert_eq!(
        adapter_bytes(&last.join("adapter")),
        adapter_bytes(&out.join("adapter"))
    );
    assert_eq!(
        std::fs::read(out.join("adapter/tokenizer.json")).unwrap(),
        std::fs::read(repo().join("tests/fixtures/tiny-llama/tokenizer.json")).unwrap()
    );
}

#[test]
fn resume_from_a_chosen_checkpoint_and_extend_a_finished_run() {
    let tmp = tempfile::tempdir().unwrap();
    let constant = [
        "--set",
        "train.lr_schedule=constant",
        "--set",
        "train.keep_checkpoints=10",
    ];
    // Reference: 4 steps straight.
    let straight = tmp.path().join("straight");
    assert_ok(&run(smoke(&straight, &constant)));
    // The same run, finished, then resumed from its step-2 checkpoint: the same adapter.
    let rewound = tmp.path().join("rewound");
    assert_ok(&run(smoke(&rewound, &constant)));
    let step2 = kto_train::train::checkpoint::list(&rewound.join("checkpoints")).unwrap()[1]
        .1
        .clone();
    let mut args: Vec<&str> = constant.to_vec();
    let from = step2.display().to_string();
    args.extend(["--resume-from", &from]);
    assert_ok(&run(smoke(&rewound, &args)));
    assert_eq!(
        adapter_bytes(&rewound.join("adapter")),
        adapter_bytes(&straight.join("adapter"))
    );
    assert_eq!(
        kto_train::train::checkpoint::list(&rewound.join("checkpoints"))
            .unwrap()
            .len(),
        4
    );
    // A finished 2-step run extended to 4 steps (constant lr: the schedule does not depend on
    // the total) ends where the straight run does.
    let extended = tmp.path().join("extended");
    let mut two: Vec<&str> = constant.to_vec();
    two.extend(["--set", "train.max_steps=2"]);
    assert_ok(&run(smoke(&extended, &two)));
    // --resume with the same config: nothing to do, the adapter stays as it is.
    let before = adapter_bytes(&extended.join("adapter"));
    let mut again = two.clone();
    again.push("--resume");
    let o = run(smoke(&extended, &again));
    assert_ok(&o);
    assert_eq!(adapter_bytes(&extended.join("adapter")), before);
    assert_ne!(
        before,
        adapter_bytes(&straight.join("adapter")),
        "2 steps are not 4"
    );
    let mut more: Vec<&str> = constant.to_vec();
    more.push("--resume");
    let o = run(smoke(&extended, &more));
    assert_ok(&o);
    assert!(
        err(&o).contains("extending the finished run"),
        "{}",
        err(&o)
    );
    assert_eq!(
        adapter_bytes(&extended.join("adapter")),
        adapter_bytes(&straight.join("adapter"))
    );
    // A path that is not one of the run's checkpoints is refused by name.
    let o = run(smoke(&extended, &["--resume-from", "/no/such/checkpoint"]));
    assert_refused(
        &o,
        &[
            "--resume-from /no/such/checkpoint",
            "not a checkpoint of the run",
        ],
    );
}

#[test]
fn early_stopping_ends_the_run_with_its_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // A learning rate far too high: the validation loss stops improving at once.
    assert_ok(&run(smoke(
        &out,
        &[
            "--set",
            "train.max_steps=20",
            "--set",
            "train.eval_every=1",
            "--set",
            "train.lr=0.5",
            "--set",
            "train.early_stopping_patience=2",
        ],
    )));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let evals: Vec<f64> = lines
        .iter()
        .filter(|v| v.get("eval").is_some())
        .map(|v| v["metrics"]["eval_loss"].as_f64().unwrap())
        .collect();
    let last_step = lines.last().unwrap()["step"].as_u64().unwrap();
    assert!(last_step < 20, "stopped early: {evals:?}");
    // It stopped exactly when the last two evaluations were no better than the best before them.
    let n = evals.len();
    let best_before = evals[..n - 2].iter().cloned().fold(f64::INFINITY, f64::min);
    assert!(
        evals[n - 2] >= best_before && evals[n - 1] >= best_before,
        "{evals:?}"
    );
    assert!(out.join("adapter/adapter_model.safetensors").is_file());
}

/// A checkpoint's adapter folder loads in Python PEFT onto the base and gives our logits, when a
/// Python with torch, transformers and peft is at hand (`KTO_TRAIN_TEST_PYTHON`); skipped with a
/// notice otherwise.
#[test]
fn a_checkpoint_adapter_loads_in_peft() {
    let Ok(python) = std::env::var("KTO_TRAIN_TEST_PYTHON") else {
        eprintln!(
            "NOTE: KTO_TRAIN_TEST_PYTHON not set: PEFT loading of a checkpoint adapter not checked"
        );
        return;
    };
    let has_peft = std::process::Command::new(&python)
        .args(["-c", "import peft, transformers, torch"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_peft {
        eprintln!("NOTE: {python} has no peft/transformers/torch: PEFT loading not checked");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    assert_ok(&run(smoke(&out, &["--set", "train.max_steps=2"])));
    let ck = kto_train::train::checkpoint::list(&out.join("checkpoints")).unwrap()[0]
        .1
        .join("adapter");
    let ids: Vec<u32> = vec![504, 3575, 282, 4649, 314, 7042, 30];
    let script = "import sys, json, torch\n\
        from transformers import AutoModelForCausalLM\n\
        from peft import PeftModel\n\
        base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n\
        m = PeftModel.from_pretrained(base, sys.argv[2]).eval()\n\
        ids = torch.tensor([json.loads(sys.argv[3])])\n\
        with torch.no_grad(): print(json.dumps(m(ids).logits[0].tolist()))\n";
    let o = std::process::Command::new(&python)
        .args(["-c", script])
        .arg(repo().join("tests/fixtures/tiny-llama"))
        .arg(&ck)
        .arg(serde_json::to_string(&ids).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let peft: Vec<Vec<f64>> = serde_json::from_slice(&o.stdout).unwrap();
    let files =
        kto_train::hub::local_model_files(&repo().join("tests/fixtures/tiny-llama"), "tiny")
            .unwrap();
    let model = kto_train::model::load_with_adapter(
        &files,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        Some(&ck),
    )
    .unwrap();
    let x = candle_core::Tensor::from_vec(ids.clone(), (1, ids.len()), &candle_core::Device::Cpu)
        .unwrap();
    let h = model
        .hidden_states(&x, kto_train::model::PassMode::POLICY_EVAL)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let ours: Vec<Vec<f32>> = model.logits(&h).unwrap().to_vec2().unwrap();
    let worst = ours
        .iter()
        .flatten()
        .zip(peft.iter().flatten())
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-4, "PEFT vs kto-train logits: {worst}");
}
