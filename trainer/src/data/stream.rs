//! Mixing several sources by weight and packing their examples into fixed-length batches, with a
//! state that a checkpoint saves so a resumed run continues with exactly the same batches.

use kosmos_models::{KosmosConfig, KosmosTokenizer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;

use crate::error::{Result, TrainError};
use kosmos_models::data::example::{Encoded, Example, SkipCounter, encode};
use kosmos_models::data::source::Source;
use kosmos_models::prng::Prng;

/// One packed batch, row-major, right-padded; `targets` is -100 where there is no loss.
#[derive(Debug)]
pub struct Batch {
    pub rows: usize,
    pub len: usize,
    pub input_ids: Vec<i64>,
    pub image_mask: Vec<bool>,
    pub attention_mask: Vec<i64>,
    pub targets: Vec<i64>,
    /// [n_images, 3, S, S] flattened, in slot order.
    pub pixels: Vec<f32>,
    pub n_images: usize,
    /// Non-padding tokens.
    pub tokens: usize,
    /// The stream's state after this batch (what a checkpoint taken after it saves).
    pub state: DataState,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DataState {
    pub rng: Prng,
    pub cursors: Vec<Value>,
    /// Examples each source yielded in its current epoch (an epoch with none is an error).
    pub valid: Vec<u64>,
    /// A source whose next example was read but not yet placed (its cursor points before it).
    pub pending: Option<usize>,
}

impl Batch {
    /// `rows` × `len` of padding: no attention, no targets.
    pub fn padded(rows: usize, len: usize, pad: i64, state: DataState) -> Self {
        Batch {
            rows,
            len,
            input_ids: vec![pad; rows * len],
            image_mask: vec![false; rows * len],
            attention_mask: vec![0; rows * len],
            targets: vec![-100; rows * len],
            pixels: Vec::new(),
            n_images: 0,
            tokens: 0,
            state,
        }
    }

    /// Write `enc` into `row` from column `at` (it must fit); returns its number of targets.
    /// Targets are next tokens where the next token carries loss.
    pub fn place(&mut self, row: usize, at: usize, enc: &Encoded) -> usize {
        let base = row * self.len + at;
        let mut targets = 0;
        for t in 0..enc.len() {
            self.input_ids[base + t] = enc.input_ids[t];
            self.image_mask[base + t] = enc.image_mask[t];
            self.attention_mask[base + t] = 1;
            if t + 1 < enc.len() && enc.loss_mask[t + 1] {
                self.targets[base + t] = enc.input_ids[t + 1];
                targets += 1;
            }
        }
        for p in &enc.pixels {
            self.pixels.extend_from_slice(p);
        }
        self.n_images += enc.pixels.len();
        self.tokens += enc.len();
        targets
    }
}

pub struct DataStream {
    sources: Vec<Box<dyn Source>>,
    weights: Vec<f64>,
    rng: Prng,
    valid: Vec<u64>,
    /// Read, encoded, not yet placed: (source, encoded, the source's cursor before it).
    pending: Option<(usize, Encoded, Value)>,
    tokenizer: KosmosTokenizer,
    config: KosmosConfig,
    pub rows: usize,
    pub max_len: usize,
    pub skips: Arc<SkipCounter>,
}

impl DataStream {
    pub fn new(
        sources: Vec<(Box<dyn Source>, f64)>,
        seed: u64,
        tokenizer: KosmosTokenizer,
        config: KosmosConfig,
        rows: usize,
        max_len: usize,
    ) -> Result<Self> {
        if sources.is_empty() {
            return Err(TrainError::Data("no data sources".into()));
        }
        let (sources, weights): (Vec<_>, Vec<_>) = sources.into_iter().unzip();
        let n = sources.len();
        Ok(DataStream {
            sources,
            weights,
            rng: Prng::new(seed ^ 0x5EED_DA7A),
            valid: vec![0; n],
            pending: None,
            tokenizer,
            config,
            rows,
            max_len,
            skips: Arc::new(SkipCounter::default()),
        })
    }

    pub fn state(&self) -> DataState {
        let mut cursors: Vec<Value> = self.sources.iter().map(|s| s.cursor()).collect();
        if let Some((i, _, before)) = &self.pending {
            cursors[*i] = before.clone();
        }
        DataState {
            rng: self.rng.clone(),
            cursors,
            valid: self.valid.clone(),
            pending: self.pending.as_ref().map(|p| p.0),
        }
    }

    /// Continue from a saved state.
    pub fn restore(&mut self, state: &DataState) -> Result<()> {
        if state.cursors.len() != self.sources.len() {
            return Err(TrainError::Data(format!(
                "the checkpoint's data state has {} sources, this run has {}: resume with the same --data",
                state.cursors.len(),
                self.sources.len()
            )));
        }
        for (s, c) in self.sources.iter_mut().zip(&state.cursors) {
            s.seek(c)?;
        }
        self.rng = state.rng.clone();
        self.valid = state.valid.clone();
        self.pending = None;
        if let Some(i) = state.pending {
            let (ex, before) = self.read_from(i)?;
            let enc = self.encode_or_skip(i, &ex).ok_or_else(|| {
                TrainError::Data("the pending example of the checkpoint no longer encodes".into())
            })?;
            self.pending = Some((i, enc, before));
            // Re-reading counted the pending example again; the saved counts already hold it.
            self.valid = state.valid.clone();
        }
        Ok(())
    }

    fn pick(&mut self) -> usize {
        let total: f64 = self.weights.iter().sum();
        let mut x = self.rng.next_f64() * total;
        for (i, w) in self.weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        self.weights.len() - 1
    }

    /// The next example of source `i`, starting a new epoch when it runs out.
    fn read_from(&mut self, i: usize) -> Result<(Example, Value)> {
        let skips = self.skips.clone();
        for _ in 0..2 {
            let before = self.sources[i].cursor();
            if let Some(ex) = self.sources[i].next(&skips)? {
                self.valid[i] += 1;
                return Ok((ex, before));
            }
            if self.valid[i] == 0 {
                return Err(TrainError::Data(format!(
                    "{}: no valid record (every record was skipped; see the warnings above)",
                    self.sources[i].name()
                )));
            }
            self.valid[i] = 0;
            self.sources[i].rewind()?;
        }
        Err(TrainError::Data(format!(
            "{}: no valid record",
            self.sources[i].name()
        )))
    }

    fn encode_or_skip(&mut self, i: usize, ex: &Example) -> Option<Encoded> {
        match encode(ex, &self.tokenizer, &self.config) {
            Ok(e) if e.len() <= self.max_len => Some(e),
            Ok(e) => {
                self.valid[i] = self.valid[i].saturating_sub(1);
                self.skips.skip(
                    &ex.origin,
                    &format!("{} tokens, longer than max_len {}", e.len(), self.max_len),
                );
                None
            }
            Err(err) => {
                self.valid[i] = self.valid[i].saturating_sub(1);
                self.skips.skip(&ex.origin, &err.to_string());
                None
            }
        }
    }

    /// The next example that encodes, with its source and that source's cursor before it.
    fn next_encoded(&mut self) -> Result<(usize, Encoded, Value)> {
        if let Some(p) = self.pending.take() {
            return Ok(p);
        }
        let i = self.pick();
        loop {
            let (ex, before) = self.read_from(i)?;
            if let Some(enc) = self.encode_or_skip(i, &ex) {
                return Ok((i, enc, before));
            }
        }
    }

    /// Pack examples into `rows` rows of `max_len` tokens.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let (rows, len) = (self.rows, self.max_len);
        let pad = self.tokenizer.special().pad_token_id as i64;
        let mut b = Batch::padded(rows, len, pad, self.state());
        let mut row = 0;
        let mut fill = 0;
        while row < rows {
            let (i, enc, before) = self.next_encoded()?;
            if fill + enc.len() > len {
                if fill == 0 {
                    unreachable!("encode_or_skip keeps examples within max_len");
                }
                self.pending = Some((i, enc, before));
                row += 1;
                fill = 0;
                continue;
            }
            b.place(row, fill, &enc);
            fill += enc.len();
        }
        b.state = self.state();
        // Drop the padding columns every row has: no work is spent on them.
        let used = (0..rows)
            .map(|r| {
                b.attention_mask[r * len..(r + 1) * len]
                    .iter()
                    .filter(|&&m| m == 1)
                    .count()
            })
            .max()
            .unwrap_or(len)
            .max(1);
        if used < len {
            let cut = |v: &mut Vec<i64>| {
                *v = (0..rows)
                    .flat_map(|r| v[r * len..r * len + used].to_vec())
                    .collect()
            };
            cut(&mut b.input_ids);
            cut(&mut b.attention_mask);
            cut(&mut b.targets);
            b.image_mask = (0..rows)
                .flat_map(|r| b.image_mask[r * len..r * len + used].to_vec())
                .collect();
            b.len = used;
        }
        Ok(b)
    }
}
