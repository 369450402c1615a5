//! `kosmos-export`: lowers a KOSMOS-1 checkpoint (read through `kosmos-models`) to an ONNX package
//! as DESIGN §5 specifies — `vision.onnx`, `decoder.onnx` with `past_key_values.N.key|value` /
//! `present.N.key|value`, external weight data, `kosmos_rt.json`, `tokenizer.json`.
//!
//! Not written yet: this crate holds no lowering code, and exposes nothing that pretends to.
//! The exporter issue fills it.
