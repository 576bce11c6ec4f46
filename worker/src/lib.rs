//! The DeepSeek worker: configuration, checkpoint loading, the model on candle, and the
//! rank's place in its expert-parallel group.

pub mod backend;
pub mod config;
pub mod download;
pub mod ep;
pub mod error;
pub mod generate;
pub mod gpu;
pub mod metrics;
pub mod model;
pub mod preflight;
pub mod rank;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod tokenizer;
pub mod tools;
pub mod validate;
pub mod weights;

/// FNV-1a over the parts in order: a stable hash (across builds and machines) for identities
/// and cache keys.
pub fn fnv1a<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parts.into_iter().flatten() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}
