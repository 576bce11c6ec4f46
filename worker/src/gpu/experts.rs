//! A GPU's routed experts: every expert of each MoE layer, or an expert-parallel rank's
//! share, and the pass through them (sort, permute, grouped GEMMs, SiLU, combine). Used on
//! device buffers by the model step, and — as [`RoutedExperts`], on host tensors — as the
//! local compute of an expert-parallel rank, whose exchanges [`crate::ep::ExpertParallel`]
//! makes.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use cudarc::driver::CudaSlice;
use half::bf16;

use super::runtime::{Fp8, Fp8Activations, Gpu};
use crate::error::{Error, Result};
use crate::model::moe::{RoutedExperts, Routing};
use crate::{bail, ensure};

/// Stacked e4m3 matrices and their 128×128 block scales.
pub(super) struct Fp8Weights {
    pub q: CudaSlice<Fp8>,
    pub scale: CudaSlice<f32>,
}

/// One layer's experts, stacked in slot order, in the precision their GEMMs run.
#[allow(clippy::large_enum_variant)] // one per layer
pub(super) enum Weights {
    /// [slots, 2 × width, hidden] (each expert's gate rows, then its up rows) and
    /// [slots, hidden, width].
    Bf16 {
        gate_up: CudaSlice<bf16>,
        down: CudaSlice<bf16>,
    },
    /// As the checkpoint stores them, gate and up apart (a 128-row scale block may not end
    /// where gate ends); multiplied in FP8 on sm_89 and later, weight-only elsewhere.
    Fp8 {
        gate: Fp8Weights,
        up: Fp8Weights,
        down: Fp8Weights,
    },
}

/// The experts of one MoE layer held on this GPU.
pub(super) struct LayerExperts {
    pub weights: Weights,
    /// Global expert id → its slot in `weights`; −1 for experts held elsewhere.
    pub slot: Vec<i32>,
}

impl LayerExperts {
    pub fn held(&self) -> usize {
        self.slot.iter().filter(|&&s| s >= 0).count()
    }
}

pub struct GpuExperts {
    pub(super) gpu: Arc<Gpu>,
    /// Per layer; None for dense layers.
    pub(super) layers: Vec<Option<LayerExperts>>,
    pub(super) hidden: usize,
    pub(super) width: usize,
}

impl GpuExperts {
    /// y[t] = Σ_k weights[t, k] · expert_{slots[t, k]}(x[t]) for x [tokens, hidden]; slots
    /// and weights are [tokens, topk], slots numbered as this GPU holds the experts.
    pub(super) fn compute(
        &self,
        layer: usize,
        x: &CudaSlice<f32>,
        slots: &CudaSlice<i32>,
        weights: &CudaSlice<f32>,
        topk: usize,
    ) -> Result<CudaSlice<f32>> {
        let (gpu, hidden, width) = (&self.gpu, self.hidden, self.width);
        let Some(experts) = self.layers.get(layer).and_then(Option::as_ref) else {
            bail!("layer {layer} has no routed experts");
        };
        let order = gpu.moe_sort(slots, topk, experts.held())?;
        let (tokens, rows) = (order.rows / topk, order.rows);
        let mut h = gpu.stream.alloc_zeros::<bf16>(rows * width)?;
        let mut expert_out = gpu.stream.alloc_zeros::<bf16>(rows * hidden)?;
        match &experts.weights {
            Weights::Bf16 { gate_up, down } => {
                let mut permuted = gpu.stream.alloc_zeros::<bf16>(rows * hidden)?;
                gpu.moe_permute(x, &order, &mut permuted, hidden)?;
                let mut gu = gpu.stream.alloc_zeros::<bf16>(rows * 2 * width)?;
                gpu.grouped_gemm_bf16(&permuted, gate_up, &mut gu, &order, 2 * width, hidden)?;
                gpu.silu_mul(&gu, &mut h, rows)?;
                gpu.grouped_gemm_bf16(&h, down, &mut expert_out, &order, hidden, width)?;
            }
            Weights::Fp8 { gate, up, down } => {
                // FP8 activations on FP8 tensor cores (permuted and quantised in one pass);
                // elsewhere bf16 ones, the weights dequantised in the kernel: what the bf16
                // GEMMs give on the dequantised weights, at one byte per weight.
                let mut permuted_bf16;
                let permuted = if gpu.has_fp8_tensor_cores() {
                    let mut x8 = gpu.stream.alloc_zeros::<Fp8>(rows * hidden)?;
                    let mut scale = gpu.stream.alloc_zeros::<f32>(rows * hidden.div_ceil(128))?;
                    gpu.moe_permute_fp8(x, &order, &mut x8, &mut scale, hidden)?;
                    Fp8Activations::Fp8(x8, scale)
                } else {
                    permuted_bf16 = gpu.stream.alloc_zeros::<bf16>(rows * hidden)?;
                    gpu.moe_permute(x, &order, &mut permuted_bf16, hidden)?;
                    Fp8Activations::Bf16(&permuted_bf16)
                };
                gated(gpu, [gate, up], (rows, width), &mut h, |w, out| {
                    let w = (&w.q, &w.scale);
                    gpu.grouped_gemm_fp8(permuted.input(), w, out, &order, width, hidden)
                })?;
                let h = gpu.fp8_activations(&h, (rows, width))?;
                let w = (&down.q, &down.scale);
                gpu.grouped_gemm_fp8(h.input(), w, &mut expert_out, &order, hidden, width)?;
            }
        }
        let mut y = gpu.stream.alloc_zeros::<f32>(tokens * hidden)?;
        gpu.moe_unpermute(&expert_out, &order, weights, &mut y, hidden)?;
        Ok(y)
    }
}

/// h = silu(gate) · up for FP8 gate and up matrices kept apart: `gemm` computes each of the
/// two into a [rows, width] buffer.
pub(super) fn gated(
    gpu: &Gpu,
    [gate, up]: [&Fp8Weights; 2],
    (rows, width): (usize, usize),
    h: &mut CudaSlice<bf16>,
    gemm: impl Fn(&Fp8Weights, &mut CudaSlice<bf16>) -> Result<()>,
) -> Result<()> {
    let mut g = gpu.stream.alloc_zeros::<bf16>(rows * width)?;
    let mut u = gpu.stream.alloc_zeros::<bf16>(rows * width)?;
    gemm(gate, &mut g)?;
    gemm(up, &mut u)?;
    gpu.silu_mul_rows(&g.as_view(), &u.as_view(), width, h, rows)
}

/// Each token's experts as slots here, and their weights, padded to `topk` per token with
/// the token's first expert at weight 0; Err(id) for an expert not held here.
fn padded_slots(
    routing: &Routing,
    slot_of: &[i32],
    topk: usize,
) -> std::result::Result<(Vec<i32>, Vec<f32>), usize> {
    let (mut slots, mut weights) = (Vec::new(), Vec::new());
    for (ids, ws) in routing.experts.iter().zip(&routing.weights) {
        for k in 0..topk {
            let (id, w) = match (ids.get(k), ws.get(k)) {
                (Some(&id), Some(&w)) => (id, w),
                _ => (ids.first().copied().unwrap_or(0), 0.0),
            };
            match slot_of.get(id) {
                Some(&slot) if slot >= 0 => slots.push(slot),
                _ => return Err(id),
            }
            weights.push(w);
        }
    }
    Ok((slots, weights))
}

/// The host-side form, for an expert-parallel rank: tokens arrive from every rank, each
/// wanting some of its experts here (a varying number: they are padded to the most any
/// token wants, with weight 0).
impl RoutedExperts for GpuExperts {
    /// cuBLAS picks its kernels by the number of rows.
    fn rows_independent(&self) -> bool {
        false
    }

    fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &Routing,
        _per_row: bool,
    ) -> Result<Tensor> {
        let (tokens, hidden) = x.dims2()?;
        ensure!(
            hidden == self.hidden,
            "hidden size {hidden}, expected {}",
            self.hidden
        );
        let topk = routing.experts.iter().map(Vec::len).max().unwrap_or(0);
        if tokens == 0 || topk == 0 {
            return Ok(Tensor::zeros(
                (tokens, hidden),
                candle_core::DType::F32,
                &Device::Cpu,
            )?);
        }
        let Some(experts) = self.layers.get(layer).and_then(Option::as_ref) else {
            bail!("layer {layer} has no routed experts");
        };
        let (slots, weights) = padded_slots(routing, &experts.slot, topk).map_err(|id| {
            Error::Message(format!(
                "layer {layer}: expert {id} is not held by this rank"
            ))
        })?;
        let stream = &self.gpu.stream;
        let x = stream.clone_htod(&x.flatten_all()?.to_vec1::<f32>()?)?;
        let y = self.compute(
            layer,
            &x,
            &stream.clone_htod(&slots)?,
            &stream.clone_htod(&weights)?,
            topk,
        )?;
        let y = stream.clone_dtoh(&y)?;
        Ok(Tensor::from_vec(y, (tokens, hidden), &Device::Cpu)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_pads_each_token_to_the_most_experts_any_wants_here() {
        // experts 1 and 3 are held here, in slots 0 and 1
        let slot_of = [-1, 0, -1, 1];
        let routing = Routing {
            experts: vec![vec![3], vec![1, 3]],
            weights: vec![vec![0.5], vec![0.25, 0.75]],
        };
        let (slots, weights) = padded_slots(&routing, &slot_of, 2).unwrap();
        assert_eq!(slots, [1, 1, 0, 1]);
        assert_eq!(weights, [0.5, 0.0, 0.25, 0.75]);
        let elsewhere = Routing {
            experts: vec![vec![2]],
            weights: vec![vec![1.0]],
        };
        assert_eq!(padded_slots(&elsewhere, &slot_of, 1), Err(2));
    }
}
