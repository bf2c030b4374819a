"""IGD (docs/methods.md §5): the batched influence term against a one-sample loop, its guidance
against unguided samples from the same noise, and 01 --surrogate / 02 --method igd in
subprocesses on the tiny run: contract, determinism, resume, bad input, lgd --init-set igd."""
import shutil

import pytest
import torch
import torch.nn.functional as F

import common
import dit
from conftest import TINY_01, assert_user_error, kill_when, run_script
from test_02 import TINY_02, files
from test_dit import tiny_pixel_prior

# a 2-epoch convnet-1 surrogate keeping the init and the end: two checkpoints, as cheap as a
# trajectory gets, and long enough to kill 01 between its epochs
SURROGATE = ["--surrogate", "convnet-1", "--surrogate-epochs", "2", "--surrogate-keep", "0,2"]


# ------------------------------------------------------------------------------------------
# the influence term (dit.py)
# ------------------------------------------------------------------------------------------


def toy():
    """A 3-class 1x8x8 dataset description and a frozen two-layer convnet on it."""
    info = common.DatasetInfo("toy", 1, 8, (0.5,), (0.5,), ["a", "b", "c"], flip=False)
    torch.manual_seed(0)
    return info, common.build_model("convnet-2", info).eval().requires_grad_(False)


def loop_cosine(model, img, y, real):
    """The reference code's way: one image at a time, autograd with create_graph."""
    params = [p.detach().requires_grad_(True) for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    cos, grads = [], []
    for b in range(len(y)):
        x = img[b:b + 1].detach().requires_grad_(True)
        out = torch.func.functional_call(model, dict(zip(names, params)), (x,))
        g = torch.autograd.grad(F.cross_entropy(out, y[b:b + 1]), params, create_graph=True)
        c = F.cosine_similarity(torch.cat([v.flatten() for v in g]), real[y[b]], dim=0)
        cos.append(c.detach())
        grads.append(torch.autograd.grad(c, x)[0])
    return torch.stack(cos), torch.cat(grads)


def test_batched_gradient_cosine_equals_a_one_sample_loop():
    info, model = toy()
    P = sum(p.numel() for p in model.parameters())
    real = torch.randn(3, P)
    img = torch.rand(5, 1, 8, 8, requires_grad=True)
    y = torch.tensor([0, 2, 1, 2, 0])
    cos = dit.grad_cosine(model, img, y, real)  # (5,)
    grad, = torch.autograd.grad(cos.sum(), img)  # each row depends on its own image only
    ref_cos, ref_grad = loop_cosine(model, img, y, real)
    torch.testing.assert_close(cos.detach(), ref_cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert grad.abs().sum() > 0
    # the term is G = mean_e (cos_e - 1), and the surrogate never collects a gradient
    terms = dit.influence_terms([model, model], torch.stack([real, -real]))
    G = dit.objective(terms, img, y)
    torch.testing.assert_close(G, (cos + (-cos)) / 2 - 1)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_real_gradient_is_the_gradient_of_the_mean_ce_on_the_first_images():
    info, model = toy()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (30, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.arange(3).repeat(10)
    real = dit.real_gradients(model, x, y, 3, per_class=7, chunk=3)  # uneven chunks of 3
    params = [p.detach().requires_grad_(True) for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    for c in range(3):
        idx = (y == c).nonzero().squeeze(1)[:7]
        out = torch.func.functional_call(model, dict(zip(names, params)),
                                         (common.to_float(x[idx]),))
        ref = torch.autograd.grad(F.cross_entropy(out, y[idx]), params)
        torch.testing.assert_close(real[c], torch.cat([v.flatten() for v in ref]),
                                   rtol=1e-5, atol=1e-7)


def test_influence_guidance_raises_the_gradient_cosine():
    """IGD's own settings (k = 5, c0 = 0.0015) against plain sampling from the same noise."""
    info, train, _ = common.load_dataset("mnist5k")
    prior = tiny_pixel_prior(info)
    torch.manual_seed(1)
    surrogates = [common.build_model("convnet-1", info).eval() for _ in range(2)]
    real = torch.stack([dit.real_gradients(m, train.x, train.y, 10, per_class=20)
                        for m in surrogates])
    terms = dit.influence_terms(surrogates, real)
    y = torch.arange(10).repeat(2)
    seeds = [dit.slot_seed(3, i) for i in range(len(y))]

    def sample(guidance):
        return dit.sample(prior, y, seeds, steps=10, cfg=4.0, guidance=guidance,
                          batch_size=len(y), progress=False)[0]
    plain = sample(None)
    guided = sample(dit.Guidance(terms=terms, scale=5.0, c0=0.0015, window=(0, 49)))
    g0, g1 = dit.objective(terms, plain, y), dit.objective(terms, guided, y)
    assert g1.mean() > g0.mean() + 0.005, (g0.mean(), g1.mean())
    assert (g1 > g0).float().mean() > 0.8  # per slot too, not only on average


# ------------------------------------------------------------------------------------------
# 01 --surrogate and 02 --method igd (subprocesses)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A private copy of the tiny run with a surrogate and a filled real-gradient cache."""
    dst = tmp_path_factory.mktemp("runigd") / "mnist5k"
    shutil.copytree(tiny_run[0], dst)
    p = run_script("01_train_teacher.py", "--run", dst, *TINY_01, *SURROGATE)
    assert "teacher: done earlier" in p.stdout and "dit: done earlier" in p.stdout
    return dst


def distill(run, method, *extra, check=True):
    return run_script("02_distill_stages.py", "--run", run, "--method", method, *TINY_02,
                      *extra, check=check)


def test_01_surrogate_files_and_rerun(run):
    folder = run / "surrogate"
    info = common.read_run_info(run)
    assert sorted(p.name for p in folder.glob("epoch_*.pt")) == ["epoch_000.pt", "epoch_002.pt"]
    for e in (0, 2):
        ck = torch.load(folder / f"epoch_{e:03d}.pt", weights_only=True)
        assert ck["model_name"] == "convnet-1" and ck["epoch"] == e
        common.load_classifier(folder / f"epoch_{e:03d}.pt", info, "cpu")
    cfg = common.read_json(folder / "config.json")
    assert cfg["args"]["keep"] == [0, 2] and cfg["derived"]["protocol"]["cutmix_p"] == 0.0
    assert cfg["derived"]["defaults"]["model"] == {"paper": "convnet-6", "small": "convnet-2"}
    m = common.read_json(folder / "metrics.json")
    assert set(m["checkpoint_test_acc"]) == {"epoch_000", "epoch_002"}
    assert not (folder / "train_state.pt").exists()
    p = run_script("01_train_teacher.py", "--run", run, *TINY_01, *SURROGATE)
    assert "surrogate: done earlier" in p.stdout


def test_01_killed_surrogate_resumes_to_the_same_weights(run, tmp_path):
    other = tmp_path / "mnist5k"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("surrogate", "distilled"))
    args = ["--run", other, *TINY_01, *SURROGATE]
    kill_when("01_train_teacher.py", args, other / "surrogate" / "train_state.pt")
    assert not (other / "surrogate" / "metrics.json").exists()
    p = run_script("01_train_teacher.py", *args)
    assert "surrogate: resuming after epoch 1" in p.stdout
    for e in (0, 2):
        a = torch.load(run / "surrogate" / f"epoch_{e:03d}.pt", weights_only=True)["state_dict"]
        b = torch.load(other / "surrogate" / f"epoch_{e:03d}.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_02_igd_writes_the_stage_contract(run):
    # a stale cache entry (another checkpoint's hash) must be recomputed, never reused
    info = common.read_run_info(run)
    P = sum(p.numel() for p in common.build_model("convnet-1", info).parameters())
    stale = {"sha256": "0" * 64, "grads": torch.zeros(10, P)}
    cache_file = run / "surrogate" / "real_grads.pt"
    key = {"dataset": "mnist5k", "train_size": 4000, "chunk": 50}
    torch.save({"key": key, "entries": {"epoch_002/first_200": stale}}, cache_file)
    p = distill(run, "igd")
    assert "real gradients of surrogate epoch 2" in p.stdout + p.stderr
    out = run / "distilled" / "igd-ipc4"
    stages = common.read_stages(out, info)
    assert len(stages) == 2
    cfg = common.read_json(out / "config.json")
    s = cfg["derived"]["settings"]
    assert s["trajectory"] == [0, 2] and s["window"] == [30, 45] and s["lam"] == 5.0
    # the small column's gamma is the paper's scaled to the prior's size: 120 x 784 / 4096 on pixels
    assert s["gamma"] == 22.97
    assert cfg["derived"]["defaults"]["gamma"] == {"paper": 120.0, "small": None}
    for k, st in enumerate(stages):
        assert torch.bincount(st.y, minlength=10).tolist() == [2] * 10
        m = common.read_json(out / f"stage_{k + 1:02d}" / "manifest.json")
        assert m["method"] == "igd" and m["trajectory"] == [0, 2]
        sc = m["scores"]
        assert {"G", "cos_epoch000", "cos_epoch002", "ce_reference"} <= set(sc)
        assert len(sc["G"]) == 20 and all(-2 <= g <= 0 for g in sc["G"])
        mean_cos = [(a + b) / 2 - 1 for a, b in zip(sc["cos_epoch000"], sc["cos_epoch002"])]
        assert sc["G"] == pytest.approx(mean_cos, abs=1e-6)
        z = torch.load(out / f"stage_{k + 1:02d}" / "latents.pt", weights_only=True)
        assert z.shape == (20, 1, 28, 28)
    cache = torch.load(cache_file, weights_only=True)
    assert cache["key"] == key
    assert set(cache["entries"]) == {"epoch_000/first_200", "epoch_002/first_200"}
    fresh = cache["entries"]["epoch_002/first_200"]
    assert fresh["sha256"] != stale["sha256"] and fresh["grads"].abs().sum() > 0


def test_02_igd_same_seed_same_bytes_and_cache_reuse(run):
    out = run / "distilled" / "igd-ipc4"
    if not out.exists():
        distill(run, "igd")
    before = files(out)
    p = distill(run, "igd", "--overwrite")
    assert "igd: real gradients" not in p.stdout + p.stderr  # read from the cache
    assert files(out) == before


def test_02_igd_with_the_default_sample_batch(run, tmp_path):
    """Without --sample-batch (the scale's default, resolved in Job) igd scores its images in
    chunks of that default: the same files as the run with --sample-batch 30 (10 classes make
    batches of 10 slots either way)."""
    out = run / "distilled" / "igd-ipc4"
    if not out.exists():
        distill(run, "igd")
    i = TINY_02.index("--sample-batch")
    args = TINY_02[:i] + TINY_02[i + 2:]
    run_script("02_distill_stages.py", "--run", run, "--method", "igd", *args, "--out",
               tmp_path / "default-batch")
    assert files(tmp_path / "default-batch") == files(out)


def test_02_igd_killed_mid_run_then_rerun_equals_uninterrupted(run, tmp_path):
    ref = run / "distilled" / "igd-ipc4"
    if not ref.exists():
        distill(run, "igd")
    other = tmp_path / "mnist5k"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("distilled", "lgd-init-igd"))
    out = other / "distilled" / "igd-ipc4"
    args = ["--run", other, "--method", "igd", *TINY_02]
    kill_when("02_distill_stages.py", args, out / "stage_01" / "manifest.json")
    assert not (out / "stage_02" / "manifest.json").exists()
    (out / "stage_02" / "4").mkdir(parents=True, exist_ok=True)
    (out / "stage_02" / "4" / "000002.png").write_bytes(b"half a png")
    p = run_script("02_distill_stages.py", *args)
    assert "stage 1: done earlier" in p.stdout
    assert files(out) == files(ref)


def test_lgd_init_set_igd_starts_with_igds_first_increment(run):
    ref = run / "distilled" / "igd-ipc4"
    if not ref.exists():
        distill(run, "igd")
    distill(run, "lgd", "--init-set", "igd", "--guide-epochs", "1", "--guide-model",
            "convnet-1", "--out", run / "lgd-init-igd")
    out = files(run / "lgd-init-igd")
    want = files(ref)
    firsts = [k for k in want if k.startswith("stage_01/") and k.endswith((".png", ".pt"))]
    assert firsts and all(out[k] == want[k] for k in firsts)  # same seed, same settings
    cfg = common.read_json(run / "lgd-init-igd" / "config.json")["derived"]["settings"]
    assert cfg["init_set"] == "igd" and cfg["init_igd"]["trajectory"] == [0, 2]
    assert (run / "lgd-init-igd" / "stage_02" / "current.pt").exists()


def test_bad_inputs_give_one_line(run, tiny_run, tmp_path):
    def bad(r, *args, frags=()):
        p = run_script("02_distill_stages.py", "--run", r, *TINY_02, *args, check=False)
        assert_user_error(p, *frags)
    plain = tmp_path / "plain"  # a finished run of 01 without a surrogate
    shutil.copytree(tiny_run[0], plain, ignore=shutil.ignore_patterns("distilled"))
    # each call starts python, torch and diffusers (~7 s here): one call per distinct check
    bad(plain, "--method", "igd", frags=["01_train_teacher.py --run", "--surrogate"])
    bad(plain, "--method", "lgd", "--init-set", "igd", frags=["--surrogate"])
    assert not (plain / "distilled").exists()
    bad(run, "--method", "igd", "--trajectory", "0,5",
        frags=["--trajectory 0,5", "epoch(s) [5]", "[0, 2]"])
    bad(run, "--method", "igd", "--trajectory", "first", frags=["--trajectory must be"])
    bad(run, "--method", "dit", "--trajectory", "0", frags=["--trajectory", "only igd"])
    bad(run, "--method", "lgd", "--init-set", "igd", "--init-folder", tmp_path,
        frags=["--init-set igd and --init-folder"])
    # 01: surrogate flags checked before anything is written
    r = tmp_path / "new"

    def bad01(*args, frags=()):
        p = run_script("01_train_teacher.py", "--run", r, *TINY_01, *args, check=False)
        assert_user_error(p, *frags)
    bad01("--surrogate-epochs", "3", frags=["add --surrogate"])
    bad01("--surrogate", "convnet-1", "--surrogate-epochs", "2", "--surrogate-keep", "0,4",
          frags=["--surrogate-keep 0,4", "0..2"])
    bad01("--surrogate", "convnet-6", frags=["convnet-6", "28"])
    assert not r.exists()
