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
import json
import math
import shutil
import time
from dataclasses import dataclass, field
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
# --sample-batch by scale. Paper: one guided sample of DiT-XL/2 + VAE decoder + f_cur + f_ref at
# 256 px keeps <= 1.12 GB of activations for the backward pass with checkpointing, <= 2.46 GB
# without (README: the memory rule), so 30 (= ImageNette's 10 classes x kappa 3) or 15 fit one
# 80 GB GPU beside the ~5 GB of weights with room for the allocator and transient gradients
SAMPLE_BATCH = {"small": 120, "paper": 30, "paper without checkpointing": 15}

# ------------------------------------------------------------------------------------------
# The method registry. A method is its stage maker plus its own flags, each flag with a
# {"paper": ..., "small": ...} pair of defaults; --scale picks the column once at start-up and
# both columns go into config.json. A flag given to a method that does not read it is an error.
# ------------------------------------------------------------------------------------------


def equal_stages(args, settings: dict) -> list:
    """K = --stages equal increments of IPC/K images per class."""
    k = args.stages or STAGES
    if args.ipc % k:
        raise common.UserError(f"--ipc {args.ipc} does not split into --stages {k} equal "
                               f"increments; choose a multiple of {k}")
    return [args.ipc // k] * k


@dataclass
class Method:
    make: Callable  # (job, k) -> stage k's images, labels, latents, scores
    defaults: dict = field(default_factory=dict)  # flag -> {"paper": v, "small": v}
    uses_prior: bool = True  # reads <run>/dit
    stages: Callable = equal_stages  # (args, settings) -> images per class of each stage
    check: Callable | None = None  # (job) -> None, more checks before anything is written
    parallel: bool = True  # under torchrun every rank runs make (its share); False: rank 0 alone


METHODS: dict = {}  # name -> Method, filled by each method's section


def both(v) -> dict:
    """A default that is the same at both scales."""
    return {"paper": v, "small": v}


# Every method flag once: argparse keywords and help. Its defaults live in the methods' tables.
METHOD_FLAGS = {
    # guided sampling (lgd, acs)
    "lam": dict(type=float, help="lambda, the scale of the learnability / adversarial / "
                                 "influence term (igd: IGD's k)"),
    "omega": dict(type=float, help="weight of the reference CE (LGD omega, ACS omega_v)"),
    "gamma": dict(type=float, help="deviation (diversity) scale; 0 = off; the small column is "
                                   "the paper's gamma x D / 4096, D = the prior's latent size"),
    "c0": dict(type=float, help="normalisation constant of the guidance step"),
    "window": dict(help="guidance window t_lo,t_hi on the 50-step scale"),
    "candidates": dict(type=common.positive_int, help="kappa candidates per slot (lgd)"),
    "current_weight": dict(type=float, help="lgd: weight of CE(f_cur), the learnability term; 0 "
                                            "= teacher guidance alone (-omega CE(f_ref); f_cur "
                                            "is still trained, saved and scores the images)"),
    "memory": dict(type=common.positive_int, help="deviation memory per class"),
    "eps_const": dict(action="store_true",
                      help="hold eps constant in the guidance gradient (no backward "
                           "through the DiT)"),
    "guide_model": dict(help="architecture of f_cur (lgd) / D_k (acs)"),
    "guide_epochs": dict(type=common.positive_int, help="epochs of f_cur / D_k"),
    "init_folder": dict(type=Path, help="lgd: take the first increment from this "
                                        "<class>/<image> folder (e.g. an IGD set)"),
    "adv_form": dict(choices=["ce", "nonsat"],
                     help="acs: raise CE(D(x), y), or the non-saturating log(1 - p_y)"),
    "init_set": dict(choices=["dit", "igd"],
                     help="lgd: make the first increment by plain DiT sampling or by IGD "
                          "sampling with igd's defaults (the LGD paper seeds with IGD)"),
    # igd (§5)
    "trajectory": dict(help="igd: comma list of surrogate epochs to guide with, or 'all' (every "
                            "epoch_XXX.pt that 01 --surrogate kept in <run>/surrogate/)"),
    "real_images": dict(type=common.positive_int,
                        help="igd: real training images per class (the first ones) whose mean "
                             "CE gradient is g_real"),
    # delt (§6)
    "iterations": dict(type=common.positive_int, help="MI, total iterations"),
    "round_iterations": dict(type=common.positive_int,
                             help="RI, iterations per join round; MI/RI rounds"),
    "schedule": dict(choices=["earlylate", "constant"],
                     help="earlylate: group g joins at g*RI; constant: every image trains MI "
                          "iterations (the SRe2L/CDA baseline)"),
    "init": dict(choices=["median", "top", "min", "noise"],
                 help="real images nearest the class median of the teacher's true-class "
                      "probability, the highest, the lowest, or Gaussian noise (SRe2L)"),
    "opt_batch": dict(type=common.positive_int,
                      help="images per optimisation batch; whole classes (max(1, B // IPC))"),
    "lr": dict(type=float, help="Adam learning rate on the normalised pixels"),
    "r_bn": dict(type=float, help="alpha_BN, weight of the BN statistics loss"),
    "first_bn_weight": dict(type=float, help="w_1 of the first BN layer"),
    "per_sample_aug": dict(action="store_true",
                           help="a random-resized crop (and flip) per image; default one per "
                                "batch, as DELT's code"),
}


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
    g.add_argument("--sample-steps", type=common.positive_int, default=None,
                   help="DDPM ancestral steps (default by --scale: " +
                        ", ".join(f"{k} {v}" for k, v in dit.SAMPLE_STEPS.items()) + ")")
    g.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (default by --scale: " +
                        ", ".join(f"{k} {v}" for k, v in dit.CFG.items()) + ")")
    g.add_argument("--sample-batch", type=common.positive_int, default=None,
                   help="samples per forward pass (candidates included); a batch never holds "
                        "two images of one class, and the images do not depend on it. Default "
                        "by scale: " + ", ".join(f"{k} {v}" for k, v in SAMPLE_BATCH.items()))
    g.add_argument("--checkpointing", default="auto", choices=["auto", "on", "off"],
                   help="gradient checkpointing of the DiT and the VAE in guided steps: a "
                        "fraction of the memory for one more forward pass; auto = on at "
                        "--scale paper, off at small")
    g = p.add_argument_group("method settings (default: the method's column for --scale)")
    for flag, kw in METHOD_FLAGS.items():
        users = {m: spec.defaults[flag] for m, spec in METHODS.items() if flag in spec.defaults}
        shown = "; ".join(f"{m}: {d['paper']}" if d["paper"] == d["small"] else
                          f"{m}: paper {d['paper']}, small "
                          f"{'paper x D/4096' if d['small'] is None else d['small']}"
                          for m, d in users.items())
        # SUPPRESS: an unset flag is absent from args, so a flag given to the wrong method shows
        g.add_argument("--" + flag.replace("_", "-"), default=argparse.SUPPRESS,
                       **{**kw, "help": f"{kw['help']} (default {shown})"})
    return p.parse_args(argv)


def resolve_settings(args, scale: str) -> dict:
    """The method's settings: each flag as given, else its default for this scale."""
    method = METHODS[args.method]
    for flag in METHOD_FLAGS:
        if hasattr(args, flag) and flag not in method.defaults:
            users = sorted(m for m, spec in METHODS.items() if flag in spec.defaults)
            raise common.UserError(f"--{flag.replace('_', '-')} has no meaning for --method "
                                   f"{args.method} (only {', '.join(users)}); drop it")
    return {k: getattr(args, k, d[scale]) for k, d in method.defaults.items()}


def stage_seed(seed: int, k: int) -> int:
    """Each stage draws from its own seed, so a stage redone after a kill repeats exactly."""
    return seed * 1000 + k


# ------------------------------------------------------------------------------------------
# The stage engine: what every maker reads, and how a finished stage is written and read back
# ------------------------------------------------------------------------------------------


class Job:
    """One distilled set being built: settings, models, data and the stages finished so far."""

    def __init__(self, args, info, device, ctx, teacher, prior, real, test, scale, settings,
                 counts, out):
        self.args, self.info, self.device, self.ctx = args, info, device, ctx
        self.teacher, self.prior, self.real, self.test = teacher, prior, real, test
        self.scale, self.settings, self.out = scale, settings, out
        self.counts = counts  # images per class of each stage
        # checkpointing and the batch change how fast and in how much memory, not what is made
        self.checkpointing = args.checkpointing == "on" or \
            (args.checkpointing == "auto" and scale == "paper")
        self.sample_batch = args.sample_batch or SAMPLE_BATCH[
            scale if scale == "small" or self.checkpointing else "paper without checkpointing"]
        self.per_stage = counts[0]  # the stage size of the methods with equal stages
        self.done = []  # finished stages: dicts with x (uint8), y, z (latents or None)
        self.cache = {}  # what a maker computes once for all stages (delt: the optimisation)
        self.owned = {}  # stage -> the classes whose images this rank made (torchrun)

    def stage_folder(self, k: int) -> Path:
        return self.out / f"stage_{k + 1:02d}"

    def labels(self) -> torch.Tensor:
        """Class-major labels of one increment: per_stage images of class 0, then class 1, ..."""
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
        """Stage k's increment of DiT samples (images, latents, kept scores), class-major.

        Slots are sampled slot-major (image j of every class, then image j + 1), so the memory
        moves on after every batch; slot (c, j) draws its noise from its own seed, so neither
        the process that samples class c nor the order of the batches changes its image.
        Under torchrun the class groups go round-robin to the ranks and rank 0 gathers every
        rank's slots; the other ranks get theirs with zeros elsewhere and write only their own
        classes (self.owned). Images come back as their PNGs hold them (uint8 / 255).
        """
        a, C, n, r = self.args, self.info.num_classes, self.per_stage, common.ranks()
        y = torch.arange(C, device=self.device).repeat(n)  # slot-major: slot j * C + c = (c, j)
        seeds = [dit.slot_seed(stage_seed(a.seed, k), c, j) for j in range(n) for c in range(C)]
        # a batch = one group of consecutive classes in one round j; the groups are fixed by
        # --sample-batch alone, so the batches are the same whatever order they are made in
        # and whichever rank makes them (another grouping is the same computation, but its
        # batched kernels may round differently in the last bit)
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
                self.prior, y[slots], [seeds[i] for i in slots], steps=a.sample_steps,
                cfg=a.cfg, guidance=guidance, candidates=candidates, score=score,
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
        """The guidance settings `s` (default the method's) around `terms`, with the memory of
        earlier stages."""
        s = s or self.settings
        return dit.Guidance(terms=terms, scale=s["lam"], c0=s["c0"], window=s["window"],
                            deviation=s["gamma"], memory=self.memory(s["memory"]),
                            eps_const=s["eps_const"])

    def train_guide(self, k: int, proto: common.Protocol, name: str,
                    file: str) -> common.Classifier:
        """f_cur / D_k: trained from scratch on every finished stage, seeded by the stage, then
        frozen (guidance needs gradients with respect to images only). Under torchrun rank 0
        trains it once and shares it as stage k's `file`; the other ranks wait and load it."""
        r, path = common.ranks(), self.stage_folder(k) / file
        if r.main:
            model = common.build_model(self.settings["guide_model"], self.info).to(self.device)
            common.fit(model, self.union(), self.info, proto,
                       epochs=self.settings["guide_epochs"], seed=stage_seed(self.args.seed, k),
                       ctx=self.ctx, desc=f"stage {k + 1} {name}")
            if r.world > 1:
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
    """Images, latents and models of one stage, then the manifest (last: the stage is done).
    Under torchrun every rank writes the images of the classes it sampled (rank 0 all of a
    stage made whole), then rank 0 the rest once every rank's images are on disk."""
    info, r = job.info, common.ranks()
    n, base = job.counts[k], sum(job.counts[:k])  # indices continue after earlier stages
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


# ------------------------------------------------------------------------------------------
# random and dit: the baselines
# ------------------------------------------------------------------------------------------


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


METHODS["random"] = Method(make_random, uses_prior=False, check=check_random, parallel=False)
METHODS["dit"] = Method(make_dit)


# ------------------------------------------------------------------------------------------
# lgd (§3): stage k > 1 is sampled to be hard for f_cur (trained on stages < k) and easy for
# the reference model, keeping the best of kappa candidates per slot
# ------------------------------------------------------------------------------------------

GUIDED = {  # the guided-sampling defaults lgd and acs share (paper: a latent DiT-XL/2)
    "lam": both(15.0),  # lambda (LGD paper)
    "omega": both(0.5),  # weight of CE(f_ref) (LGD paper)
    # deviation: LGD paper 50 on 4x32x32 latents; the push per element scales like gamma / D,
    # so small = paper x D / 4096 for the prior's latent size D (resolved by deviation_scale):
    # 2.39 on the default 4x7x7 latents, 9.57 on 28x28 pixels (at 50 they left the data)
    "gamma": {"paper": 50.0, "small": None},
    "c0": both(0.0015),  # IGD's normalisation constant
    "window": both("10,45"),  # of 50 steps (LGD paper)
    "memory": both(64),  # IGD's FIFO length per class
    "eps_const": both(False),
    "guide_model": {"paper": "convnet-6", "small": "convnet-3"},  # IGD and LGD: ConvNet-6
    "guide_epochs": {"paper": 300, "small": 60},  # f_cur / D_k (our choice)
}


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


def deviation_scale(job: Job, s: dict, method: str) -> None:
    """gamma None (the small column) = the method's paper gamma x D / 4096, D the prior's latent
    size: the same push per latent element as the paper's on DiT-XL/2's 4x32x32 latents."""
    if s["gamma"] is None:
        d = math.prod(job.prior.latent_shape)
        s["gamma"] = round(METHODS[method].defaults["gamma"]["paper"] * d / 4096, 2)


def check_guided(job: Job):
    deviation_scale(job, job.settings, job.args.method)
    job.settings["window"] = parse_window(job.settings["window"])
    common.check_model(job.settings["guide_model"], job.info)


def read_init_folder(job: Job) -> common.Split:
    """lgd --init-folder: the first increment, as given (e.g. an IGD set)."""
    x = common.read_distilled(job.settings["init_folder"], job.info)
    counts = torch.bincount(x.y, minlength=job.info.num_classes).tolist()
    if any(n != job.per_stage for n in counts):
        raise common.UserError(f"--init-folder {job.settings['init_folder']} must hold "
                               f"{job.per_stage} images per class (IPC {job.args.ipc} / "
                               f"{len(job.counts)} stages), found {counts}")
    return x.to(job.device)


def make_lgd(job: Job, k: int) -> dict:
    """Stage 1: plain DiT, IGD (--init-set igd) or --init-folder; stage k > 1: learnability
    guidance vs f_cur."""
    if k == 0:
        if job.settings["init_set"] == "igd":  # IGD's sampling with igd's own settings
            return make_igd(job, k, job.settings["init_igd"])
        if job.settings["init_folder"] is None:
            return make_dit(job, k)
        x = read_init_folder(job)
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


def check_lgd(job: Job):
    check_guided(job)
    if job.settings["current_weight"] == 0 and job.settings["omega"] == 0:
        raise common.UserError("--current-weight 0 with --omega 0 leaves lgd no guidance term; "
                               "that is plain sampling: use --method dit")
    if job.settings["init_set"] == "igd":
        if job.settings["init_folder"] is not None:
            raise common.UserError("--init-set igd and --init-folder both name the first "
                                   "increment; give one of them")
        # the first increment is IGD's: igd's whole default column at this scale, recorded
        job.settings["init_igd"] = igd_settings(job, {k: d[job.scale] for k, d in
                                                      METHODS["igd"].defaults.items()})
    if job.settings["init_folder"] is not None:
        read_init_folder(job)


# init_set dit stays the default: IGD seeding (the paper's) is one flag away, but it has not
# been measured to give a better set here, and it needs 01 --surrogate
METHODS["lgd"] = Method(make_lgd, {**GUIDED, "candidates": both(3), "current_weight": both(1.0),
                                   "init_folder": both(None), "init_set": both("dit")},
                        check=check_lgd)


# ------------------------------------------------------------------------------------------
# acs (§4, reconstructed): curriculum k > 1 is sampled to fool D_k, a discriminator trained
# on the curricula before it; the reference model keeps the images valid
# ------------------------------------------------------------------------------------------


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


METHODS["acs"] = Method(make_acs, {**GUIDED, "adv_form": both("ce")}, check=check_guided)


# ------------------------------------------------------------------------------------------
# igd (§5, after IGD's released sampler): every increment is sampled with influence guidance,
# the agreement of an image's training gradient with the real data's gradient at checkpoints
# of a surrogate trained on real data (01 --surrogate). IGD itself is one pass; its increments
# exist so that 03 can take the set apart (§7.6): each stage's deviation memory holds the
# latents of every earlier stage, and within a stage those of earlier batches, as one pass has.
# Job.sample runs slot-major batches that never hold two images of one class and updates the
# memory after every batch, so image j of class c is pushed away from images 0..j-1 of c, as in
# the reference code's one-image loop. What differs: a batch holds one image of several classes
# (the step is per sample, so only float rounding can tell), and each slot's noise comes from
# its own seed (dit.slot_seed) rather than one stream.
# ------------------------------------------------------------------------------------------

REAL_GRADS = "real_grads.pt"  # in <run>/surrogate/: g_real per checkpoint, computed once


def surrogate_checkpoints(run: Path) -> dict:
    """{epoch: path} of the kept checkpoints of a finished surrogate of 01, or a UserError."""
    folder = Path(run) / "surrogate"
    if not (folder / "metrics.json").exists():
        raise common.UserError(f"{folder} holds no finished surrogate trajectory, which igd "
                               f"guides with; run 01_train_teacher.py --run {run} --surrogate "
                               f"(with the run's other 01 flags) first")
    return {int(f.stem[len("epoch_"):]): f for f in sorted(folder.glob("epoch_[0-9]*.pt"))}


def igd_settings(job: Job, s: dict) -> dict:
    """igd's settings checked and resolved: the window as numbers, the trajectory as epochs."""
    s["window"] = parse_window(s["window"]) if isinstance(s["window"], str) else s["window"]
    deviation_scale(job, s, "igd")
    found = surrogate_checkpoints(job.args.run)
    if s["trajectory"] == "all":
        epochs = sorted(found)
    else:
        try:
            epochs = sorted({int(e) for e in str(s["trajectory"]).split(",") if e.strip()})
        except ValueError:
            raise common.UserError(f"--trajectory must be 'all' or a comma list of epochs like "
                                   f"0,2,11,40, got {s['trajectory']!r}") from None
    missing = [e for e in epochs if e not in found]
    if missing or not epochs:
        raise common.UserError(f"--trajectory {s['trajectory']}: {job.args.run}/surrogate has no "
                               f"checkpoint of epoch(s) {missing or 'given'}, only "
                               f"{sorted(found)}; choose among those or retrain with "
                               f"01_train_teacher.py --surrogate-keep")
    s["trajectory"] = epochs
    for e in epochs:  # of this dataset, and loadable: fail here, before anything is written
        common.load_classifier(found[e], job.info, "cpu")
    return s


def _sha256(path: Path) -> str:
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def real_gradients(job: Job, s: dict) -> torch.Tensor:
    """g_real (|E|, classes, P) of the surrogate checkpoints, from <run>/surrogate/real_grads.pt.

    The cache is a plain dict with one entry per checkpoint and image count, holding the
    checkpoint file's SHA-256, so a retrained surrogate or another trajectory never picks up
    stale gradients: entries that are missing or do not match are computed and written back.
    """
    found = surrogate_checkpoints(job.args.run)
    path = job.args.run / "surrogate" / REAL_GRADS
    per_class = s["real_images"]
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
        name, sha = f"epoch_{e:03d}/first_{per_class}", _sha256(found[e])
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
        models = [common.load_classifier(found[e], job.info, job.device)
                  for e in s["trajectory"]]
        job.cache[cache_key] = dit.influence_terms(
            models, real_gradients(job, s),
            names=[f"cos_epoch{e:03d}" for e in s["trajectory"]])
    return job.cache[cache_key]


def make_igd(job: Job, k: int, s: dict | None = None) -> dict:
    """Stage k: influence-guided sampling with the deviation term against earlier stages.

    `s`: igd's settings; lgd --init-set igd passes igd's defaults for its first increment.
    """
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


def check_igd(job: Job):
    igd_settings(job, job.settings)


METHODS["igd"] = Method(make_igd, check=check_igd, defaults={
    # paper: IGD's released scripts (ImageWoof's gamma); small: the miniature DiT of 01
    "lam": both(5.0),  # k, the influence scale (IGD)
    # deviation: 120 in IGD's ImageWoof scripts on 4x32x32 latents. gamma multiplies the raw
    # gradient of a cosine, whose push per element shrinks like 1/D, so small is rescaled as
    # lgd's (deviation_scale): 120 x 196 / 4096 = 5.74 on 4x7x7 latents (not tuned on the digits)
    "gamma": {"paper": 120.0, "small": None},
    "c0": both(0.0015),  # IGD's normalisation constant
    "window": both("30,45"),  # of 50 steps (IGD)
    "memory": both(64),  # IGD's FIFO length per class
    "eps_const": both(False),  # IGD backpropagates through the DiT
    "trajectory": both("all"),  # the epochs 01 --surrogate kept (its --surrogate-keep)
    "real_images": both(dit.REAL_GRAD_IMAGES),  # per class, for g_real (IGD: 200)
})


# ------------------------------------------------------------------------------------------
# delt (§6, after DELT's released code): EarlyLate pixel optimisation of real images against
# the BN teacher. Every batch of classes is optimised once, all join rounds together; the
# images of join round k form stage k (stage_01 joined first and trained longest).
# ------------------------------------------------------------------------------------------

DELT_STATE = "delt_state"  # finished batches (uint8 images + scores) while the optimisation runs


def delt_groups(ipc: int, iterations: int, round_iterations: int | None) -> list:
    """Per-class group sizes in rank order: R = MI/RI near-equal groups, the first IPC mod R
    one larger (DELT's code); group g joins at g*RI. Empty tail groups (IPC < R) are dropped,
    so IPC 1 is one group trained MI iterations. round_iterations None (constant): [IPC]."""
    if round_iterations is None:
        return [ipc]
    r = iterations // round_iterations
    return [n for n in (ipc // r + (g < ipc % r) for g in range(r)) if n]


def delt_joins(counts: list, round_iterations: int | None) -> list:
    """Join iteration of every rank of a class: group g joins at g*RI (0 on constant)."""
    return [g * (round_iterations or 0) for g, n in enumerate(counts) for _ in range(n)]


def delt_stages(args, s: dict) -> list:
    """One stage per join round, after checking the schedule flags; --stages may only confirm
    the number. The constant schedule has no rounds: its round_iterations becomes None."""
    if s["schedule"] == "constant":
        if hasattr(args, "round_iterations"):
            raise common.UserError("--round-iterations has no meaning with --schedule constant "
                                   "(every image trains --iterations); drop it")
        s["round_iterations"] = None
    elif s["iterations"] % s["round_iterations"]:
        raise common.UserError(f"--iterations {s['iterations']} must be a multiple of "
                               f"--round-iterations {s['round_iterations']} (MI = rounds x RI)")
    if s["lr"] <= 0 or s["r_bn"] < 0 or s["first_bn_weight"] < 0:
        raise common.UserError(f"--lr must be > 0 and --r-bn, --first-bn-weight >= 0, got "
                               f"{s['lr']}, {s['r_bn']}, {s['first_bn_weight']}")
    counts = delt_groups(args.ipc, s["iterations"], s["round_iterations"])
    if args.stages is not None and args.stages != len(counts):
        raise common.UserError(f"--stages {args.stages} contradicts the delt schedule, which "
                               f"makes one stage per join round: {len(counts)} here "
                               f"(min(MI/RI, IPC)); drop --stages or change "
                               f"--iterations/--round-iterations")
    return counts


def check_delt(job: Job):
    """What delt needs from the run: a teacher with BN, enough real images to start from."""
    s, args = job.settings, job.args
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in job.teacher.modules()):
        raise common.UserError(f"delt matches the teacher's BatchNorm statistics, but the teacher "
                               f"of {args.run} has no BN layers; train one with "
                               f"01_train_teacher.py --model convnet-3-bn (or resnet18)")
    if s["init"] != "noise":
        check_random(job, "to initialise from, ", "or use --init noise")


def delt_name(args, s: dict) -> str:
    """delt-ipc50; the baselines made by flags get their own folder, e.g.
    delt-constant-init-noise-ipc50 (SRe2L-style) or delt-constant-ipc50 (CDA-style)."""
    parts = ["delt"] + (["constant"] if s["schedule"] == "constant" else []) + \
        ([f"init-{s['init']}"] if s["init"] != "median" else [])
    return "-".join(parts) + f"-ipc{args.ipc}"


def delt_crop_min(t: int, total: int) -> float:
    """Lower area bound of the crop: 1 at t = 0, cosine down to 0.08 at MI (easy to hard)."""
    return 0.08 + 0.92 * (1 + math.cos(math.pi * t / total)) / 2


@torch.no_grad()
def true_class_prob(model, x, y) -> torch.Tensor:
    """Softmax probability of the label, (N,), for uint8 or [0, 1] float images (full precision:
    the median rule ranks near-certain images, which bf16 logits would tie)."""
    return F.softmax(common.predict(model, x), 1).gather(1, y[:, None]).squeeze(1)


def delt_init_ranks(job: Job) -> torch.Tensor:
    """Training-set indices (classes, IPC) of the init images, rank 0 first: nearest the class
    median of the teacher's true-class probability (median), the highest (top), lowest (min)."""
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
    """Optimise the IPC images of each class in `classes` as one batch (class-major, rank order).

    Loss on the active images: CE(T(A(x)), y) + alpha_BN * BN matching; Adam on the normalised
    pixels z = (x - mean) / std (DELT's parameters, so lr 0.25 is the paper's step), global
    cosine LR, z clamped to x in [0, 1] after every step. Group g joins at g*RI: until then its
    pixels get exactly zero gradient, so Adam leaves them as initialised. Every random draw
    comes from a generator seeded by `seed`, so a batch redone after a kill repeats exactly.
    """
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
    with common.BNMatch(teacher, s["first_bn_weight"]) as bn:
        for t in bar:
            for g in opt.param_groups:  # global cosine, no warm-up
                g["lr"] = 0.5 * s["lr"] * (1 + math.cos(math.pi * t / T))
            active = (join <= t).nonzero().squeeze(1)  # the groups that have joined
            xa = common.random_resized_crop(z[active] * std + mean, (delt_crop_min(t, T), 1.0),
                                            gen=gen, per_sample=s["per_sample_aug"],
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
    """Whole classes per optimisation batch, max(1, B // IPC) of them (the classes of a batch
    share its BN statistics, as in DELT's code)."""
    per = max(1, opt_batch // ipc)
    return [list(range(c, min(c + per, num_classes))) for c in range(0, num_classes, per)]


def delt_batch_seed(seed: int, b: int) -> int:
    """An independent random stream per (run seed, batch)."""
    return int(np.random.SeedSequence([seed % 2 ** 32, b]).generate_state(1)[0])


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
        t0 = time.time()
        res = delt_optimise(job, batches[b], ranks, delt_batch_seed(job.args.seed, b))
        res.update(classes=batches[b], seed=delt_batch_seed(job.args.seed, b),
                   seconds=time.time() - t0)
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
            "stats": {"join_iteration": join, "iterations_trained": job.settings["iterations"] - join,
                      "optimisation_seconds": seconds}}


METHODS["delt"] = Method(make_delt, uses_prior=False, stages=delt_stages, check=check_delt,
                         defaults={
    # paper = DELT's released ImageNet-1K recipe; small = the digits on 2 CPU cores
    "iterations": {"paper": 4000, "small": 160},  # MI (DELT paper)
    "round_iterations": {"paper": 500, "small": 20},  # RI (DELT paper); small keeps R = 8
    "opt_batch": both(100),  # images per optimisation batch, whole classes (DELT code)
    "lr": both(0.25),  # Adam on the normalised pixels (DELT code)
    "r_bn": both(0.01),  # alpha_BN (DELT code)
    "first_bn_weight": both(10.0),  # w_1 (DELT/SRe2L code)
    "schedule": both("earlylate"),
    "init": both("median"),
    "per_sample_aug": both(False),
})


# ------------------------------------------------------------------------------------------
# main: resolve and check everything, then make the stages that have no manifest yet
# ------------------------------------------------------------------------------------------


def plan(args, device, ctx) -> Job:
    """Read the run, resolve the settings and check every input before anything is written."""
    info = common.read_run_info(args.run)
    method = METHODS[args.method]
    # the flags alone first: a mistake in them is reported before seconds of loading models
    scale = common.resolve_scale(args.scale, info.name)
    if args.cfg is None:  # resolved before config.json records the arguments
        args.cfg = dit.CFG[scale]
    if args.sample_steps is None:
        args.sample_steps = dit.SAMPLE_STEPS[scale]
    settings = resolve_settings(args, scale)
    counts = method.stages(args, settings)
    # the reference model is frozen: guidance needs its gradients with respect to images only
    teacher = common.load_run_teacher(args.run, info, device).requires_grad_(False)
    prior = dit.load_run_prior(args.run, info, device) if method.uses_prior else None
    if prior is not None and args.sample_steps > prior.scheduler_config["num_train_timesteps"]:
        raise common.UserError(f"--sample-steps {args.sample_steps} exceeds the DiT's training "
                               f"steps")
    _, real, test = common.load_dataset(info.name, info.root, info.size)
    name = delt_name(args, settings) if args.method == "delt" else f"{args.method}-ipc{args.ipc}"
    job = Job(args, info, device, ctx, teacher, prior, real.to(device), test.to(device), scale,
              settings, counts, args.out or args.run / "distilled" / name)
    if method.check is not None:
        method.check(job)
    if prior is not None:
        prior.set_checkpointing(job.checkpointing)
    return job


def main():
    args = parse_args()
    device, ctx = common.setup_device(args.device, args.amp, args.compile)
    t_start, load_start = time.time(), common.load_average()
    job = plan(args, device, ctx)
    r = common.ranks()
    if args.dry_run:
        if not r.main:
            return
        extra = {"join_iterations": delt_joins(job.counts, job.settings["round_iterations"])} \
            if args.method == "delt" else {}
        print(json.dumps(common.jsonable({"method": args.method, "scale": job.scale,
                                          "out": job.out, "images_per_stage": job.counts,
                                          "cfg": args.cfg,
                                          "sample_batch": job.sample_batch,
                                          "checkpointing": job.checkpointing,
                                          "settings": job.settings, **extra})))
        return
    cfg_args = {k: v for k, v in vars(args).items() if k not in ("overwrite", "dry_run")}

    def claim():  # rank 0, for the whole job: one writer per folder, then its config.json
        common.lock_folder(job.out, "distilled set")
        # --sample-batch only groups slots into batches (dit.sample) and checkpointing only
        # trades memory for compute: rerunning with another (after running out of memory,
        # say) resumes instead of asking for --overwrite
        common.prepare_folder(job.out, cfg_args, args.overwrite, "distilled set",
                              ignore=("sample_batch", "checkpointing") +
                              (() if METHODS[args.method].uses_prior else ("cfg",)))
        derived = {"scale": job.scale, "images_per_stage": job.counts, "settings": job.settings,
                   "defaults": METHODS[args.method].defaults, "sample_batch": job.sample_batch,
                   "checkpointing": job.checkpointing, "processes": r.world}
        common.write_config(job.out, cfg_args, derived, device, ctx)
    r.on_main(claim)
    print(f"{args.method}: IPC {args.ipc} as {len(job.counts)} stages of "
          f"{'/'.join(map(str, job.counts))} per class, {job.info.num_classes} classes of "
          f"{job.info.name}; {job.scale} scale; device {device}; writing {job.out}"
          + (f" (rank {r.rank} of {r.world})" if r.world > 1 else ""))
    if job.settings and r.main:
        print("settings: " + ", ".join(f"{k}={v}" for k, v in job.settings.items()))
    method = METHODS[args.method]
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
    timings = common.Timings(args.run)
    timings.add(f"02/{job.out.name}", time.time() - t_start, load_start, skipped=not made,
                stage_seconds=dict(made), resumed=len(made) < len(job.counts))
    timings.report("02")
    print(f"02 done in {time.time() - t_start:.0f} s: {job.out}")


if __name__ == "__main__":
    common.cli(main)
