"""Benchmark of 03: wall time of one method at IPC 50 (5 stages), 3 convnet-3 seeds, hard labels, no baselines.

Also the helper that writes a distilled folder in 02's layout from real training images (tests use it).
Usage: .venv/bin/python tests/bench_eval.py [--run runs/mnist5k]   (prints the timing; `make bench-eval`)
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402


def write_set(folder: Path, split: C.Split, info: C.DatasetInfo, method: str, stage_ipcs: list, seed=0,
              repeat_first=False):
    """A 02-layout folder of real images: stage_XX/<class>/<index:06d>.png + manifest.json, config.json.

    Images are drawn class-balanced without replacement; repeat_first=True copies stage 1 into every stage.
    """
    folder = Path(folder)
    g = torch.Generator().manual_seed(seed)
    perms = [(split.y == c).nonzero().squeeze(1)[torch.randperm(int((split.y == c).sum()), generator=g)]
             for c in range(info.num_classes)]
    start, index = 0, 0
    for k, ipc in enumerate(stage_ipcs):
        d = folder / f"stage_{k + 1:02d}"
        lo = 0 if repeat_first else start
        for c, p in enumerate(perms):
            for i in p[lo:lo + ipc].tolist():
                C.save_png(C.to_float(split.x[i]), d / info.classes[c] / f"{index:06d}.png")
                index += 1
        start += ipc
        C.write_json(d / "manifest.json", {"stage": k + 1, "ipc": ipc})
    C.write_json(folder / "config.json", {"args": {"method": method, "ipc": sum(stage_ipcs),
                                                   "stages": len(stage_ipcs), "seed": seed}})
    return folder


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=ROOT / "runs/mnist5k", help="run of 01 (read only)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        (run / "teacher").mkdir(parents=True)
        shutil.copy(args.run / "dataset.json", run)
        for f in ("teacher.pt", "config.json", "metrics.json"):
            shutil.copy(args.run / "teacher" / f, run / "teacher")
        info = C.DatasetInfo.from_dict(C.read_json(run / "dataset.json"))
        _, train, _ = C.load_dataset(info.name, info.root, info.size)
        write_set(run / "distilled" / "random-ipc50", train, info, "random", [10] * 5, seed=123)
        t0 = time.time()
        p = subprocess.run([sys.executable, str(ROOT / "03_evaluate.py"), "--run", str(run),
                            "--baselines", "none", "--analyses", "none"], cwd=ROOT)
        dt = time.time() - t0
        if p.returncode:
            sys.exit(p.returncode)
        res = C.read_json(run / "eval" / "default" / "results.json")
        r = res["rows"][0]
        print(f"bench-eval: one method, IPC {r['ipc']}, {len(r['seeds'])} seeds, {r['student']} {r['protocol']}, "
              f"{r['epochs']} epochs: {r['mean']:.2f} ± {r['std']:.2f} %; training {r['wall_s']:.0f} s, "
              f"whole 03 call {dt:.0f} s (target <= 300 s)")


if __name__ == "__main__":
    main()
