"""--prior latent: the papers' VAE + latent DiT in miniature, as a pipeline folder, through 01 and
02."""
import json
import shutil
from argparse import Namespace
from contextlib import nullcontext

import pytest
import torch

import common
import dit
from conftest import TINY_01, assert_user_error, kill_when, load_script, run_script
from test_02 import GUIDE, TINY_02, files

TINY_LATENT = TINY_01 + ["--prior", "latent", "--vae-steps", "10", "--vae-batch", "16"]

train01 = load_script("train01", "01_train_teacher.py")


def tiny_latent_prior(info, scaling=0.7):
    """A random AutoencoderKL (28 px -> 4x7x7) and a patch-1 latent DiT, as 01 --prior latent
    makes them."""
    torch.manual_seed(0)
    vae = dit.make_vae(info, blocks=(8, 16, 16))
    vae.register_to_config(scaling_factor=scaling)
    model = dit.make_latent_dit(info, width=32, depth=1, patch=1, head_dim=16)
    return dit.Prior(model, dict(dit.make_train_scheduler().config), info, vae)


def test_latent_prior_saves_and_loads_as_a_pipeline_folder(tmp_path):
    info, _, _ = common.load_dataset("mnist5k")
    prior = tiny_latent_prior(info)
    assert prior.latent_shape == (4, 7, 7)
    prior.save(tmp_path / "dit")
    assert sorted(p.name for p in (tmp_path / "dit").iterdir()) == \
        ["scheduler", "transformer", "vae"]
    loaded = dit.load_prior(tmp_path / "dit", info, "cpu")
    assert loaded.vae is not None and loaded.vae.config.scaling_factor == 0.7
    assert loaded.latent_shape == (4, 7, 7)
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"
    z, t, y = torch.randn(2, 4, 7, 7), torch.tensor([5, 900]), torch.tensor([3, 10])
    with torch.no_grad():
        assert torch.equal(prior.transformer(z, t, y).sample, loaded.transformer(z, t, y).sample)
        img = loaded.decode(z)
        assert img.shape == (2, 1, 28, 28) and torch.equal(img, prior.decode(z))
        assert loaded.encode(img).shape == (2, 4, 7, 7)
    # sampling through the loaded pipeline: latents decoded to images, seeded
    y = torch.arange(10)
    seeds = [dit.slot_seed(3, i) for i in range(10)]
    a, za, _ = dit.sample(loaded, y, seeds, steps=3, cfg=2.0, progress=False)
    b, _, _ = dit.sample(loaded, y, seeds, steps=3, cfg=2.0, progress=False)
    assert a.shape == (10, 1, 28, 28) and za.shape == (10, 4, 7, 7) and torch.equal(a, b)


def test_guidance_backpropagates_through_the_vae_decoder():
    """A guided step decodes x0 with the VAE inside the graph: the decoder's output layer receives a
    nonzero gradient, and the guided x_{t-1} differs from the plain step."""
    info, _, _ = common.load_dataset("mnist5k")
    prior = tiny_latent_prior(info)
    torch.manual_seed(1)
    clf = common.build_model("convnet-1", info).eval().requires_grad_(False)
    grads = []
    hook = prior.vae.decoder.conv_out.register_full_backward_hook(
        lambda m, gin, gout: grads.append(gout[0].abs().sum().item()))
    sched = prior.scheduler(10)
    t = sched.timesteps[3]
    x = torch.randn(4, 4, 7, 7, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])

    def step(guide):
        gens = [torch.Generator().manual_seed(i) for i in range(4)]
        return dit.guided_step(prior, x, t, prior.labels(y), y, 2.0, prior.scheduler(10), gens,
                               guide)
    plain = step(None)
    assert grads == []  # a plain step builds no graph
    guided = step(dit.Guidance(terms=dit.learnability_terms(clf, clf, 0.5), scale=50.0))
    hook.remove()
    assert len(grads) == 1 and grads[0] > 0
    assert not torch.allclose(plain, guided)
    # eps held constant: the gradient still goes through the decoder (x0 depends on x_t)
    const = step(dit.Guidance(terms=dit.learnability_terms(clf, clf, 0.5), scale=50.0,
                              eps_const=True))
    assert not torch.allclose(plain, const)


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """01 --prior latent at tiny settings (a 10-step VAE)."""
    run = tmp_path_factory.mktemp("latent") / "mnist5k"
    p = run_script("01_train_teacher.py", "--run", run, *TINY_LATENT)
    return run, p


def test_01_latent_writes_a_pipeline_folder_with_a_data_scaled_vae(latent_run):
    run, p = latent_run
    assert "vae: AutoencoderKL 1->4 channels" in p.stdout and "dit: latent DiT" in p.stdout
    folder = run / "dit"
    assert {"transformer", "vae", "scheduler"} <= {d.name for d in folder.iterdir()}
    assert not (folder / "vae.partial").exists() and not (folder / "vae_state.pt").exists()
    info = common.read_run_info(run)
    prior = dit.load_run_prior(run, info, "cpu")
    assert prior.vae is not None and prior.latent_shape == (4, 7, 7)
    assert prior.transformer.config.patch_size == 1 and prior.transformer.config.num_layers == 1
    m = json.loads((folder / "metrics.json").read_text())
    assert m["prior"] == "latent" and m["vae"]["steps"] == 10 and m["vae"]["recon_mse"] > 0
    assert m["vae"]["scaling_factor"] == pytest.approx(prior.vae.config.scaling_factor)
    # the scaling factor makes the training latents unit-variance
    _, train, _ = common.load_dataset("mnist5k")
    z = train01.vae_latents(prior.vae, train.x)
    assert z.std().item() == pytest.approx(1.0, abs=1e-3)
    cfg = json.loads((folder / "config.json").read_text())["args"]
    assert cfg["prior"] == "latent" and cfg["vae_steps"] == 10 and cfg["dit_patch"] == 1
    assert list(json.loads((run / "timings.json").read_text())) == \
        ["01/teacher", "01/vae", "01/prior", "01/sample check"]
    p = run_script("01_train_teacher.py", "--run", run, *TINY_LATENT)
    assert "dit: done earlier" in p.stdout


def test_02_dit_and_lgd_on_the_latent_prior_same_seed_same_bytes(latent_run, tmp_path):
    run = tmp_path / "mnist5k"
    shutil.copytree(latent_run[0], run)
    for method in ("dit", "lgd"):
        args = TINY_02 + (GUIDE if method == "lgd" else [])
        run_script("02_distill_stages.py", "--run", run, "--method", method, *args)
        out = run / "distilled" / f"{method}-ipc4"
        stages = common.read_stages(out, common.read_run_info(run))
        assert [len(s.y) for s in stages] == [20, 20]
        assert torch.load(out / "stage_02" / "latents.pt", weights_only=True).shape == (20, 4, 7, 7)
    lgd = run / "distilled" / "lgd-ipc4"
    before = files(lgd)
    run_script("02_distill_stages.py", "--run", run, "--method", "lgd", *TINY_02, *GUIDE,
               "--overwrite")
    assert files(lgd) == before
    assert files(lgd)["stage_02/0/000002.png"] != \
        files(run / "distilled" / "dit-ipc4")["stage_02/0/000002.png"]


def test_02_every_other_method_runs_on_the_latent_prior(latent_run, tmp_path):
    """acs and igd guide through the VAE decoder (latents 4x7x7); random and delt leave the prior
    unread, so the latent default changes nothing for them but the run they read."""
    from test_igd import SURROGATE
    run = tmp_path / "mnist5k"
    shutil.copytree(latent_run[0], run)
    p = run_script("01_train_teacher.py", "--run", run, *TINY_LATENT, *SURROGATE)
    assert "dit: done earlier" in p.stdout and "surrogate: convnet-1" in p.stdout
    info = common.read_run_info(run)
    extra = {"acs": GUIDE, "igd": [], "random": [],
             "delt": ["--iterations", "4", "--round-iterations", "2"]}
    for method, more in extra.items():
        run_script("02_distill_stages.py", "--run", run, "--method", method, *TINY_02, *more)
        out = next((run / "distilled").glob(f"{method}*ipc4"))
        stages = common.read_stages(out, info)
        assert [torch.bincount(s.y, minlength=10).tolist() for s in stages] == [[2] * 10] * 2, \
            method
        if method in ("acs", "igd"):
            latents = torch.load(out / "stage_02" / "latents.pt", weights_only=True)
            assert latents.shape == (20, 4, 7, 7)
            gamma = json.loads((out / "config.json").read_text())["derived"]["settings"]["gamma"]
            assert gamma == {"acs": 2.39, "igd": 5.74}[method]  # the paper's x 196 / 4096
            m = json.loads((out / "stage_02" / "manifest.json").read_text())
            assert len(m["scores"]["ce_reference"]) == 20


def test_vae_phase_resumes_after_a_kill_and_a_finished_vae_is_kept(latent_run, tmp_path):
    """Killed mid-VAE, then mid-DiT (the VAE finished), then rerun: the weights of one clean run."""
    from safetensors.torch import load_file
    # imported, not trained: the test is about the VAE
    teacher = latent_run[0] / "teacher" / "teacher.pt"
    args = ["--teacher", teacher, "--prior", "latent", "--vae-steps", "20", "--vae-batch", "8",
            "--dit-steps", "20", "--dit-width", "32", "--dit-depth", "1", "--dit-ckpt-every", "10",
            "--samples-per-class", "1", "--sample-steps", "2"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_script("01_train_teacher.py", "--run", ref, *args)
    kill_when("01_train_teacher.py", ["--run", run, *args], run / "dit" / "vae_state.pt")
    assert not (run / "dit" / "vae").exists()
    kill_when("01_train_teacher.py", ["--run", run, *args], run / "dit" / "train_state.pt")
    assert (run / "dit" / "vae").exists() and not (run / "dit" / "metrics.json").exists()
    p = run_script("01_train_teacher.py", "--run", run, *args)
    assert "vae: done earlier" in p.stdout and "dit: resuming at step" in p.stdout
    for w in ("vae/diffusion_pytorch_model.safetensors",
              "transformer/diffusion_pytorch_model.safetensors"):
        a, b = load_file(ref / "dit" / w), load_file(run / "dit" / w)
        assert all(torch.equal(a[k], b[k]) for k in a), w
    assert json.loads((run / "dit" / "vae" / "config.json").read_text())["scaling_factor"] == \
        json.loads((ref / "dit" / "vae" / "config.json").read_text())["scaling_factor"]


def test_distillability_trains_the_same_student_on_samples_and_real_subsets():
    """Given real draw 0 as its 'samples', seed 0 of both columns is the same student: one
    protocol."""
    info, train, test = common.load_dataset("mnist5k")
    test = common.Split(test.x[:200], test.y[:200])
    perms = common.class_permutations(train.y, 10, 0)
    idx = torch.cat([p[:10] for p in perms])
    args = Namespace(seed=0, scale="auto", cfg=4.0, sample_steps=50)
    d = train01.distillability(common.Split(train.x[idx], train.y[idx]), info, train, test, args,
                               "cpu", nullcontext(), seeds=2, epochs=2)
    assert d["epochs"] == 2 and d["student"] == "convnet-3" and len(d["samples"]["seeds"]) == 2
    assert d["samples"]["seeds"][0] == d["random_real"]["seeds"][0]
    assert d["gap"] == pytest.approx(d["samples"]["mean"] - d["random_real"]["mean"])


def test_bad_prior_inputs_give_one_line(tmp_path):
    r = tmp_path / "x"
    assert_user_error(run_script("01_train_teacher.py", "--run", r, *TINY_LATENT,
                                 "--dit-patch", "2", check=False),
                      "cannot take the 7 px latents")
    assert_user_error(run_script("01_train_teacher.py", "--run", r, "--prior", "latent",
                                 "--dit", tmp_path, check=False), "--prior latent")
    assert not r.exists()
    assert train01.parse_args(["--prior", "pixel"]).dit_patch == 4
    assert train01.parse_args([]).dit_patch == 1
    assert train01.parse_args([]).prior == "latent"
    assert train01.parse_args(["--dit", "x"]).prior == "pixel"
