//! `kosmos-rt serve`: an OpenAI-compatible HTTP server (tokio + axum) in front of the
//! continuous-batching [`Engine`], which runs on its own thread.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /v1/models/{id}`, vLLM's `POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info`,
//! `GET /health`, `GET /metrics` (Prometheus). Safety: bounded queue
//! (429 + `Retry-After`), body / image / pixel limits, context checked before queueing,
//! per-request timeout, disconnects cancel, SIGTERM drains, `--api-key` on everything but
//! `/health`, no image URLs but `data:` unless `--allow-file-root`. [`batch_job`] runs OpenAI
//! Batch API files through the same router without a socket.

pub mod batch_job;
pub(crate) mod body;
pub mod error;
pub mod images;
mod logprobs;
mod openai;
mod responses;
mod sagemaker;
mod structured;
mod tokenize;
mod tools;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kosmos_models::KosmosTokenizer;
use kosmos_models::package::PackageManifest;

use crate::chat::ChatTemplate;

use crate::batch::{Engine, EngineConfig, SeqRequest};
use crate::error::{Result, RtError};
use crate::metrics::Metrics;
use crate::package::Package;
use error::ApiError;
use images::ImagePolicy;

/// Everything `kosmos-rt serve` can be told.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    /// Required as `Authorization: Bearer <key>` on every endpoint but `/health`.
    pub api_key: Option<String>,
    /// The model id clients name (default: the package directory's name).
    pub model_name: Option<String>,
    pub max_batch: usize,
    /// Sequences waiting for a row before requests get 429.
    pub max_queue: usize,
    pub max_body_bytes: usize,
    pub max_image_bytes: usize,
    pub max_image_side: u32,
    pub max_images: usize,
    /// Largest `n` (and prompts × n for completions).
    pub max_n: usize,
    /// max_tokens when a request gives none (bounded by the context left).
    pub default_max_tokens: usize,
    /// From arrival to the last token; `None`: no limit (`kosmos-rt batch`, where requests wait
    /// for rows by design).
    pub request_timeout: Option<Duration>,
    pub allow_file_root: Option<PathBuf>,
    /// Fetch `http(s)://` image URLs (see [`images::RemoteImages`]); `None` refuses them.
    pub remote_images: Option<RemoteImagesConfig>,
    pub vision_cache: usize,
    /// Most prompt tokens one prefill call writes (see [`EngineConfig::prefill_chunk`]).
    pub prefill_chunk: usize,
    /// See [`EngineConfig::kv_preallocate`].
    pub kv_preallocate: bool,
    /// See [`EngineConfig::prefix_cache_bytes`].
    pub prefix_cache_bytes: usize,
    /// See [`EngineConfig::priority_preemption`].
    pub priority_preemption: bool,
}

/// `http(s)://` image URLs: from these hosts only (exact names; empty: any), each download
/// within `timeout`.
#[derive(Clone, Debug)]
pub struct RemoteImagesConfig {
    pub allowed_domains: Vec<String>,
    pub timeout: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            model_name: None,
            max_batch: 8,
            max_queue: 256,
            max_body_bytes: 32 << 20,
            max_image_bytes: 16 << 20,
            max_image_side: 4096,
            max_images: 8,
            max_n: 8,
            default_max_tokens: 256,
            request_timeout: Some(Duration::from_secs(600)),
            allow_file_root: None,
            remote_images: None,
            vision_cache: 256,
            prefill_chunk: EngineConfig::default().prefill_chunk,
            kv_preallocate: EngineConfig::default().kv_preallocate,
            prefix_cache_bytes: EngineConfig::default().prefix_cache_bytes,
            priority_preemption: EngineConfig::default().priority_preemption,
        }
    }
}

pub struct AppState {
    cfg: ServeConfig,
    model_name: String,
    manifest: PackageManifest,
    tokenizer: KosmosTokenizer,
    chat: ChatTemplate,
    images: ImagePolicy,
    engine: std::sync::Mutex<Sender<Vec<SeqRequest>>>,
    metrics: Arc<Metrics>,
    started: u64,
}

/// The handlers' state with the engine running behind it on its own thread.
struct Running {
    state: Arc<AppState>,
    engine_thread: std::thread::JoinHandle<()>,
}

impl Running {
    /// Wait for the engine to finish its work; every other holder of the state (the router)
    /// must be gone, since the state's sender keeps the engine's loop alive.
    fn stop(self) {
        drop(self.state);
        let _ = self.engine_thread.join();
    }
}

/// Serve `pkg` until SIGTERM or Ctrl-C, then finish the requests in flight. `on_ready` gets the
/// bound address (port 0 picks a free one).
pub async fn serve(pkg: Package, cfg: ServeConfig, on_ready: impl FnOnce(SocketAddr)) -> Result<()> {
    let running = start(pkg, cfg.clone())?;
    let app = router(running.state.clone());
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| RtError::Input(format!("cannot listen on {addr}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| RtError::Input(format!("cannot read the bound address: {e}")))?;
    tracing::info!(
        "serving '{}' on http://{local} (max batch {}, queue {})",
        running.state.model_name,
        cfg.max_batch,
        cfg.max_queue
    );
    on_ready(local);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| RtError::Input(format!("server error: {e}")))?;
    tracing::info!("drained; stopping the engine");
    running.stop();
    Ok(())
}

/// Build the handlers' state and start the engine thread.
fn start(pkg: Package, cfg: ServeConfig) -> Result<Running> {
    let model_name = cfg.model_name.clone().unwrap_or_else(|| {
        pkg.dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "kosmos".into())
    });
    let chat = ChatTemplate::new(&pkg.manifest, &pkg.dir, &pkg.tokenizer)?;
    let file_root = match &cfg.allow_file_root {
        Some(root) => Some(
            root.canonicalize()
                .map_err(|e| RtError::Input(format!("--allow-file-root {}: {e}", root.display())))?,
        ),
        None => None,
    };
    let metrics = Arc::new(Metrics::default());
    let manifest = pkg.manifest.clone();
    let tokenizer = pkg.tokenizer.clone();
    let engine = Engine::new(
        pkg,
        EngineConfig {
            max_batch: cfg.max_batch,
            vision_cache: cfg.vision_cache,
            prefill_chunk: cfg.prefill_chunk,
            kv_preallocate: cfg.kv_preallocate,
            prefix_cache_bytes: cfg.prefix_cache_bytes,
            priority_preemption: cfg.priority_preemption,
        },
        metrics.clone(),
    )?;
    let (tx, rx) = std::sync::mpsc::channel();
    let engine_thread = std::thread::Builder::new()
        .name("kosmos-engine".into())
        .spawn(move || engine.run(rx))
        .map_err(|e| RtError::Input(format!("cannot start the engine thread: {e}")))?;

    let state = Arc::new(AppState {
        images: ImagePolicy {
            max_bytes: cfg.max_image_bytes,
            max_side: cfg.max_image_side,
            file_root,
            remote: cfg
                .remote_images
                .as_ref()
                .map(|r| images::RemoteImages::new(r.allowed_domains.clone(), r.timeout)),
        },
        cfg: cfg.clone(),
        model_name,
        manifest,
        tokenizer,
        chat,
        engine: std::sync::Mutex::new(tx),
        metrics,
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    Ok(Running { state, engine_thread })
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/tokenizer_info", get(tokenize::tokenizer_info))
        .route("/health", get(health))
        .route("/ping", get(sagemaker::ping).post(sagemaker::ping))
        .route("/invocations", post(sagemaker::invocations))
        .route("/version", get(sagemaker::version))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        // The handlers enforce --max-body-bytes themselves (see `body::read_body`).
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn health() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        st.metrics.render(),
    )
        .into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no route for {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError {
        status: 405,
        ..ApiError::not_found(format!("{} is not allowed on {}", req.method(), req.uri().path()))
    }
}

/// Bearer-token check (constant time) on every endpoint but the liveness probes (`/health`,
/// SageMaker's `/ping`), which platforms call without credentials.
async fn authorize(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(key) = &st.cfg.api_key else {
        return next.run(req).await;
    };
    if matches!(req.uri().path(), "/health" | "/ping") {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::unauthorized("Incorrect API key provided").into_response(),
        None => ApiError::unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'")
            .into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Count responses by endpoint (the route, so unknown paths share one label) and status.
async fn count(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "other".into());
    let resp = next.run(req).await;
    st.metrics.request(&endpoint, resp.status().as_u16());
    resp
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
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested; finishing requests in flight");
}
