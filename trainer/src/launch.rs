//! Starting a run on its devices: one peer (thread) per device of `--devices`, each a peer of
//! one data-parallel run (joined across machines through `Cluster`), after the leading node
//! has claimed the run folder (`run_dir::claim`: one writer, no silent overwrite).

use crate::backend::DeviceSpec;
use crate::distributed::{self, Cluster, Peer};
use crate::run_dir::{self, Resume};
use anyhow::{bail, Result};
use std::path::Path;

/// Backward passes recurse through the graph: peers get the main thread's room.
const PEER_STACK: usize = 64 << 20;

/// Where a run goes: its devices, its node among several, and its run folder.
pub struct Launch<'a> {
    /// `--devices`, or the config's list (empty: the config's one device, `config_device`).
    pub devices: &'a [String],
    pub config_device: &'a str,
    pub cluster: Option<&'a Cluster>,
    pub run_dir: &'a Path,
    pub resume: &'a Resume,
    /// `--overwrite`: move an earlier run in the run folder aside.
    pub overwrite: bool,
}

impl Launch<'_> {
    fn is_data_parallel(&self) -> bool {
        self.devices.len() > 1 || self.cluster.is_some()
    }
}

/// Runs `work(device, spec)` once on the config's device, or, data-parallel, once per device
/// of `--devices` on threads that are this node's peers of one run. Each device is checked to
/// be usable first, and the leading node holds the run folder's lock until the run ends.
pub fn run_on_each_device(
    launch: &Launch<'_>,
    work: impl Fn(String, DeviceSpec) -> Result<()> + Sync,
) -> Result<()> {
    let devices: Vec<String> = if launch.devices.is_empty() {
        vec![launch.config_device.to_string()]
    } else {
        launch.devices.to_vec()
    };
    let specs = devices
        .iter()
        .map(|d| DeviceSpec::parse(d))
        .collect::<Result<Vec<_>>>()?;
    if specs
        .iter()
        .any(|s| std::mem::discriminant(s) != std::mem::discriminant(&specs[0]))
    {
        // Peers of different backends would join different collectives and wait forever.
        bail!(
            "--devices {} mixes CPU and GPU devices: a run uses one kind",
            devices.join(",")
        );
    }
    for spec in &specs {
        spec.ensure_available()?;
    }
    // The leading node owns the run folder for the whole run (other nodes only read it, or
    // write their own peers/N).
    let leads = launch.cluster.is_none_or(|c| c.node_rank == 0);
    let _lock = match leads {
        true => Some(run_dir::claim(
            launch.run_dir,
            launch.resume,
            launch.overwrite,
        )?),
        false => None,
    };
    let work = |index: usize| work(devices[index].clone(), specs[index]);
    if !launch.is_data_parallel() {
        // One peer still runs on a thread pool of its own: parallel kernels called from a
        // pool thread share work directly (`backend::on_a_pool_thread`).
        return on_cores_of_its_own(Some(share_of_cores(1)), || work(0));
    }
    // CPU peers split the machine's cores: each runs in a thread pool of its share, so that
    // its parallel kernels never wait on (or wake) threads that the other peers keep busy.
    let cpu_peers = specs
        .iter()
        .filter(|s| matches!(s, DeviceSpec::Cpu))
        .count();
    let cores_per_peer = (cpu_peers > 0).then(|| share_of_cores(cpu_peers));
    std::thread::scope(|scope| {
        let peers: Vec<_> = (0..devices.len())
            .map(|local_rank| {
                let peer = Peer::new(local_rank, devices.len(), launch.cluster);
                let rank = peer.rank();
                let work = &work;
                std::thread::Builder::new()
                    .name(format!("peer-{local_rank}"))
                    .stack_size(PEER_STACK)
                    .spawn_scoped(scope, move || {
                        let outcome = on_cores_of_its_own(cores_per_peer, || {
                            distributed::run_as(peer, || {
                                let outcome = work(local_rank);
                                if outcome.is_ok() {
                                    distributed::leave();
                                }
                                outcome
                            })
                        });
                        if let Err(error) = &outcome {
                            // The other peers would wait for this one forever: end the run.
                            eprintln!("error: data-parallel peer {rank}: {error:#}");
                            std::process::exit(1);
                        }
                        outcome
                    })
            })
            .collect::<std::io::Result<_>>()?;
        for (rank, peer) in peers.into_iter().enumerate() {
            peer.join()
                .map_err(|_| anyhow::anyhow!("data-parallel peer {rank} panicked"))??;
        }
        Ok(())
    })
}

/// This machine's cores divided among `peers` (at least one each).
pub fn share_of_cores(peers: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / peers.max(1)).max(1)
}

/// Runs `work` in a thread pool of `cores` threads of its own (each with a peer's stack), or
/// on this thread when `None`.
pub fn on_cores_of_its_own<T: Send>(cores: Option<usize>, work: impl FnOnce() -> T + Send) -> T {
    let Some(cores) = cores else { return work() };
    match rayon::ThreadPoolBuilder::new()
        .num_threads(cores)
        .stack_size(PEER_STACK)
        .build()
    {
        Ok(pool) => pool.install(work),
        Err(_) => work(), // no threads to spare: share the global pool as before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_runs_in_a_pool_of_its_share_of_cores() {
        let caller = std::thread::current().id();
        for cores in [1, 3] {
            let (threads, thread) = on_cores_of_its_own(Some(cores), || {
                (rayon::current_num_threads(), std::thread::current().id())
            });
            assert_eq!(threads, cores);
            assert_ne!(thread, caller, "runs on the pool's thread");
        }
        let here = on_cores_of_its_own(None, || std::thread::current().id());
        assert_eq!(here, caller);
    }
}
