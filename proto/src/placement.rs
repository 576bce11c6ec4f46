//! The expert placement plan: which ranks of an expert-parallel group hold each routed expert.
//!
//! The operator writes it (JSON, key [`PLAN_FILE`] of the placement ConfigMap) and every rank
//! reads it (`DSD_PLACEMENT`). Ranks of one group must hold the same plan; the worker refuses
//! to form a group otherwise.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// File name of the plan inside the placement ConfigMap and its mount.
pub const PLAN_FILE: &str = "plan.json";

/// Current plan format.
pub const PLAN_VERSION: u32 = 1;

/// `experts[e]` lists the ranks that hold expert `e`; the first is its primary owner and the
/// rest are redundant copies.
pub type ExpertRanks = Vec<Vec<u32>>;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PlacementPlan {
    pub version: u32,
    /// Ranks in the group.
    pub group_size: u32,
    /// Routed experts per MoE layer.
    pub routed_experts: u32,
    /// Placement of every MoE layer that has no entry in `layers`.
    pub default: ExpertRanks,
    /// Placements for individual layers (by layer index), e.g. from measured expert load.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub layers: BTreeMap<u32, ExpertRanks>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("unsupported placement plan version {0} (expected {PLAN_VERSION})")]
    Version(u32),
    #[error("groupSize must be at least 1")]
    EmptyGroup,
    #[error("{layer}: has {got} experts, expected routedExperts = {want}")]
    ExpertCount {
        layer: String,
        got: usize,
        want: u32,
    },
    #[error("{layer}: expert {expert} has no rank")]
    Unowned { layer: String, expert: usize },
    #[error("{layer}: expert {expert} names rank {rank}, but groupSize is {group_size}")]
    RankOutOfRange {
        layer: String,
        expert: usize,
        rank: u32,
        group_size: u32,
    },
    #[error("{layer}: expert {expert} lists rank {rank} twice")]
    DuplicateRank {
        layer: String,
        expert: usize,
        rank: u32,
    },
}

impl PlacementPlan {
    /// Expert `e` on rank `e mod group_size`; then `redundant` extra copies, of experts
    /// 0, 1, 2, … in turn, each on the next rank that does not hold that expert yet. Copies
    /// that cannot find such a rank (every rank already holds the expert) are dropped.
    pub fn round_robin(group_size: u32, routed_experts: u32, redundant: u32) -> Self {
        let group_size = group_size.max(1);
        let mut experts: ExpertRanks = (0..routed_experts).map(|e| vec![e % group_size]).collect();
        if routed_experts > 0 {
            for copy in 0..redundant {
                let expert = (copy % routed_experts) as usize;
                let start = routed_experts + copy;
                let free = (0..group_size)
                    .map(|offset| (start + offset) % group_size)
                    .find(|rank| !experts[expert].contains(rank));
                if let Some(rank) = free {
                    experts[expert].push(rank);
                }
            }
        }
        PlacementPlan {
            version: PLAN_VERSION,
            group_size,
            routed_experts,
            default: experts,
            layers: BTreeMap::new(),
        }
    }

    pub fn from_json(text: &str) -> Result<Self, String> {
        let plan: PlacementPlan = serde_json::from_str(text).map_err(|e| e.to_string())?;
        plan.validate().map_err(|e| e.to_string())?;
        Ok(plan)
    }

    pub fn validate(&self) -> Result<(), PlanError> {
        if self.version != PLAN_VERSION {
            return Err(PlanError::Version(self.version));
        }
        if self.group_size == 0 {
            return Err(PlanError::EmptyGroup);
        }
        let layers = std::iter::once(("default".to_string(), &self.default))
            .chain(self.layers.iter().map(|(l, e)| (format!("layers.{l}"), e)));
        for (layer, experts) in layers {
            if experts.len() != self.routed_experts as usize {
                return Err(PlanError::ExpertCount {
                    layer,
                    got: experts.len(),
                    want: self.routed_experts,
                });
            }
            for (expert, ranks) in experts.iter().enumerate() {
                if ranks.is_empty() {
                    return Err(PlanError::Unowned { layer, expert });
                }
                for (i, &rank) in ranks.iter().enumerate() {
                    if rank >= self.group_size {
                        let group_size = self.group_size;
                        return Err(PlanError::RankOutOfRange {
                            layer,
                            expert,
                            rank,
                            group_size,
                        });
                    }
                    if ranks[..i].contains(&rank) {
                        return Err(PlanError::DuplicateRank {
                            layer,
                            expert,
                            rank,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Placement of one MoE layer.
    pub fn layer(&self, layer: u32) -> &ExpertRanks {
        self.layers.get(&layer).unwrap_or(&self.default)
    }

    /// Experts a rank must load for one MoE layer, ascending.
    pub fn experts_on_rank(&self, layer: u32, rank: u32) -> Vec<u32> {
        (0u32..)
            .zip(self.layer(layer))
            .filter(|(_, ranks)| ranks.contains(&rank))
            .map(|(expert, _)| expert)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(plan: &PlacementPlan, rank: u32) -> usize {
        plan.experts_on_rank(0, rank).len()
    }

    #[test]
    fn round_robin_spreads_experts_evenly() {
        let plan = PlacementPlan::round_robin(16, 256, 0);
        plan.validate().unwrap();
        assert!((0..16).all(|r| load(&plan, r) == 16));
        assert_eq!(plan.experts_on_rank(7, 3)[..3], [3, 19, 35]);
    }

    #[test]
    fn redundant_copies_land_on_other_ranks_and_keep_balance() {
        let plan = PlacementPlan::round_robin(4, 8, 4);
        plan.validate().unwrap();
        // experts 0..4 get a second copy, never on their primary rank
        for e in 0..4 {
            assert_eq!(plan.default[e].len(), 2, "expert {e}");
            assert_ne!(plan.default[e][0], plan.default[e][1]);
        }
        assert!((0..4).all(|r| load(&plan, r) == 3));
    }

    #[test]
    fn copies_that_do_not_fit_are_dropped() {
        let plan = PlacementPlan::round_robin(1, 4, 2);
        plan.validate().unwrap();
        assert!(plan.default.iter().all(|ranks| ranks == &[0]));
    }

    #[test]
    fn json_round_trip_and_layer_overrides() {
        let mut plan = PlacementPlan::round_robin(2, 4, 0);
        plan.layers
            .insert(5, vec![vec![1], vec![1], vec![0], vec![0]]);
        let text = serde_json::to_string(&plan).unwrap();
        assert_eq!(PlacementPlan::from_json(&text).unwrap(), plan);
        assert_eq!(plan.experts_on_rank(5, 1), [0, 1]);
        assert_eq!(plan.experts_on_rank(4, 1), [1, 3]);
    }

    #[test]
    fn invalid_plans_name_the_problem() {
        let mut plan = PlacementPlan::round_robin(2, 4, 0);
        plan.layers
            .insert(3, vec![vec![0], vec![2], vec![0], vec![1]]);
        assert_eq!(
            plan.validate().unwrap_err().to_string(),
            "layers.3: expert 1 names rank 2, but groupSize is 2"
        );
        plan.layers.insert(3, vec![vec![0]]);
        assert!(
            plan.validate()
                .unwrap_err()
                .to_string()
                .contains("has 1 experts")
        );
        plan.layers.clear();
        plan.default[2] = vec![1, 1];
        assert!(
            plan.validate()
                .unwrap_err()
                .to_string()
                .contains("rank 1 twice")
        );
        plan.default[2] = vec![];
        assert!(
            plan.validate()
                .unwrap_err()
                .to_string()
                .contains("has no rank")
        );
        let err = PlacementPlan::from_json(
            r#"{"version":9,"groupSize":1,"routedExperts":0,"default":[]}"#,
        );
        assert!(err.unwrap_err().contains("version 9"));
        assert!(PlacementPlan::from_json("{").is_err());
    }
}
