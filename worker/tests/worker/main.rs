//! The worker's integration tests: one binary, one module per concern.

mod cli;
mod ep;
mod grpc;
mod parity;
mod tokenizer;
