//! The worker's gRPC front: `deepseek.v1.Inference`, `grpc.health.v1.Health` and server
//! reflection. Health answers SERVING for the service name `liveness` as soon as the process
//! listens, and for the whole server only once the weights are loaded.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use deepseek_proto::deadline::grpc_timeout;
use deepseek_proto::placement::PlacementPlan;
use deepseek_proto::serving::starting_health;
use deepseek_proto::tls::{self, Identity};
use deepseek_proto::v1::inference_server::{Inference, InferenceServer};
use deepseek_proto::v1::{
    DetokenizeRequest, DetokenizeResponse, GenerateRequest, GenerateResponse, GetLoadRequest,
    GetLoadResponse, ModelInfoRequest, ModelInfoResponse, TokenizeRequest, TokenizeResponse,
    tokenize_request,
};
use tokio_stream::Stream;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Code, Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_types::{ErrorDetails, StatusExt};

use crate::backend::{Backend, open_gpu};
use crate::bail;
use crate::config::{Config, Family};
use crate::ep::EpTransport;
use crate::ep::{
    TcpTransport, Transport, Wire, check_peers_answer, group_identity, listen_for_peers, open_rank,
};
use crate::error::{Context, Error, Result};
use crate::gpu::model::GpuModel;
use crate::gpu::nccl::NcclTransport;
use crate::gpu::runtime::Gpu;
use crate::gpu::{DeviceSpec, Dtype, resolve_dtype};
use crate::metrics::{Load, Metrics};
use crate::model::Model;
use crate::model::cache::BLOCK_TOKENS;
use crate::preflight::{self, RankLoad};
use crate::scheduler::{Scheduler, SchedulerConfig, Submission};
use crate::tokenizer::Tokenizer;
use crate::validate::{InvalidRequest, Limits, TOKENIZE_CHAT, chat_ids, check_token_ids, validate};

/// Everything `serve` was asked for.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub model_dir: PathBuf,
    /// A chat template to use instead of the model's (`--chat-template`'s text).
    pub chat_template: Option<String>,
    pub listen: SocketAddr,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Serve gRPC over (mutual, with a CA) TLS.
    pub tls: Option<Arc<Identity>>,
    /// Where gRPC health alone is served in plaintext, if anywhere (for probes).
    pub health_listen: Option<SocketAddr>,
    /// After the shutdown signal, how long open streams may run before they are ended.
    pub shutdown_grace: std::time::Duration,
    pub served_name: String,
    pub scheduler: SchedulerConfig,
    /// The first rank this process runs.
    pub rank: u32,
    /// Ranks this process runs, `rank` onwards: one per local GPU (`cuda:N` onwards), or
    /// several on the CPU; each serves requests of its own.
    pub ranks: u32,
    /// Local ranks on each GPU (`--ranks-per-gpu`).
    pub ranks_per_gpu: u32,
    pub group_size: u32,
    pub pool: String,
    /// Set for a rank of an expert-parallel group (group_size > 1).
    pub group: Option<GroupConfig>,
    pub device: DeviceSpec,
    /// On a GPU: the product it must be (`--gpu-product`).
    pub gpu_product: Option<String>,
    pub dtype: Dtype,
    /// Size the KV cache to this share of the device's memory once the weights are loaded
    /// (instead of `scheduler.kv_blocks`).
    pub kv_cache_fraction: Option<f64>,
}

impl ServeConfig {
    /// A GPU rank's share of its GPU's memory: `fraction` over the ranks on one GPU.
    fn gpu_rank_share(&self, fraction: f64) -> f64 {
        fraction / f64::from(self.ranks_per_gpu)
    }
}

/// How a rank joins its expert-parallel group.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    /// Every rank's expert-parallel address, in rank order.
    pub peers: Vec<String>,
    pub plan: PlacementPlan,
    pub wire: Wire,
    pub transport: EpTransport,
    /// How long to wait for the other ranks to come up.
    pub connect_timeout: std::time::Duration,
    /// How long a peer may be silent in the middle of a step before the group counts as failed.
    pub stall_timeout: std::time::Duration,
}

/// One rank this process runs: its part of the model and the scheduler that steps it.
struct LocalRank {
    model: Arc<dyn Backend>,
    scheduler: Scheduler,
}

/// What requests need once the model is loaded.
struct Loaded {
    ranks: Vec<LocalRank>,
    tokenizer: Option<Arc<Tokenizer>>,
    limits: Limits,
}

impl Loaded {
    /// The rank a new request goes to: the one with the fewest queued and running, the
    /// first of those on a tie.
    fn least_busy(&self) -> &LocalRank {
        self.ranks
            .iter()
            .min_by_key(|r| r.scheduler.load.busy())
            .expect("a process runs at least one rank")
    }

    fn loads(&self) -> impl Iterator<Item = &Load> {
        self.ranks.iter().map(|r| r.scheduler.load.as_ref())
    }
}

pub struct InferenceService {
    config: ServeConfig,
    loaded: Arc<OnceLock<Loaded>>,
    draining: Arc<AtomicBool>,
}

impl InferenceService {
    fn loaded(&self) -> Result<&Loaded, Status> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(Status::unavailable("the worker is shutting down"));
        }
        let loaded = self
            .loaded
            .get()
            .ok_or_else(|| Status::unavailable("the model is still loading"))?;
        if loaded.loads().any(|l| l.group_down.load(Ordering::Relaxed)) {
            return Err(Status::unavailable(
                "this rank's expert-parallel group is re-forming after a peer failed",
            ));
        }
        Ok(loaded)
    }

    fn tokenizer(&self) -> Result<&Tokenizer, Status> {
        self.loaded()?.tokenizer.as_deref().ok_or_else(|| {
            Status::invalid_argument("this model has no tokenizer.json, so it takes token ids only")
        })
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let loaded = self.loaded()?;
        let deadline = grpc_timeout(request.metadata()).map(|t| std::time::Instant::now() + t);
        let (trace, _, request) = request.into_parts();
        let valid = validate(request, loaded.tokenizer.as_deref(), &loaded.limits)
            .map_err(|e| invalid_argument(&e))?;
        let (respond, responses) = tokio::sync::mpsc::unbounded_channel();
        loaded.least_busy().scheduler.submit(Submission {
            request: valid,
            deadline,
            respond,
            trace,
        })?;
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            responses,
        ))))
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let tokenizer = self.tokenizer()?;
        let ids = match request.into_inner().input {
            Some(tokenize_request::Input::Text(text)) => tokenizer.encode(&text, true),
            Some(tokenize_request::Input::Chat(chat)) => {
                let (ids, _) =
                    chat_ids(tokenizer, chat, &TOKENIZE_CHAT).map_err(|e| invalid_argument(&e))?;
                Ok(ids)
            }
            None => {
                return Err(invalid_argument(&InvalidRequest {
                    field: "input",
                    message: "missing: set text or chat".into(),
                }));
            }
        }
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(TokenizeResponse { ids }))
    }

    async fn detokenize(
        &self,
        request: Request<DetokenizeRequest>,
    ) -> Result<Response<DetokenizeResponse>, Status> {
        let tokenizer = self.tokenizer()?;
        let ids = request.into_inner().ids;
        check_token_ids(&ids, self.loaded()?.limits.vocab_size)
            .map_err(Status::invalid_argument)?;
        let text = tokenizer
            .decode(&ids, true)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(DetokenizeResponse { text }))
    }

    async fn model_info(
        &self,
        _: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        let cfg = self.loaded()?.ranks[0].model.config();
        Ok(Response::new(ModelInfoResponse {
            served_name: self.config.served_name.clone(),
            architecture: match cfg.family {
                Family::V3 => "deepseek_v3",
                Family::V2 => "deepseek_v2",
            }
            .into(),
            context_length: cfg.max_position_embeddings as u32,
            vocab_size: cfg.vocab_size as u32,
            dtype: if cfg.fp8.is_some() { "fp8" } else { "bf16" }.into(),
            rank: self.config.rank,
            group_size: self.config.group_size,
            pool: self.config.pool.clone(),
        }))
    }

    async fn get_load(
        &self,
        _: Request<GetLoadRequest>,
    ) -> Result<Response<GetLoadResponse>, Status> {
        let load = Load::sum(self.loaded()?.loads());
        Ok(Response::new(GetLoadResponse {
            waiting_sequences: load.waiting.load(Ordering::Relaxed) as u32,
            running_sequences: load.running.load(Ordering::Relaxed) as u32,
            kv_blocks_used: load.kv_blocks_used.load(Ordering::Relaxed) as u32,
            kv_blocks_total: load.kv_blocks_total.load(Ordering::Relaxed) as u32,
            tokens_per_second: load.milli_tokens_per_second.load(Ordering::Relaxed) as f64 / 1000.0,
            kv_block_tokens: BLOCK_TOKENS as u32,
        }))
    }
}

/// Serves until `shutdown` completes. Listening starts at once; the model loads in the
/// background and health turns SERVING when it is ready.
pub async fn serve(
    config: ServeConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (health, health_service) = starting_health().await;
    health
        .set_not_serving::<InferenceServer<InferenceService>>()
        .await;

    let loaded: Arc<OnceLock<Loaded>> = Arc::new(OnceLock::new());
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = config.metrics_listen {
        serve_metrics(addr, metrics.clone(), loaded.clone()).await?;
    }
    let draining = Arc::new(AtomicBool::new(false));
    let drain = drain_then_stop(
        shutdown,
        draining.clone(),
        loaded.clone(),
        health.clone(),
        config.shutdown_grace,
    );
    let service = InferenceService {
        draining: draining.clone(),
        config: config.clone(),
        loaded: loaded.clone(),
    };
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(deepseek_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };

    let (tls_identity, health_listen) = (config.tls.clone(), config.health_listen);
    let load_health = health.clone();
    let stopping = draining.clone();
    // A model that cannot load ends the process, so that the pod restarts and says why.
    let (failed, load_failed) = tokio::sync::oneshot::channel::<Error>();
    tokio::spawn(async move {
        let result = tokio::task::spawn_blocking(move || load(&config, metrics)).await;
        match result {
            Ok(Ok(ready)) => {
                drop(failed);
                let loads = ready
                    .ranks
                    .iter()
                    .map(|r| r.scheduler.load.clone())
                    .collect();
                let _ = loaded.set(ready);
                tracing::info!("model loaded; serving");
                follow_group_health(loads, load_health, stopping).await;
            }
            Ok(Err(err)) => {
                let _ = failed.send(err);
            }
            Err(err) => {
                let _ = failed.send(Error::msg(format!("the loading task panicked: {err}")));
            }
        }
    });

    if let Some(addr) = health_listen {
        let probes = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--health-listen {addr}"))?;
        let health_only = tonic::transport::Server::builder()
            .add_service(health_service.clone())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(probes));
        tokio::spawn(health_only);
    }
    let routes = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        // v1alpha too: grpcurl and many clients still ask for it.
        .add_service(reflection().build_v1alpha()?)
        .add_service(InferenceServer::new(service));
    type Serving = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;
    let server: Serving = match &tls_identity {
        None => Box::pin(routes.serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            drain,
        )),
        Some(identity) => {
            tokio::spawn(identity.clone().follow());
            let incoming = tls::incoming(listener, identity.server_config(&[b"h2"]));
            Box::pin(routes.serve_with_incoming_shutdown(incoming, drain))
        }
    };
    tokio::select! {
        served = server => served?,
        Ok(err) = load_failed => return Err(err).context("loading the model"),
    }
    Ok(())
}

/// `/metrics` on `addr`: every local rank's load and experts, added up.
async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    loaded: Arc<OnceLock<Loaded>>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Message(format!("--metrics-listen {addr}: {e}")))?;
    let idle = Arc::new(Load::default());
    let render = Arc::new(move || match loaded.get() {
        Some(l) => {
            let experts: Vec<_> = l
                .ranks
                .iter()
                .map(|r| (r.model.expert_load(), r.model.expert_bytes_sent()))
                .collect();
            metrics.render(&Load::sum(l.loads()), &experts)
        }
        None => metrics.render(&idle, &[]),
    });
    tokio::spawn(async move {
        if let Err(err) = crate::metrics::serve(listener, render).await {
            tracing::error!(error = %err, "metrics server stopped");
        }
    });
    Ok(())
}

/// SERVING while this process's ranks can serve: always for a lone worker; for ranks of an
/// expert-parallel group, NOT_SERVING while the group is re-forming after a failure.
/// Stops once the worker is shutting down (which reports NOT_SERVING itself).
async fn follow_group_health(
    loads: Vec<Arc<Load>>,
    health: tonic_health::server::HealthReporter,
    stopping: Arc<AtomicBool>,
) {
    let mut serving = None;
    while !stopping.load(Ordering::Relaxed) {
        let now = !loads.iter().any(|l| l.group_down.load(Ordering::Relaxed));
        if serving != Some(now) {
            serving = Some(now);
            let status = if now {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
            health
                .set_service_status(
                    <InferenceServer<InferenceService> as tonic::server::NamedService>::NAME,
                    status,
                )
                .await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// On the shutdown signal: refuse new requests and report NOT_SERVING, let open streams (and
/// those of the group's other ranks) finish within the grace period, then end the rest with
/// UNAVAILABLE so the server can stop.
async fn drain_then_stop(
    shutdown: impl Future<Output = ()>,
    draining: Arc<AtomicBool>,
    loaded: Arc<OnceLock<Loaded>>,
    health: tonic_health::server::HealthReporter,
    grace: std::time::Duration,
) {
    shutdown.await;
    draining.store(true, Ordering::Relaxed);
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_not_serving::<InferenceServer<InferenceService>>()
        .await;
    let Some(loaded) = loaded.get() else { return };
    let busy = || loaded.loads().map(Load::busy).sum::<usize>();
    // Peers of an expert-parallel group step with this rank: leaving while they still run
    // requests would fail those too (in a rollout every rank of the group drains at once).
    let group_busy = || loaded.loads().any(|l| l.group_busy.load(Ordering::Relaxed));
    let until = tokio::time::Instant::now() + grace;
    while (busy() > 0 || group_busy()) && tokio::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // A scheduler is stepping while anything is open, and checks this every step.
    for load in loaded.loads() {
        load.abort.store(true, Ordering::Relaxed);
    }
    while busy() > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // The last statuses are queued on their streams now; give them a moment to be written
    // before the server closes connections (under load, a client could otherwise see the
    // connection close instead of UNAVAILABLE).
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

/// INVALID_ARGUMENT with the message for people and a `google.rpc.BadRequest` field
/// violation for programs: the router takes the field from there for the OpenAI error.
fn invalid_argument(invalid: &InvalidRequest) -> Status {
    let details = ErrorDetails::with_bad_request_violation(invalid.field, &invalid.message);
    Status::with_error_details(Code::InvalidArgument, invalid.to_string(), details)
}

/// Connects rank `rank` to its expert-parallel group, once its weights are loaded (on `gpu`,
/// for a GPU rank).
fn join_group(
    config: &ServeConfig,
    g: &GroupConfig,
    (rank, listener): (usize, TcpListener),
    gpu: Option<&Gpu>,
) -> Result<Arc<dyn Transport>> {
    let config_json = std::fs::read(config.model_dir.join("config.json"))?;
    let identity = group_identity(&config_json, &g.plan, g.wire);
    tracing::info!(rank, peers = ?g.peers, "weights loaded; joining the expert-parallel group");
    let tcp = TcpTransport::connect(
        listener,
        rank,
        &g.peers,
        identity,
        g.connect_timeout,
        g.stall_timeout,
        config.tls.as_ref(),
    )?;
    match (g.transport, gpu) {
        (EpTransport::Tcp, _) => Ok(Arc::new(tcp)),
        (EpTransport::Nccl, Some(gpu)) => {
            Ok(Arc::new(NcclTransport::connect(tcp, gpu.stream.clone())?))
        }
        (EpTransport::Nccl, None) => bail!("--ep-transport nccl needs --device cuda:N"),
    }
}

/// A model on its device, and the transport to its expert-parallel group when it is a rank.
type Opened = (Arc<dyn Backend>, Option<Arc<dyn Transport>>);

/// Local rank `local`'s model on its device (the `local`-th GPU from `--device`): the whole
/// model, or its rank's part of an expert-parallel group. A rank's preflight comes first:
/// its GPU (`preflight`), then its peers, which must answer before it loads anything.
fn open_model(config: &ServeConfig, local: u32) -> Result<Opened> {
    let dir = &config.model_dir;
    let rank = (config.rank + local) as usize;
    // Bound first, so that the peers' preflight finds this rank while it checks its GPU.
    let group = match &config.group {
        None => None,
        Some(g) => Some((g, listen_for_peers(&g.peers, rank)?)),
    };
    let gpu = match config.device {
        DeviceSpec::Cpu => None,
        DeviceSpec::Cuda(first) => {
            let gpu = open_gpu(first + (local / config.ranks_per_gpu) as usize)?;
            preflight(config, &gpu)?;
            Some(gpu)
        }
    };
    if let Some((g, _)) = &group {
        check_peers_answer(&g.peers, rank, g.connect_timeout)?;
    }
    match (gpu, group) {
        (None, None) => Ok((Arc::new(Model::open(dir)?), None)),
        (None, Some((g, listener))) => {
            let join = || join_group(config, g, (rank, listener), None);
            let (model, transport) = open_rank(dir, g.plan.clone(), rank, g.wire, join)?;
            Ok((Arc::new(model), Some(transport)))
        }
        (Some(gpu), None) => Ok((Arc::new(GpuModel::open(dir, gpu, config.dtype)?), None)),
        (Some(gpu), Some((g, listener))) => {
            let (model, transport) = GpuModel::open_rank(
                dir,
                gpu,
                config.dtype,
                (g.plan.clone(), rank, g.wire),
                |gpu| join_group(config, g, (rank, listener), Some(gpu)),
            )?;
            Ok((Arc::new(model), Some(transport)))
        }
    }
}

/// What a GPU rank checks before it loads (`preflight`): its GPU's product, and, when its
/// cache is sized by memory, that its part of the model fits what the GPU has free.
fn preflight(config: &ServeConfig, gpu: &Gpu) -> Result<()> {
    if let Some(product) = &config.gpu_product {
        preflight::check_product(&gpu.name, product)?;
    }
    let Some(memory_fraction) = config.kv_cache_fraction.map(|f| config.gpu_rank_share(f)) else {
        return Ok(());
    };
    let model = Config::from_file(&config.model_dir.join("config.json"))?;
    let plan = match &config.group {
        Some(g) => g.plan.clone(),
        None => PlacementPlan::round_robin(1, model.moe.n_routed_experts as u32, 0),
    };
    let fp8 = resolve_dtype(config.dtype, model.fp8.is_some()) == Dtype::Fp8;
    let (free, total) = gpu.stream.context().mem_get_info()?;
    let load = RankLoad {
        shape: model.shape(),
        plan: &plan,
        fp8,
        batch_tokens: config.scheduler.max_batch_tokens as u64,
        memory_fraction,
    };
    let plan = preflight::check_memory(&load, free as u64, total as u64)?;
    tracing::info!(gpu = %gpu.name, %plan, "this rank fits its GPU");
    Ok(())
}

/// Every local rank's model, opened side by side: the ranks of a group meet only once all
/// have loaded, this process's included.
fn open_models(config: &ServeConfig) -> Result<Vec<Opened>> {
    std::thread::scope(|scope| {
        let opening: Vec<_> = (0..config.ranks.max(1))
            .map(|local| scope.spawn(move || open_model(config, local)))
            .collect();
        opening
            .into_iter()
            .map(|rank| {
                rank.join()
                    .unwrap_or_else(|_| bail!("loading a rank panicked"))
            })
            .collect()
    })
}

/// The model's tokenizer, with the chat template `serve` was given, if any.
fn load_tokenizer(config: &ServeConfig) -> Result<Option<Tokenizer>> {
    let tokenizer = Tokenizer::from_dir(&config.model_dir)?;
    Ok(match (tokenizer, &config.chat_template) {
        (Some(tokenizer), Some(template)) => Some(tokenizer.with_chat_template(template.clone())),
        (None, Some(_)) => bail!(
            "--chat-template: {} has no tokenizer.json to use it with",
            config.model_dir.display()
        ),
        (tokenizer, None) => tokenizer,
    })
}

fn load(config: &ServeConfig, metrics: Arc<Metrics>) -> Result<Loaded> {
    let opened = open_models(config)?;
    let mut scheduler_config = config.scheduler.clone();
    if opened.len() > 1 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        scheduler_config.compute_threads = Some((cores / opened.len()).max(1));
    }
    if let Some(fraction) = config.kv_cache_fraction {
        // CPU ranks share the host's memory; GPU ranks have a device each, or a share of one.
        let share = match config.device {
            DeviceSpec::Cpu => fraction / opened.len() as f64,
            DeviceSpec::Cuda(_) => config.gpu_rank_share(fraction),
        };
        scheduler_config.kv_blocks = opened
            .iter()
            .map(|(model, _)| model.kv_blocks_within(share, scheduler_config.max_batch_tokens))
            .try_fold(usize::MAX, |least, blocks| {
                Ok::<_, Error>(least.min(blocks?))
            })?;
        tracing::info!(
            blocks = scheduler_config.kv_blocks,
            fraction,
            "KV cache of each rank sized from the memory left after loading"
        );
    }
    let tokenizer = load_tokenizer(config)?.map(Arc::new);
    let cfg = opened[0].0.config();
    let limits = Limits {
        vocab_size: cfg.vocab_size,
        context_length: cfg
            .max_position_embeddings
            .min(scheduler_config.kv_blocks * BLOCK_TOKENS),
        default_max_new_tokens: 1024,
        max_stop_strings: 16,
        max_stop_string_bytes: 256,
    };
    let ranks = opened
        .into_iter()
        .map(|(model, group)| {
            let scheduler = Scheduler::start(
                model.clone(),
                tokenizer.clone(),
                scheduler_config.clone(),
                metrics.clone(),
                group,
            )?;
            Ok(LocalRank { model, scheduler })
        })
        .collect::<Result<_>>()?;
    Ok(Loaded {
        ranks,
        tokenizer,
        limits,
    })
}
