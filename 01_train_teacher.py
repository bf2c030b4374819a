"""Train the teacher (reference classifier) and the class-conditional DiT prior for one dataset.

Reads:  a dataset: the embedded 5,000 MNIST digits by default (`--dataset`, `--data-root` for others);
        optionally a pretrained diffusers DiT pipeline (`--dit`, a hub name or a local folder).
Writes: <run>/
          dataset.json            name, classes, size, channels, normalisation, ImageNet class map
          teacher/config.json     arguments, versions, git commit, device (written first)
          teacher/teacher.pt      plain dict: model_name, dataset, classes, state_dict
          teacher/epoch_XXX.pt    checkpoints kept for --keep-epochs
          teacher/metrics.json    test accuracy, epochs, wall time (written last: the teacher is done)
          dit/config.json
          dit/transformer/ dit/scheduler/   the trained pixel DiT (save_pretrained), or
          dit/source.json                  where the pretrained pipeline given by --dit lives
          dit/samples.png         one row per class of CFG samples
          dit/metrics.json        sample accuracy (teacher top-1 on CFG samples), wall time (written last)
        An interrupted run resumes from teacher/train_state.pt and dit/train_state.pt.

Examples:
  python 01_train_teacher.py                       # CPU, embedded MNIST digits, ~26 min on 2 cores
  python 01_train_teacher.py --dataset imagenette --data-root data/imagenette2 --size 256 \
      --model resnet18 --epochs 100 --dit facebook/DiT-XL-2-256 --run runs/imagenette
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
    g = p.add_argument_group("DiT prior")
    g.add_argument("--dit", default=None, help="pretrained diffusers DiT pipeline (hub name or folder); "
                   "default: train a small pixel-space DiT")
    g.add_argument("--dit-steps", type=common.positive_int, default=3000)
    g.add_argument("--dit-batch", type=common.positive_int, default=128)
    g.add_argument("--dit-lr", type=float, default=3e-4)
    g.add_argument("--dit-warmup", type=common.positive_int, default=200, help="linear LR warm-up steps")
    g.add_argument("--dit-width", type=common.positive_int, default=128)
    g.add_argument("--dit-depth", type=common.positive_int, default=4)
    g.add_argument("--dit-patch", type=common.positive_int, default=4)
    g.add_argument("--dit-min-snr", type=float, default=0.0, help="min-SNR-gamma loss weight (0 = off)")
    g.add_argument("--dit-ckpt-every", type=common.positive_int, default=250, help="steps between resumable checkpoints")
    g.add_argument("--dit-eval-every", type=common.nonneg_int, default=0,
                   help="steps between sample-accuracy probes (20 per class) logged in metrics.json; 0 = off")
    g = p.add_argument_group("sampling (for the sample accuracy)")
    g.add_argument("--sample-steps", type=common.positive_int, default=50, help="DDPM ancestral steps (papers: 50)")
    g.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (papers: 4.0)")
    g.add_argument("--samples-per-class", type=common.positive_int, default=100)
    g.add_argument("--sample-batch", type=common.positive_int, default=250)
    args = p.parse_args(argv)
    args.run = args.run or default_run(args.dataset)
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
    acc = common.accuracy(model, test, ctx)
    common.save_classifier(folder / "teacher.pt", model, model_name, info, test_acc=acc)
    common.write_json(folder / "metrics.json", {"test_acc": acc, "epochs": args.epochs, "model": model_name,
                                           "wall_s": time.time() - t0, "imported_from": args.teacher})
    (folder / "train_state.pt").unlink(missing_ok=True)
    print(f"teacher: test accuracy {acc:.2f} % ({time.time() - t0:.0f} s)")
    return model.eval()


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
    pred = common.predict(teacher, imgs, ctx=ctx).argmax(1)
    per = [(pred[y == c] == c).float().mean().item() * 100 for c in range(info.num_classes)]
    return (pred == y).float().mean().item() * 100, per, imgs


def train_dit(args, info, train, device, ctx, teacher):
    """Train a small pixel-space DiT: cosine schedule, v-prediction, warm-up, EMA, grad clip 1.0."""
    from diffusers.training_utils import EMAModel
    folder = args.run / "dit"
    model = dit.make_pixel_dit(info, args.dit_width, args.dit_depth, args.dit_patch).to(device).train()
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
    print(f"dit: pixel DiT width {args.dit_width} depth {args.dit_depth} patch {args.dit_patch}, "
          f"{n_par / 1e6:.2f} M parameters, {args.dit_steps} steps of batch {args.dit_batch}, {device}")
    N, t_log, loss_sum, n_log = len(train.y), time.time(), 0.0, 0
    bar = tqdm(range(start, args.dit_steps), desc="dit", unit="step", initial=start,
               total=args.dit_steps)
    for step in bar:
        idx = torch.randint(0, N, (args.dit_batch,), device=device)
        x0, y = common.to_float(train.x[idx]) * 2 - 1, train.y[idx]  # (B, C, H, W) in [-1, 1]
        eps = torch.randn_like(x0)
        t = torch.randint(0, noise.config.num_train_timesteps, (len(y),), device=device)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        v = a.sqrt() * eps - (1 - a).sqrt() * x0  # v-prediction target
        with ctx:  # the model drops 10 % of labels to its null class itself (CFG training)
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
            acc = probe(model, ema, noise, info, teacher, args, device, ctx)
            curve.append({"step": done, "sample_acc_20pc": acc})
            tqdm.write(f"dit step {done}: sample accuracy (20 per class) {acc:.1f} %")
        if done % args.dit_ckpt_every == 0 and done < args.dit_steps:
            common.torch_save({"model": model.state_dict(), "opt": opt.state_dict(), "lr_sched": lr_sched.state_dict(),
                          "ema": ema.state_dict(), "rng": common.rng_state(), "step": done,
                          "curve": curve}, state_path)
    ema.copy_to(model.parameters())
    return dit.Prior(model.eval(), dict(noise.config), info), curve, n_par


def probe(model, ema, noise, info, teacher, args, device, ctx):
    """Sample accuracy of the EMA weights at 20 per class, without disturbing training."""
    saved = [p.detach().clone() for p in model.parameters()]
    ema.copy_to(model.parameters())
    acc, _, _ = sample_accuracy(dit.Prior(model.eval(), dict(noise.config), info), teacher, info, 20, args,
                                device, ctx, seed=args.seed + 1, progress=False)
    for p, s in zip(model.parameters(), saved):
        p.data.copy_(s)
    model.train().requires_grad_(True)  # the Prior froze it for sampling
    return acc


def make_dit(args, info, train, device, ctx, teacher, pretrained, timings):
    """Train or load the DiT prior, then measure its sample accuracy with the teacher."""
    folder = args.run / "dit"
    dargs = {k: getattr(args, k) for k in vars(args) if k.startswith(("dit", "sample", "cfg"))
             and k != "dit_ckpt_every"}
    dargs.update(dataset=args.dataset, seed=args.seed)
    common.prepare_folder(folder, dargs, args.overwrite, "DiT")
    if (folder / "metrics.json").exists():
        print(f"dit: done earlier (sample accuracy {common.read_json(folder / 'metrics.json')['sample_acc']:.1f} %), "
              f"skipping")
        timings.add("01/prior", 0.0, 0.0, skipped=True)
        timings.add("01/sample check", 0.0, 0.0, skipped=True)
        return
    common.write_config(folder, dargs, {"pretrained": args.dit is not None}, device, ctx)
    t0 = time.time()
    with timings.phase("01/prior") as phase:
        if args.dit is None:
            common.seed_everything(args.seed)
            prior, curve, n_par = train_dit(args, info, train, device, ctx, teacher)
            prior.save(folder)
            phase.extra = {"steps": args.dit_steps, "batch": args.dit_batch}
        else:  # loaded in main(): nothing to train
            prior = pretrained
            common.write_json(folder / "source.json", {"dit": str(args.dit)})
            curve, n_par = [], sum(p.numel() for p in prior.transformer.parameters())
    train_s = time.time() - t0
    t1 = time.time()
    with timings.phase("01/sample check") as phase:
        acc, per, imgs = sample_accuracy(prior, teacher, info, args.samples_per_class, args, device,
                                         ctx, seed=args.seed)
        phase.extra = {"images": len(imgs), "steps": args.sample_steps}
    sample_s = time.time() - t1
    k = min(10, args.samples_per_class)
    grid = imgs.view(info.num_classes, args.samples_per_class, *imgs.shape[1:])[:, :k].flatten(0, 1)
    common.save_grid(grid, k, folder / "samples.png")
    common.write_json(folder / "metrics.json", {
        "sample_acc": acc, "sample_acc_per_class": per, "samples_per_class": args.samples_per_class,
        "sample_steps": args.sample_steps, "cfg": args.cfg, "parameters": n_par, "train_s": train_s,
        "sample_s": sample_s, "sample_s_per_image": sample_s / len(imgs), "curve": curve})
    (folder / "train_state.pt").unlink(missing_ok=True)
    print(f"dit: sample accuracy {acc:.1f} % (teacher top-1 on {args.samples_per_class} CFG-{args.cfg} samples "
          f"per class, {args.sample_steps} DDPM steps); train {train_s:.0f} s, sampling {sample_s:.0f} s")


def main():
    args = parse_args()
    device, ctx = common.setup_device(args.device, args.amp)
    t0 = time.time()
    info, train, test = common.load_dataset(args.dataset, args.data_root, args.size)
    # every flag is checked before anything is written, so a typo leaves no half-made folder behind
    common.check_model(args.model, info)
    parse_epochs(args.keep_epochs, args.epochs)
    if args.teacher is not None:
        common.load_classifier(args.teacher, info, "cpu")
    if args.dit is None:
        dit.make_pixel_dit(info, args.dit_width, args.dit_depth, args.dit_patch)
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
    make_dit(args, info, train, device, ctx, teacher, pretrained, timings)
    timings.report("01")
    print(f"01 done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    common.cli(main)
