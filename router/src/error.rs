//! What can go wrong starting or running the router. Requests fail in their own terms
//! instead: gRPC statuses, and OpenAI error bodies (`openai::ApiError`).

/// The router's errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `--backend` value (or a backends-file line) that does not parse; says why.
    #[error("{0}")]
    BackendSpec(String),
    /// The API keys file; says which line and why.
    #[error("API keys: {0}")]
    ApiKeys(String),
    /// A backend address a gRPC channel cannot be made for.
    #[error("addr={addr}: {source}")]
    BackendAddr {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
}
