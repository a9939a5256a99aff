//! Attention in query-row chunks (long sequences: no T x T probabilities kept) against the
//! whole-matrix node: forward and all three gradients, with grouped heads, a cached-prompt
//! offset and chunks that split a head's rows unevenly; and both against an f64 softmax written
//! out here.
use candle_core::{DType, Device, Tensor, Var};
use kto_train::kernels::attention::causal_attention_within;
use kto_train::kernels::GemmMode;

mod common;
use common::max_abs_diff;

fn rand(dims: &[usize], seed: u64) -> Tensor {
    // A fixed pseudo-random fill (splitmix64), so the test needs no RNG crate state.
    let n: usize = dims.iter().product();
    let mut x = seed;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) as f64 / u64::MAX as f64 * 2.0 - 1.0) as f32
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// The node's output and the gradients of q, k, v for the output gradient `g`.
#[allow(clippy::too_many_arguments)]
fn run(
    [q, k, v]: [&Var; 3],
    g: &Tensor,
    scale: f64,
    t_q: usize,
    offset: usize,
    mode: GemmMode,
    budget: usize,
) -> [Tensor; 4] {
    let out = causal_attention_within(
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        scale,
        t_q,
        offset,
        mode,
        budget,
    )
    .unwrap();
    let grads = (&out * g).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |x: &Var| grads.get(x.as_tensor()).unwrap().clone();
    [out, grad(q), grad(k), grad(v)]
}

/// softmax(scale q k^T + causal mask) v in f64, row r of a head block at position offset + r % t_q.
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, t_q: usize, offset: usize) -> Tensor {
    let (q, k, v) = (
        q.to_dtype(DType::F64).unwrap(),
        k.to_dtype(DType::F64).unwrap(),
        v.to_dtype(DType::F64).unwrap(),
    );
    let s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    let (rows, t_k) = (s.dim(2).unwrap(), s.dim(3).unwrap());
    let mask: Vec<f64> = (0..rows)
        .flat_map(|r| {
            (0..t_k).map(move |j| {
                if j <= offset + r % t_q {
                    0.0
                } else {
                    f64::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (rows, t_k), &Device::Cpu).unwrap();
    let p = candle_nn::ops::softmax_last_dim(&s.broadcast_add(&mask).unwrap()).unwrap();
    p.matmul(&v).unwrap()
}

#[test]
fn chunked_attention_matches_whole_matrix() {
    let (lead0, kvh, n_rep, d) = (2, 3, 3, 16);
    for (t_q, offset) in [(40, 0), (37, 9)] {
        let t_k = t_q + offset;
        let q = Var::from_tensor(&rand(&[lead0, kvh, n_rep * t_q, d], 1)).unwrap();
        let k = Var::from_tensor(&rand(&[lead0, kvh, t_k, d], 2)).unwrap();
        let v = Var::from_tensor(&rand(&[lead0, kvh, t_k, d], 3)).unwrap();
        let g = rand(&[lead0, kvh, n_rep * t_q, d], 4);
        let scale = 1.0 / (d as f64).sqrt();
        let run = |budget| run([&q, &k, &v], &g, scale, t_q, offset, GemmMode::F32, budget);
        let whole = run(usize::MAX);
        // Budget 0: chunks of 16 rows, which split each head's 40 (or 37) rows 16 + 16 + rest.
        let chunked = run(0);
        let want = reference(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            scale,
            t_q,
            offset,
        );
        assert!(
            max_abs_diff(&whole[0], &want) < 1e-5,
            "whole forward vs f64"
        );
        for (what, a, b) in [
            ("forward", &chunked[0], &whole[0]),
            ("dq", &chunked[1], &whole[1]),
            ("dk", &chunked[2], &whole[2]),
            ("dv", &chunked[3], &whole[3]),
        ] {
            let e = max_abs_diff(a, b);
            assert!(
                e < 1e-5,
                "t_q {t_q} offset {offset}: {what} differs by {e:e}"
            );
        }
    }
}

/// Attention and its three input gradients in f64 loops, for q [L, R, d], k and v [L, T_k, d]
/// and the output's gradient g [L, R, d] (all flattened): as bf16 mode computes them when
/// `bf16` (q, k, v and g rounded at each product, the probabilities and their gradient rounded
/// where they are written), else exactly.
#[allow(clippy::too_many_arguments)]
fn model(
    [q, k, v, g]: [&[f32]; 4],
    (l, r, t_k, d): (usize, usize, usize, usize),
    scale: f64,
    t_q: usize,
    offset: usize,
    bf16: bool,
) -> [Vec<f64>; 4] {
    let rd = |x: f64| {
        if bf16 {
            kto_train::kernels::gemm::round_bf16(x as f32).to_f64()
        } else {
            x
        }
    };
    let (mut out, mut dq) = (vec![0.0; l * r * d], vec![0.0; l * r * d]);
    let (mut dk, mut dv) = (vec![0.0; l * t_k * d], vec![0.0; l * t_k * d]);
    for h in 0..l {
        let (qh, gh) = (&q[h * r * d..], &g[h * r * d..]);
        let (kh, vh) = (&k[h * t_k * d..], &v[h * t_k * d..]);
        for i in 0..r {
            let n = (offset + i % t_q + 1).min(t_k);
            let dot = |a: &[f32], b: &[f32]| -> f64 {
                (0..d).map(|c| rd(a[c] as f64) * rd(b[c] as f64)).sum()
            };
            let s: Vec<f64> = (0..n)
                .map(|j| scale * dot(&qh[i * d..], &kh[j * d..]))
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|x| rd(x / z)).collect();
            let dp: Vec<f64> = (0..n).map(|j| dot(&gh[i * d..], &vh[j * d..])).collect();
            let pdp: f64 = (0..n).map(|j| p[j] * dp[j]).sum();
            let ds: Vec<f64> = (0..n).map(|j| rd(scale * p[j] * (dp[j] - pdp))).collect();
            for j in 0..n {
                for c in 0..d {
                    let o = (h * r + i) * d + c;
                    let kv = (h * t_k + j) * d + c;
                    out[o] += p[j] * rd(vh[j * d + c] as f64);
                    dq[o] += ds[j] * rd(kh[j * d + c] as f64);
                    dk[kv] += ds[j] * rd(qh[i * d + c] as f64);
                    dv[kv] += p[j] * rd(gh[i * d + c] as f64);
                }
            }
        }
    }
    [out, dq, dk, dv]
}

/// (largest, mean) absolute difference.
fn errs(a: &Tensor, b: &[f64]) -> (f64, f64) {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let d = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs());
    (
        d.clone().fold(0.0, f64::max),
        d.sum::<f64>() / a.len() as f64,
    )
}

/// In bf16 mode, long sequences' attention products take bf16 operands (f32 accumulation) and
/// the probabilities and their gradient are kept in bf16: the node, whole and in chunks, must be
/// that computation (its f64 model above, to f32 accumulation error), not the exact one. Short
/// ones stay f32: bit for bit the f32 mode's node.
#[test]
fn bf16_attention_rounds_like_its_f64_model() {
    // One head group of 3 query heads over 512 (and 540) keys, d 64: SmolLM2-360M's attention
    // at 512 tokens, at BF16_FROM's side of the rule.
    let (lead0, kvh, n_rep, d) = (1, 1, 3, 64);
    for (t_q, offset) in [(512, 0), (500, 40)] {
        let t_k = t_q + offset;
        assert!(n_rep * t_q * t_k * d >= kto_train::kernels::attention::BF16_FROM);
        let dims_q = [lead0, kvh, n_rep * t_q, d];
        let (q, k, v) = (
            Var::from_tensor(&rand(&dims_q, 11)).unwrap(),
            Var::from_tensor(&rand(&[lead0, kvh, t_k, d], 12)).unwrap(),
            Var::from_tensor(&rand(&[lead0, kvh, t_k, d], 13)).unwrap(),
        );
        let g = rand(&dims_q, 14);
        let scale = 1.0 / (d as f64).sqrt();
        let run = |budget| run([&q, &k, &v], &g, scale, t_q, offset, GemmMode::Bf16, budget);
        let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let (qv, kv, vv, gv) = (flat(&q), flat(&k), flat(&v), flat(&g));
        let shape = (lead0 * kvh, n_rep * t_q, t_k, d);
        let inputs = [&qv[..], &kv[..], &vv[..], &gv[..]];
        let rounded = model(inputs, shape, scale, t_q, offset, true);
        let exact = model(inputs, shape, scale, t_q, offset, false);
        let whole = run(usize::MAX);
        let chunked = run(0);
        for (i, what) in ["forward", "dq", "dk", "dv"].into_iter().enumerate() {
            // The probabilities and dS are rounded from f32 here and from f64 in the model: a
            // value within f32 rounding of a bf16 midpoint rounds apart now and then (one bf16
            // step of one term), so the largest difference is bounded loosely and the mean
            // tightly; no rounding at all would put both near the exact value's.
            let ((max_m, mean_m), (max_x, mean_x)) =
                (errs(&whole[i], &rounded[i]), errs(&whole[i], &exact[i]));
            let e_chunks = max_abs_diff(&chunked[i], &whole[i]);
            eprintln!(
                "t_q {t_q} offset {offset} {what}: vs the bf16 model {max_m:.2e} (mean \
                 {mean_m:.2e}), vs exact {max_x:.2e} (mean {mean_x:.2e}), chunked vs whole \
                 {e_chunks:.2e}"
            );
            assert!(
                mean_m < mean_x / 100.0 && max_m < max_x / 10.0,
                "t_q {t_q} offset {offset}: {what} is {max_m:e} (mean {mean_m:e}) from the bf16 \
                 model, {max_x:e} (mean {mean_x:e}) from the exact value"
            );
            assert!(e_chunks < 1e-5, "{what}: chunked vs whole {e_chunks:e}");
        }
    }
}

/// f32 attention, whole and in chunks, against the exact f64 model: the output and all three
/// gradients. Its products skip what the causal mask zeroes (the small-product kernel: tiles of
/// scores past every row's position, keys past a tile's last position, query rows before a
/// tile's first key, per head block); the shapes put head-block boundaries inside tiles (heads
/// of 29-70 rows against tiles of 6, 8, 12 and 16 rows), more than one 64-key panel, an
/// offset, and d 16 and 64.
#[test]
fn f32_attention_matches_the_exact_model() {
    // (65, 0): the second 64-key column panel starts at key 64, the last position of the row
    // block [60, 66), which crosses from head 0 (positions 60-64) into head 1.
    let shapes = [
        (40, 0, 16, 3),
        (37, 9, 64, 3),
        (29, 3, 16, 5),
        (1, 6, 64, 2),
        (65, 0, 16, 3),
        (70, 5, 64, 2),
    ];
    for (t_q, offset, d, n_rep) in shapes {
        let (lead0, kvh) = (2, 2);
        let t_k = t_q + offset;
        let dims_q = [lead0, kvh, n_rep * t_q, d];
        let (q, k, v) = (
            Var::from_tensor(&rand(&dims_q, 31)).unwrap(),
            Var::from_tensor(&rand(&[lead0, kvh, t_k, d], 32)).unwrap(),
            Var::from_tensor(&rand(&[lead0, kvh, t_k, d], 33)).unwrap(),
        );
        let g = rand(&dims_q, 34);
        let scale = 1.0 / (d as f64).sqrt();
        let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let (qv, kv, vv, gv) = (flat(&q), flat(&k), flat(&v), flat(&g));
        let shape = (lead0 * kvh, n_rep * t_q, t_k, d);
        let exact = model([&qv, &kv, &vv, &gv], shape, scale, t_q, offset, false);
        for budget in [usize::MAX, 0] {
            let got = run([&q, &k, &v], &g, scale, t_q, offset, GemmMode::F32, budget);
            for (i, what) in ["forward", "dq", "dk", "dv"].into_iter().enumerate() {
                let (max, _) = errs(&got[i], &exact[i]);
                assert!(
                    max < 2e-5,
                    "t_q {t_q} offset {offset} d {d} budget {budget}: {what} off by {max:e}"
                );
            }
        }
    }
}

#[test]
fn short_attention_stays_f32_in_bf16_mode() {
    let (t_q, offset, d) = (40, 9, 32);
    let q = rand(&[2, 2, 3 * t_q, d], 21);
    let k = rand(&[2, 2, t_q + offset, d], 22);
    let v = rand(&[2, 2, t_q + offset, d], 23);
    let run =
        |mode| causal_attention_within(&q, &k, &v, 0.125, t_q, offset, mode, usize::MAX).unwrap();
    assert_eq!(max_abs_diff(&run(GemmMode::Bf16), &run(GemmMode::F32)), 0.0);
}
