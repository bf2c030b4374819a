"""Train the teacher (reference classifier) and the class-conditional DiT prior for one dataset.

Reads:  a dataset (default: the embedded 5,000 MNIST digits; --dataset, --data-root), and with
        --dit a pretrained diffusers DiT pipeline (a hub name or a local folder).
Writes: <run>/dataset.json  name, classes, size, channels, normalisation, ImageNet class map
        <run>/teacher/      config.json (first), teacher.pt, epoch_XXX.pt (--keep-epochs),
                            metrics.json (test accuracy; last, as in every folder here)
        <run>/surrogate/    --surrogate: IGD's trajectory model (methods.md §5.1): config.json,
                            epoch_XXX.pt (000 = the initialisation), metrics.json
        <run>/dit/          config.json; a diffusers pipeline (transformer/, scheduler/, with
                            --prior latent vae/ and vae_metrics.json) or source.json (--dit);
                            samples.png (a row of CFG samples per class); metrics.json
        An interrupted run resumes from the train_state.pt of teacher/, surrogate/ and dit/ and
        from dit/vae_state.pt; a finished dit/vae/ is loaded instead of trained again.

Examples:
  python 01_train_teacher.py                 # CPU, embedded digits: VAE + latent DiT, ~25 min
  python 01_train_teacher.py --dataset imagenette --data-root data/imagenette2 --size 256 \
      --model resnet18 --epochs 100 --dit facebook/DiT-XL-2-256 --surrogate --run runs/imagenette
"""
import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common
import dit


def both(name: str) -> str:
    """The paper and small column of a scale-dependent default, for the help texts."""
    paper, small = common.DEFAULTS[name]
    return f"paper {paper}, small {small}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p, run_default=None,
                           run_help="run folder to write (teacher/, dit/, dataset.json); default "
                                    "runs/<dataset>, for imagefolder:<root> runs/<root's name>")
    pos = common.positive_int
    p.add_argument("--dataset", default="mnist5k", help=f"one of {', '.join(common.DATASETS)}")
    p.add_argument("--data-root", type=Path, help="dataset folder (ImageNette/Woof, CIFAR)")
    p.add_argument("--size", type=int, help="image size for folder datasets (default: 128 for "
                   "ImageNette/Woof, else the first image's)")
    g = p.add_argument_group("teacher")
    g.add_argument("--model", default="convnet-3-bn", help=f"one of {', '.join(common.MODELS)}")
    g.add_argument("--epochs", type=pos, default=15, help="training epochs")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    g.add_argument("--batch-size", type=pos, default=64, help="batch size")
    g.add_argument("--keep-epochs", default="", help="comma list of epochs to checkpoint (IGD)")
    g.add_argument("--teacher", type=Path, help="use this teacher.pt instead of training one")
    g = p.add_argument_group("IGD surrogate (docs/methods.md §5.1); unset: the --scale column")
    g.add_argument("--surrogate", nargs="?", const="auto", help="also train IGD's surrogate "
                   f"trajectory into <run>/surrogate/; optional model ({both('surrogate_model')})")
    g.add_argument("--surrogate-epochs", type=pos, help=f"epochs ({both('surrogate_epochs')})")
    g.add_argument("--surrogate-keep", help="comma list of epochs whose parameters form the "
                   f"trajectory, 0 = the initialisation ({both('surrogate_keep')})")
    g = p.add_argument_group("DiT prior")
    g.add_argument("--dit", help="pretrained diffusers DiT pipeline (hub name or folder); "
                   "default: train a small DiT (--prior)")
    g.add_argument("--prior", choices=["pixel", "latent"], help="the small DiT trained without "
                   "--dit: on pixels, or (the papers' design in miniature) on the latents of an "
                   "AutoencoderKL trained here (28 px -> 4x7x7)")
    g.add_argument("--vae-steps", type=pos, default=600, help="AutoencoderKL training steps")
    g.add_argument("--vae-batch", type=pos, default=128, help="AutoencoderKL batch size")
    g.add_argument("--vae-width", type=pos, default=16, help="AutoencoderKL blocks: width x "
                   "(1, 2, 2) channels (16: a quarter of the cost of 32 per step)")
    # 96 wide, 1,500 steps at 1e-3: as distillable as 128 wide, 3,000 at 3e-4, in a third the time
    g.add_argument("--dit-steps", type=pos, default=1500, help="training steps")
    g.add_argument("--dit-batch", type=pos, default=128, help="batch size")
    g.add_argument("--dit-lr", type=float, default=1e-3, help="AdamW learning rate")
    g.add_argument("--dit-warmup", type=pos, default=200, help="linear LR warm-up steps")
    g.add_argument("--dit-width", type=pos, default=96, help="hidden size")
    g.add_argument("--dit-depth", type=pos, default=4, help="DiT blocks")
    g.add_argument("--dit-patch", type=pos, help="patch size (default: 4 pixel, 1 latent)")
    g.add_argument("--dit-min-snr", type=float, default=0.0, help="min-SNR-gamma (0 = off)")
    g.add_argument("--dit-ckpt-every", type=pos, default=250, help="steps between resumable "
                   "checkpoints (VAE and DiT)")
    g.add_argument("--dit-eval-every", type=common.nonneg_int, default=0, help="steps between "
                   "sample-accuracy probes (20 per class) for metrics.json; 0 = off")
    g = p.add_argument_group("sampling (for the sample accuracy)")
    g.add_argument("--sample-steps", type=pos,
                   help=f"DDPM ancestral steps (default by --scale: {both('sample_steps')})")
    g.add_argument("--cfg", type=float,
                   help=f"classifier-free guidance scale (default by --scale: {both('cfg')})")
    g.add_argument("--samples-per-class", type=pos, default=100, help="for the teacher's check")
    g.add_argument("--sample-batch", type=pos, default=250, help="sampling batch size")
    g.add_argument("--distillability", action="store_true", help="also train 03's hard-label "
                   "student (3 seeds) on plain CFG samples at IPC 10 and on real ones as many")
    args = p.parse_args(argv)
    args.run = args.run or default_run(args.dataset)
    if args.prior is None:  # a pretrained --dit trains nothing; else the latent miniature
        args.prior = "pixel" if args.dit is not None else "latent"
    if args.dit_patch is None:
        args.dit_patch = 4 if args.prior == "pixel" else 1
    return args


def default_run(dataset: str) -> Path:
    """runs/<dataset>, or runs/<root's name> for imagefolder:<root>: one run per dataset."""
    if dataset.startswith("imagefolder:"):
        return Path("runs") / (Path(dataset.split(":", 1)[1]).resolve().name or "imagefolder")
    return Path("runs") / dataset


def int_list(s: str, flag: str) -> list:
    """A comma list of integers, sorted and without repeats, or a UserError naming `flag`."""
    try:
        return sorted({int(e) for e in s.split(",") if e.strip()})
    except ValueError:
        raise common.UserError(f"{flag} must be a comma list of integers, got {s!r}") from None


def parse_epochs(s: str, epochs: int) -> list:
    keep = int_list(s, "--keep-epochs")
    bad = [e for e in keep if not 1 <= e <= epochs]
    if bad:
        raise common.UserError(f"--keep-epochs {bad} lie outside 1..{epochs} (--epochs)")
    return keep


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def save_grid(imgs: torch.Tensor, nrow: int, path: Path):
    """A grid of images (N, C, H, W) in [0, 1], `nrow` images per row, as one PNG."""
    from torchvision.utils import make_grid
    common.save_png(make_grid(imgs.float().cpu(), nrow=nrow, padding=2, pad_value=1.0), path)


def train_classifier(name, keep, folder, train, info, proto, epochs, seed, device, ctx, desc,
                     what):
    """Seed, build and fit a classifier, saving epoch_XXX.pt for each epoch in `keep`."""
    common.seed_everything(seed)
    model = common.build_model(name, info).to(device)
    print(f"{desc}: {name}, {n_params(model) / 1e6:.2f} M parameters, {what}, {device}")

    def save(e):  # checkpoint e: the model after e epochs, 0 = the initialisation
        if e in keep:
            common.save_classifier(folder / f"epoch_{e:03d}.pt", model, name, info, epoch=e)

    if not (folder / "epoch_000.pt").exists():  # a resumed run has it already
        save(0)
    # seed None: the global generators, saved with the state after every epoch (exact resume)
    common.fit(model, train, info, proto, epochs=epochs, seed=None, ctx=ctx, desc=desc,
               state_path=folder / "train_state.pt", log=True,
               on_epoch=lambda epoch, loss: save(epoch + 1))  # fit counts epochs from 0
    return model


def train_teacher(args, info, train, test, device, ctx, phase):
    """Train (or resume, or import with --teacher) the reference classifier, in eval mode."""
    folder = args.run / "teacher"
    keep = parse_epochs(args.keep_epochs, args.epochs)
    targs = {k: getattr(args, k) for k in ("dataset", "data_root", "size", "model", "epochs", "lr",
                                           "batch_size", "keep_epochs", "teacher", "seed")}
    common.prepare_folder(folder, targs, args.overwrite, "teacher")
    if (folder / "metrics.json").exists():
        acc = common.read_json(folder / "metrics.json")["test_acc"]
        print(f"teacher: done earlier ({acc:.2f} %), skipping")
        phase.skipped = True
        return common.load_classifier(folder / "teacher.pt", info, device)
    derived = {"keep_epochs": keep, "train_size": len(train.y)}
    common.write_config(folder, targs, derived, device, ctx)
    t0 = time.time()
    if args.teacher is not None:
        model = common.load_classifier(args.teacher, info, device)
        model_name = torch.load(args.teacher, map_location="cpu", weights_only=True)["model_name"]
    else:  # the hard-label optimiser with a shift augmentation, no CutMix
        model_name = args.model
        proto = common.Protocol("hard", lr=args.lr, batch_size=args.batch_size, augment="translate")
        what = f"{len(train.y)} training images, {args.epochs} epochs, batch {args.batch_size}"
        model = train_classifier(model_name, keep, folder, train, info, proto, args.epochs,
                                 args.seed, device, ctx, "teacher", what)
    acc = common.accuracy(model, test)
    common.save_classifier(folder / "teacher.pt", model, model_name, info, test_acc=acc)
    common.write_json(folder / "metrics.json", {
        "test_acc": acc, "epochs": args.epochs, "model": model_name, "wall_s": time.time() - t0,
        "imported_from": args.teacher})
    (folder / "train_state.pt").unlink(missing_ok=True)
    print(f"teacher: test accuracy {acc:.2f} % ({time.time() - t0:.0f} s)")
    return model.eval()


def surrogate_settings(args, info) -> dict | None:
    """Model, epochs and kept epochs of the surrogate (None without --surrogate), checked."""
    if args.surrogate is None:
        if args.surrogate_epochs is not None or args.surrogate_keep is not None:
            raise common.UserError("--surrogate-epochs and --surrogate-keep describe the IGD "
                                   "surrogate; add --surrogate to train it")
        return None
    scale = common.resolve_scale(args.scale, info.name)
    model = common.default("surrogate_model", scale) if args.surrogate == "auto" else args.surrogate
    epochs = args.surrogate_epochs or common.default("surrogate_epochs", scale)
    keep = (args.surrogate_keep if args.surrogate_keep is not None
            else common.default("surrogate_keep", scale))
    kept = int_list(keep, "--surrogate-keep")
    if not kept or kept[0] < 0 or kept[-1] > epochs:
        raise common.UserError(f"--surrogate-keep {keep} must name epochs in 0..{epochs} "
                               f"(--surrogate-epochs; 0 = the initialisation)")
    common.check_model(model, info)
    return {"model": model, "epochs": epochs, "keep": kept, "scale": scale}


def train_surrogate(args, s: dict, info, train, test, device, ctx, phase):
    """Train (or resume, or skip when finished) the surrogate; its kept checkpoints on disk."""
    folder = args.run / "surrogate"
    sargs = {"dataset": args.dataset, "data_root": args.data_root, "size": args.size,
             "model": s["model"], "epochs": s["epochs"], "keep": s["keep"], "seed": args.seed}
    common.prepare_folder(folder, sargs, args.overwrite, "surrogate")
    if (folder / "metrics.json").exists():
        print(f"surrogate: done earlier ({s['model']}, epochs {s['keep']}), skipping")
        phase.skipped = True
        return
    # IGD trains it with its evaluation recipe (crop and flip, no mixup): here §7.1's hard-label
    # recipe without CutMix, not the teacher's shift, so the trajectory is that of the students
    proto = common.Protocol("hard", cutmix_p=0.0, augment="crop")
    defaults = {k: dict(zip(("paper", "small"), common.DEFAULTS[f"surrogate_{k}"]))
                for k in ("model", "epochs", "keep")}
    common.write_config(folder, sargs, {"scale": s["scale"], "defaults": defaults,
                                        "protocol": proto.__dict__, "train_size": len(train.y)},
                        device, ctx)
    t0 = time.time()
    phase.extra = {"model": s["model"], "epochs": s["epochs"]}
    model = train_classifier(s["model"], s["keep"], folder, train, info, proto, s["epochs"],
                             args.seed, device, ctx, "surrogate",
                             f"{s['epochs']} epochs, keeping epochs {s['keep']}")
    accs = {f"epoch_{e:03d}": common.accuracy(
        common.load_classifier(folder / f"epoch_{e:03d}.pt", info, device), test)
        for e in s["keep"]}
    common.write_json(folder / "metrics.json", {
        "model": s["model"], "epochs": s["epochs"], "keep": s["keep"], "checkpoint_test_acc": accs,
        "test_acc": common.accuracy(model, test), "wall_s": time.time() - t0})
    (folder / "train_state.pt").unlink(missing_ok=True)
    print(f"surrogate: test accuracy of the kept checkpoints "
          + ", ".join(f"{k} {v:.1f} %" for k, v in accs.items()) + f" ({time.time() - t0:.0f} s)")


def sample_accuracy(prior, teacher, info, per_class, args, device, ctx, seed, progress=True):
    """Teacher top-1 (%) on `per_class` CFG samples per class: (acc, per-class acc, images)."""
    y = torch.arange(info.num_classes, device=device).repeat(per_class)  # slot-major
    seeds = [dit.slot_seed(seed, c, j) for j in range(per_class) for c in range(info.num_classes)]
    imgs, _, _ = dit.sample(prior, y, seeds, steps=args.sample_steps, cfg=args.cfg,
                            batch_size=args.sample_batch, ctx=ctx, progress=progress)
    order = torch.arange(len(y), device=y.device).view(per_class, info.num_classes).t().flatten()
    y, imgs = y[order], imgs[order]  # class-major, as the grid shows them
    pred = common.predict(teacher, imgs).argmax(1)
    per = [(pred[y == c] == c).float().mean().item() * 100 for c in range(info.num_classes)]
    return (pred == y).float().mean().item() * 100, per, imgs


def resume(path: Path, what: str, **parts) -> tuple:
    """Load each part's state_dict and the RNG state from a train state, if any: (step, curve)."""
    if not path.exists():
        return 0, []
    st = torch.load(path, map_location="cpu", weights_only=True)
    for name, part in parts.items():
        part.load_state_dict(st[name])
    common.set_rng_state(st["rng"])
    print(f"{what}: resuming at step {st['step']}")
    return st["step"], list(st["curve"])


def save_state(path: Path, step: int, curve: list, **parts):
    """The train state `resume` reads: each part's state_dict, the RNG state, step and curve."""
    common.torch_save({**{name: part.state_dict() for name, part in parts.items()},
                       "rng": common.rng_state(), "step": step, "curve": curve}, path)


VAE_LR, VAE_KL = 1e-3, 1e-6  # --prior latent: AdamW learning rate, KL weight


def vae_latents(vae, x, batch_size=500):
    """uint8 images (N, C, H, W) -> scaled posterior means, in full precision (whatever --amp)."""
    with torch.no_grad():
        return common.batched(lambda b: vae.encode(b * 2 - 1).latent_dist.mean, x,
                              batch_size) * vae.config.scaling_factor


def train_vae(args, info, train, test, device, ctx, phase):
    """The AutoencoderKL of --prior latent, scaled to unit latent std: (VAE, metrics)."""
    from diffusers import AutoencoderKL
    folder = args.run / "dit"
    final, tmp, state_path = folder / "vae", folder / "vae.partial", folder / "vae_state.pt"
    if final.exists():  # moved into place whole once finished, after its metrics
        m = common.read_json(folder / "vae_metrics.json")
        print(f"vae: done earlier (reconstruction MSE {m['recon_mse']:.4f}), skipping")
        phase.skipped = True
        return AutoencoderKL.from_pretrained(final, low_cpu_mem_usage=False).to(device).eval(), m
    common.seed_everything(args.seed)
    w = args.vae_width
    vae = dit.make_vae(info, blocks=(w, 2 * w, 2 * w)).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR)
    start, curve = resume(state_path, "vae", model=vae, opt=opt)
    n_par = n_params(vae)
    print(f"vae: AutoencoderKL {info.channels}->4 channels, blocks {vae.config.block_out_channels}"
          f", {n_par / 1e6:.2f} M parameters, {args.vae_steps} steps of batch {args.vae_batch}, "
          f"{device}")
    t0, N, mse_sum, kl_sum, n_log = time.time(), len(train.y), 0.0, 0.0, 0
    for step in tqdm(range(start, args.vae_steps), desc="vae", unit="step", initial=start,
                     total=args.vae_steps):
        idx = torch.randint(0, N, (args.vae_batch,), device=device)
        x = common.to_float(train.x[idx]) * 2 - 1  # (B, C, H, W) in [-1, 1]
        with common.prior_ctx(ctx):  # fp32 on a CPU under --amp auto (resolve_amp)
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        mse, kl = F.mse_loss(rec.float(), x), post.kl().float().mean()
        loss = mse + VAE_KL * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mse_sum, kl_sum, n_log = mse_sum + mse.item(), kl_sum + kl.item(), n_log + 1
        done = step + 1
        if done % 100 == 0 or done == args.vae_steps:
            curve.append({"step": done, "mse": mse_sum / n_log, "kl": kl_sum / n_log})
            tqdm.write(f"vae step {done}/{args.vae_steps} mse {mse_sum / n_log:.4f} "
                       f"kl {kl_sum / n_log:.1f}")
            mse_sum, kl_sum, n_log = 0.0, 0.0, 0
        if done % args.dit_ckpt_every == 0 and done < args.vae_steps:
            save_state(state_path, done, curve, model=vae, opt=opt)
    vae.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=1.0)
    std = vae_latents(vae, train.x).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    with torch.no_grad():  # held-out reconstruction from the posterior mean, in [-1, 1]
        rec = common.batched(lambda b: vae.decode(vae.encode(b * 2 - 1).latent_dist.mean).sample,
                             test.x)
        recon = F.mse_loss(rec, common.to_float(test.x) * 2 - 1).item()
    m = {"recon_mse": recon, "recon_on": f"{len(test.y)} test images, [-1, 1], posterior mean",
         "scaling_factor": 1.0 / std, "latent_shape": [4, info.size // 4, info.size // 4],
         "steps": args.vae_steps, "batch": args.vae_batch, "width": args.vae_width,
         "lr": VAE_LR, "kl_weight": VAE_KL, "parameters": n_par, "train_s": time.time() - t0,
         "resumed_at": start, "curve": curve}
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    common.write_json(folder / "vae_metrics.json", m)  # before the move: vae/ implies metrics
    tmp.rename(final)
    state_path.unlink(missing_ok=True)
    print(f"vae: reconstruction MSE {recon:.4f} on the test images, scaling factor {1 / std:.3f} "
          f"({time.time() - t0:.0f} s)")
    return vae, m


def train_dit(args, info, train, device, ctx, teacher, vae=None):
    """A small DiT on pixels (or a VAE's scaled latents): v-prediction, warm-up, EMA, clip 1.0."""
    from diffusers.training_utils import EMAModel
    make = dit.make_pixel_dit if vae is None else dit.make_latent_dit
    model = make(info, args.dit_width, args.dit_depth, args.dit_patch)
    if vae is not None:
        latents = vae_latents(vae, train.x)  # (N, 4, H/4, W/4), unit variance
    model = model.to(device).train()
    noise = dit.make_train_scheduler()
    abar = noise.alphas_cumprod.to(device)
    # EMA warm-up: decay 1 - (1 + step)^(-2/3) grows to the 0.9999 cap, so early steps count
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0,
                   power=2 / 3)
    opt = torch.optim.AdamW(model.parameters(), lr=args.dit_lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.dit_warmup))
    state_path = args.run / "dit" / "train_state.pt"
    start, curve = resume(state_path, "dit", model=model, opt=opt, lr_sched=lr_sched, ema=ema)
    ema.to(device)
    n_par = n_params(model)
    print(f"dit: {'pixel' if vae is None else 'latent'} DiT width {args.dit_width} depth "
          f"{args.dit_depth} patch {args.dit_patch}, {n_par / 1e6:.2f} M parameters, "
          f"{args.dit_steps} steps of batch {args.dit_batch}, {device}")
    N, t_log, loss_sum, n_log = len(train.y), time.time(), 0.0, 0
    for step in tqdm(range(start, args.dit_steps), desc="dit", unit="step", initial=start,
                     total=args.dit_steps):
        idx = torch.randint(0, N, (args.dit_batch,), device=device)
        if vae is None:
            x0, y = common.to_float(train.x[idx]) * 2 - 1, train.y[idx]  # (B, C, H, W) in [-1, 1]
        else:
            x0, y = latents[idx], train.y[idx]  # (B, 4, h, w) scaled latents
        eps = torch.randn_like(x0)
        t = torch.randint(0, noise.config.num_train_timesteps, (len(y),), device=device)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        v = a.sqrt() * eps - (1 - a).sqrt() * x0  # v-prediction target
        with common.prior_ctx(ctx):  # the DiT drops 10 % of labels to its null class (CFG)
            pred = model(xt, t, y).sample
        per = (pred.float() - v).pow(2).mean((1, 2, 3))
        if args.dit_min_snr > 0:  # min-SNR-gamma for v-targets: w = min(SNR, gamma) / (SNR + 1)
            snr = (a / (1 - a)).view(-1)
            per = per * snr.clamp(max=args.dit_min_snr) / (snr + 1)
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(model.parameters())
        loss_sum, n_log = loss_sum + loss.item(), n_log + 1
        done = step + 1
        if done % 100 == 0:
            dt = time.time() - t_log
            tqdm.write(f"dit step {done}/{args.dit_steps} loss {loss_sum / n_log:.4f} lr "
                       f"{lr_sched.get_last_lr()[0]:.2e} {n_log * args.dit_batch / dt:.0f} img/s")
            t_log, loss_sum, n_log = time.time(), 0.0, 0
        if args.dit_eval_every and (done % args.dit_eval_every == 0 or done == args.dit_steps):
            acc = probe(model, ema, noise, info, teacher, args, device, ctx, vae)
            curve.append({"step": done, "sample_acc_20pc": acc})
            tqdm.write(f"dit step {done}: sample accuracy (20 per class) {acc:.1f} %")
        if done % args.dit_ckpt_every == 0 and done < args.dit_steps:
            save_state(state_path, done, curve, model=model, opt=opt, lr_sched=lr_sched, ema=ema)
    ema.copy_to(model.parameters())
    return dit.Prior(model.eval(), dict(noise.config), info, vae), curve, n_par


def probe(model, ema, noise, info, teacher, args, device, ctx, vae=None):
    """Sample accuracy of the EMA weights at 20 per class, without disturbing training."""
    saved = [p.detach().clone() for p in model.parameters()]
    ema.copy_to(model.parameters())
    prior = dit.Prior(model.eval(), dict(noise.config), info, vae)
    acc = sample_accuracy(prior, teacher, info, 20, args, device, ctx, args.seed + 1,
                          progress=False)[0]
    for p, s in zip(model.parameters(), saved):
        p.data.copy_(s)
    model.train().requires_grad_(True)  # the Prior froze it for sampling
    return acc


def distillability(samples, info, train, test, args, device, ctx, ipc=10, seeds=3, epochs=None):
    """03's hard-label student (as 03) on uint8 `samples` and on as many real images, by seed."""
    rule = common.resolve_scale(args.scale, info.name)
    epochs, proto = epochs or common.epochs_for(ipc, rule), common.Protocol("hard")
    perms = common.class_permutations(train.y, info.num_classes, args.seed)
    out = {"ipc": ipc, "student": "convnet-3", "protocol": "hard", "epochs": epochs,
           "epoch_rule": rule, "cfg": args.cfg, "sample_steps": args.sample_steps}
    for name in ("samples", "random_real"):
        accs = []
        for k in range(seeds):
            seed = args.seed + k
            if name == "samples":
                data = samples
            else:  # draw k = block k of the class permutations, as 03's random baseline
                idx = torch.cat([p[k * ipc:(k + 1) * ipc] for p in perms]).to(train.y.device)
                data = common.Split(train.x[idx], train.y[idx])
            common.seed_everything(seed)  # the weight initialisation, as 03
            model = common.build_model("convnet-3", info).to(device)
            common.fit(model, data.to(device), info, proto, epochs=epochs, seed=seed, ctx=ctx,
                       desc=f"distillability {name} seed {seed}", progress=False)
            accs.append(common.accuracy(model, test))
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0  # the sample std (n - 1), as 03
        out[name] = {"mean": statistics.mean(accs), "std": std, "seeds": accs}
    out["gap"] = out["samples"]["mean"] - out["random_real"]["mean"]
    return out


def make_dit(args, info, train, device, ctx, teacher, pretrained, timings, test=None):
    """Train (or load) the DiT prior and check its samples with the teacher; metrics.json last."""
    folder = args.run / "dit"
    dargs = {k: getattr(args, k) for k in vars(args) if k.startswith(("dit", "sample", "cfg"))
             and k != "dit_ckpt_every"}
    dargs.update(dataset=args.dataset, seed=args.seed)
    if args.prior != "pixel":  # only then, so that a pixel run's config.json stays as it was
        dargs.update(prior=args.prior, vae_steps=args.vae_steps, vae_batch=args.vae_batch,
                     vae_width=args.vae_width)
    if args.distillability:
        dargs.update(distillability=True)
    # --cfg and --distillability choose what is measured on the prior, not the prior itself: a
    # finished prior measured at another CFG (or without distillability) is measured again
    common.prepare_folder(folder, dargs, args.overwrite, "DiT", ignore=("cfg", "distillability"))
    done = common.read_json(folder / "metrics.json") if (folder / "metrics.json").exists() else None
    if done is not None and done["cfg"] == args.cfg and (
            "distillability" in done or not args.distillability):
        print(f"dit: done earlier (sample accuracy {done['sample_acc']:.1f} %), skipping")
        timings.add("01/prior", 0.0, 0.0, skipped=True)
        timings.add("01/sample check", 0.0, 0.0, skipped=True)
        return
    common.write_config(folder, dargs, {"pretrained": args.dit is not None}, device, ctx)
    if done is not None:
        print(f"dit: trained earlier; measuring it again at CFG {args.cfg} (metrics.json holds CFG "
              f"{done['cfg']}{'' if 'distillability' in done else ' without distillability'})")
        timings.add("01/prior", 0.0, 0.0, skipped=True)
        prior = pretrained if args.dit is not None else dit.load_prior(folder, info, device)
        keep = ("parameters", "train_s", "curve", "prior", "vae")
        extra = {k: done[k] for k in keep if k in done}
    else:
        vae, extra = None, {}
        if args.dit is None and args.prior == "latent":
            with timings.phase("01/vae") as phase:
                vae, extra["vae"] = train_vae(args, info, train, test, device, ctx, phase)
                phase.extra = {"steps": args.vae_steps, "batch": args.vae_batch,
                               "width": args.vae_width}
            extra["prior"] = "latent"
        t0 = time.time()
        with timings.phase("01/prior") as phase:
            if args.dit is None:
                common.seed_everything(args.seed)
                prior, curve, n_par = train_dit(args, info, train, device, ctx, teacher, vae)
                prior.save(folder)
                phase.extra = {"steps": args.dit_steps, "batch": args.dit_batch}
            else:  # loaded in main(): nothing to train
                prior = pretrained
                common.write_json(folder / "source.json", {"dit": str(args.dit)})
                curve, n_par = [], n_params(prior.transformer)
        extra.update(parameters=n_par, train_s=time.time() - t0, curve=curve)
    t1 = time.time()
    with timings.phase("01/sample check") as phase:
        acc, per, imgs = sample_accuracy(prior, teacher, info, args.samples_per_class, args, device,
                                         ctx, seed=args.seed)
        phase.extra = {"images": len(imgs), "steps": args.sample_steps}
    sample_s = time.time() - t1
    by_class = imgs.view(info.num_classes, args.samples_per_class, *imgs.shape[1:])
    k = min(10, args.samples_per_class)
    save_grid(by_class[:, :k].flatten(0, 1), k, folder / "samples.png")
    if args.distillability:
        with timings.phase("01/distillability") as phase:
            if args.samples_per_class >= 10:  # slots j < 10 of the sample check: IPC 10's seeds
                s10 = by_class[:, :10].flatten(0, 1)
            else:  # (10 classes x 10, C, H, W), class-major
                s10 = sample_accuracy(prior, teacher, info, 10, args, device, ctx, args.seed,
                                      progress=False)[2]
            s10 = common.Split(common.to_u8(s10),  # as the PNGs of 02 hold them
                               torch.arange(info.num_classes, device=device).repeat_interleave(10))
            extra["distillability"] = d = distillability(s10, info, train, test, args, device, ctx)
            phase.extra = {"students": 6, "epochs": d["epochs"]}
        print(f"dit: distillability at IPC 10: plain CFG-{args.cfg} samples "
              f"{d['samples']['mean']:.1f} +- {d['samples']['std']:.1f} %, random real "
              f"{d['random_real']['mean']:.1f} +- {d['random_real']['std']:.1f} % (03's "
              f"hard-label student, {d['epochs']} epochs, 3 seeds)")
    common.write_json(folder / "metrics.json", {
        "sample_acc": acc, "sample_acc_per_class": per, "samples_per_class": args.samples_per_class,
        "sample_steps": args.sample_steps, "cfg": args.cfg, "sample_s": sample_s,
        "sample_s_per_image": sample_s / len(imgs), **extra})
    (folder / "train_state.pt").unlink(missing_ok=True)
    print(f"dit: sample accuracy {acc:.1f} % (teacher top-1 on {args.samples_per_class} "
          f"CFG-{args.cfg} samples per class, {args.sample_steps} DDPM steps); train "
          f"{extra['train_s']:.0f} s, sampling {sample_s:.0f} s")


def main():
    args = parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # its teacher and DiT train in one process
        raise common.UserError("01_train_teacher.py runs in one process; start it without "
                               "torchrun (02 and 03 spread over GPUs)")
    device, ctx = common.setup_device(args.device, args.amp, args.compile)
    t0 = time.time()
    info, train, test = common.load_dataset(args.dataset, args.data_root, args.size)
    # every flag is checked before anything is written, so a typo leaves no half-made folder behind
    common.check_model(args.model, info)
    parse_epochs(args.keep_epochs, args.epochs)
    surrogate = surrogate_settings(args, info)
    scale = common.resolve_scale(args.scale, info.name)
    if args.cfg is None:
        args.cfg = common.default("cfg", scale)
    if args.sample_steps is None:
        args.sample_steps = common.default("sample_steps", scale)
    if args.teacher is not None:
        common.load_classifier(args.teacher, info, "cpu")
    if args.dit is not None and args.prior != "pixel":
        raise common.UserError("--prior latent trains its own VAE and DiT; leave out --prior to "
                               "use the pretrained pipeline of --dit")
    pretrained = None if args.dit is None else dit.load_prior(args.dit, info, device)
    if args.dit is None:  # builds the DiT once to check its flags
        make = dit.make_pixel_dit if args.prior == "pixel" else dit.make_latent_dit
        make(info, args.dit_width, args.dit_depth, args.dit_patch)
    noise_cfg = pretrained.scheduler_config if pretrained else dit.make_train_scheduler().config
    if args.sample_steps > noise_cfg["num_train_timesteps"]:
        raise common.UserError(f"--sample-steps {args.sample_steps} exceeds the DiT's "
                               f"{noise_cfg['num_train_timesteps']} training steps")
    ds_file = args.run / "dataset.json"
    if ds_file.exists() and not args.overwrite:
        old = common.read_json(ds_file)
        if old != common.jsonable(info.to_dict()):
            what = (f"dataset {old['name']!r}" if old["name"] != info.name
                    else f"other {info.name} settings")
            raise common.UserError(f"{args.run} was made for {what} (see its dataset.json); "
                                   f"choose another --run or pass --overwrite")
    for sub in ("teacher", "dit"):  # one writer per run: a second 01 on it ends here
        common.lock_folder(args.run / sub, "run")
    args.run.mkdir(parents=True, exist_ok=True)
    common.write_json(ds_file, info.to_dict())
    print(f"dataset {info.name}: {len(train.y)} train / {len(test.y)} test, {info.num_classes} "
          f"classes, {info.channels}x{info.size}x{info.size}; run folder {args.run}")
    train, test = train.to(device), test.to(device)
    common.machine_speed(args.run)  # once per run: timings of machines of other speeds compare
    timings = common.Timings(args.run)
    with timings.phase("01/teacher") as phase:
        teacher = train_teacher(args, info, train, test, device, ctx, phase)
    make_dit(args, info, train, device, ctx, teacher, pretrained, timings, test)
    if surrogate is not None:
        with timings.phase("01/surrogate") as phase:
            train_surrogate(args, surrogate, info, train, test, device, ctx, phase)
    timings.report("01")
    print(f"01 done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    common.cli(main)
