//! Attention's launches: rope on queries and keys, writes into the paged latent cache, and
//! absorbed MLA decode over it.

use cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use half::bf16;

use super::{Gpu, blocks, queue, strided};
use crate::ensure;
use crate::error::Result;

/// Largest kv_lora_rank and rope dims mla_decode.cu holds in registers.
const MLA_MAX_RANK: usize = 512;

const MLA_MAX_ROPE: usize = 128;

impl Gpu {
    /// y [tokens, heads, dim] = rope(x), x's (token, head) rows x_stride apart; cos, sin
    /// [tokens, dim/2].
    pub fn rope(
        &self,
        x: &CudaView<'_, f32>,
        x_stride: usize,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        (tokens, heads, dim): (usize, usize, usize),
    ) -> Result<()> {
        let rows = tokens * heads;
        ensure!(
            dim.is_multiple_of(2)
                && x_stride >= dim
                && x.len() >= rows.saturating_sub(1) * x_stride + dim
                && y.len() == rows * dim
                && cos.len() == tokens * dim / 2
                && sin.len() == cos.len(),
            "rope: shapes do not match [{tokens}, {heads}, {dim}] with rows {x_stride} apart"
        );
        let (stride, t, h, d) = (x_stride as i32, tokens as i32, heads as i32, dim as i32);
        let mut launch = self.stream.launch_builder(self.function("rope"));
        launch
            .arg(x)
            .arg(&stride)
            .arg(cos)
            .arg(sin)
            .arg(y)
            .arg(&t)
            .arg(&h)
            .arg(&d);
        queue(launch, strided(rows * dim / 2, 256))
    }

    /// Writes each row's latent (c_kv [rows, rank]) and roped key (k_pe [rows, rope]) into
    /// cache slot slots[r] (block · 16 + offset).
    pub fn kv_write(
        &self,
        (c_kv, k_pe): (&CudaSlice<f32>, &CudaSlice<f32>),
        slots: &CudaSlice<i32>,
        (cache_c, cache_pe): (&mut CudaSlice<bf16>, &mut CudaSlice<bf16>),
        (rank, rope): (usize, usize),
    ) -> Result<()> {
        let rows = slots.len();
        ensure!(
            c_kv.len() == rows * rank
                && k_pe.len() == rows * rope
                && cache_c.len() / rank.max(1) == cache_pe.len() / rope.max(1),
            "kv_write: c_kv must be [{rows}, {rank}], k_pe [{rows}, {rope}], the caches as many slots"
        );
        let (r, p) = (rank as i32, rope as i32);
        let mut launch = self.stream.launch_builder(self.function("kv_write"));
        launch
            .arg(c_kv)
            .arg(k_pe)
            .arg(slots)
            .arg(cache_c)
            .arg(cache_pe)
            .arg(&r)
            .arg(&p);
        queue(launch, blocks((rows, 1), 256, 0))
    }

    /// Absorbed MLA attention: out [rows, heads, rank] from q_lat [rows, heads, rank], q_pe
    /// [rows, heads, rope] and the paged bf16 cache; row s reads block table row
    /// s · table_stride (0: every row shares one table, a prompt's rows) and sees its first
    /// lengths[s] positions. The tables must name blocks inside the cache.
    #[allow(clippy::too_many_arguments)]
    pub fn mla_decode(
        &self,
        q_lat: &CudaSlice<f32>,
        q_pe: &CudaSlice<f32>,
        c_kv: &CudaSlice<bf16>,
        k_pe: &CudaSlice<bf16>,
        (block_table, table_stride): (&CudaSlice<i32>, usize),
        lengths: &CudaSlice<i32>,
        out: &mut CudaSlice<f32>,
        (seqs, heads, rank, rope): (usize, usize, usize, usize),
        scale: f32,
    ) -> Result<()> {
        ensure!(
            (2..=MLA_MAX_RANK).contains(&rank)
                && rank.is_multiple_of(2)
                && (2..=MLA_MAX_ROPE).contains(&rope)
                && rope.is_multiple_of(2),
            "mla_decode: kv_lora_rank ({rank}) must be even and in 2..={MLA_MAX_RANK}, rope dims ({rope}) even and in 2..={MLA_MAX_ROPE}"
        );
        ensure!(
            seqs > 0
                && lengths.len() == seqs
                && block_table.len() > (seqs - 1) * table_stride
                && q_lat.len() == seqs * heads * rank
                && q_pe.len() == seqs * heads * rope
                && out.len() == q_lat.len()
                && c_kv.len() / rank == k_pe.len() / rope,
            "mla_decode: shapes do not match {seqs} sequences × {heads} heads"
        );
        let table_stride = table_stride as i32;
        let args = [heads, rank, rope].map(|v| v as i32);
        let mut launch = self.stream.launch_builder(self.function("mla_decode"));
        launch
            .arg(q_lat)
            .arg(q_pe)
            .arg(c_kv)
            .arg(k_pe)
            .arg(block_table)
            .arg(&table_stride)
            .arg(lengths)
            .arg(out)
            .arg(&args[0])
            .arg(&args[1])
            .arg(&args[2])
            .arg(&scale);
        queue(launch, blocks((seqs, heads), 128, 0))?;
        Ok(())
    }
}
