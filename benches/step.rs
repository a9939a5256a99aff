//! One optimizer step on SmolLM2-360M's exact shapes (random weights): batch 2 of prompt 256 +
//! completion 256 tokens, LoRA r 16 alpha 32 on all seven projections, KTO with KL pairs.
//!
//!     cargo bench --bench step -- [--steps 3] [--warmup 1] [--prompt 256] [--completion 256] [--rank 16]
//!         [--checkpointing 0|1 (default 1, as the configs)] [--json]
//!         [--device cpu|cuda (default cpu)] [--dtype f32|bf16 (default f32)] [--batch 2]
mod common;
use common::{arg, Placement, WorkUnit};

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() -> anyhow::Result<()> {
    // As the kto-train binary does (src/util/alloc.rs). SAFETY: no other thread exists yet.
    unsafe { kto_train::util::alloc::tune_for_training() };
    let steps = arg("--steps", 3);
    let warmup = arg("--warmup", 1);
    let (pl, cl) = (arg("--prompt", 256), arg("--completion", 256));
    let rank = arg("--rank", 16);
    let json = std::env::args().any(|a| a == "--json");
    let ckpt = arg("--checkpointing", 1) == 1;
    let place = Placement::from_args()?;
    let mut unit = WorkUnit::new(pl, cl, rank, ckpt, false, &place)?;
    let mut times = Vec::new();
    for i in 0..warmup + steps {
        let (dt, loss) = unit.step()?;
        eprintln!("step {i}: {dt:.2} s (loss {loss:.4})");
        if i >= warmup {
            times.push(dt);
        }
    }
    // KTO_TRAIN_PROFILE=1: where the steps' time went (the warm-up included), per step.
    if let Some(table) = kto_train::util::profile::report((warmup + steps) as u64) {
        eprintln!("{table}");
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = times[times.len() / 2];
    let tokens = place.batch * (pl + cl);
    let rss = peak_rss_mb();
    if json {
        println!(
            "{}",
            serde_json::json!({"s_per_step": med, "tokens_per_s": tokens as f64 / med, "peak_rss_mb": rss,
                "prompt": pl, "completion": cl, "rank": rank, "steps": steps, "batch": place.batch,
                "device": format!("{:?}", place.device.location()), "dtype": format!("{:?}", place.dtype),
                "checkpointing": ckpt})
        );
    } else {
        println!("| tokens/step | rank | s/step (median) | policy tokens/s | peak RSS |");
        println!("|---|---|---|---|---|");
        println!(
            "| {tokens} | {rank} | {med:.2} | {:.0} | {:.2} GB |",
            tokens as f64 / med,
            rss / 1024.0
        );
    }
    Ok(())
}
