"""Benchmark of 03: wall time of one method at IPC 50 (5 stages), 3 convnet-3 seeds, hard labels, no baselines.

The set is 02's `random` method at IPC 50 on the run's data, made in a temporary copy of the run (read only).
Usage: .venv/bin/python benchmarks/bench_03.py [--run runs/mnist5k]   (`make bench-eval`)
       .venv/bin/python benchmarks/bench_03.py --ipc 4 --extra "--students convnet-1 --seeds 2 --epochs 2"  # smoke
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=ROOT / "runs/mnist5k", help="run of 01 (read only)")
    p.add_argument("--ipc", type=int, default=50, help="IPC of the random set (02 --ipc)")
    p.add_argument("--extra", default="", help="more 03 flags, e.g. '--seeds 2 --epochs 2'")
    args = p.parse_args()
    print("start: load average %.2f %.2f %.2f" % os.getloadavg(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        (run / "teacher").mkdir(parents=True)
        shutil.copy(args.run / "dataset.json", run)
        for f in ("teacher.pt", "config.json", "metrics.json"):
            shutil.copy(args.run / "teacher" / f, run / "teacher")
        subprocess.run([sys.executable, str(ROOT / "02_distill_stages.py"), "--run", str(run), "--method", "random",
                        "--ipc", str(args.ipc)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        t0 = time.time()
        p = subprocess.run([sys.executable, str(ROOT / "03_evaluate.py"), "--run", str(run),
                            "--baselines", "none", "--analyses", "none", *args.extra.split()], cwd=ROOT)
        dt = time.time() - t0
        if p.returncode:
            sys.exit(p.returncode)
        r = C.read_json(run / "eval" / "default" / "results.json")["rows"][0]
        print(f"bench-eval: one method, IPC {r['ipc']}, {len(r['seeds'])} seeds, {r['student']} {r['protocol']}, "
              f"{r['epochs']} epochs: {r['mean']:.2f} ± {r['std']:.2f} %; training {r['wall_s']:.0f} s, "
              f"whole 03 call {dt:.0f} s (target <= 300 s)")
    print("end: load average %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
