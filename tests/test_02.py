"""02_distill_stages.py in subprocesses on the tiny run of 01: layout, determinism, resume, bad
input."""
import shutil

import pytest
import torch

import common
from conftest import assert_user_error, kill_when, run_script

# 4 images per class as 2 stages of 2; a 4-step sampler and 2-epoch guide models keep it fast
TINY_02 = ["--ipc", "4", "--stages", "2", "--sample-steps", "4", "--sample-batch", "30"]
GUIDE = ["--guide-epochs", "2", "--guide-model", "convnet-1"]


def distill(run, method, *extra, check=True):
    args = TINY_02 + (GUIDE if method in ("lgd", "acs") else [])
    return run_script("02_distill_stages.py", "--run", run, "--method", method, *args, *extra,
                      check=check)


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A private copy of the tiny run, so these tests may write distilled/ into it."""
    dst = tmp_path_factory.mktemp("run02") / "mnist5k"
    shutil.copytree(tiny_run[0], dst)
    return dst


def files(folder):
    """{relative path: content} of every image (bytes) and latent file (values), plus manifests
    without timings."""
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.suffix == ".png":
            out[str(f.relative_to(folder))] = f.read_bytes()
        elif f.name == "latents.pt":  # a torch.save archive records its file name: compare values
            out[str(f.relative_to(folder))] = torch.load(f, weights_only=True).numpy().tobytes()
        elif f.name == "manifest.json":
            m = common.read_json(f)
            m.pop("seconds")
            out[str(f.relative_to(folder))] = m
    return out


@pytest.mark.parametrize("method", ["random", "dit", "lgd", "acs"])
def test_each_method_writes_the_stage_contract(run, method):
    distill(run, method)
    out = run / "distilled" / f"{method}-ipc4"
    info = common.read_run_info(run)
    assert common.read_json(out / "config.json")["args"]["method"] == method
    stages = common.read_stages(out, info)
    assert len(stages) == 2
    for k, s in enumerate(stages):
        assert torch.bincount(s.y, minlength=10).tolist() == [2] * 10
        assert sorted(p.name for p in (out / f"stage_{k + 1:02d}" / "3").glob("*.png")) == \
            [f"{2 * k:06d}.png", f"{2 * k + 1:06d}.png"]  # indices run on across stages
        m = common.read_json(out / f"stage_{k + 1:02d}" / "manifest.json")
        assert m["stage"] == k + 1 and m["counts"]["7"] == 2 and 0 <= m["reference_acc"] <= 100
        assert len(m["scores"]["ce_reference"]) == 20
    if method == "random":  # real training images, disjoint across stages
        idx = [common.read_json(out / f"stage_{k:02d}" / "manifest.json")["scores"]["train_index"]
               for k in (1, 2)]
        assert len(set(idx[0]) | set(idx[1])) == 40
        _, train, _ = common.load_dataset("mnist5k")
        assert torch.equal(stages[0].x, train.x[idx[0]])
    if method == "lgd":
        cur = common.load_classifier(out / "stage_02" / "current.pt", info, "cpu")
        assert cur is not None and not (out / "stage_01" / "current.pt").exists()
        m = common.read_json(out / "stage_02" / "manifest.json")
        assert len(m["scores"]["S"]) == 20 and m["settings"]["candidates"] == 3
    if method == "acs":
        common.load_classifier(out / "stage_02" / "discriminator.pt", info, "cpu")
        m = common.read_json(out / "stage_02" / "manifest.json")
        assert {"disc_acc_train", "disc_acc_before", "disc_acc_after"} <= set(m)
    if method != "random":
        z = torch.load(out / "stage_02" / "latents.pt", weights_only=True)
        assert z.shape == (20, 1, 28, 28)


def test_lgd_current_weight_0_is_teacher_guidance_alone(run, tmp_path):
    """The --current-weight 0 ablation: f_cur is trained and scores the images, but only
    -omega CE(f_ref) guides and selects them: S is exactly that, and the images differ from
    LGD's."""
    out = tmp_path / "lgd-teacher-ipc4"
    distill(run, "lgd", "--out", out, "--current-weight", "0")
    m = common.read_json(out / "stage_02" / "manifest.json")
    assert m["settings"]["current_weight"] == 0 and (out / "stage_02" / "current.pt").exists()
    omega = m["settings"]["omega"]
    # S is scored on the float samples, ce_* on the saved uint8 images: equal up to rounding
    assert m["scores"]["S"] == pytest.approx([-omega * c for c in m["scores"]["ce_reference"]],
                                             rel=0.05, abs=0.05)
    main = run / "distilled" / "lgd-ipc4"
    if not main.exists():
        distill(run, "lgd")
    ml = common.read_json(main / "stage_02" / "manifest.json")["scores"]  # LGD's S has both terms
    assert ml["S"] == pytest.approx(
        [c - omega * r for c, r in zip(ml["ce_current"], ml["ce_reference"])], rel=0.05, abs=0.05)
    assert files(out)["stage_02/0/000002.png"] != files(main)["stage_02/0/000002.png"]
    # stage 1 is plain sampling
    assert files(out)["stage_01/0/000000.png"] == files(main)["stage_01/0/000000.png"]


def test_rerun_skips_and_same_seed_gives_identical_files(run):
    out = run / "distilled" / "dit-ipc4"
    if not out.exists():
        distill(run, "dit")
    before = files(out)
    p = distill(run, "dit")
    assert p.stdout.count("done earlier") == 2
    distill(run, "dit", "--overwrite")
    assert files(out) == before
    distill(run, "dit", "--overwrite", "--seed", "1")
    assert files(out)["stage_01/0/000000.png"] != before["stage_01/0/000000.png"]


def test_out_writes_an_ablation_elsewhere(run, tmp_path):
    main = run / "distilled" / "dit-ipc4"
    if not main.exists():
        distill(run, "dit")
    before = sorted(p.name for p in (run / "distilled").iterdir())
    distill(run, "dit", "--out", tmp_path / "abl" / "dit-cfg3-ipc4", "--cfg", "3")
    abl = files(tmp_path / "abl" / "dit-cfg3-ipc4")
    assert len([k for k in abl if k.endswith(".png")]) == 40
    # the main sets are left alone
    assert sorted(p.name for p in (run / "distilled").iterdir()) == before
    # cfg 3 vs 1, same noise
    assert abl["stage_01/0/000000.png"] != files(main)["stage_01/0/000000.png"]


def test_killed_mid_stage_then_rerun_equals_uninterrupted(run, tmp_path):
    """Kill lgd during stage 2, leave a half-written stage behind, rerun: same files as one clean
    run."""
    ref = run / "distilled" / "lgd-ipc4"
    if not ref.exists():
        distill(run, "lgd")
    other = tmp_path / "mnist5k"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("distilled"))
    out = other / "distilled" / "lgd-ipc4"
    args = ["--run", other, "--method", "lgd", *TINY_02, *GUIDE]
    kill_when("02_distill_stages.py", args, out / "stage_01" / "manifest.json")
    assert not (out / "stage_02" / "manifest.json").exists()
    (out / "stage_02" / "5").mkdir(parents=True, exist_ok=True)
    # what a kill mid-write leaves
    (out / "stage_02" / "5" / "000002.png").write_bytes(b"half a png")
    p = run_script("02_distill_stages.py", *args)
    assert "stage 1: done earlier" in p.stdout
    assert files(out) == files(ref)
    a = torch.load(ref / "stage_02" / "current.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "stage_02" / "current.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_give_one_line(run, tmp_path):
    def bad(*args, frags=()):
        assert_user_error(run_script("02_distill_stages.py", *args, check=False), *frags)
    bad("--run", run, "--method", "dit", "--ipc", "5", "--stages", "2",
        frags=["--ipc 5", "multiple of 2"])
    bad("--run", run, "--method", "random", "--ipc", "1000", "--stages", "1",
        frags=["fewer", "lower --ipc"])
    bad("--run", tmp_path / "nowhere", "--method", "dit", frags=["run 01_train_teacher.py"])
    bad("--run", run, "--method", "dit", "--candidates", "2", frags=["--candidates", "dit"])
    bad("--run", run, "--method", "acs", "--candidates", "2",
        frags=["--candidates", "acs (only lgd)"])
    bad("--run", run, "--method", "lgd", "--window", "10", frags=["--window"])
    bad("--run", run, "--method", "lgd", "--window", "40,60", frags=["t_hi <= 49"])
    bad("--run", run, "--method", "lgd", "--guide-model", "vgg", frags=["unknown model"])
    bad("--run", run, "--method", "lgd", "--init-folder", tmp_path / "missing",
        frags=["does not exist"])
    bad("--run", run, "--method", "lgd", "--sample-steps", "5000", frags=["exceeds"])
    init = tmp_path / "init"
    for c in range(10):
        (init / str(c)).mkdir(parents=True)
        common.save_png(torch.zeros(1, 28, 28), init / str(c) / "000000.png")
    bad("--run", run, "--method", "lgd", *TINY_02, "--init-folder", init,
        frags=["2 images per class"])
    common.save_png(torch.zeros(3, 16, 16), init / "0" / "000001.png")
    bad("--run", run, "--method", "lgd", *TINY_02, "--init-folder", init, frags=["share one size"])
    p = run_script("02_distill_stages.py", "--run", run, "--method", "pca", check=False)
    assert p.returncode == 2 and "invalid choice" in p.stderr
    # a finished folder made with other settings is not silently mixed with new ones
    if not (run / "distilled" / "dit-ipc4").exists():
        distill(run, "dit")
    bad("--run", run, "--method", "dit", *TINY_02, "--cfg", "3",
        frags=["other settings", "--overwrite"])
    # the teacher of another dataset in the run folder
    other = tmp_path / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("distilled"))
    ck = torch.load(other / "teacher" / "teacher.pt", weights_only=True)
    ck["classes"] = [f"c{i}" for i in range(10)]
    torch.save(ck, other / "teacher" / "teacher.pt")
    bad("--run", other, "--method", "dit", *TINY_02)


def test_sample_batch_is_not_a_setting(run, tmp_path):
    """--sample-batch only groups slots into batches: a rerun with another one resumes the
    folder, and batches of the same classes give the same bytes."""
    out = tmp_path / "dit-ipc4"
    distill(run, "dit", "--out", out)
    before = files(out)
    p = distill(run, "dit", "--out", out, "--sample-batch", "15")  # both batch 10 classes whole
    assert p.stdout.count("done earlier") == 2
    distill(run, "dit", "--out", out, "--sample-batch", "15", "--overwrite")
    assert files(out) == before


def test_acs_curriculum_one_applies_the_deviation_term_within_the_stage(run, tmp_path):
    """Slot-major sampling updates the memory after every batch: the first image of each class
    in curriculum 1 is plain DiT sampling (empty memory, same noise as dit), the second is
    pushed away from the first."""
    for m in ("dit", "acs"):
        distill(run, m, "--out", tmp_path / m, "--stages", "1", "--ipc", "2")
    dit_files, acs_files = files(tmp_path / "dit"), files(tmp_path / "acs")
    for c in range(10):
        first, second = f"stage_01/{c}/000000.png", f"stage_01/{c}/000001.png"
        assert acs_files[first] == dit_files[first]
        assert acs_files[second] != dit_files[second]
