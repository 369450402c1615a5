#!/usr/bin/env python3
"""Independent checks of an exported package with the official tools.

For each graph of the package (vision.onnx, decoder.onnx):
  * onnx.checker.check_model(path, full_check=True)  (full_check runs strict shape inference);
  * onnx.shape_inference on a copy without our value_info: every value's inferred element type and
    rank must equal what the exporter recorded, and every dimension both know as a number must agree.
With --reference CKPT: runs the package in ONNX Runtime (Python) and the reference PyTorch modules
(kosmos1_reference.py: HF CLIP + flamingo resampler + torchscale decoder) on a prompt with an image
between text, and checks the logits agree (--atol, or --rtol relative to max |logit|; for a
quantised package --min-top1 F: the most likely token agrees at a fraction F of positions or more).

Never imports project code. Exit status 0 only if every check passes.
"""
import argparse
import json
import os
import sys

import numpy as np
import onnx
from onnx import shape_inference


def check_graph(path):
    onnx.checker.check_model(path, full_check=True)
    model = onnx.load(path, load_external_data=False)
    ours = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.output)}
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    inferred = shape_inference.infer_shapes(bare, check_type=True, strict_mode=True, data_prop=True)
    got = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    problems = []
    compared = 0
    for name, vi in ours.items():
        if name not in got:
            continue  # contrib ops: ONNX has no shape function for com.microsoft operators
        a, b = vi.type.tensor_type, got[name].type.tensor_type
        if b.elem_type and a.elem_type != b.elem_type:
            problems.append(f"{name}: type {a.elem_type} vs inferred {b.elem_type}")
        if not b.HasField("shape"):
            continue
        compared += 1
        if len(a.shape.dim) != len(b.shape.dim):
            problems.append(f"{name}: rank {len(a.shape.dim)} vs inferred {len(b.shape.dim)}")
            continue
        for i, (x, y) in enumerate(zip(a.shape.dim, b.shape.dim)):
            if x.HasField("dim_value") and y.HasField("dim_value") and x.dim_value != y.dim_value:
                problems.append(f"{name}: dim {i} is {x.dim_value}, inferred {y.dim_value}")
            if x.HasField("dim_param") and y.HasField("dim_value"):
                problems.append(f"{name}: dim {i} recorded as '{x.dim_param}', inferred fixed {y.dim_value}")
    return compared, len(ours), problems


def reference_logits(pkg, ckpt, atol, rtol, min_top1=None):
    import onnxruntime as ort
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    import kosmos1_reference as ref

    man = json.load(open(os.path.join(pkg, "kosmos_rt.json")))
    models = ref.build_reference(ckpt)
    cfg = models[0]
    size, lat = cfg["vision"]["image_size"], cfg["resampler"]["num_latents"]
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, size, size)
    tok = cfg["tokenizer"]
    vocab = cfg["decoder"]["vocab_size"]
    ids = [tok["bos_token_id"], 7 % vocab, tok["image_start_token_id"]] + [tok["pad_token_id"]] * lat
    ids += [tok["image_end_token_id"]] + [(11 + 5 * i) % (vocab - 6) + 6 for i in range(6)]
    ids = torch.tensor([ids])
    mask = torch.zeros_like(ids, dtype=torch.uint8)
    mask[0, 3 : 3 + lat] = 1
    expected = ref.forward(models, pixels, ids, mask).numpy()

    vision = ort.InferenceSession(os.path.join(pkg, man["vision"]["file"]), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(os.path.join(pkg, man["decoder"]["file"]), providers=["CPUExecutionProvider"])
    embeds = vision.run(None, {"pixel_values": pixels.numpy()})[0]
    d = man["decoder"]
    # An int8 cache row is head_dim values and the row's exponent (kosmos_plugins' spec).
    kv = {"float16": np.float16, "int8": np.int8}.get(d["kv_dtype"], np.float32)
    row = d["head_dim"] + 1 if d["kv_dtype"] == "int8" else d["head_dim"]
    feed = {
        "input_ids": ids.numpy(),
        "image_embeds": embeds,
        "image_mask": mask.numpy().astype(bool),
        "attention_mask": np.ones(ids.shape, np.int64),
    }
    # concat layout: an empty past; buffer layout: buffers of exactly the prompt's length, written
    # from slot 0.
    buffer = d.get("kv_cache", "concat") == "buffer"
    past = ids.shape[1] if buffer else 0
    if buffer:
        feed["past_sequence_length"] = np.array([0], np.int64)
    for i in range(d["num_layers"]):
        for part in ("key", "value"):
            feed[f"past_key_values.{i}.{part}"] = np.zeros((1, d["num_heads"], past, row), kv)
    # logits_to_keep: 0 = every position; k = the last k (checked against the reference's tail).
    keeps = [0, 3] if "logits_to_keep" in d["inputs"] else [None]
    diff, same_argmax, agree, positions = 0.0, True, 0, 0
    for keep in keeps:
        want = expected
        if keep is not None:
            feed["logits_to_keep"] = np.array(keep, np.int64)
            want = expected[:, -keep:] if keep else expected
        logits = decoder.run(["logits"], feed)[0]
        if logits.shape != want.shape:
            return {"ok": False, "problem": f"logits_to_keep={keep}: logits {logits.shape}, expected {want.shape}"}
        diff = max(diff, float(np.abs(logits - want).max()))
        same = logits.argmax(-1) == want.argmax(-1)
        same_argmax &= bool(same.all())
        agree, positions = agree + int(same.sum()), positions + same.size
    scale = float(np.abs(expected).max())
    top1 = agree / positions
    if min_top1 is not None:
        ok = top1 >= min_top1
    else:
        ok = diff <= (rtol * scale if rtol is not None else atol)
    return {"max_abs": diff, "ref_max": scale, "same_argmax": same_argmax, "top1_agreement": top1,
            "logits_to_keep": keeps, "ok": ok}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("package")
    ap.add_argument("--reference", help="checkpoint dir: compare logits with the PyTorch reference")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--rtol", type=float, default=None)
    ap.add_argument("--min-top1", type=float, default=None,
                    help="quantised packages: least fraction of positions whose argmax must agree")
    a = ap.parse_args()
    report = {}
    failed = False
    for name in ("vision.onnx", "decoder.onnx"):
        compared, total, problems = check_graph(os.path.join(a.package, name))
        report[name] = {"checker": "ok", "shapes_compared": compared, "values": total, "problems": problems[:20]}
        failed |= bool(problems)
    if a.reference:
        r = reference_logits(a.package, a.reference, a.atol, a.rtol, a.min_top1)
        report["reference"] = r
        failed |= not r["ok"]
    print(json.dumps(report))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
