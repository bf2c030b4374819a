"""DELT benchmark on the embedded default: EarlyLate against the constant schedule at IPC 50, in one run.

Measures (METHODS.md §5-6, DELT Fig. 1-2):
  1. wall time of the pixel optimisation, EarlyLate vs constant (the paper: -39.3 % on ImageNet-1K IPC 50):
     the two full 02 runs one after the other, and the first batch optimised with each schedule in turn
     (E, C, E, C) in this process, which both see the same machine load;
  2. the mean distance ||x - x_init|| per group (join round): longer-trained groups should move further;
  3. diversity: per class, the mean cosine similarity of each image's teacher penultimate feature to the
     class centroid, averaged over classes (lower = more diverse), for DELT, the constant schedule and the
     unoptimised median-selected real images both start from.

Reads:  a run folder of 01 (dataset.json, teacher/); only read, never written.
Writes: <work>/run/ (dataset.json and teacher/ copied from --run, then distilled/delt-ipc50 and
        distilled/delt-constant-ipc50 made by 02), <work>/bench_delt.json (every number printed),
        <work>/delt_grid.png (the DELT images, one row per class, columns in rank = join order).

The machine may be shared: the load average is printed at start and end, and 02 runs with --threads
torch threads (default 1: with other jobs on the cores, extra threads spin-wait and add a fixed cost to
every step, which hides the saving of smaller batches).

Examples:
  nice -n 10 .venv/bin/python benchmarks/bench_delt.py               # ~25 min on 2 CPU cores
  .venv/bin/python benchmarks/bench_delt.py --run runs/imagenette --ipc 50 --threads 8 --work /tmp/bd
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import importlib.util
from contextlib import nullcontext

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402

_spec = importlib.util.spec_from_file_location("distill02", ROOT / "02_distill_stages.py")
D = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(D)


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def distill(run: Path, ipc: int, schedule: str, threads: int, extra: list, log: Path) -> float:
    """One 02 run in a subprocess with a fixed thread count; returns its wall time in seconds."""
    cmd = [sys.executable, str(ROOT / "02_distill_stages.py"), "--run", str(run), "--method", "delt",
           "--ipc", str(ipc), "--schedule", schedule, "--overwrite", *extra]
    print(" ".join(cmd[1:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if p.returncode:
        sys.exit(f"02 failed (exit {p.returncode}); see {log}")
    return time.time() - t0


def interleaved_seconds(run: Path, ipc: int, extra: list, early: list, repeats: int) -> dict:
    """Optimise the first batch with each schedule in turn (E, C, E, C, ...) in this process, so both see
    the same machine load; seconds per schedule, summed over the repeats."""
    info = C.read_run_info(run)
    teacher = C.load_run_teacher(run, info, "cpu")
    _, real, test = C.load_dataset(info.name, info.root, info.size)
    envs = {}
    for schedule in ("earlylate", "constant"):
        a = D.parse_args(["--run", str(run), "--method", "delt", "--ipc", str(ipc), "--schedule", schedule, *extra,
                          *(early if schedule == "earlylate" else [])])
        s = D.resolve_settings(a, "small" if info.name == "mnist5k" else "paper")
        envs[schedule] = D.Env(a, info, torch.device("cpu"), nullcontext(), teacher, None, real, s, test,
                               D.stage_counts(a, s), None)
    classes = D.delt_batches(info.num_classes, ipc, envs["constant"].s["opt_batch"])[0]
    ranks = D.delt_init_ranks(envs["constant"])
    out = {"earlylate": 0.0, "constant": 0.0, "classes": classes, "repeats": repeats}
    for _ in range(repeats):
        for schedule, env in envs.items():
            t0 = time.time()
            D.delt_optimise(env, classes, ranks, seed=0)
            out[schedule] += time.time() - t0
    return out


def manifests(folder: Path) -> list:
    return [C.read_json(d / "manifest.json") for d in C.stage_dirs(folder)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/mnist5k"), help="run folder of 01 (read only)")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_delt"), help="scratch folder for the copies")
    p.add_argument("--ipc", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each 02 run")
    p.add_argument("--repeats", type=int, default=2, help="interleaved timing: E/C pairs on the first batch")
    p.add_argument("--iterations", type=int, default=None, help="MI for both runs (default: 02's)")
    p.add_argument("--round-iterations", type=int, default=None, help="RI of the EarlyLate run (default: 02's)")
    p.add_argument("--extra", default="", help="more 02 flags for both runs, e.g. '--opt-batch 500'")
    args = p.parse_args()
    print(f"load average at start (1/5/15 min): {load()}; {os.cpu_count()} CPUs", flush=True)

    run = args.work / "run"
    if not (run / "teacher" / "metrics.json").exists():
        run.mkdir(parents=True, exist_ok=True)
        shutil.copy(args.run / "dataset.json", run)
        shutil.copytree(args.run / "teacher", run / "teacher", dirs_exist_ok=True)
    extra = args.extra.split() + ([] if args.iterations is None else ["--iterations", str(args.iterations)])
    early = [] if args.round_iterations is None else ["--round-iterations", str(args.round_iterations)]
    res = {"ipc": args.ipc, "threads": args.threads, "extra": extra, "load_start": os.getloadavg()}
    for schedule in ("earlylate", "constant"):
        res[f"{schedule}_wall_s"] = distill(run, args.ipc, schedule, args.threads,
                                            extra + (early if schedule == "earlylate" else []),
                                            args.work / f"{schedule}.log")

    info = C.read_run_info(run)
    teacher = C.load_run_teacher(run, info, "cpu")
    _, real, _ = C.load_dataset(info.name, info.root, info.size)
    folders = {"delt": run / "distilled" / f"delt-ipc{args.ipc}",
               "constant": run / "distilled" / f"delt-constant-ipc{args.ipc}"}
    ms = {k: manifests(f) for k, f in folders.items()}
    for k in folders:
        res[f"{k}_optimisation_s"] = ms[k][0]["optimisation_seconds"]
        res[f"{k}_settings"] = ms[k][0]["settings"]
    res["saving_optimisation"] = 1 - res["delt_optimisation_s"] / res["constant_optimisation_s"]
    res["saving_wall"] = 1 - res["earlylate_wall_s"] / res["constant_wall_s"]
    joins = [m["join_iteration"] for m in ms["delt"]]
    n = [m["images_per_class"] for m in ms["delt"]]
    T = ms["delt"][0]["iterations_trained"]
    res["image_iterations_ratio"] = sum(k * (T - j) for k, j in zip(n, joins)) / (sum(n) * T)
    res["groups"] = [{"stage": m["stage"], "join": m["join_iteration"], "iterations": m["iterations_trained"],
                      "images_per_class": m["images_per_class"], "dist_to_init": m["mean_scores"]["dist_to_init"],
                      "p_final": m["mean_scores"]["p_final"]} for m in ms["delt"]]
    res["constant_dist_to_init"] = ms["constant"][0]["mean_scores"]["dist_to_init"]

    stages = {k: C.read_stages(f, info) for k, f in folders.items()}
    sets = {k: C.Split(torch.cat([s.x for s in st]), torch.cat([s.y for s in st])) for k, st in stages.items()}
    idx = torch.tensor(sum((m["scores"]["train_index"] for m in ms["delt"]), []))
    sets["median_real"] = C.Split(real.x[idx], real.y[idx])
    res["diversity"], res["accuracy_teacher"] = {}, {}
    for k, s in sets.items():
        per_class = C.centroid_cosine(C.features(teacher, s.x), s.y, info.num_classes)
        res["diversity"][k] = sum(per_class) / len(per_class)
        res["accuracy_teacher"][k] = C.accuracy(teacher, s)
    # one row per class, columns in rank (= join) order
    rows = [s.x[s.y == c] for c in range(info.num_classes) for s in stages["delt"]]
    C.save_grid(C.to_float(torch.cat(rows)), args.ipc, args.work / "delt_grid.png")
    print(f"interleaved timing ({args.repeats} x EarlyLate/constant on batch 1, load {load()})", flush=True)
    torch.set_num_threads(args.threads)
    res["interleaved"] = interleaved_seconds(run, args.ipc, extra, early, args.repeats)
    res["saving_interleaved"] = 1 - res["interleaved"]["earlylate"] / res["interleaved"]["constant"]
    res["load_end"] = os.getloadavg()
    C.write_json(args.work / "bench_delt.json", res)

    print(f"\nIPC {args.ipc}, {info.name}, teacher {C.read_json(run / 'teacher' / 'metrics.json')['model']}, "
          f"{args.threads} thread(s); settings {res['delt_settings']}")
    print(f"optimisation time: EarlyLate {res['delt_optimisation_s']:.0f} s vs constant "
          f"{res['constant_optimisation_s']:.0f} s -> saving {100 * res['saving_optimisation']:.1f} % "
          f"(image-iterations {100 * res['image_iterations_ratio']:.1f} % of constant; paper: -39.3 %)")
    print(f"process wall time: {res['earlylate_wall_s']:.0f} s vs {res['constant_wall_s']:.0f} s -> "
          f"saving {100 * res['saving_wall']:.1f} %")
    iv = res["interleaved"]
    print(f"interleaved, batch 1 x {iv['repeats']}: {iv['earlylate']:.0f} s vs {iv['constant']:.0f} s -> "
          f"saving {100 * res['saving_interleaved']:.1f} %")
    print("group (stage): join, iterations, mean ||x - x_init||, mean teacher p(y)")
    for g in res["groups"]:
        print(f"  {g['stage']}: {g['join']:5d} {g['iterations']:5d}  {g['dist_to_init']:.3f}  {g['p_final']:.4f}")
    print(f"  constant schedule (all {T} iterations): {res['constant_dist_to_init']:.3f}")
    print("intra-class cosine similarity to the class centroid (lower = more diverse), teacher accuracy:")
    for k in sets:
        print(f"  {k:12s} {res['diversity'][k]:.4f}  {res['accuracy_teacher'][k]:.1f} %")
    print(f"load average at end (1/5/15 min): {load()}\nwrote {args.work / 'bench_delt.json'}")


if __name__ == "__main__":
    main()
