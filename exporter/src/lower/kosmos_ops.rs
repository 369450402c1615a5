//! The `ai.kosmos` ops (specs in `kosmos_plugins`) as ONNX: model-local `FunctionProto`
//! bodies of standard opset-17 ops (so ONNX Runtime and TensorRT's parser inline them where no
//! kernel or plugin is registered), and the nodes that call them.
//!
//! The bodies form their tables in float32 exactly as the trainer does (θ = 1/theta^(i/half),
//! ζ = (2i + 0.4d)/(1.4d), cos/sin and ζ^e multiplied before use) and are typed float32: the
//! `trt` profile is float32, TensorRT picks precisions when it builds an engine.

use kosmos_plugins::packed_linear::PANEL;
use kosmos_plugins::{
    DOMAIN, DOMAIN_VERSION, PLUGIN_NAMESPACE, PLUGIN_NAMESPACE_ATTR, PLUGIN_VERSION, PLUGIN_VERSION_ATTR,
    cached, packed, subln, xpos,
};

use crate::onnx::builder::{Attr, DType};
use crate::onnx::proto::{
    AttributeProto, FunctionProto, NodeProto, OperatorSetIdProto, attribute_type, data_type,
};

/// xPos's rotary base (θ_i = 1/10000^(i/half)), fixed by torchscale.
pub const XPOS_THETA: f32 = 10000.0;

/// The opset the bodies use.
pub const BODY_OPSET: i64 = 17;

/// Attributes of an `XPos` node.
#[derive(Clone, Copy, Debug)]
pub struct XposNodeAttrs {
    pub theta: f32,
    pub scale_base: f32,
    pub centre: f32,
    pub downscale: bool,
}

fn attr_f(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::FLOAT,
        f: Some(v),
        ..Default::default()
    }
}

fn attr_i(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INT,
        i: Some(v),
        ..Default::default()
    }
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INTS,
        ints: v.to_vec(),
        ..Default::default()
    }
}

/// An attribute that takes the calling node's attribute `from`.
fn attr_ref(name: &str, from: &str, ty: i32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: ty,
        ref_attr_name: from.into(),
        ..Default::default()
    }
}

/// A function body under construction: nodes with generated value names.
struct Body {
    nodes: Vec<NodeProto>,
    next: usize,
}

impl Body {
    fn new() -> Self {
        Body {
            nodes: Vec::new(),
            next: 0,
        }
    }

    fn op_to(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, out: &str) -> String {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.to_string()],
            name: format!("{op}_{}", self.nodes.len()),
            op_type: op.into(),
            attribute: attrs,
            ..Default::default()
        });
        out.to_string()
    }

    fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = format!("t{}", self.next);
        self.next += 1;
        self.op_to(op, inputs, attrs, &out)
    }

    fn float(&mut self, v: f32) -> String {
        self.op("Constant", &[], vec![attr_f("value_float", v)])
    }

    fn int(&mut self, v: i64) -> String {
        self.op("Constant", &[], vec![attr_i("value_int", v)])
    }

    fn ints(&mut self, v: &[i64]) -> String {
        self.op("Constant", &[], vec![attr_ints("value_ints", v)])
    }

    fn float_attr(&mut self, attr: &str) -> String {
        self.op(
            "Constant",
            &[],
            vec![attr_ref("value_float", attr, attribute_type::FLOAT)],
        )
    }

    fn int_attr(&mut self, attr: &str) -> String {
        self.op(
            "Constant",
            &[],
            vec![attr_ref("value_int", attr, attribute_type::INT)],
        )
    }

    fn cast(&mut self, x: &str, to: i32) -> String {
        self.op("Cast", &[x], vec![attr_i("to", to as i64)])
    }

    fn finish(
        self,
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: &[&str],
        doc: &str,
    ) -> FunctionProto {
        FunctionProto {
            name: name.into(),
            domain: DOMAIN.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attributes.iter().map(|s| s.to_string()).collect(),
            node: self.nodes,
            doc_string: doc.into(),
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: BODY_OPSET,
            }],
        }
    }
}

/// `ai.kosmos::XPos(X, positions) -> Y`.
pub fn xpos_function() -> FunctionProto {
    let mut b = Body::new();
    let shape = b.op("Shape", &["X"], vec![]);
    let three = b.int(3);
    let d = b.op("Gather", &[&shape, &three], vec![]);
    let two = b.int(2);
    let half = b.op("Div", &[&d, &two], vec![]);
    let (zero, one) = (b.int(0), b.int(1));
    let i = b.op("Range", &[&zero, &half, &one], vec![]);
    let i_f = b.cast(&i, data_type::FLOAT);
    let half_f = b.cast(&half, data_type::FLOAT);
    let d_f = b.cast(&d, data_type::FLOAT);
    // θ_i = 1 / theta^(i/half)
    let theta = b.float_attr(xpos::THETA);
    let ratio = b.op("Div", &[&i_f, &half_f], vec![]);
    let p = b.op("Pow", &[&theta, &ratio], vec![]);
    let inv_freq = b.op("Reciprocal", &[&p], vec![]);
    // ζ_i = (2i + 0.4d) / (1.4d)
    let (c2, c04, c14) = (b.float(2.0), b.float(0.4), b.float(1.4));
    let i2 = b.op("Mul", &[&i_f, &c2], vec![]);
    let lo = b.op("Mul", &[&d_f, &c04], vec![]);
    let hi = b.op("Mul", &[&d_f, &c14], vec![]);
    let num = b.op("Add", &[&i2, &lo], vec![]);
    let zeta = b.op("Div", &[&num, &hi], vec![]);
    // Per token: angles t·θ [b, s, half] and the scale ζ^((t−c)/base), inverted for keys.
    let pos_f = b.cast("positions", data_type::FLOAT);
    let last = b.ints(&[-1]);
    let pos_f = b.op("Unsqueeze", &[&pos_f, &last], vec![]);
    let angles = b.op("Mul", &[&pos_f, &inv_freq], vec![]);
    let centre = b.float_attr(xpos::CENTRE);
    let base = b.float_attr(xpos::SCALE_BASE);
    let off = b.op("Sub", &[&pos_f, &centre], vec![]);
    let expo = b.op("Div", &[&off, &base], vec![]);
    let up = b.op("Pow", &[&zeta, &expo], vec![]);
    let down = b.op("Reciprocal", &[&up], vec![]);
    let ds = b.int_attr(xpos::DOWNSCALE);
    let ds = b.cast(&ds, data_type::BOOL);
    let scale = b.op("Where", &[&ds, &down, &up], vec![]);
    let cos = b.op("Cos", &[&angles], vec![]);
    let sin = b.op("Sin", &[&angles], vec![]);
    let cs = b.op("Mul", &[&cos, &scale], vec![]);
    let sn = b.op("Mul", &[&sin, &scale], vec![]);
    // Interleave each table to [b, 1, s, d]: (c0, c0, c1, c1, ...).
    let pair_shape = b.ints(&[0, 0, -1]);
    let head_axis = b.ints(&[1]);
    let interleave = |b: &mut Body, t: &str| {
        let u = b.op("Unsqueeze", &[t, &last], vec![]);
        let two = b.op("Concat", &[&u, &u], vec![attr_i("axis", -1)]);
        let flat = b.op("Reshape", &[&two, &pair_shape], vec![]);
        b.op("Unsqueeze", &[&flat, &head_axis], vec![])
    };
    let cs4 = interleave(&mut b, &cs);
    let sn4 = interleave(&mut b, &sn);
    // rotate_every_two(X): (x0, x1, ...) → (−x1, x0, ...).
    let pairs_shape = b.ints(&[0, 0, 0, -1, 2]);
    let pairs = b.op("Reshape", &["X", &pairs_shape], vec![]);
    b.nodes.push(NodeProto {
        input: vec![pairs.clone()],
        output: vec!["x_even".into(), "x_odd".into()],
        name: "Split_pairs".into(),
        op_type: "Split".into(),
        attribute: vec![attr_i("axis", -1)],
        ..Default::default()
    });
    let neg = b.op("Neg", &["x_odd"], vec![]);
    let rot = b.op("Concat", &[&neg, "x_even"], vec![attr_i("axis", -1)]);
    let rot = b.op("Reshape", &[&rot, &shape], vec![]);
    let a = b.op("Mul", &["X", &cs4], vec![]);
    let r = b.op("Mul", &[&rot, &sn4], vec![]);
    b.op_to("Add", &[&a, &r], vec![], "Y");
    b.finish(
        xpos::OP,
        &["X", "positions"],
        &["Y"],
        &[
            xpos::THETA,
            xpos::SCALE_BASE,
            xpos::CENTRE,
            xpos::DOWNSCALE,
            PLUGIN_NAMESPACE_ATTR,
            PLUGIN_VERSION_ATTR,
        ],
        "xPos rotary embedding with per-position scale (kosmos_plugins crate docs)",
    )
}

/// `ai.kosmos::SubLnGelu(X, gamma, beta) -> Y`.
pub fn subln_gelu_function() -> FunctionProto {
    let mut b = Body::new();
    let sqrt2 = b.float(std::f32::consts::SQRT_2);
    let (half, one) = (b.float(0.5), b.float(1.0));
    let scaled = b.op("Div", &["X", &sqrt2], vec![]);
    let erf = b.op("Erf", &[&scaled], vec![]);
    let plus = b.op("Add", &[&erf, &one], vec![]);
    let xh = b.op("Mul", &["X", &half], vec![]);
    let gelu = b.op("Mul", &[&xh, &plus], vec![]);
    b.op_to(
        "LayerNormalization",
        &[&gelu, "gamma", "beta"],
        vec![
            attr_i("axis", -1),
            attr_ref("epsilon", subln::EPSILON, attribute_type::FLOAT),
        ],
        "Y",
    );
    b.finish(
        subln::OP,
        &["X", "gamma", "beta"],
        &["Y"],
        &[subln::EPSILON, PLUGIN_NAMESPACE_ATTR, PLUGIN_VERSION_ATTR],
        "LayerNorm(GELU(X)) over the last axis (kosmos_plugins crate docs)",
    )
}

/// `ai.kosmos::PackedLinear(X, W_packed, B) -> Y`: unpack the panels, then `MatMul` + `Add`.
pub fn packed_linear_function() -> FunctionProto {
    let mut b = Body::new();
    // [P, K, 32] → [K, P, 32] → [K, P·32] → the first n columns.
    let kp = b.op("Transpose", &["W_packed"], vec![attr_ints("perm", &[1, 0, 2])]);
    let flat_shape = b.ints(&[0, -1]);
    let flat = b.op("Reshape", &[&kp, &flat_shape], vec![]);
    let n = b.int_attr(packed::N);
    let one_dim = b.ints(&[1]);
    let n = b.op("Reshape", &[&n, &one_dim], vec![]);
    let zero = b.ints(&[0]);
    let w = b.op("Slice", &[&flat, &zero, &n, &one_dim], vec![]);
    let xw = b.op("MatMul", &["X", &w], vec![]);
    b.op_to("Add", &[&xw, "B"], vec![], "Y");
    b.finish(
        packed::OP,
        &["X", "W_packed", "B"],
        &["Y"],
        &[packed::N],
        "X · W + B with W stored in 32-column panels (kosmos_plugins crate docs)",
    )
}

/// `ai.kosmos::CachedAttention(Q, K, V, past_key, past_value, past_sequence_length, visible)
/// -> (Y, present_key, present_value)`: the standard-op attention over the buffer, whose element
/// type is `cache` (F32 or F16; a model holds one body per op, so the exporter picks the one its
/// buffers need).
pub fn cached_attention_function(cache: DType) -> FunctionProto {
    let mut b = Body::new();
    // (row, head, past[row] + i) for every new [b, h, s] entry, for ScatterND.
    let dim = |b: &mut Body, i: i64| b.op("Shape", &["K"], vec![attr_i("start", i), attr_i("end", i + 1)]);
    let (bd, hd, sd) = (dim(&mut b, 0), dim(&mut b, 1), dim(&mut b, 2));
    let (zero, one) = (b.int(0), b.int(1));
    let range = |b: &mut Body, n: &str| {
        let n = b.op("Squeeze", &[n], vec![]);
        b.op("Range", &[&zero, &n, &one], vec![])
    };
    let (rows, heads, offsets) = (range(&mut b, &bd), range(&mut b, &hd), range(&mut b, &sd));
    let rows_shape = b.ints(&[-1, 1, 1, 1]);
    let rows = b.op("Reshape", &[&rows, &rows_shape], vec![]);
    let heads_shape = b.ints(&[1, -1, 1, 1]);
    let heads = b.op("Reshape", &[&heads, &heads_shape], vec![]);
    let axis1 = b.ints(&[1]);
    let past = b.op("Unsqueeze", &["past_sequence_length", &axis1], vec![]);
    let slots = b.op("Add", &[&past, &offsets], vec![]);
    let slots_shape = b.ints(&[0, 1, -1, 1]);
    let slots = b.op("Reshape", &[&slots, &slots_shape], vec![]);
    let last = b.ints(&[1]);
    let target = b.op("Concat", &[&bd, &hd, &sd, &last], vec![attr_i("axis", 0)]);
    let parts: Vec<String> = [&rows, &heads, &slots]
        .iter()
        .map(|p| b.op("Expand", &[p, &target], vec![]))
        .collect();
    let idx = b.op(
        "Concat",
        &[&parts[0], &parts[1], &parts[2]],
        vec![attr_i("axis", 3)],
    );
    let (keys, values) = if cache == DType::F32 {
        b.op_to("ScatterND", &["past_key", &idx, "K"], vec![], "present_key");
        b.op_to("ScatterND", &["past_value", &idx, "V"], vec![], "present_value");
        ("present_key".to_string(), "present_value".to_string())
    } else {
        // The buffers store the new rows rounded; this call attends to the past as stored and
        // to its own rows as given (the spec, and what the kernel does).
        let mut attended = Vec::new();
        for (new, past, present) in [
            ("K", "past_key", "present_key"),
            ("V", "past_value", "present_value"),
        ] {
            let int8 = cache == DType::I8;
            let stored = if int8 {
                quantize_int8_rows(&mut b, new)
            } else {
                b.cast(new, cache.onnx())
            };
            b.op_to("ScatterND", &[past, &idx, &stored], vec![], present);
            let wide = if int8 {
                dequantize_int8_rows(&mut b, past)
            } else {
                b.cast(past, DType::F32.onnx())
            };
            attended.push(b.op("ScatterND", &[&wide, &idx, new], vec![]));
        }
        let values = attended.pop().unwrap();
        (attended.pop().unwrap(), values)
    };
    let kt = b.op("Transpose", &[&keys], vec![attr_ints("perm", &[0, 1, 3, 2])]);
    let scores = b.op("MatMul", &["Q", &kt], vec![]);
    let lowest = b.float(f32::MIN);
    let scores = b.op("Where", &["visible", &scores, &lowest], vec![]);
    let probs = b.op("Softmax", &[&scores], vec![attr_i("axis", -1)]);
    b.op_to("MatMul", &[&probs, &values], vec![], "Y");
    b.finish(
        cached::OP,
        &cached::INPUTS,
        &cached::OUTPUTS,
        &[],
        "attention of new tokens over a fixed-capacity KV buffer (kosmos_plugins crate docs)",
    )
}

/// float32 rows `x` [.., d] as int8 cache rows [.., d + 1] (`CachedAttention`'s spec, C = int8):
/// the least exponent e ≥ −100 with max|x| ≤ 127 · 2^e, from the logarithm and then one exact
/// comparison each way (127 · 2^e is exact in float32), and x / 2^e rounded to nearest even.
fn quantize_int8_rows(b: &mut Body, x: &str) -> String {
    let abs = b.op("Abs", &[x], vec![]);
    let absmax = b.op(
        "ReduceMax",
        &[&abs],
        vec![attr_ints("axes", &[-1]), attr_i("keepdims", 1)],
    );
    let min_e = f32::from(kosmos_plugins::cached_attention::INT8_EXPONENT_MIN);
    let floor = b.float(127.0 * min_e.exp2());
    let t = b.op("Max", &[&absmax, &floor], vec![]);
    let (two, most, one) = (b.float(2.0), b.float(127.0), b.float(1.0));
    let ratio = b.op("Div", &[&t, &most], vec![]);
    let ln = b.op("Log", &[&ratio], vec![]);
    let inv_ln2 = b.float(std::f32::consts::LOG2_E);
    let log2 = b.op("Mul", &[&ln, &inv_ln2], vec![]);
    let guess = b.op("Ceil", &[&log2], vec![]);
    // Holds 127 · 2^e the row's largest value?
    let holds = |b: &mut Body, e: &str| {
        let p = b.op("Pow", &[&two, e], vec![]);
        let top = b.op("Mul", &[&most, &p], vec![]);
        b.op("LessOrEqual", &[&t, &top], vec![])
    };
    let up = b.op("Add", &[&guess, &one], vec![]);
    let fits = holds(b, &guess);
    let e = b.op("Where", &[&fits, &guess, &up], vec![]);
    let down = b.op("Sub", &[&e, &one], vec![]);
    let fits_lower = holds(b, &down);
    let e = b.op("Where", &[&fits_lower, &down, &e], vec![]);
    let (lo, hi) = (b.float(min_e), b.float(127.0));
    let e = b.op("Clip", &[&e, &lo, &hi], vec![]);
    let scale = b.op("Pow", &[&two, &e], vec![]);
    let scaled = b.op("Div", &[x, &scale], vec![]);
    let rounded = b.op("Round", &[&scaled], vec![]);
    let neg = b.float(-127.0);
    let clipped = b.op("Clip", &[&rounded, &neg, &most], vec![]);
    let values = b.cast(&clipped, DType::I8.onnx());
    let exponent = b.cast(&e, DType::I8.onnx());
    b.op("Concat", &[&values, &exponent], vec![attr_i("axis", -1)])
}

/// int8 cache rows [.., d + 1] as the float32 rows [.., d] they stand for (values · 2^e).
fn dequantize_int8_rows(b: &mut Body, rows: &str) -> String {
    let axes = b.ints(&[-1]);
    let (zero, last, end) = (b.ints(&[0]), b.ints(&[-1]), b.ints(&[i64::MAX]));
    let values = b.op("Slice", &[rows, &zero, &last, &axes], vec![]);
    let exponent = b.op("Slice", &[rows, &last, &end, &axes], vec![]);
    let values = b.cast(&values, DType::F32.onnx());
    let exponent = b.cast(&exponent, DType::F32.onnx());
    let two = b.float(2.0);
    let scale = b.op("Pow", &[&two, &exponent], vec![]);
    b.op("Mul", &[&values, &scale], vec![])
}

/// Every `ai.kosmos` function, `CachedAttention`'s for KV buffers of type `cache`.
pub fn functions(cache: DType) -> Vec<FunctionProto> {
    vec![
        xpos_function(),
        subln_gelu_function(),
        packed_linear_function(),
        cached_attention_function(cache),
    ]
}

/// The `ai.kosmos` functions that `nodes` call, for the model that holds them (its KV buffers of
/// type `cache`).
pub fn functions_called(nodes: &[NodeProto], cache: DType) -> Vec<FunctionProto> {
    functions(cache)
        .into_iter()
        .filter(|f| nodes.iter().any(|n| n.domain == DOMAIN && n.op_type == f.name))
        .collect()
}

/// Attributes of a `PackedLinear` node with `n` output features.
pub fn packed_linear_attributes(n: usize) -> Vec<(&'static str, Attr)> {
    vec![(packed::N, Attr::Int(n as i64))]
}

/// Attributes of an `XPos` node, for [`GraphBuilder::node_in`](crate::onnx::builder::GraphBuilder::node_in).
pub fn xpos_attributes(a: &XposNodeAttrs) -> Vec<(&'static str, Attr)> {
    vec![
        (xpos::THETA, Attr::Float(a.theta)),
        (xpos::SCALE_BASE, Attr::Float(a.scale_base)),
        (xpos::CENTRE, Attr::Float(a.centre)),
        (xpos::DOWNSCALE, Attr::Int(a.downscale as i64)),
        (PLUGIN_NAMESPACE_ATTR, Attr::Str(PLUGIN_NAMESPACE.into())),
        (PLUGIN_VERSION_ATTR, Attr::Str(PLUGIN_VERSION.into())),
    ]
}

/// Attributes of a `SubLnGelu` node.
pub fn subln_attributes(epsilon: f32) -> Vec<(&'static str, Attr)> {
    vec![
        (subln::EPSILON, Attr::Float(epsilon)),
        (PLUGIN_NAMESPACE_ATTR, Attr::Str(PLUGIN_NAMESPACE.into())),
        (PLUGIN_VERSION_ATTR, Attr::Str(PLUGIN_VERSION.into())),
    ]
}

/// One `ai.kosmos` op to wrap in a model of its own.
#[derive(Clone, Copy, Debug)]
pub enum SingleOp {
    /// Inputs `X` f32[b, h, s, d], `positions` i64[b, s].
    Xpos(XposNodeAttrs),
    /// Inputs `X` f32[n, f], `gamma` f32[f], `beta` f32[f].
    SubLnGelu { epsilon: f32 },
    /// Inputs `X` f32[b, s, k], `W_packed` f32[p, k, 32], `B` f32[n].
    PackedLinear { n: usize },
    /// Inputs `Q`, `K`, `V` f32[b, h, s, d], `past_key`, `past_value` [b, h, c, d] of type
    /// `cache` (F32 or F16), `past_sequence_length` i64[b], `visible` bool[b, 1, s, c]; outputs
    /// `Y`, `present_key`, `present_value`.
    CachedAttention { cache: DType },
}

/// A model whose graph is one call of `op` (output `Y`, and the presents of `CachedAttention`),
/// with the function bodies included:
/// run with the `ai.kosmos` kernels registered it measures them, without it the bodies.
pub fn single_op_model(op: SingleOp) -> Vec<u8> {
    use prost::Message;

    use crate::onnx::builder::{Dim, value_info};
    use crate::onnx::proto::{GraphProto, ModelProto};

    let sym = |s: &str| Dim::sym(s);
    let (name, inputs, attrs) = match op {
        SingleOp::Xpos(a) => (
            xpos::OP,
            vec![
                value_info("X", DType::F32, &[sym("b"), sym("h"), sym("s"), sym("d")]),
                value_info("positions", DType::I64, &[sym("b"), sym("s")]),
            ],
            xpos_attributes(&a),
        ),
        SingleOp::SubLnGelu { epsilon } => (
            subln::OP,
            vec![
                value_info("X", DType::F32, &[sym("n"), sym("f")]),
                value_info("gamma", DType::F32, &[sym("f")]),
                value_info("beta", DType::F32, &[sym("f")]),
            ],
            subln_attributes(epsilon),
        ),
        SingleOp::PackedLinear { n } => (
            packed::OP,
            vec![
                value_info("X", DType::F32, &[sym("b"), sym("s"), sym("k")]),
                value_info(
                    "W_packed",
                    DType::F32,
                    &[sym("p"), sym("k"), Dim::Fixed(PANEL as i64)],
                ),
                value_info("B", DType::F32, &[Dim::Fixed(n as i64)]),
            ],
            packed_linear_attributes(n),
        ),
        SingleOp::CachedAttention { cache: ct } => {
            let new = [sym("b"), sym("h"), sym("s"), sym("d")];
            let cache = [sym("b"), sym("h"), sym("c"), sym("d")];
            (
                cached::OP,
                vec![
                    value_info("Q", DType::F32, &new),
                    value_info("K", DType::F32, &new),
                    value_info("V", DType::F32, &new),
                    value_info("past_key", ct, &cache),
                    value_info("past_value", ct, &cache),
                    value_info("past_sequence_length", DType::I64, &[sym("b")]),
                    value_info(
                        "visible",
                        DType::Bool,
                        &[sym("b"), Dim::Fixed(1), sym("s"), sym("c")],
                    ),
                ],
                vec![],
            )
        }
    };
    let outputs = match op {
        SingleOp::Xpos(_) => vec![value_info(
            "Y",
            DType::F32,
            &[sym("b"), sym("h"), sym("s"), sym("d")],
        )],
        SingleOp::SubLnGelu { .. } => vec![value_info("Y", DType::F32, &[sym("n"), sym("f")])],
        SingleOp::PackedLinear { n } => vec![value_info(
            "Y",
            DType::F32,
            &[sym("b"), sym("s"), Dim::Fixed(n as i64)],
        )],
        SingleOp::CachedAttention { cache: ct } => {
            let cache = [sym("b"), sym("h"), sym("c"), sym("d")];
            vec![
                value_info("Y", DType::F32, &[sym("b"), sym("h"), sym("s"), sym("d")]),
                value_info("present_key", ct, &cache),
                value_info("present_value", ct, &cache),
            ]
        }
    };
    let node = NodeProto {
        input: inputs.iter().map(|v| v.name.clone()).collect(),
        output: outputs.iter().map(|v| v.name.clone()).collect(),
        name: name.into(),
        op_type: name.into(),
        domain: DOMAIN.into(),
        attribute: attrs
            .into_iter()
            .map(|(n, a)| crate::onnx::builder::attribute(n, a))
            .collect(),
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: crate::onnx::proto::IR_VERSION,
        opset_import: vec![
            OperatorSetIdProto {
                domain: String::new(),
                version: BODY_OPSET,
            },
            OperatorSetIdProto {
                domain: DOMAIN.into(),
                version: DOMAIN_VERSION,
            },
        ],
        producer_name: "kosmos-export".into(),
        graph: Some(GraphProto {
            node: vec![node],
            name: format!("{name}_test"),
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        functions: functions(match op {
            SingleOp::CachedAttention { cache } => cache,
            _ => DType::F32,
        }),
        ..Default::default()
    };
    model.encode_to_vec()
}
