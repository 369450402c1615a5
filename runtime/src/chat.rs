//! A chat (OpenAI's message list) as one prompt: the package's chat template (Jinja in
//! `kosmos_rt.json`, given `messages` with `<image>` where each image goes, `add_generation_prompt`,
//! `bos_token`, `eos_token`) when it has one, else the messages' parts in order with a newline
//! between messages. The server's chat endpoints and `/tokenize`, and the C ABI's
//! `kosmos_chat_prompt` (so the Python bindings), all build prompts here.

use std::path::Path;

use kosmos_models::KosmosTokenizer;
use kosmos_models::package::{MANIFEST_FILE, PackageManifest};
use kosmos_models::sequence::Segment;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{Result, RtError};
use crate::generate::IMAGE_MARKER;
use crate::serve::body::kind_of;

#[derive(Deserialize)]
pub(crate) struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    /// An assistant turn's earlier tool calls (OpenAI's shape), given back in a conversation.
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
}

impl Message {
    /// An assistant turn of tool `calls` (OpenAI's chat shape) and no text.
    pub(crate) fn tool_calls(calls: Vec<Value>) -> Self {
        Message {
            role: "assistant".to_owned(),
            content: None,
            tool_calls: Some(calls),
        }
    }

    /// An assistant turn of tool calls only, which a further parallel call joins.
    pub(crate) fn is_tool_call_turn(&self) -> bool {
        self.role == "assistant" && self.content.is_none() && self.tool_calls.is_some()
    }

    pub(crate) fn push_tool_call(&mut self, call: Value) {
        self.tool_calls.get_or_insert_with(Vec::new).push(call);
    }

    /// A message of `parts` in order (the Responses API's input items become these).
    pub(crate) fn from_parts(role: &str, parts: Vec<Part>) -> Self {
        Message {
            role: role.to_owned(),
            content: Some(Content::Parts(parts)),
            tool_calls: None,
        }
    }
}

enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// By hand rather than `untagged`, whose one message ("did not match any variant") would hide
/// which part is wrong and why.
impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(text) => Ok(Content::Text(text)),
            Value::Array(parts) => parts
                .into_iter()
                .enumerate()
                .map(|(i, part)| {
                    Part::deserialize(part).map_err(|e| D::Error::custom(format!("part {i}: {e}")))
                })
                .collect::<Result<_, _>>()
                .map(Content::Parts),
            other => Err(D::Error::custom(format!(
                "invalid type: {}, expected a string or an array of content parts",
                kind_of(&other)
            ))),
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Deserialize)]
#[serde(untagged, expecting = "expected an object {\"url\": ...} or a URL string")]
pub(crate) enum ImageUrl {
    Object { url: String },
    Plain(String),
}

/// Why a chat cannot become a prompt, and the request field it is about.
#[derive(Debug)]
pub(crate) struct ChatError {
    pub message: String,
    pub param: &'static str,
}

impl ChatError {
    fn new(message: impl Into<String>, param: &'static str) -> Self {
        ChatError {
            message: message.into(),
            param,
        }
    }
}

impl std::fmt::Display for ChatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.param, self.message)
    }
}

/// A package's way of turning a chat into a prompt.
pub(crate) struct ChatTemplate {
    env: Option<minijinja::Environment<'static>>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// The package's chat template (`kosmos_rt.json`'s `chat_template`), compiled; a template
    /// that does not parse is a package error naming the manifest.
    pub(crate) fn new(manifest: &PackageManifest, dir: &Path, tokenizer: &KosmosTokenizer) -> Result<Self> {
        let env = match &manifest.chat_template {
            Some(src) => {
                let mut env = minijinja::Environment::new();
                env.add_template_owned("chat", src.clone())
                    .map_err(|e| RtError::Package {
                        path: dir.join(MANIFEST_FILE),
                        message: format!("chat_template does not parse: {e}"),
                    })?;
                Some(env)
            }
            None => None,
        };
        let special = tokenizer.special();
        Ok(ChatTemplate {
            env,
            bos_token: special.bos_token.clone(),
            eos_token: special.eos_token.clone(),
        })
    }

    /// Segments and image URLs of a chat, through the package's chat template if it has one
    /// (which ends with the assistant's turn opened when `add_generation_prompt`).
    pub(crate) fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: Option<bool>,
        continue_final_message: bool,
    ) -> Result<(Vec<Segment>, Vec<String>), ChatError> {
        if messages.is_empty() {
            return Err(ChatError::new("messages must not be empty", "messages"));
        }
        // vLLM's pair: continuing the final (assistant) message opens no new turn.
        let add_generation_prompt = match (add_generation_prompt, continue_final_message) {
            (Some(true), true) => {
                return Err(ChatError::new(
                    "add_generation_prompt and continue_final_message cannot both be true",
                    "continue_final_message",
                ));
            }
            (_, true) => false,
            (a, false) => a.unwrap_or(true),
        };
        if continue_final_message && messages.last().is_some_and(|m| m.role != "assistant") {
            return Err(ChatError::new(
                "continue_final_message continues the last message, which must be the assistant's",
                "continue_final_message",
            ));
        }
        let mut urls = Vec::new();
        // Per message: its parts in order (text, or an image place).
        let mut per_message: Vec<(String, Vec<Segment>)> = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if !matches!(
                m.role.as_str(),
                "system" | "user" | "assistant" | "developer" | "tool"
            ) {
                return Err(ChatError::new(
                    format!(
                        "messages[{i}].role '{}' is not one of system, developer, user, assistant, tool",
                        m.role
                    ),
                    "messages",
                ));
            }
            let mut segs = Vec::new();
            // Earlier calls, as the text a forced call generates: [{"name", "arguments"}].
            if let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_empty()) {
                let calls: Vec<Value> = calls
                    .iter()
                    .map(|c| {
                        let f = &c["function"];
                        let args = f["arguments"]
                            .as_str()
                            .and_then(|a| serde_json::from_str::<Value>(a).ok())
                            .unwrap_or_else(|| f["arguments"].clone());
                        json!({"name": f["name"], "arguments": args})
                    })
                    .collect();
                segs.push(Segment::Text(Value::Array(calls).to_string()));
            }
            match &m.content {
                None => {}
                Some(Content::Text(t)) => segs.push(Segment::Text(t.clone())),
                Some(Content::Parts(parts)) => {
                    for p in parts {
                        match p {
                            Part::Text { text } => segs.push(Segment::Text(text.clone())),
                            Part::ImageUrl { image_url } => {
                                let url = match image_url {
                                    ImageUrl::Object { url } | ImageUrl::Plain(url) => url.clone(),
                                };
                                urls.push(url);
                                segs.push(Segment::Image);
                            }
                        }
                    }
                }
            }
            per_message.push((m.role.clone(), segs));
        }
        let segments = match &self.env {
            Some(env) => {
                let msgs: Vec<Value> = per_message
                    .iter()
                    .map(|(role, segs)| json!({"role": role, "content": prompt_text(segs)}))
                    .collect();
                let tmpl = env
                    .get_template("chat")
                    .map_err(|e| ChatError::new(format!("chat template: {e}"), "messages"))?;
                let mut text = tmpl
                    .render(json!({
                        "messages": msgs,
                        "add_generation_prompt": add_generation_prompt,
                        "bos_token": self.bos_token,
                        "eos_token": self.eos_token,
                    }))
                    .map_err(|e| {
                        ChatError::new(format!("the package's chat template failed: {e}"), "messages")
                    })?;
                if continue_final_message {
                    // The answer goes on from the final message's text: cut what the template
                    // puts after it (its end-of-turn), as vLLM does.
                    let last = msgs
                        .last()
                        .and_then(|m| m["content"].as_str())
                        .unwrap_or_default();
                    match text.rfind(last).filter(|_| !last.is_empty()) {
                        Some(at) => text.truncate(at + last.len()),
                        None => {
                            return Err(ChatError::new(
                                "continue_final_message: the final message is empty or the chat template does not keep its text as is",
                                "continue_final_message",
                            ));
                        }
                    }
                }
                let markers = text.matches(IMAGE_MARKER).count();
                if markers != urls.len() {
                    return Err(ChatError::new(
                        format!(
                            "the chat template placed {markers} {IMAGE_MARKER} markers for {} images",
                            urls.len()
                        ),
                        "messages",
                    ));
                }
                split_markers(&text)
            }
            None => {
                // Parts in order; adjacent text joins (messages separated by a newline), so a
                // single user message is exactly what `kosmos-rt run` builds.
                let mut segs: Vec<Segment> = Vec::new();
                for (i, (_, parts)) in per_message.into_iter().enumerate() {
                    if i > 0 {
                        push_text(&mut segs, "\n");
                    }
                    for s in parts {
                        match s {
                            Segment::Text(t) => push_text(&mut segs, &t),
                            Segment::Image => segs.push(Segment::Image),
                        }
                    }
                }
                segs.retain(|s| !matches!(s, Segment::Text(t) if t.is_empty()));
                segs
            }
        };
        Ok((segments, urls))
    }
}

/// The prompt text of `segments`: an `<image>` marker where each image goes (what
/// `Prompt::parse` and `kosmos_generate` take).
pub(crate) fn prompt_text(segments: &[Segment]) -> String {
    segments
        .iter()
        .map(|s| match s {
            Segment::Text(t) => t.as_str(),
            Segment::Image => IMAGE_MARKER,
        })
        .collect()
}

fn push_text(segs: &mut Vec<Segment>, t: &str) {
    if let Some(Segment::Text(last)) = segs.last_mut() {
        last.push_str(t);
    } else {
        segs.push(Segment::Text(t.to_string()));
    }
}

/// Text with `<image>` markers as segments (each marker an image place).
fn split_markers(text: &str) -> Vec<Segment> {
    let mut segs = Vec::new();
    for (i, part) in text.split(IMAGE_MARKER).enumerate() {
        if i > 0 {
            segs.push(Segment::Image);
        }
        if !part.is_empty() {
            segs.push(Segment::Text(part.to_string()));
        }
    }
    segs
}
