"""The DiT prior: pixel model save/load, CFG sampling determinism, an offline latent pipeline,
bad input."""
import pytest
import torch

import common
import dit
from conftest import make_image_tree


def tiny_pixel_prior(info):
    torch.manual_seed(0)
    model = dit.make_pixel_dit(info, width=32, depth=1, patch=4, head_dim=16)
    return dit.Prior(model, dict(dit.make_train_scheduler().config), info)


def save_tiny_latent_pipeline(folder, num_labels, image_size=16):
    """A randomly initialised DiT + VAE saved as a diffusers DiTPipeline, like a hub download."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                out_channels=8, num_layers=1, sample_size=image_size // 2,
                                patch_size=2, num_embeds_ada_norm=num_labels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
                        sample_size=image_size)
    DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler()).save_pretrained(folder)
    return folder


def test_pixel_dit_save_load_round_trip(tmp_path):
    info, _, _ = common.load_dataset("mnist5k")
    prior = tiny_pixel_prior(info)
    prior.save(tmp_path / "dit")
    loaded = dit.load_prior(tmp_path / "dit", info, "cpu")
    assert loaded.vae is None and loaded.num_labels == 10 and not loaded.learned_sigma
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([5, 900]), torch.tensor([3, 10])
    with torch.no_grad():
        assert torch.equal(prior.transformer(x, t, y).sample, loaded.transformer(x, t, y).sample)
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"


def test_sampling_is_seeded_and_cfg_matters():
    info, _, _ = common.load_dataset("mnist5k")
    prior = tiny_pixel_prior(info)
    y = torch.arange(10)

    def run(seed, cfg=4.0):
        seeds = [dit.slot_seed(seed, i) for i in range(len(y))]
        return dit.sample(prior, y, seeds, steps=5, cfg=cfg, progress=False)[0]
    a, b, c = run(1), run(1), run(2)
    assert a.shape == (10, 1, 28, 28) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(run(1, cfg=1.0), a)


class StubDiT(torch.nn.Module):
    """Returns the v that a known eps implies at x_t: eps_c for real labels, eps_u for the null
    label."""

    def __init__(self, x0, eps_c, eps_u, abar):
        super().__init__()
        from types import SimpleNamespace
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(num_embeds_ada_norm=10, in_channels=1, out_channels=1,
                                      sample_size=28)
        self.x0, self.eps_c, self.eps_u, self.abar, self.seen = x0, eps_c, eps_u, abar, None

    def forward(self, x, t, labels):
        from types import SimpleNamespace
        self.seen = labels.clone()
        a = self.abar[t].view(-1, 1, 1, 1)
        r = len(labels) // len(self.eps_c)  # 2 with the null-label rows, 1 without
        eps = torch.where((labels == 10).view(-1, 1, 1, 1), self.eps_u.repeat(r, 1, 1, 1),
                          self.eps_c.repeat(r, 1, 1, 1))
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return SimpleNamespace(sample=a.sqrt() * eps - (1 - a).sqrt() * x0)


def test_v_to_eps_and_cfg_combination_are_exact():
    info, _, _ = common.load_dataset("mnist5k")
    g = torch.Generator().manual_seed(0)
    x0, eps_c, eps_u = (torch.randn(3, 1, 28, 28, generator=g) for _ in range(3))
    sched_cfg = dict(dit.make_train_scheduler().config)
    stub = StubDiT(x0, eps_c, eps_u, dit.make_train_scheduler().alphas_cumprod)
    prior = dit.Prior(stub, sched_cfg, info)
    sched = prior.scheduler(50)
    t = sched.timesteps[10]
    a = sched.alphas_cumprod[int(t)]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps_c
    y = torch.tensor([1, 2, 3])
    eps1, var = prior.eps(xt, t, y, 1.0, sched)
    assert var is None and torch.allclose(eps1, eps_c, atol=1e-4)
    assert stub.seen.tolist() == [1, 2, 3]  # CFG 1 = the conditional prediction: no null rows
    eps0, _ = prior.eps(xt, t, y, 0.0, sched)
    assert torch.allclose(eps0, eps_u, atol=1e-4)
    # the second half of the batch carries the null label read from the model (10 here)
    assert stub.seen.tolist() == [1, 2, 3, 10, 10, 10]
    eps4, _ = prior.eps(xt, t, y, 4.0, sched)
    assert torch.allclose(eps4, eps_u + 4 * (eps_c - eps_u), atol=1e-3)


def test_null_label_is_read_from_the_model():
    info, _, _ = common.load_dataset("mnist5k")
    prior = tiny_pixel_prior(info)
    # the label table has one row more than the classes: the null row used for CFG
    table = prior.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert prior.num_labels == 10 and table.num_embeddings == 11


def test_offline_pretrained_latent_pipeline(tmp_path):
    root = make_image_tree(tmp_path / "tree", ["a", "b", "c"], 2, 1, size=16)
    info, _, _ = common.load_dataset(f"imagefolder:{root}")
    folder = save_tiny_latent_pipeline(tmp_path / "pipe", num_labels=3)
    prior = dit.load_prior(folder, info, "cpu")
    assert prior.vae is not None and prior.learned_sigma and prior.latent_shape == (4, 8, 8)
    imgs, z, _ = dit.sample(prior, torch.tensor([0, 1, 2]), [0, 1, 2], steps=3, cfg=4.0,
                            progress=False)
    assert imgs.shape == (3, 3, 16, 16) and z.shape == (3, 4, 8, 8)
    assert torch.isfinite(imgs).all()
    # decoding undoes the VAE scaling factor; the learned variance reaches the scheduler
    with torch.no_grad():
        ref = ((prior.vae.decode(z / prior.vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
        assert torch.allclose(prior.decode(z), ref, atol=1e-6)
    assert prior.scheduler(3).config.variance_type == "learned_range"
    assert prior.scheduler(3).config.clip_sample is False


def test_class_map_checked_against_dit_labels(tmp_path):
    root = make_image_tree(tmp_path / "nette", sorted(common.IMAGENETTE), 1, 1, size=16)
    info, _, _ = common.load_dataset("imagenette", root, size=16)
    folder = save_tiny_latent_pipeline(tmp_path / "pipe", num_labels=100)
    with pytest.raises(common.UserError, match="class map of imagenette needs labels up to 701"):
        dit.load_prior(folder, info, "cpu")
    # with 1000 labels the ImageNet indices are used
    prior = dit.load_prior(save_tiny_latent_pipeline(tmp_path / "pipe1k", num_labels=1000), info,
                           "cpu")
    assert prior.labels(torch.tensor([0, 9])).tolist() == [info.class_map[0], info.class_map[9]]


def test_bad_dit_inputs(tmp_path):
    info, _, _ = common.load_dataset("mnist5k")
    with pytest.raises(common.UserError, match="cannot take 28 px"):
        dit.make_pixel_dit(info, patch=5)
    with pytest.raises(common.UserError, match="does not exist"):
        dit.load_prior(tmp_path / "missing", info, "cpu")
    (tmp_path / "junk").mkdir()
    with pytest.raises(common.UserError, match="cannot load a DiT"):
        dit.load_prior(tmp_path / "junk", info, "cpu")
    rgb = common.DatasetInfo("rgb", 3, 28, (0.5,) * 3, (0.5,) * 3, [str(i) for i in range(10)],
                             flip=True)
    with pytest.raises(common.UserError, match="1-channel images"):
        dit.Prior(tiny_pixel_prior(info).transformer, dict(dit.make_train_scheduler().config), rgb)


def test_images_do_not_depend_on_the_order_or_sharing_of_batches():
    """Each slot's noise comes from its own seed and a batch never holds a class twice, so the
    same batches made in another order, or split between two processes (two calls here), give
    the same images and latents, bit for bit."""
    info, _, _ = common.load_dataset("mnist5k")
    prior = tiny_pixel_prior(info)
    y = torch.arange(10).repeat(3)  # slot-major: three images of every class
    seeds = [dit.slot_seed(7, int(c), j // 10) for j, c in enumerate(y)]
    groups = [[j * 10 + c for c in range(g, g + 5)] for j in range(3) for g in (0, 5)]

    def run(slots, batches):
        imgs, z, _ = dit.sample(prior, y[slots], [seeds[i] for i in slots], steps=4,
                                slot_batches=batches, progress=False)
        return dict(zip(slots, imgs)), dict(zip(slots, z))
    img, z = run(list(range(30)), groups)
    # the two halves of the classes, as two processes would make them
    for half in (0, 5):
        slots = [i for i in range(30) if (i % 10 >= 5) == bool(half)]
        part = [[slots.index(i) for i in b] for b in groups if b[0] in slots]
        img_h, z_h = run(slots, part)
        assert all(torch.equal(img_h[i], img[i]) and torch.equal(z_h[i], z[i]) for i in slots)
    # the rounds' groups in the other order (class 5-9 first): same bits
    swapped = [b for j in range(3) for b in (groups[2 * j + 1], groups[2 * j])]
    img_s, z_s = run(list(range(30)), swapped)
    assert all(torch.equal(img_s[i], img[i]) and torch.equal(z_s[i], z[i]) for i in range(30))


def test_batches_never_hold_a_class_twice():
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2, 2, 0])
    b = dit.batches(y, size=5)
    assert sum(b, []) == list(range(9))  # every slot once, in order
    assert all(len(set(y[i].item() for i in batch)) == len(batch) <= 5 for batch in b)
    assert b == [[0, 1, 2], [3, 4, 5], [6], [7, 8]]
    assert dit.batches(y, size=2) == [[0, 1], [2, 3], [4, 5], [6], [7, 8]]


def test_the_prior_is_frozen():
    info, _, _ = common.load_dataset("mnist5k")
    prior = tiny_pixel_prior(info)
    assert not any(p.requires_grad for p in prior.transformer.parameters())
