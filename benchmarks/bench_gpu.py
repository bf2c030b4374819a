"""Guided DiT sampling at paper scale on one GPU, with random weights (nothing downloaded).
DiT-XL/2 and an sd-vae-ft-mse-shaped VAE at 256 px: counts memory and FLOPs per guided sample on
the meta device (no GPU: the numbers behind 02's --sample-batch), then times dit.sample as 02 calls
it, plain and LGD-guided, with and without checkpointing, bf16 and fp32, against the one-image fp32
loop; FLOP/s against a bf16 matmul and the datasheet; f_cur's training rate; the ratios and LGD's
projected wall time on 1 and 8 GPUs. Writes every number to --out.
  python benchmarks/bench_gpu.py                   # make bench-gpu: one GPU, a few minutes
  python benchmarks/bench_gpu.py --tiny            # 2-layer DiT, small VAE, 32 px: CPU, seconds
  python benchmarks/bench_gpu.py --estimate-only   # memory and FLOPs per guided sample, CPU
"""
import argparse
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
STEPS, GUIDED_STEPS = 50, 36  # LGD's window [10, 45] of the 50 steps
GPU_MEMORY = 80e9  # one H100
# dense bf16 peaks from the datasheets; the first key the device's name contains counts
DATASHEET_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,
                  "A100": 312e12}
# the papers' settings (docs/methods.md §3): f_cur trains 300 epochs on all earlier stages
PROJECTIONS = {"ImageNette IPC 100 LGD": {"classes": 10, "stages": 10, "per_stage": 10},
               "ImageNet-1K IPC 50 LGD": {"classes": 1000, "stages": 5, "per_stage": 10}}
GUIDE_EPOCHS = 300


def models(tiny: bool, device):
    """(prior, f_cur, f_ref): the paper-scale models (or --tiny ones), random weights, frozen."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel
    info = common.DatasetInfo("bench", 3, 32 if tiny else 256, common.IMAGENET_MEAN,
                              common.IMAGENET_STD, [str(c) for c in range(1000)], flip=True)
    # DiT-XL/2: 16 heads x 72 = 1152 wide, 28 layers; sd-vae-ft-mse: blocks 128/256/512/512
    dit_shape = dict(num_attention_heads=2, attention_head_dim=32, num_layers=2, sample_size=16) \
        if tiny else dict(num_attention_heads=16, attention_head_dim=72, num_layers=28,
                          sample_size=32, norm_type="ada_norm_zero")
    vae_shape = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8) \
        if tiny else dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    n = len(vae_shape["block_out_channels"])
    with torch.device(device):  # built where they run: no 3 GB copy from the CPU
        transformer = DiTTransformer2DModel(in_channels=4, out_channels=8, patch_size=2,
                                            num_embeds_ada_norm=1000, **dit_shape)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                            up_block_types=("UpDecoderBlock2D",) * n, latent_channels=4,
                            sample_size=info.size, scaling_factor=0.18215, **vae_shape)
        f_cur = common.build_model("convnet-1" if tiny else "convnet-6", info)
        f_ref = common.build_model("convnet-1-bn" if tiny else "resnet18", info)
    sched = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
             "beta_schedule": "linear", "prediction_type": "epsilon"}  # DiT's training one
    # .to: a buffer a constructor makes from numpy would stay on the CPU
    prior = dit.Prior(transformer.to(device), sched, info, vae.to(device))
    return prior, f_cur.to(device).eval().requires_grad_(False), \
        f_ref.to(device).eval().requires_grad_(False)


def guided_graph(prior, terms, dtype):
    """(x_t, G) of one sample's guided step as dit.guided_step builds it: DiT, CFG, x0, decode."""
    c, dev = prior.latent_shape[0], prior.device
    x = torch.randn(1, *prior.latent_shape, device=dev, dtype=dtype, requires_grad=True)
    y = torch.zeros(1, dtype=torch.long, device=dev)
    out = prior.transformer(torch.cat([x, x]), torch.full((2,), 500, device=dev),
                            torch.cat([y, torch.full_like(y, prior.num_labels)])).sample
    eps = out[1:, :c] + 4.0 * (out[:1, :c] - out[1:, :c])  # CFG 4
    x0 = (x - 0.6 * eps) / 0.8  # any abar: the graph's shape is what counts
    img = ((prior.vae.decode(x0 / prior.vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    return x, dit.objective(terms, img, y)


def saved_activations(prior, terms, classifiers, dtype) -> dict:
    """Bytes autograd saves for one guided sample (by storage, weights aside) per unit diffusers
    checkpoints (a DiT block, the VAE decoder's mid or up block) or the rest; with checkpointing
    rest + unit inputs + the largest unit. Weights cast to `dtype` stand in for autocast."""
    tr, dec = prior.transformer, prior.vae.decoder
    for m in (tr, prior.vae):
        m.to(dtype)
    units = list(tr.transformer_blocks) + [dec.mid_block] + list(dec.up_blocks)
    skip = {p.untyped_storage()._cdata for m in (tr, prior.vae, *classifiers) for p in
            list(m.parameters()) + list(m.buffers())}
    stack, booked, inputs = [None], {}, {}  # the unit running now; bytes per unit; inputs

    def enter(module, args):
        stack.append(module)
        inputs[module] = sum(a.untyped_storage().nbytes() for a in args if torch.is_tensor(a))

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in skip:  # each storage once
            skip.add(key)
            booked[stack[-1]] = booked.get(stack[-1], 0) + t.untyped_storage().nbytes()
        return t

    def leave(module, args, out):  # returns None: the output stays as it is
        stack.pop()
    hooks = [u.register_forward_pre_hook(enter) for u in units] + \
        [u.register_forward_hook(leave) for u in units]
    prior.set_checkpointing(False)  # the units' own activations, to book them
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        guided_graph(prior, terms, dtype)
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


def step_flops(prior, terms, checkpointing: bool) -> dict:
    """FLOPs of one sample's plain step (two DiT rows) and guided step (with any recompute)."""
    prior.set_checkpointing(checkpointing)
    x = torch.randn(2, *prior.latent_shape, device=prior.device)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        prior.transformer(x, torch.full((2,), 500, device=prior.device),
                          torch.zeros(2, dtype=torch.long, device=prior.device))
    plain = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        x, G = guided_graph(prior, terms, torch.float32)
        torch.autograd.grad(G.sum(), x)
    prior.set_checkpointing(False)
    return {"plain": plain, "guided": fc.get_total_flops()}


def estimate(tiny: bool) -> dict:
    """Memory and FLOPs per guided sample on the meta device, and the batch rule; printed."""
    prior, f_cur, f_ref = models(tiny, "meta")

    def params(*mods) -> int:
        return sum(p.numel() for m in mods for p in m.parameters())
    terms = dit.learnability_terms(f_cur, f_ref, 0.5)
    mem = {name: saved_activations(prior, terms, (f_cur, f_ref), dt)
           for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    flops = {"no_checkpointing": step_flops(prior, terms, False),
             "checkpointing": step_flops(prior, terms, True)}
    # resident: fp32 weights plus autocast's bf16 copies of the DiT's and VAE's weights
    fixed = 6 * params(prior.transformer, prior.vae, f_cur, f_ref)
    headroom = 0.1 * GPU_MEMORY  # the allocator's fragmentation and transient gradients
    largest = {f"{k} ({dt})": int((GPU_MEMORY - fixed - headroom) // mem[dt][k])
               for k in ("no_checkpointing", "checkpointing") for dt in ("fp32", "bf16")}
    n = {"dit": params(prior.transformer), "vae": params(prior.vae), "f_cur": params(f_cur),
         "f_ref": params(f_ref)}
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in n.items())
          + (" (--tiny)" if tiny else " (DiT-XL/2, sd-vae-ft-mse shape, 256 px)"))
    print("activations kept per guided sample (meta-device count; autocast lies between):")
    for dt, m in mem.items():
        print(f"  {dt} weights: without checkpointing {gb(m['no_checkpointing'])} (DiT blocks "
              f"{gb(m['dit_units'])}, VAE decoder blocks {gb(m['vae_units'])}, rest "
              f"{gb(m['rest'])}); with checkpointing {gb(m['checkpointing'])}")
    print(f"  resident weights ~{gb(fixed)}; largest batch on 80 GB with 10 % headroom: "
          + ", ".join(f"{k} {v}" for k, v in largest.items()))
    fn, fc = flops["no_checkpointing"], flops["checkpointing"]
    print(f"FLOPs per sample: plain step {fn['plain'] / 1e9:.1f} G, guided step "
          f"{fn['guided'] / 1e9:.1f} G ({fc['guided'] / 1e9:.1f} G with checkpointing: "
          f"x{fc['guided'] / fn['guided']:.2f})")
    return {"parameters": n, "activation_bytes_per_guided_sample": mem,
            "flops_per_sample_step": flops, "resident_bytes": fixed, "largest_batch_80GB": largest}


def seconds(fn, device, reps: int = 1) -> float:
    """Mean seconds of `reps` calls of fn (warm-ups are the caller's), CUDA synchronised."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def measure(prior, terms, cfg: dict, step_pair, device, flops_per_step: float) -> dict:
    """Per-sample seconds (and FLOP/s) of one step and of the fixed part, from dit.sample at two
    step counts, every step guided or none; peak memory per sample on CUDA."""
    batch = cfg["batch"]
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if cfg["bf16"] else nullcontext()

    def sample(steps) -> float:
        y = torch.arange(batch, device=device)
        guide = None
        if cfg["guided"]:  # LGD's deviation term against a full 64-latent memory per class
            memory = dit.Memory(64)
            memory.add(torch.randn(64 * batch, *prior.latent_shape, device=device),
                       y.repeat_interleave(64))
            guide = dit.Guidance(terms=terms, scale=15.0, window=(0, 49), deviation=50.0,
                                 memory=memory)
        return seconds(lambda: dit.sample(prior, y, list(range(batch)), steps=steps, cfg=4.0,
                                          guidance=guide, slot_batches=[list(range(batch))],
                                          ctx=ctx, progress=False), device)
    prior.set_checkpointing(cfg["checkpointing"])
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg["tf32"]
    out = {**cfg}
    try:
        sample(1)  # warm-up: kernels, allocator
        t1 = sample(step_pair[0])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t2 = sample(step_pair[1])
        step = max(t2 - t1, 1e-9) / (step_pair[1] - step_pair[0])
        out.update(step_s=step / batch, fixed_s=max(t1 - step_pair[0] * step, 0.0) / batch,
                   peak_bytes_per_sample=(torch.cuda.max_memory_allocated(device) - base) / batch
                   if device.type == "cuda" else None)
        out["flop_s"] = flops_per_step / out["step_s"]
    except torch.OutOfMemoryError:
        out["oom"] = True
        torch.cuda.empty_cache()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        prior.set_checkpointing(False)
    return out


def dit_fwd_bwd(prior, batch: int, ctx, device, reps: int) -> dict:
    """The DiT alone as a guided step runs it: 2 x batch rows forward under ctx, backward to x."""
    prior.set_checkpointing(False)
    x = torch.randn(2 * batch, *prior.latent_shape, device=device, requires_grad=True)
    t = torch.full((2 * batch,), 500, device=device)
    y = torch.arange(2 * batch, device=device) % prior.num_labels

    def once():  # backward(), not autograd.grad: the latter trips over a module hook's
        x.grad = None  # leaf check (RuntimeError: "A leaf node was passed to ...")
        with ctx:
            out = prior.transformer(x, t, y).sample
        out.float().sum().backward()  # the weights are frozen: only x gets a gradient
    try:
        with FlopCounterMode(display=False) as fc:  # also the warm-up call
            once()
        s = seconds(once, device, reps)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"batch": batch, "oom": True}
    return {"batch": batch, "seconds": s, "flops": fc.get_total_flops(),
            "flop_s": fc.get_total_flops() / s}


def fcur_throughput(tiny: bool, device, ctx) -> float:
    """Training images/s of f_cur under 03's hard protocol (an epoch after a warm-up epoch)."""
    info = common.DatasetInfo("bench", 3, 32 if tiny else 256, common.IMAGENET_MEAN,
                              common.IMAGENET_STD, [str(c) for c in range(10)], flip=True)
    n = 64 if tiny else 640
    x = torch.randint(0, 256, (n, 3, info.size, info.size), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    data = common.Split(x, torch.arange(n) % 10).to(device)
    model = common.build_model("convnet-1" if tiny else "convnet-6", info).to(device)
    proto = common.Protocol("hard")
    common.fit(model, data, info, proto, epochs=1, seed=0, ctx=ctx, progress=False)  # warm-up
    return n / seconds(lambda: common.fit(model, data, info, proto, epochs=1, seed=1, ctx=ctx,
                                          progress=False), device)


def lgd_cost(run: dict, plain: dict) -> float | None:
    """Seconds per LGD sample: 36 guided steps at this batch, 14 plain steps, the fixed part."""
    if run.get("oom") or plain.get("oom"):
        return None
    return run["fixed_s"] + GUIDED_STEPS * run["step_s"] + (STEPS - GUIDED_STEPS) * plain["step_s"]


def project(name: str, spec: dict, gpus: int, costs: dict, plain_s: float,
            train_rate: float) -> dict:
    """Wall time of LGD on `gpus` GPUs at the faster measured batch (the T that main prints)."""
    C, K, n = spec["classes"], spec["stages"], spec["per_stage"]

    def sampling_s(b, c_guided):
        per_group = max(1, b // KAPPA)
        busiest = min(C, math.ceil(math.ceil(C / per_group) / gpus) * per_group)
        return busiest * ((K - 1) * n * KAPPA * c_guided + n * plain_s)
    t, b = min((sampling_s(b, c), b) for b, c in costs.items() if c is not None)
    fcur = sum(GUIDE_EPOCHS * C * n * k for k in range(1, K)) / train_rate
    return {"task": name, "gpus": gpus, "sample_batch": b, "sampling_s": t, "f_cur_s": fcur,
            "total_s": t + fcur, "guided_images": C * (K - 1) * n, "plain_images": C * n}


def gb(b) -> str:
    return "-" if b is None else f"{b / 1e9:.2f} GB"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="2-layer DiT, small VAE, 32 px: a CPU test")
    p.add_argument("--estimate-only", action="store_true", help="the meta-device counts alone")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pos = common.positive_int
    p.add_argument("--batch", type=pos, help="guided batch with checkpointing (default 30)")
    p.add_argument("--batch-no-ckpt", type=pos, help="guided batch without it (default 15)")
    p.add_argument("--plain-batch", type=pos, help="plain sampling batch (default 64)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_gpu.json"),
                   help="the JSON of every number (default %(default)s)")
    a = p.parse_args()
    t_start = time.time()
    est = estimate(a.tiny)
    result = {"tiny": a.tiny, "estimate": est}
    if a.estimate_only:
        common.write_json(a.out, result)
        return
    device, _ = common.setup_device(a.device, "auto")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    batch = a.batch or (6 if a.tiny else 30)
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
        "guided bf16 no-ckpt": (a.batch_no_ckpt or (6 if a.tiny else 15), True, True, False, True),
        "guided fp32 ckpt": (batch, True, False, True, True),
        "guided bf16 ckpt, one class group": (KAPPA, True, True, True, True),
        "reference plain: 1 image, fp32, no TF32": (1, False, False, False, False),
        "reference guided: 1 image, fp32, no TF32": (1, True, False, False, False),
    }
    runs = {}
    for label, values in configs.items():
        cfg = dict(zip(("batch", "guided", "bf16", "checkpointing", "tf32"), values))
        kind = "checkpointing" if cfg["checkpointing"] else "no_checkpointing"
        per_step = est["flops_per_sample_step"][kind]["guided" if cfg["guided"] else "plain"]
        r = runs[label] = measure(prior, terms, cfg, step_pair, device, per_step)
        print(f"  {label:42s} batch {cfg['batch']:3d}: " + ("out of memory" if r.get("oom") else
              f"{r['step_s'] * 1e3:8.2f} ms/sample/step, {r['flop_s'] / 1e12:7.2f} TFLOP/s, "
              f"peak {gb(r['peak_bytes_per_sample'])}/sample"))
    mm = 128 if a.tiny else 8192  # a large bf16 matmul: the peak this device achieves
    x, y = (torch.randn(mm, mm, device=device, dtype=torch.bfloat16) for _ in range(2))
    x @ y  # warm-up
    peak = 2 * mm ** 3 / seconds(lambda: x @ y, device, 10)
    sheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16)
    dit_alone = dit_fwd_bwd(prior, batch, bf16, device, 2 if a.tiny else 10)
    print(f"  {'DiT alone: forward + backward to x, bf16':42s} batch {batch:3d}: "
          + ("out of memory" if dit_alone.get("oom") else
             f"{dit_alone['seconds'] * 1e3:8.2f} ms, {dit_alone['flop_s'] / 1e12:7.2f} TFLOP/s"))
    rate = fcur_throughput(a.tiny, device, bf16 if device.type == "cuda" else nullcontext())
    plain = runs["plain bf16"]
    costs = {batch: lgd_cost(runs["guided bf16 ckpt"], plain),
             KAPPA: lgd_cost(runs["guided bf16 ckpt, one class group"], plain)}
    ref_cost = lgd_cost(runs["reference guided: 1 image, fp32, no TF32"],
                        runs["reference plain: 1 image, fp32, no TF32"])

    def ratio(x, y):
        return None if x is None or y is None or y == 0 else x / y
    g, n = runs["guided bf16 ckpt"], runs["guided bf16 no-ckpt"]
    step = {k: r.get("step_s") for k, r in runs.items()}
    ratios = {
        "guided / plain step (bf16, batched)": ratio(step["guided bf16 ckpt"], step["plain bf16"]),
        "checkpointing time (per guided step)": ratio(step["guided bf16 ckpt"], n.get("step_s")),
        "checkpointing memory (per guided sample)":
            ratio(g.get("peak_bytes_per_sample"), n.get("peak_bytes_per_sample")),
        "bf16 speed-up, plain": ratio(step["plain fp32"], step["plain bf16"]),
        "bf16 speed-up, guided (ckpt)": ratio(step["guided fp32 ckpt"], step["guided bf16 ckpt"]),
        "LGD sample: reference loop / batched bf16 ckpt": ratio(ref_cost, costs[batch]),
        "achieved / measured bf16 matmul (guided bf16 ckpt)": ratio(g.get("flop_s"), peak),
        "achieved / datasheet bf16 (guided bf16 ckpt)": ratio(g.get("flop_s"), sheet),
        "DiT forward+backward bf16 / measured bf16 matmul": ratio(dit_alone.get("flop_s"), peak),
        "DiT forward+backward bf16 / datasheet bf16": ratio(dit_alone.get("flop_s"), sheet),
    }
    print(f"bf16 matmul {peak / 1e12:.1f} TFLOP/s measured; datasheet dense bf16 "
          + (f"{sheet / 1e12:.0f} TFLOP/s" if sheet else "unknown for this device")
          + f"\nf_cur ({'convnet-1' if a.tiny else 'convnet-6'}) training: {rate:.0f} images/s")
    print("ratios:\n" + "\n".join(f"  {k:52s} " + ("-" if v is None else f"{v:.3f}")
                                  for k, v in ratios.items()))
    print(f"seconds per LGD sample ({STEPS} steps, {GUIDED_STEPS} guided): batched bf16 ckpt "
          + ", ".join(f"batch {b}: " + ("-" if c is None else f"{c:.3f} s")
                      for b, c in costs.items())
          + (f"; reference loop {ref_cost:.3f} s" if ref_cost is not None else ""))
    print("projected wall time: T = busiest rank's share x (guided images x kappa x c_guided + "
          "plain images x c_plain) + sum_k 300 epochs x |D_k-1| / f_cur images/s")
    projections = []
    if not plain.get("oom") and any(c is not None for c in costs.values()):
        plain_image = plain["fixed_s"] + STEPS * plain["step_s"]
        for task, spec in PROJECTIONS.items():
            for gpus in (1, 8):
                pr = project(task, spec, gpus, costs, plain_image, rate)
                projections.append(pr)
                print(f"  {task:24s} {gpus} GPU{'s' if gpus > 1 else ' '}: "
                      f"{pr['total_s'] / 3600:.2f} h (sampling {pr['sampling_s'] / 3600:.2f} h at "
                      f"--sample-batch {pr['sample_batch']}, f_cur {pr['f_cur_s'] / 3600:.2f} h)")
    result.update(device=name, runs=runs, dit_fwd_bwd=dit_alone, matmul_bf16_flop_s=peak,
                  datasheet_bf16_flop_s=sheet, f_cur_images_per_s=rate,
                  lgd_seconds_per_sample={str(k): v for k, v in costs.items()},
                  reference_seconds_per_sample=ref_cost, ratios=ratios,
                  projections=projections, wall_s=time.time() - t_start)
    common.write_json(a.out, result)
    print(f"bench_gpu done in {time.time() - t_start:.0f} s: {a.out}")


if __name__ == "__main__":
    main()
