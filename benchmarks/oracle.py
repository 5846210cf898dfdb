"""Validate the toy oracle on generated scenes: accuracy per attribute, centre and size error.

    python benchmarks/oracle.py --n 1000
"""

import argparse
import json

import numpy as np

from imagic.toy import measure, random_scene, render


def validate(n: int, textured: bool, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    hits = {"shape": 0, "color": 0, "background": 0}
    shifts, sizes = [], []
    for _ in range(n):
        scene = random_scene(rng)
        m = measure(render(scene, rng if textured else None))
        for key in hits:
            hits[key] += getattr(m, key) == getattr(scene, key)
        shifts.append(np.hypot(m.cx - scene.cx, m.cy - scene.cy))
        sizes.append(abs(m.size - scene.size) / scene.size)
    return {"n": n, "textured": textured, **{f"{k}_accuracy": v / n for k, v in hits.items()},
            "centre_error_px_mean": float(np.mean(shifts)), "centre_error_px_max": float(np.max(shifts)),
            "size_error_mean": float(np.mean(sizes)), "size_error_max": float(np.max(sizes))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for textured in (False, True):
        print(json.dumps(validate(args.n, textured, args.seed)))


if __name__ == "__main__":
    main()
