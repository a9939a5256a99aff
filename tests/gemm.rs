//! The fast GEMM paths (src/kernels/gemm) against candle's GEMM and f64.
//!
//! Tolerances, elementwise, relative to S = |x| @ |w|^T (the sum of the absolute products, the
//! natural scale of any summation error; a plain relative error is meaningless where the sum
//! cancels to near zero):
//! - fast f32 vs candle: both sum the same f32 products in different orders; rounding theory
//!   bounds the difference by about k * 2^-24 * S in the worst case, and by ~sqrt(k) * 2^-24 * S
//!   in practice (3e-6 at k = 2560): checked at 1e-5 * S.
//! - bf16 vs exact: each operand is rounded to nearest with 8 significant bits, relative error
//!   at most u = 2^-9, so each product is off by at most (2u + u^2) |x_i w_i| and the sum by
//!   (2u + u^2) S = 3.9e-3 S, plus the f32 accumulation error: checked at 4e-3 * S + 1e-5 * S.
//!   Random-sign errors mostly cancel, so the typical error is far below that bound; the
//!   Frobenius-relative error is also checked at 1e-2 (measured about 2-3e-3).
//! - bf16 vs f64 over the bf16-rounded operands: only the f32 accumulation differs: 1e-5 * S.
//!   This pins down that the engine really multiplies our rounded values with f32 accumulation
//!   and writes f32 (a bf16 output would be off by up to 2^-9 of the value).
//!
//! The engine is gemmkit + our AVX-512 BF16 kernel (every build), or oneDNN/MKL in a `fast-gemm`
//! build with `KTO_TRAIN_GEMM_ENGINE=library` (CI runs the suite both ways).
mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::rand_tensor;
use half::bf16;
use kto_train::kernels::gemm::{self, GemmMode};
use kto_train::kernels::products::{frozen_linear, frozen_linear_input_grad, matmul_with};
use rand::{Rng, SeedableRng};

const F32_TOL: f64 = 1e-5;
const BF16_WORST: f64 = 2.0 / 512.0 + 1.0 / (512.0 * 512.0);
const BF16_FROB: f64 = 1e-2;

fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(seed)
}

fn f64v(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max over elements of |got - want| / scale (scale = |a| @ |b| per element, in f64).
fn max_scaled_err(got: &Tensor, want: &Tensor, scale: &Tensor) -> f64 {
    let (g, w, s) = (f64v(got), f64v(want), f64v(scale));
    assert_eq!(g.len(), w.len());
    g.iter()
        .zip(&w)
        .zip(&s)
        .map(|((g, w), s)| (g - w).abs() / s.max(1e-30))
        .fold(0.0, f64::max)
}

fn frob_rel(got: &Tensor, want: &Tensor) -> f64 {
    let (g, w) = (f64v(got), f64v(want));
    let num: f64 = g.iter().zip(&w).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = w.iter().map(|b| b * b).sum();
    (num / den).sqrt()
}

/// |x| @ |w|^T in f64.
fn abs_scale(x: &Tensor, w: &Tensor) -> Tensor {
    let x = x.to_dtype(DType::F64).unwrap().abs().unwrap();
    let w = w.to_dtype(DType::F64).unwrap().abs().unwrap();
    x.matmul(&w.t().unwrap()).unwrap()
}

fn round_tensor(t: &Tensor) -> Tensor {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let r: Vec<f32> = v.iter().map(|x| gemm::round_bf16(*x).to_f32()).collect();
    Tensor::from_vec(r, t.shape(), t.device()).unwrap()
}

/// SmolLM2's projection shapes (n, k), with an m that is not a multiple of any block size.
const SHAPES: [(usize, usize); 4] = [(960, 960), (320, 960), (2560, 960), (960, 2560)];
const M: usize = 77;

#[test]
fn mode_parsing_and_names() {
    assert_eq!("bf16".parse::<GemmMode>().unwrap(), GemmMode::Bf16);
    assert_eq!("F32".parse::<GemmMode>().unwrap(), GemmMode::F32);
    assert_eq!("fp32".parse::<GemmMode>().unwrap(), GemmMode::F32);
    assert_eq!(" candle ".parse::<GemmMode>().unwrap(), GemmMode::Candle);
    assert!("fp16".parse::<GemmMode>().is_err());
    for m in [GemmMode::Candle, GemmMode::F32, GemmMode::Bf16] {
        assert_eq!(m.to_string().parse::<GemmMode>().unwrap(), m);
    }
    assert_eq!(
        gemm::effective_mode(GemmMode::Candle),
        GemmMode::Candle,
        "candle is always available"
    );
    for m in [GemmMode::F32, GemmMode::Bf16] {
        assert_eq!(gemm::effective_mode(m), m, "every mode has an engine");
    }
}

#[test]
fn bf16_rounding_is_nearest_even() {
    let specials = [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-40,                       // subnormal
        f32::from_bits(0x3f80_8000), // exactly halfway, even below: rounds down
        f32::from_bits(0x3f81_8000), // exactly halfway, odd below: rounds up
        f32::from_bits(0x3f80_8001), // just above halfway: rounds up
        f32::from_bits(0x7f7f_ffff), // rounds up to infinity, as IEEE says
    ];
    let mut r = rng(5);
    let mut vals: Vec<f32> = specials.to_vec();
    vals.extend((0..100_000).map(|_| f32::from_bits(r.random::<u32>())));
    for &v in &vals {
        let got = gemm::round_bf16(v);
        let want = bf16::from_f32(v);
        if v.is_nan() {
            assert!(got.is_nan(), "NaN must stay NaN");
        } else {
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "rounding {v:e} ({:#x})",
                v.to_bits()
            );
        }
    }
    // The vectorized, parallel slice conversion agrees with the scalar one.
    let big: Vec<f32> = (0..300_001).map(|_| r.random_range(-3.0f32..3.0)).collect();
    let mut out = vec![bf16::ZERO; big.len()];
    gemm::f32_to_bf16(&big, &mut out);
    for (a, b) in big.iter().zip(&out) {
        assert_eq!(gemm::round_bf16(*a).to_bits(), b.to_bits());
    }
}

#[test]
fn candle_mode_and_fallback_equal_candle_matmul() {
    let mut r = rng(1);
    let x = rand_tensor(&mut r, &[2, 5, 64], 1.0);
    let w = rand_tensor(&mut r, &[48, 64], 0.1);
    let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
    let got = frozen_linear(&x, &w, GemmMode::Candle).unwrap();
    assert_eq!(got.dims(), &[2, 5, 48]);
    assert_eq!(f64v(&got), f64v(&want), "candle mode is candle's matmul");
}

#[test]
fn f32_forward_matches_candle() {
    let mut r = rng(2);
    for (n, k) in SHAPES {
        let x = rand_tensor(&mut r, &[M, k], 1.0);
        let w = rand_tensor(&mut r, &[n, k], 0.05);
        let want = frozen_linear(&x, &w, GemmMode::Candle).unwrap();
        let got = frozen_linear(&x, &w, GemmMode::F32).unwrap();
        let err = max_scaled_err(&got, &want, &abs_scale(&x, &w));
        assert!(err < F32_TOL, "{n}x{k}: f32 error {err:e}");
    }
}

#[test]
fn bf16_forward_within_rounding_bound() {
    let mut r = rng(3);
    for (n, k) in SHAPES {
        let x = rand_tensor(&mut r, &[M, k], 1.0);
        let w = rand_tensor(&mut r, &[n, k], 0.05);
        let want = frozen_linear(&x, &w, GemmMode::Candle).unwrap();
        let got = frozen_linear(&x, &w, GemmMode::Bf16).unwrap();
        let scale = abs_scale(&x, &w);
        let err = max_scaled_err(&got, &want, &scale);
        assert!(
            err < BF16_WORST + F32_TOL,
            "{n}x{k}: bf16 worst-case error {err:e}"
        );
        let fr = frob_rel(&got, &want);
        assert!(fr < BF16_FROB, "{n}x{k}: bf16 Frobenius error {fr:e}");
        assert!(
            fr > 1e-4,
            "{n}x{k}: bf16 equals f32: did candle run instead?"
        );
        // Exactly the product of the rounded operands, summed in f32.
        let exact = round_tensor(&x)
            .to_dtype(DType::F64)
            .unwrap()
            .matmul(&round_tensor(&w).to_dtype(DType::F64).unwrap().t().unwrap())
            .unwrap();
        let err = max_scaled_err(&got, &exact, &scale);
        assert!(
            err < F32_TOL,
            "{n}x{k}: bf16 vs rounded-operand product {err:e}"
        );
        println!("{n}x{k}: bf16 Frobenius error vs f32 {fr:.2e}");
    }
}

#[test]
fn layouts_batch_dims_and_transposed_weights() {
    let mut r = rng(4);
    // Leading batch dims, a weight given as the transpose of a [k, n] tensor (column-major
    // view), and a row-sliced weight (leading dimension larger than k is not possible for a
    // [n, k] row slice, but an offset is).
    let x = rand_tensor(&mut r, &[2, 3, 40], 1.0);
    let wt = rand_tensor(&mut r, &[40, 24], 0.1);
    let w_view = wt.t().unwrap();
    let w_dense = w_view.contiguous().unwrap();
    let big = rand_tensor(&mut r, &[30, 40], 0.1);
    let w_offset = big.narrow(0, 6, 24).unwrap();
    for mode in [GemmMode::F32, GemmMode::Bf16] {
        for w in [&w_view, &w_offset] {
            let want = frozen_linear(&x, w, GemmMode::Candle).unwrap();
            let got = frozen_linear(&x, w, mode).unwrap();
            assert_eq!(got.dims(), &[2, 3, 24]);
            let x2 = x.reshape((6, 40)).unwrap();
            let err = max_scaled_err(
                &got.reshape((6, 24)).unwrap(),
                &want.reshape((6, 24)).unwrap(),
                &abs_scale(&x2, &w.contiguous().unwrap()),
            );
            let tol = if mode == GemmMode::Bf16 {
                BF16_WORST + F32_TOL
            } else {
                F32_TOL
            };
            assert!(err < tol, "{mode}: {err:e}");
        }
        // A transposed (column-major) activation goes through the same path.
        let xt = rand_tensor(&mut r, &[40, 6], 1.0).t().unwrap();
        let want = frozen_linear(&xt, &w_dense, GemmMode::Candle).unwrap();
        let got = frozen_linear(&xt, &w_dense, mode).unwrap();
        let tol = if mode == GemmMode::Bf16 {
            BF16_WORST + F32_TOL
        } else {
            F32_TOL
        };
        let err = max_scaled_err(&got, &want, &abs_scale(&xt, &w_dense));
        assert!(err < tol, "{mode} transposed x: {err:e}");
    }
}

/// d/dx of sum(y * r) for y = frozen_linear(x, w): r @ w, through candle's backprop.
fn backprop(x: &Tensor, w: &Tensor, r: &Tensor, mode: GemmMode) -> (Tensor, Tensor, bool) {
    let xv = Var::from_tensor(x).unwrap();
    let y = frozen_linear(xv.as_tensor(), w, mode).unwrap();
    let loss = (&y * r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let dx = grads.get(xv.as_tensor()).unwrap().clone();
    (y, dx, grads.get(w).is_some())
}

#[test]
fn backward_through_candle_backprop() {
    let mut r = rng(6);
    for (n, k) in [(96, 64), (320, 960), (960, 2560)] {
        let x = rand_tensor(&mut r, &[M, k], 1.0);
        let w = rand_tensor(&mut r, &[n, k], 0.05);
        let g = rand_tensor(&mut r, &[M, n], 1.0);
        let (_, dx_c, w_grad) = backprop(&x, &w, &g, GemmMode::Candle);
        assert!(!w_grad, "the frozen weight must get no gradient");
        let direct = g.matmul(&w).unwrap();
        assert_eq!(f64v(&dx_c), f64v(&direct), "candle mode: dx = grad @ w");
        // Scale of the backward product grad @ w: |grad| @ |w|.
        let scale = abs_scale(&g, &w.t().unwrap());
        for mode in [GemmMode::F32, GemmMode::Bf16] {
            let (_, dx, w_grad) = backprop(&x, &w, &g, mode);
            assert!(!w_grad, "{mode}: the frozen weight must get no gradient");
            let err = max_scaled_err(&dx, &direct, &scale);
            let tol = if mode == GemmMode::Bf16 {
                BF16_WORST + F32_TOL
            } else {
                F32_TOL
            };
            assert!(err < tol, "{mode} {n}x{k}: dx error {err:e}");
            if mode == GemmMode::Bf16 {
                let fr = frob_rel(&dx, &direct);
                assert!(fr < BF16_FROB, "bf16 {n}x{k}: dx Frobenius error {fr:e}");
                assert!(
                    fr > 1e-4,
                    "bf16 {n}x{k}: dx equals f32: did candle run instead?"
                );
            }
            // The public input-gradient entry point is the same computation.
            let dx2 = frozen_linear_input_grad(&g, &w, mode).unwrap();
            assert_eq!(f64v(&dx2), f64v(&dx), "{mode}: input_grad entry point");
        }
    }
}

#[test]
fn bf16_weight_copy_is_made_once() {
    let mut r = rng(7);
    let w = rand_tensor(&mut r, &[33, 17], 1.0);
    let a = gemm::bf16_weight(&w).unwrap();
    let b = gemm::bf16_weight(&w.clone()).unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&a, &b),
        "same tensor, same cached copy"
    );
    assert_eq!((a.rows, a.cols), (33, 17));
    let v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    for (x, y) in v.iter().zip(&a.data) {
        assert_eq!(gemm::round_bf16(*x).to_bits(), y.to_bits());
    }
    // A different tensor with equal values is a different weight.
    let w2 = w.copy().unwrap();
    let c = gemm::bf16_weight(&w2).unwrap();
    assert!(!std::sync::Arc::ptr_eq(&a, &c));
    assert!(gemm::bf16_cache_bytes() >= 2 * 33 * 17 * 2);
}

#[test]
fn tiny_model_logits_in_each_mode() {
    // The whole network in each mode against candle's (f32 mode within f32 noise; bf16 within
    // a loose bound: 2 layers of bf16 products on the tiny model's logits).
    let files = kto_train::hub::local_model_files(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama"),
        "tiny-llama",
    )
    .unwrap();
    let model = kto_train::model::load_llama(&files, DType::F32, &Device::Cpu, None).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 2, 7, 3]], &Device::Cpu).unwrap();
    let fwd = kto_train::model::PassMode::REFERENCE;
    let logits = |mode: GemmMode| {
        let kernels = kto_train::kernels::KernelSettings {
            gemm: mode,
            ..model.kernels()
        };
        let model = model.clone().with_kernels(kernels).unwrap();
        let h = model.hidden_states(&ids, fwd).unwrap();
        let rows = h.reshape((6, h.dim(2).unwrap())).unwrap();
        model.logits(&rows).unwrap()
    };
    let want = logits(GemmMode::Candle);
    let f32 = logits(GemmMode::F32);
    let d = f64v(&(&f32 - &want).unwrap())
        .into_iter()
        .fold(0.0, |a: f64, b| a.max(b.abs()));
    assert!(d < 1e-4, "f32 logits differ by {d:e}");
    let b16 = logits(GemmMode::Bf16);
    let fr = frob_rel(&b16, &want);
    assert!(fr < 2e-2, "bf16 logits Frobenius error {fr:e}");
    println!("tiny model: f32 max |dlogit| {d:.2e}, bf16 Frobenius error {fr:.2e}");
}

/// max over elements of |got - want| / (|a| @ |b|), batched, in f64.
fn batched_scaled_err(got: &Tensor, want: &Tensor, a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().abs().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().abs().unwrap();
    let scale = a
        .contiguous()
        .unwrap()
        .matmul(&b.contiguous().unwrap())
        .unwrap();
    max_scaled_err(got, want, &scale)
}

#[test]
fn general_matmul_forward_and_both_gradients() {
    let mut r = rng(8);
    // Attention as the model computes it: q [b, kv heads, rep*t, hd] @ k^T (a transposed view),
    // then P [b, kv, rep*t, t] @ v [b, kv, t, hd]; and LoRA's skinny products.
    let q = rand_tensor(&mut r, &[2, 5, 3 * 37, 64], 1.0);
    let k = rand_tensor(&mut r, &[2, 5, 37, 64], 1.0);
    let p = rand_tensor(&mut r, &[2, 5, 3 * 37, 37], 1.0);
    let v = rand_tensor(&mut r, &[2, 5, 37, 64], 1.0);
    let x = rand_tensor(&mut r, &[77, 960], 1.0);
    let la = rand_tensor(&mut r, &[16, 960], 0.03);
    let h = rand_tensor(&mut r, &[77, 16], 1.0);
    let lb = rand_tensor(&mut r, &[960, 16], 0.03);
    let kt = k.t().unwrap();
    let lat = la.t().unwrap();
    let lbt = lb.t().unwrap();
    let cases: [(&str, &Tensor, &Tensor); 4] = [
        ("q @ k^T", &q, &kt),
        ("P @ v", &p, &v),
        ("x @ A^T", &x, &lat),
        ("h @ B^T", &h, &lbt),
    ];
    for (name, a, b) in cases {
        let want = a.matmul(b).unwrap();
        let got = matmul_with(a, b, GemmMode::Candle).unwrap();
        assert_eq!(f64v(&got), f64v(&want), "{name}: candle mode");
        // Gradients of sum(y * g) through candle's backprop, against candle's matmul backward.
        let g = rand_tensor(&mut r, want.dims(), 1.0);
        let grads = |mode: Option<GemmMode>| {
            let av = Var::from_tensor(&a.contiguous().unwrap()).unwrap();
            let bv = Var::from_tensor(&b.contiguous().unwrap()).unwrap();
            // Keep b's transposed layout when it had one: that is the path the model takes.
            let bt = if b.is_contiguous() {
                bv.as_tensor().clone()
            } else {
                bv.as_tensor()
                    .t()
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .t()
                    .unwrap()
            };
            let y = match mode {
                Some(m) => matmul_with(av.as_tensor(), &bt, m).unwrap(),
                None => av.as_tensor().matmul(&bt).unwrap(),
            };
            let gs = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            (
                y,
                gs.get(av.as_tensor()).unwrap().clone(),
                gs.get(bv.as_tensor()).unwrap().clone(),
            )
        };
        let (y0, da0, db0) = grads(None);
        for mode in [GemmMode::F32, GemmMode::Bf16] {
            let tol = if mode == GemmMode::Bf16 {
                BF16_WORST + F32_TOL
            } else {
                F32_TOL
            };
            let (y, da, db) = grads(Some(mode));
            let e = batched_scaled_err(&y, &y0, a, b);
            assert!(e < tol, "{name} {mode}: forward {e:e}");
            let e = batched_scaled_err(&da, &da0, &g, &b.t().unwrap());
            assert!(e < tol, "{name} {mode}: da {e:e}");
            let e = batched_scaled_err(&db, &db0, &a.t().unwrap(), &g);
            assert!(e < tol, "{name} {mode}: db {e:e}");
            if mode == GemmMode::Bf16 {
                for (what, got, want) in [("y", &y, &y0), ("da", &da, &da0), ("db", &db, &db0)] {
                    let fr = frob_rel(got, want);
                    assert!(fr < BF16_FROB, "{name}: bf16 {what} Frobenius {fr:e}");
                    // Rounding leaves a trace: a zero difference would mean candle ran instead.
                    assert!(fr > 1e-4, "{name}: bf16 {what} equals f32 ({fr:e})");
                }
            }
        }
    }
}

#[test]
fn bf16_weights_are_used_as_they_are() {
    // Frozen weights may be held in bf16 (half the memory); activations stay f32.
    let mut r = rng(9);
    let x = rand_tensor(&mut r, &[M, 320], 1.0);
    let w32 = round_tensor(&rand_tensor(&mut r, &[96, 320], 0.05));
    let w16 = w32.to_dtype(DType::BF16).unwrap();
    let g = rand_tensor(&mut r, &[M, 96], 1.0);
    // Every mode accepts them; outside bf16 mode they are widened: exactly the f32 result.
    for mode in [GemmMode::Candle, GemmMode::F32, GemmMode::Bf16] {
        let (y16, dx16, w_grad) = backprop(&x, &w16, &g, mode);
        assert!(!w_grad);
        assert_eq!(y16.dtype(), DType::F32);
        let (y32, dx32, _) = backprop(&x, &w32, &g, mode);
        // Same operands either way (w32 holds bf16 values): the same computation.
        assert_eq!(f64v(&y16), f64v(&y32), "{mode}: forward");
        assert_eq!(f64v(&dx16), f64v(&dx32), "{mode}: input gradient");
    }
    // A bf16 weight given as a transposed (column-major) view is read in place, same result.
    let view = w16.t().unwrap().contiguous().unwrap().t().unwrap();
    let (yv, dxv, _) = backprop(&x, &view, &g, GemmMode::Bf16);
    let (y16, dx16, _) = backprop(&x, &w16, &g, GemmMode::Bf16);
    let scale = abs_scale(&x, &w32);
    assert!(max_scaled_err(&yv, &y16, &scale) < F32_TOL);
    let scale = abs_scale(&g, &w32.t().unwrap());
    assert!(max_scaled_err(&dxv, &dx16, &scale) < F32_TOL);
}

#[test]
fn add_product_accumulates_the_lora_branch() {
    // acc + h @ b^T, accumulated in place by the library (beta = 1) when it is loaded.
    let mut r = rng(21);
    let acc = rand_tensor(&mut r, &[M, 96], 1.0);
    let h = rand_tensor(&mut r, &[M, 16], 1.0);
    let b = rand_tensor(&mut r, &[96, 16], 0.1);
    let want = (acc.to_dtype(DType::F64).unwrap()
        + h.to_dtype(DType::F64)
            .unwrap()
            .matmul(&b.to_dtype(DType::F64).unwrap().t().unwrap())
            .unwrap())
    .unwrap();
    let scale = (abs_scale(&h, &b) + acc.abs().unwrap().to_dtype(DType::F64).unwrap()).unwrap();
    let got = kto_train::kernels::products::add_product(acc.copy().unwrap(), &h, &b, GemmMode::F32)
        .unwrap();
    let err = max_scaled_err(&got, &want.to_dtype(DType::F32).unwrap(), &scale);
    assert!(err < F32_TOL, "add_product: {err:e}");
}

/// Random op(A) [m, k] and op(B) [k, n] in [-1, 1), stored row-major (their transposes when
/// `ta` / `tb`) with leading dimensions wider than their rows by the given padding.
struct Operands {
    a: Vec<f32>,
    b: Vec<f32>,
    ta: bool,
    tb: bool,
    lda: usize,
    ldb: usize,
}

impl Operands {
    fn random(
        r: &mut rand_chacha::ChaCha8Rng,
        (m, n, k): (usize, usize, usize),
        (ta, tb): (bool, bool),
        (pad_a, pad_b): (usize, usize),
    ) -> Self {
        let (ar, ac) = if ta { (k, m) } else { (m, k) };
        let (br, bc) = if tb { (n, k) } else { (k, n) };
        let (lda, ldb) = (ac + pad_a, bc + pad_b);
        let a = (0..ar * lda).map(|_| r.random_range(-1.0..1.0)).collect();
        let b = (0..br * ldb).map(|_| r.random_range(-1.0..1.0)).collect();
        Operands {
            a,
            b,
            ta,
            tb,
            lda,
            ldb,
        }
    }

    /// op(A)[i, j]
    fn at(&self, i: usize, j: usize) -> f32 {
        if self.ta {
            self.a[j * self.lda + i]
        } else {
            self.a[i * self.lda + j]
        }
    }

    /// op(B)[i, j]
    fn bt(&self, i: usize, j: usize) -> f32 {
        if self.tb {
            self.b[j * self.ldb + i]
        } else {
            self.b[i * self.ldb + j]
        }
    }

    fn refs(&self) -> (gemm::MatRef<'_, f32>, gemm::MatRef<'_, f32>) {
        let a = gemm::MatRef {
            data: &self.a[..],
            trans: self.ta,
            ld: self.lda,
        };
        let b = gemm::MatRef {
            data: &self.b[..],
            trans: self.tb,
            ld: self.ldb,
        };
        (a, b)
    }
}

/// The raw products against an f64 reference on odd shapes: m and n below and across the
/// kernels' block sizes, odd k (a half-filled last pair), k longer than one pass over k, leading
/// dimensions wider than the operand, and every transpose combination.
#[test]
fn raw_products_match_f64_on_odd_shapes() {
    let mut r = rng(11);
    let shapes = [
        (1, 1, 1),
        (3, 17, 5),
        (13, 33, 7),
        (25, 65, 385),
        (97, 257, 129),
        (12, 32, 1000),
        // One dimension of at most 16 (LoRA's rank): n, m, k.
        (45, 13, 300),
        (130, 16, 77),
        (16, 200, 77),
        (9, 1000, 3),
        (70, 150, 16),
        (33, 47, 5),
        // A B above the tile kernel's 16 MiB packed size, where its tasks go by B columns:
        // one orientation, the frozen-weight one (x @ w^T), to keep the f64 reference short.
        (37, 131_101, 70),
    ];
    for (m, n, k) in shapes {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            if m * n * k > 100_000_000 && (ta, tb) != (false, true) {
                continue;
            }
            let ops = Operands::random(&mut r, (m, n, k), (ta, tb), (3, 5));
            let (a, b, lda, ldb) = (&ops.a, &ops.b, ops.lda, ops.ldb);
            let (at, bt) = (|i, j| ops.at(i, j), |i, j| ops.bt(i, j));
            let a16: Vec<bf16> = a.iter().map(|&v| gemm::round_bf16(v)).collect();
            let b16: Vec<bf16> = b.iter().map(|&v| gemm::round_bf16(v)).collect();
            let mut c32 = vec![f32::NAN; m * n];
            let mut c16 = vec![f32::NAN; m * n];
            let (a32, b32) = ops.refs();
            let (a_16, b_16) = (
                gemm::MatRef {
                    data: &a16[..],
                    trans: ta,
                    ld: lda,
                },
                gemm::MatRef {
                    data: &b16[..],
                    trans: tb,
                    ld: ldb,
                },
            );
            gemm::sgemm(m, n, k, a32, b32, &mut c32).unwrap();
            gemm::gemm_bf16(m, n, k, a_16, b_16, &mut c16).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let (mut want, mut want16, mut scale) = (0.0f64, 0.0f64, 0.0f64);
                    for l in 0..k {
                        let (x, y) = (at(i, l) as f64, bt(l, j) as f64);
                        want += x * y;
                        want16 += gemm::round_bf16(at(i, l)).to_f64()
                            * gemm::round_bf16(bt(l, j)).to_f64();
                        scale += (x * y).abs();
                    }
                    let e32 = (c32[i * n + j] as f64 - want).abs() / scale;
                    let e16 = (c16[i * n + j] as f64 - want16).abs() / scale;
                    assert!(
                        e32 < F32_TOL && e16 < F32_TOL,
                        "{m}x{n}x{k} ta={ta} tb={tb} at ({i},{j}): f32 {e32:e}, bf16 {e16:e}"
                    );
                }
            }
        }
    }
}

/// The f32 kernel for products with a small side (src/kernels/gemm/small.rs: LoRA's rank,
/// attention's head width) against f64, at the edges of its tiles: output widths around its
/// one to four vectors (16, 32, 48, 64) and past them (several column panels, a partial last
/// one), inner dimensions from 1 to past 64, rows around its 6, 8, 12 and 16-row tiles (a
/// partial last block, which a transposed A reads from a padded copy), products small enough
/// to run on one thread and large enough to be shared, every transpose combination (a
/// transposed B is copied to rows first). Each value is one FMA chain whichever thread ran it:
/// two runs agree bit for bit. Then the accumulating form (beta = 1) through `add_product`.
/// With another engine (oneDNN), or without AVX-512, the same products run there and must
/// agree all the same.
#[test]
fn small_side_products_match_f64() {
    let mut r = rng(12);
    let shapes = [
        // n <= 64 (one panel of 1-4 vectors), rows across the tile heights
        (1, 1, 1),
        (5, 16, 40),
        (13, 15, 961),
        (17, 17, 3),
        (25, 32, 100),
        (23, 33, 64),
        (9, 48, 65),
        (31, 49, 130),
        (7, 64, 7),
        (326, 16, 576),
        (489, 64, 163),
        // k <= 64, n past 64: several panels, the last partial
        (13, 65, 16),
        (326, 960, 16),
        (489, 163, 64),
        (6, 200, 1),
        // m <= 16, n and k large: the weight gradient dA = dh^T x
        (16, 960, 326),
        (3, 130, 200),
    ];
    for (m, n, k) in shapes {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let ops = Operands::random(&mut r, (m, n, k), (ta, tb), (1, 2));
            let (at, bt) = (|i, j| ops.at(i, j), |i, j| ops.bt(i, j));
            let (pa, pb) = ops.refs();
            let mut c = vec![f32::NAN; m * n];
            let mut again = vec![f32::NAN; m * n];
            gemm::sgemm(m, n, k, pa, pb, &mut c).unwrap();
            gemm::sgemm(m, n, k, pa, pb, &mut again).unwrap();
            assert!(
                c.iter()
                    .zip(&again)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{m}x{n}x{k} ta={ta} tb={tb}: two runs differ"
            );
            for i in 0..m {
                for j in 0..n {
                    let (mut want, mut scale) = (0.0f64, 0.0f64);
                    for l in 0..k {
                        let p = at(i, l) as f64 * bt(l, j) as f64;
                        want += p;
                        scale += p.abs();
                    }
                    let err = (c[i * n + j] as f64 - want).abs() / scale.max(1e-30);
                    assert!(
                        err < F32_TOL,
                        "{m}x{n}x{k} ta={ta} tb={tb} at ({i},{j}): {} vs {want}: {err:e}",
                        c[i * n + j]
                    );
                }
            }
        }
    }
    // acc + h @ b^T accumulated in place (beta = 1): rank-16 and rank-64 branches, odd widths.
    for (m, n, rank) in [(7, 96, 16), (45, 163, 16), (326, 576, 16), (13, 65, 64)] {
        let acc = rand_tensor(&mut r, &[m, n], 1.0);
        let h = rand_tensor(&mut r, &[m, rank], 1.0);
        let b = rand_tensor(&mut r, &[n, rank], 0.1);
        let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let want = (f64_of(&acc) + f64_of(&h).matmul(&f64_of(&b).t().unwrap()).unwrap()).unwrap();
        let scale = (abs_scale(&h, &b) + f64_of(&acc.abs().unwrap())).unwrap();
        let got =
            kto_train::kernels::products::add_product(acc.copy().unwrap(), &h, &b, GemmMode::F32)
                .unwrap();
        let err = max_scaled_err(&got, &want.to_dtype(DType::F32).unwrap(), &scale);
        assert!(err < F32_TOL, "add_product {m}x{n} rank {rank}: {err:e}");
    }
}

/// CI runs this suite a second time with `KTO_TRAIN_GEMM_ENGINE=library` in a `fast-gemm` build:
/// then the library must really be the engine, or that run would silently test gemmkit again.
#[test]
fn the_engine_asked_for_is_the_one_that_runs() {
    let asked = std::env::var(gemm::ENGINE_ENV).unwrap_or_default();
    let name = gemm::engine_name();
    if asked == "library" && cfg!(feature = "fast-gemm") {
        assert!(
            name.starts_with("oneDNN") || name.starts_with("MKL"),
            "library asked for, but the products run on {name} ({:?})",
            gemm::load_error()
        );
    } else if asked == "gemmkit" || !cfg!(feature = "fast-gemm") {
        assert!(name.starts_with("gemmkit"), "{name}");
    }
    println!("engine: {name}");
}
