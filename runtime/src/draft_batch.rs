//! A draft model's KV rows in the batching engine ([`crate::batch::Engine`]): row r of the
//! draft's pool belongs to running sequence r (it moves when that sequence moves), so the draft
//! reads and guesses for every speculating sequence in one decoder call per guess, where one
//! prompt at a time ([`crate::draft::DraftRun`]) it makes one call per sequence and guess.
//!
//! The guesses are those [`Draft::propose`] makes for each sequence alone: each row is fed
//! exactly its own tokens at its own position (`past_sequence_length` is per row), right-padded
//! to the longest feed, and its guess is read at its own last position. A row of the call that
//! has nothing to read (it stopped guessing, or does not speculate) is fed padding after its
//! slots, which its next call writes over, as the target's rows are (see
//! [`crate::batch`]'s speculative step).

use std::ops::Range;

use kosmos_models::sequence::Assembled;

use crate::batch::{Call, KvPool, pool_call};
use crate::constrain::ActiveConstraint;
use crate::draft::{Draft, most_likely};
use crate::error::Result;

/// The draft model and its rows.
pub(crate) struct DraftRows {
    pub(crate) draft: Draft,
    pool: KvPool,
    /// Rows of the pool: the engine's `max_batch`.
    rows: usize,
    /// Decoder calls the draft has made (prefills, catch-ups and guesses).
    pub(crate) calls: u64,
}

/// A running sequence's place in the draft's rows.
pub(crate) enum DraftSlot {
    /// The draft has not read the prompt yet: it starts when the sequence first may guess.
    Unread,
    /// The draft is reading the prompt, a prefill chunk per engine step (a long prompt would
    /// otherwise stall every running sequence for the draft's whole prefill); no guesses yet.
    Reading(Reading),
    /// The draft cannot follow this sequence (its prompt is past the draft's context, or the
    /// draft failed on it): no guesses.
    Off,
    Row(DraftRow),
}

impl DraftSlot {
    /// Slots of the sequence's row that hold its keys and values.
    pub(crate) fn len(&self) -> usize {
        match self {
            DraftSlot::Row(r) => r.len,
            DraftSlot::Reading(r) => r.row.len,
            _ => 0,
        }
    }
}

/// A prompt the draft is reading into a row.
pub(crate) struct Reading {
    /// The draft's assembly of the prompt.
    a: Assembled,
    /// Its images' embeddings by the draft's vision tower, [n_tok, hidden], in prompt order.
    embeds: Vec<f32>,
    /// The row once read; until then `len` counts the prompt slots written.
    row: DraftRow,
}

/// The draft's state of one sequence (as [`crate::draft::DraftRun`], its cache a pool row).
#[derive(Clone, Copy)]
pub(crate) struct DraftRow {
    /// Slots of the prompt (the draft's assembly: its own image slots).
    prompt_len: usize,
    /// Slots the sequence may use: the prompt and its `max_tokens`, within the draft's context.
    capacity: usize,
    /// Generated tokens whose keys and values the row holds, in order after the prompt.
    synced: usize,
    /// Of the guesses last proposed, those fed to the draft; they follow the synced tokens.
    fed_guesses: usize,
    /// Slots in use: the prompt, the synced tokens and, after a proposal, the guesses fed.
    len: usize,
}

/// What one running sequence asks of the draft: at most `limit` guesses to follow `generated`
/// (every token generated so far), under its constraint, if any.
pub(crate) struct Ask<'a> {
    pub row: usize,
    pub slot: &'a mut DraftRow,
    pub generated: &'a [u32],
    pub limit: usize,
    pub constraint: Option<&'a mut ActiveConstraint>,
}

/// A row's part in the proposal under way.
struct Proposal {
    /// Tokens to feed at the next call (none: this row is done guessing).
    feed: Vec<i64>,
    guesses: Vec<u32>,
}

impl DraftRows {
    /// The draft's rows for `rows` sequences; with `preallocate` (the engine's
    /// `kv_preallocate`) its pool is allocated for `rows` x its whole context now, so that no
    /// request waits for it to grow (faulting fresh memory in takes seconds per GB).
    pub(crate) fn new(draft: Draft, rows: usize, preallocate: bool) -> Result<Self> {
        let d = &draft.pkg.manifest.decoder;
        let mut pool = KvPool::empty(d.num_heads, d.head_dim, draft.pkg.kv_dtype);
        if preallocate {
            let capacity = draft.pkg.context_length();
            let t0 = std::time::Instant::now();
            pool.resize(&draft.pkg, 2 * d.num_layers, rows, capacity, &[])?;
            tracing::info!(
                rows,
                capacity,
                ms = t0.elapsed().as_secs_f64() * 1e3,
                "draft KV pool preallocated"
            );
        }
        Ok(DraftRows {
            draft,
            pool,
            rows,
            calls: 0,
        })
    }

    /// Start reading a running sequence's prompt (the target's assembly with `tokens_per_image`
    /// slots per image, and its preprocessed `pixels`) with room for `max_tokens`: its images
    /// through the draft's vision tower, a row of the pool made room for ([`DraftRows::read`]
    /// writes it). `used` are every running row's [`DraftSlot::len`], kept if the pool grows.
    pub(crate) fn start(
        &mut self,
        target: &Assembled,
        tokens_per_image: usize,
        pixels: &[Vec<f32>],
        max_tokens: usize,
        used: &[usize],
    ) -> Result<DraftSlot> {
        let a = self.draft.assembly_of(target, tokens_per_image);
        let len = a.len();
        let context = self.draft.pkg.context_length();
        let capacity = (len + max_tokens).min(context);
        if len >= capacity {
            // Longer than the draft's context: it cannot guess for this prompt.
            return Ok(DraftSlot::Off);
        }
        if self.pool.rows != self.rows || capacity > self.pool.capacity {
            // Round up so that small differences between requests do not reallocate.
            let grown = (capacity.div_ceil(32) * 32).min(context).max(self.pool.capacity);
            let tensors = 2 * self.draft.pkg.manifest.decoder.num_layers;
            self.pool
                .resize(&self.draft.pkg, tensors, self.rows, grown, used)?;
            tracing::info!(rows = self.rows, capacity = grown, "draft KV pool");
        }
        let embeds = self.draft.pkg.encode_images(&mut self.draft.vision, pixels)?;
        Ok(DraftSlot::Reading(Reading {
            a,
            embeds: embeds.iter().flat_map(|e| e.iter().copied()).collect(),
            row: DraftRow {
                prompt_len: len,
                capacity,
                synced: 0,
                fed_guesses: 0,
                len: 0,
            },
        }))
    }

    /// Read the next `chunk` tokens (0: all the rest) of the prompt `reading` into row `row`;
    /// the row, once the whole prompt is in.
    pub(crate) fn read(
        &mut self,
        row: usize,
        reading: &mut Reading,
        chunk: usize,
    ) -> Result<Option<DraftRow>> {
        let dm = self.draft.pkg.manifest.decoder.hidden_size;
        let (from, len) = (reading.row.len, reading.row.prompt_len);
        let to = if chunk == 0 { len } else { len.min(from + chunk) };
        let image_mask = &reading.a.image_mask;
        // The chunk's image slots take the embeddings after those of the slots before it.
        let before = image_mask[..from].iter().filter(|&&m| m).count();
        let count = image_mask[from..to].iter().filter(|&&m| m).count();
        let n_tok = count.max(1);
        let mut embeds = vec![0f32; n_tok * dm];
        embeds[..count * dm].copy_from_slice(&reading.embeds[before * dm..(before + count) * dm]);
        let mut mask = vec![0i64; self.pool.capacity];
        mask[..to].fill(1);
        let call = Call {
            ids: reading.a.input_ids[from..to].iter().map(|&t| t as i64).collect(),
            s: to - from,
            embeds,
            n_tok,
            image_mask: image_mask[from..to].to_vec(),
            mask,
            past: vec![from as i64],
        };
        pool_call(&mut self.draft.pkg, &mut self.pool, row..row + 1, call, false)?;
        self.calls += 1;
        reading.row.len = to;
        Ok((to == len).then_some(reading.row))
    }

    /// Running row `from` moved to row `to` (the engine refills a freed row with its last).
    pub(crate) fn move_row(&mut self, from: usize, to: usize, slot: &DraftSlot) {
        if slot.len() > 0 {
            self.pool.move_row(from, to, slot.len());
        }
    }

    /// Each ask's guesses (in `asks`' order), as [`Draft::propose`] would make them for each
    /// sequence alone: the draft first reads the generated tokens it has not read, then guesses
    /// its most likely next token while it gives it at least [`Draft::p_min`], within the
    /// ask's limit; under a constraint only tokens it allows (the constraint is left where it
    /// was). `lens` are every running row's [`DraftSlot::len`].
    pub(crate) fn propose(&mut self, asks: &mut [Ask<'_>], lens: &[usize]) -> Result<Vec<Vec<u32>>> {
        let mut lens = lens.to_vec();
        let mut props: Vec<Proposal> = Vec::with_capacity(asks.len());
        let mut snapshots = Vec::with_capacity(asks.len());
        for a in asks.iter_mut() {
            let slot = &mut *a.slot;
            let todo = a.generated.len().saturating_sub(slot.synced);
            // Past the row's room (the draft's context, or the generation's): no more guesses.
            let feed = if a.limit == 0 || todo == 0 || slot.prompt_len + a.generated.len() >= slot.capacity {
                Vec::new()
            } else {
                let feed = a.generated[slot.synced..].iter().map(|&t| t as i64).collect();
                slot.synced = a.generated.len();
                feed
            };
            slot.fed_guesses = 0;
            snapshots.push(a.constraint.as_deref().map(|c| c.snapshot()));
            props.push(Proposal {
                feed,
                guesses: Vec::new(),
            });
        }
        let result = self.guess(asks, &mut props, &mut lens);
        for (a, at) in asks.iter_mut().zip(snapshots) {
            if let (Some(c), Some(at)) = (a.constraint.as_deref_mut(), at) {
                c.restore(at);
            }
        }
        result?;
        Ok(props.into_iter().map(|p| p.guesses).collect())
    }

    /// Calls until every row is done guessing.
    fn guess(&mut self, asks: &mut [Ask<'_>], props: &mut [Proposal], lens: &mut [usize]) -> Result<()> {
        loop {
            // A row whose next feed would pass its room stops here.
            for (a, p) in asks.iter().zip(props.iter_mut()) {
                if a.slot.len + p.feed.len() > a.slot.capacity {
                    p.feed.clear();
                }
            }
            let mut todo: Vec<usize> = (0..props.len()).filter(|&i| !props[i].feed.is_empty()).collect();
            if todo.is_empty() {
                return Ok(());
            }
            while !todo.is_empty() {
                let s = todo.iter().map(|&i| props[i].feed.len()).max().unwrap_or(0);
                // Every row of a call writes `s` slots: a row without room for them is fed in a
                // later call with a shorter feed (the longest feed's row has room: see above).
                let cap = self.pool.capacity;
                let (now, later): (Vec<usize>, Vec<usize>) =
                    todo.iter().partition(|&&i| lens[asks[i].row] + s <= cap);
                let mut by_row = vec![None; lens.len()];
                for &i in &now {
                    by_row[asks[i].row] = Some(i);
                }
                self.feed(asks, props, lens, &by_row, s)?;
                todo = later;
            }
        }
    }

    /// The calls that feed the rows of `by_row` (each row's ask, if it has one) their feeds,
    /// `s` slots per row, and take each one's next guess.
    fn feed(
        &mut self,
        asks: &mut [Ask<'_>],
        props: &mut [Proposal],
        lens: &mut [usize],
        by_row: &[Option<usize>],
        s: usize,
    ) -> Result<()> {
        let eos = self.draft.pkg.manifest.config.tokenizer.eos_token_id;
        let pad = self.draft.pkg.manifest.config.tokenizer.pad_token_id as i64;
        let vocab = self.draft.pkg.manifest.decoder.vocab_size;
        let dm = self.draft.pkg.manifest.decoder.hidden_size;
        for rows in segments(by_row, lens, s, self.pool.capacity) {
            let cap = self.pool.capacity;
            let m = rows.len();
            let mut ids = Vec::with_capacity(m * s);
            let mut mask = vec![0i64; m * cap];
            let mut past = Vec::with_capacity(m);
            for (k, r) in rows.clone().enumerate() {
                debug_assert!(lens[r] + s <= cap, "row {r} has no room for {s} slots");
                let feed: &[i64] = by_row[r].map(|i| props[i].feed.as_slice()).unwrap_or(&[]);
                ids.extend_from_slice(feed);
                ids.extend(std::iter::repeat_n(pad, s - feed.len()));
                // A row with nothing to read sees its padding (finite keys and values in
                // slots past its own, written over by its next call).
                let seen = lens[r] + if feed.is_empty() { s } else { feed.len() };
                mask[k * cap..k * cap + seen].fill(1);
                past.push(lens[r] as i64);
            }
            let call = Call::text(ids, s, dm, mask, past);
            let logits = pool_call(&mut self.draft.pkg, &mut self.pool, rows.clone(), call, true)?;
            self.calls += 1;
            for (k, r) in rows.enumerate() {
                let Some(i) = by_row[r] else { continue };
                let (a, p) = (&mut asks[i], &mut props[i]);
                let n = p.feed.len();
                lens[r] += n;
                a.slot.len += n;
                if !p.guesses.is_empty() {
                    a.slot.fed_guesses += 1;
                }
                let at = (k * s + n - 1) * vocab;
                let mut logits = logits[at..at + vocab].to_vec();
                p.feed.clear();
                if let Some(c) = a.constraint.as_deref_mut() {
                    // Nothing allowed (or left possible): no guess; the target says why.
                    if c.restrict(&mut logits, false, true).is_err() {
                        continue;
                    }
                }
                let (best, prob) = most_likely(&logits);
                if prob < self.draft.p_min {
                    continue;
                }
                p.guesses.push(best);
                if p.guesses.len() == a.limit || best == eos {
                    continue;
                }
                if let Some(c) = a.constraint.as_deref_mut() {
                    c.advance(best, false);
                }
                p.feed.push(best as i64);
            }
        }
        Ok(())
    }

    /// The target kept `kept` of the guesses last proposed for this row (or of others, such
    /// as a grammar's forced text: then `proposed` is false): the row keeps those the draft
    /// read and forgets the rest.
    pub(crate) fn kept(slot: &mut DraftRow, kept: usize, proposed: bool) {
        let read = if proposed { slot.fed_guesses.min(kept) } else { 0 };
        slot.synced += read;
        slot.fed_guesses = 0;
        slot.len = slot.prompt_len + slot.synced;
    }
}

/// The contiguous row ranges of one call per range that together feed every row with
/// something to read (`by_row`): from the first such row to the last, except rows that
/// cannot take `s` slots of padding after their `lens` within `capacity` (a range ends
/// before them).
fn segments(by_row: &[Option<usize>], lens: &[usize], s: usize, capacity: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let mut last_fed = 0;
    for r in 0..by_row.len() {
        let fed = by_row[r].is_some();
        let fits = fed || lens[r] + s <= capacity;
        if fits && (start.is_some() || fed) {
            start.get_or_insert(r);
            if fed {
                last_fed = r;
            }
        } else if let Some(b) = start.take() {
            out.push(b..last_fed + 1);
        }
    }
    if let Some(b) = start {
        out.push(b..last_fed + 1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::segments;

    #[test]
    fn calls_span_the_rows_fed_and_the_rows_between_that_have_room() {
        let fed = |rows: &[usize], n: usize| {
            let mut v = vec![None; n];
            for (i, &r) in rows.iter().enumerate() {
                v[r] = Some(i);
            }
            v
        };
        // Every row fed: one call.
        assert_eq!(segments(&fed(&[0, 1, 2], 3), &[5, 9, 7], 3, 12), vec![0..3]);
        // Rows 1 and 4 fed: the rows between have room for the padding, those outside are
        // left out.
        assert_eq!(segments(&fed(&[1, 4], 6), &[5, 5, 9, 6, 5, 5], 3, 12), vec![1..5]);
        // Row 2 has no room for 3 slots of padding: two calls, each from a row fed to a row fed.
        assert_eq!(
            segments(&fed(&[1, 4], 6), &[5, 5, 10, 6, 5, 5], 3, 12),
            vec![1..2, 4..5]
        );
        // Nothing fed: no call.
        assert!(segments(&fed(&[], 3), &[1, 2, 3], 1, 12).is_empty());
    }
}
