//! `kosmos-plugins`: the custom ops of domain `ai.kosmos` (DESIGN §6) — xPos and sub-LN — each
//! with a written spec, an ONNX FunctionProto body of standard ops, a fused ONNX Runtime CPU
//! kernel, and (under `plugins/tensorrt/`) a TensorRT IPluginV3 with CUDA kernels.
//!
//! Not written yet: this crate holds no op code, and exposes nothing that pretends to.
//! The plugins issue fills it.
