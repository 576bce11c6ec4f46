//! The DeepSeek worker: configuration, checkpoint loading, the model on candle, and the
//! rank's place in its expert-parallel group.

pub mod config;
pub mod ep;
pub mod generate;
pub mod gpu;
pub mod metrics;
pub mod model;
pub mod rank;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod tokenizer;
pub mod validate;
pub mod weights;
