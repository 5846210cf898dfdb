"""Peak worker memory with hostile inputs against a clean run of the same good entries (#12's target: within
+200 MB whatever the input). Each batch runs in a fresh process (`imagic run`, local mode, tiny model), so
its peak RSS (children included: none edit) is its own.

    python benchmarks/hostile_memory.py          # prints a table; --json writes it

Hostile inputs: a sparse 1 GiB file, /dev/zero, a FIFO, an HTTP body of 512 MiB without Content-Length, one
declaring 1 GB, and an 81 MP decompression bomb.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from PIL import Image, ImageDraw

QUICK = {"embedding_steps": 2, "finetune_steps": 2, "num_inference_steps": 2}


class Hostile(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        if self.path == "/declared":
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            return
        self.end_headers()  # no length: only a streamed check can stop it
        block = b"\0" * (1 << 20)
        try:
            for _ in range(512):
                self.wfile.write(block)
        except OSError:
            pass  # the reader stopped early, as it should

    def log_message(self, *args):
        pass


def manifest(folder: Path, hostile: bool, base_url: str) -> Path:
    rows = [{"defaults": {"etas": [1.0], "overrides": QUICK}}]
    for i in range(3):
        image = Image.new("RGB", (64, 64), (240, 240, 240))
        ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(200, 30 * i, 30))
        image.save(folder / f"good-{i}.png")
        rows.append({"id": f"good-{i}", "image": str(folder / f"good-{i}.png"), "target_text": "a blue circle"})
    if hostile:
        with (folder / "sparse.png").open("wb") as f:
            f.truncate(2**30)
        os.mkfifo(folder / "pipe.png")
        Image.new("1", (9000, 9000)).save(folder / "bomb.png")
        for name, uri in {"sparse": folder / "sparse.png", "zero": "/dev/zero", "fifo": folder / "pipe.png",
                          "stream": f"{base_url}/stream", "declared": f"{base_url}/declared",
                          "bomb": folder / "bomb.png"}.items():
            rows.append({"id": name, "image": str(uri), "target_text": "a blue circle"})
    path = folder / ("hostile.jsonl" if hostile else "clean.jsonl")
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def peak_rss_mb(manifest_path: Path, output: Path) -> tuple[float, str]:
    code = ("import resource, sys; from imagic.cli import app; "
            "sys.argv = ['imagic', 'run', sys.argv[1], '-o', sys.argv[2], '--model', 'tiny', "
            "'--max-failure-fraction', '1'];\n"
            "try:\n    app()\nexcept SystemExit:\n    pass\n"
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    done = subprocess.run([sys.executable, "-c", code, str(manifest_path), str(output)], capture_output=True, text=True)
    peak = next(line for line in done.stdout.splitlines() if line.startswith("PEAK"))
    summary = next((line for line in done.stderr.splitlines() if line.startswith(("done:", "batch "))), "")
    return float(peak.split()[1]), summary.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    args = parser.parse_args()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for hostile in (False, True):
            path = manifest(folder, hostile, f"http://127.0.0.1:{server.server_port}")
            peak, summary = peak_rss_mb(path, folder / f"out-{hostile}")
            rows.append({"batch": "hostile" if hostile else "clean", "peak_rss_mb": round(peak, 1), "summary": summary})
    server.shutdown()
    rows[1]["over_clean_mb"] = round(rows[1]["peak_rss_mb"] - rows[0]["peak_rss_mb"], 1)
    print("| batch | peak RSS MB | over clean | run |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['batch']} | {row['peak_rss_mb']} | {row.get('over_clean_mb', '')} | {row['summary']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
