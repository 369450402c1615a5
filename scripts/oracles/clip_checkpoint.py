#!/usr/bin/env python3
"""Write a random Hugging Face CLIPModel checkpoint (vision + text towers, `vision_model.` keys,
as released CLIP checkpoints are laid out) for a config.json's vision section, plus the vision
tower's `last_hidden_state` on random pixels — the reference for `kosmos-train --vision-from`.

  clip_checkpoint.py CONFIG_JSON OUT_MODEL_SAFETENSORS OUT_REFERENCE_SAFETENSORS

Never imports project code.
"""
import json
import sys

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel


def main():
    cfg_path, model_path, ref_path = sys.argv[1:4]
    vision = json.load(open(cfg_path))["vision"]
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 99, "max_position_embeddings": 16}
    torch.manual_seed(11)
    model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, model_path)
    pixels = torch.randn(2, 3, vision["image_size"], vision["image_size"])
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=pixels).last_hidden_state
    save_file({"pixel_values": pixels, "last_hidden_state": hidden.contiguous()}, ref_path)


if __name__ == "__main__":
    main()
