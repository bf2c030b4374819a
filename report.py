"""Render a finished run's numbers as markdown: docs/results.md and the README's results table.

Reads:  <run>/ of `make demo`: eval/default/ and eval/ablations/ results.json (03), timings.json,
        metrics.json of teacher/ dit/ surrogate/ (01), the sets' stage_XX/manifest.json (02) and
        every config.json (git commit, device). Only the papers' numbers are typed (PAPERS).
Writes: the text between `<!-- report:begin -->` and `<!-- report:end -->` of --out (all tables)
        and of --readme (the main table), keeping the rest; the run's figures into <out>/../figures.
Example: python report.py --run runs/mnist5k     # = make report; make demo ends with it
"""
import argparse
import re
import shutil
from pathlib import Path

import common

BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"
IPC = re.compile(r"-ipc\d+$")  # a set's folder name without it names the main table's row
# the papers' numbers as docs/methods.md §9 cites them (best epoch on test), in the table's order
PAPERS = {
    "full": "99.6: all 60,000 MNIST digits, ConvNet-3 (classic anchors, §9)",
    "random": "95.1: MNIST IPC 10, ConvNet-3 (classic anchors, §9)",
    "dit": "73.6: ImageNette IPC 50, ResNetAP-10, hard (LGD paper, its DiT baseline)",
    "lgd": "84.3 ± 0.5: ImageNette IPC 50, ResNetAP-10, hard (LGD paper)",
    "acs": "+4.1 ImageWoof, +2.1 ImageNet-1K points over the previous best (ACS paper)",
    "igd": "82.5: ImageNette IPC 50, ResNetAP-10, hard (LGD paper, its IGD baseline)",
    "delt": "66.0 / 88.2: ImageNette IPC 10 / 50, ResNet-18, soft (DELT paper)",
}
PAPER_REDUNDANCY = "LGD Fig. 2, ImageNette IPC 50: DiT 94.7, IGD 87.1, LGD 57.65 % (§7.6)"
PAPER_DIVERSITY = "DELT Fig. 2, ImageNet-1K IPC 50: DELT ≈ 0.87, CDA ≈ 0.915, SRe2L ≈ 0.93"


def table(head: list, rows: list) -> list:
    """A markdown table as a list of lines."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def section(title: str, note: str, head: list, rows: list) -> list:
    """A `## title` section: one paragraph, then a table; nothing without rows."""
    return [f"## {title}", "", note, ""] + table(head, rows) + [""] if rows else []


def read(path: Path) -> dict:
    """A JSON file of the run, or {} where the run has none."""
    return common.read_json(path) if path.exists() else {}


def acc(r: dict) -> str:
    return f"{r['mean']:.2f} ± {r['std']:.2f}"


def main_tables(res: dict, ablations: dict) -> list:
    """One table per student and protocol: every set and baseline by IPC, the papers' beside."""
    rows = res["rows"] + [{**r, "ablation": True} for r in ablations.get("rows", [])
                          if r["kind"] == "set"]
    rows.sort(key=lambda r: ("ablation" in r, list(PAPERS).index(r["method"])
                             if r["method"] in PAPERS else len(PAPERS)))  # stable
    ipcs = sorted({r["ipc"] for r in rows if r["kind"] != "full"})
    epochs = {r["ipc"]: r["epochs"] for r in rows if r["kind"] != "full"}
    tables = []
    for student, proto in [(s, p) for s in res["students"] for p in res["protocols_used"]]:
        mine = [r for r in rows if (r["student"], r["protocol"]) == (student, proto)
                and not r.get("same_as")]  # 02's random set is the baseline's draw 0
        rand = {r["ipc"]: r["mean"] for r in mine if r["kind"] == "random"}
        body = {}  # row -> cells: a set's row drops its IPC; the full data take the first column
        for r in mine:
            name = {"full": f"full data ({r['ipc']} per class, {r['epochs']} epochs)",
                    "random": "random real"}.get(r["kind"], f"`{IPC.sub('', r['set'])}`")
            if "ablation" in r:
                name += " (ablation)"
            cells = body.setdefault(name, [""] * len(ipcs) + [
                "" if "ablation" in r else PAPERS.get(r["method"], "")])
            diff = f" ({r['mean'] - rand[r['ipc']]:+.2f})" if r["kind"] == "set" and \
                r["ipc"] in rand else ""
            cells[0 if r["kind"] == "full" else ipcs.index(r["ipc"])] = acc(r) + diff
        head = ["set", *[f"IPC {i} ({epochs[i]} epochs)" for i in ipcs], "papers (their data "
                "and students, best epoch on test)"]
        seeds = ", ".join(map(str, res["seeds"]))
        tables.append([f"**{student}, {proto} labels** on {res['dataset']}: final-epoch test "
                       f"accuracy (%), mean ± std over seeds {seeds} (§7); in brackets the "
                       f"difference to the random real subset of that IPC.", ""]
                      + table(head, [[name] + cells for name, cells in body.items()]))
    return tables


def reference_accuracy(run: Path) -> list:
    """The teacher's accuracy (%) on every stage of every set, from 02's manifests."""
    sets = {}  # set -> its manifests in stage order
    for top in ("distilled", "ablations"):  # the main sets first
        for p in sorted(run.glob(f"{top}/*/stage_*/manifest.json")):
            sets.setdefault(p.parent.parent.name, []).append(common.read_json(p))
    k, rows = max(map(len, sets.values()), default=0), []
    for name, ms in sets.items():
        n = [sum(m["counts"].values()) for m in ms]
        whole = sum(m["reference_acc"] * c for m, c in zip(ms, n)) / sum(n)
        rows.append([f"`{name}`"] + [f"{m['reference_acc']:.1f}" for m in ms] +
                    [""] * (k - len(ms)) + [f"{whole:.1f}"])
    return section("The teacher's accuracy on each set (valid %)", "Teacher top-1 (%) on the "
                   "images of each stage (02's manifests) and of the whole set.",
                   ["set"] + [f"stage {i + 1}" for i in range(k)] + ["set"], rows)


def analyses(res: dict) -> list:
    """03's redundancy (LGD Fig. 2) and diversity (DELT Fig. 2), where it ran them."""
    red = [[f"`{n}`", f"{r['off_diagonal']:.2f}", f"{r['diagonal']:.2f}",
            f"{100 * r['reduction_vs_ref']:.1f} % vs `{r['ref']}`" if "ref" in r else ""]
           for n, r in res["redundancy"].items()]
    return section("Redundancy between increments", "Accuracy (%) on increment b of a student "
                   f"trained on increment a alone (§7.6). Paper: {PAPER_REDUNDANCY}.",
                   ["set", "mean off-diagonal", "diagonal", "reduction"], red) + \
        section("Diversity", "Mean cosine to the class centroid in the teacher's features, lower "
                f"= more diverse (§7.7). Paper: {PAPER_DIVERSITY}.", ["set", "cosine to centroid"],
                [[f"`{n}`", f"{d['mean']:.3f}"] for n, d in res["diversity"].items()])


def prior(run: Path) -> list:
    """01's teacher, prior and surrogate numbers."""
    t, d, s = (read(run / f / "metrics.json") for f in ("teacher", "dit", "surrogate"))
    v, x = d.get("vae"), d.get("distillability")
    rows = [[f"teacher `{t['model']}`, {t['epochs']} epochs: test accuracy",
             f"{t['test_acc']:.2f} % ({t['wall_s']:.1f} s)"]] if t else []
    rows += [[f"VAE, width {v['width']}, {v['steps']} steps of {v['batch']}: reconstruction MSE, "
              f"scaling factor", f"{v['recon_mse']:.4f}, {v['scaling_factor']:.3f} "
              f"({v['train_s']:.1f} s)"]] if v else []
    rows += [["DiT prior: parameters, training time", f"{d['parameters']:,}, {d['train_s']:.1f} s"],
             [f"sample check: teacher top-1 on {d['samples_per_class']} samples per class, CFG "
              f"{d['cfg']:.1f}, {d['sample_steps']} DDPM steps", f"{d['sample_acc']:.1f} %"]
             ] if d else []
    rows += [[f"distillability: `{x['student']}`, {x['protocol']} labels, {x['epochs']} epochs, "
              f"on the first {x['ipc']} samples per class vs random real",
              f"{acc(x['samples'])} vs {acc(x['random_real'])} ({x['gap']:+.2f})"]] if x else []
    rows += [[f"IGD surrogate `{s['model']}`, {s['epochs']} epochs: test accuracy at each kept "
              f"epoch", ", ".join(f"{int(k.split('_')[1])}: {a:.1f}"
                                  for k, a in s["checkpoint_test_acc"].items())]] if s else []
    return section("The teacher and the prior (01)", "From 01's metrics.json files.",
                   ["quantity", "measured"], rows)


def timings(run: Path) -> list:
    """Every phase of timings.json and the machine's speed, as `make timings` prints them."""
    if not (run / common.TIMINGS).exists():
        return []
    return ["## Where the time went", "", common.timings_table(run), ""]


def provenance(run: Path) -> list:
    """Which code, device and precision made each folder of the run (its config.json)."""
    made = {}
    for f in sorted(run.glob("*/config.json")) + sorted(run.glob("*/*/config.json")):
        c = common.read_json(f)
        if "git_commit" in c:  # a config.json of ours, not of a diffusers model
            made.setdefault(f"commit `{str(c['git_commit'])[:10]}`, `{c['device']}` `"
                            f"{c.get('device_name') or '-'}`, amp {c['amp']} / {c['amp_prior']}, "
                            f"compile {c['compile']}", []).append(f"`{f.parent.relative_to(run)}`")
    return ["## Made by", ""] + [f"- {k}: {', '.join(v)}" for k, v in made.items()] + [""]


def splice(path: Path, text: str):
    """Put text between the markers of path (a new file if missing), keeping the rest."""
    old = path.read_text() if path.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in old or END not in old:
        raise common.UserError(f"{path} has no {BEGIN} ... {END} markers to write between")
    path.write_text(old.split(BEGIN)[0] + f"{BEGIN}\n{text.strip()}\n{END}" + old.split(END)[1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="the run folder of make demo")
    p.add_argument("--out", type=Path, default=Path("docs/results.md"))
    p.add_argument("--readme", type=Path, default=Path("README.md"))
    args = p.parse_args()
    path = args.run / "eval" / "default" / "results.json"
    if not path.exists():
        raise common.UserError(f"{path} is missing: --run takes a run of make demo whose 03 ended")
    res = common.read_json(path)
    tables = main_tables(res, read(args.run / "eval" / "ablations" / "results.json"))
    figures = [str(f.relative_to(args.run)) for f in sorted(args.run.glob("eval/default/*.png"))
               + sorted(args.run.glob("dit/samples.png"))]
    for f in figures:  # copied beside the report, so that its links work in the repository
        (args.out.parent / "figures").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.run / f, args.out.parent / "figures" / f.replace("/", "_"))
    body = [f"Made by `python report.py --run {args.run}` (`make report`); edits are lost.", "",
            "## Main results", ""] + [line for t in tables for line in t + [""]] + \
        analyses(res) + reference_accuracy(args.run) + prior(args.run) + timings(args.run) + \
        provenance(args.run) + ["## Figures", ""] + \
        [f"![{f}](figures/{f.replace('/', '_')})" for f in figures]
    splice(args.out, "\n".join(body))
    splice(args.readme, "\n".join(tables[0]))
    print(f"report: {args.out} and {args.readme} from {args.run}")


if __name__ == "__main__":
    common.cli(main)
