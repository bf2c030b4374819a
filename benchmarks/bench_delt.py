"""DELT benchmark: EarlyLate against the constant schedule at one IPC, both measured in this one run.

Measures (docs/methods.md §6 DELT, §7.7 diversity, §9 paper numbers; DELT Fig. 1-2):
  1. time saved by EarlyLate against the constant schedule (the paper: -39.3 % wall clock on
     ImageNet-1K IPC 50): the pixel optimisation's seconds (each set's stage manifests,
     optimisation_seconds) and each 02 process's wall time, beside the image-iterations saved
     (from `02 --dry-run`'s join_iterations: sum(MI - join) / (IPC * MI), the cost a perfectly
     efficient implementation would save);
  2. per group (join round = stage): join iteration, iterations trained and mean ||x - x_init||
     from the manifests; longer-trained groups should move further;
  3. diversity: per class, the mean cosine of each image's teacher penultimate feature to the
     class centroid (common.features, common.centroid_cosine), averaged over classes (lower = more
     diverse), for EarlyLate, the constant schedule and the median-selected real images both start
     from, read back with common.read_stages; plus the teacher's accuracy on each.

02 is driven as a user would: `02_distill_stages.py --method delt --schedule earlylate|constant
--out <work>/<schedule>` in subprocesses, one after the other (--repeats N > 1 alternates them
E C C E ..., so that a drift of the machine's load hits both alike; the times are summed).

Reads:  a run folder of 01 (dataset.json, teacher/); only read, never written.
Writes: <work>/run/ (dataset.json and teacher/ copied from --run, so that 02's timings.json lands
        there), <work>/earlylate/ and <work>/constant/ (the two sets), <work>/<schedule>.log (02's
        output), <work>/bench_delt.json (every number printed), <work>/delt_grid.png (the EarlyLate
        images, one row per class, columns in rank = join order).

The machine may be shared: the load average is printed at start and end, and 02 runs with
--threads torch threads (OMP_NUM_THREADS; default 1: with other jobs on the cores, extra threads
spin-wait and add a fixed cost to every step, which hides the saving of smaller batches).

Examples:
  nice -n 10 .venv/bin/python benchmarks/bench_delt.py               # IPC 50, ~25 min on 2 CPU cores
  .venv/bin/python benchmarks/bench_delt.py --ipc 2 --iterations 4 --round-iterations 2   # smoke
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402

SCHEDULES = ("earlylate", "constant")


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def flags(args, schedule: str) -> list:
    """02's flags for one schedule (the EarlyLate run alone takes --round-iterations)."""
    f = ["--run", str(args.work / "run"), "--method", "delt", "--ipc", str(args.ipc),
         "--schedule", schedule, "--seed", str(args.seed), "--device", args.device]
    if args.iterations is not None:
        f += ["--iterations", str(args.iterations)]
    if args.opt_batch is not None:
        f += ["--opt-batch", str(args.opt_batch)]
    if schedule == "earlylate" and args.round_iterations is not None:
        f += ["--round-iterations", str(args.round_iterations)]
    return f + args.extra.split()


def call_02(argv: list, threads: int, log: Path | None = None) -> tuple:
    """02 in a subprocess with a fixed thread count: (wall seconds, stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.time()
    p = subprocess.run([sys.executable, str(ROOT / "02_distill_stages.py"), *argv], cwd=ROOT,
                       env=env, capture_output=True, text=True)
    dt = time.time() - t0
    if log is not None:
        log.write_text(p.stdout + p.stderr)
    if p.returncode:
        sys.exit(f"02 {' '.join(argv)} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    return dt, p.stdout


def dry_run(args, schedule: str) -> dict:
    """02's resolved plan: settings, images_per_stage, join_iterations (one per rank)."""
    _, out = call_02(flags(args, schedule) + ["--dry-run"], args.threads)
    return json.loads(out.strip().splitlines()[-1])


def manifests(folder: Path) -> list:
    return [C.read_json(d / "manifest.json") for d in C.stage_dirs(folder)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/mnist5k"), help="run folder of 01 (read only)")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_delt"),
                   help="scratch folder: the run's copy, both sets, logs, bench_delt.json")
    p.add_argument("--ipc", type=int, default=50)
    p.add_argument("--iterations", type=int, default=None, help="MI of both runs (default: 02's)")
    p.add_argument("--round-iterations", type=int, default=None, help="RI of the EarlyLate run (default: 02's)")
    p.add_argument("--opt-batch", type=int, default=None, help="images per optimisation batch (default: 02's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each 02 run")
    p.add_argument("--repeats", type=int, default=1,
                   help="full runs per schedule, alternating E C C E ...; times are summed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--extra", default="", help="more 02 flags for both runs, e.g. '--init top'")
    args = p.parse_args()
    res = {"load_start": os.getloadavg(), "cpus": os.cpu_count(), "threads": args.threads}
    print(f"load average at start (1/5/15 min): {load()}; {os.cpu_count()} CPUs", flush=True)

    run = args.work / "run"
    if not (run / "teacher" / "metrics.json").exists():
        run.mkdir(parents=True, exist_ok=True)
        shutil.copy(args.run / "dataset.json", run)
        shutil.copytree(args.run / "teacher", run / "teacher", dirs_exist_ok=True)
    info = C.read_run_info(run)

    # 1. the plans: image-iterations of each schedule from the join iterations 02 will use
    plans = {s: dry_run(args, s) for s in SCHEDULES}
    T = {s: plans[s]["settings"]["iterations"] for s in SCHEDULES}
    if T["earlylate"] != T["constant"]:
        sys.exit(f"MI differs between the schedules: {T}; give --iterations")
    cost = {s: sum(T[s] - j for j in plans[s]["join_iterations"]) for s in SCHEDULES}
    res["plans"] = plans
    res["image_iterations"] = cost
    res["image_iterations_ratio"] = cost["earlylate"] / cost["constant"]

    # 2. the two sets, E C C E ...
    folders = {s: args.work / s for s in SCHEDULES}
    wall = {s: 0.0 for s in SCHEDULES}
    opt = {s: 0.0 for s in SCHEDULES}
    order = [s for r in range(args.repeats) for s in (SCHEDULES if r % 2 == 0 else SCHEDULES[::-1])]
    for s in order:
        argv = flags(args, s) + ["--out", str(folders[s]), "--overwrite"]
        print(f"02 {' '.join(argv)}  (load {load()})", flush=True)
        dt, _ = call_02(argv, args.threads, args.work / f"{s}.log")
        ms = manifests(folders[s])
        wall[s] += dt
        opt[s] += ms[0]["optimisation_seconds"]  # every stage's manifest holds the same sum
    res["order"] = order
    res["wall_s"], res["optimisation_s"] = wall, opt
    res["saving_optimisation"] = 1 - opt["earlylate"] / opt["constant"]
    res["saving_wall"] = 1 - wall["earlylate"] / wall["constant"]
    res["saving_image_iterations"] = 1 - res["image_iterations_ratio"]

    ms = {s: manifests(f) for s, f in folders.items()}
    joins = sorted({j for j in plans["earlylate"]["join_iterations"]})
    got = [m["join_iteration"] for m in ms["earlylate"]]
    if got != joins or [m["images_per_class"] for m in ms["earlylate"]] != plans["earlylate"]["images_per_stage"]:
        sys.exit(f"the manifests' join rounds {got} differ from the dry run's {joins}")
    res["groups"] = [{"stage": m["stage"], "join": m["join_iteration"], "iterations": m["iterations_trained"],
                      "images_per_class": m["images_per_class"],
                      "dist_to_init": m["mean_scores"]["dist_to_init"], "p_final": m["mean_scores"]["p_final"]}
                     for m in ms["earlylate"]]
    res["constant_dist_to_init"] = ms["constant"][0]["mean_scores"]["dist_to_init"]

    # 3. diversity and teacher accuracy of the sets read back from their PNGs
    teacher = C.load_run_teacher(run, info, "cpu")
    _, real, _ = C.load_dataset(info.name, info.root, info.size)
    stages = {s: C.read_stages(f, info) for s, f in folders.items()}
    sets = {s: C.Split(torch.cat([t.x for t in st]), torch.cat([t.y for t in st])) for s, st in stages.items()}
    idx = torch.tensor(sum((m["scores"]["train_index"] for m in ms["earlylate"]), []))
    sets["median_real"] = C.Split(real.x[idx], real.y[idx])
    res["diversity"], res["accuracy_teacher"] = {}, {}
    for k, s in sets.items():
        per_class = C.centroid_cosine(C.features(teacher, s.x), s.y, info.num_classes)
        res["diversity"][k] = sum(per_class) / len(per_class)
        res["accuracy_teacher"][k] = C.accuracy(teacher, s)
    # one row per class, columns in rank (= join) order
    rows = [t.x[t.y == c] for c in range(info.num_classes) for t in stages["earlylate"]]
    C.save_grid(C.to_float(torch.cat(rows)), args.ipc, args.work / "delt_grid.png")
    res["load_end"] = os.getloadavg()
    C.write_json(args.work / "bench_delt.json", res)

    print(f"\nIPC {args.ipc}, {info.name}, teacher {C.read_json(run / 'teacher' / 'metrics.json').get('model')}, "
          f"{args.threads} thread(s), runs {' '.join(o[0].upper() for o in order)}; "
          f"settings {plans['earlylate']['settings']}")
    print(f"image-iterations: EarlyLate {cost['earlylate']} vs constant {cost['constant']} per class -> "
          f"ratio {res['image_iterations_ratio']:.4f}, saving {100 * res['saving_image_iterations']:.1f} %")
    print(f"optimisation time: EarlyLate {opt['earlylate']:.1f} s vs constant {opt['constant']:.1f} s -> "
          f"ratio {opt['earlylate'] / opt['constant']:.4f}, saving {100 * res['saving_optimisation']:.1f} % "
          f"(paper: 39.3 % at ImageNet-1K IPC 50)")
    print(f"process wall time: EarlyLate {wall['earlylate']:.1f} s vs constant {wall['constant']:.1f} s -> "
          f"ratio {wall['earlylate'] / wall['constant']:.4f}, saving {100 * res['saving_wall']:.1f} %")
    print("group (stage): join, iterations, images/class, mean ||x - x_init||, mean teacher p(y)")
    for g in res["groups"]:
        print(f"  {g['stage']}: {g['join']:5d} {g['iterations']:5d} {g['images_per_class']:4d}  "
              f"{g['dist_to_init']:.3f}  {g['p_final']:.4f}")
    print(f"  constant schedule (all {T['constant']} iterations): {res['constant_dist_to_init']:.3f}")
    print("intra-class cosine similarity to the class centroid (lower = more diverse), teacher accuracy:")
    for k in sets:
        print(f"  {k:12s} {res['diversity'][k]:.4f}  {res['accuracy_teacher'][k]:.1f} %")
    print(f"load average at end (1/5/15 min): {load()}\nwrote {args.work / 'bench_delt.json'}")


if __name__ == "__main__":
    main()
