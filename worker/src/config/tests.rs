//! The checks of `config.json` against DeepSeek-V3's and V2-Lite's published configs and
//! mutations of them.

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
