//! The worker's integration tests: one binary, one module per concern.

mod cli;
mod download;
mod ep;
mod group;
mod grpc;
mod parity;
mod tokenizer;
