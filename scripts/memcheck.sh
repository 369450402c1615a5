#!/usr/bin/env bash
# Valgrind memcheck of the C ABI: builds libkosmos_rt.so and the C++ examples, exports a tiny
# random-weight package, and runs `caption`, `caption_c` (the same in C, with the tokenizer),
# `abi_errors` (every failure path) and `engine`
# (concurrent requests, cancellation, freeing with requests in flight) under valgrind. Fails on
# any invalid read/write or on memory definitely lost in our library.
# Not part of scripts/test.sh (slow); run it after changing runtime/src/ffi.rs.
#
#   scripts/memcheck.sh            # logs in target/memcheck/
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh >/dev/null
out="$root/target/memcheck"
rm -rf "$out" && mkdir -p "$out"
cargo build --release -p kosmos-rt --lib -p kosmos-export -p kosmos-train --bins
target/release/kosmos-train init --preset tiny -o "$out/ckpt" >/dev/null
target/release/kosmos-export "$out/ckpt" -o "$out/pkg" --quiet >/dev/null
target/release/kosmos-export "$out/ckpt" -o "$out/pkgbuf" --kv-cache buffer --quiet >/dev/null
target/release/kosmos-train data synth --task shapes --split test --count 1 -o "$out/img" >/dev/null
image=$(ls "$out"/img/*.png | head -1)
echo "not an image" >"$out/notes.txt"
.venv/bin/cmake -S runtime/examples/cpp -B "$out/build" -DKOSMOS_RT_LIB_DIR="$root/target/release" >/dev/null
.venv/bin/cmake --build "$out/build" >/dev/null
export ORT_DYLIB_PATH="$root/.deps/libonnxruntime.so"
status=0
for prog in "caption $out/pkg $image '' 8" "caption_c $out/pkg $image 8" "abi_errors $out/pkg $out/notes.txt" \
  "engine $out/pkgbuf $image 6 '<image>' 'a red circle' '' '<image> Question: what colour is it? Answer:'"; do
  name=${prog%% *}
  echo "== valgrind $name"
  # scripts/valgrind.supp names known third-party reports (glibc's loader, ONNX Runtime's
  # start-up). A remaining error fails when its stack passes through this project's code
  # (libkosmos_rt or the example); errors wholly inside ONNX Runtime's own threads are listed.
  eval valgrind --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite --num-callers=30 \
    --suppressions="$root/scripts/valgrind.supp" --log-file="$out/$name.valgrind" \
    "$out/build/$prog" >"$out/$name.stdout" 2>"$out/$name.stderr" || { status=1; echo "$name exited non-zero"; }
  grep -E "ERROR SUMMARY|definitely lost" "$out/$name.valgrind" || true
  # Only the faulting access's own stack counts (not where the memory was allocated or freed).
  ours=$(awk '/^==[0-9]+== (Invalid|Conditional|Use of|Syscall|Source and)/{blk=1; buf=""}
              /Address 0x|Block was|Uninitialised value was/{if (blk && buf ~ /kosmos|'"$name"'/) n++; blk=0}
              blk{buf=buf"\n"$0}
              /^==[0-9]+== $/{if (blk && buf ~ /kosmos|'"$name"'/) n++; blk=0}
              END{print n+0}' "$out/$name.valgrind")
  if [ "$ours" != 0 ]; then
    echo "$ours memory errors through this project's code: see $out/$name.valgrind"; status=1
  fi
  if ! grep -q "definitely lost: 0 bytes" "$out/$name.valgrind" && grep -q "definitely lost" "$out/$name.valgrind"; then
    if awk '/definitely lost in/,/^==[0-9]+== $/' "$out/$name.valgrind" | grep -q kosmos; then
      echo "definite leak through libkosmos_rt: see $out/$name.valgrind"; status=1
    fi
  fi
done
tail -qn 1 "$out/abi_errors.stdout" "$out/engine.stdout"
exit $status
