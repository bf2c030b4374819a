"""report.py on the notebooks' shared ci run: every number it writes is the one in the JSON file it
came from, the README's table is the report's, and a second run changes nothing."""
import json
import re
import shutil
import sys

import pytest

from conftest import ROOT, assert_user_error, python

sys.path.insert(0, str(ROOT / "notebooks"))
import nb  # noqa: E402
import report  # noqa: E402

# what report.py reads: copied out of the shared run first, so that notebooks adding sets or
# evaluations to it meanwhile cannot make the report and this test read different files
READS = ["*/config.json", "*/*/config.json", "*/metrics.json", "timings.json", "machine.json",
         "eval/*/results.json", "eval/default/*.png", "dit/samples.png",
         "*/*/stage_*/manifest.json"]


def block(path) -> str:
    """The generated text of a file: between its report markers."""
    return path.read_text().split(report.BEGIN)[1].split(report.END)[0]


def cells(text: str, title: str = "") -> dict:
    """The table of a text (of its `## title` section): first cell -> the row's cells."""
    part = text.split(f"## {title}\n")[1].split("\n## ")[0] if title else text
    return {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")]
                              for line in part.splitlines() if line.startswith("| "))}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The ci run's files report.py reads, and copies of docs/results.md and README.md made
    from them by report.py, twice."""
    if nb.SCALE != "ci":
        pytest.skip("builds the notebooks' ci run: runs under `make test` (DD_NB_SCALE=ci)")
    nb.evaluation()  # the ci run with 03's main evaluation: built here if no notebook has yet
    tmp = tmp_path_factory.mktemp("report")
    for pattern in READS:
        for f in nb.RUN.glob(pattern):
            (tmp / "run" / f.relative_to(nb.RUN)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, tmp / "run" / f.relative_to(nb.RUN))
    shutil.copy(ROOT / "README.md", tmp / "README.md")
    shutil.copy(ROOT / "docs" / "results.md", tmp / "results.md")
    texts = []
    for _ in range(2):
        p = python(ROOT / "report.py", "--run", tmp / "run", "--out", tmp / "results.md",
                   "--readme", tmp / "README.md")
        assert p.returncode == 0, p.stderr[-2000:]
        texts.append(((tmp / "results.md").read_text(), (tmp / "README.md").read_text()))
    assert texts[0] == texts[1], "a second report.py on the same run changed the files"
    return tmp


def floats(obj):
    """Every float in a JSON value."""
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from floats(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from floats(v)


def load(run, pattern) -> list:
    return [json.loads(f.read_text()) for f in sorted(run.glob(pattern))]


def test_every_number_from_the_run(made):
    """Each decimal in the generated text is a value of the run's JSON files (or one computed
    from them: a difference, minutes, a weighted mean) or a paper's number."""
    run = made / "run"
    sources = load(run, "eval/*/results.json") + load(run, "*/metrics.json") + \
        load(run, "timings.json") + load(run, "machine.json") + \
        load(run, "*/*/stage_*/manifest.json")
    values = [v for s in sources for v in floats(s)]
    results = load(run, "eval/default/results.json") + load(run, "eval/ablations/results.json")
    rows = [r for res in results for r in res["rows"]]
    for r in rows:  # each set's difference to the random subset of its IPC
        values += [r["mean"] - b["mean"] for b in rows if b["kind"] == "random" and
                   (b["ipc"], b["student"], b["protocol"]) == (r["ipc"], r["student"],
                                                                r["protocol"])]
    phases = load(run, "timings.json")[0].values()
    values += [e["seconds"] / 60 for e in phases] + [sum(e["seconds"] for e in phases)]
    values += [sum(e["seconds"] for e in phases) / 60]
    for d in run.glob("*/*"):  # the teacher's accuracy on a whole set, weighted by stage size
        ms = load(d, "stage_*/manifest.json")
        if ms:
            n = [sum(m["counts"].values()) for m in ms]
            values.append(sum(m["reference_acc"] * c for m, c in zip(ms, n)) / sum(n))
    values += [100 * rd.get("reduction_vs_ref", 0.0) for res in results
               for rd in res.get("redundancy", {}).values()]
    allowed = {f"{abs(v):.{k}f}" for v in values for k in (1, 2, 3, 4)}
    papers = " ".join([*report.PAPERS.values(), report.PAPER_REDUNDANCY, report.PAPER_DIVERSITY])
    allowed |= set(re.findall(r"\d+\.\d+", papers))
    text = re.sub(r"`[^`]*`|!\[[^]]*\]\([^)]*\)|§[\d.]+", "", block(made / "results.md"))
    found = re.findall(r"\d+\.\d+", text)
    assert found, "no numbers in the report"
    assert not [t for t in found if t not in allowed], "numbers not from the run"


def test_main_table(made):
    """Each cell of the README's table is mean ± std of the result of its row and IPC, and the
    difference to the random real subset; the README's block is the report's main table."""
    res = json.loads((made / "run" / "eval/default/results.json").read_text())
    abl = made / "run" / "eval/ablations/results.json"  # `make demo`'s ablation, if it ran
    ablations = json.loads(abl.read_text())["rows"] if abl.exists() else []
    readme = block(made / "README.md")
    assert readme.strip() in block(made / "results.md")
    table = cells(readme)
    head = table.pop("set")
    student, proto = res["students"][0], res["protocols_used"][0]
    rows = [r for r in res["rows"] + [{**r, "ablation": True} for r in ablations
                                      if r["kind"] == "set"]
            if (r["student"], r["protocol"]) == (student, proto)]
    rand = {r["ipc"]: r["mean"] for r in rows if r["kind"] == "random"}
    checked = set()
    for r in rows:
        if r.get("same_as"):
            continue
        if r["kind"] == "full":
            name, col = f"full data ({r['ipc']} per class, {r['epochs']} epochs)", 1
        else:
            name = "random real" if r["kind"] == "random" else \
                "`" + re.sub(r"-ipc\d+$", "", r["set"]) + "`" + " (ablation)" * ("ablation" in r)
            col = head.index(f"IPC {r['ipc']} ({r['epochs']} epochs)")
        want = f"{r['mean']:.2f} ± {r['std']:.2f}"
        if r["kind"] == "set":
            want += f" ({r['mean'] - rand[r['ipc']]:+.2f})"
        assert table[name][col] == want, (name, head[col])
        checked.add(name)
    assert checked == set(table), "rows in the table that no result of 03 fills"


def test_bad_run(tmp_path):
    """A missing run, or one without 03's results, is one `error:` line."""
    for run in (tmp_path / "missing", tmp_path):
        p = python(ROOT / "report.py", "--run", run, "--out", tmp_path / "r.md",
                   "--readme", tmp_path / "README.md")
        assert_user_error(p, "results.json is missing")
    assert not (tmp_path / "r.md").exists()


def test_other_tables(made):
    """The rows of the timings, the teacher's accuracy on each set, redundancy and diversity
    hold their JSON values at their places."""
    run, text = made / "run", block(made / "results.md")
    timings = cells(text, "Where the time went")
    for phase, e in load(run, "timings.json")[0].items():
        assert timings[phase][1:4] == [f"{e['seconds'] / 60:.1f}", f"{e['seconds']:.0f}",
                                       f"{e['load_start']:.2f} -> {e['load_end']:.2f}"], phase
    speed = load(run, "machine.json")[0]  # the machine line above the table
    assert f"matmul {speed['matmul_gflops']} GFLOP/s" in text.split("## Where the time went")[1]
    valid = cells(text, "The teacher's accuracy on each set (valid %)")
    for d in [*sorted(run.glob("distilled/*")), *sorted(run.glob("ablations/*"))]:
        ms = load(d, "stage_*/manifest.json")
        if ms:
            n = [sum(m["counts"].values()) for m in ms]
            whole = sum(m["reference_acc"] * c for m, c in zip(ms, n)) / sum(n)
            assert valid[f"`{d.name}`"][1:len(ms) + 1] == [f"{m['reference_acc']:.1f}"
                                                           for m in ms], d.name
            assert valid[f"`{d.name}`"][-1] == f"{whole:.1f}", d.name
    res = load(run, "eval/default/results.json")[0]
    if res["redundancy"]:
        red = cells(text, "Redundancy between increments")
        for name, r in res["redundancy"].items():
            assert red[f"`{name}`"][1:3] == [f"{r['off_diagonal']:.2f}", f"{r['diagonal']:.2f}"]
    if res["diversity"]:
        div = cells(text, "Diversity")
        for name, d in res["diversity"].items():
            assert div[f"`{name}`"][1] == f"{d['mean']:.3f}", name
