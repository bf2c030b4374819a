"""Evaluate distilled sets under one fixed protocol, beside random and full-data baselines.

Reads:  02's folders <run>/distilled/<set>/ (stage_XX/<class>/<index:06d>.png, manifest.json and
        config.json, which names the run; none given = all of them), 01's dataset.json, teacher/.
Writes: <run>/eval/<name>/: config.json (first), results.json (every number with its protocol,
          epochs, seeds and versions; last), results.csv, results.md (tables per IPC with
          HLR/IOR/LRS, accuracy vs accumulated IPC, redundancy, diversity), acc_vs_ipc.png,
          redundancy.png (one heatmap per set), diversity.png
        <run>/eval/cache/: random_ipc<N>_seed<S>.json (the random real subsets, disjoint draws),
          students/<key>.json (one student's accuracies: reruns and the analyses reuse it)
        <run>/timings.json: seconds and load average of every phase 03/<name>/<step>
Accuracy is the final-epoch top-1 on the real test split, mean +- std over student seeds;
nothing is selected on the test split (no best epoch, no learning-rate search; §7.4).

Examples:
  python 03_evaluate.py --run runs/mnist5k                # CPU, every set of the embedded run
  python 03_evaluate.py runs/imagenette/distilled/lgd-ipc50 --epochs paper \\
      --students convnet-6,resnetap10,resnet18 --protocols hard,soft --seeds 5   # GPU
"""
import argparse
import csv
import hashlib
import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import common

PROTOCOLS = ["hard", "soft"]
ANALYSES = ["stages", "redundancy", "diversity"]
BASELINES = ["random", "full"]
# the methods whose stages are the papers' increments: per-stage accuracy and redundancy apply
INCREMENT_METHODS = "dit,lgd,acs,igd"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p, run_default=None,
                           run_help="run folder of 01; default: the run the sets' config.json "
                                    "names, else runs/mnist5k. Results go to <run>/eval/<name>")
    p.add_argument("sets", nargs="*", type=Path,
                   help="distilled folders of 02 (default: all of <run>/distilled)")
    p.add_argument("--name", default="default", help="evaluation name: <run>/eval/<name>/")
    p.add_argument("--students", default="convnet-3",
                   help=f"comma list of student models: {', '.join(common.MODELS)}, timm:<name>")
    p.add_argument("--protocols", default="hard", help=f"comma list of {', '.join(PROTOCOLS)}")
    p.add_argument("--seeds", type=common.positive_int, default=3,
                   help="student seeds --seed, --seed+1, ...; random draw k goes with seed k")
    rules = common.DEFAULTS["student_epochs"]  # paper, small: ((IPC bound, epochs), ...)
    paper, small = ("/".join(str(e) for _, e in rule) for rule in rules)
    bounds = "/".join(f"<={b}" for b, _ in rules[0])
    p.add_argument("--epochs", default="scale",
                   help=f"'paper' ({paper} for IPC {bounds}), 'small' ({small}), 'scale' (the rule "
                        "of --scale) or a number")
    p.add_argument("--full-epochs", default="teacher",
                   help="epochs on the full training set: 'teacher' (those of 01's teacher, "
                        "for the like-for-like check) or a number")
    p.add_argument("--soft-methods", default="delt",
                   help="methods whose own protocol is soft (DD-Ranking IOR); others: hard")
    g = p.add_argument_group("protocol (docs/methods.md §7.1)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--wd", type=float, default=0.01)
    g.add_argument("--batch-size", type=common.positive_int, default=64)
    g.add_argument("--cutmix-p", type=float, default=1.0, help="probability of CutMix per batch")
    g.add_argument("--cutmix-beta", type=float, default=1.0)
    g.add_argument("--crop-scale", type=float, default=0.5,
                   help="random-resized-crop minimum area fraction")
    g.add_argument("--tau", type=float, default=20.0, help="soft-label temperature")
    g = p.add_argument_group("baselines and analyses")
    g.add_argument("--baselines", default="random,full",
                   help=f"comma list of {', '.join(BASELINES)} or 'none'")
    g.add_argument("--baseline-ipcs", default="10,50",
                   help="IPCs of the baselines when the run has no sets yet")
    g.add_argument("--analyses", default="stages,redundancy,diversity",
                   help=f"comma list of {', '.join(ANALYSES)} or 'none'")
    g.add_argument("--analysis-methods", default=INCREMENT_METHODS,
                   help="methods whose largest set gets per-stage accuracy and redundancy "
                        "('all' for every method; random and delt stages are draws and join "
                        "rounds, not increments)")
    g.add_argument("--analysis-seeds", type=common.positive_int, default=1,
                   help="student seeds of per-stage accuracy and redundancy (first student "
                        "and protocol)")
    g.add_argument("--redundancy-ref", default="dit",
                   help="method whose mean off-diagonal redundancy is the reference of the "
                        "relative reduction")
    return p.parse_args(argv)


def comma_list(s: str, allowed: list | None, flag: str) -> list:
    items = [] if s.strip() == "none" else [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if allowed is not None and x not in allowed]
    if bad:
        raise common.UserError(f"unknown {flag} value {bad[0]!r}; choose from {', '.join(allowed)}")
    return items


def same_images(a: common.Split, b: common.Split) -> bool:
    """Do two splits hold the same (image, label) pairs, in any order?"""
    def pairs(s):
        return sorted(hashlib.sha1(x.tobytes()).hexdigest() + f":{y}"
                      for x, y in zip(s.x.cpu().numpy(), s.y.cpu().tolist()))
    return len(a.y) == len(b.y) and pairs(a) == pairs(b)


def split_hash(s: common.Split) -> str:
    """A short hash of a split's pixels and labels: the student cache's notion of 'same data'."""
    h = hashlib.sha1(s.x.cpu().numpy().tobytes())
    h.update(s.y.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# --- inputs: the run, the distilled sets and the random draws; all checked first ---
def read_set(folder: Path, info: common.DatasetInfo) -> dict:
    """One 02 folder: name, method, IPC, and its increments (Splits) in stage order."""
    stages = common.read_stages(folder, info)
    ipcs = []
    for s, d in zip(stages, common.stage_dirs(folder)):
        counts = torch.bincount(s.y, minlength=info.num_classes).tolist()
        if len(set(counts)) != 1:
            raise common.UserError(f"{d} holds unequal images per class ({counts}); every class "
                                   f"needs the same IPC")
        ipcs.append(counts[0])
    a = set_args(folder)
    method = a.get("method") or folder.name.split("-ipc")[0]
    if a.get("ipc") is not None and a["ipc"] != sum(ipcs):
        raise common.UserError(f"{folder}/config.json says IPC {a['ipc']} but its stages hold "
                               f"{sum(ipcs)} per class ({'+'.join(map(str, ipcs))}); rerun 02 "
                               f"to finish or repair the folder")
    return {"name": folder.name, "folder": str(folder), "method": method, "ipc": sum(ipcs),
            "stage_ipcs": ipcs, "stages": stages}


def set_args(folder: Path) -> dict:
    """The arguments 02 recorded in a set's config.json ({} if there is none)."""
    cfg = Path(folder) / "config.json"
    return common.read_json(cfg).get("args", {}) if cfg.exists() else {}


def find_run(args) -> Path:
    """--run, else the one run every given set's config.json names, else runs/mnist5k."""
    if args.run is not None:
        return args.run
    runs = {set_args(f).get("run") for f in args.sets} - {None}
    if len(runs) > 1:
        raise common.UserError(f"the sets come from different runs ({', '.join(sorted(runs))}); "
                               f"evaluate each run's sets separately or pass --run")
    return Path(runs.pop()) if runs else Path("runs/mnist5k")


def random_draws(train: common.Split, ipc: int, n: int, seed: int, cache: Path,
                 refresh: bool) -> list:
    """n class-balanced random subsets (index tensors) of `ipc` per class, disjoint, cached."""
    # draw k is block k of each class's permutation: asking for more draws keeps the first ones;
    # Evaluation checked that every class holds enough images
    path = cache / f"random_ipc{ipc}_seed{seed}.json"
    train_hash = split_hash(train)
    if path.exists() and not refresh:
        d = common.read_json(path)
        if d["train_hash"] == train_hash and len(d["draws"]) >= n:
            return [torch.tensor(x) for x in d["draws"][:n]]
    per_class = common.class_permutations(train.y, int(train.y.max()) + 1, seed)
    draws = [torch.cat([p[k * ipc:(k + 1) * ipc] for p in per_class]) for k in range(n)]
    common.write_json(path, {"ipc": ipc, "seed": seed, "train_hash": train_hash,
                             "draws": [d.tolist() for d in draws]})
    return draws


class Evaluation:
    """Everything one evaluation needs, resolved and checked before anything is written."""

    def __init__(self, args, device, ctx):
        self.args, self.device, self.ctx = args, device, ctx
        self.run = find_run(args)
        self.info = info = common.read_run_info(self.run)
        self.students = comma_list(args.students, None, "--students")
        for s in self.students:
            common.check_model(s, info)
        self.protocols = comma_list(args.protocols, PROTOCOLS, "--protocols")
        self.baselines = comma_list(args.baselines, BASELINES, "--baselines")
        self.analyses = comma_list(args.analyses, ANALYSES, "--analyses")
        if not self.students or not self.protocols:
            raise common.UserError("--students and --protocols each need at least one entry")
        scale = common.resolve_scale(args.scale, info.name)
        self.rule = scale if args.epochs == "scale" else args.epochs
        if self.rule not in ("paper", "small") and not (self.rule.isdigit() and int(self.rule)):
            raise common.UserError(f"--epochs must be paper, small, scale or a positive number, "
                                   f"got {args.epochs!r}")
        full, cfg = args.full_epochs, self.run / "teacher" / "config.json"
        if full == "teacher" and not cfg.exists():
            raise common.UserError(f"{cfg} is missing; run 01 first or give --full-epochs a number")
        if full != "teacher" and not (full.isdigit() and int(full) > 0):
            raise common.UserError(f"--full-epochs must be 'teacher' or a positive number, got "
                                   f"{full!r}")
        self.full_epochs = int(full) if full != "teacher" else \
            common.read_json(cfg)["args"]["epochs"]
        self.teacher = common.load_run_teacher(self.run, info, device)
        self.folders = args.sets or sorted(d for d in (self.run / "distilled").glob("*")
                                           if d.is_dir())
        self.sets = [read_set(Path(f), info) for f in self.folders]
        names = [s["name"] for s in self.sets]
        if len(set(names)) != len(names):
            raise common.UserError(f"two distilled folders share the name "
                                   f"{max(names, key=names.count)!r}; evaluate them in separate "
                                   f"--name evaluations")
        soft_methods = comma_list(args.soft_methods, None, "--soft-methods")
        for s in self.sets:
            s["own"] = "soft" if s["method"] in soft_methods else "hard"
        self.ipcs = sorted({s["ipc"] for s in self.sets}) or \
            sorted({int(x) for x in comma_list(args.baseline_ipcs, None, "--baseline-ipcs")})
        _, self.train, test = common.load_dataset(info.name, info.root, info.size)
        self.test = test.to(device)
        self.seeds = [args.seed + k for k in range(args.seeds)]
        # the first analysis seeds are main seeds, so their students come from the cache
        self.analysis_seeds = [args.seed + k for k in range(args.analysis_seeds)]
        kw = dict(lr=args.lr, wd=args.wd, batch_size=args.batch_size, cutmix_beta=args.cutmix_beta,
                  cutmix_p=args.cutmix_p, crop_scale=args.crop_scale, tau=args.tau)
        self.proto = {p: common.Protocol(p, **kw) for p in PROTOCOLS}
        # every protocol asked for, plus each set's own (DD-Ranking's IOR needs it)
        self.used = self.protocols + sorted({s["own"] for s in self.sets} - set(self.protocols))
        if "random" in self.baselines or "diversity" in self.analyses:  # random draws needed
            fewest = int(torch.bincount(self.train.y).min())
            if fewest < len(self.seeds) * max(self.ipcs):
                raise common.UserError(f"a class has {fewest} training images, too few for "
                                       f"{len(self.seeds)} disjoint random draws of IPC "
                                       f"{max(self.ipcs)}; lower --seeds")
        self.out, self.cache = self.run / "eval" / args.name, self.run / "eval" / "cache"
        self.test_hash = split_hash(self.test)
        self.trained, self.reused, self.done = 0, 0, set()  # done: keys trained in this call
        self.collect = None  # a list while planning torchrun's shares: student() only records
        self.fresh = set()  # keys another rank trained in this call: counted as trained once

    def epochs(self, ipc: int) -> int:
        return common.epochs_for(ipc, self.rule)

    def start(self):
        """config.json of <run>/eval/<name>, once every input is known to be good."""
        cargs = {k: v for k, v in vars(self.args).items()
                 if k not in ("overwrite", "device", "amp")}
        cargs["sets"], cargs["run"] = [str(f) for f in self.folders], str(self.run)
        common.lock_folder(self.out, "evaluation")  # a second 03 on this folder ends here
        common.prepare_folder(self.out, cargs, self.args.overwrite, "evaluation")
        paper, small = common.DEFAULTS["student_epochs"]
        self.derived = {
            "epoch_rule": self.rule, "epochs_by_ipc": {i: self.epochs(i) for i in self.ipcs},
            "paper_rule": paper, "small_rule": small, "full_epochs": self.full_epochs,
            "seeds": self.seeds, "analysis_seeds": self.analysis_seeds,
            "protocols": {p: asdict(self.proto[p]) for p in self.used},
            "own_protocol": {s["name"]: s["own"] for s in self.sets}, "ipcs": self.ipcs}
        common.write_config(self.out, cargs, self.derived, self.device, self.ctx)
        self.draws = {ipc: random_draws(self.train, ipc, len(self.seeds), self.args.seed,
                                        self.cache, self.args.overwrite)
                      for ipc in self.ipcs
                      if "random" in self.baselines or "diversity" in self.analyses}
        for st in self.sets:  # 02's random sets that are the baseline's first draw
            first = self.draws[st["ipc"]][0] if "random" in self.baselines else None
            st["baseline_draw"] = first is not None and same_images(
                common.Split.cat(st["stages"]), common.Split(self.train.x[first],
                                                             self.train.y[first]))
            if st["baseline_draw"]:
                print(f"{st['name']}: the images of the random baseline's draw 0 (02's random "
                      f"and 03's draws take the same class_permutations blocks); its row "
                      f"repeats the baseline's, no student is trained for it")
        print(f"03: {len(self.sets)} set(s) {[s['name'] for s in self.sets]}, students "
              f"{self.students}, protocols {self.used}, seeds {self.seeds}, epoch rule "
              f"{self.rule} ({self.derived['epochs_by_ipc']}), full data {self.full_epochs} "
              f"epochs, {self.device}")

    @contextmanager
    def timed(self, timings: common.Timings | None, step: str):
        """Phase 03/<name>/<step> with the students it trained and reused; None: time nothing."""
        if timings is None:
            yield
            return
        trained, reused = self.trained, self.reused
        with timings.phase(f"03/{self.args.name}/{step}") as ph:
            yield
            ph.extra = {"students_trained": self.trained - trained,
                        "students_reused": self.reused - reused}
            # keep the entry of the call that trained them (under torchrun: train_shares's)
            if self.trained == trained:
                ph.skipped = "skipped: no student trained (all cached, or none asked for)"

    def student(self, train: common.Split, student: str, proto: str, epochs: int, seed: int,
                targets: dict | None = None, desc="") -> dict:
        """Final-epoch test accuracy (%) of one student, and its accuracy on each target split."""
        # cached per (data, student, protocol, epochs, seed, test and target splits)
        targets = targets or {}
        job = {"train": split_hash(train), "student": student,
               "protocol": asdict(self.proto[proto]), "epochs": epochs, "seed": seed,
               "test": self.test_hash,
               "targets": {k: split_hash(v) for k, v in sorted(targets.items())}}
        key = hashlib.sha1(json.dumps(job, sort_keys=True).encode()).hexdigest()[:20]
        path = self.cache / "students" / f"{key}.json"
        if self.collect is not None:  # planning: record the student, train nothing
            self.collect.append((key, (train, student, proto, epochs, seed, targets, desc)))
            return {"acc": math.nan, "on": {k: math.nan for k in targets}, "wall_s": 0.0}
        if path.exists() and (not self.args.overwrite or key in self.done):
            if key in self.fresh:
                self.fresh.discard(key)
                self.trained += 1
            else:
                self.reused += 1
            return common.read_json(path)
        t0 = time.time()
        common.seed_everything(seed)  # the weight initialisation
        model = common.build_model(student, self.info).to(self.device)
        common.fit(model, train.to(self.device), self.info, self.proto[proto], epochs=epochs,
                   seed=seed, teacher=self.teacher if proto == "soft" else None, ctx=self.ctx,
                   desc=desc)
        out = {**job, "acc": common.accuracy(model, self.test),
               "on": {k: common.accuracy(model, v.to(self.device)) for k, v in targets.items()},
               "train_size": len(train.y), "wall_s": time.time() - t0}
        common.write_json(path, out)
        self.trained += 1
        self.done.add(key)
        tqdm.write(f"{desc}: {out['acc']:.2f} % ({out['wall_s']:.0f} s)")
        return out

    def row(self, kind, name, method, ipc, splits: list, student, proto, epochs, seeds,
            targets: dict | None = None) -> dict:
        """Mean +- std over seeds; splits[k] is seed k's training set (random draws differ)."""
        rs = [self.student(s, student, proto, epochs, seed, targets,
                           desc=f"{name} {student} {proto} seed {seed}")
              for s, seed in zip(splits, seeds)]
        accs = [r["acc"] for r in rs]
        return {"kind": kind, "set": name, "method": method, "ipc": ipc, "student": student,
                "protocol": proto, "epochs": epochs, "seeds": list(seeds), "accs": accs,
                "mean": float(np.mean(accs)),
                "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                "wall_s": sum(r["wall_s"] for r in rs)}


# --- the evaluation's steps ---
def train_shares(ev: Evaluation):
    """torchrun: each rank trains its share of the uncached students; rank 0 then reads them."""
    # the steps run once with student() recording instead of training; the students are dealt
    # out longest first (training images x epochs), each to the least loaded rank. A student's
    # result depends on its seed alone, not on its process.
    r = common.ranks()
    ev.collect = []
    set_rows(ev, baseline_rows(ev))
    increment_analyses(ev, None)
    jobs, ev.collect = dict(ev.collect), None  # key -> arguments (one student asked twice: once)
    todo = r.broadcast([k for k in jobs if ev.args.overwrite or
                        not (ev.cache / "students" / f"{k}.json").exists()] if r.main else None)
    load, mine = [0] * r.world, []
    for key in sorted(todo, key=lambda k: -len(jobs[k][0].y) * jobs[k][3]):  # stable: same
        rank = load.index(min(load))  # order on every rank
        load[rank] += len(jobs[key][0].y) * jobs[key][3]
        if rank == r.rank:
            mine.append(key)
    for key in mine:
        ev.student(*jobs[key][:6], desc=jobs[key][6])
    r.barrier()
    ev.done |= set(todo)  # trained in this call, by some rank: reused even under --overwrite
    ev.fresh, ev.trained, ev.reused = set(todo), 0, 0


def baseline_rows(ev: Evaluation) -> list:
    """The full-data and random rows: every student x protocol, seeds as mean +- std."""
    rows, train, n = [], ev.train, len(ev.seeds)
    for student in tqdm(ev.students, desc="baselines", unit="architecture"):
        if "full" in ev.baselines:
            full_ipc = len(train.y) // ev.info.num_classes
            rows += [ev.row("full", "full", "full", full_ipc, [train] * n, student, p,
                            ev.full_epochs, ev.seeds) for p in ev.protocols]
        if "random" in ev.baselines:
            for ipc in ev.ipcs:
                draws = [common.Split(train.x[d], train.y[d]) for d in ev.draws[ipc]]
                rows += [ev.row("random", "random", "random", ipc, draws, student, p,
                                ev.epochs(ipc), ev.seeds) for p in ev.used]
    return rows


def set_rows(ev: Evaluation, baseline: list) -> list:
    """Every set x student x protocol (those asked for and the set's own), over the seeds."""
    rows, n = [], len(ev.seeds)
    for student in tqdm(ev.students, desc="sets", unit="architecture"):
        for s in ev.sets:
            union = common.Split.cat(s["stages"])
            for p in ev.protocols + ([s["own"]] if s["own"] not in ev.protocols else []):
                if s["baseline_draw"]:  # the same subset as the baseline: its row, not retrained
                    want = ("random", student, p, s["ipc"])
                    base = next(r for r in baseline
                                if (r["kind"], r["student"], r["protocol"], r["ipc"]) == want)
                    rows.append({**base, "kind": "set", "set": s["name"], "method": s["method"],
                                 "same_as": "random baseline: draws 0.., one per seed",
                                 "wall_s": 0.0})
                    continue
                rows.append(ev.row("set", s["name"], s["method"], s["ipc"], [union] * n, student,
                                   p, ev.epochs(s["ipc"]), ev.seeds))
    return rows


def ddranking_scores(ev: Evaluation, rows: list) -> dict:
    """DD-Ranking (arXiv 2505.13300; §7.5) of every set with the first student: HLR, IOR, LRS."""
    def mean_of(kind, name, proto, ipc=None):  # a fraction
        hit = [r for r in rows if (r["kind"], r["set"], r["student"], r["protocol"]) ==
               (kind, name, ev.students[0], proto) and (ipc is None or r["ipc"] == ipc)]
        return hit[0]["mean"] / 100 if hit else None
    dd = {}
    for s in ev.sets:
        vals = [mean_of("full", "full", "hard"), mean_of("set", s["name"], "hard"),
                mean_of("set", s["name"], s["own"]),
                mean_of("random", "random", s["own"], s["ipc"])]
        if None not in vals:
            full_hard, syn_hard, syn_own, rand_own = vals
            hlr, ior = full_hard - syn_hard, syn_own - rand_own
            alpha = (ior - hlr) / 2
            lrs = (math.exp(alpha) - math.exp(-1)) / (math.e - math.exp(-1))
            dd[s["name"]] = {"hlr": hlr, "ior": ior, "lrs": lrs, "own_protocol": s["own"],
                             "student": ev.students[0],
                             "inputs": dict(zip(["full_hard", "syn_hard", "syn_own", "random_own"],
                                                vals))}
    return dd


def increment_targets(s: dict) -> dict:
    """{"T1": increment 1, ...}: the splits a student trained on one increment is tested on."""
    # part of the cache key: stage 1 of per-stage accuracy and redundancy's T1 are one student
    return {f"T{b + 1}": st for b, st in enumerate(s["stages"])}


def redundancy(ev: Evaluation, s: dict, student, proto) -> dict:
    """M[a][b] (§7.6): accuracy (%) on increment b of a student trained on increment a alone."""
    stages, seeds, targets = s["stages"], ev.analysis_seeds, increment_targets(s)
    K = len(stages)
    M = np.zeros((K, K))
    for a, st in enumerate(stages):
        for seed in seeds:
            r = ev.student(st, student, proto, ev.epochs(s["stage_ipcs"][a]), seed, targets,
                           desc=f"{s['name']} redundancy T{a + 1} seed {seed}")
            M[a] += np.array([r["on"][f"T{b + 1}"] for b in range(K)]) / len(seeds)
    off = ~np.eye(K, dtype=bool)
    up, low = np.triu(off), np.tril(off)
    return {"matrix": M.tolist(), "diagonal": float(M.diagonal().mean()),
            "off_diagonal": float(M[off].mean()),
            "upper_train_earlier_test_later": float(M[up].mean()),
            "lower_train_later_test_earlier": float(M[low].mean()), "student": student,
            "protocol": proto, "seeds": list(seeds)}


def increment_analyses(ev: Evaluation, timings: common.Timings | None) -> tuple:
    """Per-stage accuracy (LGD Table 4) and redundancy (LGD Fig. 2) of each method's largest set."""
    student, proto = ev.students[0], ev.protocols[0]
    methods = None if ev.args.analysis_methods == "all" else \
        comma_list(ev.args.analysis_methods, None, "--analysis-methods")
    top = {m: max(x["ipc"] for x in ev.sets if x["method"] == m) for m in
           {x["method"] for x in ev.sets}}
    # the largest set's stages give every smaller accumulated IPC
    chosen = [s for s in ev.sets if len(s["stages"]) > 1 and s["ipc"] == top[s["method"]]
              and (methods is None or s["method"] in methods)]
    stages, red = {}, {}
    if "stages" in ev.analyses:
        with ev.timed(timings, "stages"):
            for s in chosen:
                points = []
                for i in range(1, len(s["stages"]) + 1):
                    ipc_i = sum(s["stage_ipcs"][:i])
                    # stage 1 = redundancy's T1 student: the same targets make it one run
                    r = ev.row("stage", s["name"], s["method"], ipc_i,
                               [common.Split.cat(s["stages"][:i])] * len(ev.analysis_seeds),
                               student, proto, ev.epochs(ipc_i), ev.analysis_seeds,
                               increment_targets(s) if i == 1 else None)
                    points.append({"stage": i, **r})
                stages[s["name"]] = {"student": student, "protocol": proto,
                                     "seeds": ev.analysis_seeds, "points": points}
    if "redundancy" in ev.analyses:
        with ev.timed(timings, "redundancy"):
            for s in chosen:
                red[s["name"]] = redundancy(ev, s, student, proto)
    # the relative reduction against the reference method's set of the same shape and IPC
    by_name = {s["name"]: s for s in ev.sets}
    for name, rd in red.items():
        ref = [r for n, r in red.items() if n != name and len(r["matrix"]) == len(rd["matrix"])
               and by_name[n]["method"] == ev.args.redundancy_ref
               and by_name[n]["ipc"] == by_name[name]["ipc"]]
        if ref:
            rd["ref"] = ev.args.redundancy_ref
            rd["reduction_vs_ref"] = (ref[0]["off_diagonal"] - rd["off_diagonal"]) / \
                ref[0]["off_diagonal"]
    return stages, red


def diversity(ev: Evaluation) -> dict:
    """Mean cosine to the class centroid in the teacher's features (§7.7; lower = more diverse)."""
    if "diversity" not in ev.analyses:
        return {}

    def of(x, y):
        f = common.features(ev.teacher, x.to(ev.device))
        per = common.centroid_cosine(f, y.to(ev.device), ev.info.num_classes)
        return {"per_class": per, "mean": float(np.mean(per))}
    out = {"full data": of(ev.train.x, ev.train.y)}
    for ipc in ev.ipcs:
        first = ev.draws[ipc][0]
        out[f"random-ipc{ipc}"] = of(ev.train.x[first], ev.train.y[first])
    for s in ev.sets:
        union = common.Split.cat(s["stages"])
        out[s["name"]] = of(union.x, union.y)
    return out


# --- reporting ---
def fmt(r: dict | None) -> str:
    return "–" if r is None else f"{r['mean']:.2f} ± {r['std']:.2f}"


def md_table(head: list, body: list) -> list:
    """Markdown table lines: the header, its rule, one line per row of cells."""
    lines = ["| " + " | ".join(cells) + " |" for cells in [head, *body]]
    return [lines[0], "|---" * len(head) + "|", *lines[1:]]


def write_markdown(path: Path, res: dict, sets: list):
    rows, cols = res["rows"], [(s, p) for s in res["students"] for p in res["protocols_used"]]
    find = {(r["kind"], r["set"], r["student"], r["protocol"], r["ipc"]): r for r in rows}
    lines = [f"# Evaluation `{res['name']}`: {res['dataset']}", "",
             f"Final-epoch test accuracy (%), mean ± std over student seeds {res['seeds']}; "
             f"epochs by IPC: rule `{res['epoch_rule']}` (see config.json); full data: "
             f"{res['full_epochs']} epochs. Nothing selected on the test split. DD-Ranking "
             f"scores as fractions ({res['students'][0]}).", ""]
    for ipc in sorted({r["ipc"] for r in rows if r["kind"] in ("set", "random")}):
        entries = [("full", "full data", "full", None),
                   ("random", f"random (IPC {ipc})", "random", ipc)]
        entries += [("set", s["name"], s["method"], ipc) for s in sets if s["ipc"] == ipc]
        body = []
        for kind, name, method, i in entries:
            found = [find.get((kind, name if kind == "set" else kind, s, p,
                               i if i else res["full_ipc"])) for s, p in cols]
            if not any(found):  # a baseline left out with --baselines
                continue
            dd = res["ddranking"].get(name) if kind == "set" else None
            dd_cells = [f"{dd[k]:+.4f}" if k != "lrs" else f"{dd[k]:.4f}"
                        for k in ("hlr", "ior", "lrs")] + [dd["own_protocol"]] if dd else [""] * 4
            if any(r and r.get("same_as") for r in found):  # 02's random set = draw 0
                name += " (= the random baseline above; the set is its draw 0)"
            body.append([name, method, *map(fmt, found), *dd_cells])
        head = ["set", "method", *(f"{s} {p}" for s, p in cols), "HLR", "IOR", "LRS", "own"]
        lines += [f"## IPC {ipc}", "", *md_table(head, body), ""]
    if res["stages"]:
        lines += ["## Accuracy vs accumulated IPC (LGD Table 4)", ""]
        for name, st in res["stages"].items():
            lines.append(f"- `{name}` ({st['student']}, {st['protocol']}, seeds {st['seeds']}): "
                         + ", ".join(f"IPC {p['ipc']}: {fmt(p)}" for p in st["points"]))
        lines.append("")
    for name, rd in res["redundancy"].items():
        Ts = [f"T{b + 1}" for b in range(len(rd["matrix"]))]
        red = rd.get("reduction_vs_ref")
        lines += [f"## Redundancy `{name}` (row: student trained on increment a; column: "
                  f"accuracy on increment b)", "",
                  *md_table(["a \\ b", *Ts], [[T, *(f"{v:.1f}" for v in row)]
                                              for T, row in zip(Ts, rd["matrix"])]),
                  "", f"mean off-diagonal {rd['off_diagonal']:.2f} %; upper (earlier on later) "
                  f"{rd['upper_train_earlier_test_later']:.2f} %, lower (later on earlier) "
                  f"{rd['lower_train_later_test_earlier']:.2f} %; diagonal {rd['diagonal']:.2f} %"
                  + (f"; reduction vs `{rd['ref']}`: {100 * red:.1f} %" if red is not None
                     else ""), ""]
    if res["diversity"]:
        lines += ["## Diversity: mean cosine to the class centroid, teacher penultimate "
                  "features (lower = more diverse)", "",
                  *md_table(["set", "mean", "per class"],
                            [[k, f"{d['mean']:.4f}", " ".join(f"{v:.3f}" for v in d["per_class"])]
                             for k, d in res["diversity"].items()])]
    path.write_text("\n".join(lines) + "\n")


def write_plots(out: Path, res: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name: str):
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, st in res["stages"].items():
        ax.errorbar([p["ipc"] for p in st["points"]], [p["mean"] for p in st["points"]],
                    [p["std"] for p in st["points"]], marker="o", capsize=3, label=name)
    first = [r for r in res["rows"] if r["student"] == res["students"][0]
             and r["protocol"] == res["protocols_used"][0]]
    for kind, marker in (("set", "s"), ("random", "x")):
        pts = sorted((r["ipc"], r["mean"], r["std"]) for r in first if r["kind"] == kind)
        if pts:
            ax.errorbar(*zip(*pts), fmt=marker, capsize=3,
                        label="distilled (final)" if kind == "set" else "random real")
    for r in first:
        if r["kind"] == "full":
            ax.axhline(r["mean"], ls="--", c="k", label="full data")
    ax.set(xlabel="images per class", ylabel="test accuracy (%)", title="accuracy vs IPC")
    ax.legend(fontsize=7)
    save(fig, "acc_vs_ipc.png")
    if res["redundancy"]:  # LGD Fig. 1-2: one heatmap per set, side by side
        k = len(res["redundancy"])
        fig, axes = plt.subplots(1, k, figsize=(3.6 * k, 3.4), squeeze=False)
        for ax, (name, rd) in zip(axes[0], res["redundancy"].items()):
            M = np.array(rd["matrix"])  # row a: trained on increment a; column b: tested on b
            ax.imshow(M, vmin=0, vmax=100, cmap="viridis")
            for (a, b), v in np.ndenumerate(M):
                ax.text(b, a, f"{v:.0f}", ha="center", va="center",
                        color="w" if v < 60 else "k", fontsize=8)
            ticks = [f"T{i + 1}" for i in range(len(M))]
            ax.set(xticks=range(len(M)), yticks=range(len(M)), xticklabels=ticks,
                   yticklabels=ticks, xlabel="test increment", ylabel="train increment",
                   title=f"{name}\noff-diagonal {rd['off_diagonal']:.1f} %")
        save(fig, "redundancy.png")
    if res["diversity"]:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        k = len(res["diversity"])
        for i, (name, d) in enumerate(res["diversity"].items()):
            ax.bar(np.arange(len(d["per_class"])) + (i - k / 2 + 0.5) * 0.8 / k, d["per_class"],
                   0.8 / k, label=name)
        ax.set(xlabel="class", ylabel="mean cosine to centroid",
               title="intra-class similarity (lower = more diverse)")
        ax.set_ylim(bottom=min(min(d["per_class"]) for d in res["diversity"].values()) - 0.05)
        ax.legend(fontsize=7)
        save(fig, "diversity.png")


def write_csv(path: Path, rows: list):
    keys = ["kind", "set", "method", "ipc", "student", "protocol", "epochs", "mean", "std", "n",
            "accs", "seeds"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r[k] for k in keys if k in r}, "n": len(r["accs"]),
                        "accs": ";".join(f"{a:.2f}" for a in r["accs"]),
                        "seeds": ";".join(map(str, r["seeds"]))})


def main():
    args = parse_args()
    device, ctx = common.setup_device(args.device, args.amp, args.compile)
    t_start, load_start = time.time(), common.load_average()
    ev = Evaluation(args, device, ctx)  # every input checked before anything is written
    r = common.ranks()
    if not ev.sets and r.main:
        print(f"no distilled sets under {ev.run}/distilled yet: evaluating the baselines only")
    # rank 0 holds the folder's lock, writes its config.json and draws the random subsets;
    # every rank gets the draws and which sets are the baseline's draw 0
    shared = r.on_main(lambda: ev.start() or (ev.draws, [s["baseline_draw"] for s in ev.sets]))
    ev.draws = shared[0]
    for s, same in zip(ev.sets, shared[1]):
        s["baseline_draw"] = same
    timings = common.Timings(ev.run)
    if r.main:
        common.machine_speed(ev.run)
        timings.add(f"03/{args.name}/inputs", time.time() - t_start, load_start)
    if r.world > 1:  # torchrun: the students spread over the ranks, rank 0 writes the results
        t0, load0 = time.time(), common.load_average()
        train_shares(ev)
        if not r.main:
            return
        # the steps below find these students in the cache: their time is this phase's
        timings.add(f"03/{args.name}/students on {r.world} ranks", time.time() - t0, load0,
                    students_trained=len(ev.fresh))
    with ev.timed(timings, "baselines"):
        rows = baseline_rows(ev)
    with ev.timed(timings, "sets"):
        rows += set_rows(ev, rows)
    stages, red = increment_analyses(ev, timings)
    with timings.phase(f"03/{args.name}/diversity") if "diversity" in ev.analyses \
            else nullcontext():
        div = diversity(ev)
    info, metrics = ev.info, ev.run / "teacher" / "metrics.json"
    res = {"name": args.name, "dataset": info.name, "students": ev.students,
           "protocols": ev.protocols, "protocols_used": ev.used,
           "protocol_settings": {p: asdict(ev.proto[p]) for p in ev.used}, "seeds": ev.seeds,
           "epoch_rule": ev.rule, "full_epochs": ev.full_epochs,
           "full_ipc": len(ev.train.y) // info.num_classes,
           "selection": "none: fixed epochs and learning rate, final-epoch accuracy on the test "
                        "split",
           "rows": rows, "ddranking": ddranking_scores(ev, rows), "stages": stages,
           "redundancy": red, "diversity": div,
           "sets": [{k: s[k] for k in ("name", "folder", "method", "ipc", "stage_ipcs", "own",
                                       "baseline_draw")} for s in ev.sets],
           "teacher_test_acc": common.read_json(metrics)["test_acc"] if metrics.exists() else None,
           "versions": common.versions(), "git_commit": common.git_commit(),
           "device": str(device), "students_trained": ev.trained, "students_reused": ev.reused,
           "wall_s": time.time() - t_start}
    write_csv(ev.out / "results.csv", rows + [p for v in stages.values() for p in v["points"]])
    write_markdown(ev.out / "results.md", res, ev.sets)
    write_plots(ev.out, res)
    common.write_json(ev.out / "results.json", res)  # last: the evaluation is finished
    timings.report("03")
    print(f"03 done in {time.time() - t_start:.0f} s: {ev.trained} students trained, "
          f"{ev.reused} reused; results in {ev.out}")


if __name__ == "__main__":
    common.cli(main)
