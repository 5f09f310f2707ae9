"""FID and Inception Score, the numbers the field means, computed in this repo.
DPT judges its stage-2 samples with them.

    python fid.py samples.pt runs/cifar10_train.npz     # FID of samples against cached statistics
    python fid.py folder_a folder_b --is                 # FID, and the Inception Score of folder_a
    python fid.py images.pt --save-stats images.npz      # statistics of one set, pytorch-fid's .npz layout
    python fid.py --bench                                # images per second, ours and pytorch-fid's

The network is Inception-v3 as in TensorFlow's 2015 graph that FID was defined
with (Heusel et al. 2017), in the state-dict layout of pytorch-fid's
pt_inception-2015-12-05-6726825d.pth, so that file loads here as it is. Images
are uint8 N x 3 x H x W, resized to 299 x 299 (bilinear) and scaled to [-1, 1];
everything runs in fp32 and the statistics accumulate in float64.
"""

import argparse
import contextlib
import os
import socket
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_ENV = "DPT_FID_WEIGHTS"  # a path to the weights, used when --weights is not given


# fid.py stands alone (copy it into another project): it repeats the little it
# needs of plumbing.py, this error and a write under a temporary name.
class FIDError(Exception):
    """Bad input or missing weights: printed as one line on stderr, exit code 2."""


# -----------------------------------------------------------------------------
# Inception-v3, FID variant (Szegedy et al. 2016, as frozen in the 2015 TF graph).
# It differs from torchvision's: 1008 logits, no auxiliary head, average pools
# that do not count the padding, and a max pool in the last block's pool branch.


class BasicConv2d(nn.Module):
    """Convolution, batch norm (eps 1e-3, as TF) and ReLU."""

    def __init__(self, in_channels, out_channels, **conv_args):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_args)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)

    def fold_batchnorm(self):
        """In eval mode BN is affine, so conv then BN is one conv with a bias:
        weight * s and beta - mean * s, s = gamma / sqrt(var + eps). One pass
        over the activations fewer per layer; equal up to fp32 rounding."""
        scale = self.bn.weight / (self.bn.running_var + self.bn.eps).sqrt()
        self.conv.weight.data.mul_(scale.view(-1, 1, 1, 1))
        self.conv.bias = nn.Parameter(self.bn.bias - self.bn.running_mean * scale)
        self.bn = nn.Identity()


def pool_3x3(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35 x 35 block: 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(pool_3x3(x)),
        ], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """17 x 17 block with factorized 7x7 convolutions."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        double = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = conv(double)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(pool_3x3(x)),
        ], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        seven = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = conv(seven)
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            seven,
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionE(nn.Module):
    """8 x 8 block with expanded filter banks; the last one pools by max, not average."""

    def __init__(self, in_channels, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else pool_3x3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ], 1)


class FIDInception(nn.Module):
    """uint8 images -> (pool3 features [N, 2048], logits [N, 1008])."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images):
        x = F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
        x = (2 * x - 1).contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, kernel_size=3, stride=2)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        features = x.mean((2, 3))
        # The Inception Score's reference code multiplies by the softmax weights
        # without the bias (Salimans et al. 2016, improved-gan); so do we.
        return features, features @ self.fc.weight.T


# -----------------------------------------------------------------------------
# Weights: --weights or $DPT_FID_WEIGHTS, else the torch hub cache, else a
# download checked against the hash in its name. Never other weights.


@contextlib.contextmanager
def download_timeout(seconds=60):
    """A download that gets no answer for `seconds` fails instead of hanging
    (fid.py stands alone: plumbing.download_timeout's twin)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def cached_weights():
    """Where torch.hub keeps the downloaded weights."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS_URL))


def weights_file(weights=None):
    """The file load_inception would read: --weights, $DPT_FID_WEIGHTS, else the
    torch hub cache's copy; None where there is none (it would be downloaded)."""
    path = weights or os.environ.get(WEIGHTS_ENV) or cached_weights()
    return path if os.path.isfile(path) else None


def check_weights(path):
    """Refuse a file that is not pytorch-fid's Inception state dict from its header
    (names and shapes; the values are not read), before any work that FID ends."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        with torch.device("meta"):
            expected = {name: tuple(value.shape) for name, value in FIDInception().state_dict().items()}
        found = {name: tuple(value.shape) for name, value in state_dict.items()}
    except Exception as error:
        raise FIDError(f"{path} is not pytorch-fid's Inception weights ({type(error).__name__}); "
                       f"download {WEIGHTS_URL}") from None
    wrong = sorted(set(expected) ^ set(found)) or [name for name in expected if expected[name] != found[name]]
    if wrong:
        raise FIDError(f"{path} is not pytorch-fid's Inception weights ({wrong[0]} differs); download {WEIGHTS_URL}")


def load_inception(weights=None, device="cpu", flag="--weights"):
    """pytorch-fid's Inception from `weights`, $DPT_FID_WEIGHTS or the download
    cache; `flag` is what the error tells the user to pass (dpt.py's --fid-weights)."""
    weights = weights or os.environ.get(WEIGHTS_ENV)
    if weights:
        if not os.path.isfile(weights):
            raise FIDError(f"FID weights {weights} do not exist; download {WEIGHTS_URL} there")
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    else:
        try:
            with download_timeout():
                state_dict = torch.hub.load_state_dict_from_url(WEIGHTS_URL, map_location="cpu", check_hash=True)
        except Exception as error:  # offline, refused, or a download that fails its hash
            raise FIDError(f"cannot get the FID weights ({type(error).__name__}); download {WEIGHTS_URL} to "
                           f"{cached_weights()}, or pass {flag} PATH or set {WEIGHTS_ENV}") from None
    model = FIDInception()
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise FIDError(f"{weights or WEIGHTS_URL} is not pytorch-fid's Inception state dict ({first})") from None
    return for_inference(model, device)


def for_inference(model, device):
    """Eval mode, batch norms folded into the convolutions, channels-last (the
    layout oneDNN and cuDNN convolve fastest in)."""
    model.eval().requires_grad_(False)
    for module in model.modules():
        if isinstance(module, BasicConv2d):
            module.fold_batchnorm()
    return model.to(device, memory_format=torch.channels_last)


@contextlib.contextmanager
def full_fp32():
    """TF32 and any caller's autocast off: the features are defined in fp32. The
    precision settings come back exactly as they were (the legacy allow_tf32 flags
    would leave "ieee" where torch had "none", and torch 2.14's inductor then
    aborts the process in a compiled CPU convolution)."""
    settings = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = [setting.fp32_precision for setting in settings]
    for setting in settings:
        setting.fp32_precision = "ieee"
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        for setting, value in zip(settings, saved):
            setting.fp32_precision = value


# -----------------------------------------------------------------------------
# Statistics, Fréchet distance, Inception Score


def statistics(model, batches, keep_logits=False, progress=None):
    """Mean and covariance (float64) of the pool3 features of uint8 image
    batches, accumulated as sums so that no feature is kept; with keep_logits,
    also the logits for the Inception Score."""
    device = next(model.parameters()).device
    count, logits = 0, []
    total, outer = torch.zeros(2048, dtype=torch.float64), torch.zeros(2048, 2048, dtype=torch.float64)
    with torch.inference_mode(), full_fp32():
        for batch in batches:
            features, batch_logits = model(batch.to(device))
            features = features.double().cpu()
            count += len(features)
            total += features.sum(0)
            outer += features.T @ features
            if keep_logits:
                logits.append(batch_logits.cpu())
            if progress is not None:
                progress.update(len(features))
    if count < 2:
        raise FIDError(f"FID needs at least 2 images, got {count}")
    mu = total / count
    sigma = (outer - count * torch.outer(mu, mu)) / (count - 1)
    stats = {"mu": mu.numpy(), "sigma": sigma.numpy(), "count": count}
    if keep_logits:
        stats["logits"] = torch.cat(logits)
    return stats


def merge_statistics(parts):
    """The statistics of the union of disjoint image sets (one per process),
    exactly: means and covariances are turned back into sums and added."""
    count = sum(part["count"] for part in parts)
    total = sum(part["mu"] * part["count"] for part in parts)
    outer = sum(part["sigma"] * (part["count"] - 1) + part["count"] * np.outer(part["mu"], part["mu"])
                for part in parts)
    mu = total / count
    merged = {"mu": mu, "sigma": (outer - count * np.outer(mu, mu)) / (count - 1), "count": count}
    if "logits" in parts[0]:
        merged["logits"] = torch.cat([part["logits"] for part in parts])
    return merged


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    Tr (S1 S2)^(1/2) is the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2), which has the same spectrum as
    S1 S2. Two symmetric eigendecompositions replace scipy's sqrtm of the
    non-symmetric product: no complex round-off to discard, no eps needed for
    singular covariances (fewer images than 2048), and several times faster."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise FIDError(f"statistics do not match: mu {mu1.shape} and {mu2.shape}, "
                       f"sigma {sigma1.shape} and {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise FIDError("statistics hold NaN or infinity")
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (eigenvectors * np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((product + product.T) / 2).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def inception_score(logits, splits=10):
    """exp E_x KL(p(y|x) || p(y)), with p(y) per split; mean and std over splits
    (Salimans et al. 2016). The images are shuffled by a fixed permutation first:
    generated images come class by class, and a split of one class has p(y) =
    that class, so its score is 1 whatever the images."""
    order = torch.randperm(len(logits), generator=torch.Generator().manual_seed(0))
    scores = []
    for part in logits.double()[order].chunk(splits):
        log_p = part.log_softmax(1)
        log_marginal = log_p.exp().mean(0).log()
        scores.append((log_p.exp() * (log_p - log_marginal)).sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


# -----------------------------------------------------------------------------
# The same questions in any classifier's feature space: how far the generated
# images' features lie from the real ones' (a Fréchet distance, as FID's), and
# which share of each set the other covers (precision and recall)


def feature_statistics(features):
    """Mean and covariance (float64) of features [N, D] held at once."""
    features = torch.as_tensor(features).double()
    if len(features) < 2:
        raise FIDError(f"a Fréchet distance needs at least 2 images, got {len(features)}")
    return {"mu": features.mean(0).numpy(), "sigma": torch.cov(features.T).reshape(features.shape[1], -1).numpy()}


def kth_neighbour_distance(features, k, batch=1024):
    """Each point's distance to its k-th nearest neighbour in the set, itself left out."""
    return torch.cat([torch.cdist(part, features).kthvalue(k + 1, dim=1).values for part in features.split(batch)])


def covered(points, centres, radii, batch=1024):
    """Whether each point lies in some ball of centres[j] with radius radii[j]."""
    return torch.cat([(torch.cdist(part, centres) <= radii).any(1) for part in points.split(batch)])


def fixed_subset(points, size):
    """`size` of the points, drawn by a generator seeded with 0: the same subset every time."""
    return points[torch.randperm(len(points), generator=torch.Generator().manual_seed(0))[:size]]


def precision_recall(real, generated, k=3, most=10_000):
    """Improved precision and recall (Kynkäänniemi et al. 2019, sec. 3): the
    manifold of a set is the union of balls around its points, each reaching its
    k-th nearest neighbour. Precision is the share of generated points inside
    the real manifold (how many samples look real), recall the share of real
    points inside the generated one (how much of the data the samples cover).
    A model that draws copies of a few images has precision and no recall.
    As in the paper, both sets have the same size, the larger a fixed random
    subset of the smaller's (a larger set has smaller balls), and at most `most`
    (the distances are all pairs, in float64 on the CPU; the paper uses 50,000)."""
    real, generated = (torch.as_tensor(x).double().cpu() for x in (real, generated))
    size = min(len(real), len(generated), most)
    real, generated = (x if len(x) == size else fixed_subset(x, size) for x in (real, generated))
    if min(len(real), len(generated)) <= k:
        raise FIDError(f"precision and recall with k = {k} need more than {k} points in each set, "
                       f"got {len(real)} and {len(generated)}")
    precision = covered(generated, real, kth_neighbour_distance(real, k)).double().mean().item()
    recall = covered(real, generated, kth_neighbour_distance(generated, k)).double().mean().item()
    return precision, recall


def feature_metrics(real, generated, k=3):
    """The Fréchet distance and precision/recall of generated against real
    features [N, D] of one network (dpt.py: the oracle classifier's penultimate layer)."""
    real_stats, generated_stats = feature_statistics(real.cpu()), feature_statistics(generated.cpu())
    distance = frechet_distance(generated_stats["mu"], generated_stats["sigma"], real_stats["mu"],
                                real_stats["sigma"])
    precision, recall = precision_recall(real, generated, k)
    return {"feature_fd": distance, "precision": precision, "recall": recall}


# ADM's (Dhariwal & Nichol 2021) ImageNet 256x256 reference batch, against which
# DPT, U-ViT and most class-conditional ImageNet papers report FID; its mu and sigma
# are TensorFlow Inception's, which pytorch-fid's port of the same network and
# weights reproduces up to small differences.
ADM_IMAGENET256 = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                   "VIRTUAL_imagenet256_labeled.npz")


def download_stats(url):
    """The path of a reference .npz, downloaded once into torch's cache."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.exists(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with download_timeout():
                torch.hub.download_url_to_file(url, path, progress=False)
        except Exception as error:  # offline, or refused
            raise FIDError(f"cannot download the reference statistics ({type(error).__name__}); download {url} "
                           f"to {path}, or pass their path") from None
    return path


def save_stats(stats, path):
    """pytorch-fid's layout (mu, sigma), written under a temporary name first."""
    temporary = path + ".tmp.npz"
    np.savez(temporary, mu=stats["mu"], sigma=stats["sigma"])
    os.replace(temporary, path)


def read_stats(path):
    """Reference statistics (mu [2048], sigma [2048, 2048]: Inception's pool3
    features), refused in one line when they are not."""
    try:
        with np.load(path) as archive:
            stats = {"mu": archive["mu"], "sigma": archive["sigma"]}
    except Exception as error:
        raise FIDError(f"{path} is not an .npz of FID statistics ({type(error).__name__}); expected one with mu "
                       "and sigma") from None
    if stats["mu"].shape != (2048,) or stats["sigma"].shape != (2048, 2048):
        raise FIDError(f"{path} holds statistics of mu {stats['mu'].shape} and sigma {stats['sigma'].shape}, not "
                       "of Inception's 2048 features")
    return stats


# -----------------------------------------------------------------------------
# Inputs: a folder of images, a .pt of uint8 images (or a dict with "images",
# as samples.pt), or an .npz of statistics


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_batches(path, batch_size):
    """(number of images, iterator over uint8 batches) of a folder or a .pt file."""
    if os.path.isdir(path):
        from PIL import Image  # as pytorch-fid reads them
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))

        def read(start):
            images = [torch.from_numpy(np.array(Image.open(os.path.join(path, f)).convert("RGB"))).permute(2, 0, 1)
                      for f in files[start:start + batch_size]]
            if len({tuple(image.shape) for image in images}) > 1:
                raise FIDError(f"images in {path} differ in size; resize them to one size first")
            return torch.stack(images)
        return len(files), (read(start) for start in range(0, len(files), batch_size))
    if path.endswith(".pt"):
        try:
            images = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise FIDError(f"cannot read {path} ({type(error).__name__})") from None
        if isinstance(images, dict):
            images = images.get("images")
        if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise FIDError(f"{path} must hold uint8 images N x 3 x H x W (or a dict with such 'images')")
        return len(images), iter(images.split(batch_size))
    raise FIDError(f"{path} is neither a folder of images, a .pt file of images nor an .npz of statistics")


def stats_of(path, model_for, batch_size, keep_logits=False):
    if path.endswith(".npz"):
        if keep_logits:
            raise FIDError(f"--is needs images, but {path} holds statistics")
        return read_stats(path)
    from tqdm import tqdm
    count, batches = image_batches(path, batch_size)
    if count < 2:  # before the weights are loaded: bad input costs no work
        raise FIDError(f"FID needs at least 2 images, {path} holds {count}")
    model = model_for()
    with tqdm(total=count, desc=os.path.basename(path.rstrip("/")), unit="img", leave=False) as progress:
        return statistics(model, batches, keep_logits, progress)


# -----------------------------------------------------------------------------
# Command line


def benchmark(batch_size, repeats=5):
    """Feature extraction in images/s on random weights (speed does not depend
    on them), ours and, when it is installed, pytorch-fid's, on the same device."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    x = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    ours = FIDInception()
    candidates = {}
    try:
        import pytorch_fid.inception

        def our_weights(*args, **kwargs):  # in place of pytorch-fid's download
            return ours.state_dict()
        pytorch_fid.inception.load_state_dict_from_url = our_weights
        theirs = pytorch_fid.inception.InceptionV3([3]).eval().to(device)

        def run_theirs():  # pytorch-fid takes floats in [0, 1]
            return theirs(x.float() / 255)
        candidates["pytorch-fid"] = run_theirs
    except ImportError:
        print("pytorch-fid is not installed: pip install pytorch-fid to compare")
    ours = for_inference(ours, device)
    candidates["ours"] = partial(ours, x)
    rates = feature_rates(candidates, batch_size, device, repeats)
    for name, rate in rates.items():
        print(f"{name:>12}: {rate:8.1f} images/s (32x32 inputs, batch {batch_size}, {where})")
    if len(rates) == 2:
        print(f"speed-up: {rates['ours'] / rates['pytorch-fid']:.2f}x")


def feature_rates(candidates, batch_size, device, repeats=5):
    """Images/s of each candidate feature extractor on one batch, taking turns;
    the best of `repeats` rounds after a warm-up round, since a shared machine
    only ever slows a run down."""
    best = dict.fromkeys(candidates, float("inf"))
    with torch.inference_mode(), full_fp32():
        for repeat in range(repeats + 1):
            for name, run in candidates.items():
                start = time.perf_counter()
                run()
                if device == "cuda":
                    torch.cuda.synchronize()
                best[name] = min(best[name], time.perf_counter() - start) if repeat else best[name]
    return {name: batch_size / seconds for name, seconds in best.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="folder of images, .pt of uint8 images, or .npz of statistics")
    parser.add_argument("--is", dest="inception_score", action="store_true",
                        help="also print the Inception Score of the first input")
    parser.add_argument("--save-stats", metavar="OUT.npz", help="write the statistics of the one input (mu, sigma)")
    parser.add_argument("--weights", help="path of pt_inception-2015-12-05-6726825d.pth "
                                          f"(default: ${WEIGHTS_ENV}, then the torch hub cache)")
    parser.add_argument("--batch-size", type=int, default=200, help="images per forward pass")
    parser.add_argument("--bench", action="store_true", help="print feature-extraction images/s and exit")
    args = parser.parse_args(argv)
    if args.bench:
        return benchmark(args.batch_size)
    expected = 1 if args.save_stats else 2
    if len(args.inputs) != expected:
        usage = "python fid.py A --save-stats OUT.npz" if args.save_stats else "python fid.py A B"
        raise FIDError(f"give {expected} input{'s' if expected > 1 else ''}: {usage}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = None

    def model_for():  # loaded once, and only when an input holds images
        nonlocal model
        model = model or load_inception(args.weights, device)
        return model

    first = stats_of(args.inputs[0], model_for, args.batch_size, keep_logits=args.inception_score)
    if args.inception_score:
        mean, std = inception_score(first["logits"])
        print(f"IS {mean:.4f} ± {std:.4f}")
    if args.save_stats:
        save_stats(first, args.save_stats)
        print(f"saved statistics to {args.save_stats}")
        return
    second = stats_of(args.inputs[1], model_for, args.batch_size)
    print(f"FID {frechet_distance(first['mu'], first['sigma'], second['mu'], second['sigma']):.4f}")


if __name__ == "__main__":
    try:
        main()
    except FIDError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
