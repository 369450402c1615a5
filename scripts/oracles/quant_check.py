#!/usr/bin/env python3
"""Checks a quantised package's weights against ONNX Runtime's own quantiser.

usage: quant_check.py PACKAGE CHECKPOINT

For every com.microsoft::MatMulNBits node of PACKAGE/decoder.onnx, the checkpoint's weight (f32,
or rounded to f16 for an fp16 package) is quantised again with the C++ routine behind onnxruntime.quantization.matmul_nbits_quantizer
(quantize_matmul_4bits / quantize_matmul_8bits, symmetric, the input zero-padded to whole blocks as
that quantiser pads it), and the node's codes and scales must equal the result bit for bit; its
attributes must match the weight and kosmos_rt.json's "quantization". Every 2-D decoder weight but
the token embedding must be quantised, and the vision graph must have no MatMulNBits.

Never imports project code. Prints one JSON object; exit status 0 only if every check passes.
"""
import json
import os
import sys

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits
from safetensors.numpy import load_file


def attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def ort_quantize(w_out_in, bits, block, dtype):
    """ONNX Runtime's codes [N, blocks, blob] and scales [N, blocks] for a [N, K] weight held in
    `dtype` (float32, or float16 for fp16 packages)."""
    n, k = w_out_in.shape
    fp32 = np.ascontiguousarray(w_out_in.T.astype(dtype))
    blocks = (k + block - 1) // block
    pad = blocks * block - k
    if pad:
        fp32 = np.pad(fp32, ((0, pad), (0, 0)), "constant")
    per_byte = 8 // bits
    codes = np.zeros((n, blocks, block // per_byte), np.uint8)
    zero_points = np.zeros((n, (blocks + per_byte - 1) // per_byte), np.uint8)
    scales = np.zeros((n, blocks), dtype)
    fn = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    fn(codes, fp32, scales, zero_points, block, n, blocks * block, True)
    return codes, scales


def main():
    pkg, ckpt = sys.argv[1], sys.argv[2]
    manifest = json.load(open(os.path.join(pkg, "kosmos_rt.json")))
    q = manifest.get("quantization")
    problems = []
    if not q:
        print(json.dumps({"ok": False, "problems": ["kosmos_rt.json has no quantization"]}))
        sys.exit(1)
    weights = load_file(os.path.join(ckpt, "model.safetensors"))
    model = onnx.load(os.path.join(pkg, "decoder.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    quantised = set()
    codes_bytes = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        if node.domain != "com.microsoft":
            problems.append(f"{node.name}: domain {node.domain}")
        a = attrs(node)
        b_name, s_name = node.input[1], node.input[2]
        suffix = f".weight.q{q['bits']}"
        if not b_name.endswith(suffix):
            problems.append(f"{node.name}: codes {b_name} do not end in {suffix}")
            continue
        prefix = b_name[: -len(suffix)]
        w = weights.get(prefix + ".weight")
        if w is None:
            problems.append(f"{node.name}: no checkpoint weight {prefix}.weight")
            continue
        n, k = w.shape
        want = {"K": k, "N": n, "bits": q["bits"], "block_size": q["block_size"], "accuracy_level": q["accuracy_level"]}
        got = {key: a.get(key) for key in want}
        if got != want:
            problems.append(f"{node.name}: attributes {got}, expected {want}")
            continue
        if len(node.input) > 3 and any(node.input[3:]):
            problems.append(f"{node.name}: unexpected inputs {list(node.input[3:])} (symmetric: no zero points)")
        codes = numpy_helper.to_array(inits[b_name])
        scales = numpy_helper.to_array(inits[s_name])
        dtype = np.float16 if manifest["dtype"] == "fp16" else np.float32
        ref_codes, ref_scales = ort_quantize(w, q["bits"], q["block_size"], dtype)
        if codes.shape != ref_codes.shape or not np.array_equal(codes, ref_codes):
            diff = "shape" if codes.shape != ref_codes.shape else f"{int((codes != ref_codes).sum())} bytes"
            problems.append(f"{prefix}: codes differ from ONNX Runtime's ({diff})")
        bits_of = np.uint16 if dtype == np.float16 else np.uint32
        if scales.dtype != dtype or scales.shape != ref_scales.shape or not np.array_equal(
            scales.view(bits_of), ref_scales.view(bits_of)
        ):
            problems.append(f"{prefix}: scales differ from ONNX Runtime's")
        quantised.add(prefix)
        codes_bytes += codes.nbytes
    expected = {
        name[: -len(".weight")]
        for name, t in weights.items()
        if name.startswith("decoder.") and name.endswith(".weight") and t.ndim == 2 and "embed_tokens" not in name
    }
    if quantised != expected:
        problems.append(f"not quantised: {sorted(expected - quantised)}; unexpected: {sorted(quantised - expected)}")
    vision = onnx.load(os.path.join(pkg, "vision.onnx"), load_external_data=False)
    if any(n.op_type == "MatMulNBits" for n in vision.graph.node):
        problems.append("vision.onnx has MatMulNBits nodes")
    report = {"ok": not problems, "linears": len(quantised), "codes_bytes": codes_bytes, "problems": problems[:20]}
    print(json.dumps(report))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
