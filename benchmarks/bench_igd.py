"""Benchmark: seconds per image of plain, LGD-guided and IGD-guided DiT sampling, in one run.

Each method samples the same labels from the same noise (one batch of one image per class, as
02 batches a stage; --per-class N: N such batches) with CFG 4 and its own
guidance (docs/methods.md §2.7): LGD lambda 15, terms CE(f_cur) - 0.5 CE(f_ref), window
[10, 45] = 36 guided steps of 50; IGD k 5, the influence term over the surrogate's trajectory
(a per-sample double backward through every checkpoint), window [30, 45] = 16 of 50. Both
backpropagate through the DiT and pay the deviation term against a memory of one earlier batch.
A step costs the same at every t, so each kind of step is timed over a few steps (all guided,
best of two rounds) and a 50-step image is composed from them: plain 50 p, LGD 14 p + 36 l,
IGD 34 p + 16 g (measured on the README's IPC-10 run, load 1.6: lgd 2.8x plain, igd 5.2x plain,
1.86x lgd per 50-step image; an earlier sampler's full 50-step run agreed with its composed ratios).
Prints the ratios to plain sampling, with the load average (the machine is shared).

With --run: that run's prior, teacher (f_ref) and, if 01 --surrogate made one, its trajectory.
Without: the mnist5k digits and randomly initialised models (the pixel DiT of `01 --prior pixel`,
no VAE; convnet-3 f_cur / f_ref, four convnet-2 checkpoints): the cost of a
forward or backward pass does not depend on the weights. Writes nothing.
  python benchmarks/bench_igd.py                     # ~2 min at load 7 on 2 cores
  python benchmarks/bench_igd.py --run runs/mnist5k
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import dit  # noqa: E402


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def models(run: Path | None):
    """(info, prior, f_ref, trajectory checkpoints, real images): from the run or random."""
    torch.manual_seed(0)
    if run is None:
        info, train, _ = common.load_dataset("mnist5k")
        prior = dit.Prior(dit.make_pixel_dit(info), dict(dit.make_train_scheduler().config),
                          info)
        reference = common.build_model("convnet-3", info).eval()
        trajectory = [common.build_model("convnet-2", info).eval() for _ in range(4)]
        return info, prior, reference, trajectory, train
    info = common.read_run_info(run)
    _, train, _ = common.load_dataset(info.name, info.root, info.size)
    prior = dit.load_run_prior(run, info, "cpu")
    reference = common.load_run_teacher(run, info, "cpu")
    paths = sorted((run / "surrogate").glob("epoch_[0-9]*.pt"))
    if paths:
        trajectory = [common.load_classifier(p, info, "cpu") for p in paths]
    else:
        print("no <run>/surrogate/ (01 --surrogate): random convnet-2 checkpoints instead")
        trajectory = [common.build_model("convnet-2", info).eval() for _ in range(4)]
    return info, prior, reference, trajectory, train


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=None, help="run folder of 01 (default: random)")
    p.add_argument("--per-class", type=int, default=1,
                   help="images per class (a batch never holds two of one class: one batch each)")
    p.add_argument("--probe-steps", type=int, default=3, help="steps timed per kind and round")
    p.add_argument("--rounds", type=int, default=2, help="rounds; the fastest counts")
    a = p.parse_args()
    print(f"start: {load()}, {torch.get_num_threads()} threads")
    info, prior, reference, trajectory, train = models(a.run)
    y = torch.arange(info.num_classes).repeat(a.per_class)  # slot-major, as 02's Job.sample
    # g_real from 20 images per class: the values do not change the cost of a sampling step
    real = torch.stack([dit.real_gradients(m, train.x, train.y, info.num_classes, per_class=20)
                        for m in trajectory])
    current = common.build_model("convnet-3", info).eval()
    lgd = dit.learnability_terms(current, reference, 0.5)
    igd = dit.influence_terms(trajectory, real)
    # a memory of one earlier batch, so that the deviation term is paid for as in a stage > 1
    _, z_mem, _ = dit.sample(prior, y, [dit.slot_seed(1, i) for i in range(len(y))], steps=2,
                             progress=False)

    def memory():
        m = dit.Memory(64)
        m.add(z_mem, y)
        return m
    every = (0, 49)  # the probes guide every step; the windows enter the composition below
    setups = {  # a fresh guidance (and memory) per round: the sampler adds to the memory
        "plain": lambda: None,
        "lgd": lambda: dit.Guidance(terms=lgd, scale=15.0, window=every, deviation=10.0,
                                    memory=memory()),
        "igd": lambda: dit.Guidance(terms=igd, scale=5.0, window=every, deviation=23.0,
                                    memory=memory()),
    }
    # rounds of plain, lgd, igd, each kind's fastest round kept: the other jobs on a shared
    # machine only ever add time, and round 1 also pays the one-off warm-up
    step = {}  # seconds per image and step
    seeds = [dit.slot_seed(0, i) for i in range(len(y))]  # the same noise for every kind
    for _ in range(a.rounds):
        for name, guide in setups.items():
            t0 = time.time()
            dit.sample(prior, y, seeds, steps=a.probe_steps, cfg=4.0, guidance=guide(),
                       batch_size=len(y), progress=False)
            s = (time.time() - t0) / len(y) / a.probe_steps
            step[name] = min(step.get(name, s), s)
    # 50 steps: LGD guides t = 45..10 (36 steps), IGD t = 45..30 (16 steps)
    secs = {"plain": 50 * step["plain"], "lgd": 14 * step["plain"] + 36 * step["lgd"],
            "igd": 34 * step["plain"] + 16 * step["igd"]}
    print(f"{len(y)} images in batches of {info.num_classes}, best of {a.rounds} rounds of "
          f"{a.probe_steps} steps; IGD trajectory: {len(trajectory)} checkpoints of "
          f"{real.shape[-1]} parameters")
    for name in setups:
        print(f"  {name:6s} {step[name]:.4f} s per image and step "
              f"({step[name] / step['plain']:.1f}x plain), {secs[name]:.3f} s per 50-step image "
              f"({secs[name] / secs['plain']:.1f}x)")
    print(f"  (lgd's 02 keeps 1 of kappa = 3 candidates per slot: {3 * secs['lgd']:.3f} s per "
          f"kept image; igd samples one per slot)")
    print(f"bench line: per 50-step image plain {secs['plain']:.3f} s, lgd {secs['lgd']:.3f} s "
          f"({secs['lgd'] / secs['plain']:.1f}x), igd {secs['igd']:.3f} s "
          f"({secs['igd'] / secs['plain']:.1f}x, {secs['igd'] / secs['lgd']:.2f}x lgd); "
          f"end: {load()}")

if __name__ == "__main__":
    main()
