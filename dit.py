"""The class-conditional DiT prior and its guided sampler (docs/methods.md §2).

One DDPM ancestral step, with guidance inside the window (guided_step below):
  eps    = CFG-combined noise prediction (conditional and null halves in one batch)
  x_t-1  = plain ancestral step(eps, t, x_t)              noise from the slot's own generator
  x0     = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t);   img = decode(x0)  (VAE or identity)
  G      = sum_k w_k score_k(img, y)                       per-sample objective, to be *raised*
  g      = dG/dx_t                                         through the DiT's eps, or eps held fixed
  rho    = c0 RMS(eps) / RMS(g) sqrt(1 - abar_t)           per sample: the step ignores |g|
  x_t-1 += lambda rho g  -  gamma d cos(x_t, m*) / dx_t    m* = nearest latent of the class memory
The papers write the guidance as added to eps, which taken literally lowers the score; here it
is added to the sample so that the score goes up (tests/test_guidance.py pins the direction).

Sections: 1 building and loading a prior; 2 guidance terms and the deviation memory;
3 one guided step; 4 the sampler with kappa candidates per slot.

Every slot (one image to make) has its own noise seed and a batch never holds two slots of one
class, so an image does not depend on the order in which batches are made, nor on which process
makes them. It can depend on the batch's size in the last bit of a float: PyTorch's vectorised
CPU kernels treat the tail of a tensor apart, so a row's rounding can change with the batch.
"""
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common as C

# ==========================================================================================
# 1. The prior: a DiT, its noise schedule, and a VAE for latent models
# ==========================================================================================

# the CFG scale and the number of sampling steps are by --scale: common.DEFAULTS


def make_pixel_dit(info: C.DatasetInfo, width=96, depth=4, patch=4, head_dim=32):
    """A small class-conditional DiT acting directly on pixels (no VAE)."""
    from diffusers import DiTTransformer2DModel
    if info.size % patch:
        raise C.UserError(f"a DiT with patch {patch} cannot take {info.size} px images; "
                          f"choose --dit-patch dividing {info.size}")
    if width % head_dim:
        raise C.UserError(f"--dit-width {width} must be a multiple of the head size {head_dim}")
    return DiTTransformer2DModel(
        num_attention_heads=width // head_dim, attention_head_dim=head_dim,
        in_channels=info.channels, out_channels=info.channels, num_layers=depth,
        sample_size=info.size, patch_size=patch, num_embeds_ada_norm=info.num_classes,
        norm_num_groups=1)


def make_latent_dit(info: C.DatasetInfo, width=96, depth=4, patch=1, head_dim=32,
                    latent_channels=4, down=4):
    """A small class-conditional DiT on the latents of make_vae (size / down px, 4 channels)."""
    from diffusers import DiTTransformer2DModel
    size = info.size // down
    if info.size % down or size % patch:
        raise C.UserError(f"a latent DiT with patch {patch} cannot take the {info.size / down:g} "
                          f"px latents of {info.size} px images; choose --dit-patch dividing "
                          f"{size} (the size must be a multiple of {down})")
    if width % head_dim:
        raise C.UserError(f"--dit-width {width} must be a multiple of the head size {head_dim}")
    return DiTTransformer2DModel(
        num_attention_heads=width // head_dim, attention_head_dim=head_dim,
        in_channels=latent_channels, out_channels=latent_channels, num_layers=depth,
        sample_size=size, patch_size=patch, num_embeds_ada_norm=info.num_classes,
        norm_num_groups=1)


def make_vae(info: C.DatasetInfo, blocks=(16, 32, 32), latent_channels=4):
    """The papers' AutoencoderKL in miniature: image channels -> 4 latent channels, one
    downsampling per block but the last (28 px -> 4x7x7 with three blocks), one layer each."""
    from diffusers import AutoencoderKL
    n = len(blocks)
    return AutoencoderKL(in_channels=info.channels, out_channels=info.channels,
                         latent_channels=latent_channels, block_out_channels=tuple(blocks),
                         down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1,
                         norm_num_groups=min(32, min(blocks)), sample_size=info.size)


def make_train_scheduler():
    """Cosine schedule + v-prediction: the recipe that gave good digits from a brief training."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="v_prediction", clip_sample=True,
                         timestep_spacing="linspace")


class Prior:
    """A class-conditional DiT with its noise schedule, and a VAE for latent models.

    Pixel models see images mapped to [-1, 1]; latent models see scaled VAE latents.
    `class_map` turns dataset classes into the DiT's labels; the null (CFG) label is the DiT's
    `num_embeds_ada_norm`, the last row of its label table (never a literal 1000).
    """

    def __init__(self, transformer, scheduler_config: dict, info: C.DatasetInfo, vae=None):
        # frozen: guidance differentiates through the DiT and the VAE for the input's gradient
        # only; without this every guided step would also keep activations for weight gradients
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.info = info
        self.scheduler_config = dict(scheduler_config)
        self.num_labels = transformer.config.num_embeds_ada_norm
        self.learned_sigma = transformer.config.out_channels == 2 * transformer.config.in_channels
        self.class_map = info.class_map if self.num_labels != info.num_classes else None
        if self.class_map is None and self.num_labels != info.num_classes:
            raise C.UserError(f"the DiT knows {self.num_labels} classes but dataset {info.name} "
                              f"has {info.num_classes} and no class map to the DiT's labels; use "
                              f"a DiT trained on this dataset (01 without --dit), or name the "
                              f"class folders by their ImageNet-1K WordNet ids (n01440764, ...)")
        if self.class_map is not None and max(self.class_map) >= self.num_labels:
            raise C.UserError(f"class map of {info.name} needs labels up to "
                              f"{max(self.class_map)} but the DiT knows {self.num_labels}; use "
                              f"an ImageNet-1K DiT such as facebook/DiT-XL-2-256")
        c, s = transformer.config.in_channels, transformer.config.sample_size
        self.latent_shape = (c, s, s)
        out_c = vae.config.out_channels if vae is not None else c
        if out_c != info.channels:
            raise C.UserError(f"the DiT makes {out_c}-channel images but {info.name} has "
                              f"{info.channels}")
        if vae is None and s != info.size:
            raise C.UserError(f"the DiT makes {s} px images but {info.name} has {info.size} px")

    @property
    def device(self):
        return self.transformer.device

    def to(self, device):
        self.transformer.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self

    def set_checkpointing(self, on: bool):
        """Gradient checkpointing of the DiT and the VAE in the guided steps: each block's input
        kept, the block recomputed in the backward pass (~1.3x compute, a fraction of the
        memory). diffusers checkpoints whenever grad is on: guided steps only (plain: no_grad)."""
        for model in (self.transformer, self.vae):
            if model is not None and getattr(model, "_supports_gradient_checkpointing", False):
                model.enable_gradient_checkpointing() if on else \
                    model.disable_gradient_checkpointing()

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        """Dataset labels -> DiT labels."""
        return torch.tensor(self.class_map, device=y.device)[y] if self.class_map else y

    def scheduler(self, steps: int):
        """A fresh DDPM ancestral sampler over `steps` evenly respaced steps, stepping on eps."""
        from diffusers import DDPMScheduler
        cfg = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        cfg.update(prediction_type="epsilon", timestep_spacing="linspace",
                   variance_type="learned_range" if self.learned_sigma else "fixed_small",
                   clip_sample=self.vae is None)  # clip x0 to [-1, 1] only in pixel space
        s = DDPMScheduler.from_config(cfg)
        s.set_timesteps(steps)
        return s

    def eps(self, x, t, y_dit, cfg: float, sched):
        """CFG-combined eps (B, C, H, W) and the model's variance channels (or None)."""
        B, C_ = x.shape[0], x.shape[1]
        both = cfg != 1.0  # CFG 1 is the conditional prediction alone: no null-label rows
        null = torch.full_like(y_dit, self.num_labels)
        xx = torch.cat([x, x]) if both else x  # (2B, C, H, W): conditional rows, then null rows
        tt = torch.full((len(xx),), int(t), device=x.device, dtype=torch.long)
        # fp32 from here on: under bf16 autocast the CFG difference and x0 = (...) / sqrt(abar)
        # (up to ~70x at the start of the window) would amplify bf16's rounding
        out = self.transformer(xx, tt, torch.cat([y_dit, null]) if both else y_dit
                               ).sample.float()  # (2B or B, C|2C, H, W)
        out, var = out[:, :C_], (out[:, C_:2 * C_][:B] if self.learned_sigma else None)
        if self.scheduler_config.get("prediction_type") == "v_prediction":
            a = sched.alphas_cumprod[int(t)].to(x.device)
            out = a.sqrt() * out + (1 - a).sqrt() * xx.float()  # eps = sqrt(abar) v + ...x_t
        if not both:
            return out, var
        cond, uncond = out[:B], out[B:]
        return uncond + cfg * (cond - uncond), var

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [0, 1] at the dataset's size."""
        if self.vae is None:
            return ((z + 1) / 2).clamp(0, 1)
        img = self.vae.decode(z / self.vae.config.scaling_factor).sample
        img = ((img + 1) / 2).clamp(0, 1)
        if img.shape[-1] != self.info.size:
            img = F.interpolate(img, size=(self.info.size, self.info.size), mode="bilinear",
                                antialias=True)
        return img

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> model space (pixel: [-1, 1]; latent: scaled VAE mean)."""
        if self.vae is None:
            return img * 2 - 1
        return self.vae.encode(img * 2 - 1).latent_dist.mean * self.vae.config.scaling_factor

    def save(self, folder: Path):
        """The diffusers layout: transformer/ (+ vae/) and scheduler/ sub-folders."""
        from diffusers import DDPMScheduler
        folder = Path(folder)
        self.transformer.save_pretrained(folder / "transformer")
        if self.vae is not None:
            self.vae.save_pretrained(folder / "vae")
        DDPMScheduler.from_config(self.scheduler_config).save_pretrained(folder / "scheduler")


def load_prior(source: str | Path, info: C.DatasetInfo, device) -> Prior:
    """A DiT from a local diffusers folder (ours, or a saved DiTPipeline) or a hub name."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
    local = Path(source)
    is_hub_name = not str(source).startswith((".", "/")) and len(str(source).split("/")) == 2
    if not local.exists() and not is_hub_name:
        raise C.UserError(f"DiT folder {source} does not exist; give a diffusers folder or a hub "
                          f"name like facebook/DiT-XL-2-256")
    # low_cpu_mem_usage=False: the default wants `accelerate`, which these loads do not need
    kw = dict(low_cpu_mem_usage=False)
    try:
        tr = DiTTransformer2DModel.from_pretrained(source, subfolder="transformer", **kw)
        has_vae = not local.exists() or (local / "vae").exists()
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kw) if has_vae else None
        sched_cfg = DDPMScheduler.load_config(source, subfolder="scheduler")
    except (OSError, ValueError) as e:
        raise C.UserError(f"cannot load a DiT from {source} ({str(e).splitlines()[0][:160]}); "
                          f"download the pipeline (transformer/, vae/, scheduler/) and pass its "
                          f"folder") from None
    return Prior(tr, sched_cfg, info, vae).to(device)


def load_run_prior(run: Path, info: C.DatasetInfo, device) -> Prior:
    """The prior of a run folder: the DiT 01 trained, or the pretrained pipeline it recorded."""
    folder = C.finished("dit", "DiT", run)
    src = folder / "source.json"
    return load_prior(C.read_json(src)["dit"] if src.exists() else folder, info, device)


# ==========================================================================================
# 2. Guidance terms (what to raise) and the deviation memory (what to move away from)
# ==========================================================================================


@dataclass
class Term:
    """One weighted per-sample score of the decoded image; the sampler raises the weighted sum."""
    name: str
    weight: float
    fn: Callable  # (img (B, C, H, W) in [0, 1], y (B,)) -> (B,)


def ce_score(model) -> Callable:
    """Per-sample cross-entropy of `model` on (img, y)."""
    return lambda img, y: F.cross_entropy(model(img).float(), y, reduction="none")


def nonsat_score(model) -> Callable:
    """The non-saturating adversarial score log(1 - p_y), raised (§4): it pushes hardest where D
    is confidently right, where raising CE = -log p_y stalls (its gradient vanishes)."""
    def fn(img, y):
        z = model(img).float()  # (B, classes)
        others = z.scatter(1, y[:, None], float("-inf"))
        return torch.logsumexp(others, 1) - torch.logsumexp(z, 1)  # log(1 - p_y)
    return fn


def learnability_terms(current, reference, omega: float, current_weight: float = 1.0) -> list:
    """LGD (§3): S = CE(f_cur) - omega CE(f_ref): hard for the current model, valid for f_ref.
    current_weight 0 drops the learnability term: S = -omega CE(f_ref), teacher guidance alone."""
    terms = [Term("ce_current", current_weight, ce_score(current))] if current_weight else []
    return terms + [Term("ce_reference", -omega, ce_score(reference))]


def adversarial_terms(disc, reference, omega_v: float, form: str = "ce") -> list:
    """ACS (§4, reconstructed): CE(D_k) (or log(1 - p_y)) raised, omega_v CE(f_ref) lowered."""
    adv = Term("ce_disc", 1.0, ce_score(disc)) if form == "ce" else \
        Term("nonsat_disc", 1.0, nonsat_score(disc))
    return [adv] + ([Term("ce_reference", -omega_v, ce_score(reference))] if omega_v else [])


# IGD (§5): an image is influential when the parameter gradient it would give a surrogate
# points the way the real data's gradient points, at several checkpoints of a real training run
# (TracIn). Gradients are flat vectors over model.named_parameters(), in that order.

REAL_GRAD_IMAGES, REAL_GRAD_CHUNK = 200, 50  # first 200 images of a class, 50 at a time (IGD)


def _functional(model):
    """(params, buffers, loss): the model as a pure function of a detached parameter dict, so
    the model itself stays frozen and never collects a .grad."""
    from torch.func import functional_call
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss(p, x, y, reduction="mean"):  # CE of the model with parameters p on (x, y)
        logits = functional_call(model, (p, buffers), (x,))
        return F.cross_entropy(logits.float(), y, reduction=reduction)
    return params, buffers, loss


def per_sample_grads(model, img: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_theta CE(f_theta(img_b), y_b) of every sample as one flat row, (B, P), in one vmap
    pass; the rows stay differentiable in img (IGD's double backpropagation)."""
    from torch.func import grad, vmap
    params, _, loss = _functional(model)

    def one(p, x, t):  # x (C, H, W), t (): the gradient dict of one sample
        return grad(loss)(p, x[None], t[None])
    g = vmap(one, in_dims=(None, 0, 0))(params, img, y)  # name -> (B, *shape)
    return torch.cat([v.flatten(1) for v in g.values()], 1)


def grad_cosine(model, img: torch.Tensor, y: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """cos(per-sample parameter gradient, real gradient (classes, P) of its class), (B,)."""
    g = per_sample_grads(model, img, y)  # (B, P)
    return F.cosine_similarity(g, real.to(g)[y], dim=1)


def real_gradients(model, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                   per_class: int = REAL_GRAD_IMAGES, chunk: int = REAL_GRAD_CHUNK):
    """g_real(c) = grad_theta of the mean CE on the first `per_class` images of class c, (K, P);
    chunks only bound the memory (summed CEs / count). The surrogate is in eval mode, as in IGD."""
    from torch.func import grad
    params, _, loss = _functional(model.eval())
    rows = []
    for c in range(num_classes):
        idx = (y == c).nonzero().squeeze(1)[:per_class]
        if len(idx) == 0:
            raise C.UserError(f"class {c} has no training images, so it has no real gradient; "
                              f"every class needs training images for IGD")
        total = None
        for i in range(0, len(idx), chunk):
            xb = x[idx[i:i + chunk]]
            xb = C.to_float(xb) if xb.dtype == torch.uint8 else xb.float()
            g = grad(loss)(params, xb, y[idx[i:i + chunk]], "sum")  # name -> summed gradient
            flat = torch.cat([v.flatten() for v in g.values()])  # (P,)
            total = flat if total is None else total + flat
        rows.append(total / len(idx))
    return torch.stack(rows)  # (K, P)


def influence_terms(checkpoints: list, real_grads: torch.Tensor, names=None) -> list:
    """IGD (§5.2): G = -mean_e (1 - cos(grad CE(f_e(img), y), g_real(e, y))), raised: one Term
    per checkpoint (weight 1/|E|, fn = cos_e - 1); real_grads (|E|, classes, P). In fp32 even
    under autocast: a bf16 double backward would blur the small cosines."""
    if len(checkpoints) != len(real_grads):
        raise ValueError(f"{len(checkpoints)} checkpoints but {len(real_grads)} real gradients")
    names = names or [f"cos_{e}" for e in range(len(checkpoints))]
    for m in checkpoints:
        m.eval().requires_grad_(False)  # frozen: only the image is differentiated

    def score(model, real):
        def fn(img, y):
            with torch.autocast(img.device.type, enabled=False):
                return grad_cosine(model, img.float(), y, real) - 1
        return fn
    w = 1.0 / len(checkpoints)
    return [Term(n, w, score(m, r)) for n, m, r in zip(names, checkpoints, real_grads)]


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
        """cos(x_b, m*_b) per sample (B,), m* the most similar latent of class y_b; 0 if none."""
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
    """What the sampler needs to guide: the terms and their scale, the window, the deviation."""
    terms: list = field(default_factory=list)
    scale: float = 0.0  # lambda
    c0: float = 0.0015  # IGD's normalisation constant at paper scale
    window: tuple = (10, 45)  # [t_lo, t_hi] on the 50-step scale, rescaled to the step count
    deviation: float = 0.0  # gamma
    memory: Memory | None = None
    eps_const: bool = False  # hold eps constant: no backward pass through the DiT

    def active(self, i: int, steps: int) -> bool:
        """Is step i (counting up from 0, t = steps - 1 - i) inside the window?"""
        t = steps - 1 - i
        lo, hi = (round(w * steps / 50) for w in self.window)
        return lo <= t <= hi


def _rms(v: torch.Tensor) -> torch.Tensor:
    """Root mean square per sample, (B, 1, 1, 1)."""
    return v.float().pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()


# ==========================================================================================
# 3. One guided step
# ==========================================================================================


def guided_step(prior: Prior, x, t, y_dit, y, cfg: float, sched, gens: list,
                guide: Guidance | None, ctx=nullcontext()) -> torch.Tensor:
    """x_t (B, C, H, W) -> x_{t-1}; guide None (outside the window) is a plain step.
    gens[b] draws row b's ancestral noise."""
    guided = guide is not None
    with torch.enable_grad() if guided else torch.no_grad():
        xg = x.detach().requires_grad_(guided)
        # the DiT runs with a graph only when a term's gradient goes back through eps
        eps_grad = guided and bool(guide.terms) and not guide.eps_const
        with C.prior_ctx(ctx), nullcontext() if eps_grad else torch.no_grad():
            eps, var = prior.eps(xg, t, y_dit, cfg, sched)  # (B, C, H, W), var or None
        out = eps.detach() if var is None else torch.cat([eps.detach(), var.detach()], 1)
        x_prev = sched.step(out.float(), t, x, generator=gens).prev_sample  # (B, C, H, W)
        if not guided:
            return x_prev
        delta = torch.zeros_like(xg)  # the guidance displacement of x_{t-1}
        if guide.terms:
            a = sched.alphas_cumprod[int(t)].to(x.device)  # abar_t, a scalar
            x0 = (xg - (1 - a).sqrt() * eps) / a.sqrt()  # (B, C, H, W) predicted clean sample
            with C.prior_ctx(ctx):
                img = prior.decode(x0)  # (B, C', H', W') in [0, 1]
            with ctx:
                G = objective(guide.terms, img, y)  # (B,)
            g, = torch.autograd.grad(G.sum(), xg)  # samples are independent: row b = dG_b/dx_b
            rho = guide.c0 * _rms(eps.detach()) / (_rms(g) + 1e-12) * (1 - a).sqrt()  # (B,1,1,1)
            delta = delta + guide.scale * rho * g
        if guide.deviation and guide.memory is not None and len(guide.memory):
            cos = guide.memory.nearest_cos(xg, y)  # (B,) cosine to the nearest memory latent
            grad_cos, = torch.autograd.grad(cos.sum(), xg)
            delta = delta - guide.deviation * grad_cos
        return x_prev + delta.detach()


# ==========================================================================================
# 4. The sampler: slots in batches, kappa candidates per slot, the memory updated per batch
# ==========================================================================================


def slot_seed(*keys: int) -> int:
    """A noise seed from integer keys (e.g. stage seed, class, index): independent streams."""
    return int(np.random.SeedSequence([k % 2 ** 32 for k in keys]).generate_state(1)[0])


def batches(y: torch.Tensor, size: int) -> list:
    """Consecutive runs of slot indices, each of at most `size` slots and no class twice, so a
    slot's batch-mates never include an earlier image of its own class."""
    out, seen = [[]], set()
    for i, c in enumerate(y.tolist()):
        if len(out[-1]) == size or c in seen:
            out.append([])
            seen = set()
        out[-1].append(i)
        seen.add(c)
    return [b for b in out if b]


def sample(prior: Prior, y: torch.Tensor, seeds: list, *, steps=50, cfg=4.0,
           guidance: Guidance | None = None, candidates=1, score=None, batch_size=256,
           slot_batches: list | None = None, ctx=nullcontext(), progress=True, desc="sample"):
    """One image per slot (label y[i], noise seed seeds[i]): (images (N, C, H, W) in [0, 1],
    final latents, scores), in the order of y.

    guidance None is plain CFG sampling. With candidates = kappa > 1 each slot gets kappa
    candidates in one batch (candidate j's noise from slot_seed(seeds[i], j)) and keeps the one
    whose image has the highest `score(img, y)` (LGD's selection, §3). After each batch the kept
    latents join the deviation memory: give y slot-major (one image of every class, then the
    next), as IGD updates it. slot_batches (index lists into y) fixes the batches.
    """
    if len(seeds) != len(y):
        raise ValueError(f"{len(y)} labels but {len(seeds)} noise seeds")
    imgs, zs, scores = [None] * len(y), [None] * len(y), [None] * len(y)
    if slot_batches is None:
        slot_batches = batches(y, max(1, batch_size // candidates))
    for slots in tqdm(slot_batches, desc=desc, unit="batch", disable=not progress, leave=False):
        y_slots = y[slots]  # (n,) distinct classes
        yk = y_slots.repeat_interleave(candidates)  # (n * kappa,): a slot's candidates together
        y_dit = prior.labels(yk)
        # one CPU generator per candidate: the same noise on any device and in any batch
        gens = [torch.Generator().manual_seed(slot_seed(seeds[i], j)) for i in slots
                for j in range(candidates)]
        sched = prior.scheduler(steps)
        x = torch.stack([torch.randn(prior.latent_shape, generator=g) for g in gens])
        x = x.to(prior.device)  # (n * kappa, C, H, W)
        for i, t in enumerate(sched.timesteps):
            guide = guidance if guidance is not None and guidance.active(i, steps) else None
            x = guided_step(prior, x, t, y_dit, yk, cfg, sched, gens, guide, ctx).detach()
        with torch.no_grad():
            with C.prior_ctx(ctx):
                img = prior.decode(x).float()  # (n * kappa, C, H, W)
            with ctx:
                sc = score(img, yk).float() if score is not None else \
                    torch.zeros(len(yk), device=img.device)
        # keep the best candidate of each slot: index of its row in the batch
        best = sc.view(len(slots), candidates).argmax(1) + \
            torch.arange(len(slots), device=img.device) * candidates
        if guidance is not None and guidance.memory is not None:
            guidance.memory.add(x[best], y_slots)
        for row, i in zip(best.tolist(), slots):
            imgs[i], zs[i], scores[i] = img[row], x[row], sc[row]
    return torch.stack(imgs), torch.stack(zs), torch.stack(scores)
