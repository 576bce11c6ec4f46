//! The model configuration: Hugging Face `config.json` of DeepSeek-V3/R1/V3.1 (`deepseek_v3`)
//! and DeepSeek-V2/V2-Lite (`deepseek_v2`), parsed as written and then checked into a
//! [`Config`] whose options are enums. Anything unknown or unsupported is an error naming the
//! field.
//!
//! The parts: `raw.rs` the file as serde reads it; `moe.rs` the expert routing settings and
//! their checks; `rope.rs` `rope_theta` and YaRN scaling; `fp8.rs` the FP8 quantization
//! block. This file checks the rest and assembles the [`Config`].

mod fp8;
mod moe;
mod raw;
mod rope;
#[cfg(test)]
mod tests;
#[cfg(test)]
pub mod tests_support;

use std::path::Path;

use deepseek_proto::memory::ModelShape;
use serde_json::Value;

pub use self::fp8::Fp8;
pub use self::moe::{Moe, ScoringFunc, TopkMethod};
use self::raw::RawConfig;
pub use self::rope::Yarn;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V3,
    V2,
}

/// A checked DeepSeek configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// Multi-token-prediction layers after the main stack; skipped on load.
    pub num_nextn_predict_layers: usize,
    pub num_attention_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub yarn: Option<Yarn>,
    pub moe: Moe,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub fp8: Option<Fp8>,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_json(&text).map_err(|e| ConfigError {
            path: path.display().to_string(),
            ..e
        })
    }

    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        // The path names the offending field even for type errors ("hidden_size: invalid value").
        let mut json = serde_json::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(&mut json).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." {
                invalid(inner.to_string())
            } else {
                field(&path, inner)
            }
        })?;
        check(raw)
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// The numbers that decide the model's memory (`deepseek_proto::memory`).
    pub fn shape(&self) -> ModelShape {
        let n = |v: usize| v as u64;
        let moe = &self.moe;
        ModelShape {
            vocab: n(self.vocab_size),
            hidden: n(self.hidden_size),
            layers: n(self.num_hidden_layers),
            dense_layers: n((0..self.num_hidden_layers)
                .filter(|&l| !self.is_moe_layer(l))
                .count()),
            intermediate: n(self.intermediate_size),
            moe_intermediate: n(moe.moe_intermediate_size),
            routed_experts: n(moe.n_routed_experts),
            shared_experts: n(moe.n_shared_experts),
            experts_per_token: n(moe.num_experts_per_tok),
            heads: n(self.num_attention_heads),
            q_lora_rank: n(self.q_lora_rank.unwrap_or(0)),
            kv_lora_rank: n(self.kv_lora_rank),
            qk_nope_head_dim: n(self.qk_nope_head_dim),
            qk_rope_head_dim: n(self.qk_rope_head_dim),
            v_head_dim: n(self.v_head_dim),
        }
    }

    /// Whether decoder layer `layer` has a mixture-of-experts MLP (else a dense one).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.moe.first_k_dense_replace && layer.is_multiple_of(self.moe.moe_layer_freq)
    }
}

fn invalid(message: String) -> ConfigError {
    ConfigError {
        path: "config.json".into(),
        message,
    }
}

fn field(name: &str, message: impl std::fmt::Display) -> ConfigError {
    invalid(format!("{name}: {message}"))
}

fn check(raw: RawConfig) -> Result<Config, ConfigError> {
    let family = family(raw.model_type.as_deref())?;
    check_supported(&raw)?;
    let moe = moe::check(&raw, family)?;
    check_dimensions(&raw)?;
    let (rope_theta, yarn) = rope::parse(&raw)?;
    Ok(Config {
        family,
        vocab_size: raw.vocab_size,
        hidden_size: raw.hidden_size,
        intermediate_size: raw.intermediate_size,
        num_hidden_layers: raw.num_hidden_layers,
        num_nextn_predict_layers: raw.num_nextn_predict_layers,
        num_attention_heads: raw.num_attention_heads,
        q_lora_rank: raw.q_lora_rank,
        kv_lora_rank: raw.kv_lora_rank,
        qk_nope_head_dim: raw.qk_nope_head_dim,
        qk_rope_head_dim: raw.qk_rope_head_dim,
        v_head_dim: raw.v_head_dim,
        max_position_embeddings: raw.max_position_embeddings,
        rms_norm_eps: raw.rms_norm_eps,
        rope_theta,
        yarn,
        moe,
        tie_word_embeddings: raw.tie_word_embeddings,
        bos_token_id: raw.bos_token_id,
        eos_token_ids: eos_ids(raw.eos_token_id.as_ref())?,
        fp8: fp8::parse(raw.quantization_config.as_ref())?,
    })
}

fn family(model_type: Option<&str>) -> Result<Family, ConfigError> {
    match model_type {
        Some("deepseek_v3") => Ok(Family::V3),
        Some("deepseek_v2") => Ok(Family::V2),
        Some(other) => Err(field(
            "model_type",
            format!("{other:?} is not supported; expected deepseek_v3 or deepseek_v2"),
        )),
        None => Err(field("model_type", "missing")),
    }
}

/// Options DeepSeek checkpoints never use, refused rather than ignored.
fn check_supported(raw: &RawConfig) -> Result<(), ConfigError> {
    if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
        return Err(field(
            "hidden_act",
            format!("{act:?} is not supported; DeepSeek uses silu"),
        ));
    }
    if raw.attention_bias {
        return Err(field(
            "attention_bias",
            "true is not supported; DeepSeek checkpoints have no attention bias",
        ));
    }
    Ok(())
}

/// The attention and embedding sizes.
fn check_dimensions(raw: &RawConfig) -> Result<(), ConfigError> {
    for (name, value) in [
        ("vocab_size", raw.vocab_size),
        ("hidden_size", raw.hidden_size),
        ("num_hidden_layers", raw.num_hidden_layers),
        ("num_attention_heads", raw.num_attention_heads),
        ("kv_lora_rank", raw.kv_lora_rank),
        ("qk_nope_head_dim", raw.qk_nope_head_dim),
        ("v_head_dim", raw.v_head_dim),
        ("max_position_embeddings", raw.max_position_embeddings),
    ] {
        positive(name, value)?;
    }
    if raw.qk_rope_head_dim == 0 || !raw.qk_rope_head_dim.is_multiple_of(2) {
        return Err(field(
            "qk_rope_head_dim",
            format!("{} must be positive and even", raw.qk_rope_head_dim),
        ));
    }
    if raw.q_lora_rank == Some(0) {
        return Err(field(
            "q_lora_rank",
            "0; use null for the plain q projection",
        ));
    }
    Ok(())
}

fn positive(name: &str, value: usize) -> Result<(), ConfigError> {
    if value == 0 {
        Err(field(name, "must be at least 1"))
    } else {
        Ok(())
    }
}

fn eos_ids(value: Option<&Value>) -> Result<Vec<u32>, ConfigError> {
    let id = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| field("eos_token_id", format!("{v} is not a token id")))
    };
    match value {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(ids)) => ids.iter().map(id).collect(),
        Some(single) => Ok(vec![id(single)?]),
    }
}
