//! MLA's compressed KV cache for one sequence: per layer, the normalised latent `c_kv` and
//! the roped shared key `k_pe` of every token (576 values per token per layer for V3).

use anyhow::{Result, bail};
use candle_core::Tensor;

#[derive(Default)]
pub struct LayerCache {
    /// `[tokens, kv_lora_rank]`
    c_kv: Option<Tensor>,
    /// `[tokens, qk_rope_head_dim]`
    k_pe: Option<Tensor>,
}

impl LayerCache {
    pub fn tokens(&self) -> usize {
        self.c_kv.as_ref().map_or(0, |t| t.dim(0).unwrap_or(0))
    }

    pub fn append(&mut self, c_kv: &Tensor, k_pe: &Tensor) -> Result<()> {
        self.c_kv = Some(append(self.c_kv.take(), c_kv)?);
        self.k_pe = Some(append(self.k_pe.take(), k_pe)?);
        Ok(())
    }

    /// Everything cached so far.
    pub fn tensors(&self) -> Result<(Tensor, Tensor)> {
        match (&self.c_kv, &self.k_pe) {
            (Some(c), Some(k)) => Ok((c.clone(), k.clone())),
            _ => bail!("attention over an empty cache"),
        }
    }
}

fn append(cached: Option<Tensor>, new: &Tensor) -> Result<Tensor> {
    Ok(match cached {
        Some(cached) => Tensor::cat(&[&cached, new], 0)?,
        None => new.contiguous()?,
    })
}

/// The cache of one sequence across all layers.
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        KvCache {
            layers: (0..layers).map(|_| LayerCache::default()).collect(),
        }
    }

    /// Tokens cached (the position of the next token).
    pub fn tokens(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::tokens)
    }
}
