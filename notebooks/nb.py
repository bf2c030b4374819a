"""What every notebook shares: the settings of its scale, the run it reads, and small helpers.

Two scales, chosen by the environment variable DD_NB_SCALE:
  small (default)  the embedded-default run of `make demo` (runs/mnist5k, IPC 10 and 50 sets,
                   03's results); ablations a notebook needs beyond it are made once under
                   <run>/ablations/.
  ci               a tiny run built here on first use (runs/nb-ci: 1-epoch teacher, a 200-step
                   DiT, IPC 5 sets from 10-step sampling); `make test` executes every notebook at
                   this scale with nbval, so each figure is computed from scratch, only smaller
                   (IPC 5 as 5 stages of 1).
DD_RUN overrides the run folder of either scale. Nothing here is specific to one notebook.
"""
import fcntl
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
import torch  # noqa: E402

SCALE = os.environ.get("DD_NB_SCALE", "small")
if SCALE not in ("small", "ci"):
    raise ValueError(f"DD_NB_SCALE must be 'small' or 'ci', got {SCALE!r}")


def _make_variable(name: str) -> list:
    """The words of a `NAME ?= ...` line of the Makefile: the demo's settings have one home."""
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.split("?=")[0].strip() == name:
            return line.split("?=", 1)[1].split()
    raise KeyError(f"{name} is not set in the Makefile")


MAKE_EVAL_ARGS = _make_variable("EVAL_ARGS")  # how `make demo` runs 03
# every number a notebook uses that depends on the scale; a notebook prints S in its first cell
SETTINGS = {
    "small": {"run": ROOT / "runs/mnist5k", "ipc": 50, "ipc_low": 10, "stages": 5, "epochs": 40,
              "epochs_low": 80, "seeds": 3, "ablation_ipc": 10, "acs_lams": [0, 15],
              "toy_steps": 200, "convergence_factors": [1, 2, 4, 8], "eval_args": MAKE_EVAL_ARGS},
    "ci": {"run": ROOT / "runs/nb-ci", "ipc": 5, "ipc_low": 5, "stages": 5, "epochs": 8,
           "epochs_low": 8, "seeds": 2, "ablation_ipc": 5, "acs_lams": [0, 15], "toy_steps": 60,
           "convergence_factors": [1, 2],
           "eval_args": ["--epochs", "8", "--full-epochs", "1", "--seeds", "2", *MAKE_EVAL_ARGS]},
}
S = dict(SETTINGS[SCALE], scale=SCALE)
if SCALE == "ci":  # script() runs the numbered scripts as the tests do (tests/forkrun.py)
    sys.path.insert(0, str(ROOT / "tests"))
    from forkrun import python as fork_python  # noqa: E402
if os.environ.get("DD_RUN"):
    S["run"] = Path(os.environ["DD_RUN"])
RUN = S["run"]

# tiny settings for the ci scale: 01 (teacher with BatchNorm for DELT, a small DiT) and 02 per
# method
CI_01 = ["--vae-steps", "50", "--vae-batch", "64", "--model", "convnet-3-bn", "--epochs", "1",
         "--dit-steps", "200", "--dit-width", "64", "--dit-depth", "2", "--dit-ckpt-every", "100",
         "--samples-per-class", "2", "--sample-steps", "10"]
CI_02 = {"random": [], "dit": ["--sample-steps", "10"],
         "lgd": ["--sample-steps", "10", "--guide-epochs", "10"],
         "acs": ["--sample-steps", "10", "--guide-epochs", "10"],
         "delt": ["--iterations", "40", "--round-iterations", "10"]}


_building_depth = 0


def _one_builder(fn):
    """One notebook at a time makes outputs in the run: `make test` executes notebooks side by side
    (pytest-xdist), they share one ci run, and each script allows one writer per folder. A second
    notebook waits here until the first has made (or found) what it needs, then finds it made."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _building_depth
        if _building_depth:  # re-entered (distilled -> ensure_run): this process holds the lock
            return fn(*args, **kwargs)
        RUN.parent.mkdir(parents=True, exist_ok=True)
        with open(RUN.parent / f".{RUN.name}.notebooks.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            _building_depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                _building_depth -= 1
    return wrapper


def script(name: str, *args, quiet=False) -> str:
    """Run one of the numbered scripts as a user would; its stdout, or an error with its last
    lines."""
    t0 = time.time()
    if SCALE == "ci":  # under `make test`: in a fork of this kernel, whose imports are done
        p = fork_python(ROOT / name, *args, timeout=3600)
    else:
        p = subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], cwd=ROOT,
                           capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{name} {' '.join(map(str, args))} failed:\n{p.stderr[-1500:]}")
    if not quiet:
        print(f"{name} {' '.join(map(str, args[2:] if args[:1] == ('--run',) else args))} "
              f"({time.time() - t0:.0f} s)")
    return p.stdout


def plan(method: str, ipc: int, *flags) -> dict:
    """02's plan for a set as `02_distill_stages.py --dry-run` prints it (scale, settings, images
    per stage; DELT's join iteration of every rank), without making anything."""
    ensure_run()
    out = script("02_distill_stages.py", "--run", RUN, "--method", method, "--ipc", ipc, *flags,
                 "--dry-run", quiet=True)
    return json.loads(out.strip().splitlines()[-1])


def _finished(folder: Path) -> bool:
    """A 02 folder is finished when every stage it announces has its manifest."""
    cfg = folder / "config.json"
    if not cfg.exists():
        return False
    k = len(C.read_json(cfg)["derived"]["images_per_stage"])
    return all((folder / f"stage_{i + 1:02d}" / "manifest.json").exists() for i in range(k))


@_one_builder
def distilled(method: str, ipc: int | None = None, name: str | None = None) -> Path:
    """The folder of a main set of `make demo` (made here at the ci scale)."""
    ipc = ipc or S["ipc"]
    folder = RUN / "distilled" / (name or f"{method}-ipc{ipc}")
    if SCALE == "ci":
        ensure_run()
        if not _finished(folder):
            script("02_distill_stages.py", "--run", RUN, "--method", method, "--ipc", ipc,
                   *CI_02[method])
    elif not _finished(folder):
        raise FileNotFoundError(f"{folder} is missing or unfinished: run `make demo` first "
                                "(or set DD_RUN)")
    return folder


@_one_builder
def ablation(name: str, method: str, ipc: int, *flags) -> Path:
    """A variant of a method (e.g. omega = 0) in <run>/ablations/<name>; made on first use, then
    reused."""
    folder = RUN / "ablations" / name
    if not _finished(folder):
        ensure_run()
        extra = list(CI_02[method]) if SCALE == "ci" else []
        # no join rounds on the constant schedule
        if "constant" in flags and "--round-iterations" in extra:
            i = extra.index("--round-iterations")
            del extra[i:i + 2]
        script("02_distill_stages.py", "--run", RUN, "--method", method, "--ipc", ipc,
               "--out", folder, *extra, *flags)
    return folder


@_one_builder
def ensure_run():
    """The run of 01: built here at the ci scale, required (from `make demo`) at the small scale."""
    if (RUN / "teacher" / "metrics.json").exists() and (RUN / "dit" / "metrics.json").exists():
        return
    if SCALE != "ci":
        raise FileNotFoundError(f"{RUN} has no finished 01 outputs: run `make demo` first "
                                "(or set DD_RUN)")
    script("01_train_teacher.py", "--run", RUN, *CI_01)


@_one_builder
def evaluation() -> dict:
    """results.json of 03 over the run's main sets (`make demo`'s <run>/eval/default); at the ci
    scale the sets and the evaluation are made here first, with tiny students."""
    out = RUN / "eval" / "default" / "results.json"
    if SCALE == "ci" and not out.exists():
        for ipc in sorted({S["ipc_low"], S["ipc"]}):
            for m in ("random", "dit", "lgd", "acs", "delt"):
                distilled(m, ipc)
        script("03_evaluate.py", "--run", RUN, *S["eval_args"])
    if not out.exists():
        raise FileNotFoundError(f"{out} is missing: run `make demo` first (or set DD_RUN)")
    return json.loads(out.read_text())


@_one_builder
def convergence(ipc: int, factor: int, methods=("dit", "lgd")) -> dict:
    """results.json of 03 on the main sets of `methods` at `ipc` and the random baseline, with
    students trained `factor` times the scale's epochs (<run>/eval/convergence-ipc<ipc>-x<factor>);
    made on first use, then reused. 03's student cache makes factor 1 the students of the main
    evaluation."""
    epochs = factor * (S["epochs_low"] if ipc == S["ipc_low"] else S["epochs"])
    name = f"convergence-ipc{ipc}-x{factor}"
    out = RUN / "eval" / name / "results.json"
    if not out.exists():
        sets = [distilled(m, ipc) for m in methods]
        script("03_evaluate.py", "--run", RUN, "--name", name, "--epochs", epochs,
               "--seeds", S["seeds"], "--baselines", "random", "--soft-methods", "none",
               "--analyses", "none", *sets)
    return json.loads(out.read_text())


def data(device="cpu"):
    """DatasetInfo, train and test splits of the run's dataset, and its teacher (eval mode)."""
    ensure_run()
    info = C.read_run_info(RUN)
    _, train, test = C.load_dataset(info.name, Path(info.root) if info.root else None, info.size)
    return info, train, test, C.load_run_teacher(RUN, info, device)


def stages(folder: Path, info) -> list:
    """The increments of a 02 folder as Splits, in stage order."""
    return C.read_stages(folder, info)


def manifests(folder: Path) -> list:
    """Every stage's manifest.json of a 02 folder (per-image scores, f_cur / D_k statistics)."""
    return [C.read_json(d / "manifest.json") for d in C.stage_dirs(folder)]


def grid(ax, x, nrow: int, title: str = ""):
    """Show uint8 or float images (N, C, H, W) as one grid on a matplotlib axis."""
    import torchvision
    g = torchvision.utils.make_grid(C.to_float(x) if x.dtype == torch.uint8 else x, nrow=nrow,
                                    padding=1, pad_value=1.0)
    ax.imshow(g.permute(1, 2, 0).cpu().numpy(), cmap="gray" if x.shape[1] == 1 else None)
    ax.set_axis_off()
    ax.set_title(title)
