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
        Ok(Self { world, rank, size })
    }
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
