#!/usr/bin/env bash
# KV cache types at long contexts (not part of scripts/test.sh): float32 against float16 and
# int8. Exports CKPT once per `--kv-cache-dtype` in KV_DTYPES (default `fp32 fp16 int8`) with
# `--kv-cache buffer --cached-attention` plus EXPORT_FLAGS (default `--quantize int4`, where the
# cache is most of what a long-context step reads), then alternates `kosmos-rt bench` on them for
# ROUNDS rounds (prompt of WORDS words after an image, NEW tokens, batch sizes BATCHES): median
# decode tokens/s of each by batch, the median of the per-round ratios to the first type, time to
# first token and peak RSS. KV_BENCH_DIR keeps the exports between runs.
#
#   scripts/bench/kv_cache_dtype.sh CKPT [WORDS] [ROUNDS] [NEW] [BATCHES]
#   EXPORT_FLAGS='--packed-linears' KV_DTYPES='fp32 int8' scripts/bench/kv_cache_dtype.sh runs/k1 1200 2 32 '1 4'
set -euo pipefail
ckpt="${1:?usage: kv_cache_dtype.sh CKPT [WORDS] [ROUNDS] [NEW] [BATCHES]}"
words="${2:-1200}"
rounds="${3:-2}"
new="${4:-32}"
batches="${5:-1 4}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
rt="${KOSMOS_RT:-$root/target/release/kosmos-rt}"
ke="${KOSMOS_EXPORT:-$root/target/release/kosmos-export}"
py="${KOSMOS_VENV:-$root/.venv}/bin/python"
work="${KV_BENCH_DIR:-$(mktemp -d)}"
# shellcheck disable=SC2206 # EXPORT_FLAGS holds separate flags
flags=(--kv-cache buffer --cached-attention ${EXPORT_FLAGS:---quantize int4} --quiet)
read -r -a kv_dtypes <<<"${KV_DTYPES:-fp32 fp16 int8}"

for kv in "${kv_dtypes[@]}"; do
  [[ -d "$work/kv-$kv" ]] || "$ke" "$ckpt" -o "$work/kv-$kv" "${flags[@]}" --kv-cache-dtype "$kv"
done
batch_args=()
for b in $batches; do batch_args+=(--batch "$b"); done
echo "== kosmos-rt bench, $words prompt words, $new new tokens, batches $batches, $rounds rounds, KV ${kv_dtypes[*]}"
for r in $(seq "$rounds"); do
  for kv in "${kv_dtypes[@]}"; do
    "$rt" bench "$work/kv-$kv" --prompt-words "$words" --new-tokens "$new" --runs 1 \
      "${batch_args[@]}" --json >"$work/$kv.$r.json"
  done
done
"$py" - "$work" "$rounds" "${kv_dtypes[@]}" <<'PY'
import json, statistics, sys
work, rounds, kinds = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
runs = {kv: [json.load(open(f"{work}/{kv}.{r}.json")) for r in range(1, rounds + 1)] for kv in kinds}
base = kinds[0]
print(f"prompt tokens {runs[base][0]['prompt_tokens']}")
for b in runs[base][0]["tokens_per_s"]:
    tps = {kv: [r["tokens_per_s"][b] for r in rs] for kv, rs in runs.items()}
    cells = []
    for kv in kinds:
        ratio = statistics.median(x / y for x, y in zip(tps[kv], tps[base]))
        each = ", ".join(f"{x:.2f}" for x in tps[kv])
        cells.append(f"{kv} KV {statistics.median(tps[kv]):.2f} ({each}) {ratio:.2f}x")
    print(f"batch {b}: decode tokens/s " + "; ".join(cells))
for kv, rs in runs.items():
    print(f"{kv} KV: ttft {statistics.median(r['ttft_ms'] for r in rs):.0f} ms, "
          f"decode step {statistics.median(r['decode_ms_median'] for r in rs):.1f} ms at batch {rs[0]['latency_batch']}, "
          f"peak RSS {max(r['peak_rss_mb'] for r in rs):.0f} MB")
PY
