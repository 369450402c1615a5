#!/usr/bin/env bash
# GPU check of the trainer (issue 3): `kosmos-train fit --device cuda` against the GPU machine's
# torch libs, the tiny default recipe trained and evaluated there, and step time of the Rust trainer
# vs scripts/bench/train_step_torch.py (PyTorch eager, same model/optimiser/batch shape) for the
# tiny preset and the full kosmos-1 preset.
#
# Prepare here (x86-64 build), then run on the GPU machine from the repo root:
#   cargo build --release -p kosmos-train && mkdir -p .device/py && cp target/release/kosmos-train .device/
#   cp -r .venv/lib/python3*/site-packages/{torchscale,flamingo_pytorch,einops_exts,fairscale} .device/py/
#   scripts/bench/gpu_fit.sh            # results in $OUT (default /tmp/gpu_fit)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_fit}
mkdir -p "$OUT"
BIN=${BIN:-.device/kosmos-train}
TORCH_LIB=$(python3 -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')
export LD_LIBRARY_PATH=$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONPATH=$PWD/.device/py PYTHONUNBUFFERED=1 RUST_LOG=${RUST_LOG:-info}
W=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch;print("torch", torch.__version__)'

summary() {  # median step time of a Rust run's metrics.jsonl, first 5 steps left out
  python3 - "$1" "$2" <<'PY'
import json, statistics, sys
m = [json.loads(l) for l in open(sys.argv[2])][5:]
s = sorted(x["step_s"] for x in m)
print(json.dumps({"impl": "kosmos-train (tch)", "run": sys.argv[1], "steps": len(m),
    "step_s_median": statistics.median(s), "step_s_p90": s[int(0.9 * len(s))],
    "data_wait_s_median": statistics.median(x["data_wait_s"] for x in m),
    "images_mean": statistics.mean(x["images"] for x in m),
    "tokens_mean": statistics.mean(x["tokens"] for x in m), "last_loss": m[-1]["loss"]}))
PY
}

echo "== tiny: default recipe on cuda"
t0=$SECONDS
"$BIN" fit --preset tiny --data synthetic:shapes --device cuda -o "$W/tiny" --quiet
echo "tiny fit wall $((SECONDS - t0)) s"
cp "$W/tiny/metrics.jsonl" "$OUT/tiny_metrics.jsonl"
summary tiny "$W/tiny/metrics.jsonl" | tee "$OUT/tiny_tch.json"
"$BIN" data synth --task shapes --split test --count 200 -o "$W/capt" >/dev/null
"$BIN" data synth --task shapes-vqa --split test --count 200 -o "$W/vqa" >/dev/null
"$BIN" eval "$W/tiny" --data "$W/capt/manifest.jsonl" --json --device cuda | tee "$OUT/tiny_eval_captions.json"
"$BIN" eval "$W/tiny" --data "$W/vqa/manifest.jsonl" --json --device cuda | tee "$OUT/tiny_eval_vqa.json"
"$BIN" preset tiny >"$W/tiny.json"
IMG=$(python3 -c "import json;print(round(json.load(open('$OUT/tiny_tch.json'))['images_mean']))")
python3 scripts/bench/train_step_torch.py --config "$W/tiny.json" --batch-size 24 --max-len 48 \
  --images "$IMG" --steps 200 | tee "$OUT/tiny_torch.json"

echo "== kosmos-1 (1.67 B): batch 8 x 512, CLIP frozen except its last layer"
"$BIN" fit --preset kosmos-1 --data synthetic:shapes --device cuda -o "$W/k1" --steps 100000 \
  --batch-size 8 --max-len 512 --save-every 0 --quiet &
pid=$!
for _ in $(seq 300); do
  n=$(wc -l <"$W/k1/metrics.jsonl" 2>/dev/null || echo 0)
  [ "$n" -ge 30 ] && break
  kill -0 $pid 2>/dev/null || break
  sleep 1
done
kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
cp "$W/k1/metrics.jsonl" "$OUT/k1_metrics.jsonl"
summary kosmos-1 "$W/k1/metrics.jsonl" | tee "$OUT/k1_tch.json"
"$BIN" preset kosmos-1 >"$W/k1.json"
IMG=$(python3 -c "import json;print(round(json.load(open('$OUT/k1_tch.json'))['images_mean']))")
python3 scripts/bench/train_step_torch.py --config "$W/k1.json" --batch-size 8 --max-len 512 \
  --images "$IMG" --freeze-vision except-last --steps 20 | tee "$OUT/k1_torch.json"
