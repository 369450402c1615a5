"""The ai.kosmos CUDA kernels (ctypes) against the unfused PyTorch ops on the GPU: agreement
(fp32 abs, fp16 relative) and time per call (CUDA events, median of 50 after warm-up), at
KOSMOS-1 decode and prefill shapes. Run by scripts/bench/cuda_kernels.sh."""

import argparse
import ctypes
import json
import statistics

import torch

THETA, BASE, CENTRE = 10000.0, 512.0, 1024.0


def xpos_torch(x, pos, down):
    d = x.shape[-1]
    half = d // 2
    inv = 1.0 / THETA ** (torch.arange(half, device=x.device, dtype=torch.float32) / half)
    zeta = (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) + 0.4 * d) / (1.4 * d)
    p = pos.float().unsqueeze(-1)
    ang = p * inv
    sc = zeta ** ((p - CENTRE) / BASE)
    if down:
        sc = 1.0 / sc
    il = lambda t: t.repeat_interleave(2, -1).unsqueeze(1)  # noqa: E731
    cos, sin = il(ang.cos() * sc).to(x.dtype), il(ang.sin() * sc).to(x.dtype)
    x2 = x.reshape(*x.shape[:-1], half, 2)
    rot = torch.stack((-x2[..., 1], x2[..., 0]), -1).flatten(-2)
    return x * cos + rot * sin


def subln_torch(x, g, b):
    return torch.nn.functional.layer_norm(torch.nn.functional.gelu(x), (x.shape[-1],), g, b, 1e-5)


def timed(fn, n=50):
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1000)  # µs
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    a = ap.parse_args()
    lib = ctypes.CDLL(a.lib)
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    stream = lambda: ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)  # noqa: E731
    results = []
    torch.manual_seed(0)
    for dtype, name in [(torch.float32, "f32"), (torch.float16, "f16")]:
        fx = lib.kosmos_xpos_f32 if name == "f32" else lib.kosmos_xpos_f16
        fs = lib.kosmos_subln_gelu_f32 if name == "f32" else lib.kosmos_subln_gelu_f16
        # KOSMOS-1: 32 heads x 64, decode (batch 8, 1 token) and prefill (batch 1, 512 tokens).
        for b, s, start in [(8, 1, 700), (1, 512, 0)]:
            x = torch.randn(b, 32, s, 64, device="cuda", dtype=dtype)
            pos = (torch.arange(s, device="cuda") + start).expand(b, s).contiguous()
            for down in (0, 1):
                y = torch.empty_like(x)
                call = lambda: fx(ptr(x), ptr(pos), ptr(y), b, 32, s, 64, ctypes.c_float(THETA),  # noqa: E731
                                  ctypes.c_float(BASE), ctypes.c_float(CENTRE), down, stream())
                assert call() == 0
                torch.cuda.synchronize()
                ref = xpos_torch(x.float(), pos, down)
                err = (y.float() - ref).abs().max().item()
                rel = err / max(ref.abs().max().item(), 1.0)
                results.append({"op": "XPos", "dtype": name, "shape": [b, 32, s, 64], "keys": bool(down),
                                "max_abs": err, "rel": rel,
                                "fused_us": timed(call), "torch_us": timed(lambda: xpos_torch(x, pos, down))})
        for rows in (8, 512):
            x = torch.randn(rows, 8192, device="cuda", dtype=dtype)
            g = (1 + torch.randn(8192, device="cuda") / 8).to(dtype)
            bt = (torch.randn(8192, device="cuda") / 8).to(dtype)
            y = torch.empty_like(x)
            call = lambda: fs(ptr(x), ptr(g), ptr(bt), ptr(y), rows, 8192, ctypes.c_float(1e-5), stream())  # noqa: E731
            assert call() == 0
            torch.cuda.synchronize()
            ref = subln_torch(x.float(), g.float(), bt.float())
            err = (y.float() - ref).abs().max().item()
            results.append({"op": "SubLnGelu", "dtype": name, "shape": [rows, 8192], "max_abs": err,
                            "rel": err / max(ref.abs().max().item(), 1.0),
                            "fused_us": timed(call), "torch_us": timed(lambda: subln_torch(x, g, bt))})
    ok = True
    for r in results:
        tol_ok = r["max_abs"] <= 1e-4 if r["dtype"] == "f32" else r["rel"] <= 1e-3
        ok &= tol_ok
        r["ok"] = tol_ok
        print(json.dumps(r))
    print("device:", torch.cuda.get_device_name(), "| all within tolerance" if ok else "| FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
