"""Speed of DiT sampling and student training against the reference implementations' loops,
and against this machine's own peak, every figure measured in this one run.

The machine is shared and noisy, so only figures taken in the same run are compared: the peaks
(a large fp32 matmul, a 128-channel 3x3 conv forward + backward) and each pair of loops.

Sampling (plain CFG and learnability-guided, 50 DDPM steps, CFG 4, window [10, 45] of 50):
  ours       dit.sample as 02 calls it: one image of every class per batch (02 never puts a
             class twice in a batch), every row of a batch in one forward pass per step
  reference  the loop of the IGD/LGD code bases re-implemented here: one image per class at a
             time, a batch of 2 rows (conditional and null label) for CFG, fp32, the same
             steps and the same guidance work per image (S = CE(f_cur) - 0.5 CE(f_ref) raised
             through the DiT, step normalised by c0 RMS(eps)/RMS(g)). Its first image is
             checked against dit.sample at batch 1 from the same slot seed (the same numbers).
Student training (convnet-3, hard labels, AdamW, CutMix + random-resized crop, batch 64):
  ours       common.fit on a uint8 split held as one tensor, batched augmentations
             eager, and (where a C++ compiler is on PATH) through torch.compile as 03's
             students run by default (--compile auto), timed after one warm-up fit
  reference  a DataLoader with per-sample torchvision.transforms.v2.RandomResizedCrop and a
             per-batch v2.CutMix (the IDC / DD-Ranking trainers), 0 and 2 workers
Precision: ours runs as 02 and 03 do by default (--amp auto: on a CPU with native bf16 the
classifiers, i.e. the students and the guidance terms' f_cur and f_ref, under bf16 autocast and the
DiT and VAE in fp32; elsewhere all fp32); the reference loops are fp32, as the reference code bases.
FLOPs come from torch.utils.flop_counter.FlopCounterMode (CPU attention added by its own
formula); the fraction is achieved FLOP/s over the peak measured above in the same precision
(students in bf16: the conv peak under bf16 autocast, measured too).

The DiT and the models are the run's (--run) when it exists, else randomly initialised ones of
the same shapes (without a run: 01's default prior, a VAE with blocks 16/32/32 from 28 px to
4x7x7 latents and a latent DiT of width 96, depth 4, patch 1, 10 classes, whose guided steps
decode through the VAE), so nothing is downloaded; their speed does not depend on their weights.
Usage: .venv/bin/python benchmarks/bench_speed.py [--run runs/mnist5k] [--amp auto|on|off]
       [--threads N]
(`make bench-speed`, the first part of `make bench`; ~5 min alone on 2 cores, 25 min at load 8)
"""
import argparse
import os
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import (FlopCounterMode, sdpa_backward_flop_count,
                                      sdpa_flop_count)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
import dit  # noqa: E402

aten = torch.ops.aten
# FlopCounterMode has no formula for the CPU kernel of scaled_dot_product_attention
CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v),
}


def precision(ctx) -> str:
    return "bf16" if C.amp_of(ctx) == "bf16" else "fp32"


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def flops(fn) -> float:
    """FLOPs of one call of fn (run once under the counter)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as fc:
        fn()
    return float(fc.get_total_flops())


def best_seconds(fn, reps: int) -> float:
    """Fastest of `reps` timed calls after one warm-up: the machine's best, not its noise."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------
# peaks
# ------------------------------------------------------------------------------------------


def matmul_peak(n=2048, reps=5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / best_seconds(lambda: a @ b, reps)


def conv_peak(batch=64, channels=128, size=28, reps=3, ctx=nullcontext()) -> tuple:
    """FLOP/s of a 3x3 conv (forward; forward + backward to input and weights), under ctx."""
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
    x = torch.randn(batch, channels, size, size, requires_grad=True)

    def fwd():
        with torch.no_grad(), ctx:
            conv(x)

    def fwd_bwd():
        with ctx:
            y = conv(x)
        y.float().sum().backward()
    return flops(fwd) / best_seconds(fwd, reps), flops(fwd_bwd) / best_seconds(fwd_bwd, reps)


# ------------------------------------------------------------------------------------------
# sampling: ours and the reference loop
# ------------------------------------------------------------------------------------------


def models(run: Path | None):
    """(info, prior, teacher, f_cur): the run's, or random ones of the embedded shapes."""
    torch.manual_seed(0)
    if run is not None and (run / "dit" / "metrics.json").exists():
        info = C.read_run_info(run)
        prior = dit.load_run_prior(run, info, "cpu")
        teacher = C.load_run_teacher(run, info, "cpu")
        source = f"the run {run}"
    else:
        info = C.DatasetInfo("mnist5k", 1, 28, (0.1307,), (0.3081,),
                             [str(c) for c in range(10)], flip=False)
        # 01's default prior: a VAE (blocks 16/32/32, 28 px -> 4x7x7) + a patch-1 latent DiT
        vae = dit.make_vae(info)
        vae.register_to_config(scaling_factor=1.0)
        prior = dit.Prior(dit.make_latent_dit(info),
                          dict(dit.make_train_scheduler().config), info, vae)
        teacher = C.build_model("convnet-3-bn", info).eval()
        source = "random initialisation (no finished run given)"
    current = C.build_model("convnet-3", info).eval()  # f_cur: its cost, not its weights
    return info, prior, teacher, current, source


def reference_sample(prior: dit.Prior, label: int, *, steps: int, cfg: float,
                     gen: torch.Generator, terms=None, scale=15.0, c0=0.0015,
                     window=(10, 45)) -> torch.Tensor:
    """One image as the reference code bases make it: a 2-row CFG batch per step.

    Written from the method (docs/methods.md §2), not from dit.py: the DDPM ancestral step on
    the CFG-combined eps, and inside the window the learnability gradient through the DiT
    added to x_{t-1}, scaled per sample by c0 RMS(eps) / RMS(g) sqrt(1 - abar_t).
    """
    sched = prior.scheduler(steps)
    y = torch.tensor([label])
    y2 = torch.cat([prior.labels(y), torch.full((1,), prior.num_labels)])  # cond, null
    lo, hi = (round(w * steps / 50) for w in window)
    ch = prior.latent_shape[0]
    x = torch.randn((1, *prior.latent_shape), generator=gen)
    for i, t in enumerate(sched.timesteps):
        guided = terms is not None and lo <= steps - 1 - i <= hi
        with torch.enable_grad() if guided else torch.no_grad():
            xg = x.detach().requires_grad_(guided)
            xx = torch.cat([xg, xg])  # (2, C, H, W)
            out = prior.transformer(xx, torch.full((2,), int(t)), y2).sample
            a = sched.alphas_cumprod[int(t)]
            model_out = out[:, :ch]
            if prior.scheduler_config.get("prediction_type") == "v_prediction":
                model_out = a.sqrt() * model_out + (1 - a).sqrt() * xx
            eps = model_out[1:] + cfg * (model_out[:1] - model_out[1:])  # (1, C, H, W)
            step_in = eps.detach() if not prior.learned_sigma else \
                torch.cat([eps.detach(), out[:1, ch:2 * ch].detach()], 1)
            x_prev = sched.step(step_in.float(), t, x, generator=gen).prev_sample
            if guided:
                x0 = (xg - (1 - a).sqrt() * eps) / a.sqrt()
                score = dit.objective(terms, prior.decode(x0), y)
                g, = torch.autograd.grad(score.sum(), xg)
                rms_eps = eps.detach().pow(2).mean().sqrt()
                rho = c0 * rms_eps / (g.pow(2).mean().sqrt() + 1e-12) * (1 - a).sqrt()
                x_prev = x_prev + scale * rho * g
        x = x_prev.detach()
    with torch.no_grad():
        return prior.decode(x)


def sampling(prior, teacher, current, n_ours: int, n_ref: int, steps: int, peak: float,
             ctx=nullcontext()):
    info = prior.info
    terms = dit.learnability_terms(current, teacher, 0.5)
    k = info.num_classes
    # slot-major (one image of every class, then the next) as 02 orders them: dit.sample's batches
    # then hold one image per class, as 02's do (a class never twice in a batch)
    y_ours = torch.arange(k).repeat(max(1, n_ours // k))[:n_ours]
    n_batches = len(dit.batches(y_ours, len(y_ours)))
    labels_ref = [c % k for c in range(n_ref)]  # one image per class at a time
    window = dit.Guidance().window
    lo, hi = (round(w * steps / 50) for w in window)
    inside = sum(lo <= steps - 1 - i <= hi for i in range(steps))
    results = {}
    for name, guided in (("plain", False), ("guided", True)):
        guide = dit.Guidance(terms=terms, scale=15.0) if guided else None
        # faithfulness: the reference loop's first image = ours at batch 1, same seed
        ref0 = reference_sample(prior, 0, steps=steps, cfg=4.0, terms=terms if guided else None,
                                gen=torch.Generator().manual_seed(dit.slot_seed(1, 0)))
        ours0, _, _ = dit.sample(prior, torch.zeros(1, dtype=torch.long), [1], steps=steps, cfg=4.0,
                                 guidance=guide,
                                 batch_size=1, progress=False)
        diff = (ref0 - ours0).abs().max().item()
        print(f"  {name}: reference loop vs dit.sample at batch 1, same seed: max |difference| "
              f"{diff:.2e}", flush=True)
        # FLOPs per image: one plain step and one guided step of a batch of one slot
        sched = prior.scheduler(steps)
        x1, y1 = torch.randn(1, *prior.latent_shape), torch.zeros(1, dtype=torch.long)
        t_mid = sched.timesteps[steps // 2]
        plain_f = flops(lambda: dit.guided_step(prior, x1, t_mid, prior.labels(y1), y1, 4.0,
                                                prior.scheduler(steps), None, None))
        guided_f = flops(lambda: dit.guided_step(prior, x1, t_mid, prior.labels(y1), y1, 4.0,
                                                 prior.scheduler(steps), None, guide))
        per_image = (steps - inside) * plain_f + inside * guided_f if guided else \
            steps * plain_f
        load0 = load()
        s_ours = timed(lambda: dit.sample(prior, y_ours, list(range(len(y_ours))), steps=steps,
                                          cfg=4.0, guidance=guide, ctx=ctx,
                                          batch_size=len(y_ours), progress=False))
        load1 = load()
        # slot i's noise as dit.sample draws it (candidate 0 of seed i)
        s_ref = timed(lambda: [reference_sample(prior, c, steps=steps, cfg=4.0,
                                                gen=torch.Generator().manual_seed(dit.slot_seed(i, 0)),
                                                terms=terms if guided else None)
                               for i, c in enumerate(labels_ref)])
        load2 = load()
        ips_ours, ips_ref = len(y_ours) / s_ours, n_ref / s_ref
        results[name] = (ips_ours, ips_ref)
        print(f"  {name:6s} ours      {ips_ours:7.2f} img/s  ({len(y_ours)} images in {n_batches} "
              f"batch(es) of one image per class, "
              f"{s_ours:.1f} s; {load0} -> {load1})")
        print(f"  {name:6s} reference {ips_ref:7.2f} img/s  ({n_ref} images one at a time, "
              f"{s_ref:.1f} s; -> {load2})")
        print(f"  {name:6s} ratio     {ips_ours / ips_ref:7.2f}x  (target >= 5x); "
              f"{per_image / 1e9:.2f} GFLOP per image: ours {per_image * ips_ours / 1e9:.1f} "
              f"GFLOP/s = {100 * per_image * ips_ours / peak:.0f} % of the matmul peak, "
              f"reference {100 * per_image * ips_ref / peak:.0f} %", flush=True)
    return results


def dit_kernels(prior, batch_sample: int, batch_train: int, peak: float):
    """Achieved FLOP/s of the DiT alone: forward (sampling), forward + backward to the input
    (guided sampling), forward + backward to the weights (01's training step)."""
    model = prior.transformer
    shape = prior.latent_shape
    x = torch.randn(batch_sample, *shape)
    t = torch.full((batch_sample,), 500)
    y = torch.arange(batch_sample) % (prior.num_labels + 1)

    def fwd():
        with torch.no_grad():
            model(x, t, y)

    def fwd_bwd_input():  # weights frozen: only the input's gradient, as in guided_step
        xg = x.clone().requires_grad_(True)
        model.requires_grad_(False)
        model(xg, t, y).sample.sum().backward()
        model.requires_grad_(True)

    xt = torch.randn(batch_train, *shape)
    tt = torch.randint(0, 1000, (batch_train,))
    yt = torch.arange(batch_train) % prior.num_labels

    def train_step():
        model.train()
        loss = (model(xt, tt, yt).sample.float() - xt).pow(2).mean()
        model.zero_grad(set_to_none=True)
        loss.backward()
        model.eval()
    rows = [(f"forward, batch {batch_sample} (a CFG sampling step of {batch_sample // 2})", fwd),
            (f"forward + backward to x, batch {batch_sample} (a guided step)", fwd_bwd_input),
            (f"forward + backward to weights, batch {batch_train} (01's training step)",
             train_step)]
    fracs = []
    for name, fn in rows:
        f, s = flops(fn), best_seconds(fn, 3)
        fracs.append(f / s / peak)
        print(f"  {name:64s} {f / 1e9:6.1f} GFLOP in {s * 1000:6.0f} ms = {f / s / 1e9:6.1f} "
              f"GFLOP/s = {100 * f / s / peak:3.0f} % of peak", flush=True)
    return fracs


# ------------------------------------------------------------------------------------------
# student training: ours and a per-sample DataLoader
# ------------------------------------------------------------------------------------------


class PerSampleCrops(torch.utils.data.Dataset):
    """The reference trainers' dataset: each image transformed on its own as it is drawn."""

    def __init__(self, split: C.Split, size: int, scale: float):
        from torchvision.transforms import v2
        self.x, self.y = split.x, split.y
        self.transform = v2.Compose([v2.RandomResizedCrop(size, scale=(scale, 1.0),
                                                          antialias=True),
                                     v2.ToDtype(torch.float32, scale=True)])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(self.x[i]), self.y[i]


def reference_fit(model, data: C.Split, info, proto: C.Protocol, epochs: int, workers: int):
    """The reference trainers' loop: a DataLoader of per-sample crops, v2.CutMix per batch
    (soft mixed targets, cross-entropy), AdamW and the hard protocol's MultiStep schedule."""
    from torch.utils.data import DataLoader, default_collate
    from torchvision.transforms import v2
    cutmix = v2.CutMix(num_classes=info.num_classes, alpha=proto.cutmix_beta)
    loader = DataLoader(PerSampleCrops(data, info.size, proto.crop_scale),
                        batch_size=proto.batch_size, shuffle=True, num_workers=workers,
                        collate_fn=lambda b: cutmix(*default_collate(b)),
                        persistent_workers=workers > 0)
    opt = torch.optim.AdamW(model.parameters(), lr=proto.lr, weight_decay=proto.wd)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, [max(1, epochs * 2 // 3), max(1, epochs * 5 // 6)], 0.2)
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)  # yb: (B, classes) mixed targets
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()


def students(info, ipc: int, epochs: int, conv_peak_fp32: float, ctx=nullcontext(),
             conv_peak_ours: float | None = None):
    """Ours under ctx against the fp32 reference loops; conv_peak_ours: the conv peak in ctx's
    precision (default: the fp32 one)."""
    _, train, _ = C.load_dataset(info.name, info.root, info.size)
    perms = C.class_permutations(train.y, info.num_classes, 0)
    idx = torch.cat([p[:ipc] for p in perms])
    data, proto = C.Split(train.x[idx], train.y[idx]), C.Protocol("hard")
    n = epochs * len(idx)
    model = C.build_model("convnet-3", info)
    xb = torch.rand(proto.batch_size, info.channels, info.size, info.size)
    yb = torch.arange(proto.batch_size) % info.num_classes
    step_f = flops(lambda: F.cross_entropy(model(xb), yb).backward())
    per_image = step_f / proto.batch_size
    # (kind, name, training call, conv peak and its precision for the fraction)
    runs = [("ours", "ours: common.fit, uint8 split, batched augmentation",
             lambda m: C.fit(m, data, info, proto, epochs=epochs, seed=0, ctx=ctx,
                             progress=False),
             conv_peak_ours or conv_peak_fp32, precision(ctx))]
    runs += [("reference", f"reference: DataLoader, per-sample v2 crops + v2.CutMix, {w} workers",
              lambda m, w=w: reference_fit(m, data, info, proto, epochs, w),
              conv_peak_fp32, "fp32") for w in (0, 2)]
    if C.has_cxx_compiler():  # 03's students as --compile auto runs them (>= COMPILE_MIN_STEPS)
        def compiled(m):
            mode = C.COMPILE["mode"]
            C.COMPILE["mode"] = "on"
            try:
                C.fit(m, data, info, proto, epochs=epochs, seed=0, ctx=ctx, progress=False)
            finally:
                C.COMPILE["mode"] = mode
        s = timed(lambda: compiled(C.build_model("convnet-3", info)))
        print(f"  torch.compile's warm-up fit (compiles once per process; inductor's on-disk cache "
              f"as found): {s:.1f} s", flush=True)
        runs.append(("compiled", "ours: common.fit under torch.compile (--compile), after the warm-up",
                     compiled, conv_peak_ours or conv_peak_fp32, precision(ctx)))
    else:
        print("  no C++ compiler on PATH: the torch.compile'd fit is not measured")
    rates = {}  # kind -> img/s, the faster of the references
    for kind, name, fn, peak, peak_precision in runs:
        torch.manual_seed(0)
        m = C.build_model("convnet-3", info)
        load0 = load()
        s = timed(lambda: fn(m))
        rates[kind] = max(rates.get(kind, 0.0), n / s)
        print(f"  {name:66s} {n / s:6.0f} img/s ({n} images in {s:.1f} s; "
              f"{100 * per_image * n / s / peak:3.0f} % of the {peak_precision} conv peak; "
              f"{load0} -> {load()})", flush=True)
    print(f"  ratio ours / the faster reference: {rates['ours'] / rates['reference']:.2f}x; "
          f"{per_image / 1e6:.0f} MFLOP per training image (convnet-3, forward + backward)")
    if "compiled" in rates:
        print(f"  ratio ours compiled / the faster reference: "
              f"{rates['compiled'] / rates['reference']:.2f}x "
              f"({rates['compiled'] / rates['ours']:.2f}x the eager fit)")
    return rates


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=ROOT / "runs/mnist5k",
                   help="run of 01 whose DiT and teacher to use; random models if unfinished")
    p.add_argument("--images", type=int, default=100, help="images of our batched sampler")
    p.add_argument("--ref-images", type=int, default=10,
                   help="images of the reference one-image loop (one per class)")
    p.add_argument("--steps", type=int, default=50, help="DDPM steps")
    p.add_argument("--ipc", type=int, default=50, help="student training set: IPC real images")
    p.add_argument("--epochs", type=int, default=3, help="student epochs per measurement")
    p.add_argument("--train-batch", type=int, default=128, help="batch of the DiT training step")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                   help="ours' precision, as the scripts' --amp (default auto: as 02 and 03 run)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's, one per core); 1 is steadier when "
                        "other jobs load the machine")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print("command: " + " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]))
    print(f"start: {load()}; {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, native bf16: {C.cpu_has_native_bf16()}", flush=True)
    t_start = time.time()
    info, prior, teacher, current, source = models(a.run)
    _, ctx = C.setup_device("cpu", a.amp)
    print(f"ours: classifiers {precision(ctx)}, DiT and VAE {precision(C.prior_ctx(ctx))} "
          f"(--amp {a.amp}); the reference loops fp32", flush=True)
    mm = matmul_peak()
    conv_f, conv_fb = conv_peak()
    print(f"\npeaks (fp32, best of the repetitions):\n  matmul 2048^2 {mm / 1e9:6.1f} GFLOP/s\n"
          f"  conv 3x3, 128 channels, batch 64 at 28x28: forward {conv_f / 1e9:.1f} GFLOP/s, "
          f"forward + backward {conv_fb / 1e9:.1f} GFLOP/s  ({load()})", flush=True)
    conv_fb_ours = None
    if precision(ctx) == "bf16":
        _, conv_fb_ours = conv_peak(ctx=ctx)
        print(f"  the same conv forward + backward under bf16 autocast: {conv_fb_ours / 1e9:.1f} "
              f"GFLOP/s", flush=True)
    print(f"\nDiT sampling, {a.steps} DDPM steps, CFG 4; models from {source}:")
    sampling(prior, teacher, current, a.images, a.ref_images, a.steps, mm, ctx)
    print("\nDiT forward / backward alone (target >= 40 % of the matmul peak):")
    dit_kernels(prior, 2 * a.images, a.train_batch, mm)
    print(f"\nstudent training, convnet-3 hard protocol, IPC {a.ipc}, {a.epochs} epochs each:")
    students(info, a.ipc, a.epochs, conv_fb, ctx, conv_fb_ours)
    print(f"\nend: {load()}; {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
