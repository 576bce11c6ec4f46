//! The MLPs on the GPU (the CPU path's `ops::Mlp` and `moe.rs`): dense SwiGLU, and the
//! mixture of experts with its router, routed experts (here or across the group) and shared
//! experts.

use candle_core::{Device, Tensor};
use cudarc::driver::CudaSlice;
use half::bf16;

use super::{GpuModel, Routed};
use crate::ep::GroupError;
use crate::error::Result;
use crate::gpu::runtime::GateRule;
use crate::model::moe::{RoutedExperts, Routing};

/// A SwiGLU MLP: gate and up fused into one [2 × width, hidden] weight.
pub(super) struct Dense {
    pub(super) gate_up: CudaSlice<bf16>,
    pub(super) down: CudaSlice<bf16>,
    pub(super) width: usize,
}

pub(super) struct Moe {
    /// [experts, hidden], f32 as the CPU path routes (a near tie must break the same way).
    pub(super) router: CudaSlice<f32>,
    pub(super) bias: Option<CudaSlice<f32>>,
    pub(super) shared: Option<Dense>,
}

pub(super) enum FeedForward {
    Dense(Dense),
    Moe(Box<Moe>),
}

impl GpuModel {
    /// down(silu(gate(x)) · up(x)) for x [rows, hidden] bf16; f32 out.
    pub(super) fn dense(
        &self,
        mlp: &Dense,
        x: &CudaSlice<bf16>,
        rows: usize,
    ) -> Result<CudaSlice<f32>> {
        let (gpu, hidden) = (&self.gpu, self.cfg.hidden_size);
        let mut gate_up = gpu.stream.alloc_zeros::<bf16>(rows * 2 * mlp.width)?;
        gpu.linear(x, &mlp.gate_up, &mut gate_up, (rows, 2 * mlp.width, hidden))?;
        let mut h = gpu.stream.alloc_zeros::<bf16>(rows * mlp.width)?;
        gpu.silu_mul(&gate_up, &mut h, rows)?;
        let mut y = gpu.stream.alloc_zeros::<f32>(rows * hidden)?;
        gpu.linear(&h, &mlp.down, &mut y, (rows, hidden, mlp.width))?;
        Ok(y)
    }

    /// The routed experts (gate, then the experts here or across the group) plus the shared
    /// ones.
    pub(super) fn moe(
        &self,
        layer: usize,
        moe: &Moe,
        x: &CudaSlice<f32>,
        xb: &CudaSlice<bf16>,
        tokens: usize,
    ) -> Result<CudaSlice<f32>> {
        let (gpu, cfg) = (&self.gpu, &self.cfg.moe);
        let hidden = self.cfg.hidden_size;
        let experts = cfg.n_routed_experts;
        let rule = GateRule::of(cfg);
        let mut logits = gpu.stream.alloc_zeros::<f32>(tokens * experts)?;
        gpu.linear(x, &moe.router, &mut logits, (tokens, experts, hidden))?;
        let mut chosen = gpu.stream.alloc_zeros::<i32>(tokens * rule.topk)?;
        let mut weights = gpu.stream.alloc_zeros::<f32>(tokens * rule.topk)?;
        gpu.moe_gate(
            &logits,
            moe.bias.as_ref(),
            experts,
            rule,
            &mut chosen,
            &mut weights,
        )?;
        let mut y = match &self.routed {
            // every expert is here, so an expert's id is its slot
            Routed::Local(local) => local.compute(layer, x, &chosen, &weights, rule.topk)?,
            Routed::Parallel(ep) => {
                let stream = &gpu.stream;
                let (ids, gates) = (stream.clone_dtoh(&chosen)?, stream.clone_dtoh(&weights)?);
                let routing = Routing {
                    experts: ids
                        .chunks(rule.topk)
                        .map(|c| c.iter().map(|&e| e as usize).collect())
                        .collect(),
                    weights: gates.chunks(rule.topk).map(<[f32]>::to_vec).collect(),
                };
                self.expert_load.record(layer, &routing);
                let x = Tensor::from_vec(stream.clone_dtoh(x)?, (tokens, hidden), &Device::Cpu)?;
                // Once the dispatch has gone out, any failure leaves the peers waiting for
                // this rank's combine: the whole group must fail and re-form.
                let y = ep.forward(layer, &x, &routing, false).map_err(|e| {
                    if e.is_group() {
                        e
                    } else {
                        GroupError(e.to_string()).into()
                    }
                })?;
                stream.clone_htod(&y.flatten_all()?.to_vec1::<f32>()?)?
            }
        };
        if let Some(shared) = &moe.shared {
            gpu.add(&mut y, &self.dense(shared, xb, tokens)?)?;
        }
        Ok(y)
    }
}
