"""Guided DiT sampling: one DDPM sampler, optional guidance terms (LGD, ACS) and IGD's deviation term.

Per sampling step (t is the re-spaced index counting down N-1 .. 0; METHODS.md §2):
  eps    = CFG-combined noise prediction (conditional and null halves in one batch)
  x0     = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t);   img = decode(x0)   (VAE or identity)
  x_t-1  = DDPM ancestral step(eps, t, x_t)                 (noise from the caller's generator only)
  only while t lies in the guidance window:
    G     = sum_k w_k score_k(img, y)        per-sample objective, ascended (learnability, adversarial)
    g     = dG/dx_t                          through the DiT's eps, or with eps held constant (faster)
    rho   = c0 RMS(eps) / RMS(g) sqrt(1 - abar_t)   per sample: the step size no longer depends on |g|
    x_t-1 += lambda rho g
    x_t-1 -= gamma d cos(x_t, m*) / dx_t     m* = the most similar latent of the class memory (IGD)

The sign convention is "add lambda*rho*g for a score to be increased": the papers write the term as
added to eps, which taken literally lowers the score (tests/test_guidance.py pins the direction).
Kept out of common.py because that file passed the size where STYLE.md asks for a split.
"""
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class Term:
    """One weighted per-sample score of the decoded image; the sampler ascends the weighted sum."""
    name: str
    weight: float
    fn: Callable  # (img (B, C, H, W) in [0, 1], y (B,)) -> (B,)


def ce_score(model) -> Callable:
    """Per-sample cross-entropy of `model` on (img, y)."""
    return lambda img, y: F.cross_entropy(model(img).float(), y, reduction="none")


def nonsat_score(model) -> Callable:
    """Non-saturating adversarial score log(1 - p_y), ascended (= descending the loss -log(1 - p_y)).

    Ascending CE = -log p_y stalls where D is confidently right (its gradient vanishes as p_y -> 1);
    log(1 - p_y) pushes hardest exactly there, as the non-saturating GAN loss does for a generator.
    """
    def fn(img, y):
        z = model(img).float()  # (B, classes)
        others = z.scatter(1, y[:, None], float("-inf"))
        return torch.logsumexp(others, 1) - torch.logsumexp(z, 1)  # log(1 - p_y)
    return fn


def learnability_terms(current, reference, omega: float) -> list:
    """LGD: S = CE(f_cur(x), y) - omega CE(f_ref(x), y): hard for the current model, valid for the reference."""
    return [Term("ce_current", 1.0, ce_score(current)), Term("ce_reference", -omega, ce_score(reference))]


def adversarial_terms(disc, reference, omega_v: float, form: str = "ce") -> list:
    """ACS (reconstructed): CE(D_k(x), y) (or log(1 - p_y)) ascended, omega_v CE(f_ref(x), y) descended."""
    adv = Term("ce_disc", 1.0, ce_score(disc)) if form == "ce" else Term("nonsat_disc", 1.0, nonsat_score(disc))
    return [adv] + ([Term("ce_reference", -omega_v, ce_score(reference))] if omega_v else [])


def objective(terms: list, img: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The weighted sum of the terms, per sample (B,)."""
    return sum(t.weight * t.fn(img, y) for t in terms)


class Memory:
    """Per-class FIFO of flattened latents of samples already made (IGD's deviation memory)."""

    def __init__(self, size: int = 64):
        self.size, self.bank = size, {}

    def add(self, z: torch.Tensor, y: torch.Tensor):
        for c in y.unique().tolist():
            new = z[y == c].detach().flatten(1).float()
            old = self.bank.get(c, new[:0])
            self.bank[c] = torch.cat([old, new.to(old.device)])[-self.size:]

    def __len__(self):
        return sum(len(v) for v in self.bank.values())

    def nearest_cos(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """cos(x_b, m*_b) per sample (B,), m* = the most similar memory latent of class y_b; 0 if none."""
        xf = x.flatten(1).float()
        out = []
        for b in range(len(y)):
            m = self.bank.get(int(y[b]))
            if m is None or len(m) == 0:
                out.append(xf[b].sum() * 0)  # keeps the graph; contributes a zero gradient
                continue
            cos = F.cosine_similarity(xf[b:b + 1], m.to(xf.device), dim=1)  # (M,)
            out.append(cos[cos.detach().argmax()])
        return torch.stack(out)


@dataclass
class Guidance:
    """Everything the sampler needs to guide: the terms and their scale, the window, the deviation term."""
    terms: list = field(default_factory=list)
    scale: float = 0.0  # lambda
    c0: float = 0.0015  # IGD's normalisation constant at paper scale
    window: tuple = (10, 45)  # [t_lo, t_hi] on the 50-step scale, rescaled to the step count
    deviation: float = 0.0  # gamma
    memory: Memory | None = None
    eps_const: bool = False  # treat eps as a constant: no backward pass through the DiT

    def active(self, i: int, steps: int) -> bool:
        t = steps - 1 - i
        lo, hi = (round(w * steps / 50) for w in self.window)
        return lo <= t <= hi

    def needs_eps_grad(self) -> bool:
        return bool(self.terms) and not self.eps_const

    def update(self, prior, x: torch.Tensor, eps: torch.Tensor, y: torch.Tensor, abar: torch.Tensor,
               ctx=nullcontext()) -> torch.Tensor:
        """The guidance displacement added to x_{t-1}; x requires grad, eps is attached to it (or not)."""
        delta = torch.zeros_like(x)
        if self.terms:
            a = abar.to(x.device)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()  # (B, C, H, W) predicted clean sample
            with ctx:
                G = objective(self.terms, prior.decode(x0), y)  # (B,)
            g, = torch.autograd.grad(G.sum(), x)  # samples are independent: row b is dG_b/dx_b
            rms = lambda v: v.float().pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()  # noqa: E731
            rho = self.c0 * rms(eps.detach()) / (rms(g) + 1e-12) * (1 - a).sqrt()
            delta = delta + self.scale * rho * g
        if self.deviation and self.memory is not None and len(self.memory):
            cos = self.memory.nearest_cos(x, y)
            gd, = torch.autograd.grad(cos.sum(), x)
            delta = delta - self.deviation * gd
        return delta.detach()


def sample(prior, y: torch.Tensor, *, steps=50, cfg=4.0, gen: torch.Generator, guidance: Guidance | None = None,
           batch_size=256, ctx=nullcontext(), progress=True, desc="sample"):
    """One image per dataset label in y: (images in [0, 1] (N, C, H, W), final latents (N, *latent_shape)).

    guidance=None is plain CFG sampling (the `dit` baseline). Noise comes from `gen` only, and the
    guidance consumes no random numbers, so the same seed rebuilds the same images.
    """
    imgs, zs = [], []
    for i0 in tqdm(range(0, len(y), batch_size), desc=desc, disable=not progress, leave=False):
        y_data = y[i0:i0 + batch_size]
        yb = prior.labels(y_data)
        sched = prior.scheduler(steps)
        x = torch.randn((len(yb), *prior.latent_shape), generator=gen, device=gen.device).to(prior.device)
        for i, t in enumerate(sched.timesteps):
            guided = guidance is not None and guidance.active(i, steps)
            with torch.enable_grad() if guided else torch.no_grad():
                xg = x.detach().requires_grad_(guided)
                with ctx, nullcontext() if guided and guidance.needs_eps_grad() else torch.no_grad():
                    eps, var = prior.model_eps(xg, t, yb, cfg, sched)
                out = eps.detach().float() if var is None else torch.cat([eps.detach(), var.detach()], 1).float()
                x_prev = sched.step(out, t, x, generator=gen).prev_sample
                if guided:
                    x_prev = x_prev + guidance.update(prior, xg, eps, y_data, sched.alphas_cumprod[int(t)], ctx)
            x = x_prev.detach()
        zs.append(x)
        with torch.no_grad(), ctx:
            imgs.append(prior.decode(x).float())
    return torch.cat(imgs), torch.cat(zs)
