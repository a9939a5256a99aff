//! Sizes set in MiB by environment variables (memory budgets and thresholds of the kernels).
use std::sync::atomic::{AtomicUsize, Ordering};

/// A byte size given in MiB by the environment variable `var` (else `default_mb`), read at first
/// use; [`MibSetting::set_mb`] overrides it for the process (tests, benchmarks).
pub struct MibSetting {
    var: &'static str,
    default_mb: usize,
    /// `usize::MAX` until read or set.
    bytes: AtomicUsize,
}

impl MibSetting {
    pub const fn new(var: &'static str, default_mb: usize) -> Self {
        Self {
            var,
            default_mb,
            bytes: AtomicUsize::new(usize::MAX),
        }
    }

    /// The size in bytes.
    pub fn bytes(&self) -> usize {
        let b = self.bytes.load(Ordering::Relaxed);
        if b != usize::MAX {
            return b;
        }
        let mb = std::env::var(self.var)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(self.default_mb);
        self.set_mb(mb);
        self.bytes.load(Ordering::Relaxed)
    }

    /// Sets the size for this process, as the variable does at start.
    pub fn set_mb(&self, mb: usize) {
        // Below usize::MAX, which marks "not read yet".
        let b = mb.saturating_mul(1 << 20).min(usize::MAX - 1);
        self.bytes.store(b, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::MibSetting;

    #[test]
    fn default_then_override() {
        static S: MibSetting = MibSetting::new("KTO_TRAIN_TEST_UNSET_MIB_SETTING", 3);
        assert_eq!(S.bytes(), 3 << 20);
        S.set_mb(0);
        assert_eq!(S.bytes(), 0);
        S.set_mb(5);
        assert_eq!(S.bytes(), 5 << 20);
    }
}
