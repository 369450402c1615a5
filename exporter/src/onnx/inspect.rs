//! `kosmos-export inspect`: a stable text summary of an ONNX model — inputs and outputs with
//! shapes, operator histogram, initializer bytes, and the node list per layer scope. Also the form
//! the snapshot tests pin.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use prost::Message;

use super::proto::{ModelProto, TypeProto, ValueInfoProto, data_type, tensor_shape_proto, type_proto};
use crate::error::{ExportError, Result};

pub fn load_model(path: &Path) -> Result<ModelProto> {
    let bytes = std::fs::read(path).map_err(|e| ExportError::io(path, e))?;
    ModelProto::decode(bytes.as_slice()).map_err(|e| ExportError::BadModel {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn dtype_name(t: i32) -> String {
    match t {
        data_type::FLOAT => "float32".into(),
        data_type::FLOAT16 => "float16".into(),
        data_type::INT64 => "int64".into(),
        data_type::INT32 => "int32".into(),
        data_type::BOOL => "bool".into(),
        data_type::UINT8 => "uint8".into(),
        data_type::INT8 => "int8".into(),
        other => format!("dtype#{other}"),
    }
}

fn type_text(t: &Option<TypeProto>) -> String {
    match t.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(tt)) => {
            let dims: Vec<String> = tt
                .shape
                .as_ref()
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match &d.value {
                            Some(tensor_shape_proto::dimension::Value::DimValue(v)) => v.to_string(),
                            Some(tensor_shape_proto::dimension::Value::DimParam(p)) => p.clone(),
                            None => "?".into(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            format!("{} [{}]", dtype_name(tt.elem_type), dims.join(", "))
        }
        None => "?".into(),
    }
}

fn io_lines(out: &mut String, title: &str, vals: &[ValueInfoProto]) {
    let _ = writeln!(out, "{title} ({}):", vals.len());
    let width = vals.iter().map(|v| v.name.len()).max().unwrap_or(0);
    for v in vals {
        let _ = writeln!(out, "  {:width$}  {}", v.name, type_text(&v.r#type));
    }
}

/// The layer-level scope of a node name: `/decoder/layers.3/self_attn/q_proj/MatMul` →
/// `/decoder/layers.3`; names outside a numbered module keep their first two parts.
fn layer_scope(name: &str) -> String {
    let parts: Vec<&str> = name.trim_start_matches('/').split('/').collect();
    if parts.len() <= 1 {
        return "/".into();
    }
    let upto = parts
        .iter()
        .position(|p| p.contains('.') && p.rsplit('.').next().is_some_and(|n| n.parse::<u32>().is_ok()))
        .map_or(parts.len().min(2), |i| i + 1)
        .min(parts.len() - 1);
    format!("/{}", parts[..upto.max(1)].join("/"))
}

/// The summary text of `model`.
pub fn summary(model: &ModelProto) -> String {
    let mut out = String::new();
    let g = model.graph.clone().unwrap_or_default();
    let opsets: Vec<String> = model
        .opset_import
        .iter()
        .map(|o| {
            let d = if o.domain.is_empty() { "ai.onnx" } else { &o.domain };
            format!("{d} {}", o.version)
        })
        .collect();
    let _ = writeln!(out, "graph: {}", g.name);
    let _ = writeln!(out, "ir_version: {}", model.ir_version);
    let _ = writeln!(out, "opsets: {}", opsets.join(", "));
    for m in &model.metadata_props {
        let _ = writeln!(out, "metadata: {} = {}", m.key, m.value);
    }
    io_lines(&mut out, "inputs", &g.input);
    io_lines(&mut out, "outputs", &g.output);

    let mut by_type: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    let (mut external, mut inline) = (0u64, 0u64);
    for t in &g.initializer {
        let len = if t.data_location == super::proto::DATA_LOCATION_EXTERNAL {
            let l = t
                .external_data
                .iter()
                .find(|e| e.key == "length")
                .and_then(|e| e.value.parse().ok())
                .unwrap_or(0);
            external += l;
            l
        } else {
            inline += t.raw_data.len() as u64;
            t.raw_data.len() as u64
        };
        let e = by_type.entry(dtype_name(t.data_type)).or_default();
        e.0 += 1;
        e.1 += len;
    }
    let _ = writeln!(
        out,
        "initializers: {} tensors, {} bytes external, {} bytes inline",
        g.initializer.len(),
        external,
        inline
    );
    for (t, (n, bytes)) in &by_type {
        let _ = writeln!(out, "  {t:8} {n:5} tensors {bytes:>14} bytes");
    }

    let mut hist: BTreeMap<String, usize> = BTreeMap::new();
    for n in &g.node {
        let key = if n.domain.is_empty() {
            n.op_type.clone()
        } else {
            format!("{}.{}", n.domain, n.op_type)
        };
        *hist.entry(key).or_default() += 1;
    }
    let _ = writeln!(out, "nodes: {}", g.node.len());
    for (op, n) in &hist {
        let _ = writeln!(out, "  {op:32} {n:5}");
    }

    let _ = writeln!(out, "layers:");
    let mut scopes: Vec<(String, Vec<String>)> = Vec::new();
    for n in &g.node {
        let s = layer_scope(&n.name);
        match scopes.last_mut() {
            Some((last, ops)) if *last == s => ops.push(n.op_type.clone()),
            _ => scopes.push((s, vec![n.op_type.clone()])),
        }
    }
    for (s, ops) in scopes {
        let _ = writeln!(out, "  {s} ({}): {}", ops.len(), ops.join(" "));
    }
    // Model-local functions (the ai.kosmos op bodies of the trt profile), node by node.
    for f in &model.functions {
        let _ = writeln!(
            out,
            "function {}.{}({}) -> ({}) [{}]:",
            f.domain,
            f.name,
            f.input.join(", "),
            f.output.join(", "),
            f.attribute.join(", ")
        );
        for n in &f.node {
            let refs: Vec<String> = n
                .attribute
                .iter()
                .map(|a| {
                    if a.ref_attr_name.is_empty() {
                        a.name.clone()
                    } else {
                        format!("{}=@{}", a.name, a.ref_attr_name)
                    }
                })
                .collect();
            let _ = writeln!(
                out,
                "  {} = {}({}){}",
                n.output.join(", "),
                n.op_type,
                n.input.join(", "),
                if refs.is_empty() {
                    String::new()
                } else {
                    format!(" {{{}}}", refs.join(", "))
                }
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::layer_scope;

    #[test]
    fn scopes() {
        assert_eq!(
            layer_scope("/decoder/layers.3/self_attn/q_proj/MatMul"),
            "/decoder/layers.3"
        );
        assert_eq!(layer_scope("/decoder/positions/CumSum"), "/decoder/positions");
        assert_eq!(layer_scope("/Identity"), "/");
        assert_eq!(
            layer_scope("/vision/encoder/layers.0/mlp/fc1/MatMul"),
            "/vision/encoder/layers.0"
        );
        assert_eq!(
            layer_scope("/resampler/layers.1.0/to_q/MatMul"),
            "/resampler/layers.1.0"
        );
    }
}
