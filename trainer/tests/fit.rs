//! Training: the loss falls; a run killed mid-way and resumed reproduces the uninterrupted loss
//! curve step for step; Ctrl-C saves a checkpoint; eval reports JSON.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kosmos-train"));
    c.env("RUST_LOG", "warn");
    c
}

/// A short tiny run: 16 sequences a step.
fn fit_args(out: &Path, steps: u64) -> Vec<String> {
    [
        "fit",
        "--preset",
        "tiny",
        "--data",
        "synthetic:shapes",
        "--batch-size",
        "8",
        "--warmup",
        "5",
        "--quiet",
        "--device",
        "cpu",
        "--seed",
        "3",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--steps".into(),
        steps.to_string(),
        "-o".into(),
        out.display().to_string(),
    ])
    .collect()
}

fn losses(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

fn run(args: &[String]) -> Output {
    let out = bin().args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn saved_step(dir: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(dir.join("trainer_state/state.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&s).ok()?["step"].as_u64()
}

fn wait_for_step(child: &mut Child, dir: &Path, step: u64) {
    let t0 = Instant::now();
    while saved_step(dir).is_none_or(|s| s < step) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before step {step} was saved"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint at step {step}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn loss_falls_well_below_its_start() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut args = fit_args(&out, 60);
    args.extend(["--lr".into(), "2e-3".into()]);
    run(&args);
    let l = losses(&out);
    assert_eq!(l.len(), 60);
    let first = l[0].1;
    let last5: f64 = l[55..].iter().map(|p| p.1).sum::<f64>() / 5.0;
    assert!(last5 < first * 0.35, "loss {first} -> {last5}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "loss.png",
        "trainer_state/optimizer.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
}

#[test]
fn killed_and_resumed_run_equals_the_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let mut args = fit_args(&straight, 14);
    args.extend(["--save-every".into(), "4".into()]);
    run(&args);

    let broken = tmp.path().join("broken");
    let mut args = fit_args(&broken, 14);
    args.extend(["--save-every".into(), "4".into()]);
    let mut child = bin()
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_step(&mut child, &broken, 4);
    child.kill().unwrap(); // SIGKILL: no chance to save anything more
    child.wait().unwrap();
    let at = saved_step(&broken).unwrap();
    assert!(at < 14, "killed before the end (saved step {at})");

    let mut resume = args.clone();
    resume.push("--resume".into());
    run(&resume);
    let (a, b) = (losses(&straight), losses(&broken));
    assert_eq!(a.len(), 14);
    assert_eq!(a, b, "loss curves differ after resuming from step {at}");
}

#[test]
fn interrupt_saves_a_checkpoint_and_exits_130() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut args = fit_args(&out, 10_000);
    args.extend(["--save-every".into(), "2".into()]);
    let mut child = bin()
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_step(&mut child, &out, 2);
    // SAFETY: sending SIGINT to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let step = saved_step(&out).unwrap();
    assert_eq!(
        losses(&out).len() as u64,
        step,
        "checkpoint taken at the step it stopped"
    );
    assert!(step < 10_000);
}

#[test]
fn resume_refuses_a_different_recipe_and_a_missing_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    run(&fit_args(&out, 2));
    let mut other = fit_args(&out, 4);
    other.extend(["--lr".into(), "0.5".into(), "--resume".into()]);
    let o = bin().args(&other).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot resume exactly"));

    let mut none = fit_args(&tmp.path().join("nothing"), 4);
    none.push("--resume".into());
    let o = bin().args(&none).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("no checkpoint to resume"));
}

#[test]
fn eval_json_reports_loss_and_exact_match() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    run(&fit_args(&out, 2));
    let o = run(&[
        "eval".into(),
        out.display().to_string(),
        "--data".into(),
        "synthetic:shapes-captions".into(),
        "--limit".into(),
        "10".into(),
        "--json".into(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["loss"].as_f64().unwrap() > 0.0);
    let em = v["exact_match"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&em));
    assert_eq!(v["captioned"].as_u64(), Some(10));
}
