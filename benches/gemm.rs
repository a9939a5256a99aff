//! GFLOP/s of the frozen-weight products at SmolLM2-360M's shapes, per path: candle's f32 GEMM,
//! the default engine's f32 (gemmkit) and bf16 (our AMX or AVX-512 BF16 kernel, f32 accumulate and
//! output; the time includes rounding the activation to bf16, the weight's bf16 copy is cached as
//! in training), and in a `fast-gemm` build with oneDNN or MKL found, the library's f32 and bf16.
//!
//!     cargo bench --bench gemm [--features fast-gemm] -- [--m 1024] [--reps 5] [--weights 1]
//!         [--json]
//!
//! `--weights N` gives each shape N distinct weights, used in turn, so that a product reads its
//! weight from memory as in training (where the layers' weights outgrow the caches); with 1 the
//! weight stays cached between runs.
//!
//! PassMode: `x[m, k] @ w[n, k]^T`; backward: `grad[m, n] @ w[n, k]`. (n, k) are the q/o, k/v,
//! gate/up, down projections and the tied lm_head. Then the products of two activations
//! (`ops::matmul`): attention (n x k = keys x head dim, or head dim x keys) and LoRA r 16.
//! Paths run interleaved, shape by shape, so that the machine's drift hits them alike; the
//! table reports the median of `--reps` runs.
//!
//!     cargo bench --bench gemm --features fast-gemm -- --step [--rounds 3] [--prompt 256]
//!         [--completion 256] [--rank 16]
//!
//! Whole optimizer steps as in benches/step.rs, but all GEMM paths in one process, one step of
//! each in turn per round: on a machine whose speed drifts, adjacent steps give fair ratios.
use candle_core::{Device, Tensor};
use kto_train::kernels::gemm::{self, GemmMode};
use kto_train::kernels::products::{frozen_linear, frozen_linear_input_grad, matmul_with};
use std::time::Instant;

mod common;
use common::{arg, WorkUnit};

/// One way to run the products: an engine and a precision.
#[derive(Clone, Copy)]
struct Path {
    label: &'static str,
    engine: gemm::Engine,
    mode: GemmMode,
    /// Our f32 kernel for products with a small side (LoRA, attention) before gemmkit.
    small: bool,
}

impl Path {
    /// Switches the process to this path and returns the mode to pass to the ops.
    fn select(self) -> GemmMode {
        gemm::set_engine(self.engine);
        gemm::set_small_kernel(self.small);
        self.mode
    }
}

/// candle, the default engine in f32 and bf16, and the optional library's when it loads.
fn paths() -> Vec<Path> {
    use gemm::Engine::{Library, Native};
    let mut v = vec![
        Path {
            label: "candle f32",
            engine: Native,
            mode: GemmMode::Candle,
            small: false,
        },
        Path {
            label: "gemmkit f32",
            engine: Native,
            mode: GemmMode::F32,
            small: false,
        },
        Path {
            label: "native f32",
            engine: Native,
            mode: GemmMode::F32,
            small: true,
        },
        Path {
            label: "native bf16",
            engine: Native,
            mode: GemmMode::Bf16,
            small: true,
        },
    ];
    if cfg!(feature = "fast-gemm") && gemm::load_error().is_none() {
        gemm::set_engine(Library);
        let lib = if gemm::engine_name().starts_with("MKL") {
            "MKL"
        } else {
            "oneDNN"
        };
        let (f, b): (&'static str, &'static str) = if lib == "MKL" {
            ("MKL f32", "MKL bf16")
        } else {
            ("oneDNN f32", "oneDNN bf16")
        };
        v.push(Path {
            label: f,
            engine: Library,
            mode: GemmMode::F32,
            small: false,
        });
        v.push(Path {
            label: b,
            engine: Library,
            mode: GemmMode::Bf16,
            small: false,
        });
    }
    v
}

/// A product of two activations: (pass, name, A's dims, A transposed, B's dims, B transposed).
type Act = (
    &'static str,
    &'static str,
    Vec<usize>,
    bool,
    Vec<usize>,
    bool,
);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    // As the kto-train binary does (src/util/alloc.rs). SAFETY: no other thread exists yet.
    unsafe { kto_train::util::alloc::tune_for_training() };
    if std::env::args().any(|a| a == "--step") {
        return steps();
    }
    let m = arg("--m", 1024);
    let reps = arg("--reps", 5).max(1);
    let weights = arg("--weights", 1).max(1);
    let json = std::env::args().any(|a| a == "--json");
    let dev = Device::Cpu;
    let modes = paths();
    let lib = match gemm::load_error() {
        None => "loaded".to_string(),
        Some(e) => format!("none ({e})"),
    };
    eprintln!("optional library: {lib}");
    let shapes = [
        ("q/o proj", 960, 960),
        ("k/v proj", 320, 960),
        ("gate/up proj", 2560, 960),
        ("down proj", 960, 2560),
        ("lm_head", 49152, 960),
    ];
    let mut rows = Vec::new();
    for dir in ["fwd", "bwd"] {
        for &(name, n, k) in &shapes {
            // Distinct weights, taken in turn: with enough of them each product reads its
            // weight from memory, as training does (30+ layers' weights outgrow the caches).
            let count = if n * k > 10_000_000 { 1 } else { weights };
            let ws = (0..count)
                .map(|_| Tensor::randn(0f32, 0.05, (n, k), &dev))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let next = std::cell::Cell::new(0usize);
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let g = Tensor::randn(0f32, 1.0, (m, n), &dev)?;
            let flop = 2.0 * m as f64 * n as f64 * k as f64;
            let run = |path: Path| -> anyhow::Result<f64> {
                let mode = path.select();
                let w = &ws[next.get() % ws.len()];
                next.set(next.get() + 1);
                let t0 = Instant::now();
                let y = if dir == "fwd" {
                    frozen_linear(&x, w, mode)?
                } else {
                    frozen_linear_input_grad(&g, w, mode)?
                };
                // Make sure the product is done (candle ops are eager on CPU; this is cheap).
                let _ = y.dims();
                Ok(t0.elapsed().as_secs_f64())
            };
            // Warm-up: page in the buffers, make the bf16 weight copies, start library threads.
            for _ in 0..count {
                for &mode in &modes {
                    run(mode)?;
                }
            }
            let mut times: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
            let r = if n > 10_000 {
                reps.div_ceil(2).max(1)
            } else {
                reps
            };
            for _ in 0..r {
                for (i, &mode) in modes.iter().enumerate() {
                    times[i].push(run(mode)?);
                }
            }
            let gflops: Vec<f64> = times.into_iter().map(|t| flop / median(t) / 1e9).collect();
            rows.push((dir, name, n, k, gflops));
        }
        gemm::clear_bf16_cache();
    }
    // Products of two activations (ops::matmul): attention at T = m / 2 per sequence with batch
    // 2 (q @ k^T with k^T a view, P @ v), and LoRA r 16 forward (x @ A^T, h @ B^T, views of A
    // and B) and backward (g @ B, dh @ A, and the weight gradients g^T @ h, dh^T @ x). These
    // take tens of microseconds: each timing repeats the product until it lasts 2 ms.
    let t = m / 2;
    #[rustfmt::skip]
    let acts: [Act; 11] = [
        ("fwd", "attn q@k^T", vec![2, 5, 3 * t, 64], false, vec![2, 5, t, 64], true),
        ("fwd", "attn P@v", vec![2, 5, 3 * t, t], false, vec![2, 5, t, 64], false),
        ("fwd", "lora x@A^T", vec![m, 960], false, vec![16, 960], true),
        ("fwd", "lora h@B^T", vec![m, 16], false, vec![960, 16], true),
        ("fwd", "lora h@B^T up", vec![m, 16], false, vec![2560, 16], true),
        ("bwd", "lora g@B", vec![m, 960], false, vec![960, 16], false),
        ("bwd", "lora g@B up", vec![m, 2560], false, vec![2560, 16], false),
        ("bwd", "lora dh@A", vec![m, 16], false, vec![16, 960], false),
        ("bwd", "lora dh@A down", vec![m, 16], false, vec![16, 2560], false),
        ("bwd", "lora g^T@h", vec![m, 960], true, vec![m, 16], false),
        ("bwd", "lora dh^T@x", vec![m, 16], true, vec![m, 960], false),
    ];
    for (dir, name, da, transpose_a, db, transpose_b) in acts {
        let view = |dims: Vec<usize>, t: bool| -> anyhow::Result<Tensor> {
            let x = Tensor::randn(0f32, 1.0, dims.as_slice(), &dev)?;
            Ok(if t { x.t()? } else { x })
        };
        let (a, b) = (view(da, transpose_a)?, view(db, transpose_b)?);
        let (r_, kk, n) = {
            let ad = a.dims();
            let bd = b.dims();
            (
                ad[..ad.len() - 1].iter().product::<usize>(),
                ad[ad.len() - 1],
                bd[bd.len() - 1],
            )
        };
        let flop = 2.0 * r_ as f64 * kk as f64 * n as f64;
        let once = |mode: GemmMode| -> anyhow::Result<()> {
            let y = matmul_with(&a, &b, mode)?;
            let _ = y.dims();
            Ok(())
        };
        let t0 = Instant::now();
        once(GemmMode::F32)?;
        let inner = (2e-3 / t0.elapsed().as_secs_f64().max(1e-7))
            .ceil()
            .clamp(1.0, 1e4) as usize;
        let run = |path: Path| -> anyhow::Result<f64> {
            let mode = path.select();
            let t0 = Instant::now();
            for _ in 0..inner {
                once(mode)?;
            }
            Ok(t0.elapsed().as_secs_f64() / inner as f64)
        };
        for &mode in &modes {
            run(mode)?;
        }
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        for _ in 0..reps {
            for (i, &mode) in modes.iter().enumerate() {
                times[i].push(run(mode)?);
            }
        }
        let gflops: Vec<f64> = times.into_iter().map(|t| flop / median(t) / 1e9).collect();
        rows.push((dir, name, n, kk, gflops));
    }
    if json {
        for (dir, name, n, k, g) in &rows {
            let mut o = serde_json::json!({"pass": dir, "shape": name, "m": m, "n": n, "k": k});
            for (path, v) in modes.iter().zip(g) {
                o[format!("gflops_{}", path.label.replace(' ', "_"))] = serde_json::json!(v);
            }
            println!("{o}");
        }
        return Ok(());
    }
    println!(
        "GFLOP/s, m = {m}, median of {reps} (lm_head: {}); optional library: {lib}",
        reps.div_ceil(2)
    );
    let mut head = "| pass | shape | n x k |".to_string();
    let mut rule = "|---|---|---|".to_string();
    for path in &modes {
        head += &format!(" {} |", path.label);
        rule += "---|";
    }
    for path in &modes[1..] {
        head += &format!(" {} vs candle |", path.label);
        rule += "---|";
    }
    println!("{head}\n{rule}");
    for (dir, name, n, k, g) in &rows {
        let mut line = format!("| {dir} | {name} | {n} x {k} |");
        for v in g {
            line += &format!(" {v:.0} |");
        }
        for v in &g[1..] {
            line += &format!(" {:.1}x |", v / g[0]);
        }
        println!("{line}");
    }
    Ok(())
}

/// One optimizer step per mode per round, in one process (see the file's doc).
fn steps() -> anyhow::Result<()> {
    let rounds = arg("--rounds", 3).max(1);
    let (pl, cl) = (arg("--prompt", 256), arg("--completion", 256));
    let rank = arg("--rank", 16);
    // As in training, bf16 mode holds the frozen weights in bf16 (converted at each switch,
    // outside the timed step).
    let place = common::Placement {
        device: candle_core::Device::Cpu,
        dtype: candle_core::DType::F32,
        batch: 2,
    };
    let mut unit = WorkUnit::new(pl, cl, rank, arg("--checkpointing", 0) == 1, true, &place)?;
    let modes = paths();
    let mut step = |path: Path| -> anyhow::Result<f64> {
        unit.set_gemm_mode(path.select())?;
        Ok(unit.step()?.0)
    };
    // Warm-up: first touches of every buffer, the bf16 weight copies, library start-up.
    for &path in &modes {
        let t = step(path)?;
        eprintln!("warm-up {}: {t:.2} s", path.label);
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for r in 0..rounds {
        let mut line = format!("round {r}:");
        for (j, &path) in modes.iter().enumerate() {
            let t = step(path)?;
            line += &format!(" {} {t:.2} s", path.label);
            times[j].push(t);
        }
        eprintln!("{line}");
    }
    println!(
        "one step, batch 2 x ({pl} + {cl}) tokens, LoRA r {rank}; median of {rounds} rounds, \
         modes interleaved in one process"
    );
    println!("| GEMM path | s/step (median) | speed-up vs candle (median of per-round ratios) |");
    println!("|---|---|---|");
    for (j, path) in modes.iter().enumerate() {
        let ratios: Vec<f64> = times[0].iter().zip(&times[j]).map(|(c, t)| c / t).collect();
        println!(
            "| {} | {:.2} | {:.2}x |",
            path.label,
            median(times[j].clone()),
            median(ratios)
        );
    }
    Ok(())
}
