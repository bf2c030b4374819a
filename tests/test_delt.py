"""delt in 02_distill_stages.py: schedule, frozen groups, the SRe2L reduction, the init ranking, the
stage contract, resume after a kill, and bad input. Every test runs 02 in a subprocess on the tiny
run of 01 (convnet-1-bn teacher); the optimisation is checked against a plain re-implementation."""
import json
import math
import shutil

import pytest
import numpy as np
import torch
import torch.nn.functional as F

import common
from conftest import assert_user_error, kill_when, run_script

# IPC 5 with MI 12 / RI 3: R = 4 rounds, groups 2/1/1/1 joining at 0/3/6/9
TINY = ["--method", "delt", "--ipc", "5", "--iterations", "12", "--round-iterations", "3"]


# ----------------------------------------------------------------------------------------------
# the schedule and the optimisation, checked from the outside: 02 --dry-run prints its plan, and a
# plain re-implementation of the loop below must reproduce the PNGs 02 writes
# ----------------------------------------------------------------------------------------------


def dry_run(run, *extra) -> dict:
    p = run_script("02_distill_stages.py", "--run", run, "--method", "delt", "--dry-run", *extra)
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("ipc, sizes, cost", [(10, [2, 2, 1, 1, 1, 1, 1, 1], 0.6375),
                                              (50, [7, 7, 6, 6, 6, 6, 6, 6], 0.5775),
                                              (100, [13, 13, 13, 13, 12, 12, 12, 12], 0.5725)])
def test_paper_schedule_groups_and_join_iterations(run, ipc, sizes, cost):
    """IPC split into R = 8 near-equal groups (the first IPC mod 8 one larger), joining at
    0, 500, .., 3500 and trained 4000, 3500, .., 500 iterations (docs/methods.md §6)."""
    plan = dry_run(run, "--ipc", ipc, "--scale", "paper")
    assert plan["settings"]["iterations"] == 4000 and plan["settings"]["round_iterations"] == 500
    assert plan["images_per_stage"] == sizes
    joins = plan["join_iterations"]
    assert len(joins) == ipc and joins == sorted(joins)
    assert sorted(set(joins)) == [0, 500, 1000, 1500, 2000, 2500, 3000, 3500]
    assert [4000 - j for j in sorted(set(joins))] == [4000, 3500, 3000, 2500, 2000, 1500, 1000, 500]
    # image-iterations relative to the constant schedule; (R + 1) / (2R) = 0.5625 for equal groups
    assert sum(4000 - j for j in joins) / (4000 * ipc) == pytest.approx(cost)
    assert not (run / "distilled" / f"delt-ipc{ipc}").exists()  # a dry run writes nothing


def test_small_ipc_and_constant_schedule(run):
    paper = ["--scale", "paper"]
    assert dry_run(run, "--ipc", 1, *paper)["images_per_stage"] == [1]  # one image, all MI
    assert dry_run(run, "--ipc", 5, *paper)["images_per_stage"] == [1, 1, 1, 1, 1]  # IPC < R
    plan = dry_run(run, "--ipc", 50, "--schedule", "constant", *paper)
    assert plan["images_per_stage"] == [50] and plan["join_iterations"] == [0] * 50


def reference_delt(run, ipc, iterations, round_iterations, init, seed=0):
    """DELT's loop written out plainly for one batch holding every class: the images 02 must
    write. Returns (final uint8 images class-major, init images, the tensor after each step)."""
    info = common.read_run_info(run)
    teacher = common.load_run_teacher(run, info, "cpu").requires_grad_(False)
    _, ctx = common.setup_device("cpu", "auto")  # the teacher's precision in 02's loop
    _, real, _ = common.load_dataset("mnist5k")
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 0]).generate_state(1)[0]))
    y = torch.arange(10).repeat_interleave(ipc)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (info.mean, info.std))
    rounds = iterations // round_iterations if round_iterations else 1
    sizes = [n for n in (ipc // rounds + (g < ipc % rounds) for g in range(rounds)) if n]
    join = torch.tensor([g * (round_iterations or 0) for g, n in enumerate(sizes)
                         for _ in range(n)]).repeat(10)
    if init == "noise":
        x0 = (mean + std * torch.randn(10 * ipc, 1, 28, 28, generator=gen)).clamp(0, 1)
    else:  # nearest the class median of the teacher's true-class probability, rank order
        p = torch.softmax(common.predict(teacher, real.x), 1).gather(1, real.y[:, None])[:, 0]
        rows = []
        for c in range(10):
            idx = (real.y == c).nonzero().squeeze(1)
            d = (p[idx] - p[idx].quantile(0.5)).abs()
            rows.append(idx[torch.sort(d, stable=True).indices[:ipc]])
        x0 = common.to_float(real.x[torch.cat(rows)])
    z = ((x0 - mean) / std).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.25, betas=(0.5, 0.9))
    bns = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    feats = {}
    hooks = [m.register_forward_hook(lambda mod, i, o: feats.__setitem__(mod, i[0].float()))
             for m in bns]  # the statistics in fp32, whatever the forward pass ran in
    trace = []
    for t in range(iterations):
        opt.param_groups[0]["lr"] = 0.125 * (1 + math.cos(math.pi * t / iterations))
        active = (join <= t).nonzero().squeeze(1)
        s_min = 0.08 + 0.92 * (1 + math.cos(math.pi * t / iterations)) / 2
        xa = common.random_resized_crop(z[active] * std + mean, (s_min, 1.0), gen=gen,
                                        per_sample=False, flip=False)
        with ctx:
            logits = teacher(xa)
        ce = F.cross_entropy(logits.float(), y[active])
        r = sum(w * ((feats[m].mean((0, 2, 3)) - m.running_mean).norm() +
                     (feats[m].var((0, 2, 3), unbiased=False) - m.running_var).norm())
                for w, m in zip([10.0] + [1.0] * (len(bns) - 1), bns))
        opt.zero_grad()
        (ce + 0.01 * r).backward()
        opt.step()
        with torch.no_grad():
            z.copy_(torch.maximum(torch.minimum(z, (1 - mean) / std), (0 - mean) / std))
        trace.append(z.detach().clone())
    for h in hooks:
        h.remove()
    return common.to_u8(z.detach() * std + mean), common.to_u8(x0), (x0 - mean) / std, join, trace


def written(out, ipc) -> torch.Tensor:
    """The images 02 wrote, class-major in rank order (stage by stage within a class)."""
    info = common.read_run_info(out.parent.parent)
    stages = common.read_stages(out, info)
    return torch.cat([torch.cat([s.x[s.y == c] for s in stages]) for c in range(10)])


def test_a_group_does_not_change_before_its_join_iteration(run, tmp_path):
    """IPC 4 with MI 8 / RI 2: one image per class joins at 0, 2, 4 and 6. The plain loop, in
    which a group's pixels get zero gradient until it joins, gives 02's images."""
    dst = fresh(run, tmp_path, "join")
    run_script("02_distill_stages.py", "--run", dst, "--method", "delt", "--ipc", "4",
               "--iterations", "8", "--round-iterations", "2", "--opt-batch", "40")
    final, _, z0, join, trace = reference_delt(dst, 4, 8, 2, "median")
    assert join.tolist() == [0, 2, 4, 6] * 10 and len(trace) == 8
    for t, z in enumerate(trace):  # z after step t (0-based)
        changed = (z - z0).flatten(1).abs().amax(1) > 0
        assert torch.equal(changed, join <= t), t
    ours = written(dst / "distilled" / "delt-ipc4", 4)
    assert (ours.int() - final.int()).abs().max() <= 1
    m = common.read_json(dst / "distilled" / "delt-ipc4" / "stage_04" / "manifest.json")
    assert m["join_iteration"] == 6 and all(v > 0 for v in m["scores"]["dist_to_init"])


def test_constant_schedule_with_noise_init_is_plain_batch_to_global_matching(run, tmp_path):
    """--schedule constant --init noise reduces to SRe2L: every image, every iteration,
    CE + BN matching, from Gaussian noise."""
    dst = fresh(run, tmp_path, "sre2l")
    run_script("02_distill_stages.py", "--run", dst, "--method", "delt", "--ipc", "3",
               "--iterations", "6", "--schedule", "constant", "--init", "noise",
               "--opt-batch", "30")
    out = dst / "distilled" / "delt-constant-init-noise-ipc3"
    final, start, *_ = reference_delt(dst, 3, 6, None, "noise")
    ours = written(out, 3)
    assert (ours.int() - final.int()).abs().max() <= 1
    assert (ours != start).flatten(1).any(1).all()  # every image moved from its start
    m = common.read_json(out / "stage_01" / "manifest.json")
    assert set(m["scores"]["train_index"]) == {-1}


def test_init_ranks_nearest_the_median_first(run):
    """The manifests' train_index: per class, the real images nearest the median of the
    teacher's true-class probability, nearest first (and the highest with --init top)."""
    info = common.read_run_info(run)
    teacher = common.load_run_teacher(run, info, "cpu")
    _, real, _ = common.load_dataset("mnist5k")
    p = torch.softmax(common.predict(teacher, real.x), 1).gather(1, real.y[:, None])[:, 0]
    for init in ("median", "top"):
        flags = ["--init", init] if init != "median" else []
        run_script("02_distill_stages.py", "--run", run, "--method", "delt", "--ipc", "3",
                   "--iterations", "3", "--round-iterations", "1", *flags)
        out = run / "distilled" / ("delt-ipc3" if init == "median" else "delt-init-top-ipc3")
        chosen = [common.read_json(d / "manifest.json")["scores"]["train_index"]
                  for d in common.stage_dirs(out)]  # stage k: rank k of every class
        for c in range(10):
            ranks = [st[c] for st in chosen]
            idx = (real.y == c).nonzero().squeeze(1)
            if init == "median":
                d = (p[idx] - p[idx].quantile(0.5)).abs()
                assert ranks == idx[d.argsort(stable=True)[:3]].tolist()
            else:
                assert p[ranks].tolist() == sorted(p[idx].tolist(), reverse=True)[:3]


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
    idx = sum((json.loads((out / f"stage_{k:02d}" / "manifest.json").read_text())["scores"]
               ["train_index"] for k in range(1, 5)), [])
    assert len(set(idx)) == 50
    stages = common.read_stages(out, common.read_run_info(run))
    assert [len(s.y) for s in stages] == [20, 10, 10, 10]


def test_rerun_after_a_kill_gives_the_same_pngs(run, tmp_path):
    # one class per batch (10 batches) and enough iterations that the kill lands mid-run
    args = ["--method", "delt", "--ipc", "4", "--iterations", "40", "--round-iterations", "10",
            "--opt-batch", "4"]
    ref, killed = fresh(run, tmp_path, "ref"), fresh(run, tmp_path, "killed")
    run_script("02_distill_stages.py", "--run", ref, *args)
    out = killed / "distilled" / "delt-ipc4"
    kill_when("02_distill_stages.py", ["--run", killed, *args],
              out / "delt_state" / "batch_0001.pt")
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
    run_script("02_distill_stages.py", "--run", run, "--method", "delt", "--ipc", "2",
               "--iterations", "4", "--schedule", "constant", "--init", "noise")
    out = run / "distilled" / "delt-constant-init-noise-ipc2"
    m = json.loads((out / "stage_01" / "manifest.json").read_text())
    assert m["iterations_trained"] == 4 and m["images_per_class"] == 2
    assert set(m["scores"]["train_index"]) == {-1}
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
    p = run_script("02_distill_stages.py", "--run", run, "--method", "random", "--ipc", "5",
                   "--iterations", "9", check=False)
    assert_user_error(p, "--iterations has no meaning for --method random", "delt")
    assert not (run / "distilled" / "random-ipc5").exists()


def test_teacher_without_batchnorm_is_an_error(run, tmp_path):
    dst = fresh(run, tmp_path, "nobn")
    info = common.read_run_info(dst)
    common.save_classifier(dst / "teacher" / "teacher.pt", common.build_model("convnet-1", info),
                           "convnet-1", info)
    p = run_script("02_distill_stages.py", "--run", dst, *TINY, check=False)
    assert_user_error(p, "no BN layers", "convnet-3-bn")
    assert not (dst / "distilled").exists()
