//! A small valid configuration for other modules' unit tests.

use super::Config;

/// A small valid V3 configuration for unit tests.
pub fn tiny_config() -> Config {
    Config::from_json(
        r#"{"model_type": "deepseek_v3", "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 32, "moe_intermediate_size": 8, "num_hidden_layers": 2,
            "num_attention_heads": 2, "n_shared_experts": 1, "n_routed_experts": 4,
            "kv_lora_rank": 8, "q_lora_rank": 8, "qk_rope_head_dim": 4, "v_head_dim": 4,
            "qk_nope_head_dim": 4, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2,
            "first_k_dense_replace": 1, "norm_topk_prob": true, "max_position_embeddings": 64}"#,
    )
    .expect("valid")
}
