//! Fused ONNX Runtime CPU kernels for the `ai.kosmos` ops, through `ort`'s custom-operator API.
//! [`operator_domain`] is what a session registers. Float32 activations only, as the `trt`
//! profile that uses these ops (a float16 node would find no kernel and fail to load, not run the
//! body); `CachedAttention` has a kernel for float32 and one for float16 KV buffers, which ONNX
//! Runtime picks between by the buffers' type.

use std::marker::PhantomData;

use half::f16;

use ort::operator::{
    ComputeContext, Kernel, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput,
};
use ort::value::{PrimitiveTensorElementType, TensorElementType};

use crate::cached_attention::{self as attention, Buffers, CacheElement, Counts};
use crate::packed_linear::{Dims, Isa, PANEL, panels, run_task};
use crate::reference::{XposAttrs, subln_gelu, xpos};
use crate::{DOMAIN, cached, packed, subln, xpos as xpos_names};

/// The `ai.kosmos` domain with every op.
pub fn operator_domain() -> ort::Result<OperatorDomain> {
    OperatorDomain::new(DOMAIN)?
        .add(XposOp)?
        .add(SubLnGeluOp)?
        .add(PackedLinearOp)?
        .add(CachedAttentionOp::<f32>::default())?
        .add(CachedAttentionOp::<f16>::default())?
        .add(CachedAttentionOp::<i8>::default())
}

fn missing(what: &str) -> ort::Error {
    ort::Error::new(format!("ai.kosmos: missing {what}"))
}

/// `count` required float32 inputs.
fn f32_inputs(count: usize) -> impl IntoIterator<Item = OperatorInput> {
    (0..count).map(|_| OperatorInput::required(TensorElementType::Float32))
}

/// One float32 output, as every op here has.
fn f32_output() -> impl IntoIterator<Item = OperatorOutput> {
    [OperatorOutput::required(TensorElementType::Float32)]
}

fn input_f32(ctx: &ComputeContext, idx: usize) -> ort::Result<(Vec<i64>, Vec<f32>)> {
    let v = ctx.input(idx)?.ok_or_else(|| missing(&format!("input {idx}")))?;
    let (shape, data) = v.try_extract_tensor::<f32>()?;
    Ok((shape.to_vec(), data.to_vec()))
}

fn write_output(ctx: &ComputeContext, shape: Vec<i64>, data: &[f32]) -> ort::Result<()> {
    let mut out = ctx.output(0, shape)?.ok_or_else(|| missing("output 0"))?;
    let (_, dst) = out.try_extract_tensor_mut::<f32>()?;
    dst.copy_from_slice(data);
    Ok(())
}

pub struct XposOp;

pub struct XposKernel {
    attrs: XposAttrs,
}

impl Operator for XposOp {
    type Kernel<'attr> = XposKernel;

    fn name(&self) -> &str {
        xpos_names::OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(TensorElementType::Int64),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        f32_output()
    }

    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<XposKernel> {
        let f = |name: &str| {
            kctx.get::<f32>(name)
                .ok_or_else(|| ort::Error::new(format!("ai.kosmos::XPos: attribute '{name}' missing")))
        };
        let downscale = kctx
            .get::<i64>(xpos_names::DOWNSCALE)
            .ok_or_else(|| ort::Error::new("ai.kosmos::XPos: attribute 'downscale' missing"))?;
        Ok(XposKernel {
            attrs: XposAttrs {
                theta: f(xpos_names::THETA)?,
                scale_base: f(xpos_names::SCALE_BASE)?,
                centre: f(xpos_names::CENTRE)?,
                downscale: downscale != 0,
            },
        })
    }
}

impl Kernel for XposKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let (shape, x) = input_f32(ctx, 0)?;
        let pos = ctx.input(1)?.ok_or_else(|| missing("input 1 (positions)"))?;
        let (_, positions) = pos.try_extract_tensor::<i64>()?;
        let dims: [usize; 4] = match shape.as_slice() {
            [b, h, s, d] => [*b as usize, *h as usize, *s as usize, *d as usize],
            _ => {
                return Err(ort::Error::new(format!(
                    "ai.kosmos::XPos: X must be [batch, heads, seq, head_dim], got {shape:?}"
                )));
            }
        };
        let mut y = vec![0f32; x.len()];
        xpos(&x, dims, positions, &self.attrs, &mut y).map_err(ort::Error::new)?;
        write_output(ctx, shape, &y)
    }
}

pub struct SubLnGeluOp;

pub struct SubLnGeluKernel {
    epsilon: f32,
}

impl Operator for SubLnGeluOp {
    type Kernel<'attr> = SubLnGeluKernel;

    fn name(&self) -> &str {
        subln::OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        f32_inputs(3)
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        f32_output()
    }

    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<SubLnGeluKernel> {
        Ok(SubLnGeluKernel {
            epsilon: kctx
                .get::<f32>(subln::EPSILON)
                .ok_or_else(|| ort::Error::new("ai.kosmos::SubLnGelu: attribute 'epsilon' missing"))?,
        })
    }
}

impl Kernel for SubLnGeluKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let (shape, x) = input_f32(ctx, 0)?;
        let (_, gamma) = input_f32(ctx, 1)?;
        let (_, beta) = input_f32(ctx, 2)?;
        let mut y = vec![0f32; x.len()];
        subln_gelu(&x, &gamma, &beta, self.epsilon, &mut y).map_err(ort::Error::new)?;
        write_output(ctx, shape, &y)
    }
}

pub struct PackedLinearOp;

pub struct PackedLinearKernel {
    n: usize,
    isa: Isa,
}

impl Operator for PackedLinearOp {
    type Kernel<'attr> = PackedLinearKernel;

    fn name(&self) -> &str {
        packed::OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        f32_inputs(3)
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        f32_output()
    }

    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<PackedLinearKernel> {
        let n = kctx.get::<i64>(packed::N).filter(|&n| n > 0).ok_or_else(|| {
            ort::Error::new("ai.kosmos::PackedLinear: attribute 'n' missing or not positive")
        })?;
        Ok(PackedLinearKernel {
            n: n as usize,
            isa: Isa::detect(),
        })
    }
}

/// A pointer that tasks on ONNX Runtime's pool may share: each writes its own columns.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: the tasks of one call write disjoint columns (packed_linear::run_task).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Kernel for PackedLinearKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let xv = ctx.input(0)?.ok_or_else(|| missing("input 0 (X)"))?;
        let wv = ctx.input(1)?.ok_or_else(|| missing("input 1 (W_packed)"))?;
        let bv = ctx.input(2)?.ok_or_else(|| missing("input 2 (B)"))?;
        let (xs, x) = xv.try_extract_tensor::<f32>()?;
        let (ws, w) = wv.try_extract_tensor::<f32>()?;
        let (_, b) = bv.try_extract_tensor::<f32>()?;
        let Some((&k, lead)) = xs.split_last() else {
            return Err(ort::Error::new("ai.kosmos::PackedLinear: X is a scalar"));
        };
        let d = Dims {
            m: lead.iter().product::<i64>() as usize,
            k: k as usize,
            n: self.n,
        };
        let want_w = [panels(d.n) as i64, k, PANEL as i64];
        if **ws != want_w {
            return Err(ort::Error::new(format!(
                "ai.kosmos::PackedLinear: W_packed is {:?}, expected {want_w:?} for X {:?} and n = {}",
                &**ws, &**xs, d.n
            )));
        }
        let mut shape = lead.to_vec();
        shape.push(self.n as i64);
        let mut out = ctx.output(0, shape)?.ok_or_else(|| missing("output 0"))?;
        let (_, y) = out.try_extract_tensor_mut::<f32>()?;
        d.check(x.len(), w.len(), b.len(), y.len())
            .map_err(ort::Error::new)?;
        if d.m == 0 {
            return Ok(());
        }
        let (xp, wp, bp) = (
            Shared(x.as_ptr().cast_mut()),
            Shared(w.as_ptr().cast_mut()),
            Shared(b.as_ptr().cast_mut()),
        );
        let yp = Shared(y.as_mut_ptr());
        let isa = self.isa;
        ctx.par_for(d.tasks(), 0, move |task| {
            let (xp, wp, bp, yp) = (xp, wp, bp, yp);
            // SAFETY: sizes checked above; each task index is run once and writes its own
            // columns of y.
            unsafe { run_task(isa, d, xp.0, wp.0, bp.0, yp.0, task) }
        })
    }
}

/// `CachedAttention` with KV buffers of element type `E` (f32, f16 or i8).
pub struct CachedAttentionOp<E>(PhantomData<E>);

impl<E> Default for CachedAttentionOp<E> {
    fn default() -> Self {
        CachedAttentionOp(PhantomData)
    }
}

pub struct CachedAttentionKernel<E> {
    isa: Isa,
    cache: PhantomData<E>,
}

impl<E: CacheElement + PrimitiveTensorElementType> Operator for CachedAttentionOp<E> {
    type Kernel<'attr> = CachedAttentionKernel<E>;

    fn name(&self) -> &str {
        cached::OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        let cache = E::into_tensor_element_type();
        f32_inputs(3).into_iter().chain([
            OperatorInput::required(cache),
            OperatorInput::required(cache),
            OperatorInput::required(TensorElementType::Int64),
            OperatorInput::required(TensorElementType::Bool),
        ])
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        let cache = E::into_tensor_element_type();
        [TensorElementType::Float32, cache, cache].map(OperatorOutput::required)
    }

    fn create_kernel<'attr>(&self, _: &KernelContext<'attr>) -> ort::Result<CachedAttentionKernel<E>> {
        Ok(CachedAttentionKernel {
            isa: Isa::detect(),
            cache: PhantomData,
        })
    }
}

impl<E: CacheElement + PrimitiveTensorElementType> Kernel for CachedAttentionKernel<E> {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let input = |i: usize| {
            ctx.input(i)?
                .ok_or_else(|| missing(&format!("CachedAttention input {}", cached::INPUTS[i])))
        };
        let (qv, kv, vv, pkv, pvv, plv, visv) = (
            input(0)?,
            input(1)?,
            input(2)?,
            input(3)?,
            input(4)?,
            input(5)?,
            input(6)?,
        );
        let (qs, q) = qv.try_extract_tensor::<f32>()?;
        let (_, k) = kv.try_extract_tensor::<f32>()?;
        let (_, v) = vv.try_extract_tensor::<f32>()?;
        let (cs, past_key) = pkv.try_extract_tensor::<E>()?;
        let (_, past_value) = pvv.try_extract_tensor::<E>()?;
        let (_, past_len) = plv.try_extract_tensor::<i64>()?;
        let (_, visible) = visv.try_extract_tensor::<bool>()?;
        let (d, cache_shape) = match (&**qs, &**cs) {
            (&[b, h, s, hd], &[cb, ch, c, chd])
                if (cb, ch, chd as usize) == (b, h, E::row_len(hd as usize)) =>
            {
                (
                    attention::Dims {
                        batch: b as usize,
                        heads: h as usize,
                        seq: s as usize,
                        capacity: c as usize,
                        head_dim: hd as usize,
                    },
                    cs.to_vec(),
                )
            }
            _ => {
                return Err(ort::Error::new(format!(
                    "ai.kosmos::CachedAttention: Q must be [batch, heads, seq, head_dim] and past_key \
                     [batch, heads, capacity, {}]; got {:?} and {:?}",
                    if E::row_len(1) == 1 {
                        "head_dim"
                    } else {
                        "head_dim + 1 (int8 rows)"
                    },
                    &**qs,
                    &**cs
                )));
            }
        };
        // Raw pointers only from here: `present_*` may be the very buffers of `past_*`.
        let (q_n, k_n, v_n, pk_n, pv_n, vis_n) = (
            q.len(),
            k.len(),
            v.len(),
            past_key.len(),
            past_value.len(),
            visible.len(),
        );
        let (q, k, v, past_key, past_value, visible) = (
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            past_key.as_ptr(),
            past_value.as_ptr(),
            visible.as_ptr(),
        );
        let mut yv = ctx
            .output(0, qs.to_vec())?
            .ok_or_else(|| missing("output 0 (Y)"))?;
        let mut pk_out = ctx
            .output(1, cache_shape.clone())?
            .ok_or_else(|| missing("output 1 (present_key)"))?;
        let mut pv_out = ctx
            .output(2, cache_shape)?
            .ok_or_else(|| missing("output 2 (present_value)"))?;
        let (_, y) = yv.try_extract_tensor_mut::<f32>()?;
        let (_, present_key) = pk_out.try_extract_tensor_mut::<E>()?;
        let (_, present_value) = pv_out.try_extract_tensor_mut::<E>()?;
        let counts = Counts {
            q: q_n,
            k: k_n,
            v: v_n,
            past_key: pk_n,
            past_value: pv_n,
            visible: vis_n,
            y: y.len(),
            present_key: present_key.len(),
            present_value: present_value.len(),
        };
        d.check::<E>(&counts, past_len)
            .map_err(|e| ort::Error::new(format!("ai.kosmos::{e}")))?;
        if d.tasks() == 0 {
            return Ok(());
        }
        let buf = Buffers {
            q,
            k,
            v,
            past_key,
            past_value,
            past_len: past_len.as_ptr(),
            visible,
            y: y.as_mut_ptr(),
            present_key: present_key.as_mut_ptr(),
            present_value: present_value.as_mut_ptr(),
        };
        let isa = self.isa;
        ctx.par_for(d.tasks(), 0, move |task| {
            let buf = buf;
            // SAFETY: sizes and past lengths checked above; ONNX Runtime gives a bound output
            // either the input's own buffer or a separate one; each task index runs once and
            // writes its own (row, head) blocks.
            unsafe { attention::run_task(isa, d, buf, task) }
        })
    }
}
