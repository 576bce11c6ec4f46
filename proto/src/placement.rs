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

/// The worker counter of tokens routed to each expert (labels `layer`, `expert`): the load
/// that placement is balanced by.
pub const EXPERT_LOAD_METRIC: &str = "deepseek_worker_expert_routed_tokens_total";

/// Tokens routed to each expert, summed over `/metrics` texts (one per rank): layer →
/// counts of experts `0..experts`: the input of [`PlacementPlan::balanced`].
pub fn expert_load_from_metrics<'a>(
    texts: impl IntoIterator<Item = &'a str>,
    experts: usize,
) -> Result<BTreeMap<u32, Vec<u64>>, String> {
    let name = format!("{EXPERT_LOAD_METRIC}{{");
    let mut loads: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for (n, line) in texts.into_iter().flat_map(str::lines).enumerate() {
        let Some(rest) = line.strip_prefix(name.as_str()) else {
            continue;
        };
        let parsed = (|| {
            let (labels, value) = rest.split_once("} ")?;
            let label = |key: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix("=\"")?.strip_suffix('"'))
                    .and_then(|v| v.parse::<usize>().ok())
            };
            Some((
                label("layer")?,
                label("expert")?,
                value.trim().parse::<u64>().ok()?,
            ))
        })();
        let (layer, expert, tokens) =
            parsed.ok_or_else(|| format!("line {}: cannot read {line:?}", n + 1))?;
        if expert >= experts {
            return Err(format!(
                "line {}: expert {expert}, but the model has {experts} routed experts",
                n + 1
            ));
        }
        loads
            .entry(layer as u32)
            .or_insert_with(|| vec![0; experts])[expert] += tokens;
    }
    Ok(loads)
}

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

    /// Balanced by measured load, as DeepSeek's EPLB does: for every layer in `loads`
    /// (tokens routed to each expert), `redundant` extra copies go one at a time to the
    /// expert with the most load per copy, then all copies (each carrying an equal share of
    /// its expert's load) are packed heaviest first onto the least-loaded rank that has a
    /// free slot and no copy of that expert yet. Every rank gets the same number of slots,
    /// ⌈(experts + redundant) / group_size⌉. Layers without load data, and `default`, are
    /// round-robin.
    pub fn balanced(
        group_size: u32,
        routed_experts: u32,
        redundant: u32,
        loads: &BTreeMap<u32, Vec<u64>>,
    ) -> Self {
        let mut plan = Self::round_robin(group_size, routed_experts, redundant);
        for (&layer, load) in loads {
            if load.len() == routed_experts as usize && load.iter().any(|&l| l > 0) {
                plan.layers
                    .insert(layer, balance_layer(plan.group_size, load, redundant));
            }
        }
        plan
    }

    /// The load each rank carries in one layer when expert `e` has `load[e]` tokens, split
    /// evenly among its copies.
    pub fn rank_loads(&self, layer: u32, load: &[u64]) -> Vec<f64> {
        let mut per_rank = vec![0.0; self.group_size as usize];
        for (ranks, &tokens) in self.layer(layer).iter().zip(load) {
            for &rank in ranks {
                per_rank[rank as usize] += tokens as f64 / ranks.len() as f64;
            }
        }
        per_rank
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

/// One layer of [`PlacementPlan::balanced`].
fn balance_layer(group_size: u32, load: &[u64], redundant: u32) -> ExpertRanks {
    let ranks = group_size as usize;
    let mut copies = vec![1usize; load.len()];
    for _ in 0..redundant {
        // The expert whose copies carry the most, among those not yet on every rank.
        let hottest = (0..load.len())
            .filter(|&e| copies[e] < ranks)
            .max_by(|&a, &b| {
                let per_copy = |e: usize| load[e] as f64 / copies[e] as f64;
                per_copy(a).total_cmp(&per_copy(b)).then(b.cmp(&a))
            });
        match hottest {
            Some(e) => copies[e] += 1,
            None => break,
        }
    }
    let slots = copies.iter().sum::<usize>().div_ceil(ranks);
    let mut items: Vec<(f64, usize)> = (0..load.len())
        .flat_map(|e| std::iter::repeat_n((load[e] as f64 / copies[e] as f64, e), copies[e]))
        .collect();
    // Heaviest first; equal weights in expert order, so the plan is deterministic.
    items.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut rank_load = vec![0.0f64; ranks];
    let mut rank_slots = vec![0usize; ranks];
    let mut placement: ExpertRanks = vec![Vec::new(); load.len()];
    for (weight, e) in items {
        let free = |r: &usize| !placement[e].contains(&(*r as u32));
        let least = |candidates: &mut dyn Iterator<Item = usize>| {
            candidates.min_by(|&a, &b| rank_load[a].total_cmp(&rank_load[b]).then(a.cmp(&b)))
        };
        let rank = least(&mut (0..ranks).filter(|r| rank_slots[*r] < slots && free(r)))
            // Every rank with a free slot already holds this expert: exceed a slot instead.
            .or_else(|| least(&mut (0..ranks).filter(free)))
            .expect("an expert has at most group_size copies");
        rank_load[rank] += weight;
        rank_slots[rank] += 1;
        placement[e].push(rank as u32);
    }
    placement
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

    /// max / mean of the ranks' loads in one layer.
    fn imbalance(plan: &PlacementPlan, layer: u32, load: &[u64]) -> f64 {
        let per_rank = plan.rank_loads(layer, load);
        let mean = per_rank.iter().sum::<f64>() / per_rank.len() as f64;
        per_rank.iter().copied().fold(0.0, f64::max) / mean
    }

    #[test]
    fn a_skewed_load_is_balanced_by_replicating_the_hottest_experts() {
        // Zipf-like: expert e gets 1/(e+1) of the hottest expert's tokens, in a shuffled order.
        let load: Vec<u64> = (0..64u64)
            .map(|e| 1_000_000 / ((e * 37) % 64 + 1))
            .collect();
        let loads = BTreeMap::from([(3, load.clone())]);
        let plan = PlacementPlan::balanced(8, 64, 8, &loads);
        plan.validate().unwrap();
        let round_robin = PlacementPlan::round_robin(8, 64, 8);
        let (before, after) = (
            imbalance(&round_robin, 3, &load),
            imbalance(&plan, 3, &load),
        );
        assert!(before > 1.5, "round-robin is skewed here: {before}");
        assert!(after < 1.1, "balanced: {after}");
        // The hottest expert got copies; every rank has the same number of slots.
        let hottest = (0..64).max_by_key(|&e| load[e]).unwrap();
        assert!(plan.layer(3)[hottest].len() > 1);
        assert!((0..8).all(|r| plan.experts_on_rank(3, r).len() == 9));
        // Layers without data keep round-robin.
        assert_eq!(plan.layer(4), &round_robin.default);
    }

    #[test]
    fn expert_load_is_read_back_from_several_ranks() {
        let rank0 = "# TYPE x counter\ndeepseek_worker_expert_routed_tokens_total{layer=\"1\",expert=\"2\"} 5\n";
        let rank1 = "deepseek_worker_expert_routed_tokens_total{layer=\"1\",expert=\"2\"} 3\n\
                     deepseek_worker_expert_routed_tokens_total{layer=\"2\",expert=\"0\"} 7\n# EOF\n";
        let loads = expert_load_from_metrics([rank0, rank1], 4).unwrap();
        assert_eq!(loads[&1], [0, 0, 8, 0]);
        assert_eq!(loads[&2], [7, 0, 0, 0]);
        let bad = "deepseek_worker_expert_routed_tokens_total{layer=\"1\",expert=\"9\"} 1";
        assert!(
            expert_load_from_metrics([bad], 4)
                .unwrap_err()
                .contains("expert 9")
        );
        let garbled = "deepseek_worker_expert_routed_tokens_total{layer=\"x\"} 1";
        assert!(
            expert_load_from_metrics([garbled], 4)
                .unwrap_err()
                .contains("line 1")
        );
    }

    #[test]
    fn a_uniform_load_needs_no_copies_to_balance() {
        let loads = BTreeMap::from([(1, vec![100; 16])]);
        let plan = PlacementPlan::balanced(4, 16, 0, &loads);
        plan.validate().unwrap();
        assert_eq!(plan.rank_loads(1, &loads[&1]), [400.0; 4]);
        // Too many copies asked for: never two on one rank.
        let plan = PlacementPlan::balanced(2, 2, 10, &BTreeMap::from([(0, vec![5, 1])]));
        plan.validate().unwrap();
        assert!(plan.layer(0).iter().all(|ranks| ranks.len() <= 2));
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
