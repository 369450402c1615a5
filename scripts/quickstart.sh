#!/usr/bin/env bash
# The main job on the built-in default (tiny model), from nothing.
# Today it sets up, builds, initialises a tiny KOSMOS-1 checkpoint and loads it back; training on
# the synthetic task, export to ONNX and captioning through kosmos-rt join as those land.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/setup.sh
cargo build --locked -p kosmos-train

out="${KOSMOS_QUICKSTART_DIR:-runs/quickstart}"
bin=target/debug/kosmos-train
$bin init --preset tiny --seed 0 -o "$out/init" --force
$bin info "$out/init"
echo
echo "Initialised checkpoint: $out/init"
echo "(training, export and captioning are not in this toolchain yet: see README 'Status')"
