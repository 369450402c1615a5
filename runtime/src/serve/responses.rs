//! OpenAI's Responses API, `POST /v1/responses`, stateless as vLLM serves it: `instructions`
//! and `input` become a chat that takes the chat endpoint's path (template, images, sampling,
//! structured output, the engine), and the answer comes back as a `response` object or as its
//! stream of typed events (`response.created` … `response.output_text.delta` …
//! `response.completed`). Forced function calls (`tools` with a named or "required"
//! `tool_choice`) come back as `function_call` items, and such items and their outputs can be
//! given back in `input`. Nothing is stored: `previous_response_id`, `conversation` and
//! `background` are refused, and the response says `"store": false`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::body::{RequestBody, locate_in};
use super::error::ApiError;
use super::openai::{ImageUrl, Kind, Message, Part, Sampling, Submitted, now_secs, read_request, request_id};
use super::tools::{self, ToolCalls};
use super::{logprobs, structured};
use crate::batch::{SeqEvent, SeqFailure, SeqSummary};
use crate::generate::FinishReason;
use crate::logprobs::TokenLogprob;

/// The `include` value that asks for the output text's log-probabilities.
const INCLUDE_LOGPROBS: &str = "message.output_text.logprobs";

#[derive(Deserialize)]
struct ResponsesRequest {
    /// Optional, as in vLLM: this server serves one model.
    model: Option<String>,
    input: Value,
    instructions: Option<String>,
    max_output_tokens: Option<i64>,
    include: Option<Vec<String>>,
    /// Accepted (OpenAI's default is true) and answered with `"store": false`: this server
    /// keeps no responses.
    #[allow(dead_code)]
    store: Option<bool>,
    previous_response_id: Option<String>,
    conversation: Option<Value>,
    prompt: Option<Value>,
    background: Option<bool>,
    reasoning: Option<Value>,
    truncation: Option<String>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    text: Option<Value>,
    metadata: Option<Value>,
    user: Option<String>,
    parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    sampling: Sampling,
}

impl RequestBody for ResponsesRequest {
    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    fn locate_flattened(fields: &serde_json::Map<String, Value>) -> Option<(String, String)> {
        locate_in::<Sampling>(fields)
    }
}

impl ResponsesRequest {
    /// Fields that would need state, tools or reasoning this server does not have, and chat
    /// fields whose Responses names differ: a 400 naming each, never silently dropped.
    fn refuse_unsupported(&self) -> Result<(), ApiError> {
        let refuse =
            |field: &'static str, why: &str| Err(ApiError::invalid(format!("{field}: {why}"), field));
        if self.previous_response_id.is_some() || self.conversation.as_ref().is_some_and(|c| !c.is_null()) {
            let field = if self.previous_response_id.is_some() {
                "previous_response_id"
            } else {
                "conversation"
            };
            return refuse(
                field,
                "this server stores no responses or conversations; send the whole conversation in input",
            );
        }
        if self.prompt.as_ref().is_some_and(|p| !p.is_null()) {
            return refuse("prompt", "stored prompt templates are not supported; send input");
        }
        if self.background == Some(true) {
            return refuse(
                "background",
                "background responses are not supported (nothing is stored)",
            );
        }
        if self.reasoning.as_ref().is_some_and(|r| !r.is_null()) {
            return refuse("reasoning", "this model does not reason before answering");
        }
        if let Some(t) = self.truncation.as_deref().filter(|t| *t != "disabled") {
            return refuse(
                "truncation",
                &format!(
                    "'{t}' is not supported (\"disabled\" is; vLLM's truncate_prompt_tokens cuts a prompt)"
                ),
            );
        }
        for (field, given, instead) in [
            (
                "max_tokens",
                self.sampling.max_tokens.is_some(),
                "max_output_tokens",
            ),
            (
                "max_completion_tokens",
                self.sampling.max_completion_tokens.is_some(),
                "max_output_tokens",
            ),
            (
                "logprobs",
                self.sampling.logprobs.is_some(),
                "include: [\"message.output_text.logprobs\"] with top_logprobs",
            ),
        ] {
            if given {
                return Err(ApiError::invalid(
                    format!("{field} is not a Responses API field; use {instead}"),
                    field,
                ));
            }
        }
        if self.sampling.prompt_logprobs.is_some() {
            return refuse(
                "prompt_logprobs",
                "not a Responses API field; /v1/completions and /v1/chat/completions take it",
            );
        }
        if self.sampling.n.is_some_and(|n| n != 1) {
            return refuse("n", "the Responses API answers once per request");
        }
        for item in self.include.iter().flatten() {
            if item != INCLUDE_LOGPROBS {
                return Err(ApiError::invalid(
                    format!("include '{item}' is not supported (only \"{INCLUDE_LOGPROBS}\" is)"),
                    "include",
                ));
            }
        }
        Ok(())
    }

    /// The chat endpoint's sampling fields for this request.
    fn chat_sampling(mut self) -> (Sampling, Echo) {
        let logprobs = self
            .include
            .as_ref()
            .is_some_and(|i| i.iter().any(|x| x == INCLUDE_LOGPROBS))
            || self.sampling.top_logprobs.is_some();
        let echo = Echo {
            instructions: self.instructions.take(),
            max_output_tokens: self.max_output_tokens,
            temperature: self.sampling.temperature.unwrap_or(1.0),
            top_p: self.sampling.top_p.unwrap_or(1.0),
            top_logprobs: self.sampling.top_logprobs,
            text: self
                .text
                .take()
                .unwrap_or_else(|| json!({"format": {"type": "text"}})),
            metadata: self.metadata.take().unwrap_or_else(|| json!({})),
            user: self.user.take(),
            parallel_tool_calls: self.parallel_tool_calls.unwrap_or(true),
            tools: Value::Array(self.tools.take().unwrap_or_default()),
            tool_choice: self
                .tool_choice
                .take()
                .filter(|c| !c.is_null())
                .unwrap_or_else(|| json!("auto")),
        };
        let mut s = self.sampling;
        s.max_completion_tokens = self.max_output_tokens;
        s.logprobs = logprobs.then_some(Value::Bool(true));
        (s, echo)
    }
}

/// What a `response` object repeats of its request.
struct Echo {
    instructions: Option<String>,
    max_output_tokens: Option<i64>,
    temperature: f32,
    top_p: f32,
    top_logprobs: Option<i64>,
    text: Value,
    metadata: Value,
    user: Option<String>,
    parallel_tool_calls: bool,
    tools: Value,
    tool_choice: Value,
}

/// `instructions` (a system message first) and `input` (a string: one user message; or items:
/// messages with `input_text` / `input_image` / `output_text` parts, and earlier function calls
/// and their outputs) as chat messages.
fn messages(instructions: Option<&str>, input: &Value) -> Result<Vec<Message>, ApiError> {
    let mut out = Vec::new();
    if let Some(text) = instructions.filter(|t| !t.is_empty()) {
        out.push(Message::from_parts(
            "system",
            vec![Part::Text {
                text: text.to_owned(),
            }],
        ));
    }
    let items = match input {
        Value::String(text) => {
            out.push(Message::from_parts(
                "user",
                vec![Part::Text { text: text.clone() }],
            ));
            return Ok(out);
        }
        Value::Array(items) if !items.is_empty() => items,
        Value::Array(_) => return Err(ApiError::invalid("input must not be empty", "input")),
        other => {
            return Err(ApiError::invalid(
                format!(
                    "input must be a string or an array of input items, not {}",
                    super::body::kind_of(other)
                ),
                "input",
            ));
        }
    };
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let bad = |at: &str, m: String| ApiError::invalid(format!("{at}: {m}"), at.to_owned());
        let Value::Object(item) = item else {
            return Err(bad(&at, "an input item must be an object".into()));
        };
        let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
        let field = |key: &str| {
            item.get(key)
                .and_then(Value::as_str)
                .ok_or_else(|| bad(&at, format!("a {kind} item needs \"{key}\" (a string)")))
        };
        match kind {
            "message" => {}
            // An earlier call of the model's: an assistant turn's tool call, consecutive calls
            // one turn (parallel calls).
            "function_call" => {
                let call = json!({"id": field("call_id")?, "type": "function",
                    "function": {"name": field("name")?, "arguments": field("arguments")?}});
                match out.last_mut().filter(|m| m.is_tool_call_turn()) {
                    Some(turn) => turn.push_tool_call(call),
                    None => out.push(Message::tool_calls(vec![call])),
                }
                continue;
            }
            "function_call_output" => {
                field("call_id")?;
                let text = field("output")?.to_owned();
                out.push(Message::from_parts("tool", vec![Part::Text { text }]));
                continue;
            }
            _ => {
                return Err(bad(
                    &at,
                    format!(
                        "input items of type '{kind}' are not supported (message, function_call and function_call_output are)"
                    ),
                ));
            }
        }
        let role = item.get("role").and_then(Value::as_str).ok_or_else(|| {
            bad(
                &at,
                "a message needs a role: user, system, developer or assistant".into(),
            )
        })?;
        if !matches!(role, "user" | "system" | "developer" | "assistant") {
            return Err(bad(
                &format!("{at}.role"),
                format!("'{role}' is not one of user, system, developer, assistant"),
            ));
        }
        let parts = match item.get("content") {
            Some(Value::String(text)) => vec![Part::Text { text: text.clone() }],
            Some(Value::Array(parts)) => parts
                .iter()
                .enumerate()
                .map(|(j, p)| content_part(p, &format!("{at}.content[{j}]")))
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(bad(
                    &format!("{at}.content"),
                    "a message's content must be a string or an array of content parts".into(),
                ));
            }
        };
        out.push(Message::from_parts(role, parts));
    }
    Ok(out)
}

fn content_part(p: &Value, at: &str) -> Result<Part, ApiError> {
    let bad = |m: String| ApiError::invalid(format!("{at}: {m}"), at.to_owned());
    let text = |key: &str| {
        p.get(key)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| bad(format!("needs \"{key}\" (a string)")))
    };
    match p.get("type").and_then(Value::as_str) {
        Some("input_text" | "output_text") => Ok(Part::Text { text: text("text")? }),
        Some("refusal") => Ok(Part::Text {
            text: text("refusal")?,
        }),
        Some("input_image") => {
            if p.get("file_id").is_some_and(|f| !f.is_null()) {
                return Err(bad(
                    "file_id needs OpenAI's Files API, which this server does not have; give image_url (a data: or http(s) URL)"
                        .into(),
                ));
            }
            Ok(Part::ImageUrl {
                image_url: ImageUrl::Plain(text("image_url")?),
            })
        }
        Some(other) => Err(bad(format!(
            "content parts of type '{other}' are not supported (input_text, input_image, output_text are)"
        ))),
        None => Err(bad("a content part needs a \"type\"".into())),
    }
}

pub async fn responses(State(st): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let (body, req) = read_request::<ResponsesRequest>(&st, body).await?;
    req.refuse_unsupported()?;
    if req.max_output_tokens.is_some_and(|n| n < 1) {
        return Err(ApiError::invalid(
            format!(
                "max_output_tokens must be at least 1, got {}",
                req.max_output_tokens.unwrap_or_default()
            ),
            "max_output_tokens",
        ));
    }
    let (constraint, mode) = match (
        structured::requested_for_responses(&body)?,
        tools::requested_for_responses(&body)?,
    ) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "a forced tool call is already a structured output; give tool_choice or text.format, not both",
                "tool_choice",
            ));
        }
        (Some(c), None) => (Some(c), None),
        (None, Some(t)) => (Some(t.grammar), Some(t.mode)),
        (None, None) => (None, None),
    };
    let messages = messages(req.instructions.as_deref(), &req.input)?;
    let (sampling, echo) = req.chat_sampling();
    let (segments, urls) = st.chat_prompt(&messages, None, false)?;
    let prepared = st.truncate_prompt(st.prepare(segments, urls).await?, &sampling)?;
    let mut r = st.params(&sampling, prepared.assembled.len(), Kind::Chat, false)?;
    r.params.constraint = constraint;
    let sub = st.submit(vec![prepared], &r)?;
    // OpenAI's ids read `resp_…` and `msg_…`.
    let ids = Ids {
        response: request_id("resp").replacen('-', "_", 1),
        message: request_id("msg").replacen('-', "_", 1),
        call: call_ids(),
        created: now_secs(),
        mode,
    };
    if sampling.stream.unwrap_or(false) {
        return Ok(stream(st, sub, ids, echo));
    }
    collect(&st, sub, ids, echo).await
}

/// The response's ids, and how its output becomes function calls (when it does).
struct Ids {
    response: String,
    message: String,
    /// The first call's item id and `call_id`.
    call: (String, String),
    created: u64,
    mode: Option<ToolCalls>,
}

/// A function call's item id (`fc_…`) and `call_id` (`call_…`).
fn call_ids() -> (String, String) {
    let call = tools::call_id();
    (call.replacen("call_", "fc_", 1), call)
}

/// The answer so far.
#[derive(Default)]
struct Answer {
    text: String,
    logprobs: Vec<TokenLogprob>,
    summary: Option<SeqSummary>,
    /// Under a forced tool call, the finished answer as `function_call` items (`None`: not
    /// whole calls, cut by the token limit; the text is then a message, as chat gives it).
    calls: Option<Vec<Value>>,
}

impl Answer {
    fn finish(&mut self, ids: &Ids, s: SeqSummary) {
        self.text = s.text.clone();
        self.calls = ids
            .mode
            .as_ref()
            .and_then(|m| call_items(ids, m, s.finish_reason, &s.text));
        self.summary = Some(s);
    }
}

fn function_call_item(ids: &(String, String), name: &str, arguments: &str, status: &str) -> Value {
    json!({"id": ids.0, "type": "function_call", "status": status, "arguments": arguments,
        "call_id": ids.1, "name": name})
}

/// A finished answer's calls as `function_call` items: a named call cut short (token limit,
/// stop string) is one incomplete item with the arguments so far; calls of "required" cut
/// short are `None`.
fn call_items(ids: &Ids, mode: &ToolCalls, finish: FinishReason, text: &str) -> Option<Vec<Value>> {
    if let ToolCalls::Named(name) = mode {
        let whole = finish == FinishReason::Stop && tools::calls(mode, text).is_some();
        let status = if whole { "completed" } else { "incomplete" };
        return Some(vec![function_call_item(&ids.call, name, text, status)]);
    }
    if finish != FinishReason::Stop {
        return None;
    }
    let calls = tools::calls(mode, text)?;
    let items = calls
        .iter()
        .enumerate()
        .map(|(j, (name, args))| {
            let id = if j == 0 { ids.call.clone() } else { call_ids() };
            function_call_item(&id, name, args, "completed")
        })
        .collect();
    Some(items)
}

fn failure(st: &AppState, f: SeqFailure) -> ApiError {
    match f {
        SeqFailure::Timeout => ApiError::timeout(st.cfg.request_timeout.unwrap_or_default().as_secs_f64()),
        SeqFailure::Engine(m) => ApiError::internal(m),
    }
}

async fn collect(st: &AppState, sub: Submitted, ids: Ids, echo: Echo) -> Result<Response, ApiError> {
    let Submitted {
        mut events,
        guard: _guard,
        prompt_tokens,
        wants_logprobs,
        ..
    } = sub;
    let mut answer = Answer::default();
    while answer.summary.is_none() {
        match events.recv().await {
            Some((_, SeqEvent::Text { logprobs, .. })) => answer.logprobs.extend(logprobs),
            Some((_, SeqEvent::PromptLogprobs(_))) => {}
            Some((_, SeqEvent::Done(s))) => answer.finish(&ids, s),
            Some((_, SeqEvent::Failed(f))) => return Err(failure(st, f)),
            None => {
                return Err(ApiError::internal(
                    "the engine stopped before the request finished",
                ));
            }
        }
    }
    let body = response_object(st, &ids, &echo, prompt_tokens, wants_logprobs, &answer);
    Ok(axum::Json(body).into_response())
}

/// `completed`, or `incomplete` for an answer cut by `max_output_tokens` (or the context).
fn status(finish: Option<FinishReason>) -> (&'static str, Value) {
    match finish {
        Some(FinishReason::Length) => ("incomplete", json!({"reason": "max_output_tokens"})),
        Some(_) => ("completed", Value::Null),
        None => ("in_progress", Value::Null),
    }
}

fn output_text(st: &AppState, answer: &Answer, wants_logprobs: bool) -> Value {
    let logprobs = match wants_logprobs {
        true => logprobs::chat(&st.tokenizer, &answer.logprobs)["content"].take(),
        false => json!([]),
    };
    json!({"type": "output_text", "text": answer.text, "annotations": [], "logprobs": logprobs})
}

fn message_item(ids: &Ids, status: &str, content: Vec<Value>) -> Value {
    json!({"id": ids.message, "type": "message", "status": status, "role": "assistant", "content": content})
}

/// The `response` object: in progress (no output yet) until the answer has its summary.
fn response_object(
    st: &AppState,
    ids: &Ids,
    echo: &Echo,
    prompt_tokens: usize,
    wants_logprobs: bool,
    answer: &Answer,
) -> Value {
    let finish = answer.summary.as_ref().map(|s| s.finish_reason);
    let (status, incomplete) = status(finish);
    let (output, usage) = match &answer.summary {
        None => (json!([]), Value::Null),
        Some(s) => {
            let output = answer.calls.clone().unwrap_or_else(|| {
                vec![message_item(
                    ids,
                    status,
                    vec![output_text(st, answer, wants_logprobs)],
                )]
            });
            let generated = s.tokens.len();
            let usage = json!({
                "input_tokens": prompt_tokens,
                "input_tokens_details": {"cached_tokens": s.cached_tokens},
                "output_tokens": generated,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt_tokens + generated,
            });
            (Value::Array(output), usage)
        }
    };
    json!({
        "id": ids.response,
        "object": "response",
        "created_at": ids.created,
        "status": status,
        "error": null,
        "incomplete_details": incomplete,
        "instructions": echo.instructions,
        "max_output_tokens": echo.max_output_tokens,
        "model": st.model_name,
        "output": output,
        "parallel_tool_calls": echo.parallel_tool_calls,
        "previous_response_id": null,
        "reasoning": null,
        "store": false,
        "temperature": echo.temperature,
        "text": echo.text,
        "tool_choice": echo.tool_choice,
        "tools": echo.tools,
        "top_logprobs": echo.top_logprobs,
        "top_p": echo.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": echo.user,
        "metadata": echo.metadata,
    })
}

/// What a stream sends as it comes: the message's text, or a named call's arguments (the calls
/// "required" makes are only known when the answer is whole).
enum Live {
    Message,
    Call(String),
}

/// The message's position for its content events, with `extra` fields.
fn message_at(ids: &Ids, extra: Value) -> Value {
    let mut v = json!({"item_id": ids.message, "output_index": 0, "content_index": 0});
    for (k, x) in extra.as_object().into_iter().flatten() {
        v[k] = x.clone();
    }
    v
}

/// The events that open the streamed item.
fn opening(ids: &Ids, live: Option<&Live>) -> Vec<(&'static str, Value)> {
    match live {
        Some(Live::Message) => vec![
            (
                "response.output_item.added",
                json!({"output_index": 0, "item": message_item(ids, "in_progress", vec![])}),
            ),
            (
                "response.content_part.added",
                message_at(
                    ids,
                    json!({"part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
                ),
            ),
        ],
        Some(Live::Call(name)) => vec![(
            "response.output_item.added",
            json!({"output_index": 0, "item": function_call_item(&ids.call, name, "", "in_progress")}),
        )],
        None => Vec::new(),
    }
}

/// The events that close the output once the answer is whole (`full`: the final response).
fn closing(
    st: &AppState,
    ids: &Ids,
    answer: &Answer,
    full: &Value,
    live: Option<&Live>,
    wants_logprobs: bool,
) -> Vec<(&'static str, Value)> {
    let item_done = |j: usize| {
        (
            "response.output_item.done",
            json!({"output_index": j, "item": full["output"][j]}),
        )
    };
    match (live, &answer.calls) {
        (Some(Live::Call(_)), _) => vec![
            (
                "response.function_call_arguments.done",
                json!({"item_id": ids.call.0, "output_index": 0, "arguments": answer.text}),
            ),
            item_done(0),
        ],
        (None, Some(items)) => {
            let mut out = Vec::new();
            for (j, item) in items.iter().enumerate() {
                let mut opened = item.clone();
                opened["status"] = json!("in_progress");
                opened["arguments"] = json!("");
                let at = json!({"item_id": item["id"], "output_index": j});
                let mut delta = at.clone();
                delta["delta"] = item["arguments"].clone();
                let mut done = at;
                done["arguments"] = item["arguments"].clone();
                out.push((
                    "response.output_item.added",
                    json!({"output_index": j, "item": opened}),
                ));
                out.push(("response.function_call_arguments.delta", delta));
                out.push(("response.function_call_arguments.done", done));
                out.push(item_done(j));
            }
            out
        }
        (live, _) => {
            // The message: streamed as it came, or ("required" cut short) all at once now.
            let mut out = Vec::new();
            if live.is_none() {
                out = opening(ids, Some(&Live::Message));
                out.push((
                    "response.output_text.delta",
                    message_at(ids, json!({"delta": answer.text, "logprobs": []})),
                ));
            }
            let part = output_text(st, answer, wants_logprobs);
            out.push((
                "response.output_text.done",
                message_at(ids, json!({"text": answer.text, "logprobs": part["logprobs"]})),
            ));
            out.push((
                "response.content_part.done",
                message_at(ids, json!({"part": part})),
            ));
            out.push(item_done(0));
            out
        }
    }
}

/// The stream of typed events, each `event: <type>` with its JSON (which repeats the type and
/// carries a `sequence_number`), as OpenAI sends them; no `[DONE]` line.
fn stream(st: Arc<AppState>, sub: Submitted, ids: Ids, echo: Echo) -> Response {
    let Submitted {
        mut events,
        guard,
        prompt_tokens,
        wants_logprobs,
        ..
    } = sub;
    let live = match &ids.mode {
        None => Some(Live::Message),
        Some(ToolCalls::Named(name)) => Some(Live::Call(name.clone())),
        Some(ToolCalls::Required) => None,
    };
    let body = async_stream::stream! {
        // Held by the stream: a client that hangs up cancels the sequence.
        let _guard = guard;
        let mut seq = 0u64;
        let mut event = |(kind, mut data): (&str, Value)| -> Result<Event, Infallible> {
            data["type"] = json!(kind);
            data["sequence_number"] = json!(seq);
            seq += 1;
            Ok(Event::default().event(kind).data(data.to_string()))
        };
        let mut answer = Answer::default();
        let response = |answer: &Answer| response_object(&st, &ids, &echo, prompt_tokens, wants_logprobs, answer);
        yield event(("response.created", json!({"response": response(&answer)})));
        yield event(("response.in_progress", json!({"response": response(&answer)})));
        for e in opening(&ids, live.as_ref()) {
            yield event(e);
        }
        loop {
            match events.recv().await {
                Some((_, SeqEvent::Text { text, logprobs: entries })) => {
                    let lp = match wants_logprobs {
                        true => logprobs::chat(&st.tokenizer, &entries)["content"].take(),
                        false => json!([]),
                    };
                    answer.logprobs.extend(entries);
                    answer.text.push_str(&text);
                    match &live {
                        Some(Live::Message) if !text.is_empty() || wants_logprobs => {
                            let delta = message_at(&ids, json!({"delta": text, "logprobs": lp}));
                            yield event(("response.output_text.delta", delta));
                        }
                        Some(Live::Call(_)) if !text.is_empty() => {
                            let delta = json!({"item_id": ids.call.0, "output_index": 0, "delta": text});
                            yield event(("response.function_call_arguments.delta", delta));
                        }
                        _ => {}
                    }
                }
                Some((_, SeqEvent::PromptLogprobs(_))) => {}
                Some((_, SeqEvent::Done(s))) => {
                    answer.finish(&ids, s);
                    let full = response(&answer);
                    for e in closing(&st, &ids, &answer, &full, live.as_ref(), wants_logprobs) {
                        yield event(e);
                    }
                    let kind = match full["status"].as_str() {
                        Some("incomplete") => "response.incomplete",
                        _ => "response.completed",
                    };
                    yield event((kind, json!({"response": full})));
                    break;
                }
                Some((_, SeqEvent::Failed(f))) => {
                    let e = failure(&st, f);
                    let mut failed = response(&answer);
                    failed["status"] = json!("failed");
                    failed["error"] = json!({"code": e.code.unwrap_or("server_error"), "message": e.message});
                    yield event(("response.failed", json!({"response": failed})));
                    break;
                }
                None => break,
            }
        }
    };
    Sse::new(body).keep_alive(KeepAlive::default()).into_response()
}
