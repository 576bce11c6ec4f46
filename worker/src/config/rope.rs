//! Rotary embeddings: `rope_theta` and YaRN context extension, from `rope_theta` and
//! `rope_scaling` or transformers 5's `rope_parameters`.

use serde_json::Value;

use super::raw::RawConfig;
use super::{ConfigError, field};

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

/// `rope_theta` and `rope_scaling`, or transformers 5's `rope_parameters` holding both.
pub(super) fn parse(raw: &RawConfig) -> Result<(f64, Option<Yarn>), ConfigError> {
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
