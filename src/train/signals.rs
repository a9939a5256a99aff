//! SIGINT / SIGTERM: the run finishes its current optimizer step, writes a checkpoint and exits.
//! A second signal exits at once (the last checkpoint stays valid: checkpoints are atomic).
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

struct Flags {
    /// Set by the first signal.
    received: Arc<AtomicBool>,
    /// Which signal that was.
    which: Arc<AtomicUsize>,
}

static FLAGS: OnceLock<Flags> = OnceLock::new();

/// Installs the handlers (once per process).
pub(crate) fn install() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::flag;
    let mut result = Ok(());
    FLAGS.get_or_init(|| {
        let flags = Flags {
            received: Arc::new(AtomicBool::new(false)),
            which: Arc::new(AtomicUsize::new(0)),
        };
        for sig in [SIGINT, SIGTERM] {
            // In registration order: the exit sees the flag of an earlier signal, before this
            // one sets it; so only a second signal exits.
            let r = flag::register_conditional_shutdown(sig, 128 + sig, flags.received.clone())
                .and_then(|_| flag::register_usize(sig, flags.which.clone(), sig as usize))
                .and_then(|_| flag::register(sig, flags.received.clone()));
            if let Err(e) = r {
                result = Err(anyhow::anyhow!(
                    "cannot install a handler for signal {sig}: {e}"
                ));
            }
        }
        flags
    });
    result
}

/// The signal received so far, if any.
pub(crate) fn received() -> Option<i32> {
    let f = FLAGS.get()?;
    if f.received.load(Ordering::SeqCst) {
        Some(f.which.load(Ordering::SeqCst) as i32)
    } else {
        None
    }
}

pub(crate) fn name(sig: i32) -> &'static str {
    match sig {
        signal_hook::consts::SIGINT => "SIGINT",
        signal_hook::consts::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}
