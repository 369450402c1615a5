//! `decoder.onnx`: token embedding, image-slot merge through `image_mask`, the sub-LN decoder
//! layers with xPos and a KV cache, final LayerNorm and output projection (DESIGN §3, §5).
//!
//! Positions are `cumsum(attention_mask) - 1` over past + new tokens, so left-padded batches keep
//! each row's positions. Keys enter the cache after xPos with the fixed centre
//! `max_target_positions / 2`, exactly as the trainer's cache stores them.

use kosmos_models::KosmosConfig;
use kosmos_models::package::{KvCacheLayout, io};
use kosmos_models::params::DECODER;

use super::{Lower, MS_DOMAIN, float_data};
use crate::Profile;
use crate::error::Result;
use crate::onnx::builder::{Attr, DType, Data, Dim, Value};
use crate::shape;

/// Per-batch position tables shared by every layer.
struct Positions {
    /// Clamped absolute positions of the new tokens, i64 [b, s] (ort profile: rotary ids).
    ids: Value,
    /// Interleaved xPos tables [b, 1, s, hd] (portable profile).
    q_cos: Option<Value>,
    q_sin: Option<Value>,
    k_cos: Option<Value>,
    k_sin: Option<Value>,
    /// The pair rotation (x0, x1, ...) → (−x1, x0, ...) as a [hd, hd] matrix.
    rotate: Option<Value>,
    /// Which keys each new token sees: bool [b, 1, s, t] (portable) or additive f32 bias (ort).
    visible: Value,
    /// How new keys and values reach the cache.
    cache: CacheWrite,
}

/// How a layer's new keys and values join its cache.
enum CacheWrite {
    /// `present = Concat(past, new)`.
    Concat,
    /// Buffer layout: `ScatterND` at (row, head, slot) of each new key/value row, i64
    /// [b, heads, s, 3].
    Scatter(Value),
    /// Buffer layout, `--cached-attention`: the `ai.kosmos::CachedAttention` node writes them
    /// at each row's `past_sequence_length` (i64 [b]).
    Kernel(Value),
}

impl Lower<'_, '_, '_> {
    pub fn decoder_graph(&mut self, cfg: &KosmosConfig) -> Result<()> {
        let d = &cfg.decoder;
        let (dm, heads, hd) = (
            d.decoder_embed_dim as i64,
            d.decoder_attention_heads,
            d.head_dim() as i64,
        );
        let (b, s, p, t) = (
            Dim::sym("batch"),
            Dim::sym("sequence_length"),
            Dim::sym("past_sequence_length"),
            Dim::sym("total_sequence_length"),
        );
        let input_ids = self.g.input(io::INPUT_IDS, DType::I64, shape![&b, &s]);
        let image_embeds = self
            .g
            .input(io::IMAGE_EMBEDS, DType::F32, shape![&b, "num_image_tokens", dm]);
        let image_mask = self.g.input(io::IMAGE_MASK, DType::Bool, shape![&b, &s]);
        let buffer = self.kv_cache == KvCacheLayout::Buffer;
        // Buffer layout: the cache (and the mask) span a fixed capacity; new entries go at `past`.
        let (p, t) = if buffer {
            (Dim::sym("capacity"), Dim::sym("capacity"))
        } else {
            (p, t)
        };
        let attention_mask = self.g.input(io::ATTENTION_MASK, DType::I64, shape![&b, &t]);
        let past_len = if buffer {
            Some(self.g.input(io::PAST_SEQUENCE_LENGTH, DType::I64, shape![&b]))
        } else {
            None
        };
        let keep = if self.profile.logits_to_keep() {
            Some(self.g.input(io::LOGITS_TO_KEEP, DType::I64, vec![]))
        } else {
            None
        };
        let mut past = Vec::with_capacity(d.decoder_layers);
        let kv_dt = DType::from(self.kv_dtype);
        // An int8 slot row ends with its exponent.
        let row = self.kv_dtype.row_len(hd as usize) as i64;
        for i in 0..d.decoder_layers {
            let k = self.g.input(&io::past_key(i), kv_dt, shape![&b, heads, &p, row]);
            let v = self
                .g
                .input(&io::past_value(i), kv_dt, shape![&b, heads, &p, row]);
            past.push((k, v));
        }

        let mut x = self.embed(cfg, &input_ids, &image_embeds, &image_mask)?;
        let pos = self.in_module(DECODER, |l| {
            l.positions(cfg, &input_ids, &attention_mask, past_len.as_ref())
        })?;

        let eps = d.layernorm_eps;
        let mut presents = Vec::with_capacity(d.decoder_layers);
        for (i, (pk, pv)) in past.iter().enumerate() {
            let pl = format!("{DECODER}.layers.{i}");
            let h = self.layer_norm(&x, &format!("{pl}.self_attn_layer_norm"), eps)?;
            let (att, kv) = self.self_attention(cfg, &pl, &h, &pos, pk, pv)?;
            presents.push(kv);
            x = self.in_module(&pl, |l| l.g.add(&x, &att))?;
            let h = self.layer_norm(&x, &format!("{pl}.final_layer_norm"), eps)?;
            let f = format!("{pl}.ffn");
            let h = self.linear(&h, &format!("{f}.fc1"), true)?;
            let h = if self.profile == Profile::Trt {
                self.subln_gelu(&h, &format!("{f}.ffn_layernorm"), eps)?
            } else {
                let h = self.in_module(&f, |l| l.gelu(&h))?;
                self.layer_norm(&h, &format!("{f}.ffn_layernorm"), eps)?
            };
            let h = self.linear(&h, &format!("{f}.fc2"), true)?;
            x = self.in_module(&pl, |l| l.g.add(&x, &h))?;
        }
        let x = match &keep {
            Some(k) => self.in_module(DECODER, |l| l.last_positions(&x, k))?,
            None => x,
        };
        let x = self.layer_norm(&x, &format!("{DECODER}.layer_norm"), eps)?;
        let logits = self.linear(&x, &format!("{DECODER}.output_projection"), false)?;
        let logits = self.in_module(DECODER, |l| Ok(l.g.cast(&logits, DType::F32)))?;
        self.g.output(&logits, io::LOGITS)?;
        for (i, (k, v)) in presents.iter().enumerate() {
            self.g.output(k, &io::present_key(i))?;
            self.g.output(v, &io::present_value(i))?;
        }
        Ok(())
    }

    /// The last `keep` positions of `x` [b, s, D] (all of them when `keep` is 0), so the final
    /// LayerNorm and the LM head run only where logits are wanted.
    fn last_positions(&mut self, x: &Value, keep: &Value) -> Result<Value> {
        // Slice clamps a start before -s to 0, so keep ≥ s also means every position.
        let start = self.g.node("Neg", &[keep], vec![], DType::I64, vec![]);
        let start = self.g.unsqueeze(&start, &[0])?;
        let end = self.g.i64s(&[i64::MAX])?;
        let axis = self.g.i64s(&[1])?;
        let (b, dm) = (x.shape[0].clone(), x.shape[2].clone());
        Ok(self.g.node(
            "Slice",
            &[x, &start, &end, &axis],
            vec![],
            x.dtype,
            shape![&b, "logits_length", &dm],
        ))
    }

    /// Token embeddings with image slots replaced, in order, by the row's image embeddings.
    fn embed(&mut self, cfg: &KosmosConfig, ids: &Value, images: &Value, mask: &Value) -> Result<Value> {
        let w = self.w;
        let dt = self.dtype();
        let dm = cfg.decoder.decoder_embed_dim as i64;
        let name = format!("{DECODER}.embed_tokens");
        let (b, s) = (ids.shape[0].clone(), ids.shape[1].clone());
        self.in_module(&name, |l| {
            let table = w.param(&mut l.g, &format!("{name}.weight"))?;
            let tokens = l.g.gather(&table, ids);
            // Slot j of row r takes image embedding (number of image slots before it in row r).
            // A zero row appended to the images keeps the gather valid when a batch has none.
            let images = l.g.cast(images, dt);
            let pads = l.g.i64s(&[0, 0, 0, 0, 1, 0])?;
            let padded = l.g.node(
                "Pad",
                &[&images, &pads],
                vec![],
                dt,
                shape![&b, "num_image_tokens+1", dm],
            );
            let m = l.g.cast(mask, DType::I64);
            let one = l.g.scalar_i64(1)?;
            let axis = l.g.scalar_i64(1)?;
            let count =
                l.g.node("CumSum", &[&m, &axis], vec![], DType::I64, shape![&b, &s]);
            let slot = l.g.sub(&count, &one)?;
            let zero = l.g.scalar_i64(0)?;
            let slot = l.g.max(&slot, &zero)?;
            let slot = l.g.unsqueeze(&slot, &[-1])?;
            let target = l.g.shape_of(&tokens, 0, 3);
            let slot = l.g.node(
                "Expand",
                &[&slot, &target],
                vec![],
                DType::I64,
                shape![&b, &s, dm],
            );
            let picked = l.g.node(
                "GatherElements",
                &[&padded, &slot],
                vec![("axis", Attr::Int(1))],
                dt,
                shape![&b, &s, dm],
            );
            let m3 = l.g.unsqueeze(mask, &[-1])?;
            let mut x = l.g.where_(&m3, &picked, &tokens)?;
            let scale = cfg.decoder.embed_scale();
            if scale != 1.0 {
                x = l.g.mul_scalar(&x, scale as f32)?;
            }
            Ok(x)
        })
    }

    /// Positions, xPos tables and the visibility mask, computed once for all layers.
    fn positions(
        &mut self,
        cfg: &KosmosConfig,
        ids: &Value,
        attention_mask: &Value,
        past_len: Option<&Value>,
    ) -> Result<Positions> {
        let d = &cfg.decoder;
        let dt = self.dtype();
        let hd = d.head_dim();
        let (b, s, t) = (
            ids.shape[0].clone(),
            ids.shape[1].clone(),
            attention_mask.shape[1].clone(),
        );
        let g = &mut self.g;
        g.scope_push("positions");
        // cumsum(mask) - 1 over all positions of the mask (past and new tokens).
        let axis = g.scalar_i64(1)?;
        let cs = g.node(
            "CumSum",
            &[attention_mask, &axis],
            vec![],
            DType::I64,
            shape![&b, &t],
        );
        let one = g.scalar_i64(1)?;
        let all = g.sub(&cs, &one)?;
        let s_vec = g.shape_of(ids, 1, 2);
        let t_vec = g.shape_of(attention_mask, 1, 2);
        let zero = g.scalar_i64(0)?;
        let step = g.scalar_i64(1)?;
        let t_scalar = g.squeeze(&t_vec, &[0])?;
        let s_scalar = g.squeeze(&s_vec, &[0])?;
        let key_idx = g.node(
            "Range",
            &[&zero, &t_scalar, &step],
            vec![],
            DType::I64,
            shape![&t],
        );
        let (ids_pos, causal, cache) = match past_len {
            // Buffer layout: row r's new tokens sit in slots past[r] .. past[r] + s.
            Some(p) => {
                let offsets = g.node(
                    "Range",
                    &[&zero, &s_scalar, &step],
                    vec![],
                    DType::I64,
                    shape![&s],
                );
                let p_col = g.unsqueeze(p, &[1])?; // [b, 1]
                let slots = g.add(&p_col, &offsets)?; // [b, s]
                let picked = g.node(
                    "GatherElements",
                    &[&all, &slots],
                    vec![("axis", Attr::Int(1))],
                    DType::I64,
                    shape![&b, &s],
                );
                let ids_pos = g.max(&picked, &zero)?;
                g.scope_pop();
                g.scope_push("mask");
                // Key j is seen by new token i of row r when j ≤ past[r] + i and key j is real.
                let keys = g.unsqueeze(&key_idx, &[0, 1])?; // [1, 1, t]
                let queries = g.unsqueeze(&slots, &[2])?; // [b, s, 1]
                let causal = g.less_or_equal(&keys, &queries)?; // [b, s, t]
                let causal = g.unsqueeze(&causal, &[1])?; // [b, 1, s, t]
                if self.cached_attention {
                    (ids_pos, causal, CacheWrite::Kernel(p.clone()))
                } else {
                    // Where each new key/value goes: (row, head, slot) per [b, heads, s] for
                    // ScatterND, which copies whole head_dim rows (ScatterElements walks every
                    // element, a tenth of a batch-8 decode step at full size).
                    let heads = d.decoder_attention_heads as i64;
                    let b_vec = g.shape_of(ids, 0, 1);
                    let b_scalar = g.squeeze(&b_vec, &[0])?;
                    let h = g.i64s(&[heads])?;
                    let one_vec = g.i64s(&[1])?;
                    let target = g.concat(&[&b_vec, &h, &s_vec, &one_vec], 0, Dim::Fixed(4));
                    let rows = g.node(
                        "Range",
                        &[&zero, &b_scalar, &step],
                        vec![],
                        DType::I64,
                        shape![&b],
                    );
                    let rows = g.reshape(&rows, &[-1, 1, 1, 1], shape![&b, 1i64, 1i64, 1i64])?;
                    let head_ids: Vec<i64> = (0..heads).collect();
                    let head_ids = g.constant(&[1, heads, 1, 1], Data::I64(&head_ids))?;
                    let slots4 = g.reshape(&slots, &[0, 1, -1, 1], shape![&b, 1i64, &s, 1i64])?;
                    let mut parts = Vec::with_capacity(3);
                    for part in [&rows, &head_ids, &slots4] {
                        parts.push(g.node(
                            "Expand",
                            &[part, &target],
                            vec![],
                            DType::I64,
                            shape![&b, heads, &s, 1i64],
                        ));
                    }
                    let scatter = g.concat(&[&parts[0], &parts[1], &parts[2]], 3, Dim::Fixed(3));
                    (ids_pos, causal, CacheWrite::Scatter(scatter))
                }
            }
            // Concat layout: the new tokens are the last s of the mask.
            None => {
                let start = g.unary("Neg", &s_vec);
                let end = g.i64s(&[i64::MAX])?;
                let axes = g.i64s(&[1])?;
                let new = g.node(
                    "Slice",
                    &[&all, &start, &end, &axes],
                    vec![],
                    DType::I64,
                    shape![&b, &s],
                );
                let ids_pos = g.max(&new, &zero)?;
                g.scope_pop();
                g.scope_push("mask");
                // Key j is seen by new token i when j ≤ past + i and key j is real.
                let past = g.sub(&t_scalar, &s_scalar)?;
                let query_idx = g.node(
                    "Range",
                    &[&past, &t_scalar, &step],
                    vec![],
                    DType::I64,
                    shape![&s],
                );
                let keys = g.unsqueeze(&key_idx, &[0])?;
                let queries = g.unsqueeze(&query_idx, &[1])?;
                (ids_pos, g.less_or_equal(&keys, &queries)?, CacheWrite::Concat)
            }
        };
        let real = g.cast(attention_mask, DType::Bool);
        let real = g.unsqueeze(&real, &[1, 2])?;
        let mut visible = g.and(&causal, &real)?;
        if self.profile == Profile::Ort {
            // MultiHeadAttention takes an additive bias in the activation type.
            let open = g.scalar(0.0, dt)?;
            let lowest = match dt {
                DType::F16 => g.scalar(half::f16::MIN.to_f32(), dt)?,
                _ => g.scalar(f32::MIN, dt)?,
            };
            visible = g.where_(&visible, &open, &lowest)?;
        }
        g.scope_pop();

        let mut pos = Positions {
            ids: ids_pos.clone(),
            q_cos: None,
            q_sin: None,
            k_cos: None,
            k_sin: None,
            rotate: None,
            visible,
            cache,
        };
        let tables = XposTables::new(hd, d.xpos_scale_base, d.xpos_centre());
        // ort: RotaryEmbedding caches per layer; trt: ai.kosmos XPos nodes take the positions.
        if self.profile != Profile::Portable {
            return Ok(pos);
        }

        // Interleaved tables [b, 1, s, hd], formed in f32 as the trainer does, then cast.
        let g = &mut self.g;
        g.scope_push("xpos");
        let inv_freq = g.constant(&[hd as i64], Data::F32(&tables.inv_freq_interleaved))?;
        let zeta = g.constant(&[hd as i64], Data::F32(&tables.zeta_interleaved))?;
        let pf = g.cast(&ids_pos, DType::F32);
        let pf = g.unsqueeze(&pf, &[-1])?; // [b, s, 1]
        let angles = g.mul(&pf, &inv_freq)?; // [b, s, hd]
        let cos = g.unary("Cos", &angles);
        let sin = g.unary("Sin", &angles);
        let centre = g.scalar(d.xpos_centre() as f32, DType::F32)?;
        let base = g.scalar(d.xpos_scale_base as f32, DType::F32)?;
        let expo = g.sub(&pf, &centre)?;
        let expo = g.div(&expo, &base)?;
        let scale = g.pow(&zeta, &expo)?; // [b, s, hd]
        let inv_scale = g.unary("Reciprocal", &scale);
        let table =
            |g: &mut crate::onnx::builder::GraphBuilder<'_>, a: &Value, sc: &Value| -> Result<Value> {
                let v = g.mul(a, sc)?;
                let v = g.unsqueeze(&v, &[1])?;
                Ok(g.cast(&v, dt))
            };
        pos.q_cos = Some(table(g, &cos, &scale)?);
        pos.q_sin = Some(table(g, &sin, &scale)?);
        pos.k_cos = Some(table(g, &cos, &inv_scale)?);
        pos.k_sin = Some(table(g, &sin, &inv_scale)?);
        let rot = rotate_every_two_matrix(hd);
        let rot = float_data(&rot, dt);
        pos.rotate = Some(g.constant(&[hd as i64, hd as i64], rot.data())?);
        g.scope_pop();
        Ok(pos)
    }

    /// Self-attention of one layer: returns out_proj(inner_attn_ln(attention)) and (present k, v).
    fn self_attention(
        &mut self,
        cfg: &KosmosConfig,
        layer: &str,
        h: &Value,
        pos: &Positions,
        past_k: &Value,
        past_v: &Value,
    ) -> Result<(Value, (Value, Value))> {
        let d = &cfg.decoder;
        let heads = d.decoder_attention_heads;
        let hd = d.head_dim();
        let scaling = (hd as f64).powf(-0.5) as f32;
        let a = format!("{layer}.self_attn");
        let q = self.linear(h, &format!("{a}.q_proj"), true)?;
        let k = self.linear(h, &format!("{a}.k_proj"), true)?;
        let v = self.linear(h, &format!("{a}.v_proj"), true)?;
        let total = Dim::sym("total_sequence_length");
        let (out, present) = if self.profile == Profile::Ort {
            self.in_module(&a, |l| l.ort_attention(cfg, &q, &k, &v, pos, past_k, past_v))?
        } else {
            self.in_module(&a, |l| {
                let q = l.g.mul_scalar(&q, scaling)?;
                let qh = l.split_heads(&q, heads)?;
                let kh = l.split_heads(&k, heads)?;
                let vh = l.split_heads(&v, heads)?;
                let (qh, kh) = if l.profile == Profile::Trt {
                    (l.xpos_op(cfg, &qh, pos, false)?, l.xpos_op(cfg, &kh, pos, true)?)
                } else {
                    let rot = pos.rotate.as_ref().expect("portable tables");
                    (
                        l.xpos(&qh, rot, pos.q_cos.as_ref().unwrap(), pos.q_sin.as_ref().unwrap())?,
                        l.xpos(&kh, rot, pos.k_cos.as_ref().unwrap(), pos.k_sin.as_ref().unwrap())?,
                    )
                };
                let (keys, values) = match &pos.cache {
                    CacheWrite::Kernel(past_len) => {
                        l.g.use_domain(kosmos_plugins::DOMAIN, kosmos_plugins::DOMAIN_VERSION);
                        let outs = l.g.node_in(
                            kosmos_plugins::DOMAIN,
                            kosmos_plugins::cached::OP,
                            &[
                                Some(&qh),
                                Some(&kh),
                                Some(&vh),
                                Some(past_k),
                                Some(past_v),
                                Some(past_len),
                                Some(&pos.visible),
                            ],
                            vec![],
                            vec![
                                (qh.dtype, qh.shape.clone()),
                                (past_k.dtype, past_k.shape.clone()),
                                (past_v.dtype, past_v.shape.clone()),
                            ],
                        );
                        let mut it = outs.into_iter();
                        let (out, k, v) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
                        return Ok((l.merge_heads(&out)?, (k, v)));
                    }
                    // Written in place when the runtime binds one buffer as past and present.
                    CacheWrite::Scatter(idx) => {
                        let k = l.g.node(
                            "ScatterND",
                            &[past_k, idx, &kh],
                            vec![],
                            kh.dtype,
                            past_k.shape.clone(),
                        );
                        let v = l.g.node(
                            "ScatterND",
                            &[past_v, idx, &vh],
                            vec![],
                            vh.dtype,
                            past_v.shape.clone(),
                        );
                        (k, v)
                    }
                    CacheWrite::Concat => (
                        l.g.concat(&[past_k, &kh], 2, total.clone()),
                        l.g.concat(&[past_v, &vh], 2, total.clone()),
                    ),
                };
                let kt = l.g.transpose(&keys, &[0, 1, 3, 2]);
                let scores = l.g.matmul(&qh, &kt)?;
                // A finite fill keeps rows with no visible key (left-padding queries) free of NaN.
                let scores = l.g.cast(&scores, DType::F32);
                let lowest = l.g.scalar(f32::MIN, DType::F32)?;
                let scores = l.g.where_(&pos.visible, &scores, &lowest)?;
                let probs = l.g.softmax(&scores);
                let probs = l.g.cast(&probs, l.dtype());
                let out = l.g.matmul(&probs, &values)?;
                Ok((l.merge_heads(&out)?, (keys, values)))
            })?
        };
        let out = self.layer_norm(&out, &format!("{a}.inner_attn_ln"), d.layernorm_eps)?;
        let out = self.linear(&out, &format!("{a}.out_proj"), true)?;
        Ok((out, present))
    }

    /// `ai.kosmos::XPos` on heads [b, h, s, hd] (queries, or keys when `keys`).
    fn xpos_op(&mut self, cfg: &KosmosConfig, x: &Value, pos: &Positions, keys: bool) -> Result<Value> {
        let d = &cfg.decoder;
        let attrs = super::kosmos_ops::xpos_attributes(&super::kosmos_ops::XposNodeAttrs {
            theta: super::kosmos_ops::XPOS_THETA,
            scale_base: d.xpos_scale_base as f32,
            centre: d.xpos_centre() as f32,
            downscale: keys,
        });
        self.g
            .use_domain(kosmos_plugins::DOMAIN, kosmos_plugins::DOMAIN_VERSION);
        let name = if keys { "xpos_k" } else { "xpos_q" };
        self.g.scope_push(name);
        let y = self
            .g
            .node_in(
                kosmos_plugins::DOMAIN,
                kosmos_plugins::xpos::OP,
                &[Some(x), Some(&pos.ids)],
                attrs,
                vec![(x.dtype, x.shape.clone())],
            )
            .remove(0);
        self.g.scope_pop();
        Ok(y)
    }

    /// x·cos + rotate_every_two(x)·sin with the pair rotation as a matrix product.
    fn xpos(&mut self, x: &Value, rot: &Value, cos: &Value, sin: &Value) -> Result<Value> {
        self.g.scope_push("xpos");
        let r = self.g.matmul(x, rot);
        let out = r.and_then(|r| {
            let a = self.g.mul(x, cos)?;
            let b = self.g.mul(&r, sin)?;
            self.g.add(&a, &b)
        });
        self.g.scope_pop();
        out
    }

    /// ONNX Runtime contrib ops: RotaryEmbedding with xPos-scaled caches for q and k, then
    /// MultiHeadAttention with the cache and an additive visibility bias.
    #[allow(clippy::too_many_arguments)]
    fn ort_attention(
        &mut self,
        cfg: &KosmosConfig,
        q: &Value,
        k: &Value,
        v: &Value,
        pos: &Positions,
        past_k: &Value,
        past_v: &Value,
    ) -> Result<(Value, (Value, Value))> {
        let d = &cfg.decoder;
        let heads = d.decoder_attention_heads as i64;
        let hd = d.head_dim();
        let dt = self.dtype();
        let w = self.w;
        self.g.use_domain(MS_DOMAIN, 1);
        // Shared by all layers: cos/sin caches with the xPos scale folded in, per position.
        let tables = XposTables::new(hd, d.xpos_scale_base, d.xpos_centre());
        let caches = tables.caches(d.max_target_positions);
        let shape = [d.max_target_positions, hd / 2];
        let mut cache = |name: &str, values: &[f32]| -> Result<Value> {
            let key = format!("{DECODER}.xpos.{name}");
            if let Some(v) = self.g.find_initializer(&key) {
                return Ok(v);
            }
            w.put(&mut self.g, &key, &shape, values)
        };
        let q_cos = cache("q_cos_cache", &caches.q_cos)?;
        let q_sin = cache("q_sin_cache", &caches.q_sin)?;
        let k_cos = cache("k_cos_cache", &caches.k_cos)?;
        let k_sin = cache("k_sin_cache", &caches.k_sin)?;
        let rotary = |g: &mut crate::onnx::builder::GraphBuilder<'_>, x: &Value, c: &Value, s: &Value| {
            g.node_in(
                MS_DOMAIN,
                "RotaryEmbedding",
                &[Some(x), Some(&pos.ids), Some(c), Some(s)],
                vec![("interleaved", Attr::Int(1)), ("num_heads", Attr::Int(heads))],
                vec![(dt, x.shape.clone())],
            )
            .remove(0)
        };
        let qr = rotary(&mut self.g, q, &q_cos, &q_sin);
        let kr = rotary(&mut self.g, k, &k_cos, &k_sin);
        let total = Dim::sym("total_sequence_length");
        let present_shape = shape![&q.shape[0], heads, &total, hd];
        let outs = self.g.node_in(
            MS_DOMAIN,
            "MultiHeadAttention",
            &[
                Some(&qr),
                Some(&kr),
                Some(v),
                None,
                None,
                Some(&pos.visible),
                Some(past_k),
                Some(past_v),
            ],
            vec![
                ("num_heads", Attr::Int(heads)),
                ("scale", Attr::Float((hd as f64).powf(-0.5) as f32)),
            ],
            vec![
                (dt, q.shape.clone()),
                (dt, present_shape.clone()),
                (dt, present_shape),
            ],
        );
        let mut it = outs.into_iter();
        let (o, pk, pv) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        Ok((o, (pk, pv)))
    }
}

/// xPos constants for head size `hd` (DESIGN §3), computed in f32 like torchscale.
pub struct XposTables {
    /// θ_i = 1 / 10000^(i / (hd/2)), each repeated for its pair.
    pub inv_freq_interleaved: Vec<f32>,
    /// ζ_i = (2i + 0.4 hd) / (1.4 hd), each repeated for its pair.
    pub zeta_interleaved: Vec<f32>,
    centre: f32,
    base: f32,
}

pub struct XposCaches {
    pub q_cos: Vec<f32>,
    pub q_sin: Vec<f32>,
    pub k_cos: Vec<f32>,
    pub k_sin: Vec<f32>,
}

impl XposTables {
    pub fn new(hd: usize, scale_base: f64, centre: f64) -> Self {
        let half = hd / 2;
        let mut inv_freq = Vec::with_capacity(hd);
        let mut zeta = Vec::with_capacity(hd);
        for i in 0..half {
            let f = 1.0 / 10000f32.powf(i as f32 / half as f32);
            let z = ((2 * i) as f32 + 0.4 * hd as f32) / (1.4 * hd as f32);
            inv_freq.extend([f, f]);
            zeta.extend([z, z]);
        }
        XposTables {
            inv_freq_interleaved: inv_freq,
            zeta_interleaved: zeta,
            centre: centre as f32,
            base: scale_base as f32,
        }
    }

    /// Per-position [positions, hd/2] caches with the xPos scale folded in (ζ^(±(t−c)/base)).
    pub fn caches(&self, positions: usize) -> XposCaches {
        let half = self.inv_freq_interleaved.len() / 2;
        let mut c = XposCaches {
            q_cos: Vec::with_capacity(positions * half),
            q_sin: Vec::with_capacity(positions * half),
            k_cos: Vec::with_capacity(positions * half),
            k_sin: Vec::with_capacity(positions * half),
        };
        for t in 0..positions {
            let tf = t as f32;
            let expo = (tf - self.centre) / self.base;
            for i in 0..half {
                let angle = tf * self.inv_freq_interleaved[2 * i];
                let scale = self.zeta_interleaved[2 * i].powf(expo);
                let inv = 1.0 / scale;
                c.q_cos.push(angle.cos() * scale);
                c.q_sin.push(angle.sin() * scale);
                c.k_cos.push(angle.cos() * inv);
                c.k_sin.push(angle.sin() * inv);
            }
        }
        c
    }
}

/// R with x·R = (−x1, x0, −x3, x2, ...).
fn rotate_every_two_matrix(hd: usize) -> Vec<f32> {
    let mut r = vec![0f32; hd * hd];
    for i in 0..hd / 2 {
        r[(2 * i + 1) * hd + 2 * i] = -1.0; // out[2i] = −x[2i+1]
        r[(2 * i) * hd + 2 * i + 1] = 1.0; // out[2i+1] = x[2i]
    }
    r
}
