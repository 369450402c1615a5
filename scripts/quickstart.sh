#!/usr/bin/env bash
# The main job on the built-in default, from nothing: set up, train the tiny KOSMOS-1 on the
# built-in synthetic task (shape captions + VQA), write the held-out test sets as PNG + JSONL,
# and report greedy exact-match accuracy on them. (Export to ONNX and captioning through kosmos-rt
# join this script when the exporter and runtime land.)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/setup.sh
cargo build --locked -p kosmos-train

out="${KOSMOS_QUICKSTART_DIR:-runs/quickstart}"
bin=target/debug/kosmos-train
mkdir -p "$out"

echo "== training the tiny model on synthetic:shapes (tiny preset's default recipe) =="
$bin fit --preset tiny --data synthetic:shapes -o "$out/tiny" --force

echo "== held-out test sets =="
$bin data synth --task shapes --split test --count 200 -o "$out/test-captions" --force
$bin data synth --task shapes-vqa --split test --count 200 -o "$out/test-vqa" --force

echo "== accuracy (greedy exact match) =="
$bin eval "$out/tiny" --data "$out/test-captions/manifest.jsonl"
$bin eval "$out/tiny" --data "$out/test-vqa/manifest.jsonl"
echo
echo "checkpoint: $out/tiny (loss curve: $out/tiny/loss.png, metrics: $out/tiny/metrics.jsonl)"
