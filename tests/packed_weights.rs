//! Frozen weights held only in the tile kernel's packed form (src/kernels/frozen.rs): the packed
//! form holds the weight exactly (unpacking gives back the bf16 tensor), and products with it
//! are bit for bit those of the bf16 tensor's path, forward and input gradient, with the input
//! gradient's orientation kept packed or repacked from the forward's at each call. Also the
//! model level: a model whose projections are packed gives the logits and LoRA gradients of
//! the same model with bf16 tensors. Needs a CPU with AMX tiles (the only kernel that reads
//! packed operands); elsewhere every test says so and returns.
mod common;
use candle_core::{DType, Tensor};
use common::rand_tensor;
use kto_train::kernels::frozen::FrozenWeight;
use kto_train::kernels::gemm::{self, GemmMode};
use kto_train::kernels::products::{frozen_linear, frozen_linear_input_grad};
use kto_train::model::Llama;
use rand::SeedableRng;

fn tile_kernel_here() -> bool {
    if gemm::packs_weights() {
        return true;
    }
    eprintln!("NOTICE: no AMX tile kernel on this CPU (or a GEMM library is loaded): packed weights are not used here, test skipped");
    false
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// One Enhanced KTO step with dropout: the loss and the LoRA gradients.
fn kto_step(m: &Llama) -> (f64, Vec<Tensor>) {
    let (loss, grads) = common::dropout_step(m, "loss_type = \"enhanced_kto\"\nbeta = 0.1");
    (loss, grads.into_vec())
}

/// [out, in] shapes: multiples of the 32 x 32 blocks and odd ones (padding in both packed
/// dimensions).
const SHAPES: [(usize, usize); 4] = [(64, 96), (37, 50), (160, 33), (17, 128)];

#[test]
fn packed_form_holds_the_weight_exactly() {
    if !tile_kernel_here() {
        return;
    }
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    for (out, inp) in SHAPES {
        let w = rand_tensor(&mut r, &[out, inp], 0.1)
            .to_dtype(DType::BF16)
            .unwrap();
        for input_grad in [true, false] {
            let p = FrozenWeight::Dense(w.clone())
                .packed_with(input_grad)
                .unwrap();
            assert!(
                matches!(p, FrozenWeight::Packed(_)),
                "{out}x{inp}: not packed"
            );
            assert_eq!(p.dims2(), (out, inp));
            let back = p.tensor().unwrap();
            assert_eq!(back.dims(), &[out, inp]);
            assert_eq!(back.dtype(), DType::BF16);
            let (a, b) = (
                back.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap(),
                w.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap(),
            );
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{out}x{inp}: unpacked values differ"
            );
        }
    }
}

#[test]
fn packed_products_equal_the_tensor_path_bit_for_bit() {
    if !tile_kernel_here() {
        return;
    }
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    for (out, inp) in SHAPES {
        for m in [1, 45, 70] {
            let w = rand_tensor(&mut r, &[out, inp], 0.1)
                .to_dtype(DType::BF16)
                .unwrap();
            let x = rand_tensor(&mut r, &[m, inp], 1.0);
            let g = rand_tensor(&mut r, &[m, out], 1.0);
            let want_y = frozen_linear(&x, &w, GemmMode::Bf16).unwrap();
            let want_dx = frozen_linear_input_grad(&g, &w, GemmMode::Bf16).unwrap();
            for input_grad in [true, false] {
                let p = FrozenWeight::Dense(w.clone())
                    .packed_with(input_grad)
                    .unwrap();
                let y = p.forward(&x, GemmMode::Bf16).unwrap();
                assert_eq!(y.dims(), &[m, out]);
                assert_eq!(bits(&y), bits(&want_y), "{m}x{inp} @ [{out}, {inp}]^T");
                let dx = p.input_grad(&g, GemmMode::Bf16).unwrap();
                assert_eq!(dx.dims(), &[m, inp]);
                assert_eq!(
                    bits(&dx),
                    bits(&want_dx),
                    "input gradient {m}x{out} @ [{out}, {inp}] (input gradient packed: {input_grad})"
                );
                // Another mode reads the weight back as a tensor.
                let y32 = p.forward(&x, GemmMode::F32).unwrap();
                let want32 = frozen_linear(&x, &w, GemmMode::F32).unwrap();
                assert_eq!(bits(&y32), bits(&want32));
            }
        }
    }
}

#[test]
fn packed_backward_through_autograd() {
    if !tile_kernel_here() {
        return;
    }
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let w = rand_tensor(&mut r, &[48, 40], 0.1)
        .to_dtype(DType::BF16)
        .unwrap();
    let x = candle_core::Var::from_tensor(&rand_tensor(&mut r, &[2, 9, 40], 1.0)).unwrap();
    let c = rand_tensor(&mut r, &[2, 9, 48], 1.0);
    let p = FrozenWeight::Dense(w.clone()).packed_with(false).unwrap();
    let loss = |y: Tensor| (y * &c).unwrap().sum_all().unwrap();
    let got = loss(p.forward(x.as_tensor(), GemmMode::Bf16).unwrap())
        .backward()
        .unwrap();
    let want = loss(frozen_linear(x.as_tensor(), &w, GemmMode::Bf16).unwrap())
        .backward()
        .unwrap();
    assert_eq!(
        bits(got.get(x.as_tensor()).unwrap()),
        bits(want.get(x.as_tensor()).unwrap())
    );
}

/// The whole network: packed projections (as `with_kernels` makes them in bf16 mode) against
/// the same weights as bf16 tensors, over one KTO step (loss and every LoRA gradient).
#[test]
fn packed_model_equals_tensor_model() {
    if !tile_kernel_here() {
        return;
    }
    let model = common::with_kernels(&common::tiny_with_peft(DType::F32), |k| {
        k.gemm = GemmMode::Bf16
    });
    let packed = model
        .layers()
        .iter()
        .flat_map(|b| b.projections())
        .all(|(_, lin)| matches!(lin.weight, FrozenWeight::Packed(_)));
    assert!(
        packed,
        "bf16 mode on a tile-kernel CPU holds projections packed"
    );
    let dense = model.clone().with_unpacked_projections().unwrap();
    assert!(dense
        .layers()
        .iter()
        .flat_map(|b| b.projections())
        .all(|(_, lin)| matches!(lin.weight, FrozenWeight::Dense(_))));
    let (l1, g1) = kto_step(&model);
    let (l2, g2) = kto_step(&dense);
    assert_eq!(l1.to_bits(), l2.to_bits(), "loss {l1} vs {l2}");
    assert_eq!(g1.len(), g2.len());
    for (a, b) in g1.iter().zip(&g2) {
        assert_eq!(bits(a), bits(b));
    }
}

/// `KTO_TRAIN_PACK_INPUT_GRAD_MB`: the projections whose input-gradient form fits the budget,
/// in order, hold it; the others move it out of the forward's form at each backward. A step is
/// bit for bit the same either way.
#[test]
fn input_gradient_forms_kept_within_their_budget() {
    if !tile_kernel_here() {
        return;
    }
    let model = common::with_kernels(&common::tiny_with_peft(DType::F32), |k| {
        k.gemm = GemmMode::Bf16
    });
    let sizes: Vec<usize> = model
        .layers()
        .iter()
        .flat_map(|b| b.projections())
        .map(|(_, lin)| lin.weight.dims2().0 * lin.weight.dims2().1 * 2)
        .collect();
    // The first three fit; the fourth is one byte over.
    let budget = sizes[..3].iter().sum::<usize>() + sizes[3] - 1;
    let partial = model
        .clone()
        .with_unpacked_projections()
        .unwrap()
        .with_packed_projections(budget)
        .unwrap();
    let held: Vec<bool> = partial
        .layers()
        .iter()
        .flat_map(|b| b.projections())
        .map(|(_, lin)| lin.weight.holds_input_grad_form())
        .collect();
    let mut want = vec![false; sizes.len()];
    let mut left = budget;
    for (w, &b) in want.iter_mut().zip(&sizes) {
        if b <= left {
            *w = true;
            left -= b;
        }
    }
    assert_eq!(&want[..3], [true; 3]);
    assert!(!want[3], "the fourth is over the budget");
    assert_eq!(held, want);
    let all = model
        .clone()
        .with_unpacked_projections()
        .unwrap()
        .with_packed_projections(usize::MAX)
        .unwrap();
    assert!(all
        .layers()
        .iter()
        .flat_map(|b| b.projections())
        .all(|(_, lin)| lin.weight.holds_input_grad_form()));
    let ((l1, g1), (l2, g2)) = (kto_step(&partial), kto_step(&all));
    assert_eq!(l1.to_bits(), l2.to_bits(), "loss {l1} vs {l2}");
    for (a, b) in g1.iter().zip(&g2) {
        assert_eq!(bits(a), bits(b));
    }
}
