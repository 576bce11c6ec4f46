//! Expert parallelism: the ranks of a group each hold the replicated parts of the model and
//! their share of the routed experts (the placement plan's), and at every MoE layer exchange
//! tokens with one another.
//!
//! Per MoE layer, each rank:
//! 1. *dispatch*: sends every token to the ranks that own its top-k experts, one copy per
//!    destination rank (not per expert), with the experts and gate weights it wants there;
//! 2. computes, for every token it received, the gate-weighted sum of its experts here;
//! 3. *combine*: sends each sum back to the token's rank, which adds them up.
//!
//! Both exchanges are all-to-alls over a [`Transport`]: every rank takes part in every one,
//! with an empty batch if it has no tokens, so the ranks of a group step in lockstep.

mod dispatch;
mod transport;
mod wire;

use std::path::Path;
use std::sync::Arc;

use deepseek_proto::placement::PlacementPlan;

pub use self::dispatch::ExpertParallel;
pub use self::transport::{
    ChannelTransport, TcpTransport, Transport, check_peers_answer, listen_for_peers,
};
pub use self::wire::Wire;
use crate::bail;
use crate::error::Result;
use crate::model::Model;
use crate::model::moe::LocalExperts;

/// The group could not exchange: a peer went away, stalled, or sent garbage. Every request
/// on the group fails with it (UNAVAILABLE), unlike a failure of one request's step.
#[derive(Debug, thiserror::Error)]
#[error("expert-parallel group: {0}")]
pub struct GroupError(pub String);

/// What ranks check before forming a group: the same model and plan (a hash of both).
pub fn group_identity(config_json: &[u8], plan: &PlacementPlan, wire: Wire) -> u64 {
    let plan = serde_json::to_vec(plan).unwrap_or_default();
    crate::fnv1a([config_json, &[0xff], &plan, &[wire as u8]])
}

/// What carries a group's exchanges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EpTransport {
    /// The TCP mesh, through host memory: any ranks, with a stall timeout.
    Tcp,
    /// NCCL between GPU ranks (the TCP mesh forms the group and hands out NCCL's id).
    Nccl,
}

/// Loads one rank of an expert-parallel group from a checkpoint directory: the replicated
/// parts and the routed experts `plan` gives rank `rank`; no other expert is read from disk.
/// `join` is called once the weights are in memory (ranks load at their own pace and meet
/// only when ready) and returns the group's transport, which the model keeps.
pub fn open_rank(
    dir: &Path,
    plan: PlacementPlan,
    rank: usize,
    wire: Wire,
    join: impl FnOnce() -> Result<Arc<dyn Transport>>,
) -> Result<(Model, Arc<dyn Transport>)> {
    let mut joined = None;
    let model = Model::open_with_experts(dir, |cfg, ckpt| {
        plan_matches_model(&plan, cfg.moe.n_routed_experts)?;
        let local = LocalExperts::load_owned(cfg, ckpt, |layer, e| {
            plan.layer(layer as u32)[e].contains(&(rank as u32))
        })?;
        let transport = join()?;
        plan_matches_group(&plan, transport.as_ref(), rank)?;
        joined = Some(transport.clone());
        let hidden = cfg.hidden_size;
        Ok(Box::new(ExpertParallel::new(
            Box::new(local),
            plan,
            transport,
            wire,
            hidden,
        )))
    })?;
    Ok((model, joined.expect("the experts were loaded")))
}

/// The plan is for a model with `experts` routed experts.
pub fn plan_matches_model(plan: &PlacementPlan, experts: usize) -> Result<()> {
    if plan.routed_experts as usize != experts {
        bail!(
            "the placement plan has {} routed experts, the model {experts}",
            plan.routed_experts
        );
    }
    Ok(())
}

/// The plan is for this group, and the transport puts this process at rank `rank`.
pub fn plan_matches_group(
    plan: &PlacementPlan,
    transport: &dyn Transport,
    rank: usize,
) -> Result<()> {
    if plan.group_size as usize != transport.size() || transport.rank() != rank {
        bail!(
            "the placement plan is for {} ranks, the group has {} (this is rank {})",
            plan.group_size,
            transport.size(),
            transport.rank()
        );
    }
    Ok(())
}
