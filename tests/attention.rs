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
        let run = |budget: usize| {
            let out = causal_attention_within(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                scale,
                t_q,
                offset,
                GemmMode::F32,
                budget,
            )
            .unwrap();
            let grads = (&out * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = |x: &Var| grads.get(x.as_tensor()).unwrap().clone();
            (out, grad(&q), grad(&k), grad(&v))
        };
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
        assert!(max_abs_diff(&whole.0, &want) < 1e-5, "whole forward vs f64");
        for (what, a, b) in [
            ("forward", &chunked.0, &whole.0),
            ("dq", &chunked.1, &whole.1),
            ("dk", &chunked.2, &whole.2),
            ("dv", &chunked.3, &whole.3),
        ] {
            let e = max_abs_diff(a, b);
            assert!(
                e < 1e-5,
                "t_q {t_q} offset {offset}: {what} differs by {e:e}"
            );
        }
    }
}
