#!/usr/bin/env bash
# Priority preemption on a full server (not part of scripts/test.sh): one row (--max-batch 1)
# decodes a long request of priority 10 when an urgent one (priority -1) arrives. Prints each
# request's wall time, with preemption (the default) and with --no-priority-preemption, and
# the server's kosmos_preemptions_total.
#
#   scripts/bench/priority_preemption.sh PKG [LONG_TOKENS] [URGENT_TOKENS] [DELAY_S]
set -euo pipefail
pkg="${1:?usage: priority_preemption.sh PKG [LONG_TOKENS] [URGENT_TOKENS] [DELAY_S]}"
long="${2:-96}"
urgent="${3:-8}"
delay="${4:-2}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
rt="${KOSMOS_RT:-$root/target/release/kosmos-rt}"
port="${PORT:-18765}"
log="$(mktemp)"
trap 'kill "${pid:-}" 2>/dev/null || true; rm -f "$log"' EXIT

body() { # priority max_tokens prompt
  printf '{"prompt": "%s", "max_tokens": %s, "ignore_eos": true, "temperature": 0, "priority": %s}' "$3" "$2" "$1"
}
request() { # priority max_tokens prompt -> seconds
  curl -s -o /dev/null -w '%{time_total}' "http://127.0.0.1:$port/v1/completions" \
    -H 'Content-Type: application/json' -d "$(body "$@")"
}

for mode in preemption no-preemption; do
  flags=(--max-batch 1 --port "$port")
  [[ $mode == no-preemption ]] && flags+=(--no-priority-preemption)
  "$rt" serve "$pkg" "${flags[@]}" >"$log" 2>&1 &
  pid=$!
  until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do sleep 0.5; done
  request 0 4 "warm up" >/dev/null
  request 10 "$long" "a red circle on the left and a blue square on the right and" >"$log.long" &
  long_pid=$!
  sleep "$delay"
  t_urgent="$(request -1 "$urgent" "Question: what colour is the circle? Answer:")"
  wait "$long_pid"
  t_long="$(cat "$log.long")"
  preemptions="$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^kosmos_preemptions_total/ {print $2}')"
  printf '%-14s urgent (%s tokens, sent %ss in): %6.2f s   long (%s tokens): %6.2f s   preemptions: %s\n' \
    "$mode" "$urgent" "$delay" "$t_urgent" "$long" "$t_long" "$preemptions"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  rm -f "$log.long"
done
