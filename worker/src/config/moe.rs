//! How routed experts are chosen: the router's settings, defaulted by family and checked so
//! that the expert groups can hold the experts each token picks.

use super::raw::RawConfig;
use super::{ConfigError, Family, field, positive};

/// How routed experts are chosen from the router scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopkMethod {
    /// V3: scores plus `e_score_correction_bias` rank groups (by their top-2 sum) and experts.
    NoauxTc,
    /// V2: groups ranked by their best expert, top-k within the chosen groups.
    GroupLimitedGreedy,
    /// Plain top-k over all experts.
    Greedy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoringFunc {
    Sigmoid,
    Softmax,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Moe {
    pub family: Family,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub topk_method: TopkMethod,
    pub scoring_func: ScoringFunc,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    pub moe_intermediate_size: usize,
    /// Layers below this index use the dense MLP.
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
}

/// The routing settings of `raw`, checked.
pub(super) fn check(raw: &RawConfig, family: Family) -> Result<Moe, ConfigError> {
    let topk_method = topk_method(family, raw.topk_method.as_deref())?;
    let scoring_func = scoring_func(family, raw.scoring_func.as_deref())?;
    let n_routed_experts = raw
        .n_routed_experts
        .ok_or_else(|| field("n_routed_experts", "missing"))?;
    let num_experts_per_tok = raw
        .num_experts_per_tok
        .ok_or_else(|| field("num_experts_per_tok", "missing"))?;
    let n_group = raw.n_group.unwrap_or(1);
    let topk_group = raw.topk_group.unwrap_or(1);
    positive("n_routed_experts", n_routed_experts)?;
    positive("num_experts_per_tok", num_experts_per_tok)?;
    positive("n_group", n_group)?;
    positive("moe_layer_freq", raw.moe_layer_freq)?;
    let moe = Moe {
        family,
        n_routed_experts,
        n_shared_experts: raw.n_shared_experts.unwrap_or(0),
        num_experts_per_tok,
        n_group,
        topk_group,
        topk_method,
        scoring_func,
        norm_topk_prob: raw.norm_topk_prob,
        routed_scaling_factor: raw.routed_scaling_factor,
        moe_intermediate_size: raw.moe_intermediate_size,
        first_k_dense_replace: raw.first_k_dense_replace,
        moe_layer_freq: raw.moe_layer_freq,
    };
    check_groups(&moe)?;
    Ok(moe)
}

/// `topk_method`, by default the family's.
fn topk_method(family: Family, name: Option<&str>) -> Result<TopkMethod, ConfigError> {
    match (family, name) {
        (_, Some("noaux_tc")) => Ok(TopkMethod::NoauxTc),
        (_, Some("group_limited_greedy")) => Ok(TopkMethod::GroupLimitedGreedy),
        (_, Some("greedy")) => Ok(TopkMethod::Greedy),
        (Family::V3, None) => Ok(TopkMethod::NoauxTc),
        (Family::V2, None) => Ok(TopkMethod::Greedy),
        (_, Some(other)) => Err(field(
            "topk_method",
            format!("{other:?}; expected noaux_tc, group_limited_greedy or greedy"),
        )),
    }
}

/// `scoring_func`, by default the family's.
fn scoring_func(family: Family, name: Option<&str>) -> Result<ScoringFunc, ConfigError> {
    match (family, name) {
        (_, Some("sigmoid")) => Ok(ScoringFunc::Sigmoid),
        (_, Some("softmax")) => Ok(ScoringFunc::Softmax),
        (Family::V3, None) => Ok(ScoringFunc::Sigmoid),
        (Family::V2, None) => Ok(ScoringFunc::Softmax),
        (_, Some(other)) => Err(field(
            "scoring_func",
            format!("{other:?}; expected sigmoid or softmax"),
        )),
    }
}

/// The experts must split evenly into groups, and the groups chosen must hold the experts
/// each token picks.
fn check_groups(moe: &Moe) -> Result<(), ConfigError> {
    let Moe {
        n_routed_experts,
        num_experts_per_tok,
        n_group,
        topk_group,
        topk_method,
        ..
    } = *moe;
    if num_experts_per_tok > n_routed_experts {
        return Err(field(
            "num_experts_per_tok",
            format!("{num_experts_per_tok} > n_routed_experts = {n_routed_experts}"),
        ));
    }
    if n_routed_experts % n_group != 0 {
        return Err(field(
            "n_group",
            format!("{n_group} does not divide n_routed_experts = {n_routed_experts}"),
        ));
    }
    if topk_group == 0 || topk_group > n_group {
        return Err(field(
            "topk_group",
            format!("{topk_group} must be in 1..=n_group ({n_group})"),
        ));
    }
    if topk_method == TopkMethod::NoauxTc && n_routed_experts / n_group < 2 {
        return Err(field(
            "n_group",
            "noaux_tc ranks groups by their top-2 experts, so each group needs at least 2",
        ));
    }
    if topk_method != TopkMethod::Greedy
        && num_experts_per_tok > topk_group * (n_routed_experts / n_group)
    {
        return Err(field(
            "num_experts_per_tok",
            "more than the chosen groups hold (topk_group × experts per group)",
        ));
    }
    Ok(())
}
