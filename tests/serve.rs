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
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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

#[test]
fn the_package_chat_template_assembles_the_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let (pkg, images) = fixture(dir.path());
    let manifest_path = pkg.join("kosmos_rt.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest["chat_template"] =
        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %} Answer:"
            .into();
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
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
