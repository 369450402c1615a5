//! The KOSMOS sequence layout, shared by the trainer and the runtime:
//! `<s> <image> [num_latents image slots] </image> text ... </s>`, images anywhere in the text.

use crate::error::Result;
use crate::tokenizer::KosmosTokenizer;

/// One part of an interleaved prompt.
#[derive(Clone, Debug, PartialEq)]
pub enum Segment {
    Text(String),
    /// The next image, in the order the images are given.
    Image,
}

/// Token ids plus, per position, whether it is an image slot (filled by image embeddings).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Assembled {
    pub input_ids: Vec<u32>,
    pub image_mask: Vec<bool>,
    pub num_images: usize,
}

impl Assembled {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    fn push(&mut self, id: u32, image: bool) {
        self.input_ids.push(id);
        self.image_mask.push(image);
    }
}

/// A decoder batch of `rows` left-padded with `pad` to `width` (≥ the longest): `input_ids`,
/// `image_mask` and `attention_mask` (1 on real tokens), each [rows, width] row-major. Left
/// padding keeps every row's last token in the last column, where generation continues.
pub fn left_padded<'a>(
    rows: impl IntoIterator<Item = &'a Assembled>,
    width: usize,
    pad: u32,
) -> (Vec<i64>, Vec<bool>, Vec<i64>) {
    let (mut ids, mut img, mut attn) = (Vec::new(), Vec::new(), Vec::new());
    for a in rows {
        let padding = width - a.len();
        ids.extend(std::iter::repeat_n(pad as i64, padding).chain(a.input_ids.iter().map(|&id| id as i64)));
        img.extend(std::iter::repeat_n(false, padding).chain(a.image_mask.iter().copied()));
        attn.extend(std::iter::repeat_n(0, padding).chain(std::iter::repeat_n(1, a.len())));
    }
    (ids, img, attn)
}

/// Assemble `segments` behind `<s>`; `image_tokens` slots per image; `</s>` at the end if `eos`.
pub fn assemble(
    tok: &KosmosTokenizer,
    segments: &[Segment],
    image_tokens: usize,
    eos: bool,
) -> Result<Assembled> {
    let sp = tok.special();
    let mut out = Assembled::default();
    out.push(sp.bos_token_id, false);
    for seg in segments {
        match seg {
            Segment::Text(text) => {
                for id in tok.encode(text)? {
                    out.push(id, false);
                }
            }
            Segment::Image => {
                out.push(sp.image_start_token_id, false);
                for _ in 0..image_tokens {
                    out.push(sp.image_slot_id(), true);
                }
                out.push(sp.image_end_token_id, false);
                out.num_images += 1;
            }
        }
    }
    if eos {
        out.push(sp.eos_token_id, false);
    }
    Ok(out)
}
