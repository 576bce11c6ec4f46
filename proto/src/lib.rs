//! Contracts between clients, the router, the workers and the operator: the `deepseek.v1`
//! gRPC services, their deadline header, the expert placement plan and the pod contract; and
//! what the router and the worker share as gRPC servers (`serving`, `tls`, `telemetry`).

pub mod codec;
pub mod deadline;
pub mod memory;
pub mod placement;
pub mod pod;
pub mod serving;
pub mod telemetry;
pub mod tls;

/// Generated `deepseek.v1` messages, client and server.
pub mod v1 {
    tonic::include_proto!("deepseek.v1");

    /// Encoded `FileDescriptorSet` of `deepseek.v1`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("deepseek_descriptor");
}
