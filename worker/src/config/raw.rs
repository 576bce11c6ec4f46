//! `config.json` as Hugging Face writes it, before any check.

use serde::Deserialize;
use serde_json::Value;

/// `config.json` as Hugging Face writes it. Field names mirror the file.
#[derive(Deserialize, Debug, Clone)]
pub(super) struct RawConfig {
    pub(super) model_type: Option<String>,
    pub(super) vocab_size: usize,
    pub(super) hidden_size: usize,
    pub(super) intermediate_size: usize,
    pub(super) moe_intermediate_size: usize,
    pub(super) num_hidden_layers: usize,
    #[serde(default)]
    pub(super) num_nextn_predict_layers: usize,
    pub(super) num_attention_heads: usize,
    pub(super) n_shared_experts: Option<usize>,
    pub(super) n_routed_experts: Option<usize>,
    #[serde(default = "one_f64")]
    pub(super) routed_scaling_factor: f64,
    pub(super) kv_lora_rank: usize,
    pub(super) q_lora_rank: Option<usize>,
    pub(super) qk_rope_head_dim: usize,
    pub(super) v_head_dim: usize,
    pub(super) qk_nope_head_dim: usize,
    pub(super) topk_method: Option<String>,
    pub(super) n_group: Option<usize>,
    pub(super) topk_group: Option<usize>,
    pub(super) num_experts_per_tok: Option<usize>,
    #[serde(default = "one_usize")]
    pub(super) moe_layer_freq: usize,
    #[serde(default)]
    pub(super) first_k_dense_replace: usize,
    #[serde(default)]
    pub(super) norm_topk_prob: bool,
    pub(super) scoring_func: Option<String>,
    pub(super) hidden_act: Option<String>,
    pub(super) max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub(super) rms_norm_eps: f64,
    pub(super) bos_token_id: Option<u32>,
    pub(super) eos_token_id: Option<Value>,
    #[serde(default)]
    pub(super) tie_word_embeddings: bool,
    pub(super) rope_theta: Option<f64>,
    pub(super) rope_scaling: Option<Value>,
    /// transformers ≥ 5 spelling of `rope_theta` + `rope_scaling`.
    pub(super) rope_parameters: Option<Value>,
    #[serde(default)]
    pub(super) attention_bias: bool,
    pub(super) quantization_config: Option<Value>,
}

fn one_f64() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn default_eps() -> f64 {
    1e-6
}
