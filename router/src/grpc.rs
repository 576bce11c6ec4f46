//! The gRPC front: the same `deepseek.v1.Inference` service the workers serve, so a client
//! cannot tell the router from a worker.

use std::sync::Arc;

use deepseek_proto::deadline::grpc_timeout;
use deepseek_proto::v1::inference_client::InferenceClient;
use deepseek_proto::v1::inference_server::Inference;
use deepseek_proto::v1::{
    DetokenizeRequest, DetokenizeResponse, GenerateRequest, GetLoadRequest, GetLoadResponse,
    ModelInfoRequest, ModelInfoResponse, TokenizeRequest, TokenizeResponse,
};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::auth::{ApiKeys, Caller, Key};
use crate::proxy::{ResponseStream, Router};

pub struct Front {
    pub router: Arc<Router>,
    pub keys: Arc<ApiKeys>,
}

impl Front {
    /// The API key the call carries (`None` when no keys are configured).
    fn authorize<T>(&self, request: &Request<T>) -> Result<Option<Arc<Key>>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match self.keys.authorize(header) {
            Some(Caller::Anyone) => Ok(None),
            Some(Caller::Key(key)) => Ok(Some(key)),
            None => Err(Status::unauthenticated(
                "missing or unknown API key (metadata `authorization: Bearer KEY`)",
            )),
        }
    }
}

impl Front {
    /// A unary call passed to a backend (failing over like `Generate`).
    async fn forward<Q, A, F, Fut>(
        &self,
        request: Request<Q>,
        call: F,
    ) -> Result<Response<A>, Status>
    where
        Q: Clone,
        F: Fn(InferenceClient<Channel>, Q) -> Fut,
        Fut: Future<Output = Result<Response<A>, Status>>,
    {
        self.authorize(&request)?;
        let request = request.into_inner();
        let reply = self.router.unary(|c| call(c, request.clone())).await?;
        Ok(Response::new(reply))
    }
}

#[tonic::async_trait]
impl Inference for Front {
    type GenerateStream = ResponseStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<ResponseStream>, Status> {
        let key = self.authorize(&request)?;
        if let Some(key) = &key {
            key.admit().map_err(|wait| {
                Status::resource_exhausted(format!(
                    "API key {} is over its rate limit; retry in {} s",
                    key.name(),
                    wait.as_secs() + 1
                ))
            })?;
        }
        let timeout = grpc_timeout(request.metadata());
        let (trace, _, request) = request.into_parts();
        let stream = self.router.generate(request, timeout, key, &trace).await?;
        Ok(Response::new(stream))
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        self.forward(request, |mut c, r| async move { c.tokenize(r).await })
            .await
    }

    async fn detokenize(
        &self,
        request: Request<DetokenizeRequest>,
    ) -> Result<Response<DetokenizeResponse>, Status> {
        self.forward(request, |mut c, r| async move { c.detokenize(r).await })
            .await
    }

    async fn model_info(
        &self,
        request: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        self.forward(request, |mut c, r| async move { c.model_info(r).await })
            .await
    }

    async fn get_load(
        &self,
        request: Request<GetLoadRequest>,
    ) -> Result<Response<GetLoadResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(self.router.load().await))
    }
}
