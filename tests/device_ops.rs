//! The fused ops on the test device (`KTO_TRAIN_TEST_DEVICE=cuda`: the kernels of
//! src/kernels/cuda) against the same ops on the CPU, forward and backward, in f32 and bf16
//! storage. On the CPU (the default) there is nothing to compare and the tests say so;
//! scripts/gpu-check.sh runs them on a GPU. The kernel source itself is also checked without a
//! GPU, in tests/cuda_kernel_source.rs.
mod common;

use candle_core::{DType, Device, Tensor, Var};
use kto_train::kernels::fused;
use rand::{Rng, SeedableRng};

fn device() -> Option<Device> {
    let d = common::test_device();
    if d.is_cpu() {
        eprintln!(
            "NOTICE: KTO_TRAIN_TEST_DEVICE is the CPU; the device-op comparisons are skipped"
        );
        return None;
    }
    Some(d)
}

fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `t` as stored in `dtype` (bf16: rounded), in f32 on the CPU.
fn stored(t: &Tensor, dtype: DType) -> Tensor {
    t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap()
}

fn back(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// f32: |device - CPU| <= 2e-5 (|CPU| + floor). bf16: the device stores every intermediate in
/// bf16 where the CPU keeps f32 (2^-9 relative each), so the bound is 1e-2 relative plus 4e-3
/// of the tensor's largest magnitude (cancellations such as g - sum(g p) lose relative digits).
fn assert_close(what: &str, dtype: DType, got: &Tensor, want: &Tensor, floor: f32) {
    let (g, w) = (back(got), back(want));
    assert_eq!(g.len(), w.len(), "{what}: length");
    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let bound = if dtype == DType::BF16 {
            1e-2 * b.abs() + 4e-3 * scale
        } else {
            2e-5 * (b.abs() + floor)
        };
        assert!(
            (a - b).abs() <= bound,
            "{what} ({dtype:?}): element {i}: device {a}, CPU {b}"
        );
    }
}

/// f(inputs) and d sum(f * g) / d inputs[0], on `dev` in `dtype` and on the CPU in f32 over the
/// same stored values.
fn compare(
    what: &str,
    dev: &Device,
    inputs: &[Tensor],
    g: &Tensor,
    floor: f32,
    f: impl Fn(&[Tensor]) -> Tensor,
) {
    for dtype in [DType::F32, DType::BF16] {
        let cpu: Vec<Tensor> = inputs.iter().map(|t| stored(t, dtype)).collect();
        let on: Vec<Tensor> = cpu
            .iter()
            .map(|t| t.to_dtype(dtype).unwrap().to_device(dev).unwrap())
            .collect();
        let (xc, xd) = (
            Var::from_tensor(&cpu[0]).unwrap(),
            Var::from_tensor(&on[0]).unwrap(),
        );
        let mut ac = cpu.clone();
        ac[0] = xc.as_tensor().clone();
        let mut ad = on.clone();
        ad[0] = xd.as_tensor().clone();
        let (yc, yd) = (f(&ac), f(&ad));
        assert_close(what, dtype, &yd, &yc, floor);
        let gc = stored(g, dtype);
        let gd = gc.to_dtype(dtype).unwrap().to_device(dev).unwrap();
        let dc = (yc * gc).unwrap().sum_all().unwrap().backward().unwrap();
        let dd = (yd * gd).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(
            &format!("{what} backward"),
            dtype,
            dd.get(xd.as_tensor()).unwrap(),
            dc.get(xc.as_tensor()).unwrap(),
            floor.max(1e-2),
        );
    }
}

#[test]
fn rms_norm_on_the_device_matches_the_cpu() {
    let Some(dev) = device() else { return };
    for (rows, h) in [(3, 7), (5, 600), (16, 960)] {
        let x = random(&[rows, h], 1, 2.0);
        let w = random(&[h], 2, 1.5);
        compare(
            "rms_norm",
            &dev,
            &[x, w],
            &random(&[rows, h], 3, 1.0),
            1e-3,
            |a| fused::rms_norm(&a[0], &a[1], 1e-5).unwrap(),
        );
    }
}

#[test]
fn rope_on_the_device_matches_the_cpu() {
    let Some(dev) = device() else { return };
    let (lead, t, d) = (6, 9, 64);
    let ang = random(&[t, d], 4, 3.0);
    let (c, s) = (ang.cos().unwrap(), ang.sin().unwrap());
    compare(
        "rope",
        &dev,
        &[random(&[lead, t, d], 5, 1.0), c, s],
        &random(&[lead, t, d], 6, 1.0),
        1e-2,
        |a| fused::rope(&a[0], &a[1], &a[2]).unwrap(),
    );
}

#[test]
fn causal_softmax_on_the_device_matches_the_cpu() {
    let Some(dev) = device() else { return };
    for (rows_per_lead, t_q, offset) in [(15, 5, 0), (8, 4, 3), (600, 300, 20)] {
        let tk = t_q + offset;
        compare(
            "causal_softmax",
            &dev,
            &[random(&[2, rows_per_lead, tk], 7, 4.0)],
            &random(&[2, rows_per_lead, tk], 8, 1.0),
            1e-4,
            |a| fused::causal_softmax(&a[0], 0.125, t_q, offset).unwrap(),
        );
    }
}

#[test]
fn swiglu_and_masks_on_the_device_match_the_cpu() {
    let Some(dev) = device() else { return };
    let shape = [7, 1001];
    let (g, u) = (random(&shape, 9, 6.0), random(&shape, 10, 2.0));
    let o = random(&shape, 11, 1.0);
    compare(
        "silu_mul (d/dg)",
        &dev,
        &[g.clone(), u.clone()],
        &o,
        1e-3,
        |a| fused::silu_mul(&a[0], &a[1]).unwrap(),
    );
    compare(
        "silu_mul (d/du)",
        &dev,
        &[u.clone(), g.clone()],
        &o,
        1e-3,
        |a| fused::silu_mul(&a[1], &a[0]).unwrap(),
    );
    compare("mul_const", &dev, &[g, u], &o, 1e-3, |a| {
        fused::mul_const(&a[0], &a[1]).unwrap()
    });
}

#[test]
fn log_softmax_gather_on_the_device_matches_the_cpu() {
    let Some(dev) = device() else { return };
    let (rows, v) = (6, 49152);
    let targets: Vec<u32> = vec![0, 49151, 517, 3, 20000, 1];
    compare(
        "log_softmax_gather",
        &dev,
        &[random(&[rows, v], 12, 8.0)],
        &random(&[rows], 13, 1.0),
        1.0,
        |a| {
            let t = Tensor::from_vec(targets.clone(), rows, a[0].device()).unwrap();
            fused::log_softmax_gather(&a[0], &t).unwrap()
        },
    );
}

#[test]
fn dropout_masks_on_the_device_are_the_cpu_values() {
    let Some(dev) = device() else { return };
    for dtype in [DType::F32, DType::BF16] {
        let like = Tensor::zeros(1, dtype, &dev).unwrap();
        let on = fused::dropout_mask((37, 1001), &like, 42, 0.05).unwrap();
        let cpu = fused::dropout_mask((37, 1001), &like.to_device(&Device::Cpu).unwrap(), 42, 0.05)
            .unwrap();
        assert_eq!(back(&on), back(&cpu), "{dtype:?}");
    }
}
