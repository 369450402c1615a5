//! WebDataset tar shards as img2dataset writes them: `key.jpg|png|webp` + `key.txt` (+ `key.json`),
//! grouped by key, streamed entry by entry. Shards are given one by one or with a brace range
//! (`shards/{00000..00009}.tar`). The tar reader is a small ustar/PAX/GNU one, so a position is
//! just (shard, byte offset) and a resumed run seeks straight to it; a shard cut short ends with a
//! warning naming the shard and key, and reading goes on with the next shard.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::PathBuf;

use serde_json::{Value, json};

use super::example::{Example, ImageSource, SkipCounter};
use super::source::{Source, cursor_u64};
use crate::error::{ModelsError, Result};

/// `a/{000..003}.tar` → a/000.tar … a/003.tar (zero padding kept); no braces → the spec itself.
pub fn expand_braces(spec: &str) -> Result<Vec<String>> {
    let (Some(open), Some(close)) = (spec.find('{'), spec.find('}')) else {
        return Ok(vec![spec.to_string()]);
    };
    let bad = || ModelsError::Data(format!("bad brace range in {spec:?} (expected {{00000..00009}})"));
    let inner = spec.get(open + 1..close).ok_or_else(bad)?;
    let (lo, hi) = inner.split_once("..").ok_or_else(bad)?;
    let (a, b): (u64, u64) = (lo.parse().map_err(|_| bad())?, hi.parse().map_err(|_| bad())?);
    if a > b {
        return Err(bad());
    }
    let width = lo.len();
    let mut out = Vec::new();
    for i in a..=b {
        let rest = expand_braces(&spec[close + 1..])?;
        for r in rest {
            out.push(format!("{}{:0width$}{}", &spec[..open], i, r));
        }
    }
    Ok(out)
}

const IMAGE_EXTS: &[&str] = &["jpg", "jpeg", "png", "webp"];

struct Entry {
    name: String,
    data: Vec<u8>,
}

/// Why reading an entry stopped.
enum TarEnd {
    /// Clean end of archive (zero blocks or end of file on a boundary).
    End,
    /// The shard is damaged here.
    Broken(String),
}

pub struct TarSource {
    name: String,
    shards: Vec<PathBuf>,
    shard: usize,
    reader: Option<BufReader<File>>,
    offset: u64,
    /// First entry of the next key, read ahead while grouping.
    lookahead: Option<(Entry, u64)>,
}

impl TarSource {
    pub fn open(spec: &str) -> Result<Self> {
        let shards: Vec<PathBuf> = expand_braces(spec)?.into_iter().map(PathBuf::from).collect();
        if let Some(missing) = shards.iter().find(|s| !s.is_file()) {
            return Err(ModelsError::Data(format!(
                "{}: shard not found",
                missing.display()
            )));
        }
        Ok(TarSource {
            name: spec.to_string(),
            shards,
            shard: 0,
            reader: None,
            offset: 0,
            lookahead: None,
        })
    }

    fn shard_name(&self) -> String {
        self.shards
            .get(self.shard)
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    fn reader(&mut self) -> Result<&mut BufReader<File>> {
        if self.reader.is_none() {
            let path = &self.shards[self.shard];
            let mut f =
                File::open(path).map_err(|e| ModelsError::Data(format!("{}: {e}", path.display())))?;
            f.seek(SeekFrom::Start(self.offset))
                .map_err(|e| ModelsError::Data(format!("{}: {e}", path.display())))?;
            self.reader = Some(BufReader::new(f));
        }
        Ok(self.reader.as_mut().expect("just opened"))
    }

    /// Read one file entry (skipping directories and metadata headers).
    fn read_entry(&mut self) -> Result<std::result::Result<Entry, TarEnd>> {
        let mut long_name: Option<String> = None;
        loop {
            let mut header = [0u8; 512];
            let r = self.reader()?;
            match read_full(r, &mut header) {
                // A tar ends with zero blocks; end of file before them means the shard was cut.
                Ok(0) => {
                    return Ok(Err(TarEnd::Broken(
                        "archive ends without its end-of-archive blocks".into(),
                    )));
                }
                Ok(512) => {}
                Ok(_) => return Ok(Err(TarEnd::Broken("header cut short".into()))),
                Err(e) => return Ok(Err(TarEnd::Broken(e.to_string()))),
            }
            if header.iter().all(|&b| b == 0) {
                return Ok(Err(TarEnd::End));
            }
            let size = match parse_octal(&header[124..136]) {
                Some(s) => s,
                None => return Ok(Err(TarEnd::Broken("bad size field".into()))),
            };
            let padded = size.div_ceil(512) * 512;
            let mut data = vec![0u8; size as usize];
            let r = self.reader()?;
            match read_full(r, &mut data) {
                Ok(n) if n as u64 == size => {}
                Ok(_) => return Ok(Err(TarEnd::Broken("entry data cut short".into()))),
                Err(e) => return Ok(Err(TarEnd::Broken(e.to_string()))),
            }
            let mut pad = vec![0u8; (padded - size) as usize];
            if read_full(r, &mut pad).map(|n| n != pad.len()).unwrap_or(true) {
                return Ok(Err(TarEnd::Broken("padding cut short".into())));
            }
            self.offset += 512 + padded;
            match header[156] {
                b'L' => long_name = Some(cstr(&data)),
                b'x' => long_name = pax_path(&data).or(long_name),
                b'g' | b'5' => {}
                b'0' | 0 => {
                    let name = long_name.take().unwrap_or_else(|| {
                        let prefix = cstr(&header[345..500]);
                        let base = cstr(&header[0..100]);
                        if prefix.is_empty() {
                            base
                        } else {
                            format!("{prefix}/{base}")
                        }
                    });
                    return Ok(Ok(Entry { name, data }));
                }
                _ => long_name = None,
            }
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(field)
        .ok()?
        .trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The `path=` record of a PAX extended header.
fn pax_path(data: &[u8]) -> Option<String> {
    String::from_utf8_lossy(data).lines().find_map(|l| {
        let (_, kv) = l.split_once(' ')?;
        kv.strip_prefix("path=").map(str::to_string)
    })
}

/// `dir/000123.jpg` → (`dir/000123`, `jpg`).
fn split_key(name: &str) -> (&str, &str) {
    let base_start = name.rfind('/').map_or(0, |i| i + 1);
    match name[base_start..].find('.') {
        Some(dot) => (&name[..base_start + dot], &name[base_start + dot + 1..]),
        None => (name, ""),
    }
}

impl Source for TarSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn next(&mut self, skips: &SkipCounter) -> Result<Option<Example>> {
        loop {
            if self.shard >= self.shards.len() {
                return Ok(None);
            }
            let first = match self.lookahead.take() {
                Some((e, _)) => Ok(e),
                None => self.read_entry()?,
            };
            let first = match first {
                Ok(e) => e,
                Err(end) => {
                    if let TarEnd::Broken(why) = end {
                        skips.skip(&format!("{} at byte {}", self.shard_name(), self.offset), &why);
                    }
                    self.shard += 1;
                    self.reader = None;
                    self.offset = 0;
                    continue;
                }
            };
            let key = split_key(&first.name).0.to_string();
            let mut group = vec![first];
            let mut broken = None;
            loop {
                let before = self.offset;
                match self.read_entry()? {
                    Ok(e) if split_key(&e.name).0 == key => group.push(e),
                    Ok(e) => {
                        self.lookahead = Some((e, before));
                        break;
                    }
                    Err(TarEnd::End) => break,
                    Err(TarEnd::Broken(why)) => {
                        broken = Some(why);
                        break;
                    }
                }
            }
            let origin = format!("{}:{key}", self.shard_name());
            if let Some(why) = broken {
                // The group may be incomplete: skip it and the rest of the shard.
                skips.skip(
                    &origin,
                    &format!("shard is damaged ({why}); skipping the rest of it"),
                );
                self.shard += 1;
                self.reader = None;
                self.offset = 0;
                continue;
            }
            let ext_of = |e: &Entry| split_key(&e.name).1.to_ascii_lowercase();
            let image = group.iter().find(|e| IMAGE_EXTS.contains(&ext_of(e).as_str()));
            let text = group.iter().find(|e| ext_of(e) == "txt");
            match (image, text) {
                (Some(img), Some(txt)) => match String::from_utf8(txt.data.clone()) {
                    Ok(t) if !t.trim().is_empty() => {
                        let ex = Example::captioned(
                            ImageSource::Bytes(img.data.clone()),
                            None,
                            t.trim().to_string(),
                            origin,
                        );
                        return Ok(Some(ex));
                    }
                    Ok(_) => skips.skip(&origin, "empty caption"),
                    Err(_) => skips.skip(&origin, "caption is not UTF-8"),
                },
                (None, _) => skips.skip(&origin, "no image (jpg/png/webp)"),
                (_, None) => skips.skip(&origin, "no caption (.txt)"),
            }
        }
    }

    fn rewind(&mut self) -> Result<()> {
        self.seek(&json!({ "shard": 0, "offset": 0 }))
    }

    fn cursor(&self) -> Value {
        // A read-ahead entry belongs to the next example: point at its header.
        let offset = self.lookahead.as_ref().map_or(self.offset, |(_, at)| *at);
        json!({ "shard": self.shard, "offset": offset })
    }

    fn seek(&mut self, cursor: &Value) -> Result<()> {
        self.shard = cursor_u64(cursor, "shard")? as usize;
        self.offset = cursor_u64(cursor, "offset")?;
        self.reader = None;
        self.lookahead = None;
        Ok(())
    }
}
