//! Training data: the synthetic task, manifests and WebDataset shards with bad records skipped and
//! counted, packing with loss only on text, and exact continuation from a saved state.

use std::io::Write;
use std::path::Path;

use image::{Rgb, RgbImage};
use kosmos_models::KosmosConfig;
use kosmos_train::data::example::SkipCounter;
use kosmos_train::data::webdataset::expand_braces;
use kosmos_train::data::{DataStream, open_source};
use kosmos_train::init::{TokenizerSource, tokenizer_for};
use kosmos_train::synthetic::{Split, Task, item};

fn tiny() -> (KosmosConfig, kosmos_models::KosmosTokenizer) {
    let mut cfg = KosmosConfig::tiny();
    let tok = tokenizer_for(&mut cfg, TokenizerSource::Builtin).unwrap();
    (cfg, tok)
}

fn png(path: &Path, c: u8) {
    RgbImage::from_pixel(20, 20, Rgb([c, 10, 10])).save(path).unwrap();
}

#[test]
fn synthetic_items_are_deterministic_and_splits_differ() {
    let a = item(Task::Shapes, Split::Train, 3, 17);
    let b = item(Task::Shapes, Split::Train, 3, 17);
    assert_eq!(a.image, b.image);
    assert_eq!(a.text, b.text);
    assert!(
        a.text.starts_with("a ") || a.text.starts_with("an "),
        "{}",
        a.text
    );
    let test: Vec<_> = (0..20)
        .map(|i| item(Task::Shapes, Split::Test, 3, i).image)
        .collect();
    let train: Vec<_> = (0..20)
        .map(|i| item(Task::Shapes, Split::Train, 3, i).image)
        .collect();
    assert!(test.iter().all(|t| !train.contains(t)));
    let q = item(Task::ShapesVqa, Split::Train, 0, 5);
    let prompt = q.prompt.unwrap();
    assert!(
        prompt.starts_with("Question: ") && prompt.ends_with(" Answer:"),
        "{prompt}"
    );
    assert!(!q.text.contains(' '), "answers are one word: {}", q.text);
}

#[test]
fn manifest_skips_bad_records_with_their_line_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(&d.join("good.png"), 200);
    std::fs::write(
        d.join("corrupt.jpg"),
        b"\xff\xd8\xff\xe0 this is not really a jpeg",
    )
    .unwrap();
    let mut f = std::fs::File::create(d.join("m.jsonl")).unwrap();
    writeln!(f, r#"{{"image": "good.png", "text": "a red square"}}"#).unwrap(); // 1 ok
    writeln!(f, r#"{{"image": "missing.png", "text": "gone"}}"#).unwrap(); // 2 missing image
    writeln!(f, r#"{{"image": "corrupt.jpg", "text": "broken"}}"#).unwrap(); // 3 corrupt (at encode)
    writeln!(f, r#"{{"image": "good.png", "text": ""}}"#).unwrap(); // 4 empty caption
    f.write_all(b"{\"text\": \"caf\xe9\"}\n").unwrap(); // 5 not UTF-8
    writeln!(f, "{{not json").unwrap(); // 6
    writeln!(f, r#"{{"text": "just some text"}}"#).unwrap(); // 7 ok, text only
    writeln!(
        f,
        r#"{{"segments": [{{"text": "look"}}, {{"image": "good.png"}}, {{"text": "red"}}]}}"#
    )
    .unwrap(); // 8 ok
    writeln!(
        f,
        r#"{{"image": "good.png", "prompt": "Question: colour? Answer:", "text": "red"}}"#
    )
    .unwrap(); // 9 ok
    drop(f);

    let (cfg, tok) = tiny();
    let src = open_source(d.join("m.jsonl").to_str().unwrap(), Split::Train, 0, None).unwrap();
    let mut stream = DataStream::new(vec![(src, 1.0)], 0, tok, cfg, 8, 64).unwrap();
    let batch = stream.next_batch().unwrap();
    // 4 good records per epoch; 8 rows take two epochs' worth.
    assert!(batch.n_images >= 6, "{}", batch.n_images);
    // missing, empty, non-UTF-8, bad JSON per epoch, plus the corrupt JPEG when encoded.
    assert!(stream.skips.count() >= 5, "{}", stream.skips.count());
}

#[test]
fn a_source_without_valid_records_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("bad.jsonl");
    std::fs::write(
        &m,
        "{\"image\": \"nope.png\", \"text\": \"x\"}\n\n{\"text\": \"\"}\n",
    )
    .unwrap();
    let (cfg, tok) = tiny();
    let src = open_source(m.to_str().unwrap(), Split::Train, 0, None).unwrap();
    let mut stream = DataStream::new(vec![(src, 1.0)], 0, tok, cfg, 2, 64).unwrap();
    let e = stream.next_batch().unwrap_err().to_string();
    assert!(e.contains("bad.jsonl") && e.contains("no valid record"), "{e}");
}

fn write_shard(path: &Path, keys: &[&str]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (i, key) in keys.iter().enumerate() {
        let mut img = Vec::new();
        RgbImage::from_pixel(16, 16, Rgb([i as u8 * 40, 0, 0]))
            .write_to(&mut std::io::Cursor::new(&mut img), image::ImageFormat::Png)
            .unwrap();
        for (name, data) in [
            (format!("{key}.png"), img),
            (format!("{key}.txt"), format!("caption {i}").into_bytes()),
            (format!("{key}.json"), b"{}".to_vec()),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data.as_slice()).unwrap();
        }
    }
    b.finish().unwrap();
}

#[test]
fn webdataset_shards_with_a_cut_shard() {
    let dir = tempfile::tempdir().unwrap();
    let long =
        "a_rather_long_directory_name_that_needs_more_than_one_hundred_bytes_of_tar_header/and_more_of_it";
    write_shard(
        &dir.path().join("00000.tar"),
        &["000000", "000001", &format!("{long}/000002")],
    );
    write_shard(&dir.path().join("00001.tar"), &["000003", "000004", "000005"]);
    let cut = dir.path().join("00001.tar");
    let len = std::fs::metadata(&cut).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let spec = format!("{}/{{00000..00001}}.tar", dir.path().display());
    let mut src = open_source(&spec, Split::Train, 0, None).unwrap();
    let skips = SkipCounter::default();
    let mut captions = Vec::new();
    while let Some(ex) = src.next(&skips).unwrap() {
        let (_, _, text) = ex.as_captioned().unwrap();
        captions.push(text.to_string());
    }
    assert_eq!(
        &captions[..3],
        &["caption 0", "caption 1", "caption 2"],
        "{captions:?}"
    );
    assert!(captions.len() < 6, "the cut shard loses its tail: {captions:?}");
    assert!(skips.count() >= 1, "the cut is reported");
}

#[test]
fn brace_ranges_expand_with_padding() {
    assert_eq!(
        expand_braces("s/{008..011}.tar").unwrap(),
        vec!["s/008.tar", "s/009.tar", "s/010.tar", "s/011.tar"]
    );
    assert_eq!(expand_braces("one.tar").unwrap(), vec!["one.tar"]);
    assert!(expand_braces("s/{9..1}.tar").is_err());
}

#[test]
fn packing_puts_loss_on_text_only_in_the_kosmos_layout() {
    let (cfg, tok) = tiny();
    let sp = cfg.tokenizer.clone();
    let src = open_source("synthetic:shapes-captions", Split::Train, 0, None).unwrap();
    let mut stream = DataStream::new(vec![(src, 1.0)], 0, tok.clone(), cfg.clone(), 4, 64).unwrap();
    let b = stream.next_batch().unwrap();
    let row = &b.input_ids[..b.len];
    let img = &b.image_mask[..b.len];
    let tgt = &b.targets[..b.len];
    let l = cfg.image_tokens();
    assert_eq!(row[0], sp.bos_token_id as i64);
    assert_eq!(row[1], sp.image_start_token_id as i64);
    assert!(img[2..2 + l].iter().all(|&m| m));
    assert_eq!(row[2 + l], sp.image_end_token_id as i64);
    // No target is an image slot, <image>, </image> or <s>; the caption and </s> are targets.
    for t in 0..b.len - 1 {
        if tgt[t] != -100 {
            assert!(!img[t + 1] && tgt[t] == row[t + 1]);
            assert!(t + 1 > 2 + l, "target inside the image part at {t}");
        }
    }
    let eos_at = row.iter().position(|&i| i == sp.eos_token_id as i64).unwrap();
    assert_eq!(tgt[eos_at - 1], sp.eos_token_id as i64);
    let text: Vec<u32> = (3 + l..eos_at).map(|t| row[t] as u32).collect();
    assert!(tok.decode(&text).unwrap().starts_with('a'));
}

#[test]
fn restored_state_continues_with_the_same_batches() {
    let (cfg, tok) = tiny();
    let dir = tempfile::tempdir().unwrap();
    png(&dir.path().join("a.png"), 9);
    let mut m = String::new();
    for i in 0..7 {
        m.push_str(&format!(
            "{{\"image\": \"a.png\", \"text\": \"caption number {i}\"}}\n"
        ));
    }
    std::fs::write(dir.path().join("m.jsonl"), m).unwrap();
    let manifest = dir.path().join("m.jsonl").display().to_string();
    let make = || {
        let sources = vec![
            (
                open_source("synthetic:shapes", Split::Train, 4, None).unwrap(),
                1.0,
            ),
            (open_source(&manifest, Split::Train, 4, None).unwrap(), 0.7),
        ];
        DataStream::new(sources, 4, tok.clone(), cfg.clone(), 3, 48).unwrap()
    };
    let mut a = make();
    for _ in 0..3 {
        a.next_batch().unwrap();
    }
    let state = a.next_batch().unwrap().state;
    let expected: Vec<_> = (0..4).map(|_| a.next_batch().unwrap()).collect();
    let mut b = make();
    b.restore(&state).unwrap();
    for e in expected {
        let got = b.next_batch().unwrap();
        assert_eq!(got.input_ids, e.input_ids);
        assert_eq!(got.targets, e.targets);
        assert_eq!(got.pixels, e.pixels);
        assert_eq!(got.state, e.state);
    }
}
