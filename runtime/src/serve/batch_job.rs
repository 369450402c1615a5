//! `kosmos-rt batch`: an OpenAI Batch API input file run through the server's own handlers
//! in-process (no socket), decoded together by the continuous-batching engine, as vLLM's
//! `run_batch` does.
//!
//! Input, one request per line: `{"custom_id": "...", "method": "POST", "url":
//! "/v1/chat/completions" | "/v1/completions" | "/v1/responses", "body": {...}}`. Output, one line per request in
//! input order: `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`,
//! `error` being null on success and `{"code", "message"}` otherwise (the body then holds the
//! server's error object). Every line's envelope is checked before the model loads, so a typo
//! on line 90000 does not surface hours in; a request the server would refuse (a bad
//! `temperature`, an unreadable image) becomes its own error line, as with OpenAI.
//!
//! Nothing is lost: results go to `OUT.partial`, one whole line at a time, and `OUT` appears
//! (renamed) only when every request has its line. After a crash, a kill or Ctrl-C, `--resume`
//! keeps the partial file's whole lines and runs the requests after them.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{Request, header};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::{Semaphore, mpsc};
use tower::ServiceExt as _;

use super::{ServeConfig, start};
use crate::error::{Result, RtError};
use crate::package::Package;

/// The endpoints a batch line may name.
pub const BATCH_URLS: &[&str] = &["/v1/chat/completions", "/v1/completions", "/v1/responses"];

/// At most this many envelope errors are listed before the rest are only counted.
const MAX_LISTED_ERRORS: usize = 20;

/// What to run and where the results go.
#[derive(Clone, Debug)]
pub struct BatchJob {
    pub input: PathBuf,
    pub output: PathBuf,
    /// Continue `OUT.partial` after its last whole line.
    pub resume: bool,
    /// Replace an existing `OUT` or `OUT.partial`.
    pub overwrite: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// How a batch went.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BatchSummary {
    /// Requests in the input file.
    pub requests: usize,
    /// Requests whose lines a resumed run found already written.
    pub resumed: usize,
    /// Requests answered with status 200 in this run.
    pub succeeded: usize,
    /// Requests answered with an error in this run.
    pub failed: usize,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub seconds: f64,
    /// Stopped by Ctrl-C / SIGTERM before the end; the partial file holds what was done.
    pub interrupted: bool,
    pub output: PathBuf,
}

/// One input line's envelope.
#[derive(Deserialize)]
struct InputLine<'a> {
    custom_id: String,
    method: String,
    url: String,
    /// Kept as written: structured output reads JSON Schemas with their key order.
    #[serde(borrow)]
    body: &'a RawValue,
}

/// One output line.
#[derive(Serialize)]
struct OutputLine<'a> {
    id: String,
    custom_id: &'a str,
    response: ResponseData<'a>,
    error: Option<ErrorData>,
}

#[derive(Serialize)]
struct ResponseData<'a> {
    status_code: u16,
    request_id: String,
    body: &'a RawValue,
}

#[derive(Serialize)]
struct ErrorData {
    code: String,
    message: String,
}

/// A request read from the input, ready to run.
struct Pending {
    index: usize,
    custom_id: String,
    url: String,
    body: Vec<u8>,
}

/// A finished request's output line and what the summary counts.
struct Finished {
    index: usize,
    line: String,
    ok: bool,
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// `OUT.partial`.
pub fn partial_path(output: &Path) -> PathBuf {
    let mut name = output.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Check every line's envelope; the custom ids in input order. Blank lines are skipped.
pub fn scan(input: &Path) -> Result<Vec<String>> {
    let file = File::open(input).map_err(|e| RtError::Batch(format!("{}: {e}", input.display())))?;
    let mut ids = Vec::new();
    let mut seen = HashSet::new();
    let mut errors = Vec::new();
    let mut bad = 0usize;
    for (n, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line = line.map_err(|e| RtError::Batch(format!("{}: {e}", input.display())))?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match envelope(&line) {
            Ok(id) if !seen.insert(id.clone()) => {
                bad += 1;
                errors.push(format!(
                    "line {}: custom_id '{id}' is used by an earlier line",
                    n + 1
                ));
            }
            Ok(id) => ids.push(id),
            Err(m) => {
                bad += 1;
                errors.push(format!("line {}: {m}", n + 1));
            }
        }
    }
    if bad > 0 {
        let more = bad.saturating_sub(MAX_LISTED_ERRORS);
        errors.truncate(MAX_LISTED_ERRORS);
        let mut message = format!(
            "{}: {bad} bad request line(s); nothing was run:\n  {}",
            input.display(),
            errors.join("\n  ")
        );
        if more > 0 {
            message.push_str(&format!("\n  ... and {more} more"));
        }
        return Err(RtError::Batch(message));
    }
    if ids.is_empty() {
        return Err(RtError::Batch(format!(
            "{}: no requests (the file is empty)",
            input.display()
        )));
    }
    Ok(ids)
}

/// A line's custom id, or what is wrong with its envelope.
fn envelope(line: &[u8]) -> std::result::Result<String, String> {
    let text = std::str::from_utf8(line).map_err(|e| format!("not UTF-8 ({e})"))?;
    let parsed: InputLine = serde_json::from_str(text)
        .map_err(|e| format!("not a batch request {{\"custom_id\", \"method\", \"url\", \"body\"}}: {e}"))?;
    if parsed.custom_id.is_empty() {
        return Err("custom_id is empty".into());
    }
    if parsed.method != "POST" {
        return Err(format!(
            "method '{}' is not supported; batch requests are \"POST\"",
            parsed.method
        ));
    }
    if !BATCH_URLS.contains(&parsed.url.as_str()) {
        return Err(format!(
            "url '{}' is not supported; use one of {}",
            parsed.url,
            BATCH_URLS.join(", ")
        ));
    }
    let body: Value = serde_json::from_str(parsed.body.get()).map_err(|e| format!("body: {e}"))?;
    let Some(obj) = body.as_object() else {
        return Err("body must be a JSON object".into());
    };
    if obj.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err("body.stream is true; batch requests cannot stream (leave it out)".into());
    }
    Ok(parsed.custom_id)
}

/// The number of whole, well-formed lines at the start of `partial` whose custom ids are the
/// first of `ids`, and the byte length they take. Anything after them (a line cut by a kill) is
/// dropped by the caller.
fn resumable(partial: &Path, ids: &[String]) -> Result<(usize, u64)> {
    let mut text = Vec::new();
    File::open(partial)
        .and_then(|mut f| f.read_to_end(&mut text))
        .map_err(|e| RtError::Batch(format!("{}: {e}", partial.display())))?;
    let mut done = 0;
    let mut bytes = 0u64;
    for line in text.split_inclusive(|&b| b == b'\n') {
        if !line.ends_with(b"\n") {
            break;
        }
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            break;
        };
        let id = v.get("custom_id").and_then(Value::as_str).unwrap_or_default();
        match ids.get(done) {
            Some(want) if want == id => {}
            Some(want) => {
                return Err(RtError::Batch(format!(
                    "{}: line {} is for custom_id '{id}' but the input's request {} is '{want}': \
                     the input changed since this partial output was written (start over with --force)",
                    partial.display(),
                    done + 1,
                    done + 1
                )));
            }
            None => {
                return Err(RtError::Batch(format!(
                    "{}: more lines than the input has requests (start over with --force)",
                    partial.display()
                )));
            }
        }
        done += 1;
        bytes += line.len() as u64;
    }
    Ok((done, bytes))
}

/// A checked batch: its requests' custom ids and where the output resumes. Made before the model
/// loads, so that a bad file or an output in the way is reported at once.
#[derive(Debug)]
pub struct BatchPlan {
    job: BatchJob,
    ids: Vec<String>,
    /// Requests already written to `OUT.partial` and the bytes their lines take.
    resume_from: Option<(usize, u64)>,
}

impl BatchPlan {
    /// Requests in the input.
    pub fn requests(&self) -> usize {
        self.ids.len()
    }

    /// Requests a resumed run finds already written.
    pub fn resumed(&self) -> usize {
        self.resume_from.map_or(0, |(done, _)| done)
    }
}

/// Check `job`'s input and output, refusing to overwrite anything the user did not ask to lose.
pub fn plan(job: BatchJob) -> Result<BatchPlan> {
    let ids = scan(&job.input)?;
    let partial = partial_path(&job.output);
    if job.output.exists() && !job.overwrite {
        return Err(RtError::Batch(format!(
            "{} exists{}; --force replaces it",
            job.output.display(),
            if job.resume {
                " (that batch is complete)"
            } else {
                ""
            }
        )));
    }
    let resume_from = if !partial.exists() || (job.overwrite && !job.resume) {
        None
    } else if job.resume {
        Some(resumable(&partial, &ids)?)
    } else {
        return Err(RtError::Batch(format!(
            "{} exists from an interrupted run: --resume continues it, --force starts over",
            partial.display()
        )));
    };
    Ok(BatchPlan {
        job,
        ids,
        resume_from,
    })
}

/// `OUT.partial`, cut after the lines being kept, positioned for appending.
fn open_output(plan: &BatchPlan) -> Result<File> {
    let partial = partial_path(&plan.job.output);
    let io = |e: std::io::Error| RtError::Batch(format!("{}: {e}", partial.display()));
    let mut file = match plan.resume_from {
        Some((_, bytes)) => {
            let f = OpenOptions::new().write(true).open(&partial).map_err(io)?;
            f.set_len(bytes).map_err(io)?;
            f
        }
        None => File::create(&partial).map_err(io)?,
    };
    file.seek(SeekFrom::End(0)).map_err(io)?;
    Ok(file)
}

/// Run a planned batch on `pkg` with the server's settings `cfg` (its limits, timeouts and
/// engine sizes).
pub async fn run_batch(pkg: Package, mut cfg: ServeConfig, plan: BatchPlan) -> Result<BatchSummary> {
    let started = Instant::now();
    let mut out = open_output(&plan)?;
    let resumed = plan.resumed();
    let total = plan.requests();
    let job = plan.job;
    let mut summary = BatchSummary {
        requests: total,
        resumed,
        output: job.output.clone(),
        ..BatchSummary::default()
    };
    if resumed > 0 {
        tracing::info!("resuming after {resumed} of {total} requests already written");
    }

    // Requests between the oldest unwritten one and the newest started: enough to keep every
    // row busy while a long one holds up the in-order writing.
    let window = (8 * cfg.max_batch).max(64);
    // The engine queue must take every sequence the window can hold (n choices each).
    cfg.max_queue = cfg.max_queue.max(window * cfg.max_n);
    let running = start(pkg, cfg)?;
    let app = super::router(running.state.clone());

    let pb = progress_bar(job.progress, total as u64, resumed as u64);
    let permits = Arc::new(Semaphore::new(window));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Finished, tokio::sync::OwnedSemaphorePermit)>();
    let (line_tx, mut line_rx) = mpsc::channel::<Result<Pending>>(window);

    // Lines are read on a plain thread (file reads block) and handed over in order.
    let input = job.input.clone();
    let reader = std::thread::spawn(move || read_requests(&input, resumed, &line_tx));

    let mut tasks = tokio::task::JoinSet::new();
    let mut feeder = {
        let permits = permits.clone();
        let app = app.clone();
        Box::pin(async move {
            while let Some(next) = line_rx.recv().await {
                let p = next?;
                let permit = permits
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore stays open");
                let app = app.clone();
                let tx = done_tx.clone();
                tasks.spawn(async move {
                    let finished = execute(app, p).await;
                    let _ = tx.send((finished, permit));
                });
            }
            // Hold the request tasks (dropping the set would abort them) until each has reported.
            while let Some(r) = tasks.join_next().await {
                if let Err(e) = r {
                    return Err(RtError::Batch(format!("a request's task failed: {e}")));
                }
            }
            Ok::<(), RtError>(())
        })
    };
    let mut feeding = true;
    // Finished requests waiting for those before them, with the window permits they hold.
    let mut waiting = BTreeMap::new();
    let mut next = resumed;
    let mut stop = std::pin::pin!(super::shutdown_signal());
    let mut failure = None;
    'run: while next < total {
        tokio::select! {
            r = &mut feeder, if feeding => {
                feeding = false;
                if let Err(e) = r {
                    failure = Some(e);
                    break;
                }
            }
            got = done_rx.recv() => {
                let Some((f, permit)) = got else {
                    failure = Some(RtError::Batch(format!("the batch stopped before request {} had its answer", next + 1)));
                    break;
                };
                waiting.insert(f.index, (f, permit));
                // Write whatever is now next in input order.
                while let Some((f, _permit)) = waiting.remove(&next) {
                    // One write per line, so a kill leaves whole lines or a cut last one.
                    if let Err(e) = out.write_all(format!("{}\n", f.line).as_bytes()) {
                        failure = Some(RtError::Batch(format!("{}: {e}", partial_path(&job.output).display())));
                        break 'run;
                    }
                    if f.ok {
                        summary.succeeded += 1;
                    } else {
                        summary.failed += 1;
                    }
                    summary.prompt_tokens += f.prompt_tokens;
                    summary.completion_tokens += f.completion_tokens;
                    next += 1;
                    pb.inc(1);
                    pb.set_message(rate(&summary, started));
                }
            }
            _ = &mut stop => {
                summary.interrupted = true;
                break;
            }
        }
    }
    pb.finish_and_clear();
    // Dropping the feeder drops the request futures still running, which cancels their
    // sequences in the engine (the server's disconnect path).
    drop(feeder);
    drop(done_rx);
    drop(app);
    running.stop();
    let _ = reader.join();
    summary.seconds = started.elapsed().as_secs_f64();
    if let Some(e) = failure {
        return Err(e);
    }
    let partial = partial_path(&job.output);
    out.sync_all()
        .map_err(|e| RtError::Batch(format!("{}: {e}", partial.display())))?;
    if next == total {
        std::fs::rename(&partial, &job.output).map_err(|e| {
            RtError::Batch(format!(
                "renaming {} to {}: {e}",
                partial.display(),
                job.output.display()
            ))
        })?;
        if let Some(dir) = job.output.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename itself survives a power cut only once the directory is synced.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
    } else {
        summary.interrupted = true;
    }
    Ok(summary)
}

/// Read the input's requests after the first `skip`, in order, onto `tx`.
fn read_requests(input: &Path, skip: usize, tx: &mpsc::Sender<Result<Pending>>) {
    let send_err = |m: String| {
        let _ = tx.blocking_send(Err(RtError::Batch(m)));
    };
    let file = match File::open(input) {
        Ok(f) => f,
        Err(e) => return send_err(format!("{}: {e}", input.display())),
    };
    let mut index = 0usize;
    for line in BufReader::new(file).split(b'\n') {
        let line = match line {
            Ok(l) => l,
            Err(e) => return send_err(format!("{}: {e}", input.display())),
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if index >= skip {
            // `scan` accepted every line; a file changed since then is an error, not a panic.
            let parsed = std::str::from_utf8(&line)
                .ok()
                .and_then(|t| serde_json::from_str::<InputLine>(t).ok());
            let Some(p) = parsed else {
                return send_err(format!("{}: changed while the batch ran", input.display()));
            };
            let pending = Pending {
                index,
                custom_id: p.custom_id,
                url: p.url,
                body: p.body.get().as_bytes().to_vec(),
            };
            if tx.blocking_send(Ok(pending)).is_err() {
                return; // the run stopped
            }
        }
        index += 1;
    }
}

/// Run one request through the router and make its output line.
async fn execute(app: axum::Router, p: Pending) -> Finished {
    let request = Request::builder()
        .method("POST")
        .uri(&p.url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(p.body))
        .expect("a POST with a static header is a valid request");
    let response = match app.oneshot(request).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let status = response.status().as_u16();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let raw = RawValue::from_string(String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON"));
    let error = (status != 200).then(|| {
        let e = &body["error"];
        ErrorData {
            code: e["code"]
                .as_str()
                .or(e["type"].as_str())
                .unwrap_or("server_error")
                .to_string(),
            message: e["message"].as_str().unwrap_or("the request failed").to_string(),
        }
    });
    let usage = &body["usage"];
    let request_id = body["id"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| super::openai::request_id("req"));
    let line = serde_json::to_string(&OutputLine {
        id: super::openai::request_id("batch_req"),
        custom_id: &p.custom_id,
        response: ResponseData {
            status_code: status,
            request_id,
            body: &raw,
        },
        error,
    })
    .expect("an output line serialises");
    Finished {
        index: p.index,
        line,
        ok: status == 200,
        prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0),
        completion_tokens: usage["completion_tokens"].as_u64().unwrap_or(0),
    }
}

fn progress_bar(show: bool, total: u64, done: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} requests  {msg}  ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    pb.set_position(done);
    pb
}

fn rate(s: &BatchSummary, started: Instant) -> String {
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    format!(
        "{:.1} tokens/s, {} failed",
        s.completion_tokens as f64 / secs,
        s.failed
    )
}
