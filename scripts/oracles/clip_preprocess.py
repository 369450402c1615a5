#!/usr/bin/env python3
"""Reference CLIP preprocessing: Hugging Face transformers' CLIPImageProcessor on image files.

Writes ``pixel_values`` f32 [n, 3, size, size] to the output safetensors file. Never imports
project code: it is the independent side of the preprocessing test.
"""
import argparse

from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessor


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("images", nargs="+")
    args = ap.parse_args()
    proc = CLIPImageProcessor(
        size={"shortest_edge": args.size},
        crop_size={"height": args.size, "width": args.size},
    )
    images = [Image.open(p).convert("RGB") for p in args.images]
    pixel_values = proc(images=images, return_tensors="pt")["pixel_values"].float().contiguous()
    save_file({"pixel_values": pixel_values}, args.output)


if __name__ == "__main__":
    main()
