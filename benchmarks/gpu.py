"""Imagic at real model sizes: SD 1.5, SD 2.1-768, SDXL and DeepFloyd IF (cascade) shapes with random weights
(no hub), at native resolution, each preset with the CUDA fast path on and off, side by side in one process.

    python benchmarks/gpu.py --session --json gpu_session.json  # on a lent GPU: the rows that matter, ≤ 8 min
    python benchmarks/gpu.py --session --device cpu --scale 8  # its CPU proof run
    python benchmarks/gpu.py                                   # on a GPU: every architecture, paper + anchored
    python benchmarks/gpu.py --arch sd15 --presets paper --step-fraction 0.1      # a tenth of the steps
    python benchmarks/gpu.py --device cpu --scale 8 --step-fraction 0.02          # scaled down: proves it runs
    python benchmarks/gpu.py --arch if --presets anchored,paper     # IF-I-XL + SR: a full fine-tune is refused
                                                                    # on 80 GB (the memory check says why)

Prints seconds per stage and per step, peak memory per stage, and MFU: model FLOPs per training step
(forward counted by `torch.utils.flop_counter` on one step's batch; a training step is counted as 3×
forward for a full fine-tune — forward, input and weight gradients — and 2× for the embedding stage and
LoRA, which need input gradients only) divided by the step's seconds and the device's peak (`--peak-tflops`,
else a table of known GPUs, bf16 dense). Random weights compute exactly as much as trained ones; the
edit's quality is not measured here (see toy_edits.py). Architectures: benchmarks/architectures/*.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's imagic, with no install or PYTHONPATH

ARCHITECTURES = Path(__file__).parent / "architectures"
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
# The fast path off: what the engine did before it (fp32, no TF32, foreach Adam, a loss read every step).
FAST_PATH_OFF = {"mixed_precision": "no", "tf32": False, "fused_adam": False, "loss_readback_steps": 1}


def scaled(config: dict, factor: int) -> dict:
    """The same architecture `factor`× narrower, shallower and smaller: for a CPU run that proves the code."""
    if factor == 1:
        return config
    c = copy.deepcopy(config)
    if c["pipeline"] == "Cascade":
        return _scaled_cascade(c, factor)
    unet = c["unet"]
    unet["block_out_channels"] = [ch // factor for ch in unet["block_out_channels"]]
    unet["norm_num_groups"] = 8
    unet["sample_size"] = 8
    unet["cross_attention_dim"] //= factor
    if "transformer_layers_per_block" in unet:
        unet["transformer_layers_per_block"] = [max(1, n // 5) for n in unet["transformer_layers_per_block"]]
    if "addition_time_embed_dim" in unet:
        unet["addition_time_embed_dim"] //= factor
        pooled = c["text_encoder_2"]["projection_dim"] // factor
        unet["projection_class_embeddings_input_dim"] = pooled + 6 * unet["addition_time_embed_dim"]
    heads = unet["attention_head_dim"]
    if isinstance(heads, int):  # SD 1.5 names the head count "attention_head_dim"
        unet["attention_head_dim"] = max(1, heads // 2)
    c["vae"].update(block_out_channels=[ch // factor for ch in c["vae"]["block_out_channels"]], norm_num_groups=8,
                    layers_per_block=1, sample_size=64)
    for name in ("text_encoder", "text_encoder_2"):
        if name in c:
            text = c[name]
            text.update(hidden_size=text["hidden_size"] // factor, intermediate_size=text["intermediate_size"] // factor,
                        projection_dim=text["projection_dim"] // factor,
                        num_hidden_layers=max(2, text["num_hidden_layers"] // 6))
    return c


def _scaled_cascade(c: dict, factor: int) -> dict:
    text = c["text_encoder"]
    text.update(d_model=text["d_model"] // factor, d_ff=text["d_ff"] // factor, d_kv=8, num_heads=4,
                num_layers=max(2, text["num_layers"] // 6))
    for name, side in (("unet", 8), ("super_resolution_unet", 32)):
        unet = c[name]
        unet.update(block_out_channels=[ch // factor for ch in unet["block_out_channels"]], norm_num_groups=4,
                    sample_size=side, cross_attention_dim=unet["cross_attention_dim"] // factor,
                    encoder_hid_dim=text["d_model"], attention_head_dim=8, addition_embed_type_num_heads=2)
    return c


def build_cascade(config: dict, device: str):
    """IF-shaped base and SR pipelines, randomly initialised on `device` (10 B parameters: no CPU round trip)."""
    import torch
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    from imagic.engine.loading import Cascade
    from imagic.toy.tiny import make_clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        text_encoder = T5EncoderModel(T5Config(**config["text_encoder"]))
        unet, sr_unet = UNet2DConditionModel(**config["unet"]), UNet2DConditionModel(**config["super_resolution_unet"])
    if device.startswith("cuda"):
        text_encoder.to(torch.bfloat16)  # as imagic.engine.loading.load_pipeline loads IF's T5 on CUDA
    scheduler = {k: v for k, v in config["scheduler"].items() if k != "_class_name"}
    sr_scheduler = {k: v for k, v in config["super_resolution_scheduler"].items() if k != "_class_name"}
    none = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    base = IFPipeline(tokenizer=make_clip_tokenizer(model_max_length=77), text_encoder=text_encoder, unet=unet,
                      scheduler=DDPMScheduler(**scheduler), **none)
    sr = IFSuperResolutionPipeline(tokenizer=None, text_encoder=None, unet=sr_unet, scheduler=DDPMScheduler(**sr_scheduler),
                                   image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), **none)
    return Cascade(base, sr)


def build_pipeline(config: dict):
    """A pipeline of the architecture's classes and shapes, randomly initialised (seeded), in memory."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.schedulers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from imagic.toy.tiny import make_clip_tokenizer

    torch.manual_seed(0)
    schedulers = {cls.__name__: cls for cls in (DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler)}
    scheduler = schedulers[config["scheduler"]["_class_name"]].from_config(config["scheduler"])
    tokenizer = make_clip_tokenizer(model_max_length=77)  # byte-level: any text; ids < the configs' vocab
    parts = {
        "unet": UNet2DConditionModel(**config["unet"]), "vae": AutoencoderKL(**config["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
        "tokenizer": tokenizer, "scheduler": scheduler,
    }
    if config["pipeline"] == "StableDiffusionXLPipeline":
        parts.update(text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"])),
                     tokenizer_2=make_clip_tokenizer(model_max_length=77))
        return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def forward_flops(editor, config) -> int:
    """FLOPs of one UNet forward on a training step's batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    side = editor.unet.config.sample_size
    x = torch.zeros(config.train_batch_size, editor.unet.config.in_channels, side, side, device=editor.device)
    t = torch.full((config.train_batch_size,), 500, device=editor.device)
    embedding = editor.encode_text("a photo")
    with torch.no_grad(), editor.autocast(config), FlopCounterMode(display=False) as counter:
        editor.predict(x, t, embedding)
    return counter.get_total_flops()


def peak_flops(device: str, given: float | None) -> float | None:
    import torch

    if given:
        return given * 1e12
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def build_editor(arch: str, args):
    from imagic import Editor
    from imagic.engine.editor import CascadeEditor

    config_data = scaled(json.loads((ARCHITECTURES / f"{arch}.json").read_text()), args.scale)
    if config_data["pipeline"] == "Cascade":
        return CascadeEditor(build_cascade(config_data, args.device))
    return Editor(build_pipeline(config_data).to(args.device))


def run(arch: str, preset: str, fast_path: bool, args, editor=None, step_fraction: float | None = None) -> dict:
    """One edit of `arch` at `preset` (a fraction of its training steps); `editor`: reuse a built one (warm)."""
    import torch
    from PIL import Image, ImageDraw

    from imagic import make_config

    step_fraction = args.step_fraction if step_fraction is None else step_fraction
    editor = editor or build_editor(arch, args)
    family = "cascade" if editor.has_super_resolution else "single"
    defaults = make_config(preset, family)
    trained = ("embedding_steps", "finetune_steps") + (("sr_finetune_steps",) if family == "cascade" else ())
    steps = {key: max(1, round((getattr(defaults, key) or defaults.finetune_steps) * step_fraction))
             for key in trained}
    config = make_config(preset, family, **steps, num_inference_steps=args.inference_steps, save_full_delta=False,
                         **({"sr_num_inference_steps": args.inference_steps} if family == "cascade" else {}),
                         **({} if fast_path else FAST_PATH_OFF))
    needs = {k: round(v / 2**30, 1) for k, v in editor.memory_needs(config).items()}
    row = {"arch": arch, "scale": args.scale, "preset": preset, "fast_path": fast_path, "resolution": editor.resolution,
           "finetune": config.finetune_method, "steps": steps, "memory_needs_gb": needs}
    try:
        editor.check_inputs(config, args.etas, [0])
    except ValueError as err:  # e.g. a full fine-tune of IF-I-XL on an 80 GB GPU: refused, and why
        return {**row, "refused": str(err)}
    image = Image.new("RGB", (editor.resolution, editor.resolution), (235, 235, 235))
    ImageDraw.Draw(image).ellipse([editor.resolution // 4, editor.resolution // 4, 3 * editor.resolution // 4,
                                   3 * editor.resolution // 4], fill=(200, 30, 30))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = editor.edit(image, "a photo of a blue circle", config, etas=args.etas, seeds=[0])
    wall = time.perf_counter() - started
    fwd = forward_flops(editor, config)
    train_factor = 3 if config.finetune_method == "full" else 2
    seconds = result.seconds
    per_step = {"embedding": seconds["embedding"] / config.embedding_steps,
                "finetune": seconds["finetune"] / config.finetune_steps}
    if "finetune_sr" in seconds:
        per_step["finetune_sr"] = seconds["finetune_sr"] / config.sr_finetune_steps
    peak = peak_flops(args.device, args.peak_tflops)
    achieved = {stage: factor * fwd / per_step[stage]
                for stage, factor in (("embedding", 2), ("finetune", train_factor))}
    return {
        **row, "wall_s": wall, "seconds_per_image": wall, "seconds": seconds, "step_fraction": step_fraction,
        "memory_needs_total_gb": sum(editor.memory_needs(config).values()) / 2**30,
        "ms_per_step": {k: 1000 * v for k, v in per_step.items()},
        "peak_memory_gb": {k: v / 2**30 for k, v in result.peak_memory_bytes.items()},
        "unet_forward_gflops": fwd / 1e9, "achieved_tflops": {k: v / 1e12 for k, v in achieved.items()},
        "mfu": {k: (v / peak if peak else None) for k, v in achieved.items()},
        "full_recipe_estimate_s": (seconds["embedding"] / config.embedding_steps * defaults.embedding_steps
                                   + seconds["finetune"] / config.finetune_steps * defaults.finetune_steps
                                   + per_step.get("finetune_sr", 0.0) * (defaults.sr_finetune_steps
                                                                          or defaults.finetune_steps)
                                   + seconds["render"] + seconds.get("score", 0.0) + seconds["encode"]),
    }


def table(rows: list[dict]) -> str:
    lines = ["| arch | preset | fast path | px | ms/step emb · ft | s: encode · emb · ft · render · score | "
             "peak GB (ft) | TFLOP/s ft | MFU ft | full recipe est. s |", "|" + "---|" * 10]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['arch']} | {r['preset']} ({r['finetune']}) | {'on' if r['fast_path'] else 'off'} "
                         f"| {r['resolution']} | refused: {r['refused']} |||||| ")
            continue
        s, ms = r["seconds"], r["ms_per_step"]
        mfu = r["mfu"]["finetune"]
        arch = r["arch"] if r["scale"] == 1 else f"{r['arch']} /{r['scale']}"
        lines.append(
            f"| {arch} "
            f"| {r['preset']} ({r['finetune']}) | {'on' if r['fast_path'] else 'off'} | {r['resolution']} "
            f"| {ms['embedding']:.1f} · {ms['finetune']:.1f}"
            + (f" (SR {ms['finetune_sr']:.1f})" if "finetune_sr" in ms else "") + " "
            f"| {s['encode']:.2f} · {s['embedding']:.2f} · {s['finetune']:.2f} · {s['render']:.2f} · {s.get('score', 0):.2f} "
            f"| {r['peak_memory_gb'].get('finetune', 0):.2f} | {r['achieved_tflops']['finetune']:.2f} "
            f"| {'n/a' if mfu is None else f'{mfu:.1%}'} | {r['full_recipe_estimate_s']:.0f} |")
    return "\n".join(lines)


# The lent-GPU session, in order of value: (row, arch, preset, share of the preset's training steps, planned
# seconds on an H100-class card, build included). Planned ≤ 8 minutes; rows that would overrun the budget
# are skipped, and the JSON is rewritten after every row, so a session cut short keeps what it measured.
SESSION = [
    ("sd15 default, cold", "sd15", "anchored", 1.0, 60),
    ("sd15 default, warm", "sd15", "anchored", 1.0, 30),
    ("sd15 paper, a tenth of the steps", "sd15", "paper", 0.1, 45),
    ("sdxl default", "sdxl", "anchored", 1.0, 120),
    ("if cascade default", "if", "anchored", 1.0, 120),
    ("sdxl full fine-tune, memory probe", "sdxl", "paper", 0.005, 60),
]


def measured_peak_tflops(device: str) -> dict:
    """The card's real dense matmul rate (bf16 on CUDA, fp32 on the CPU): ten timed products after three."""
    import torch

    cuda = device.startswith("cuda")
    n, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / 10
    return {"n": n, "dtype": str(dtype), "tflops": 2 * n**3 / seconds / 1e12}


def write(report: dict, args) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def session(args) -> dict:
    import torch

    started = time.monotonic()
    report = {"device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
              "scale": args.scale, "budget_s": args.budget_s, "planned_gpu_seconds": sum(r[-1] for r in SESSION),
              "torch": torch.__version__, "rows": []}
    report["warmup"] = run("sd15", "anchored", True, args, step_fraction=0.01)["wall_s"]  # kernels, allocator
    report["matmul_peak"] = measured_peak_tflops(args.device)
    args.peak_tflops = report["matmul_peak"]["tflops"] if args.device.startswith("cuda") else args.peak_tflops
    kept, last_seconds = None, 0.0  # the cold row's editor, for the warm row
    for name, arch, preset, fraction, planned in SESSION:
        elapsed = time.monotonic() - started
        # The plan is an H100's; a scaled run expects each row to take as long as the one before.
        planned_here = planned if args.scale == 1 else last_seconds
        if elapsed + planned_here > args.budget_s:
            report["rows"].append({"row": name, "skipped": f"{elapsed:.0f} s spent, {planned_here:.0f} s expected"})
            write(report, args)
            continue
        warm = name.endswith("warm")
        try:
            editor = kept if warm and kept is not None else build_editor(arch, args)
            row = run(arch, preset, True, args, editor=editor, step_fraction=fraction)
        except Exception as err:  # a row's failure (e.g. out of memory) is a result; the session goes on
            editor, row = None, {"error": f"{type(err).__name__}: {err}"[:500]}
        kept = editor if name.endswith("cold") else None
        del editor
        if "peak_memory_gb" in row:
            row_peak = max(row["peak_memory_gb"].values())
            row["memory_needs_over_peak"] = row["memory_needs_total_gb"] / row_peak if row_peak else None
        report["rows"].append({"row": name, "planned_s": planned, **row})
        last_seconds = row.get("wall_s", last_seconds)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        report["elapsed_s"] = time.monotonic() - started
        write(report, args)
        print(json.dumps({k: report["rows"][-1].get(k) for k in ("row", "seconds_per_image", "skipped", "error")}),
              flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", help="sd15, sd21-768, sdxl, if (repeatable; default: all)")
    parser.add_argument("--presets", default="paper,anchored")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", type=int, default=1, help="architectures N× smaller (CPU proof runs)")
    parser.add_argument("--step-fraction", type=float, default=1.0, help="share of each preset's training steps")
    parser.add_argument("--inference-steps", type=int, default=50)
    parser.add_argument("--etas", type=float, nargs="+", default=[1.0, 1.2, 1.4, 1.6])
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: known GPUs)")
    parser.add_argument("--fast-path", choices=["both", "on", "off"], default="both")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--session", action="store_true", help="the lent-GPU session: every row that matters, "
                        "in order of value, within --budget-s (README: On a lent GPU)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="--session stops before this many seconds")
    args = parser.parse_args()
    if args.session:
        report = session(args)
        print(table([r for r in report["rows"] if "seconds" in r]))
        return
    archs = args.arch or sorted(p.stem for p in ARCHITECTURES.glob("*.json"))
    modes = {"both": (True, False), "on": (True,), "off": (False,)}[args.fast_path]
    rows = []
    for arch in archs:
        for preset in args.presets.split(","):
            for fast_path in modes:  # side by side: the same work, fast path on then off
                rows.append(run(arch, preset, fast_path, args))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
