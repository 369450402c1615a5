//! Continuous (in-flight) batching over a buffer-layout package (`kosmos-export --kv-cache
//! buffer`), the engine behind `kosmos-rt serve`.
//!
//! One loop owns the package. Each iteration it admits waiting sequences into free rows of a KV
//! pool (their images through the vision cache) or runs the next chunk of their batched prefill,
//! then steps every running sequence by one token in one decoder call, then retires the finished
//! ones. The decoder's `past_sequence_length` is per row, so rows at different lengths share a
//! call.
//!
//! Chunked prefill: a group's prompts are written at most `prefill_chunk` tokens (rows × width)
//! per call, with a decode step of the running sequences between chunks, so a long prompt delays
//! their next tokens by one chunk and not by its whole prefill, and the prefill's activations
//! (attention scores grow with chunk × capacity) stay bounded.
//!
//! The pool is one buffer per layer and key/value, [rows, heads, capacity, head_dim]. Running
//! sequences occupy rows `0..n` (a retired row is refilled by moving the last one down), so a
//! call binds views of a contiguous prefix (decode) or of the rows just admitted (prefill) as
//! both `past_key_values.*` and `present.*`: ONNX Runtime writes the new keys and values in place
//! and nothing is copied per step. The capacity follows the longest reservation (prompt width +
//! `max_tokens`) among running sequences: standard-op attention spans the whole capacity for
//! every row, `ai.kosmos::CachedAttention` (`--cached-attention`) each row's own keys.
//!
//! Log-probabilities (`SeqRequest::logprobs`, `prompt_logprobs`) come from the logits before any
//! sampling adjustment; a group with a prompt to score prefills with every position's logits.
//! A sequence with `max_tokens` 0 only scores its prompt: it ends when its prefill does.
//! Finished sequences' keys and values go to the [`PrefixCache`]; an admitted prompt copies its
//! longest cached prefix into its row and the group's prefill starts after the cached parts.
//!
//! Speculative decoding ([`crate::speculate`], when the package has it on and at most its
//! `max_batch` sequences run): a decode step feeds each row its next token and its guesses,
//! samples every position in order and keeps the guesses the sampler picked; the rest of the
//! slots written are beyond the row's mask and written over by its next call. With a draft
//! model the guesses are the draft's, made for every row in the same calls on a pool of its
//! own whose rows move with these ([`crate::draft_batch`]).

use std::collections::{HashMap, VecDeque};
use std::ffi::{CStr, CString};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::time::Instant;

use half::f16;
use kosmos_models::package::{KvCacheLayout, KvDtype, io};
use kosmos_models::sequence::Assembled;
use ort::AsPointer;
use ort::memory::MemoryInfo;
use ort::session::IoBinding;
use ort::value::{DynTensor, DynValueRefMut, Shape, Tensor, TensorRefMut};

use crate::draft_batch::{Ask, DraftRows, DraftSlot};
use crate::error::{Result, RtError};
use crate::generate::{FinishReason, GenerateParams, RowState, VisionCache, last_positions, logits_to_keep};
use crate::generate::{filled, image_hash};
use crate::logprobs::{TokenLogprob, token_logprob};
use crate::metrics::Metrics;
use crate::package::Package;
use crate::prefix_cache::{PositionKey, PrefixCache, image_key, token_key};
use crate::speculate::Speculation;

/// One sequence to generate: an assembled prompt, its preprocessed images, and where its output
/// goes.
pub struct SeqRequest {
    pub assembled: Assembled,
    /// CLIP-preprocessed pixels of each image, in prompt order.
    pub pixels: Vec<Vec<f32>>,
    pub params: GenerateParams,
    /// Report each generated token's log-probability with this many alternatives (OpenAI's
    /// `logprobs`; at most [`crate::logprobs::MAX_TOP_LOGPROBS`]), or nothing (`None`).
    pub logprobs: Option<usize>,
    /// Report the prompt's tokens' log-probabilities too, with this many alternatives (OpenAI's
    /// `echo` with `logprobs`), in one [`SeqEvent::PromptLogprobs`] before any text.
    pub prompt_logprobs: Option<usize>,
    /// Admission order among waiting sequences: lower first (vLLM's `priority`), equal ones in
    /// arrival order. With [`EngineConfig::priority_preemption`] a running sequence gives its
    /// row to a more urgent waiting one and resumes later where it was.
    pub priority: i64,
    pub arrived: Instant,
    /// Past this instant the sequence ends with [`SeqFailure::Timeout`].
    pub deadline: Option<Instant>,
    /// Set by the requester (e.g. a disconnected client); the sequence ends and frees its row.
    pub cancel: Arc<AtomicBool>,
    /// Receives the sequence's events, the last of them always one `Done` (finish reason
    /// `Cancelled` when cancelled, however early) or `Failed`; returning false cancels it.
    pub sink: Box<dyn FnMut(SeqEvent) -> bool + Send>,
}

#[derive(Clone, Debug)]
pub enum SeqEvent {
    /// New text (stop strings held back until they cannot match), with the log-probabilities of
    /// the tokens generated since the last `Text` when the request asked for them. A token whose
    /// text never shows (cut by a stop string) still has its entry, in a last `Text` whose text
    /// may be empty.
    Text {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    /// Each prompt token (its id) with its log-probability given the tokens before it: `None`
    /// for the first token and for image slots.
    PromptLogprobs(Vec<(u32, Option<TokenLogprob>)>),
    Done(SeqSummary),
    Failed(SeqFailure),
}

#[derive(Clone, Debug)]
pub struct SeqSummary {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache instead of being
    /// computed (OpenAI's `cached_tokens`); a sequence sharing another's prefill (same prompt,
    /// same admission) counts what that one did.
    pub cached_tokens: usize,
}

impl SeqSummary {
    /// The end of a sequence cancelled while it waited: before it generated anything, or, if
    /// preempted (`resume`), after what it generated until then.
    fn cancelled(req: &SeqRequest, resume: Option<Resume>) -> Self {
        match resume {
            None => SeqSummary {
                text: String::new(),
                tokens: Vec::new(),
                finish_reason: FinishReason::Cancelled,
                prompt_tokens: req.assembled.len(),
                cached_tokens: 0,
            },
            Some(r) => SeqSummary {
                text: r.state.text,
                tokens: r.state.tokens,
                finish_reason: FinishReason::Cancelled,
                prompt_tokens: r.prompt_len,
                cached_tokens: r.cached_tokens,
            },
        }
    }
}

/// What a waiting sequence that leaves the engine counts: its own prompt and the tokens it
/// generated before a preemption, not the prompt it waited with.
fn counted(req: &SeqRequest, resume: Option<&Resume>) -> (usize, usize) {
    resume.map_or((req.assembled.len(), 0), |r| (r.prompt_len, r.state.tokens.len()))
}

#[derive(Clone, Debug)]
pub enum SeqFailure {
    Timeout,
    Engine(String),
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Rows of the KV pool: sequences decoded together.
    pub max_batch: usize,
    /// Images whose embeddings are kept.
    pub vision_cache: usize,
    /// Most prompt tokens (rows × width, padding included) one prefill call writes; a longer
    /// group's prefill is split, with a decode step between chunks. 0: one call per group.
    pub prefill_chunk: usize,
    /// Allocate (and fault in) the KV pool for `max_batch` x the whole context up front, so
    /// that no request waits for it to grow; memory: max_batch x context x 2 x layers x hidden
    /// x element size. A draft model's pool too.
    pub kv_preallocate: bool,
    /// Bytes of finished sequences' keys and values kept for prompts that start the same way
    /// (see [`crate::prefix_cache`]); 0 turns prefix caching off.
    pub prefix_cache_bytes: usize,
    /// When every row is taken and a waiting sequence is more urgent (lower `priority`) than a
    /// running one, the least urgent running sequence gives up its row (vLLM's recompute
    /// preemption): its keys and values go to the prefix cache, it waits with its prompt and
    /// generated tokens as its prompt, and resumes with its own sampler state, so what it
    /// generates does not change.
    pub priority_preemption: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch: 8,
            vision_cache: 256,
            prefill_chunk: 512,
            kv_preallocate: false,
            prefix_cache_bytes: 512 << 20,
            priority_preemption: true,
        }
    }
}

/// A running sequence (its pool row is its index in `Engine::running`).
struct Running {
    req: SeqRequest,
    state: RowState,
    /// Attention mask of the slots written so far (left padding of its prefill group is 0).
    mask: Vec<i64>,
    /// The token to feed at the next step.
    next: i64,
    /// Slots this sequence may use (prefill width + max_tokens).
    reserved: usize,
    last_token_at: Option<Instant>,
    /// Log-probabilities of tokens whose text has not been sent yet.
    pending_logprobs: Vec<TokenLogprob>,
    /// The prompt's position keys, for the prefix cache (empty when it is off).
    keys: Vec<PositionKey>,
    /// Why the sequence cannot go on (reported as `Failed` when it retires).
    failure: Option<String>,
    /// Its prompt tokens that the prefix cache gave (see [`SeqSummary::cached_tokens`]).
    cached_tokens: usize,
    /// Its prompt's length: `req.assembled` also holds tokens generated before a preemption.
    prompt_len: usize,
    /// Its row in the draft model's pool, read at its first guess (dropped when it is
    /// preempted; a resumed sequence's draft reads its prompt and output again).
    draft: DraftSlot,
}

/// What a preempted sequence resumes with when it gets a row again.
struct Resume {
    /// The sequence's cancel flag, held so that its address (the key) cannot be reused by
    /// another sequence while this waits.
    _key: Arc<AtomicBool>,
    state: RowState,
    pending_logprobs: Vec<TokenLogprob>,
    last_token_at: Option<Instant>,
    prompt_len: usize,
    cached_tokens: usize,
}

/// A sequence's identity while it waits (its cancel flag is its own).
fn seq_key(req: &SeqRequest) -> usize {
    Arc::as_ptr(&req.cancel) as usize
}

/// A group of admitted sequences being prefilled, chunk by chunk, in pool rows
/// `first..first + group.len()` (after the running rows; moved down to join them when done).
struct Prefill {
    group: Vec<SeqRequest>,
    first: usize,
    /// The group's padded prompt width (prompts are left-padded to it).
    width: usize,
    /// Positions `0..written` of every row are in the cache.
    written: usize,
    /// Where the prefill calls began: each row's prompt slots before it came from the prefix
    /// cache.
    start: usize,
    /// [rows, width]: token ids, image slots, real (1) or padding (0).
    ids: Vec<i64>,
    image_mask: Vec<bool>,
    real: Vec<i64>,
    /// [rows, n_tok, hidden]: each row's image embeddings in prompt order.
    embeds: Vec<f32>,
    n_tok: usize,
    /// Per row asking for prompt log-probabilities: one entry per prompt token, filled chunk by
    /// chunk.
    prompt_logprobs: Vec<Option<Vec<Option<TokenLogprob>>>>,
    /// Each row's position keys (empty when the prefix cache is off).
    keys: Vec<Vec<PositionKey>>,
    /// Admitted with a prompt identical to that of `group[i]` (the index given): no row of
    /// their own in the prefill calls; they copy that row when it is done.
    followers: Vec<(SeqRequest, usize)>,
}

impl Prefill {
    /// Every admitted sequence: the prefilled ones, then their followers.
    fn into_requests(self) -> impl Iterator<Item = SeqRequest> {
        self.group
            .into_iter()
            .chain(self.followers.into_iter().map(|(r, _)| r))
    }
}

impl Prefill {
    /// Prompt log-probabilities from the logits of positions `from..to` ([rows, to − from,
    /// vocab]): position j's logits score the token at j + 1.
    fn score_prompts(&mut self, from: usize, to: usize, logits: &[f32], vocab: usize) {
        let (w, s) = (self.width, to - from);
        for (r, req) in self.group.iter().enumerate() {
            let (Some(top), Some(out)) = (req.prompt_logprobs, self.prompt_logprobs[r].as_mut()) else {
                continue;
            };
            let pad = w - req.assembled.len();
            for j in from.max(pad)..to.min(w - 1) {
                let next = j + 1;
                if self.image_mask[r * w + next] {
                    continue;
                }
                let at = (r * s + j - from) * vocab;
                let tok = self.ids[r * w + next] as u32;
                out[next - pad] = Some(token_logprob(&logits[at..at + vocab], tok, top));
            }
        }
    }
}

impl Prefill {
    /// Inputs of the call writing positions `from..to` of every row, with a mask over
    /// `capacity` slots. A row's image slots in that range take its next image embeddings.
    fn chunk(&self, from: usize, to: usize, capacity: usize, dm: usize) -> Call {
        let (m, w, s) = (self.group.len(), self.width, to - from);
        let slots_in = |r: usize, a: usize, b: usize| {
            self.image_mask[r * w + a..r * w + b]
                .iter()
                .filter(|&&x| x)
                .count()
        };
        let n_tok = (0..m).map(|r| slots_in(r, from, to)).max().unwrap_or(0).max(1);
        let mut embeds = vec![0f32; m * n_tok * dm];
        let mut ids = Vec::with_capacity(m * s);
        let mut image_mask = Vec::with_capacity(m * s);
        let mut mask = vec![0i64; m * capacity];
        for r in 0..m {
            let (before, count) = (slots_in(r, 0, from), slots_in(r, from, to));
            let src = (r * self.n_tok + before) * dm;
            embeds[r * n_tok * dm..(r * n_tok + count) * dm]
                .copy_from_slice(&self.embeds[src..src + count * dm]);
            ids.extend_from_slice(&self.ids[r * w + from..r * w + to]);
            image_mask.extend_from_slice(&self.image_mask[r * w + from..r * w + to]);
            mask[r * capacity..r * capacity + to].copy_from_slice(&self.real[r * w..r * w + to]);
        }
        Call {
            ids,
            s,
            embeds,
            n_tok,
            image_mask,
            mask,
            past: vec![from as i64; m],
        }
    }
}

/// Split `group` into the candidates to prefill and the requests whose prompt (tokens, image
/// slots and image content) equals an earlier one's and that do not ask for their prompt's
/// log-probabilities, each with the index of the candidate whose prefill it will copy.
/// A resumed sequence (`resumed`) always leads: its state must meet its own row.
fn split_identical(
    group: Vec<Candidate>,
    resumed: impl Fn(&SeqRequest) -> bool,
) -> (Vec<Candidate>, Vec<(SeqRequest, usize)>) {
    let mut leaders: Vec<Candidate> = Vec::with_capacity(group.len());
    let mut followers = Vec::new();
    for c in group {
        let same = leaders.iter().position(|l| {
            l.req.assembled.input_ids == c.req.assembled.input_ids
                && l.req.assembled.image_mask == c.req.assembled.image_mask
                && l.hashes == c.hashes
        });
        match same {
            Some(i) if c.req.prompt_logprobs.is_none() && !resumed(&c.req) => followers.push((c.req, i)),
            _ => leaders.push(c),
        }
    }
    (leaders, followers)
}

/// What admission works out for a waiting sequence before it joins a group.
struct Candidate {
    req: SeqRequest,
    /// Content hash of each of its images, in prompt order.
    hashes: Vec<[u8; 32]>,
    /// Its prompt's position keys (empty when the prefix cache is off).
    keys: Vec<PositionKey>,
    /// Prompt tokens whose keys and values the prefix cache holds and will give.
    cached: usize,
}

/// Tokens by which a group's longest uncached prompt part may exceed twice its shortest: short
/// prompts are batched whatever their lengths (a call's fixed cost dominates there).
const GROUP_LENGTH_SLACK: usize = 32;

/// The KV pool: per layer a key and a value buffer laid out [rows, heads, capacity, head_dim].
///
/// The buffers only grow. Faulting fresh memory in is what a resize costs (4.6 GB took 12 s on
/// the 2-core development VM, 9.5 s of it the kernel's first touch of the pages), so a layout
/// that fits in the buffers already allocated is rearranged in place, and the capacity can
/// follow the running sequences down and up again for free.
pub(crate) struct KvPool {
    /// Flat buffers of `allocated` elements each.
    tensors: Vec<DynTensor>,
    /// Data pointers of `tensors` (stable while they live), as integers so the pool is `Send`.
    bases: Vec<usize>,
    allocated: usize,
    pub(crate) rows: usize,
    pub(crate) capacity: usize,
    heads: usize,
    /// Elements of one slot of one head: head_dim, and one more in an int8 row (its exponent).
    slot_elems: usize,
    dtype: KvDtype,
}

impl KvPool {
    pub(crate) fn empty(heads: usize, head_dim: usize, dtype: KvDtype) -> Self {
        KvPool {
            tensors: Vec::new(),
            bases: Vec::new(),
            allocated: 0,
            rows: 0,
            capacity: 0,
            heads,
            slot_elems: dtype.row_len(head_dim),
            dtype,
        }
    }

    fn elem(&self) -> usize {
        self.dtype.element_bytes()
    }

    /// Bytes of one (row, head) run of `slots` slots.
    pub(crate) fn run_bytes(&self, slots: usize) -> usize {
        slots * self.slot_elems * self.elem()
    }

    /// Byte offset of slot 0 of (row, head) at `capacity`.
    fn offset(&self, row: usize, head: usize, capacity: usize) -> usize {
        (row * self.heads + head) * capacity * self.slot_elems * self.elem()
    }

    /// Lay the pool out as `rows` x `capacity`, keeping the first `used[r]` slots of rows
    /// `0..used.len()` (each within `capacity`). Unused slots must hold finite values (they are
    /// masked, but a NaN would survive the mask): new buffers are zeroed, and rearranged ones
    /// hold zeros or earlier keys and values.
    pub(crate) fn resize(
        &mut self,
        pkg: &Package,
        tensors: usize,
        rows: usize,
        capacity: usize,
        used: &[usize],
    ) -> Result<()> {
        let elems = rows * self.heads * capacity * self.slot_elems;
        if self.tensors.len() == tensors && elems <= self.allocated {
            self.relayout(rows, capacity, used);
            return Ok(());
        }
        let alloc = pkg.decoder.allocator();
        let shape = [elems as i64];
        let mut new = Vec::with_capacity(tensors);
        let mut bases = Vec::with_capacity(tensors);
        for i in 0..tensors {
            let mut t: DynTensor = match self.dtype {
                KvDtype::Fp32 => filled::<f32>(alloc, shape, None)?,
                KvDtype::Fp16 => filled::<f16>(alloc, shape, None)?,
                KvDtype::Int8 => filled::<i8>(alloc, shape, None)?,
            }
            .downcast()?;
            let dst = t.data_ptr_mut() as usize;
            if let Some(&src) = self.bases.get(i) {
                for (r, &u) in used.iter().enumerate() {
                    for h in 0..self.heads {
                        // SAFETY: both runs lie inside their buffers (r < rows of each, u ≤ both
                        // capacities) and the buffers are distinct allocations.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                (src + self.offset(r, h, self.capacity)) as *const u8,
                                (dst + self.offset(r, h, capacity)) as *mut u8,
                                self.run_bytes(u),
                            );
                        }
                    }
                }
            }
            bases.push(dst);
            new.push(t);
        }
        self.tensors = new;
        self.bases = bases;
        self.allocated = elems;
        self.rows = rows;
        self.capacity = capacity;
        Ok(())
    }

    /// Rearrange the used slots for `capacity` within the allocated buffers.
    fn relayout(&mut self, rows: usize, capacity: usize, used: &[usize]) {
        let (old, new) = (self.capacity, capacity);
        // Run j = (row, head) moves from j·old to j·new slots. Growing moves runs up, so the last
        // goes first; shrinking moves them down, so the first goes first: no run is overwritten
        // before it has moved (`copy` allows a run to overlap its own old place).
        let mut runs: Vec<(usize, usize)> = used
            .iter()
            .enumerate()
            .flat_map(|(r, &u)| (0..self.heads).map(move |h| (r, h, u)))
            .map(|(r, h, u)| (r * self.heads + h, u))
            .collect();
        if new > old {
            runs.reverse();
        }
        let slot = self.slot_elems * self.elem();
        for &base in &self.bases {
            for &(j, u) in &runs {
                debug_assert!(u <= old && u <= new);
                // SAFETY: both runs lie within the allocation: j < rows·heads of either layout,
                // whose elements fit in `allocated` (checked by the caller).
                unsafe {
                    std::ptr::copy(
                        (base + j * old * slot) as *const u8,
                        (base + j * new * slot) as *mut u8,
                        u * slot,
                    );
                }
            }
        }
        self.rows = rows;
        self.capacity = capacity;
    }

    /// Copy the first `used` slots of row `from` to row `to`.
    pub(crate) fn move_row(&mut self, from: usize, to: usize, used: usize) {
        for &base in &self.bases {
            for h in 0..self.heads {
                // SAFETY: distinct rows of one buffer, runs within the capacity.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (base + self.offset(from, h, self.capacity)) as *const u8,
                        (base + self.offset(to, h, self.capacity)) as *mut u8,
                        self.run_bytes(used),
                    );
                }
            }
        }
    }

    /// The keys and values of row `row`'s slots `slots`: per buffer, [heads, slots, head_dim].
    fn copy_out(&self, row: usize, slots: Range<usize>) -> Vec<Vec<u8>> {
        let slot = self.run_bytes(1);
        self.bases
            .iter()
            .map(|&base| {
                let mut out = Vec::with_capacity(self.heads * slots.len() * slot);
                for h in 0..self.heads {
                    let at = base + self.offset(row, h, self.capacity) + slots.start * slot;
                    // SAFETY: the run lies within row `row` of a live buffer (slots.end ≤ capacity).
                    out.extend_from_slice(unsafe {
                        std::slice::from_raw_parts(at as *const u8, slots.len() * slot)
                    });
                }
                out
            })
            .collect()
    }

    /// Write the first `n` slots of `from` (per buffer [heads, len, head_dim], as `copy_out`
    /// returns) into row `row` from slot `at` on.
    fn copy_in(&mut self, row: usize, at: usize, from: &[Vec<u8>], len: usize, n: usize) {
        let slot = self.run_bytes(1);
        debug_assert!(n <= len && at + n <= self.capacity);
        for (&base, src) in self.bases.iter().zip(from) {
            for h in 0..self.heads {
                let run = &src[h * len * slot..(h * len + n) * slot];
                // SAFETY: the destination run lies within row `row` of a live buffer (at + n ≤
                // capacity) and the source is a distinct allocation.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        run.as_ptr(),
                        (base + self.offset(row, h, self.capacity) + at * slot) as *mut u8,
                        run.len(),
                    );
                }
            }
        }
    }

    /// A tensor over rows `rows` of buffer `i`, sharing its memory.
    fn view(&self, i: usize, rows: &Range<usize>) -> Result<DynValueRefMut<'_>> {
        let info: MemoryInfo = self.tensors[i].memory_info().clone();
        let ptr = (self.bases[i] + self.offset(rows.start, 0, self.capacity)) as *mut std::ffi::c_void;
        let shape = Shape::new([
            rows.len() as i64,
            self.heads as i64,
            self.capacity as i64,
            self.slot_elems as i64,
        ]);
        // SAFETY: the view covers rows.start..rows.end of a live buffer of `self.rows` rows, and
        // its lifetime is tied to `&self`, so the buffer outlives it.
        Ok(unsafe {
            match self.dtype {
                KvDtype::Fp32 => TensorRefMut::<f32>::from_raw(info, ptr.cast(), shape)?.into_dyn(),
                KvDtype::Fp16 => TensorRefMut::<f16>::from_raw(info, ptr.cast(), shape)?.into_dyn(),
                KvDtype::Int8 => TensorRefMut::<i8>::from_raw(info, ptr.cast(), shape)?.into_dyn(),
            }
        })
    }
}

/// Bind `value` as input `name` without the copy `IoBinding::bind_input` makes of borrowed
/// tensors: the pool buffers are meant to be read and written in place.
fn bind_input_in_place(binding: &mut IoBinding, name: &str, value: &DynValueRefMut<'_>) -> Result<()> {
    let api = ort::api();
    let name = CString::new(name).map_err(|e| RtError::Input(e.to_string()))?;
    // SAFETY: both pointers are live for the call; ONNX Runtime keeps its own reference to the
    // OrtValue, and the caller keeps the memory alive until the run has finished.
    let status = unsafe { (api.BindInput)(binding.ptr_mut(), name.as_ptr(), value.ptr()) };
    if status.0.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null status carries a message; it is released once read.
    let message = unsafe {
        let m = CStr::from_ptr((api.GetErrorMessage)(status.0))
            .to_string_lossy()
            .into_owned();
        (api.ReleaseStatus)(status.0);
        m
    };
    Err(RtError::Ort(message))
}

/// Inputs of one decoder call over a range of pool rows.
pub(crate) struct Call {
    pub ids: Vec<i64>,
    /// Tokens per row.
    pub s: usize,
    pub embeds: Vec<f32>,
    /// Image-embedding tokens per row (≥ 1).
    pub n_tok: usize,
    pub image_mask: Vec<bool>,
    /// [rows, capacity].
    pub mask: Vec<i64>,
    pub past: Vec<i64>,
}

impl Call {
    /// A call that feeds tokens only (`s` per row, no image slot) to the rows of `past`, whose
    /// hidden size is `dm`: the image embeddings are one zero row each, never read.
    pub(crate) fn text(ids: Vec<i64>, s: usize, dm: usize, mask: Vec<i64>, past: Vec<i64>) -> Self {
        let rows = past.len();
        Call {
            ids,
            s,
            embeds: vec![0f32; rows * dm],
            n_tok: 1,
            image_mask: vec![false; rows * s],
            mask,
            past,
        }
    }
}

pub struct Engine {
    pkg: Package,
    /// The package's draft model, when it has one, with a row per running sequence: guesses
    /// instead of prompt lookup.
    draft: Option<DraftRows>,
    config: EngineConfig,
    vision: VisionCache,
    pool: KvPool,
    running: Vec<Running>,
    /// At most one group prefills at a time; none is admitted meanwhile.
    prefill: Option<Prefill>,
    pending: VecDeque<SeqRequest>,
    /// Preempted sequences among `pending`, by [`seq_key`].
    resumes: HashMap<usize, Resume>,
    prefix: PrefixCache,
    metrics: Arc<Metrics>,
}

impl Engine {
    /// An engine over `pkg`, which must use the buffer KV layout.
    pub fn new(mut pkg: Package, config: EngineConfig, metrics: Arc<Metrics>) -> Result<Self> {
        if pkg.manifest.decoder.kv_cache != KvCacheLayout::Buffer {
            return Err(RtError::Package {
                path: pkg.dir.clone(),
                message: "continuous batching needs a decoder that updates its KV cache in place; \
                          re-export with `kosmos-export <ckpt> --to onnx --kv-cache buffer`"
                    .into(),
            });
        }
        if config.max_batch == 0 {
            return Err(RtError::Input("max_batch must be at least 1".into()));
        }
        let draft = pkg.draft.take();
        if let Some(d) = &draft {
            // Requests come preprocessed for the model; the draft reads the same pixels.
            let (ours, its) = (
                pkg.manifest.preprocess.image_size,
                d.pkg.manifest.preprocess.image_size,
            );
            if ours != its {
                return Err(RtError::Package {
                    path: d.dir().to_path_buf(),
                    message: format!(
                        "the draft's vision tower takes {its} px images and the model's {ours} px; \
                         the batching engine gives both the same pixels"
                    ),
                });
            }
            tracing::info!(draft = %d.dir().display(), p_min = d.p_min, "speculating with a draft model");
        }
        let draft = draft
            .map(|d| DraftRows::new(*d, config.max_batch, config.kv_preallocate))
            .transpose()?;
        let d = &pkg.manifest.decoder;
        let mut pool = KvPool::empty(d.num_heads, d.head_dim, pkg.kv_dtype);
        // What a deployment sizes memory by: the cache of one token, and of every row full.
        let token_bytes = 2 * d.num_layers * pool.run_bytes(1) * d.num_heads;
        tracing::info!(
            kv_dtype = %d.kv_dtype,
            kib_per_token = token_bytes as f64 / 1024.0,
            gib_at_full_context = (token_bytes * config.max_batch * pkg.context_length()) as f64
                / (1u64 << 30) as f64,
            "KV cache"
        );
        if config.kv_preallocate {
            let (rows, capacity) = (config.max_batch, pkg.context_length());
            let t0 = Instant::now();
            pool.resize(&pkg, 2 * d.num_layers, rows, capacity, &[])?;
            tracing::info!(
                rows,
                capacity,
                ms = t0.elapsed().as_secs_f64() * 1e3,
                "KV pool preallocated"
            );
        }
        let prefix = PrefixCache::new(config.prefix_cache_bytes);
        Ok(Engine {
            vision: VisionCache::new(config.vision_cache),
            pkg,
            draft,
            config,
            pool,
            running: Vec::new(),
            prefill: None,
            pending: VecDeque::new(),
            resumes: HashMap::new(),
            prefix,
            metrics,
        })
    }

    pub fn package(&self) -> &Package {
        &self.pkg
    }

    /// Queue a sequence behind every waiting one of its priority or a more urgent one; it is
    /// admitted at the next step with a free row when it is first.
    pub fn submit(&mut self, req: SeqRequest) {
        // The queue stays sorted by priority, so this is a stable insertion.
        let at = self.pending.partition_point(|w| w.priority <= req.priority);
        self.pending.insert(at, req);
    }

    /// Nothing running, prefilling or waiting.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.prefill.is_none() && self.pending.is_empty()
    }

    /// Serve requests from `rx` until every sender is gone and the work is done. Requests sent
    /// together (a prompt's `n` choices) are queued together, so they can be admitted as one
    /// group and share a prefill.
    pub fn run(mut self, rx: Receiver<Vec<SeqRequest>>) {
        loop {
            if self.is_idle() {
                match rx.recv() {
                    Ok(rs) => rs.into_iter().for_each(|r| self.submit(r)),
                    Err(_) => return,
                }
            }
            while let Ok(rs) = rx.try_recv() {
                rs.into_iter().for_each(|r| self.submit(r));
            }
            // A bug in one step must not take the server down: fail what was in flight and go on.
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            if stepped.is_err() {
                tracing::error!("engine step panicked; failing the sequences in flight");
                self.fail_all("internal error in the engine (see the server log)");
            }
        }
    }

    /// End every running and waiting sequence with an error (their rows are free afterwards).
    fn fail_all(&mut self, message: &str) {
        let running = std::mem::take(&mut self.running);
        let prefilling: Vec<SeqRequest> = self
            .prefill
            .take()
            .map(|p| p.into_requests().collect())
            .unwrap_or_default();
        let pending = std::mem::take(&mut self.pending);
        let waiting = pending.len() as u64;
        let resumes = std::mem::take(&mut self.resumes);
        let running = running.into_iter().map(|r| {
            let counts = (r.prompt_len, r.state.tokens.len());
            (r.req, counts)
        });
        let waited = prefilling.into_iter().chain(pending).map(|req| {
            let counts = counted(&req, resumes.get(&seq_key(&req)));
            (req, counts)
        });
        for (mut req, (prompt, generated)) in running.chain(waited) {
            self.metrics.finished("error", prompt, generated);
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                (req.sink)(SeqEvent::Failed(SeqFailure::Engine(message.to_string())))
            }));
        }
        self.metrics.queue_depth.fetch_sub(waiting, Ordering::Relaxed);
        self.update_gauges();
    }

    /// Admit what fits or prefill the next chunk, then advance every running sequence by one
    /// token.
    pub fn step(&mut self) {
        self.drop_abandoned();
        if self.prefill.is_none()
            && let Err(e) = self.admit()
        {
            tracing::error!("admission failed: {e}");
        }
        if let Err(e) = self.prefill_chunk() {
            tracing::error!("prefill failed: {e}");
        }
        self.retire_finished();
        if !self.running.is_empty() {
            if let Err(e) = self.decode_step() {
                tracing::error!(
                    "decode step failed: {e}; failing {} sequences",
                    self.running.len()
                );
                for mut r in std::mem::take(&mut self.running) {
                    self.metrics
                        .finished("error", r.req.assembled.len(), r.state.tokens.len());
                    (r.req.sink)(SeqEvent::Failed(SeqFailure::Engine(e.to_string())));
                }
            }
            self.retire_finished();
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        m.active_sequences
            .store(self.running.len() as u64, Ordering::Relaxed);
        let prefilling = self.prefill.as_ref().map_or(0, |p| p.group.len() * p.written);
        let used = self.running.iter().map(|r| r.mask.len()).sum::<usize>() + prefilling;
        m.kv_slots_used.store(used as u64, Ordering::Relaxed);
        m.kv_slots_total
            .store((self.pool.rows * self.pool.capacity) as u64, Ordering::Relaxed);
        m.set_vision_cache_hits(self.vision.hits);
        m.prefix_cache_bytes
            .store(self.prefix.bytes() as u64, Ordering::Relaxed);
    }

    /// End waiting or running sequences that were cancelled or ran out of time.
    fn drop_abandoned(&mut self) {
        let now = Instant::now();
        let metrics = self.metrics.clone();
        let resumes = &mut self.resumes;
        self.pending.retain_mut(|req| {
            let cancelled = req.cancel.load(Ordering::Relaxed);
            if !cancelled && req.deadline.is_none_or(|d| now < d) {
                return true;
            }
            let resume = resumes.remove(&seq_key(req));
            let (prompt, generated) = counted(req, resume.as_ref());
            metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            if cancelled {
                metrics.finished("cancelled", prompt, generated);
                let summary = SeqSummary::cancelled(req, resume);
                (req.sink)(SeqEvent::Done(summary));
            } else {
                metrics.finished("timeout", prompt, generated);
                (req.sink)(SeqEvent::Failed(SeqFailure::Timeout));
            }
            false
        });
        for r in &mut self.running {
            if r.state.finish.is_some() {
                continue;
            }
            if r.req.cancel.load(Ordering::Relaxed) {
                r.state.finish = Some(FinishReason::Cancelled);
            }
        }
        // A prefilling group stops early only when every member is cancelled; otherwise the
        // cancelled ones retire as soon as the group joins the running batch.
        let all_cancelled = self.prefill.as_ref().is_some_and(|p| {
            p.group
                .iter()
                .chain(p.followers.iter().map(|(r, _)| r))
                .all(|r| r.cancel.load(Ordering::Relaxed))
        });
        if all_cancelled {
            for mut req in self.prefill.take().expect("checked").into_requests() {
                let resume = self.resumes.remove(&seq_key(&req));
                let (prompt, generated) = counted(&req, resume.as_ref());
                metrics.finished("cancelled", prompt, generated);
                let summary = SeqSummary::cancelled(&req, resume);
                (req.sink)(SeqEvent::Done(summary));
            }
        }
    }

    /// Take waiting sequences into free rows and prefill them together.
    fn admit(&mut self) -> Result<()> {
        if self.config.priority_preemption {
            self.preempt_for_priority();
        }
        let free = self.config.max_batch - self.running.len();
        if free == 0 || self.pending.is_empty() {
            return Ok(());
        }
        let context = self.pkg.context_length();
        // FIFO; a sequence joins the group while every member still fits its prompt width +
        // max_tokens in the context (a short prompt's slots start after the group's padding),
        // and while the group's uncached prompt parts stay alike in length: every row computes
        // the longest, so a prompt mostly in the prefix cache, or a short one, beside a long
        // one would wait for (and pay) the long one's prefill. It heads the next group instead.
        let mut group: Vec<Candidate> = Vec::new();
        let (mut width, mut most_new) = (0, 0);
        let (mut least, mut most) = (usize::MAX, 0);
        while group.len() < free {
            let Some(next) = self.pending.front() else { break };
            let w = width.max(next.assembled.len());
            let n = most_new.max(self.max_new(next));
            if w + n > context && !group.is_empty() {
                break;
            }
            let req = self.pending.pop_front().expect("front exists");
            self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            // Callers check these before queueing; a request that slipped through fails alone.
            let refused = if req.assembled.is_empty() {
                Some(RtError::Input("the prompt has no tokens".into()))
            } else if req.assembled.len() + self.max_new(&req) > context {
                Some(RtError::ContextOverflow {
                    prompt: req.assembled.len(),
                    max_new: req.params.max_tokens,
                    context,
                })
            } else {
                None
            };
            if let Some(e) = refused {
                let mut req = req;
                let resume = self.resumes.remove(&seq_key(&req));
                let (prompt, generated) = counted(&req, resume.as_ref());
                self.metrics.finished("error", prompt, generated);
                (req.sink)(SeqEvent::Failed(SeqFailure::Engine(e.to_string())));
                continue;
            }
            let c = self.candidate(req);
            let uncached = c.req.assembled.len() - c.cached;
            let (lo, hi) = (least.min(uncached), most.max(uncached));
            if !group.is_empty() && hi > 2 * lo + GROUP_LENGTH_SLACK {
                self.pending.push_front(c.req);
                self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
                break;
            }
            (least, most) = (lo, hi);
            width = w;
            most_new = n;
            group.push(c);
        }
        if group.is_empty() {
            return Ok(());
        }
        self.start_prefill(group, width)
    }

    /// Tokens `req` may still generate (fewer than `max_tokens` after a preemption).
    fn max_new(&self, req: &SeqRequest) -> usize {
        let done = self
            .resumes
            .get(&seq_key(req))
            .map_or(0, |r| r.state.tokens.len());
        req.params.max_tokens.saturating_sub(done)
    }

    /// Rows for waiting sequences more urgent than running ones: for each (in queue order,
    /// beyond those the free rows serve) the least urgent running sequence, the latest admitted
    /// among equals, is preempted if it is less urgent. A preempted sequence is never more
    /// urgent than one still running, so preemptions do not cascade.
    fn preempt_for_priority(&mut self) {
        let mut next = self.config.max_batch - self.running.len();
        while let Some(waiting) = self.pending.get(next).map(|w| w.priority) {
            let victim = self
                .running
                .iter()
                .enumerate()
                .filter(|(_, r)| r.state.finish.is_none() && r.req.priority > waiting)
                .max_by_key(|(_, r)| (r.req.priority, r.req.arrived))
                .map(|(i, _)| i);
            let Some(i) = victim else { return };
            self.preempt(i);
            next += 1;
        }
    }

    /// Take running row `i` off its row: its keys and values go to the prefix cache, and it
    /// waits, ahead of the others of its priority, with its prompt and every generated token as
    /// its prompt, to resume with its state (sampler, penalties, constraint, held-back text).
    fn preempt(&mut self, i: usize) {
        self.keep_prefix(i);
        let last = self.running.len() - 1;
        if i != last {
            let used = self.running[last].mask.len();
            self.pool.move_row(last, i, used);
            if let Some(d) = self.draft.as_mut() {
                d.move_row(last, i, &self.running[last].draft);
            }
        }
        let Running {
            mut req,
            state,
            pending_logprobs,
            last_token_at,
            prompt_len,
            cached_tokens,
            ..
        } = self.running.swap_remove(i);
        let a = &mut req.assembled;
        a.input_ids.truncate(prompt_len);
        a.input_ids.extend_from_slice(&state.tokens);
        a.image_mask.resize(a.input_ids.len(), false);
        // Sent at its first prefill.
        req.prompt_logprobs = None;
        tracing::debug!(
            priority = req.priority,
            generated = state.tokens.len(),
            "preempted for a more urgent sequence"
        );
        self.resumes.insert(
            seq_key(&req),
            Resume {
                _key: req.cancel.clone(),
                state,
                pending_logprobs,
                last_token_at,
                prompt_len,
                cached_tokens,
            },
        );
        let at = self.pending.partition_point(|w| w.priority < req.priority);
        self.pending.insert(at, req);
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        self.metrics.preemptions.fetch_add(1, Ordering::Relaxed);
    }

    /// `req` with its images' hashes, its position keys and how much of it the prefix cache
    /// holds.
    fn candidate(&mut self, req: SeqRequest) -> Candidate {
        // Hashed once: the vision cache, the prefix cache and the search for identical prompts
        // all know an image by it.
        let hashes: Vec<[u8; 32]> = req.pixels.iter().map(|p| image_hash(p)).collect();
        if !self.prefix.enabled() {
            return Candidate {
                req,
                hashes,
                keys: Vec::new(),
                cached: 0,
            };
        }
        let per = self.pkg.manifest.vision.tokens_per_image.max(1);
        let a = &req.assembled;
        let mut slot = 0;
        let keys: Vec<PositionKey> = a
            .input_ids
            .iter()
            .zip(&a.image_mask)
            .map(|(&id, &image)| {
                if image {
                    slot += 1;
                    image_key(&hashes[(slot - 1) / per])
                } else {
                    token_key(id)
                }
            })
            .collect();
        // A scored prompt needs every position's logits; the last token's are needed anyway.
        let cached = match (req.prompt_logprobs, self.prefix.longest_prefix(&keys)) {
            (None, Some((_, n))) => n.min(a.len() - 1),
            _ => 0,
        };
        Candidate {
            req,
            hashes,
            keys,
            cached,
        }
    }

    fn fail_group(&mut self, group: impl IntoIterator<Item = SeqRequest>, e: &RtError) {
        for mut req in group {
            let resume = self.resumes.remove(&seq_key(&req));
            let (prompt, generated) = counted(&req, resume.as_ref());
            self.metrics.finished("error", prompt, generated);
            (req.sink)(SeqEvent::Failed(SeqFailure::Engine(e.to_string())));
        }
    }

    /// Make room for `rows` rows of `needed` slots, keeping the running sequences.
    fn ensure_pool(&mut self, needed: usize) -> Result<()> {
        // Round up so that small differences between requests do not reallocate.
        let needed = needed.div_ceil(32) * 32;
        let needed = needed.min(self.pkg.context_length().max(1));
        let rows = self.config.max_batch;
        let shrink = self.running.is_empty() && needed * 2 <= self.pool.capacity;
        if self.pool.rows == rows && needed <= self.pool.capacity && !shrink {
            return Ok(());
        }
        let capacity = if self.running.is_empty() {
            needed
        } else {
            needed.max(self.pool.capacity)
        };
        let used: Vec<usize> = self.running.iter().map(|r| r.mask.len()).collect();
        let tensors = 2 * self.pkg.manifest.decoder.num_layers;
        let t0 = Instant::now();
        self.pool.resize(&self.pkg, tensors, rows, capacity, &used)?;
        tracing::info!(
            rows,
            capacity,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "KV pool: {rows} rows x {capacity} slots ({:.1} MiB)",
            (tensors * rows * capacity * self.pool.heads * self.pool.slot_elems * self.pool.elem()) as f64
                / (1 << 20) as f64
        );
        Ok(())
    }

    /// Reserve pool rows for `group`, encode its images and lay out its prompts; the chunks
    /// run from the next `prefill_chunk` call on. On failure every member has failed.
    fn start_prefill(&mut self, group: Vec<Candidate>, width: usize) -> Result<()> {
        let most_new = group.iter().map(|c| self.max_new(&c.req)).max().unwrap_or(0);
        let reserved_max = self
            .running
            .iter()
            .map(|r| r.reserved)
            .max()
            .unwrap_or(0)
            .max(width + most_new);
        if let Err(e) = self.ensure_pool(reserved_max) {
            self.fail_group(group.into_iter().map(|c| c.req), &e);
            return Err(e);
        }
        let dm = self.pkg.manifest.decoder.hidden_size;
        let per = self.pkg.manifest.vision.tokens_per_image;
        let resumed = |r: &SeqRequest| self.resumes.contains_key(&seq_key(r));
        let (leaders, followers) = split_identical(group, resumed);
        let m = leaders.len();

        // Images: one vision batch (cached embeddings reused), laid out per row in prompt order.
        let pixels: Vec<Vec<f32>> = leaders
            .iter()
            .flat_map(|c| c.req.pixels.iter().cloned())
            .collect();
        let hashes: Vec<[u8; 32]> = leaders.iter().flat_map(|c| c.hashes.iter().copied()).collect();
        let encoded = if pixels.is_empty() {
            Ok(Vec::new())
        } else {
            self.pkg.encode_hashed_images(&mut self.vision, &pixels, &hashes)
        };
        let encoded = match encoded {
            Ok(e) => e,
            Err(e) => {
                let all = leaders
                    .into_iter()
                    .map(|c| c.req)
                    .chain(followers.into_iter().map(|(r, _)| r));
                self.fail_group(all, &e);
                return Err(e);
            }
        };
        let first = self.running.len();
        let (group, keys, written) = self.reuse_prefixes(leaders, first, width);
        let most_images = group.iter().map(|r| r.pixels.len()).max().unwrap_or(0);
        let n_tok = (most_images * per).max(1);
        let mut embeds = vec![0f32; m * n_tok * dm];
        let mut k = 0;
        for (r, req) in group.iter().enumerate() {
            for j in 0..req.pixels.len() {
                let dst = (r * n_tok + j * per) * dm;
                embeds[dst..dst + per * dm].copy_from_slice(&encoded[k]);
                k += 1;
            }
        }

        let pad = self.pkg.manifest.config.tokenizer.pad_token_id;
        let (ids, image_mask, real) =
            kosmos_models::sequence::left_padded(group.iter().map(|r| &r.assembled), width, pad);
        let prompt_logprobs = group
            .iter()
            .map(|r| r.prompt_logprobs.map(|_| vec![None; r.assembled.len()]))
            .collect();
        self.prefill = Some(Prefill {
            group,
            first,
            width,
            written,
            start: written,
            ids,
            image_mask,
            real,
            embeds,
            n_tok,
            prompt_logprobs,
            keys,
            followers,
        });
        Ok(())
    }

    /// Copy the cached prefix of each prompt of `group` (rows `first..`, prompts ending at slot
    /// `width`) into its row. Returns the requests, their position keys, and the slot the
    /// group's prefill starts at: where the longest uncached part begins (admission keeps the
    /// uncached parts alike, so the other rows recompute little of their cached part, which
    /// changes nothing).
    fn reuse_prefixes(
        &mut self,
        group: Vec<Candidate>,
        first: usize,
        width: usize,
    ) -> (Vec<SeqRequest>, Vec<Vec<PositionKey>>, usize) {
        let mut uncached = 0;
        let mut hits = 0;
        let mut reqs = Vec::with_capacity(group.len());
        let mut keys = Vec::with_capacity(group.len());
        for (r, c) in group.into_iter().enumerate() {
            let len = c.req.assembled.len();
            let mut reused = 0;
            if c.cached > 0
                && let Some((entry, n)) = self.prefix.longest_prefix(&c.keys)
            {
                reused = n.min(c.cached);
                self.pool
                    .copy_in(first + r, width - len, &entry.tensors, entry.len(), reused);
            }
            hits += reused;
            uncached = uncached.max(len - reused);
            reqs.push(c.req);
            keys.push(c.keys);
        }
        if hits > 0 {
            self.metrics
                .prefix_cache_hit_tokens
                .fetch_add(hits as u64, Ordering::Relaxed);
            tracing::debug!(hits, skipped = width - uncached, "prefix cache");
        }
        (reqs, keys, width - uncached)
    }

    /// Write the next chunk of the prefilling group; after the last one its sequences take
    /// their first tokens and join the running batch.
    fn prefill_chunk(&mut self) -> Result<()> {
        let Some(p) = &self.prefill else {
            return Ok(());
        };
        let m = p.group.len();
        let per_row = match self.config.prefill_chunk {
            0 => p.width,
            budget => (budget / m).max(1),
        };
        let (from, to) = (p.written, (p.written + per_row).min(p.width));
        let call = p.chunk(
            from,
            to,
            self.pool.capacity,
            self.pkg.manifest.decoder.hidden_size,
        );
        let rows = p.first..p.first + m;
        let every_position = p.prompt_logprobs.iter().any(Option::is_some);
        let t0 = Instant::now();
        let result = self.call(rows, call, every_position);
        tracing::debug!(
            rows = m,
            from,
            to,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "prefill chunk"
        );
        self.metrics.prefill_calls.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .prefill_positions
            .fetch_add((m * (to - from)) as u64, Ordering::Relaxed);
        let vocab = self.pkg.manifest.decoder.vocab_size;
        // Scoring a prompt needs a row of logits per new position (a decoder that returned fewer
        // would be misread).
        let result = result.and_then(|l| {
            let want = if every_position { m * (to - from) } else { m } * vocab;
            if l.len() == want {
                Ok(l)
            } else {
                Err(RtError::Package {
                    path: self.pkg.dir.clone(),
                    message: format!(
                        "the decoder returned {} logits for {m} rows of {} positions, expected {want}",
                        l.len(),
                        to - from
                    ),
                })
            }
        });
        let mut logits = match result {
            Ok(l) => l,
            Err(e) => {
                let p = self.prefill.take().expect("prefilling");
                self.fail_group(p.into_requests(), &e);
                return Err(e);
            }
        };
        let p = self.prefill.as_mut().expect("prefilling");
        p.written = to;
        if every_position {
            p.score_prompts(from, to, &logits, vocab);
            // Keep each row's last position, as the other calls return.
            let s = to - from;
            logits = (0..m)
                .flat_map(|r| logits[(r * s + s - 1) * vocab..(r * s + s) * vocab].to_vec())
                .collect();
        }
        if to < p.width {
            return Ok(());
        }

        let mut p = self.prefill.take().expect("prefilling");
        // Running sequences that finished meanwhile left a gap: the group's rows join them.
        let first = self.running.len();
        if p.first != first {
            for r in 0..m {
                self.pool.move_row(p.first + r, first + r, p.width);
            }
        }
        // Followers copy their prompt's row (after the group's rows); each samples its own first
        // token from that row's logits.
        let followers = std::mem::take(&mut p.followers);
        for (j, (req, leader)) in followers.iter().enumerate() {
            self.pool.move_row(first + leader, first + m + j, p.width);
            self.metrics
                .shared_prefill_tokens
                .fetch_add(req.assembled.len() as u64, Ordering::Relaxed);
        }
        let pad = self.pkg.manifest.config.tokenizer.pad_token_id as i64;
        let scored = std::mem::take(&mut p.prompt_logprobs);
        let keys = std::mem::take(&mut p.keys);
        let followers: Vec<_> = followers
            .into_iter()
            .map(|(req, leader)| (req, leader, None, keys[leader].clone()))
            .collect();
        let leaders: Vec<_> = p
            .group
            .drain(..)
            .zip(scored)
            .zip(keys)
            .enumerate()
            .map(|(r, ((req, scored), keys))| (req, r, scored, keys))
            .collect();
        let mut row_logits = vec![0f32; vocab];
        for (mut req, r, scored, keys) in leaders.into_iter().chain(followers) {
            if let Some(scored) = scored {
                let tokens = req.assembled.input_ids.iter().copied().zip(scored).collect();
                (req.sink)(SeqEvent::PromptLogprobs(tokens));
            }
            let score_only = req.params.max_tokens == 0;
            let reserved = p.width + self.max_new(&req);
            let resume = self.resumes.remove(&seq_key(&req)).unwrap_or_else(|| Resume {
                _key: req.cancel.clone(),
                state: RowState::new(&req.assembled, req.params.seed)
                    .constrained(self.pkg.constraint(&req.params)),
                pending_logprobs: Vec::new(),
                last_token_at: None,
                prompt_len: req.assembled.len(),
                // Left-padded to the group's width, the prompt starts at width − len; the
                // calls computed from `start` (a follower's prompt is its leader's).
                cached_tokens: (p.start + req.assembled.len()).saturating_sub(p.width),
            });
            let mut run = Running {
                state: resume.state,
                mask: p.real[r * p.width..(r + 1) * p.width].to_vec(),
                next: pad,
                reserved,
                last_token_at: resume.last_token_at,
                pending_logprobs: resume.pending_logprobs,
                keys,
                failure: None,
                cached_tokens: resume.cached_tokens,
                prompt_len: resume.prompt_len,
                draft: DraftSlot::Unread,
                req,
            };
            if score_only {
                // max_tokens 0 (completions' `echo` scoring a prompt): done at its prefill.
                run.state.finish = Some(FinishReason::Length);
            } else {
                // A copy: `take_token` applies penalties in place, and followers read the row too.
                row_logits.copy_from_slice(&logits[r * vocab..(r + 1) * vocab]);
                self.take_token(&mut run, &mut row_logits);
            }
            self.running.push(run);
        }
        Ok(())
    }

    /// Pick, emit and record `run`'s next token from its logits.
    fn take_token(&self, run: &mut Running, logits: &mut [f32]) {
        if run.state.finish.is_some() {
            return;
        }
        let eos = self.pkg.manifest.config.tokenizer.eos_token_id;
        let Running { req, state, .. } = run;
        // The model's distribution, before `pick` applies the repetition penalty in place.
        let raw = req.logprobs.map(|top| (top, logits.to_vec()));
        let picked_at = Instant::now();
        let picked = state.pick(logits, &req.params, eos);
        if req.params.constraint.is_some() {
            let us = picked_at.elapsed().as_micros() as u64;
            self.metrics.constrained_tokens.fetch_add(1, Ordering::Relaxed);
            self.metrics.constrained_pick_us.fetch_add(us, Ordering::Relaxed);
        }
        let tok = match picked {
            Ok(t) => t,
            Err(e) => {
                state.finish = Some(FinishReason::Stop);
                run.failure = Some(e.to_string());
                return;
            }
        };
        let now = Instant::now();
        match run.last_token_at {
            None => self
                .metrics
                .time_to_first_token((now - run.req.arrived).as_secs_f64()),
            Some(t) => self.metrics.inter_token((now - t).as_secs_f64()),
        }
        run.last_token_at = Some(now);
        let Running {
            req,
            state,
            pending_logprobs,
            ..
        } = run;
        if req.params.ends(tok, eos) {
            state.finish = Some(FinishReason::Stop);
            return;
        }
        if let Some((top, raw)) = raw {
            pending_logprobs.push(token_logprob(&raw, tok, top));
        }
        let sink = &mut req.sink;
        let mut on_text = |_: usize, text: &str| {
            sink(SeqEvent::Text {
                text: text.to_string(),
                logprobs: std::mem::take(pending_logprobs),
            })
        };
        if let Err(e) = state.push(tok, &self.pkg.tokenizer, &req.params, 0, &mut on_text) {
            tracing::warn!("detokenising failed: {e}");
            state.finish = Some(FinishReason::Stop);
            return;
        }
        run.next = tok as i64;
        if run.state.finish.is_none() && run.state.tokens.len() >= run.req.params.max_tokens {
            run.state.finish = Some(FinishReason::Length);
        }
    }

    /// One token for every running sequence (or, speculating, one and its guesses kept).
    fn decode_step(&mut self) -> Result<()> {
        if let Some(spec) = self.pkg.speculation().cloned()
            && self.running.len() <= spec.max_batch
        {
            let guesses = self.guesses(&spec)?;
            if guesses.iter().any(|(g, _)| !g.is_empty()) {
                return self.speculative_step(&spec, &guesses);
            }
        }
        let n = self.running.len();
        let cap = self.pool.capacity;
        let dm = self.pkg.manifest.decoder.hidden_size;
        let mut mask = vec![0i64; n * cap];
        let mut past = Vec::with_capacity(n);
        for (r, run) in self.running.iter().enumerate() {
            let u = run.mask.len();
            mask[r * cap..r * cap + u].copy_from_slice(&run.mask);
            mask[r * cap + u] = 1;
            past.push(u as i64);
        }
        let ids = self.running.iter().map(|r| r.next).collect();
        let call = Call::text(ids, 1, dm, mask, past);
        let t0 = Instant::now();
        let mut logits = self.call(0..n, call, false)?;
        tracing::debug!(rows = n, ms = t0.elapsed().as_secs_f64() * 1e3, "decode step");
        let vocab = self.pkg.manifest.decoder.vocab_size;
        let mut running = std::mem::take(&mut self.running);
        for (r, run) in running.iter_mut().enumerate() {
            run.mask.push(1);
            self.take_token(run, &mut logits[r * vocab..(r + 1) * vocab]);
        }
        self.running = running;
        Ok(())
    }

    /// Each running sequence's guesses ([`RowState::guesses`]: forced by its grammar, else the
    /// draft model's, else prompt lookup's) and whether the draft made them, within the slots
    /// its row has left (every row of a call writes as many slots as the longest feed) and its
    /// `max_tokens`. The draft guesses for every sequence in the same calls
    /// ([`DraftRows::propose`]); if it fails, those sequences go on without guesses.
    fn guesses(&mut self, spec: &Speculation) -> Result<Vec<(Vec<u32>, bool)>> {
        let cap = self.pool.capacity;
        let per = self.pkg.manifest.vision.tokens_per_image;
        let free = self.running.iter().map(|r| cap - r.mask.len()).min().unwrap_or(0);
        let mut out = Vec::with_capacity(self.running.len());
        // Rows the draft guesses for, and how many guesses each may have.
        let mut wants: Vec<(usize, usize)> = Vec::new();
        for (r, run) in self.running.iter_mut().enumerate() {
            let left = run.req.params.max_tokens.saturating_sub(run.state.tokens.len());
            let room = free.saturating_sub(1).min(left);
            if self.draft.is_none() {
                out.push(run.state.guesses(spec, room, None)?);
                continue;
            }
            let (forced, limit) = run.state.forced_or_limit(spec, room);
            if !forced.is_empty() {
                out.push((forced, false));
                continue;
            }
            out.push((Vec::new(), true));
            if limit > 0 && !matches!(run.draft, DraftSlot::Off) {
                wants.push((r, limit));
            }
        }
        let Some(draft) = self.draft.as_mut() else {
            return Ok(out);
        };
        if wants.is_empty() {
            return Ok(out);
        }
        let (t0, calls) = (Instant::now(), draft.calls);
        // The draft reads a sequence's prompt, a prefill chunk per step, before its first guess.
        for &(r, _) in &wants {
            if matches!(self.running[r].draft, DraftSlot::Unread) {
                let used: Vec<usize> = self.running.iter().map(|x| x.draft.len()).collect();
                let run = &mut self.running[r];
                let mut prompt = run.req.assembled.clone();
                prompt.input_ids.truncate(run.prompt_len);
                prompt.image_mask.truncate(run.prompt_len);
                let max_tokens = run.req.params.max_tokens;
                run.draft = draft
                    .start(&prompt, per, &run.req.pixels, max_tokens, &used)
                    .unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "the draft model cannot read this prompt; no guesses for it");
                        DraftSlot::Off
                    });
            }
            let slot = &mut self.running[r].draft;
            if let DraftSlot::Reading(reading) = slot {
                match draft.read(r, reading, self.config.prefill_chunk) {
                    Ok(Some(row)) => *slot = DraftSlot::Row(row),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "the draft model cannot read this prompt; no guesses for it");
                        *slot = DraftSlot::Off;
                    }
                }
            }
        }
        let lens: Vec<usize> = self.running.iter().map(|x| x.draft.len()).collect();
        let mut asks = Vec::with_capacity(wants.len());
        let mut limits = wants.iter().copied().peekable();
        for (r, run) in self.running.iter_mut().enumerate() {
            let Some((_, limit)) = limits.next_if(|w| w.0 == r) else {
                continue;
            };
            let DraftSlot::Row(slot) = &mut run.draft else {
                continue;
            };
            let (generated, constraint) = run.state.draft_view();
            asks.push(Ask {
                row: r,
                slot,
                generated,
                limit,
                constraint,
            });
        }
        let rows: Vec<usize> = asks.iter().map(|a| a.row).collect();
        let proposed = draft.propose(&mut asks, &lens);
        drop(asks);
        match proposed {
            Ok(guesses) => {
                for (r, g) in rows.into_iter().zip(guesses) {
                    out[r].0 = g;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, rows = rows.len(), "the draft model failed; no more guesses for these sequences");
                for r in rows {
                    self.running[r].draft = DraftSlot::Off;
                }
            }
        }
        self.metrics
            .spec_draft_model_calls
            .fetch_add(draft.calls - calls, Ordering::Relaxed);
        tracing::trace!(ms = t0.elapsed().as_secs_f64() * 1e3, "draft guesses");
        Ok(out)
    }

    /// One decoder call feeding every running sequence its next token and its guesses
    /// (right-padded to the longest feed, the padding masked out), then each row's positions
    /// picked from in order as decode steps would, keeping guesses up to the first the sampler
    /// did not pick. A row's slots past what it kept are overwritten by its next call.
    fn speculative_step(&mut self, spec: &Speculation, guesses: &[(Vec<u32>, bool)]) -> Result<()> {
        let n = self.running.len();
        let cap = self.pool.capacity;
        let dm = self.pkg.manifest.decoder.hidden_size;
        let s = 1 + guesses.iter().map(|(g, _)| g.len()).max().unwrap_or(0);
        let pad = self.pkg.manifest.config.tokenizer.pad_token_id as i64;
        let mut ids = Vec::with_capacity(n * s);
        let mut mask = vec![0i64; n * cap];
        let mut past = Vec::with_capacity(n);
        for (r, (run, (g, _))) in self.running.iter().zip(guesses).enumerate() {
            let u = run.mask.len();
            mask[r * cap..r * cap + u].copy_from_slice(&run.mask);
            mask[r * cap + u..r * cap + u + 1 + g.len()].fill(1);
            past.push(u as i64);
            ids.push(run.next);
            ids.extend(g.iter().map(|&t| t as i64));
            ids.extend(std::iter::repeat_n(pad, s - 1 - g.len()));
        }
        let call = Call::text(ids, s, dm, mask, past);
        let t0 = Instant::now();
        let mut logits = self.call(0..n, call, true)?;
        let vocab = self.pkg.manifest.decoder.vocab_size;
        let (mut drafted, mut accepted) = (0, 0);
        let mut running = std::mem::take(&mut self.running);
        for (r, (run, (g, by_draft))) in running.iter_mut().zip(guesses).enumerate() {
            // The token fed first is in the cache whatever happens to the guesses.
            run.mask.push(1);
            drafted += g.len();
            let mut kept = 0;
            for i in 0..=g.len() {
                let at = (r * s + i) * vocab;
                let before = run.state.tokens.len();
                self.take_token(run, &mut logits[at..at + vocab]);
                // Guess i was picked (counted even when it ends the sequence).
                let picked = i < g.len()
                    && run.state.tokens.len() == before + 1
                    && run.state.tokens.last() == Some(&g[i]);
                kept += usize::from(picked);
                if run.state.finish.is_some() || !picked {
                    break;
                }
                // Its keys, written by this call, are kept.
                run.mask.push(1);
            }
            accepted += kept;
            run.state.guessed(spec, g.len(), kept);
            if let DraftSlot::Row(dr) = &mut run.draft {
                DraftRows::kept(dr, kept, *by_draft);
            }
        }
        self.running = running;
        self.metrics
            .spec_draft_tokens
            .fetch_add(drafted as u64, Ordering::Relaxed);
        self.metrics
            .spec_accepted_tokens
            .fetch_add(accepted as u64, Ordering::Relaxed);
        tracing::debug!(
            rows = n,
            width = s,
            drafted,
            accepted,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "speculative decode step"
        );
        Ok(())
    }

    /// Report and remove finished sequences; the last row moves into each freed one.
    fn retire_finished(&mut self) {
        for i in (0..self.running.len()).rev() {
            if self.running[i].state.finish.is_none() {
                continue;
            }
            self.keep_prefix(i);
            let last = self.running.len() - 1;
            if i != last {
                let used = self.running[last].mask.len();
                self.pool.move_row(last, i, used);
                if let Some(d) = self.draft.as_mut() {
                    d.move_row(last, i, &self.running[last].draft);
                }
            }
            let mut run = self.running.swap_remove(i);
            let reason = run.state.finish.expect("finished");
            if reason != FinishReason::Cancelled {
                let (sink, pending) = (&mut run.req.sink, &mut run.pending_logprobs);
                let mut on_text = |_: usize, text: &str| {
                    sink(SeqEvent::Text {
                        text: text.to_string(),
                        logprobs: std::mem::take(pending),
                    })
                };
                run.state.flush(0, &mut on_text);
                if !pending.is_empty() {
                    let logprobs = std::mem::take(pending);
                    sink(SeqEvent::Text {
                        text: String::new(),
                        logprobs,
                    });
                }
            }
            if let Some(message) = run.failure.take() {
                self.metrics
                    .finished("error", run.req.assembled.len(), run.state.tokens.len());
                (run.req.sink)(SeqEvent::Failed(SeqFailure::Engine(message)));
                continue;
            }
            let label = match reason {
                FinishReason::Stop => "stop",
                FinishReason::Length => "length",
                FinishReason::Cancelled => "cancelled",
            };
            let prompt_tokens = run.prompt_len;
            self.metrics
                .finished(label, prompt_tokens, run.state.tokens.len());
            tracing::debug!(
                finish = label,
                prompt_tokens,
                generated = run.state.tokens.len(),
                seconds = run.req.arrived.elapsed().as_secs_f64(),
                "sequence finished"
            );
            let summary = SeqSummary {
                text: std::mem::take(&mut run.state.text),
                tokens: std::mem::take(&mut run.state.tokens),
                finish_reason: reason,
                prompt_tokens,
                cached_tokens: run.cached_tokens,
            };
            (run.req.sink)(SeqEvent::Done(summary));
        }
    }

    /// Put running row `i`'s keys and values (prompt and the generated tokens fed back) in the
    /// prefix cache.
    fn keep_prefix(&mut self, i: usize) {
        if !self.prefix.enabled() || self.running[i].keys.is_empty() {
            return;
        }
        let run = &mut self.running[i];
        let pad = run.mask.iter().take_while(|&&m| m == 0).count();
        let fed = run.mask.len() - pad - run.keys.len();
        let used = run.mask.len();
        // Tokens generated before a preemption are in the keys already (they were its prompt).
        let before = run.keys.len() - run.prompt_len;
        // The row is retiring: its keys are not needed any more.
        let mut keys = std::mem::take(&mut run.keys);
        keys.extend(
            run.state.tokens[before..before + fed]
                .iter()
                .map(|&t| token_key(t)),
        );
        let tensors = self.pool.copy_out(i, pad..used);
        self.prefix.insert(keys, tensors);
    }

    /// One decoder call over pool rows `rows` ([`pool_call`]).
    fn call(&mut self, rows: Range<usize>, c: Call, every_position: bool) -> Result<Vec<f32>> {
        pool_call(&mut self.pkg, &mut self.pool, rows, c, every_position)
    }
}

/// One decoder call of `pkg` over rows `rows` of its pool, bound in place (ONNX Runtime
/// writes the new keys and values into it). Returns the last
/// position's logits per row, or with `every_position` those of every new position
/// [rows, s, vocab].
pub(crate) fn pool_call(
    pkg: &mut Package,
    pool: &mut KvPool,
    rows: Range<usize>,
    c: Call,
    every_position: bool,
) -> Result<Vec<f32>> {
    let m = rows.len();
    let d = &pkg.manifest.decoder;
    let (layers, dm, vocab) = (d.num_layers, d.hidden_size, d.vocab_size);
    let cap = pool.capacity;
    let mut binding = pkg.decoder.create_binding()?;
    binding.bind_input(io::INPUT_IDS, &Tensor::from_array(([m, c.s], c.ids))?)?;
    binding.bind_input(
        io::IMAGE_EMBEDS,
        &Tensor::from_array(([m, c.n_tok, dm], c.embeds))?,
    )?;
    binding.bind_input(io::IMAGE_MASK, &Tensor::from_array(([m, c.s], c.image_mask))?)?;
    binding.bind_input(io::ATTENTION_MASK, &Tensor::from_array(([m, cap], c.mask))?)?;
    binding.bind_input(io::PAST_SEQUENCE_LENGTH, &Tensor::from_array(([m], c.past))?)?;
    if d.takes_logits_to_keep() {
        // 0 keeps every position.
        let keep = logits_to_keep(if every_position { 0 } else { 1 })?;
        binding.bind_input(io::LOGITS_TO_KEEP, &keep)?;
    }
    // Inputs bound in place must outlive the run.
    let mut inputs = Vec::with_capacity(2 * layers);
    for i in 0..2 * layers {
        let (past, present) = if i % 2 == 0 {
            (io::past_key(i / 2), io::present_key(i / 2))
        } else {
            (io::past_value(i / 2), io::present_value(i / 2))
        };
        let input = pool.view(i, &rows)?;
        bind_input_in_place(&mut binding, &past, &input)?;
        inputs.push(input);
        binding.bind_output(present, pool.view(i, &rows)?)?;
    }
    {
        let mem = pkg.decoder.allocator().memory_info();
        binding.bind_output_to_device(io::LOGITS, mem)?;
    }
    let out = pkg.decoder.run_binding(&binding)?;
    let (_, logits) = out[io::LOGITS].try_extract_tensor::<f32>()?;
    let last = if every_position {
        logits.to_vec()
    } else {
        last_positions(logits, m, vocab, 1)
    };
    drop(out);
    drop(binding);
    drop(inputs);
    Ok(last)
}
