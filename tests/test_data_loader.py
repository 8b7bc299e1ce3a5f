"""train_val_split, BatchLoader and augmentations."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from laperm.data import (
    Augment,
    BatchLoader,
    make_augment,
    normalize,
    random_affine,
    random_hflip,
    random_rotate,
    random_shift,
    random_subset,
    random_zoom,
    synthetic_dataset,
    train_val_split,
)

# ---------------------------------------------------------------- splits


@st.composite
def split_args(draw):
    n = draw(st.integers(1, 300))
    val = draw(st.one_of(st.integers(0, n - 1), st.floats(0.0, 1.0, exclude_max=True)))
    return n, val, draw(st.integers(0, 2**32))


@settings(max_examples=60, deadline=None)
@given(split_args())
def test_split_is_disjoint_cover(args):
    n, val, seed = args
    train, held = train_val_split(n, val, seed)
    k = val if isinstance(val, int) else min(round(val * n), n - 1)
    assert len(held) == k and len(train) == n - k
    assert train.dtype == held.dtype == torch.int64
    assert torch.equal(torch.cat([train, held]).sort().values, torch.arange(n))
    assert torch.equal(train_val_split(n, val, seed)[1], held)


def test_split_depends_on_seed():
    assert not torch.equal(train_val_split(1000, 100, 0)[1], train_val_split(1000, 100, 1)[1])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400), st.integers(1, 500), st.integers(0, 2**32))
def test_random_subset_is_a_sorted_seeded_sample(n, m, seed):
    idx = torch.arange(n) * 3  # any sorted index
    sub = random_subset(idx, m, seed)
    assert len(sub) == min(n, m) and torch.equal(sub, sub.sort().values)
    assert len(set(sub.tolist())) == len(sub) and set(sub.tolist()) <= set(idx.tolist())
    assert torch.equal(random_subset(idx, m, seed), sub)


def test_random_subset_of_class_ordered_images_keeps_every_class():
    """Image folders and zips list images class by class: a subset must not be the first N (a regression:
    a 10k CIFAR subset once held two classes)."""
    labels = torch.arange(10).repeat_interleave(5000)  # 50,000 images, class by class
    train, _ = train_val_split(50000, 1000, 0)
    counts = torch.bincount(labels[random_subset(train, 10000, 1)], minlength=10)
    assert counts.min() > 850 and counts.max() < 1150  # ~1000 per class


@pytest.mark.parametrize("n,val", [(10, 10), (10, -1), (10, 1.0), (10, -0.1), (0, 0), (10, True), (10, "3")])
def test_split_rejects_bad_bounds(n, val):
    with pytest.raises(ValueError):
        train_val_split(n, val, 0)


# ---------------------------------------------------------------- BatchLoader


def tiny(n=37, c=3, seed=0):
    """uint8 images whose first pixel encodes the sample index, labels = index."""
    x = torch.randint(0, 256, (n, c, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return x, torch.arange(n)


def labels(loader):
    return torch.cat([yb for _, yb in loader])


def test_every_sample_once_per_epoch():
    x, y = tiny()
    loader = BatchLoader(x, y, 5, shuffle=True, seed=1)
    assert len(loader) == 8
    first, second = labels(loader), labels(loader)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(37))
    assert not torch.equal(first, second)  # epoch 1 is reshuffled
    assert loader.epoch == 2
    dropped = BatchLoader(x, y, 5, shuffle=True, seed=1, drop_last=True)
    assert len(dropped) == 7 and len(labels(dropped)) == 35
    assert torch.equal(labels(BatchLoader(x, y, 5, shuffle=False)), y)


def test_batches_are_normalised_pixels():
    x, y = tiny(c=2)
    loader = BatchLoader(x, y, 16, shuffle=True, seed=0, mean=(0.5, 0.25), std=(0.5, 2.0))
    xb, yb = next(iter(loader))
    assert xb.dtype == torch.float32 and yb.dtype == torch.int64 and xb.device.type == "cpu"
    ref = (x[yb].float() / 255 - torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)) / torch.tensor([0.5, 2.0]).view(1, 2, 1, 1)
    torch.testing.assert_close(xb, ref)
    torch.testing.assert_close(normalize(x[yb], (0.5, 0.25), (0.5, 2.0)), ref)  # uint8 input is scaled by 1/255


def test_seeded_order_is_deterministic():
    x, y = tiny()
    a, b = BatchLoader(x, y, 8, shuffle=True, seed=7), BatchLoader(x, y, 8, shuffle=True, seed=7)
    assert torch.equal(labels(a), labels(b)) and torch.equal(labels(a), labels(b))
    assert not torch.equal(
        labels(BatchLoader(x, y, 8, shuffle=True, seed=8)), labels(BatchLoader(x, y, 8, shuffle=True, seed=7))
    )
    c = BatchLoader(x, y, 8, shuffle=True, seed=7)
    c.set_epoch(1)  # jumping to epoch 1 reproduces it without replaying epoch 0
    d = BatchLoader(x, y, 8, shuffle=True, seed=7)
    labels(d)
    assert torch.equal(labels(c), labels(d))


def test_indices_restrict_the_loader():
    x, y = tiny()
    subset = torch.tensor([3, 5, 8, 13, 21])
    loader = BatchLoader(x, y, 2, shuffle=True, seed=0, indices=subset)
    assert len(loader) == 3 and sorted(labels(loader).tolist()) == subset.tolist()


def run_epoch(loader):
    return [(xb.clone(), yb.clone()) for xb, yb in loader]


def test_resume_mid_epoch_is_bit_exact():
    ds = synthetic_dataset(n_train=60, n_test=8, shape=(3, 16, 16), seed=0)

    def make():
        return BatchLoader(
            ds.train_x,
            ds.train_y,
            8,
            shuffle=True,
            seed=5,
            mean=ds.mean,
            std=ds.std,
            augment=make_augment("cifar-paper"),
        )

    a = make()
    run_epoch(a)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 3)
    rest = [(xb.clone(), yb.clone()) for xb, yb in it]
    following = run_epoch(a)

    b = make()
    b.load_state_dict(state)
    b.set_epoch(1)  # calling set_epoch for the resumed epoch must keep the position
    resumed = run_epoch(b)
    assert len(resumed) == len(rest) == len(a) - 3
    for (x1, y1), (x2, y2) in zip(resumed, rest):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    for (x1, y1), (x2, y2) in zip(run_epoch(b), following):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_interrupted_epoch_restarts_and_bad_state_rejected():
    x, y = tiny()
    loader = BatchLoader(x, y, 5, shuffle=True, seed=0)
    for _ in loader:
        break
    assert loader.state_dict()["batch"] == 1 and loader.epoch == 0
    assert torch.equal(labels(loader), loader.order(0))  # a fresh loop replays the whole epoch
    other = BatchLoader(x, y, 6, shuffle=True, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(loader.state_dict())


def test_loader_rejects_float_images():
    with pytest.raises(TypeError):
        BatchLoader(torch.zeros(4, 1, 2, 2), torch.zeros(4), 2, shuffle=False)


# ---------------------------------------------------------------- augmentations


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, g: random_hflip(x, g),
        lambda x, g: random_shift(x, g, 0.1),
        lambda x, g: random_rotate(x, g, 15),
        lambda x, g: random_zoom(x, g, 0.1),
        make_augment("mnist-paper"),
        make_augment("cifar-paper"),
        make_augment("cifar-resnet"),
    ],
)
def test_augment_shape_and_determinism(fn):
    x = torch.rand(6, 3, 12, 10)
    out = fn(x, gen(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, fn(x, gen(1)))
    assert not torch.equal(out, fn(x, gen(2)))


def test_hflip_forced_twice_is_identity():
    x = torch.rand(4, 1, 5, 7)
    once = random_hflip(x, gen(), p=1.0)
    assert torch.equal(once, x.flip(-1)) and torch.equal(random_hflip(once, gen(), p=1.0), x)
    assert torch.equal(random_hflip(x, gen(), p=0.0), x)


def test_zero_affine_is_identity():
    x = torch.rand(3, 2, 9, 13)
    for fill in ("nearest", "zero"):
        torch.testing.assert_close(random_affine(x, gen(), fill=fill), x, atol=1e-5, rtol=0)
        torch.testing.assert_close(random_shift(x, gen(), 0.0, fill=fill), x, atol=1e-5, rtol=0)
        torch.testing.assert_close(random_rotate(x, gen(), 0.0, fill=fill), x, atol=1e-5, rtol=0)


def test_fill_modes():
    ones = torch.ones(8, 1, 16, 16)
    # nearest (Keras default) repeats edge pixels: a constant image stays constant
    torch.testing.assert_close(random_affine(ones, gen(), degrees=30, shift=0.2, zoom=0.2), ones)
    # zero fill brings in black borders
    shifted = random_shift(ones, gen(), 0.25, fill="zero")
    assert shifted.min() < 0.5 and shifted.max() <= 1.0 + 1e-6


def test_rotation_by_90_degrees_matches_rot90():
    # Pin the geometry: with max 90° the extreme draw is not guaranteed, so build the draw directly.
    x = torch.arange(16.0).view(1, 1, 4, 4)
    g = gen()
    angle_draw = torch.rand(1, 5, generator=gen(), dtype=torch.float64)[0, 0] * 2 - 1
    out = random_rotate(x, g, 90.0 / abs(float(angle_draw)))  # makes this draw exactly ±90°
    expected = torch.rot90(x, 1 if angle_draw > 0 else -1, dims=(2, 3))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_make_augment_specs():
    assert make_augment(None) is None and make_augment("none") is None
    assert make_augment("cifar-resnet") == Augment(shift=0.1, hflip=True)
    assert make_augment({"rotate": 5, "fill": "zero"}).rotate == 5
    with pytest.raises(ValueError, match="cifar-paper"):
        make_augment("autoaugment")
    with pytest.raises(ValueError, match="unknown augmentation keys"):
        make_augment({"rotation": 5})
    with pytest.raises(ValueError):
        Augment(shift=1.5)
    with pytest.raises(TypeError):
        random_hflip(torch.zeros(2, 1, 3, 3, dtype=torch.uint8), gen())
