//! FP8 block quantisation from `quantization_config`: e4m3 weights with a block shape.

use serde_json::Value;

use super::{ConfigError, field};

/// FP8 block quantisation of the checkpoint's linear weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fp8 {
    pub block: [usize; 2],
}

/// `quantization_config`: none, or FP8 e4m3 in blocks (128×128 unless it says otherwise).
pub(super) fn parse(value: Option<&Value>) -> Result<Option<Fp8>, ConfigError> {
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
