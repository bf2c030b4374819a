"""03_evaluate.py: deterministic students, random baseline, DD-Ranking, redundancy, end to end,
bad input."""
import json
import math
import shutil

import pytest
import torch

import common
from conftest import assert_user_error, run_script, write_set

TINY = ["--students", "convnet-1", "--seeds", "2", "--epochs", "2", "--full-epochs", "1",
        "--batch-size", "500"]


@pytest.fixture(scope="module")
def data():
    return common.load_dataset("mnist5k")


@pytest.fixture
def run(tmp_path, data):
    """A run folder as 01 leaves it, with an untrained convnet-1-bn standing in for the teacher."""
    info, train, _ = data
    run = tmp_path / "run"
    common.write_json(run / "dataset.json", info.to_dict())
    torch.manual_seed(0)
    common.save_classifier(run / "teacher" / "teacher.pt", common.build_model("convnet-1-bn", info),
                           "convnet-1-bn", info)
    common.write_json(run / "teacher" / "config.json", {"args": {"epochs": 1}})
    common.write_json(run / "teacher" / "metrics.json", {"test_acc": 10.0})  # a finished teacher
    return run


def test_same_seed_same_student(data):
    info, train, test = data
    sub = common.Split(train.x[:40], train.y[:40])
    proto = common.Protocol("hard", batch_size=16)

    def fit(seed):
        torch.manual_seed(seed)
        m = common.fit(common.build_model("convnet-1", info), sub, info, proto, epochs=3, seed=seed,
                       progress=False)
        return m.state_dict(), common.accuracy(m, test)
    (w0, a0), (w0b, a0b), (w1, _) = fit(0), fit(0), fit(1)
    assert a0 == a0b and all(torch.equal(w0[k], w0b[k]) for k in w0)
    assert not all(torch.equal(w0[k], w1[k]) for k in w0)


def test_batched_augmentations():
    x = torch.rand(8, 1, 28, 28)
    # full crop = identity
    assert torch.allclose(common.random_resized_crop(x, (1.0, 1.0), (1.0, 1.0)), x, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    assert not torch.allclose(common.random_resized_crop(x, (0.3, 0.3), gen=g), x, atol=1e-2)
    # one box for the whole batch (DELT's code): equal inputs give equal crops
    shared = common.random_resized_crop(x[:1].repeat(4, 1, 1, 1), (0.08, 1.0), gen=g,
                                        per_sample=False)
    assert torch.allclose(shared, shared[:1].expand_as(shared))
    flipped = common.random_resized_crop(x, (1.0, 1.0), (1.0, 1.0), gen=g, flip=True)
    assert all(torch.allclose(f, i, atol=1e-5) or torch.allclose(f, i.flip(2), atol=1e-5)
               for f, i in zip(flipped, x)) and not torch.allclose(flipped, x, atol=1e-5)
    imgs = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 28, 28)  # image i is the constant i
    for _ in range(5):
        mixed, partner, lam = common.cutmix(imgs, 1.0, g)
        # (8,) fraction of each image left untouched
        kept = (mixed == imgs).float().mean((1, 2, 3))
        moved = partner != torch.arange(8)
        assert torch.allclose(kept[moved], torch.full_like(kept[moved], lam), atol=1e-6)
        assert torch.equal(mixed[~moved], imgs[~moved])


def test_soft_protocol_needs_and_uses_teacher(data):
    info, train, _ = data
    sub = common.Split(train.x[:32], train.y[:32])
    teacher = common.build_model("convnet-1-bn", info).eval()
    with pytest.raises(ValueError):
        common.fit(common.build_model("convnet-1", info), sub, info, common.Protocol("soft"),
                   epochs=1, seed=0, progress=False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    common.fit(common.build_model("convnet-1", info), sub, info, common.Protocol("soft"), epochs=1,
               seed=0, teacher=teacher, progress=False)
    # frozen, BN stats too
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_class_permutations_give_balanced_disjoint_seeded_blocks(data):
    """The blocks 02's random stages and 03's random draws take: balanced, disjoint, seeded."""
    info, train, _ = data
    perms = common.class_permutations(train.y, 10, seed=5)
    draws = [torch.cat([p[k * 7:(k + 1) * 7] for p in perms]) for k in range(3)]
    for d in draws:
        assert torch.bincount(train.y[d], minlength=10).tolist() == [7] * 10
    assert len(set(torch.cat(draws).tolist())) == 3 * 70  # disjoint across blocks
    again = common.class_permutations(train.y, 10, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(again, perms))
    other = common.class_permutations(train.y, 10, seed=6)
    assert not torch.equal(other[0], perms[0])


def test_epoch_rules():
    assert [common.epochs_for(i, "paper") for i in (1, 10, 11, 50, 100, 500)] == \
        [2000, 2000, 1500, 1500, 1000, 1000]
    assert [common.epochs_for(i, "small") for i in (10, 50, 200)] == [80, 40, 30]
    assert common.epochs_for(50, "7") == 7


def test_redundancy_of_a_set_with_itself(run, data):
    """Every increment holds the same images: each row is constant, the diagonal is the
    training accuracy."""
    info, train, _ = data
    write_set(run / "distilled" / "dit-ipc6", train, info, "dit", [2, 2, 2], repeat_first=True)
    run_script("03_evaluate.py", "--run", run, "--students", "convnet-1", "--seeds", "1",
               "--epochs", "40", "--batch-size", "32", "--baselines", "none",
               "--analyses", "redundancy")
    rd = json.loads((run / "eval" / "default" / "results.json").read_text())["redundancy"]
    M = torch.tensor(rd["dit-ipc6"]["matrix"])
    assert M.shape == (3, 3)
    assert torch.equal(M, M[:, :1].expand(3, 3))  # same images, same accuracy in every column
    d = rd["dit-ipc6"]
    assert d["diagonal"] == d["off_diagonal"] and d["diagonal"] >= 90  # fits its 20 images


def test_end_to_end_writes_all_outputs(run, data):
    info, train, _ = data
    write_set(run / "distilled" / "dit-ipc4", train, info, "dit", [2, 2], seed=1)
    write_set(run / "distilled" / "lgd-ipc4", train, info, "lgd", [2, 2], seed=2)
    write_set(run / "distilled" / "delt-ipc4", train, info, "delt", [2, 2], seed=3)
    p = run_script("03_evaluate.py", "--run", run, *TINY)
    out = run / "eval" / "default"
    for f in ("config.json", "results.json", "results.csv", "results.md", "acc_vs_ipc.png",
              "diversity.png", "redundancy.png"):
        assert (out / f).exists(), f
    assert (run / "eval" / "cache" / "random_ipc4_seed0.json").exists()
    res = json.loads((out / "results.json").read_text())
    kinds = {(r["kind"], r["set"], r["protocol"]) for r in res["rows"]}
    assert {("full", "full", "hard"), ("random", "random", "hard"), ("random", "random", "soft"),
            ("set", "dit-ipc4", "hard"), ("set", "delt-ipc4", "soft")} <= kinds
    assert all(len(r["accs"]) == 2 and r["seeds"] == [0, 1]
               for r in res["rows"] if r["kind"] != "stage")
    assert res["ddranking"]["delt-ipc4"]["own_protocol"] == "soft"
    assert "lrs" in res["ddranking"]["dit-ipc4"]
    for dd in res["ddranking"].values():  # HLR, IOR and LRS as DD-Ranking defines them
        i = dd["inputs"]
        assert dd["hlr"] == pytest.approx(i["full_hard"] - i["syn_hard"])
        assert dd["ior"] == pytest.approx(i["syn_own"] - i["random_own"])
        alpha = (dd["ior"] - dd["hlr"]) / 2
        assert dd["lrs"] == pytest.approx((math.exp(alpha) - math.exp(-1))
                                          / (math.e - math.exp(-1)))
    assert len(res["redundancy"]["lgd-ipc4"]["matrix"]) == 2
    assert "reduction_vs_ref" in res["redundancy"]["lgd-ipc4"]
    assert [p["ipc"] for p in res["stages"]["lgd-ipc4"]["points"]] == [2, 4]
    # join rounds, no increments
    assert "delt-ipc4" not in res["stages"] and "delt-ipc4" not in res["redundancy"]
    assert len(res["diversity"]["dit-ipc4"]["per_class"]) == 10
    md = (out / "results.md").read_text()
    assert "full data" in md and "random (IPC 4)" in md and "| dit-ipc4 |" in md
    timings = json.loads((run / "timings.json").read_text())  # where 03's time went
    assert [k for k in timings] == [f"03/default/{s}" for s in ("inputs", "baselines", "sets",
                                                                "stages", "redundancy",
                                                                "diversity")]
    assert timings["03/default/sets"]["students_trained"] == 8 and "03 timings" in p.stdout
    # a rerun of the same command reuses every cached student and reproduces the numbers
    p2 = run_script("03_evaluate.py", "--run", run, *TINY)
    assert " 0 students trained" in p2.stdout, p2.stdout[-500:]
    assert "skipped: no student trained" in p2.stdout  # timings.json keeps the first call's
    assert json.loads((run / "timings.json").read_text())["03/default/sets"] == \
        timings["03/default/sets"]
    assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]
    assert_user_error(run_script("03_evaluate.py", "--run", run, *TINY, "--seeds", "3",
                                 check=False), "--overwrite")
    # the run is read from the sets' config.json when --run is not given
    p3 = run_script("03_evaluate.py", run / "distilled" / "dit-ipc4", *TINY, "--name", "one")
    assert (run / "eval" / "one" / "results.json").exists(), p3.stdout[-300:]


def _bad_folder(kind, folder, info):
    st = folder / "stage_01"
    if kind == "missing class":
        shutil.rmtree(st / "3")
    elif kind == "unequal ipc":
        common.save_png(torch.zeros(1, 28, 28), st / "4" / "000999.png")
    elif kind == "size":
        for f in st.glob("*/*.png"):
            common.save_png(torch.zeros(1, 32, 32), f)
    elif kind == "channels":
        for f in (st / "2").iterdir():
            common.save_png(torch.zeros(3, 28, 28), f)
    elif kind == "unfinished":
        (folder / "stage_02" / "manifest.json").unlink()


@pytest.mark.parametrize("kind,fragment", [("missing class", "lacks class folders"),
                                           ("unequal ipc", "unequal images per class"),
                                           ("size", "are (1, 32, 32)"),
                                           ("channels", "has 3 channel(s)"),
                                           ("unfinished", "unfinished")])
def test_bad_folder(kind, fragment, run, data):
    info, train, _ = data
    folder = write_set(run / "distilled" / "dit-ipc2", train, info, "dit", [1, 1])
    _bad_folder(kind, folder, info)
    assert_user_error(run_script("03_evaluate.py", "--run", run, *TINY, check=False), fragment)
    assert not (run / "eval").exists()  # checked before anything is written


@pytest.mark.parametrize("flags,fragment", [
    (["--students", "convnet-1,vgg99"], "unknown model 'vgg99'"),
    (["--protocols", "hard,fuzzy"], "unknown --protocols value 'fuzzy'"),
    (["--epochs", "many"], "--epochs must be"),
    (["--seeds", "300"], "lower --seeds")])
def test_bad_flags(flags, fragment, run, data):
    info, train, _ = data
    write_set(run / "distilled" / "dit-ipc2", train, info, "dit", [1, 1])
    assert_user_error(run_script("03_evaluate.py", "--run", run, *TINY, *flags, check=False),
                      fragment)


def test_every_random_draw_names_its_generators_device(data, monkeypatch):
    """A generator drawn from without an explicit device= draws on the CPU, which fails for a
    CUDA generator ("Expected a 'cpu' device type for generator"): every draw in the training
    loop must say where it happens. Checked on the CPU by wrapping torch's random functions."""
    info, train, _ = data
    for name in ("rand", "randn", "randint", "randperm"):
        original = getattr(torch, name)

        def checked(*a, _original=original, _name=name, **k):
            gen = k.get("generator")
            if gen is not None:
                assert "device" in k, f"torch.{_name} with a generator but no device="
                assert torch.device(k["device"]).type == gen.device.type, _name
            return _original(*a, **k)
        monkeypatch.setattr(torch, name, checked)
    sub = common.Split(train.x[:64], train.y[:64])
    common.fit(common.build_model("convnet-1", info), sub, info, common.Protocol("hard"),
               epochs=1, seed=0, progress=False)
    common.fit(common.build_model("convnet-1", info), sub, info,
               common.Protocol("hard", augment="translate", cutmix_p=0), epochs=1, seed=0,
               progress=False)


def _trained(p) -> tuple:
    """(students trained, reused) from 03's closing line."""
    import re
    m = re.search(r"(\d+) students trained, (\d+) reused", p.stdout)
    assert m, p.stdout[-500:]
    return int(m.group(1)), int(m.group(2))


def test_stage_one_and_redundancy_t1_are_one_student(run, data):
    """Per-stage accuracy's stage-1 student and redundancy's T1 student (same set, seed,
    epochs) are one training run; the last stage is the set's own row."""
    info, train, _ = data
    write_set(run / "distilled" / "lgd-ipc4", train, info, "lgd", [2, 2], seed=2)
    args = ["--run", run, *TINY, "--seeds", "1", "--baselines", "none"]
    # set row (union), stage 1 (= T1), T2; stage 2 = the set's row, T1 = stage 1: reused
    p = run_script("03_evaluate.py", *args, "--analyses", "stages,redundancy")
    assert _trained(p) == (3, 2)
    res = json.loads((run / "eval" / "default" / "results.json").read_text())
    assert [p["ipc"] for p in res["stages"]["lgd-ipc4"]["points"]] == [2, 4]
    assert len(res["redundancy"]["lgd-ipc4"]["matrix"]) == 2
    # the analyses in another evaluation, redundancy first: everything comes from the cache
    p = run_script("03_evaluate.py", *args, "--analyses", "redundancy,stages", "--name", "again")
    assert _trained(p) == (0, 5)
    again = json.loads((run / "eval" / "again" / "results.json").read_text())
    assert again["stages"] == res["stages"] and again["redundancy"] == res["redundancy"]
    timings = json.loads((run / "timings.json").read_text())
    assert {"03/default/sets", "03/default/stages", "03/default/redundancy"} <= set(timings)
    assert timings["03/default/stages"]["students_trained"] == 1  # stage 1; stage 2 cached
    assert "03/again/stages" not in timings  # trained nothing: the entry of the work is kept
    assert "skipped: no student trained" in p.stdout


def test_random_set_of_02_is_the_baseline_draw(run, data):
    """02's random set is the random baseline's draw 0 (same class_permutations blocks): 03
    reports it with the baseline's row and trains no student for it."""
    run_script("02_distill_stages.py", "--run", run, "--method", "random", "--ipc", "4",
               "--stages", "2")
    p = run_script("03_evaluate.py", "--run", run, *TINY)
    assert "random-ipc4: the images of the random baseline's draw 0" in p.stdout
    assert _trained(p) == (4, 0)  # full and random baselines, 2 seeds each; nothing for the set
    res = json.loads((run / "eval" / "default" / "results.json").read_text())
    base = [r for r in res["rows"] if r["kind"] == "random"][0]
    row = [r for r in res["rows"] if r["set"] == "random-ipc4"][0]
    assert row["accs"] == base["accs"] and row["same_as"] and row["kind"] == "set"
    assert res["ddranking"]["random-ipc4"]["ior"] == 0.0
    assert "the set is its draw 0" in (run / "eval" / "default" / "results.md").read_text()
    # without the random baseline the set is evaluated as any other set
    p = run_script("03_evaluate.py", "--run", run, *TINY, "--baselines", "full", "--name", "own")
    assert "draw 0" not in p.stdout and _trained(p) == (2, 2)
    # another seed of 02 is another subset: trained as a set
    run_script("02_distill_stages.py", "--run", run, "--method", "random", "--ipc", "6",
               "--stages", "2", "--seed", "1")
    p = run_script("03_evaluate.py", "--run", run, *TINY, "--name", "seed1")
    assert "random-ipc6: the images" not in p.stdout
