//! Kills at random moments: whatever instant a run dies at (starting up, mid-step, mid-checkpoint,
//! mid-evaluation, while an old checkpoint is removed, during the final writes), the folder it
//! leaves either resumes to exactly the files of an uninterrupted run, or says why not; and no
//! kill leaves a folder that claims to be finished while it is wrong.
mod common;
use common::*;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills to reach in total, over at least this many sequences (each: kills until a run is left
/// to finish), and at most this many.
const MIN_KILLS: usize = 20;
const MIN_SEQUENCES: u64 = 5;
const MAX_SEQUENCES: u64 = 12;

fn cmd(out: &Path, resume: bool, env: &[(&str, String)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kto-train"));
    let bench = format!(
        "eval.benchmarks=[{{task = \"truthfulqa_mc2\", data = \"{}\", limit = 3}}]",
        repo()
            .join("data/samples/eval/truthfulqa/data/mc_task.json")
            .display()
    );
    c.arg("--config")
        .arg(repo().join("configs/smoke.toml"))
        .args(["--set", &format!("output.dir={}", out.display())])
        .args(["--set", "train.max_steps=6", "--set", "train.save_every=1"])
        // LoRA dropout on (TRL's disable_dropout off): a resume must redraw the same masks.
        .args(["--set", "train.disable_dropout=false"])
        .args([
            "--set",
            "train.eval_every=2",
            "--set",
            "train.max_length=64",
        ])
        .args(["--set", &bench, "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if resume {
        c.arg("--resume");
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// What an uninterrupted run leaves, compared file by file. In the model card the run folder's
/// name and path are replaced by placeholders, and its one line of wall time and tokens/s (which
/// no two runs share) is left out.
fn outputs(out: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = vec![
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "best/adapter_model.safetensors",
        "best/adapter_config.json",
        "eval_results.json",
    ]
    .into_iter()
    .map(|f| {
        (
            f.to_string(),
            std::fs::read(out.join(f)).unwrap_or_default(),
        )
    })
    .collect::<Vec<_>>();
    let card = std::fs::read_to_string(out.join("adapter/README.md")).unwrap_or_default();
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    let card: String = card
        .replace(&out.display().to_string(), "RUN_DIR")
        .lines()
        .filter(|l| !l.starts_with("At the last training log:"))
        .map(|l| format!("{}\n", l.replace(&format!("# {name}: "), "# RUN_NAME: ")))
        .collect();
    files.push(("adapter/README.md".into(), card.into_bytes()));
    files
}

fn finished(out: &Path) -> bool {
    std::fs::read_to_string(out.join("kto-train-run.json"))
        .is_ok_and(|m| m.contains("\"finished\": true"))
}

/// Every checkpoint folder that exists is complete.
fn checkpoints_complete(out: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(out.join("checkpoints")) else {
        return true;
    };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("step-"))
        .all(|e| kto_train::train::checkpoint::load(&e.path(), &candle_core::Device::Cpu).is_ok())
}

/// One way to pick the instant of a kill.
enum Moment {
    /// After a random delay.
    After(Duration),
    /// While a checkpoint is being written (its temporary folder exists).
    InCheckpoint,
    /// During the final writes: the adapter exists, the finished mark does not.
    InFinish,
    /// While an old checkpoint is being removed (it has been moved aside, its files not yet gone).
    InRemoval,
}

/// Waits for `moment` (or the run's end) and kills the run; returns whether it was killed.
fn kill_at(child: &mut Child, out: &Path, moment: &Moment) -> bool {
    let t = Instant::now();
    let reached = || match moment {
        Moment::After(d) => t.elapsed() >= *d,
        Moment::InCheckpoint => std::fs::read_dir(out.join("checkpoints")).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-step-"))
        }),
        Moment::InFinish => out.join("adapter/adapter_model.safetensors").is_file(),
        Moment::InRemoval => std::fs::read_dir(out.join("checkpoints")).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".removing-"))
        }),
    };
    while !reached() {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        assert!(t.elapsed() < Duration::from_secs(180), "run hung");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    true
}

#[test]
fn killed_at_random_moments_runs_resume_to_the_uninterrupted_files() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("reference");
    let t0 = Instant::now();
    let o = cmd(&reference, false, &[]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let duration = t0.elapsed();
    let want = outputs(&reference);
    assert!(
        want.iter().all(|(_, b)| !b.is_empty()),
        "the reference run lacks a file"
    );

    let mut kills = 0;
    let mut log = Vec::new();
    for seq in 0..MAX_SEQUENCES {
        if seq >= MIN_SEQUENCES && kills >= MIN_KILLS {
            break;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seq);
        let out: PathBuf = tmp.path().join(format!("seq-{seq}"));
        let mut attempt = 0;
        loop {
            attempt += 1;
            assert!(attempt < 30, "sequence {seq} never finished");
            // Up to five kills per sequence, then one run left alone to finish.
            let moment = (attempt <= 5).then(|| match rng.random_range(0..5) {
                0 => Moment::InCheckpoint,
                1 => Moment::InFinish,
                2 => Moment::InRemoval,
                _ => Moment::After(duration.mul_f64(rng.random_range(0.05..0.95))),
            });
            let env = match &moment {
                Some(Moment::InCheckpoint) => {
                    vec![("KTO_TRAIN_FAULT_CHECKPOINT_PAUSE_MS", "300".to_string())]
                }
                Some(Moment::InRemoval) => {
                    vec![("KTO_TRAIN_FAULT_REMOVE_PAUSE_MS", "300".to_string())]
                }
                Some(Moment::InFinish) => {
                    vec![(
                        "KTO_TRAIN_FAULT_FINISH_PAUSE_MS",
                        rng.random_range(0..400).to_string(),
                    )]
                }
                _ => vec![],
            };
            let mut child = cmd(&out, attempt > 1, &env).spawn().unwrap();
            let killed = match &moment {
                Some(m) => kill_at(&mut child, &out, m),
                None => false,
            };
            if killed {
                kills += 1;
                let what = match &moment {
                    Some(Moment::After(d)) => format!("after {:.2} s", d.as_secs_f64()),
                    Some(Moment::InCheckpoint) => "during a checkpoint write".into(),
                    Some(Moment::InRemoval) => "while an old checkpoint was removed".into(),
                    _ => "during the final writes".into(),
                };
                log.push(format!("seq {seq} attempt {attempt}: killed {what}"));
                // A folder that says it is finished must be right; checkpoints are never torn.
                if finished(&out) {
                    assert_eq!(
                        outputs(&out),
                        want,
                        "seq {seq}: finished but wrong after a kill"
                    );
                }
                assert!(
                    checkpoints_complete(&out),
                    "seq {seq}: a torn checkpoint\n{}",
                    log.join("\n")
                );
                continue;
            }
            let o = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "seq {seq} attempt {attempt}: {err}");
            log.push(format!("seq {seq} attempt {attempt}: finished"));
            break;
        }
        assert!(finished(&out));
        let got = outputs(&out);
        for ((name, a), (_, b)) in got.iter().zip(&want) {
            assert!(
                a == b,
                "seq {seq}: {name} differs from the uninterrupted run\n{}",
                log.join("\n")
            );
        }
    }
    eprintln!("{kills} kills:\n{}", log.join("\n"));
    assert!(kills >= MIN_KILLS, "only {kills} kills landed");
}
