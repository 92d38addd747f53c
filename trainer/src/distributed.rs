//! Data-parallel training with Burn's collective operations (`burn-collective`).
//!
//! A run has `world` peers, one thread per device (`--devices cpu,cpu` or
//! `--devices cuda:0,cuda:1`). Every peer holds the whole model, reads its own shard of every
//! batch, and sums its gradients with the others' (an all-reduce through Burn's local
//! collective server); since the loss is normalised by the target tokens of the whole global
//! batch, the sum is exactly the gradient of one large batch, and every peer takes the same
//! optimizer step. Only the leader (rank 0) writes checkpoints, metrics and exports.
//!
//! Several machines (Burn's global orchestrator) are not wired in yet: with burn-collective
//! 0.21 two nodes on loopback waited on each other forever in their first all-reduce.

use anyhow::{anyhow, bail, Result};
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn_collective::{CollectiveConfig, PeerId, ReduceOperation};
use std::cell::RefCell;

/// This thread's place in a data-parallel run.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    /// 0 .. world.
    pub rank: usize,
    /// Peers in the run.
    pub world: usize,
}

impl Default for Peer {
    /// A run on one device.
    fn default() -> Self {
        Self { rank: 0, world: 1 }
    }
}

impl Peer {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// The peer that writes checkpoints, metrics and exports.
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    pub fn is_distributed(&self) -> bool {
        self.world > 1
    }

    fn id(&self) -> PeerId {
        PeerId::from(self.rank)
    }
}

thread_local! {
    static CURRENT: RefCell<Peer> = RefCell::new(Peer::default());
}

/// The peer this thread trains as (a single-device run unless [`run_as`] set one).
pub fn current_peer() -> Peer {
    CURRENT.with(|peer| peer.borrow().clone())
}

/// Runs `work` on this thread as `peer` (each data-parallel thread calls it once).
pub fn run_as<T>(peer: Peer, work: impl FnOnce() -> T) -> T {
    CURRENT.with(|current| *current.borrow_mut() = peer);
    let out = work();
    CURRENT.with(|current| *current.borrow_mut() = Peer::default());
    out
}

/// Joins the collective; every peer of the run must call it before the first all-reduce.
pub fn register<B: Backend>(peer: &Peer, device: &B::Device) -> Result<()> {
    let config = CollectiveConfig::default().with_num_devices(peer.world);
    burn_collective::register::<B>(peer.id(), device.clone(), config).map_err(|e| {
        anyhow!(
            "peer {} of {} could not join the data-parallel group: {e:?}",
            peer.rank(),
            peer.world()
        )
    })
}

/// Leaves the collective at the end of a run.
pub fn finish<B: Backend>(peer: &Peer) {
    let _ = burn_collective::finish_collective::<B>(peer.id());
}

/// The element-wise sum of `tensor` over all peers (each peer gets the sum).
pub fn all_reduce_sum<B: Backend>(peer: &Peer, tensor: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
    let summed = burn_collective::all_reduce::<B>(
        peer.id(),
        tensor.into_primitive().tensor(),
        ReduceOperation::Sum,
    )
    .map_err(|e| anyhow!("all-reduce on peer {} failed: {e:?}", peer.rank()))?;
    Ok(Tensor::from_primitive(TensorPrimitive::Float(summed)))
}

/// Sums a list of tensors over all peers in one all-reduce (concatenated, then split back).
pub fn all_reduce_sum_many<B: Backend>(
    peer: &Peer,
    tensors: Vec<Tensor<B, 1>>,
) -> Result<Vec<Tensor<B, 1>>> {
    if tensors.is_empty() {
        return Ok(tensors);
    }
    let sizes: Vec<usize> = tensors.iter().map(|t| t.dims()[0]).collect();
    let summed = all_reduce_sum(peer, Tensor::cat(tensors, 0))?;
    let mut start = 0;
    Ok(sizes
        .into_iter()
        .map(|size| {
            let part = summed.clone().slice(s![start..start + size]);
            start += size;
            part
        })
        .collect())
}

/// This peer's share of a global batch of `indices` (contiguous, in rank order).
pub fn shard<T: Clone>(peer: &Peer, global: &[T]) -> Result<Vec<T>> {
    let world = peer.world();
    if !global.len().is_multiple_of(world) {
        bail!(
            "a global batch of {} cannot be split evenly over {world} peers",
            global.len()
        );
    }
    let per_peer = global.len() / world;
    Ok(global[peer.rank() * per_peer..(peer.rank() + 1) * per_peer].to_vec())
}

/// `cpu,cpu` or `cuda:0,cuda:1`: the devices of this node, one peer each.
pub fn parse_devices(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_contiguous_in_rank_order() {
        let peer = Peer { rank: 2, world: 4 };
        assert!(!peer.is_leader() && peer.is_distributed());
        let global: Vec<usize> = (0..8).collect();
        assert_eq!(shard(&peer, &global).unwrap(), vec![4, 5]);
        assert!(shard(&peer, &global[..6]).is_err());
        assert!(Peer::default().is_leader() && !Peer::default().is_distributed());
        assert_eq!(parse_devices("cpu, cpu"), vec!["cpu", "cpu"]);
    }
}
