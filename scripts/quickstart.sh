#!/usr/bin/env bash
# The main job on the built-in default, from nothing: set up, train the tiny KOSMOS-1 on the
# built-in synthetic task (shape captions + VQA), export it to ONNX, and caption / answer
# held-out images through kosmos-rt (ONNX Runtime), printing accuracy next to the trainer's own
# (and an int4-quantised package's), then ask the server through the openai client and run the
# held-out questions as an offline batch file and from Python.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/setup.sh
# As scripts/test.sh builds (no incremental caches), so the two share their build.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo build --locked -p kosmos-train -p kosmos-export -p kosmos-rt

out="${KOSMOS_QUICKSTART_DIR:-runs/quickstart}"
train=target/debug/kosmos-train
export_bin=target/debug/kosmos-export
rt=target/debug/kosmos-rt
mkdir -p "$out"

echo "== training the tiny model on synthetic:shapes (tiny preset's default recipe) =="
$train fit --preset tiny --data synthetic:shapes -o "$out/tiny" --force

echo "== exporting to ONNX (KV cache as preallocated buffers that kosmos-rt updates in place) =="
$export_bin "$out/tiny" --to onnx --kv-cache buffer -o "$out/tiny-onnx" --force
$export_bin verify "$out/tiny" "$out/tiny-onnx" --steps 8

echo "== held-out test sets =="
$train data synth --task shapes --split test --count 200 -o "$out/test-captions" --force
$train data synth --task shapes-vqa --split test --count 200 -o "$out/test-vqa" --force

echo "== a few held-out images captioned by kosmos-rt =="
for i in 000000 000001 000002; do
  printf '%s: %s\n' "$out/test-captions/$i.png" "$($rt run "$out/tiny-onnx" --image "$out/test-captions/$i.png")"
done
q=$(head -1 "$out/test-vqa/manifest.jsonl" | sed -E 's/.*"prompt": *"([^"]*)".*/\1/')
printf '%s %s\n' "$q" "$($rt run "$out/tiny-onnx" --image "$out/test-vqa/000000.png" --prompt "$q")"

echo "== int4 package: the decoder's linears quantised to 4 bits (ONNX Runtime's MatMulNBits) =="
$export_bin "$out/tiny" --kv-cache buffer --quantize int4 -o "$out/tiny-int4" --force --quiet

echo "== accuracy (greedy exact match) and loss: trainer (tch) vs exported package vs int4 package =="
for set in test-captions test-vqa; do
  echo "-- $set"
  $train eval "$out/tiny" --data "$out/$set/manifest.jsonl"
  printf 'package:      '; $rt eval "$out/tiny-onnx" --data "$out/$set/manifest.jsonl"
  printf 'int4 package: '; $rt eval "$out/tiny-int4" --data "$out/$set/manifest.jsonl"
done

echo "== the package behind the OpenAI-compatible server, asked through the openai client =="
$rt serve "$out/tiny-onnx" --port 0 > "$out/serve.out" 2> "$out/serve.log" &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 300); do grep -q '^listening on ' "$out/serve.out" && break; sleep 0.1; done
url=$(sed -n 's/^listening on //p' "$out/serve.out")
.venv/bin/python - "$url" "$out/test-vqa/000000.png" "$q" <<'PY'
import base64, sys
import openai
url, image, question = sys.argv[1:]
client = openai.OpenAI(base_url=url + "/v1", api_key="none")
data = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
r = client.chat.completions.create(
    model="tiny-onnx", temperature=0, max_tokens=8,
    messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data}},
        {"type": "text", "text": question}]}])
print(f"{url}: {question} {r.choices[0].message.content.strip()}  ({r.usage.total_tokens} tokens)")
PY
kill -TERM "$server" && wait "$server"
trap - EXIT

echo "== offline: the 200 held-out questions as an OpenAI Batch API file through kosmos-rt batch =="
.venv/bin/python - "$out" <<'PY'
import json, os, sys
out = os.path.abspath(sys.argv[1])
with open(f"{out}/test-vqa/manifest.jsonl") as m, open(f"{out}/batch-requests.jsonl", "w") as f:
    for i, line in enumerate(m):
        item = json.loads(line)
        content = [{"type": "image_url", "image_url": {"url": f"file://{out}/test-vqa/{item['image']}"}},
                   {"type": "text", "text": item["prompt"]}]
        body = {"model": "tiny-onnx", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": content}]}
        f.write(json.dumps({"custom_id": f"vqa-{i}", "method": "POST", "url": "/v1/chat/completions",
                            "body": body}) + "\n")
PY
$rt batch "$out/tiny-onnx" -i "$out/batch-requests.jsonl" -o "$out/batch-results.jsonl" \
  --allow-file-root "$out" --force --quiet
.venv/bin/python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
answers = [json.loads(l)["text"] for l in open(f"{out}/test-vqa/manifest.jsonl")]
results = [json.loads(l) for l in open(f"{out}/batch-results.jsonl")]
right = sum(r["response"]["body"]["choices"][0]["message"]["content"].strip() == a.strip()
            for r, a in zip(results, answers))
print(f"batch: exact match {100 * right / len(answers):.1f}% ({right}/{len(answers)}), in {out}/batch-results.jsonl")
PY

echo "== the same questions from Python: kosmos_rt.Engine (python/, ctypes over libkosmos_rt.so) =="
KOSMOS_RT_LIB="$root/target/debug/libkosmos_rt.so" PYTHONPATH="$root/python" .venv/bin/python - "$out" <<'PY'
import json, sys
import kosmos_rt
out = sys.argv[1]
items = [json.loads(l) for l in open(f"{out}/test-vqa/manifest.jsonl")]
with kosmos_rt.Engine(f"{out}/tiny-onnx", max_batch=8) as engine:
    requests = [engine.submit_chat([{"role": "user", "content": [
                    {"type": "image", "image": f"{out}/test-vqa/{item['image']}"},
                    {"type": "text", "text": item["prompt"]}]}], max_tokens=8)
                for item in items]
    right = sum(r.result().text.strip() == item["text"].strip() for r, item in zip(requests, items))
print(f"python: exact match {100 * right / len(items):.1f}% ({right}/{len(items)})")
PY

echo
echo "checkpoint: $out/tiny (loss curve: $out/tiny/loss.png), package: $out/tiny-onnx"
echo "serve it: $rt serve $out/tiny-onnx   (OpenAI-compatible, http://127.0.0.1:8000/v1)"
