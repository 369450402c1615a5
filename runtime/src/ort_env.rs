//! Loading ONNX Runtime (`load-dynamic`) and creating sessions on a chosen execution provider.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::ep::ExecutionProvider;
use ort::session::Session;

use crate::error::{Result, RtError};

/// Where the ONNX Runtime shared library is: `ORT_DYLIB_PATH`, else the set-up's
/// `.deps/libonnxruntime.so` relative to the binary (`target/<profile>/`), else the system's.
pub fn ort_dylib_path() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        for up in ["../../.deps", "../../../.deps"] {
            let p = exe
                .parent()
                .unwrap_or(Path::new("."))
                .join(up)
                .join("libonnxruntime.so");
            if p.exists() {
                return p;
            }
        }
    }
    PathBuf::from("libonnxruntime.so")
}

static ENV: Mutex<Option<ort::environment::Environment>> = Mutex::new(None);
static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment (the library is loaded once; the environment is
/// created again after [`shutdown`]).
pub fn environment() -> Result<ort::environment::Environment> {
    let mut env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = env.as_ref() {
        return Ok(e.clone());
    }
    LOADED
        .get_or_init(|| {
            let path = ort_dylib_path();
            ort::init_from(&path).map(|_| ()).map_err(|e| {
                format!(
                    "cannot load ONNX Runtime from {}: {e} (set ORT_DYLIB_PATH)",
                    path.display()
                )
            })
        })
        .clone()
        .map_err(RtError::Ort)?;
    let e = ort::init()
        .with_name("kosmos")
        .build()
        .map_err(|e| RtError::Ort(e.to_string()))?;
    *env = Some(e.clone());
    Ok(e)
}

/// Release this library's reference to the ONNX Runtime environment; ONNX Runtime tears it down
/// (joining its threads) once the last session is gone too. Call before the process exits, after
/// every model is freed, as ONNX Runtime GenAI's `OgaShutdown` asks.
pub fn shutdown() {
    ENV.lock().unwrap_or_else(|p| p.into_inner()).take();
}

/// Where sessions run.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
    /// ORT's TensorRT execution provider, with its engine cache in the given directory.
    TensorRt {
        engine_cache: PathBuf,
    },
}

impl Device {
    pub fn name(&self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::TensorRt { .. } => "tensorrt",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct SessionOptions {
    pub device: Device,
    /// Run on the CPU when the device's provider is missing, instead of failing.
    pub allow_fallback: bool,
    /// Intra-op threads (0: ONNX Runtime's default).
    pub threads: usize,
    /// Leave the fused `ai.kosmos` kernels (`kosmos_plugins`) unregistered, so ONNX Runtime
    /// inlines the ops' function bodies instead (a check that both agree).
    pub without_custom_ops: bool,
    /// Let the intra-op threads sleep as soon as a call ends instead of spinning for more work
    /// (ONNX Runtime's `session.intra_op.allow_spinning` 0). Spinning saves a wake-up when calls
    /// follow each other on one session; with a draft model, the two packages' calls alternate
    /// and each one's spinning threads take the cores from the other's call.
    pub without_spinning: bool,
}

/// Check that the loaded ONNX Runtime has the provider `opts.device` needs.
pub fn check_provider(opts: &SessionOptions) -> Result<bool> {
    environment()?;
    let (name, available) = match &opts.device {
        Device::Cpu => return Ok(true),
        Device::Cuda => (ort::ep::CUDA::NAME, ort::ep::CUDA::is_available()?),
        Device::TensorRt { .. } => (ort::ep::TensorRT::NAME, ort::ep::TensorRT::is_available()?),
    };
    if available {
        return Ok(true);
    }
    if opts.allow_fallback {
        tracing::warn!(
            provider = name,
            "not available: running on the CPU (--allow-fallback)"
        );
        return Ok(false);
    }
    Err(RtError::Provider(
        name.to_string(),
        format!(
            "{} has only {}; install an ONNX Runtime build with {name}, or pass --allow-fallback",
            ort_dylib_path().display(),
            available_providers().join(", ")
        ),
    ))
}

fn available_providers() -> Vec<String> {
    let mut v = vec!["CPUExecutionProvider".to_string()];
    if ort::ep::CUDA::is_available().unwrap_or(false) {
        v.push(ort::ep::CUDA::NAME.into());
    }
    if ort::ep::TensorRT::is_available().unwrap_or(false) {
        v.push(ort::ep::TensorRT::NAME.into());
    }
    v
}

/// A session for the ONNX file `path`.
pub fn session(path: &Path, opts: &SessionOptions) -> Result<Session> {
    // ONNX Runtime adds a custom op domain to ONNX's process-wide schema registry when a session
    // with it is created, and two sessions created at once race on that ("domain is already
    // exist"): sessions are created one at a time.
    static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = CREATING.lock().unwrap_or_else(|e| e.into_inner());
    let env = environment()?;
    let use_device = check_provider(opts)?;
    let err = |e: ort::Error| RtError::Package {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut b = Session::builder(&env).map_err(err)?;
    if opts.threads > 0 {
        b = b.with_intra_threads(opts.threads).map_err(|e| err(e.into()))?;
    }
    if opts.without_spinning {
        b = b.with_intra_op_spinning(false).map_err(|e| err(e.into()))?;
    }
    // Per-node timings as ONNX Runtime's JSON trace (chrome://tracing), for performance work.
    if let Some(prefix) = std::env::var_os("KOSMOS_ORT_PROFILE") {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file = format!("{}{stem}", prefix.to_string_lossy());
        b = b.with_profiling(&file).map_err(|e| err(e.into()))?;
    }
    if !opts.without_custom_ops {
        // Harmless for graphs without ai.kosmos nodes; for `trt` packages it replaces the
        // function bodies with the fused kernels.
        let domain = kosmos_plugins::ort_ops::operator_domain().map_err(err)?;
        b = b.with_operators(domain).map_err(|e| err(e.into()))?;
    }
    if use_device {
        let ep = match &opts.device {
            Device::Cpu => None,
            Device::Cuda => Some(ort::ep::CUDA::default().build().error_on_failure()),
            Device::TensorRt { engine_cache } => {
                let mut trt = ort::ep::TensorRT::default()
                    .with_engine_cache(true)
                    .with_engine_cache_path(engine_cache.display());
                // The ai.kosmos plugins, so TensorRT takes the trt profile's custom nodes.
                if let Some(lib) = std::env::var_os(kosmos_plugins::TRT_PLUGIN_LIBRARY_ENV)
                    .map(std::path::PathBuf::from)
                    .filter(|p| p.is_file())
                {
                    trt = trt.with_extra_plugin_lib_paths(lib.display());
                } else {
                    tracing::warn!(
                        "{} is not set to the ai.kosmos TensorRT plugin library; trt-profile \
                         nodes run through their ONNX function bodies",
                        kosmos_plugins::TRT_PLUGIN_LIBRARY_ENV
                    );
                }
                Some(trt.build().error_on_failure())
            }
        };
        if let Some(ep) = ep {
            b = b.with_execution_providers([ep]).map_err(|e| err(e.into()))?;
        }
    }
    let session = b.commit_from_file(path).map_err(err)?;
    let on_gpu = use_device && !matches!(opts.device, Device::Cpu);
    let cpu_ops = cpu_only_ops(&session);
    if on_gpu && !cpu_ops.is_empty() {
        tracing::warn!(
            "{}: it calls ai.kosmos::{cpu_ops}, CPU kernels, so ONNX Runtime runs them on the CPU \
             beside {:?}; export without --packed-linears / --cached-attention for GPU serving",
            path.display(),
            opts.device
        );
    }
    Ok(session)
}

/// The CPU-only `ai.kosmos` ops this graph calls, as its metadata lists them (empty if none).
fn cpu_only_ops(session: &Session) -> String {
    session
        .metadata()
        .ok()
        .and_then(|m| m.custom(kosmos_plugins::CPU_OPS_METADATA_KEY))
        .unwrap_or_default()
}
