//! Learning-rate schedules as transformers defines them (warmup, then constant, linear or cosine
//! decay), evaluated at the 0-based optimizer step.
use crate::config::LrSchedule;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: LrSchedule,
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    pub fn lr(&self, step: usize) -> f64 {
        let (w, total) = (self.warmup_steps, self.total_steps.max(1));
        if step < w {
            return self.base_lr * step as f64 / w.max(1) as f64;
        }
        let progress = (step - w) as f64 / (total.saturating_sub(w)).max(1) as f64;
        let factor = match self.kind {
            LrSchedule::Constant => 1.0,
            LrSchedule::Linear => (1.0 - progress).max(0.0),
            LrSchedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        self.base_lr * factor.max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_with_warmup_matches_transformers() {
        // get_linear_schedule_with_warmup(warmup=2, total=10): [0, .5, 1, 7/8, 6/8, ...]
        let s = Schedule {
            kind: LrSchedule::Linear,
            base_lr: 1.0,
            warmup_steps: 2,
            total_steps: 10,
        };
        let want = [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125];
        for (i, w) in want.iter().enumerate() {
            assert!((s.lr(i) - w).abs() < 1e-12, "step {i}: {} vs {w}", s.lr(i));
        }
    }

    #[test]
    fn cosine_halfway_is_half() {
        let s = Schedule {
            kind: LrSchedule::Cosine,
            base_lr: 2.0,
            warmup_steps: 0,
            total_steps: 10,
        };
        assert!((s.lr(0) - 2.0).abs() < 1e-12);
        assert!((s.lr(5) - 1.0).abs() < 1e-12);
    }
}
