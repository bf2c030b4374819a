"""Shared fixtures: the repository on sys.path, tiny data sets and a tiny run of 01 made once per
session; scripts run as a user would by forkrun.python."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

# torch.compile (--compile) compiles its C++ in a thread pool; a script forked from a process whose
# pool has run (forkrun) waits forever on threads that a fork does not copy. One compile thread
# compiles in the calling thread instead; set before torch is imported, inherited by notebooks'
# kernels
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from forkrun import python  # noqa: E402,F401

# tiny settings for 01: a 1-epoch teacher and a 20-step DiT are enough to test the contracts
TINY_01 = ["--prior", "pixel", "--model", "convnet-1-bn", "--epochs", "1", "--dit-steps", "20",
           "--dit-width", "64", "--dit-depth", "1", "--dit-ckpt-every", "10",
           "--samples-per-class", "2", "--sample-steps", "4"]


def pytest_collection_modifyitems(config, items):
    """In a one-process run overview.ipynb goes first: it builds the shared ci run the other
    notebooks read (01, every set, 03). Under `make test` (pytest-xdist, --dist loadfile) the
    scheduler orders whole files by their number of tests, largest first, whatever the order
    here; there the first notebook to need the run builds it (nb.py's lock) while the others
    wait."""
    items.sort(key=lambda i: not i.nodeid.startswith("notebooks/overview.ipynb"))  # stable


def load_script(name, script):
    """A numbered script imported as module `name`, for unit tests of what it alone defines."""
    spec = importlib.util.spec_from_file_location(name, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(script, *args, check=True):
    """Run one of the numbered scripts as a user would; returns the CompletedProcess."""
    p = python(ROOT / script, *args)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stdout[-2000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


def kill_when(script, args, path, timeout=300):
    """Start a numbered script, SIGKILL it as soon as `path` appears: an interruption mid-run."""
    import time
    p = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    t0 = time.time()
    while not path.exists():
        assert p.poll() is None, f"{script} ended before writing {path.name}"
        assert time.time() - t0 < timeout
        time.sleep(0.02)
    p.kill()
    p.wait()


def assert_user_error(p, *fragments):
    """A bad input ends with exit code 2 and one `error:` line naming the fix, no traceback."""
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert "error: " in last, last  # ours start with it; argparse's read "<prog>: error: ..."
    for f in fragments:
        assert f in last, (f, last)


def make_image_tree(root: Path, classes, n_train, n_val, size=16, mode="RGB", seed=0):
    """A train/ + val/ ImageFolder tree of random PNGs; classes differ in mean brightness."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                shape = (size, size) if mode == "L" else (size, size, 3)
                a = np.clip(rng.normal(40 + 60 * i, 20, shape), 0, 255).astype(np.uint8)
                Image.fromarray(a, mode).save(d / f"{k:03d}.png")
    return root


def write_set(folder: Path, split: common.Split, info: common.DatasetInfo, method: str,
              stage_ipcs: list, seed=0, repeat_first=False):
    """A 02-layout folder of real images: stage_XX/<class>/<index:06d>.png + manifest.json,
    config.json.

    Images are drawn class-balanced without replacement; repeat_first=True copies stage 1 into
    every stage.
    """
    folder = Path(folder)
    g = torch.Generator().manual_seed(seed)
    perms = [(split.y == c).nonzero().squeeze(1)[torch.randperm(int((split.y == c).sum()),
                                                                 generator=g)]
             for c in range(info.num_classes)]
    start, index = 0, 0
    for k, ipc in enumerate(stage_ipcs):
        d = folder / f"stage_{k + 1:02d}"
        lo = 0 if repeat_first else start
        for c, p in enumerate(perms):
            for i in p[lo:lo + ipc].tolist():
                common.save_png(common.to_float(split.x[i]),
                                d / info.classes[c] / f"{index:06d}.png")
                index += 1
        start += ipc
        common.write_json(d / "manifest.json", {"stage": k + 1, "ipc": ipc})
    common.write_json(folder / "config.json", {"args": {"method": method, "ipc": sum(stage_ipcs),
                                                        "stages": len(stage_ipcs), "seed": seed,
                                                        "run": str(folder.parent.parent)}})
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder of 01 on the embedded digits at tiny settings."""
    run = tmp_path_factory.mktemp("runs") / "mnist5k"
    p = run_script("01_train_teacher.py", "--run", run, *TINY_01)
    return run, p
