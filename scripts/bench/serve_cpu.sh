#!/usr/bin/env bash
# The serving benchmark of issue 6 from nothing: a random-weight full-size kosmos-1 checkpoint, its
# CPU serving package (buffer KV layout, packed decoder linears, cached attention),
# `kosmos-rt serve --max-batch 8`,
# and scripts/bench/serve_streams.py with 1 and 8 concurrent streams. Not part of scripts/test.sh:
# it needs ~20 GB of disk, ~8 GB of RAM and about 10 minutes on 2 cores.
#
#   scripts/bench/serve_cpu.sh                      # packed linears + cached attention (CPU serving)
#   PACKED=0 scripts/bench/serve_cpu.sh             # ONNX Runtime MatMul, for comparison
#   CACHED=0 scripts/bench/serve_cpu.sh             # standard-op attention over the whole buffer
#   WORK=/data/k1 RUNS=8 scripts/bench/serve_cpu.sh
#
# Nothing else should run meanwhile: one stream is memory-bound, and this VM's bandwidth already
# drifts by ±20–30 % from minute to minute. Quote the median of the per-round ratios it prints.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-/tmp/kosmos-serve-bench}
RUNS=${RUNS:-5}
PORT=${PORT:-8011}
PACKED=${PACKED:-1}
CACHED=${CACHED:-1}
mkdir -p "$WORK"

[ -x .venv/bin/python ] || scripts/setup.sh
cargo build --release -p kosmos-train -p kosmos-export -p kosmos-rt
bin=target/release

[ -f "$WORK/ckpt/model.safetensors" ] || "$bin/kosmos-train" init --preset kosmos-1 -o "$WORK/ckpt"
pkg="$WORK/k1-buffer"
flags=(--kv-cache buffer)
if [ "$PACKED" = 1 ]; then
  pkg="$WORK/k1-packed"
  flags+=(--packed-linears)
fi
if [ "$CACHED" = 1 ]; then
  pkg="$pkg-cached"
  flags+=(--cached-attention)
fi
[ -f "$pkg/kosmos_rt.json" ] || "$bin/kosmos-export" "$WORK/ckpt" -o "$pkg" "${flags[@]}" --quiet

# One image for every request (any PNG works; this one is a synthetic shapes picture).
img="$WORK/img.png"
if [ ! -f "$img" ]; then
  "$bin/kosmos-train" data synth --task shapes --split test --count 1 -o "$WORK/img" >/dev/null
  cp "$(ls "$WORK"/img/*.png | head -1)" "$img"
fi

"$bin/kosmos-rt" serve "$pkg" --port "$PORT" --max-batch 8 >"$WORK/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $server 2>/dev/null || { cat "$WORK/serve.log"; exit 1; }
  sleep 1
done
.venv/bin/python scripts/bench/serve_streams.py --base-url "http://127.0.0.1:$PORT" \
  --model "$(basename "$pkg")" --image "$img" --streams 1 --streams 8 --max-tokens 64 --runs "$RUNS"
