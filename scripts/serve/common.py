"""Shared helpers of the `kosmos-rt serve` checks: data URLs, the `kosmos-rt run` reference,
Prometheus text parsing, and the server's resident memory."""

import argparse
import base64
import re
import subprocess


def data_url(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def run_reference(binary, package, prompt="", images=(), max_tokens=16, extra=()):
    """Greedy output of `kosmos-rt run` (the single-request path, no server, no batching), with
    `extra` command-line options."""
    cmd = [binary, "run", package, "--prompt", prompt, "--max-tokens", str(max_tokens), *extra]
    for img in images:
        cmd += ["--image", img]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def parse_metrics(text):
    """{(name, frozenset(labels.items())): value} of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
        assert m, f"unparsable metrics line: {line!r}"
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        out[(m.group(1), frozenset(labels.items()))] = float(m.group(3))
    return out


def metric_sum(metrics, name, **labels):
    return sum(
        v
        for (n, ls), v in metrics.items()
        if n == name and all((k, val) in ls for k, val in labels.items())
    )


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def checker(failures):
    """`check(what, got, want)`: prints the comparison, and records `what` in `failures` when
    they differ."""

    def check(what, got, want):
        status = "ok" if got == want else "MISMATCH"
        print(f"{status:8} {what}: server={got!r} want={want!r}")
        if got != want:
            failures.append(what)

    return check


def client_args(description):
    """The arguments of the client checks that compare the server with `kosmos-rt run`."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--package", required=True)
    ap.add_argument("--image", action="append", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--api-key", default="unused")
    return ap.parse_args()
