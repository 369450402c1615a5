#!/usr/bin/env bash
# Every test, from nothing: set-up (idempotent), formatting, lints, then the whole workspace's
# tests (the parity tests run the Python reference modules from .venv).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/setup.sh

# CI builds once from a clean clone, where incremental caches only take disk (CI's disk is small:
# one run ran out of it). Set CARGO_INCREMENTAL=1 to keep them between local runs.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step() { printf '\n== %s ==\n' "$*" >&2; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "ruff (python/)"
.venv/bin/ruff check python
.venv/bin/ruff format --check python

step "cargo test"
cargo test --workspace --locked --no-fail-fast
