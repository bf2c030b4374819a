"""CPU speed of DiT sampling, student training and each model's step, measured in one run.
Against the reference loops and this machine's peak, in fp32 and under bf16 autocast; the machine
is shared, so only figures of one run are compared.
  sampling  dit.sample as 02 calls it (one image of every class per batch), plain and guided by
            S = CE(f_cur) - 0.5 CE(f_ref), against the IGD/LGD code bases' loop written here from
            the method: one image at a time, 2 CFG rows, fp32 (checked against dit.sample)
  models    FLOPs, fp32 time, fraction of the peak and bf16 time: the ratios --amp auto follows
  students  common.fit (convnet-3, hard labels; eager, and compiled given a C++ compiler) against
            a DataLoader of per-sample v2 crops + v2.CutMix, 0 and 2 workers
Ours runs in --amp's precision, the references in fp32. Reads --run's DiT and teacher if 01
finished it, else random models of 01's default shapes (nothing downloaded). Writes nothing.
  .venv/bin/python benchmarks/bench_speed.py --run runs/mnist5k   # make bench-speed, ~5 min
  .venv/bin/python benchmarks/bench_speed.py --threads 1 --amp off
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


def models(run: Path | None):
    """(info, prior, teacher, f_cur, source): the run's, or random ones of 01's default shapes."""
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
    """One image (1, C, H, W) as the reference code bases make it, from docs/methods.md §2:
    a 2-row CFG batch per step; in the window g scaled by c0 RMS(eps) / RMS(g) sqrt(1 - abar)."""
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
    """Images per second of dit.sample and of the reference loop, plain and guided."""
    k = prior.info.num_classes
    terms = dit.learnability_terms(current, teacher, 0.5)
    # slot-major as 02 orders them, so each of dit.sample's batches holds a class once
    y_ours = torch.arange(k).repeat(max(1, n_ours // k))[:n_ours]
    n_batches = len(dit.batches(y_ours, len(y_ours)))
    labels_ref = [c % k for c in range(n_ref)]
    lo, hi = (round(w * steps / 50) for w in dit.Guidance().window)
    inside = sum(lo <= steps - 1 - i <= hi for i in range(steps))
    for name, guided in (("plain", False), ("guided", True)):
        guide = dit.Guidance(terms=terms, scale=15.0) if guided else None
        # faithfulness: the reference loop's first image = ours at batch 1, same seed
        ref0 = reference_sample(prior, 0, steps=steps, cfg=4.0, terms=terms if guided else None,
                                gen=torch.Generator().manual_seed(dit.slot_seed(1, 0)))
        ours0, _, _ = dit.sample(prior, torch.zeros(1, dtype=torch.long), [1], steps=steps,
                                 cfg=4.0, guidance=guide, batch_size=1, progress=False)
        diff = (ref0 - ours0).abs().max().item()
        print(f"  {name}: reference loop vs dit.sample at batch 1, same seed: max |difference| "
              f"{diff:.2e}", flush=True)
        # FLOPs per image from one plain and one guided step of a batch of one slot
        x1, y1 = torch.randn(1, *prior.latent_shape), torch.zeros(1, dtype=torch.long)
        t_mid = prior.scheduler(steps).timesteps[steps // 2]
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
        s_ref = timed(lambda: [reference_sample(
            prior, c, steps=steps, cfg=4.0, terms=terms if guided else None,
            gen=torch.Generator().manual_seed(dit.slot_seed(i, 0)))
            for i, c in enumerate(labels_ref)])
        ips_ours, ips_ref = len(y_ours) / s_ours, n_ref / s_ref
        print(f"  {name:6s} ours      {ips_ours:7.2f} img/s  ({len(y_ours)} images in "
              f"{n_batches} batch(es) of one image per class, {s_ours:.1f} s; {load0} -> {load1})")
        print(f"  {name:6s} reference {ips_ref:7.2f} img/s  ({n_ref} images one at a time, "
              f"{s_ref:.1f} s; -> {load()})")
        print(f"  {name:6s} ratio     {ips_ours / ips_ref:7.2f}x  (target >= 5x); "
              f"{per_image / 1e9:.2f} GFLOP per image: ours {per_image * ips_ours / 1e9:.1f} "
              f"GFLOP/s = {100 * per_image * ips_ours / peak:.0f} % of the matmul peak, "
              f"reference {100 * per_image * ips_ref / peak:.0f} %", flush=True)


def adamw_step(model, loss_fn):
    """One training step of model: loss_fn(model) forward, backward to the weights, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), 1e-3)

    def step():
        model.requires_grad_(True)
        loss = loss_fn(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def input_grad(model, x, fn):
    """fn(x) forward and backward to x alone, model frozen: a guided step's pattern."""
    def step():
        model.requires_grad_(False)
        fn(x.clone().requires_grad_(True)).float().sum().backward()
    return step


def kernels(info, prior, batch_sample: int, batch_train: int, peak: float, reps: int):
    """One step of each model alone: FLOPs, fp32 time and fraction of the fp32 matmul peak, and
    the time under bf16 autocast (the ratios --amp auto follows; weights as found, or random)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 2048, generator=g), torch.randn(2048, 2048, generator=g)
    shape, dit_model = prior.latent_shape, prior.transformer
    x = torch.randn(batch_sample, *shape, generator=g)
    t = torch.full((batch_sample,), 500)
    y = torch.arange(batch_sample) % (prior.num_labels + 1)  # the null label included
    xt = torch.randn(batch_train, *shape, generator=g)
    tt = torch.randint(0, 1000, (batch_train,), generator=g)
    yt = torch.arange(batch_train) % prior.num_labels
    img = torch.rand(batch_train, info.channels, info.size, info.size, generator=g) * 2 - 1
    rows = [
        ("matmul 2048^2", lambda: a @ b),
        (f"DiT forward, batch {batch_sample} (a CFG sampling step of {batch_sample // 2})",
         torch.no_grad()(lambda: dit_model(x, t, y))),
        (f"DiT forward + backward to x, batch {batch_sample} (a guided step)",
         input_grad(dit_model, x, lambda v: dit_model(v, t, y).sample)),
        (f"DiT training step, batch {batch_train} (01's)", adamw_step(
            dit_model, lambda m: (m(xt, tt, yt).sample.float() - xt).pow(2).mean()))]
    if prior.vae is not None:  # a latent prior: the decode inside guidance, 01's VAE training
        rows += [
            (f"VAE decode + backward to z, batch {batch_sample // 2}", input_grad(
                prior.vae, x[:batch_sample // 2], lambda v: prior.vae.decode(v).sample)),
            (f"VAE training step, batch {batch_train} (01's)", adamw_step(
                prior.vae, lambda m: F.mse_loss(m(img).sample.float(), img)))]
    xi = torch.rand(64, info.channels, info.size, info.size, generator=g) * 2 - 1
    yi = torch.arange(64) % info.num_classes
    rows.append(("ConvNet-3 training step, batch 64 (03's students)", adamw_step(
        C.build_model("convnet-3", info), lambda m: F.cross_entropy(m(xi).float(), yi))))
    print(f"  {'step':62s} {'GFLOP':>6s} {'fp32 ms':>8s} {'% of peak':>9s} {'bf16 ms':>8s} "
          f"{'bf16 speed-up':>13s}")
    for name, fn in rows:
        def under_bf16(fn=fn):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fn()
        f, s32, s16 = flops(fn), best_seconds(fn, reps), best_seconds(under_bf16, reps)
        print(f"  {name:62s} {f / 1e9:6.1f} {s32 * 1e3:8.1f} {100 * f / s32 / peak:7.0f} % "
              f"{s16 * 1e3:8.1f} {s32 / s16:12.2f}x", flush=True)


def reference_fit(model, data: C.Split, info, proto: C.Protocol, epochs: int, workers: int):
    """The reference trainers' loop: a DataLoader that crops each image on its own (in the
    workers), v2.CutMix per batch (mixed targets, cross-entropy), AdamW, MultiStep."""
    from torch.utils.data import DataLoader, TensorDataset, default_collate
    from torchvision.transforms import v2
    crop = v2.Compose([v2.RandomResizedCrop(info.size, scale=(proto.crop_scale, 1.0),
                                            antialias=True), v2.ToDtype(torch.float32, scale=True)])
    cutmix = v2.CutMix(num_classes=info.num_classes, alpha=proto.cutmix_beta)
    loader = DataLoader(TensorDataset(data.x, data.y), batch_size=proto.batch_size, shuffle=True,
                        num_workers=workers, persistent_workers=workers > 0,
                        collate_fn=lambda b: cutmix(*default_collate([(crop(x), y) for x, y in b])))
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
    """Training images per second by kind (ours, reference, compiled); ours under ctx, whose
    conv peak is conv_peak_ours (default the fp32 one)."""
    _, train, _ = C.load_dataset(info.name, info.root, info.size)
    perms = C.class_permutations(train.y, info.num_classes, 0)
    idx = torch.cat([p[:ipc] for p in perms])
    data, proto = C.Split(train.x[idx], train.y[idx]), C.Protocol("hard")
    n = epochs * len(idx)
    model = C.build_model("convnet-3", info)
    xb = torch.rand(proto.batch_size, info.channels, info.size, info.size)
    yb = torch.arange(proto.batch_size) % info.num_classes
    per_image = flops(lambda: F.cross_entropy(model(xb), yb).backward()) / proto.batch_size
    peak_ours = conv_peak_ours or conv_peak_fp32
    # (kind, name, training call, conv peak and its precision for the fraction)
    runs = [("ours", "ours: common.fit, uint8 split, batched augmentation",
             lambda m: C.fit(m, data, info, proto, epochs=epochs, seed=0, ctx=ctx,
                             progress=False), peak_ours, precision(ctx))]
    runs += [("reference", f"reference: DataLoader, per-sample v2 crops + v2.CutMix, {w} workers",
              lambda m, w=w: reference_fit(m, data, info, proto, epochs, w),
              conv_peak_fp32, "fp32") for w in (0, 2)]
    if C.has_cxx_compiler():  # 03's students as --compile auto runs them
        def compiled(m):
            mode = C.COMPILE["mode"]
            C.COMPILE["mode"] = "on"
            try:
                C.fit(m, data, info, proto, epochs=epochs, seed=0, ctx=ctx, progress=False)
            finally:
                C.COMPILE["mode"] = mode
        s = timed(lambda: compiled(C.build_model("convnet-3", info)))
        print(f"  torch.compile's warm-up fit (compiles once per process; inductor's on-disk "
              f"cache as found): {s:.1f} s", flush=True)
        runs.append(("compiled", "ours: common.fit under torch.compile (--compile), after the "
                     "warm-up", compiled, peak_ours, precision(ctx)))
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
    p.add_argument("--ref-images", type=int, default=10, help="images of the reference loop")
    p.add_argument("--steps", type=int, default=50, help="DDPM steps")
    p.add_argument("--ipc", type=int, default=50, help="student training set: IPC real images")
    p.add_argument("--epochs", type=int, default=3, help="student epochs per measurement")
    p.add_argument("--train-batch", type=int, default=128, help="DiT and VAE training batch")
    p.add_argument("--reps", type=int, default=3, help="timed calls per model step (best counts)")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                   help="ours' precision, as the scripts' --amp (default auto: as 02 and 03 run)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default one per core; 1 is steadier on a loaded machine)")
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
        print(f"  the same conv forward + backward under bf16 autocast: "
              f"{conv_fb_ours / 1e9:.1f} GFLOP/s", flush=True)
    print(f"\nDiT sampling, {a.steps} DDPM steps, CFG 4; models from {source}:")
    sampling(prior, teacher, current, a.images, a.ref_images, a.steps, mm, ctx)
    print("\none step of each model in fp32 and under bf16 autocast (target >= 40 % of the "
          "matmul peak for the DiT):")
    if not C.cpu_has_native_bf16():
        print("  note: no native bf16 on this CPU: bf16 is emulated, every ratio below is a loss")
    kernels(info, prior, 2 * a.images, a.train_batch, mm, a.reps)
    print(f"\nstudent training, convnet-3 hard protocol, IPC {a.ipc}, {a.epochs} epochs each:")
    students(info, a.ipc, a.epochs, conv_fb, ctx, conv_fb_ours)
    print(f"\nend: {load()}; {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
