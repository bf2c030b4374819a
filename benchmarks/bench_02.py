"""Benchmark of 02 on the embedded default, every figure measured in this one run (the machine is shared).

Prints: seconds per sample of plain vs guided DiT sampling (full backprop and eps held constant) and
their ratios (target: guided <= 4x plain with full backprop); wall time of dit, lgd and acs at IPC 50
(target: <= 15 min each on 2 cores); per LGD stage, the mean learnability score S of its images under
its own f_cur against the plain-DiT images of the same stage (must be higher); the reference model's
accuracy on LGD/ACS images (target >= 90 %); ACS's discriminator accuracies per curriculum.

02 is driven as a user would (a subprocess per method, --overwrite); the sampler timing calls dit.sample.
Reads the run folder of 01 (default runs/mnist5k); writes fresh sets under <out>/distilled/ (default
runs/bench02, a copy of the run's dataset.json, teacher/ and dit/), so it never reuses finished stages.
  python benchmarks/bench_02.py            # ~30 min on 2 cores
  python benchmarks/bench_02.py --ipc 4 --stages 2 --steps 4 --per-class 1 --extra "--sample-steps 4" \
      --guided-extra "--guide-epochs 2 --guide-model convnet-1"      # smoke test
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
import dit as G  # noqa: E402  (the sampler moved from guidance.py to dit.py)


def load():
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def time_sampling(run: Path, n_per_class: int, steps: int):
    """Seconds per sample: plain CFG, guided (backprop through the DiT), guided with eps constant."""
    info = C.read_run_info(run)
    teacher, prior = C.load_run_teacher(run, info, "cpu"), G.load_run_prior(run, info, "cpu")
    torch.manual_seed(0)
    current = C.build_model("convnet-3", info).eval()  # cost does not depend on the weights
    terms = G.learnability_terms(current, teacher, 0.5)
    y = torch.arange(info.num_classes).repeat(n_per_class)  # slot-major, as 02 samples
    seeds = [G.slot_seed(0, i) for i in range(len(y))]
    out = {}
    for name, guide in [("plain", None), ("guided", G.Guidance(terms=terms, scale=15.0)),
                        ("guided, eps const", G.Guidance(terms=terms, scale=15.0, eps_const=True))]:
        t0 = time.time()
        G.sample(prior, y, seeds, steps=steps, cfg=4.0, guidance=guide, batch_size=len(y), progress=False)
        out[name] = (time.time() - t0) / len(y)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/mnist5k"))
    p.add_argument("--out", type=Path, default=Path("runs/bench02"))
    p.add_argument("--ipc", type=int, default=50)
    p.add_argument("--stages", type=int, default=None, help="02's --stages (default: 02's, 5)")
    p.add_argument("--steps", type=int, default=50, help="DDPM steps of the sampler timing")
    p.add_argument("--per-class", type=int, default=10, help="samples per class of the sampler timing")
    p.add_argument("--extra", default="", help="more 02 flags for every method, e.g. '--sample-steps 4'")
    p.add_argument("--guided-extra", default="", help="more 02 flags for lgd and acs, e.g. '--guide-epochs 2'")
    a = p.parse_args()
    print(f"start: {load()}, {torch.get_num_threads()} threads")
    a.out.mkdir(parents=True, exist_ok=True)
    for item in ("dataset.json", "teacher", "dit"):
        src, dst = a.run / item, a.out / item
        if not dst.exists():
            (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)

    t = time_sampling(a.out, a.per_class, a.steps)
    n = a.per_class * C.read_run_info(a.out).num_classes
    print(f"\nsampling, {a.steps} DDPM steps, {n} samples in one batch, window [10, 45] of 50:")
    for name, s in t.items():
        print(f"  {name:18s} {s:.3f} s/sample  ({s / t['plain']:.2f}x plain)")
    print(f"  lgd keeps 1 of kappa = 3 candidates: {3 * t['guided']:.3f} s per kept image")

    wall = {}
    for method in ("dit", "lgd", "acs"):
        t0 = time.time()
        argv = ["--run", str(a.out), "--method", method, "--ipc", str(a.ipc), "--overwrite", *a.extra.split()]
        argv += a.guided_extra.split() if method in ("lgd", "acs") else []
        argv += [] if a.stages is None else ["--stages", str(a.stages)]
        r = subprocess.run([sys.executable, str(ROOT / "02_distill_stages.py"), *argv], cwd=ROOT,
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"02 {' '.join(argv)} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
        wall[method] = time.time() - t0
        print(f"02 --method {method} --ipc {a.ipc}: {wall[method] / 60:.1f} min  ({load()})", flush=True)

    info = C.read_run_info(a.out)
    teacher = C.load_run_teacher(a.out, info, "cpu")
    sets = {m: C.read_stages(a.out / "distilled" / f"{m}-ipc{a.ipc}", info) for m in ("dit", "lgd", "acs")}
    print("\nLGD: mean S = CE(f_cur) - 0.5 CE(f_ref) under each stage's own f_cur")
    print("  stage  S(lgd images)  S(dit images, same stage)  f_cur test acc")
    for k in range(1, len(sets["lgd"])):
        folder = a.out / "distilled" / f"lgd-ipc{a.ipc}" / f"stage_{k + 1:02d}"
        cur = C.load_classifier(folder / "current.pt", info, "cpu")
        terms = G.learnability_terms(cur, teacher, 0.5)
        with torch.no_grad():
            s = [G.objective(terms, C.to_float(sets[m][k].x), sets[m][k].y).mean().item() for m in ("lgd", "dit")]
        print(f"  {k + 1:5d}  {s[0]:13.3f}  {s[1]:25.3f}  {C.read_json(folder / 'manifest.json')['current_test_acc']:8.1f} %")

    print("\nreference (teacher) accuracy on the images, per stage, and on the whole set")
    for m, stages in sets.items():
        accs = [C.accuracy(teacher, s) for s in stages]
        allx = C.Split(torch.cat([s.x for s in stages]), torch.cat([s.y for s in stages]))
        print(f"  {m:4s} " + " ".join(f"{v:5.1f}" for v in accs) + f"   all {C.accuracy(teacher, allx):.1f} %")

    print("\nACS per curriculum: D_k accuracy on its training images / new curriculum before / after guidance; "
          "reference loss")
    for k in range(len(sets["acs"])):
        m = C.read_json(a.out / "distilled" / f"acs-ipc{a.ipc}" / f"stage_{k + 1:02d}" / "manifest.json")
        d = [m.get(n) for n in ("disc_acc_train", "disc_acc_before", "disc_acc_after")]
        ds = " / ".join("  -  " if v is None else f"{v:5.1f}" for v in d)
        print(f"  {k + 1}: {ds}   reference loss {m['reference_loss']:.3f}")
    print(f"\nend: {load()}")


if __name__ == "__main__":
    main()
