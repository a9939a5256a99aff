//! The fused CPU ops (src/kernels/fused.rs) against candle's composite forms, through the whole
//! network in f64: same log-probs and same gradients for every LoRA tensor.
mod common;
use candle_core::DType;
use common::*;
use kto_train::config::LossConfig;
use kto_train::loss::LossHead;
use kto_train::model::{DropoutKey, Llama, PassMode};
use kto_train::train::step::{run_micro_batch, MicroBatchMode, StepResult};

fn run(model: &Llama, fwd: PassMode) -> StepResult {
    let mut head = LossHead::new(&LossConfig::default());
    let mode = MicroBatchMode {
        policy: fwd,
        kl: fwd,
        step: 0,
        train: true,
    };
    run_micro_batch(model, &mut head, &kto_step_batch(None), mode, None).unwrap()
}

fn compare(fwd: PassMode) {
    let model = tiny_with_peft_dropout(DType::F64, Some(0.1));
    let fused = run(&with_kernels(&model, |k| k.fused_ops = true), fwd);
    let composite = run(&with_kernels(&model, |k| k.fused_ops = false), fwd);
    for (a, b) in fused.logps.policy.iter().zip(&composite.logps.policy) {
        assert!(
            (a - b).abs() < 1e-9,
            "policy log-prob: fused {a}, composite {b}"
        );
    }
    assert!((fused.loss.loss - composite.loss.loss).abs() < 1e-12);
    let (gf, gc) = (fused.grads.unwrap(), composite.grads.unwrap());
    for (path, lin) in model.lora_layers() {
        let lora = lin.lora.as_ref().unwrap();
        for (w, var) in [("A", &lora.a), ("B", &lora.b)] {
            let e = rel_l2(
                gf.get(var.as_tensor()).unwrap(),
                gc.get(var.as_tensor()).unwrap(),
            );
            assert!(
                e < 1e-9,
                "{path}.lora_{w}: fused vs composite gradient, relative error {e}"
            );
        }
    }
}

#[test]
fn fused_ops_match_composite_forms() {
    compare(PassMode::POLICY_EVAL);
}

#[test]
fn fused_ops_match_composite_forms_with_dropout() {
    compare(PassMode::train(DropoutKey { seed: 7, pass: 3 }));
}

/// The ops' f32 exponential against f64's over its whole range, and at the edges.
#[test]
fn exp_f32_matches_f64_exp() {
    use kto_train::kernels::fused::exp_f32;
    let (lo, hi, n) = (-87.3f64, 88.72f64, 2_000_001);
    let mut worst = 0.0f64;
    for i in 0..n {
        let x = (lo + (hi - lo) * i as f64 / (n - 1) as f64) as f32;
        let want = (x as f64).exp();
        let rel = ((exp_f32(x) as f64 - want) / want).abs();
        worst = worst.max(rel);
    }
    // f32's unit roundoff is 6e-8: within three units in the last place.
    assert!(
        worst < 3.0 * f32::EPSILON as f64,
        "worst relative error {worst:e}"
    );
    assert_eq!(exp_f32(0.0), 1.0);
    assert_eq!(exp_f32(-100.0), 0.0);
    assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
    assert_eq!(exp_f32(100.0), f32::INFINITY);
    assert!(exp_f32(f32::NAN).is_nan());
    println!("exp_f32 worst relative error {worst:.2e}");
}

/// The fused ops write their outputs without zero-filling them first, so an input that would
/// leave part of a row unwritten must be refused, not read back as garbage.
#[test]
fn rms_norm_refuses_a_weight_that_does_not_cover_the_row() {
    let dev = candle_core::Device::Cpu;
    let x = candle_core::Tensor::ones((3, 8), candle_core::DType::F32, &dev).unwrap();
    let short = candle_core::Tensor::ones(5, candle_core::DType::F32, &dev).unwrap();
    let err = kto_train::kernels::fused::rms_norm(&x, &short, 1e-6).unwrap_err();
    assert!(err.to_string().contains("weight of 5"), "{err}");
    let w = candle_core::Tensor::ones(8, candle_core::DType::F32, &dev).unwrap();
    assert!(kto_train::kernels::fused::rms_norm(&x, &w, 1e-6).is_ok());
}

/// The residual sum outside the graph equals candle's add bit for bit (one rounding either
/// way), over a length that leaves a partial chunk, in f32 and f64; a tracked operand keeps
/// candle's add, so that the sum stays in the graph.
#[test]
fn add_outside_the_graph_equals_candles_add() {
    use candle_core::{Device, Tensor, Var};
    use kto_train::kernels::fused;
    for dtype in [DType::F32, DType::F64] {
        let n = 3 * 4096 + 17;
        let a = Tensor::randn(0f32, 1.0, (n / 17, 17), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let b = Tensor::randn(0f32, 1.0, (n / 17, 17), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let got = fused::add(&a, &b).unwrap();
        let want = (&a + &b).unwrap();
        assert_eq!(max_abs_diff(&got, &want), 0.0, "{dtype:?}");
        let v = Var::from_tensor(&a).unwrap();
        let y = fused::add(v.as_tensor(), &b).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let ones = a.ones_like().unwrap();
        assert_eq!(max_abs_diff(g.get(v.as_tensor()).unwrap(), &ones), 0.0);
    }
}

/// The head split with RoPE in one pass equals the transposed copy rotated by `fused::rope`,
/// bit for bit, and the merge (with the inverse rotation) brings the projection layout back.
#[test]
fn split_and_merge_heads_equal_the_transposed_copy_and_rope() {
    use candle_core::{Device, Tensor};
    use kto_train::kernels::fused;
    let (b, t, n, d) = (2, 7, 3, 8);
    for dtype in [DType::F32, DType::F64] {
        let x = Tensor::randn(0f32, 1.0, (b, t, n * d), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let angles: Vec<f64> = (0..t * d)
            .map(|i| (i / d) as f64 / 10000f64.powf(2.0 * ((i % d) % (d / 2)) as f64 / d as f64))
            .collect();
        let table = |f: fn(f64) -> f64| {
            Tensor::from_vec(
                angles.iter().map(|&a| f(a)).collect::<Vec<_>>(),
                (t, d),
                &Device::Cpu,
            )
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
        };
        let (cos, sin) = (table(f64::cos), table(f64::sin));
        let copy = x
            .reshape((b, t, n, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let want = fused::rope(&copy, &cos, &sin).unwrap();
        let got = fused::split_heads(&x, n, Some((&cos, &sin))).unwrap();
        assert_eq!(got.dims(), &[b, n, t, d]);
        assert_eq!(max_abs_diff(&got, &want), 0.0, "{dtype:?} split + rope");
        let plain = fused::split_heads(&x, n, None).unwrap();
        assert_eq!(max_abs_diff(&plain, &copy), 0.0, "{dtype:?} split");
        // Back: the inverse rotation, then the projection layout.
        let back = fused::merge_heads(&got, Some((&cos, &sin.neg().unwrap()))).unwrap();
        assert_eq!(back.dims(), &[b, t, n * d]);
        assert!(
            max_abs_diff(&back, &x) < 1e-5,
            "{dtype:?} merge undoes split"
        );
        let want_back = fused::rope(&got, &cos, &sin.neg().unwrap())
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b, t, n * d))
            .unwrap();
        assert_eq!(
            max_abs_diff(&back, &want_back),
            0.0,
            "{dtype:?} merge + rope"
        );
    }
}
