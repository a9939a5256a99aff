//! Several processes as one run: data parallelism over MPI (`mpirun -n N kto-train ...`, `srun`),
//! with the semantics TRL has under accelerate. Without MPI a run is a world of one ([`Solo`]).
//!
//! What the training loop asks of the world is small: who am I ([`Comm::rank`], [`Comm::size`]),
//! everyone's bytes ([`Comm::all_gather`]: per-sequence log-probs and metrics, so that every rank
//! computes the loss head on the whole global micro-batch, as TRL gathers the KL log-ratios
//! before its mean; the ranks' stop requests), a sum of numbers ([`Comm::all_reduce_sum`]: the
//! LoRA gradients), and the same bytes as rank 0 ([`Comm::broadcast`]: how the run starts).
use anyhow::{bail, Result};
use std::sync::OnceLock;

#[cfg(feature = "mpi")]
mod mpi_world;
#[cfg(feature = "nccl")]
pub mod nccl;

pub trait Comm: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Every rank's `mine`, in rank order.
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Elementwise sum over the ranks, in place.
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()>;
    /// Rank 0's bytes on every rank (`buf` is ignored elsewhere).
    fn broadcast(&self, buf: &[u8]) -> Result<Vec<u8>>;
    /// What to call this world in messages ("MPI, 2 ranks").
    fn describe(&self) -> String;
    /// Ends every rank's process with `code` (MPI_Abort): an error on one rank must not leave
    /// the others waiting in a collective.
    fn abort(&self, code: i32) -> !;
}

/// A world of one process: every collective is the identity.
pub struct Solo;

impl Comm for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
    fn all_reduce_sum(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, buf: &[u8]) -> Result<Vec<u8>> {
        Ok(buf.to_vec())
    }
    fn describe(&self) -> String {
        "one process".into()
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// Rank `rank`'s share of `n` rows (a micro-batch, benchmark requests) over `size` ranks:
/// contiguous, as equal as possible, the first ranks one longer (so rows keep their order
/// across the ranks).
pub fn shard_rows(n: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let (q, r) = (n / size, n % size);
    let start = rank * q + rank.min(r);
    start..start + q + usize::from(rank < r)
}

static WORLD: OnceLock<Box<dyn Comm>> = OnceLock::new();

/// The ranks the launcher started, from its environment: Open MPI's mpirun, MPICH/Hydra's
/// mpiexec (PMI), and srun (a job step: SLURM_STEP_NUM_TASKS; SLURM_NTASKS alone is also set for
/// a batch script's single process).
pub fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// How long Open MPI's mpirun lets the ranks run on a SIGINT/SIGTERM (`odls_base_sigkill_timeout`,
/// seconds, default 1; mpirun hands the value to the ranks as
/// `OMPI_MCA_odls_base_sigkill_timeout`). Open MPI 4.1 sends the ranks SIGCONT, waits this long,
/// sends SIGTERM, waits this long again and kills them: a rank has this long after the SIGTERM
/// to finish its step and checkpoint. `None` under other launchers and without one.
pub fn launcher_kill_grace_s() -> Option<f64> {
    std::env::var_os("OMPI_COMM_WORLD_SIZE")?;
    let set = std::env::var("OMPI_MCA_odls_base_sigkill_timeout").ok();
    Some(kill_grace_from(set.as_deref()))
}

fn kill_grace_from(set: Option<&str>) -> f64 {
    set.and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(1.0)
}

/// A notice for the user when a stop through the launcher cannot finish the step: the ranks
/// would be killed mid-step and the checkpoint a stop promises would not be written.
pub fn kill_grace_notice(grace_s: f64, step_s: f64) -> Option<String> {
    // The step in flight plus the checkpoint must fit, with room for a slower step.
    if step_s * 2.0 < grace_s {
        return None;
    }
    // Longer is safe but delays the stop: mpirun waits this long before it passes the signal on.
    let enough = (step_s * 3.0 + 10.0).ceil();
    Some(format!(
        "note: mpirun kills the ranks {grace_s} s after it passes on a SIGINT/SIGTERM \
         (Open MPI's odls_base_sigkill_timeout) and a step here takes {step_s:.1} s, so a stop \
         through mpirun would end the run without the checkpoint; launch with \
         `mpirun --mca odls_base_sigkill_timeout {enough} ...`, or send the signal to the \
         kto-train processes themselves, to stop after the step with a checkpoint"
    ))
}

/// This process's rank among the ranks of its node (Open MPI, MPICH, Slurm), 0 without a
/// launcher: which GPU it takes.
pub fn local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .unwrap_or(0)
}

/// Joins the world the process was launched into: MPI under mpirun/srun with the `mpi` feature,
/// else a world of one. Launched as one of several ranks without the feature, it refuses (N
/// copies of the same run would write the same folder).
pub fn init() -> Result<&'static dyn Comm> {
    if let Some(w) = WORLD.get() {
        return Ok(w.as_ref());
    }
    let launched = launched_size();
    // Under a launcher an MPI build always joins MPI (a world of one too); a build without MPI
    // can only be a world of one.
    let use_mpi = matches!(launched, Some(n) if n > 1 || cfg!(feature = "mpi"));
    let world: Box<dyn Comm> = if use_mpi {
        #[cfg(feature = "mpi")]
        {
            Box::new(mpi_world::MpiWorld::init()?)
        }
        #[cfg(not(feature = "mpi"))]
        bail!(
            "launched as one of {} processes, but this build has no MPI: build it with \
             `cargo build --release --features mpi` (needs an MPI library: Debian's \
             libopenmpi-dev openmpi-bin and libclang-dev)",
            launched.unwrap_or(1)
        )
    } else {
        Box::new(Solo)
    };
    let _ = WORLD.set(world);
    Ok(world_ref())
}

/// The world joined by [`init`] (a world of one before it).
pub fn world_ref() -> &'static dyn Comm {
    static SOLO: Solo = Solo;
    WORLD.get().map(|w| w.as_ref()).unwrap_or(&SOLO)
}

/// Leaves the world (MPI_Finalize); call before the process exits, also on errors.
pub fn finalize() {
    #[cfg(feature = "mpi")]
    mpi_world::finalize();
}

/// f64 values as bytes for a collective, bit for bit (NaN and infinities included, which JSON
/// cannot carry).
pub fn encode_f64s(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn decode_f64s(b: &[u8]) -> Result<Vec<f64>> {
    if !b.len().is_multiple_of(8) {
        bail!(
            "a message of {} bytes from another rank is not a list of f64",
            b.len()
        );
    }
    Ok(b.chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Serializes `v` for a collective (JSON, for values without NaN or infinities: f64 values
/// round-trip exactly).
pub fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(v)?)
}

pub fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T> {
    match serde_json::from_slice(b) {
        Ok(v) => Ok(v),
        Err(e) => bail!("a message from another rank does not decode: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shares cover 0..n once, in rank order, and differ in length by at most one.
    #[test]
    fn shards_cover_every_row_once_in_order() {
        for size in 1..6 {
            for n in 0..20 {
                let shares: Vec<_> = (0..size).map(|r| shard_rows(n, r, size)).collect();
                let mut next = 0;
                for s in &shares {
                    assert_eq!(s.start, next, "n {n} size {size}: {shares:?}");
                    next = s.end;
                }
                assert_eq!(next, n, "n {n} size {size}: {shares:?}");
                let (lo, hi) = (
                    shares.iter().map(|s| s.len()).min().unwrap(),
                    shares.iter().map(|s| s.len()).max().unwrap(),
                );
                assert!(hi - lo <= 1, "n {n} size {size}: {shares:?}");
            }
        }
    }

    #[test]
    fn f64_messages_keep_every_bit() {
        let v = [
            0.0,
            -0.0,
            1.5,
            f64::NAN,
            f64::INFINITY,
            f64::MIN_POSITIVE / 2.0,
        ];
        let back = decode_f64s(&encode_f64s(&v)).unwrap();
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&v));
        assert!(decode_f64s(&[0u8; 7]).is_err());
    }

    #[test]
    fn the_launchers_kill_grace_is_read_and_a_short_one_is_reported() {
        // Open MPI's default when mpirun was not given the parameter.
        assert_eq!(kill_grace_from(None), 1.0);
        assert_eq!(kill_grace_from(Some("600")), 600.0);
        assert_eq!(kill_grace_from(Some("junk")), 1.0);
        // A tiny model's millisecond steps fit in the default second; a 3 s step does not, and
        // the notice names the parameter with a value that fits it.
        assert!(kill_grace_notice(1.0, 0.01).is_none());
        let n = kill_grace_notice(1.0, 3.0).unwrap();
        assert!(n.contains("odls_base_sigkill_timeout 19 "), "{n}");
        assert!(n.contains("3.0 s"), "{n}");
        assert!(kill_grace_notice(19.0, 3.0).is_none());
        let n = kill_grace_notice(60.0, 45.0).unwrap();
        assert!(n.contains("odls_base_sigkill_timeout 145 "), "{n}");
    }
}
