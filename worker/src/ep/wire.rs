//! The bytes of a dispatch or combine message.

use super::GroupError;
use crate::error::Result;
use crate::model::moe::Routing;

/// How activations cross the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Wire {
    /// Exact: an expert-parallel group computes what one process would, up to the order of
    /// summation.
    F32,
    /// Half the bytes; rounds each activation to bf16 (what DeepEP sends).
    Bf16,
}

impl Wire {
    pub(super) fn put(self, out: &mut Vec<u8>, values: &[f32]) {
        match self {
            Wire::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Wire::Bf16 => values.iter().for_each(|v| {
                out.extend_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes())
            }),
        }
    }

    pub(super) fn get(self, bytes: &mut &[u8], n: usize) -> Result<Vec<f32>> {
        let width = match self {
            Wire::F32 => 4,
            Wire::Bf16 => 2,
        };
        let (data, rest) = bytes.split_at_checked(n * width).ok_or_else(truncated)?;
        *bytes = rest;
        Ok(match self {
            Wire::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Wire::Bf16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
        })
    }
}

/// A message shorter than it says: the group can no longer be trusted to agree.
fn truncated() -> GroupError {
    GroupError("a truncated expert-parallel message".into())
}

pub(super) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(super) fn get_u32(bytes: &mut &[u8]) -> Result<u32> {
    let (head, rest) = bytes.split_at_checked(4).ok_or_else(truncated)?;
    *bytes = rest;
    Ok(u32::from_le_bytes([head[0], head[1], head[2], head[3]]))
}

/// One token sent to a rank: its row and the experts (with gate weights) it wants there.
pub(super) struct Dispatched {
    pub(super) experts: Vec<usize>,
    pub(super) weights: Vec<f32>,
}

/// `[tokens u32] ([experts u32] ([expert u32] [weight f32])*)* [activations]`
pub(super) fn encode_dispatch(
    wire: Wire,
    tokens: &[(usize, Dispatched)],
    rows: &[f32],
    hidden: usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    put_u32(&mut out, tokens.len() as u32);
    for (_, d) in tokens {
        put_u32(&mut out, d.experts.len() as u32);
        for (&e, &w) in d.experts.iter().zip(&d.weights) {
            put_u32(&mut out, e as u32);
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
    for &(t, _) in tokens {
        wire.put(&mut out, &rows[t * hidden..][..hidden]);
    }
    out
}

pub(super) fn decode_dispatch(
    wire: Wire,
    mut bytes: &[u8],
    hidden: usize,
) -> Result<(Vec<f32>, Routing)> {
    let bytes = &mut bytes;
    let tokens = get_u32(bytes)? as usize;
    let mut routing = Routing {
        experts: Vec::with_capacity(tokens),
        weights: Vec::with_capacity(tokens),
    };
    for _ in 0..tokens {
        let k = get_u32(bytes)? as usize;
        let (mut experts, mut weights) = (Vec::with_capacity(k), Vec::with_capacity(k));
        for _ in 0..k {
            experts.push(get_u32(bytes)? as usize);
            weights.push(f32::from_bits(get_u32(bytes)?));
        }
        routing.experts.push(experts);
        routing.weights.push(weights);
    }
    Ok((wire.get(bytes, tokens * hidden)?, routing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_messages_round_trip() {
        let rows: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let tokens = vec![(
            1,
            Dispatched {
                experts: vec![3, 7],
                weights: vec![0.25, 0.75],
            },
        )];
        for wire in [Wire::F32, Wire::Bf16] {
            let bytes = encode_dispatch(wire, &tokens, &rows, 3);
            let (xs, routing) = decode_dispatch(wire, &bytes, 3).unwrap();
            assert_eq!(xs, [1.5, 2.0, 2.5]);
            assert_eq!(routing.experts, [vec![3, 7]]);
            assert_eq!(routing.weights, [vec![0.25, 0.75]]);
            assert!(decode_dispatch(wire, &bytes[..bytes.len() - 1], 3).is_err());
        }
    }
}
