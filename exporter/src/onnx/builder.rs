//! A graph builder that writes ONNX node by node, the way ONNX Runtime GenAI's model builder
//! does: every node gets a readable path name (`/decoder/layers.3/self_attn/q_proj/MatMul`),
//! every value its element type and (symbolic) shape, small constants are shared, and weights go
//! to an external data file as they are added, so the graph in memory never holds them.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use kosmos_models::package::KvDtype;

use super::external::WeightSink;
use super::proto::{
    AttributeProto, GraphProto, NodeProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
    attribute_type, data_type, tensor_shape_proto, type_proto,
};
use crate::error::{ExportError, Result};

/// Element types used in the exported graphs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    I64,
    Bool,
    /// Packed quantised weights (`MatMulNBits`' `B`).
    U8,
    /// int8 KV cache rows (`--kv-cache-dtype int8`).
    I8,
}

impl DType {
    pub fn onnx(self) -> i32 {
        match self {
            DType::F32 => data_type::FLOAT,
            DType::F16 => data_type::FLOAT16,
            DType::I64 => data_type::INT64,
            DType::Bool => data_type::BOOL,
            DType::U8 => data_type::UINT8,
            DType::I8 => data_type::INT8,
        }
    }
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
            DType::I64 => 8,
            DType::Bool | DType::U8 | DType::I8 => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::I64 => "int64",
            DType::Bool => "bool",
            DType::U8 => "uint8",
            DType::I8 => "int8",
        }
    }
}

impl From<KvDtype> for DType {
    /// The element type of KV cache tensors of `k`.
    fn from(k: KvDtype) -> Self {
        match k {
            KvDtype::Fp32 => DType::F32,
            KvDtype::Fp16 => DType::F16,
            KvDtype::Int8 => DType::I8,
        }
    }
}

/// One dimension: a number, or a named symbol (`batch`, `sequence_length`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Fixed(i64),
    Sym(String),
}

impl Dim {
    pub fn sym(name: &str) -> Dim {
        Dim::Sym(name.to_string())
    }
}

impl From<i64> for Dim {
    fn from(v: i64) -> Self {
        Dim::Fixed(v)
    }
}
impl From<usize> for Dim {
    fn from(v: usize) -> Self {
        Dim::Fixed(v as i64)
    }
}
impl From<&str> for Dim {
    fn from(v: &str) -> Self {
        Dim::Sym(v.to_string())
    }
}
impl From<&Dim> for Dim {
    fn from(v: &Dim) -> Self {
        v.clone()
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(v) => write!(f, "{v}"),
            Dim::Sym(s) => f.write_str(s),
        }
    }
}

pub type Shape = Vec<Dim>;

/// `[a, b, c]` from anything that converts to [`Dim`].
#[macro_export]
macro_rules! shape {
    ($($d:expr),* $(,)?) => { vec![$($crate::onnx::builder::Dim::from($d)),*] };
}

/// A value in the graph: its name, element type and shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub name: String,
    pub dtype: DType,
    pub shape: Shape,
}

impl Value {
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn dim(&self, axis: i64) -> &Dim {
        let a = if axis < 0 { self.rank() as i64 + axis } else { axis };
        &self.shape[a as usize]
    }
}

/// Attribute values.
pub enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Str(String),
    Tensor(TensorProto),
}

pub fn attribute(name: &str, a: Attr) -> AttributeProto {
    let mut p = AttributeProto {
        name: name.to_string(),
        ..Default::default()
    };
    match a {
        Attr::Int(v) => {
            p.r#type = attribute_type::INT;
            p.i = Some(v);
        }
        Attr::Float(v) => {
            p.r#type = attribute_type::FLOAT;
            p.f = Some(v);
        }
        Attr::Ints(v) => {
            p.r#type = attribute_type::INTS;
            p.ints = v;
        }
        Attr::Str(v) => {
            p.r#type = attribute_type::STRING;
            p.s = Some(v.into_bytes());
        }
        Attr::Tensor(t) => {
            p.r#type = attribute_type::TENSOR;
            p.t = Some(t);
        }
    }
    p
}

pub fn value_info(name: &str, dtype: DType, shape: &[Dim]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: dtype.onnx(),
                shape: Some(TensorShapeProto {
                    dim: shape
                        .iter()
                        .map(|d| tensor_shape_proto::Dimension {
                            value: Some(match d {
                                Dim::Fixed(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
                                Dim::Sym(s) => tensor_shape_proto::dimension::Value::DimParam(s.clone()),
                            }),
                        })
                        .collect(),
                }),
            })),
        }),
        doc_string: String::new(),
    }
}

/// Numpy-style broadcast of two shapes.
pub fn broadcast(a: &[Dim], b: &[Dim]) -> Result<Shape> {
    let n = a.len().max(b.len());
    let pad = |s: &[Dim]| {
        let mut v = vec![Dim::Fixed(1); n - s.len()];
        v.extend_from_slice(s);
        v
    };
    let (a, b) = (pad(a), pad(b));
    a.iter()
        .zip(&b)
        .map(|(x, y)| match (x, y) {
            (x, y) if x == y => Ok(x.clone()),
            (Dim::Fixed(1), y) => Ok(y.clone()),
            (x, Dim::Fixed(1)) => Ok(x.clone()),
            (Dim::Sym(_), Dim::Fixed(v)) | (Dim::Fixed(v), Dim::Sym(_)) => Ok(Dim::Fixed(*v)),
            _ => Err(ExportError::Graph(format!("cannot broadcast {a:?} with {b:?}"))),
        })
        .collect()
}

/// Initializer data added to a graph.
pub enum Data<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    I64(&'a [i64]),
}

impl Data<'_> {
    fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::F32,
            Data::F16(_) => DType::F16,
            Data::I64(_) => DType::I64,
        }
    }
    fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::F16(v) => v.len(),
            Data::I64(v) => v.len(),
        }
    }
    fn bytes(&self) -> Vec<u8> {
        match self {
            Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// Tensors at least this large go to the external data file; smaller ones stay in the graph.
const EXTERNAL_MIN_BYTES: usize = 1024;

pub struct GraphBuilder<'w> {
    name: String,
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    value_info: Vec<ValueInfoProto>,
    initializers: Vec<TensorProto>,
    scope: Vec<String>,
    node_names: HashMap<String, usize>,
    consts: HashMap<(DType, Vec<i64>, Vec<u8>), Value>,
    named: HashMap<String, Value>,
    sink: &'w mut WeightSink,
    /// Operator-set domains used, with their versions.
    pub opsets: BTreeMap<String, i64>,
}

impl<'w> GraphBuilder<'w> {
    pub fn new(name: &str, opset: i64, sink: &'w mut WeightSink) -> Self {
        GraphBuilder {
            name: name.to_string(),
            nodes: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            value_info: Vec::new(),
            initializers: Vec::new(),
            scope: Vec::new(),
            node_names: HashMap::new(),
            consts: HashMap::new(),
            named: HashMap::new(),
            sink,
            opsets: BTreeMap::from([(String::new(), opset)]),
        }
    }

    /// Run `f` with `part` appended to the node-name scope.
    pub fn scope<T>(&mut self, part: &str, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.scope.push(part.to_string());
        let r = f(self);
        self.scope.pop();
        r
    }

    pub fn scope_push(&mut self, part: &str) {
        self.scope.push(part.to_string());
    }
    pub fn scope_pop(&mut self) {
        self.scope.pop();
    }

    pub fn input(&mut self, name: &str, dtype: DType, shape: Shape) -> Value {
        self.inputs.push(value_info(name, dtype, &shape));
        Value {
            name: name.to_string(),
            dtype,
            shape,
        }
    }

    /// Make `v` a graph output called `name`. A value computed by a node is renamed in place (no
    /// Identity node); a graph input or initializer gets an Identity.
    pub fn output(&mut self, v: &Value, name: &str) -> Result<()> {
        let produced = self.nodes.iter().any(|n| n.output.contains(&v.name));
        if v.name != name && self.nodes.iter().any(|n| n.output.iter().any(|o| o == name)) {
            return Err(ExportError::Graph(format!("output name {name} is taken")));
        }
        if v.name != name && produced {
            for n in &mut self.nodes {
                for io in n.input.iter_mut().chain(n.output.iter_mut()) {
                    if *io == v.name {
                        *io = name.to_string();
                    }
                }
            }
        } else if v.name != name {
            let n = self.node_name("Identity");
            self.nodes.push(NodeProto {
                input: vec![v.name.clone()],
                output: vec![name.to_string()],
                name: n,
                op_type: "Identity".into(),
                ..Default::default()
            });
        }
        // An output needs no value_info entry of its own.
        self.value_info.retain(|vi| vi.name != v.name && vi.name != name);
        self.outputs.push(value_info(name, v.dtype, &v.shape));
        Ok(())
    }

    fn node_name(&mut self, op: &str) -> String {
        let base = format!(
            "/{}",
            self.scope.iter().map(|s| format!("{s}/")).collect::<String>() + op
        );
        let count = self.node_names.entry(base.clone()).or_insert(0);
        *count += 1;
        if *count == 1 {
            base
        } else {
            format!("{base}_{}", *count - 1)
        }
    }

    /// Add a node in `domain` with outputs of the given types; returns the output values.
    pub fn node_in(
        &mut self,
        domain: &str,
        op: &str,
        inputs: &[Option<&Value>],
        attrs: Vec<(&str, Attr)>,
        outs: Vec<(DType, Shape)>,
    ) -> Vec<Value> {
        self.node_in_sparse(domain, op, inputs, attrs, outs.into_iter().map(Some).collect())
            .into_iter()
            .map(|v| v.expect("every output requested"))
            .collect()
    }

    /// As [`Self::node_in`], where `None` leaves an optional output unused (empty name).
    pub fn node_in_sparse(
        &mut self,
        domain: &str,
        op: &str,
        inputs: &[Option<&Value>],
        attrs: Vec<(&str, Attr)>,
        outs: Vec<Option<(DType, Shape)>>,
    ) -> Vec<Option<Value>> {
        let name = self.node_name(op);
        let outputs: Vec<Option<Value>> = outs
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                o.map(|(dtype, shape)| Value {
                    name: format!("{name}_output_{i}"),
                    dtype,
                    shape,
                })
            })
            .collect();
        for o in outputs.iter().flatten() {
            self.value_info.push(value_info(&o.name, o.dtype, &o.shape));
        }
        self.nodes.push(NodeProto {
            input: inputs
                .iter()
                .map(|v| v.map_or(String::new(), |v| v.name.clone()))
                .collect(),
            output: outputs
                .iter()
                .map(|o| o.as_ref().map_or(String::new(), |o| o.name.clone()))
                .collect(),
            name,
            op_type: op.to_string(),
            domain: domain.to_string(),
            attribute: attrs.into_iter().map(|(n, a)| attribute(n, a)).collect(),
            doc_string: String::new(),
        });
        outputs
    }

    /// A standard-domain node with one output.
    pub fn node(
        &mut self,
        op: &str,
        inputs: &[&Value],
        attrs: Vec<(&str, Attr)>,
        dtype: DType,
        shape: Shape,
    ) -> Value {
        let inputs: Vec<Option<&Value>> = inputs.iter().map(|v| Some(*v)).collect();
        self.node_in("", op, &inputs, attrs, vec![(dtype, shape)])
            .remove(0)
    }

    pub fn use_domain(&mut self, domain: &str, version: i64) {
        self.opsets.insert(domain.to_string(), version);
    }

    // ---- initializers --------------------------------------------------------------------

    /// Add an initializer called `name`; large ones are streamed to the external data file.
    pub fn initializer(&mut self, name: &str, shape: &[i64], data: Data<'_>) -> Result<Value> {
        let dtype = data.dtype();
        debug_assert_eq!(shape.iter().product::<i64>() as usize, data.len());
        let bytes = data.bytes();
        self.add_initializer(name, dtype, shape, bytes)
    }

    fn add_initializer(&mut self, name: &str, dtype: DType, shape: &[i64], bytes: Vec<u8>) -> Result<Value> {
        if self.named.contains_key(name) {
            return Err(ExportError::Graph(format!("initializer {name} added twice")));
        }
        let t = self.tensor_proto(name, dtype, shape, bytes)?;
        self.initializers.push(t);
        let v = Value {
            name: name.to_string(),
            dtype,
            shape: shape.iter().map(|&d| Dim::Fixed(d)).collect(),
        };
        self.named.insert(name.to_string(), v.clone());
        Ok(v)
    }

    /// The initializer called `name`, if one was added.
    pub fn find_initializer(&self, name: &str) -> Option<Value> {
        self.named.get(name).cloned()
    }

    /// Add an initializer from raw little-endian bytes of `dtype`.
    pub fn initializer_bytes(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[i64],
        bytes: Vec<u8>,
    ) -> Result<Value> {
        debug_assert_eq!(shape.iter().product::<i64>() as usize * dtype.size(), bytes.len());
        self.add_initializer(name, dtype, shape, bytes)
    }

    fn tensor_proto(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[i64],
        bytes: Vec<u8>,
    ) -> Result<TensorProto> {
        let mut t = TensorProto {
            dims: shape.to_vec(),
            data_type: dtype.onnx(),
            name: name.to_string(),
            ..Default::default()
        };
        if bytes.len() >= EXTERNAL_MIN_BYTES {
            let (location, offset, length) = self.sink.write(&bytes)?;
            t.data_location = super::proto::DATA_LOCATION_EXTERNAL;
            t.external_data = [
                ("location", location),
                ("offset", offset.to_string()),
                ("length", length.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| super::proto::StringStringEntryProto {
                key: k.to_string(),
                value: v,
            })
            .collect();
        } else {
            t.raw_data = bytes;
        }
        Ok(t)
    }

    /// A shared constant (one initializer per distinct value).
    pub fn constant(&mut self, shape: &[i64], data: Data<'_>) -> Result<Value> {
        let key = (data.dtype(), shape.to_vec(), data.bytes());
        if let Some(v) = self.consts.get(&key) {
            return Ok(v.clone());
        }
        let text = match &data {
            Data::F32(v) if v.len() <= 4 => format!("{v:?}"),
            Data::I64(v) if v.len() <= 6 => format!("{v:?}"),
            Data::F16(v) if v.len() <= 4 => format!("{v:?}"),
            _ => format!("#{}", self.consts.len()),
        };
        let mut text = text.replace(' ', "");
        if shape.is_empty() {
            // A scalar: `const_int64_1`, distinct from the vector `const_int64_[1]`.
            text = text.trim_start_matches('[').trim_end_matches(']').to_string();
        }
        let name = format!("const_{}_{}", data.dtype().name(), text);
        let v = self.initializer(&name, shape, data)?;
        self.consts.insert(key, v.clone());
        Ok(v)
    }

    pub fn i64s(&mut self, v: &[i64]) -> Result<Value> {
        self.constant(&[v.len() as i64], Data::I64(v))
    }
    pub fn scalar_i64(&mut self, v: i64) -> Result<Value> {
        self.constant(&[], Data::I64(&[v]))
    }
    /// A scalar of `dtype` (f32 or f16).
    pub fn scalar(&mut self, v: f32, dtype: DType) -> Result<Value> {
        match dtype {
            DType::F16 => self.constant(&[], Data::F16(&[half::f16::from_f32(v)])),
            _ => self.constant(&[], Data::F32(&[v])),
        }
    }

    // ---- finishing -----------------------------------------------------------------------

    pub fn finish(self) -> (GraphProto, BTreeMap<String, i64>) {
        let graph = GraphProto {
            node: self.nodes,
            name: self.name,
            initializer: self.initializers,
            doc_string: String::new(),
            input: self.inputs,
            output: self.outputs,
            value_info: self.value_info,
        };
        (graph, self.opsets)
    }
}
