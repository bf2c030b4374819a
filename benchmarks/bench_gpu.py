"""GPU benchmark of guided DiT sampling at paper scale, with randomly initialised weights.

Nothing is downloaded: DiT-XL/2 (diffusers DiTTransformer2DModel with the released config: 28
layers, 16 heads x 72 = 1152 wide, patch 2, 4 channels in and 8 out (learned sigma), 32 x 32
latents, 1000 classes, adaLN-zero) and an AutoencoderKL shaped like sd-vae-ft-mse at 256 px
(blocks 128/256/512/512, 2 layers per block, 4 latent channels, scaling 0.18215) are built from
their configs. Costs do not depend on the weights. One run measures, through dit.sample as 02
calls it:
  - plain CFG sampling and LGD-guided sampling (the gradient of CE(f_cur) - 0.5 CE(f_ref) taken
    back through the VAE decoder and the DiT into x_t), with and without gradient
    checkpointing, under bf16 autocast and in fp32: seconds per sample for one plain or guided
    step, images per second, peak memory per sample;
  - the reference implementations' loop: one image at a time (2 rows with CFG), fp32, no TF32;
  - achieved FLOP/s (torch.utils.flop_counter.FlopCounterMode on the same graph) as a fraction
    of a bf16 matmul measured in the same run and of the datasheet's dense bf16 peak;
  - f_cur's training throughput (ConvNet-6 at 256 px, 03's hard-label protocol);
and prints the ratios and the projected wall time of LGD on ImageNette (IPC 100) and
ImageNet-1K (IPC 50) on 1 and 8 GPUs. The activation memory and FLOPs per guided sample are also
counted on the meta device (no compute), which needs no GPU: --estimate-only prints just those
(the numbers behind 02's --sample-batch defaults).

  python benchmarks/bench_gpu.py                   # make bench-gpu: one GPU, a few minutes
  python benchmarks/bench_gpu.py --tiny            # 2-layer DiT, small VAE, 32 px: CPU, seconds
  python benchmarks/bench_gpu.py --estimate-only   # memory and FLOPs per guided sample, CPU
"""
import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import dit  # noqa: E402

KAPPA = 3  # LGD's candidates per slot
STEPS, WINDOW = 50, (10, 45)  # LGD: 36 of the 50 steps are guided
GUIDED_STEPS = WINDOW[1] - WINDOW[0] + 1
GPU_MEMORY = 80e9  # one H100
# dense bf16 tensor-core peaks from the vendors' datasheets (sparsity doubles them; not used)
# (the first name the device's name contains: the PCIe and NVL H100s are slower than the SXM)
DATASHEET_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,
                  "A100": 312e12}
# the papers' settings the projections use (docs/methods.md §3): f_cur trains 300 epochs from
# scratch on all earlier stages; stage 1 is plain sampling (or an IGD set)
PROJECTIONS = {"ImageNette IPC 100 LGD": {"classes": 10, "stages": 10, "per_stage": 10},
               "ImageNet-1K IPC 50 LGD": {"classes": 1000, "stages": 5, "per_stage": 10}}
GUIDE_EPOCHS = 300


def models(tiny: bool, device):
    """(prior, f_cur, f_ref): the paper-scale models (or --tiny ones), random weights, frozen."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel
    size = 32 if tiny else 256
    info = common.DatasetInfo("bench", 3, size, common.IMAGENET_MEAN, common.IMAGENET_STD,
                              [str(c) for c in range(1000)], flip=True)
    with torch.device(device):  # built where they run: no 3 GB copy, no CPU initialisation
        if tiny:
            transformer = DiTTransformer2DModel(
                num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=1000)
            vae = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                sample_size=size, scaling_factor=0.18215)
        else:
            transformer = DiTTransformer2DModel(
                num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
                norm_type="ada_norm_zero")
            vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                                sample_size=size, scaling_factor=0.18215)
        f_cur = common.build_model("convnet-1" if tiny else "convnet-6", info)
        f_ref = common.build_model("convnet-1-bn" if tiny else "resnet18", info)
    # DiT's training schedule: 1000 linear betas, eps prediction (+ learned variance)
    sched = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
             "beta_schedule": "linear", "prediction_type": "epsilon"}
    # .to: a buffer a constructor makes from numpy would stay on the CPU
    prior = dit.Prior(transformer.to(device), sched, info, vae.to(device))
    return prior, f_cur.to(device).eval().requires_grad_(False), \
        f_ref.to(device).eval().requires_grad_(False)


def params(*mods) -> int:
    return sum(p.numel() for m in mods for p in m.parameters())


# ------------------------------------------------------------------------------------------
# on the meta device: activation memory and FLOPs of one guided sample, without computing
# ------------------------------------------------------------------------------------------


def guided_graph(prior, terms, dtype):
    """One guided step of one sample, as dit.guided_step builds it: the DiT on the conditional
    and null rows, CFG, x0, the VAE decoder, the guidance objective; (x_t, G)."""
    c, s, _ = prior.latent_shape
    dev = prior.device
    x = torch.randn(1, c, s, s, device=dev, dtype=dtype, requires_grad=True)
    y = torch.zeros(1, dtype=torch.long, device=dev)
    out = prior.transformer(torch.cat([x, x]), torch.full((2,), 500, device=dev),
                            torch.cat([y, torch.full_like(y, prior.num_labels)])).sample
    eps = out[1:, :c] + 4.0 * (out[:1, :c] - out[1:, :c])  # CFG 4
    x0 = (x - 0.6 * eps) / 0.8  # any abar: the graph's shape is what counts
    img = ((prior.vae.decode(x0 / prior.vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    return x, dit.objective(terms, img, y)


def saved_activations(prior, terms, dtype) -> dict:
    """Bytes kept for the backward pass of one guided sample, without and with checkpointing.

    Every tensor autograd saves is counted once (by storage), parameters aside, and booked to
    the checkpointed unit it was made in (a DiT block, the VAE decoder's mid block or an up
    block: what diffusers checkpoints) or to the rest. With checkpointing a unit keeps only its
    input, and the backward pass recomputes one unit at a time: rest + inputs + largest unit.
    The weights are cast to `dtype` as a stand-in for autocast, which keeps norms in fp32: the
    real figure lies between the bf16 and fp32 counts.
    """
    tr, dec = prior.transformer, prior.vae.decoder
    for m in (tr, prior.vae):
        m.to(dtype)
    units = list(tr.transformer_blocks) + [dec.mid_block] + list(dec.up_blocks)
    skip = {p.untyped_storage()._cdata for m in (tr, prior.vae) for p in
            list(m.parameters()) + list(m.buffers())}
    for t in terms:  # the classifiers' weights are not activations either
        for m in _modules_of(t):
            skip |= {p.untyped_storage()._cdata for p in list(m.parameters()) + list(m.buffers())}
    stack, booked, inputs, seen = [None], {}, {}, set()

    def enter(module, args):
        stack.append(module)
        inputs[module] = sum(a.untyped_storage().nbytes() for a in args if torch.is_tensor(a))

    def leave(module, args, out):
        stack.pop()

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in skip and key not in seen:
            seen.add(key)
            booked[stack[-1]] = booked.get(stack[-1], 0) + t.untyped_storage().nbytes()
        return t
    hooks = [u.register_forward_pre_hook(enter) for u in units] + \
        [u.register_forward_hook(leave) for u in units]
    try:
        prior.set_checkpointing(False)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            guided_graph(prior, terms, dtype)
    finally:
        for h in hooks:
            h.remove()
        for m in (tr, prior.vae):
            m.float()
    rest = booked.get(None, 0)
    return {"no_checkpointing": sum(booked.values()),
            "checkpointing": rest + sum(inputs.values()) + max(booked.get(u, 0) for u in units),
            "dit_units": sum(booked.get(u, 0) for u in tr.transformer_blocks),
            "vae_units": sum(booked.get(u, 0) for u in units[len(tr.transformer_blocks):]),
            "rest": rest}


def _modules_of(term):
    """The classifier inside a guidance term's closure (ce_score(model))."""
    cells = getattr(term.fn, "__closure__", None) or ()
    return [c.cell_contents for c in cells if isinstance(c.cell_contents, torch.nn.Module)]


def step_flops(prior, terms, checkpointing: bool) -> dict:
    """FLOPs of one sample's plain step (the DiT's two rows) and guided step (forward,
    backward to x_t, and with checkpointing the recomputed forward of every unit)."""
    c, s, _ = prior.latent_shape
    prior.set_checkpointing(checkpointing)
    with FlopCounterMode(display=False) as fc:
        x = torch.randn(2, c, s, s, device=prior.device)
        with torch.no_grad():
            prior.transformer(x, torch.full((2,), 500, device=prior.device),
                              torch.zeros(2, dtype=torch.long, device=prior.device))
    plain = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        x, G = guided_graph(prior, terms, torch.float32)
        torch.autograd.grad(G.sum(), x)
    prior.set_checkpointing(False)
    return {"plain": plain, "guided": fc.get_total_flops()}


def estimate(tiny: bool) -> dict:
    """Memory and FLOPs per guided sample on the meta device, and the batch rule they give."""
    prior, f_cur, f_ref = models(tiny, "meta")
    terms = dit.learnability_terms(f_cur, f_ref, 0.5)
    mem = {name: saved_activations(prior, terms, dt)
           for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    flops = {"no_checkpointing": step_flops(prior, terms, False),
             "checkpointing": step_flops(prior, terms, True)}
    # resident: fp32 weights plus autocast's bf16 copies of the DiT's and VAE's weights
    n_prior, n_cls = params(prior.transformer, prior.vae), params(f_cur, f_ref)
    fixed = n_prior * 6 + n_cls * 6
    headroom = 0.1 * GPU_MEMORY  # the allocator's fragmentation and transient gradients
    largest = {f"{k} ({dt})": int((GPU_MEMORY - fixed - headroom) // mem[dt][k])
               for k in ("no_checkpointing", "checkpointing") for dt in ("fp32", "bf16")}
    return {"parameters": {"dit": params(prior.transformer), "vae": params(prior.vae),
                           "f_cur": params(f_cur), "f_ref": params(f_ref)},
            "activation_bytes_per_guided_sample": mem, "flops_per_sample_step": flops,
            "resident_bytes": fixed, "largest_batch_80GB": largest}


# ------------------------------------------------------------------------------------------
# on the device: timings of dit.sample
# ------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_once(prior, terms, batch: int, steps: int, guided: bool, ctx) -> float:
    """Seconds for one dit.sample call over `batch` slots of distinct classes, every step
    guided (window 0..49) or none; LGD's deviation term against a full 64-latent memory."""
    dev = prior.device
    y = torch.arange(batch, device=dev)
    guide = None
    if guided:
        memory = dit.Memory(64)
        memory.add(torch.randn(64 * batch, *prior.latent_shape, device=dev),
                   y.repeat_interleave(64))
        guide = dit.Guidance(terms=terms, scale=15.0, window=(0, 49), deviation=50.0,
                             memory=memory)
    sync(dev)
    t0 = time.perf_counter()
    dit.sample(prior, y, list(range(batch)), steps=steps, cfg=4.0, guidance=guide,
               slot_batches=[list(range(batch))], ctx=ctx, progress=False)
    sync(dev)
    return time.perf_counter() - t0


def measure(prior, terms, cfg: dict, step_pair, device) -> dict:
    """Per-sample seconds of one step and of the fixed part (noise, final decode), from two
    step counts; peak memory per sample on CUDA. An out-of-memory batch is reported as such."""
    batch, guided = cfg["batch"], cfg["guided"]
    prior.set_checkpointing(cfg["checkpointing"])
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if cfg["bf16"] else nullcontext()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg["tf32"]
    out = {**cfg}
    try:
        sample_once(prior, terms, batch, 1, guided, ctx)  # warm-up: kernels, allocator
        t1 = sample_once(prior, terms, batch, step_pair[0], guided, ctx)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t2 = sample_once(prior, terms, batch, step_pair[1], guided, ctx)
        step = max(t2 - t1, 1e-9) / (step_pair[1] - step_pair[0])
        out.update(step_s=step / batch, fixed_s=max(t1 - step_pair[0] * step, 0.0) / batch,
                   peak_bytes_per_sample=(torch.cuda.max_memory_allocated(device) - base) / batch
                   if device.type == "cuda" else None)
    except torch.OutOfMemoryError:
        out["oom"] = True
        torch.cuda.empty_cache()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        prior.set_checkpointing(False)
    return out


def dit_fwd_bwd(prior, batch: int, ctx, device, reps: int) -> dict:
    """The DiT alone, as a guided step runs it without checkpointing: forward of 2 x batch rows
    (conditional and null) under ctx and backward to x; FLOPs counted by FlopCounterMode on one
    call, then timed over `reps` calls. The issue's '% of bf16 peak in the DiT forward/backward'."""
    c, s, _ = prior.latent_shape
    prior.set_checkpointing(False)
    x = torch.randn(2 * batch, c, s, s, device=device, requires_grad=True)
    t = torch.full((2 * batch,), 500, device=device)
    y = torch.arange(2 * batch, device=device) % prior.num_labels

    def once():  # backward(), not autograd.grad: the latter trips over a module hook's
        x.grad = None  # leaf check (RuntimeError: "A leaf node was passed to ...")
        with ctx:
            out = prior.transformer(x, t, y).sample
        out.float().sum().backward()  # the weights are frozen: only x gets a gradient
    try:
        once()  # warm-up
        with FlopCounterMode(display=False) as fc:
            once()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            once()
        sync(device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"batch": batch, "oom": True}
    seconds = (time.perf_counter() - t0) / reps
    return {"batch": batch, "seconds": seconds, "flops": fc.get_total_flops(),
            "flop_s": fc.get_total_flops() / seconds}


def matmul_peak(device, n: int) -> float:
    """FLOP/s of a large bf16 matmul on this device: the achievable peak."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    sync(device)
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def fcur_throughput(tiny: bool, device, ctx) -> float:
    """Training images per second of f_cur under 03's hard-label protocol (one epoch after a
    warm-up epoch), on random images at the benchmark's size."""
    info = common.DatasetInfo("bench", 3, 32 if tiny else 256, common.IMAGENET_MEAN,
                              common.IMAGENET_STD, [str(c) for c in range(10)], flip=True)
    n = 64 if tiny else 640
    g = torch.Generator().manual_seed(0)
    data = common.Split(torch.randint(0, 256, (n, 3, info.size, info.size), generator=g,
                                      dtype=torch.uint8), torch.arange(n) % 10).to(device)
    model = common.build_model("convnet-1" if tiny else "convnet-6", info).to(device)
    proto = common.Protocol("hard")
    common.fit(model, data, info, proto, epochs=1, seed=0, ctx=ctx, progress=False)
    sync(device)
    t0 = time.perf_counter()
    common.fit(model, data, info, proto, epochs=1, seed=1, ctx=ctx, progress=False)
    sync(device)
    return n / (time.perf_counter() - t0)


def lgd_cost(run: dict, plain: dict) -> float | None:
    """Seconds per LGD sample: 36 guided steps at this batch, 14 plain steps, the fixed part."""
    if run.get("oom") or plain.get("oom"):
        return None
    return run["fixed_s"] + GUIDED_STEPS * run["step_s"] + (STEPS - GUIDED_STEPS) * plain["step_s"]


def project(name: str, spec: dict, gpus: int, costs: dict, batch: int, plain_s: float,
            train_rate: float) -> dict:
    """Wall time of one LGD run on `gpus` GPUs:
      T = busiest rank's share x (guided images x kappa x c_guided + plain images x c_plain)
          + sum over stages k >= 2 of epochs x |D_{k-1}| / f_cur images per second.
    The class groups (sample batch / kappa classes) go round-robin to the ranks; the busiest
    rank gets ceil(groups / gpus) of them. f_cur is trained on rank 0 alone. Of the two
    measured batches (the default and one class per group) the faster is taken."""
    C, K, n = spec["classes"], spec["stages"], spec["per_stage"]
    best = None
    for b, c_guided in costs.items():
        if c_guided is None:
            continue
        per_group = max(1, b // KAPPA)
        groups = math.ceil(C / per_group)
        busiest = min(C, math.ceil(groups / gpus) * per_group)  # classes on that rank
        t = busiest * ((K - 1) * n * KAPPA * c_guided + n * plain_s)
        if best is None or t < best[0]:
            best = (t, b)
    fcur = sum(GUIDE_EPOCHS * C * n * k for k in range(1, K)) / train_rate
    return {"task": name, "gpus": gpus, "sample_batch": best[1], "sampling_s": best[0],
            "f_cur_s": fcur, "total_s": best[0] + fcur,
            "guided_images": C * (K - 1) * n, "plain_images": C * n}


def hours(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min"


def gb(b) -> str:
    return "-" if b is None else f"{b / 1e9:.2f} GB"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="2-layer width-64 DiT, small VAE at 32 px, few steps (CPU smoke test)")
    p.add_argument("--estimate-only", action="store_true",
                   help="only the meta-device counts of memory and FLOPs (no GPU needed)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch", type=common.positive_int, default=None,
                   help="guided batch with checkpointing (default 02's paper default, 30)")
    p.add_argument("--batch-no-ckpt", type=common.positive_int, default=None,
                   help="guided batch without checkpointing (default 15)")
    p.add_argument("--plain-batch", type=common.positive_int, default=None,
                   help="plain sampling batch (default 64)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_gpu.json"),
                   help="every number as JSON")
    a = p.parse_args()
    t_start = time.time()
    est = estimate(a.tiny)
    mem, flops = est["activation_bytes_per_guided_sample"], est["flops_per_sample_step"]
    print(f"models: DiT {est['parameters']['dit'] / 1e6:.1f} M, VAE "
          f"{est['parameters']['vae'] / 1e6:.1f} M, f_cur {est['parameters']['f_cur'] / 1e6:.2f} M"
          f", f_ref {est['parameters']['f_ref'] / 1e6:.2f} M parameters"
          + (" (--tiny)" if a.tiny else " (DiT-XL/2, sd-vae-ft-mse shape, 256 px)"))
    print("activations kept per guided sample (meta-device count; autocast lies between):")
    for dt in ("fp32", "bf16"):
        m = mem[dt]
        print(f"  {dt} weights: without checkpointing {gb(m['no_checkpointing'])} (DiT blocks "
              f"{gb(m['dit_units'])}, VAE decoder blocks {gb(m['vae_units'])}, rest "
              f"{gb(m['rest'])}); with checkpointing {gb(m['checkpointing'])}")
    print(f"  resident weights ~{gb(est['resident_bytes'])}; largest batch on 80 GB with 10 % "
          f"headroom: " + ", ".join(f"{k} {v}" for k, v in est["largest_batch_80GB"].items()))
    fn, fc = flops["no_checkpointing"], flops["checkpointing"]
    print(f"FLOPs per sample: plain step {fn['plain'] / 1e9:.1f} G, guided step "
          f"{fn['guided'] / 1e9:.1f} G ({fc['guided'] / 1e9:.1f} G with checkpointing: "
          f"x{fc['guided'] / fn['guided']:.2f})")
    result = {"tiny": a.tiny, "estimate": est}
    if a.estimate_only:
        common.write_json(a.out, result)
        return
    device, _ = common.setup_device(a.device, "auto")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    batch = a.batch or (6 if a.tiny else 30)
    batch_nc = a.batch_no_ckpt or (6 if a.tiny else 15)
    plain_batch = a.plain_batch or (6 if a.tiny else 64)
    step_pair = (1, 2) if a.tiny else (2, 6)
    torch.manual_seed(0)
    prior, f_cur, f_ref = models(a.tiny, device)
    terms = dit.learnability_terms(f_cur, f_ref, 0.5)
    print(f"device {device} ({name}); steps {step_pair[0]} and {step_pair[1]} per run")
    configs = {  # name -> batch, guided, bf16 autocast, checkpointing, TF32
        "plain bf16": (plain_batch, False, True, False, True),
        "plain fp32": (plain_batch, False, False, False, True),
        "guided bf16 ckpt": (batch, True, True, True, True),
        "guided bf16 no-ckpt": (batch_nc, True, True, False, True),
        "guided fp32 ckpt": (batch, True, False, True, True),
        "guided bf16 ckpt, one class group": (KAPPA, True, True, True, True),
        "reference plain: 1 image, fp32, no TF32": (1, False, False, False, False),
        "reference guided: 1 image, fp32, no TF32": (1, True, False, False, False),
    }
    runs = {}
    for label, (b, guided, bf16, ckpt, tf32) in configs.items():
        cfg = {"batch": b, "guided": guided, "bf16": bf16, "checkpointing": ckpt, "tf32": tf32}
        r = measure(prior, terms, cfg, step_pair, device)
        per_step_flops = (fc if ckpt else fn)["guided" if guided else "plain"]
        if not r.get("oom"):
            r["flop_s"] = per_step_flops / r["step_s"]
        runs[label] = r
        print(f"  {label:42s} batch {b:3d}: " + ("out of memory" if r.get("oom") else
              f"{r['step_s'] * 1e3:8.2f} ms/sample/step, {r['flop_s'] / 1e12:7.2f} TFLOP/s, "
              f"peak {gb(r['peak_bytes_per_sample'])}/sample"))
    peak = matmul_peak(device, 128 if a.tiny else 8192)
    sheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    dit_alone = dit_fwd_bwd(prior, batch, torch.autocast(device.type, dtype=torch.bfloat16),
                            device, 2 if a.tiny else 10)
    print(f"  {'DiT alone: forward + backward to x, bf16':42s} batch {batch:3d}: "
          + ("out of memory" if dit_alone.get("oom") else
             f"{dit_alone['seconds'] * 1e3:8.2f} ms, {dit_alone['flop_s'] / 1e12:7.2f} TFLOP/s"))
    rate = fcur_throughput(a.tiny, device, torch.autocast(device.type, dtype=torch.bfloat16)
                           if device.type == "cuda" else nullcontext())
    plain = runs["plain bf16"]
    costs = {batch: lgd_cost(runs["guided bf16 ckpt"], plain),
             KAPPA: lgd_cost(runs["guided bf16 ckpt, one class group"], plain)}
    ref_cost = lgd_cost(runs["reference guided: 1 image, fp32, no TF32"],
                        runs["reference plain: 1 image, fp32, no TF32"])
    plain_image = plain["fixed_s"] + STEPS * plain["step_s"] if not plain.get("oom") else None

    def ratio(x, y):
        return None if x is None or y is None or y == 0 else x / y
    g, n = runs["guided bf16 ckpt"], runs["guided bf16 no-ckpt"]
    ratios = {
        "guided / plain step (bf16, batched)": ratio(g.get("step_s"), plain.get("step_s")),
        "checkpointing time (per guided step)": ratio(g.get("step_s"), n.get("step_s")),
        "checkpointing memory (per guided sample)":
            ratio(g.get("peak_bytes_per_sample"), n.get("peak_bytes_per_sample")),
        "bf16 speed-up, plain": ratio(runs["plain fp32"].get("step_s"), plain.get("step_s")),
        "bf16 speed-up, guided (ckpt)": ratio(runs["guided fp32 ckpt"].get("step_s"),
                                              g.get("step_s")),
        "LGD sample: reference loop / batched bf16 ckpt": ratio(ref_cost, costs[batch]),
        "achieved / measured bf16 matmul (guided bf16 ckpt)": ratio(g.get("flop_s"), peak),
        "achieved / datasheet bf16 (guided bf16 ckpt)": ratio(g.get("flop_s"), sheet),
        "DiT forward+backward bf16 / measured bf16 matmul": ratio(dit_alone.get("flop_s"), peak),
        "DiT forward+backward bf16 / datasheet bf16": ratio(dit_alone.get("flop_s"), sheet),
    }
    print(f"bf16 matmul {peak / 1e12:.1f} TFLOP/s measured; datasheet dense bf16 "
          + (f"{sheet / 1e12:.0f} TFLOP/s" if sheet else "unknown for this device"))
    print(f"f_cur ({'convnet-1' if a.tiny else 'convnet-6'}) training: {rate:.0f} images/s")
    print("ratios:")
    for k, v in ratios.items():
        print(f"  {k:52s} " + ("-" if v is None else f"{v:.3f}"))
    print(f"seconds per LGD sample ({STEPS} steps, {GUIDED_STEPS} guided): batched bf16 ckpt "
          + ", ".join(f"batch {b}: {c:.3f} s" if c is not None else f"batch {b}: -"
                      for b, c in costs.items())
          + (f"; reference loop {ref_cost:.3f} s" if ref_cost is not None else ""))
    print("projected wall time: T = busiest rank's share x (guided images x kappa x c_guided + "
          "plain images x c_plain) + sum_k 300 epochs x |D_k-1| / f_cur images/s")
    projections = []
    if plain_image is not None and any(c is not None for c in costs.values()):
        for task, spec in PROJECTIONS.items():
            for gpus in (1, 8):
                pr = project(task, spec, gpus, costs, batch, plain_image, rate)
                projections.append(pr)
                print(f"  {task:24s} {gpus} GPU{'s' if gpus > 1 else ' '}: "
                      f"{hours(pr['total_s'])} (sampling {hours(pr['sampling_s'])} at "
                      f"--sample-batch {pr['sample_batch']}, f_cur {hours(pr['f_cur_s'])})")
    result.update(device=name, runs=runs, dit_fwd_bwd=dit_alone, matmul_bf16_flop_s=peak,
                  datasheet_bf16_flop_s=sheet,
                  f_cur_images_per_s=rate, lgd_seconds_per_sample={str(k): v for k, v in
                                                                   costs.items()},
                  reference_seconds_per_sample=ref_cost, ratios=ratios,
                  projections=projections, wall_s=time.time() - t_start)
    common.write_json(a.out, result)
    print(f"bench_gpu done in {time.time() - t_start:.0f} s: {a.out}")


if __name__ == "__main__":
    main()
