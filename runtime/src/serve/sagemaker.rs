//! What hosting platforms probe and call besides the OpenAI API, as vLLM serves them:
//! Amazon SageMaker's `GET|POST /ping` (liveness, like `/health`, never behind the API key)
//! and `POST /invocations` (one endpoint for every request kind: the body says which), and
//! `GET /version`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::AppState;
use super::body::read_body;
use super::error::ApiError;
use super::{openai, responses};

pub async fn ping() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

pub async fn version() -> Response {
    axum::Json(serde_json::json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}

/// The endpoint a body is for: `messages` → chat completions, `prompt` → completions,
/// `input` → responses (the field each of them requires).
fn route_of(body: &[u8]) -> Result<&'static str, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the body is not JSON: {e}"), "body"))?;
    let Some(fields) = v.as_object() else {
        return Err(ApiError::invalid("the body must be a JSON object", "body"));
    };
    let kinds: Vec<&str> = [
        ("messages", "/v1/chat/completions"),
        ("prompt", "/v1/completions"),
        ("input", "/v1/responses"),
    ]
    .into_iter()
    .filter(|(field, _)| fields.contains_key(*field))
    .map(|(_, route)| route)
    .collect();
    match kinds[..] {
        [one] => Ok(one),
        [] => Err(ApiError::invalid(
            "cannot tell the request kind: send messages (chat completions), prompt (completions) or input (responses)",
            "body",
        )),
        _ => Err(ApiError::invalid(
            "the body has more than one of messages, prompt and input: send one",
            "body",
        )),
    }
}

pub async fn invocations(State(st): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(body, st.cfg.max_body_bytes).await?;
    let route = route_of(&bytes)?;
    tracing::debug!(route, "invocation");
    let body = Body::from(bytes);
    match route {
        "/v1/chat/completions" => openai::chat_completions(State(st), body).await,
        "/v1/completions" => openai::completions(State(st), body).await,
        _ => responses::responses(State(st), body).await,
    }
}

#[cfg(test)]
mod tests {
    use super::route_of;

    #[test]
    fn the_body_names_its_endpoint() {
        assert_eq!(route_of(br#"{"messages": []}"#).unwrap(), "/v1/chat/completions");
        assert_eq!(
            route_of(br#"{"prompt": "a", "model": "m"}"#).unwrap(),
            "/v1/completions"
        );
        assert_eq!(route_of(br#"{"input": "a"}"#).unwrap(), "/v1/responses");
        for bad in [
            &br#"{"model": "m"}"#[..],
            br#"{"prompt": "a", "messages": []}"#,
            b"[1]",
            b"{",
        ] {
            assert_eq!(route_of(bad).unwrap_err().status, 400);
        }
    }
}
