//! `kosmos-rt`: loads a package written by `kosmos-export` and generates over ONNX Runtime
//! (`ort` with `load-dynamic`; `scripts/setup.sh` exposes `.deps/libonnxruntime.so` and
//! `.cargo/config.toml` sets `ORT_DYLIB_PATH` to it) with a preallocated KV cache.
//!
//! Not written yet: this crate holds no runtime code, and exposes nothing that pretends to.
//! The runtime and serving issues fill it.
