//! Llama network, LoRA, loading.
