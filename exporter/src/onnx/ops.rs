//! Typed helpers for the standard ONNX operators the lowerings use; each computes its output's
//! element type and shape, so every value in the graph carries them.

use super::builder::{Attr, DType, Dim, GraphBuilder, Shape, Value, broadcast};
use crate::error::{ExportError, Result};

impl GraphBuilder<'_> {
    fn binary(&mut self, op: &str, a: &Value, b: &Value, out: DType) -> Result<Value> {
        let shape = broadcast(&a.shape, &b.shape)?;
        Ok(self.node(op, &[a, b], vec![], out, shape))
    }
    pub fn add(&mut self, a: &Value, b: &Value) -> Result<Value> {
        self.binary("Add", a, b, a.dtype)
    }
    pub fn sub(&mut self, a: &Value, b: &Value) -> Result<Value> {
        self.binary("Sub", a, b, a.dtype)
    }
    pub fn mul(&mut self, a: &Value, b: &Value) -> Result<Value> {
        self.binary("Mul", a, b, a.dtype)
    }
    pub fn div(&mut self, a: &Value, b: &Value) -> Result<Value> {
        self.binary("Div", a, b, a.dtype)
    }
    pub fn pow(&mut self, a: &Value, b: &Value) -> Result<Value> {
        self.binary("Pow", a, b, a.dtype)
    }
    pub fn max(&mut self, a: &Value, b: &Value) -> Result<Value> {
        self.binary("Max", a, b, a.dtype)
    }
    pub fn less_or_equal(&mut self, a: &Value, b: &Value) -> Result<Value> {
        self.binary("LessOrEqual", a, b, DType::Bool)
    }
    pub fn and(&mut self, a: &Value, b: &Value) -> Result<Value> {
        self.binary("And", a, b, DType::Bool)
    }

    pub fn unary(&mut self, op: &str, x: &Value) -> Value {
        self.node(op, &[x], vec![], x.dtype, x.shape.clone())
    }

    /// `a * scalar` in `a`'s type.
    pub fn mul_scalar(&mut self, a: &Value, s: f32) -> Result<Value> {
        let c = self.scalar(s, a.dtype)?;
        self.mul(a, &c)
    }
    pub fn add_scalar(&mut self, a: &Value, s: f32) -> Result<Value> {
        let c = self.scalar(s, a.dtype)?;
        self.add(a, &c)
    }

    pub fn where_(&mut self, cond: &Value, a: &Value, b: &Value) -> Result<Value> {
        let shape = broadcast(&broadcast(&cond.shape, &a.shape)?, &b.shape)?;
        Ok(self.node("Where", &[cond, a, b], vec![], a.dtype, shape))
    }

    pub fn cast(&mut self, x: &Value, to: DType) -> Value {
        if x.dtype == to {
            return x.clone();
        }
        self.node(
            "Cast",
            &[x],
            vec![("to", Attr::Int(to.onnx() as i64))],
            to,
            x.shape.clone(),
        )
    }

    /// Batched matrix product with numpy broadcasting of the leading dimensions.
    pub fn matmul(&mut self, a: &Value, b: &Value) -> Result<Value> {
        let (ar, br) = (a.rank(), b.rank());
        if ar < 2 || br < 2 {
            return Err(ExportError::Graph(format!("MatMul needs rank ≥ 2: {a:?} {b:?}")));
        }
        let mut shape = broadcast(&a.shape[..ar - 2], &b.shape[..br - 2])?;
        shape.push(a.shape[ar - 2].clone());
        shape.push(b.shape[br - 1].clone());
        Ok(self.node("MatMul", &[a, b], vec![], a.dtype, shape))
    }

    /// Reshape to `target` (ONNX semantics: 0 copies the input dimension, -1 is inferred);
    /// `shape` is the resulting shape as the builder should record it.
    pub fn reshape(&mut self, x: &Value, target: &[i64], shape: Shape) -> Result<Value> {
        let t = self.i64s(target)?;
        Ok(self.node("Reshape", &[x, &t], vec![], x.dtype, shape))
    }

    pub fn transpose(&mut self, x: &Value, perm: &[i64]) -> Value {
        let shape = perm.iter().map(|&p| x.shape[p as usize].clone()).collect();
        self.node(
            "Transpose",
            &[x],
            vec![("perm", Attr::Ints(perm.to_vec()))],
            x.dtype,
            shape,
        )
    }

    pub fn unsqueeze(&mut self, x: &Value, axes: &[i64]) -> Result<Value> {
        let mut shape = x.shape.clone();
        let rank = (x.rank() + axes.len()) as i64;
        let mut sorted: Vec<i64> = axes.iter().map(|&a| if a < 0 { a + rank } else { a }).collect();
        sorted.sort();
        for a in sorted {
            shape.insert(a as usize, Dim::Fixed(1));
        }
        let a = self.i64s(axes)?;
        Ok(self.node("Unsqueeze", &[x, &a], vec![], x.dtype, shape))
    }

    pub fn squeeze(&mut self, x: &Value, axes: &[i64]) -> Result<Value> {
        let rank = x.rank() as i64;
        let norm: Vec<i64> = axes.iter().map(|&a| if a < 0 { a + rank } else { a }).collect();
        let shape = x
            .shape
            .iter()
            .enumerate()
            .filter(|(i, _)| !norm.contains(&(*i as i64)))
            .map(|(_, d)| d.clone())
            .collect();
        let a = self.i64s(axes)?;
        Ok(self.node("Squeeze", &[x, &a], vec![], x.dtype, shape))
    }

    /// `LayerNormalization` over the last axis (statistics in fp32: stash_type 1).
    pub fn layer_norm(&mut self, x: &Value, weight: &Value, bias: &Value, eps: f64) -> Value {
        self.node(
            "LayerNormalization",
            &[x, weight, bias],
            vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps as f32))],
            x.dtype,
            x.shape.clone(),
        )
    }

    pub fn softmax(&mut self, x: &Value) -> Value {
        self.node(
            "Softmax",
            &[x],
            vec![("axis", Attr::Int(-1))],
            x.dtype,
            x.shape.clone(),
        )
    }

    /// Concatenate along `axis`; `dim` is the resulting size of that axis.
    pub fn concat(&mut self, xs: &[&Value], axis: i64, dim: Dim) -> Value {
        let mut shape = xs[0].shape.clone();
        let a = if axis < 0 { shape.len() as i64 + axis } else { axis } as usize;
        shape[a] = dim;
        self.node("Concat", xs, vec![("axis", Attr::Int(axis))], xs[0].dtype, shape)
    }

    /// `Gather(data, indices, axis=0)`.
    pub fn gather(&mut self, data: &Value, indices: &Value) -> Value {
        let mut shape = indices.shape.clone();
        shape.extend_from_slice(&data.shape[1..]);
        self.node(
            "Gather",
            &[data, indices],
            vec![("axis", Attr::Int(0))],
            data.dtype,
            shape,
        )
    }

    /// `Shape(x)[start..end]` as an i64 vector.
    pub fn shape_of(&mut self, x: &Value, start: i64, end: i64) -> Value {
        let n = (end - start) as usize;
        self.node(
            "Shape",
            &[x],
            vec![("start", Attr::Int(start)), ("end", Attr::Int(end))],
            DType::I64,
            vec![Dim::Fixed(n as i64)],
        )
    }

    /// `x @ weight^T (+ bias)` where the weight initializer is stored already transposed.
    pub fn linear(&mut self, x: &Value, weight_t: &Value, bias: Option<&Value>) -> Result<Value> {
        let mut y = self.matmul(x, weight_t)?;
        if let Some(b) = bias {
            y = self.add(&y, b)?;
        }
        Ok(y)
    }
}
