//! `lab serve`: the OpenAI-compatible multi-LoRA server.
//!
//! Data flow, as in text-generation-inference's router: [`routes`] parse HTTP,
//! [`validation`] turns it into a `ValidRequest` once, [`batcher`] (one thread that owns the
//! engine) runs continuous batching with the [`crate::engine::scheduler`] policy over the paged
//! KV cache and the adapter registry, and [`stream`] shapes the replies.

pub mod batcher;
pub mod catalog;
pub mod conn;
pub mod error;
pub mod metrics;
pub mod queue;
pub mod ratelimit;
pub mod resources;
pub mod routes;
pub mod stream;
pub mod tenant;
pub mod validation;

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};

use crate::engine::kv::paged::PagedKvCache;
use crate::engine::load::LoadedModel;
use crate::engine::lora::registry::{AdapterRegistry, RegistryConfig};
use crate::engine::lora::slots::SlotBank;
use crate::engine::lora::LoraAdapter;
use crate::engine::scheduler::{Scheduler, SchedulerConfig};

/// How long a failed adapter load stays the answer before a request reads the files again.
pub const RETRY_FAILED_LOAD: Duration = Duration::from_secs(5);

/// Resolved server settings (built once from the CLI).
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub host: String,
    pub port: u16,
    pub served_model_name: String,
    /// Adapters registered at start, `(name, dir)`.
    pub lora_modules: Vec<(String, PathBuf)>,
    /// Adapters found under `--lora-dir`: a bad one is skipped with a warning (one broken
    /// folder among many must not keep the server down), unlike `--lora-modules`.
    pub lora_dir_modules: Vec<(String, PathBuf)>,
    /// Roots runtime loads may read from (`--lora-dir` and `--allowed-lora-dirs`).
    pub allowed_roots: Vec<PathBuf>,
    pub runtime_updates: bool,
    pub max_loras: usize,
    pub max_cpu_loras: usize,
    pub max_lora_rank: usize,
    pub max_model_len: usize,
    pub scheduler: SchedulerConfig,
    pub kv_blocks: usize,
    pub block_size: usize,
    pub max_waiting: usize,
    /// `--max-waiting-per-model`, places per tenant (default: `max_waiting`, i.e. no share of
    /// its own).
    pub max_waiting_per_model: usize,
    /// `--tenant-rate-limit` (`None`: no rate limit).
    pub tenant_rate_limit: Option<ratelimit::RateLimit>,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub shutdown_timeout: Duration,
    /// Automatic prefix caching (`--no-enable-prefix-caching` turns it off).
    pub prefix_caching: bool,
    /// Decode CUDA graphs (`None`: `--enforce-eager`).
    pub graphs: Option<crate::engine::graph::GraphConfig>,
    /// Header and idle timeouts and the connection cap asked for (the cap is lowered below
    /// the fd limit at start-up).
    pub conn: conn::ConnLimits,
}

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("adapter {name} ({path}): {source}")]
    Adapter { name: String, path: PathBuf, source: crate::engine::lora::LoraError },
    #[error("cannot listen on {addr}: {source} (is the port in use? pick another with --port)")]
    Bind { addr: String, source: std::io::Error },
    #[error("allowed LoRA root: {0}")]
    Root(std::io::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "stopped with requests cut: --shutdown-timeout {0:?} expired before they finished (raise it to let them end)"
    )]
    ForcedShutdown(Duration),
}

/// Runs the server until SIGTERM / Ctrl-C; in-flight requests get `shutdown_timeout` to finish.
pub fn run(s: ServeSettings, loaded: LoadedModel, device: Device, dtype: DType) -> Result<(), ServeError> {
    let cfg = loaded.model.config().clone();
    let roots = Arc::new(catalog::AllowedRoots::new(&s.allowed_roots).map_err(ServeError::Root)?);
    // The same confinement at start-up as for every later read (see `AllowedRoots::confining`).
    let check = |path: &PathBuf| {
        LoraAdapter::load_within(path, roots.confining(path), &cfg, s.max_lora_rank, DType::F32, &Device::Cpu)
    };
    let mut modules = Vec::with_capacity(s.lora_modules.len() + s.lora_dir_modules.len());
    for (name, path) in &s.lora_modules {
        check(path).map_err(|source| ServeError::Adapter { name: name.clone(), path: path.clone(), source })?;
        modules.push((name.clone(), path.clone()));
    }
    for (name, path) in &s.lora_dir_modules {
        // Under the root's canonical path, so its reads are confined to the roots even when
        // the folder itself is (or turns into) a symlink.
        let path = &match (path.parent().map(std::path::Path::canonicalize), path.file_name()) {
            (Some(Ok(root)), Some(leaf)) => root.join(leaf),
            _ => path.clone(),
        };
        match check(path) {
            Ok(_) if !modules.iter().any(|(n, _)| n == name) => modules.push((name.clone(), path.clone())),
            Ok(_) => eprintln!("lab serve: skipping {} in --lora-dir: the name {name} is taken", path.display()),
            Err(e) => eprintln!("lab serve: skipping {} in --lora-dir: {e}", path.display()),
        }
    }
    let catalog = Arc::new(catalog::Catalog::new(s.served_model_name.clone()));
    let metrics = Arc::new(metrics::Metrics::new(&s.served_model_name, s.kv_blocks, s.max_loras));
    let tokenizer = Arc::new(loaded.tokenizer);
    let bank = SlotBank::new(&cfg, s.max_loras, s.max_lora_rank, dtype, &device)?;
    let (lcfg, rank, lroots) = (cfg.clone(), s.max_lora_rank, roots.clone());
    // The host tier holds adapters in host memory (run dtype); a copy-in uploads into a slot.
    // Every read (the first, and each after an eviction or a failed load) opens the files
    // again and checks where they really are.
    let loader = Box::new(move |p: &std::path::Path| {
        LoraAdapter::load_within(p, lroots.confining(p), &lcfg, rank, dtype, &Device::Cpu)
    });
    let mut registry = AdapterRegistry::new(
        RegistryConfig {
            max_loras: s.max_loras,
            max_cpu_loras: s.max_cpu_loras,
            retry_failed_after: RETRY_FAILED_LOAD,
        },
        bank,
        loader,
    );
    for (name, path) in &modules {
        registry.register(name, path);
        catalog.insert(name, path);
    }
    let mut kv =
        PagedKvCache::new(&cfg, s.kv_blocks, s.block_size, dtype, &device)?.with_prefix_caching(s.prefix_caching);
    // Before the port opens (so /health never reports a server that would stall its first
    // request on kernel compilation).
    if device.is_cuda() {
        let took = crate::engine::warmup::warm_up(&loaded.model, &mut kv)?;
        eprintln!("lab serve: warmed up in {:.1} s (kernel JIT, cuBLAS)", took.as_secs_f64());
    }
    let engine = batcher::Engine {
        model: loaded.model,
        tokenizer: tokenizer.clone(),
        kv,
        registry,
        scheduler: Scheduler::new(s.scheduler),
        metrics: metrics.clone(),
        catalog: catalog.clone(),
        max_model_len: s.max_model_len,
        base_name: s.served_model_name.clone(),
        graphs: s.graphs,
    };
    let limits = queue::WaitLimits { total: s.max_waiting, per_tenant: s.max_waiting_per_model };
    let (handle, engine_thread) = batcher::spawn(engine, limits, s.tenant_rate_limit)?;
    let state = Arc::new(routes::AppState {
        validator: validation::Validator { tokenizer, catalog: catalog.clone(), max_model_len: s.max_model_len },
        engine: handle,
        catalog,
        metrics,
        roots,
        runtime_updates: s.runtime_updates,
        api_key: s.api_key.clone(),
        model_cfg: cfg,
        max_lora_rank: s.max_lora_rank,
        seq: AtomicU64::new(0),
        prep: Arc::new(tokio::sync::Semaphore::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2))),
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let served = rt.block_on(serve_http(&s, state));
    // Connection tasks (and their handles to the engine) go first; the engine thread then sees
    // every handle gone and returns, dropping the model, KV pool and adapter slots while the
    // CUDA context is still alive. Leaving it running into process exit segfaulted on the
    // H200 (device memory freed during the driver's teardown).
    drop(rt);
    if engine_thread.join().is_err() {
        eprintln!("lab serve: the engine thread panicked during shutdown");
    }
    served
}

async fn serve_http(s: &ServeSettings, state: Arc<routes::AppState>) -> Result<(), ServeError> {
    let addr = format!("{}:{}", s.host, s.port);
    let listener =
        tokio::net::TcpListener::bind(&addr).await.map_err(|source| ServeError::Bind { addr: addr.clone(), source })?;
    let local = listener.local_addr()?;
    // Tests and scripts read this line to find the port (with --port 0).
    eprintln!("lab serve: listening on http://{local} (model {})", s.served_model_name);
    let engine = state.engine.clone();
    let app = routes::router(state, s.max_body_bytes);
    let mut limits = s.conn;
    // Many systems start processes at a soft limit of 1,024 descriptors with a far higher hard
    // limit; past the soft one every accept fails, /health included.
    let fd_limit = conn::raise_fd_limit().unwrap_or(1024);
    limits.max_connections = conn::connection_cap(limits.max_connections, fd_limit);
    if limits.max_connections < s.conn.max_connections {
        eprintln!(
            "lab serve: --max-connections {} lowered to {} to stay below the file-descriptor limit ({fd_limit})",
            s.conn.max_connections, limits.max_connections
        );
    }
    let timeout = s.shutdown_timeout;
    let forced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forced_flag = forced.clone();
    let shutdown = async move {
        shutdown_signal().await;
        eprintln!("lab serve: shutting down: no new connections; in-flight requests get {timeout:?}");
        // In-flight requests get the timeout; after it the process exits regardless.
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            eprintln!("lab serve: shutdown timeout reached, cancelling what is left");
            // Cut streams end with an error event and [DONE], not silence; then a non-zero
            // exit says the shutdown was not clean.
            let reason = format!("the server is shutting down: --shutdown-timeout {timeout:?} expired");
            forced_flag.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = tokio::time::timeout(Duration::from_secs(2), engine.abort_all(&reason)).await;
            tokio::time::sleep(Duration::from_secs(2)).await; // the streams end, serve returns
            std::process::exit(1); // only if a connection still hangs on
        });
    };
    conn::serve(listener, app, limits, shutdown).await;
    if forced.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ServeError::ForcedShutdown(timeout));
    }
    eprintln!("lab serve: stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
