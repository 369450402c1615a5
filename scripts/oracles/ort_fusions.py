#!/usr/bin/env python3
"""Which kernels ONNX Runtime (Python, CPU, graph optimisations up to the extended level, where the fusions live) actually runs for a graph.

    python scripts/oracles/ort_fusions.py pkg/decoder.onnx

Prints one JSON object {op_type: count} of the graph after ONNX Runtime's optimiser, so tests can
check that the exporter's patterns are the ones ONNX Runtime fuses (one Gelu kernel instead of
Div/Erf/Add/Mul/Mul, for instance). Never imports project code.
"""
import argparse
import collections
import json
import os
import sys
import tempfile

import onnx
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("graph")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        # Large weights go to a side file; the counts only need the graph.
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "optimized.bin"
        )
        ort.InferenceSession(args.graph, so, providers=["CPUExecutionProvider"])
        model = onnx.load(so.optimized_model_filepath, load_external_data=False)
    counts = collections.Counter(n.op_type for n in model.graph.node)
    json.dump(dict(sorted(counts.items())), sys.stdout)
    print()


if __name__ == "__main__":
    main()
