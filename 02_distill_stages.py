"""Build a distilled set in stages (disjoint increments T_1..T_K) with one of the methods below.

Reads:  <run>/ made by 01_train_teacher.py: dataset.json, teacher/teacher.pt (the reference model
        f_ref, trained on the full data) and dit/ (the DiT prior; not read by random and delt).
        No dataset flag is repeated here.
Writes: <run>/distilled/<method>-ipc<N>/ (delt baselines: see delt_name), or the folder --out
        names (ablations, e.g. the notebooks' <run>/ablations/lgd-omega0-ipc10)
          config.json                 arguments, resolved settings, both default columns (first)
          stage_01/ .. stage_K/       increment k: IPC/K images per class (delt: join round k)
            <class>/<index:06d>.png   indices run on across stages: the union is an ImageFolder
            latents.pt                final DiT latents of the stage's images (deviation memory)
            current.pt                lgd: f_cur, trained on stages < k, that guided this stage
            discriminator.pt          acs: D_k, trained on curricula < k, that guided this stage
            manifest.json             counts, seed, settings, time, per-image scores (last: a
                                      stage without it is unfinished and is redone by a rerun)
          delt_state/batch_XXXX.pt    delt only, while it runs: finished optimisation batches
Methods (docs/methods.md): random = class-balanced real images; dit = plain CFG sampling;
lgd = learnability-guided sampling (§3); acs = adversarial curricula (§4, reconstructed);
igd = influence-guided sampling along a surrogate's trajectory (§5; needs 01 --surrogate,
whose <run>/surrogate/real_grads.pt caches the real gradients);
delt = EarlyLate pixel optimisation from real images (§6). Each has its own section below.

Examples:
  python 02_distill_stages.py --method lgd          # CPU, embedded digits: IPC 50 as 5 x 10
  python 02_distill_stages.py --run runs/imagenette --method lgd --ipc 100 --stages 10 \\
      --init-folder runs/imagenette/distilled/igd-ipc10
  python 02_distill_stages.py --method igd          # after 01 --surrogate: IPC 50 as 5 x 10
  python 02_distill_stages.py --method lgd --init-set igd      # LGD seeded with IGD, as in LGD
  python 02_distill_stages.py --method delt         # CPU: IPC 50, MI 160 / RI 20, 8 stages
  python 02_distill_stages.py --run runs/imagenet1k --method delt --ipc 50   # GPU: MI 4000/RI 500
"""
import argparse
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import common
import dit

STAGES = 5  # default K of the methods with equal increments (LGD: IPC 50 as 5 x 10)
DEFAULTS = common.DEFAULTS  # (paper, small) of the defaults that depend on --scale


# ---- The registries: a method is its stage maker (METHODS, after the methods); a method flag
# is declared once, with its default for each method that reads it and its checks


def equal_stages(args, flags: dict) -> list:
    """K = --stages equal increments of IPC/K images per class."""
    k = args.stages or STAGES
    if args.ipc % k:
        raise common.UserError(f"--ipc {args.ipc} does not split into --stages {k} equal "
                               f"increments; choose a multiple of {k}")
    return [args.ipc // k] * k


@dataclass
class Method:
    make: Callable  # (job, k) -> stage k's images, labels, latents, scores
    uses_prior: bool = True  # reads <run>/dit
    stages: Callable = equal_stages  # (args, flags) -> images per class of each stage
    check: Callable | None = None  # (job) -> None, raises on what the run cannot give
    parallel: bool = True  # under torchrun every rank runs make (its share); False: rank 0 alone


class Flag:
    """A method flag: help, {method: default or (paper, small) by --scale}, hooks, argparse kw."""

    # the hooks take (value, flags, job, method): check only raises, value gives the setting
    def __init__(self, help: str, defaults: dict, check=None, value=None, **kw):
        self.help, self.check, self.value, self.kw = help, check, value, kw
        self.defaults = {m: d if isinstance(d, tuple) else (d, d) for m, d in defaults.items()}


GUIDED = ("lgd", "acs", "igd")  # the methods that sample with dit.Guidance
FLAGS = {  # row order = the order of each method's settings in config.json and manifests
    # guided sampling. lgd and acs: the LGD paper's values; igd: IGD's released scripts
    "lam": Flag("lambda, the scale of the learnability / adversarial / influence term (igd: "
                "IGD's k)", {"lgd": 15.0, "acs": 15.0, "igd": 5.0}, type=float),
    "omega": Flag("weight of the reference CE (LGD omega, ACS omega_v)",
                  {"lgd": 0.5, "acs": 0.5}, type=float),
    "gamma": Flag("deviation (diversity) scale; 0 = off; the small column is the paper's gamma x "
                  "D / 4096, D = the prior's latent size",
                  {"lgd": DEFAULTS["gamma"], "acs": DEFAULTS["gamma"],
                   "igd": DEFAULTS["igd_gamma"]}, type=float,
                  value=lambda v, s, job, m: deviation_scale(v, job, m)),
    "c0": Flag("normalisation constant of the guidance step (IGD's)",
               dict.fromkeys(GUIDED, 0.0015), type=float),
    "window": Flag("guidance window t_lo,t_hi on the 50-step scale",
                   {"lgd": "10,45", "acs": "10,45", "igd": "30,45"},
                   check=lambda v, s, job, m: parse_window(v),
                   value=lambda v, s, job, m: parse_window(v)),
    "memory": Flag("deviation memory per class (IGD's FIFO length)", dict.fromkeys(GUIDED, 64),
                   type=common.positive_int),
    "eps_const": Flag("hold eps constant in the guidance gradient (no backward through the DiT)",
                      dict.fromkeys(GUIDED, False), action="store_true"),
    "guide_model": Flag("architecture of f_cur (lgd) / D_k (acs)",
                        dict.fromkeys(("lgd", "acs"), DEFAULTS["guide_model"]),
                        check=lambda v, s, job, m: common.check_model(v, job.info)),
    "guide_epochs": Flag("epochs of f_cur / D_k",
                         dict.fromkeys(("lgd", "acs"), DEFAULTS["guide_epochs"]),
                         type=common.positive_int),
    "candidates": Flag("kappa candidates per slot (lgd)", {"lgd": 3}, type=common.positive_int),
    "current_weight": Flag("lgd: weight of CE(f_cur), the learnability term; 0 = teacher "
                           "guidance alone (-omega CE(f_ref); f_cur is still trained, saved and "
                           "scores the images)", {"lgd": 1.0}, type=float,
                           check=lambda v, s, job, m: check_guidance_terms(s)),
    "init_folder": Flag("lgd: take the first increment from this <class>/<image> folder (e.g. an "
                        "IGD set)", {"lgd": None}, type=Path,
                        check=lambda v, s, job, m: check_init_folder(v, s, job)),
    # dit stays the default: IGD seeding (the paper's) needs 01 --surrogate and has not been
    # measured to give a better set here
    "init_set": Flag("lgd: make the first increment by plain DiT sampling or by IGD sampling "
                     "with igd's defaults (the LGD paper seeds with IGD)", {"lgd": "dit"},
                     choices=["dit", "igd"],  # igd: check igd's defaults at this scale too
                     check=lambda v, s, job, m: check_flags(
                         job, "igd", flag_values("igd", job.scale)) if v == "igd" else None),
    "adv_form": Flag("acs: raise CE(D(x), y), or the non-saturating log(1 - p_y)",
                     {"acs": "ce"}, choices=["ce", "nonsat"]),
    "trajectory": Flag("igd: comma list of surrogate epochs to guide with, or 'all' (every "
                       "epoch_XXX.pt that 01 --surrogate kept in <run>/surrogate/)",
                       {"igd": "all"}, check=lambda v, s, job, m: check_trajectory(v, job),
                       value=lambda v, s, job, m: list(trajectory(v, job.args.run))),
    "real_images": Flag("igd: real training images per class (the first ones) whose mean CE "
                        "gradient is g_real", {"igd": dit.REAL_GRAD_IMAGES},
                        type=common.positive_int),
    # delt: DELT's released ImageNet-1K recipe
    "iterations": Flag("MI, total iterations", {"delt": DEFAULTS["delt_iterations"]},
                       type=common.positive_int),
    "round_iterations": Flag("RI, iterations per join round; MI/RI rounds",
                             {"delt": DEFAULTS["delt_round_iterations"]},
                             type=common.positive_int, value=lambda v, s, job, m: delt_rounds(s)),
    "opt_batch": Flag("images per optimisation batch; whole classes (max(1, B // IPC))",
                      {"delt": 100}, type=common.positive_int),
    "lr": Flag("Adam learning rate on the normalised pixels", {"delt": 0.25}, type=float),
    "r_bn": Flag("alpha_BN, weight of the BN statistics loss", {"delt": 0.01}, type=float),
    "first_bn_weight": Flag("w_1 of the first BN layer", {"delt": 10.0}, type=float),
    "schedule": Flag("earlylate: group g joins at g*RI; constant: every image trains MI "
                     "iterations (the SRe2L/CDA baseline)", {"delt": "earlylate"},
                     choices=["earlylate", "constant"]),
    "init": Flag("real images nearest the class median of the teacher's true-class probability, "
                 "the highest, the lowest, or Gaussian noise (SRe2L)", {"delt": "median"},
                 choices=["median", "top", "min", "noise"]),
    "per_sample_aug": Flag("a random-resized crop (and flip) per image; default one per batch, "
                           "as DELT's code", {"delt": False}, action="store_true"),
}


def method_defaults(method: str) -> dict:
    """{flag: {"paper": v, "small": v}} of the method's flags, as config.json records them."""
    return {k: dict(zip(("paper", "small"), f.defaults[method]))
            for k, f in FLAGS.items() if method in f.defaults}


def flag_values(method: str, scale: str, args=None) -> dict:
    """The method's flags as given in args (not another method's), else their default."""
    for k, f in FLAGS.items():
        if hasattr(args, k) and method not in f.defaults:
            raise common.UserError(f"--{k.replace('_', '-')} has no meaning for --method "
                                   f"{method} (only {', '.join(sorted(f.defaults))}); drop it")
    return {k: getattr(args, k, d[scale]) for k, d in method_defaults(method).items()}


def check_flags(job, method: str, flags: dict):
    """Raise a UserError for the first flag value the method cannot run with."""
    for k, v in flags.items():
        if FLAGS[k].check is not None:
            FLAGS[k].check(v, flags, job, method)


def resolve_settings(job, method: str, flags: dict) -> dict:
    """The settings the method reads: each checked flag value through its row's `value`."""
    s = {k: v if FLAGS[k].value is None else FLAGS[k].value(v, flags, job, method)
         for k, v in flags.items()}
    if s.get("init_set") == "igd":  # the first increment is IGD's: igd's defaults, recorded
        s["init_igd"] = resolve_settings(job, "igd", flag_values("igd", job.scale))
    return s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p, run_help="run folder of 01 (reads dataset.json, teacher/, dit/; "
                                       "writes distilled/)")
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--ipc", type=common.positive_int, default=50,
                   help="images per class in the finished set")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default <run>/distilled/<method>-ipc<N>); ablations go "
                        "elsewhere so that `03 --run` keeps evaluating the main sets")
    p.add_argument("--stages", type=common.positive_int, default=None,
                   help=f"increments K (default {STAGES}); delt makes one stage per join "
                        f"round, min(MI/RI, IPC), so give it only to confirm that number")
    p.add_argument("--dry-run", action="store_true",
                   help="check the inputs, print the resolved plan as JSON, write nothing")
    g = p.add_argument_group("DiT sampling")
    by_scale = "default by --scale: paper {}, small {}".format
    g.add_argument("--sample-steps", type=common.positive_int, default=None,
                   help=f"DDPM ancestral steps ({by_scale(*DEFAULTS['sample_steps'])})")
    g.add_argument("--cfg", type=float, default=None,
                   help=f"classifier-free guidance scale ({by_scale(*DEFAULTS['cfg'])})")
    batch, unchecked = DEFAULTS["sample_batch"], DEFAULTS["sample_batch_unchecked"]
    g.add_argument("--sample-batch", type=common.positive_int, default=None,
                   help="samples per forward pass (candidates included); a batch never holds "
                        "two images of one class, and the images do not depend on it. Default "
                        f"by --scale: paper {batch[0]} ({unchecked[0]} without checkpointing), "
                        f"small {batch[1]}")
    g.add_argument("--checkpointing", default="auto", choices=["auto", "on", "off"],
                   help="gradient checkpointing of the DiT and the VAE in guided steps: a "
                        "fraction of the memory for one more forward pass; auto = on at "
                        "--scale paper, off at small")
    g = p.add_argument_group("method settings (default: the method's column for --scale)")
    for k, f in FLAGS.items():
        shown = "; ".join(f"{m}: {paper}" if paper == small else f"{m}: paper {paper}, small "
                          f"{'paper x D/4096' if small is None else small}"
                          for m, (paper, small) in f.defaults.items())
        # SUPPRESS: an unset flag is absent from args, so a flag given to the wrong method shows
        g.add_argument("--" + k.replace("_", "-"), default=argparse.SUPPRESS,
                       help=f"{f.help} (default {shown})", **f.kw)
    return p.parse_args(argv)


def stage_seed(seed: int, k: int) -> int:
    """Each stage draws from its own seed, so a stage redone after a kill repeats exactly."""
    return seed * 1000 + k


# ---- The stage engine: what every maker reads, and how a finished stage is written and read back


class Job:
    """One distilled set being built: settings, models, data and the stages finished so far."""

    def __init__(self, args, info, device, ctx, teacher, prior, real, test, scale, counts, out):
        self.args, self.info, self.device, self.ctx = args, info, device, ctx
        self.teacher, self.prior, self.real, self.test = teacher, prior, real, test
        self.scale, self.counts, self.out = scale, counts, out  # counts: per class of each stage
        self.settings = None  # the method's resolved settings: plan sets them once checked
        self.cfg = common.default("cfg", scale) if args.cfg is None else args.cfg
        self.sample_steps = args.sample_steps or common.default("sample_steps", scale)
        # checkpointing and the batch change how fast and in how much memory, not what is made
        self.checkpointing = common.default("checkpointing", scale) \
            if args.checkpointing == "auto" else args.checkpointing == "on"
        self.sample_batch = args.sample_batch or common.default(
            "sample_batch" if self.checkpointing else "sample_batch_unchecked", scale)
        self.per_stage = counts[0]  # the stage size of the methods with equal stages
        self.done = []  # finished stages: dicts with x (uint8), y, z (latents or None)
        self.cache = {}  # what a maker computes once for all stages (delt: the optimisation)
        self.owned = {}  # stage -> the classes whose images this rank made (torchrun)

    def stage_folder(self, k: int) -> Path:
        return self.out / f"stage_{k + 1:02d}"

    def labels(self) -> torch.Tensor:
        """Class-major labels (C * per_stage,) of one increment."""
        classes = torch.arange(self.info.num_classes, device=self.device)
        return classes.repeat_interleave(self.per_stage)

    def union(self) -> common.Split:
        """D_{k-1}: every finished stage."""
        return common.Split(torch.cat([d["x"] for d in self.done]),
                            torch.cat([d["y"] for d in self.done]))

    def memory(self, size: int) -> dit.Memory:
        """A deviation memory holding the latents of every finished stage (FIFO per class)."""
        mem = dit.Memory(size)
        for d in self.done:
            if d["z"] is not None:
                mem.add(d["z"], d["y"])
        return mem

    def sample(self, k: int, guidance=None, candidates=1, score=None, desc="sample"):
        """Stage k's DiT samples, class-major: images (N, C, H, W) as saved, latents, scores."""
        C, n, r, seed = self.info.num_classes, self.per_stage, common.ranks(), self.args.seed
        # slot-major (image j of every class, then j + 1), so the memory moves on after every
        # batch; slot (c, j) has its own seed, so no rank or batch order changes its image
        y = torch.arange(C, device=self.device).repeat(n)  # slot j * C + c = (c, j)
        seeds = [dit.slot_seed(stage_seed(seed, k), c, j) for j in range(n) for c in range(C)]
        # a batch = consecutive classes of one round j, fixed by --sample-batch alone: the same
        # batches on any rank in any order (another grouping may round differently)
        group = max(1, self.sample_batch // candidates)
        groups = [list(range(g, min(g + group, C))) for g in range(0, C, group)]
        if len(groups) < r.world and r.main and k not in self.owned:
            tqdm.write(f"warning: {len(groups)} class group(s) of {group} for {r.world} ranks: "
                       f"{r.world - len(groups)} rank(s) idle in stage {k + 1}; --sample-batch "
                       f"{candidates * math.ceil(C / r.world)} or less gives every rank classes")
        mine = groups[r.rank::r.world]  # a class's rounds all stay on one rank: its memory
        self.owned[k] = [c for g in mine for c in g]
        slot_batches = [[j * C + c for c in g] for j in range(n) for g in mine]
        slots = [i for b in slot_batches for i in b]
        where = {i: p for p, i in enumerate(slots)}  # slot -> its row in this rank's share
        shape = (self.info.channels, self.info.size, self.info.size)
        part = ([], torch.zeros(0, *shape, dtype=torch.uint8),
                torch.zeros(0, *self.prior.latent_shape), torch.zeros(0))
        if slots:
            imgs, z, scores = dit.sample(
                self.prior, y[slots], [seeds[i] for i in slots], steps=self.sample_steps,
                cfg=self.cfg, guidance=guidance, candidates=candidates, score=score,
                slot_batches=[[where[i] for i in b] for b in slot_batches], ctx=self.ctx,
                desc=desc)
            part = (slots, common.to_u8(imgs).cpu(), z.float().cpu(), scores.float().cpu())
        parts = r.gather(part) or [part]  # rank 0: every rank's share; the others: their own
        x, zs, sc = torch.zeros(n * C, *shape, dtype=torch.uint8), \
            torch.zeros(n * C, *self.prior.latent_shape), torch.zeros(n * C)
        for idx, x_part, z_part, s_part in parts:
            if idx:
                x[idx], zs[idx], sc[idx] = x_part, z_part, s_part
        # back to the class-major order of the stage's files
        order = torch.arange(n * C).view(n, C).t().flatten()
        return (common.to_float(x[order]).to(self.device), zs[order].to(self.device),
                sc[order].to(self.device))

    def guidance(self, terms: list, s: dict | None = None) -> dit.Guidance:
        """Guidance with settings `s` (default the method's) and earlier stages' memory."""
        s = s or self.settings
        return dit.Guidance(terms=terms, scale=s["lam"], c0=s["c0"], window=s["window"],
                            deviation=s["gamma"], memory=self.memory(s["memory"]),
                            eps_const=s["eps_const"])

    def train_guide(self, k: int, proto: common.Protocol, name: str,
                    file: str) -> common.Classifier:
        """f_cur / D_k, trained from scratch on every finished stage, seeded by the stage."""
        r, path = common.ranks(), self.stage_folder(k) / file
        if r.main:
            model = common.build_model(self.settings["guide_model"], self.info).to(self.device)
            common.fit(model, self.union(), self.info, proto,
                       epochs=self.settings["guide_epochs"], seed=stage_seed(self.args.seed, k),
                       ctx=self.ctx, desc=f"stage {k + 1} {name}")
            if r.world > 1:  # torchrun: rank 0 trains it once and shares it as stage k's file
                common.save_classifier(path, model, self.settings["guide_model"], self.info,
                                       stage=k + 1)
        r.barrier()
        if not r.main:
            model = common.load_classifier(path, self.info, self.device)
        return model.requires_grad_(False)


@torch.no_grad()
def ce(model, x_u8, y) -> torch.Tensor:
    """Per-image cross-entropy (N,) of a classifier on uint8 images, in full precision."""
    return F.cross_entropy(common.predict(model, x_u8), y, reduction="none")


def write_stage(folder: Path, job: Job, k: int, out: dict | None, seconds: float) -> dict | None:
    """Images, latents and models of one stage, then the manifest (last: the stage is done)."""
    info, r = job.info, common.ranks()
    n, base = job.counts[k], sum(job.counts[:k])  # indices continue after earlier stages
    # torchrun: every rank writes the classes it sampled (rank 0 all of a stage made whole),
    # then rank 0 the rest once every rank's images are on disk
    classes = job.owned.get(k, range(info.num_classes) if r.main else [])
    for c in classes if out is not None else []:
        for j, img in enumerate(out["x"][out["y"] == c]):
            common.save_png(img.float() / 255, folder / info.classes[c] / f"{base + j:06d}.png")
    r.barrier()
    if not r.main:
        return None
    if out["z"] is not None:
        common.torch_save(out["z"].cpu(), folder / "latents.pt")
    for name, model in out.get("models", {}).items():
        common.save_classifier(folder / name, model, job.settings["guide_model"], info,
                               stage=k + 1)
    ref = ce(job.teacher, out["x"], out["y"])
    ref_acc = common.accuracy(job.teacher, common.Split(out["x"], out["y"]))
    scores = {**out["scores"], "ce_reference": ref.tolist()}
    manifest = {
        "stage": k + 1, "method": job.args.method, "images_per_class": n,
        "indices": [base, base + n - 1],
        "counts": {info.classes[c]: int((out["y"] == c).sum()) for c in range(info.num_classes)},
        "seed": stage_seed(job.args.seed, k), "settings": job.settings, "seconds": seconds,
        "reference_acc": ref_acc, "reference_loss": ref.mean().item(),
        "mean_scores": {n: sum(v) / len(v) for n, v in scores.items() if n != "train_index"},
        **out.get("stats", {}), "scores": scores}
    common.write_json(folder / "manifest.json", manifest)
    return manifest


def load_stage(folder: Path, job: Job) -> dict:
    """A finished stage back from disk (images as saved, latents for the memory)."""
    s = common.read_distilled(folder, job.info).to(job.device)
    latents = folder / "latents.pt"
    z = torch.load(latents, map_location=job.device, weights_only=True) \
        if latents.exists() else None
    return {"x": s.x, "y": s.y, "z": z}


# ---- random and dit: the baselines


def make_random(job: Job, k: int) -> dict:
    """Class-balanced real images: stage k takes block k of each class's permutation."""
    perms = common.class_permutations(job.real.y, job.info.num_classes, job.args.seed)
    lo, hi = k * job.per_stage, (k + 1) * job.per_stage
    idx = torch.cat([p[lo:hi] for p in perms]).to(job.real.y.device)
    return {"x": job.real.x[idx], "y": job.real.y[idx], "z": None,
            "scores": {"train_index": idx.tolist()}}


def check_random(job: Job, purpose="", alternative=""):
    """Every class has at least IPC real training images."""
    counts = torch.bincount(job.real.y, minlength=job.info.num_classes)
    short = [job.info.classes[c] for c in (counts < job.args.ipc).nonzero().flatten().tolist()]
    if short:
        raise common.UserError(f"--ipc {job.args.ipc} needs {job.args.ipc} real training images "
                               f"per class {purpose}but class(es) {short[:5]} have fewer; lower "
                               f"--ipc {alternative}".strip())


def make_dit(job: Job, k: int) -> dict:
    """Plain CFG sampling: the baseline every guided method is compared with."""
    imgs, z, _ = job.sample(k, desc=f"stage {k + 1} dit")
    return {"x": common.to_u8(imgs), "y": job.labels(), "z": z, "scores": {}}


# ---- lgd (§3): stage k > 1 is sampled to be hard for f_cur (trained on stages < k) and easy for
# the reference model, keeping the best of kappa candidates per slot


def parse_window(s: str) -> tuple:
    try:
        lo, hi = (int(v) for v in s.split(","))
    except ValueError:
        raise common.UserError(f"--window must be two integers t_lo,t_hi like 10,45, got "
                               f"{s!r}") from None
    if not 0 <= lo <= hi <= 49:
        raise common.UserError(f"--window {s} must satisfy 0 <= t_lo <= t_hi <= 49 (the 50-step "
                               f"scale)")
    return lo, hi


def deviation_scale(gamma: float | None, job: Job, method: str) -> float:
    """gamma None (small) = paper gamma x D / 4096: the paper's push per element of 4x32x32."""
    if gamma is not None:
        return gamma
    d = math.prod(job.prior.latent_shape)
    return round(FLAGS["gamma"].defaults[method][0] * d / 4096, 2)


def check_guidance_terms(s: dict):
    if s["current_weight"] == 0 and s["omega"] == 0:
        raise common.UserError("--current-weight 0 with --omega 0 leaves lgd no guidance term; "
                               "that is plain sampling: use --method dit")


def read_init_folder(job: Job, folder: Path) -> common.Split:
    """lgd --init-folder: the first increment, as given (e.g. an IGD set)."""
    x = common.read_distilled(folder, job.info)
    counts = torch.bincount(x.y, minlength=job.info.num_classes).tolist()
    if any(n != job.per_stage for n in counts):
        raise common.UserError(f"--init-folder {folder} must hold {job.per_stage} images per "
                               f"class (IPC {job.args.ipc} / {len(job.counts)} stages), found "
                               f"{counts}")
    return x.to(job.device)


def check_init_folder(folder: Path | None, s: dict, job: Job):
    if folder is None:
        return
    if s["init_set"] == "igd":
        raise common.UserError("--init-set igd and --init-folder both name the first "
                               "increment; give one of them")
    read_init_folder(job, folder)


def make_lgd(job: Job, k: int) -> dict:
    """Stage 1: plain DiT, IGD (--init-set igd) or --init-folder; stage k > 1: learnability
    guidance vs f_cur."""
    if k == 0:
        if job.settings["init_set"] == "igd":  # IGD's sampling with igd's own settings
            return make_igd(job, k, job.settings["init_igd"])
        if job.settings["init_folder"] is None:
            return make_dit(job, k)
        x = read_init_folder(job, job.settings["init_folder"])
        with torch.no_grad(), common.prior_ctx(job.ctx):
            z = job.prior.encode(common.to_float(x.x)).float()
        return {"x": x.x, "y": x.y, "z": z, "scores": {}}
    current = job.train_guide(k, common.Protocol("hard"), "f_cur", "current.pt")
    terms = dit.learnability_terms(current, job.teacher, job.settings["omega"],
                                   job.settings["current_weight"])
    imgs, z, S = job.sample(k, job.guidance(terms), candidates=job.settings["candidates"],
                            score=lambda im, yy: dit.objective(terms, im, yy),
                            desc=f"stage {k + 1} lgd")
    x, y = common.to_u8(imgs), job.labels()
    return {"x": x, "y": y, "z": z, "models": {"current.pt": current},
            "scores": {"S": S.tolist(), "ce_current": ce(current, x, y).tolist()},
            "stats": {"current_test_acc": common.accuracy(current, job.test),
                      "current_train_acc": common.accuracy(current, job.union())}}


# ---- acs (§4, reconstructed): curriculum k > 1 is sampled to fool D_k, a discriminator trained
# on the curricula before it; the reference model keeps the images valid


def make_acs(job: Job, k: int) -> dict:
    """Curriculum 1: plain DiT + deviation; curriculum k > 1: adversarial guidance vs D_k."""
    y = job.labels()
    if k == 0:
        imgs, z, _ = job.sample(k, job.guidance([]), desc="curriculum 1")
        return {"x": common.to_u8(imgs), "y": y, "z": z, "scores": {}}
    # D_k: SGD 0.01, momentum 0.9, wd 5e-4, CutMix + crop, MultiStep (the precursor's recipe)
    disc = job.train_guide(k, common.Protocol("hard", lr=0.01, wd=5e-4, optimizer="sgd"), "D_k",
                           "discriminator.pt")
    terms = dit.adversarial_terms(disc, job.teacher, job.settings["omega"],
                                  job.settings["adv_form"])
    # the same curriculum without the adversarial term, from the same noise: D_k's "before"
    before, _, _ = job.sample(k, job.guidance([]), desc=f"curriculum {k + 1} unguided")
    imgs, z, _ = job.sample(k, job.guidance(terms), desc=f"curriculum {k + 1} acs")
    x, train = common.to_u8(imgs), job.union()
    return {"x": x, "y": y, "z": z, "models": {"discriminator.pt": disc},
            "scores": {"ce_disc": ce(disc, x, y).tolist()},
            "stats": {"disc_acc_train": common.accuracy(disc, train),
                      "disc_acc_before": common.accuracy(disc, common.Split(common.to_u8(before),
                                                                            y)),
                      "disc_acc_after": common.accuracy(disc, common.Split(x, y)),
                      "disc_test_acc": common.accuracy(disc, job.test)}}


# ---- igd (§5, after IGD's sampler): influence guidance, the agreement of an image's training
# gradient with the real data's at checkpoints of a surrogate (01 --surrogate). IGD is one pass;
# stages let 03 take it apart (§7.6), and Job.sample's memory keeps one pass's deviation term

REAL_GRADS = "real_grads.pt"  # in <run>/surrogate/: g_real per checkpoint, computed once


def surrogate_checkpoints(run: Path) -> dict:
    """{epoch: path} of the kept checkpoints of a finished surrogate of 01, or a UserError."""
    folder = Path(run) / "surrogate"
    if not (folder / "metrics.json").exists():
        raise common.UserError(f"{folder} holds no finished surrogate trajectory, which igd "
                               f"guides with; run 01_train_teacher.py --run {run} --surrogate "
                               f"(with the run's other 01 flags) first")
    return {int(f.stem[len("epoch_"):]): f for f in sorted(folder.glob("epoch_[0-9]*.pt"))}


def trajectory(spec: str, run: Path) -> dict:
    """{epoch: path} that --trajectory ('all' or a comma list of epochs) picks, or a UserError."""
    found = surrogate_checkpoints(run)
    if spec == "all":
        epochs = sorted(found)
    else:
        try:
            epochs = sorted({int(e) for e in spec.split(",") if e.strip()})
        except ValueError:
            raise common.UserError(f"--trajectory must be 'all' or a comma list of epochs like "
                                   f"0,2,11,40, got {spec!r}") from None
    missing = [e for e in epochs if e not in found]
    if missing or not epochs:
        raise common.UserError(f"--trajectory {spec}: {run}/surrogate has no checkpoint of "
                               f"epoch(s) {missing or 'given'}, only {sorted(found)}; choose "
                               f"among those or retrain with 01_train_teacher.py --surrogate-keep")
    return {e: found[e] for e in epochs}


def check_trajectory(spec: str, job: Job):
    for path in trajectory(spec, job.args.run).values():  # of this dataset, and loadable
        common.load_classifier(path, job.info, "cpu")


def real_gradients(job: Job, s: dict) -> torch.Tensor:
    """g_real (|E|, classes, P) of the surrogate checkpoints, from <run>/surrogate/real_grads.pt."""
    found = surrogate_checkpoints(job.args.run)
    path = job.args.run / "surrogate" / REAL_GRADS
    per_class = s["real_images"]
    # an entry per checkpoint and image count holds the checkpoint's SHA-256: a retrained
    # surrogate or another trajectory never picks up stale gradients
    key = {"dataset": job.info.name, "train_size": len(job.real.y),
           "chunk": dit.REAL_GRAD_CHUNK}
    cache = {}
    if path.exists():
        try:
            cache = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged cache is only a cache: recompute it
            tqdm.write(f"igd: ignoring unreadable {path} ({type(e).__name__}); recomputing")
    entries = dict(cache.get("entries", {})) if cache.get("key") == key else {}
    out, changed = [], False
    for e in s["trajectory"]:
        name = f"epoch_{e:03d}/first_{per_class}"
        sha = hashlib.sha256(found[e].read_bytes()).hexdigest()
        if entries.get(name, {}).get("sha256") != sha:
            model = common.load_classifier(found[e], job.info, job.device)
            t0 = time.time()
            grads = dit.real_gradients(model, job.real.x, job.real.y, job.info.num_classes,
                                       per_class)
            entries[name] = {"sha256": sha, "grads": grads.cpu()}
            changed = True
            tqdm.write(f"igd: real gradients of surrogate epoch {e} ({per_class} images per "
                       f"class, {grads.shape[1]} parameters): {time.time() - t0:.0f} s")
        out.append(entries[name]["grads"])
    if changed:
        common.torch_save({"key": key, "entries": entries}, path)
    return torch.stack(out).to(job.device)


def igd_terms(job: Job, s: dict) -> list:
    """The influence terms of the trajectory in `s`, built once per job."""
    cache_key = ("igd", tuple(s["trajectory"]), s["real_images"])
    if cache_key not in job.cache:
        found = surrogate_checkpoints(job.args.run)
        models = [common.load_classifier(found[e], job.info, job.device) for e in s["trajectory"]]
        job.cache[cache_key] = dit.influence_terms(models, real_gradients(job, s), names=[
            f"cos_epoch{e:03d}" for e in s["trajectory"]])
    return job.cache[cache_key]


def make_igd(job: Job, k: int, s: dict | None = None) -> dict:
    """Stage k by influence guidance, settings `s` (lgd --init-set igd: its init_igd)."""
    s = s or job.settings
    terms = igd_terms(job, s)
    imgs, z, _ = job.sample(k, job.guidance(terms, s), desc=f"stage {k + 1} igd")
    x, y = common.to_u8(imgs), job.labels()
    # scores of the images as saved: the gradient cosine per checkpoint and G = mean(cos) - 1,
    # in sampler-sized chunks (per-sample gradients take batch x parameters of memory)
    b = job.sample_batch
    cos = torch.stack([torch.cat([t.fn(common.to_float(x[i:i + b]), y[i:i + b]).detach() + 1
                                  for i in range(0, len(y), b)]) for t in terms])  # (|E|, N)
    G = cos.mean(0) - 1
    return {"x": x, "y": y, "z": z,
            "scores": {"G": G.tolist(), **{t.name: c.tolist() for t, c in zip(terms, cos)}},
            "stats": {"trajectory": s["trajectory"]}}


# ---- delt (§6, after DELT's code): EarlyLate pixel optimisation of real images against the BN
# teacher. Each batch of classes is optimised once, all join rounds together; join round k's
# images form stage k (stage_01 joined first and trained longest)

DELT_STATE = "delt_state"  # finished batches (uint8 images + scores) while the optimisation runs


class BNMatch:
    """BN statistics matching (SRe2L/CDA/DELT, §6) as a context: loss() after a forward pass."""

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
        # w_l (||mu_l - mu_l^run|| + ||var_l - var_l^run||) of the biased batch statistics of
        # the layer's input; the model stays in eval mode
        def hook(module, inputs, output):
            x = inputs[0].float()  # (B, C, ...)
            dims = [0] + list(range(2, x.dim()))  # every axis but the channels
            mu, var = x.mean(dims), x.var(dims, correction=0)  # (C,)
            self.terms[i] = torch.linalg.vector_norm(mu - module.running_mean) + \
                torch.linalg.vector_norm(var - module.running_var)
        return hook

    def loss(self) -> torch.Tensor:
        """sum_l w_l term_l over the BN layers, w_1 = first_weight and 1 after."""
        return sum(w * t for w, t in zip(self.weights, self.terms))


def delt_rounds(s: dict) -> int | None:
    """RI, or None on the constant schedule, which has no join rounds."""
    return None if s["schedule"] == "constant" else s["round_iterations"]


def delt_groups(ipc: int, iterations: int, round_iterations: int | None) -> list:
    """Per-class group sizes in rank order: R = MI/RI near-equal groups; constant: [IPC]."""
    # the first IPC mod R one larger (DELT's code); empty ones (IPC < R) dropped
    if round_iterations is None:
        return [ipc]
    r = iterations // round_iterations
    return [n for n in (ipc // r + (g < ipc % r) for g in range(r)) if n]


def delt_joins(counts: list, round_iterations: int | None) -> list:
    """Join iteration of every rank of a class: group g joins at g*RI (0 on constant)."""
    return [g * (round_iterations or 0) for g, n in enumerate(counts) for _ in range(n)]


def delt_stages(args, s: dict) -> list:
    """One stage per join round, after checking the schedule flags; --stages may only confirm."""
    if s["schedule"] == "constant":
        if hasattr(args, "round_iterations"):
            raise common.UserError("--round-iterations has no meaning with --schedule constant "
                                   "(every image trains --iterations); drop it")
    elif s["iterations"] % s["round_iterations"]:
        raise common.UserError(f"--iterations {s['iterations']} must be a multiple of "
                               f"--round-iterations {s['round_iterations']} (MI = rounds x RI)")
    if s["lr"] <= 0 or s["r_bn"] < 0 or s["first_bn_weight"] < 0:
        raise common.UserError(f"--lr must be > 0 and --r-bn, --first-bn-weight >= 0, got "
                               f"{s['lr']}, {s['r_bn']}, {s['first_bn_weight']}")
    counts = delt_groups(args.ipc, s["iterations"], delt_rounds(s))
    if args.stages is not None and args.stages != len(counts):
        raise common.UserError(f"--stages {args.stages} contradicts the delt schedule, which "
                               f"makes one stage per join round: {len(counts)} here "
                               f"(min(MI/RI, IPC)); drop --stages or change "
                               f"--iterations/--round-iterations")
    return counts


def check_delt(job: Job):
    """What delt needs from the run: a teacher with BN, enough real images to start from."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in job.teacher.modules()):
        raise common.UserError(f"delt matches the teacher's BatchNorm statistics, but the teacher "
                               f"of {job.args.run} has no BN layers; train one with "
                               f"01_train_teacher.py --model convnet-3-bn (or resnet18)")
    if job.settings["init"] != "noise":
        check_random(job, "to initialise from, ", "or use --init noise")


def delt_name(args, s: dict) -> str:
    """delt-ipc50, or the baselines' own folders, e.g. delt-constant-init-noise-ipc50 (SRe2L)."""
    parts = ["delt"] + (["constant"] if s["schedule"] == "constant" else []) + \
        ([f"init-{s['init']}"] if s["init"] != "median" else [])
    return "-".join(parts) + f"-ipc{args.ipc}"


@torch.no_grad()
def true_class_prob(model, x, y) -> torch.Tensor:
    """Softmax probability (N,) of the label, in full precision (bf16 would tie near 1)."""
    return F.softmax(common.predict(model, x), 1).gather(1, y[:, None]).squeeze(1)


def delt_init_ranks(job: Job) -> torch.Tensor:
    """Training-set indices (classes, IPC) of the init images by --init, rank 0 first."""
    p = true_class_prob(job.teacher, job.real.x, job.real.y)  # (N,)
    rows = []
    for c in range(job.info.num_classes):
        idx = (job.real.y == c).nonzero().squeeze(1)
        pc = p[idx]
        key = {"median": (pc - pc.quantile(0.5)).abs(), "top": -pc,
               "min": pc}[job.settings["init"]]
        rows.append(idx[torch.sort(key, stable=True).indices[:job.args.ipc]])  # ties: lower first
    return torch.stack(rows)


def delt_optimise(job: Job, classes: list, ranks, seed: int) -> dict:
    """The IPC images of each class in `classes`, optimised as one batch (class-major)."""
    # CE(T(A(x)), y) + alpha_BN * BN matching on the joined images; Adam on z = (x - mean) / std
    # (DELT's parameters: lr 0.25 is the paper's step), clamped to x in [0, 1] after each step.
    # A group that has not joined gets exactly zero gradient, so Adam leaves it as initialised
    s, info, dev, ipc = job.settings, job.info, job.device, job.args.ipc
    T, gen = s["iterations"], torch.Generator().manual_seed(seed)
    y = torch.tensor(classes, device=dev).repeat_interleave(ipc)  # (n,)
    join = torch.tensor(delt_joins(job.counts, s["round_iterations"]), device=dev)
    join = join.repeat(len(classes))  # (n,)
    mean, std = (torch.tensor(v, device=dev).view(1, -1, 1, 1) for v in (info.mean, info.std))
    if ranks is None:  # SRe2L: Gaussian noise with the dataset's statistics
        noise = torch.randn(len(y), info.channels, info.size, info.size, generator=gen).to(dev)
        x0, train_index = (mean + std * noise).clamp(0, 1), torch.full((len(y),), -1)
    else:
        train_index = ranks[classes].flatten()  # (n,)
        x0 = common.to_float(job.real.x[train_index])  # (n, C, H, W)
    z = ((x0 - mean) / std).requires_grad_(True)  # (n, C, H, W), the optimised tensor
    zmin, zmax = (0 - mean) / std, (1 - mean) / std
    opt = torch.optim.Adam([z], lr=s["lr"], betas=(0.5, 0.9))
    teacher = job.teacher.eval().requires_grad_(False)  # frozen: gradients only for the pixels
    bar = tqdm(range(T), desc=f"classes {classes[0]}-{classes[-1]}", unit="it", leave=False)
    with BNMatch(teacher, s["first_bn_weight"]) as bn:
        for t in bar:
            for g in opt.param_groups:  # global cosine, no warm-up
                g["lr"] = 0.5 * s["lr"] * (1 + math.cos(math.pi * t / T))
            active = (join <= t).nonzero().squeeze(1)  # the groups that have joined
            low = 0.08 + 0.92 * (1 + math.cos(math.pi * t / T)) / 2  # crop area: easy to hard
            xa = common.random_resized_crop(z[active] * std + mean, (low, 1.0), gen=gen,
                                            per_sample=s["per_sample_aug"],
                                            flip=info.flip)  # (active, C, H, W)
            with job.ctx:
                logits = teacher(xa)
            loss_ce, loss_bn = F.cross_entropy(logits.float(), y[active]), bn.loss()
            opt.zero_grad()
            (loss_ce + s["r_bn"] * loss_bn).backward()
            opt.step()
            with torch.no_grad():
                z.copy_(torch.maximum(torch.minimum(z, zmax), zmin))
            if t % 25 == 0 or t == T - 1:
                bar.set_postfix(active=len(active), ce=f"{loss_ce.item():.3f}",
                                bn=f"{loss_bn.item():.2f}")
    xu = common.to_u8(z.detach() * std + mean)  # what the PNG will hold
    return {"x": xu.cpu(), "train_index": train_index.cpu(),
            "p_init": true_class_prob(teacher, x0, y).cpu(),
            "p_final": true_class_prob(teacher, xu, y).cpu(),
            "dist_to_init": (common.to_float(xu) - x0).flatten(1).norm(dim=1).cpu(),
            "final_ce": loss_ce.item(), "final_bn": loss_bn.item()}


def delt_batches(num_classes: int, ipc: int, opt_batch: int) -> list:
    """Whole classes per optimisation batch, max(1, B // IPC) of them (they share BN statistics)."""
    per = max(1, opt_batch // ipc)
    return [list(range(c, min(c + per, num_classes))) for c in range(0, num_classes, per)]


def delt_run(job: Job) -> list:
    """Optimise every batch not finished earlier into delt_state/batch_XXXX.pt; the files."""
    state = job.out / DELT_STATE
    batches = delt_batches(job.info.num_classes, job.args.ipc, job.settings["opt_batch"])
    files = [state / f"batch_{b:04d}.pt" for b in range(len(batches))]
    todo = [b for b, f in enumerate(files) if not f.exists()]
    if len(todo) < len(files):
        tqdm.write(f"delt: resuming, {len(files) - len(todo)} of {len(files)} batches done earlier")
    r = common.ranks()
    ranks = None if job.settings["init"] == "noise" else delt_init_ranks(job)
    for b in tqdm([b for b in todo if b % r.world == r.rank], desc="delt batches", unit="batch"):
        # an independent random stream per (run seed, batch): a redone batch repeats exactly
        seed = int(np.random.SeedSequence([job.args.seed % 2 ** 32, b]).generate_state(1)[0])
        t0 = time.time()
        res = delt_optimise(job, batches[b], ranks, seed)
        res.update(classes=batches[b], seed=seed, seconds=time.time() - t0)
        common.torch_save(res, files[b])
        tqdm.write(f"delt batch {b + 1}/{len(files)} (classes {batches[b][0]}-"
                   f"{batches[b][-1]}): {res['seconds']:.0f} s, final CE {res['final_ce']:.3f}, "
                   f"BN {res['final_bn']:.3f}, p_init {res['p_init'].mean():.3f} -> p_final "
                   f"{res['p_final'].mean():.3f}")
    r.barrier()  # torchrun: the batches go round-robin to the ranks; all on disk before reading
    return files


def make_delt(job: Job, k: int) -> dict:
    """Stage k = join round k's group of every class; the first call runs the optimisation."""
    if "delt" not in job.cache:
        job.cache["delt"] = delt_run(job)
    ipc, lo, n = job.args.ipc, sum(job.counts[:k]), job.counts[k]
    xs, ys, seconds = [], [], 0.0
    scores = {"train_index": [], "p_init": [], "p_final": [], "dist_to_init": []}
    for f in job.cache["delt"]:
        r = torch.load(f, weights_only=True)
        seconds += r["seconds"]
        for j, c in enumerate(r["classes"]):
            part = slice(j * ipc + lo, j * ipc + lo + n)  # ranks lo .. lo+n-1 of class c
            xs.append(r["x"][part])
            ys += [c] * n
            for name in scores:
                scores[name] += r[name][part].tolist()
    join = k * (job.settings["round_iterations"] or 0)
    return {"x": torch.cat(xs).to(job.device), "y": torch.tensor(ys, device=job.device),
            "z": None, "scores": scores,
            "stats": {"join_iteration": join,
                      "iterations_trained": job.settings["iterations"] - join,
                      "optimisation_seconds": seconds}}


METHODS = {  # --method's choices, in this order
    "random": Method(make_random, uses_prior=False, check=check_random, parallel=False),
    "dit": Method(make_dit),
    "lgd": Method(make_lgd),
    "acs": Method(make_acs),
    "igd": Method(make_igd),
    "delt": Method(make_delt, uses_prior=False, stages=delt_stages, check=check_delt),
}


# ---- main: resolve and check everything, then make the stages that have no manifest yet


def plan(args, device, ctx) -> Job:
    """Read the run, resolve the settings and check every input before anything is written."""
    info = common.read_run_info(args.run)
    method = METHODS[args.method]
    # the flags alone first: a mistake in them is reported before seconds of loading models
    scale = common.resolve_scale(args.scale, info.name)
    flags = flag_values(args.method, scale, args)
    counts = method.stages(args, flags)
    # the reference model is frozen: guidance needs its gradients with respect to images only
    teacher = common.load_run_teacher(args.run, info, device).requires_grad_(False)
    prior = dit.load_run_prior(args.run, info, device) if method.uses_prior else None
    _, real, test = common.load_dataset(info.name, info.root, info.size)
    name = delt_name(args, flags) if args.method == "delt" else f"{args.method}-ipc{args.ipc}"
    job = Job(args, info, device, ctx, teacher, prior, real.to(device), test.to(device), scale,
              counts, args.out or args.run / "distilled" / name)
    if prior is not None and job.sample_steps > prior.scheduler_config["num_train_timesteps"]:
        raise common.UserError(f"--sample-steps {job.sample_steps} exceeds the DiT's training "
                               f"steps")
    check_flags(job, args.method, flags)
    job.settings = resolve_settings(job, args.method, flags)
    if method.check is not None:
        method.check(job)
    if prior is not None:
        prior.set_checkpointing(job.checkpointing)
    return job


def main():
    args = parse_args()
    device, ctx = common.setup_device(args.device, args.amp, args.compile)
    t_start, load_start = time.time(), common.load_average()
    job, method, r = plan(args, device, ctx), METHODS[args.method], common.ranks()
    if args.dry_run:
        if not r.main:
            return
        extra = {"join_iterations": delt_joins(job.counts, job.settings["round_iterations"])} \
            if args.method == "delt" else {}
        print(json.dumps(common.jsonable({
            "method": args.method, "scale": job.scale, "out": job.out,
            "images_per_stage": job.counts, "cfg": job.cfg, "sample_batch": job.sample_batch,
            "checkpointing": job.checkpointing, "settings": job.settings, **extra})))
        return
    # config.json records the resolved cfg and sample steps under the flags' own names
    resolved = {**vars(args), "cfg": job.cfg, "sample_steps": job.sample_steps}
    cfg_args = {k: v for k, v in resolved.items() if k not in ("overwrite", "dry_run")}

    def claim():  # rank 0, for the whole job: one writer per folder, then its config.json
        common.lock_folder(job.out, "distilled set")
        # --sample-batch only groups slots into batches (dit.sample) and checkpointing only
        # trades memory for compute: rerunning with another (after running out of memory,
        # say) resumes instead of asking for --overwrite
        common.prepare_folder(job.out, cfg_args, args.overwrite, "distilled set",
                              ignore=("sample_batch", "checkpointing") +
                              (() if method.uses_prior else ("cfg",)))
        derived = {"scale": job.scale, "images_per_stage": job.counts, "settings": job.settings,
                   "defaults": method_defaults(args.method), "sample_batch": job.sample_batch,
                   "checkpointing": job.checkpointing, "processes": r.world}
        common.write_config(job.out, cfg_args, derived, device, ctx)
    r.on_main(claim)
    print(f"{args.method}: IPC {args.ipc} as {len(job.counts)} stages of "
          f"{'/'.join(map(str, job.counts))} per class, {job.info.num_classes} classes of "
          f"{job.info.name}; {job.scale} scale; device {device}; writing {job.out}"
          + (f" (rank {r.rank} of {r.world})" if r.world > 1 else ""))
    if job.settings and r.main:
        print("settings: " + ", ".join(f"{k}={v}" for k, v in job.settings.items()))
    made = []  # (stage, seconds) made by this call
    for k in tqdm(range(len(job.counts)), desc=f"{args.method} stages", unit="stage"):
        folder = job.stage_folder(k)
        if (folder / "manifest.json").exists():
            job.done.append(load_stage(folder, job))
            tqdm.write(f"stage {k + 1}: done earlier, skipping")
            continue
        if folder.exists() and r.main:
            shutil.rmtree(folder)  # unfinished: start the stage again from its own seed
        r.barrier()  # torchrun: no rank writes into the stage before its leftovers are gone
        common.seed_everything(stage_seed(args.seed, k))
        t0 = time.time()
        res = method.make(job, k) if method.parallel or r.main else None
        seconds = time.time() - t0
        m = write_stage(folder, job, k, res, seconds)
        made.append((k + 1, round(seconds, 1)))
        r.barrier()  # the manifest is on disk: every rank may read the stage
        # the other ranks hold only their own classes' images: they read the stage back
        job.done.append({"x": res["x"], "y": res["y"], "z": res["z"]} if r.main else
                        load_stage(folder, job))
        if m is None:
            continue
        extra = {n: m[n] for n in ("current_test_acc", "disc_acc_before", "disc_acc_after")
                 if n in m}
        tqdm.write(f"stage {k + 1}/{len(job.counts)}: {m['seconds']:.0f} s, reference acc "
                   f"{m['reference_acc']:.1f} %, reference loss {m['reference_loss']:.3f}, "
                   + ", ".join(f"{n} {v:.3f}" for n, v in {**m["mean_scores"], **extra}.items()))
    if args.method == "delt" and r.main:  # every stage has its manifest: batches not needed
        shutil.rmtree(job.out / DELT_STATE, ignore_errors=True)
    if not r.main:
        return
    # one phase per set, loading the run included; a call that only found finished stages
    # keeps the entry of the call that made them (under torchrun: rank 0's wall time)
    common.machine_speed(args.run)  # measured by 01; a run of a pretrained --dit may lack it
    timings = common.Timings(args.run)
    timings.add(f"02/{job.out.name}", time.time() - t_start, load_start, skipped=not made,
                stage_seconds=dict(made), resumed=len(made) < len(job.counts))
    timings.report("02")
    print(f"02 done in {time.time() - t_start:.0f} s: {job.out}")


if __name__ == "__main__":
    common.cli(main)
