"""Guidance with the base model's unconditional branch and a LoRA fine-tune: one mixed-batch UNet call (peft's
`adapter_names`, the engine's way) against two calls (LoRA on, then off), side by side, alternating.

    python benchmarks/guidance.py                          # toy model, CPU, render batch 8
    python benchmarks/guidance.py --model DIR --device cuda --batch 8 --repeats 50

Prints milliseconds per guided step for each way and their ratio, and checks the two agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="(η, seed) samples per call (render_batch_size)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from imagic import Editor, make_config

    editor = Editor.from_pretrained(args.model, args.device)
    config = make_config("anchored")
    params = editor.weights.trainable(config)
    with torch.no_grad():
        for p in params:  # a fine-tuned LoRA: B is no longer 0
            p.normal_(0.0, 0.02)
    side = editor.unet.config.sample_size
    x = torch.randn((args.batch, editor.unet.config.in_channels, side, side), device=editor.device)
    cond = editor.encode_text("a blue circle").expand(args.batch, -1, -1)
    uncond = editor.encode_text("").expand(args.batch, -1, -1)
    t = editor.noise_scheduler.timesteps[500]

    def one_call():
        return editor.guided_prediction(x, t, cond, uncond, config)

    def two_calls():
        with editor.autocast(config):
            finetuned = editor.predict(x, t, cond).float()
            base = editor.base_prediction(x, t, uncond, None).float()
        return base + config.guidance_scale * (finetuned - base)

    def timed(fn):
        if editor.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = fn()
        if editor.device.type == "cuda":
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - started), out

    with torch.no_grad():
        difference = (one_call() - two_calls()).abs().max().item()
        times = {"one call": [], "two calls": []}
        for _ in range(args.repeats):  # alternating: both see the machine's load alike
            times["one call"].append(timed(one_call)[0])
            times["two calls"].append(timed(two_calls)[0])
    editor.weights.restore()
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model} on {args.device}, batch {args.batch}, {args.repeats} repeats (median ms per guided step):")
    for name, ms in median.items():
        print(f"  {name:<10} {ms:8.1f}")
    print(f"  one / two  {median['one call'] / median['two calls']:8.3f}   (largest difference {difference:.2e})")


if __name__ == "__main__":
    main()
