"""Build a distilled set in stages (disjoint increments T_1..T_K) with random, dit, lgd, acs or delt.

Reads:  <run>/ made by 01_train_teacher.py: dataset.json, teacher/teacher.pt (the reference model
        f_ref, trained on the full data) and dit/ (the DiT prior; not read by random and delt). No
        dataset flag is repeated here.
Writes: <run>/distilled/<method>-ipc<N>/   (delt: delt[-constant][-init-<x>]-ipc<N>, see delt_name), or the
        folder given by --out (ablations, e.g. the notebooks' <run>/ablations/lgd-omega0-ipc10)
          config.json                 arguments, resolved settings beside the paper's, versions (first)
          stage_01/ .. stage_K/       increment k: IPC/K images per class (delt: join round k's group)
            <class>/<index:06d>.png   indices run on across stages, so the union of stages is an ImageFolder
            latents.pt                final DiT latents of the stage's images (the deviation memory)
            current.pt                lgd: f_cur, trained on stages < k, that guided this stage
            discriminator.pt          acs: D_k, trained on curricula < k, that guided this stage
            manifest.json             counts, seed, settings, time, scores per image (written last: a
                                      stage without it is unfinished and is redone by a rerun)
          delt_state/batch_XXXX.pt    delt only, while it runs: finished optimisation batches (resume);
                                      removed once every stage has its manifest

Methods (METHODS.md §1-4): random = class-balanced real images; dit = plain CFG sampling; lgd =
learnability-guided sampling against f_cur and f_ref with kappa candidates per slot; acs = curricula
sampled against a discriminator trained on the earlier ones (reconstructed, see README). §5: delt =
EarlyLate pixel optimisation of median-selected real images against the BN teacher; the images of
join round k form stage k (stage_01 joined first and trained longest).

Examples:
  python 02_distill_stages.py --method lgd          # CPU, embedded digits: IPC 50 as 5 stages of 10
  python 02_distill_stages.py --run runs/imagenette --method lgd --ipc 100 --stages 10 \
      --init-folder runs/imagenette/distilled/igd-ipc10
  python 02_distill_stages.py --method delt         # CPU, embedded digits: IPC 50, MI 160 / RI 20, 8 stages
  python 02_distill_stages.py --run runs/imagenet1k --method delt --ipc 50   # GPU: MI 4000 / RI 500
"""
import argparse
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import common as C
import guidance as G

METHODS = ["random", "dit", "lgd", "acs", "delt"]
STAGES = 5  # default K for the methods with equal increments (LGD: IPC 50 as 5 x 10)
DIT_METHODS = {"dit", "lgd", "acs"}

# Method settings: (paper scale = a latent DiT-XL/2, small scale = the pixel DiT of 01 on the digits).
# A flag left unset takes the value for the run's scale; both columns go into config.json.
DEFAULTS = {
    "lgd": {
        "scale": (15.0, 15.0),  # lambda (LGD paper)
        "omega": (0.5, 0.5),  # weight of CE(f_ref) in S (LGD paper)
        # deviation scale: LGD paper 50 on 4x32x32 latents; its per-element push scales like gamma / D,
        # so 50 * 784 / 4096 ~ 10 on 28x28 pixels (50 there drove samples off the data: teacher acc 10 %)
        "gamma": (50.0, 10.0),
        "c0": (0.0015, 0.0015),  # IGD's normalisation constant
        "window": ("10,45", "10,45"),  # of 50 steps (LGD paper)
        "candidates": (3, 3),  # kappa (LGD paper)
        "guide_epochs": (300, 60),  # f_cur: the hard-label trainer, fewer epochs (our choice)
    },
    "acs": {  # reconstructed: the ACS paper text could not be checked (METHODS.md §4)
        "scale": (15.0, 15.0),
        "omega": (0.5, 0.5),  # omega_v, teacher validity weight
        "gamma": (50.0, 10.0),  # as lgd
        "c0": (0.0015, 0.0015),
        "window": ("10,45", "10,45"),
        "candidates": (1, 1),
        "guide_epochs": (300, 60),  # D_k epochs (our choice)
    },
    # delt: paper scale = DELT's released ImageNet-1K recipe; small = the embedded digits on 2 CPU cores
    # (scale by dataset: there is no DiT), chosen from the measured per-iteration cost (README)
    "delt": {
        "iterations": (4000, 160),  # MI, total iterations (DELT paper)
        "round_iterations": (500, 20),  # RI, one join round (DELT paper); small keeps R = MI/RI = 8
        "opt_batch": (100, 100),  # images per optimisation batch, whole classes (DELT code)
        "lr": (0.25, 0.25),  # Adam on the normalised pixels (DELT code)
        "r_bn": (0.01, 0.01),  # alpha_BN (DELT code)
        "first_bn_weight": (10.0, 10.0),  # w_1 (DELT/SRe2L code)
    },
}
GUIDE_FLAGS = ["scale", "omega", "gamma", "c0", "window", "candidates", "guide_epochs"]
# flags that only some methods read: giving one to another method is a contradiction, not a no-op
METHOD_FLAGS = {"init_folder": {"lgd"}, "adv_form": {"acs"}, "eps_const": {"lgd", "acs"},
                **{k: {"lgd", "acs"} for k in GUIDE_FLAGS + ["memory", "guide_model"]},
                **{k: {"delt"} for k in list(DEFAULTS["delt"]) + ["schedule", "init", "per_sample_aug"]}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    C.add_common_args(p, run_help="run folder of 01 (reads dataset.json, teacher/, dit/; writes distilled/)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--ipc", type=C.positive_int, default=50, help="images per class in the finished set")
    p.add_argument("--out", type=Path, default=None, help="output folder (default <run>/distilled/<method>-ipc<N>); "
                   "ablations go elsewhere so that `03 --run` keeps evaluating the main sets")
    p.add_argument("--stages", type=C.positive_int, default=None,
                   help=f"increments K (default {STAGES}; LGD: +10 IPC each; ACS curricula); delt: one stage per "
                        f"join round, min(MI/RI, IPC), so give it only to confirm that number")
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
    g = p.add_argument_group("delt (METHODS.md §5); unset = the table in this script for the run's scale")
    g.add_argument("--iterations", type=C.positive_int, default=None, help="MI, total iterations (paper 4000)")
    g.add_argument("--round-iterations", type=C.positive_int, default=None,
                   help="RI, iterations per join round (paper 500); MI/RI rounds")
    g.add_argument("--schedule", choices=["earlylate", "constant"], default=None,
                   help="earlylate (default): group g joins at g*RI; constant: every image trains MI iterations "
                        "(the SRe2L/CDA baseline)")
    g.add_argument("--init", choices=["median", "top", "min", "noise"], default=None,
                   help="real images nearest the class median of the teacher's true-class probability (default), "
                        "the highest, the lowest, or Gaussian noise (SRe2L)")
    g.add_argument("--opt-batch", type=C.positive_int, default=None,
                   help="images per optimisation batch; a batch holds whole classes (max(1, B // IPC) of them)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate on the normalised pixels (paper 0.25)")
    g.add_argument("--r-bn", type=float, default=None, help="alpha_BN, weight of the BN statistics loss (paper 0.01)")
    g.add_argument("--first-bn-weight", type=float, default=None, help="w_1 of the first BN layer (paper 10)")
    g.add_argument("--per-sample-aug", action="store_true", default=None,
                   help="a random-resized crop (and flip) per image; default one per batch, as DELT's code")
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
    if args.method == "delt":
        return delt_settings(args, s)
    s["window"] = parse_window(s["window"], args.sample_steps)
    s["memory"] = args.memory or 64
    s["eps_const"] = bool(args.eps_const)
    s["guide_model"] = args.guide_model or "convnet-3"
    s["adv_form"] = args.adv_form or "ce"
    if args.method == "acs" and s["candidates"] != 1:
        raise C.UserError("--candidates is LGD's selection step; acs samples one image per slot")
    return s


def stage_counts(args, settings: dict) -> list:
    """Images per class in each stage: K equal increments, or (delt) the sizes of the join-round groups."""
    if args.method == "delt":
        return delt_stage_counts(args, settings)
    k = args.stages or STAGES
    if args.ipc % k:
        raise C.UserError(f"--ipc {args.ipc} does not split into --stages {k} equal increments; "
                          f"choose a multiple of {k}")
    return [args.ipc // k] * k


def stage_seed(seed: int, k: int) -> int:
    """Each stage draws from its own seed, so a stage redone after an interruption repeats exactly."""
    return seed * 1000 + k


# ----------------------------------------------------------------------------------------------
# the stage engine
# ----------------------------------------------------------------------------------------------


class Env:
    """What every stage maker needs: settings, models, the earlier stages."""

    def __init__(self, args, info, device, ctx, teacher, prior, real, settings, test, counts, out):
        self.args, self.info, self.device, self.ctx = args, info, device, ctx
        self.teacher, self.prior, self.real, self.s, self.test = teacher, prior, real, settings, test
        self.counts, self.out = counts, out  # images per class of each stage; the output folder
        self.per = counts[0]  # the stage size of the methods with equal stages
        self.done = []  # finished stages: dicts with x (uint8), y, z (latents or None)
        self.cache = {}  # what a maker computes once for all stages (delt: the optimisation)

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


MAKERS = {"random": make_random, "dit": make_dit, "lgd": make_lgd, "acs": make_acs}  # delt: added below


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
                          f"(IPC {env.args.ipc} / {len(env.counts)} stages), found {counts}")
    return x.to(env.device)


def write_stage(folder: Path, env: Env, k: int, out: dict, seconds: float):
    """Images, latents and models of one stage, then the manifest (last: the stage is done)."""
    info = env.info
    n, base = env.counts[k], sum(env.counts[:k])  # indices continue after the class's earlier stages
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
        "stage": k + 1, "method": env.args.method, "images_per_class": n,
        "indices": [base, base + n - 1],
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


# ----------------------------------------------------------------------------------------------
# delt (METHODS.md §5, after DELT's released code): EarlyLate pixel optimisation from real images.
# Every join round is optimised in one pass per batch of classes; join round k's images form stage k.
# ----------------------------------------------------------------------------------------------

DELT_STATE = "delt_state"  # finished batches (uint8 images + scores) while the optimisation runs


def delt_settings(args, s: dict) -> dict:
    """The delt flags on top of the DEFAULTS column: schedule, initialisation, augmentation; checked."""
    s["schedule"] = args.schedule or "earlylate"
    s["init"] = args.init or "median"
    s["per_sample_aug"] = bool(args.per_sample_aug)
    if s["schedule"] == "constant":
        if args.round_iterations is not None:
            raise C.UserError("--round-iterations has no meaning with --schedule constant (every image trains "
                              "--iterations); drop it")
        s["round_iterations"] = None
    elif s["iterations"] % s["round_iterations"]:
        raise C.UserError(f"--iterations {s['iterations']} must be a multiple of --round-iterations "
                          f"{s['round_iterations']} (MI = rounds x RI)")
    if s["lr"] <= 0 or s["r_bn"] < 0 or s["first_bn_weight"] < 0:
        raise C.UserError(f"--lr must be > 0 and --r-bn, --first-bn-weight >= 0, got {s['lr']}, {s['r_bn']}, "
                          f"{s['first_bn_weight']}")
    return s


def delt_groups(ipc: int, iterations: int, round_iterations: int | None) -> list:
    """Per-class group sizes in rank order: R = MI/RI near-equal groups, the first IPC mod R one image
    larger (DELT's code); group g joins at g*RI. Empty tail groups (IPC < R) are dropped, so IPC 1 is
    one group trained MI iterations. round_iterations None (constant schedule): one group of IPC."""
    if round_iterations is None:
        return [ipc]
    r = iterations // round_iterations
    return [n for n in (ipc // r + (g < ipc % r) for g in range(r)) if n]


def delt_stage_counts(args, s: dict) -> list:
    """One stage per join round; --stages may only confirm that number."""
    counts = delt_groups(args.ipc, s["iterations"], s["round_iterations"])
    if args.stages is not None and args.stages != len(counts):
        raise C.UserError(f"--stages {args.stages} contradicts the delt schedule, which makes one stage per join "
                          f"round: {len(counts)} here (min(MI/RI, IPC)); drop --stages or change "
                          f"--iterations/--round-iterations")
    return counts


def delt_joins(counts: list, round_iterations: int | None) -> list:
    """Join iteration of every rank of a class: group g joins at g*RI (all 0 on the constant schedule)."""
    return [g * (round_iterations or 0) for g, n in enumerate(counts) for _ in range(n)]


def delt_name(args, s: dict) -> str:
    """delt-ipc50; the baselines made by flags get their own folder, e.g. delt-constant-init-noise-ipc50
    (SRe2L-style) or delt-constant-ipc50 (CDA-style), so a comparison keeps both."""
    parts = ["delt"] + (["constant"] if s["schedule"] == "constant" else []) + \
        ([f"init-{s['init']}"] if s["init"] != "median" else [])
    return "-".join(parts) + f"-ipc{args.ipc}"


def delt_check(env: Env):
    """What delt needs from the run, checked before anything is written."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in env.teacher.modules()):
        raise C.UserError(f"delt matches the teacher's BatchNorm statistics, but the teacher of {env.args.run} has "
                          f"no BN layers; train one with 01_train_teacher.py --model convnet-3-bn (or resnet18)")
    if env.s["init"] != "noise":
        have = torch.bincount(env.real.y, minlength=env.info.num_classes)
        short = [env.info.classes[c] for c in (have < env.args.ipc).nonzero().flatten().tolist()]
        if short:
            raise C.UserError(f"--ipc {env.args.ipc} needs {env.args.ipc} real training images per class to "
                              f"initialise from, but class(es) {short[:5]} have fewer; lower --ipc or use --init noise")


class BNMatch:
    """Forward hooks on a model's BN layers (as a context). After a forward pass, loss() =
    sum_l w_l (||mu_l - mu_l^run||_2 + ||var_l - var_l^run||_2), with mu, var the (biased) batch statistics
    of each BN layer's *input* and w_1 = first_weight, else 1. The model stays in eval mode."""

    def __init__(self, model: nn.Module, first_weight: float):
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.weights = [first_weight] + [1.0] * (len(self.layers) - 1)
        self.terms, self.handles = [None] * len(self.layers), []

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, i):
        def hook(module, inputs, output):
            x = inputs[0].float()  # (B, C, ...)
            dims = [0] + list(range(2, x.dim()))  # every axis but the channels
            mu, var = x.mean(dims), x.var(dims, correction=0)  # (C,)
            self.terms[i] = torch.linalg.vector_norm(mu - module.running_mean) + \
                torch.linalg.vector_norm(var - module.running_var)
        return hook

    def loss(self) -> torch.Tensor:
        return sum(w * t for w, t in zip(self.weights, self.terms))


def delt_crop_min(t: int, total: int) -> float:
    """Lower area bound of the crop: 1 at t = 0, cosine down to 0.08 at t = MI (DELT's easy-to-hard)."""
    return 0.08 + 0.92 * (1 + math.cos(math.pi * t / total)) / 2


def delt_augment(x: torch.Tensor, s_min: float, gen: torch.Generator, per_sample: bool, flip: bool):
    """RandomResizedCrop (area in [s_min, 1], aspect in [3/4, 4/3]) resized back, then a horizontal flip.

    One box and flip for the batch (DELT's code) or one per image. Boxes are continuous and the aspect is
    clamped to where a box of the drawn area fits (torchvision rejects and redraws instead), so s_min = 1
    is the identity. Differentiable in x (bilinear grid_sample); (B, C, H, W) -> (B, C, H, W).
    """
    B, _, H, W = x.shape
    m, a = (B if per_sample else 1), W / H
    area = s_min + (1 - s_min) * torch.rand(m, generator=gen)
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    r = (lo + (hi - lo) * torch.rand(m, generator=gen)).exp()
    r = torch.minimum(torch.maximum(r, area * a), a / area)  # w, h below both <= 1
    w, h = (area * r / a).sqrt(), (area * a / r).sqrt()  # box size, fractions of the image
    cx = (1 - w) * (2 * torch.rand(m, generator=gen) - 1)  # box centre in [-1, 1] coordinates
    cy = (1 - h) * (2 * torch.rand(m, generator=gen) - 1)
    sx = w * torch.where(torch.rand(m, generator=gen) < 0.5, -1.0, 1.0) if flip else w
    theta = torch.zeros(m, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    grid = F.affine_grid(theta.to(x).expand(B, 2, 3), [B, *x.shape[1:]], align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def true_class_prob(model, x, y, ctx) -> torch.Tensor:
    """Softmax probability of the label, (N,), for uint8 or [0, 1] float images."""
    return F.softmax(C.predict(model, x, ctx=ctx), 1).gather(1, y[:, None]).squeeze(1)


def delt_init_ranks(env: Env) -> torch.Tensor:
    """Training-set indices (classes, IPC) of the init images, rank 0 first: nearest the class median of
    the teacher's true-class probability (--init median), the highest (top) or the lowest (min)."""
    p = true_class_prob(env.teacher, env.real.x, env.real.y, env.ctx)  # (N,)
    rows = []
    for c in range(env.info.num_classes):
        idx = (env.real.y == c).nonzero().squeeze(1)
        pc = p[idx]
        key = {"median": (pc - pc.quantile(0.5)).abs(), "top": -pc, "min": pc}[env.s["init"]]
        rows.append(idx[torch.sort(key, stable=True).indices[:env.args.ipc]])  # ties: lower index first
    return torch.stack(rows)


def delt_optimise(env: Env, classes: list, ranks, seed: int) -> dict:
    """Optimise the IPC images of each class in `classes` in one batch (class-major, rank order).

    Loss on the active images: CE(T(A(x)), y) + alpha_BN * BN matching; Adam on the normalised pixels
    z = (x - mean) / std (DELT's parameters, so lr 0.25 is the paper's step), global cosine LR, z clamped
    to the range of x in [0, 1] after every step. Group g joins at g*RI: until then its pixels get exactly
    zero gradient, so Adam leaves them as initialised. Every random draw comes from a generator seeded
    by `seed`, so a batch redone after an interruption repeats exactly.
    """
    s, info, dev, ipc = env.s, env.info, env.device, env.args.ipc
    T, gen = s["iterations"], torch.Generator().manual_seed(seed)
    y = torch.tensor(classes, device=dev).repeat_interleave(ipc)  # (n,)
    join = torch.tensor(delt_joins(env.counts, s["round_iterations"]), device=dev).repeat(len(classes))  # (n,)
    mean, std = (torch.tensor(v, device=dev).view(1, -1, 1, 1) for v in (info.mean, info.std))
    if ranks is None:  # SRe2L: Gaussian noise with the dataset's statistics
        noise = torch.randn(len(y), info.channels, info.size, info.size, generator=gen).to(dev)
        x0, train_index = (mean + std * noise).clamp(0, 1), torch.full((len(y),), -1)
    else:
        train_index = ranks[classes].flatten()  # (n,)
        x0 = C.to_float(env.real.x[train_index])  # (n, C, H, W)
    z = ((x0 - mean) / std).requires_grad_(True)  # (n, C, H, W), the optimised tensor
    zmin, zmax = (0 - mean) / std, (1 - mean) / std
    opt = torch.optim.Adam([z], lr=s["lr"], betas=(0.5, 0.9))
    teacher = env.teacher.eval().requires_grad_(False)  # frozen: gradients only for the pixels
    bar = tqdm(range(T), desc=f"classes {classes[0]}-{classes[-1]}", leave=False)
    with BNMatch(teacher, s["first_bn_weight"]) as bn:
        for t in bar:
            for g in opt.param_groups:
                g["lr"] = 0.5 * s["lr"] * (1 + math.cos(math.pi * t / T))  # global cosine, no warm-up
            active = (join <= t).nonzero().squeeze(1)
            xa = delt_augment(z[active] * std + mean, delt_crop_min(t, T), gen, s["per_sample_aug"], info.flip)
            with env.ctx:
                logits = teacher(xa)
            loss_ce, loss_bn = F.cross_entropy(logits.float(), y[active]), bn.loss()
            opt.zero_grad()
            (loss_ce + s["r_bn"] * loss_bn).backward()
            opt.step()
            with torch.no_grad():
                z.copy_(torch.maximum(torch.minimum(z, zmax), zmin))
            if t % 25 == 0 or t == T - 1:
                bar.set_postfix(active=len(active), ce=f"{loss_ce.item():.3f}", bn=f"{loss_bn.item():.2f}")
    xu = to_u8(z.detach() * std + mean)  # what the PNG will hold
    return {"x": xu.cpu(), "train_index": train_index.cpu(),
            "p_init": true_class_prob(teacher, x0, y, env.ctx).cpu(),
            "p_final": true_class_prob(teacher, xu, y, env.ctx).cpu(),
            "dist_to_init": (C.to_float(xu) - x0).flatten(1).norm(dim=1).cpu(),
            "final_ce": loss_ce.item(), "final_bn": loss_bn.item()}


def delt_batches(num_classes: int, ipc: int, opt_batch: int) -> list:
    """Whole classes per optimisation batch, max(1, B // IPC) of them (images of several classes share
    one batch and its BN statistics, as in DELT's code)."""
    per = max(1, opt_batch // ipc)
    return [list(range(c, min(c + per, num_classes))) for c in range(0, num_classes, per)]


def delt_batch_seed(seed: int, b: int) -> int:
    """An independent stream per (run seed, batch)."""
    return int(np.random.SeedSequence([seed % 2 ** 32, b]).generate_state(1)[0])


def delt_run(env: Env) -> list:
    """Optimise every batch not finished earlier into delt_state/batch_XXXX.pt (atomic); the batch files."""
    state = env.out / DELT_STATE
    batches = delt_batches(env.info.num_classes, env.args.ipc, env.s["opt_batch"])
    files = [state / f"batch_{b:04d}.pt" for b in range(len(batches))]
    todo = [b for b, f in enumerate(files) if not f.exists()]
    if len(todo) < len(files):
        tqdm.write(f"delt: resuming, {len(files) - len(todo)} of {len(files)} batches done earlier")
    ranks = None if env.s["init"] == "noise" else delt_init_ranks(env)
    for b in tqdm(todo, desc="delt batches"):
        t0 = time.time()
        res = delt_optimise(env, batches[b], ranks, delt_batch_seed(env.args.seed, b))
        res.update(classes=batches[b], seed=delt_batch_seed(env.args.seed, b), seconds=time.time() - t0)
        C.torch_save(res, files[b])
        tqdm.write(f"delt batch {b + 1}/{len(files)} (classes {batches[b][0]}-{batches[b][-1]}): "
                   f"{res['seconds']:.0f} s, final CE {res['final_ce']:.3f}, BN {res['final_bn']:.3f}, "
                   f"p_init {res['p_init'].mean():.3f} -> p_final {res['p_final'].mean():.3f}")
    return files


def make_delt(env: Env, k: int, gen: torch.Generator) -> dict:
    """Stage k = join round k's group of every class; the first call runs (or resumes) the optimisation."""
    if "delt" not in env.cache:
        env.cache["delt"] = delt_run(env)
    ipc, lo, n = env.args.ipc, sum(env.counts[:k]), env.counts[k]
    xs, ys, seconds = [], [], 0.0
    scores = {"train_index": [], "p_init": [], "p_final": [], "dist_to_init": []}
    for f in env.cache["delt"]:
        r = torch.load(f, weights_only=True)
        seconds += r["seconds"]
        for j, c in enumerate(r["classes"]):
            part = slice(j * ipc + lo, j * ipc + lo + n)  # ranks lo .. lo+n-1 of class c
            xs.append(r["x"][part])
            ys += [c] * n
            for name in scores:
                scores[name] += r[name][part].tolist()
    join = k * (env.s["round_iterations"] or 0)
    return {"x": torch.cat(xs).to(env.device), "y": torch.tensor(ys, device=env.device), "z": None,
            "scores": scores, "stats": {"join_iteration": join, "iterations_trained": env.s["iterations"] - join,
                                        "optimisation_seconds": seconds}}


MAKERS["delt"] = make_delt


def main():
    args = parse_args()
    device, ctx = C.setup_device(args.device, args.amp)
    t_start = time.time()
    info = C.read_run_info(args.run)
    teacher = C.load_run_teacher(args.run, info, device)
    prior = C.load_run_prior(args.run, info, device) if args.method in DIT_METHODS else None
    scale = "paper" if prior is not None and prior.vae is not None else "small"
    if args.method == "delt":  # no DiT to tell the scale: the embedded digits are small, the rest paper
        scale = "small" if info.name == "mnist5k" else "paper"
    settings = resolve_settings(args, scale)
    counts = stage_counts(args, settings)
    if args.sample_steps > (prior.scheduler_config["num_train_timesteps"] if prior else 10 ** 9):
        raise C.UserError(f"--sample-steps {args.sample_steps} exceeds the DiT's training steps")
    if "guide_model" in settings:
        C.check_model(settings["guide_model"], info)
    _, real, test = C.load_dataset(info.name, info.root, info.size)
    if args.method == "random":
        short = [info.classes[c] for c in range(info.num_classes) if (real.y == c).sum() < args.ipc]
        if short:
            raise C.UserError(f"--ipc {args.ipc} needs {args.ipc} real training images per class but class(es) "
                              f"{short[:5]} have fewer; lower --ipc")
    name = delt_name(args, settings) if args.method == "delt" else f"{args.method}-ipc{args.ipc}"
    out = args.out or args.run / "distilled" / name
    env = Env(args, info, device, ctx, teacher, prior, real.to(device), settings, test.to(device), counts, out)
    if args.init_folder is not None:
        read_init_folder(env)
    if args.method == "delt":
        delt_check(env)
    cfg_args = {k: v for k, v in vars(args).items() if k != "overwrite"}
    C.prepare_folder(out, cfg_args, args.overwrite, "distilled set")
    derived = {"scale": scale, "images_per_stage": counts, "settings": settings,
               "defaults": {k: {"paper": v[0], "small": v[1]} for k, v in DEFAULTS.get(args.method, {}).items()}}
    C.write_config(out, cfg_args, derived, device)
    print(f"{args.method}: IPC {args.ipc} as {len(counts)} stages of {'/'.join(map(str, counts))} per class, "
          f"{info.num_classes} classes "
          f"of {info.name}; {scale} scale; device {device}; writing {out}")
    if settings:
        print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    for k in tqdm(range(len(counts)), desc=f"{args.method} stages"):
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
        tqdm.write(f"stage {k + 1}/{len(counts)}: {m['seconds']:.0f} s, reference acc {m['reference_acc']:.1f} %, "
                   f"reference loss {m['reference_loss']:.3f}, "
                   + ", ".join(f"{n} {v:.3f}" for n, v in {**m["mean_scores"], **extra}.items()))
    if args.method == "delt":  # every stage has its manifest: the per-batch results are no longer needed
        shutil.rmtree(out / DELT_STATE, ignore_errors=True)
    print(f"02 done in {time.time() - t_start:.0f} s: {out}")


if __name__ == "__main__":
    C.cli(main)
