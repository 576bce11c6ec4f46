//! The paged KV cache. MLA caches, per token and layer, the normalised latent `c_kv`
//! (`kv_lora_rank` values) and the roped shared key `k_pe` (`qk_rope_head_dim` values): 576
//! f32 for V3. Storage is one pool of fixed-size blocks shared by every sequence; a sequence
//! holds a block table, so memory is claimed as it grows and returned the moment it ends,
//! and no sequence's cache is ever copied to make room for the next token.

/// Tokens per block.
pub const BLOCK_TOKENS: usize = 16;

/// Blocks that hold `tokens` tokens.
pub fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_TOKENS)
}

/// One layer's part of every block.
pub struct LayerBlocks {
    kv_lora: usize,
    rope: usize,
    /// `[blocks × BLOCK_TOKENS, kv_lora]`
    c_kv: Vec<f32>,
    /// `[blocks × BLOCK_TOKENS, rope]`
    k_pe: Vec<f32>,
}

impl LayerBlocks {
    /// Stores position `position` of the sequence that owns `table`.
    pub fn write(&mut self, table: &BlockTable, position: usize, c_kv: &[f32], k_pe: &[f32]) {
        let slot = table.slot(position);
        self.c_kv[slot * self.kv_lora..][..self.kv_lora].copy_from_slice(c_kv);
        self.k_pe[slot * self.rope..][..self.rope].copy_from_slice(k_pe);
    }

    /// The latent and roped key of position `position`.
    pub fn read(&self, table: &BlockTable, position: usize) -> (&[f32], &[f32]) {
        let slot = table.slot(position);
        (
            &self.c_kv[slot * self.kv_lora..][..self.kv_lora],
            &self.k_pe[slot * self.rope..][..self.rope],
        )
    }

    /// Positions `0..tokens` copied out contiguously: `([tokens × kv_lora], [tokens × rope])`.
    pub fn gather(&self, table: &BlockTable, tokens: usize) -> (Vec<f32>, Vec<f32>) {
        let mut c_kv = Vec::with_capacity(tokens * self.kv_lora);
        let mut k_pe = Vec::with_capacity(tokens * self.rope);
        for (b, &block) in table.blocks.iter().enumerate() {
            let used = BLOCK_TOKENS.min(tokens.saturating_sub(b * BLOCK_TOKENS));
            let first = block as usize * BLOCK_TOKENS;
            c_kv.extend_from_slice(&self.c_kv[first * self.kv_lora..][..used * self.kv_lora]);
            k_pe.extend_from_slice(&self.k_pe[first * self.rope..][..used * self.rope]);
        }
        (c_kv, k_pe)
    }

    fn grow(&mut self, blocks: usize) {
        self.c_kv.resize(blocks * BLOCK_TOKENS * self.kv_lora, 0.0);
        self.k_pe.resize(blocks * BLOCK_TOKENS * self.rope, 0.0);
    }
}

/// The blocks of one sequence, in position order, and how many positions are filled.
#[derive(Debug, Default)]
pub struct BlockTable {
    blocks: Vec<u32>,
    tokens: usize,
}

impl BlockTable {
    /// Positions filled (the position of the next token).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Positions the reserved blocks hold.
    pub fn capacity(&self) -> usize {
        self.blocks.len() * BLOCK_TOKENS
    }

    /// Marks `n` more positions filled (after every layer has written them).
    pub fn advance(&mut self, n: usize) {
        debug_assert!(self.tokens + n <= self.capacity());
        self.tokens += n;
    }

    /// The blocks, in position order.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Where position `position` sits in the pool: block · BLOCK_TOKENS + offset.
    pub fn slot(&self, position: usize) -> usize {
        self.blocks[position / BLOCK_TOKENS] as usize * BLOCK_TOKENS + position % BLOCK_TOKENS
    }
}

/// Every layer's blocks and the free list.
pub struct KvPool {
    layers: Vec<LayerBlocks>,
    free: Vec<u32>,
    total: usize,
}

impl KvPool {
    /// `blocks` blocks for a model of `layers` layers. The memory is zeroed lazily by the OS,
    /// so a large pool costs nothing until it fills.
    pub fn new(layers: usize, kv_lora: usize, rope: usize, blocks: usize) -> Self {
        let mut pool = KvPool {
            layers: (0..layers)
                .map(|_| LayerBlocks {
                    kv_lora,
                    rope,
                    c_kv: Vec::new(),
                    k_pe: Vec::new(),
                })
                .collect(),
            free: Vec::new(),
            total: 0,
        };
        pool.grow(blocks);
        pool
    }

    pub fn total_blocks(&self) -> usize {
        self.total
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn layer_mut(&mut self, layer: usize) -> &mut LayerBlocks {
        &mut self.layers[layer]
    }

    /// Extends `table` to hold `tokens` positions. All or nothing: false, with nothing taken,
    /// when the pool is short.
    pub fn reserve(&mut self, table: &mut BlockTable, tokens: usize) -> bool {
        let missing = blocks_for(tokens).saturating_sub(table.blocks.len());
        if missing > self.free.len() {
            return false;
        }
        let from = self.free.len() - missing;
        table.blocks.extend(self.free.drain(from..).rev());
        true
    }

    /// Returns every block of `table` to the pool and empties it.
    pub fn release(&mut self, table: &mut BlockTable) {
        self.free.extend(table.blocks.drain(..).rev());
        table.tokens = 0;
    }

    /// Adds `blocks` blocks.
    pub fn grow(&mut self, blocks: usize) {
        let total = self.total + blocks;
        for layer in &mut self.layers {
            layer.grow(total);
        }
        // Lowest ids on top of the stack, so a fresh pool hands out blocks in order.
        self.free
            .splice(0..0, (self.total..total).rev().map(|b| b as u32));
        self.total = total;
    }
}

/// One sequence with a pool of its own that grows as needed (the CLI and tests).
pub struct SequenceCache {
    pub pool: KvPool,
    pub table: BlockTable,
}

impl SequenceCache {
    pub fn new(pool: KvPool) -> Self {
        SequenceCache {
            pool,
            table: BlockTable::default(),
        }
    }

    /// Tokens cached (the position of the next token).
    pub fn tokens(&self) -> usize {
        self.table.tokens()
    }

    /// Makes room for `more` tokens, growing the pool if it must.
    pub fn make_room(&mut self, more: usize) {
        let tokens = self.table.tokens() + more;
        let missing = blocks_for(tokens).saturating_sub(self.table.blocks.len());
        if missing > self.pool.free_blocks() {
            self.pool.grow(missing - self.pool.free_blocks());
        }
        let reserved = self.pool.reserve(&mut self.table, tokens);
        debug_assert!(reserved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_come_and_go_whole_and_reads_follow_the_table() {
        let mut pool = KvPool::new(1, 2, 1, 3);
        let (mut a, mut b) = (BlockTable::default(), BlockTable::default());
        assert!(pool.reserve(&mut a, 17)); // two blocks
        assert!(!pool.reserve(&mut b, 17), "only one block is left");
        assert_eq!(pool.free_blocks(), 1);
        assert!(pool.reserve(&mut b, 16));
        for position in 0..17 {
            let v = position as f32;
            pool.layer_mut(0).write(&a, position, &[v, -v], &[v * 10.0]);
        }
        pool.layer_mut(0).write(&b, 0, &[99.0, 99.0], &[99.0]);
        a.advance(17);
        let (c_kv, k_pe) = pool.layer_mut(0).gather(&a, 17);
        assert_eq!(c_kv.len(), 34);
        assert_eq!(&c_kv[32..], &[16.0, -16.0]);
        assert_eq!(k_pe[16], 160.0);
        assert_eq!(pool.layer_mut(0).read(&a, 16).0, &[16.0, -16.0]);
        pool.release(&mut a);
        assert_eq!((a.tokens(), a.capacity(), pool.free_blocks()), (0, 0, 2));
    }

    #[test]
    fn a_private_cache_grows_its_pool() {
        let mut cache = SequenceCache::new(KvPool::new(2, 4, 2, 0));
        cache.make_room(40);
        assert_eq!(cache.pool.total_blocks(), 3);
        cache.table.advance(40);
        cache.make_room(1);
        assert_eq!((cache.pool.total_blocks(), cache.tokens()), (3, 40));
    }
}
