//! Several processes as one run (src/dist): `mpirun -n 2` against one process with the same
//! global batch, a rank killed mid-run, SIGINT to mpirun, resuming with 1 or 2 ranks.
//!
//! Needs a kto-train built with the `mpi` feature and Open MPI's `mpirun` (.ci/run: `cargo test
//! --release --features mpi --test distributed`); otherwise the tests say so and pass.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn kto() -> &'static str {
    env!("CARGO_BIN_EXE_kto-train")
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One mpirun job at a time: the jobs of parallel tests would share the 2 cores' slots, and a
/// rank looked up by its environment must be this test's.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn mpi_ready() -> bool {
    let v = Command::new(kto()).arg("--version").output().unwrap();
    if !String::from_utf8_lossy(&v.stdout).contains("mpi on") {
        eprintln!("NOTICE: kto-train was built without the mpi feature; the multi-process tests are skipped");
        return false;
    }
    if Command::new("mpirun").arg("--version").output().is_err() {
        eprintln!("NOTICE: no mpirun; the multi-process tests are skipped");
        return false;
    }
    true
}

/// The smoke config (tiny model, shipped samples) at `per_rank` examples per rank, in f64 so
/// that the reduction order of a sum cannot hide a wrong one.
fn args(out: &Path, per_rank: usize, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--config".into(),
        repo().join("configs/smoke.toml").display().to_string(),
    ];
    let sets = [
        format!("train.batch_size={per_rank}"),
        "train.dtype=\"f64\"".into(),
        format!("output.dir=\"{}\"", out.display()),
    ];
    for s in sets.iter().map(String::as_str).chain(extra.iter().copied()) {
        a.push("--set".into());
        a.push(s.into());
    }
    a.push("--quiet".into());
    a
}

fn mpirun(n: usize) -> Command {
    mpirun_with(n, &[])
}

/// mpirun with options of its own (before the program).
fn mpirun_with(n: usize, options: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(options)
        .args([
            "--oversubscribe",
            "-n",
            &n.to_string(),
            "-x",
            "RAYON_NUM_THREADS=1",
        ])
        // Open MPI refuses to start as root without these (CI runs as root).
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .arg(kto());
    c
}

fn ok(mut c: Command, what: &str) {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tensors(p: &Path) -> Vec<(String, Vec<f64>)> {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f64>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let v = match t.dtype() {
                safetensors::Dtype::F32 => t
                    .data()
                    .chunks(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::F64 => t
                    .data()
                    .chunks(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                d => panic!("{name}: {d:?}"),
            };
            (name, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Largest |a - b| over a tensor, relative to the tensor's largest |a|.
fn assert_same_tensors(a: &Path, b: &Path, tol: f64) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.len(), tb.len());
    for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        let scale = va.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
        let worst = va
            .iter()
            .zip(vb)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            worst <= tol * scale,
            "{na}: differs by {worst} (scale {scale})"
        );
    }
}

fn lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn two_ranks_train_what_one_process_trains_with_the_global_batch() {
    let _one_job = serial();
    if !mpi_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    // Enhanced KTO with the BCO shift from the first step: z and the BCO baseline must come out
    // of the whole global micro-batch on both ranks.
    let extra = [
        "loss.loss_type=\"enhanced_kto\"",
        "loss.bco_shift=true",
        "loss.bco_start_step=0",
        "loss.bco_ramp_steps=0",
        "train.save_every=1",
        "train.keep_checkpoints=100",
        "train.log_every=1",
    ];
    let mut c = Command::new(kto());
    c.args(args(&one, 4, &extra));
    ok(c, "one process, batch 4");
    let before = scratch_folders();
    let mut c = mpirun(2);
    c.args(args(&two, 2, &extra));
    ok(c, "mpirun -n 2, batch 2 per rank");
    assert_same_tensors(
        &one.join("adapter/adapter_model.safetensors"),
        &two.join("adapter/adapter_model.safetensors"),
        1e-5,
    );
    // Every logged and evaluated value (loss, kl = z, rewards, logps, eval_*): the same.
    let (m1, m2) = (
        lines(&one.join("metrics.jsonl")),
        lines(&two.join("metrics.jsonl")),
    );
    assert_eq!(m1.len(), m2.len(), "metrics lines");
    let mut compared = 0;
    for (a, b) in m1.iter().zip(&m2) {
        let (ma, mb) = (
            a["metrics"].as_object().unwrap(),
            b["metrics"].as_object().unwrap(),
        );
        for (k, va) in ma {
            if k.contains("per_second") || k.contains("elapsed") {
                continue;
            }
            let (Some(x), Some(y)) = (va.as_f64(), mb.get(k).and_then(|v| v.as_f64())) else {
                panic!("metric {k} missing in the 2-rank run at {a}");
            };
            assert!(
                (x - y).abs() <= 1e-6 * x.abs().max(1e-3),
                "{k} at step {}: {x} vs {y}",
                a["step"]
            );
            compared += 1;
        }
    }
    assert!(compared > 50, "only {compared} metric values compared");
    // The benchmark scores (each rank scored half of the continuations).
    let results = |root: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(root.join("eval_results.json")).unwrap())
            .unwrap()
    };
    let (r1, r2) = (results(&one), results(&two));
    let (r1, r2) = (
        r1["results"].as_array().unwrap(),
        r2["results"].as_array().unwrap(),
    );
    assert!(!r1.is_empty() && r1.len() == r2.len(), "benchmark rows");
    for (a, b) in r1.iter().zip(r2) {
        let (x, y) = (a["value"].as_f64().unwrap(), b["value"].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-9, "{}: {x} vs {y}", a["task"]);
    }
    // The BCO baseline in every step's checkpoint.
    for step in 1..=6 {
        let state = |root: &Path| -> serde_json::Value {
            let p = root.join(format!("checkpoints/step-{step:08}/state.json"));
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
        };
        let (s1, s2) = (state(&one), state(&two));
        assert_eq!(s1["loss_state"]["n"], s2["loss_state"]["n"], "step {step}");
        let (mu1, mu2) = (
            s1["loss_state"]["mu"].as_f64().unwrap(),
            s2["loss_state"]["mu"].as_f64().unwrap(),
        );
        assert!(
            (mu1 - mu2).abs() <= 1e-9 * mu1.abs().max(1e-6),
            "BCO mu at step {step}: {mu1} vs {mu2}"
        );
        assert!(
            s1["loss_state"]["n"].as_u64().unwrap() > 0,
            "the BCO baseline took in rewards"
        );
    }
    // Only rank 0 wrote the run folder; rank 1's scratch folder is gone.
    assert_eq!(scratch_folders(), before, "rank 1 left its scratch folder");
}

/// The process of `rank` among the children of the mpirun `launcher`.
/// Scratch folders of ranks above 0 in the temp dir (a killed rank cannot remove its own).
fn scratch_folders() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("kto-train-rank"))
        .collect();
    v.sort();
    v
}

fn rank_pid(launcher: u32, rank: usize) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmd).starts_with(kto()) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...: the field after the command's closing parenthesis.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(launcher) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let want = format!("OMPI_COMM_WORLD_RANK={rank}");
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

fn wait_for(p: &Path, child: &mut Child) {
    let t0 = Instant::now();
    while !p.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before {}",
            p.display()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no {} after 120 s",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_killed_rank_ends_the_run_and_it_resumes_with_one_or_two_ranks() {
    let _one_job = serial();
    if !mpi_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let extra = [
        "train.max_steps=40",
        "train.save_every=3",
        "train.eval_every=0",
    ];
    let mut c = mpirun(2);
    c.args(args(&run, 2, &extra)).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    wait_for(&run.join("checkpoints/step-00000003"), &mut child);
    let pid = rank_pid(child.id(), 1).expect("rank 1's process");
    let survivor = rank_pid(child.id(), 0).expect("rank 0's process");
    let killed = Instant::now();
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let out = child.wait_with_output().unwrap();
    // Rank 0 itself is gone too (not left waiting for rank 1 in a collective).
    while Path::new(&format!("/proc/{survivor}")).exists()
        && killed.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = killed.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the run went on after a rank died");
    assert!(took < Duration::from_secs(60), "took {took:?} to end");
    assert!(
        stderr.contains("rank 1"),
        "the lost rank is not named: {stderr}"
    );
    // Resume: with one process (the global batch halves) and, from a copy, with two.
    let copy = tmp.path().join("copy");
    ok(
        {
            let mut c = Command::new("cp");
            c.arg("-r").arg(&run).arg(&copy);
            c
        },
        "copy",
    );
    let mut c = Command::new(kto());
    c.args(args(&run, 2, &extra)).arg("--resume");
    ok(c, "resume with one process");
    assert!(run.join("adapter/adapter_model.safetensors").exists());
    let mut c = mpirun(2);
    c.args(args(&copy, 2, &extra)).arg("--resume");
    ok(c, "resume with two ranks");
    assert!(copy.join("adapter/adapter_model.safetensors").exists());
    assert_eq!(
        lines(&copy.join("metrics.jsonl")).last().unwrap()["step"],
        40
    );
}

#[test]
fn sigint_to_mpirun_checkpoints_once_and_the_resumed_run_is_the_uninterrupted_one() {
    let _one_job = serial();
    if !mpi_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (whole, cut) = (tmp.path().join("whole"), tmp.path().join("cut"));
    let extra = [
        "train.max_steps=30",
        "train.save_every=10",
        "train.eval_every=0",
    ];
    // Steps of over half a second: too long for Open MPI's default grace (mpirun kills the
    // ranks 1 s after passing a signal on), so rank 0 says how to launch instead, once.
    let mut c = mpirun_with(2, &["-x", "KTO_TRAIN_FAULT_STEP_PAUSE_MS=500"]);
    c.args(args(&whole, 2, &extra));
    let out = c.output().unwrap();
    assert!(out.status.success(), "uninterrupted: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr
            .matches("`mpirun --mca odls_base_sigkill_timeout ")
            .count(),
        1,
        "{stderr}"
    );
    // With a grace that fits the step, a stop in the middle of a 2 s step (which the default
    // 1 s would cut short, losing the checkpoint) finishes the step and checkpoints. Open MPI
    // passes the SIGINT on as SIGTERM after the grace, so the run is still going then.
    let mut c = mpirun_with(
        2,
        &[
            "--mca",
            "odls_base_sigkill_timeout",
            "10",
            "-x",
            "KTO_TRAIN_FAULT_STEP_PAUSE_MS=1200",
        ],
    );
    c.args(args(&cut, 2, &extra)).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    wait_for(&cut.join("checkpoints/step-00000010"), &mut child);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // Rank 0 alone reports the stop and its checkpoint.
    assert_eq!(stderr.matches("interrupted by").count(), 1, "{stderr}");
    assert!(stderr.contains("rank 0 of 2"), "{stderr}");
    let checkpoints: Vec<_> = std::fs::read_dir(cut.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let stopped_at = checkpoints.iter().max().unwrap().clone();
    assert!(
        stopped_at.as_str() > "step-00000010",
        "no checkpoint after the signal: {checkpoints:?}"
    );
    let mut c = mpirun(2);
    c.args(args(&cut, 2, &extra)).arg("--resume");
    ok(c, "resume");
    let a = std::fs::read(whole.join("adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(cut.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        a == b,
        "the resumed adapter differs from the uninterrupted run's"
    );
}
