//! Data-parallel training with Burn's collective operations (`burn-collective`).
//!
//! A run has `world` peers: one thread per device of a node (`--devices cpu,cpu` or
//! `--devices cuda:0,cuda:1`), on one node or on several joined through Burn's global
//! orchestrator (`trainer orchestrator --bind PORT`, then each node `--orchestrator HOST:PORT
//! --node-rank R --num-nodes N`). Every peer holds the whole model, reads its own shard of
//! every batch, and sums its gradients with the others' (an all-reduce: between the devices of
//! a node through Burn's local collective server, then between nodes over WebSockets); since
//! the loss is normalised by the target tokens of the whole global batch, the sum is exactly
//! the gradient of one large batch, and every peer takes the same optimizer step. Only the
//! leader (rank 0 of node 0) writes checkpoints, metrics and exports.

use anyhow::{anyhow, bail, Context, Result};
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn_collective::{CollectiveConfig, PeerId, ReduceOperation};
use std::cell::{Cell, RefCell};

/// This thread's place in a data-parallel run.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    /// 0 .. world: `node_rank * devices per node + local rank`.
    pub rank: usize,
    /// Peers in the run, over all nodes.
    pub world: usize,
    /// Peers on this node (one per device).
    pub local_world: usize,
    /// The nodes of a run over several machines; `None` on one machine.
    pub cluster: Option<Cluster>,
}

/// Several machines joined through Burn's global orchestrator.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// `ws://HOST:PORT` of `trainer orchestrator`.
    pub orchestrator: String,
    /// 0 .. num_nodes; node 0 holds the leader.
    pub node_rank: usize,
    pub num_nodes: usize,
    /// `HOST:PORT` at which the other nodes reach this one; it listens on PORT.
    pub node_address: String,
}

impl Cluster {
    /// Checks the addresses and ranks of `--orchestrator --node-rank --num-nodes
    /// --node-address`, so a typo fails before anything is loaded.
    pub fn new(
        orchestrator: &str,
        node_rank: usize,
        num_nodes: usize,
        node_address: &str,
    ) -> Result<Self> {
        if num_nodes == 0 || node_rank >= num_nodes {
            bail!("--node-rank {node_rank} is not one of the {num_nodes} nodes (0 .. {num_nodes})");
        }
        port_of(node_address).context("--node-address")?;
        port_of(orchestrator).context("--orchestrator")?;
        Ok(Self {
            orchestrator: websocket_url(orchestrator),
            node_rank,
            num_nodes,
            node_address: node_address.to_string(),
        })
    }

    fn node_port(&self) -> u16 {
        port_of(&self.node_address).expect("checked in Cluster::new")
    }
}

/// `ws://HOST:PORT` from `HOST:PORT` (a scheme already given is kept).
fn websocket_url(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("ws://{address}")
    }
}

/// The port of `[ws://]HOST:PORT` or of a bare `PORT`.
pub fn port_of(address: &str) -> Result<u16> {
    let after_scheme = address.rsplit("://").next().unwrap_or(address);
    let port = after_scheme.rsplit(':').next().unwrap_or(after_scheme);
    port.trim_end_matches('/')
        .parse()
        .map_err(|_| anyhow!("`{address}` has no port (expected HOST:PORT)"))
}

impl Default for Peer {
    /// A run on one device.
    fn default() -> Self {
        Self {
            rank: 0,
            world: 1,
            local_world: 1,
            cluster: None,
        }
    }
}

impl Peer {
    /// The peer on the `local_rank`-th of this node's `local_world` devices.
    pub fn new(local_rank: usize, local_world: usize, cluster: Option<&Cluster>) -> Self {
        let (node_rank, num_nodes) = cluster.map_or((0, 1), |c| (c.node_rank, c.num_nodes));
        Self {
            rank: node_rank * local_world + local_rank,
            world: num_nodes * local_world,
            local_world,
            cluster: cluster.cloned(),
        }
    }

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
    /// How to leave the collective this thread joined (`finish` for the backend it joined
    /// with); `None` before the first [`register`].
    static JOINED: Cell<Option<fn(&Peer)>> = const { Cell::new(None) };
}

/// `println!` on the leading peer only, so that a data-parallel run says things once.
#[macro_export]
macro_rules! leader_println {
    ($($arg:tt)*) => {
        if $crate::distributed::current_peer().is_leader() {
            println!($($arg)*);
        }
    };
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
/// Across nodes it also checks that every node brought as many devices as this one (the
/// shards assume it).
pub fn register<B: Backend>(peer: &Peer, device: &B::Device) -> Result<()> {
    if JOINED.with(Cell::get).is_some() {
        // A later stage of the same run (each stage starts a trainer): already in.
        return Ok(());
    }
    let mut config = CollectiveConfig::default().with_num_devices(peer.local_world);
    if let Some(cluster) = &peer.cluster {
        // burn-communication logs every tensor transfer at INFO unless a logger is already
        // installed: install one that shows warnings and errors only.
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
            .with_writer(std::io::stderr)
            .try_init();
        println!(
            "node {} of {}: joining through the orchestrator at {} (listening on {})",
            cluster.node_rank, cluster.num_nodes, cluster.orchestrator, cluster.node_address
        );
        let orchestrator = cluster
            .orchestrator
            .parse()
            .map_err(|e| anyhow!("--orchestrator {}: {e:?}", cluster.orchestrator))?;
        let node_address = websocket_url(&cluster.node_address);
        let node_address = node_address
            .parse()
            .map_err(|e| anyhow!("--node-address {node_address}: {e:?}"))?;
        config = config
            .with_num_nodes(cluster.num_nodes as u32)
            .with_global_address(orchestrator)
            .with_node_address(node_address)
            .with_data_service_port(cluster.node_port());
    }
    burn_collective::register::<B>(peer.id(), device.clone(), config).map_err(|e| {
        anyhow!(
            "peer {} of {} could not join the data-parallel group: {e:?}",
            peer.rank(),
            peer.world()
        )
    })?;
    if peer.cluster.is_some() {
        let joined = sum_values::<B>(peer, &[1.0], device)?[0].round() as usize;
        if joined != peer.world() {
            bail!(
                "{joined} peers joined, but this node expected {} ({} per node): start every \
                 node with the same number of --devices",
                peer.world(),
                peer.local_world
            );
        }
    }
    JOINED.with(|joined| joined.set(Some(finish::<B>)));
    Ok(())
}

/// Leaves the collective this thread joined, once its peer's work has succeeded (across
/// nodes: unregisters from the orchestrator, which can then serve the next run).
pub fn leave() {
    if let Some(finish) = JOINED.with(Cell::take) {
        finish(&current_peer());
    }
}

/// Waits until every peer has reached this point (e.g. the leader has written a file the
/// others read next).
pub fn barrier<B: Backend>(peer: &Peer, device: &B::Device) -> Result<()> {
    sum_values::<B>(peer, &[0.0], device).map(|_| ())
}

/// The element-wise sum of a few host numbers (counts, votes) over all peers; exact for
/// integers below 2^24.
pub fn sum_values<B: Backend>(peer: &Peer, values: &[f32], device: &B::Device) -> Result<Vec<f32>> {
    let summed = all_reduce_sum(peer, Tensor::<B, 1>::from_floats(values, device))?;
    Ok(summed.into_data().convert::<f32>().to_vec()?)
}

/// The value each peer passed, in rank order (the sum of one-hot vectors).
pub fn gather_scalar<B: Backend>(peer: &Peer, value: f32, device: &B::Device) -> Result<Vec<f32>> {
    let mut slots = vec![0.0; peer.world()];
    slots[peer.rank()] = value;
    sum_values::<B>(peer, &slots, device)
}

/// Serves Burn's global orchestrator until Ctrl-C: nodes of a multi-machine run register with
/// it and learn each other's addresses. `bind` is `[HOST:]PORT`; Burn listens on every
/// interface at PORT.
pub fn serve_orchestrator(bind: &str) -> Result<()> {
    let port = port_of(bind).context("--bind")?;
    println!("orchestrator: listening on 0.0.0.0:{port} (every interface); Ctrl-C stops it");
    tokio::runtime::Runtime::new()
        .context("cannot start the orchestrator's async runtime")?
        .block_on(burn_collective::start_global_orchestrator(port));
    Ok(())
}

fn finish<B: Backend>(peer: &Peer) {
    if let Err(error) = burn_collective::finish_collective::<B>(peer.id()) {
        eprintln!(
            "warning: peer {} left the collective uncleanly: {error:?}",
            peer.rank()
        );
    }
}

/// The element-wise sum of `tensor` over all peers (each peer gets the sum).
pub fn all_reduce_sum<B: Backend>(peer: &Peer, tensor: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
    // Burn's ring all-reduce between nodes cuts the tensor into one slice per node, so a
    // short one is padded with zeros to at least that many elements.
    let len = tensor.dims()[0];
    let tensor = if len < peer.world() {
        let padding = Tensor::zeros([peer.world() - len], &tensor.device());
        Tensor::cat(vec![tensor, padding], 0)
    } else {
        tensor
    };
    let summed = burn_collective::all_reduce::<B>(
        peer.id(),
        tensor.into_primitive().tensor(),
        ReduceOperation::Sum,
    )
    .map_err(|e| {
        anyhow!(
            "all-reduce on peer {} failed ({e:?}): a peer of the run stopped or cannot be \
             reached; restart every node with --resume auto",
            peer.rank()
        )
    })?;
    Ok(Tensor::from_primitive(TensorPrimitive::Float(summed)).slice(s![0..len]))
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
        let peer = Peer::new(0, 2, Some(&Cluster::new("h:1", 1, 2, "h:2").unwrap()));
        assert_eq!((peer.rank(), peer.world()), (2, 4));
        assert!(!peer.is_leader() && peer.is_distributed());
        let global: Vec<usize> = (0..8).collect();
        assert_eq!(shard(&peer, &global).unwrap(), vec![4, 5]);
        assert!(shard(&peer, &global[..6]).is_err());
        assert!(Peer::default().is_leader() && !Peer::default().is_distributed());
        assert_eq!(parse_devices("cpu, cpu"), vec!["cpu", "cpu"]);
    }

    #[test]
    fn cluster_addresses_and_ranks_are_checked() {
        let cluster = Cluster::new("host0:4300", 1, 2, "10.0.0.2:4301").unwrap();
        assert_eq!(cluster.orchestrator, "ws://host0:4300");
        assert_eq!(cluster.node_port(), 4301);
        assert_eq!(port_of("ws://h:9/").unwrap(), 9);
        assert_eq!(port_of("4300").unwrap(), 4300);
        let error = |result: Result<Cluster>| format!("{:#}", result.unwrap_err());
        assert!(error(Cluster::new("h:1", 2, 2, "h:2")).contains("--node-rank 2"));
        assert!(error(Cluster::new("h:1", 0, 2, "h")).contains("--node-address"));
        assert!(error(Cluster::new("h:x", 0, 2, "h:2")).contains("--orchestrator"));
    }
}
