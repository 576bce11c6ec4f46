//! The MLPs on the GPU (the CPU path's `ops::Mlp` and `moe.rs`): dense SwiGLU, and the
//! mixture of experts with its router, routed experts (here or across the group) and shared
//! experts.

use candle_core::{Device, Tensor};
use cudarc::driver::CudaSlice;
use half::bf16;

use super::linear::{Linear, fp8_linear};
use super::{GpuModel, Routed};
use crate::ep::GroupError;
use crate::error::Result;
use crate::gpu::experts::{Fp8Weights, gated};
use crate::gpu::runtime::GateRule;
use crate::model::moe::{RoutedExperts, Routing};

/// A SwiGLU MLP (a dense layer's, or the shared experts).
pub(super) struct Dense {
    pub(super) gate_up: GateUp,
    pub(super) down: Linear,
    pub(super) width: usize,
}

/// A SwiGLU MLP's gate and up projections.
pub(super) enum GateUp {
    /// [2 × width, hidden]: the gate's rows, then up's; one GEMM makes both.
    Fused(CudaSlice<bf16>),
    /// An FP8 checkpoint's two matrices as stored: a 128-row scale block may straddle
    /// where the gate's rows would end.
    Fp8 { gate: Fp8Weights, up: Fp8Weights },
}

pub(super) struct Moe {
    /// [experts, hidden], f32 as the CPU path routes (a near tie must break the same way).
    pub(super) router: CudaSlice<f32>,
    pub(super) bias: Option<CudaSlice<f32>>,
    pub(super) shared: Option<Dense>,
}

pub(super) enum FeedForward {
    Dense(Dense),
    Moe(Moe),
}

impl GpuModel {
    /// down(silu(gate(x)) · up(x)) for x [rows, hidden] bf16; f32 out.
    pub(super) fn dense(
        &self,
        mlp: &Dense,
        x: &CudaSlice<bf16>,
        rows: usize,
    ) -> Result<CudaSlice<f32>> {
        let (gpu, hidden, width) = (&self.gpu, self.cfg.hidden_size, mlp.width);
        let mut h = gpu.stream.alloc_zeros::<bf16>(rows * width)?;
        match &mlp.gate_up {
            GateUp::Fused(w) => {
                let mut gate_up = gpu.stream.alloc_zeros::<bf16>(rows * 2 * width)?;
                gpu.linear(x, w, &mut gate_up, (rows, 2 * width, hidden))?;
                gpu.silu_mul(&gate_up, &mut h, rows)?;
            }
            GateUp::Fp8 { gate, up } => {
                // rounded to bf16 as the fused GEMM's output is
                gated(gpu, [gate, up], (rows, width), &mut h, |w, out| {
                    let mut y = gpu.stream.alloc_zeros::<f32>(rows * width)?;
                    fp8_linear(gpu, w, x, &mut y, (rows, width, hidden))?;
                    gpu.to_bf16(&y, out)
                })?;
            }
        }
        let mut y = gpu.stream.alloc_zeros::<f32>(rows * hidden)?;
        mlp.down.apply(gpu, &h, &mut y, (rows, hidden, width))?;
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
