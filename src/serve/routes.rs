//! HTTP handlers: parse, validate once, hand the request to the engine, shape the reply.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use candle_core::{DType, Device};

use super::batcher::EngineHandle;
use super::catalog::{AllowedRoots, Catalog};
use super::error::ApiError;
use super::metrics::Metrics;
use super::stream;
use super::validation::{unix_now, Validator};
use crate::engine::lora::LoraAdapter;
use crate::engine::LlamaConfig;
use crate::openai::{
    ChatCompletionRequest, CompletionRequest, LoadLoraAdapterRequest, ModelCard, ModelList, UnloadLoraAdapterRequest,
};

/// What every handler shares.
pub struct AppState {
    pub validator: Validator,
    pub engine: EngineHandle,
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<Metrics>,
    pub roots: Arc<AllowedRoots>,
    /// `--enable-lora-runtime-updates`.
    pub runtime_updates: bool,
    pub api_key: Option<String>,
    /// Model config and rank limit, to validate adapters before registering them.
    pub model_cfg: LlamaConfig,
    pub max_lora_rank: usize,
    pub seq: AtomicU64,
    /// Permits for rendering + tokenizing prompts on the blocking pool (one per core): a
    /// flood of big prompts queues here instead of occupying the async workers.
    pub prep: Arc<tokio::sync::Semaphore>,
}

/// 200 while the engine thread runs; 503 once it died (orchestrators restart on that, and the
/// process exits non-zero right after).
async fn health(State(st): State<Arc<AppState>>) -> StatusCode {
    if st.metrics.update(|m| m.engine_alive) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// The router: `/v1/*` behind the API key (when set), `/health` and `/metrics` open.
pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::Body { status: 404, message: "no such route".into() } })
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if given.and_then(|v| v.strip_prefix("Bearer ")) != Some(key.as_str()) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// Body parse errors: serde's data errors are 400 in the OpenAI API (axum says 422).
fn parsed<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    match body {
        Ok(Json(v)) => Ok(v),
        Err(r) if r.status() == StatusCode::UNPROCESSABLE_ENTITY => {
            Err(ApiError::BadRequest { message: r.body_text(), param: None })
        }
        Err(r) => Err(r.into()),
    }
}

impl AppState {
    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs `f` (template rendering and tokenization: a 4 MB prompt takes about a second) on
    /// the blocking pool, at most one per permit, so `/health`, `/metrics` and small requests
    /// keep their async workers during a flood. The permit moves into the task: a client that
    /// leaves frees its handler, not the CPU its tokenization still uses.
    async fn validate(
        self: &Arc<Self>,
        f: impl FnOnce(&Validator) -> Result<super::validation::ValidRequest, ApiError> + Send + 'static,
    ) -> Result<super::validation::ValidRequest, ApiError> {
        let permit =
            self.prep.clone().acquire_owned().await.map_err(|_| ApiError::Unavailable("shutting down".into()))?;
        let st = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f(&st.validator)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("request validation failed: {e}")))?
    }

    async fn run(&self, req: super::validation::ValidRequest) -> Result<Response, ApiError> {
        let rx = self.engine.submit(req.clone())?;
        if req.stream {
            Ok(stream::sse(&req, rx).into_response())
        } else {
            Ok(Json(stream::collect(&req, rx).await?).into_response())
        }
    }
}

async fn chat(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<ChatCompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let arrived = std::time::Instant::now();
    let tenant = super::tenant::from_header(&headers)?;
    let req = parsed(body)?;
    let seq = st.next_seq();
    let mut valid = st.validate(move |v| v.chat(&req, seq, tenant)).await?;
    // Latency counts from arrival, including the wait for a tokenization permit.
    valid.arrived = arrived;
    st.run(valid).await
}

async fn completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let arrived = std::time::Instant::now();
    let tenant = super::tenant::from_header(&headers)?;
    let req = parsed(body)?;
    let seq = st.next_seq();
    let mut valid = st.validate(move |v| v.completion(&req, seq, tenant)).await?;
    // Latency counts from arrival, including the wait for a tokenization permit.
    valid.arrived = arrived;
    st.run(valid).await
}

async fn models(State(st): State<Arc<AppState>>) -> Json<ModelList> {
    let base = st.catalog.base_name().to_string();
    let mut data = vec![ModelCard {
        id: base.clone(),
        object: "model".into(),
        created: unix_now(),
        owned_by: "lab".into(),
        root: Some(base.clone()),
        parent: None,
        max_model_len: Some(st.validator.max_model_len),
    }];
    // An adapter whose last load failed is not offered (requests to it get a 400 saying why).
    for (name, e) in st.catalog.adapters().into_iter().filter(|(_, e)| e.failed.is_none()) {
        data.push(ModelCard {
            id: name,
            object: "model".into(),
            created: e.created,
            owned_by: "lab".into(),
            root: Some(e.path.display().to_string()),
            parent: Some(base.clone()),
            max_model_len: None,
        });
    }
    Json(ModelList { object: "list".into(), data })
}

fn runtime_updates_on(st: &AppState) -> Result<(), ApiError> {
    if st.runtime_updates {
        Ok(())
    } else {
        Err(ApiError::BadRequest {
            message: "runtime LoRA updates are off: start the server with --enable-lora-runtime-updates".into(),
            param: None,
        })
    }
}

async fn load_adapter(
    State(st): State<Arc<AppState>>,
    body: Result<Json<LoadLoraAdapterRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    runtime_updates_on(&st)?;
    let req = parsed(body)?;
    let name = req.lora_name.trim().to_string();
    if let Some(why) = super::catalog::invalid_adapter_name(&name) {
        return Err(ApiError::bad("lora_name", why));
    }
    if name == st.catalog.base_name() {
        return Err(ApiError::bad("lora_name", format!("`{name}` is the base model's name")));
    }
    if st.catalog.contains(&name) && !req.load_inplace {
        return Err(ApiError::bad(
            "lora_name",
            format!("The lora adapter '{name}' has already been loaded. (send \"load_inplace\": true to replace it)"),
        ));
    }
    let path = st.roots.check(&req.lora_path)?;
    // Parse and check it now, so a bad adapter is a 400 here rather than failed requests later.
    let (cfg, rank, p, roots) = (st.model_cfg.clone(), st.max_lora_rank, path.clone(), st.roots.clone());
    tokio::task::spawn_blocking(move || {
        LoraAdapter::load_within(&p, roots.confining(&p), &cfg, rank, DType::F32, &Device::Cpu)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| ApiError::bad("lora_path", e.to_string()))?;
    st.engine.register(&name, path.clone()).await?;
    st.catalog.insert(&name, &path);
    tracing::info!(adapter = %name, path = %path.display(), "adapter loaded");
    Ok(format!("Success: LoRA adapter '{name}' added successfully.").into_response())
}

async fn unload_adapter(
    State(st): State<Arc<AppState>>,
    body: Result<Json<UnloadLoraAdapterRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    runtime_updates_on(&st)?;
    let req = parsed(body)?;
    if !st.catalog.remove(&req.lora_name) {
        return Err(ApiError::ModelNotFound(req.lora_name));
    }
    st.engine.unregister(&req.lora_name).await?;
    tracing::info!(adapter = %req.lora_name, "adapter unloaded");
    Ok(format!("Success: LoRA adapter '{}' removed successfully.", req.lora_name).into_response())
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.metrics.render()).into_response()
}
