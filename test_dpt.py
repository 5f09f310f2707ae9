"""The test suite: claims about DPT, one per test, on CPU and offline.

    python -m pytest -q

Datasets and weights are never downloaded: tests write small files in the
exact on-disk formats and run the real loading code on them.
"""

import os
import pickle
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

import data

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails at once, as on a machine offline."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def run_script(*args, cwd=HERE, **environment):
    """Run a script as a user would; a proxy on a closed local port makes any
    download fail at once instead of reaching the network. Keyword arguments
    set environment variables, or unset them when None."""
    env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", PYTHONPATH=HERE, **environment)
    env = {key: value for key, value in env.items() if value is not None}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0]


# -----------------------------------------------------------------------------
# torchvision datasets, read from files in their exact on-disk formats


@pytest.fixture
def skip_md5(monkeypatch):
    """The md5 sums of the real archives are the one thing small fake files
    cannot match; everything else torchvision checks still runs."""
    import torchvision.datasets.cifar
    import torchvision.datasets.svhn
    import torchvision.datasets.utils
    exists = lambda path, md5=None: os.path.isfile(path)
    for module in (torchvision.datasets.cifar, torchvision.datasets.svhn, torchvision.datasets.utils):
        monkeypatch.setattr(module, "check_integrity", exists)


def write_cifar(root, name, per_file=20):
    """cifar-10-batches-py or cifar-100-python: pickled dicts of uint8 rows
    (3072 = 3 x 32 x 32, channel-major) and label lists. Returns what was written."""
    rng = np.random.RandomState(0)
    if name == "cifar10":
        folder, files, label_key, meta = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels", ("batches.meta", "label_names")
    else:
        folder, files, label_key, meta = "cifar-100-python", ["train", "test"], "fine_labels", ("meta", "fine_label_names")
    classes = 10 if name == "cifar10" else 100
    os.makedirs(os.path.join(root, folder))
    written = {}
    for file in files:
        rows = rng.randint(0, 256, (per_file, 3072)).astype(np.uint8)
        labels = rng.randint(0, classes, per_file).tolist()
        with open(os.path.join(root, folder, file), "wb") as f:
            pickle.dump({"data": rows, label_key: labels, "coarse_labels": labels}, f, protocol=2)
        written[file] = (rows, labels)
    with open(os.path.join(root, folder, meta[0]), "wb") as f:
        pickle.dump({meta[1]: [f"class{i}" for i in range(classes)]}, f, protocol=2)
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_images_and_labels_from_the_pickled_batches(tmp_path, skip_md5, name):
    written = write_cifar(tmp_path, name)
    dataset = data.load_dataset(name, str(tmp_path))
    train_files = [f for f in written if "test" not in f]
    expected = np.concatenate([written[f][0] for f in train_files]).reshape(-1, 3, 32, 32)
    assert dataset.train_x.dtype == torch.uint8 and dataset.train_x.shape == (20 * len(train_files), 3, 32, 32)
    assert torch.equal(dataset.train_x, torch.from_numpy(expected))
    assert dataset.train_y.tolist() == sum((written[f][1] for f in train_files), [])
    test_file = "test_batch" if name == "cifar10" else "test"
    assert torch.equal(dataset.test_x, torch.from_numpy(written[test_file][0].reshape(-1, 3, 32, 32)))
    assert dataset.test_y.dtype == torch.int64 and dataset.num_classes == (10 if name == "cifar10" else 100)


def test_svhn_loads_the_mat_files_and_maps_label_10_to_digit_0(tmp_path, skip_md5):
    import scipy.io
    rng = np.random.RandomState(0)
    written = {}
    for split, n in (("train", 30), ("test", 10)):
        images = rng.randint(0, 256, (n, 3, 32, 32)).astype(np.uint8)
        digits = rng.randint(1, 11, n)  # SVHN writes the digit 0 as label 10
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": digits[:, None]})
        written[split] = (images, digits % 10)
    dataset = data.load_dataset("svhn", str(tmp_path))
    assert torch.equal(dataset.train_x, torch.from_numpy(written["train"][0]))
    assert dataset.train_y.tolist() == written["train"][1].tolist()
    assert torch.equal(dataset.test_x, torch.from_numpy(written["test"][0]))


def test_missing_dataset_offline_names_the_folder_and_the_url(tmp_path):
    with pytest.raises(data.UserError) as error:
        data.load_dataset("cifar10", str(tmp_path))
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "cifar-10-python.tar.gz" in message
    assert "\n" not in message


def test_missing_dataset_offline_is_one_line_and_exit_code_2_on_the_command_line(tmp_path):
    result = run_script("data.py", "--dataset", "cifar10", "--data-dir", str(tmp_path))
    assert_one_line_error(result, "cifar-10-batches-py", "could not be downloaded")


def test_unknown_dataset_is_one_line_and_exit_code_2(tmp_path):
    assert_one_line_error(run_script("data.py", "--dataset", "imagenet7"), "unknown dataset 'imagenet7'")


# -----------------------------------------------------------------------------
# Custom .pt / .npz files


def save_arrays(path, **arrays):
    if str(path).endswith(".npz"):
        np.savez(path, **{k: v.numpy() if torch.is_tensor(v) else v for k, v in arrays.items()})
    else:
        torch.save(arrays, path)
    return str(path)


def test_file_in_channels_first_pt_and_channels_last_npz_gives_the_same_dataset(tmp_path):
    x = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    y = torch.arange(12) % 3
    from_pt = data.load_dataset(save_arrays(tmp_path / "a.pt", train_x=x, train_y=y, test_x=x[:4], test_y=y[:4]))
    from_npz = data.load_dataset(save_arrays(tmp_path / "a.npz", train_x=x.permute(0, 2, 3, 1), train_y=y))
    assert torch.equal(from_pt.train_x, x) and torch.equal(from_npz.train_x, x)
    assert torch.equal(from_pt.test_x, x[:4]) and from_npz.test_x is None
    assert from_pt.num_classes == from_npz.num_classes == 3 and from_npz.train_y.dtype == torch.int64


def test_file_grayscale_becomes_rgb_and_odd_sides_are_zero_padded_to_a_multiple_of_8(tmp_path, capsys):
    x = torch.randint(1, 256, (6, 28, 28), dtype=torch.uint8)  # MNIST-like, N x H x W
    dataset = data.load_dataset(save_arrays(tmp_path / "mnist.npz", train_x=x, train_y=torch.arange(6) % 2))
    assert dataset.train_x.shape == (6, 3, 32, 32)
    assert torch.equal(dataset.train_x[:, 1, 2:30, 2:30], x)  # centred, every channel the same
    assert torch.equal(dataset.train_x[:, 0], dataset.train_x[:, 2])
    assert dataset.train_x[:, :, :2].sum() == 0 and dataset.train_x[:, :, :, 30:].sum() == 0
    assert "padded" in capsys.readouterr().out


BAD_FILES = {
    "no train_y":        (dict(train_x=torch.zeros(4, 3, 8, 8, dtype=torch.uint8)), "needs train_x and train_y"),
    "float images":      (dict(train_x=torch.rand(4, 3, 8, 8), train_y=torch.arange(4)), "must be uint8"),
    "float labels":      (dict(train_x=torch.zeros(4, 3, 8, 8, dtype=torch.uint8), train_y=torch.zeros(4)), "integer class labels"),
    "not square":        (dict(train_x=torch.zeros(4, 3, 8, 6, dtype=torch.uint8), train_y=torch.arange(4)), "square images"),
    "5 channels":        (dict(train_x=torch.zeros(4, 5, 8, 8, dtype=torch.uint8), train_y=torch.arange(4)), "C = 1 or 3"),
    "count mismatch":    (dict(train_x=torch.zeros(4, 3, 8, 8, dtype=torch.uint8), train_y=torch.arange(3)), "4 images but train_y 3"),
    "negative label":    (dict(train_x=torch.zeros(4, 3, 8, 8, dtype=torch.uint8), train_y=torch.tensor([0, 1, -1, 1])), "negative label"),
    "missing class":     (dict(train_x=torch.zeros(4, 3, 8, 8, dtype=torch.uint8), train_y=torch.tensor([0, 2, 2, 0])), "no training images"),
    "test label range":  (dict(train_x=torch.zeros(4, 3, 8, 8, dtype=torch.uint8), train_y=torch.tensor([0, 1, 0, 1]),
                               test_x=torch.zeros(2, 3, 8, 8, dtype=torch.uint8), test_y=torch.tensor([0, 2])), "test_y holds label 2"),
    "not a dict":        (None, "not a dict"),
    "test_x alone":      (dict(train_x=torch.zeros(4, 3, 8, 8, dtype=torch.uint8), train_y=torch.arange(4),
                               test_x=torch.zeros(2, 3, 8, 8, dtype=torch.uint8)), "only one of test_x and test_y"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_malformed_file_is_refused_with_a_one_line_reason(tmp_path, case):
    arrays, reason = BAD_FILES[case]
    path = tmp_path / "bad.pt"
    if arrays is None:
        torch.save(torch.zeros(3), path)
    else:
        save_arrays(path, **arrays)
    with pytest.raises(data.UserError) as error:
        data.load_dataset(str(path))
    assert reason in str(error.value) and "\n" not in str(error.value)


def test_unreadable_file_is_one_line_and_exit_code_2_on_the_command_line(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"this is not a torch file")
    assert_one_line_error(run_script("data.py", "--dataset", str(tmp_path / "junk.pt")), "cannot read")


# -----------------------------------------------------------------------------
# shapes and the labeled split


def test_shapes_are_the_same_for_the_same_seed_and_differ_for_another():
    x1, y1 = data.make_shapes(300, seed=5)
    x2, y2 = data.make_shapes(300, seed=5)
    x3, _ = data.make_shapes(300, seed=6)
    assert x1.dtype == torch.uint8 and x1.shape == (300, 3, 32, 32) and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert set(y1.tolist()) == set(range(10))


def test_shapes_draw_each_class_as_its_own_shape():
    # Without noise in the way, the mean silhouette of each class at a fixed
    # pose must differ from every other class's: pixel-wise inside-tests on a grid.
    grid = torch.linspace(-1, 1, 64)
    v, u = torch.meshgrid(grid, grid, indexing="ij")
    masks = torch.stack([data.inside_shape(label, u, v) for label in range(len(data.SHAPES))]).float()
    differing = (masks[:, None] != masks[None]).float().mean((2, 3))  # fraction of pixels that differ
    off_diagonal = differing[~torch.eye(len(data.SHAPES), dtype=torch.bool)]
    assert off_diagonal.min() > 0.05  # at least ~200 of 4096 pixels tell any two shapes apart


def test_split_has_exactly_the_asked_labels_per_class_and_is_reproducible():
    y = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    split = data.labeled_split(y, 4, seed=3)
    assert split.dtype == torch.int64 and len(split) == 40 and len(set(split.tolist())) == 40
    assert torch.bincount(y[split], minlength=10).tolist() == [4] * 10
    assert torch.equal(split, data.labeled_split(y, 4, seed=3))
    assert not torch.equal(split, data.labeled_split(y, 4, seed=4))


def test_split_is_the_same_on_every_machine():
    # Recorded once (numpy 2.4, x86-64). numpy's RandomState stream is frozen by
    # its compatibility policy, so these indices must hold for every platform
    # and version; a change would silently give old runs another labeled set.
    y = torch.arange(40) % 4
    assert data.labeled_split(y, 2, seed=0).tolist() == [7, 8, 10, 13, 14, 21, 27, 32]


@pytest.mark.parametrize("labels", [0, -1, 11])
def test_split_refuses_impossible_label_counts(labels):
    y = torch.arange(100) % 10  # 10 images per class
    with pytest.raises(data.UserError, match="give 1 to 10"):
        data.labeled_split(y, labels, seed=0)


# -----------------------------------------------------------------------------
# Augmentation


def random_images(n, side=32, seed=0):
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_weak_view_is_the_image_flipped_or_not_and_shifted_by_at_most_4_pixels():
    torch.manual_seed(0)
    x = random_images(64)
    out = data.weak_augment(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    seen = set()
    for original, view in zip(x, out):
        # Away from the border no reflection is involved: the centre of the view
        # must be exactly the centre of the (flipped) image moved by (dy, dx).
        matches = [(flip, dy, dx) for flip in (False, True) for dy in range(-4, 5) for dx in range(-4, 5)
                   if torch.equal(view[:, 4:-4, 4:-4], (original.flip(2) if flip else original)[:, 4 + dy:28 + dy, 4 + dx:28 + dx])]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 20 and {flip for flip, _, _ in seen} == {False, True}  # every image draws its own


def test_weak_view_fills_the_border_by_reflection():
    x = random_images(200)
    out = data.weak_augment(x)
    # Each view's pixel values come from its own image: reflection never invents values.
    for original, view in zip(x, out):
        assert set(view.flatten().tolist()) <= set(original.flatten().tolist())


# RandAugment's pixel ops against PIL on random 8-bit images. PIL rounds toward
# zero and converts to integer gray levels where we keep floats, so the blend
# ops may differ by up to 2 levels; the lookup-table ops must agree exactly.
PIL_OPS = [
    ("equalize", None, lambda im, m: ImageOps.equalize(im), 0),
    ("posterize", 5, lambda im, m: ImageOps.posterize(im, m), 0),
    ("solarize", 100, lambda im, m: ImageOps.solarize(im, m), 0),
    ("autocontrast", None, lambda im, m: ImageOps.autocontrast(im), 1),
    ("brightness", 0.6, lambda im, m: ImageEnhance.Brightness(im).enhance(m), 1),
    ("color", 0.3, lambda im, m: ImageEnhance.Color(im).enhance(m), 2),
    ("contrast", 0.4, lambda im, m: ImageEnhance.Contrast(im).enhance(m), 2),
    ("sharpness", 0.2, lambda im, m: ImageEnhance.Sharpness(im).enhance(m), 2),
]


@pytest.mark.parametrize("name,magnitude,pil_op,tolerance", PIL_OPS, ids=[op[0] for op in PIL_OPS])
def test_randaugment_pixel_op_matches_pil(name, magnitude, pil_op, tolerance):
    generator = torch.Generator().manual_seed(1)
    # Channels of unequal ranges: autocontrast has work to do, and the gray
    # level (0.299 R + 0.587 G + 0.114 B) is far from the plain channel mean.
    offsets = torch.tensor([150, 60, 10]).view(1, 3, 1, 1)
    x = (torch.randint(0, 100, (4, 3, 32, 32), generator=generator) + offsets).to(torch.uint8)
    ours = data.PIXEL_OPS[name](x.float() / 255, torch.tensor(float(magnitude or 0)))
    ours = (ours * 255).round().to(torch.uint8)
    for image, our_image in zip(x, ours):
        reference = torch.from_numpy(np.array(pil_op(Image.fromarray(image.permute(1, 2, 0).numpy()), magnitude))).permute(2, 0, 1)
        assert (our_image.int() - reference.int()).abs().max() <= tolerance


def test_affine_warp_rotates_shifts_and_keeps_identity_exactly():
    x = random_images(3).float()
    zeros = torch.zeros(3)
    assert torch.equal(data.affine_warp(x, zeros, zeros, zeros, zeros, zeros), x)
    quarter = data.affine_warp(x, torch.full((3,), 90.0), zeros, zeros, zeros, zeros)
    assert torch.equal(quarter, x.rot90(1, (2, 3))) or torch.equal(quarter, x.rot90(-1, (2, 3)))
    shifted = data.affine_warp(x, zeros, zeros, zeros, torch.full((3,), 0.25), zeros)  # 8 pixels
    left, right = (shifted[..., 8:], shifted[..., :-8])
    assert torch.equal(left, x[..., :-8]) or torch.equal(right, x[..., 8:])
    assert shifted.abs().sum((1, 2)).eq(0).sum() == 3 * 8  # black where nothing came in


def test_cutout_covers_one_gray_square_at_most_half_the_side():
    torch.manual_seed(0)
    x = torch.zeros(200, 3, 32, 32)
    out = data.cutout(x)
    for image in out:
        rows, cols = image[0].nonzero(as_tuple=True)
        if len(rows):
            height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            assert len(rows) == height * width and max(height, width) <= 16  # one solid box
            assert torch.allclose(image[:, rows, cols], torch.tensor(127 / 255))


def test_strong_view_is_uint8_changes_images_and_differs_per_image():
    torch.manual_seed(0)
    x = data.make_shapes(1, seed=0)[0].expand(256, -1, -1, -1).contiguous()  # one image, 256 times
    out = data.strong_augment(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert len({view.numpy().tobytes() for view in out}) == 256  # every copy got its own ops
    assert (out.float() - x.float()).abs().mean((1, 2, 3)).median() > 10  # and far from the original


@pytest.mark.parametrize("n", [1, 2, 5, 13])
def test_strong_view_works_for_batches_smaller_than_the_number_of_ops(n):
    torch.manual_seed(n)
    for _ in range(10):  # which ops get no image is drawn anew each time
        assert data.strong_augment(random_images(n)).shape == (n, 3, 32, 32)


def test_strong_view_uses_every_randaugment_op(monkeypatch):
    calls = set()
    for name, op in data.PIXEL_OPS.items():
        monkeypatch.setitem(data.PIXEL_OPS, name, lambda x, m, name=name, op=op: (calls.add(name), op(x, m))[1])
    data.strong_augment(random_images(64))  # 4 or more images per op and round
    assert set(calls) == set(data.PIXEL_OPS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augmentations_run_on_the_batch_device():
    x = random_images(512).cuda()
    for augment in (data.weak_augment, data.strong_augment):
        out = augment(x)
        assert out.is_cuda and out.dtype == torch.uint8 and out.shape == x.shape


# -----------------------------------------------------------------------------
# Command line


def test_config_flags_come_from_the_dataclass():
    config = data.parse_config(data.DataConfig, "", ["--dataset", "shapes", "--seed", "3", "--bench", "--data-dir", "d"])
    assert config == data.DataConfig(dataset="shapes", seed=3, bench=True, data_dir="d")


def test_data_command_prints_class_counts_and_saves_a_preview(tmp_path):
    result = run_script("data.py", "--dataset", "shapes", "--out", str(tmp_path / "preview.png"))
    assert result.returncode == 0, result.stderr
    assert "train: 20000 images" in result.stdout and "test: 2000 images" in result.stdout
    width, height = Image.open(tmp_path / "preview.png").size
    assert width > height > 0  # 10 columns, 5 rows


# -----------------------------------------------------------------------------
# FID and Inception Score, against pytorch-fid on the same (random) weights

import fid  # noqa: E402


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    """Random weights in the FID state-dict layout, scaled so that activations
    neither vanish nor explode through the 94 convolutions."""
    torch.manual_seed(0)
    model = fid.FIDInception()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture
def pytorch_fid(monkeypatch, fid_weights):
    """pytorch-fid, made to load our random weights file instead of downloading."""
    inception = pytest.importorskip("pytorch_fid.inception")
    import pytorch_fid.fid_score
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: torch.load(fid_weights))
    return pytorch_fid.fid_score


def write_pngs(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:04d}.png"))
    return str(folder)


def test_fid_weights_load_strictly_into_both_and_pool3_features_agree(pytorch_fid, fid_weights):
    ours = fid.load_inception(fid_weights)  # strict load, then batch norms folded
    theirs = pytorch_fid.InceptionV3([3]).eval()  # strict load into torchvision's Inception3
    x = random_images(6)
    with torch.no_grad():
        our_features, _ = ours(x)
        their_features = theirs(x.float() / 255)[0].flatten(1)
    assert their_features.abs().mean() > 0.1  # the random weights give informative features
    relative = (our_features - their_features).abs().max() / their_features.abs().max()
    assert relative <= 1e-4


def test_fid_of_two_folders_matches_pytorch_fid(pytorch_fid, fid_weights, tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    bright = torch.randint(100, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=generator)
    dark = torch.randint(0, 156, (12, 3, 32, 32), dtype=torch.uint8, generator=generator)
    folders = [write_pngs(tmp_path / "a", bright), write_pngs(tmp_path / "b", dark)]
    theirs = pytorch_fid.calculate_fid_given_paths(folders, batch_size=12, device="cpu", dims=2048, num_workers=0)
    fid.main([*folders, "--weights", fid_weights])
    ours = float(capsys.readouterr().out.split("FID")[1])
    assert theirs > 1 and abs(ours - theirs) <= 1e-3 * theirs


def test_frechet_distance_matches_pytorch_fid_on_random_gaussians(pytorch_fid):
    rng = np.random.RandomState(0)
    dims = 64
    a, b = rng.randn(dims, dims), rng.randn(dims, dims)
    mu1, mu2, sigma1, sigma2 = rng.randn(dims), rng.randn(dims), a @ a.T + 0.1 * np.eye(dims), b @ b.T + 0.1 * np.eye(dims)
    theirs = pytorch_fid.calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
    assert abs(fid.frechet_distance(mu1, sigma1, mu2, sigma2) - theirs) <= 1e-6 * theirs


def test_frechet_distance_has_the_closed_form_for_commuting_covariances():
    # For diagonal covariances, Tr (S1 S2)^(1/2) = sum sqrt(a_i b_i): the
    # distance is ||mu1 - mu2||^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.RandomState(1)
    a, b, mu1, mu2 = rng.rand(50) + 0.1, rng.rand(50) + 0.1, rng.randn(50), rng.randn(50)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(exact, rel=1e-10)


def test_streaming_statistics_equal_mean_and_covariance_of_all_features_at_once():
    class Projection(torch.nn.Module):  # a stand-in for Inception: 2048 random features
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3 * 8 * 8, 2048, generator=torch.Generator().manual_seed(0)))

        def forward(self, batch):
            return batch.float().flatten(1) @ self.weight / 100, None

    project = Projection().requires_grad_(False)
    images = random_images(50, side=8)
    stats = fid.statistics(project, images.split(7))  # uneven batches
    features = torch.cat([project(batch)[0] for batch in images.split(7)]).double().numpy()
    np.testing.assert_allclose(stats["mu"], features.mean(0), rtol=1e-10)
    np.testing.assert_allclose(stats["sigma"], np.cov(features, rowvar=False), rtol=1e-8, atol=1e-10)


def test_fid_of_a_set_with_itself_is_zero(fid_weights):
    stats = fid.statistics(fid.load_inception(fid_weights), random_images(8).split(4))
    # 8 images give a covariance of rank 7: the square roots of its ~2040 zero
    # eigenvalues, each a round-off of order 1e-16 of the largest, add up to
    # about 1e-4 of the trace. With more images than 2048 this term vanishes.
    assert abs(fid.frechet_distance(stats["mu"], stats["sigma"], stats["mu"], stats["sigma"])) < 1e-3 * np.trace(stats["sigma"])


def test_inception_score_is_the_number_of_classes_used_evenly_and_1_for_one_class():
    confident = 50 * torch.eye(1008)[torch.arange(200) % 20]  # 20 classes, each image sure of its own
    mean, std = fid.inception_score(confident)
    assert mean == pytest.approx(20, rel=1e-6) and std < 1e-6
    assert fid.inception_score(confident[:, :1].expand(-1, 1008).contiguous())[0] == pytest.approx(1.0)


def test_cached_statistics_are_computed_once(fid_weights, tmp_path):
    path = str(tmp_path / "train.npz")
    first = fid.cached_statistics(fid.load_inception(fid_weights), path, random_images(4))
    never_called = lambda batch: pytest.fail("the cache was not used")
    second = fid.cached_statistics(never_called, path, random_images(4))
    np.testing.assert_array_equal(first["sigma"], second["sigma"])


def test_fid_command_saves_stats_and_reads_them_back_with_samples_pt(fid_weights, tmp_path, capsys):
    samples = tmp_path / "samples.pt"
    torch.save({"images": random_images(6), "labels": torch.arange(6)}, samples)
    fid.main([str(samples), "--save-stats", str(tmp_path / "s.npz"), "--weights", fid_weights])
    with np.load(tmp_path / "s.npz") as archive:
        assert archive["mu"].shape == (2048,) and archive["sigma"].shape == (2048, 2048)
    fid.main([str(samples), str(tmp_path / "s.npz"), "--weights", fid_weights, "--is"])
    out = capsys.readouterr().out
    assert "IS " in out and abs(float(out.split("FID")[1])) < 1e-3


@pytest.mark.parametrize("case", ["one image", "float images", "not images"])
def test_fid_refuses_bad_inputs(tmp_path, fid_weights, case):
    path = tmp_path / "x.pt"
    if case == "one image":
        torch.save(random_images(1), path)
    elif case == "float images":
        torch.save(torch.rand(4, 3, 32, 32), path)
    else:
        path = tmp_path / "x.txt"
        path.write_text("hello")
    with pytest.raises(fid.FIDError, match="at least 2 images|must hold uint8|neither a folder"):
        fid.main([str(path), str(path), "--weights", fid_weights])


def test_fid_without_weights_offline_says_where_to_put_them(monkeypatch, tmp_path):
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(fid.FIDError) as error:
        fid.load_inception()
    assert fid.WEIGHTS_URL in str(error.value) and str(tmp_path / "hub" / "checkpoints") in str(error.value)


def test_fid_command_without_weights_offline_is_one_line_and_exit_code_2(tmp_path):
    torch.save(random_images(4), tmp_path / "a.pt")
    result = run_script("fid.py", str(tmp_path / "a.pt"), str(tmp_path / "a.pt"),
                        TORCH_HOME=str(tmp_path / "home"), **{fid.WEIGHTS_ENV: None})
    assert_one_line_error(result, fid.WEIGHTS_URL)


# -----------------------------------------------------------------------------
# FixMatch (stages 1 and 3)

import fixmatch  # noqa: E402


def test_wrn28_2_has_fixmatchs_1_47M_parameters():
    model = fixmatch.make_classifier("wrn28_2", 10, [0.5] * 3, [0.25] * 3)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.47e6, rel=0.01)
    assert model(random_images(2)).shape == (2, 10)


def test_fixmatch_loss_counts_only_confident_unlabeled_images():
    torch.manual_seed(0)
    logits_labeled, labels = torch.randn(4, 10), torch.randint(10, (4,))
    logits_weak, logits_strong = torch.randn(6, 10), torch.randn(6, 10)
    logits_weak[:2, 3] = 10.0  # two images are sure of class 3 (p > 0.99); the rest are not (p < 0.95)
    loss, mask, pseudo = fixmatch.fixmatch_loss(logits_labeled, labels, logits_weak, logits_strong, lambda_u=2.0, tau=0.95)
    assert mask.tolist() == [True, True, False, False, False, False] and pseudo[:2].tolist() == [3, 3]
    expected = F.cross_entropy(logits_labeled, labels) + 2.0 * F.cross_entropy(logits_strong[:2], pseudo[:2], reduction="sum") / 6
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss_tau_1, mask_tau_1, _ = fixmatch.fixmatch_loss(logits_labeled, labels, logits_weak, logits_strong, lambda_u=2.0, tau=1.0)
    assert not mask_tau_1.any() and loss_tau_1.item() == pytest.approx(F.cross_entropy(logits_labeled, labels).item())


def test_freematch_threshold_update_matches_a_hand_computation():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05]])
    state = fixmatch.FreeMatchThreshold(3, decay=0.9, device="cpu")
    state.update(probs)
    # global: 0.9 * 1/3 + 0.1 * mean(0.7, 0.5, 0.6, 0.9) ; classes: 0.9 * 1/3 + 0.1 * column means
    global_tau = 0.9 / 3 + 0.1 * 0.675
    class_p = [0.9 / 3 + 0.1 * m for m in (0.475, 0.2375, 0.2875)]
    expected = [global_tau * p / max(class_p) for p in class_p]
    assert state.class_thresholds().tolist() == pytest.approx(expected, rel=1e-6)
    # In the loss the update comes first, then each image meets its predicted class's threshold.
    fresh = fixmatch.FreeMatchThreshold(3, decay=0.9, device="cpu")
    _, mask, pseudo = fixmatch.fixmatch_loss(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), probs.log(),
                                             torch.zeros(4, 3), lambda_u=1.0, freematch=fresh)
    assert mask.tolist() == [p.max().item() >= expected[p.argmax()] for p in probs]


def tiny_config(tmp_path, **changes):
    settings = dict(dataset="shapes", labels=2, arch="small", steps=6, batch=8, uratio=2, ema=0.9,
                    eval_every=3, ckpt_every=3, out=str(tmp_path), compile=False)
    settings.update(changes)
    return fixmatch.FixMatchConfig(**settings)


@pytest.fixture(scope="module")
def small_shapes():
    train_x, train_y = data.make_shapes(400, seed=0)
    test_x, test_y = data.make_shapes(100, seed=1)
    return data.Dataset("shapes", train_x, train_y, test_x, test_y, 10)


def test_a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tmp_path, small_shapes, monkeypatch):
    split = data.labeled_split(small_shapes.train_y, 2, seed=0)
    whole, _ = fixmatch.train(tiny_config(tmp_path / "whole", threshold="freematch", freematch_ema=0.5), small_shapes, split, progress=False)

    saves = []
    real_save = data.save_atomic

    def save_then_die(obj, path):  # the process is killed right after its first checkpoint (step 3)
        real_save(obj, path)
        saves.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fixmatch.train(tiny_config(tmp_path / "killed", threshold="freematch", freematch_ema=0.5), small_shapes, split, progress=False)
    monkeypatch.setattr(data, "save_atomic", real_save)
    assert torch.load(saves[0], weights_only=False)["step"] == 3
    resumed, _ = fixmatch.train(tiny_config(tmp_path / "killed", threshold="freematch", freematch_ema=0.5), small_shapes, split, progress=False)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_other_settings_or_a_corrupt_one_is_refused(tmp_path, small_shapes):
    split = data.labeled_split(small_shapes.train_y, 2, seed=0)
    fixmatch.train(tiny_config(tmp_path, steps=3), small_shapes, split, progress=False)
    with pytest.raises(data.UserError, match="other settings \\(lr\\)"):
        fixmatch.train(tiny_config(tmp_path, steps=3, lr=0.1), small_shapes, split, progress=False)
    (tmp_path / "ckpt.pt").write_bytes(b"garbage")
    with pytest.raises(data.UserError, match="unreadable"):
        fixmatch.train(tiny_config(tmp_path, steps=3), small_shapes, split, progress=False)


def test_predict_gives_a_label_and_confidence_for_every_training_image(small_shapes):
    model = fixmatch.make_classifier("small", 10, [0.5] * 3, [0.25] * 3)
    result = fixmatch.pseudo_labels(model, small_shapes)
    assert result["labels"].dtype == torch.int64 and result["labels"].shape == (400,)
    assert result["confidence"].dtype == torch.float32 and ((result["confidence"] > 0) & (result["confidence"] <= 1)).all()
    assert 0 <= result["accuracy"] <= 1


def test_stage_3_batches_hold_the_asked_share_of_real_images():
    torch.manual_seed(0)
    picks = fixmatch.sample_labeled(40, real_count=10, total=110, real_fraction=0.25, device="cpu")
    assert (picks < 10).sum() == 10 and ((picks >= 10) & (picks < 110)).sum() == 30
    uniform = fixmatch.sample_labeled(10_000, real_count=10, total=110, real_fraction=-1, device="cpu")
    assert (uniform < 10).float().mean() == pytest.approx(10 / 110, abs=0.01)


def test_stage_3_trains_with_generated_images_in_the_labeled_set(tmp_path, small_shapes):
    split = data.labeled_split(small_shapes.train_y, 2, seed=0)
    generated = (random_images(30), torch.arange(30) % 10)
    model, metrics = fixmatch.train(tiny_config(tmp_path, steps=3, real_fraction=0.5), small_shapes, split,
                                    pseudo=generated, progress=False)
    assert 0 <= metrics["accuracy"] <= 1 and model(random_images(2)).shape == (2, 10)


def test_two_processes_under_torchrun_train_and_write_one_set_of_files(tmp_path):
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "fixmatch.py", "--dataset", "shapes",
                        "--labels", "2", "--arch", "small", "--steps", "4", "--batch", "8", "--uratio", "2",
                        "--eval-every", "4", "--ckpt-every", "2", "--threshold", "freematch", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "classifier.pt", "pseudo_labels.pt"]
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert checkpoint["step"] == 4 and len(checkpoint["rng"]) == 2  # every rank's generators, for resuming
    assert torch.load(tmp_path / "pseudo_labels.pt")["labels"].shape == (20_000,)


def test_fixmatch_beats_training_on_the_labeled_images_alone_with_1_label_per_class(tmp_path):
    """The claim of stage 1, in about a minute of CPU: 16 x 16 shapes, one
    labeled image per class, the small CNN. Over seeds 0-2 labeled-only training
    reached 60-67% and FixMatch 85-87% after 800 steps (margins of 19-25 points),
    so a margin of 10 points leaves room for other threads and platforms."""
    train_x, train_y = data.make_shapes(4000, seed=0, side=16)
    test_x, test_y = data.make_shapes(1000, seed=1, side=16)
    shapes16 = data.Dataset("shapes16", train_x, train_y, test_x, test_y, 10)
    split = data.labeled_split(train_y, 1, seed=0)
    accuracy = {}
    for lambda_u in (0.0, 1.0):
        config = fixmatch.FixMatchConfig(dataset="shapes", labels=1, arch="small", steps=800, batch=32, uratio=3,
                                         lr=0.05, ema=0.99, lambda_u=lambda_u, eval_every=800, ckpt_every=800,
                                         out=str(tmp_path / str(lambda_u)), compile=False)
        accuracy[lambda_u] = fixmatch.train(config, shapes16, split, progress=False)[1]["accuracy"]
    assert accuracy[1.0] >= accuracy[0.0] + 0.10, accuracy


def test_fixmatch_refuses_generated_images_that_do_not_fit_the_dataset(tmp_path, small_shapes):
    bad = tmp_path / "samples.pt"
    torch.save({"images": random_images(4, side=16), "labels": torch.arange(4)}, bad)
    with pytest.raises(data.UserError, match="do not fit"):
        fixmatch.load_generated(str(bad), small_shapes)
    torch.save({"images": random_images(4), "labels": torch.arange(4) + 8}, bad)
    with pytest.raises(data.UserError, match="labels must be int64 in 0..9"):
        fixmatch.load_generated(str(bad), small_shapes)
    result = run_script("fixmatch.py", "--dataset", "shapes", "--pseudo-images", str(tmp_path / "missing.pt"))
    assert_one_line_error(result, "cannot read generated images")


def test_merged_statistics_of_parts_equal_the_statistics_of_the_whole(fid_weights):
    model = fid.load_inception(fid_weights)
    images = random_images(12)
    whole = fid.statistics(model, [images], keep_logits=True)
    merged = fid.merge_statistics([fid.statistics(model, [part], keep_logits=True) for part in (images[:5], images[5:])])
    assert merged["count"] == 12 and torch.equal(merged["logits"], whole["logits"])
    np.testing.assert_allclose(merged["mu"], whole["mu"], rtol=1e-12, atol=1e-12)  # float64 sums, merged exactly
    np.testing.assert_allclose(merged["sigma"], whole["sigma"], rtol=1e-9, atol=1e-12)


# -----------------------------------------------------------------------------
# dpt.py: the three stages in one resumable command

import signal  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402

import dpt  # noqa: E402

# The tiny preset cut down to seconds: every stage runs, none learns much.
QUICK = ["--dataset", "shapes", "--labels", "1", "--preset", "tiny", "--ssl-steps", "12", "--stage3-steps", "12",
         "--eval-every", "6", "--diffusion-images", "256", "--diffusion-batch", "32", "--per-class", "3",
         "--sample-steps", "3", "--fid-reference", "24"]


def test_every_setting_belongs_to_one_stage_or_is_free_to_change():
    names = {field.name for field in dataclasses.fields(dpt.DPTConfig)}
    assert set(dpt.FIELD_STAGE) | dpt.FREE_TO_CHANGE == names and not set(dpt.FIELD_STAGE) & dpt.FREE_TO_CHANGE
    from_presets = {field.name for field in dataclasses.fields(dpt.DPTConfig) if field.default is None}
    assert all(set(preset) == from_presets for preset in dpt.PRESETS.values())


def test_without_cuda_or_preset_the_tiny_preset_runs_and_says_so(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = dpt.DPTConfig(ssl_steps=7)
    dpt.resolve(config)
    assert config.preset == "tiny" and "tiny preset" in capsys.readouterr().err
    assert config.ssl_steps == 7 and config.arch == dpt.PRESETS["tiny"]["arch"]  # a flag beats the preset


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, fid_weights):
    out = tmp_path_factory.mktemp("runs")
    result = run_script("dpt.py", *QUICK, "--baseline", "--out", str(out), "--fid-weights", fid_weights)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, out / "shapes-1l-s0"


def test_the_pipeline_leaves_every_artifact_with_its_documented_shape(quick_run):
    _, run = quick_run
    split = torch.load(run / "split.pt")
    assert split["indices"].dtype == torch.int64 and len(split["indices"]) == 10 and split["size"] == 20_000
    pseudo = torch.load(run / "pseudo_labels.pt")
    assert pseudo["labels"].dtype == torch.int64 and pseudo["labels"].shape == (20_000,)
    assert pseudo["confidence"].dtype == torch.float32 and 0 <= pseudo["accuracy"] <= 1
    samples = torch.load(run / "samples.pt")
    assert samples["images"].dtype == torch.uint8 and samples["images"].shape == (30, 3, 32, 32)
    assert samples["labels"].dtype == torch.int64 and torch.bincount(samples["labels"]).tolist() == [3] * 10
    for name in ("stage1/classifier.pt", "stage3/classifier.pt", "baseline/classifier.pt", "stage2/diffusion.pt",
                 "samples.png", "fid.json", "config.json"):
        assert (run / name).exists(), name
    model, metrics = fixmatch.load_classifier(run / "stage3" / "classifier.pt")
    assert model(samples["images"][:2]).shape == (2, 10) and 0 <= metrics["accuracy"] <= 1
    assert not list(run.rglob("*.tmp*"))  # every write was renamed into place


def test_results_json_holds_every_metric_and_the_summary_shows_stage_3_next_to_stage_1(quick_run):
    result, run = quick_run
    results = json.loads((run / "results.json").read_text())
    for key in ("baseline_accuracy", "stage1_accuracy", "pseudo_label_accuracy", "stage3_accuracy"):
        assert 0 <= results[key] <= 1, key
    assert results["stage3_gain"] == pytest.approx(results["stage3_accuracy"] - results["stage1_accuracy"])
    assert results["fid"] > 0 and results["inception_score"] >= 1
    assert len(results["sample_accuracy_per_class"]) == 10
    assert {"split", "stage1", "stage2", "sample", "stage3", "baseline", "fid"} <= set(results["wall_time_s"])
    assert results["config"]["ssl_steps"] == 12 and results["versions"]["torch"] == torch.__version__
    lines = result.stdout.splitlines()
    stage1_line = next(i for i, line in enumerate(lines) if "stage 1: semi-supervised" in line)
    assert "stage 3: with generated images" in lines[stage1_line + 2]


def test_rerunning_a_finished_run_redoes_nothing(quick_run, fid_weights, tmp_path):
    _, run = quick_run
    before = {path: path.stat().st_mtime_ns for path in run.rglob("*.pt")}
    result = run_script("dpt.py", *QUICK, "--baseline", "--out", str(run.parent), "--fid-weights", fid_weights)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {path: path.stat().st_mtime_ns for path in run.rglob("*.pt")} == before


def test_a_changed_setting_is_refused_unless_redo_reruns_its_stage(quick_run, tmp_path):
    run = tmp_path / "shapes-1l-s0"
    shutil.copytree(quick_run[1], run)
    result = run_script("dpt.py", *QUICK, "--guidance", "2", "--out", str(tmp_path), DPT_FID_WEIGHTS="/missing")
    assert_one_line_error(result, "other settings (guidance)", "--redo sample")
    stage2 = (run / "stage2" / "diffusion.pt").stat().st_mtime_ns
    samples = (run / "samples.pt").stat().st_mtime_ns
    result = run_script("dpt.py", *QUICK, "--guidance", "2", "--redo", "sample", "--out", str(tmp_path),
                        DPT_FID_WEIGHTS="/missing")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "stage2" / "diffusion.pt").stat().st_mtime_ns == stage2  # earlier stages are kept
    assert (run / "samples.pt").stat().st_mtime_ns != samples and not (run / "fid.json").exists()
    assert "FID skipped" in result.stderr and json.loads((run / "results.json").read_text())["fid"] is None


def test_a_run_killed_during_stage_2_resumes_there_and_finishes(tmp_path):
    command = [sys.executable, "dpt.py", *QUICK, "--diffusion-images", "4096", "--out", str(tmp_path)]
    env = dict(os.environ, DPT_FID_WEIGHTS="/missing", PYTHONPATH=HERE)
    process = subprocess.Popen(command, cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "shapes-1l-s0"
    deadline = time.time() + 240
    while not (run / "stage2" / "ckpt.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (run / "stage2" / "ckpt.pt").exists() and not (run / "stage2" / "diffusion.pt").exists()
    stage1 = (run / "stage1" / "classifier.pt").stat().st_mtime_ns
    result = run_script(*command[1:], DPT_FID_WEIGHTS="/missing")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "stage1" / "classifier.pt").stat().st_mtime_ns == stage1  # stage 1 was skipped
    assert torch.load(run / "samples.pt")["images"].shape == (30, 3, 32, 32)
    assert fixmatch.load_classifier(run / "stage3" / "classifier.pt")[1]["accuracy"] >= 0


@pytest.mark.parametrize("case", ["labels 0", "too many labels", "unknown dataset", "unreadable file",
                                  "malformed file", "offline", "unknown preset", "unknown redo"])
def test_bad_input_is_one_line_and_exit_code_2_before_any_work(tmp_path, case):
    args = {"labels 0": ["--dataset", "shapes", "--labels", "0"],
            "too many labels": ["--dataset", "shapes", "--labels", "100000"],
            "unknown dataset": ["--dataset", "imagenet42"],
            "unreadable file": ["--dataset", str(tmp_path / "garbage.pt")],
            "malformed file": ["--dataset", str(tmp_path / "floats.npz")],
            "offline": ["--dataset", "cifar10", "--data-dir", str(tmp_path / "empty")],
            "unknown preset": ["--dataset", "shapes", "--preset", "huge"],
            "unknown redo": ["--dataset", "shapes", "--redo", "stage9"]}[case]
    (tmp_path / "garbage.pt").write_bytes(b"not a tensor file")
    np.savez(tmp_path / "floats.npz", train_x=np.zeros((4, 8, 8, 3), np.float32), train_y=np.zeros(4, np.int64))
    result = run_script("dpt.py", *args, "--out", str(tmp_path / "runs"))
    assert_one_line_error(result)
    assert not list((tmp_path / "runs").rglob("*.pt")) if (tmp_path / "runs").exists() else True


def test_a_corrupt_checkpoint_is_refused_and_kept(tmp_path):
    checkpoint = tmp_path / "shapes-1l-s0" / "stage1" / "ckpt.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"half a checkpoint")
    result = run_script("dpt.py", *QUICK, "--out", str(tmp_path))
    assert_one_line_error(result, str(checkpoint), "unreadable")
    assert checkpoint.read_bytes() == b"half a checkpoint"  # never silently trained over


def test_a_full_disk_is_one_line_and_leaves_the_earlier_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "artifact.pt"
    data.save_atomic({"version": 1}, str(path))

    def full_disk(obj, file):
        file.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(data.UserError, match="No space left on device"):
        data.save_atomic({"version": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path) == {"version": 1} and os.listdir(tmp_path) == ["artifact.pt"]


def test_two_processes_under_torchrun_run_every_stage_and_write_one_set_of_artifacts(tmp_path):
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "dpt.py", *QUICK,
                        "--ssl-batch", "8", "--out", str(tmp_path), DPT_FID_WEIGHTS="/missing")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "shapes-1l-s0"
    assert result.stdout.count("stage 3: with generated images") == 1  # one rank reports
    samples = torch.load(run / "samples.pt")
    assert torch.bincount(samples["labels"]).tolist() == [3] * 10
    assert len(torch.load(run / "stage2" / "ckpt.pt", weights_only=False)["rng"]) == 2
    assert json.loads((run / "results.json").read_text())["stage3_accuracy"] >= 0
