//! Test hooks: `KTO_TRAIN_FAULT_*_PAUSE_MS` widen the window in which the fault-injection tests'
//! kill lands (or, per step, make a tiny model's step as slow as a real one's). Unset: no effect.

/// Sleeps for `$var` milliseconds when the variable holds a number.
pub fn pause(var: &str) {
    if let Some(ms) = std::env::var(var).ok().and_then(|v| v.parse::<u64>().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}
