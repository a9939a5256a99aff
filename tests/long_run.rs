//! Long-run operations on the smoke config: kills at any moment (SIGKILL, also during a
//! checkpoint write), SIGINT, resume to byte-identical adapters, live metrics, plots, model card,
//! and the non-finite guard.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const STEPS: usize = 8;

fn cmd(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kto-train"));
    c.arg("--config")
        .arg(repo().join("configs/smoke.toml"))
        .args(["--set", &format!("output.dir={}", out.display())])
        .args(["--set", &format!("train.max_steps={STEPS}")])
        .args([
            "--set",
            "train.save_every=1",
            "--set",
            "train.eval_every=4",
            "--quiet",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn run(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    cmd(out, extra, env).output().unwrap()
}

fn adapter(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap()
}

/// Every complete line of metrics.jsonl (read while the run may be writing the next one).
fn train_lines(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| serde_json::from_str(l).expect("every complete metrics line parses"))
        .collect()
}

fn wait_until(child: &mut Child, what: &str, cond: impl Fn() -> bool) {
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

/// Every checkpoint folder is complete (never half-written).
fn assert_checkpoints_complete(out: &Path) {
    for e in std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("step-") {
            let ck = kto_train::train::checkpoint::load(&e.path(), &candle_core::Device::Cpu);
            assert!(ck.is_ok(), "{name} is not a complete checkpoint");
        }
    }
}

fn reference_run(tmp: &Path) -> (PathBuf, Vec<u8>) {
    let out = tmp.join("reference");
    let o = run(&out, &[], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = adapter(&out);
    (out, bytes)
}

#[test]
fn killed_runs_resume_to_identical_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let (reference, want) = reference_run(tmp.path());

    // Kill (SIGKILL) at several points: while step 2 is in progress, during a checkpoint write,
    // and late in the run.
    for (i, point) in ["after_step_2", "during_checkpoint", "after_step_6"]
        .iter()
        .enumerate()
    {
        let out = tmp.path().join(format!("killed-{i}"));
        let env: &[(&str, &str)] = if *point == "during_checkpoint" {
            &[("KTO_TRAIN_FAULT_CHECKPOINT_PAUSE_MS", "400")]
        } else {
            &[]
        };
        let mut child = cmd(&out, &[], env).spawn().unwrap();
        match *point {
            "after_step_2" => wait_until(&mut child, "step 2", || train_lines(&out).len() >= 2),
            "after_step_6" => wait_until(&mut child, "step 6", || {
                train_lines(&out)
                    .iter()
                    .filter(|l| l.get("eval").is_none())
                    .count()
                    >= 6
            }),
            // A checkpoint write after earlier checkpoints exist, so resume has one to use.
            _ => wait_until(&mut child, "a checkpoint write", || {
                train_lines(&out).len() >= 3
                    && std::fs::read_dir(out.join("checkpoints")).is_ok_and(|rd| {
                        rd.flatten()
                            .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-step-"))
                    })
            }),
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!out.join("adapter").exists());
        assert_checkpoints_complete(&out);
        let o = run(&out, &["--resume"], &[]);
        assert!(
            o.status.success(),
            "{point}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            adapter(&out),
            want,
            "{point}: resumed adapter differs from the uninterrupted run"
        );
        // The metrics log of the resumed run has each step exactly once.
        let steps: Vec<u64> = train_lines(&out)
            .iter()
            .filter(|l| l.get("eval").is_none())
            .map(|l| l["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, (1..=STEPS as u64).collect::<Vec<_>>(), "{point}");
    }

    // Run outputs: valid PNG plots and a model card with the run's real numbers.
    for p in ["loss.png", "rewards.png", "kl.png", "learning_rate.png"] {
        let bytes = std::fs::read(reference.join("plots").join(p)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{p}");
    }
    let card = std::fs::read_to_string(reference.join("adapter/README.md")).unwrap();
    let last = train_lines(&reference)
        .into_iter()
        .rfind(|l| l.get("eval").is_none())
        .unwrap();
    let loss = last["metrics"]["loss"].as_f64().unwrap();
    assert!(
        card.contains(&kto_train::report::format_value(loss)),
        "card lacks the final loss {loss}"
    );
    assert!(card.contains("PeftModel"));
}

#[test]
fn sigint_finishes_the_step_checkpoints_and_exits_nonzero() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, want) = reference_run(tmp.path());
    let out = tmp.path().join("interrupted");
    let mut child = cmd(&out, &[], &[]).spawn().unwrap();
    wait_until(&mut child, "step 3", || train_lines(&out).len() >= 3);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted by SIGINT") && err.contains("--resume"),
        "{err}"
    );
    let steps = kto_train::train::checkpoint::list(&out.join("checkpoints")).unwrap();
    let (last_step, _) = steps.last().expect("a checkpoint was written");
    let logged = train_lines(&out)
        .iter()
        .filter(|l| l.get("eval").is_none())
        .count();
    assert_eq!(
        *last_step, logged,
        "the checkpoint is at the last finished step"
    );
    assert!(*last_step < STEPS);
    let o = run(&out, &["--resume"], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(adapter(&out), want);
}

#[test]
fn nonfinite_steps_are_skipped_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nan");
    let o = run(&out, &[], &[("KTO_TRAIN_FAULT_NONFINITE_STEPS", "2")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("non-finite") && err.contains("update skipped"),
        "{err}"
    );
    let last = train_lines(&out)
        .into_iter()
        .rfind(|l| l.get("eval").is_none())
        .unwrap();
    assert_eq!(last["skipped_nonfinite"].as_u64(), Some(1));
    assert_eq!(last["step"].as_u64(), Some(STEPS as u64));

    // Too many in a row: stop with a checkpoint and exit code 3.
    let out = tmp.path().join("nan-stop");
    let o = run(
        &out,
        &["--set", "train.max_consecutive_nonfinite=2"],
        &[("KTO_TRAIN_FAULT_NONFINITE_STEPS", "3,4")],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("2 consecutive steps"), "{err}");
    assert!(
        !kto_train::train::checkpoint::list(&out.join("checkpoints"))
            .unwrap()
            .is_empty()
    );
}
