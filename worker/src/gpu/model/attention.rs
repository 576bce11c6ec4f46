//! MLA attention on the GPU (the CPU path's `model/attention.rs`). Every row, prompt rows
//! too, runs in the absorbed form over the latent cache and sees up to its own position, so
//! one kernel serves prefill and decode.

use cudarc::driver::CudaSlice;
use half::bf16;

use super::linear::Linear;
use super::{GpuKv, GpuModel};
use crate::error::Result;
use crate::gpu::runtime::{GemmShape, Gpu, Layout};
use crate::model::cache::BlockTable;
use crate::model::ops::Rope;

pub(super) enum QProj {
    Plain(Linear),
    LowRank {
        down: Linear,
        norm: CudaSlice<bf16>,
        up: Linear,
        rank: usize,
    },
}

/// One layer's attention weights.
pub(super) struct Attention {
    pub(super) q: QProj,
    /// [kv_lora + rope, hidden]
    pub(super) kv_down: Linear,
    pub(super) kv_norm: CudaSlice<bf16>,
    /// [heads × (nope + v), kv_lora]: per head, nope key rows then v value rows. Always
    /// bf16: the absorbed attention multiplies it per head through cuBLAS's strided batches.
    pub(super) kv_up: CudaSlice<bf16>,
    pub(super) o_proj: Linear,
}

/// Where each row of a pass sits: its position, its cache slot, and its sequence's block
/// table (one padded table row per row, `width` apart, as `mla_decode` reads them).
#[derive(Debug, PartialEq)]
struct RowLayout {
    positions: Vec<usize>,
    slots: Vec<i32>,
    tables: Vec<i32>,
    width: usize,
}

impl RowLayout {
    fn of(segments: &[(usize, &mut BlockTable)]) -> Self {
        let width = segments
            .iter()
            .map(|(_, t)| t.blocks().len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut layout = RowLayout {
            positions: Vec::new(),
            slots: Vec::new(),
            tables: Vec::new(),
            width,
        };
        for (rows, table) in segments {
            for position in table.tokens()..table.tokens() + rows {
                layout.positions.push(position);
                layout.slots.push(table.slot(position) as i32);
                let blocks = table.blocks().iter().map(|&b| b as i32);
                layout
                    .tables
                    .extend(blocks.chain(std::iter::repeat(0)).take(width));
            }
        }
        layout
    }
}

/// A pass's row layout on the device, with the rope tables of its positions: shared by
/// every layer's attention.
pub(super) struct Rows {
    pub(super) count: usize,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    slots: CudaSlice<i32>,
    tables: CudaSlice<i32>,
    width: usize,
    /// Positions each row sees: up to its own.
    lengths: CudaSlice<i32>,
}

impl Rows {
    pub(super) fn upload(
        gpu: &Gpu,
        rope: &Rope,
        segments: &[(usize, &mut BlockTable)],
    ) -> Result<Self> {
        let stream = &gpu.stream;
        let layout = RowLayout::of(segments);
        let (cos, sin) = rope.tables(&layout.positions);
        let lengths: Vec<i32> = layout.positions.iter().map(|&p| p as i32 + 1).collect();
        Ok(Rows {
            count: layout.positions.len(),
            cos: stream.clone_htod(&cos)?,
            sin: stream.clone_htod(&sin)?,
            slots: stream.clone_htod(&layout.slots)?,
            tables: stream.clone_htod(&layout.tables)?,
            width: layout.width,
            lengths: stream.clone_htod(&lengths)?,
        })
    }
}

impl GpuModel {
    /// Layer `l`'s attention over `x` (the normalised rows, bf16): writes the rows' latents
    /// and roped keys into the cache, and returns the output [rows, hidden], f32.
    pub(super) fn attention(
        &self,
        l: usize,
        attention: &Attention,
        x: &CudaSlice<bf16>,
        rows: &Rows,
        kv: &mut GpuKv,
    ) -> Result<CudaSlice<f32>> {
        let (gpu, cfg) = (&self.gpu, &self.cfg);
        let (n, hidden, heads) = (rows.count, cfg.hidden_size, cfg.num_attention_heads);
        let (q, q_pe) = self.project_into_cache(l, attention, x, rows, kv)?;
        let o = self.absorbed_attention(l, attention, (&q, &q_pe), rows, kv)?;
        let mut out = gpu.stream.alloc_zeros::<f32>(n * hidden)?;
        attention.o_proj.apply(
            gpu,
            &self.bf16(&o)?,
            &mut out,
            (n, hidden, heads * cfg.v_head_dim),
        )?;
        Ok(out)
    }

    /// The projections: writes the rows' latents and roped keys into layer `l`'s cache, and
    /// returns the queries [rows, heads × qk] with their roped parts [rows, heads × rope].
    fn project_into_cache(
        &self,
        l: usize,
        attention: &Attention,
        x: &CudaSlice<bf16>,
        rows: &Rows,
        kv: &mut GpuKv,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let (gpu, cfg) = (&self.gpu, &self.cfg);
        let (n, heads) = (rows.count, cfg.num_attention_heads);
        let (nope, rope, kv_lora) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank);
        let qk = nope + rope;
        let q = self.q_proj(&attention.q, x, n)?;
        let (c_kv, k_pe) = self.kv_latents(attention, x, rows)?;
        let mut q_pe = gpu.stream.alloc_zeros::<f32>(n * heads * rope)?;
        let (cos, sin) = (&rows.cos, &rows.sin);
        gpu.rope(&q.slice(nope..), qk, cos, sin, &mut q_pe, (n, heads, rope))?;
        gpu.kv_write(
            (&c_kv, &k_pe),
            &rows.slots,
            (&mut kv.c_kv[l], &mut kv.k_pe[l]),
            (kv_lora, rope),
        )?;
        Ok((q, q_pe))
    }

    /// The rows' normalised latents [rows, kv_lora] and roped keys [rows, rope], f32: one
    /// down-projection makes both.
    fn kv_latents(
        &self,
        attention: &Attention,
        x: &CudaSlice<bf16>,
        rows: &Rows,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let (gpu, cfg) = (&self.gpu, &self.cfg);
        let stream = &gpu.stream;
        let (n, hidden) = (rows.count, cfg.hidden_size);
        let (rope, kv_lora) = (cfg.qk_rope_head_dim, cfg.kv_lora_rank);
        let mut kv_a = stream.alloc_zeros::<f32>(n * (kv_lora + rope))?;
        attention
            .kv_down
            .apply(gpu, x, &mut kv_a, (n, kv_lora + rope, hidden))?;
        let mut c_kv = stream.alloc_zeros::<f32>(n * kv_lora)?;
        gpu.rms_norm(
            &kv_a.as_view(),
            kv_lora + rope,
            &attention.kv_norm,
            &mut c_kv,
            n,
            cfg.rms_norm_eps as f32,
        )?;
        let mut k_pe = stream.alloc_zeros::<f32>(n * rope)?;
        gpu.rope(
            &kv_a.slice(kv_lora..),
            kv_lora + rope,
            &rows.cos,
            &rows.sin,
            &mut k_pe,
            (n, 1, rope),
        )?;
        Ok((c_kv, k_pe))
    }

    /// Absorbed attention over layer `l`'s cache: q_lat = q_nope · W_UK per head, attention
    /// over the latents, then W_UV per head; returns [rows, heads × v], f32.
    fn absorbed_attention(
        &self,
        l: usize,
        attention: &Attention,
        (q, q_pe): (&CudaSlice<f32>, &CudaSlice<f32>),
        rows: &Rows,
        kv: &GpuKv,
    ) -> Result<CudaSlice<f32>> {
        let (gpu, cfg) = (&self.gpu, &self.cfg);
        let stream = &gpu.stream;
        let (n, heads) = (rows.count, cfg.num_attention_heads);
        let (nope, rope, v_dim, kv_lora) = (
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        );
        let qk = nope + rope;
        // Per head h, q_nope is q's row slice at h·qk; W_UK is kv_up's rows h·(nope+v) ..
        // +nope, and W_UV the v rows after them.
        let per_head = |offset: usize| Layout {
            offset,
            row_stride: kv_lora,
            batch_stride: (nope + v_dim) * kv_lora,
        };
        // rows of `width` values per head, heads side by side
        let head_slices = |width: usize| Layout {
            offset: 0,
            row_stride: heads * width,
            batch_stride: width,
        };
        let mut q_lat = stream.alloc_zeros::<f32>(n * heads * kv_lora)?;
        gpu.batched_gemm(
            (&self.bf16(q)?, head_slices(qk)),
            (&attention.kv_up, per_head(0)),
            false,
            (&mut q_lat, head_slices(kv_lora)),
            GemmShape {
                m: n,
                n: kv_lora,
                k: nope,
                batch: heads,
            },
        )?;
        let mut latent = stream.alloc_zeros::<f32>(n * heads * kv_lora)?;
        gpu.mla_decode(
            &q_lat,
            q_pe,
            &kv.c_kv[l],
            &kv.k_pe[l],
            (&rows.tables, rows.width),
            &rows.lengths,
            &mut latent,
            (n, heads, kv_lora, rope),
            self.softmax_scale,
        )?;
        let mut o = stream.alloc_zeros::<f32>(n * heads * v_dim)?;
        gpu.batched_gemm(
            (&self.bf16(&latent)?, head_slices(kv_lora)),
            (&attention.kv_up, per_head(nope * kv_lora)),
            true,
            (&mut o, head_slices(v_dim)),
            GemmShape {
                m: n,
                n: v_dim,
                k: kv_lora,
                batch: heads,
            },
        )?;
        Ok(o)
    }

    /// The queries [rows, heads × qk], f32: one projection, or the low-rank pair with its norm.
    fn q_proj(&self, q: &QProj, x: &CudaSlice<bf16>, n: usize) -> Result<CudaSlice<f32>> {
        let (gpu, cfg) = (&self.gpu, &self.cfg);
        let (hidden, out) = (cfg.hidden_size, cfg.num_attention_heads * cfg.qk_head_dim());
        let mut y = gpu.stream.alloc_zeros::<f32>(n * out)?;
        match q {
            QProj::Plain(w) => w.apply(gpu, x, &mut y, (n, out, hidden))?,
            QProj::LowRank {
                down,
                norm,
                up,
                rank,
            } => {
                let mut qa = gpu.stream.alloc_zeros::<f32>(n * rank)?;
                down.apply(gpu, x, &mut qa, (n, *rank, hidden))?;
                let qa = self.bf16(&self.norm_rows(&qa, norm, n)?)?;
                up.apply(gpu, &qa, &mut y, (n, out, *rank))?;
            }
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cache::KvPool;

    #[test]
    fn rows_of_a_mixed_pass_find_their_slots_and_tables() {
        let mut pool = KvPool::new(0, 0, 0, 8);
        let (mut a, mut b) = (BlockTable::default(), BlockTable::default());
        assert!(pool.reserve(&mut a, 20) && pool.reserve(&mut b, 3)); // a: blocks 0, 1; b: 2
        a.advance(18); // a decodes position 18; b prefills positions 0..3
        let layout = RowLayout::of(&[(1, &mut a), (3, &mut b)]);
        assert_eq!(layout.positions, [18, 0, 1, 2]);
        assert_eq!(layout.slots, [16 + 2, 32, 33, 34]);
        assert_eq!(layout.width, 2);
        assert_eq!(layout.tables, [0, 1, 2, 0, 2, 0, 2, 0]);
    }
}
