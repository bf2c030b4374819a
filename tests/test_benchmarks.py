"""benchmarks/bench_delt.py, bench_02.py and bench_03.py at tiny settings on the tiny run of 01, so
that they cannot rot: each runs as a user would and what it prints and writes is checked."""
import json
import re

import pytest

from conftest import ROOT, python


def bench(script, *args):
    p = python(ROOT / "benchmarks" / script, *args)
    assert p.returncode == 0, f"{script} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def test_bench_delt_tiny(tiny_run, tmp_path):
    """IPC 2, MI 4 / RI 2: groups of 1 image joining at 0 and 2, so EarlyLate costs (4 + 2) / (2 * 4)
    = 75 % of the constant schedule's image-iterations; the run folder is only read."""
    run = tiny_run[0]
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    work = tmp_path / "work"
    out = bench("bench_delt.py", "--run", run, "--work", work, "--ipc", 2, "--iterations", 4,
                "--round-iterations", 2)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert out.count("load average at") == 2
    assert re.search(r"image-iterations: EarlyLate 6 vs constant 8 per class -> ratio 0\.7500, saving 25\.0 %", out), out
    res = json.loads((work / "bench_delt.json").read_text())
    assert res["plans"]["earlylate"]["join_iterations"] == [0, 2]
    assert res["plans"]["constant"]["join_iterations"] == [0, 0]
    assert [(g["join"], g["iterations"], g["images_per_class"]) for g in res["groups"]] == [(0, 4, 1), (2, 2, 1)]
    assert all(res["optimisation_s"][s] > 0 and res["wall_s"][s] > 0 for s in ("earlylate", "constant"))
    assert res["saving_optimisation"] == pytest.approx(1 - res["optimisation_s"]["earlylate"]
                                                       / res["optimisation_s"]["constant"])
    # the optimisation moved the pixels of every group and of the constant set
    assert all(g["dist_to_init"] > 0 for g in res["groups"]) and res["constant_dist_to_init"] > 0
    assert set(res["diversity"]) == {"earlylate", "constant", "median_real"}
    assert all(-1 <= v <= 1 for v in res["diversity"].values())
    assert all(0 <= v <= 100 for v in res["accuracy_teacher"].values())
    for k in res["diversity"]:
        assert re.search(rf"^  {k}\s+{res['diversity'][k]:.4f}", out, re.M), (k, out)
    assert (work / "delt_grid.png").stat().st_size > 0
    for s in ("earlylate", "constant"):  # 02 wrote complete sets where --out said
        assert len(list((work / s).glob("stage_*/manifest.json"))) == (2 if s == "earlylate" else 1)


def test_bench_02_tiny(tiny_run, tmp_path):
    out = bench("bench_02.py", "--run", tiny_run[0], "--out", tmp_path / "b02", "--ipc", 4, "--stages", 2,
                "--steps", 4, "--per-class", 1, "--extra", "--sample-steps 4 --sample-batch 30",
                "--guided-extra", "--guide-epochs 2 --guide-model convnet-1")
    secs = dict(re.findall(r"^  (plain|guided|guided, eps const)\s+([\d.]+) s/sample", out, re.M))
    assert set(secs) == {"plain", "guided", "guided, eps const"}, out
    assert all(float(v) > 0 for v in secs.values())
    for m in ("dit", "lgd", "acs"):
        assert f"02 --method {m} --ipc 4:" in out
        assert len(list((tmp_path / "b02" / "distilled" / f"{m}-ipc4").glob("stage_*/manifest.json"))) == 2
    lgd = re.findall(r"^\s+2\s+(-?[\d.]+)\s+(-?[\d.]+)\s+([\d.]+) %$", out, re.M)
    assert len(lgd) == 1, out  # stage 2: S of lgd and dit images, f_cur accuracy
    acc = re.findall(r"^  (dit|lgd|acs)\s+([\d. ]+)\s+all ([\d.]+) %$", out, re.M)
    assert [a[0] for a in acc] == ["dit", "lgd", "acs"] and all(0 <= float(a[2]) <= 100 for a in acc)
    assert re.search(r"^  2: [\d. ]+/[\d. ]+/[\d. ]+\s+reference loss [\d.]+$", out, re.M), out
    assert out.count("load average") >= 2


def test_bench_03_tiny(tiny_run):
    out = bench("bench_03.py", "--run", tiny_run[0], "--ipc", 5, "--extra",
                "--students convnet-1 --seeds 2 --epochs 2 --batch-size 500")
    m = re.search(r"bench-eval: one method, IPC 5, 2 seeds, convnet-1 hard, 2 epochs: ([\d.]+) ± ([\d.]+) %; "
                  r"training (\d+) s, whole 03 call (\d+) s", out)
    assert m, out
    assert 0 <= float(m[1]) <= 100 and float(m[2]) >= 0 and int(m[4]) >= int(m[3])
    assert out.startswith("start: load average") and "end: load average" in out
