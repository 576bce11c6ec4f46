//! The deepseek-operator: the `DeepSeekDeployment` API, the pure builders that turn it into
//! Kubernetes objects, status computation, and the controller that applies them.

pub mod api;
pub mod autoscale;
pub mod autoscaler;
pub mod controller;
pub mod desired;
pub mod error;
pub mod gpu;
pub mod leader;
pub mod local;
pub mod metrics;
pub mod model_cache;
pub mod names;
pub mod resolve;
pub mod status;
pub mod worker_ca;
