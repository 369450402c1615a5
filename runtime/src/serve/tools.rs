//! Function calling where the client forces a call (`tool_choice: "required"` or a named
//! function), done as vLLM does it without a model-specific parser: the output is constrained
//! to the call's JSON and returned as OpenAI's `tool_calls`. A named function's output is its
//! arguments object; "required" generates `[{"name": ..., "arguments": {...}}, ...]` (one call
//! when `parallel_tool_calls` is false). `tool_choice: "auto"` would need a model trained to
//! decide between answering and calling, which KOSMOS-1 is not: it is refused, not ignored.
//! The Responses API's flattened tool shapes take the same path.

use std::sync::Arc;

use kosmos_grammar::{Constraint, Grammar, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;

#[derive(Deserialize, Default)]
struct Fields {
    tools: Option<Json>,
    tool_choice: Option<Json>,
    parallel_tool_calls: Option<bool>,
    functions: Option<Json>,
    function_call: Option<Json>,
}

/// How the generated text becomes tool calls.
#[derive(Clone, Debug)]
pub(super) enum ToolCalls {
    /// The text is this function's arguments.
    Named(String),
    /// The text is a JSON array of `{"name", "arguments"}`.
    Required,
}

pub(super) struct ToolRequest {
    pub mode: ToolCalls,
    pub grammar: Arc<Grammar>,
}

/// The forced tool call a chat request asks for, if any (`body` is valid JSON already).
pub(super) fn requested(body: &[u8]) -> Result<Option<ToolRequest>, ApiError> {
    let f: Fields = serde_json::from_slice(body).unwrap_or_default();
    if f.functions.is_some() || f.function_call.is_some() {
        let field = if f.functions.is_some() {
            "functions"
        } else {
            "function_call"
        };
        return Err(ApiError::invalid(
            format!(
                "{field} (OpenAI's deprecated function calling) is not supported; use tools with tool_choice"
            ),
            field,
        ));
    }
    let tools = match &f.tools {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::Array(xs)) => xs
            .iter()
            .enumerate()
            .map(|(i, t)| tool(t, i, "function.name"))
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("tools must be an array, not {}", other.kind()),
                "tools",
            ));
        }
    };
    let named = |c: &Json| c.get("function")?.get("name")?.as_str().map(str::to_owned);
    let form = "{\"type\": \"function\", \"function\": {\"name\": ...}}";
    forced(&tools, f.tool_choice.as_ref(), named, form, f.parallel_tool_calls)
}

/// The forced call a Responses API request asks for, if any: its tools are
/// `{"type": "function", "name", "parameters"}` and a named choice `{"type": "function",
/// "name"}` (the chat API nests both under "function").
pub(super) fn requested_for_responses(body: &[u8]) -> Result<Option<ToolRequest>, ApiError> {
    let f: Fields = serde_json::from_slice(body).unwrap_or_default();
    let tools = match &f.tools {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::Array(xs)) => xs
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if let Some(kind) = t.get("type").and_then(Json::as_str).filter(|k| *k != "function") {
                    return Err(ApiError::invalid(
                        format!("tools[{i}]: tools of type '{kind}' (OpenAI's hosted tools) are not supported; only \"function\" is"),
                        "tools",
                    ));
                }
                // The chat shape's fields, flattened: one check of name and parameters.
                let nested = Json::Object(vec![
                    ("type".into(), Json::String("function".into())),
                    ("function".into(), t.clone()),
                ]);
                tool(&nested, i, "name")
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("tools must be an array, not {}", other.kind()),
                "tools",
            ));
        }
    };
    let named = |c: &Json| {
        (c.get("type")?.as_str()? == "function").then_some(())?;
        c.get("name")?.as_str().map(str::to_owned)
    };
    let form = "{\"type\": \"function\", \"name\": ...}";
    forced(&tools, f.tool_choice.as_ref(), named, form, f.parallel_tool_calls)
}

/// The call `choice` forces among `tools` (`named` reads a named choice, written as `form`).
fn forced(
    tools: &[(String, Json)],
    choice: Option<&Json>,
    named: impl Fn(&Json) -> Option<String>,
    form: &str,
    parallel_tool_calls: Option<bool>,
) -> Result<Option<ToolRequest>, ApiError> {
    let choice = choice.filter(|c| **c != Json::Null);
    if tools.is_empty() {
        return match choice {
            None => Ok(None),
            Some(Json::String(s)) if s == "none" || s == "auto" => Ok(None),
            Some(_) => Err(ApiError::invalid("tool_choice needs tools", "tool_choice")),
        };
    }
    let mode = match choice {
        Some(Json::String(s)) if s == "none" => return Ok(None),
        Some(Json::String(s)) if s == "required" => ToolCalls::Required,
        None | Some(Json::String(_)) => {
            let given = choice
                .and_then(Json::as_str)
                .unwrap_or("auto (the default with tools)");
            return Err(ApiError::invalid(
                format!(
                    "tool_choice {given} is not supported: it needs a model trained to choose between answering and calling a tool, which this one is not; give tool_choice \"required\" or {form} to have the output be a call"
                ),
                "tool_choice",
            ));
        }
        Some(c) => {
            let name = named(c).ok_or_else(|| {
                ApiError::invalid(
                    format!("tool_choice must be \"none\", \"required\" or {form}"),
                    "tool_choice",
                )
            })?;
            if !tools.iter().any(|t| t.0 == name) {
                return Err(ApiError::invalid(
                    format!("tool_choice names function '{name}', which is not in tools"),
                    "tool_choice",
                ));
            }
            ToolCalls::Named(name)
        }
    };
    let schema = match &mode {
        ToolCalls::Named(name) => tools.iter().find(|t| t.0 == *name).expect("checked").1.clone(),
        ToolCalls::Required => required_schema(tools, parallel_tool_calls != Some(false)),
    };
    let grammar = Constraint::JsonSchema(schema)
        .compile()
        .map_err(|e| ApiError::invalid(format!("tools: {e}"), "tools"))?;
    Ok(Some(ToolRequest { mode, grammar }))
}

/// A tool's (name, parameters schema); `name_field` is where the request has the name.
fn tool(t: &Json, i: usize, name_field: &str) -> Result<(String, Json), ApiError> {
    let bad = |m: &str| ApiError::invalid(format!("tools[{i}]: {m}"), "tools");
    if t.get("type").and_then(Json::as_str) != Some("function") {
        return Err(bad("only tools of type \"function\" are supported"));
    }
    let f = t.get("function").ok_or_else(|| bad("needs \"function\""))?;
    let name = f
        .get("name")
        .and_then(Json::as_str)
        .filter(|n| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
        .ok_or_else(|| {
            bad(&format!(
                "{name_field} must be a non-empty string of letters, digits, _ and -"
            ))
        })?;
    // OpenAI: no parameters is a function that takes none.
    let params = f.get("parameters").cloned().unwrap_or_else(|| {
        Json::parse(r#"{"type":"object","properties":{},"additionalProperties":false}"#).expect("JSON")
    });
    Ok((name.to_string(), params))
}

/// One or more calls of any tool: an array of `{"name": <const>, "arguments": <parameters>}`.
/// Each tool's parameters move under `$defs/tool-i`, their local `$ref`s rewritten to follow.
fn required_schema(tools: &[(String, Json)], parallel: bool) -> Json {
    let mut defs = Vec::new();
    let mut alternatives = Vec::new();
    for (i, (name, params)) in tools.iter().enumerate() {
        let key = format!("tool-{i}");
        defs.push((key.clone(), rebase_refs(params, &format!("#/$defs/{key}"))));
        alternatives.push(Json::Object(vec![
            ("type".into(), Json::String("object".into())),
            (
                "properties".into(),
                Json::Object(vec![
                    (
                        "name".into(),
                        Json::Object(vec![("const".into(), Json::String(name.clone()))]),
                    ),
                    (
                        "arguments".into(),
                        Json::Object(vec![("$ref".into(), Json::String(format!("#/$defs/{key}")))]),
                    ),
                ]),
            ),
            (
                "required".into(),
                Json::Array(vec![
                    Json::String("name".into()),
                    Json::String("arguments".into()),
                ]),
            ),
            ("additionalProperties".into(), Json::Bool(false)),
        ]));
    }
    let mut schema = vec![
        ("$defs".into(), Json::Object(defs)),
        ("type".into(), Json::String("array".into())),
        (
            "items".into(),
            Json::Object(vec![("anyOf".into(), Json::Array(alternatives))]),
        ),
        ("minItems".into(), Json::Number(1.into())),
    ];
    if !parallel {
        schema.push(("maxItems".into(), Json::Number(1.into())));
    }
    Json::Object(schema)
}

/// `v` with every local `$ref` ("#..." ) made relative to `base` instead of the document root.
fn rebase_refs(v: &Json, base: &str) -> Json {
    match v {
        Json::Object(m) => Json::Object(
            m.iter()
                .map(|(k, x)| match (k.as_str(), x) {
                    ("$ref", Json::String(r)) if r.starts_with('#') => {
                        (k.clone(), Json::String(format!("{base}{}", &r[1..])))
                    }
                    _ => (k.clone(), rebase_refs(x, base)),
                })
                .collect(),
        ),
        Json::Array(xs) => Json::Array(xs.iter().map(|x| rebase_refs(x, base)).collect()),
        other => other.clone(),
    }
}

/// The calls in a finished sequence's text: (name, arguments as JSON text); `None` when the
/// text is not a whole call (cut by max_tokens).
pub(super) fn calls(mode: &ToolCalls, text: &str) -> Option<Vec<(String, String)>> {
    match mode {
        ToolCalls::Named(name) => {
            serde_json::from_str::<Value>(text).ok()?;
            Some(vec![(name.clone(), text.to_string())])
        }
        ToolCalls::Required => {
            // Keys stay in the order generated.
            let Json::Array(xs) = Json::parse(text).ok()? else {
                return None;
            };
            xs.iter()
                .map(|x| {
                    Some((
                        x.get("name")?.as_str()?.to_string(),
                        x.get("arguments")?.to_compact(),
                    ))
                })
                .collect()
        }
    }
}

/// OpenAI's `tool_calls` entry; stream deltas carry the call's `index`.
pub(super) fn call_json(index: Option<usize>, id: &str, name: &str, arguments: &str) -> Value {
    let mut call = json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}});
    if let Some(i) = index {
        call["index"] = json!(i);
    }
    call
}

pub(super) fn call_id() -> String {
    format!("call_{:024x}", rand::random::<u128>() >> 32)
}

/// Completions take no tools.
pub(super) fn refuse(body: &[u8]) -> Result<(), ApiError> {
    let f: Fields = serde_json::from_slice(body).unwrap_or_default();
    for (field, v) in [
        ("tools", &f.tools),
        ("tool_choice", &f.tool_choice),
        ("functions", &f.functions),
    ] {
        if v.as_ref().is_some_and(|v| *v != Json::Null) {
            return Err(ApiError::invalid(
                format!("{field} is a chat completions field"),
                field,
            ));
        }
    }
    Ok(())
}
