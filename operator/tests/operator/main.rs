//! The operator's integration tests: one binary, one module per concern.

mod cel;
mod controller;
mod crd;
mod desired;
mod fixtures;
mod images;
mod metrics;
mod model_cache;
mod pod_contract;
mod status;
mod worker_ca;
