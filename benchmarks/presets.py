"""Seconds per stage and per step, and peak RSS, for each preset on a model (default: the tiny one, CPU).

    python benchmarks/presets.py                       # all presets, tiny model, CPU
    python benchmarks/presets.py --model DIR --device cuda --presets fast --set mixed_precision=bf16

Each preset runs in a fresh process so its peak RSS is its own. Prints a markdown table; --json writes rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

PRESETS = ("paper", "community", "fast")


def run_one(preset: str, model: str, device: str, overrides: dict) -> dict:
    from PIL import Image, ImageDraw

    from imagic import Editor, load_pipeline, make_config

    started = time.perf_counter()
    editor = Editor(load_pipeline(model, device))
    load_seconds = time.perf_counter() - started
    image = Image.new("RGB", (256, 256), (240, 240, 240))
    ImageDraw.Draw(image).ellipse((64, 64, 192, 192), fill=(200, 30, 30))
    config = make_config(preset, **overrides)
    result = editor.edit(image, "a blue circle", config, etas=[0.6, 0.7, 0.8, 0.9, 1.0], seeds=[0])
    s = result.seconds
    return {
        "preset": preset,
        "method": config.finetune_method,
        "load_s": load_seconds,
        "embedding_steps": config.embedding_steps,
        "finetune_steps": config.finetune_steps,
        **{f"{k}_s": v for k, v in s.items()},
        "embedding_ms_per_step": 1000 * s["embedding"] / max(config.embedding_steps, 1),
        "finetune_ms_per_step": 1000 * s["finetune"] / max(config.finetune_steps, 1),
        "edit_s": sum(s.values()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_memory_bytes": result.peak_memory_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets")
    parser.add_argument("--model", default="tiny", help="model id, directory or built-in name")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], help="config override KEY=JSON")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, v in (pair.split("=", 1) for pair in args.set)}

    if args.one:
        print(json.dumps(run_one(args.presets, args.model, args.device, overrides)))
        return

    rows = []
    for preset in args.presets.split(","):
        command = [sys.executable, __file__, "--one", "--presets", preset, "--model", args.model,
                   "--device", args.device, *(x for pair in args.set for x in ("--set", pair))]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))

    print("| preset | fine-tune | steps (emb/ft) | encode s | embedding s (ms/step) | finetune s (ms/step) "
          "| render s | edit s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['method']} | {r['embedding_steps']}/{r['finetune_steps']} | {r['encode_s']:.2f} "
              f"| {r['embedding_s']:.1f} ({r['embedding_ms_per_step']:.1f}) "
              f"| {r['finetune_s']:.1f} ({r['finetune_ms_per_step']:.1f}) | {r['render_s']:.2f} "
              f"| {r['edit_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
