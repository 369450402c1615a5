//! JSON Schema to GBNF, after llama.cpp's `json-schema-to-grammar`: the output is a JSON text
//! the schema accepts. Supported: `type` (one or several), `enum`, `const`, `anyOf` / `oneOf`
//! (as alternatives), one-element `allOf`, local `$ref`s (recursive ones too), objects
//! (`properties` in schema order, `required`, `additionalProperties` for property-less maps),
//! arrays (`items`, `prefixItems`, `minItems`, `maxItems`), strings (`minLength`, `maxLength`,
//! `pattern`, `format` date / time / date-time / uuid) and bounds on integers and numbers
//! (compared exactly, in decimal). Any other keyword is an error naming it and where it is,
//! rather than output the schema would reject.
//!
//! Choices the grammar makes (each output is still valid under the schema): properties come in
//! schema order and only declared ones are written; a `prefixItems` tuple is written whole;
//! whitespace is at most one space between tokens (a model that was not trained on JSON fills
//! any freedom there with blanks, as llama.cpp's users see); numbers have at most 16 digits per
//! part, and bounded ones no exponent.

use std::collections::{HashMap, HashSet};

use crate::decimal::{Dec, number_in};
use crate::error::{GrammarError, Result};
use crate::gbnf::literal;
use crate::json::Json;
use crate::regex::{self, Target};

/// Rules of the generic JSON grammar, with the rules each uses.
const BASE: &[(&str, &str, &[&str])] = &[
    ("ws", r#"| " ""#, &[]),
    (
        "char",
        r#"[^"\\\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})"#,
        &[],
    ),
    ("string", r#""\"" char* "\"""#, &["char"]),
    ("integral-part", r#""0" | [1-9] [0-9]{0,15}"#, &[]),
    (
        "number",
        r#""-"? integral-part ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,16})?"#,
        &["integral-part"],
    ),
    ("integer", r#""-"? integral-part"#, &["integral-part"]),
    ("boolean", r#""true" | "false""#, &[]),
    ("null", r#""null""#, &[]),
    (
        "value",
        "object | array | string | number | boolean | null",
        &["object", "array", "string", "number", "boolean", "null"],
    ),
    (
        "object",
        r#""{" ws ( string ws ":" ws value ws ( "," ws string ws ":" ws value ws )* )? "}""#,
        &["ws", "string", "value"],
    ),
    (
        "array",
        r#""[" ws ( value ws ( "," ws value ws )* )? "]""#,
        &["ws", "value"],
    ),
];

/// Keywords that only describe (ignored).
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "$schema",
    "$id",
    "$comment",
    "$defs",
    "definitions",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
];

const OBJECT_KEYWORDS: &[&str] = &["properties", "required", "additionalProperties"];
const ARRAY_KEYWORDS: &[&str] = &["items", "prefixItems", "minItems", "maxItems"];
const STRING_KEYWORDS: &[&str] = &["minLength", "maxLength", "pattern", "format"];
const NUMBER_KEYWORDS: &[&str] = &["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"];
const OTHER_KEYWORDS: &[&str] = &["type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"];

/// The GBNF of `schema` (root rule `root`).
pub fn to_gbnf(schema: &Json) -> Result<String> {
    let mut c = Conv {
        root: schema,
        rules: Vec::new(),
        names: HashSet::new(),
        refs: HashMap::new(),
    };
    c.names.insert("root".into());
    let body = c.visit(schema, "root", "#")?;
    c.rules.insert(0, ("root".into(), body));
    Ok(c.render())
}

/// The GBNF of any JSON object (OpenAI's `json_object` response format).
pub fn any_object_gbnf() -> String {
    let mut c = Conv {
        root: &Json::Null,
        rules: Vec::new(),
        names: HashSet::new(),
        refs: HashMap::new(),
    };
    let object = c.base("object");
    c.rules.insert(0, ("root".into(), object));
    c.render()
}

struct Conv<'a> {
    root: &'a Json,
    rules: Vec<(String, String)>,
    names: HashSet<String>,
    refs: HashMap<String, String>,
}

fn err(path: &str, message: impl Into<String>) -> GrammarError {
    GrammarError::Schema {
        path: path.to_string(),
        message: message.into(),
    }
}

/// The strings of an array keyword's value (at `path`).
fn strings(xs: &[Json], path: &str) -> Result<Vec<String>> {
    xs.iter()
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .ok_or_else(|| err(path, "must hold strings"))
        })
        .collect()
}

/// A rule name from any text (GBNF names are `[a-zA-Z0-9_-]`).
fn sanitize(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if out.is_empty() { "x".into() } else { out }
}

impl Conv<'_> {
    fn render(&self) -> String {
        self.rules.iter().map(|(n, b)| format!("{n} ::= {b}\n")).collect()
    }

    fn base(&mut self, name: &str) -> String {
        if self.names.insert(name.to_string()) {
            let (_, body, deps) = BASE.iter().find(|b| b.0 == name).expect("a base rule");
            self.rules.push((name.to_string(), body.to_string()));
            for d in *deps {
                self.base(d);
            }
        }
        name.to_string()
    }

    /// A new rule `name` (made unique) with `body`; returns the name.
    fn rule(&mut self, name: &str, body: String) -> String {
        let name = self.unique(name);
        self.rules.push((name.clone(), body));
        name
    }

    fn unique(&mut self, name: &str) -> String {
        let base = sanitize(name);
        let mut n = base.clone();
        let mut i = 1;
        while !self.names.insert(n.clone()) {
            n = format!("{base}-{i}");
            i += 1;
        }
        n
    }

    /// A GBNF expression for the JSON texts `s` accepts.
    fn visit(&mut self, s: &Json, name: &str, path: &str) -> Result<String> {
        let m = match s {
            Json::Bool(true) => return Ok(self.base("value")),
            Json::Bool(false) => return Err(err(path, "the schema `false` accepts no value")),
            Json::Object(m) => m,
            other => {
                return Err(err(
                    path,
                    format!("a schema must be an object or a boolean, not {}", other.kind()),
                ));
            }
        };
        for (k, _) in m {
            let known = [
                ANNOTATIONS,
                OBJECT_KEYWORDS,
                ARRAY_KEYWORDS,
                STRING_KEYWORDS,
                NUMBER_KEYWORDS,
                OTHER_KEYWORDS,
            ]
            .iter()
            .any(|list| list.contains(&k.as_str()));
            if !known {
                return Err(err(path, format!("keyword '{k}' is not supported")));
            }
        }
        if let Some(r) = s.get("$ref") {
            if let Some((k, _)) = m
                .iter()
                .find(|(k, _)| k != "$ref" && !ANNOTATIONS.contains(&k.as_str()))
            {
                return Err(err(path, format!("'{k}' beside '$ref' is not supported")));
            }
            return self.reference(r, path);
        }
        if let Some(c) = s.get("const") {
            return Ok(literal(&c.to_compact()));
        }
        if let Some(e) = s.get("enum") {
            let Json::Array(values) = e else {
                return Err(err(&format!("{path}/enum"), "must be an array"));
            };
            if values.is_empty() {
                return Err(err(&format!("{path}/enum"), "an empty enum accepts no value"));
            }
            let body = values
                .iter()
                .map(|v| literal(&v.to_compact()))
                .collect::<Vec<_>>()
                .join(" | ");
            return Ok(self.rule(name, body));
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(xs) = s.get(key) {
                let Json::Array(xs) = xs else {
                    return Err(err(&format!("{path}/{key}"), "must be an array"));
                };
                if xs.is_empty() {
                    return Err(err(&format!("{path}/{key}"), "must not be empty"));
                }
                let mut alts = Vec::new();
                for (i, x) in xs.iter().enumerate() {
                    alts.push(self.visit(x, &format!("{name}-{i}"), &format!("{path}/{key}/{i}"))?);
                }
                return Ok(self.rule(name, alts.join(" | ")));
            }
        }
        if let Some(xs) = s.get("allOf") {
            return match xs {
                Json::Array(xs) if xs.len() == 1 => self.visit(&xs[0], name, &format!("{path}/allOf/0")),
                _ => Err(err(
                    &format!("{path}/allOf"),
                    "only a one-element allOf is supported",
                )),
            };
        }
        let types: Vec<String> = match s.get("type") {
            None => vec![self.inferred_type(m, path)?],
            Some(Json::String(t)) => vec![t.clone()],
            Some(Json::Array(ts)) if !ts.is_empty() => strings(ts, &format!("{path}/type"))?,
            Some(_) => {
                return Err(err(
                    &format!("{path}/type"),
                    "must be a string or a non-empty array of strings",
                ));
            }
        };
        if types.len() == 1 {
            return self.typed(s, &types[0], name, path);
        }
        let mut alts = Vec::new();
        for t in &types {
            alts.push(self.typed(s, t, &format!("{name}-{t}"), path)?);
        }
        Ok(self.rule(name, alts.join(" | ")))
    }

    /// The type a schema without `type` means by its keywords ("any" without any).
    fn inferred_type(&self, m: &[(String, Json)], path: &str) -> Result<String> {
        let families = [
            ("object", OBJECT_KEYWORDS),
            ("array", ARRAY_KEYWORDS),
            ("string", STRING_KEYWORDS),
            ("number", NUMBER_KEYWORDS),
        ];
        let found: Vec<&str> = families
            .iter()
            .filter(|(_, kw)| m.iter().any(|(k, _)| kw.contains(&k.as_str())))
            .map(|(t, _)| *t)
            .collect();
        match found.as_slice() {
            [] => Ok("any".into()),
            [t] => Ok(t.to_string()),
            _ => Err(err(
                path,
                format!("keywords of several types ({}) without 'type'", found.join(", ")),
            )),
        }
    }

    fn typed(&mut self, s: &Json, t: &str, name: &str, path: &str) -> Result<String> {
        match t {
            "any" => Ok(self.base("value")),
            "object" => self.object(s, name, path),
            "array" => self.array(s, name, path),
            "string" => self.string(s, name, path),
            "integer" => self.integer(s, name, path),
            "number" => self.number(s, name, path),
            "boolean" => Ok(self.base("boolean")),
            "null" => Ok(self.base("null")),
            other => Err(err(&format!("{path}/type"), format!("unknown type '{other}'"))),
        }
    }

    fn reference(&mut self, r: &Json, path: &str) -> Result<String> {
        let Some(r) = r.as_str() else {
            return Err(err(&format!("{path}/$ref"), "must be a string"));
        };
        if let Some(name) = self.refs.get(r) {
            return Ok(name.clone());
        }
        let Some(pointer) = r.strip_prefix('#') else {
            return Err(err(
                path,
                format!("only local references (#/...) are supported, not '{r}'"),
            ));
        };
        let mut target = self.root;
        for part in pointer.split('/').skip(1) {
            let part = part.replace("~1", "/").replace("~0", "~");
            target = match target {
                Json::Object(_) => target.get(&part),
                Json::Array(xs) => part.parse::<usize>().ok().and_then(|i| xs.get(i)),
                _ => None,
            }
            .ok_or_else(|| err(path, format!("reference '{r}' points at nothing")))?;
        }
        let last = pointer
            .rsplit('/')
            .next()
            .filter(|s| !s.is_empty())
            .unwrap_or("ref");
        let name = self.unique(&format!("ref-{last}"));
        self.refs.insert(r.to_string(), name.clone());
        let body = self.visit(target, &format!("{name}-body"), r)?;
        self.rules.push((name.clone(), body));
        Ok(name)
    }

    fn object(&mut self, s: &Json, name: &str, path: &str) -> Result<String> {
        let props: Vec<(String, Json)> = match s.get("properties") {
            None => Vec::new(),
            Some(Json::Object(m)) => m.clone(),
            Some(_) => return Err(err(&format!("{path}/properties"), "must be an object")),
        };
        let required: Vec<String> = match s.get("required") {
            None => Vec::new(),
            Some(Json::Array(xs)) => strings(xs, &format!("{path}/required"))?,
            Some(_) => return Err(err(&format!("{path}/required"), "must be an array of strings")),
        };
        for r in &required {
            if !props.iter().any(|(k, _)| k == r) {
                return Err(err(
                    &format!("{path}/required"),
                    format!("required property '{r}' is not in 'properties'"),
                ));
            }
        }
        self.base("ws");
        if props.is_empty() {
            return match s.get("additionalProperties") {
                None | Some(Json::Bool(true)) => Ok(self.base("object")),
                Some(Json::Bool(false)) => Ok(r#""{" ws "}""#.into()),
                Some(v) => {
                    let value = self.visit(
                        v,
                        &format!("{name}-value"),
                        &format!("{path}/additionalProperties"),
                    )?;
                    let string = self.base("string");
                    let kv = format!(r#"{string} ws ":" ws {value} ws"#);
                    Ok(self.rule(name, format!(r#""{{" ws ( {kv} ( "," ws {kv} )* )? "}}""#)))
                }
            };
        }
        let mut kvs = Vec::with_capacity(props.len());
        for (k, v) in &props {
            let value = self.visit(v, &format!("{name}-{k}"), &format!("{path}/properties/{k}"))?;
            let key = literal(&serde_json::to_string(k).expect("a string serialises"));
            kvs.push(self.rule(&format!("{name}-{k}-kv"), format!(r#"{key} ws ":" ws {value}"#)));
        }
        let req: Vec<bool> = props.iter().map(|(k, _)| required.contains(k)).collect();
        let n = props.len();
        // rest[i]: what may follow once something was written, from property i on.
        let mut rest: Vec<String> = vec![String::new(); n + 1];
        for i in (1..n).rev() {
            let next = if rest[i + 1].is_empty() {
                String::new()
            } else {
                format!(" {}", rest[i + 1])
            };
            let mut body = format!(r#""," ws {} ws{next}"#, kvs[i]);
            if !req[i] {
                body.push_str(&if next.is_empty() {
                    r#" | """#.to_string()
                } else {
                    format!(" |{next}")
                });
            }
            rest[i] = self.rule(&format!("{name}-rest-{i}"), body);
        }
        let mut firsts = Vec::new();
        for k in 0..n {
            let next = if rest[k + 1].is_empty() {
                String::new()
            } else {
                format!(" {}", rest[k + 1])
            };
            firsts.push(format!("{} ws{next}", kvs[k]));
            if req[k] {
                break;
            }
        }
        if !req.iter().any(|&r| r) {
            firsts.push(r#""""#.into());
        }
        Ok(self.rule(name, format!(r#""{{" ws ( {} ) "}}""#, firsts.join(" | "))))
    }

    fn count(&self, s: &Json, key: &str, path: &str) -> Result<Option<u64>> {
        match s.get(key) {
            None => Ok(None),
            Some(Json::Number(n)) => n
                .as_u64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                        .map(|f| f as u64)
                })
                .map(Some)
                .ok_or_else(|| err(&format!("{path}/{key}"), "must be a non-negative integer")),
            Some(_) => Err(err(&format!("{path}/{key}"), "must be a non-negative integer")),
        }
    }

    fn array(&mut self, s: &Json, name: &str, path: &str) -> Result<String> {
        self.base("ws");
        if let Some(prefix) = s.get("prefixItems") {
            let Json::Array(items) = prefix else {
                return Err(err(&format!("{path}/prefixItems"), "must be an array"));
            };
            if let Some(k) = ["items", "minItems", "maxItems"]
                .iter()
                .find(|k| s.get(k).is_some_and(|v| *v != Json::Bool(false)))
            {
                return Err(err(path, format!("'{k}' beside 'prefixItems' is not supported")));
            }
            let mut parts = Vec::new();
            for (i, x) in items.iter().enumerate() {
                parts.push(self.visit(x, &format!("{name}-{i}"), &format!("{path}/prefixItems/{i}"))?);
            }
            let body = parts
                .iter()
                .map(|p| format!("{p} ws"))
                .collect::<Vec<_>>()
                .join(r#" "," ws "#);
            return Ok(self.rule(name, format!(r#""[" ws {body} "]""#)));
        }
        let item = match s.get("items") {
            None => self.base("value"),
            Some(x) => self.visit(x, &format!("{name}-item"), &format!("{path}/items"))?,
        };
        let min = self.count(s, "minItems", path)?.unwrap_or(0);
        let max = self.count(s, "maxItems", path)?;
        if max.is_some_and(|m| m < min) {
            return Err(err(path, "maxItems is below minItems"));
        }
        if max == Some(0) {
            return Ok(r#""[" ws "]""#.into());
        }
        let more = format!(r#"( "," ws {item} ws )"#);
        let reps = |lo: u64, hi: Option<u64>| match hi {
            None if lo == 0 => format!("{more}*"),
            None => format!("{more}{{{lo},}}"),
            Some(h) if h == lo => format!("{more}{{{lo}}}"),
            Some(h) => format!("{more}{{{lo},{h}}}"),
        };
        let body = if min == 0 {
            format!(r#""[" ws ( {item} ws {} )? "]""#, reps(0, max.map(|m| m - 1)))
        } else {
            format!(r#""[" ws {item} ws {} "]""#, reps(min - 1, max.map(|m| m - 1)))
        };
        Ok(self.rule(name, body))
    }

    fn string(&mut self, s: &Json, name: &str, path: &str) -> Result<String> {
        let min = self.count(s, "minLength", path)?;
        let max = self.count(s, "maxLength", path)?;
        let lengths = min.is_some() || max.is_some();
        if let Some(p) = s.get("pattern") {
            let Some(p) = p.as_str() else {
                return Err(err(&format!("{path}/pattern"), "must be a string"));
            };
            if lengths || s.get("format").is_some() {
                return Err(err(
                    path,
                    "'pattern' with 'minLength', 'maxLength' or 'format' is not supported",
                ));
            }
            let inner = regex::to_gbnf(p, Target::JsonString)?;
            return Ok(self.rule(name, format!(r#""\"" {inner} "\"""#)));
        }
        if let Some(f) = s.get("format") {
            if lengths {
                return Err(err(
                    path,
                    "'format' with 'minLength' or 'maxLength' is not supported",
                ));
            }
            let date = r#"[0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])"#;
            let time = r#"([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,6})? ("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])"#;
            let hex = "[0-9a-fA-F]";
            let inner = match f.as_str() {
                Some("date") => date.to_string(),
                Some("time") => time.to_string(),
                Some("date-time") => format!(r#"{date} "T" {time}"#),
                Some("uuid") => {
                    format!(r#"{hex}{{8}} "-" {hex}{{4}} "-" {hex}{{4}} "-" {hex}{{4}} "-" {hex}{{12}}"#)
                }
                _ => {
                    return Err(err(
                        &format!("{path}/format"),
                        format!(
                            "format {} is not supported (date, time, date-time, uuid are)",
                            f.to_compact()
                        ),
                    ));
                }
            };
            return Ok(self.rule(name, format!(r#""\"" {inner} "\"""#)));
        }
        if !lengths {
            return Ok(self.base("string"));
        }
        let (lo, hi) = (min.unwrap_or(0), max);
        if hi.is_some_and(|h| h < lo) {
            return Err(err(path, "maxLength is below minLength"));
        }
        let char = self.base("char");
        let reps = match hi {
            None => format!("{{{lo},}}"),
            Some(h) => format!("{{{lo},{h}}}"),
        };
        Ok(self.rule(name, format!(r#""\"" {char}{reps} "\"""#)))
    }

    /// A number between its bounds, compared exactly (`crate::decimal`); without bounds any
    /// JSON number.
    fn number(&mut self, s: &Json, name: &str, path: &str) -> Result<String> {
        let bound = |key: &str| -> Result<Option<f64>> {
            match s.get(key) {
                None => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                    err(
                        &format!("{path}/{key}"),
                        "must be a number (JSON Schema draft 6 and later)",
                    )
                }),
            }
        };
        // The tighter of the inclusive and exclusive bound on each side.
        let side = |incl: Option<f64>, excl: Option<f64>, lower: bool| match (incl, excl) {
            (Some(i), Some(e)) if (lower && e >= i) || (!lower && e <= i) => Some((e, false)),
            (Some(i), _) => Some((i, true)),
            (None, Some(e)) => Some((e, false)),
            (None, None) => None,
        };
        let lo = side(bound("minimum")?, bound("exclusiveMinimum")?, true);
        let hi = side(bound("maximum")?, bound("exclusiveMaximum")?, false);
        if lo.is_none() && hi.is_none() {
            return Ok(self.base("number"));
        }
        if let (Some((l, li)), Some((h, hi_in))) = (lo, hi)
            && (l > h || (l == h && !(li && hi_in)))
        {
            return Err(err(path, format!("no number lies between {l} and {h}")));
        }
        let dec = |b: Option<(f64, bool)>| -> Result<Option<(Dec, bool)>> {
            b.map(|(v, incl)| Dec::from_f64(v, path).map(|d| (d, incl)))
                .transpose()
        };
        let alts = number_in(dec(lo)?, dec(hi)?);
        Ok(self.rule(name, alts.join(" | ")))
    }

    fn integer(&mut self, s: &Json, name: &str, path: &str) -> Result<String> {
        let num = |key: &str| -> Result<Option<f64>> {
            match s.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| err(&format!("{path}/{key}"), "must be a number")),
            }
        };
        let mut lo: Option<f64> = None;
        let mut hi: Option<f64> = None;
        if let Some(v) = num("minimum")? {
            lo = Some(v.ceil());
        }
        if let Some(v) = num("exclusiveMinimum")? {
            let b = v.floor() + 1.0;
            lo = Some(lo.map_or(b, |l| l.max(b)));
        }
        if let Some(v) = num("maximum")? {
            hi = Some(v.floor());
        }
        if let Some(v) = num("exclusiveMaximum")? {
            let b = v.ceil() - 1.0;
            hi = Some(hi.map_or(b, |h| h.min(b)));
        }
        if lo.is_none() && hi.is_none() {
            return Ok(self.base("integer"));
        }
        let limit = 1e15;
        if lo.is_some_and(|l| l.abs() >= limit) || hi.is_some_and(|h| h.abs() >= limit) {
            return Err(err(path, "integer bounds beyond ±10^15 are not supported"));
        }
        let (lo, hi) = (lo.map(|l| l as i64), hi.map(|h| h as i64));
        if let (Some(l), Some(h)) = (lo, hi)
            && l > h
        {
            return Err(err(path, format!("no integer lies in [{l}, {h}]")));
        }
        let mut alts = Vec::new();
        if hi.is_none_or(|h| h >= 0) {
            alts.extend(digits_in(lo.unwrap_or(0).max(0) as u64, hi.map(|h| h as u64)));
        }
        if lo.is_none_or(|l| l < 0) {
            let mag_lo = hi.filter(|&h| h < 0).map_or(1, |h| (-h) as u64);
            let mag_hi = lo.map(|l| (-l) as u64);
            alts.extend(
                digits_in(mag_lo, mag_hi)
                    .into_iter()
                    .map(|a| format!(r#""-" {a}"#)),
            );
        }
        Ok(self.rule(name, alts.join(" | ")))
    }
}

/// GBNF sequences of digits for every integer in `lo..=hi` (no upper bound: up to 16 digits),
/// without leading zeros.
pub(crate) fn digits_in(lo: u64, hi: Option<u64>) -> Vec<String> {
    let len = |v: u64| v.to_string().len();
    let top = hi.unwrap_or(10u64.pow(16) - 1);
    let mut out = Vec::new();
    for l in len(lo)..=len(top) {
        let from = lo.max(if l == 1 { 0 } else { 10u64.pow(l as u32 - 1) });
        let to = top.min(10u64.pow(l as u32) - 1);
        if from <= to {
            let (a, b) = (from.to_string().into_bytes(), to.to_string().into_bytes());
            out.extend(same_length(&a, &b));
        }
    }
    out
}

/// Sequences for the numbers between two digit strings of one length.
fn same_length(a: &[u8], b: &[u8]) -> Vec<String> {
    let join = |head: String, tail: String| {
        if tail.is_empty() {
            head
        } else {
            format!("{head} {tail}")
        }
    };
    let digit = |d: u8| format!("\"{}\"", d as char);
    let span = |x: u8, y: u8| {
        if x == y {
            digit(x)
        } else {
            format!("[{}-{}]", x as char, y as char)
        }
    };
    if a.is_empty() {
        return vec![String::new()];
    }
    if a[0] == b[0] {
        return same_length(&a[1..], &b[1..])
            .into_iter()
            .map(|t| join(digit(a[0]), t))
            .collect();
    }
    let rest = a.len() - 1;
    let any = |n: usize| match n {
        0 => String::new(),
        1 => "[0-9]".into(),
        n => format!("[0-9]{{{n}}}"),
    };
    let mut out = Vec::new();
    let (mut first, mut last) = (a[0], b[0]);
    if a[1..].iter().any(|&d| d != b'0') {
        out.extend(
            same_length(&a[1..], &vec![b'9'; rest])
                .into_iter()
                .map(|t| join(digit(a[0]), t)),
        );
        first += 1;
    }
    let upper = b[1..].iter().any(|&d| d != b'9');
    if upper {
        last -= 1;
    }
    if first <= last {
        out.push(join(span(first, last), any(rest)));
    }
    if upper {
        out.extend(
            same_length(&vec![b'0'; rest], &b[1..])
                .into_iter()
                .map(|t| join(digit(b[0]), t)),
        );
    }
    out
}
