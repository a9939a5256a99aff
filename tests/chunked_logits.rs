//! Token log-probs through the output layer in row chunks (src/kernels/logits.rs) give the log-probs,
//! logit sums and input gradients of the plain graph (logits kept whole), and closed-form values
//! computed in f64; a whole KTO step with every row its own chunk gives the plain step's loss
//! and LoRA gradients.
mod common;
use candle_core::{DType, Device, Tensor, Var, D};
use common::*;
use kto_train::kernels::gemm::GemmMode;
use kto_train::kernels::{fused, logits, products};
use rand::{Rng, SeedableRng};

/// (log-probs, logit sums, d(sum g * logp)/dh) by the plain graph or in chunks of `chunk` rows.
fn run(
    h: &Tensor,
    w: &Tensor,
    t: &Tensor,
    g: &Tensor,
    mode: GemmMode,
    chunk: Option<usize>,
) -> (Tensor, Vec<f64>, Tensor) {
    let v = Var::from_tensor(h).unwrap();
    let (lp, sums) = match chunk {
        Some(c) => {
            let (lp, s) = logits::token_logps(v.as_tensor(), w, t, mode, c, true).unwrap();
            (lp, s.unwrap())
        }
        None => {
            let l = products::frozen_linear(v.as_tensor(), w, mode).unwrap();
            let s = l
                .to_dtype(DType::F64)
                .unwrap()
                .sum(D::Minus1)
                .unwrap()
                .to_vec1()
                .unwrap();
            (fused::log_softmax_gather(&l, t).unwrap(), s)
        }
    };
    let grads = (&lp * g).unwrap().sum_all().unwrap().backward().unwrap();
    let dh = grads.get(v.as_tensor()).unwrap().clone();
    (lp, sums, dh)
}

#[test]
fn chunked_rows_equal_the_plain_graph_and_closed_form() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let (n, hid, vocab) = (37, 24, 101);
    let h = rand_tensor(&mut rng, &[n, hid], 1.0);
    let w = rand_tensor(&mut rng, &[vocab, hid], 0.5);
    let targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
    let t = Tensor::from_vec(targets.clone(), n, &Device::Cpu).unwrap();
    let g = rand_tensor(&mut rng, &[n], 1.0);

    // Closed form in f64: logp = z_t - logsumexp(z), d/dh = g (w_t - sum_j softmax_j w_j).
    let (hv, wv, gv) = (
        h.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap(),
        w.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap(),
        g.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap(),
    );
    let mut want_lp = Vec::new();
    let mut want_sum = Vec::new();
    let mut want_dh = Vec::new();
    for i in 0..n {
        let z: Vec<f64> = wv
            .iter()
            .map(|wr| wr.iter().zip(&hv[i]).map(|(a, b)| a * b).sum())
            .collect();
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        want_lp.push(z[targets[i] as usize] - lse);
        want_sum.push(z.iter().sum::<f64>());
        let mut d = wv[targets[i] as usize].clone();
        for (j, wr) in wv.iter().enumerate() {
            let p = (z[j] - lse).exp();
            for (dk, wk) in d.iter_mut().zip(wr) {
                *dk -= p * wk;
            }
        }
        want_dh.extend(d.iter().map(|x| x * gv[i]));
    }

    for mode in [GemmMode::F32, GemmMode::Bf16, GemmMode::Candle] {
        let (lp0, s0, dh0) = run(&h, &w, &t, &g, mode, None);
        // Closed form: f32 (bf16 operands in Bf16 mode) against f64.
        let tol = if mode == GemmMode::Bf16 { 5e-2 } else { 1e-4 };
        let lp0v = lp0.to_vec1::<f32>().unwrap();
        let dh0v = dh0.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in 0..n {
            assert!(
                (lp0v[i] as f64 - want_lp[i]).abs() < tol,
                "{mode:?} row {i}: {} vs {}",
                lp0v[i],
                want_lp[i]
            );
            assert!((s0[i] - want_sum[i]).abs() < tol * 10.0);
        }
        for (a, b) in dh0v.iter().zip(&want_dh) {
            assert!((*a as f64 - b).abs() < tol, "{mode:?} dh {a} vs {b}");
        }
        for chunk in [1, 5, 36, 37, 64] {
            let (lp, s, dh) = run(&h, &w, &t, &g, mode, Some(chunk));
            let (e_lp, e_dh) = (max_abs_diff(&lp, &lp0), max_abs_diff(&dh, &dh0));
            let e_s = s
                .iter()
                .zip(&s0)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            if chunk >= n {
                // One chunk: the very products of the plain graph.
                assert_eq!((e_lp, e_dh, e_s), (0.0, 0.0, 0.0), "{mode:?} chunk {chunk}");
            } else {
                assert!(
                    e_lp < 1e-5 && e_dh < 1e-5 && e_s < 1e-4,
                    "{mode:?} chunk {chunk}: {e_lp:e} {e_dh:e} {e_s:e}"
                );
            }
        }
    }
}

#[test]
fn a_step_with_one_row_per_chunk_equals_the_plain_step() {
    let loss = "loss_type = \"enhanced_kto\"\nbeta = 0.1";
    let model = tiny_with_peft_dropout(DType::F32, Some(0.1));
    // The only test of this binary that sets the process-wide threshold.
    let (loss_plain, g_plain) = dropout_step(&model, loss);
    let before = logits::chunked_passes();
    logits::set_keep_mb(0);
    let (loss_chunked, g_chunked) = dropout_step(&model, loss);
    logits::set_keep_mb(64);
    // Policy, KL and reference passes.
    assert!(
        logits::chunked_passes() >= before + 3,
        "the chunked path did not run"
    );
    assert!(
        (loss_plain - loss_chunked).abs() <= 1e-6 * loss_plain.abs().max(1.0),
        "loss {loss_plain} vs {loss_chunked}"
    );
    assert_lora_grads_close(&model, &g_plain, &g_chunked, 1e-5);
}
