"""Regenerate the toy example inputs and manifest: python examples/make_examples.py"""

import json
from pathlib import Path

import numpy as np

from imagic.toy import Scene, caption, render

HERE = Path(__file__).parent
EXAMPLES = [  # (input scene, target text): colour, shape, background, and two-at-once edits
    (Scene("circle", "red", "black", 13.0, 15.0, 14.0), "a blue circle on black background"),
    (Scene("square", "green", "white", 18.0, 14.0, 12.0), "a green circle on white background"),
    (Scene("triangle", "yellow", "gray", 15.0, 17.0, 15.0), "a yellow triangle on black background"),
    (Scene("circle", "blue", "white", 17.0, 16.0, 13.0), "a red square on white background"),
    (Scene("square", "red", "gray", 14.0, 13.0, 13.0), "a yellow square on white background"),
]


def main() -> None:
    entries = []
    for i, (scene, target) in enumerate(EXAMPLES):
        name = f"{scene.color}-{scene.shape}-on-{scene.background}.png"
        render(scene, np.random.default_rng(i), resolution=128).save(HERE / "toy" / name)
        color, shape, _, background, _ = target.split()[1:]
        entries.append({"id": f"{scene.color}-{scene.shape}-on-{scene.background}-to-{color}-{shape}-on-{background}",
                        "image": f"examples/toy/{name}", "source_text": caption(scene), "target_text": target,
                        "etas": [1.0, 1.2, 1.4, 1.6, 1.8, 2.0], "seeds": [0]})
    with open(HERE / "manifest.jsonl", "w") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in entries)


if __name__ == "__main__":
    main()
