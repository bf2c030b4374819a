"""Where bf16 autocast pays on this CPU: each model's step in fp32 and under bf16 autocast, in one
run (the ratio holds on a noisy machine), and optionally what it does to a student's accuracy.

Speed (random weights, the embedded default's shapes; fastest of --reps calls after a warm-up):
  matmul 2048^2            the ceiling: what bf16 buys a large matmul
  latent DiT train step    01's DiT at width 96, batch 128 (7x7x4 latents, 49 tokens)
  latent DiT guided step   forward + backward to x at batch 20 (a CFG step of 10 guided images)
  VAE decode + backward    forward + backward to z at batch 10 (the decode inside guidance)
  VAE train step           01's VAE at batch 128
  ConvNet-3 train step     a student's step at 03's batch 64 (forward, backward, AdamW)
--accuracy also trains 03's hard-label student (convnet-3, the small epochs rule) on random real
subsets of IPC 10 and 50, --seeds seeds each, in both precisions: final-epoch test accuracy,
mean +- std, and the wall time of the seeds
(~6 min on 2 cores).

What `--amp auto` follows on a CPU with native bf16 (common.resolve_amp): the classifiers' steps
gain, so they take bf16; the DiT and VAE lose, so they stay fp32.

    .venv/bin/python benchmarks/bench_amp.py [--accuracy]
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
import dit  # noqa: E402
from bench_speed import best_seconds, load  # noqa: E402


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def steps(info):
    """(name, step function) pairs, each built on random weights."""
    g = torch.Generator().manual_seed(0)
    out = []
    a, b = torch.randn(2048, 2048, generator=g), torch.randn(2048, 2048, generator=g)
    out.append(("matmul 2048^2", lambda: a @ b))

    m = dit.make_latent_dit(info)
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    x, t, y = torch.randn(128, 4, 7, 7, generator=g), torch.randint(0, 1000, (128,)), torch.arange(128) % 10

    def dit_train():
        opt.zero_grad(set_to_none=True)
        (m(x, t, y).sample.float() - x).pow(2).mean().backward()
        opt.step()
    out.append(("latent DiT train step, batch 128", dit_train))

    frozen = dit.make_latent_dit(info).requires_grad_(False)
    xs, ts, ys = x[:20], torch.full((20,), 500), torch.arange(20) % 11

    def dit_guided():
        xg = xs.clone().requires_grad_(True)
        frozen(xg, ts, ys).sample.float().sum().backward()
    out.append(("latent DiT guided step, batch 20", dit_guided))

    vae = dit.make_vae(info).requires_grad_(False)
    z = x[:10]

    def vae_decode():
        zg = z.clone().requires_grad_(True)
        vae.decode(zg).sample.float().sum().backward()
    out.append(("VAE decode + backward, batch 10", vae_decode))

    vae_t = dit.make_vae(info)
    opt_v = torch.optim.AdamW(vae_t.parameters(), 1e-3)
    img = torch.rand(128, info.channels, info.size, info.size, generator=g) * 2 - 1

    def vae_train():
        opt_v.zero_grad(set_to_none=True)
        F.mse_loss(vae_t(img).sample.float(), img).backward()
        opt_v.step()
    out.append(("VAE train step, batch 128", vae_train))

    net = C.build_model("convnet-3", info)
    opt_n = torch.optim.AdamW(net.parameters(), 1e-3)
    xi, yi = img[:64], torch.arange(64) % info.num_classes

    def student():
        opt_n.zero_grad(set_to_none=True)
        F.cross_entropy(net(xi).float(), yi).backward()
        opt_n.step()
    out.append(("ConvNet-3 train step, batch 64", student))
    return out


def accuracy(info, train, test, ipc: int, seeds: int, ctx) -> list:
    """03's hard-label convnet-3 students on random real subsets (draw k of class_permutations)."""
    per_class = C.class_permutations(train.y, info.num_classes, 0)
    accs = []
    for k in range(seeds):
        idx = torch.cat([p[k * ipc:(k + 1) * ipc] for p in per_class])
        C.seed_everything(k)
        model = C.build_model("convnet-3", info)
        C.fit(model, C.Split(train.x[idx], train.y[idx]), info, C.Protocol("hard"),
              epochs=C.epochs_for(ipc, "small"), seed=k, ctx=ctx, progress=False)
        accs.append(C.accuracy(model, test))
    return accs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=C.positive_int, default=5)
    p.add_argument("--accuracy", action="store_true", help="also students in both precisions")
    p.add_argument("--seeds", type=C.positive_int, default=3)
    a = p.parse_args()
    info, train, test = C.load_dataset("mnist5k")
    print(f"command: {' '.join(sys.argv)}\n{load()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, native bf16: {C.cpu_has_native_bf16()}", flush=True)
    if not C.cpu_has_native_bf16():
        print("note: no native bf16 on this CPU: bf16 is emulated, every ratio below is a loss")
    print(f"\n{'step':36s} {'fp32 ms':>9s} {'bf16 ms':>9s} {'bf16 speed-up':>14s}")
    for name, fn in steps(info):
        t32 = best_seconds(fn, a.reps)

        def under_bf16():
            with bf16():
                fn()
        t16 = best_seconds(under_bf16, a.reps)
        print(f"{name:36s} {t32 * 1e3:9.1f} {t16 * 1e3:9.1f} {t32 / t16:13.2f}x", flush=True)
    if a.accuracy:
        print(f"\n03's hard-label convnet-3 student on random real subsets, {a.seeds} seeds "
              f"(final epoch, test accuracy %):")
        for ipc in (10, 50):
            row = []
            for name, ctx in (("fp32", torch.autocast("cpu", enabled=False)), ("bf16", bf16())):
                t0 = time.perf_counter()
                accs = accuracy(info, train, test, ipc, a.seeds, ctx)
                sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
                row.append(f"{name} {statistics.mean(accs):.2f} +- {sd:.2f} "
                           f"({', '.join(f'{x:.1f}' for x in accs)}; {time.perf_counter() - t0:.0f} s)")
            print(f"  IPC {ipc}: " + "   ".join(row), flush=True)
    print(f"\n{load()}")


if __name__ == "__main__":
    C.cli(main)
