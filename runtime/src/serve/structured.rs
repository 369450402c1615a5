//! Structured output as OpenAI-compatible servers take it: OpenAI's `response_format`
//! (`text`, `json_object`, `json_schema`), vLLM's `guided_json` / `guided_regex` /
//! `guided_choice` / `guided_grammar` and its newer `structured_outputs`, and llama.cpp's
//! `json_schema` / `grammar`. One per request; each becomes a compiled grammar.
//!
//! The fields are read from the body a second time, on their own: the request structs flatten
//! their sampling fields, which serde cannot combine with an order-keeping value, and a schema's
//! `properties` are generated in the order the client gave them.

use std::sync::Arc;

use kosmos_grammar::{Constraint, Grammar, Json};
use serde::Deserialize;

use super::error::ApiError;

#[derive(Deserialize, Default)]
struct Fields {
    response_format: Option<Json>,
    guided_json: Option<Json>,
    guided_regex: Option<Json>,
    guided_choice: Option<Json>,
    guided_grammar: Option<Json>,
    structured_outputs: Option<Json>,
    json_schema: Option<Json>,
    grammar: Option<Json>,
}

/// The compiled constraint a request asks for, if any (`body` is valid JSON already).
pub(super) fn requested(body: &[u8]) -> Result<Option<Arc<Grammar>>, ApiError> {
    compile(found_in(body)?)
}

/// The Responses API's: `text.format` (`text`, `json_object`, or `json_schema` with the schema
/// beside its name), or one of the chat endpoint's vLLM / llama.cpp fields, not both.
/// `response_format` is refused with where it went, as OpenAI does.
pub(super) fn requested_for_responses(body: &[u8]) -> Result<Option<Arc<Grammar>>, ApiError> {
    #[derive(Deserialize, Default)]
    struct TextField {
        text: Option<Json>,
    }
    let mut found = found_in(body)?;
    if found.iter().any(|(f, _)| *f == "response_format") {
        return Err(ApiError::invalid(
            "response_format is not a Responses API field: it moved to text.format",
            "response_format",
        ));
    }
    let f: TextField = serde_json::from_slice(body).unwrap_or_default();
    if let Some(format) = f
        .text
        .as_ref()
        .and_then(|t| t.get("format"))
        .filter(|v| **v != Json::Null)
        && let Some(c) = text_format(format)?
    {
        found.push(("text.format", c));
    }
    compile(found)
}

fn text_format(format: &Json) -> Result<Option<Constraint>, ApiError> {
    const FIELD: &str = "text.format";
    let bad = |m: String| ApiError::invalid(m, FIELD);
    match format.get("type").and_then(Json::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonObject)),
        Some("json_schema") => {
            let schema = format
                .get("schema")
                .ok_or_else(|| bad("text.format of type json_schema needs \"schema\"".into()))?;
            Ok(Some(Constraint::JsonSchema(schema_value(schema, FIELD)?)))
        }
        Some(other) => Err(bad(format!(
            "text.format type '{other}' is not supported (text, json_object, json_schema are)"
        ))),
        None => Err(bad(
            "text.format needs a \"type\": text, json_object or json_schema".into(),
        )),
    }
}

/// Every constraint field of the body, with the field it came from.
fn found_in(body: &[u8]) -> Result<Vec<(&'static str, Constraint)>, ApiError> {
    let f: Fields = serde_json::from_slice(body).unwrap_or_default();
    let mut found: Vec<(&'static str, Constraint)> = Vec::new();
    if let Some(rf) = f.response_format.as_ref().filter(|v| **v != Json::Null)
        && let Some(c) = response_format(rf)?
    {
        found.push(("response_format", c));
    }
    for (field, value) in [("guided_json", &f.guided_json), ("json_schema", &f.json_schema)] {
        if let Some(v) = value.as_ref().filter(|v| **v != Json::Null) {
            found.push((field, Constraint::JsonSchema(schema_value(v, field)?)));
        }
    }
    for (field, value) in [
        ("guided_regex", &f.guided_regex),
        ("guided_grammar", &f.guided_grammar),
        ("grammar", &f.grammar),
    ] {
        if let Some(v) = value.as_ref().filter(|v| **v != Json::Null) {
            let text = string(v, field)?;
            found.push((
                field,
                if field == "guided_regex" {
                    Constraint::Regex(text)
                } else {
                    Constraint::Grammar(text)
                },
            ));
        }
    }
    if let Some(v) = f.guided_choice.as_ref().filter(|v| **v != Json::Null) {
        found.push(("guided_choice", Constraint::Choice(choices(v, "guided_choice")?)));
    }
    if let Some(v) = f.structured_outputs.as_ref().filter(|v| **v != Json::Null) {
        found.extend(structured_outputs(v)?.map(|c| ("structured_outputs", c)));
    }
    Ok(found)
}

/// The one constraint found, compiled; an error for several.
fn compile(mut found: Vec<(&'static str, Constraint)>) -> Result<Option<Arc<Grammar>>, ApiError> {
    match found.len() {
        0 => Ok(None),
        1 => {
            let (field, c) = found.pop().expect("one");
            c.compile()
                .map(Some)
                .map_err(|e| ApiError::invalid(format!("{field}: {e}"), field))
        }
        _ => Err(ApiError::invalid(
            format!(
                "give one structured-output constraint, not {}",
                found.iter().map(|(f, _)| *f).collect::<Vec<_>>().join(" and ")
            ),
            found[1].0,
        )),
    }
}

fn response_format(rf: &Json) -> Result<Option<Constraint>, ApiError> {
    let bad = |m: String| ApiError::invalid(m, "response_format");
    let kind = rf
        .get("type")
        .and_then(Json::as_str)
        .ok_or_else(|| bad("response_format needs a \"type\": text, json_object or json_schema".into()))?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(Constraint::JsonObject)),
        "json_schema" => {
            let js = rf
                .get("json_schema")
                .ok_or_else(|| bad("response_format of type json_schema needs \"json_schema\"".into()))?;
            let schema = js
                .get("schema")
                .ok_or_else(|| bad("response_format.json_schema needs \"schema\"".into()))?;
            Ok(Some(Constraint::JsonSchema(schema_value(
                schema,
                "response_format",
            )?)))
        }
        other => Err(bad(format!(
            "response_format type '{other}' is not supported (text, json_object, json_schema are)"
        ))),
    }
}

/// vLLM's `structured_outputs`: one of `json`, `regex`, `choice`, `grammar`, `json_object`.
fn structured_outputs(v: &Json) -> Result<Option<Constraint>, ApiError> {
    const FIELD: &str = "structured_outputs";
    let Json::Object(m) = v else {
        return Err(ApiError::invalid("structured_outputs must be an object", FIELD));
    };
    let mut out = Vec::new();
    for (k, v) in m {
        if *v == Json::Null {
            continue;
        }
        out.push(match k.as_str() {
            "json" => Constraint::JsonSchema(schema_value(v, FIELD)?),
            "regex" => Constraint::Regex(string(v, FIELD)?),
            "grammar" => Constraint::Grammar(string(v, FIELD)?),
            "choice" => Constraint::Choice(choices(v, FIELD)?),
            "json_object" if *v == Json::Bool(true) => Constraint::JsonObject,
            "json_object" => continue,
            other => {
                return Err(ApiError::invalid(
                    format!("structured_outputs.{other} is not supported (json, regex, choice, grammar, json_object are)"),
                    FIELD,
                ));
            }
        });
    }
    match out.len() {
        0 | 1 => Ok(out.pop()),
        _ => Err(ApiError::invalid(
            "structured_outputs takes one of json, regex, choice, grammar, json_object",
            FIELD,
        )),
    }
}

/// A schema given as an object, or as its JSON text (vLLM takes both).
fn schema_value(v: &Json, field: &'static str) -> Result<Json, ApiError> {
    match v {
        Json::String(text) => Json::parse(text)
            .map_err(|e| ApiError::invalid(format!("{field}: the schema is not valid JSON: {e}"), field)),
        Json::Object(_) | Json::Bool(_) => Ok(v.clone()),
        other => Err(ApiError::invalid(
            format!("{field}: a schema must be an object, not {}", other.kind()),
            field,
        )),
    }
}

fn string(v: &Json, field: &'static str) -> Result<String, ApiError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| ApiError::invalid(format!("{field} must be a string, not {}", v.kind()), field))
}

fn choices(v: &Json, field: &'static str) -> Result<Vec<String>, ApiError> {
    match v {
        Json::Array(xs) if !xs.is_empty() => xs.iter().map(|x| string(x, field)).collect(),
        _ => Err(ApiError::invalid(
            format!("{field} must be a non-empty array of strings"),
            field,
        )),
    }
}
