//! How a DeepSeek MoE model fits on a GPU: per rank, the bytes of the weights it holds (the
//! replicated parts and its share of the routed experts), of a pass's working space and of
//! the KV cache per token, and so the tokens of cache left. Pure arithmetic on the model's
//! shape; the operator refuses a pool the model does not fit and `render` prints the plan;
//! the worker sizes its cache with the same working-space bound.

use std::fmt;

/// The numbers of a `config.json` that decide memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelShape {
    pub vocab: u64,
    pub hidden: u64,
    pub layers: u64,
    /// Leading layers with a dense MLP (`first_k_dense_replace`); the rest are MoE.
    pub dense_layers: u64,
    /// Width of a dense layer's MLP.
    pub intermediate: u64,
    /// Width of one expert.
    pub moe_intermediate: u64,
    pub routed_experts: u64,
    pub shared_experts: u64,
    pub experts_per_token: u64,
    pub heads: u64,
    /// Rank of the low-rank query projection; 0 for a plain one (V2-Lite).
    pub q_lora_rank: u64,
    pub kv_lora_rank: u64,
    pub qk_nope_head_dim: u64,
    pub qk_rope_head_dim: u64,
    pub v_head_dim: u64,
}

impl ModelShape {
    /// DeepSeek-V3, R1 and V3.1 (`deepseek-ai/DeepSeek-V3/config.json`).
    pub const DEEPSEEK_V3: ModelShape = ModelShape {
        vocab: 129_280,
        hidden: 7168,
        layers: 61,
        dense_layers: 3,
        intermediate: 18_432,
        moe_intermediate: 2048,
        routed_experts: 256,
        shared_experts: 1,
        experts_per_token: 8,
        heads: 128,
        q_lora_rank: 1536,
        kv_lora_rank: 512,
        qk_nope_head_dim: 128,
        qk_rope_head_dim: 64,
        v_head_dim: 128,
    };

    /// DeepSeek-V2 and V2.5 (`deepseek-ai/DeepSeek-V2/config.json`).
    pub const DEEPSEEK_V2: ModelShape = ModelShape {
        vocab: 102_400,
        hidden: 5120,
        layers: 60,
        dense_layers: 1,
        intermediate: 12_288,
        moe_intermediate: 1536,
        routed_experts: 160,
        shared_experts: 2,
        experts_per_token: 6,
        heads: 128,
        q_lora_rank: 1536,
        kv_lora_rank: 512,
        qk_nope_head_dim: 128,
        qk_rope_head_dim: 64,
        v_head_dim: 128,
    };

    /// DeepSeek-V2-Lite (`deepseek-ai/DeepSeek-V2-Lite/config.json`).
    pub const DEEPSEEK_V2_LITE: ModelShape = ModelShape {
        vocab: 102_400,
        hidden: 2048,
        layers: 27,
        dense_layers: 1,
        intermediate: 10_944,
        moe_intermediate: 1408,
        routed_experts: 64,
        shared_experts: 2,
        experts_per_token: 6,
        heads: 16,
        q_lora_rank: 0,
        kv_lora_rank: 512,
        qk_nope_head_dim: 128,
        qk_rope_head_dim: 64,
        v_head_dim: 128,
    };

    fn qk_head_dim(&self) -> u64 {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    fn moe_layers(&self) -> u64 {
        self.layers - self.dense_layers
    }

    /// One layer's attention projections, as [rows, cols] matrices, but `kv_up_matrix`.
    fn attention_matrices(&self) -> Vec<[u64; 2]> {
        let q_out = self.heads * self.qk_head_dim();
        let mut matrices = match self.q_lora_rank {
            0 => vec![[q_out, self.hidden]],
            rank => vec![[rank, self.hidden], [q_out, rank]],
        };
        matrices.extend([
            [self.kv_lora_rank + self.qk_rope_head_dim, self.hidden],
            [self.hidden, self.heads * self.v_head_dim],
        ]);
        matrices
    }

    /// `kv_b_proj`, which the GPU holds in bf16 whatever the checkpoint: the absorbed
    /// attention multiplies it per head through cuBLAS.
    fn kv_up_matrix(&self) -> [u64; 2] {
        [
            self.heads * (self.qk_nope_head_dim + self.v_head_dim),
            self.kv_lora_rank,
        ]
    }

    /// A SwiGLU MLP of `width`: gate, up, down.
    fn mlp_matrices(&self, width: u64) -> [[u64; 2]; 3] {
        [
            [width, self.hidden],
            [width, self.hidden],
            [self.hidden, width],
        ]
    }

    /// Bytes of the weights every rank holds: embeddings and `lm_head` (bf16), attention,
    /// dense MLPs and shared experts (`linear`, but `kv_b_proj` in bf16), routers (f32, as
    /// the GPU path routes) and norms (bf16).
    pub fn replicated_bytes(&self, linear: WeightFormat) -> u64 {
        let matrices = |list: &[[u64; 2]]| list.iter().map(|&m| linear.bytes(m)).sum::<u64>();
        let norms = 2 * (2 * self.hidden + self.q_lora_rank + self.kv_lora_rank);
        let attention = matrices(&self.attention_matrices())
            + WeightFormat::Bf16.bytes(self.kv_up_matrix())
            + norms;
        let dense_mlp = matrices(&self.mlp_matrices(self.intermediate));
        let shared = matrices(&self.mlp_matrices(self.shared_experts * self.moe_intermediate));
        let router = 4 * self.routed_experts * (self.hidden + 1);
        let embeddings = 2 * 2 * self.vocab * self.hidden + 2 * self.hidden;
        self.layers * attention
            + self.dense_layers * dense_mlp
            + self.moe_layers() * (shared + router)
            + embeddings
    }

    /// Bytes of one routed expert of one layer.
    pub fn expert_bytes(&self, format: WeightFormat) -> u64 {
        let mlp = self.mlp_matrices(self.moe_intermediate);
        mlp.iter().map(|&m| format.bytes(m)).sum()
    }

    /// Bytes of KV cache per token on a GPU: MLA's latent and roped key, bf16, every layer.
    pub fn kv_bytes_per_token(&self) -> u64 {
        2 * self.layers * (self.kv_lora_rank + self.qk_rope_head_dim)
    }

    /// A generous bound on the device memory a pass of `tokens` tokens allocates: one
    /// layer's activations (twice, as the next layer's come before the last are freed), the
    /// experts' rows, and 1 GiB for cuBLAS and the logits.
    pub fn working_bytes(&self, tokens: u64) -> u64 {
        let (heads, qk, rope, lora, v) = (
            self.heads,
            self.qk_head_dim(),
            self.qk_rope_head_dim,
            self.kv_lora_rank,
            self.v_head_dim,
        );
        let f32s = 4 * self.hidden + heads * (qk + rope + 2 * lora + v) + 2 * (lora + rope);
        let bf16s = 2 * self.hidden + heads * (qk + lora + v);
        let experts = self.experts_per_token * (2 * self.hidden + 3 * self.moe_intermediate);
        let per_token = 4 * (f32s + self.routed_experts) + 2 * (bf16s + experts);
        2 * tokens * per_token + GIB
    }
}

const GIB: u64 = 1 << 30;

/// How a weight matrix is held on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    Bf16,
    /// e4m3 with an f32 scale per 128×128 block (DeepSeek-V3's checkpoint format).
    Fp8,
}

impl WeightFormat {
    fn bytes(self, [rows, cols]: [u64; 2]) -> u64 {
        match self {
            WeightFormat::Bf16 => 2 * rows * cols,
            WeightFormat::Fp8 => rows * cols + 4 * rows.div_ceil(128) * cols.div_ceil(128),
        }
    }
}

impl WeightFormat {
    /// How a GPU rank holds the linear weights, routed experts included: FP8 when it runs
    /// an FP8 checkpoint in FP8, bf16 otherwise.
    pub fn on_gpu(fp8: bool) -> Self {
        if fp8 {
            WeightFormat::Fp8
        } else {
            WeightFormat::Bf16
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Fp8 => "fp8",
        })
    }
}

/// One rank of an expert-parallel group, as deployed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rank {
    /// The GPU's memory.
    pub gpu_bytes: u64,
    /// Share of it that weights, working space and cache may use together (vLLM's
    /// `gpu_memory_utilization`; the worker's `--kv-cache-fraction` on a GPU).
    pub memory_fraction: f64,
    /// Ranks in the group.
    pub group_size: u64,
    /// Extra expert copies per layer across the group.
    pub redundant_experts: u64,
    /// The linear weights: attention, dense MLPs, shared and routed experts.
    pub weights: WeightFormat,
    /// Tokens of one pass (the scheduler's `--max-batch-tokens`).
    pub batch_tokens: u64,
}

/// Where one rank's memory goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    /// What weights, working space and cache may use.
    pub budget: u64,
    pub replicated: u64,
    /// Expert slots per MoE layer on this rank (every rank gets the same number).
    pub expert_slots: u64,
    pub experts: u64,
    pub working: u64,
    pub kv_per_token: u64,
    /// Tokens of KV cache left; 0 when the rest does not fit.
    pub kv_tokens: u64,
}

/// The plan for one rank of `shape` deployed as `rank` says.
pub fn plan(shape: &ModelShape, rank: &Rank) -> MemoryPlan {
    let expert_slots =
        (shape.routed_experts + rank.redundant_experts).div_ceil(rank.group_size.max(1));
    let budget = (rank.memory_fraction * rank.gpu_bytes as f64) as u64;
    let replicated = shape.replicated_bytes(rank.weights);
    let experts = shape.moe_layers() * expert_slots * shape.expert_bytes(rank.weights);
    let working = shape.working_bytes(rank.batch_tokens);
    let kv_per_token = shape.kv_bytes_per_token();
    let left = budget.saturating_sub(replicated + experts + working);
    MemoryPlan {
        budget,
        replicated,
        expert_slots,
        experts,
        working,
        kv_per_token,
        kv_tokens: left / kv_per_token,
    }
}

impl MemoryPlan {
    /// Whether the cache holds at least one pass's tokens: with less, the scheduler cannot
    /// run a full step.
    pub fn fits(&self, batch_tokens: u64) -> bool {
        self.kv_tokens >= batch_tokens
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gib = |bytes: u64| bytes as f64 / GIB as f64;
        write!(
            f,
            "{:.1} GiB usable: {:.1} GiB replicated weights + {:.1} GiB experts ({} per layer) \
             + {:.1} GiB working space; KV cache {} tokens ({} KiB per token)",
            gib(self.budget),
            gib(self.replicated),
            gib(self.experts),
            self.expert_slots,
            gib(self.working),
            self.kv_tokens,
            self.kv_per_token / 1024,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V3: ModelShape = ModelShape::DEEPSEEK_V3;

    #[test]
    fn deepseek_v3_has_its_published_parameter_counts() {
        // bf16 weights (and the f32 routers, 0.1 B parameters) over 2 bytes: 671 B in all,
        // 37 B activated per token.
        let replicated = V3.replicated_bytes(WeightFormat::Bf16);
        let expert = V3.expert_bytes(WeightFormat::Bf16);
        assert_eq!(expert, 2 * 3 * 7168 * 2048);
        let total = (replicated + 58 * 256 * expert) / 2;
        assert!((671.0e9..672.0e9).contains(&(total as f64)), "{total}");
        let active = (replicated + 58 * 8 * expert) / 2;
        assert!((37.0e9..38.0e9).contains(&(active as f64)), "{active}");
    }

    #[test]
    fn fp8_weights_carry_a_scale_per_block() {
        assert_eq!(WeightFormat::Fp8.bytes([256, 128]), 256 * 128 + 4 * 2);
        assert_eq!(
            WeightFormat::Fp8.bytes([576, 7168]),
            576 * 7168 + 4 * 5 * 56
        );
        assert_eq!(WeightFormat::Bf16.bytes([576, 7168]), 2 * 576 * 7168);
    }

    #[test]
    fn the_kv_cache_holds_576_latent_values_per_token_per_layer() {
        assert_eq!(V3.kv_bytes_per_token(), 2 * 61 * 576);
    }

    #[test]
    fn a_rank_of_an_h100_group_by_hand() {
        let rank = Rank {
            gpu_bytes: 80 * GIB,
            memory_fraction: 0.9,
            group_size: 32,
            redundant_experts: 32,
            weights: WeightFormat::Fp8,
            batch_tokens: 4096,
        };
        let plan = plan(&V3, &rank);
        // Per layer: q_a, q_b, kv_a and o in FP8 with their block scales, kv_b in bf16, norms.
        let attention = (1536 * 7168 + 4 * 12 * 56)
            + (24576 * 1536 + 4 * 192 * 12)
            + (576 * 7168 + 4 * 5 * 56)
            + (7168 * 16384 + 4 * 56 * 128)
            + 2 * 32768 * 512
            + 2 * (2 * 7168 + 1536 + 512);
        let dense_mlp = 3 * (18432 * 7168 + 4 * 144 * 56);
        let shared = 3 * (2048 * 7168 + 4 * 16 * 56);
        let router = 4 * 256 * 7169;
        let embeddings = 2 * 2 * 129280 * 7168 + 2 * 7168;
        assert_eq!(
            plan.replicated,
            61 * attention + 3 * dense_mlp + 58 * (shared + router) + embeddings
        );
        // 288 expert copies over 32 ranks.
        assert_eq!(plan.expert_slots, 9);
        let expert = 3 * (2048 * 7168 + 4 * 16 * 56);
        assert_eq!(plan.experts, 58 * 9 * expert);
        assert_eq!(plan.budget, 72 * GIB);
        let left = plan.budget - plan.replicated - plan.experts - plan.working;
        assert_eq!(plan.kv_tokens, left / (2 * 61 * 576));
        assert!(plan.fits(4096));
        // Half the group: twice the experts, and the cache is gone.
        let half = super::plan(
            &V3,
            &Rank {
                group_size: 16,
                ..rank
            },
        );
        assert_eq!(half.expert_slots, 18);
        assert_eq!(half.kv_tokens, 0);
        assert!(!half.fits(4096));
    }

    #[test]
    fn a_low_rank_query_is_two_matrices() {
        let lite = ModelShape::DEEPSEEK_V2_LITE;
        assert_eq!(lite.attention_matrices()[0], [16 * 192, 2048]);
        assert_eq!(
            V3.attention_matrices()[..2],
            [[1536, 7168], [128 * 192, 1536]]
        );
    }
}
