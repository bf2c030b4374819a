"""Build a distilled set in stages (disjoint increments T_1..T_K) with random, dit, lgd or acs.

Reads:  <run>/ made by 01_train_teacher.py: dataset.json, teacher/teacher.pt (the reference model
        f_ref, trained on the full data) and dit/ (the DiT prior). No dataset flag is repeated here.
Writes: <run>/distilled/<method>-ipc<N>/
          config.json                 arguments, resolved settings beside the paper's, versions (first)
          stage_01/ .. stage_K/       increment k: IPC/K images per class
            <class>/<index:06d>.png   indices run on across stages, so the union of stages is an ImageFolder
            latents.pt                final DiT latents of the stage's images (the deviation memory)
            current.pt                lgd: f_cur, trained on stages < k, that guided this stage
            discriminator.pt          acs: D_k, trained on curricula < k, that guided this stage
            manifest.json             counts, seed, settings, time, scores per image (written last: a
                                      stage without it is unfinished and is redone by a rerun)

Methods (METHODS.md §1-4): random = class-balanced real images; dit = plain CFG sampling; lgd =
learnability-guided sampling against f_cur and f_ref with kappa candidates per slot; acs = curricula
sampled against a discriminator trained on the earlier ones (reconstructed, see README).

Examples:
  python 02_distill_stages.py --method lgd          # CPU, embedded digits: IPC 50 as 5 stages of 10
  python 02_distill_stages.py --run runs/imagenette --method lgd --ipc 100 --stages 10 \
      --init-folder runs/imagenette/distilled/igd-ipc10
"""
import argparse
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common as C
import guidance as G

METHODS = ["random", "dit", "lgd", "acs"]
DIT_METHODS = {"dit", "lgd", "acs"}

# Method settings: (paper scale = a latent DiT-XL/2, small scale = the pixel DiT of 01 on the digits).
# A flag left unset takes the value for the run's scale; both columns go into config.json.
DEFAULTS = {
    "lgd": {
        "scale": (15.0, 15.0),  # lambda (LGD paper)
        "omega": (0.5, 0.5),  # weight of CE(f_ref) in S (LGD paper)
        "gamma": (50.0, 50.0),  # deviation scale (LGD paper)
        "c0": (0.0015, 0.0015),  # IGD's normalisation constant
        "window": ("10,45", "10,45"),  # of 50 steps (LGD paper)
        "candidates": (3, 3),  # kappa (LGD paper)
        "guide_epochs": (300, 60),  # f_cur: the hard-label trainer, fewer epochs (our choice)
    },
    "acs": {  # reconstructed: the ACS paper text could not be checked (METHODS.md §4)
        "scale": (15.0, 15.0),
        "omega": (0.5, 0.5),  # omega_v, teacher validity weight
        "gamma": (50.0, 50.0),
        "c0": (0.0015, 0.0015),
        "window": ("10,45", "10,45"),
        "candidates": (1, 1),
        "guide_epochs": (300, 60),  # D_k epochs (our choice)
    },
}
GUIDE_FLAGS = ["scale", "omega", "gamma", "c0", "window", "candidates", "guide_epochs"]
# flags that only some methods read: giving one to another method is a contradiction, not a no-op
METHOD_FLAGS = {"init_folder": {"lgd"}, "adv_form": {"acs"}, "eps_const": {"lgd", "acs"},
                **{k: {"lgd", "acs"} for k in GUIDE_FLAGS + ["memory", "guide_model"]}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    C.add_common_args(p, run_help="run folder of 01 (reads dataset.json, teacher/, dit/; writes distilled/)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--ipc", type=C.positive_int, default=50, help="images per class in the finished set")
    p.add_argument("--stages", type=C.positive_int, default=5, help="increments K (LGD: +10 IPC each; ACS curricula)")
    g = p.add_argument_group("DiT sampling")
    g.add_argument("--sample-steps", type=C.positive_int, default=50, help="DDPM ancestral steps (papers: 50)")
    g.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (papers: 4.0)")
    g.add_argument("--sample-batch", type=C.positive_int, default=120, help="samples per forward pass")
    g = p.add_argument_group("guidance (lgd, acs); unset = the table in this script for the run's scale")
    g.add_argument("--scale", type=float, default=None, help="lambda, the learnability/adversarial scale")
    g.add_argument("--omega", type=float, default=None, help="weight of the reference CE (LGD omega, ACS omega_v)")
    g.add_argument("--gamma", type=float, default=None, help="deviation (diversity) scale; 0 = off")
    g.add_argument("--c0", type=float, default=None, help="normalisation constant of the guidance step")
    g.add_argument("--window", default=None, help="guidance window t_lo,t_hi on the 50-step scale")
    g.add_argument("--candidates", type=C.positive_int, default=None, help="kappa candidates per slot (lgd)")
    g.add_argument("--memory", type=C.positive_int, default=None, help="deviation memory per class (default 64)")
    g.add_argument("--eps-const", action="store_true", default=None,
                   help="treat eps as constant in the guidance gradient (no backward through the DiT)")
    g.add_argument("--adv-form", choices=["ce", "nonsat"], default=None,
                   help="acs: ascend CE(D(x), y), or descend the non-saturating -log(1 - p_y) (default ce)")
    g.add_argument("--guide-model", default=None, help="architecture of f_cur (lgd) / D_k (acs) (default convnet-3)")
    g.add_argument("--guide-epochs", type=C.positive_int, default=None, help="epochs of f_cur / D_k")
    g.add_argument("--init-folder", type=Path, default=None,
                   help="lgd: take the first increment from this <class>/<image> folder (e.g. an IGD set)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# settings and validation: everything is checked before anything is written
# ----------------------------------------------------------------------------------------------


def parse_window(s: str, steps: int) -> tuple:
    try:
        lo, hi = (int(v) for v in s.split(","))
    except ValueError:
        raise C.UserError(f"--window must be two integers t_lo,t_hi like 10,45, got {s!r}") from None
    if not 0 <= lo <= hi <= 49:
        raise C.UserError(f"--window {s} must satisfy 0 <= t_lo <= t_hi <= 49 (the 50-step scale)")
    return lo, hi


def resolve_settings(args, scale: str) -> dict:
    """The method's guidance settings: flags as given, unset ones from DEFAULTS for this scale."""
    for flag, methods in METHOD_FLAGS.items():
        if getattr(args, flag) is not None and args.method not in methods:
            raise C.UserError(f"--{flag.replace('_', '-')} has no meaning for --method {args.method} "
                              f"(only {', '.join(sorted(methods))}); drop it")
    if args.method not in DEFAULTS:
        return {}
    col = 0 if scale == "paper" else 1
    s = {k: getattr(args, k) if getattr(args, k) is not None else v[col] for k, v in DEFAULTS[args.method].items()}
    s["window"] = parse_window(s["window"], args.sample_steps)
    s["memory"] = args.memory or 64
    s["eps_const"] = bool(args.eps_const)
    s["guide_model"] = args.guide_model or "convnet-3"
    s["adv_form"] = args.adv_form or "ce"
    if args.method == "acs" and s["candidates"] != 1:
        raise C.UserError("--candidates is LGD's selection step; acs samples one image per slot")
    return s


def stage_seed(seed: int, k: int) -> int:
    """Each stage draws from its own seed, so a stage redone after an interruption repeats exactly."""
    return seed * 1000 + k


# ----------------------------------------------------------------------------------------------
# the stage engine
# ----------------------------------------------------------------------------------------------


class Env:
    """What every stage maker needs: settings, models, the earlier stages."""

    def __init__(self, args, info, device, ctx, teacher, prior, real, settings, test):
        self.args, self.info, self.device, self.ctx = args, info, device, ctx
        self.teacher, self.prior, self.real, self.s, self.test = teacher, prior, real, settings, test
        self.per = args.ipc // args.stages
        self.done = []  # finished stages: dicts with x (uint8), y, z (latents or None)

    def labels(self) -> torch.Tensor:
        """Class-major labels of one increment: per images of class 0, then class 1, ..."""
        return torch.arange(self.info.num_classes, device=self.device).repeat_interleave(self.per)

    def union(self) -> C.Split:
        return C.Split(torch.cat([d["x"] for d in self.done]), torch.cat([d["y"] for d in self.done]))

    def memory(self) -> G.Memory:
        """Deviation memory holding the latents of every earlier stage (FIFO per class)."""
        mem = G.Memory(self.s["memory"])
        for d in self.done:
            if d["z"] is not None:
                mem.add(d["z"], d["y"])
        return mem


def make_random(env: Env, k: int, gen: torch.Generator) -> dict:
    """Class-balanced real images; one permutation per class (from the run seed) keeps stages disjoint."""
    g = torch.Generator().manual_seed(env.args.seed)
    idx = []
    for c in range(env.info.num_classes):
        cls = (env.real.y == c).nonzero().squeeze(1).cpu()
        idx.append(cls[torch.randperm(len(cls), generator=g)][k * env.per:(k + 1) * env.per])
    idx = torch.cat(idx).to(env.real.y.device)
    return {"x": env.real.x[idx], "y": env.real.y[idx], "z": None, "scores": {"train_index": idx.tolist()}}


def sample_plain(env: Env, y, gen, guidance=None, desc="sample"):
    a = env.args
    return G.sample(env.prior, y, steps=a.sample_steps, cfg=a.cfg, gen=gen, guidance=guidance,
                    batch_size=a.sample_batch, ctx=env.ctx, desc=desc)


def make_dit(env: Env, k: int, gen: torch.Generator) -> dict:
    """Plain CFG sampling: the baseline every guided method is compared with."""
    imgs, z = sample_plain(env, env.labels(), gen, desc=f"stage {k + 1} dit")
    return {"x": to_u8(imgs), "y": env.labels(), "z": z, "scores": {}}


def sample_slots(env: Env, y, gen, guidance: G.Guidance, kappa=1, score=None, desc="sample"):
    """Guided sampling of one image per label, in chunks that share forward passes.

    With kappa > 1 every slot gets kappa candidates (in the same batch) and keeps the one with the
    highest `score(img, y)`. The chunk's kept latents join the deviation memory before the next chunk.
    Returns (images, latents, scores of the kept images).
    """
    chunk = max(1, env.args.sample_batch // kappa)
    imgs, zs, scores = [], [], []
    for i0 in tqdm(range(0, len(y), chunk), desc=desc, leave=False):
        yc = y[i0:i0 + chunk]
        yk = yc.repeat_interleave(kappa)  # (n*kappa,) candidates of a slot side by side
        im, z = G.sample(env.prior, yk, steps=env.args.sample_steps, cfg=env.args.cfg, gen=gen,
                         guidance=guidance, batch_size=len(yk), ctx=env.ctx, progress=False)
        if score is not None:
            with torch.no_grad(), env.ctx:
                sc = score(im, yk).float()  # (n*kappa,)
        else:
            sc = torch.zeros(len(yk), device=im.device)
        best = sc.view(len(yc), kappa).argmax(1) + torch.arange(len(yc), device=im.device) * kappa
        im, z, sc = im[best], z[best], sc[best]
        if guidance.memory is not None:
            guidance.memory.add(z, yc)
        imgs.append(im), zs.append(z), scores.append(sc)
    return torch.cat(imgs), torch.cat(zs), torch.cat(scores)


def train_guide(env: Env, k: int, sgd: bool) -> C.Classifier:
    """f_cur (lgd: the §6 hard-label protocol, AdamW) or D_k (acs: SGD 0.01, momentum 0.9, wd 5e-4), from
    scratch on every earlier stage, with CutMix + random-resized crop; seeded by the stage's seed."""
    model = C.build_model(env.s["guide_model"], env.info).to(env.device)
    proto = C.Protocol("hard", lr=0.01, wd=5e-4, optimizer="sgd") if sgd else C.Protocol("hard")
    C.train_student(model, env.union(), env.info, proto, epochs=env.s["guide_epochs"],
                    seed=stage_seed(env.args.seed, k), ctx=env.ctx, desc=f"stage {k + 1} {'D_k' if sgd else 'f_cur'}")
    return model.eval()


def guidance_for(env: Env, terms, memory) -> G.Guidance:
    s = env.s
    return G.Guidance(terms=terms, scale=s["scale"], c0=s["c0"], window=s["window"], deviation=s["gamma"],
                      memory=memory, eps_const=s["eps_const"])


def make_lgd(env: Env, k: int, gen: torch.Generator) -> dict:
    """Stage 1: plain DiT (or --init-folder); stage k > 1: learnability guidance against f_cur."""
    if k == 0:
        if env.args.init_folder is None:
            out = make_dit(env, k, gen)
        else:
            x = read_init_folder(env)
            with torch.no_grad(), env.ctx:
                z = env.prior.encode(C.to_float(x.x)).float()
            out = {"x": x.x, "y": x.y, "z": z, "scores": {}}
        return out
    current = train_guide(env, k, sgd=False)
    terms = G.learnability_terms(current, env.teacher, env.s["omega"])
    y = env.labels()
    imgs, z, S = sample_slots(env, y, gen, guidance_for(env, terms, env.memory()), kappa=env.s["candidates"],
                              score=lambda im, yy: G.objective(terms, im, yy), desc=f"stage {k + 1} lgd")
    x = to_u8(imgs)
    return {"x": x, "y": y, "z": z, "models": {"current.pt": current},
            "scores": {"S": S.tolist(), "ce_current": ce(current, x, y, env.ctx).tolist()},
            "stats": {"current_test_acc": C.accuracy(current, env.test, env.ctx),
                      "current_train_acc": C.accuracy(current, env.union(), env.ctx)}}


def make_acs(env: Env, k: int, gen: torch.Generator) -> dict:
    """Curriculum 1: plain DiT + deviation; curriculum k > 1: adversarial guidance against D_k (reconstructed)."""
    y = env.labels()
    if k == 0:
        imgs, z, _ = sample_slots(env, y, gen, guidance_for(env, [], env.memory()), desc="curriculum 1")
        return {"x": to_u8(imgs), "y": y, "z": z, "scores": {}}
    disc = train_guide(env, k, sgd=True)
    terms = G.adversarial_terms(disc, env.teacher, env.s["omega"], env.s["adv_form"])
    # the same curriculum without the adversarial term, from the same noise: D_k's accuracy "before"
    gen_before = torch.Generator(gen.device).set_state(gen.get_state())
    before, _, _ = sample_slots(env, y, gen_before, guidance_for(env, [], env.memory()),
                                desc=f"curriculum {k + 1} unguided")
    imgs, z, _ = sample_slots(env, y, gen, guidance_for(env, terms, env.memory()), desc=f"curriculum {k + 1} acs")
    x = to_u8(imgs)
    train = env.union()
    return {"x": x, "y": y, "z": z, "models": {"discriminator.pt": disc},
            "scores": {"ce_disc": ce(disc, x, y, env.ctx).tolist()},
            "stats": {"disc_acc_train": C.accuracy(disc, train, env.ctx),
                      "disc_acc_before": C.accuracy(disc, C.Split(to_u8(before), y), env.ctx),
                      "disc_acc_after": C.accuracy(disc, C.Split(x, y), env.ctx),
                      "disc_test_acc": C.accuracy(disc, env.test, env.ctx)}}


MAKERS = {"random": make_random, "dit": make_dit, "lgd": make_lgd, "acs": make_acs}


def to_u8(imgs: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 exactly as the PNG stores them, so resumed and fresh runs see the same pixels."""
    return (imgs.clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def ce(model, x_u8, y, ctx) -> torch.Tensor:
    return F.cross_entropy(C.predict(model, x_u8, ctx=ctx), y, reduction="none")


def read_init_folder(env: Env) -> C.Split:
    x = C.read_distilled(env.args.init_folder, env.info)
    counts = torch.bincount(x.y, minlength=env.info.num_classes).tolist()
    if any(n != env.per for n in counts):
        raise C.UserError(f"--init-folder {env.args.init_folder} must hold {env.per} images per class "
                          f"(IPC {env.args.ipc} / {env.args.stages} stages), found {counts}")
    return x.to(env.device)


def write_stage(folder: Path, env: Env, k: int, out: dict, seconds: float):
    """Images, latents and models of one stage, then the manifest (last: the stage is done)."""
    info = env.info
    base = k * env.per
    for c in range(info.num_classes):
        for j, img in enumerate(out["x"][out["y"] == c]):
            C.save_png(img.float() / 255, folder / info.classes[c] / f"{base + j:06d}.png")
    if out["z"] is not None:
        C.torch_save(out["z"].cpu(), folder / "latents.pt")
    for name, model in out.get("models", {}).items():
        C.save_classifier(folder / name, model, env.s["guide_model"], info, stage=k + 1)
    ref = ce(env.teacher, out["x"], out["y"], env.ctx)
    ref_acc = C.accuracy(env.teacher, C.Split(out["x"], out["y"]), env.ctx)
    scores = {**out["scores"], "ce_reference": ref.tolist()}
    manifest = {
        "stage": k + 1, "method": env.args.method, "images_per_class": env.per,
        "indices": [base, base + env.per - 1],
        "counts": {info.classes[c]: int((out["y"] == c).sum()) for c in range(info.num_classes)},
        "seed": stage_seed(env.args.seed, k), "settings": env.s, "seconds": seconds,
        "reference_acc": ref_acc, "reference_loss": ref.mean().item(),
        "mean_scores": {n: sum(v) / len(v) for n, v in scores.items() if n != "train_index"},
        **out.get("stats", {}), "scores": scores}
    C.write_json(folder / "manifest.json", manifest)
    return manifest


def load_stage(folder: Path, env: Env, k: int) -> dict:
    """A finished stage back from disk (images as saved, latents for the memory)."""
    s = C.read_distilled(folder, env.info).to(env.device)
    z = torch.load(folder / "latents.pt", map_location=env.device, weights_only=True) \
        if (folder / "latents.pt").exists() else None
    return {"x": s.x, "y": s.y, "z": z}


def main():
    args = parse_args()
    device, ctx = C.setup_device(args.device, args.amp)
    t_start = time.time()
    info = C.read_run_info(args.run)
    if args.ipc % args.stages:
        raise C.UserError(f"--ipc {args.ipc} does not split into --stages {args.stages} equal increments; "
                          f"choose a multiple of {args.stages}")
    teacher = C.load_run_teacher(args.run, info, device)
    prior = C.load_run_prior(args.run, info, device) if args.method in DIT_METHODS else None
    scale = "paper" if prior is not None and prior.vae is not None else "small"
    settings = resolve_settings(args, scale)
    if args.sample_steps > (prior.scheduler_config["num_train_timesteps"] if prior else 10 ** 9):
        raise C.UserError(f"--sample-steps {args.sample_steps} exceeds the DiT's training steps")
    if settings:
        C.check_model(settings["guide_model"], info)
    _, real, test = C.load_dataset(info.name, info.root, info.size)
    if args.method == "random":
        short = [info.classes[c] for c in range(info.num_classes) if (real.y == c).sum() < args.ipc]
        if short:
            raise C.UserError(f"--ipc {args.ipc} needs {args.ipc} real training images per class but class(es) "
                              f"{short[:5]} have fewer; lower --ipc")
    env = Env(args, info, device, ctx, teacher, prior, real.to(device), settings, test.to(device))
    if args.init_folder is not None:
        read_init_folder(env)
    out = args.run / "distilled" / f"{args.method}-ipc{args.ipc}"
    cfg_args = {k: v for k, v in vars(args).items() if k != "overwrite"}
    C.prepare_folder(out, cfg_args, args.overwrite, "distilled set")
    derived = {"scale": scale, "images_per_stage": env.per, "settings": settings,
               "defaults": {k: {"paper": v[0], "small": v[1]} for k, v in DEFAULTS.get(args.method, {}).items()}}
    C.write_config(out, cfg_args, derived, device)
    print(f"{args.method}: IPC {args.ipc} as {args.stages} stages of {env.per} per class, {info.num_classes} classes "
          f"of {info.name}; {scale} scale; device {device}; writing {out}")
    if settings:
        print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    for k in tqdm(range(args.stages), desc=f"{args.method} stages"):
        folder = out / f"stage_{k + 1:02d}"
        if (folder / "manifest.json").exists():
            env.done.append(load_stage(folder, env, k))
            tqdm.write(f"stage {k + 1}: done earlier, skipping")
            continue
        if folder.exists():
            shutil.rmtree(folder)  # unfinished: start the stage again from its own seed
        C.seed_everything(stage_seed(args.seed, k))
        gen = torch.Generator().manual_seed(stage_seed(args.seed, k))
        t0 = time.time()
        res = MAKERS[args.method](env, k, gen)
        m = write_stage(folder, env, k, res, time.time() - t0)
        env.done.append({"x": res["x"], "y": res["y"], "z": res["z"]})
        extra = {n: m[n] for n in ("current_test_acc", "disc_acc_before", "disc_acc_after") if n in m}
        tqdm.write(f"stage {k + 1}/{args.stages}: {m['seconds']:.0f} s, reference acc {m['reference_acc']:.1f} %, "
                   f"reference loss {m['reference_loss']:.3f}, "
                   + ", ".join(f"{n} {v:.3f}" for n, v in {**m["mean_scores"], **extra}.items()))
    print(f"02 done in {time.time() - t_start:.0f} s: {out}")


if __name__ == "__main__":
    C.cli(main)
