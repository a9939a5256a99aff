//! Activation checkpointing changes where intermediates live, not the numbers: the gradients of
//! every LoRA weight must equal those of the plain backward (f64, dropout on, so that the
//! recomputed block has to reproduce the forward's dropout masks), and the recomputation that
//! takes the projections' outputs kept by the forward (selective recomputation, without dropout)
//! must give the very gradients of the one that recomputes them.
mod common;
use candle_core::DType;
use common::*;
use kto_train::model::llama::LoraGradients;
use kto_train::model::Llama;

fn compare(loss_toml: &str) {
    let model = tiny_with_peft_dropout(DType::F64, Some(0.1));
    let plain = with_kernels(&model, |k| k.activation_checkpointing = false);
    let (loss_plain, g_plain) = dropout_step(&plain, loss_toml);
    let checkpointed = with_kernels(&model, |k| k.activation_checkpointing = true);
    let (loss_ckpt, g_ckpt) = dropout_step(&checkpointed, loss_toml);
    assert!(
        (loss_plain - loss_ckpt).abs() <= 1e-12 * loss_plain.abs().max(1.0),
        "loss {loss_plain} vs {loss_ckpt}"
    );
    assert_lora_grads_close(&model, &g_plain, &g_ckpt, 1e-10);
}

#[test]
fn checkpointed_gradients_equal_plain_ones_kto() {
    compare("loss_type = \"kto\"\nbeta = 0.1");
}

#[test]
fn checkpointed_gradients_equal_plain_ones_enhanced() {
    compare("loss_type = \"enhanced_kto\"\nbeta = 0.1");
}

/// Every LoRA gradient of `model`'s step, in `lora_layers` order.
fn grads_of(model: &Llama, g: &LoraGradients) -> Vec<candle_core::Tensor> {
    model
        .lora_layers()
        .iter()
        .flat_map(|(_, lin)| {
            let lora = lin.lora.as_ref().unwrap();
            [&lora.a, &lora.b].map(|v| g.get(v.as_tensor()).expect("gradient").clone())
        })
        .collect()
}

#[test]
fn kept_projection_outputs_give_the_recomputed_gradients() {
    use kto_train::kernels::lora_linear;
    let loss = "loss_type = \"kto\"\nbeta = 0.1";
    let model = tiny_with_peft_dropout(DType::F64, Some(0.0));
    let checkpointed = with_kernels(&model, |k| k.activation_checkpointing = true);
    lora_linear::set_keep_budget_mb(0);
    let (loss_recomputed, g_recomputed) = dropout_step(&checkpointed, loss);
    let before = lora_linear::replays();
    lora_linear::set_keep_budget_mb(1024);
    let (loss_kept, g_kept) = dropout_step(&checkpointed, loss);
    let replayed = lora_linear::replays() - before;
    lora_linear::set_keep_budget_mb(256);
    // Every adapted projection of every block took its kept output (other tests in this binary
    // run without keeping: their forwards use dropout masks).
    assert!(
        replayed >= model.lora_layers().len(),
        "{replayed} projections replayed, {} adapted",
        model.lora_layers().len()
    );
    assert_eq!(loss_recomputed, loss_kept);
    let plain = with_kernels(&model, |k| k.activation_checkpointing = false);
    let (_, g_plain) = dropout_step(&plain, loss);
    let (a, b, p) = (
        grads_of(&model, &g_recomputed),
        grads_of(&model, &g_kept),
        grads_of(&model, &g_plain),
    );
    for ((a, b), p) in a.iter().zip(&b).zip(&p) {
        assert_eq!(max_abs_diff(a, b), 0.0, "kept outputs changed a gradient");
        assert!(rel_l2(b, p) < 1e-10, "kept outputs vs plain backward");
        assert!(
            max_abs_diff(p, &p.zeros_like().unwrap()) > 0.0,
            "zero gradient"
        );
    }
}
