//! The built-in tokenizer: exact vocabulary size, special ids, round trips, byte fallback, the
//! bytes of each token as listed and as decoded; and
//! loading a tokenizer.json whose special tokens disagree with the config.

use kosmos_models::{KosmosTokenizer, ModelsError, SpecialTokens};

fn corpus() -> Vec<String> {
    let mut v = Vec::new();
    for c in ["red", "green", "blue", "yellow"] {
        for s in ["circle", "square", "triangle"] {
            v.push(format!("a {c} {s} on the left and a {c} {s} on the right"));
            v.push(format!("Question: what colour is the {s}? Answer: {c}"));
        }
    }
    v
}

#[test]
fn trained_vocab_has_exactly_the_requested_size_and_special_ids() {
    let sp = SpecialTokens::default();
    for size in [64, 301, 512, 32002] {
        let tok = KosmosTokenizer::train(|| corpus().into_iter(), size, &sp).unwrap();
        assert_eq!(tok.vocab_size(), size);
        for (t, id) in sp.pairs() {
            assert_eq!(tok.token_to_id(t), Some(id), "{t}");
        }
    }
}

#[test]
fn round_trips_text_and_specials_stay_whole() {
    let sp = SpecialTokens::default();
    let tok = KosmosTokenizer::train(|| corpus().into_iter(), 512, &sp).unwrap();
    for text in [
        "a red circle on the left",
        "Question: what colour is the square? Answer: blue",
    ] {
        let ids = tok.encode(text).unwrap();
        assert!(!ids.contains(&sp.unk_token_id), "{text}: {ids:?}");
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }
    // Words seen in training are single pieces.
    assert_eq!(tok.encode("circle").unwrap().len(), 1);
    // `<image>` in a prompt is the special token, not characters.
    let ids = tok.encode("see <image> here").unwrap();
    assert!(ids.contains(&sp.image_start_token_id));
}

#[test]
fn unseen_text_falls_back_to_bytes_not_unk() {
    let sp = SpecialTokens::default();
    let tok = KosmosTokenizer::train(|| corpus().into_iter(), 512, &sp).unwrap();
    let text = "Zebra ünïcode 東京 ✓";
    let ids = tok.encode(text).unwrap();
    assert!(!ids.contains(&sp.unk_token_id), "{ids:?}");
    assert_eq!(tok.decode(&ids).unwrap(), text);
}

/// Per-token bytes concatenate to the text: `▁` is a space, byte pieces are their byte.
#[test]
fn token_bytes_concatenate_to_the_text() {
    let sp = SpecialTokens::default();
    let tok = KosmosTokenizer::train(|| corpus().into_iter(), 512, &sp).unwrap();
    let text = "a red circle and 東京 ✓";
    let ids = tok.encode(text).unwrap();
    let bytes: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes(id)).collect();
    // The decoder drops the space Metaspace puts before the first word.
    assert_eq!(String::from_utf8(bytes).unwrap().trim_start(), text);
    assert!(
        ids.iter()
            .any(|&id| tok.token_bytes(id).len() == 1 && tok.token_bytes(id)[0] >= 0x80)
    );
    assert_eq!(tok.token_bytes(sp.eos_token_id), b"</s>");
    assert!(tok.token_bytes(1 << 30).is_empty());
}

/// What structured output matches against: each token's `decoded_bytes` (the first without its
/// `▁`, specials empty and not counted as first) concatenate to what `tokenizers`' own decoder makes of the ids, for every
/// token first and every pair of a sample of tokens.
#[test]
fn decoded_bytes_concatenate_to_the_decoded_text() {
    let sp = SpecialTokens::default();
    let tok = KosmosTokenizer::train(|| corpus().into_iter(), 512, &sp).unwrap();
    let n = tok.vocab_size() as u32;
    let text_of = |ids: &[u32], bytes: Vec<u8>| {
        // Byte pieces that are not whole UTF-8 decode to U+FFFD: compare only valid text.
        if let Ok(want) = String::from_utf8(bytes) {
            assert_eq!(tok.decode(ids).unwrap(), want, "{ids:?}");
        }
    };
    for t in 0..n {
        text_of(&[t], tok.decoded_bytes(t, true));
    }
    let sample: Vec<u32> = (0..n).step_by(7).chain(sp.pairs().map(|p| p.1)).collect();
    for &a in &sample {
        for &b in &sample {
            // Decoding skips specials, so the token after one still opens the text.
            let a_special = sp.pairs().iter().any(|p| p.1 == a);
            let bytes = [tok.decoded_bytes(a, true), tok.decoded_bytes(b, a_special)].concat();
            text_of(&[a, b], bytes);
        }
    }
    let red = tok.encode("a red circle").unwrap();
    let bytes: Vec<u8> = red
        .iter()
        .enumerate()
        .flat_map(|(i, &t)| tok.decoded_bytes(t, i == 0))
        .collect();
    assert_eq!(bytes, b"a red circle");
}

#[test]
fn saved_tokenizer_loads_and_a_wrong_special_id_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let sp = SpecialTokens::default();
    let tok = KosmosTokenizer::train(|| corpus().into_iter(), 300, &sp).unwrap();
    let path = dir.path().join("tokenizer.json");
    tok.save(&path).unwrap();
    let back = KosmosTokenizer::load(&path, &sp).unwrap();
    assert_eq!(back.vocab_size(), 300);
    assert_eq!(
        back.encode("a red circle").unwrap(),
        tok.encode("a red circle").unwrap()
    );

    let mut other = sp.clone();
    other.eos_token_id = 7;
    let err = KosmosTokenizer::load(&path, &other).unwrap_err();
    assert!(matches!(err, ModelsError::Tokenizer { .. }));
    let msg = err.to_string();
    assert!(msg.contains("tokenizer.json") && msg.contains("</s>"), "{msg}");

    let missing = KosmosTokenizer::load(&dir.path().join("nope.json"), &sp).unwrap_err();
    assert!(missing.to_string().contains("nope.json"), "{missing}");
}

/// The same corpus gives the same tokenizer, ids and scores, every time: the Unigram trainer
/// orders some of its work by hash (another order in every process and map), and a piece that
/// changed id between runs made a seeded training run's losses differ.
#[test]
fn training_is_deterministic() {
    let sp = SpecialTokens::default();
    let json = |tok: &KosmosTokenizer| tok.inner().to_string(false).unwrap();
    let first = json(&KosmosTokenizer::train(|| corpus().into_iter(), 512, &sp).unwrap());
    for _ in 0..6 {
        let again = json(&KosmosTokenizer::train(|| corpus().into_iter(), 512, &sp).unwrap());
        assert!(again == first, "a second training gave another tokenizer");
    }
}

/// Two tokenizers pair (a draft model for a target) only when every id means the same: the
/// same training gives none; another size, another piece at one id or another special id is
/// named.
#[test]
fn vocabulary_differences_are_named() {
    let sp = SpecialTokens::default();
    let a = KosmosTokenizer::train(|| corpus().into_iter(), 512, &sp).unwrap();
    let same = KosmosTokenizer::train(|| corpus().into_iter(), 512, &sp).unwrap();
    assert_eq!(a.vocabulary_difference(&same), None);
    let smaller = KosmosTokenizer::train(|| corpus().into_iter(), 301, &sp).unwrap();
    let e = a.vocabulary_difference(&smaller).unwrap();
    assert!(e.contains("512 entries against 301"), "{e}");
    let mut other_corpus = corpus();
    other_corpus.push("zebras zebras zebras everywhere zebras".into());
    let other = KosmosTokenizer::train(|| other_corpus.clone().into_iter(), 512, &sp).unwrap();
    let e = a.vocabulary_difference(&other).unwrap();
    assert!(e.starts_with("token "), "{e}");
    let swapped = SpecialTokens {
        pad_token: "</s>".into(),
        pad_token_id: sp.eos_token_id,
        eos_token: "<pad>".into(),
        eos_token_id: sp.pad_token_id,
        ..sp.clone()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    a.save(&path).unwrap();
    // The same file read with other special tokens (their ids swapped by name).
    let renamed = KosmosTokenizer::load(&path, &swapped).unwrap();
    let e = a.vocabulary_difference(&renamed).unwrap();
    assert!(e.contains("special tokens"), "{e}");
}
