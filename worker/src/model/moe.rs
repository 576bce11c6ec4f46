//! Mixture-of-experts MLP: router, routed experts behind [`RoutedExperts`] (so expert
//! parallelism can put them on other ranks), and shared experts.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{Device, Tensor};

use super::kernels;
use super::ops::{Mlp, mlps_packed};
use crate::config::{Config, Family, Moe as MoeConfig, ScoringFunc, TopkMethod};
use crate::error::{Error, Result};
use crate::weights::Checkpoint;

/// The experts each token goes to and their weights, `[tokens][top_k]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    pub experts: Vec<Vec<usize>>,
    pub weights: Vec<Vec<f32>>,
}

/// Computes `Σₖ weights[t][k] · expert_{experts[t][k]}(x[t])` for every token of `x`
/// (`[tokens, hidden]`); `per_row` computes each token exactly as it would be alone (batched
/// decode). Local today; expert parallelism backs it with other ranks.
pub trait RoutedExperts: Send + Sync {
    fn forward(&self, layer: usize, x: &Tensor, routing: &Routing, per_row: bool)
    -> Result<Tensor>;

    /// Whether every row's output is what it would be alone, whatever else is in the call
    /// (experts kept as stored run the blocked kernel on all their rows).
    fn rows_independent(&self) -> bool;

    /// Bytes sent to other ranks so far (expert parallelism); None when all are local.
    fn bytes_sent(&self) -> Option<u64> {
        None
    }
}

/// The routed experts this process holds: all of them, or an expert-parallel rank's share.
pub struct LocalExperts {
    /// `layers[layer][e]`; empty for dense layers, None for experts held elsewhere.
    layers: Vec<Vec<Option<Mlp>>>,
}

impl LocalExperts {
    /// Every routed expert.
    pub fn load(cfg: &Config, ckpt: &Checkpoint) -> Result<Self> {
        Self::load_owned(cfg, ckpt, |_, _| true)
    }

    /// The experts `owns(layer, expert)` selects; the others are never read.
    pub fn load_owned(
        cfg: &Config,
        ckpt: &Checkpoint,
        owns: impl Fn(usize, usize) -> bool,
    ) -> Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|layer| {
                if !cfg.is_moe_layer(layer) {
                    return Ok(Vec::new());
                }
                (0..cfg.moe.n_routed_experts)
                    .map(|e| {
                        if !owns(layer, e) {
                            return Ok(None);
                        }
                        let prefix = format!("model.layers.{layer}.mlp.experts.{e}");
                        Mlp::load(
                            ckpt,
                            &prefix,
                            cfg.hidden_size,
                            cfg.moe.moe_intermediate_size,
                        )
                        .map(Some)
                    })
                    .collect()
            })
            .collect::<Result<_>>()?;
        Ok(LocalExperts { layers })
    }

    fn expert(&self, layer: usize, e: usize) -> Result<&Mlp> {
        self.layers[layer]
            .get(e)
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                Error::Message(format!(
                    "layer {layer}: expert {e} is not held by this rank"
                ))
            })
    }
}

impl RoutedExperts for LocalExperts {
    fn rows_independent(&self) -> bool {
        self.layers.iter().flatten().flatten().all(Mlp::is_packed)
    }

    fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &Routing,
        per_row: bool,
    ) -> Result<Tensor> {
        let tokens = x.dims2()?.0;
        let packed = self.layers[layer].iter().flatten().all(Mlp::is_packed);
        if per_row && tokens > 1 && !packed {
            return self.forward_each_row_alone(layer, x, routing);
        }
        if packed {
            return self.forward_packed_batched(layer, x, routing);
        }
        self.forward_by_expert(layer, x, routing)
    }
}

impl LocalExperts {
    /// Each token alone, as `per_row` asks, where the experts (f32) have no kernel that
    /// keeps rows independent.
    fn forward_each_row_alone(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &Routing,
    ) -> Result<Tensor> {
        let rows = (0..x.dims2()?.0)
            .map(|t| {
                let one = Routing {
                    experts: vec![routing.experts[t].clone()],
                    weights: vec![routing.weights[t].clone()],
                };
                self.forward(layer, &x.narrow(0, t, 1)?, &one, false)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// Experts kept as stored (bf16 or FP8), decode or prefill: each expert runs once on every
    /// token routed to it, all experts in two dispatches; a token's output then sums its
    /// experts in its own routing order. A prompt routes only tokens · top-k / experts rows
    /// to each expert (3 for a 32-token prompt on 64 experts, top-6), too few to repay
    /// widening it for a GEMM.
    fn forward_packed_batched(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &Routing,
    ) -> Result<Tensor> {
        let experts = &self.layers[layer];
        let (tokens, hidden) = x.dims2()?;
        let x = x.flatten_all()?.to_vec1::<f32>()?;
        let ByExpert { inputs, slots } =
            gather_by_expert(&x, hidden, &routing.experts, experts.len());
        let mut item_of = vec![usize::MAX; experts.len()];
        let mut items = Vec::new();
        for (e, xs) in inputs
            .into_iter()
            .enumerate()
            .filter(|(_, xs)| !xs.is_empty())
        {
            item_of[e] = items.len();
            items.push((self.expert(layer, e)?, xs));
        }
        let outputs = mlps_packed(&items);
        let mut out = vec![0f32; tokens * hidden];
        add_in_routing_order(
            &mut out,
            hidden,
            &outputs,
            &item_of,
            &slots,
            &routing.weights,
        );
        Ok(Tensor::from_vec(out, (tokens, hidden), &Device::Cpu)?)
    }

    /// f32 experts (f32 or f16 checkpoints): each expert runs as one tensor op on the tokens
    /// routed to it.
    fn forward_by_expert(&self, layer: usize, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        let mut out = x.zeros_like()?;
        for e in 0..self.layers[layer].len() {
            let (tokens, weights) = tokens_of_expert(routing, e);
            if tokens.is_empty() {
                continue;
            }
            let n = tokens.len();
            let index = Tensor::from_vec(tokens, n, &Device::Cpu)?;
            let y = self
                .expert(layer, e)?
                .forward(&x.index_select(&index, 0)?)?;
            let y = y.broadcast_mul(&Tensor::from_vec(weights, (n, 1), &Device::Cpu)?)?;
            out = out.index_add(&index, &y, 0)?;
        }
        Ok(out)
    }
}

/// The rows of a batch grouped by expert, so that each expert runs once on all of them.
struct ByExpert<'a> {
    /// `inputs[e]`: the rows routed to expert `e`, in token order.
    inputs: Vec<Vec<&'a [f32]>>,
    /// `slots[t][k]`: token `t`'s `k`-th choice as (expert, index among its inputs).
    slots: Vec<Vec<(usize, usize)>>,
}

fn gather_by_expert<'a>(
    x: &'a [f32],
    hidden: usize,
    routed: &[Vec<usize>],
    experts: usize,
) -> ByExpert<'a> {
    let mut inputs: Vec<Vec<&[f32]>> = vec![Vec::new(); experts];
    let mut slots: Vec<Vec<(usize, usize)>> = Vec::with_capacity(routed.len());
    for (ids, row) in routed.iter().zip(x.chunks_exact(hidden)) {
        slots.push(
            ids.iter()
                .map(|&e| {
                    inputs[e].push(row);
                    (e, inputs[e].len() - 1)
                })
                .collect(),
        );
    }
    ByExpert { inputs, slots }
}

/// Adds each token's expert outputs (`outputs[item_of[e]]`, at the token's slot) times its
/// gate weights into its row of `out` (`hidden` wide), in the token's routing order: the
/// sum never depends on the batch.
fn add_in_routing_order(
    out: &mut [f32],
    hidden: usize,
    outputs: &[Vec<f32>],
    item_of: &[usize],
    slots: &[Vec<(usize, usize)>],
    weights: &[Vec<f32>],
) {
    for ((slots, weights), out) in slots.iter().zip(weights).zip(out.chunks_exact_mut(hidden)) {
        for (&(e, i), &w) in slots.iter().zip(weights) {
            let y = &outputs[item_of[e]][i * hidden..][..hidden];
            for (o, v) in out.iter_mut().zip(y) {
                *o += w * v;
            }
        }
    }
}

/// The tokens routed to expert `e`, with their gate weights for it.
fn tokens_of_expert(routing: &Routing, e: usize) -> (Vec<u32>, Vec<f32>) {
    routing
        .experts
        .iter()
        .zip(&routing.weights)
        .enumerate()
        .filter_map(|(t, (ids, ws))| {
            ids.iter()
                .position(|&id| id == e)
                .map(|k| (t as u32, ws[k]))
        })
        .unzip()
}

/// The router of one MoE layer.
pub struct Router {
    /// `[experts, hidden]`, row-major: logits are per-token dot products, so a token's routing
    /// never depends on the batch it is in.
    weight: Vec<f32>,
    hidden: usize,
    /// V3: added to the scores for choosing experts only, never to their weights.
    correction_bias: Option<Vec<f32>>,
}

impl Router {
    pub fn load(cfg: &Config, ckpt: &Checkpoint, prefix: &str) -> Result<Self> {
        let experts = cfg.moe.n_routed_experts;
        let weight = ckpt.load_f32(&format!("{prefix}.weight"), &[experts, cfg.hidden_size])?;
        let bias_name = format!("{prefix}.e_score_correction_bias");
        let correction_bias = match cfg.moe.topk_method {
            TopkMethod::NoauxTc => Some(ckpt.load_f32(&bias_name, &[experts])?),
            _ => None,
        };
        Ok(Router {
            weight,
            hidden: cfg.hidden_size,
            correction_bias,
        })
    }

    pub fn forward(&self, x: &Tensor, moe: &MoeConfig) -> Result<Routing> {
        let rows: Vec<Vec<f32>> = x.to_vec2()?;
        let logits: Vec<Vec<f32>> = rows
            .iter()
            .map(|row| {
                let mut logits = vec![0f32; self.weight.len() / self.hidden];
                kernels::dots_f32(&self.weight, row, &mut logits);
                logits
            })
            .collect();
        let mut routing = Routing {
            experts: Vec::with_capacity(logits.len()),
            weights: Vec::with_capacity(logits.len()),
        };
        for row in &logits {
            let (experts, weights) = route(row, self.correction_bias.as_deref(), moe);
            routing.experts.push(experts);
            routing.weights.push(weights);
        }
        Ok(routing)
    }
}

/// Picks one token's experts from its router logits, as the reference implementations do.
pub fn route(logits: &[f32], bias: Option<&[f32]>, moe: &MoeConfig) -> (Vec<usize>, Vec<f32>) {
    let scores: Vec<f32> = match moe.scoring_func {
        ScoringFunc::Sigmoid => logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect(),
        ScoringFunc::Softmax => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            exp.iter().map(|e| e / sum).collect()
        }
    };
    let mut choice: Vec<f32> = match bias {
        Some(bias) => scores.iter().zip(bias).map(|(s, b)| s + b).collect(),
        None => scores.clone(),
    };
    if moe.topk_method != TopkMethod::Greedy && moe.n_group > 1 {
        let per_group = choice.len() / moe.n_group;
        let group_score = |g: usize| {
            let group = &choice[g * per_group..(g + 1) * per_group];
            match moe.topk_method {
                // V3: the sum of the group's two best
                TopkMethod::NoauxTc => top_k(group, 2).iter().map(|&i| group[i]).sum::<f32>(),
                // V2: the group's best
                _ => group.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            }
        };
        let group_scores: Vec<f32> = (0..moe.n_group).map(group_score).collect();
        let kept = top_k(&group_scores, moe.topk_group);
        // As transformers does: V3 masks other groups with −∞, V2 with 0.0 (which a
        // softmax score can never beat, so both exclude them).
        let masked = if moe.topk_method == TopkMethod::NoauxTc {
            f32::NEG_INFINITY
        } else {
            0.0
        };
        for (g, group) in choice.chunks_mut(per_group).enumerate() {
            if !kept.contains(&g) {
                group.iter_mut().for_each(|s| *s = masked);
            }
        }
    }
    let experts = top_k(&choice, moe.num_experts_per_tok);
    let mut weights: Vec<f32> = experts.iter().map(|&e| scores[e]).collect();
    // transformers normalises V3's weights only; its V2 ignores `norm_topk_prob` (released
    // V2 checkpoints set it false, so the two agree there).
    if moe.norm_topk_prob && moe.family == Family::V3 {
        let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
        weights.iter_mut().for_each(|w| *w /= sum);
    }
    let scale = moe.routed_scaling_factor as f32;
    weights.iter_mut().for_each(|w| *w *= scale);
    (experts, weights)
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// Tokens routed to each expert of each layer since start: the load signal for expert
/// placement and the worker's per-expert metric.
pub struct ExpertLoad {
    experts: usize,
    /// `[layer × experts]`
    counts: Vec<AtomicU64>,
}

impl ExpertLoad {
    pub fn new(layers: usize, experts: usize) -> Self {
        ExpertLoad {
            experts,
            counts: (0..layers * experts).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn record(&self, layer: usize, routing: &Routing) {
        for &e in routing.experts.iter().flatten() {
            self.counts[layer * self.experts + e].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `(layer, expert, tokens)` for every expert that has seen a token.
    pub fn snapshot(&self) -> Vec<(usize, usize, u64)> {
        self.counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    i / self.experts,
                    i % self.experts,
                    c.load(Ordering::Relaxed),
                )
            })
            .filter(|&(_, _, n)| n > 0)
            .collect()
    }
}

/// A MoE layer's MLP.
pub struct MoeMlp {
    router: Router,
    shared: Option<Mlp>,
}

impl MoeMlp {
    /// Whether the shared experts (if any) are kept as stored; the router is per-token.
    pub fn is_packed(&self) -> bool {
        self.shared.as_ref().is_none_or(Mlp::is_packed)
    }

    pub fn load(cfg: &Config, ckpt: &Checkpoint, prefix: &str) -> Result<Self> {
        let shared = match cfg.moe.n_shared_experts {
            0 => None,
            n => Some(Mlp::load(
                ckpt,
                &format!("{prefix}.shared_experts"),
                cfg.hidden_size,
                n * cfg.moe.moe_intermediate_size,
            )?),
        };
        Ok(MoeMlp {
            router: Router::load(cfg, ckpt, &format!("{prefix}.gate"))?,
            shared,
        })
    }

    pub fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        moe: &MoeConfig,
        experts: &dyn RoutedExperts,
        load: &ExpertLoad,
        per_row: bool,
    ) -> Result<Tensor> {
        let routing = self.router.forward(x, moe)?;
        load.record(layer, &routing);
        let routed = experts.forward(layer, x, &routing, per_row)?;
        match &self.shared {
            Some(shared) => Ok((routed + shared.forward_with(x, per_row)?)?),
            None => Ok(routed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests_support::tiny_config;

    #[test]
    fn v3_routing_picks_from_the_best_groups_with_bias_for_choice_only() {
        let mut moe = tiny_config().moe; // 4 experts, 2 groups, keep 1 group, top-2, norm
        moe.routed_scaling_factor = 2.0;
        let logits = [0.0, 0.0, 1.0, -1.0];
        // bias lifts group 0 (experts 0, 1) above group 1
        let bias = [0.5, 0.5, 0.0, 0.0];
        let (experts, weights) = route(&logits, Some(&bias), &moe);
        assert_eq!(experts, [0, 1]);
        // weights come from the unbiased sigmoid scores (0.5 each), normalised, scaled
        assert_eq!(weights, [1.0, 1.0]);
    }

    #[test]
    fn v3_masks_other_groups_with_negative_infinity() {
        let moe = tiny_config().moe;
        // every choice score in the kept group is negative: masking with 0.0 would let an
        // expert of the dropped group win the second slot
        let logits = [0.0, 0.0, 0.0, 0.0];
        let bias = [-0.6, -0.7, -2.0, -2.0];
        let (experts, _) = route(&logits, Some(&bias), &moe);
        assert_eq!(experts, [0, 1]);
    }

    #[test]
    fn v2_softmax_greedy_uses_plain_top_k_without_normalising() {
        let mut moe = tiny_config().moe;
        moe.family = crate::config::Family::V2;
        moe.scoring_func = ScoringFunc::Softmax;
        moe.topk_method = TopkMethod::Greedy;
        moe.routed_scaling_factor = 1.0;
        let logits = [0.0, 2f32.ln(), 3f32.ln(), 4f32.ln()]; // softmax 0.1 0.2 0.3 0.4
        let (experts, weights) = route(&logits, None, &moe);
        assert_eq!(experts, [3, 2]);
        assert!(
            (weights[0] - 0.4).abs() < 1e-6 && (weights[1] - 0.3).abs() < 1e-6,
            "{weights:?}"
        );
    }
}
