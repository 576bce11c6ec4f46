//! The I/O of `run-local`: processes started, restarted with backoff and stopped; their logs
//! streamed with a `pool/group/rank` prefix; readiness probed over gRPC health; the
//! router's backends file rewritten as groups come and go; status printed on change.
//!
//! stdout carries run-local's own lines (lifecycle, status, endpoints), stderr the
//! processes' logs.

use std::io::IsTerminal;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use deepseek_proto::pod::env;
use deepseek_proto::serving::shutdown_signal;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::*;
use crate::api::DeepSeekDeployment;
use crate::autoscale::{self, RouterLoad, Sample};
use crate::autoscaler::scrape_metrics;

/// What `run-local` was asked to run.
pub struct Options {
    pub files: Vec<PathBuf>,
    /// Apply edits of the files while running.
    pub watch: bool,
    pub volumes: LocalVolumes,
    /// GPUs of this machine, handed to GPU pools' pods.
    pub gpus: u32,
    /// Where `deepseek-worker` and `deepseek-router` are; else beside this executable, else
    /// on `PATH`.
    pub bin_dir: Option<PathBuf>,
    /// Where to keep a Prometheus `file_sd_configs` list of every process's `/metrics`.
    pub prometheus_targets: Option<PathBuf>,
}

/// How often readiness is probed and the spec looked at.
const TICK: Duration = Duration::from_millis(250);
/// How long a retiring group stays up after leaving the backends file: the router reads the
/// file every second, so by then it sends nothing new there.
const LEAVE_DELAY: Duration = Duration::from_secs(2);

/// Runs the deployments until SIGINT or SIGTERM, then stops every process gracefully.
pub async fn run(options: Options) -> Result<(), LocalError> {
    remove_stale_run_dirs();
    let run_dir = std::env::temp_dir().join(format!("{RUN_DIR_PREFIX}{}", std::process::id()));
    std::fs::create_dir_all(&run_dir).map_err(LocalError::io(run_dir.display().to_string()))?;
    let mut shared = Shared {
        worker: find_program("deepseek-worker", options.bin_dir.as_deref())?,
        router: find_program("deepseek-router", options.bin_dir.as_deref())?,
        run_dir: run_dir.clone(),
        volumes: options.volumes,
        free_gpus: (0..options.gpus).collect(),
        plain_logs: !std::io::stderr().is_terminal(),
    };
    let targets = options.prometheus_targets.as_deref();
    let result = supervise(&options.files, options.watch, targets, &mut shared).await;
    let _ = std::fs::remove_dir_all(&run_dir);
    result
}

const RUN_DIR_PREFIX: &str = "deepseek-run-local-";

/// Run directories of earlier runs that were killed before they could clean up.
fn remove_stale_run_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix(RUN_DIR_PREFIX));
        if pid.is_some_and(|pid| !Path::new("/proc").join(pid).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

async fn supervise(
    files: &[PathBuf],
    watch: bool,
    targets_file: Option<&Path>,
    shared: &mut Shared,
) -> Result<(), LocalError> {
    let mut targets_written = prometheus_targets([]);
    if let Some(path) = targets_file {
        // A path that cannot be written is refused before anything starts.
        write_replacing(path, &targets_written)?;
    }
    let mut deployments = Vec::new();
    let several = files.len() > 1;
    let mut started = Ok(());
    for file in files {
        match Deployment::start(file, several, shared) {
            Ok(deployment)
                if deployments
                    .iter()
                    .any(|d: &Deployment| d.name == deployment.name) =>
            {
                started = Err(LocalError::Unsupported(format!(
                    "{}: metadata.name {:?} is already running from another file",
                    file.display(),
                    deployment.name
                )));
                break;
            }
            Ok(deployment) => deployments.push(deployment),
            Err(err) => {
                started = Err(err);
                break;
            }
        }
    }
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(TICK);
    while started.is_ok() {
        tokio::select! {
            () = &mut shutdown => break,
            _ = tick.tick() => {}
        }
        for deployment in &mut deployments {
            if watch {
                deployment.reload(shared);
            }
            if let Err(err) = deployment
                .autoscale()
                .await
                .and_then(|()| deployment.reconcile(shared))
            {
                if !deployment.announced {
                    // What cannot start at first is a mistake in the spec or the flags.
                    started = Err(err);
                    break;
                }
                deployment.warn_once(err.to_string());
            }
            deployment.report();
        }
        if let Some(path) = targets_file {
            let targets =
                prometheus_targets(deployments.iter().flat_map(Deployment::scrape_targets));
            if targets != targets_written {
                if let Err(err) = write_replacing(path, &targets) {
                    println!("{err}");
                }
                targets_written = targets;
            }
        }
    }
    println!("stopping");
    let all: Vec<Supervised> = deployments
        .into_iter()
        .flat_map(Deployment::into_processes)
        .collect();
    for process in &all {
        process.stop();
    }
    for process in all {
        let _ = process.task.await;
    }
    if let Some(path) = targets_file {
        // Prometheus drops the targets rather than report them down.
        let _ = write_replacing(path, &prometheus_targets([]));
    }
    println!("stopped");
    started
}

/// What every deployment shares: the programs, the run directory, the volumes, the GPUs.
struct Shared {
    worker: PathBuf,
    router: PathBuf,
    run_dir: PathBuf,
    volumes: LocalVolumes,
    free_gpus: Vec<u32>,
    /// No colours in the logs when they are not read on a terminal.
    plain_logs: bool,
}

fn find_program(name: &str, bin_dir: Option<&Path>) -> Result<PathBuf, LocalError> {
    let beside_self = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let candidates = match bin_dir {
        Some(dir) => vec![dir.to_path_buf()],
        None => beside_self.into_iter().chain(path_dirs).collect(),
    };
    candidates
        .iter()
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            LocalError::Unsupported(format!(
                "{name} is not beside this executable or on PATH (--bin-dir names its \
                 directory); build it with `cargo build -p deepseek-worker -p deepseek-router`"
            ))
        })
}

/// One deployment's file and processes.
struct Deployment {
    file: PathBuf,
    text: String,
    /// The spec running, with the autoscaler's `replicas`.
    dsd: DeepSeekDeployment,
    /// The load, a sample a second, as far back as the autoscaler's windows reach.
    load: Vec<Sample>,
    clock: Instant,
    name: String,
    /// Its processes' labels start with the deployment's name when several run.
    prefix: String,
    dir: PathBuf,
    desired: Desired,
    targets: Vec<PoolTarget>,
    router: Option<Supervised>,
    /// The router to start: at first once the backends file lists the groups (so that it
    /// finds them at once), after a change of its arguments once the old one has stopped.
    next_router: Option<Process>,
    router_ports: Vec<u16>,
    endpoints: Endpoints,
    groups: Vec<RunningGroup>,
    backends: String,
    status: String,
    announced: bool,
    last_warning: String,
}

struct RunningGroup {
    group: LocalGroup,
    pods: Vec<Supervised>,
    /// When it left the backends file; it stops `LEAVE_DELAY` later.
    leaving: Option<Instant>,
    stopping: bool,
}

impl RunningGroup {
    fn ready(&self) -> bool {
        self.pods.iter().all(Supervised::ready)
    }
}

impl Deployment {
    fn start(file: &Path, several: bool, shared: &mut Shared) -> Result<Self, LocalError> {
        let text =
            std::fs::read_to_string(file).map_err(LocalError::io(file.display().to_string()))?;
        let dsd = parse(file, &text)?;
        let (desired, targets) = desired_of(&dsd)?;
        let name = dsd.metadata.name.clone().unwrap_or_default();
        if dsd.spec.autoscaling.is_some() {
            println!("{name}: autoscaling on (spec.autoscaling)");
        }
        let dir = shared.run_dir.join(&name);
        std::fs::create_dir_all(&dir).map_err(LocalError::io(dir.display().to_string()))?;
        let backends_path = dir.join("backends");
        let mut router_ports = Vec::new();
        let (router, endpoints) =
            router_process(&desired, &shared.volumes, &backends_path, &mut || {
                let port = free_port()?;
                router_ports.push(port);
                Ok(port)
            })?;
        let prefix = if several {
            format!("{name}:")
        } else {
            String::new()
        };
        Ok(Deployment {
            file: file.to_path_buf(),
            text,
            dsd,
            load: Vec::new(),
            clock: Instant::now(),
            router: None,
            next_router: Some(router),
            name,
            prefix,
            dir,
            desired,
            targets,
            router_ports,
            endpoints,
            groups: Vec::new(),
            backends: String::new(),
            status: String::new(),
            announced: false,
            last_warning: String::new(),
        })
    }

    /// Applies an edit of the file, when there is one that parses; says why not otherwise.
    fn reload(&mut self, shared: &Shared) {
        let Ok(text) = std::fs::read_to_string(&self.file) else {
            return;
        };
        if text == self.text {
            return;
        }
        self.text = text;
        let parsed = parse(&self.file, &self.text).and_then(|mut dsd| {
            let name = dsd.metadata.name.clone().unwrap_or_default();
            if name != self.name {
                return Err(LocalError::Unsupported(format!(
                    "metadata.name: {name:?} is another deployment than {:?}; restart \
                     run-local to run it",
                    self.name
                )));
            }
            // The autoscaler keeps the count it chose.
            if dsd.spec.autoscaling.is_some() && self.dsd.spec.autoscaling.is_some() {
                dsd.spec.replicas = Some(self.groups_wanted());
            }
            let (desired, targets) = desired_of(&dsd)?;
            Ok((dsd, desired, targets))
        });
        let (dsd, desired, targets) = match parsed {
            Ok(parsed) => parsed,
            Err(err) => {
                println!(
                    "{}: {err}; still running the previous spec",
                    self.file.display()
                );
                return;
            }
        };
        println!("{}: changed; applying", self.file.display());
        let mut ports = self.router_ports.clone().into_iter();
        let router = router_process(
            &desired,
            &shared.volumes,
            &self.dir.join("backends"),
            &mut || {
                ports
                    .next()
                    .ok_or_else(|| LocalError::Unsupported("router ports".into()))
            },
        );
        match router {
            Ok((router, _)) if self.router.as_ref().is_some_and(|r| r.process != router) => {
                println!(
                    "{}router: its arguments changed; restarting it",
                    self.prefix
                );
                self.router.iter().for_each(Supervised::stop);
                self.next_router = Some(router);
            }
            Ok(_) => {}
            Err(err) => println!(
                "{}: {err}; the router keeps its arguments",
                self.file.display()
            ),
        }
        self.dsd = dsd;
        self.desired = desired;
        self.targets = targets;
    }

    /// Groups the pools want now.
    fn groups_wanted(&self) -> i32 {
        self.targets.iter().map(|t| t.pool.replicas).sum()
    }

    /// Once a second, with `spec.autoscaling`: samples the load on the router's `/metrics`
    /// (as the operator does in a cluster) and applies the autoscaler's decision as
    /// `spec.replicas`.
    async fn autoscale(&mut self) -> Result<(), LocalError> {
        let Some(spec) = self.dsd.spec.autoscaling.clone() else {
            return Ok(());
        };
        let Some(bounds) = autoscale::bounds(&self.dsd.spec.pools) else {
            return Ok(());
        };
        let now = self.clock.elapsed().as_secs_f64();
        if self.load.last().is_some_and(|s| now - s.at < 1.0) {
            return Ok(());
        }
        let page = if self.router.as_ref().is_some_and(Supervised::ready) {
            scrape_metrics(self.endpoints.metrics).await.ok()
        } else {
            None
        };
        let sample = page.map(|page| Sample::of(now, &[RouterLoad::parse(&page)]));
        autoscale::remember(&mut self.load, sample, &spec, now);
        let current = self.groups_wanted();
        let in_service = self.groups.iter().filter(|g| g.leaving.is_none());
        let starting =
            in_service.clone().any(|g| !g.ready()) || in_service.count() < current as usize;
        let decision = autoscale::decide(&spec, bounds, current, &self.load, now, starting);
        if decision.groups != current {
            println!(
                "{}: autoscaling {current} → {} groups: {}",
                self.name, decision.groups, decision.reason
            );
            self.dsd.spec.replicas = Some(decision.groups);
            (self.desired, self.targets) = desired_of(&self.dsd)?;
        }
        Ok(())
    }

    /// Moves the groups toward the targets (the rollout), writes the backends file.
    fn reconcile(&mut self, shared: &mut Shared) -> Result<(), LocalError> {
        // Groups of pools no longer in the spec leave.
        for group in &mut self.groups {
            if !self.targets.iter().any(|t| t.pool.name == group.group.pool)
                && group.leaving.is_none()
            {
                group.leaving = Some(Instant::now());
            }
        }
        let pools: Vec<PoolView> = self
            .targets
            .iter()
            .map(|target| PoolView {
                replicas: target.pool.replicas,
                revision: target.revision.clone(),
                groups: self
                    .groups
                    .iter()
                    .filter(|g| g.group.pool == target.pool.name)
                    .map(|g| GroupView {
                        index: g.group.index,
                        revision: g.group.revision.clone(),
                        ready: g.ready(),
                        leaving: g.leaving.is_some(),
                    })
                    .collect(),
            })
            .collect();
        let mut result = Ok(());
        for (pool, step) in rollout(&pools) {
            let target = self.targets[pool].clone();
            match step {
                Step::Start(index) => {
                    if let Err(err) = self.start_group(&target, index, shared) {
                        result = Err(err);
                    }
                }
                Step::Retire(index) => {
                    println!("{}{}/{index}: retiring", self.prefix, target.pool.name);
                    for group in &mut self.groups {
                        if group.group.pool == target.pool.name && group.group.index == index {
                            group.leaving.get_or_insert_with(Instant::now);
                        }
                    }
                }
            }
        }
        self.stop_leaving_groups(shared);
        let in_service: Vec<(&LocalGroup, Option<&str>)> = self
            .groups
            .iter()
            .filter(|g| g.leaving.is_none())
            .map(|g| {
                let gpu = self
                    .targets
                    .iter()
                    .find(|t| t.pool.name == g.group.pool)
                    .and_then(|t| t.pool.gpu_product.as_deref());
                (&g.group, gpu)
            })
            .collect();
        let backends = backends_file(&in_service);
        if backends != self.backends {
            write_replacing(&self.dir.join("backends"), &backends)?;
            self.backends = backends;
        }
        let router_stopped = self.router.as_ref().is_none_or(|r| r.task.is_finished());
        if let Some(router) = self.next_router.take_if(|_| router_stopped) {
            let started =
                Supervised::start(&shared.router, router, &self.prefix, shared.plain_logs);
            self.router = Some(started);
        }
        result
    }

    fn start_group(
        &mut self,
        target: &PoolTarget,
        index: i32,
        shared: &mut Shared,
    ) -> Result<(), LocalError> {
        let pool = &target.pool.name;
        let plan = plan_path(&self.dir, pool, &target.revision);
        if !plan.exists() {
            let json = plan_json(&self.desired, &self.name, pool).ok_or_else(|| {
                LocalError::Unsupported(format!("no placement plan for pool {pool}"))
            })?;
            std::fs::create_dir_all(plan.parent().expect("a plan file has a directory"))
                .and_then(|()| std::fs::write(&plan, json))
                .map_err(LocalError::io(plan.display().to_string()))?;
        }
        let mut host = Host {
            volumes: &shared.volumes,
            run_dir: &self.dir,
            ports: &mut free_port,
            free_gpus: &mut shared.free_gpus,
        };
        let group = worker_group(&self.desired, &self.name, target, index, &mut host)?;
        check_model_dir(&group)?;
        println!(
            "{}{pool}/{index}: starting revision {}",
            self.prefix, target.revision
        );
        let pods = group
            .pods
            .iter()
            .map(|pod| {
                Supervised::start(&shared.worker, pod.clone(), &self.prefix, shared.plain_logs)
            })
            .collect();
        self.groups.push(RunningGroup {
            group,
            pods,
            leaving: None,
            stopping: false,
        });
        self.groups
            .sort_by(|a, b| (&a.group.pool, a.group.index).cmp(&(&b.group.pool, b.group.index)));
        Ok(())
    }

    /// Groups out of the backends file for `LEAVE_DELAY` get SIGTERM; stopped ones go,
    /// giving their GPUs back.
    fn stop_leaving_groups(&mut self, shared: &mut Shared) {
        for group in &mut self.groups {
            if !group.stopping && group.leaving.is_some_and(|t| t.elapsed() >= LEAVE_DELAY) {
                group.stopping = true;
                group.pods.iter().for_each(Supervised::stop);
            }
        }
        self.groups.retain(|group| {
            let gone = group.stopping && group.pods.iter().all(|p| p.task.is_finished());
            if gone {
                println!(
                    "{}{}/{}: stopped",
                    self.prefix, group.group.pool, group.group.index
                );
                for pod in &group.group.pods {
                    shared.free_gpus.extend(&pod.gpus);
                }
            }
            !gone
        });
    }

    /// Prints the status when it changed, and the endpoints once every group is ready.
    fn report(&mut self) {
        let pools: Vec<PoolStatus> = self
            .targets
            .iter()
            .map(|t| {
                let serving = |current: bool| {
                    self.groups
                        .iter()
                        .filter(|g| g.group.pool == t.pool.name && g.leaving.is_none() && g.ready())
                        .filter(|g| (g.group.revision == t.revision) == current)
                        .count()
                };
                PoolStatus {
                    pool: t.pool.name.clone(),
                    ready: serving(true),
                    desired: t.pool.replicas,
                    ready_outdated: serving(false),
                }
            })
            .collect();
        let status = status_line(&self.name, &pools);
        if status != self.status {
            println!("{status}");
            self.status = status;
        }
        let all_ready = pools.iter().all(|p| p.ready as i32 == p.desired);
        if !self.announced && all_ready && self.router.as_ref().is_some_and(Supervised::ready) {
            self.announced = true;
            let Endpoints { grpc, http, .. } = self.endpoints;
            println!("{}: ready", self.name);
            println!("{}: grpc://{grpc} (deepseek.v1.Inference)", self.name);
            println!(
                "{}: http://{http} (OpenAI API at http://{http}/v1)",
                self.name
            );
        }
    }

    fn warn_once(&mut self, warning: String) {
        if warning != self.last_warning {
            println!("{}: {warning}", self.name);
            self.last_warning = warning;
        }
    }

    fn scrape_targets(&self) -> impl Iterator<Item = ScrapeTarget<'_>> {
        let router = self.router.iter().map(|router| ScrapeTarget {
            deployment: &self.name,
            pool: None,
            process: &router.process,
        });
        let workers = self.groups.iter().flat_map(|running| {
            running.pods.iter().map(|pod| ScrapeTarget {
                deployment: &self.name,
                pool: Some(&running.group.pool),
                process: &pod.process,
            })
        });
        router.chain(workers)
    }

    fn into_processes(self) -> impl Iterator<Item = Supervised> {
        self.router
            .into_iter()
            .chain(self.groups.into_iter().flat_map(|g| g.pods))
    }
}

/// The file's deployment, its desired objects and its pools' targets.
fn parse(file: &Path, text: &str) -> Result<DeepSeekDeployment, LocalError> {
    serde_yaml::from_str(text).map_err(|err| {
        LocalError::Unsupported(format!(
            "{} is not a DeepSeekDeployment: {err}",
            file.display()
        ))
    })
}

/// The deployment's desired objects and its pools' targets.
fn desired_of(dsd: &DeepSeekDeployment) -> Result<(Desired, Vec<PoolTarget>), LocalError> {
    let desired = dsd.desired()?;
    let targets = desired
        .pools
        .iter()
        .map(|(pool, revision)| PoolTarget {
            pool: pool.clone(),
            revision: revision.clone(),
        })
        .collect();
    Ok((desired, targets))
}

fn check_model_dir(group: &LocalGroup) -> Result<(), LocalError> {
    let model = group.pods[0]
        .env
        .iter()
        .find(|(name, _)| name == env::MODEL)
        .map(|(_, dir)| PathBuf::from(dir))
        .unwrap_or_default();
    if model.join("config.json").is_file() {
        return Ok(());
    }
    Err(LocalError::Unsupported(format!(
        "spec.model.source.pvc: {} has no config.json (map the claim with --pvc CLAIM=DIR)",
        model.display()
    )))
}

/// A port free now on the loopback, below the kernel's ephemeral range: outgoing
/// connections take their ports from that range, and a rank's planned port held by one (a
/// client's keep-alive connection) would keep its group from forming while it lives. Ports
/// are tried in turn from a place set by the process id, so two runs rarely meet.
fn free_port() -> Result<u16, LocalError> {
    static RANGE: OnceLock<Option<Range<u16>>> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let range = RANGE.get_or_init(|| {
        let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range");
        NEXT.store(std::process::id().wrapping_mul(7919), Ordering::Relaxed);
        listen_port_range(ephemeral.as_deref().unwrap_or(""))
    });
    if let Some(range) = range {
        let len = u32::from(range.end - range.start);
        for _ in 0..len {
            let port = range.start + (NEXT.fetch_add(1, Ordering::Relaxed) % len) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(LocalError::io("choosing a free port"))
}

/// Writes `path` whole: readers see the old file or the new one, never a half.
fn write_replacing(path: &Path, text: &str) -> Result<(), LocalError> {
    let next = path.with_extension("next");
    std::fs::write(&next, text)
        .and_then(|()| std::fs::rename(&next, path))
        .map_err(LocalError::io(path.display().to_string()))
}

/// A process restarted when it exits, until told to stop; its readiness probed meanwhile.
struct Supervised {
    process: Process,
    ready: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Supervised {
    fn start(program: &Path, process: Process, prefix: &str, plain_logs: bool) -> Self {
        let ready = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(keep_running(
            program.to_path_buf(),
            process.clone(),
            format!("{prefix}{}", process.label),
            plain_logs,
            ready.clone(),
            stopped,
        ));
        Supervised {
            process,
            ready,
            stop,
            task,
        }
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

async fn keep_running(
    program: PathBuf,
    process: Process,
    label: String,
    plain_logs: bool,
    ready: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    let probe = tokio::spawn(probe(process.grpc, ready.clone()));
    let mut failures = 0;
    while !*stop.borrow() {
        let started = Instant::now();
        let status = match spawn(&program, &process, &label, plain_logs) {
            Ok(mut child) => {
                println!(
                    "{label}: started (pid {}, grpc {})",
                    child.id().unwrap_or(0),
                    process.grpc
                );
                tokio::select! {
                    status = child.wait() => status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                    () = stopped(&mut stop) => {
                        terminate(&mut child, process.grace).await;
                        break;
                    }
                }
            }
            Err(err) => format!("could not start: {err}"),
        };
        ready.store(false, Ordering::Relaxed);
        failures = if started.elapsed() >= BACKOFF_RESET {
            1
        } else {
            failures + 1
        };
        let delay = restart_delay(failures);
        println!(
            "{label}: exited ({status}); restarting in {}s",
            delay.as_secs()
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(&mut stop) => break,
        }
    }
    probe.abort();
    ready.store(false, Ordering::Relaxed);
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

fn spawn(
    program: &Path,
    process: &Process,
    label: &str,
    plain_logs: bool,
) -> std::io::Result<Child> {
    let mut command = Command::new(program);
    command
        .args(&process.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group: a terminal's Ctrl-C reaches run-local only, which then stops
        // the processes in order.
        .process_group(0);
    // Only the pod's environment configures the worker, as in a pod.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("DSD_") {
            command.env_remove(name);
        }
    }
    if plain_logs {
        command.env("NO_COLOR", "1");
    }
    command.envs(process.env.iter().map(|(k, v)| (k, v)));
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec the closure makes two async-signal-safe calls only.
    // PDEATHSIG is tied to the forking thread: run-local runs on one thread for its life.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the line above: then nothing would kill us.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("run-local has exited"));
            }
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(stream_lines(out, label.to_string()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(stream_lines(err, label.to_string()));
    }
    Ok(child)
}

async fn stream_lines(from: impl AsyncRead + Unpin, label: String) {
    let mut lines = BufReader::new(from).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("{label} | {line}");
    }
}

/// SIGTERM, then SIGKILL once the grace period is over, as the kubelet does.
async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child's pid, which it keeps until we wait for it.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// Keeps `ready` equal to whether the process's gRPC health says SERVING.
async fn probe(addr: std::net::SocketAddr, ready: Arc<AtomicBool>) {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
        return;
    };
    let channel = endpoint
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1))
        .connect_lazy();
    let mut health = HealthClient::new(channel);
    loop {
        let serving = health
            .check(HealthCheckRequest::default())
            .await
            .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32);
        ready.store(serving, Ordering::Relaxed);
        tokio::time::sleep(TICK).await;
    }
}
