"""delt in 02_distill_stages.py: schedule, BN loss, frozen groups, the SRe2L reduction, the stage contract,
resume after a kill, and bad input. Unit tests run in-process on a random convnet; the rest run 02 in
subprocesses on the tiny run of 01 (convnet-1-bn teacher)."""
import importlib.util
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import common
from conftest import ROOT, assert_user_error, kill_when, run_script

spec = importlib.util.spec_from_file_location("distill02", ROOT / "02_distill_stages.py")
D = importlib.util.module_from_spec(spec)
spec.loader.exec_module(D)

# IPC 5 with MI 12 / RI 3: R = 4 rounds, groups 2/1/1/1 joining at 0/3/6/9
TINY = ["--method", "delt", "--ipc", "5", "--iterations", "12", "--round-iterations", "3"]


# ----------------------------------------------------------------------------------------------
# unit tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ipc, sizes, cost", [(10, [2, 2, 1, 1, 1, 1, 1, 1], 0.6375),
                                              (50, [7, 7, 6, 6, 6, 6, 6, 6], 0.5775),
                                              (100, [13, 13, 13, 13, 12, 12, 12, 12], 0.5725)])
def test_paper_schedule_groups_and_join_iterations(ipc, sizes, cost):
    """MI 4000 / RI 500: 8 near-equal groups (the first IPC mod 8 one larger), joining at 0, 500, .., 3500
    and trained 4000, 3500, .., 500 iterations (METHODS.md §5)."""
    assert D.delt_groups(ipc, 4000, 500) == sizes
    joins = D.delt_joins(sizes, 500)
    assert len(joins) == ipc and joins == sorted(joins)
    assert sorted(set(joins)) == [0, 500, 1000, 1500, 2000, 2500, 3000, 3500]
    assert [4000 - j for j in sorted(set(joins))] == [4000, 3500, 3000, 2500, 2000, 1500, 1000, 500]
    # image-iterations relative to the constant schedule; (R + 1) / (2R) = 0.5625 for equal groups
    assert sum(4000 - j for j in joins) / (4000 * ipc) == pytest.approx(cost)


def test_small_ipc_and_constant_schedule():
    assert D.delt_groups(1, 4000, 500) == [1]  # IPC 1: one image trained all MI iterations
    assert D.delt_groups(5, 4000, 500) == [1, 1, 1, 1, 1]  # IPC < R: empty tail rounds dropped
    assert D.delt_groups(50, 4000, None) == [50] and D.delt_joins([50], None) == [0] * 50


def small_model(info):
    torch.manual_seed(0)
    return common.build_model("convnet-2-bn", info).eval().requires_grad_(False)


INFO = common.DatasetInfo("toy", 1, 8, (0.5,), (0.25,), ["a", "b", "c"], flip=False)


def test_bn_loss_is_zero_at_the_running_statistics_and_weights_the_first_layer():
    model = small_model(INFO)
    x = torch.rand(6, 1, 8, 8)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 2
    with common.BNMatch(model, first_weight=10.0) as bn:
        model(x)
        assert bn.loss().item() > 1e-2  # random running stats differ from the batch's
        stats = []
        for m in bns:  # set layer by layer: a later layer's input depends on the earlier running stats
            h = m.register_forward_hook(lambda mod, i, o: stats.append(
                (i[0].mean((0, 2, 3)), i[0].var((0, 2, 3), unbiased=False))))
            model(x)
            h.remove()
            m.running_mean.copy_(stats[-1][0])
            m.running_var.copy_(stats[-1][1])
        model(x)
        assert bn.loss().item() < 1e-4
        bns[1].running_var[5] += 0.5  # plain (not squared) L2 norm, weight 1 after the first layer
        model(x)
        assert bn.loss().item() == pytest.approx(0.5, abs=1e-4)
        bns[1].running_var[5] -= 0.5
        bns[0].running_mean[3] += 0.5  # the first BN layer counts 10x (and shifts the next layer's input)
        model(x)
        assert bn.terms[0].item() == pytest.approx(0.5, abs=1e-4)
        assert bn.loss().item() == pytest.approx(10 * 0.5 + bn.terms[1].item(), abs=1e-4)
    model(x)  # the hooks are gone after the context
    assert len(bns[0]._forward_hooks) == 0


def test_augment_is_identity_at_full_scale_and_a_crop_later():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8)
    assert D.delt_crop_min(0, 100) == pytest.approx(1.0) and D.delt_crop_min(100, 100) == pytest.approx(0.08)
    assert torch.allclose(D.delt_augment(x, 1.0, gen, per_sample=False, flip=False), x, atol=1e-5)
    y = D.delt_augment(x, 0.08, gen, per_sample=True, flip=True)
    assert y.shape == x.shape and not torch.allclose(y, x, atol=1e-2)
    shared = D.delt_augment(x[:1].repeat(4, 1, 1, 1), 0.08, gen, per_sample=False, flip=False)
    assert torch.allclose(shared, shared[:1].expand_as(shared))  # one box for the whole batch


def toy_env(tmp_path, schedule="earlylate", init="median", iterations=8, round_iterations=2, ipc=4):
    """An Env with 3 classes of random 8x8 images and a random convnet-2-bn teacher."""
    g = torch.Generator().manual_seed(1)
    real = common.Split((torch.rand(30, 1, 8, 8, generator=g) * 255).to(torch.uint8), torch.arange(3).repeat_interleave(10))
    s = {"iterations": iterations, "round_iterations": round_iterations if schedule == "earlylate" else None,
         "opt_batch": 100, "lr": 0.25, "r_bn": 0.01, "first_bn_weight": 10.0, "schedule": schedule, "init": init,
         "per_sample_aug": False}
    args = SimpleNamespace(ipc=ipc, seed=0, method="delt", run=tmp_path, stages=None)
    counts = D.delt_groups(ipc, iterations, s["round_iterations"])
    from contextlib import nullcontext
    return D.Env(args, INFO, torch.device("cpu"), nullcontext(), small_model(INFO), None, real, s, real, counts,
                 tmp_path / "out")


def record_steps(monkeypatch):
    """Snapshot the optimised tensor after every Adam step."""
    trace, step = [], torch.optim.Adam.step

    def traced(self, *a, **k):
        out = step(self, *a, **k)
        trace.append(self.param_groups[0]["params"][0].detach().clone())
        return out
    monkeypatch.setattr(torch.optim.Adam, "step", traced)
    return trace


def test_a_group_does_not_change_before_its_join_iteration(tmp_path, monkeypatch):
    env = toy_env(tmp_path)  # IPC 4, MI 8 / RI 2: groups of 1 joining at 0, 2, 4, 6
    trace = record_steps(monkeypatch)
    res = D.delt_optimise(env, [0, 1, 2], D.delt_init_ranks(env), seed=3)
    joins = torch.tensor(D.delt_joins(env.counts, 2)).repeat(3)
    assert len(trace) == 8 and joins.tolist() == [0, 2, 4, 6] * 3
    mean, std = 0.5, 0.25
    z0 = (common.to_float(env.real.x[res["train_index"]]) - mean) / std
    for t, z in enumerate(trace):  # z after step t (0-based)
        changed = (z - z0).flatten(1).abs().amax(1) > 0
        assert torch.equal(changed, joins <= t), t
    assert (res["dist_to_init"] > 0).all()


def test_constant_schedule_with_noise_init_is_plain_batch_to_global_matching(tmp_path):
    """--schedule constant --init noise reduces to SRe2L: every image, every iteration, CE + BN matching."""
    env = toy_env(tmp_path, schedule="constant", init="noise", iterations=6)
    assert env.counts == [4]
    res = D.delt_optimise(env, [0, 1, 2], None, seed=7)
    # the same optimisation written out plainly, with its own BN loss
    gen = torch.Generator().manual_seed(7)
    y = torch.arange(3).repeat_interleave(4)
    x0 = (0.5 + 0.25 * torch.randn(12, 1, 8, 8, generator=gen)).clamp(0, 1)
    z = ((x0 - 0.5) / 0.25).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.25, betas=(0.5, 0.9))
    teacher = env.teacher
    bns = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    feats = {}
    hooks = [m.register_forward_hook(lambda mod, i, o: feats.__setitem__(mod, i[0])) for m in bns]
    for t in range(6):
        opt.param_groups[0]["lr"] = 0.125 * (1 + math.cos(math.pi * t / 6))
        xa = D.delt_augment(z * 0.25 + 0.5, 0.08 + 0.92 * (1 + math.cos(math.pi * t / 6)) / 2, gen, False, False)
        ce = F.cross_entropy(teacher(xa), y)
        r = sum(w * ((feats[m].mean((0, 2, 3)) - m.running_mean).norm() +
                     (feats[m].var((0, 2, 3), unbiased=False) - m.running_var).norm())
                for w, m in zip([10.0, 1.0], bns))
        opt.zero_grad()
        (ce + 0.01 * r).backward()
        opt.step()
        with torch.no_grad():
            z.clamp_(-2.0, 2.0)
    for h in hooks:
        h.remove()
    ref = D.to_u8(z.detach() * 0.25 + 0.5)
    assert (res["x"].int() - ref.int()).abs().max() <= 1
    assert (res["x"] != D.to_u8(x0)).flatten(1).any(1).all()  # every image moved from its start
    assert (res["train_index"] == -1).all()


def test_init_ranks_nearest_the_median_first(tmp_path):
    env = toy_env(tmp_path, ipc=3)
    p = D.true_class_prob(env.teacher, env.real.x, env.real.y, env.ctx)
    ranks = D.delt_init_ranks(env)  # (3 classes, 3)
    for c in range(3):
        idx = torch.arange(10 * c, 10 * c + 10)
        d = (p[idx] - p[idx].quantile(0.5)).abs()
        assert ranks[c].tolist() == idx[d.argsort(stable=True)[:3]].tolist()
        assert (d[ranks[c] - 10 * c]).tolist() == sorted(d[ranks[c] - 10 * c].tolist())
    env.s["init"] = "top"
    top = D.delt_init_ranks(env)
    assert p[top[0]].tolist() == sorted(p[:10].tolist(), reverse=True)[:3]


# ----------------------------------------------------------------------------------------------
# the script end to end
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A private copy of the tiny run (the teacher and dataset.json: delt reads no DiT)."""
    dst = tmp_path_factory.mktemp("rundelt") / "mnist5k"
    dst.mkdir()
    shutil.copy(tiny_run[0] / "dataset.json", dst)
    shutil.copytree(tiny_run[0] / "teacher", dst / "teacher")
    return dst


def fresh(run, tmp_path, name):
    """A copy of the run without the distilled sets other tests made."""
    dst = tmp_path / name
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("distilled"))
    return dst


def pngs(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_stage_layout_indices_and_manifests(run):
    p = run_script("02_distill_stages.py", "--run", run, *TINY)
    out = run / "distilled" / "delt-ipc5"
    assert "4 stages of 2/1/1/1" in p.stdout
    assert not (out / "delt_state").exists()  # removed once every manifest exists
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["derived"]["images_per_stage"] == [2, 1, 1, 1]
    assert cfg["derived"]["defaults"]["iterations"] == {"paper": 4000, "small": 160}
    assert cfg["derived"]["settings"]["iterations"] == 12
    names = []
    for k, (n, join) in enumerate(zip([2, 1, 1, 1], [0, 3, 6, 9])):
        d = out / f"stage_{k + 1:02d}"
        m = json.loads((d / "manifest.json").read_text())
        base = [0, 2, 3, 4][k]
        assert m["images_per_class"] == n and m["indices"] == [base, base + n - 1]
        assert m["join_iteration"] == join and m["iterations_trained"] == 12 - join
        assert set(m["counts"].values()) == {n} and len(m["scores"]["p_final"]) == 10 * n
        assert all(0 <= v <= 1 for v in m["scores"]["p_init"] + m["scores"]["p_final"])
        assert all(v > 0 for v in m["scores"]["dist_to_init"])
        names += [f.name for f in (d / "0").glob("*.png")]
    assert sorted(names) == [f"{i:06d}.png" for i in range(5)]
    # the init images are distinct real images, rank-ordered by closeness to the median probability
    idx = sum((json.loads((out / f"stage_{k:02d}" / "manifest.json").read_text())["scores"]["train_index"]
               for k in range(1, 5)), [])
    assert len(set(idx)) == 50
    stages = common.read_stages(out, common.read_run_info(run))
    assert [len(s.y) for s in stages] == [20, 10, 10, 10]


def test_rerun_after_a_kill_gives_the_same_pngs(run, tmp_path):
    # one class per batch (10 batches) and enough iterations that the kill lands mid-run
    args = ["--method", "delt", "--ipc", "4", "--iterations", "40", "--round-iterations", "10", "--opt-batch", "4"]
    ref, killed = fresh(run, tmp_path, "ref"), fresh(run, tmp_path, "killed")
    run_script("02_distill_stages.py", "--run", ref, *args)
    out = killed / "distilled" / "delt-ipc4"
    kill_when("02_distill_stages.py", ["--run", killed, *args], out / "delt_state" / "batch_0001.pt")
    assert not list(out.glob("stage_*/manifest.json"))
    p = run_script("02_distill_stages.py", "--run", killed, *args)
    assert "delt: resuming" in p.stdout and "of 10 batches done earlier" in p.stdout
    a, b = pngs(ref / "distilled" / "delt-ipc4"), pngs(out)
    assert len(a) == 40 and a == b
    # a stage without its manifest is redone from the same seeds, the finished ones are skipped
    (out / "stage_03" / "manifest.json").unlink()
    shutil.rmtree(out / "stage_04")
    p = run_script("02_distill_stages.py", "--run", killed, *args)
    assert "stage 2: done earlier" in p.stdout and "stage 3: done earlier" not in p.stdout
    assert pngs(out) == a and not (out / "delt_state").exists()


def test_baselines_from_flags_get_their_own_folders(run):
    run_script("02_distill_stages.py", "--run", run, "--method", "delt", "--ipc", "2", "--iterations", "4",
               "--schedule", "constant", "--init", "noise")
    out = run / "distilled" / "delt-constant-init-noise-ipc2"
    m = json.loads((out / "stage_01" / "manifest.json").read_text())
    assert m["iterations_trained"] == 4 and m["images_per_class"] == 2 and set(m["scores"]["train_index"]) == {-1}
    assert len(common.stage_dirs(out)) == 1


@pytest.mark.parametrize("extra, fragments", [
    (["--stages", "3"], ["--stages 3 contradicts", "4 here"]),
    (["--ipc", "401"], ["needs 401 real training images per class"]),
    (["--round-iterations", "5"], ["multiple of --round-iterations 5"]),
    (["--schedule", "constant"], ["--round-iterations has no meaning with --schedule constant"]),
    (["--lr", "0"], ["--lr must be > 0"]),
])
def test_bad_delt_input(run, extra, fragments):
    args = TINY + extra if "--ipc" not in extra else TINY[:2] + extra + TINY[4:]
    p = run_script("02_distill_stages.py", "--run", run, *args, check=False)
    assert_user_error(p, *fragments)
    assert not (run / "distilled" / "delt-ipc401").exists()
    assert not (run / "distilled" / "delt-constant-ipc5").exists()


def test_unknown_init_and_delt_flags_for_other_methods(run):
    p = run_script("02_distill_stages.py", "--run", run, *TINY, "--init", "mean", check=False)
    assert_user_error(p, "invalid choice: 'mean'")
    p = run_script("02_distill_stages.py", "--run", run, "--method", "random", "--ipc", "5", "--iterations", "9",
                   check=False)
    assert_user_error(p, "--iterations has no meaning for --method random", "delt")
    assert not (run / "distilled" / "random-ipc5").exists()


def test_teacher_without_batchnorm_is_an_error(run, tmp_path):
    dst = fresh(run, tmp_path, "nobn")
    info = common.read_run_info(dst)
    common.save_classifier(dst / "teacher" / "teacher.pt", common.build_model("convnet-1", info), "convnet-1", info)
    p = run_script("02_distill_stages.py", "--run", dst, *TINY, check=False)
    assert_user_error(p, "no BN layers", "convnet-3-bn")
    assert not (dst / "distilled").exists()
