//! The paged KV cache. MLA caches, per token and layer, the normalised latent `c_kv`
//! (`kv_lora_rank` values) and the roped shared key `k_pe` (`qk_rope_head_dim` values): 576
//! f32 for V3. Storage is one pool of fixed-size blocks shared by every sequence; a sequence
//! holds a block table, so memory is claimed as it grows and returned the moment it ends,
//! and no sequence's cache is ever copied to make room for the next token.
//!
//! Prefix caching: a full block the scheduler registers is named by a SHA-256 chained over
//! every token up to its end ([`prefix_hashes`]), and another sequence whose prompt starts
//! the same way shares it (read-only: a sequence writes only past its shared blocks). Blocks
//! are counted by the tables that hold them; a registered block no table holds stays cached
//! and is evicted, least recently released first, only when a table needs a block and none
//! is free.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

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

    /// Positions `first..first + count`, all in one block: their latents and roped keys,
    /// which lie together there.
    pub fn read_run(&self, table: &BlockTable, first: usize, count: usize) -> (&[f32], &[f32]) {
        assert!(first % BLOCK_TOKENS + count <= BLOCK_TOKENS);
        let slot = table.slot(first);
        (
            &self.c_kv[slot * self.kv_lora..][..count * self.kv_lora],
            &self.k_pe[slot * self.rope..][..count * self.rope],
        )
    }

    /// Positions `0..tokens` a block at a time, in order: each run's first position, then its
    /// latents and roped keys (`read_run`).
    pub fn runs<'a>(
        &'a self,
        table: &'a BlockTable,
        tokens: usize,
    ) -> impl Iterator<Item = (usize, &'a [f32], &'a [f32])> + 'a {
        (0..tokens).step_by(BLOCK_TOKENS).map(move |first| {
            let (c_kv, k_pe) = self.read_run(table, first, BLOCK_TOKENS.min(tokens - first));
            (first, c_kv, k_pe)
        })
    }

    /// Positions `0..tokens` copied out contiguously: `([tokens × kv_lora], [tokens × rope])`.
    pub fn gather(&self, table: &BlockTable, tokens: usize) -> (Vec<f32>, Vec<f32>) {
        let mut c_kv = Vec::with_capacity(tokens * self.kv_lora);
        let mut k_pe = Vec::with_capacity(tokens * self.rope);
        for (_, latents, keys) in self.runs(table, tokens) {
            c_kv.extend_from_slice(latents);
            k_pe.extend_from_slice(keys);
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

/// A block's name in the prefix cache: the SHA-256 of every token up to its end.
pub type PrefixHash = [u8; 32];

/// The names of the full blocks of `tokens`, in order: each hashes the one before and its
/// own tokens, so equal names mean equal prefixes.
pub fn prefix_hashes(tokens: &[u32]) -> Vec<PrefixHash> {
    let mut previous = [0u8; 32];
    tokens
        .chunks_exact(BLOCK_TOKENS)
        .map(|block| {
            let mut hash = Sha256::new();
            hash.update(previous);
            for token in block {
                hash.update(token.to_le_bytes());
            }
            previous = hash.finalize().into();
            previous
        })
        .collect()
}

/// Every layer's blocks, which tables hold them, and the prefix cache.
pub struct KvPool {
    layers: Vec<LayerBlocks>,
    /// Blocks holding nothing.
    free: Vec<u32>,
    total: usize,
    /// Tables holding each block.
    refs: Vec<u32>,
    /// The prefix a registered block holds.
    names: Vec<Option<PrefixHash>>,
    by_name: HashMap<PrefixHash, u32>,
    /// Registered blocks no table holds, by when they were released (oldest first).
    idle: BTreeMap<u64, u32>,
    idle_since: Vec<Option<u64>>,
    clock: u64,
    /// Cached blocks given up for new ones, since `take_evicted` last asked.
    evicted: u64,
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
            refs: Vec::new(),
            names: Vec::new(),
            by_name: HashMap::new(),
            idle: BTreeMap::new(),
            idle_since: Vec::new(),
            clock: 0,
            evicted: 0,
        };
        pool.grow(blocks);
        pool
    }

    pub fn total_blocks(&self) -> usize {
        self.total
    }

    /// Blocks a table may take: free ones, and cached ones no table holds.
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Cached blocks given up for new ones since the last call.
    pub fn take_evicted(&mut self) -> u64 {
        std::mem::take(&mut self.evicted)
    }

    pub fn layer_mut(&mut self, layer: usize) -> &mut LayerBlocks {
        &mut self.layers[layer]
    }

    /// Extends `table` to hold `tokens` positions: free blocks first, then the cached blocks
    /// released longest ago. All or nothing: false, with nothing taken, when the pool is
    /// short.
    pub fn reserve(&mut self, table: &mut BlockTable, tokens: usize) -> bool {
        let missing = blocks_for(tokens).saturating_sub(table.blocks.len());
        if missing > self.free_blocks() {
            return false;
        }
        for _ in 0..missing {
            let block = match self.free.pop() {
                Some(block) => block,
                None => self.evict(),
            };
            self.refs[block as usize] = 1;
            table.blocks.push(block);
        }
        true
    }

    /// Takes the cached block released longest ago out of the cache.
    fn evict(&mut self) -> u32 {
        let (_, block) = self
            .idle
            .pop_first()
            .expect("reserve counted an idle block");
        self.idle_since[block as usize] = None;
        if let Some(name) = self.names[block as usize].take() {
            self.by_name.remove(&name);
        }
        self.evicted += 1;
        block
    }

    /// Returns every block of `table` to the pool and empties it: a registered block no
    /// other table holds stays cached.
    pub fn release(&mut self, table: &mut BlockTable) {
        for block in table.blocks.drain(..).rev() {
            let b = block as usize;
            self.refs[b] -= 1;
            if self.refs[b] > 0 {
                continue;
            }
            if self.names[b].is_some() {
                self.clock += 1;
                self.idle.insert(self.clock, block);
                self.idle_since[b] = Some(self.clock);
            } else {
                self.free.push(block);
            }
        }
        table.tokens = 0;
    }

    /// How many of `names`, from the first, the cache holds.
    pub fn cached_run(&self, names: &[PrefixHash]) -> usize {
        names
            .iter()
            .take_while(|name| self.by_name.contains_key(*name))
            .count()
    }

    /// Starts the empty `table` with the cached blocks of `names` (all cached: see
    /// `cached_run`), as if it had computed them.
    pub fn share(&mut self, table: &mut BlockTable, names: &[PrefixHash]) {
        debug_assert!(table.blocks.is_empty(), "only an empty table starts shared");
        for name in names {
            let block = self.by_name[name];
            let b = block as usize;
            if let Some(since) = self.idle_since[b].take() {
                self.idle.remove(&since);
            }
            self.refs[b] += 1;
            table.blocks.push(block);
        }
        table.tokens = names.len() * BLOCK_TOKENS;
    }

    /// Names `table`'s full blocks from `first` on with `names`, so later prompts can share
    /// them; a prefix another block already holds keeps that block.
    pub fn register(&mut self, table: &BlockTable, first: usize, names: &[PrefixHash]) {
        for (&block, name) in table.blocks[first..].iter().zip(names) {
            if self.names[block as usize].is_none() && !self.by_name.contains_key(name) {
                self.names[block as usize] = Some(*name);
                self.by_name.insert(*name, block);
            }
        }
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
        self.refs.resize(total, 0);
        self.names.resize(total, None);
        self.idle_since.resize(total, None);
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
        assert_eq!(
            pool.layer_mut(0).read_run(&a, 16, 1),
            (&[16.0, -16.0][..], &[160.0][..])
        );
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

    #[test]
    fn prefix_names_chain_over_every_token_before() {
        let a: Vec<u32> = (0..40).collect();
        let mut b = a.clone();
        b[20] = 99;
        let (na, nb) = (prefix_hashes(&a), prefix_hashes(&b));
        assert_eq!(na.len(), 2, "two full blocks of 40 tokens");
        assert_eq!(na[0], nb[0]);
        assert_ne!(na[1], nb[1]);
        assert_ne!(
            prefix_hashes(&a[16..32])[0],
            na[1],
            "a block's name carries its past"
        );
    }

    #[test]
    fn registered_blocks_are_shared_kept_when_released_and_evicted_oldest_first() {
        let mut pool = KvPool::new(0, 0, 0, 4);
        let names = prefix_hashes(&(0..48).collect::<Vec<u32>>());
        let mut first = BlockTable::default();
        assert!(pool.reserve(&mut first, 48));
        first.advance(48);
        pool.register(&first, 0, &names[..2]);
        // Another sequence starting the same way shares the two named blocks.
        let mut second = BlockTable::default();
        assert_eq!(pool.cached_run(&names), 2);
        pool.share(&mut second, &names[..2]);
        assert_eq!(
            (second.tokens(), second.blocks()),
            (32, &first.blocks()[..2])
        );
        assert_eq!(pool.free_blocks(), 1);
        pool.release(&mut first);
        // Still held by the second: only the unnamed third block is free.
        assert_eq!(pool.free_blocks(), 2);
        pool.release(&mut second);
        assert_eq!((pool.free_blocks(), pool.cached_run(&names)), (4, 2));
        // Free blocks go first; then the named ones, the one released longest ago first.
        let mut third = BlockTable::default();
        assert!(pool.reserve(&mut third, 32));
        assert_eq!((pool.cached_run(&names), pool.take_evicted()), (2, 0));
        assert!(pool.reserve(&mut third, 48));
        assert_eq!(pool.take_evicted(), 1);
        // A table releases its blocks last first, so a prefix loses its tail, not its start.
        assert_eq!(pool.cached_run(&names), 1);
    }
}
