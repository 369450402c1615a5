#!/usr/bin/env python3
"""PyTorch eager training-step timing of KOSMOS-1 built from the reference modules.

The baseline for `kosmos-train fit --device cuda`: the same model (HF CLIPVisionModel + flamingo
PerceiverResampler + Linear projection + torchscale Decoder, built from a config.json such as
`kosmos-train preset NAME` prints), the same optimiser (torch.optim.AdamW + clip_grad_norm_),
bf16 autocast, the same batch shape (rows x max_len tokens, --images images spread over the rows,
num_latents slots each) and the same vision freezing. Data are random tensors made on the device,
so this measures the model step only. Prints one JSON object with the median step time.

Never imports project code.
"""
import argparse
import json
import statistics
import time

import torch


def build(cfg, device):
    from flamingo_pytorch import PerceiverResampler
    from torchscale.architecture.config import DecoderConfig
    from torchscale.architecture.decoder import Decoder
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vision = CLIPVisionModel(CLIPVisionConfig(**cfg["vision"]))
    resampler = PerceiverResampler(**cfg["resampler"])
    dec_cfg = DecoderConfig(**cfg["decoder"])
    dim = dec_cfg.decoder_embed_dim
    image_proj = torch.nn.Linear(cfg["resampler"]["dim"], dim, bias=False)
    decoder = Decoder(dec_cfg, embed_tokens=torch.nn.Embedding(dec_cfg.vocab_size, dim))
    return [m.to(device).train() for m in (vision, resampler, image_proj, decoder)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--max-len", type=int, required=True)
    ap.add_argument("--images", type=int, required=True, help="images per step")
    ap.add_argument("--freeze-vision", choices=["none", "except-last", "all"], default="none")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()

    cfg = json.load(open(a.config))
    dev = torch.device(a.device)
    torch.manual_seed(0)
    vision, resampler, image_proj, decoder = build(cfg, dev)
    if a.freeze_vision != "none":
        last = f"encoder.layers.{cfg['vision']['num_hidden_layers'] - 1}."
        for n, p in vision.named_parameters():
            p.requires_grad_(a.freeze_vision == "except-last" and n.startswith(last))
    params = [p for m in (vision, resampler, image_proj, decoder) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)

    B, L, n_img = a.batch_size, a.max_len, a.images
    lat = cfg["resampler"]["num_latents"]
    vocab = cfg["decoder"]["vocab_size"]
    size = cfg["vision"]["image_size"]
    ids = torch.randint(6, vocab, (B, L), device=dev)
    mask = torch.zeros(B, L, dtype=torch.bool, device=dev)
    per_row = [n_img // B + (1 if r < n_img % B else 0) for r in range(B)]
    for r, k in enumerate(per_row):
        assert 2 + k * (lat + 2) <= L, "images do not fit the rows"
        for j in range(k):
            s = 2 + j * (lat + 2)
            mask[r, s : s + lat] = True
    targets = ids.roll(-1, 1).masked_fill(mask.roll(-1, 1), -100)
    pixels = torch.randn(n_img, 3, size, size, device=dev)
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")

    def step():
        with ctx:
            embeds = decoder.embed_tokens(ids)
            if n_img:
                feats = vision(pixel_values=pixels).last_hidden_state
                img = image_proj(resampler(feats).reshape(-1, cfg["resampler"]["dim"]))
                embeds = embeds.masked_scatter(mask.unsqueeze(-1), img.to(embeds.dtype))
            logits, _ = decoder(prev_output_tokens=ids, token_embeddings=embeds)
            loss = torch.nn.functional.cross_entropy(
                logits.float().view(-1, vocab), targets.view(-1), ignore_index=-100
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # a host sync per step, as the Rust trainer's loss logging does

    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    print(json.dumps({
        "impl": "pytorch-eager",
        "step_s_median": statistics.median(times),
        "step_s_p90": sorted(times)[int(0.9 * len(times))],
        "steps": a.steps,
        "batch_size": B,
        "max_len": L,
        "images": n_img,
        "trainable_params": sum(p.numel() for p in params),
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else None,
    }))


if __name__ == "__main__":
    main()
