//! The block attention node (projection outputs in, o_proj's input out) against the same
//! computation as separate graph ops (head split, RoPE, per-sequence narrows and attention
//! nodes, concatenation), bit for bit in its value and its three input gradients, and both
//! against an f64 attention written out here with each sequence masked to itself.
use candle_core::{DType, Device, Tensor, Var};
use kto_train::kernels::attention::causal_attention_within;
use kto_train::kernels::fused;
use kto_train::kernels::self_attention::{self_attention, Heads, PassAttention};
use kto_train::kernels::GemmMode;

mod common;
use common::max_abs_diff;

fn rand(dims: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n: usize = dims.iter().product();
    let mut x = seed;
    let v: Vec<f64> = (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as f64 / u64::MAX as f64 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// RoPE tables [T, d] for each position of `positions` (theta 10000, halves repeated).
fn tables(positions: &[usize], d: usize, dtype: DType) -> (Tensor, Tensor) {
    let half = d / 2;
    let angle = |p: usize, i: usize| p as f64 / 10000f64.powf(2.0 * (i % half) as f64 / d as f64);
    let (mut c, mut s) = (Vec::new(), Vec::new());
    for &p in positions {
        for i in 0..d {
            c.push(angle(p, i).cos());
            s.push(angle(p, i).sin());
        }
    }
    let t = |v: Vec<f64>| {
        Tensor::from_vec(v, (positions.len(), d), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    (t(c), t(s))
}

struct Case {
    b: usize,
    packed: Vec<usize>,
    heads: Heads,
}

impl Case {
    fn t(&self) -> usize {
        if self.packed.is_empty() {
            9
        } else {
            self.packed.iter().sum()
        }
    }

    /// Each sequence's (batch row, first token, length).
    fn sequences(&self) -> Vec<(usize, usize, usize)> {
        if self.packed.is_empty() {
            return (0..self.b).map(|r| (r, 0, self.t())).collect();
        }
        let mut start = 0;
        self.packed
            .iter()
            .map(|&len| {
                start += len;
                (0, start - len, len)
            })
            .collect()
    }

    fn positions(&self) -> Vec<usize> {
        if self.packed.is_empty() {
            return (0..self.t()).collect();
        }
        self.packed.iter().flat_map(|&n| 0..n).collect()
    }
}

/// x [B, T, n * d] as [B, n, T, d], by candle's transposed copy.
fn to_heads(x: &Tensor, n: usize, d: usize) -> Tensor {
    let (b, t, _) = x.dims3().unwrap();
    x.reshape((b, t, n, d))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
}

/// The same attention as separate graph ops, the way a block composed it before the node.
fn separate_ops(
    [q, k, v]: [&Tensor; 3],
    case: &Case,
    cos: &Tensor,
    sin: &Tensor,
    budget: usize,
) -> Tensor {
    let Heads {
        heads: nh,
        kv_heads: nkv,
        head_dim: hd,
    } = case.heads;
    let (b, t, group) = (case.b, case.t(), nh / nkv);
    let split = |x: &Tensor, n: usize| to_heads(x, n, hd);
    let qh = fused::rope(&split(q, nh), cos, sin).unwrap();
    let kh = fused::rope(&split(k, nkv), cos, sin).unwrap();
    let vh = split(v, nkv);
    let scale = 1.0 / (hd as f64).sqrt();
    let attend = |q: &Tensor, k: &Tensor, v: &Tensor, len| {
        causal_attention_within(q, k, v, scale, len, 0, GemmMode::F32, budget).unwrap()
    };
    let y = if case.packed.is_empty() {
        let qs = qh.reshape((b, nkv, group * t, hd)).unwrap();
        attend(&qs, &kh, &vh, t).reshape((b, nh, t, hd)).unwrap()
    } else {
        let q5 = qh.reshape((1, nkv, group, t, hd)).unwrap();
        let parts: Vec<Tensor> = case
            .sequences()
            .into_iter()
            .map(|(_, start, len)| {
                let qs = q5
                    .narrow(3, start, len)
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .reshape((1, nkv, group * len, hd))
                    .unwrap();
                let ks = kh.narrow(2, start, len).unwrap().contiguous().unwrap();
                let vs = vh.narrow(2, start, len).unwrap().contiguous().unwrap();
                attend(&qs, &ks, &vs, len)
                    .reshape((1, nkv, group, len, hd))
                    .unwrap()
            })
            .collect();
        Tensor::cat(&parts, 3)
            .unwrap()
            .reshape((1, nh, t, hd))
            .unwrap()
    };
    y.transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((b, t, nh * hd))
        .unwrap()
}

/// The output in f64, from the definition: per sequence and query head, RoPE at the sequence's
/// own positions, softmax over its own earlier keys (its key/value head), times the values.
fn reference([q, k, v]: [&Tensor; 3], case: &Case) -> Tensor {
    let Heads {
        heads: nh,
        kv_heads: nkv,
        head_dim: hd,
    } = case.heads;
    let (b, t, half) = (case.b, case.t(), hd / 2);
    let vec3 = |x: &Tensor| x.to_dtype(DType::F64).unwrap().to_vec3::<f64>().unwrap();
    let (q, k, v) = (vec3(q), vec3(k), vec3(v));
    let pos = case.positions();
    let rope = |x: &[f64], p: usize| -> Vec<f64> {
        (0..hd)
            .map(|i| {
                let j = i % half;
                let a = p as f64 / 10000f64.powf(2.0 * j as f64 / hd as f64);
                let (c, s) = (a.cos(), a.sin());
                if i < half {
                    x[i] * c - x[i + half] * s
                } else {
                    x[i] * c + x[i - half] * s
                }
            })
            .collect()
    };
    let mut out = vec![0f64; b * t * nh * hd];
    for (row, start, len) in case.sequences() {
        for h in 0..nh {
            let kvh = h / (nh / nkv);
            for i in start..start + len {
                let qi = rope(&q[row][i][h * hd..(h + 1) * hd], pos[i]);
                let scores: Vec<f64> = (start..=i)
                    .map(|j| {
                        let kj = rope(&k[row][j][kvh * hd..(kvh + 1) * hd], pos[j]);
                        qi.iter().zip(&kj).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..hd {
                    let y: f64 = (start..=i)
                        .zip(&e)
                        .map(|(j, w)| w / z * v[row][j][kvh * hd + c])
                        .sum();
                    out[((row * t + i) * nh + h) * hd + c] = y;
                }
            }
        }
    }
    Tensor::from_vec(out, (b, t, nh * hd), &Device::Cpu).unwrap()
}

/// Value and dq, dk, dv for the output gradient `g`.
fn with_grads(y: &Tensor, g: &Tensor, vars: [&Var; 3]) -> [Tensor; 4] {
    let grads = (y * g).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |x: &Var| grads.get(x.as_tensor()).unwrap().clone();
    [y.clone(), grad(vars[0]), grad(vars[1]), grad(vars[2])]
}

fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    let bits = |x: &Tensor| -> Vec<u64> {
        let x = x.flatten_all().unwrap();
        match x.dtype() {
            DType::F64 => x
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect(),
            _ => x
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits() as u64)
                .collect(),
        }
    };
    a.dims() == b.dims() && bits(a) == bits(b)
}

#[test]
fn node_matches_separate_ops_and_the_definition() {
    let heads = Heads {
        heads: 6,
        kv_heads: 2,
        head_dim: 8,
    };
    let cases = [
        // Three sequences packed into one row, unequal lengths.
        Case {
            b: 1,
            packed: vec![5, 11, 3],
            heads,
        },
        // Two rows, one sequence each.
        Case {
            b: 2,
            packed: vec![],
            heads,
        },
        // One query head per key/value head, one sequence packed alone.
        Case {
            b: 1,
            packed: vec![7],
            heads: Heads {
                heads: 3,
                kv_heads: 3,
                head_dim: 4,
            },
        },
    ];
    for (ci, case) in cases.iter().enumerate() {
        for dtype in [DType::F32, DType::F64] {
            // Budget 0: every sequence's attention in chunks, probabilities recomputed.
            for budget in [usize::MAX, 0] {
                let Heads {
                    heads: nh,
                    kv_heads: nkv,
                    head_dim: hd,
                } = case.heads;
                let (b, t) = (case.b, case.t());
                let seed = 10 * ci as u64;
                let q = Var::from_tensor(&rand(&[b, t, nh * hd], seed + 1, dtype)).unwrap();
                let k = Var::from_tensor(&rand(&[b, t, nkv * hd], seed + 2, dtype)).unwrap();
                let v = Var::from_tensor(&rand(&[b, t, nkv * hd], seed + 3, dtype)).unwrap();
                let g = rand(&[b, t, nh * hd], seed + 4, dtype);
                let (cos, sin) = tables(&case.positions(), hd, dtype);
                let vars = [&q, &k, &v];
                let inputs = [q.as_tensor(), k.as_tensor(), v.as_tensor()];
                let spec = PassAttention {
                    heads: case.heads,
                    cos: &cos,
                    sin: &sin,
                    packed: &case.packed,
                    gemm: GemmMode::F32,
                    budget,
                };
                let (y, (kh, vh)) = self_attention(inputs[0], inputs[1], inputs[2], &spec).unwrap();
                let node = with_grads(&y, &g, vars);
                let ops = with_grads(&separate_ops(inputs, case, &cos, &sin, budget), &g, vars);
                let what = format!("case {ci} {dtype:?} budget {budget}");
                for (name, a, b) in [
                    ("value", &node[0], &ops[0]),
                    ("dq", &node[1], &ops[1]),
                    ("dk", &node[2], &ops[2]),
                    ("dv", &node[3], &ops[3]),
                ] {
                    assert!(
                        same_bits(a, b),
                        "{what}: {name} differs from the separate ops by {:e}",
                        max_abs_diff(a, b)
                    );
                }
                // The keys after RoPE and the values, in heads layout.
                let heads_of = |x: &Tensor, n: usize| to_heads(x, n, hd);
                let want_k = fused::rope(&heads_of(inputs[1], nkv), &cos, &sin).unwrap();
                assert!(same_bits(&kh, &want_k) && same_bits(&vh, &heads_of(inputs[2], nkv)));
                let want = reference(inputs, case);
                let tol = if dtype == DType::F64 { 1e-12 } else { 2e-6 };
                let e = max_abs_diff(&node[0].to_dtype(DType::F64).unwrap(), &want);
                assert!(e < tol, "{what}: value vs f64 definition {e:e}");
            }
        }
    }
}

/// The gradients against central finite differences of <y, g> in f64, on the packed case.
#[test]
fn node_gradients_match_finite_differences() {
    let heads = Heads {
        heads: 4,
        kv_heads: 2,
        head_dim: 4,
    };
    let case = Case {
        b: 1,
        packed: vec![3, 4],
        heads,
    };
    let t = case.t();
    let dtype = DType::F64;
    let q = Var::from_tensor(&rand(&[1, t, 16], 71, dtype)).unwrap();
    let k = Var::from_tensor(&rand(&[1, t, 8], 72, dtype)).unwrap();
    let v = Var::from_tensor(&rand(&[1, t, 8], 73, dtype)).unwrap();
    let g = rand(&[1, t, 16], 74, dtype);
    let (cos, sin) = tables(&case.positions(), 4, dtype);
    let spec = PassAttention {
        heads,
        cos: &cos,
        sin: &sin,
        packed: &case.packed,
        gemm: GemmMode::F32,
        budget: usize::MAX,
    };
    let run = |q: &Tensor, k: &Tensor, v: &Tensor| self_attention(q, k, v, &spec).unwrap().0;
    let objective = |q: &Tensor, k: &Tensor, v: &Tensor| -> f64 {
        (run(q, k, v) * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let y = run(q.as_tensor(), k.as_tensor(), v.as_tensor());
    let grads = with_grads(&y, &g, [&q, &k, &v]);
    let base = [q.as_tensor(), k.as_tensor(), v.as_tensor()].map(|x| x.detach());
    for (which, grad) in grads[1..].iter().enumerate() {
        let x = base[which].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let got = grad.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-6;
        for i in (0..x.len()).step_by(3) {
            let at = |delta: f64| {
                let mut xs = x.clone();
                xs[i] += delta;
                let xt = Tensor::from_vec(xs, base[which].dims(), &Device::Cpu).unwrap();
                let mut args = base.clone();
                args[which] = xt;
                objective(&args[0], &args[1], &args[2])
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (fd - got[i]).abs() < 1e-7 * (1.0 + fd.abs()),
                "input {which} element {i}: finite difference {fd} vs {}",
                got[i]
            );
        }
    }
}
