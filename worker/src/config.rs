//! The model configuration: Hugging Face `config.json` of DeepSeek-V3/R1/V3.1 (`deepseek_v3`)
//! and DeepSeek-V2/V2-Lite (`deepseek_v2`), parsed as written and then checked into a
//! [`Config`] whose options are enums. Anything unknown or unsupported is an error naming the
//! field.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

/// `config.json` as Hugging Face writes it. Field names mirror the file.
#[derive(Deserialize, Debug, Clone)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    moe_intermediate_size: usize,
    num_hidden_layers: usize,
    #[serde(default)]
    num_nextn_predict_layers: usize,
    num_attention_heads: usize,
    n_shared_experts: Option<usize>,
    n_routed_experts: Option<usize>,
    #[serde(default = "one_f64")]
    routed_scaling_factor: f64,
    kv_lora_rank: usize,
    q_lora_rank: Option<usize>,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    qk_nope_head_dim: usize,
    topk_method: Option<String>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    num_experts_per_tok: Option<usize>,
    #[serde(default = "one_usize")]
    moe_layer_freq: usize,
    #[serde(default)]
    first_k_dense_replace: usize,
    #[serde(default)]
    norm_topk_prob: bool,
    scoring_func: Option<String>,
    hidden_act: Option<String>,
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    bos_token_id: Option<u32>,
    eos_token_id: Option<Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    /// transformers ≥ 5 spelling of `rope_theta` + `rope_scaling`.
    rope_parameters: Option<Value>,
    #[serde(default)]
    attention_bias: bool,
    quantization_config: Option<Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V3,
    V2,
}

/// How routed experts are chosen from the router scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopkMethod {
    /// V3: scores plus `e_score_correction_bias` rank groups (by their top-2 sum) and experts.
    NoauxTc,
    /// V2: groups ranked by their best expert, top-k within the chosen groups.
    GroupLimitedGreedy,
    /// Plain top-k over all experts.
    Greedy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoringFunc {
    Sigmoid,
    Softmax,
}

/// YaRN context extension (the only rope scaling DeepSeek checkpoints use).
#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Moe {
    pub family: Family,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub topk_method: TopkMethod,
    pub scoring_func: ScoringFunc,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    pub moe_intermediate_size: usize,
    /// Layers below this index use the dense MLP.
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
}

/// FP8 block quantisation of the checkpoint's linear weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fp8 {
    pub block: [usize; 2],
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
    let family = match raw.model_type.as_deref() {
        Some("deepseek_v3") => Family::V3,
        Some("deepseek_v2") => Family::V2,
        Some(other) => {
            return Err(field(
                "model_type",
                format!("{other:?} is not supported; expected deepseek_v3 or deepseek_v2"),
            ));
        }
        None => return Err(field("model_type", "missing")),
    };
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
    let topk_method = match (family, raw.topk_method.as_deref()) {
        (_, Some("noaux_tc")) => TopkMethod::NoauxTc,
        (_, Some("group_limited_greedy")) => TopkMethod::GroupLimitedGreedy,
        (_, Some("greedy")) => TopkMethod::Greedy,
        (Family::V3, None) => TopkMethod::NoauxTc,
        (Family::V2, None) => TopkMethod::Greedy,
        (_, Some(other)) => {
            return Err(field(
                "topk_method",
                format!("{other:?}; expected noaux_tc, group_limited_greedy or greedy"),
            ));
        }
    };
    let scoring_func = match (family, raw.scoring_func.as_deref()) {
        (_, Some("sigmoid")) => ScoringFunc::Sigmoid,
        (_, Some("softmax")) => ScoringFunc::Softmax,
        (Family::V3, None) => ScoringFunc::Sigmoid,
        (Family::V2, None) => ScoringFunc::Softmax,
        (_, Some(other)) => {
            return Err(field(
                "scoring_func",
                format!("{other:?}; expected sigmoid or softmax"),
            ));
        }
    };
    let n_routed_experts = raw
        .n_routed_experts
        .ok_or_else(|| field("n_routed_experts", "missing"))?;
    let num_experts_per_tok = raw
        .num_experts_per_tok
        .ok_or_else(|| field("num_experts_per_tok", "missing"))?;
    let n_group = raw.n_group.unwrap_or(1);
    let topk_group = raw.topk_group.unwrap_or(1);
    positive("n_routed_experts", n_routed_experts)?;
    positive("num_experts_per_tok", num_experts_per_tok)?;
    positive("n_group", n_group)?;
    positive("moe_layer_freq", raw.moe_layer_freq)?;
    if num_experts_per_tok > n_routed_experts {
        return Err(field(
            "num_experts_per_tok",
            format!("{num_experts_per_tok} > n_routed_experts = {n_routed_experts}"),
        ));
    }
    if n_routed_experts % n_group != 0 {
        return Err(field(
            "n_group",
            format!("{n_group} does not divide n_routed_experts = {n_routed_experts}"),
        ));
    }
    if topk_group == 0 || topk_group > n_group {
        return Err(field(
            "topk_group",
            format!("{topk_group} must be in 1..=n_group ({n_group})"),
        ));
    }
    if topk_method == TopkMethod::NoauxTc && n_routed_experts / n_group < 2 {
        return Err(field(
            "n_group",
            "noaux_tc ranks groups by their top-2 experts, so each group needs at least 2",
        ));
    }
    if topk_method != TopkMethod::Greedy
        && num_experts_per_tok > topk_group * (n_routed_experts / n_group)
    {
        return Err(field(
            "num_experts_per_tok",
            "more than the chosen groups hold (topk_group × experts per group)",
        ));
    }
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
    let (rope_theta, yarn) = rope(&raw)?;
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
        moe: Moe {
            family,
            n_routed_experts,
            n_shared_experts: raw.n_shared_experts.unwrap_or(0),
            num_experts_per_tok,
            n_group,
            topk_group,
            topk_method,
            scoring_func,
            norm_topk_prob: raw.norm_topk_prob,
            routed_scaling_factor: raw.routed_scaling_factor,
            moe_intermediate_size: raw.moe_intermediate_size,
            first_k_dense_replace: raw.first_k_dense_replace,
            moe_layer_freq: raw.moe_layer_freq,
        },
        tie_word_embeddings: raw.tie_word_embeddings,
        bos_token_id: raw.bos_token_id,
        eos_token_ids: eos_ids(raw.eos_token_id.as_ref())?,
        fp8: fp8(raw.quantization_config.as_ref())?,
    })
}

fn positive(name: &str, value: usize) -> Result<(), ConfigError> {
    if value == 0 {
        Err(field(name, "must be at least 1"))
    } else {
        Ok(())
    }
}

/// `rope_theta` and `rope_scaling`, or transformers 5's `rope_parameters` holding both.
fn rope(raw: &RawConfig) -> Result<(f64, Option<Yarn>), ConfigError> {
    let (name, params) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(params), _) => ("rope_parameters", Some(params)),
        (None, scaling) => ("rope_scaling", scaling.as_ref()),
    };
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or(raw.rope_theta)
        .unwrap_or(10_000.0);
    let Some(params) = params.filter(|p| !p.is_null()) else {
        return Ok((theta, None));
    };
    let kind = params
        .get("rope_type")
        .or_else(|| params.get("type"))
        .and_then(Value::as_str);
    match kind {
        Some("yarn") => {}
        Some("default") | None if name == "rope_parameters" => return Ok((theta, None)),
        other => {
            return Err(field(
                &format!("{name}.type"),
                format!("{other:?} is not supported; expected yarn"),
            ));
        }
    }
    let number = |key: &str, default: Option<f64>| {
        params
            .get(key)
            .and_then(Value::as_f64)
            .or(default)
            .ok_or_else(|| field(&format!("{name}.{key}"), "missing"))
    };
    let yarn = Yarn {
        factor: number("factor", None)?,
        original_max_position_embeddings: number("original_max_position_embeddings", None)?
            as usize,
        beta_fast: number("beta_fast", Some(32.0))?,
        beta_slow: number("beta_slow", Some(1.0))?,
        mscale: number("mscale", Some(1.0))?,
        mscale_all_dim: number("mscale_all_dim", Some(0.0))?,
    };
    if yarn.factor < 1.0 {
        return Err(field(
            &format!("{name}.factor"),
            format!("{} must be ≥ 1", yarn.factor),
        ));
    }
    Ok((theta, Some(yarn)))
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

fn fp8(value: Option<&Value>) -> Result<Option<Fp8>, ConfigError> {
    let Some(q) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let method = q.get("quant_method").and_then(Value::as_str);
    if method != Some("fp8") {
        return Err(field(
            "quantization_config.quant_method",
            format!("{method:?} is not supported; expected fp8"),
        ));
    }
    if let Some(fmt) = q
        .get("fmt")
        .and_then(Value::as_str)
        .filter(|f| *f != "e4m3")
    {
        return Err(field(
            "quantization_config.fmt",
            format!("{fmt:?} is not supported; expected e4m3"),
        ));
    }
    let block = match q.get("weight_block_size") {
        None => [128, 128],
        Some(Value::Array(dims)) if dims.len() == 2 => {
            let dim = |v: &Value| v.as_u64().filter(|&n| n > 0).map(|n| n as usize);
            match (dim(&dims[0]), dim(&dims[1])) {
                (Some(rows), Some(cols)) => [rows, cols],
                _ => {
                    return Err(field(
                        "quantization_config.weight_block_size",
                        "expected two positive integers",
                    ));
                }
            }
        }
        Some(other) => {
            return Err(field(
                "quantization_config.weight_block_size",
                format!("{other} is not [rows, cols]"),
            ));
        }
    };
    Ok(Some(Fp8 { block }))
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

#[cfg(test)]
pub mod tests_support {
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
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// DeepSeek-V3's published config.json (the fields that matter).
    fn v3() -> Value {
        serde_json::from_str(
            r#"{
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
            "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
            "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
            "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
            "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
            "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
            "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": true,
            "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
            "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": false,
            "rope_theta": 10000, "attention_bias": false,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
            "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                    "quant_method": "fp8", "weight_block_size": [128, 128]}
        }"#,
        )
        .unwrap()
    }

    fn parse(value: &Value) -> Result<Config, ConfigError> {
        Config::from_json(&value.to_string())
    }

    fn error(edit: impl FnOnce(&mut Value)) -> String {
        let mut value = v3();
        edit(&mut value);
        parse(&value).unwrap_err().to_string()
    }

    #[test]
    fn deepseek_v3_parses() {
        let c = parse(&v3()).unwrap();
        assert_eq!(c.family, Family::V3);
        assert_eq!(
            (c.moe.topk_method, c.moe.scoring_func),
            (TopkMethod::NoauxTc, ScoringFunc::Sigmoid)
        );
        assert_eq!(c.qk_head_dim(), 192);
        assert_eq!(c.yarn.as_ref().unwrap().factor, 40.0);
        assert_eq!(c.fp8, Some(Fp8 { block: [128, 128] }));
        assert_eq!(c.eos_token_ids, [1]);
        assert!(!c.is_moe_layer(2) && c.is_moe_layer(3) && c.is_moe_layer(60));
    }

    #[test]
    fn deepseek_v2_lite_parses() {
        let lite = serde_json::from_str(
            r#"{
            "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048,
            "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
            "num_attention_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
            "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": null,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
            "topk_method": "greedy", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6,
            "first_k_dense_replace": 1, "norm_topk_prob": false, "scoring_func": "softmax",
            "max_position_embeddings": 163840, "eos_token_id": [100001],
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                             "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"}
        }"#,
        )
        .unwrap();
        let c = parse(&lite).unwrap();
        assert_eq!(
            (c.family, c.q_lora_rank, c.moe.topk_method),
            (Family::V2, None, TopkMethod::Greedy)
        );
        assert_eq!(c.moe.scoring_func, ScoringFunc::Softmax);
        assert_eq!(c.fp8, None);
    }

    #[test]
    fn rope_parameters_spelling_is_accepted() {
        let mut value = v3();
        let scaling = value
            .as_object_mut()
            .unwrap()
            .remove("rope_scaling")
            .unwrap();
        value.as_object_mut().unwrap().remove("rope_theta");
        let mut params = scaling;
        params["rope_type"] = json!("yarn");
        params["rope_theta"] = json!(50000.0);
        value["rope_parameters"] = params;
        let c = parse(&value).unwrap();
        assert_eq!(c.rope_theta, 50000.0);
        assert_eq!(c.yarn.unwrap().original_max_position_embeddings, 4096);
        value["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 10000.0});
        assert_eq!(parse(&value).unwrap().yarn, None);
    }

    #[test]
    fn unsupported_options_name_the_field() {
        let cases = [
            (
                "/model_type",
                json!("llama"),
                "model_type: \"llama\" is not supported",
            ),
            (
                "/topk_method",
                json!("sinkhorn"),
                "topk_method: \"sinkhorn\"",
            ),
            ("/scoring_func", json!("relu"), "scoring_func: \"relu\""),
            (
                "/rope_scaling/type",
                json!("linear"),
                "rope_scaling.type: Some(\"linear\")",
            ),
            (
                "/quantization_config/quant_method",
                json!("gptq"),
                "quantization_config.quant_method",
            ),
            (
                "/n_group",
                json!(7),
                "n_group: 7 does not divide n_routed_experts = 256",
            ),
            (
                "/topk_group",
                json!(9),
                "topk_group: 9 must be in 1..=n_group (8)",
            ),
            (
                "/num_experts_per_tok",
                json!(300),
                "num_experts_per_tok: 300 > n_routed_experts",
            ),
            ("/hidden_act", json!("gelu"), "hidden_act"),
            (
                "/qk_rope_head_dim",
                json!(63),
                "qk_rope_head_dim: 63 must be positive and even",
            ),
            ("/eos_token_id", json!("x"), "eos_token_id"),
            (
                "/hidden_size",
                json!(-1),
                "hidden_size: invalid value: integer `-1`",
            ),
        ];
        for (pointer, value, expected) in cases {
            let message = error(|v| *v.pointer_mut(pointer).unwrap() = value);
            assert!(
                message.starts_with("config.json: ") && message.contains(expected),
                "{message} should contain {expected}"
            );
        }
        let message = error(|v| {
            v.as_object_mut().unwrap().remove("kv_lora_rank");
        });
        assert!(
            message.contains("missing field `kv_lora_rank`"),
            "{message}"
        );
    }

    /// Seeded mutations of a real config: every case ends in Ok or an error naming something.
    #[test]
    fn ten_thousand_mutated_configs_never_panic() {
        let base = v3().to_string().into_bytes();
        let replacements: [&[u8]; 8] = [
            b"0",
            b"-1",
            b"null",
            b"1e400",
            b"\"x\"",
            b"[]",
            b"{}",
            b"18446744073709551616",
        ];
        let mut rng = crate::sampling::Rng::new(0x2545_f491_4f6c_dd1d);
        let mut next = move || rng.next_u64();
        let mut parsed = 0;
        for _ in 0..10_000 {
            let mut bytes = base.clone();
            for _ in 0..1 + next() % 3 {
                let at = next() as usize % bytes.len();
                match next() % 3 {
                    0 => bytes[at] = next() as u8,
                    1 => bytes.truncate(at),
                    _ => {
                        // replace the value after a colon with an edge value
                        if let Some(colon) = bytes[at..].iter().position(|&b| b == b':') {
                            let start = at + colon + 1;
                            let end = bytes[start..]
                                .iter()
                                .position(|&b| b == b',' || b == b'}')
                                .map_or(bytes.len(), |e| start + e);
                            let value = replacements[next() as usize % replacements.len()];
                            bytes.splice(start..end, value.iter().copied());
                        }
                    }
                }
                if bytes.is_empty() {
                    break;
                }
            }
            let text = String::from_utf8_lossy(&bytes);
            match Config::from_json(&text) {
                Ok(_) => parsed += 1,
                Err(e) => assert!(e.to_string().starts_with("config.json: "), "{e}"),
            }
        }
        assert!(parsed > 0 && parsed < 10_000, "{parsed}");
    }
}
