"""Train the teacher (reference classifier) and the class-conditional DiT prior for one dataset.

Reads:  a dataset: the embedded 5,000 MNIST digits by default (`--dataset`, `--data-root` for others);
        optionally a pretrained diffusers DiT pipeline (`--dit`, a hub name or a local folder).
Writes: <run>/
          dataset.json            name, classes, size, channels, normalisation, ImageNet class map
          teacher/config.json     arguments, versions, git commit, device (written first)
          teacher/teacher.pt      plain dict: model_name, dataset, classes, state_dict
          teacher/epoch_XXX.pt    checkpoints kept for --keep-epochs
          teacher/metrics.json    test accuracy, epochs, wall time (written last: the teacher is done)
          surrogate/              only with --surrogate: IGD's trajectory model (methods.md §5.1)
            config.json           resolved settings and both default columns (written first)
            epoch_XXX.pt          the kept checkpoints (epoch_000 = the initialisation)
            metrics.json          test accuracy of every kept checkpoint, wall time (written last)
          dit/config.json
          dit/transformer/ dit/scheduler/   the trained DiT (save_pretrained); with the default
                                  --prior latent also dit/vae/ (the AutoencoderKL trained here)
                                  and dit/vae_metrics.json (reconstruction MSE, scaling factor,
                                  steps, wall time): a diffusers pipeline folder; or
          dit/source.json         where the pretrained pipeline given by --dit lives
          dit/samples.png         one row per class of CFG samples
          dit/metrics.json        sample accuracy (teacher top-1 on CFG samples), wall time (written last)
        An interrupted run resumes from teacher/train_state.pt, dit/vae_state.pt (--prior latent),
        dit/train_state.pt and surrogate/train_state.pt; a finished dit/vae/ is loaded instead of
        trained again.

Examples:
  python 01_train_teacher.py                       # CPU, embedded digits: VAE + latent DiT, ~25 min
  python 01_train_teacher.py --prior pixel         # a DiT on pixels instead (no VAE)
  python 01_train_teacher.py --dataset imagenette --data-root data/imagenette2 --size 256 \
      --model resnet18 --epochs 100 --dit facebook/DiT-XL-2-256 --run runs/imagenette
  python 01_train_teacher.py --surrogate             # adds IGD's surrogate trajectory to the run
  python 01_train_teacher.py ... --run runs/imagenette --surrogate convnet-6 \
      --surrogate-epochs 50 --surrogate-keep 0,2,11,40      # the paper column, spelt out
"""
import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common
import dit


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p, run_default=None,
                           run_help="run folder to write (teacher/, dit/, dataset.json); default "
                                    "runs/<dataset>, for imagefolder:<root> runs/<root's name>")
    p.add_argument("--dataset", default="mnist5k", help=f"one of {', '.join(common.DATASETS)}")
    p.add_argument("--data-root", type=Path, default=None, help="dataset folder (ImageNette/Woof, CIFAR)")
    p.add_argument("--size", type=int, default=None, help="image size for folder datasets (default: 128 for "
                   "ImageNette/Woof, else the first image's)")
    g = p.add_argument_group("teacher")
    g.add_argument("--model", default="convnet-3-bn", help=f"teacher architecture: {', '.join(common.MODELS)}")
    g.add_argument("--epochs", type=common.positive_int, default=15)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--batch-size", type=common.positive_int, default=64)
    g.add_argument("--keep-epochs", default="", help="comma list of epochs whose checkpoints to keep (IGD)")
    g.add_argument("--teacher", type=Path, default=None, help="use this teacher.pt instead of training one")
    g = p.add_argument_group("IGD surrogate (docs/methods.md §5.1); unset: the --scale column")
    g.add_argument("--surrogate", nargs="?", const="auto", default=None,
                   help="also train IGD's surrogate trajectory into <run>/surrogate/; optional "
                        f"model name (paper {SURROGATE['model']['paper']}, small "
                        f"{SURROGATE['model']['small']})")
    g.add_argument("--surrogate-epochs", type=common.positive_int, default=None,
                   help=f"training epochs (paper {SURROGATE['epochs']['paper']}, small "
                        f"{SURROGATE['epochs']['small']})")
    g.add_argument("--surrogate-keep", default=None,
                   help="comma list of epochs whose parameters form the trajectory, 0 = the "
                        f"initialisation (paper {SURROGATE['keep']['paper']}, small "
                        f"{SURROGATE['keep']['small']})")
    g = p.add_argument_group("DiT prior")
    g.add_argument("--dit", default=None, help="pretrained diffusers DiT pipeline (hub name or folder); "
                   "default: train a small DiT (--prior)")
    g.add_argument("--prior", default=None, choices=["pixel", "latent"],
                   help="the small DiT trained without --dit: 'pixel' acts on pixels; 'latent' is the "
                        "papers' architecture in miniature, an AutoencoderKL trained here (28 px -> "
                        "4x7x7) and a DiT on its scaled latents")
    g.add_argument("--vae-steps", type=common.positive_int, default=600,
                   help="AutoencoderKL training steps (--prior latent)")
    g.add_argument("--vae-batch", type=common.positive_int, default=128, help="AutoencoderKL batch size")
    g.add_argument("--vae-width", type=common.positive_int, default=16,
                   help="AutoencoderKL channels of its first block; the others have twice as many "
                        "(16: blocks 16/32/32, a quarter of the cost of 32/64/64 per step)")
    # width 96, 1,500 steps at 1e-3 since issue 12: the distillability of 128 wide, 3,000 steps at
    # 3e-4 (89.3 %) within seed noise (88.8 %) for 31 % of its DiT time (README: the tries)
    g.add_argument("--dit-steps", type=common.positive_int, default=1500)
    g.add_argument("--dit-batch", type=common.positive_int, default=128)
    g.add_argument("--dit-lr", type=float, default=1e-3)
    g.add_argument("--dit-warmup", type=common.positive_int, default=200, help="linear LR warm-up steps")
    g.add_argument("--dit-width", type=common.positive_int, default=96)
    g.add_argument("--dit-depth", type=common.positive_int, default=4)
    g.add_argument("--dit-patch", type=common.positive_int, default=None,
                   help="patch size (default: 4 for --prior pixel, 1 for latent)")
    g.add_argument("--dit-min-snr", type=float, default=0.0, help="min-SNR-gamma loss weight (0 = off)")
    g.add_argument("--dit-ckpt-every", type=common.positive_int, default=250, help="steps between resumable checkpoints")
    g.add_argument("--dit-eval-every", type=common.nonneg_int, default=0,
                   help="steps between sample-accuracy probes (20 per class) logged in metrics.json; 0 = off")
    g = p.add_argument_group("sampling (for the sample accuracy)")
    g.add_argument("--sample-steps", type=common.positive_int, default=None,
                   help="DDPM ancestral steps (default by --scale: " +
                        ", ".join(f"{k} {v}" for k, v in dit.SAMPLE_STEPS.items()) + ")")
    g.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (default by --scale: " +
                        ", ".join(f"{k} {v}" for k, v in dit.CFG.items()) + ")")
    g.add_argument("--samples-per-class", type=common.positive_int, default=100)
    g.add_argument("--sample-batch", type=common.positive_int, default=250)
    g.add_argument("--distillability", action="store_true",
                   help="also train 03's hard-label student (3 seeds) on plain CFG samples at IPC 10 "
                        "and on random real subsets of the same size (costs student training)")
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


def parse_epochs(s: str, epochs: int) -> list:
    try:
        keep = sorted({int(e) for e in s.split(",") if e.strip()})
    except ValueError:
        raise common.UserError(f"--keep-epochs must be a comma list of integers, got {s!r}") from None
    bad = [e for e in keep if not 1 <= e <= epochs]
    if bad:
        raise common.UserError(f"--keep-epochs {bad} lie outside 1..{epochs} (--epochs)")
    return keep


# --------------------------------------------------------------------------------------
# teacher
# --------------------------------------------------------------------------------------


def train_teacher(args, info, train, test, device, ctx, phase):
    """Train (or resume, or import with --teacher) the reference classifier; returns it in eval mode."""
    folder = args.run / "teacher"
    keep = parse_epochs(args.keep_epochs, args.epochs)
    targs = {k: getattr(args, k) for k in ("dataset", "data_root", "size", "model", "epochs", "lr",
                                           "batch_size", "keep_epochs", "teacher", "seed")}
    common.prepare_folder(folder, targs, args.overwrite, "teacher")
    if (folder / "metrics.json").exists():
        print(f"teacher: done earlier ({common.read_json(folder / 'metrics.json')['test_acc']:.2f} %), skipping")
        phase.skipped = True
        return common.load_classifier(folder / "teacher.pt", info, device)
    common.write_config(folder, targs, {"keep_epochs": keep, "train_size": len(train.y)}, device,
                        ctx)
    t0 = time.time()
    if args.teacher is not None:
        model = common.load_classifier(args.teacher, info, device)
        model_name = torch.load(args.teacher, map_location="cpu", weights_only=True)["model_name"]
    else:
        common.seed_everything(args.seed)
        model_name = args.model
        model = common.build_model(args.model, info).to(device)
        print(f"teacher: {args.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
              f"{len(train.y)} training images, {args.epochs} epochs, batch {args.batch_size}, {device}")
        # the teacher's protocol: the hard-label optimiser with a shift augmentation, no CutMix;
        # seed None: the global generators, which the resumable state saves every epoch
        proto = common.Protocol("hard", lr=args.lr, batch_size=args.batch_size, augment="translate")

        def keep_checkpoint(epoch, loss):  # the trajectory checkpoints --keep-epochs asks for
            if epoch + 1 in keep:
                common.save_classifier(folder / f"epoch_{epoch + 1:03d}.pt", model, model_name, info,
                                       epoch=epoch + 1)
        common.fit(model, train, info, proto, epochs=args.epochs, seed=None, ctx=ctx, desc="teacher",
                   state_path=folder / "train_state.pt", on_epoch=keep_checkpoint, log=True)
    acc = common.accuracy(model, test)
    common.save_classifier(folder / "teacher.pt", model, model_name, info, test_acc=acc)
    common.write_json(folder / "metrics.json", {"test_acc": acc, "epochs": args.epochs, "model": model_name,
                                           "wall_s": time.time() - t0, "imported_from": args.teacher})
    (folder / "train_state.pt").unlink(missing_ok=True)
    print(f"teacher: test accuracy {acc:.2f} % ({time.time() - t0:.0f} s)")
    return model.eval()


# --------------------------------------------------------------------------------------
# IGD surrogate (docs/methods.md §5.1): a classifier trained on the real data whose parameters
# after a few chosen epochs are the trajectory along which 02 --method igd measures influence
# --------------------------------------------------------------------------------------

# Defaults by --scale. paper: IGD's released ImageNette script (ConvNet-6, width 128, instance
# norm, 50 epochs, epochs 0, 2, 11, 40; ImageWoof keeps 0,5,16,40 and ImageNet-1K 0,5,18,52).
# small, the 28 px digits on 2 CPU cores: ConvNet-6 cannot run (six halvings of 28 px leave
# nothing), and both its training and every guided sampling step (a per-sample double backward
# through each checkpoint) scale with the surrogate. convnet-2 costs ~22 s per epoch here
# (convnet-1 ~14 s, convnet-3 ~28 s, CPU time of one process) and 1.7x convnet-1 per guided step,
# but unlike convnet-1, whose parameters are 99 % the linear head, most of its parameters are
# convolutions, as in ConvNet-6. The digits are learnt within an epoch or two, so 5 epochs
# (~2 min) cover the trajectory; 0,1,2,4 keeps IGD's shape: the init, an early, a middle and a
# late checkpoint (ImageNette's 2/50, 11/50 and 40/50 of training, rounded to distinct epochs).
SURROGATE = {"model": {"paper": "convnet-6", "small": "convnet-2"},
             "epochs": {"paper": 50, "small": 5},
             "keep": {"paper": "0,2,11,40", "small": "0,1,2,4"}}


def surrogate_settings(args, info) -> dict | None:
    """Model, epochs and kept epochs of the surrogate (None without --surrogate), checked.

    Each value is the flag as given, else the column of --scale for this dataset.
    """
    if args.surrogate is None:
        if args.surrogate_epochs is not None or args.surrogate_keep is not None:
            raise common.UserError("--surrogate-epochs and --surrogate-keep describe the IGD "
                                   "surrogate; add --surrogate to train it")
        return None
    scale = common.resolve_scale(args.scale, info.name)
    model = SURROGATE["model"][scale] if args.surrogate == "auto" else args.surrogate
    epochs = args.surrogate_epochs or SURROGATE["epochs"][scale]
    keep = args.surrogate_keep if args.surrogate_keep is not None else SURROGATE["keep"][scale]
    try:
        kept = sorted({int(e) for e in keep.split(",") if e.strip()})
    except ValueError:
        raise common.UserError(f"--surrogate-keep must be a comma list of integers, got "
                               f"{keep!r}") from None
    bad = [e for e in kept if not 0 <= e <= epochs]
    if not kept or bad:
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
    # IGD's script trains the surrogate with its evaluation trainer and no mixup, whose
    # augmentation is a random-resized crop and flip: here the hard-label recipe of §7.1 with
    # CutMix switched off (flips only where labels allow). Not the teacher's shift: the
    # trajectory should be that of the training the distilled set is later used for.
    proto = common.Protocol("hard", cutmix_p=0.0, augment="crop")
    common.write_config(folder, sargs, {"scale": s["scale"], "defaults": SURROGATE,
                                        "protocol": proto.__dict__, "train_size": len(train.y)},
                        device, ctx)
    t0 = time.time()
    common.seed_everything(args.seed)
    model = common.build_model(s["model"], info).to(device)
    phase.extra = {"model": s["model"], "epochs": s["epochs"]}

    def path(epoch):
        return folder / f"epoch_{epoch:03d}.pt"

    def keep_checkpoint(epoch, loss):  # fit counts epochs from 0; checkpoint e is after e epochs
        if epoch + 1 in s["keep"]:
            common.save_classifier(path(epoch + 1), model, s["model"], info, epoch=epoch + 1)
    if 0 in s["keep"] and not path(0).exists():  # a resumed run has it already
        common.save_classifier(path(0), model, s["model"], info, epoch=0)
    print(f"surrogate: {s['model']}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
          f"parameters, {s['epochs']} epochs, keeping epochs {s['keep']}, {device}")
    # seed None: the global generators, saved with the state after every epoch (exact resume)
    common.fit(model, train, info, proto, epochs=s["epochs"], seed=None, ctx=ctx,
               desc="surrogate", state_path=folder / "train_state.pt", on_epoch=keep_checkpoint,
               log=True)
    accs = {f"epoch_{e:03d}": common.accuracy(common.load_classifier(path(e), info, device),
                                              test) for e in s["keep"]}
    common.write_json(folder / "metrics.json", {
        "model": s["model"], "epochs": s["epochs"], "keep": s["keep"], "checkpoint_test_acc": accs,
        "test_acc": common.accuracy(model, test), "wall_s": time.time() - t0})
    (folder / "train_state.pt").unlink(missing_ok=True)
    print(f"surrogate: test accuracy of the kept checkpoints "
          + ", ".join(f"{k} {v:.1f} %" for k, v in accs.items()) + f" ({time.time() - t0:.0f} s)")


# --------------------------------------------------------------------------------------
# DiT prior
# --------------------------------------------------------------------------------------


def sample_accuracy(prior, teacher, info, per_class, args, device, ctx, seed, progress=True):
    """Teacher top-1 (%) on `per_class` CFG samples of every class; returns (acc, per-class acc, images)."""
    y = torch.arange(info.num_classes, device=device).repeat(per_class)  # slot-major
    seeds = [dit.slot_seed(seed, c, j) for j in range(per_class) for c in range(info.num_classes)]
    imgs, _, _ = dit.sample(prior, y, seeds, steps=args.sample_steps, cfg=args.cfg,
                            batch_size=args.sample_batch, ctx=ctx, progress=progress)
    order = torch.arange(len(y), device=y.device).view(per_class, info.num_classes).t().flatten()
    y, imgs = y[order], imgs[order]  # class-major, as the grid shows them
    pred = common.predict(teacher, imgs).argmax(1)
    per = [(pred[y == c] == c).float().mean().item() * 100 for c in range(info.num_classes)]
    return (pred == y).float().mean().item() * 100, per, imgs


VAE_LR, VAE_KL = 1e-3, 1e-6  # --prior latent: AdamW learning rate, KL weight


def vae_latents(vae, x, batch_size=500):
    """uint8 images (N, C, H, W) -> the VAE's posterior means, times its scaling factor (full
    precision: the DiT's training data and the scaling factor do not depend on --amp)."""
    with torch.no_grad():
        return common.batched(lambda b: vae.encode(b * 2 - 1).latent_dist.mean, x,
                              batch_size) * vae.config.scaling_factor


def train_vae(args, info, train, test, device, ctx, phase):
    """The AutoencoderKL of --prior latent: MSE + 1e-6 KL on images in [-1, 1], AdamW 1e-3,
    --vae-batch, --vae-steps steps, blocks --vae-width x (1, 2, 2); then its scaling factor, 1 / std of the training latents, goes
    into its config. Returns (VAE in eval mode, metrics). dit/vae/ is moved into place whole once
    the VAE is finished, so a rerun that finds it loads it instead of training again."""
    from diffusers import AutoencoderKL
    folder = args.run / "dit"
    final, tmp, state_path = folder / "vae", folder / "vae.partial", folder / "vae_state.pt"
    if final.exists():
        m = common.read_json(folder / "vae_metrics.json")
        print(f"vae: done earlier (reconstruction MSE {m['recon_mse']:.4f}), skipping")
        phase.skipped = True
        return AutoencoderKL.from_pretrained(final, low_cpu_mem_usage=False).to(device).eval(), m
    common.seed_everything(args.seed)
    w = args.vae_width
    vae = dit.make_vae(info, blocks=(w, 2 * w, 2 * w)).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR)
    start, curve = 0, []
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        common.set_rng_state(st["rng"])
        start, curve = st["step"], list(st["curve"])
        print(f"vae: resuming at step {start}")
    n_par = sum(p.numel() for p in vae.parameters())
    print(f"vae: AutoencoderKL {info.channels}->4 channels, blocks {vae.config.block_out_channels}, "
          f"{n_par / 1e6:.2f} M parameters, {args.vae_steps} steps of batch {args.vae_batch}, {device}")
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
            common.torch_save({"model": vae.state_dict(), "opt": opt.state_dict(),
                               "rng": common.rng_state(), "step": done, "curve": curve}, state_path)
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
         "steps": args.vae_steps, "batch": args.vae_batch, "width": args.vae_width, "lr": VAE_LR, "kl_weight": VAE_KL,
         "parameters": n_par, "train_s": time.time() - t0, "resumed_at": start, "curve": curve}
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    common.write_json(folder / "vae_metrics.json", m)  # before the move: vae/ implies metrics
    tmp.rename(final)
    state_path.unlink(missing_ok=True)
    print(f"vae: reconstruction MSE {recon:.4f} on the test images, scaling factor {1 / std:.3f} "
          f"({time.time() - t0:.0f} s)")
    return vae, m


def train_dit(args, info, train, device, ctx, teacher, vae=None):
    """Train a small DiT on pixels (or, given a VAE, on its scaled latents): cosine schedule,
    v-prediction, warm-up, EMA, grad clip 1.0."""
    from diffusers.training_utils import EMAModel
    folder = args.run / "dit"
    if vae is None:
        model = dit.make_pixel_dit(info, args.dit_width, args.dit_depth, args.dit_patch)
    else:
        model = dit.make_latent_dit(info, args.dit_width, args.dit_depth, args.dit_patch)
        latents = vae_latents(vae, train.x)  # (N, 4, H/4, W/4), unit variance
    model = model.to(device).train()
    noise = dit.make_train_scheduler()
    abar = noise.alphas_cumprod.to(device)
    # EMA with warm-up: decay 1-(1+step)^(-2/3) grows to the 0.9999 cap, so early steps are not frozen out
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)
    opt = torch.optim.AdamW(model.parameters(), lr=args.dit_lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.dit_warmup))
    state_path, start, curve = folder / "train_state.pt", 0, []
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        lr_sched.load_state_dict(st["lr_sched"])
        ema.load_state_dict(st["ema"])
        common.set_rng_state(st["rng"])
        start, curve = st["step"], list(st["curve"])
        print(f"dit: resuming at step {start}")
    ema.to(device)
    n_par = sum(p.numel() for p in model.parameters())
    print(f"dit: {'pixel' if vae is None else 'latent'} DiT width {args.dit_width} depth {args.dit_depth} patch {args.dit_patch}, "
          f"{n_par / 1e6:.2f} M parameters, {args.dit_steps} steps of batch {args.dit_batch}, {device}")
    N, t_log, loss_sum, n_log = len(train.y), time.time(), 0.0, 0
    bar = tqdm(range(start, args.dit_steps), desc="dit", unit="step", initial=start,
               total=args.dit_steps)
    for step in bar:
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
            tqdm.write(f"dit step {done}/{args.dit_steps} loss {loss_sum / n_log:.4f} "
                       f"lr {lr_sched.get_last_lr()[0]:.2e} {n_log * args.dit_batch / dt:.0f} img/s")
            t_log, loss_sum, n_log = time.time(), 0.0, 0
        if args.dit_eval_every and (done % args.dit_eval_every == 0 or done == args.dit_steps):
            acc = probe(model, ema, noise, info, teacher, args, device, ctx, vae)
            curve.append({"step": done, "sample_acc_20pc": acc})
            tqdm.write(f"dit step {done}: sample accuracy (20 per class) {acc:.1f} %")
        if done % args.dit_ckpt_every == 0 and done < args.dit_steps:
            common.torch_save({"model": model.state_dict(), "opt": opt.state_dict(), "lr_sched": lr_sched.state_dict(),
                          "ema": ema.state_dict(), "rng": common.rng_state(), "step": done,
                          "curve": curve}, state_path)
    ema.copy_to(model.parameters())
    return dit.Prior(model.eval(), dict(noise.config), info, vae), curve, n_par


def probe(model, ema, noise, info, teacher, args, device, ctx, vae=None):
    """Sample accuracy of the EMA weights at 20 per class, without disturbing training."""
    saved = [p.detach().clone() for p in model.parameters()]
    ema.copy_to(model.parameters())
    acc, _, _ = sample_accuracy(dit.Prior(model.eval(), dict(noise.config), info, vae), teacher, info, 20, args,
                                device, ctx, seed=args.seed + 1, progress=False)
    for p, s in zip(model.parameters(), saved):
        p.data.copy_(s)
    model.train().requires_grad_(True)  # the Prior froze it for sampling
    return acc


def distillability(samples, info, train, test, args, device, ctx, ipc=10, seeds=3, epochs=None):
    """What the prior is for (issue 13): the final-epoch test accuracy of 03's hard-label
    student (convnet-3, 03's protocol and epoch rule, seeds --seed.. as 03) trained on
    `samples` (ipc per class, uint8), beside random real subsets of the same size (draw k =
    block k of common.class_permutations(--seed), with seed --seed + k, as 03's baseline)."""
    import statistics
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
            else:
                idx = torch.cat([p[k * ipc:(k + 1) * ipc] for p in perms]).to(train.y.device)
                data = common.Split(train.x[idx], train.y[idx])
            common.seed_everything(seed)  # the weight initialisation, as 03
            model = common.build_model("convnet-3", info).to(device)
            common.fit(model, data.to(device), info, proto, epochs=epochs, seed=seed, ctx=ctx,
                       desc=f"distillability {name} seed {seed}", progress=False)
            accs.append(common.accuracy(model, test))
        out[name] = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "seeds": accs}  # the sample std (n - 1), as 03
    out["gap"] = out["samples"]["mean"] - out["random_real"]["mean"]
    return out


def make_dit(args, info, train, device, ctx, teacher, pretrained, timings, test=None):
    """Train or load the DiT prior, then measure its sample accuracy with the teacher."""
    folder = args.run / "dit"
    dargs = {k: getattr(args, k) for k in vars(args) if k.startswith(("dit", "sample", "cfg"))
             and k != "dit_ckpt_every"}
    dargs.update(dataset=args.dataset, seed=args.seed)
    if args.prior != "pixel":  # only then: a pixel run's config.json, and its resume, as before
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
        return measure_dit(args, info, train, test, device, ctx, teacher, prior, timings,
                           {k: done[k] for k in keep if k in done})
    vae, extra = None, {}
    if args.dit is None and args.prior == "latent":
        with timings.phase("01/vae") as phase:
            vae, extra["vae"] = train_vae(args, info, train, test, device, ctx, phase)
            phase.extra = {"steps": args.vae_steps, "batch": args.vae_batch, "width": args.vae_width}
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
            curve, n_par = [], sum(p.numel() for p in prior.transformer.parameters())
    extra.update(parameters=n_par, train_s=time.time() - t0, curve=curve)
    measure_dit(args, info, train, test, device, ctx, teacher, prior, timings, extra)


def measure_dit(args, info, train, test, device, ctx, teacher, prior, timings, extra: dict):
    """The sample check (teacher accuracy on --samples-per-class CFG samples per class, the grid)
    and, with --distillability, the student accuracy of the first 10 per class; metrics.json last."""
    folder = args.run / "dit"
    t1 = time.time()
    with timings.phase("01/sample check") as phase:
        acc, per, imgs = sample_accuracy(prior, teacher, info, args.samples_per_class, args, device,
                                         ctx, seed=args.seed)
        phase.extra = {"images": len(imgs), "steps": args.sample_steps}
    sample_s = time.time() - t1
    k = min(10, args.samples_per_class)
    grid = imgs.view(info.num_classes, args.samples_per_class, *imgs.shape[1:])[:, :k].flatten(0, 1)
    common.save_grid(grid, k, folder / "samples.png")
    if args.distillability:
        with timings.phase("01/distillability") as phase:
            if args.samples_per_class >= 10:  # slots j < 10 of the sample check: IPC 10's seeds
                s10 = imgs.view(info.num_classes, args.samples_per_class,
                                *imgs.shape[1:])[:, :10].flatten(0, 1)
            else:  # (10 classes x 10, C, H, W), class-major
                s10 = sample_accuracy(prior, teacher, info, 10, args, device, ctx, args.seed,
                                      progress=False)[2]
            s10 = common.Split(common.to_u8(s10),  # as the PNGs of 02 hold them
                               torch.arange(info.num_classes, device=device).repeat_interleave(10))
            extra["distillability"] = d = distillability(s10, info, train, test, args, device, ctx)
            phase.extra = {"students": 6, "epochs": d["epochs"]}
        print(f"dit: distillability at IPC 10: plain CFG-{args.cfg} samples {d['samples']['mean']:.1f} "
              f"+- {d['samples']['std']:.1f} %, random real {d['random_real']['mean']:.1f} "
              f"+- {d['random_real']['std']:.1f} % (03's hard-label student, {d['epochs']} epochs, "
              f"3 seeds)")
    common.write_json(folder / "metrics.json", {
        "sample_acc": acc, "sample_acc_per_class": per, "samples_per_class": args.samples_per_class,
        "sample_steps": args.sample_steps, "cfg": args.cfg, "sample_s": sample_s,
        "sample_s_per_image": sample_s / len(imgs), **extra})
    (folder / "train_state.pt").unlink(missing_ok=True)
    print(f"dit: sample accuracy {acc:.1f} % (teacher top-1 on {args.samples_per_class} CFG-{args.cfg} samples "
          f"per class, {args.sample_steps} DDPM steps); train {extra['train_s']:.0f} s, sampling {sample_s:.0f} s")


def main():
    args = parse_args()
    device, ctx = common.setup_device(args.device, args.amp, args.compile)
    t0 = time.time()
    info, train, test = common.load_dataset(args.dataset, args.data_root, args.size)
    # every flag is checked before anything is written, so a typo leaves no half-made folder behind
    common.check_model(args.model, info)
    parse_epochs(args.keep_epochs, args.epochs)
    surrogate = surrogate_settings(args, info)
    scale = common.resolve_scale(args.scale, info.name)
    if args.cfg is None:
        args.cfg = dit.CFG[scale]
    if args.sample_steps is None:
        args.sample_steps = dit.SAMPLE_STEPS[scale]
    if args.teacher is not None:
        common.load_classifier(args.teacher, info, "cpu")
    if args.dit is not None and args.prior != "pixel":
        raise common.UserError("--prior latent trains its own VAE and DiT; leave out --prior to "
                               "use the pretrained pipeline of --dit")
    if args.dit is None:
        make = dit.make_pixel_dit if args.prior == "pixel" else dit.make_latent_dit
        make(info, args.dit_width, args.dit_depth, args.dit_patch)
        pretrained = None
    else:
        pretrained = dit.load_prior(args.dit, info, device)
    noise_cfg = pretrained.scheduler_config if pretrained else dit.make_train_scheduler().config
    if args.sample_steps > noise_cfg["num_train_timesteps"]:
        raise common.UserError(f"--sample-steps {args.sample_steps} exceeds the DiT's "
                          f"{noise_cfg['num_train_timesteps']} training steps")
    ds_file = args.run / "dataset.json"
    if ds_file.exists() and not args.overwrite:
        old = common.read_json(ds_file)
        if old != common.jsonable(info.to_dict()):
            what = f"dataset {old['name']!r}" if old["name"] != info.name else f"other {info.name} settings"
            raise common.UserError(f"{args.run} was made for {what} (see its dataset.json); "
                              f"choose another --run or pass --overwrite")
    for sub in ("teacher", "dit"):  # one writer per run: a second 01 on it ends here
        common.lock_folder(args.run / sub, "run")
    args.run.mkdir(parents=True, exist_ok=True)
    common.write_json(ds_file, info.to_dict())
    print(f"dataset {info.name}: {len(train.y)} train / {len(test.y)} test, {info.num_classes} classes, "
          f"{info.channels}x{info.size}x{info.size}; run folder {args.run}")
    train, test = train.to(device), test.to(device)
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
