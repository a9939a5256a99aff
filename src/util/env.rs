//! Settings of the kernels read from environment variables: sizes in MiB (memory budgets and
//! thresholds) and on/off switches.
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

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

/// An on/off switch: `var` = 1 turns it on, 0 off, anything else (or unset) leaves `default`;
/// read at first use; [`FlagSetting::set`] overrides it for the process (tests, benchmarks).
pub struct FlagSetting {
    var: &'static str,
    default: bool,
    /// 0: not read yet, 1: on, 2: off.
    state: AtomicU8,
}

impl FlagSetting {
    pub const fn new(var: &'static str, default: bool) -> Self {
        Self {
            var,
            default,
            state: AtomicU8::new(0),
        }
    }

    pub fn get(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let on = match std::env::var(self.var).as_deref().map(str::trim) {
                    Ok("1") => true,
                    Ok("0") => false,
                    _ => self.default,
                };
                self.set(on);
                on
            }
        }
    }

    /// Sets the switch for this process, as the variable does at start.
    pub fn set(&self, on: bool) {
        self.state.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::{FlagSetting, MibSetting};

    #[test]
    fn flag_default_then_override() {
        static F: FlagSetting = FlagSetting::new("KTO_TRAIN_TEST_UNSET_FLAG_SETTING", true);
        assert!(F.get());
        F.set(false);
        assert!(!F.get());
        F.set(true);
        assert!(F.get());
    }

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
