#!/usr/bin/env bash
# Offline batch throughput: the same image-captioning batch file through `kosmos-rt batch` with
# one row (requests one after another) and with several (continuous batching), every request
# generating exactly MAX_TOKENS tokens (ignore_eos), so the work is identical; medians of RUNS.
#
#   scripts/bench/batch_throughput.sh PKG [REQUESTS=32] [MAX_TOKENS=16] [ROWS="1 4 8"] [RUNS=3]
#
# PKG is a --kv-cache buffer package (e.g. a full-size --quantize int4 --cached-attention one).
# Prints one line per row count: wall seconds (median), requests/s and generated tokens/s.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
pkg=${1:?usage: batch_throughput.sh PKG [REQUESTS] [MAX_TOKENS] [ROWS] [RUNS]}
requests=${2:-32}
max_tokens=${3:-16}
rows=${4:-"1 4 8"}
runs=${5:-3}
rt=${RT:-$root/target/release/kosmos-rt}
train=${TRAIN:-$root/target/release/kosmos-train}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
model=$(basename "$(cd "$pkg" && pwd)")

"$train" data synth --task shapes --split test --count "$requests" -o "$work/images" --force >/dev/null
python3 - "$work" "$requests" "$max_tokens" "$model" <<'PY'
import json, sys
work, n, max_tokens, model = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with open(f"{work}/requests.jsonl", "w") as f:
    for i in range(n):
        url = f"file://{work}/images/{i:06d}.png"
        body = {"model": model, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
        f.write(json.dumps({"custom_id": f"img-{i}", "method": "POST",
                            "url": "/v1/chat/completions", "body": body}) + "\n")
PY

for r in $rows; do
  times=()
  for _ in $(seq "$runs"); do
    t0=$(date +%s.%N)
    "$rt" batch "$pkg" -i "$work/requests.jsonl" -o "$work/out.jsonl" --force --quiet \
      --allow-file-root "$work" --max-batch "$r" 2>"$work/log" || { cat "$work/log"; exit 1; }
    t1=$(date +%s.%N)
    grep -q " 0 failed" "$work/log" || { cat "$work/log"; exit 1; }
    times+=("$(python3 -c "print($t1 - $t0)")")
  done
  python3 - "$r" "$requests" "$max_tokens" "${times[@]}" <<'PY'
import statistics, sys
rows, n, tokens = map(int, sys.argv[1:4])
t = statistics.median(map(float, sys.argv[4:]))
runs = " ".join(f"{float(x):.1f}" for x in sys.argv[4:])
print(f"max-batch {rows}: {t:.1f} s (runs {runs}), {n / t:.2f} requests/s, {n * tokens / t:.1f} tokens/s")
PY
done
