//! Request bodies: read up to `--max-body-bytes`, then parsed into the request structs with an
//! error that names the field at fault (`max_tokens`, `messages[0].content`) in the message and
//! in `param`, as OpenAI's errors do, instead of a byte offset into the body.

use axum::body::{Body, Bytes};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::ApiError;

/// A request body type. serde reports an error inside a `#[serde(flatten)]` field without its
/// path (the flattened fields are buffered and read after the rest), so a type that flattens
/// says where to look.
pub(super) trait RequestBody: DeserializeOwned {
    /// The `model` the request names, if any.
    fn model(&self) -> Option<&str>;

    /// The path and description of the first top-level field its flattened struct refuses.
    fn locate_flattened(_fields: &Map<String, Value>) -> Option<(String, String)> {
        None
    }
}

/// The first field of `fields` that `F` refuses when read on its own (`F`: a struct of optional
/// fields that ignores unknown ones, as a flattened struct must).
pub(super) fn locate_in<F: DeserializeOwned>(fields: &Map<String, Value>) -> Option<(String, String)> {
    fields.iter().find_map(|(key, value)| {
        let one = Value::Object(Map::from_iter([(key.clone(), value.clone())]));
        serde_path_to_error::deserialize::<_, F>(one)
            .err()
            .map(|e| (e.path().to_string(), describe(e.inner())))
    })
}

/// The request body, at most `limit` bytes. A bigger body is still read (and dropped) up to
/// [`DRAIN_LIMIT`] before the 413 goes out: closing a connection whose client is still sending
/// makes the kernel reset it, and the client would never see the answer.
pub(super) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut body = body;
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::invalid(format!("cannot read the request body: {e}"), "body"))?;
        let Ok(data) = frame.into_data() else { continue };
        seen += data.len();
        if seen <= limit {
            buf.extend_from_slice(&data);
        } else if seen > DRAIN_LIMIT {
            break;
        }
    }
    if seen > limit {
        return Err(ApiError::too_large(format!(
            "request body too large: {}{seen} bytes, the limit is {limit} (--max-body-bytes)",
            if seen > DRAIN_LIMIT { "over " } else { "" }
        )));
    }
    Ok(Bytes::from(buf))
}

/// How much of an oversized body is read before giving up on a clean answer.
const DRAIN_LIMIT: usize = 256 << 20;

pub(super) async fn parse<T: RequestBody>(body: Body, limit: usize) -> Result<T, ApiError> {
    let body = read_body(body, limit).await?;
    parse_bytes(&body)
}

pub(super) fn parse_bytes<T: RequestBody>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = serde_path_to_error::deserialize::<_, T>(&mut de);
    let error = match parsed {
        Ok(value) => match de.end() {
            Ok(()) => return Ok(value),
            Err(e) => return Err(ApiError::invalid(format!("malformed JSON: {e}"), "body")),
        },
        Err(e) => e,
    };
    let path = error.path().to_string();
    let inner = error.into_inner();
    if inner.is_syntax() || inner.is_eof() {
        return Err(ApiError::invalid(format!("malformed JSON: {inner}"), "body"));
    }
    let message = describe(&inner);
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        let field = if path == "." {
            field.to_owned()
        } else {
            format!("{path}.{field}")
        };
        return Err(ApiError::invalid(
            format!("invalid request: missing field `{field}`"),
            field,
        ));
    }
    if path != "." {
        return Err(ApiError::invalid(
            format!("invalid request: {path}: {message}"),
            path,
        ));
    }
    // At the top level: a body that is no object, or a field of a flattened struct.
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => match T::locate_flattened(&fields) {
            Some((path, message)) => Err(ApiError::invalid(
                format!("invalid request: {path}: {message}"),
                path,
            )),
            None => Err(ApiError::invalid(format!("invalid request: {message}"), "body")),
        },
        Ok(other) => Err(ApiError::invalid(
            format!(
                "invalid request: the body must be a JSON object, not {}",
                kind_of(&other)
            ),
            "body",
        )),
        Err(_) => Err(ApiError::invalid(format!("invalid request: {message}"), "body")),
    }
}

/// serde's message without its byte position (the path says where) and with JSON's names for
/// Rust's number types.
fn describe(e: &serde_json::Error) -> String {
    let mut message = e.to_string();
    if e.line() > 0 {
        let position = format!(" at line {} column {}", e.line(), e.column());
        if let Some(stripped) = message.strip_suffix(&position) {
            message = stripped.to_owned();
        }
    }
    const NAMES: [(&str, &str); 10] = [
        ("expected a sequence", "expected an array"),
        ("expected a map", "expected an object"),
        ("expected i64", "expected an integer"),
        ("expected i32", "expected an integer"),
        ("expected u64", "expected a non-negative integer"),
        ("expected u32", "expected a non-negative integer"),
        ("expected usize", "expected a non-negative integer"),
        ("expected u8", "expected a non-negative integer"),
        ("expected f32", "expected a number"),
        ("expected f64", "expected a number"),
    ];
    for (rust, json) in NAMES {
        if let Some(stripped) = message.strip_suffix(rust) {
            message = format!("{stripped}{json}");
        }
    }
    message
}

/// "a string", "an array", ... for messages about a value of the wrong kind.
pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Flat {
        max_tokens: Option<i64>,
        temperature: Option<f32>,
    }

    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Item {
        text: String,
    }

    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Req {
        items: Vec<Item>,
        echo: Option<bool>,
        #[serde(flatten)]
        flat: Flat,
    }

    impl RequestBody for Req {
        fn model(&self) -> Option<&str> {
            None
        }

        fn locate_flattened(fields: &Map<String, Value>) -> Option<(String, String)> {
            locate_in::<Flat>(fields)
        }
    }

    fn error(body: &str) -> ApiError {
        parse_bytes::<Req>(body.as_bytes()).expect_err(body)
    }

    #[test]
    fn errors_name_the_field_at_fault() {
        let cases = [
            (
                r#"{"items": [], "max_tokens": "ten"}"#,
                "max_tokens",
                "invalid type: string \"ten\", expected an integer",
            ),
            (
                r#"{"items": [], "temperature": true}"#,
                "temperature",
                "expected a number",
            ),
            (
                r#"{"items": [{"text": 5}]}"#,
                "items[0].text",
                "invalid type: integer `5`, expected a string",
            ),
            (r#"{"items": [], "echo": "yes"}"#, "echo", "expected a boolean"),
            (
                r#"{"items": "hi"}"#,
                "items",
                "invalid type: string \"hi\", expected an array",
            ),
            (
                r#"{"items": [{}]}"#,
                "items[0].text",
                "missing field `items[0].text`",
            ),
            (r#"{"echo": true}"#, "items", "missing field `items`"),
            (
                r#"[1, 2]"#,
                "body",
                "the body must be a JSON object, not an array",
            ),
            (r#"{"items": [}"#, "body", "malformed JSON"),
            (r#"{"items": []} x"#, "body", "malformed JSON"),
        ];
        for (body, param, words) in cases {
            let e = error(body);
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
            assert!(e.message.contains(words), "{body}: {}", e.message);
            assert!(
                !e.message.contains("line 1 column") || param == "body",
                "{body}: {}",
                e.message
            );
        }
        let ok = parse_bytes::<Req>(br#"{"items": [{"text": "a"}], "max_tokens": 3, "other": 1}"#).unwrap();
        assert_eq!(ok.flat.max_tokens, Some(3));
    }
}
