//! Which network a forward pass runs and how: the policy (LoRA on) or the reference (LoRA off,
//! same weights), with or without dropout, with or without a backprop graph.

/// Which network runs: the policy (LoRA on) or the reference (LoRA off, same weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassMode {
    pub lora: bool,
    /// Dropout on the LoRA branch; `None` = evaluation mode.
    pub dropout: Option<DropoutKey>,
    /// Build the backprop graph through the LoRA weights. Passes whose result is detached
    /// anyway (the KL pass, evaluation) skip it so their intermediates are freed at once.
    pub grad: bool,
}

impl PassMode {
    pub const REFERENCE: PassMode = PassMode {
        lora: false,
        dropout: None,
        grad: false,
    };
    pub const POLICY_EVAL: PassMode = PassMode {
        lora: true,
        dropout: None,
        grad: false,
    };

    /// The policy in training mode: dropout keyed by `key`, gradient tracked.
    pub fn train(key: DropoutKey) -> PassMode {
        PassMode {
            lora: true,
            dropout: Some(key),
            grad: true,
        }
    }

    pub fn with_grad(self, grad: bool) -> PassMode {
        PassMode { grad, ..self }
    }
}

/// Identifies one forward pass so that dropout masks are a pure function of (seed, pass, module):
/// reproducible, and resumable from a checkpoint without saving any generator state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutKey {
    pub seed: u64,
    pub pass: u64,
}
