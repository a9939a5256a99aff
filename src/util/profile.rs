//! Where a training step's time goes (`KTO_TRAIN_PROFILE=1`): wall time per phase (reference
//! passes, KL passes, policy forward, backward, recomputation, optimizer, ...) and, inside each,
//! the time and FLOPs of the matrix products, printed when the run ends.
//!
//! Phases nest (the recomputation runs inside the backward) and each phase counts only its own
//! time, so the rows add up to the profiled total. Products are counted by the thread that calls
//! them; the ones issued from inside parallel loops would overlap, so the GEMM column is wall
//! time only where products are called one at a time (true of the step's products today).
//! Off, every hook is one relaxed load.
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// The environment variable that turns the profile on.
pub const ENV: &str = "KTO_TRAIN_PROFILE";

static STATE: AtomicU8 = AtomicU8::new(0); // 0 unknown, 1 off, 2 on

/// Whether profiling is on (read once from [`ENV`]).
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var(ENV).is_ok_and(|v| !v.is_empty() && v != "0");
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
    }
}

#[derive(Default, Clone)]
struct Phase {
    name: &'static str,
    own_secs: f64,
    gemm_secs: f64,
    gemm_flops: f64,
    gemm_calls: u64,
}

/// Products of one (n, k), all phases together: (seconds, FLOPs, calls, rows).
type ShapeTotals = std::collections::HashMap<(usize, usize), (f64, f64, u64, u64)>;

#[derive(Default)]
struct Profile {
    phases: Vec<Phase>,
    /// Which products the GEMM time goes to: n and k name the product (a projection, a LoRA
    /// factor, attention), m is the rows of the call.
    shapes: ShapeTotals,
    /// Open phases: (index, start of the current own-time slice).
    stack: Vec<(usize, Instant)>,
}

impl Profile {
    fn index(&mut self, name: &'static str) -> usize {
        match self.phases.iter().position(|p| p.name == name) {
            Some(i) => i,
            None => {
                self.phases.push(Phase {
                    name,
                    ..Phase::default()
                });
                self.phases.len() - 1
            }
        }
    }
}

static PROFILE: Mutex<Option<Profile>> = Mutex::new(None);

fn with<R>(f: impl FnOnce(&mut Profile) -> R) -> R {
    let mut g = PROFILE.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(Profile::default))
}

/// An open phase; closing it (drop) adds its own time.
pub struct Span(());

impl Drop for Span {
    fn drop(&mut self) {
        let now = Instant::now();
        with(|p| {
            if let Some((i, t0)) = p.stack.pop() {
                p.phases[i].own_secs += (now - t0).as_secs_f64();
            }
            if let Some(top) = p.stack.last_mut() {
                top.1 = now; // the outer phase's own time resumes
            }
        });
    }
}

/// Opens phase `name` until the returned guard drops; `None` (no work) when profiling is off.
pub fn phase(name: &'static str) -> Option<Span> {
    if !enabled() {
        return None;
    }
    let now = Instant::now();
    with(|p| {
        if let Some(&(i, t0)) = p.stack.last() {
            p.phases[i].own_secs += (now - t0).as_secs_f64();
        }
        let i = p.index(name);
        p.stack.push((i, now));
    });
    Some(Span(()))
}

/// Runs one matrix product of `m x k` by `k x n` (2mnk FLOPs), counting it against the
/// innermost open phase.
#[inline]
pub fn gemm<R>(m: usize, n: usize, k: usize, f: impl FnOnce() -> R) -> R {
    if !enabled() {
        return f();
    }
    let t0 = Instant::now();
    let r = f();
    let secs = t0.elapsed().as_secs_f64();
    let flops = 2.0 * m as f64 * n as f64 * k as f64;
    with(|p| {
        let i = match p.stack.last() {
            Some(&(i, _)) => i,
            None => p.index("outside any phase"),
        };
        let ph = &mut p.phases[i];
        ph.gemm_secs += secs;
        ph.gemm_flops += flops;
        ph.gemm_calls += 1;
        let sh = p.shapes.entry((n, k)).or_default();
        sh.0 += secs;
        sh.1 += flops;
        sh.2 += 1;
        sh.3 += m as u64;
    });
    r
}

/// The profile so far as a Markdown table, per `per` (e.g. optimizer steps); `None` when off
/// or empty. Resets nothing.
pub fn report(per: u64) -> Option<String> {
    if !enabled() {
        return None;
    }
    let phases = with(|p| p.phases.clone());
    if phases.is_empty() {
        return None;
    }
    let per = per.max(1) as f64;
    let total: f64 = phases.iter().map(|p| p.own_secs).sum();
    let gemm: f64 = phases.iter().map(|p| p.gemm_secs).sum();
    let flops: f64 = phases.iter().map(|p| p.gemm_flops).sum();
    let mut out = format!(
        "profile ({ENV}), per step over {per} steps: wall s | share | GEMM s | other s | GEMM GFLOP \
         | GEMM GFLOP/s | GEMM calls\n| phase | s | share | GEMM s | other s | GFLOP | GFLOP/s | \
         calls |\n|---|---|---|---|---|---|---|---|\n"
    );
    let row = |name: &str, own: f64, g: f64, fl: f64, calls: f64| {
        format!(
            "| {name} | {:.3} | {:.0}% | {:.3} | {:.3} | {:.1} | {:.0} | {:.0} |\n",
            own / per,
            100.0 * own / total.max(1e-12),
            g / per,
            (own - g) / per,
            fl / per / 1e9,
            if g > 0.0 { fl / g / 1e9 } else { 0.0 },
            calls / per
        )
    };
    for p in &phases {
        out += &row(
            p.name,
            p.own_secs,
            p.gemm_secs,
            p.gemm_flops,
            p.gemm_calls as f64,
        );
    }
    let calls: f64 = phases.iter().map(|p| p.gemm_calls as f64).sum();
    out += &row("total", total, gemm, flops, calls);
    let mut shapes: Vec<_> = with(|p| p.shapes.clone()).into_iter().collect();
    shapes.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    out += "\nproducts by shape (n x k, all phases; the 12 that take longest), per step:\n\
            | n x k | s | share of GEMM | GFLOP/s | calls | mean rows |\n|---|---|---|---|---|---|\n";
    for ((n, k), (secs, fl, calls, rows)) in shapes.into_iter().take(12) {
        out += &format!(
            "| {n} x {k} | {:.3} | {:.0}% | {:.0} | {:.0} | {:.0} |\n",
            secs / per,
            100.0 * secs / gemm.max(1e-12),
            fl / secs.max(1e-12) / 1e9,
            calls as f64 / per,
            rows as f64 / calls.max(1) as f64
        );
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Nested phases count only their own time (the rows add up to the wall time), and a
    /// product is counted against the innermost open phase.
    #[test]
    fn nested_phases_split_time_and_products() {
        STATE.store(2, Ordering::Relaxed);
        let t0 = Instant::now();
        {
            let _outer = phase("test outer");
            std::thread::sleep(Duration::from_millis(30));
            {
                let _inner = phase("test inner");
                gemm(2, 3, 4, || std::thread::sleep(Duration::from_millis(30)));
            }
            gemm(1, 1, 1, || ());
        }
        let wall = t0.elapsed().as_secs_f64();
        let phases = with(|p| p.phases.clone());
        let get = |n: &str| phases.iter().find(|p| p.name == n).unwrap().clone();
        let (outer, inner) = (get("test outer"), get("test inner"));
        assert!(outer.own_secs >= 0.030 && inner.own_secs >= 0.030);
        assert!((outer.own_secs + inner.own_secs - wall).abs() < 0.005);
        assert_eq!((inner.gemm_calls, inner.gemm_flops), (1, 48.0));
        assert_eq!((outer.gemm_calls, outer.gemm_flops), (1, 2.0));
        assert!(inner.gemm_secs >= 0.030 && inner.gemm_secs <= inner.own_secs);
        assert!(report(1).unwrap().contains("| test inner |"));
    }
}
