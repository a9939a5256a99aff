//! Checkpoints: everything a run needs to continue bit for bit. LoRA weights and AdamW moments in
//! one safetensors file, the rest (position, loss-head state, pooled metrics) in state.json.
//! A checkpoint is written into a temporary folder, fsynced, then renamed into place, so a crash
//! at any instant leaves the previous checkpoints intact and never a half-written one.
use crate::loss::LossState;
use crate::util::atomic::{sync_dir, write_atomic, write_json_atomic};
use crate::util::metric_sums::MetricSums;
use crate::util::safetensors_io::{serialize_pt, tensor_from_view, RawTensor};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the run stands after `step` optimizer steps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub step: usize,
    /// Epoch of the next optimizer step, and its group (of grad_accum micro-batches) in that epoch.
    pub epoch: u64,
    pub next_group: usize,
    pub loss_state: LossState,
    /// Metrics pooled since the last log line.
    pub interval: MetricSums,
    pub interval_tokens: usize,
    pub skipped_nonfinite: usize,
    pub consecutive_nonfinite: usize,
    pub best_eval_loss: Option<f64>,
    /// Evaluations in a row without a new best validation loss (early stopping).
    #[serde(default)]
    pub evals_since_best: usize,
    pub elapsed_seconds: f64,
    /// Optimizer steps taken by AdamW (differs from `step` when steps were skipped).
    pub adam_t: u64,
    /// Processes of the run that wrote it: `next_group` and `step` count global micro-batches
    /// of that many ranks.
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

impl TrainState {
    /// The state before the first step, with the loss head's initial state.
    pub(crate) fn fresh(loss_state: LossState) -> Self {
        Self {
            step: 0,
            epoch: 0,
            next_group: 0,
            loss_state,
            interval: MetricSums::new(),
            interval_tokens: 0,
            skipped_nonfinite: 0,
            consecutive_nonfinite: 0,
            best_eval_loss: None,
            evals_since_best: 0,
            elapsed_seconds: 0.0,
            adam_t: 0,
            world_size: 1,
        }
    }
}

pub struct Checkpoint {
    pub state: TrainState,
    pub lora: Vec<Tensor>,
    pub adam_m: Vec<Tensor>,
    pub adam_v: Vec<Tensor>,
    /// The files of a PEFT adapter folder (name, bytes) written into `adapter/` beside the state,
    /// so that an intermediate checkpoint can be scored, merged or uploaded as it is. Empty:
    /// none (a checkpoint read back does not carry them).
    pub adapter: Vec<(String, Vec<u8>)>,
}

/// The PEFT adapter folder inside a checkpoint.
pub const ADAPTER_DIR: &str = "adapter";

const STATE: &str = "state.json";
const TENSORS: &str = "tensors.safetensors";

fn step_dir(root: &Path, step: usize) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// Completed checkpoints, oldest first. Temporary folders of interrupted writes are ignored.
pub fn list(root: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(root) else {
        return Ok(out);
    };
    for e in rd {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|n| n.parse::<usize>().ok())
        {
            if e.path().join(STATE).is_file() {
                out.push((n, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

pub fn save(root: &Path, ck: &Checkpoint, keep: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let final_dir = step_dir(root, ck.state.step);
    let tmp = root.join(format!(
        ".tmp-step-{:08}-{}",
        ck.state.step,
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let mut tensors = Vec::new();
    for (prefix, list) in [
        ("lora", &ck.lora),
        ("adam_m", &ck.adam_m),
        ("adam_v", &ck.adam_v),
    ] {
        for (i, t) in list.iter().enumerate() {
            tensors.push((
                format!("{prefix}.{i:05}"),
                RawTensor::from_tensor(t, t.dtype())?,
            ));
        }
    }
    write_atomic(&tmp.join(TENSORS), &serialize_pt(&tensors)?)?;
    if !ck.adapter.is_empty() {
        let dir = tmp.join(ADAPTER_DIR);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in &ck.adapter {
            write_atomic(&dir.join(name), bytes)?;
        }
    }
    crate::util::fault::pause("KTO_TRAIN_FAULT_CHECKPOINT_PAUSE_MS");
    write_json_atomic(&tmp.join(STATE), &serde_json::to_value(&ck.state)?)?;
    if final_dir.exists() {
        remove(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot move checkpoint into {}", final_dir.display()))?;
    sync_dir(root)?;
    let all = list(root)?;
    if keep > 0 && all.len() > keep {
        for (_, old) in &all[..all.len() - keep] {
            remove(old).ok();
        }
    }
    // Leftovers of writes and removals that were killed midway.
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let leftover = name.starts_with(".tmp-step-") || name.starts_with(TRASH_PREFIX);
            if leftover && e.path() != tmp {
                std::fs::remove_dir_all(e.path()).ok();
            }
        }
    }
    Ok(final_dir)
}

/// Folders being removed: a checkpoint is renamed to this prefix first, because removing its
/// files one by one can be killed halfway and leave a `step-` folder with a state.json but no
/// tensors, which `list` would offer to a resume.
const TRASH_PREFIX: &str = ".removing-";

/// Removes a checkpoint folder so that a kill at any instant leaves it either whole or gone.
pub fn remove(dir: &Path) -> Result<()> {
    let root = dir.parent().unwrap_or(Path::new("."));
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let trash = root.join(format!("{TRASH_PREFIX}{name}-{}", std::process::id()));
    if trash.exists() {
        std::fs::remove_dir_all(&trash)?;
    }
    std::fs::rename(dir, &trash)
        .with_context(|| format!("cannot move {} aside to remove it", dir.display()))?;
    sync_dir(root)?;
    crate::util::fault::pause("KTO_TRAIN_FAULT_REMOVE_PAUSE_MS");
    std::fs::remove_dir_all(&trash).with_context(|| format!("cannot remove {}", trash.display()))
}

pub fn load(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let sp = dir.join(STATE);
    let state: TrainState = serde_json::from_str(
        &std::fs::read_to_string(&sp).with_context(|| format!("cannot read {}", sp.display()))?,
    )
    .with_context(|| format!("{}: not a kto-train checkpoint state", sp.display()))?;
    let tp = dir.join(TENSORS);
    let bytes = std::fs::read(&tp).with_context(|| format!("cannot read {}", tp.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", tp.display()))?;
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut ck = Checkpoint {
        state,
        lora: vec![],
        adam_m: vec![],
        adam_v: vec![],
        adapter: vec![],
    };
    for n in names {
        let t = tensor_from_view(&st.tensor(&n)?, device)?;
        match n.split('.').next() {
            Some("lora") => ck.lora.push(t),
            Some("adam_m") => ck.adam_m.push(t),
            Some("adam_v") => ck.adam_v.push(t),
            _ => bail!("{}: unexpected tensor `{n}`", tp.display()),
        }
    }
    Ok(ck)
}
