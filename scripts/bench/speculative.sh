#!/usr/bin/env bash
# Prompt-lookup speculative decoding against plain decoding (not part of scripts/test.sh).
#  1. `kosmos-rt bench --batch 1` (image + prompt, `</s>` ignored), alternating plain and
#     --speculative-tokens K for ROUNDS rounds: median decode tokens/s of each, the median of the
#     per-round ratios, and the share of guesses kept;
#  2. `kosmos-rt serve --max-batch 8` with and without --speculative-tokens K:
#     scripts/bench/serve_streams.py at 1 and 4 streams (steady decode tokens/s).
# Acceptance depends on the model and the text: a random-weight model repeats itself, which is
# the best case; say which model the figures come from.
#
#   scripts/bench/speculative.sh PKG [K] [ROUNDS] [NEW_TOKENS]
#   SPEC_FLAGS='--speculative-schedule fixed' scripts/bench/speculative.sh PKG 4   # other settings
set -euo pipefail
pkg="${1:?usage: speculative.sh PKG [K] [ROUNDS] [NEW_TOKENS]}"
k="${2:-4}"
rounds="${3:-3}"
new="${4:-64}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
rt="${KOSMOS_RT:-$root/target/release/kosmos-rt}"
py="${KOSMOS_VENV:-$root/.venv}/bin/python"
port="${PORT:-18766}"
work="$(mktemp -d)"
trap 'kill "${pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT

echo "== kosmos-rt bench --batch 1 --new-tokens $new, plain vs --speculative-tokens $k ($rounds rounds)"
for r in $(seq "$rounds"); do
  "$rt" bench "$pkg" --batch 1 --new-tokens "$new" --runs 2 --json >"$work/plain.$r.json"
  "$rt" bench "$pkg" --batch 1 --new-tokens "$new" --runs 2 --json --speculative-tokens "$k" ${SPEC_FLAGS:-} >"$work/spec.$r.json"
done
"$py" - "$work" "$rounds" <<'EOF'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
load = lambda kind, r: json.load(open(f"{work}/{kind}.{r}.json"))
plain = [load("plain", r)["tokens_per_s"]["1"] for r in range(1, rounds + 1)]
spec = [load("spec", r) for r in range(1, rounds + 1)]
fast = [s["tokens_per_s"]["1"] for s in spec]
print(f"plain        {statistics.median(plain):.2f} tokens/s decode (runs {', '.join(f'{x:.2f}' for x in plain)})")
print(f"speculating  {statistics.median(fast):.2f} tokens/s decode (runs {', '.join(f'{x:.2f}' for x in fast)})")
print(f"ratio        {statistics.median(f / p for f, p in zip(fast, plain)):.2f}x (median of rounds)")
print(f"kept         {statistics.median(s['acceptance'] or 0 for s in spec):.0%} of guesses, "
      f"{statistics.median(s['tokens_per_call'] for s in spec):.2f} tokens per decode call")
EOF

img="$work/img.png"
"$py" -c "
from PIL import Image, ImageDraw
im = Image.new('RGB', (224, 224), (240, 240, 240))
ImageDraw.Draw(im).ellipse((40, 60, 120, 140), fill=(200, 30, 30))
im.save('$img')"
for mode in plain speculative; do
  flags=(--max-batch 8 --port "$port")
  # shellcheck disable=SC2206 # SPEC_FLAGS holds separate flags
  [[ $mode == speculative ]] && flags+=(--speculative-tokens "$k" ${SPEC_FLAGS:-})
  "$rt" serve "$pkg" "${flags[@]}" >"$work/serve.log" 2>&1 &
  pid=$!
  until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do sleep 0.5; done
  echo "== serve, $mode"
  "$py" "$root/scripts/bench/serve_streams.py" --base-url "http://127.0.0.1:$port" \
    --model "$(basename "$pkg")" --image "$img" --streams 1 --streams 4 --max-tokens "$new" --runs 2
  curl -s "http://127.0.0.1:$port/metrics" | grep '^kosmos_spec_decode' || true
  kill "$pid"
  wait "$pid" 2>/dev/null || true
done
