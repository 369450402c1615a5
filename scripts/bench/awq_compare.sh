#!/usr/bin/env bash
# Round-to-nearest vs activation-aware (--awq) quantisation of one checkpoint, judged against the
# checkpoint itself on held-out examples: `verify --data` (top-1 agreement, KL divergence) for
# both packages, and `kosmos-rt eval` (loss, exact match) when a manifest is given.
#
#   scripts/bench/awq_compare.sh CKPT [CALIBRATION_SPEC] [HELD_OUT_SPEC] [EVAL_MANIFEST]
#   scripts/bench/awq_compare.sh runs/tiny synthetic:shapes synthetic:shapes data/test/manifest.jsonl
#
# Calibration draws `synthetic:*`'s training split, verify its test split. Settings by
# environment: BITS (int4), BLOCK (32), DTYPE (fp32), EXAMPLES (held-out rows, 32),
# AWQ_EXAMPLES (64), PROFILE (release|debug, release), OUT (a new temporary directory).
set -euo pipefail
ckpt=${1:?usage: awq_compare.sh CKPT [CALIBRATION_SPEC] [HELD_OUT_SPEC] [EVAL_MANIFEST]}
calibration=${2:-synthetic:shapes}
held_out=${3:-$calibration}
manifest=${4:-}
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
profile=${PROFILE:-release}
out=${OUT:-$(mktemp -d)}
cd "$root"
flag=$([ "$profile" = release ] && echo --release || true)
cargo build --locked $flag -p kosmos-export -p kosmos-rt >&2
bin=target/$profile
quant=(--kv-cache buffer --quantize "${BITS:-int4}" --quant-block-size "${BLOCK:-32}" --dtype "${DTYPE:-fp32}" --quiet --force)

for method in rtn awq; do
  extra=()
  [ "$method" = awq ] && extra=(--awq "$calibration" --awq-examples "${AWQ_EXAMPLES:-64}")
  start=$(date +%s%N)
  "$bin/kosmos-export" "$ckpt" -o "$out/$method" "${quant[@]}" "${extra[@]}" >&2
  ms=$((($(date +%s%N) - start) / 1000000))
  # verify exits 2 below its top-1 threshold; the figures are what this script reports.
  report=$("$bin/kosmos-export" verify "$ckpt" "$out/$method" --data "$held_out" \
    --examples "${EXAMPLES:-32}" --tolerance 0 --json)
  eval_json=null
  [ -n "$manifest" ] && eval_json=$("$bin/kosmos-rt" eval "$out/$method" --data "$manifest" --json)
  python3 - "$method" "$ms" "$report" "$eval_json" <<'PY'
import json, sys
method, ms, report, ev = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
row = {"method": method, "export_s": round(ms / 1000, 1), "positions": report["positions"],
       "top1_agreement": report["top1_agreement"], "mean_kl": report["mean_kl_divergence"],
       "max_kl": report["max_kl_divergence"]}
if ev:
    row.update(eval_loss=ev["loss"], eval_exact_match=ev["exact_match"])
print(json.dumps(row))
PY
done
echo "packages in $out" >&2
