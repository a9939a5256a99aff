//! The world over MPI (rsmpi against the system's library).
use super::Comm;
use anyhow::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;
use std::sync::Mutex;

/// The MPI environment lives until [`finalize`]; MPI_Finalize runs when it is dropped.
static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);

pub struct MpiWorld {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
}

// SAFETY: the training loop calls the communicator from one thread at a time (MPI is initialized
// with the default threading level, which allows that: MPI_THREAD_FUNNELED needs only that one
// thread make the calls; the loop's is the main thread).
unsafe impl Send for MpiWorld {}
unsafe impl Sync for MpiWorld {}

impl MpiWorld {
    pub fn init() -> Result<Self> {
        let Some(universe) = mpi::initialize() else {
            bail!("MPI is already initialized");
        };
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        *UNIVERSE.lock().unwrap() = Some(universe);
        if size > 1 {
            watch_launcher(rank, size);
        }
        Ok(Self { world, rank, size })
    }
}

/// When a rank dies, the launcher (mpirun, or the node's daemon) ends the job and exits; a rank
/// waiting in a collective for the dead one, or one that took the launcher's SIGTERM as a stop
/// request to finish its step, would wait forever. So every rank watches its parent process and
/// ends itself, within a second, once the launcher is gone.
fn watch_launcher(rank: usize, size: usize) {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        // SAFETY: as above.
        if unsafe { libc::getppid() } != parent {
            eprintln!(
                "error: rank {rank} of {size}: the launcher that started this rank (pid {parent}) \
                 has ended the job, so another rank has stopped (the launcher's message names it); \
                 this rank stops too (a --resume continues from the last checkpoint)"
            );
            // SAFETY: ends the process at once, without the exit handlers that could wait on MPI.
            unsafe { libc::_exit(1) };
        }
    });
}

pub fn finalize() {
    if let Ok(mut u) = UNIVERSE.lock() {
        u.take();
    }
}

impl Comm for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let n = Count::try_from(mine.len())?;
        let mut counts = vec![0 as Count; self.size];
        self.world.all_gather_into(&n, &mut counts[..]);
        let displs: Vec<Count> = counts
            .iter()
            .scan(0, |acc, &c| {
                let d = *acc;
                *acc += c;
                Some(d)
            })
            .collect();
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        let mut buf = vec![0u8; total];
        {
            let mut part = PartitionMut::new(&mut buf[..], counts.clone(), &displs[..]);
            self.world.all_gather_varcount_into(mine, &mut part);
        }
        Ok(counts
            .iter()
            .zip(&displs)
            .map(|(&c, &d)| buf[d as usize..(d + c) as usize].to_vec())
            .collect())
    }
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn broadcast(&self, buf: &[u8]) -> Result<Vec<u8>> {
        let root = self.world.process_at_rank(0);
        let mut n = buf.len() as u64;
        root.broadcast_into(&mut n);
        let mut out = if self.rank == 0 {
            buf.to_vec()
        } else {
            vec![0u8; n as usize]
        };
        root.broadcast_into(&mut out[..]);
        Ok(out)
    }
    fn describe(&self) -> String {
        format!("MPI, {} ranks", self.size)
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
