"""CIFAR files, ZCA / mean-std preprocessing and the in-memory datasets (share_transform.train.data.cifar)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from share_transform.errors import ShareError
from share_transform.train.data import (
    ZCA,
    ChannelNorm,
    DataError,
    load_cifar,
    load_preprocessing,
    read_cifar,
    save_preprocessing,
    write_cifar,
)
from share_transform.train.data.cifar import GCN_SCALE, global_contrast_normalize, zca_cache_path


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory: pytest.TempPathFactory):
    """A 60/20-image CIFAR-10 in the official layout, with its arrays."""
    rng = np.random.default_rng(0)
    train = (_images(rng, 60), rng.integers(0, 10, 60))
    test = (_images(rng, 20), rng.integers(0, 10, 20))
    root = tmp_path_factory.mktemp("data")
    write_cifar(root, "cifar10", train, test, classes=[f"c{i}" for i in range(10)])
    return root, train, test


# -- files ---------------------------------------------------------------------------------------------------------


def test_cifar10_round_trip_in_official_layout(cifar10_dir):
    root, train, test = cifar10_dir
    folder = root / "cifar-10-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == [
        "batches.meta",
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ]
    # The official row format: 1024 red bytes, then green, then blue.
    with open(folder / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    assert batch["data"].shape == (12, 3072)
    assert np.array_equal(batch["data"][0, :1024], train[0][0, :, :, 0].ravel())

    for split, (images, labels) in ((True, train), (False, test)):
        got = read_cifar(root, "cifar10", train=split)
        assert np.array_equal(got.images, images) and np.array_equal(got.labels, labels)
        assert got.classes == tuple(f"c{i}" for i in range(10))
    # --data may also name the set's own folder.
    assert np.array_equal(read_cifar(folder, "cifar10", train=False).images, test[0])


def test_cifar100_round_trip_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    train = (_images(rng, 30), rng.integers(0, 100, 30))
    test = (_images(rng, 10), rng.integers(0, 100, 10))
    folder = write_cifar(tmp_path, "cifar100", train, test)
    assert sorted(p.name for p in folder.iterdir()) == ["meta", "test", "train"]
    got = read_cifar(tmp_path, "cifar100", train=True)
    assert np.array_equal(got.images, train[0]) and np.array_equal(got.labels, train[1])
    assert len(got.classes) == 100


def test_absent_data_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="--download") as e:
        read_cifar(tmp_path, "cifar10", train=True)
    assert isinstance(e.value, ShareError)
    with pytest.raises(DataError, match="unknown dataset 'svhn'"):
        read_cifar(tmp_path, "svhn", train=True)


def test_missing_batch_file_is_reported(cifar10_dir, tmp_path):
    root, train, test = cifar10_dir
    write_cifar(tmp_path, "cifar10", train, test)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3 is missing"):
        read_cifar(tmp_path, "cifar10", train=True)
    # The test split alone is still readable.
    assert len(read_cifar(tmp_path, "cifar10", train=False).labels) == 20


@pytest.mark.parametrize("content", [b"", b"\x80\x04not a pickle at all", pickle.dumps([1, 2, 3])])
def test_malformed_file_is_reported(cifar10_dir, tmp_path, content):
    root, train, test = cifar10_dir
    folder = write_cifar(tmp_path, "cifar10", train, test)
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(DataError, match="test_batch"):
        read_cifar(tmp_path, "cifar10", train=False)


def test_wrong_shapes_and_labels_are_reported(cifar10_dir, tmp_path):
    root, train, test = cifar10_dir
    folder = write_cifar(tmp_path, "cifar10", train, test)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}, f)
    with pytest.raises(DataError, match=r"expected data \(N, 3072\)"):
        read_cifar(tmp_path, "cifar10", train=False)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, f)
    with pytest.raises(DataError, match="labels outside 0..9"):
        read_cifar(tmp_path, "cifar10", train=False)


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.int64])
def test_pixels_other_than_uint8_are_refused_not_cast(cifar10_dir, tmp_path, dtype):
    root, train, test = cifar10_dir
    folder = write_cifar(tmp_path, "cifar10", train, test)
    with open(folder / "test_batch", "wb") as f:  # 300 would wrap to 44 under a silent uint8 cast
        pickle.dump({"data": np.full((2, 3072), 300, dtype), "labels": [0, 1]}, f)
    with pytest.raises(DataError, match=rf"test_batch: 'data' must hold uint8 pixels, got {np.dtype(dtype)}"):
        read_cifar(tmp_path, "cifar10", train=False)


def test_an_empty_split_is_reported_as_empty(cifar10_dir, tmp_path):
    root, train, test = cifar10_dir
    folder = write_cifar(tmp_path, "cifar10", train, test)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((0, 3072), np.uint8), "labels": []}, f)
    with pytest.raises(DataError, match="the test split is empty"):
        read_cifar(tmp_path, "cifar10", train=False)


def test_a_pickle_that_would_run_code_is_refused(cifar10_dir, tmp_path):
    """The CIFAR format is a pickle; ours rebuilds arrays only, so a tampered file cannot run anything."""
    root, train, test = cifar10_dir
    folder = write_cifar(tmp_path, "cifar10", train, test)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "test_batch").write_bytes(pickle.dumps({"data": Exploit(), "labels": []}))
    with pytest.raises(DataError, match="refusing to load"):
        read_cifar(tmp_path, "cifar10", train=False)
    assert not marker.exists()


# -- ZCA -------------------------------------------------------------------------------------------------------------


def _correlated_images(n: int, seed: int = 0) -> torch.Tensor:
    """n images 3x8x8 with strongly correlated pixels (a random mixing of independent sources)."""
    g = torch.Generator().manual_seed(seed)
    d = 3 * 8 * 8
    mixing = torch.randn(d, d, generator=g) + 3.0 * torch.eye(d)
    return (torch.randn(n, d, generator=g) @ mixing).reshape(n, 3, 8, 8) * 0.05 + 0.5


def test_zca_whitened_training_data_has_identity_covariance():
    x = _correlated_images(4000)
    flat = x.reshape(len(x), -1).double()
    raw_cov = torch.cov(flat.T)
    assert (raw_cov - torch.diag(raw_cov.diag())).abs().max() > 0.01  # really correlated to begin with

    zca = ZCA.fit(x, epsilon=1e-8, gcn_scale=None)
    white = zca(x).reshape(len(x), -1).double()
    cov = white.T @ white / len(white)
    assert white.mean(dim=0).abs().max() < 1e-4
    assert torch.allclose(cov, torch.eye(cov.shape[0], dtype=cov.dtype), atol=2e-3)
    # ZCA is the symmetric whitening: the closest whitened data to the input, so the matrix is symmetric.
    assert torch.allclose(zca.matrix, zca.matrix.T, atol=1e-4)


def test_zca_with_fewer_images_than_pixels_matches_the_eigendecomposition():
    """Small sets take the thin-SVD path; it must give U diag((s + eps)^-1/2) U^T all the same."""
    x = _correlated_images(100)  # 100 images, 192 pixels: rank-deficient covariance
    zca = ZCA.fit(x, epsilon=0.1, gcn_scale=None)
    centred = x.reshape(100, -1).double() - x.reshape(100, -1).double().mean(dim=0)
    eigval, eigvec = torch.linalg.eigh(centred.T @ centred / 100)
    expected = (eigvec * (eigval.clamp_min(0) + 0.1).rsqrt()) @ eigvec.T
    assert torch.allclose(zca.matrix.double(), expected, atol=1e-4)
    white = zca(x).reshape(100, -1).double()
    eig_white = torch.linalg.eigvalsh(white.T @ white / 100)
    top = eig_white[-99:]  # the 99 directions the data spans
    assert torch.allclose(top, torch.sort(eigval[-99:] / (eigval[-99:] + 0.1)).values, atol=1e-4)


def test_zca_default_is_pylearn2s_gcn_then_filter_bias():
    """GCN (mean 0, L2 norm 55 per image) then ZCA with bias 0.1: whitened variances shrink, never grow."""
    x = _correlated_images(2000, seed=1)
    gcn = global_contrast_normalize(x.reshape(len(x), -1).double())
    assert torch.allclose(gcn.mean(dim=1), torch.zeros(len(x), dtype=gcn.dtype), atol=1e-9)
    assert torch.allclose(gcn.norm(dim=1), torch.full((len(x),), GCN_SCALE, dtype=gcn.dtype))

    zca = ZCA.fit(x)
    assert (zca.epsilon, zca.gcn_scale) == (0.1, GCN_SCALE)
    white = zca(x).reshape(len(x), -1).double()
    eigval = torch.linalg.eigvalsh(white.T @ white / len(white))
    assert eigval.max() <= 1.0 + 1e-4
    assert eigval.max() > 0.9  # the strong directions are whitened to about unit variance


def test_preprocessing_round_trips_through_safetensors(tmp_path):
    x = _correlated_images(500)
    for fitted in (ZCA.fit(x), ChannelNorm.fit(x)):
        path = save_preprocessing(fitted, tmp_path / f"{fitted.kind}.safetensors")
        loaded = load_preprocessing(path)
        assert type(loaded) is type(fitted)
        assert torch.equal(loaded(x), fitted(x))
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write leaves no temporary file
    umask = os.umask(0)
    os.umask(umask)
    # share_transform.fs.atomic_write's mode: what a plain open() gives, not mkstemp's 0600.
    assert (tmp_path / "zca.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="delete it to refit"):
        load_preprocessing(tmp_path / "bad.safetensors")
    with pytest.raises(DataError, match="no preprocessing file"):
        load_preprocessing(tmp_path / "absent.safetensors")


# -- datasets --------------------------------------------------------------------------------------------------------


def test_zca_evaluation_uses_the_training_set_statistics(cifar10_dir):
    root, train, test = cifar10_dir
    data = load_cifar(root, "cifar10", "zca")
    raw_test = torch.from_numpy(test[0]).permute(0, 3, 1, 2).float() / 255
    raw_train = torch.from_numpy(train[0]).permute(0, 3, 1, 2).float() / 255
    # The datasets hold the bytes; the device input whitens a batch with the training set's ZCA.
    assert torch.equal(data.val.images, torch.from_numpy(test[0]).permute(0, 3, 1, 2))
    whitened = data.device_input()(data.val.images)
    torch.testing.assert_close(whitened, ZCA.fit(raw_train)(raw_test), atol=1e-5, rtol=0)
    assert not torch.allclose(whitened, ZCA.fit(raw_test)(raw_test), atol=1e-2)
    # A transform passed in (a run's saved file on --resume) is used as is, not refitted.
    again = load_cifar(root, "cifar10", data.preprocessing)
    assert again.preprocessing is data.preprocessing
    assert torch.equal(again.train.images, data.train.images)


def test_zca_training_augmentation_is_flips_only_applied_after_whitening(cifar10_dir):
    root, *_ = cifar10_dir
    data = load_cifar(root, "cifar10", "zca")
    assert (data.train.crop, data.train.flip, data.train.flip_on_device) == (False, True, True)
    to_input = data.device_input(channels_last=True)
    white = to_input(data.train.images[:1])[0]
    torch.manual_seed(0)
    samples = [data.train[0] for _ in range(20)]
    assert all(torch.equal(x, data.train.images[0]) and y == int(data.train.labels[0]) for x, _, y in samples)
    assert {float(f) for _, f, _ in samples} == {0.0, 1.0}  # the flips travel with the batch...
    for x, f, _ in samples:  # ...and the device applies them to the whitened image (flip after ZCA)
        out = to_input(x[None], f[None])
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out[0], white.flip(-1) if f else white)
    x, y = data.val[3]
    assert torch.equal(x, data.val.images[3]) and y == int(data.val.labels[3])
    no_flip = load_cifar(root, "cifar10", data.preprocessing, hflip=False)
    assert len(no_flip.train[0]) == 2 and torch.equal(no_flip.train[0][0], data.train.images[0])


def test_meanstd_normalises_per_channel_and_crops_from_reflection_pad(cifar10_dir):
    root, *_ = cifar10_dir
    data = load_cifar(root, "cifar10", "meanstd")
    per_channel = data.train.images.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(dim=1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(per_channel.std(dim=1), torch.ones(3), atol=1e-5)
    assert (data.train.crop, data.train.flip) == (True, True)

    image = data.train.images[5]
    padded = F.pad(image[None], (4, 4, 4, 4), mode="reflect")[0]
    windows = [padded[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
    torch.manual_seed(0)
    samples = [data.train[5][0] for _ in range(30)]
    for s in samples:
        assert s.shape == (3, 32, 32)
        assert any(torch.equal(s, w) or torch.equal(s, w.flip(-1)) for w in windows)
    assert len({tuple(s.flatten()[:50].tolist()) for s in samples}) > 5  # random crops, not one


# -- ZCA in float32, and its cache ---------------------------------------------------------------------------------


def _natural_patches(n: int, size: int = 8) -> torch.Tensor:
    """n RGB patches (3, size, size) in [0, 1], cut from scikit-learn's two bundled photographs at random scales."""
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255 for p in load_sample_images().images]
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(n):
        photo = photos[k % len(photos)]
        side = int(torch.randint(size, 4 * size, (), generator=g))
        i = int(torch.randint(0, photo.shape[1] - side, (), generator=g))
        j = int(torch.randint(0, photo.shape[2] - side, (), generator=g))
        out.append(F.interpolate(photo[None, :, i : i + side, j : j + side], size=(size, size), mode="area")[0])
    return torch.stack(out)


def test_float32_zca_whitens_within_1e_4_of_a_float64_fit():
    # 16x16 patches with GCN to norm 55 * 16/32: pixels of the magnitude GCN gives 32x32 CIFAR images, so the
    # float32 arithmetic meets the numbers it meets on CIFAR.
    x = _natural_patches(2000, size=16)
    gcn = GCN_SCALE * 16 / 32
    flat = global_contrast_normalize(x.reshape(len(x), -1).double(), gcn)
    centred = flat - flat.mean(dim=0)
    eigval, eigvec = torch.linalg.eigh(centred.T @ centred / len(x))
    reference = centred @ ((eigvec * (eigval.clamp_min(0) + 0.1).rsqrt()) @ eigvec.T)

    zca = ZCA.fit(x, gcn_scale=gcn)
    assert zca.matrix.dtype == torch.float32
    white = zca(x).reshape(len(x), -1).double()
    assert reference.abs().max() > 5  # whitened natural images: entries far above the tolerance
    assert (white - reference).abs().max() < 1e-4


def test_zca_is_cached_in_the_data_folder_keyed_by_the_training_files(tmp_path):
    rng = np.random.default_rng(1)
    write_cifar(
        tmp_path, "cifar10", (_images(rng, 40), rng.integers(0, 10, 40)), (_images(rng, 8), rng.integers(0, 10, 8))
    )
    first = load_cifar(tmp_path, "cifar10", "zca")
    cache = zca_cache_path(tmp_path, "cifar10")
    assert cache.parent == tmp_path / "cifar-10-batches-py" and cache.is_file()
    assert torch.equal(load_preprocessing(cache).matrix, first.preprocessing.matrix)

    # A hit: the second load takes the cached transform as it is (planted here), without refitting.
    planted = ZCA(first.preprocessing.mean, 2 * first.preprocessing.matrix, 0.1, GCN_SCALE)
    save_preprocessing(planted, cache)
    second = load_cifar(tmp_path, "cifar10", "zca")
    assert torch.equal(second.preprocessing.matrix, planted.matrix)
    whitened = [d.device_input()(d.val.images) for d in (first, second)]
    assert torch.allclose(whitened[1], 2 * whitened[0], atol=1e-5)

    # Other training bytes: another key, a fresh fit beside the old cache; a damaged cache is refitted.
    write_cifar(
        tmp_path, "cifar10", (_images(rng, 40), rng.integers(0, 10, 40)), (_images(rng, 8), rng.integers(0, 10, 8))
    )
    third = load_cifar(tmp_path, "cifar10", "zca")
    assert zca_cache_path(tmp_path, "cifar10") != cache and cache.is_file()
    assert not torch.equal(third.preprocessing.matrix, planted.matrix)
    zca_cache_path(tmp_path, "cifar10").write_bytes(b"garbage")
    assert torch.equal(load_cifar(tmp_path, "cifar10", "zca").preprocessing.matrix, third.preprocessing.matrix)


def test_batched_augmentation_reads_crop_and_flip_from_the_seed_bits(cifar10_dir):
    root, *_ = cifar10_dir
    data = load_cifar(root, "cifar10", "meanstd")
    seeds = torch.tensor([0, 1, (3 << 1) | (5 << 32), (8 << 1) | (2 << 32) | 1])
    x, y = data.train.augmented_batch(torch.tensor([5, 5, 6, 7]), seeds)
    padded = F.pad(data.train.images[[5, 5, 6, 7]], (4, 4, 4, 4), mode="reflect")
    assert torch.equal(x[0], padded[0, :, 0:32, 0:32])
    assert torch.equal(x[1], padded[1, :, 0:32, 0:32].flip(-1))
    assert torch.equal(x[2], padded[2, :, 3:35, 5:37])
    assert torch.equal(x[3], padded[3, :, 8:40, 2:34].flip(-1))
    assert torch.equal(y, data.train.labels[[5, 5, 6, 7]])


# -- the soft-sharing reference's augmentation: zero pad, Cutout; the held-out split ----------------------------


def test_zero_pad_crops_from_black_pixels_in_normalised_units(cifar10_dir):
    root, *_ = cifar10_dir
    data = load_cifar(root, "cifar10", "meanstd", pad="zero")
    black = (0.0 - data.preprocessing.mean) / data.preprocessing.std  # torchvision's RandomCrop(padding=4) fill
    # Row and column offset 0: the image shifted 4 pixels down and right, its first 4 rows and columns black.
    x, _ = data.train.augmented_batch(torch.tensor([5]), torch.tensor([0]))
    image = data.train.images[5]
    assert torch.allclose(x[0, :, :4, :], black.view(3, 1, 1).expand(3, 4, 32))
    assert torch.allclose(x[0, :, :, :4], black.view(3, 1, 1).expand(3, 32, 4))
    assert torch.equal(x[0, :, 4:, 4:], image[:, :28, :28])
    # Offset 4 in both: the image itself, whatever the pad.
    x, _ = data.train.augmented_batch(torch.tensor([5]), torch.tensor([(4 << 1) | (4 << 32)]))
    assert torch.equal(x[0], image)
    with pytest.raises(DataError, match="Cutout and --pad need --preprocess meanstd"):
        load_cifar(root, "cifar10", "zca", pad="zero")


def test_cutout_blanks_one_clipped_square_as_the_reference(cifar10_dir):
    from share_transform.train.data.sampling import splitmix64

    root, *_ = cifar10_dir
    data = load_cifar(root, "cifar10", "meanstd", cutout=16, hflip=False)
    seeds = torch.arange(0, 400, dtype=torch.int64) * 7919  # crop offsets from the low bits, centres from the hash
    indices = torch.arange(400) % 60
    plain = load_cifar(root, "cifar10", "meanstd", hflip=False).train.augmented_batch(indices, seeds)[0]
    cut, _ = data.train.augmented_batch(indices, seeds)
    mixed = splitmix64(seeds.numpy().astype(np.uint64))
    centres_seen = set()
    for k in range(len(seeds)):
        y, x = int(mixed[k] & np.uint64(0xFFFFFFFF)) % 32, int((mixed[k] >> np.uint64(32)) & np.uint64(0x7FFFFFFF)) % 32
        centres_seen.add((y, x))
        # The reference's Cutout(n_holes=1, length=16): rows clip(y - 8) .. clip(y + 8), all channels, zero.
        hole = torch.zeros(32, 32, dtype=torch.bool)
        hole[max(y - 8, 0) : min(y + 8, 32), max(x - 8, 0) : min(x + 8, 32)] = True
        assert torch.equal(cut[k][:, hole], torch.zeros_like(cut[k][:, hole]))
        assert torch.equal(cut[k][:, ~hole], plain[k][:, ~hole])
    # Centres anywhere in the image, so holes at the border are clipped (smaller than 16 x 16).
    ys, xs = zip(*centres_seen)
    assert min(ys) < 4 and max(ys) > 27 and min(xs) < 4 and max(xs) > 27


def test_held_out_split_is_a_function_of_the_seed_and_left_out_of_the_fit(cifar10_dir):
    from share_transform.train.data.cifar import holdout_indices

    root, (train_images, train_labels), _ = cifar10_dir
    kept, held = holdout_indices(60, 12, seed=3)
    assert len(held) == 12 and sorted([*kept, *held]) == list(range(60))
    assert np.array_equal(held, holdout_indices(60, 12, seed=3)[1])
    assert not np.array_equal(held, holdout_indices(60, 12, seed=4)[1])
    data = load_cifar(root, "cifar10", "meanstd", val_split=12, seed=3)
    assert (len(data.train), len(data.holdout), len(data.val)) == (48, 12, 20)
    # The transform's statistics come from the 48 kept images only; the split is normalised with them.
    kept_pixels = torch.from_numpy(train_images[kept]).permute(0, 3, 1, 2).double() / 255
    mean = kept_pixels.transpose(0, 1).reshape(3, -1).mean(dim=1)
    assert torch.allclose(data.preprocessing.mean.double(), mean, atol=1e-6)
    held_pixels = torch.from_numpy(train_images[held]).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(data.holdout.images, data.preprocessing(held_pixels))
    assert torch.equal(data.holdout.labels, torch.from_numpy(train_labels[held]))
    assert (data.holdout.crop, data.holdout.flip, data.holdout.cutout) == (False, False, 0)  # evaluated as is
    with pytest.raises(DataError, match=r"a held-out split of 60 images \(--val-split\) leaves no training image"):
        load_cifar(root, "cifar10", "meanstd", val_split=60)
