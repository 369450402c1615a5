#!/usr/bin/env python3
"""Reference KOSMOS-1 forward built from the public reference implementations.

Builds Hugging Face ``CLIPVisionModel`` + flamingo-pytorch ``PerceiverResampler`` + a bias-free
``Linear`` image projection + torchscale ``Decoder`` from a checkpoint's ``config.json``, loads
``model.safetensors`` into each with ``strict=True`` (after stripping the module prefix), and runs
the KOSMOS-1 forward on the inputs given in a safetensors file:

  pixel_values  f32 [n_images, 3, H, W]   (already normalised)
  input_ids     i64 [batch, seq]
  image_mask    u8  [batch, seq]          (1 at image slots, filled in order)

and writes ``logits`` f32 [batch, seq, vocab] to the output safetensors file.

This file never imports project code: it is the independent side of the parity tests.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file


def build_reference(ckpt_dir):
    from flamingo_pytorch import PerceiverResampler
    from torchscale.architecture.config import DecoderConfig
    from torchscale.architecture.decoder import Decoder
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with open(os.path.join(ckpt_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["variant"] == "kosmos-1", cfg["variant"]
    state = load_file(os.path.join(ckpt_dir, "model.safetensors"))

    def part(prefix):
        p = prefix + "."
        return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}

    vision = CLIPVisionModel(CLIPVisionConfig(**cfg["vision"]))
    vision.load_state_dict(part("vision"), strict=True)

    resampler = PerceiverResampler(**cfg["resampler"])
    resampler.load_state_dict(part("resampler"), strict=True)

    dec_cfg = DecoderConfig(**cfg["decoder"])
    dim = dec_cfg.decoder_embed_dim
    image_proj = torch.nn.Linear(cfg["resampler"]["dim"], dim, bias=False)
    image_proj.load_state_dict(part("image_proj"), strict=True)

    embed_tokens = torch.nn.Embedding(dec_cfg.vocab_size, dim)
    decoder = Decoder(dec_cfg, embed_tokens=embed_tokens)
    dec_state = part("decoder")
    # xpos.scale is a buffer torchscale derives from the head size; a checkpoint may omit it.
    for k, v in decoder.state_dict().items():
        if k.endswith("self_attn.xpos.scale"):
            dec_state.setdefault(k, v)
    decoder.load_state_dict(dec_state, strict=True)

    for m in (vision, resampler, image_proj, decoder):
        m.eval()
    return cfg, vision, resampler, image_proj, decoder


@torch.no_grad()
def forward(models, pixel_values, input_ids, image_mask):
    cfg, vision, resampler, image_proj, decoder = models
    embeds = decoder.embed_tokens(input_ids)
    if pixel_values is not None and pixel_values.shape[0] > 0:
        features = vision(pixel_values=pixel_values).last_hidden_state  # no post_layernorm
        latents = resampler(features)  # [n, 1, num_latents, dim]
        image_embeds = image_proj(latents.reshape(-1, latents.shape[-1]))
        mask = image_mask.bool()
        assert int(mask.sum()) == image_embeds.shape[0], "image slots vs image embeddings"
        embeds = embeds.clone()
        embeds[mask] = image_embeds
    logits, _ = decoder(prev_output_tokens=input_ids, token_embeddings=embeds)
    return logits


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    models = build_reference(args.checkpoint)
    inputs = load_file(args.inputs)
    logits = forward(models, inputs.get("pixel_values"), inputs["input_ids"].long(), inputs["image_mask"])
    save_file({"logits": logits.float().contiguous()}, args.output)
    print(f"reference logits {tuple(logits.shape)} -> {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
