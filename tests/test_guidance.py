"""Guided sampling: scales 0 equal plain sampling, each term raises its own objective, windows,
memory."""
import pytest
import torch
import torch.nn.functional as F

import common
import dit
from test_dit import save_tiny_latent_pipeline, tiny_pixel_prior


@pytest.fixture(scope="module")
def setup():
    info, _, _ = common.load_dataset("mnist5k")
    prior = tiny_pixel_prior(info)
    torch.manual_seed(1)
    current = common.build_model("convnet-1", info).eval()
    reference = common.build_model("convnet-1-bn", info).eval()
    return info, prior, current, reference


Y = torch.arange(10).repeat(2)


def run(prior, guidance=None, seed=3, steps=10, y=Y):
    """(images, latents) of one batch from a fixed noise seed."""
    seeds = [dit.slot_seed(seed, i) for i in range(len(y))]
    return dit.sample(prior, y, seeds, steps=steps, cfg=4.0, guidance=guidance, batch_size=len(y),
                      progress=False)[:2]


def test_all_scales_zero_reproduce_plain_sampling_exactly(setup):
    info, prior, current, reference = setup
    mem = dit.Memory(8)
    mem.add(torch.randn(20, 1, 28, 28), Y)
    g = dit.Guidance(terms=dit.learnability_terms(current, reference, 0.5), scale=0.0,
                     deviation=0.0, memory=mem, window=(0, 49))
    a, za = run(prior)
    b, zb = run(prior, g)
    assert torch.equal(a, b) and torch.equal(za, zb)


@pytest.mark.parametrize("eps_const", [False, True])
def test_learnability_guidance_raises_S(setup, eps_const):
    info, prior, current, reference = setup
    terms = dit.learnability_terms(current, reference, 0.5)
    g = dit.Guidance(terms=terms, scale=15.0, c0=0.01, window=(0, 49), eps_const=eps_const)
    plain, _ = run(prior)
    guided, _ = run(prior, g)
    with torch.no_grad():
        s0, s1 = dit.objective(terms, plain, Y), dit.objective(terms, guided, Y)
    assert s1.mean() > s0.mean() + 0.1, (s0.mean(), s1.mean())
    assert (s1 > s0).float().mean() > 0.7  # per slot too, not only on average


@pytest.mark.parametrize("form,omega_v", [("ce", 0.0), ("nonsat", 0.0), ("ce", 0.5)])
def test_adversarial_guidance_raises_discriminator_loss(setup, form, omega_v):
    info, prior, current, reference = setup
    disc = current  # any classifier serves as D_k here
    terms = dit.adversarial_terms(disc, reference, omega_v, form)
    g = dit.Guidance(terms=terms, scale=15.0, c0=0.01, window=(0, 49))
    plain, _ = run(prior)
    guided, _ = run(prior, g)
    with torch.no_grad():
        a0 = F.cross_entropy(disc(plain), Y, reduction="none")
        a1 = F.cross_entropy(disc(guided), Y, reduction="none")
    assert a1.mean() > a0.mean() + 0.1, (a0.mean(), a1.mean())


def test_deviation_term_moves_samples_away_from_memory(setup):
    info, prior, *_ = setup
    _, z_mem = run(prior, seed=5)  # earlier samples of the same classes
    mem, earlier = dit.Memory(64), dit.Memory(64)
    mem.add(z_mem, Y)
    earlier.add(z_mem, Y)  # the sampler adds its own samples to `mem`; measure against these
    _, z0 = run(prior, seed=6)
    _, z1 = run(prior, dit.Guidance(deviation=50.0, memory=mem, window=(0, 49)), seed=6)
    with torch.no_grad():
        c0, c1 = earlier.nearest_cos(z0, Y), earlier.nearest_cos(z1, Y)
    assert c1.mean() < c0.mean() - 0.02, (c0.mean(), c1.mean())
    assert len(mem) == 2 * len(Y)  # the batch's kept latents joined the memory after it


def test_guidance_through_a_vae_raises_S(tmp_path):
    """Latent DiT: the objective sees VAE-decoded images and its gradient reaches the latent."""
    info = common.DatasetInfo("toy", 3, 16, (0.5,) * 3, (0.5,) * 3, ["a", "b", "c"], flip=True,
                              class_map=[0, 1, 2])
    prior = dit.load_prior(save_tiny_latent_pipeline(tmp_path / "pipe", num_labels=3), info, "cpu")
    torch.manual_seed(0)
    terms = dit.learnability_terms(common.build_model("convnet-1", info).eval(),
                                   common.build_model("convnet-1-bn", info).eval(), 0.5)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    plain, _ = run(prior, y=y, steps=6)
    guided, _ = run(prior, dit.Guidance(terms=terms, scale=15.0, c0=0.05, window=(0, 49)), y=y,
                    steps=6)
    with torch.no_grad():
        assert dit.objective(terms, guided, y).mean() > dit.objective(terms, plain, y).mean()


def test_nonsaturating_score_is_log_one_minus_p():
    model = torch.nn.Linear(5, 4)
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 0, 1])
    p = model(x).softmax(1)[torch.arange(6), y]
    torch.testing.assert_close(dit.nonsat_score(model)(x, y), torch.log1p(-p))


def test_window_is_rescaled_to_the_step_count():
    g = dit.Guidance(window=(10, 45))
    assert sum(g.active(i, 50) for i in range(50)) == 36  # t = 45..10
    assert [i for i in range(50) if g.active(i, 50)][:2] == [4, 5]  # i = 49 - t
    assert sum(g.active(i, 10) for i in range(10)) == 8  # t = 9..2


def test_memory_is_a_fifo_per_class():
    m = dit.Memory(3)
    m.add(torch.arange(10.).view(5, 2), torch.tensor([0, 0, 0, 0, 1]))
    assert m.bank[0].tolist() == [[2, 3], [4, 5], [6, 7]] and len(m.bank[1]) == 1
    x = torch.tensor([[6., 7.], [1., 0.], [0., 1.]], requires_grad=True)
    cos = m.nearest_cos(x, torch.tensor([0, 1, 2]))
    assert cos[0].item() == pytest.approx(1.0) and cos[2].item() == 0.0  # class 2: empty memory
