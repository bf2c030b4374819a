"""Evaluate distilled sets under one fixed protocol, beside random and full-data baselines trained the same way.

Reads:  <run>/dataset.json and <run>/teacher/ (01_train_teacher.py): dataset, teacher (soft labels, features);
        distilled folders <run>/distilled/<method>-ipc<N>/ (02_distill_stages.py): config.json (method, ipc)
        and stage_01/ .. stage_K/, each <class>/<index:06d>.png + manifest.json. No folder given = all of them.
Writes: <run>/eval/<name>/
          config.json      arguments, derived values (epoch rule, seeds, protocols), versions (written first)
          results.json     every number with its protocol, epochs, seeds and versions (written last)
          results.csv      one row per (set, student, protocol, training set size): accuracies, mean, std
          results.md       tables per IPC (full data, random, methods; HLR/IOR/LRS), accuracy vs accumulated
                           IPC, redundancy matrices, diversity
          acc_vs_ipc.png, redundancy_<set>.png, diversity.png
        <run>/eval/cache/
          random_ipc<N>_seed<S>.json   the random real subsets (class-balanced, disjoint across draws)
          students/<key>.json          one trained student's accuracies, keyed by data hash, student,
                                       protocol, epochs and seed: reruns skip finished work
Accuracy is the final-epoch top-1 on the real test split, mean +- std over student seeds; nothing is
selected on the test split (no best epoch, no learning-rate search).

Examples:
  python 03_evaluate.py --run runs/mnist5k                      # CPU, every set of the embedded run
  python 03_evaluate.py runs/imagenette/distilled/lgd-ipc50 --run runs/imagenette --epochs paper \
      --students convnet-6,resnetap10,resnet18 --protocols hard,soft --seeds 5   # GPU, paper scale
"""
import argparse
import csv
import hashlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import common

PROTOCOLS = ["hard", "soft"]
ANALYSES = ["stages", "redundancy", "diversity"]
BASELINES = ["random", "full"]
# epochs by IPC, (upper IPC bound, epochs); beyond the last bound the last value holds
PAPER_EPOCHS = ((10, 2000), (50, 1500), (200, 1000))  # METHODS.md 6 (IDC/Minimax/IGD/LGD hard-label tables)
# small scale (mnist5k on CPU): the paper rule / 25 at IPC 10, cut to 40 at IPC 50 so that one method at
# IPC 50 with 3 convnet-3 seeds takes < 5 min on 2 CPU cores (README: benchmark; 60 epochs measured 347 s)
SMALL_EPOCHS = ((10, 80), (50, 40), (200, 30))
# the methods whose stages are the papers' increments: per-stage accuracy and redundancy are computed for these
INCREMENT_METHODS = "dit,lgd,acs,igd"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p, run_help="run folder of 01 (dataset.json, teacher/); results go to <run>/eval/<name>")
    p.add_argument("sets", nargs="*", type=Path, help="distilled folders of 02 (default: all of <run>/distilled)")
    p.add_argument("--name", default="default", help="evaluation name: <run>/eval/<name>/")
    p.add_argument("--students", default="convnet-3", help=f"comma list of student models: {', '.join(common.MODELS)}")
    p.add_argument("--protocols", default="hard", help=f"comma list of {', '.join(PROTOCOLS)}")
    p.add_argument("--seeds", type=common.positive_int, default=3, help="student seeds --seed, --seed+1, ...; "
                   "random draw k goes with student seed k")
    p.add_argument("--epochs", default="auto", help="'paper' (2000/1500/1000 for IPC <=10/<=50/<=200), 'small' "
                   "(80/40/30), 'auto' (small on the embedded mnist5k, else paper) or a number")
    p.add_argument("--full-epochs", default="teacher", help="epochs on the full training set: 'teacher' (those "
                   "of 01's teacher, for the like-for-like check) or a number")
    p.add_argument("--soft-methods", default="delt", help="methods whose own protocol is soft (DD-Ranking IOR); "
                   "the others' is hard")
    g = p.add_argument_group("protocol (METHODS.md 6)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--wd", type=float, default=0.01)
    g.add_argument("--batch-size", type=common.positive_int, default=64)
    g.add_argument("--cutmix-p", type=float, default=1.0, help="probability of CutMix per batch")
    g.add_argument("--cutmix-beta", type=float, default=1.0)
    g.add_argument("--crop-scale", type=float, default=0.5, help="random-resized-crop minimum area fraction")
    g.add_argument("--tau", type=float, default=20.0, help="soft-label temperature")
    g = p.add_argument_group("baselines and analyses")
    g.add_argument("--baselines", default="random,full", help=f"comma list of {', '.join(BASELINES)} or 'none'")
    g.add_argument("--baseline-ipcs", default="10,50", help="IPCs of the baselines when the run has no sets yet")
    g.add_argument("--analyses", default="stages,redundancy,diversity",
                   help=f"comma list of {', '.join(ANALYSES)} or 'none'")
    g.add_argument("--analysis-methods", default=INCREMENT_METHODS,
                   help="methods whose largest set gets per-stage accuracy and redundancy ('all' for every "
                   "method; random and delt stages are draws and join rounds, not increments)")
    g.add_argument("--analysis-seeds", type=common.positive_int, default=1,
                   help="student seeds for per-stage accuracy and redundancy (first student and protocol)")
    g.add_argument("--redundancy-ref", default="dit", help="method whose mean off-diagonal redundancy is the "
                   "reference of the relative reduction")
    return p.parse_args(argv)


def comma_list(s: str, allowed: list | None, flag: str) -> list:
    items = [] if s.strip() == "none" else [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if allowed is not None and x not in allowed]
    if bad:
        raise common.UserError(f"unknown {flag} value {bad[0]!r}; choose from {', '.join(allowed)}")
    return items


def epochs_for(ipc: int, rule: str) -> int:
    """Epochs for a training set of `ipc` images per class under rule 'paper', 'small' or a number."""
    if rule.isdigit():
        return int(rule)
    table = PAPER_EPOCHS if rule == "paper" else SMALL_EPOCHS
    return next((e for bound, e in table if ipc <= bound), table[-1][1])


def dd_ranking(full_hard: float, syn_hard: float, syn_own: float, rand_own: float) -> dict:
    """DD-Ranking (arXiv 2505.13300), accuracies as fractions: HLR, IOR and LRS = (e^a - e^-1)/(e - e^-1)."""
    hlr, ior = full_hard - syn_hard, syn_own - rand_own
    alpha = (ior - hlr) / 2
    return {"hlr": hlr, "ior": ior, "lrs": (math.exp(alpha) - math.exp(-1)) / (math.e - math.exp(-1))}


def split_hash(s: common.Split) -> str:
    h = hashlib.sha1(s.x.cpu().numpy().tobytes())
    h.update(s.y.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def per_class_ipc(s: common.Split, num_classes: int, where: Path) -> int:
    """The common number of images per class; unequal counts are an error naming the classes."""
    counts = torch.bincount(s.y, minlength=num_classes).tolist()
    if len(set(counts)) != 1:
        raise common.UserError(f"{where} holds unequal images per class ({counts}); every class needs the same IPC")
    return counts[0]


# --------------------------------------------------------------------------------------
# inputs: distilled sets and random draws
# --------------------------------------------------------------------------------------


def read_set(folder: Path, info: common.DatasetInfo) -> dict:
    """One 02 folder: name, method, IPC, own config, and its increments (Splits) in stage order."""
    stages = common.read_stages(folder, info)
    ipcs = [per_class_ipc(s, info.num_classes, d) for s, d in zip(stages, common.stage_dirs(folder))]
    cfg = common.read_json(folder / "config.json") if (folder / "config.json").exists() else {}
    a = cfg.get("args", cfg)
    method = a.get("method") or folder.name.split("-ipc")[0]
    if a.get("ipc") is not None and a["ipc"] != sum(ipcs):
        raise common.UserError(f"{folder}/config.json says IPC {a['ipc']} but its stages hold {sum(ipcs)} per class "
                          f"({'+'.join(map(str, ipcs))}); rerun 02 to finish or repair the folder")
    return {"name": folder.name, "folder": str(folder), "method": method, "ipc": sum(ipcs),
            "stage_ipcs": ipcs, "stages": stages}


def random_draws(train: common.Split, ipc: int, n: int, seed: int, cache: Path, refresh: bool) -> list:
    """n class-balanced random subsets (index tensors) of `ipc` per class, disjoint across draws.

    One permutation per class, seeded by `seed` alone; draw k takes its k-th block of `ipc`, so the
    first draws stay the same when more are asked for. Cached so reruns reuse exactly these images.
    """
    path = cache / f"random_ipc{ipc}_seed{seed}.json"
    th = split_hash(train)
    if path.exists() and not refresh:
        d = common.read_json(path)
        if d["train_hash"] == th and len(d["draws"]) >= n:
            return [torch.tensor(x) for x in d["draws"][:n]]
    per_class = common.class_permutations(train.y, int(train.y.max()) + 1, seed)
    for c, idx in enumerate(per_class):
        if len(idx) < n * ipc:
            raise common.UserError(f"class {c} has {len(idx)} training images, too few for {n} disjoint random "
                              f"draws of IPC {ipc}; lower --seeds")
    draws = [torch.cat([p[k * ipc:(k + 1) * ipc] for p in per_class]) for k in range(n)]
    common.write_json(path, {"ipc": ipc, "seed": seed, "train_hash": th, "draws": [d.tolist() for d in draws]})
    return draws


# --------------------------------------------------------------------------------------
# training students, cached per (data, student, protocol, epochs, seed)
# --------------------------------------------------------------------------------------


class Evaluator:
    """Trains students under the protocols and caches every result as JSON."""

    def __init__(self, args, info, test, teacher, protocols: dict, device, ctx, cache: Path):
        self.args, self.info, self.test, self.teacher = args, info, test, teacher
        self.protocols, self.device, self.ctx, self.cache = protocols, device, ctx, cache
        self.test_hash = split_hash(test)
        self.trained, self.reused, self.done = 0, 0, set()  # done: keys trained by this call (--overwrite)

    def student(self, train: common.Split, student: str, proto: str, epochs: int, seed: int,
                targets: dict | None = None, desc="") -> dict:
        """Final-epoch test accuracy (%) of one student, plus its accuracy on each split in `targets`."""
        targets = targets or {}
        job = {"train": split_hash(train), "student": student, "protocol": asdict(self.protocols[proto]),
               "epochs": epochs, "seed": seed, "test": self.test_hash,
               "targets": {k: split_hash(v) for k, v in sorted(targets.items())}}
        key = hashlib.sha1(json.dumps(job, sort_keys=True).encode()).hexdigest()[:20]
        path = self.cache / "students" / f"{key}.json"
        if path.exists() and (not self.args.overwrite or key in self.done):
            self.reused += 1
            return common.read_json(path)
        t0 = time.time()
        common.seed_everything(seed)  # weight initialisation
        model = common.build_model(student, self.info).to(self.device)
        common.fit(model, train.to(self.device), self.info, self.protocols[proto], epochs=epochs, seed=seed,
                   teacher=self.teacher if proto == "soft" else None, ctx=self.ctx, desc=desc)
        out = {**job, "acc": common.accuracy(model, self.test, self.ctx),
               "on": {k: common.accuracy(model, v.to(self.device), self.ctx) for k, v in targets.items()},
               "train_size": len(train.y), "wall_s": time.time() - t0}
        common.write_json(path, out)
        self.trained += 1
        self.done.add(key)
        tqdm.write(f"{desc}: {out['acc']:.2f} % ({out['wall_s']:.0f} s)")
        return out

    def row(self, kind, name, method, ipc, splits: list, student, proto, epochs, seeds) -> dict:
        """Mean +- std over seeds; splits[k] is the training set of seed k (random draws differ per seed)."""
        rs = [self.student(s, student, proto, epochs, seed, desc=f"{name} {student} {proto} seed {seed}")
              for s, seed in zip(splits, seeds)]
        accs = [r["acc"] for r in rs]
        return {"kind": kind, "set": name, "method": method, "ipc": ipc, "student": student, "protocol": proto,
                "epochs": epochs, "seeds": list(seeds), "accs": accs, "mean": float(np.mean(accs)),
                "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                "wall_s": sum(r["wall_s"] for r in rs)}


def redundancy(ev: Evaluator, stages: list, student, proto, rule, seeds, name) -> dict:
    """Cross-increment matrix M[a][b]: accuracy (%) of a student trained on increment a on increment b's images."""
    targets = {f"T{b + 1}": s for b, s in enumerate(stages)}
    K = len(stages)
    M = np.zeros((K, K))
    for a, s in enumerate(stages):
        ipc = len(s.y) // ev.info.num_classes
        for seed in seeds:
            r = ev.student(s, student, proto, epochs_for(ipc, rule), seed, targets,
                           desc=f"{name} redundancy T{a + 1} seed {seed}")
            M[a] += np.array([r["on"][f"T{b + 1}"] for b in range(K)]) / len(seeds)
    off = ~np.eye(K, dtype=bool)
    up, low = np.triu(off), np.tril(off)
    return {"matrix": M.tolist(), "diagonal": float(M.diagonal().mean()), "off_diagonal": float(M[off].mean()),
            "upper_train_earlier_test_later": float(M[up].mean()),
            "lower_train_later_test_earlier": float(M[low].mean()), "student": student, "protocol": proto,
            "seeds": list(seeds)}


# --------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------


def fmt(r: dict | None) -> str:
    return "–" if r is None else f"{r['mean']:.2f} ± {r['std']:.2f}"


def write_markdown(path: Path, res: dict, sets: list):
    rows, cols = res["rows"], [(s, p) for s in res["students"] for p in res["protocols_used"]]
    find = {(r["kind"], r["set"], r["student"], r["protocol"], r["ipc"]): r for r in rows}
    L = [f"# Evaluation `{res['name']}`: {res['dataset']}", "",
         f"Final-epoch test accuracy (%), mean ± std over student seeds {res['seeds']}; epochs by IPC: "
         f"rule `{res['epoch_rule']}` (see config.json); full data: {res['full_epochs']} epochs. "
         f"Nothing selected on the test split. DD-Ranking scores as fractions ({res['students'][0]}).", ""]
    for ipc in sorted({r["ipc"] for r in rows if r["kind"] in ("set", "random")}):
        L += [f"## IPC {ipc}", "", "| set | method | " + " | ".join(f"{s} {p}" for s, p in cols)
              + " | HLR | IOR | LRS | own |", "|---" * (len(cols) + 6) + "|"]
        lines = [("full", "full data", "full", None), ("random", f"random (IPC {ipc})", "random", ipc)]
        lines += [("set", s["name"], s["method"], ipc) for s in sets if s["ipc"] == ipc]
        for kind, name, method, i in lines:
            found = [find.get((kind, name if kind == "set" else kind, s, p, i if i else res["full_ipc"]))
                     for s, p in cols]
            if not any(found):  # a baseline left out with --baselines
                continue
            cells = [fmt(r) for r in found]
            dd = res["ddranking"].get(name) if kind == "set" else None
            dd_cells = [f"{dd[k]:+.4f}" if k != "lrs" else f"{dd[k]:.4f}" for k in ("hlr", "ior", "lrs")] + \
                [dd["own_protocol"]] if dd else ["", "", "", ""]
            L.append(f"| {name} | {method} | " + " | ".join(cells + dd_cells) + " |")
        L.append("")
    if res["stages"]:
        L += ["## Accuracy vs accumulated IPC (LGD Table 4)", ""]
        for name, st in res["stages"].items():
            L.append(f"- `{name}` ({st['student']}, {st['protocol']}, seeds {st['seeds']}): " +
                     ", ".join(f"IPC {p['ipc']}: {fmt(p)}" for p in st["points"]))
        L.append("")
    for name, rd in res["redundancy"].items():
        K = len(rd["matrix"])
        L += [f"## Redundancy `{name}` (row: student trained on increment a; column: accuracy on increment b)", "",
              "| a \\ b | " + " | ".join(f"T{b + 1}" for b in range(K)) + " |", "|---" * (K + 1) + "|"]
        L += [f"| T{a + 1} | " + " | ".join(f"{v:.1f}" for v in row) + " |" for a, row in enumerate(rd["matrix"])]
        red = rd.get("reduction_vs_ref")
        L += ["", f"mean off-diagonal {rd['off_diagonal']:.2f} %; upper (earlier on later) "
              f"{rd['upper_train_earlier_test_later']:.2f} %, lower (later on earlier) "
              f"{rd['lower_train_later_test_earlier']:.2f} %; diagonal {rd['diagonal']:.2f} %"
              + (f"; reduction vs `{rd['ref']}`: {100 * red:.1f} %" if red is not None else ""), ""]
    if res["diversity"]:
        L += ["## Diversity: mean cosine to the class centroid, teacher penultimate features (lower = more diverse)",
              "", "| set | mean | per class |", "|---|---|---|"]
        L += [f"| {k} | {d['mean']:.4f} | {' '.join(f'{v:.3f}' for v in d['per_class'])} |"
              for k, d in res["diversity"].items()]
    path.write_text("\n".join(L) + "\n")


def write_plots(out: Path, res: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, st in res["stages"].items():
        ax.errorbar([p["ipc"] for p in st["points"]], [p["mean"] for p in st["points"]],
                    [p["std"] for p in st["points"]], marker="o", capsize=3, label=name)
    main = [r for r in res["rows"] if r["student"] == res["students"][0] and r["protocol"] == res["protocols_used"][0]]
    for kind, mk in (("set", "s"), ("random", "x")):
        pts = sorted((r["ipc"], r["mean"], r["std"]) for r in main if r["kind"] == kind)
        if pts:
            ax.errorbar(*zip(*pts), fmt=mk, capsize=3, label="distilled (final)" if kind == "set" else "random real")
    for r in main:
        if r["kind"] == "full":
            ax.axhline(r["mean"], ls="--", c="k", label="full data")
    ax.set(xlabel="images per class", ylabel="test accuracy (%)", title="accuracy vs IPC")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "acc_vs_ipc.png", dpi=120)
    plt.close(fig)
    for name, rd in res["redundancy"].items():
        M = np.array(rd["matrix"])
        fig, ax = plt.subplots(figsize=(4, 3.5))
        im = ax.imshow(M, vmin=0, vmax=100, cmap="viridis")
        for (a, b), v in np.ndenumerate(M):
            ax.text(b, a, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k", fontsize=8)
        ax.set(xticks=range(len(M)), yticks=range(len(M)), xticklabels=[f"T{i + 1}" for i in range(len(M))],
               yticklabels=[f"T{i + 1}" for i in range(len(M))], xlabel="test increment", ylabel="train increment",
               title=f"{name}: off-diag {rd['off_diagonal']:.1f} %")
        fig.colorbar(im)
        fig.tight_layout()
        fig.savefig(out / f"redundancy_{name}.png", dpi=120)
        plt.close(fig)
    if res["diversity"]:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        k = len(res["diversity"])
        for i, (name, d) in enumerate(res["diversity"].items()):
            ax.bar(np.arange(len(d["per_class"])) + (i - k / 2 + 0.5) * 0.8 / k, d["per_class"], 0.8 / k, label=name)
        ax.set(xlabel="class", ylabel="mean cosine to centroid", title="intra-class similarity (lower = more diverse)")
        ax.set_ylim(bottom=min(min(d["per_class"]) for d in res["diversity"].values()) - 0.05)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "diversity.png", dpi=120)
        plt.close(fig)


def write_csv(path: Path, rows: list):
    keys = ["kind", "set", "method", "ipc", "student", "protocol", "epochs", "mean", "std", "n", "accs", "seeds"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r[k] for k in keys if k in r}, "n": len(r["accs"]),
                        "accs": ";".join(f"{a:.2f}" for a in r["accs"]), "seeds": ";".join(map(str, r["seeds"]))})


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def main():
    args = parse_args()
    device, ctx = common.setup_device(args.device, args.amp)
    t_start = time.time()
    # every input is checked before anything is written
    if not (args.run / "dataset.json").exists():
        raise common.UserError(f"{args.run} has no dataset.json; run 01_train_teacher.py --run {args.run} first")
    info = common.DatasetInfo.from_dict(common.read_json(args.run / "dataset.json"))
    students = comma_list(args.students, None, "--students")
    for s in students:
        common.check_model(s, info)
    protocols = comma_list(args.protocols, PROTOCOLS, "--protocols")
    baselines = comma_list(args.baselines, BASELINES, "--baselines")
    analyses = comma_list(args.analyses, ANALYSES, "--analyses")
    if not students or not protocols:
        raise common.UserError("--students and --protocols each need at least one entry")
    rule = {"auto": "small" if info.name == "mnist5k" else "paper"}.get(args.epochs, args.epochs)
    if rule not in ("paper", "small") and not (rule.isdigit() and int(rule) > 0):
        raise common.UserError(f"--epochs must be paper, small, auto or a positive number, got {args.epochs!r}")
    tcfg = args.run / "teacher" / "config.json"
    if args.full_epochs == "teacher":
        if not tcfg.exists():
            raise common.UserError(f"{tcfg} is missing; run 01 first or give --full-epochs a number")
        full_epochs = common.read_json(tcfg)["args"]["epochs"]
    elif args.full_epochs.isdigit() and int(args.full_epochs) > 0:
        full_epochs = int(args.full_epochs)
    else:
        raise common.UserError(f"--full-epochs must be 'teacher' or a positive number, got {args.full_epochs!r}")
    teacher = common.load_classifier(args.run / "teacher" / "teacher.pt", info, device)
    folders = args.sets or sorted(d for d in (args.run / "distilled").glob("*") if d.is_dir())
    sets = [read_set(Path(f), info) for f in folders]
    names = [s["name"] for s in sets]
    if len(set(names)) != len(names):
        raise common.UserError(f"two distilled folders share the name {max(names, key=names.count)!r}; "
                          f"evaluate them in separate --name evaluations")
    soft_methods = comma_list(args.soft_methods, None, "--soft-methods")
    for s in sets:
        s["own"] = "soft" if s["method"] in soft_methods else "hard"
    if not sets:
        print(f"no distilled sets under {args.run}/distilled yet: evaluating the baselines only")
    ipcs = sorted({s["ipc"] for s in sets}) if sets else \
        sorted({int(x) for x in comma_list(args.baseline_ipcs, None, "--baseline-ipcs")})
    _, train, test = common.load_dataset(info.name, Path(info.root) if info.root else None, info.size)
    seeds = [args.seed + k for k in range(args.seeds)]
    ana_seeds = [args.seed + k for k in range(args.analysis_seeds)]  # the first of them reuse the main results
    proto_kw = dict(lr=args.lr, wd=args.wd, batch_size=args.batch_size, cutmix_beta=args.cutmix_beta,
                    cutmix_p=args.cutmix_p, crop_scale=args.crop_scale, tau=args.tau)
    protos = {p: common.Protocol(p, **proto_kw) for p in PROTOCOLS}
    used = protocols + sorted({s["own"] for s in sets} - set(protocols))

    out = args.run / "eval" / args.name
    cargs = {k: v for k, v in vars(args).items() if k not in ("overwrite", "device", "amp")}
    cargs["sets"] = [str(f) for f in folders]
    common.prepare_folder(out, cargs, args.overwrite, "evaluation")
    derived = {"epoch_rule": rule, "epochs_by_ipc": {i: epochs_for(i, rule) for i in ipcs},
               "paper_rule": PAPER_EPOCHS, "small_rule": SMALL_EPOCHS, "full_epochs": full_epochs,
               "seeds": seeds, "analysis_seeds": ana_seeds, "protocols": {p: asdict(protos[p]) for p in used},
               "own_protocol": {s["name"]: s["own"] for s in sets}, "ipcs": ipcs}
    common.write_config(out, cargs, derived, device)
    print(f"03: {len(sets)} set(s) {names}, students {students}, protocols {used}, seeds {seeds}, epoch rule "
          f"{rule} ({derived['epochs_by_ipc']}), full data {full_epochs} epochs, {device}")

    cache = args.run / "eval" / "cache"
    test = test.to(device)
    ev = Evaluator(args, info, test, teacher, protos, device, ctx, cache)
    rows, draws = [], {}
    for ipc in ipcs:
        if "random" in baselines or "diversity" in analyses:
            draws[ipc] = random_draws(train, ipc, len(seeds), args.seed, cache, args.overwrite)
    for student in tqdm(students, desc="students"):
        if "full" in baselines:
            for p in protocols:
                rows.append(ev.row("full", "full", "full", len(train.y) // info.num_classes, [train] * len(seeds),
                                   student, p, full_epochs, seeds))
        for ipc in ipcs:
            if "random" in baselines:
                for p in used:
                    rows.append(ev.row("random", "random", "random", ipc,
                                       [common.Split(train.x[d], train.y[d]) for d in draws[ipc]], student, p,
                                       epochs_for(ipc, rule), seeds))
        for s in sets:
            for p in protocols + ([s["own"]] if s["own"] not in protocols else []):
                rows.append(ev.row("set", s["name"], s["method"], s["ipc"], [common.Split.cat(s["stages"])] * len(seeds),
                                   student, p, epochs_for(s["ipc"], rule), seeds))

    def mean_of(kind, name, student, proto, ipc=None):
        hit = [r for r in rows if (r["kind"], r["set"], r["student"], r["protocol"]) == (kind, name, student, proto)
               and (ipc is None or r["ipc"] == ipc)]
        return hit[0]["mean"] / 100 if hit else None

    dd = {}
    for s in sets:
        st = students[0]
        vals = [mean_of("full", "full", st, "hard"), mean_of("set", s["name"], st, "hard"),
                mean_of("set", s["name"], st, s["own"]), mean_of("random", "random", st, s["own"], s["ipc"])]
        if None not in vals:
            dd[s["name"]] = {**dd_ranking(*vals), "own_protocol": s["own"], "student": st,
                             "inputs": dict(zip(["full_hard", "syn_hard", "syn_own", "random_own"], vals))}

    stages_res, red = {}, {}
    st, p0 = students[0], protocols[0]
    ana_methods = None if args.analysis_methods == "all" else comma_list(args.analysis_methods, None,
                                                                           "--analysis-methods")
    # per method, only its largest set: its stages already give every smaller accumulated IPC
    top = {m: max(x["ipc"] for x in sets if x["method"] == m) for m in {x["method"] for x in sets}}
    for s in [s for s in sets if len(s["stages"]) > 1 and (ana_methods is None or s["method"] in ana_methods)
              and s["ipc"] == top[s["method"]]]:
        if "stages" in analyses:
            pts = []
            for i in range(1, len(s["stages"]) + 1):
                ipc_i = sum(s["stage_ipcs"][:i])
                r = ev.row("stage", s["name"], s["method"], ipc_i, [common.Split.cat(s["stages"][:i])] * len(ana_seeds), st, p0,
                           epochs_for(ipc_i, rule), ana_seeds)
                pts.append({"stage": i, **r})
            stages_res[s["name"]] = {"student": st, "protocol": p0, "seeds": ana_seeds, "points": pts}
        if "redundancy" in analyses:
            red[s["name"]] = redundancy(ev, s["stages"], st, p0, rule, ana_seeds, s["name"])
    for name, rd in red.items():
        s = next(x for x in sets if x["name"] == name)
        ref = [r for n, r in red.items() if n != name and next(x for x in sets if x["name"] == n)["method"]
               == args.redundancy_ref and len(r["matrix"]) == len(rd["matrix"])
               and next(x for x in sets if x["name"] == n)["ipc"] == s["ipc"]]
        if ref:
            rd["ref"] = args.redundancy_ref
            rd["reduction_vs_ref"] = (ref[0]["off_diagonal"] - rd["off_diagonal"]) / ref[0]["off_diagonal"]

    div = {}
    if "diversity" in analyses:
        def diversity(x, y):
            per = common.centroid_cosine(common.features(teacher, x.to(device), ctx=ctx), y.to(device), info.num_classes)
            return {"per_class": per, "mean": float(np.mean(per))}
        div["full data"] = diversity(train.x, train.y)
        for ipc in ipcs:
            div[f"random-ipc{ipc}"] = diversity(train.x[draws[ipc][0]], train.y[draws[ipc][0]])
        for s in sets:
            u = common.Split.cat(s["stages"])
            div[s["name"]] = diversity(u.x, u.y)

    res = {"name": args.name, "dataset": info.name, "students": students, "protocols": protocols,
           "protocols_used": used, "protocol_settings": {p: asdict(protos[p]) for p in used}, "seeds": seeds,
           "epoch_rule": rule, "full_epochs": full_epochs, "full_ipc": len(train.y) // info.num_classes,
           "selection": "none: fixed epochs and learning rate, final-epoch accuracy on the test split",
           "rows": rows, "ddranking": dd, "stages": stages_res, "redundancy": red, "diversity": div,
           "sets": [{k: s[k] for k in ("name", "folder", "method", "ipc", "stage_ipcs", "own")} for s in sets],
           "teacher_test_acc": common.read_json(args.run / "teacher" / "metrics.json")["test_acc"]
           if (args.run / "teacher" / "metrics.json").exists() else None,
           "versions": common.versions(), "git_commit": common.git_commit(), "device": str(device),
           "students_trained": ev.trained, "students_reused": ev.reused, "wall_s": time.time() - t_start}
    write_csv(out / "results.csv", [r for r in rows] + [p for v in stages_res.values() for p in v["points"]])
    write_markdown(out / "results.md", res, sets)
    write_plots(out, res)
    common.write_json(out / "results.json", res)  # last: its presence means the evaluation finished
    print(f"03 done in {time.time() - t_start:.0f} s: {ev.trained} students trained, {ev.reused} reused; "
          f"results in {out}")


if __name__ == "__main__":
    common.cli(main)
