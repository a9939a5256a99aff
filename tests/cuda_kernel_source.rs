//! The GPU kernels' source (src/kernels/cuda/fused.cu), run on the CPU: tests/cuda_emu compiles
//! the same file as host C++ with one OS thread per GPU thread and real barriers, launches each
//! kernel with the geometry the `cuda` build uses, and this test compares what it computes with
//! the CPU fused ops (and their backward through candle's autograd), in f32 and bf16 storage.
//! What this checks without a GPU: indexing, masking, reductions and their barriers, grid-stride
//! loops, the bf16 conversions. What it cannot: nvcc's code generation and the GPU's own
//! arithmetic (scripts/gpu-check.sh runs the fidelity suite on a GPU for that).
//!
//! Needs a C++20 compiler (`c++`, or `CXX`); without one the tests say so and pass.
use candle_core::{Device, Tensor, Var};
use kto_train::kernels::fused;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn harness() -> Option<&'static Path> {
    static H: OnceLock<Option<PathBuf>> = OnceLock::new();
    H.get_or_init(|| {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda-emu-harness");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let status = Command::new(&cxx)
            .args(["-std=c++20", "-O1", "-pthread", "-Wall", "-Werror", "-o"])
            .arg(&out)
            .arg(repo.join("tests/cuda_emu/harness.cpp"))
            .status();
        match status {
            Ok(s) if s.success() => Some(out),
            Ok(s) => panic!("{cxx} could not compile tests/cuda_emu/harness.cpp ({s})"),
            Err(e) => {
                eprintln!(
                    "NOTICE: no C++ compiler ({cxx}: {e}); the kernel-source tests are skipped"
                );
                None
            }
        }
    })
    .as_deref()
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum St {
    F32,
    Bf16,
}

impl St {
    fn name(self) -> &'static str {
        match self {
            St::F32 => "f32",
            St::Bf16 => "bf16",
        }
    }
    /// The values as stored in this dtype (bf16: rounded), back in f32.
    fn round(self, v: &[f32]) -> Vec<f32> {
        match self {
            St::F32 => v.to_vec(),
            St::Bf16 => v
                .iter()
                .map(|x| half::bf16::from_f32(*x).to_f32())
                .collect(),
        }
    }
    fn bytes(self, v: &[f32]) -> Vec<u8> {
        match self {
            St::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            St::Bf16 => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
                .collect(),
        }
    }
    fn values(self, b: &[u8]) -> Vec<f32> {
        match self {
            St::F32 => b
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            St::Bf16 => b
                .chunks(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes(c.try_into().unwrap())).to_f32())
                .collect(),
        }
    }
}

/// Runs `op` in the emulator; `inputs` are f32 values written in `st` (targets: u32).
fn emulate(op: &str, st: St, args: &[String], inputs: &[(&str, Input)]) -> Option<Vec<f32>> {
    let h = harness()?;
    let dir = tempfile::tempdir().unwrap();
    for (name, v) in inputs {
        let bytes = match v {
            Input::Values(v) => st.bytes(v),
            Input::Targets(t) => t.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        std::fs::write(dir.path().join(format!("{name}.bin")), bytes).unwrap();
    }
    let out = Command::new(h)
        .arg(op)
        .arg(st.name())
        .args(args)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "harness {op}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(st.values(&std::fs::read(dir.path().join("out.bin")).unwrap()))
}

enum Input {
    Values(Vec<f32>),
    Targets(Vec<u32>),
}

fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// d sum(y * upstream) / dx through the CPU op's own backward: what a backward kernel must give
/// for the incoming gradient `upstream`.
fn grad_through(y: &Tensor, upstream: &[f32], x: &Var) -> Vec<f32> {
    let g = Tensor::from_vec(upstream.to_vec(), y.shape(), &Device::Cpu).unwrap();
    let grads = (y * g).unwrap().sum_all().unwrap().backward().unwrap();
    flat(grads.get(x.as_tensor()).unwrap())
}

/// |got - want| <= tol (|want| + floor) elementwise; f32 tolerances are f32 rounding, bf16's the
/// one rounding of the stored result (2^-9 relative) with margin.
fn assert_close(what: &str, st: St, got: &[f32], want: &[f32], floor: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let tol = match st {
        St::F32 => 2e-5,
        St::Bf16 => 8e-3,
    };
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (w.abs() + floor),
            "{what} ({}): element {i}: kernel {g}, CPU op {w}",
            st.name()
        );
    }
}

fn both(f: impl Fn(St)) {
    f(St::F32);
    f(St::Bf16);
}

#[test]
fn rms_norm_forward_and_backward_match_the_cpu_op() {
    for (rows, h) in [(3, 7), (4, 256), (5, 600)] {
        both(|st| {
            let x = st.round(&random(rows * h, 1, 2.0));
            let w = st.round(&random(h, 2, 1.5));
            let g = st.round(&random(rows * h, 3, 1.0));
            let eps = 1e-5f32;
            let args = [rows.to_string(), h.to_string(), eps.to_string()];
            let ins = [
                ("x", Input::Values(x.clone())),
                ("w", Input::Values(w.clone())),
                ("g", Input::Values(g.clone())),
            ];
            let Some(y) = emulate("rms_fwd", st, &args, &ins) else {
                return;
            };
            let xv = Var::from_tensor(&t(&x, &[rows, h])).unwrap();
            let want = fused::rms_norm(xv.as_tensor(), &t(&w, &[h]), eps as f64).unwrap();
            assert_close("rms_fwd", st, &y, &flat(&want), 1e-3);
            let dx = emulate("rms_bwd", st, &args, &ins).unwrap();
            let want_dx = grad_through(&want, &g, &xv);
            assert_close("rms_bwd", st, &dx, &want_dx, 1e-2);
        });
    }
}

#[test]
fn rope_matches_the_cpu_op() {
    for (lead, tt, d) in [(3, 5, 8), (2, 7, 64)] {
        both(|st| {
            let x = st.round(&random(lead * tt * d, 4, 1.0));
            // Tables as the model builds them: cos/sin of position x frequency, halves equal.
            let (mut c, mut s) = (Vec::new(), Vec::new());
            for p in 0..tt {
                for _ in 0..2 {
                    for i in 0..d / 2 {
                        let a = p as f32 * 10000f32.powf(-(2.0 * i as f32) / d as f32);
                        c.push(a.cos());
                        s.push(a.sin());
                    }
                }
            }
            let (c, s) = (st.round(&c), st.round(&s));
            let args = [tt.to_string(), d.to_string()];
            let ins = [
                ("x", Input::Values(x.clone())),
                ("cos", Input::Values(c.clone())),
                ("sin", Input::Values(s.clone())),
            ];
            let Some(y) = emulate("rope", st, &args, &ins) else {
                return;
            };
            let want =
                fused::rope(&t(&x, &[lead, tt, d]), &t(&c, &[tt, d]), &t(&s, &[tt, d])).unwrap();
            assert_close("rope", st, &y, &flat(&want), 1e-2);
        });
    }
}

#[test]
fn causal_softmax_forward_and_backward_match_the_cpu_op() {
    // (leading, query heads per key head, t_q, cached offset): keys t = offset + t_q; the last
    // case has rows longer than one block.
    for (lead, heads, t_q, offset) in [(2, 3, 5, 0), (1, 2, 4, 3), (1, 1, 270, 20)] {
        both(|st| {
            let tk = offset + t_q;
            let rows = lead * heads * t_q;
            let s = st.round(&random(rows * tk, 5, 4.0));
            let scale = 0.125f32;
            let args = [
                rows.to_string(),
                tk.to_string(),
                t_q.to_string(),
                offset.to_string(),
                scale.to_string(),
            ];
            let Some(p) = emulate("csm_fwd", st, &args, &[("s", Input::Values(s.clone()))]) else {
                return;
            };
            let want =
                fused::causal_softmax(&t(&s, &[lead, heads * t_q, tk]), scale as f64, t_q, offset)
                    .unwrap();
            let want = flat(&want);
            assert_close("csm_fwd", st, &p, &want, 1e-4);
            // Masked keys are exactly zero, in both.
            for (i, w) in want.iter().enumerate() {
                if *w == 0.0 {
                    assert_eq!(p[i], 0.0, "csm_fwd: masked element {i}");
                }
            }
            let g = st.round(&random(rows * tk, 6, 1.0));
            let pr = st.round(&want);
            let args = [rows.to_string(), tk.to_string(), scale.to_string()];
            let ds = emulate(
                "csm_bwd",
                st,
                &args,
                &[
                    ("p", Input::Values(pr.clone())),
                    ("g", Input::Values(g.clone())),
                ],
            )
            .unwrap();
            let want_ds = fused::causal_softmax_grad(
                &t(&pr, &[rows, tk]),
                &t(&g, &[rows, tk]),
                scale as f64,
                t_q,
                offset,
            )
            .unwrap();
            assert_close("csm_bwd", st, &ds, &flat(&want_ds), 1e-3);
        });
    }
}

#[test]
fn swiglu_and_mask_products_match_the_cpu_ops() {
    let n = 2 * 1000 + 37; // more than the emulator's 3 blocks x 256 threads: several strides
    both(|st| {
        let g = st.round(&random(n, 7, 6.0));
        let u = st.round(&random(n, 8, 2.0));
        let o = st.round(&random(n, 9, 1.0));
        let ins = [
            ("x", Input::Values(g.clone())),
            ("m", Input::Values(u.clone())),
            ("g", Input::Values(o.clone())),
        ];
        let Some(y) = emulate("silu_mul", st, &[], &ins) else {
            return;
        };
        let gv = Var::from_tensor(&t(&g, &[n])).unwrap();
        let want = fused::silu_mul(gv.as_tensor(), &t(&u, &[n])).unwrap();
        assert_close("silu_mul", st, &y, &flat(&want), 1e-3);
        let dg = emulate("silu_mul_bwd", st, &[], &ins).unwrap();
        assert_close("silu_mul_bwd", st, &dg, &grad_through(&want, &o, &gv), 1e-3);
        let m = emulate("mul", st, &[], &ins).unwrap();
        let want = fused::mul_const(&t(&g, &[n]), &t(&u, &[n])).unwrap();
        // A product of two bf16 values is exact in f32, so the stored result is that product
        // rounded once: the kernel's f32 -> bf16 conversion must match half's bit for bit.
        let want = st.round(&flat(&want));
        assert_eq!(m, want, "mul ({})", st.name());
    });
}

#[test]
fn log_softmax_gather_forward_and_backward_match_the_cpu_op() {
    let (rows, v) = (4, 1000);
    both(|st| {
        let x = st.round(&random(rows * v, 10, 8.0));
        let tg: Vec<u32> = vec![0, 999, 517, 3];
        let g = st.round(&random(rows, 11, 1.0));
        let args = [rows.to_string(), v.to_string()];
        let ins = [
            ("x", Input::Values(x.clone())),
            ("target", Input::Targets(tg.clone())),
            ("g", Input::Values(g.clone())),
        ];
        let Some(y) = emulate("lsg_fwd", st, &args, &ins) else {
            return;
        };
        let xv = Var::from_tensor(&t(&x, &[rows, v])).unwrap();
        let targets = Tensor::from_vec(tg.clone(), rows, &Device::Cpu).unwrap();
        let want = fused::log_softmax_gather(xv.as_tensor(), &targets).unwrap();
        assert_close("lsg_fwd", st, &y, &flat(&want), 1.0);
        let dx = emulate("lsg_bwd", st, &args, &ins).unwrap();
        assert_close("lsg_bwd", st, &dx, &grad_through(&want, &g, &xv), 1e-3);
    });
}

#[test]
fn dropout_masks_are_the_cpu_stream_value_for_value() {
    // 16,385 values: blocks of 16 with a partial last one, and more blocks than the emulator's
    // 3 x 256 threads.
    for (seed, p, n) in [(7u64, 0.05, 16_385usize), (9, 0.5, 1000), (11, 0.1, 5)] {
        both(|st| {
            let threshold = (p * (u32::MAX as f64 + 1.0)) as u64;
            let keep = (1.0 / (1.0 - p)) as f32;
            let args = [threshold.to_string(), format!("{keep:e}"), n.to_string()];
            let key = fused::dropout_mask_key(seed).to_vec();
            let Some(m) = emulate("dropout", st, &args, &[("key", Input::Targets(key))]) else {
                return;
            };
            let want = st.round(&fused::dropout_mask_values(seed, p, n));
            assert_eq!(m, want, "seed {seed} p {p} n {n} ({})", st.name());
        });
    }
}

/// The emulator itself must be able to fail: a kernel launched with the wrong geometry (rows
/// of the wrong length) gives a different answer, which the comparison catches.
#[test]
fn a_wrong_launch_is_caught() {
    let (rows, h) = (3, 300);
    let x = random(rows * h, 12, 2.0);
    let w = random(h, 13, 1.0);
    let args = [rows.to_string(), (h - 1).to_string(), "1e-5".into()];
    let ins = [
        ("x", Input::Values(x.clone())),
        ("w", Input::Values(w.clone())),
    ];
    let Some(y) = emulate("rms_fwd", St::F32, &args, &ins) else {
        return;
    };
    let want = flat(&fused::rms_norm(&t(&x, &[rows, h]), &t(&w, &[h]), 1e-5).unwrap());
    let differs = y.iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-3);
    assert!(differs, "a wrong row length went unnoticed");
}
