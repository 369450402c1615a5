#!/usr/bin/env python3
"""Reference optimizer steps: torch.optim.AdamW on given parameters and gradients.

Input safetensors: ``param`` (initial values), ``grads`` [steps, *param.shape], ``lrs`` [steps] (f64).
Output safetensors: ``param`` after the steps. Never imports project code.
"""
import argparse

import torch
from safetensors.torch import load_file, save_file


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--beta1", type=float, required=True)
    ap.add_argument("--beta2", type=float, required=True)
    ap.add_argument("--eps", type=float, required=True)
    ap.add_argument("--weight-decay", type=float, required=True)
    ap.add_argument("--clip", type=float, required=True)
    args = ap.parse_args()
    t = load_file(args.inputs)
    p = torch.nn.Parameter(t["param"].clone())
    opt = torch.optim.AdamW([p], lr=1.0, betas=(args.beta1, args.beta2), eps=args.eps,
                            weight_decay=args.weight_decay, foreach=False)
    for g, lr in zip(t["grads"], t["lrs"].tolist()):
        p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_([p], args.clip)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    save_file({"param": p.detach().contiguous()}, args.output)


if __name__ == "__main__":
    main()
