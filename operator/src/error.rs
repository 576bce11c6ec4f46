//! The operator's errors. A spec that cannot be realised is not one of them: that is a
//! `resolve::SpecError`, reported in the resource's status.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0} has no namespace")]
    NotNamespaced(String),
    /// Another replica holds the lease this one held: it must stop reconciling.
    #[error("lost lease {0} to another replica")]
    LostLease(String),
    /// The held lease could not be renewed before it expired.
    #[error("could not renew lease {lease} within {within:?}")]
    LeaseExpired { lease: String, within: Duration },
    #[error("the worker CA in Secret {secret}: {source}")]
    WorkerCa {
        secret: String,
        source: crate::worker_ca::CaError,
    },
}

impl Error {
    /// Stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "client",
            Error::NotNamespaced(_) => "not_namespaced",
            Error::LostLease(_) | Error::LeaseExpired { .. } => "lease",
            Error::WorkerCa { .. } => "worker_ca",
        }
    }
}
