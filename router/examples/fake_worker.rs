//! A worker stand-in that answers `Generate` at once (one token, then the finish message),
//! for measuring what the router itself costs (`bench/router/`).
//!
//!   cargo run --release -p deepseek-router --example fake_worker -- 127.0.0.1:50061

use std::pin::Pin;

use deepseek_proto::v1::inference_server::{Inference, InferenceServer};
use deepseek_proto::v1::{
    DetokenizeRequest, DetokenizeResponse, FinishReason, GenerateRequest, GenerateResponse,
    GetLoadRequest, GetLoadResponse, ModelInfoRequest, ModelInfoResponse, TokenizeRequest,
    TokenizeResponse,
};
use futures::Stream;
use tonic::{Request, Response, Status};

struct Instant;

type Messages = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for Instant {
    type GenerateStream = Messages;

    async fn generate(&self, _: Request<GenerateRequest>) -> Result<Response<Messages>, Status> {
        let messages = [
            GenerateResponse {
                token_ids: vec![1],
                text: "x".into(),
                ..Default::default()
            },
            GenerateResponse {
                finish_reason: FinishReason::Length as i32,
                ..Default::default()
            },
        ];
        Ok(Response::new(Box::pin(futures::stream::iter(
            messages.map(Ok),
        ))))
    }

    async fn tokenize(
        &self,
        _: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        Err(Status::unimplemented("fake worker"))
    }

    async fn detokenize(
        &self,
        _: Request<DetokenizeRequest>,
    ) -> Result<Response<DetokenizeResponse>, Status> {
        Err(Status::unimplemented("fake worker"))
    }

    async fn model_info(
        &self,
        _: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        Ok(Response::new(ModelInfoResponse {
            served_name: "fake".into(),
            ..Default::default()
        }))
    }

    async fn get_load(
        &self,
        _: Request<GetLoadRequest>,
    ) -> Result<Response<GetLoadResponse>, Status> {
        Ok(Response::new(GetLoadResponse::default()))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50061".into())
        .parse()?;
    let (_, health) = tonic_health::server::health_reporter();
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(InferenceServer::new(Instant))
        .serve(addr)
        .await?;
    Ok(())
}
