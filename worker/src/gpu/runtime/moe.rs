//! Mixture-of-experts routing on the device: the gate's choice of experts, and the
//! expert-ordered layout the grouped GEMMs read (sort, permute, unpermute).

use cudarc::driver::{CudaSlice, PushKernelArg};
use half::bf16;

use super::{Fp8, Gpu, blocks, queue};
use crate::ensure;
use crate::error::Result;

/// The router's choice rule, as moe_gate.cu numbers it.
#[derive(Clone, Copy, Debug)]
pub struct GateRule {
    pub sigmoid: bool,
    /// 0: V3's noaux_tc, 1: V2's group-limited greedy, 2: plain top-k.
    pub method: i32,
    pub n_group: usize,
    pub topk_group: usize,
    pub topk: usize,
    pub normalize: bool,
    pub scale: f32,
}

impl GateRule {
    pub fn of(moe: &crate::config::Moe) -> Self {
        use crate::config::{Family, ScoringFunc, TopkMethod};
        GateRule {
            sigmoid: moe.scoring_func == ScoringFunc::Sigmoid,
            method: match moe.topk_method {
                TopkMethod::NoauxTc => 0,
                TopkMethod::GroupLimitedGreedy => 1,
                TopkMethod::Greedy => 2,
            },
            n_group: moe.n_group,
            topk_group: moe.topk_group,
            topk: moe.num_experts_per_tok,
            // as the CPU path: transformers normalises V3's weights only
            normalize: moe.norm_topk_prob && moe.family == Family::V3,
            scale: moe.routed_scaling_factor as f32,
        }
    }
}

/// The expert-ordered layout of one MoE batch, from `moe_sort`.
pub struct MoeOrder {
    pub offsets: CudaSlice<i32>,
    pub tile_start: CudaSlice<i32>,
    pub source: CudaSlice<i32>,
    pub row_of: CudaSlice<i32>,
    pub rows: usize,
    pub experts: usize,
    pub topk: usize,
}

impl Gpu {
    /// Each token's experts and weights ([tokens, topk]) from its router logits
    /// ([tokens, experts]).
    pub fn moe_gate(
        &self,
        logits: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        experts: usize,
        rule: GateRule,
        chosen: &mut CudaSlice<i32>,
        weights: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let tokens = logits.len() / experts;
        ensure!(
            logits.len() == tokens * experts
                && chosen.len() == tokens * rule.topk
                && weights.len() == chosen.len(),
            "moe_gate: logits must be [tokens, {experts}], experts and weights [tokens, {}]",
            rule.topk
        );
        ensure!(
            rule.n_group <= 32
                && experts.is_multiple_of(rule.n_group.max(1))
                && rule.topk_group <= rule.n_group
                && (1..=experts).contains(&rule.topk),
            "moe_gate: {experts} experts in {} groups keeping {}, top-{}",
            rule.n_group,
            rule.topk_group,
            rule.topk
        );
        ensure!(
            bias.is_none_or(|b| b.len() == experts),
            "moe_gate: bias must hold {experts} values"
        );
        // Without a bias the kernel reads none; any valid pointer stands in.
        let (bias, has_bias) = match bias {
            Some(bias) => (bias, 1i32),
            None => (logits, 0i32),
        };
        let scoring = if rule.sigmoid { 0 } else { 1 }; // moe_gate.cu's SIGMOID, SOFTMAX
        let args = [
            experts,
            scoring,
            rule.method as usize,
            rule.n_group,
            rule.topk_group,
            rule.topk,
            rule.normalize as usize,
        ]
        .map(|v| v as i32);
        let mut launch = self.stream.launch_builder(self.function("moe_gate"));
        launch
            .arg(logits)
            .arg(bias)
            .arg(&has_bias)
            .arg(chosen)
            .arg(weights);
        for arg in &args {
            launch.arg(arg);
        }
        launch.arg(&rule.scale);
        queue(launch, blocks((tokens, 1), 256, experts * 9))?;
        Ok(())
    }

    /// Orders `chosen` ([pairs] expert ids) by expert.
    pub fn moe_sort(
        &self,
        chosen: &CudaSlice<i32>,
        topk: usize,
        experts: usize,
    ) -> Result<MoeOrder> {
        let rows = chosen.len();
        ensure!(
            topk > 0 && rows.is_multiple_of(topk),
            "moe_sort: {rows} choices are not tokens × top-{topk}"
        );
        let mut order = MoeOrder {
            offsets: self.stream.alloc_zeros(experts + 1)?,
            tile_start: self.stream.alloc_zeros(experts + 1)?,
            source: self.stream.alloc_zeros(rows.max(1))?,
            row_of: self.stream.alloc_zeros(rows.max(1))?,
            rows,
            experts,
            topk,
        };
        let args = [rows, topk, experts].map(|v| v as i32);
        let mut launch = self.stream.launch_builder(self.function("moe_sort"));
        launch.arg(chosen).arg(&args[0]).arg(&args[1]).arg(&args[2]);
        launch
            .arg(&mut order.offsets)
            .arg(&mut order.tile_start)
            .arg(&mut order.source)
            .arg(&mut order.row_of);
        queue(launch, blocks((1, 1), 1024, experts * 8))?;
        Ok(order)
    }

    /// The expert-ordered bf16 copy of x ([tokens, hidden]).
    pub fn moe_permute(
        &self,
        x: &CudaSlice<f32>,
        order: &MoeOrder,
        out: &mut CudaSlice<bf16>,
        hidden: usize,
    ) -> Result<()> {
        ensure!(
            hidden.is_multiple_of(4)
                && x.len() == order.rows / order.topk * hidden
                && out.len() == order.rows * hidden,
            "moe_permute: hidden ({hidden}) must be a multiple of 4, x [{}, {hidden}] and out \
             [{}, {hidden}]",
            order.rows / order.topk,
            order.rows
        );
        let h = hidden as i32;
        let mut launch = self.stream.launch_builder(self.function("moe_permute"));
        launch.arg(x).arg(&order.source).arg(out).arg(&h);
        queue(launch, blocks((order.rows, 1), 256, 0))?;
        Ok(())
    }

    /// The same, quantised to FP8 with 1×128 scales ([rows, ⌈hidden/128⌉]).
    pub fn moe_permute_fp8(
        &self,
        x: &CudaSlice<f32>,
        order: &MoeOrder,
        out: &mut CudaSlice<Fp8>,
        scale: &mut CudaSlice<f32>,
        hidden: usize,
    ) -> Result<()> {
        ensure!(
            x.len() == order.rows / order.topk * hidden
                && out.len() == order.rows * hidden
                && scale.len() == order.rows * hidden.div_ceil(128),
            "moe_permute_fp8: x must be [{}, {hidden}], out [{}, {hidden}] and scale [{}, {}]",
            order.rows / order.topk,
            order.rows,
            order.rows,
            hidden.div_ceil(128)
        );
        let h = hidden as i32;
        let mut launch = self.stream.launch_builder(self.function("moe_permute_fp8"));
        launch.arg(x).arg(&order.source).arg(out).arg(scale).arg(&h);
        queue(launch, blocks((order.rows, 1), 128, 0))?;
        Ok(())
    }

    /// y[t] = Σ_k weight[t, k] · expert_out[row_of[t, k]].
    pub fn moe_unpermute(
        &self,
        expert_out: &CudaSlice<bf16>,
        order: &MoeOrder,
        weights: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        hidden: usize,
    ) -> Result<()> {
        let (tokens, topk) = (order.rows / order.topk, order.topk);
        ensure!(
            hidden.is_multiple_of(4)
                && expert_out.len() == order.rows * hidden
                && weights.len() == order.rows
                && y.len() == tokens * hidden,
            "moe_unpermute: shapes do not match {tokens} tokens × top-{topk} × {hidden}"
        );
        let (k, h) = (topk as i32, hidden as i32);
        let mut launch = self.stream.launch_builder(self.function("moe_unpermute"));
        launch
            .arg(expert_out)
            .arg(&order.row_of)
            .arg(weights)
            .arg(y)
            .arg(&k)
            .arg(&h);
        queue(launch, blocks((tokens, 1), 256, 0))?;
        Ok(())
    }
}
