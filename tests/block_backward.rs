//! A checkpointed block's backward by hand (src/model/block_grad.rs) against the same block
//! back-propagated through candle's graph of its recomputation (`set_graph_backward`): every
//! LoRA gradient and the loss, in f64 with dropout (one pass per sequence, the masks redrawn
//! in the recomputation) and in f32 without (sequences packed into one pass, so the attention
//! runs per packed sequence), and with LoRA on only some projections (the others' input
//! gradients through the frozen weight alone). One test, since the switch is process-wide.
mod common;
use candle_core::DType;
use common::*;
use kto_train::model::llama::set_graph_backward;

#[test]
fn backward_by_hand_equals_the_graph_backward() {
    let loss = "loss_type = \"enhanced_kto\"\nbeta = 0.1";
    for (dtype, dropout, tol) in [(DType::F64, 0.1, 1e-12), (DType::F32, 0.0, 2e-6)] {
        let model = tiny_with_peft_dropout(dtype, Some(dropout));
        let model = with_kernels(&model, |k| k.activation_checkpointing = true);
        set_graph_backward(true);
        let (loss_graph, g_graph) = dropout_step(&model, loss);
        set_graph_backward(false);
        let (loss_hand, g_hand) = dropout_step(&model, loss);
        assert!(
            (loss_graph - loss_hand).abs() <= 1e-12 * loss_graph.abs().max(1.0),
            "{dtype:?}: loss {loss_graph} vs {loss_hand}"
        );
        assert_lora_grads_close(&model, &g_graph, &g_hand, tol);
    }
    // LoRA on q, v and down only, B non-zero so that every A has a gradient.
    use kto_train::config::Projection;
    let spec = kto_train::model::LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec![Projection::QProj, Projection::VProj, Projection::DownProj],
        use_rslora: false,
        seed: 3,
    };
    let model = tiny(DType::F64, Some(&spec));
    for (_, lin) in model.lora_layers() {
        let b = &lin.lora.as_ref().unwrap().b;
        let noise = candle_core::Tensor::randn(0f64, 0.05, b.dims(), b.device()).unwrap();
        b.set(&noise).unwrap();
    }
    let model = with_kernels(&model, |k| k.activation_checkpointing = true);
    set_graph_backward(true);
    let (loss_graph, g_graph) = dropout_step(&model, loss);
    set_graph_backward(false);
    let (loss_hand, g_hand) = dropout_step(&model, loss);
    assert!((loss_graph - loss_hand).abs() <= 1e-12 * loss_graph.abs().max(1.0));
    assert_lora_grads_close(&model, &g_graph, &g_hand, 1e-12);
}
