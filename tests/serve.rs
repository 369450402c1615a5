//! `kosmos-rt serve` end to end: the official `openai` Python client (answers equal
//! `kosmos-rt run`), prompt scoring as lm-evaluation-harness does it, the bad-input battery, a
//! load test, the queue limit, timeouts, the chat template, graceful shutdown, and structured
//! output. The Python checks live in `scripts/serve/`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kosmos_e2e::workspace_root;
use kosmos_models::KosmosConfig;
use kosmos_train::synthetic::{Split, Task, item};

fn binary() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "-p", "kosmos-rt", "--bin", "kosmos-rt"])
        .status()
        .expect("cargo build");
    assert!(st.success());
    workspace_root().join("target/debug/kosmos-rt")
}

fn python() -> PathBuf {
    let venv =
        std::env::var("KOSMOS_VENV").unwrap_or_else(|_| workspace_root().join(".venv").display().to_string());
    let py = Path::new(&venv).join("bin/python");
    assert!(py.exists(), "{} missing: run scripts/setup.sh", py.display());
    py
}

/// A random tiny package with the buffer layout (`dir/pkg`, model id "pkg") and four images.
fn fixture(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    let (_, pkg) = kosmos_e2e::tiny_buffer_package(dir, 11);
    let images = (0..4)
        .map(|i| {
            let p = dir.join(format!("img{i}.png"));
            item(Task::Shapes, Split::Test, 0, i).image.save(&p).unwrap();
            p
        })
        .collect();
    (pkg, images)
}

/// A running server, killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(pkg: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(binary())
            .arg("serve")
            .arg(pkg)
            .args(["--port", "0"])
            .args(args)
            // Image URLs in these tests are local: straight there, whatever proxy is set.
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start kosmos-rt serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Server { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One HTTP/1.1 request; (status, headers, body).
    fn http(&self, method: &str, path: &str, body: &str) -> (u16, String, String) {
        http(self.port, method, path, body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String, String) {
    http_as(port, method, path, body, None)
}

/// [`http`] with `Authorization: Bearer <key>` when a key is given.
fn http_as(port: u16, method: &str, path: &str, body: &str, key: Option<&str>) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

fn run_python(script: &str, args: &[String]) {
    let out = Command::new(python())
        .current_dir(workspace_root().join("scripts/serve"))
        .arg(script)
        .args(args)
        .output()
        .expect("python");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "{script} failed:\n{text}");
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn openai_client_answers_equal_kosmos_rt_run() {
    client_script("openai_parity.py");
}

/// Structured output (OpenAI's response_format with the client's pydantic helper, vLLM's guided_*
/// and structured_outputs) on a random model, where the constraint alone makes the answer valid:
/// every answer passes jsonschema / json / re, greedy ones equal `kosmos-rt run` with the same
/// constraint, and bad constraints are 400s naming their field.
#[test]
fn structured_outputs_pass_pythons_validators() {
    client_script("structured.py");
}

/// OpenAI's Responses API through the official client: image and text input items, a string
/// input after instructions, streaming events, logprobs and a JSON-Schema `text.format`, each
/// equal to `kosmos-rt run` or the chat endpoint, and what a stateless server refuses.
#[test]
fn responses_api_answers_equal_kosmos_rt_run() {
    client_script("responses_api.py");
}

/// Run a client script of `scripts/serve/` against a server on the random fixture, with the
/// arguments they share (server URL, `kosmos-rt` binary and package for `run` references, two
/// images).
fn client_script(script: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (pkg, images) = fixture(dir.path());
    let server = Server::start(&pkg, &[]);
    let mut args = vec![
        "--base-url".into(),
        format!("{}/v1", server.url()),
        "--binary".into(),
        s(&binary()),
        "--package".into(),
        s(&pkg),
        "--model".into(),
        "pkg".into(),
    ];
    for img in &images[..2] {
        args.extend(["--image".into(), s(img)]);
    }
    run_python(script, &args);
}

/// lm-evaluation-harness's way of scoring: tokenizer endpoints and token-id prompts with `echo`,
/// log-likelihoods checked against the PyTorch reference model and ids against `tokenizers`.
#[test]
fn prompt_scoring_by_token_ids_equals_the_reference_model() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, pkg) = kosmos_e2e::tiny_buffer_package(dir.path(), 11);
    let image = dir.path().join("img.png");
    item(Task::Shapes, Split::Test, 0, 1).image.save(&image).unwrap();
    let server = Server::start(&pkg, &["--prefill-chunk", "16"]);
    run_python(
        "scoring.py",
        &[
            "--base-url".into(),
            server.url(),
            "--model".into(),
            "pkg".into(),
            "--package".into(),
            s(&pkg),
            "--checkpoint".into(),
            s(&ckpt),
            "--image".into(),
            s(&image),
        ],
    );
}

#[test]
fn bad_inputs_get_openai_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (pkg, images) = fixture(dir.path());
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::copy(&images[1], root.join("ok.png")).unwrap();
    std::fs::copy(&images[2], dir.path().join("secret.png")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret.png"), root.join("escape.png")).unwrap();
    let server = Server::start(
        &pkg,
        &[
            "--api-key",
            "test-key",
            "--allow-file-root",
            root.to_str().unwrap(),
        ],
    );
    let context = KosmosConfig::tiny().decoder.max_target_positions.to_string();
    run_python(
        "bad_input.py",
        &[
            "--base-url".into(),
            server.url(),
            "--api-key".into(),
            "test-key".into(),
            "--model".into(),
            "pkg".into(),
            "--image".into(),
            s(&images[0]),
            "--file-root".into(),
            s(&root),
            "--context".into(),
            context,
        ],
    );
}

#[test]
fn load_test_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let (pkg, images) = fixture(dir.path());
    let server = Server::start(&pkg, &[]);
    let mut args = vec![
        "--base-url".into(),
        server.url(),
        "--server-pid".into(),
        server.child.id().to_string(),
        "--binary".into(),
        s(&binary()),
        "--package".into(),
        s(&pkg),
        "--model".into(),
        "pkg".into(),
    ];
    for img in &images {
        args.extend(["--image".into(), s(img)]);
    }
    run_python("load_test.py", &args);
}

fn completion(max_tokens: usize, stream: bool) -> String {
    format!(
        r#"{{"model": "pkg", "prompt": "a red circle", "max_tokens": {max_tokens}, "temperature": 0, "stream": {stream}}}"#
    )
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let (pkg, _) = fixture(dir.path());
    let server = Server::start(&pkg, &["--max-batch", "1", "--max-queue", "2"]);
    let port = server.port;
    // Long requests, more than one row plus two queue places can hold.
    let handles: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || http(port, "POST", "/v1/completions", &completion(200, false))))
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert!(
        !refused.is_empty(),
        "no request was refused: {:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert!(results.iter().all(|r| r.0 == 200 || r.0 == 429));
    let (_, head, body) = refused[0];
    assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
    assert!(body.contains("\"code\":\"queue_full\""), "{body}");
    // Served afterwards.
    assert_eq!(
        server.http("POST", "/v1/completions", &completion(2, false)).0,
        200
    );
}

#[test]
fn requests_past_their_timeout_get_504() {
    let dir = tempfile::tempdir().unwrap();
    let (pkg, _) = fixture(dir.path());
    let server = Server::start(&pkg, &["--request-timeout", "0"]);
    let (status, _, body) = server.http("POST", "/v1/completions", &completion(50, false));
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("\"code\":\"timeout\""), "{body}");
    let (status, _, body) = server.http("GET", "/health", "");
    assert_eq!((status, body.contains("ok")), (200, true));
}

/// Give the package `pkg` this `chat_template` in its manifest.
fn set_chat_template(pkg: &Path, template: &str) {
    let path = pkg.join("kosmos_rt.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    manifest["chat_template"] = template.into();
    std::fs::write(&path, manifest.to_string()).unwrap();
}

#[test]
fn the_package_chat_template_assembles_the_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let (pkg, images) = fixture(dir.path());
    set_chat_template(
        &pkg,
        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %} Answer:",
    );
    let server = Server::start(&pkg, &[]);
    let png = std::fs::read(&images[0]).unwrap();
    let body = serde_json::json!({
        "model": "pkg",
        "max_tokens": 6,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "dropped by the template"},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", STANDARD.encode(&png))}},
                {"type": "text", "text": "Question: what shape?"},
            ]},
        ],
    });
    let (status, _, resp) = server.http("POST", "/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200, "{resp}");
    let got: serde_json::Value = serde_json::from_str(&resp).unwrap();
    let got = got["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .trim()
        .to_string();
    let out = Command::new(binary())
        .arg("run")
        .arg(&pkg)
        .args(["--image", images[0].to_str().unwrap()])
        .args([
            "--prompt",
            "<image>Question: what shape? Answer:",
            "--max-tokens",
            "6",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(got, String::from_utf8_lossy(&out.stdout).trim());
}

/// SageMaker's and vLLM's extra endpoints: `/ping` answers without the API key (GET and POST),
/// `/version` names the release, and `/invocations` answers each body as the endpoint its
/// fields belong to would.
#[test]
fn sagemaker_ping_and_invocations_answer_as_the_openai_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (pkg, images) = fixture(dir.path());
    let server = Server::start(&pkg, &["--api-key", "k"]);
    let port = server.port;
    for method in ["GET", "POST"] {
        let (status, _, body) = http(port, method, "/ping", "");
        assert_eq!(status, 200, "{method} /ping: {body}");
    }
    assert_eq!(http(port, "GET", "/version", "").0, 401, "/version needs the key");
    let (status, _, body) = http_as(port, "GET", "/version", "", Some("k"));
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        http(port, "POST", "/invocations", "{}").0,
        401,
        "/invocations needs the key"
    );

    let png = std::fs::read(&images[0]).unwrap();
    let chat = serde_json::json!({
        "max_tokens": 6, "temperature": 0,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", STANDARD.encode(&png))}},
            {"type": "text", "text": "Question: what shape? Answer:"}]}],
    })
    .to_string();
    let completion = r#"{"prompt": "a red circle on the", "max_tokens": 6, "temperature": 0}"#;
    let responses = r#"{"input": "a red circle on the", "max_output_tokens": 6, "temperature": 0}"#;
    let answer = |path: &str, body: &str| -> serde_json::Value {
        let (status, _, resp) = http_as(port, "POST", path, body, Some("k"));
        assert_eq!(status, 200, "{path}: {resp}");
        serde_json::from_str(&resp).unwrap()
    };
    for (body, path, text) in [
        (
            chat.as_str(),
            "/v1/chat/completions",
            "/choices/0/message/content",
        ),
        (completion, "/v1/completions", "/choices/0/text"),
        (responses, "/v1/responses", "/output/0/content/0/text"),
    ] {
        let direct = answer(path, body);
        let invoked = answer("/invocations", body);
        assert!(invoked.pointer(text).is_some_and(|t| t.is_string()), "{invoked}");
        assert_eq!(
            invoked.pointer(text),
            direct.pointer(text),
            "{path}: {invoked} vs {direct}"
        );
        assert_eq!(invoked["object"], direct["object"], "{path}");
    }
    for bad in [
        r#"{"model": "pkg"}"#,
        r#"{"prompt": "a", "messages": []}"#,
        "not json",
    ] {
        let (status, _, resp) = http_as(port, "POST", "/invocations", bad, Some("k"));
        assert_eq!(status, 400, "{bad}: {resp}");
        assert!(resp.contains("messages") || resp.contains("JSON"), "{resp}");
    }
}

/// A local HTTP server for image URLs: `/img.png` the bytes, `/moved` → `/img.png`, `/away` →
/// the same image on `localhost`.
fn image_host(png: Vec<u8>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 4096];
            let n = conn.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            let path = req.split_whitespace().nth(1).unwrap_or("/").to_owned();
            let head = |status: &str, extra: &str, len: usize| {
                format!("HTTP/1.1 {status}\r\n{extra}Content-Length: {len}\r\nConnection: close\r\n\r\n")
            };
            let mut answer = match path.as_str() {
                "/img.png" => head("200 OK", "Content-Type: image/png\r\n", png.len()).into_bytes(),
                "/moved" => head("301 Moved Permanently", "Location: /img.png\r\n", 0).into_bytes(),
                "/away" => head(
                    "302 Found",
                    &format!("Location: http://localhost:{port}/img.png\r\n"),
                    0,
                )
                .into_bytes(),
                _ => head("404 Not Found", "", 0).into_bytes(),
            };
            if path == "/img.png" {
                answer.extend_from_slice(&png);
            }
            let _ = conn.write_all(&answer);
        }
    });
    port
}

/// `http(s)://` image URLs with `--allow-remote-images`: the image downloaded (after a redirect
/// too) answers as the same image sent inline and as `kosmos-rt run`; a redirect to a host
/// outside `--allowed-media-domains` is a 403 naming it, a missing image a 400 naming its
/// status; without the flag the URL is refused, naming the flag.
#[test]
fn remote_image_urls_answer_like_inline_images() {
    let dir = tempfile::tempdir().unwrap();
    let (pkg, images) = fixture(dir.path());
    let png = std::fs::read(&images[0]).unwrap();
    let port = image_host(png.clone());
    let chat = |server: &Server, url: &str| {
        let body = serde_json::json!({"max_tokens": 6, "temperature": 0, "messages": [{"role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}]}]});
        let (status, _, resp) = server.http("POST", "/v1/chat/completions", &body.to_string());
        let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
        (status, v)
    };
    let text = |v: &serde_json::Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .trim()
            .to_string()
    };
    let want = run_text(&pkg, &["--image", &s(&images[0]), "--max-tokens", "6"]);

    let server = Server::start(
        &pkg,
        &[
            "--allowed-media-domains",
            "127.0.0.1",
            "--image-fetch-timeout",
            "5",
        ],
    );
    let inline = format!("data:image/png;base64,{}", STANDARD.encode(&png));
    let (status, v) = chat(&server, &inline);
    assert_eq!(status, 200, "{v}");
    assert_eq!(text(&v), want);
    for path in ["/img.png", "/moved"] {
        let (status, v) = chat(&server, &format!("http://127.0.0.1:{port}{path}"));
        assert_eq!(status, 200, "{path}: {v}");
        assert_eq!(text(&v), want, "{path}");
    }
    let (status, v) = chat(&server, &format!("http://127.0.0.1:{port}/away"));
    assert_eq!(status, 403, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("host 'localhost'"),
        "{v}"
    );
    let (status, v) = chat(&server, &format!("http://127.0.0.1:{port}/gone.png"));
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("HTTP 404"),
        "{v}"
    );
    drop(server);

    let server = Server::start(&pkg, &[]);
    let (status, v) = chat(&server, &format!("http://127.0.0.1:{port}/img.png"));
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--allow-remote-images"),
        "{v}"
    );
}

/// vLLM's `add_generation_prompt: false` and `continue_final_message`: the template renders
/// without the assistant's opening, and a final assistant message is continued (the template's
/// end of turn after it cut), so the answer equals `kosmos-rt run` on that exact text.
#[test]
fn chat_continues_the_final_assistant_message() {
    let dir = tempfile::tempdir().unwrap();
    let (pkg, _) = fixture(dir.path());
    set_chat_template(
        &pkg,
        "{% for m in messages %}[{{ m.role }}] {{ m.content }} | {% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}",
    );
    let server = Server::start(&pkg, &[]);
    let answer = |extra: serde_json::Value, messages: serde_json::Value| {
        let mut body =
            serde_json::json!({"model": "pkg", "max_tokens": 6, "temperature": 0, "messages": messages});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (status, _, resp) = server.http("POST", "/v1/chat/completions", &body.to_string());
        assert_eq!(status, 200, "{resp}");
        let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .trim()
            .to_string()
    };
    let question = serde_json::json!({"role": "user", "content": "Question: what shape?"});
    let started = serde_json::json!({"role": "assistant", "content": "It is a"});
    let continued = answer(
        serde_json::json!({"continue_final_message": true}),
        serde_json::json!([question, started]),
    );
    let run = |prompt: &str| run_text(&pkg, &["--prompt", prompt, "--max-tokens", "6"]);
    assert_eq!(
        continued,
        run("[user] Question: what shape? | [assistant] It is a")
    );
    // The prompt itself, token for token (a random model may answer alike either way).
    let tokens = |body: serde_json::Value| {
        let (status, _, resp) = server.http("POST", "/tokenize", &body.to_string());
        assert_eq!(status, 200, "{resp}");
        serde_json::from_str::<serde_json::Value>(&resp).unwrap()["tokens"].clone()
    };
    assert_eq!(
        tokens(serde_json::json!({"messages": [question, started], "continue_final_message": true})),
        tokens(serde_json::json!({"prompt": "[user] Question: what shape? | [assistant] It is a"}))
    );
    assert_eq!(
        tokens(serde_json::json!({"messages": [question], "add_generation_prompt": false})),
        tokens(serde_json::json!({"prompt": "[user] Question: what shape? | "}))
    );
    let unopened = answer(
        serde_json::json!({"add_generation_prompt": false}),
        serde_json::json!([question]),
    );
    assert_eq!(unopened, run("[user] Question: what shape? | "));
}

/// `--speculative-tokens`: the server's completions (plain and streamed) and `kosmos-rt run` with
/// it answer as `run` without it, the guesses kept show in `/metrics`, and bad settings are
/// refused naming what is wrong.
#[test]
fn speculative_decoding_leaves_answers_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (pkg, images) = fixture(dir.path());
    let prompt = "a red circle on the left and a red circle on the left and a red circle";
    let plain = run_text(&pkg, &["--prompt", prompt, "--max-tokens", "24"]);
    let spec = ["--speculative-tokens", "4"];
    let with = |extra: &[&str]| {
        let mut args = vec!["--prompt", prompt, "--max-tokens", "24"];
        args.extend_from_slice(extra);
        run_text(&pkg, &args)
    };
    assert_eq!(with(&spec), plain, "run");
    let image = s(&images[0]);
    let captioned = run_text(&pkg, &["--image", &image, "--max-tokens", "24"]);
    assert_eq!(
        run_text(
            &pkg,
            &[
                "--image",
                &image,
                "--max-tokens",
                "24",
                "--speculative-tokens",
                "3"
            ]
        ),
        captioned
    );

    let server = Server::start(&pkg, &spec);
    let body = |stream: bool| {
        serde_json::json!({"model": "pkg", "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": stream})
            .to_string()
    };
    let (status, _, resp) = server.http("POST", "/v1/completions", &body(false));
    assert_eq!(status, 200, "{resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["choices"][0]["text"].as_str().unwrap().trim(), plain);
    let (status, _, resp) = server.http("POST", "/v1/completions", &body(true));
    assert_eq!(status, 200, "{resp}");
    let streamed: String = resp
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed.trim(), plain, "streamed");
    let (_, _, metrics) = server.http("GET", "/metrics", "");
    let count = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    let (drafted, kept) = (
        count("kosmos_spec_decode_draft_tokens_total"),
        count("kosmos_spec_decode_accepted_tokens_total"),
    );
    assert!(kept > 0.0 && kept <= drafted, "{kept} of {drafted} guesses kept");

    let refused = |args: &[&str]| {
        let out = Command::new(binary()).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let p = s(&pkg);
    let e = refused(&[
        "run",
        &p,
        "--speculative-tokens",
        "4",
        "--prompt-lookup-min",
        "3",
        "--prompt-lookup-max",
        "2",
    ]);
    assert!(
        e.contains("--speculative-tokens") && e.contains("longest prompt-lookup n-gram (2)"),
        "{e}"
    );
    let e = refused(&["bench", &p, "--speculative-tokens", "4", "--batch", "4"]);
    assert!(e.contains("--batch 1"), "{e}");
    let manifest = dir.path().join("manifest.jsonl");
    std::fs::write(&manifest, "").unwrap();
    let m = s(&manifest);
    let e = refused(&["eval", &p, "--data", &m, "--speculative-tokens", "4"]);
    assert!(e.contains("--batch-size 1"), "{e}");

    // A draft model (the package itself): `run` and the server answer the same, `bench`
    // reports its guesses and its time, a bad minimum probability is named.
    let draft = ["--draft-model", &p, "--draft-p-min", "0"];
    assert_eq!(with(&draft), plain, "run with a draft");
    let out = Command::new(binary())
        .args([
            "bench",
            &p,
            "--batch",
            "1",
            "--runs",
            "1",
            "--new-tokens",
            "12",
            "--json",
        ])
        .args(draft)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["draft_ms"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["drafted"].as_u64().unwrap() > 0, "{r}");
    assert!(r["tokens_per_call"].as_f64().unwrap() > 1.0, "{r}");
    let drafting = Server::start(&pkg, &draft);
    let (status, _, resp) = drafting.http("POST", "/v1/completions", &body(false));
    assert_eq!(status, 200, "{resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(
        v["choices"][0]["text"].as_str().unwrap().trim(),
        plain,
        "served with a draft"
    );
    let (_, _, metrics) = drafting.http("GET", "/metrics", "");
    let metric = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
    };
    let drafted = metric("kosmos_spec_decode_draft_tokens_total");
    // The prompt's reading, and at least one call that guessed.
    let calls = metric("kosmos_spec_decode_draft_model_calls_total");
    assert!(drafted > 0.0 && calls >= 2.0, "{metrics}");
    let e = refused(&["run", &p, "--draft-model", &p, "--draft-p-min", "2"]);
    assert!(e.contains("--draft-p-min") && e.contains("[0, 1]"), "{e}");
}

#[test]
fn sigterm_drains_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (pkg, _) = fixture(dir.path());
    let mut server = Server::start(&pkg, &[]);
    let mut conn = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let body = completion(150, true);
    write!(
        conn,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Wait for the first token, then ask the server to stop.
    let mut reader = BufReader::new(conn);
    let mut seen = String::new();
    while !seen.contains("data: {") {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stream ended early: {seen}"
        );
        seen.push_str(&line);
    }
    let kill = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    // (Chunked framing sits between the events, so look for the last event, not the end.)
    assert!(rest.contains("data: [DONE]"), "{rest}");
    let t0 = Instant::now();
    loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            assert!(st.success(), "server exited with {st}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(TcpStream::connect(("127.0.0.1", server.port)).is_err());
}

/// `kosmos-rt batch DIR/pkg -i requests -o out` with `args`; (exit code, stderr).
fn batch(pkg: &Path, requests: &Path, out: &Path, args: &[&str]) -> (i32, String) {
    let o = Command::new(binary())
        .arg("batch")
        .arg(pkg)
        .arg("-i")
        .arg(requests)
        .arg("-o")
        .arg(out)
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `kosmos-rt run` (one sequence through `Package::generate`, not the engine) with `args`.
fn run_text(pkg: &Path, args: &[&str]) -> String {
    let out = Command::new(binary())
        .arg("run")
        .arg(pkg)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An OpenAI Batch API file through `kosmos-rt batch`: answers in input order equal `kosmos-rt
/// run`, a schema's key order survives, a refused request is its own error line, an existing
/// output is not overwritten, and `--resume` keeps the whole lines of an interrupted run.
#[test]
fn batch_files_answer_like_kosmos_rt_run_in_input_order_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (pkg, images) = fixture(dir.path());
    let url = |i: usize| format!("file://{}", images[i].display());
    // Written out, not with json! (which sorts keys): "shape" must come first in the answer.
    let schema = concat!(
        r#"{"type": "object", "properties": {"shape": {"type": "string", "maxLength": 8}, "#,
        r#""colour": {"enum": ["red", "blue"]}}, "required": ["shape", "colour"]}"#
    );
    let chat = |id: &str, i: usize, text: &str, extra: serde_json::Value| {
        let mut body = serde_json::json!({"model": "pkg", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url(i)}},
                {"type": "text", "text": text}]}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": body})
    };
    let requests = [
        chat("caption", 0, "", serde_json::json!({})),
        chat(
            "question",
            1,
            "Question: what colour is the circle? Answer:",
            serde_json::json!({}),
        ),
        serde_json::json!({"custom_id": "text", "method": "POST", "url": "/v1/completions",
            "body": {"model": "pkg", "prompt": "a red", "max_tokens": 5, "temperature": 0}}),
        chat("refused", 2, "", serde_json::json!({"temperature": -1})),
        chat(
            "schema",
            3,
            "",
            serde_json::json!({"max_tokens": 40, "response_format":
            {"type": "json_schema", "json_schema": {"name": "s", "schema": "SCHEMA"}}}),
        ),
        serde_json::json!({"custom_id": "sampled", "method": "POST", "url": "/v1/completions",
            "body": {"model": "pkg", "prompt": "a", "max_tokens": 6, "n": 2, "temperature": 1, "seed": 5}}),
        serde_json::json!({"custom_id": "response", "method": "POST", "url": "/v1/responses",
            "body": {"model": "pkg", "max_output_tokens": 8, "temperature": 0, "input": [{"role": "user",
                "content": [{"type": "input_image", "image_url": url(1)}, {"type": "input_text", "text": "Question: what colour is the circle? Answer:"}]}]}}),
    ];
    let input = dir.path().join("requests.jsonl");
    let mut text: Vec<String> = requests
        .iter()
        .map(|r| r.to_string().replace("\"SCHEMA\"", schema))
        .collect();
    text.insert(3, String::new()); // a blank line is skipped
    std::fs::write(&input, text.join("\n") + "\n").unwrap();
    std::fs::write(dir.path().join("schema.json"), schema).unwrap();
    let out = dir.path().join("out.jsonl");
    let root = s(dir.path());
    let (code, err) = batch(&pkg, &input, &out, &["--allow-file-root", &root]);
    assert_eq!(code, 0, "{err}");
    assert!(!dir.path().join("out.jsonl.partial").exists());
    let got = lines(&out);
    let ids: Vec<&str> = got.iter().map(|l| l["custom_id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [
            "caption", "question", "text", "refused", "schema", "sampled", "response"
        ]
    );
    let content = |l: &serde_json::Value| {
        let c = &l["response"]["body"]["choices"][0];
        c["message"]["content"]
            .as_str()
            .or(c["text"].as_str())
            .unwrap()
            .trim()
            .to_string()
    };
    let img = |i: usize| s(&images[i]);
    assert_eq!(
        content(&got[0]),
        run_text(&pkg, &["--image", &img(0), "--max-tokens", "8"])
    );
    assert_eq!(
        content(&got[1]),
        run_text(
            &pkg,
            &[
                "--image",
                &img(1),
                "--max-tokens",
                "8",
                "--prompt",
                "Question: what colour is the circle? Answer:"
            ]
        )
    );
    assert_eq!(
        content(&got[2]),
        run_text(&pkg, &["--prompt", "a red", "--max-tokens", "5"])
    );
    // The Responses API's answer to the same question as "question".
    let response = &got[6]["response"]["body"];
    assert_eq!(response["object"], "response", "{response}");
    assert_eq!(
        response["output"][0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .trim(),
        content(&got[1])
    );
    let schema_file = s(&dir.path().join("schema.json"));
    let want = run_text(
        &pkg,
        &[
            "--image",
            &img(3),
            "--max-tokens",
            "40",
            "--json-schema",
            &schema_file,
        ],
    );
    assert_eq!(content(&got[4]), want);
    assert!(
        want.trim_start_matches(['{', ' ']).starts_with("\"shape\""),
        "schema order lost: {want}"
    );
    for (i, l) in got.iter().enumerate() {
        if i == 3 {
            continue;
        }
        assert_eq!(l["response"]["status_code"], 200, "{l}");
        assert!(l["error"].is_null(), "{l}");
        assert_eq!(l["response"]["request_id"], l["response"]["body"]["id"]);
    }
    assert_eq!(got[5]["response"]["body"]["choices"].as_array().unwrap().len(), 2);
    assert_eq!(got[3]["response"]["status_code"], 400);
    assert_eq!(
        got[3]["response"]["body"]["error"]["param"], "temperature",
        "{}",
        got[3]
    );
    assert!(
        got[3]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("temperature")
    );
    assert!(err.contains("6 succeeded, 1 failed"), "{err}");

    // An existing output is never overwritten without --force.
    let before = std::fs::read(&out).unwrap();
    let (code, err) = batch(&pkg, &input, &out, &["--allow-file-root", &root]);
    assert_ne!(code, 0);
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), before);

    // An interrupted run: two whole lines (marked, to show they are kept, not redone) and a cut one.
    let full = std::fs::read_to_string(&out).unwrap();
    let kept: Vec<String> = full
        .lines()
        .take(2)
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["id"] = "kept".into();
            v.to_string()
        })
        .collect();
    let third = full.lines().nth(2).unwrap();
    let partial = dir.path().join("out.jsonl.partial");
    std::fs::write(
        &partial,
        format!("{}\n{}\n{}", kept[0], kept[1], &third[..third.len() / 2]),
    )
    .unwrap();
    std::fs::remove_file(&out).unwrap();
    let (code, err) = batch(&pkg, &input, &out, &["--allow-file-root", &root]);
    assert_ne!(code, 0);
    assert!(err.contains("--resume"), "{err}");
    let (code, err) = batch(&pkg, &input, &out, &["--allow-file-root", &root, "--resume"]);
    assert_eq!(code, 0, "{err}");
    let resumed = lines(&out);
    assert_eq!(resumed.len(), 7);
    assert_eq!(resumed[0]["id"], "kept");
    assert_eq!(resumed[1]["id"], "kept");
    assert_ne!(resumed[2]["id"], "kept");
    for i in [2, 4, 5] {
        assert_eq!(
            resumed[i]["response"]["body"]["choices"],
            got[i]["response"]["body"]["choices"]
        );
    }
    assert_eq!(
        resumed[6]["response"]["body"]["output"][0]["content"],
        got[6]["response"]["body"]["output"][0]["content"]
    );
    assert!(err.contains("resuming: 2 of 7 requests already written"), "{err}");
}

/// Every envelope problem of a batch file is reported, with its line, before anything runs, and
/// nothing is written.
#[test]
fn bad_batch_files_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (pkg, _) = fixture(dir.path());
    let ok = |id: &str| {
        serde_json::json!({"custom_id": id, "method": "POST", "url": "/v1/completions",
            "body": {"model": "pkg", "prompt": "a", "max_tokens": 2}})
        .to_string()
    };
    let input = dir.path().join("bad.jsonl");
    let text = [
        ok("a"),
        ok("a"),
        "{not json".to_string(),
        serde_json::json!({"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {}})
            .to_string(),
        serde_json::json!({"custom_id": "g", "method": "GET", "url": "/v1/completions", "body": {}})
            .to_string(),
        serde_json::json!({"custom_id": "s", "method": "POST", "url": "/v1/completions",
            "body": {"model": "pkg", "prompt": "a", "stream": true}})
        .to_string(),
        serde_json::json!({"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": [1]})
            .to_string(),
        serde_json::json!({"method": "POST", "url": "/v1/completions", "body": {}}).to_string(),
    ];
    std::fs::write(&input, text.join("\n")).unwrap();
    let out = dir.path().join("out.jsonl");
    let (code, err) = batch(&pkg, &input, &out, &[]);
    assert_ne!(code, 0);
    for want in [
        "7 bad request line(s)",
        "line 2: custom_id 'a' is used by an earlier line",
        "line 3: not a batch request",
        "line 4: url '/v1/embeddings' is not supported",
        "line 5: method 'GET' is not supported",
        "line 6: body.stream is true",
        "line 7: body must be a JSON object",
        "line 8: not a batch request",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    assert!(!out.exists() && !dir.path().join("out.jsonl.partial").exists());
    std::fs::write(&input, "\n\n").unwrap();
    let (code, err) = batch(&pkg, &input, &out, &[]);
    assert_ne!(code, 0);
    assert!(err.contains("no requests"), "{err}");
}

/// Ctrl-C stops a batch with its whole lines kept in `OUT.partial` (exit 130) and `--resume`
/// finishes it: every request exactly once, in order.
#[test]
fn an_interrupted_batch_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let (pkg, _) = fixture(dir.path());
    let count = 400;
    let text: Vec<String> = (0..count)
        .map(|i| {
            serde_json::json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/v1/completions",
                "body": {"model": "pkg", "prompt": format!("a {i}"), "max_tokens": 48, "ignore_eos": true,
                         "temperature": 0}})
            .to_string()
        })
        .collect();
    let input = dir.path().join("requests.jsonl");
    std::fs::write(&input, text.join("\n") + "\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let partial = dir.path().join("out.jsonl.partial");
    let mut child = Command::new(binary())
        .arg("batch")
        .arg(&pkg)
        .arg("-i")
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::fs::read_to_string(&partial).map_or(0, |t| t.lines().count()) < 8 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be interrupted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("--resume"), "{err}");
    assert!(!out.exists());
    let written = std::fs::read_to_string(&partial).unwrap();
    assert!(written.ends_with('\n'));
    let done = written.lines().count();
    assert!(done < count, "nothing was left to interrupt");
    let (code, err) = batch(&pkg, &input, &out, &["--resume"]);
    assert_eq!(code, 0, "{err}");
    let all = lines(&out);
    let ids: Vec<String> = all
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, (0..count).map(|i| format!("r{i}")).collect::<Vec<_>>());
    assert!(all.iter().all(|l| l["response"]["status_code"] == 200));
    assert!(
        err.contains(&format!("resuming: {done} of {count} requests")),
        "{err}"
    );
}
