"""
FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to Inception pool3 features
of generated and reference images,

    FID = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))

in float64, statistics (mu, S) from (N, 2048) features (unbiased covariance), reference statistics
in .npz files with arrays 'mu' and 'sigma' (pytorch-fid's --save-stats layout, also TTUR's).

Features: `InceptionPool3`, the TensorFlow 2015-12-05 Inception v3 graph in pytorch-fid's layout and
names (FIDInceptionV3), loaded from a .safetensors conversion of pytorch-fid's weights
(pt_inception-2015-12-05-6726825d.pth). Images are first made uint8, as the reference codes read
them from files (a (B, 3, H, W) tensor in [-1, 1] is rounded as vae.to_pil saves it to PNG), then
resized to 299 x 299 by one of two conventions:

    "pytorch-fid"  (default) pytorch-fid's InceptionV3(resize_input=True): x = uint8 / 255,
                   F.interpolate(x, (299, 299), mode="bilinear", align_corners=False) (no antialias),
                   then 2 x - 1.
    "tensorflow"   the TF graph of TTUR's fid.py (clean-fid's "legacy_tensorflow" mode reproduces
                   it): legacy ResizeBilinear on the 0 ... 255 values (output pixel i samples input
                   i * in / out, no half-pixel shift, clamped at the edge), then (x - 128) / 128.

"pytorch-fid" is the default because the weights this loader reads are pytorch-fid's: the default
reproduces that package end to end (its fid_score on image files), the code behind many published
FIDs and reference .npz files. Use "tensorflow" to compare with statistics made by the TF reference
code (TTUR's precomputed .npz files, clean-fid's legacy_tensorflow mode). The two differ only in the
resize and the [-1, 1] scaling.

    python evaluate.py fid-stats --inception pt_inception.safetensors --images out/ --out ours.npz
    python evaluate.py fid-stats --inception pt_inception.safetensors --images out/ --out ours_tf.npz \
        --resize tensorflow
    python evaluate.py fid ours.npz coco_ref.npz
    python -m pytest -q tests/evaluation/test_metrics.py -k "frechet or inception or resize"
"""

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sd3 import checkpoint
from run import cli
from evaluation import metrics
from sd3.checkpoint import atomic_write

RESIZE = ("pytorch-fid", "tensorflow")


# -----------------------------------------------------------------------------
# Frechet distance and statistics


def feature_statistics(features):
    """(N, D) features -> (mu (D,), sigma (D, D)) in float64; sigma is the unbiased covariance."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_statistics needs (N >= 2, D) features, got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(S):
    lam, U = np.linalg.eigh((S + S.T) / 2)
    return (U * np.sqrt(np.clip(lam, 0, None))) @ U.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)), a symmetric PSD matrix,
    so both square roots come from eigendecompositions (negative round-off eigenvalues -> 0).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    S1, S2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or S1.shape != S2.shape or S1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {S1.shape} / {S2.shape}")
    r1 = _sqrt_psd(S1)
    M = r1 @ S2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((M + M.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(S1) + np.trace(S2) - 2 * tr_sqrt)


def check_statistics(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID statistics: no file {path!r} (expected an .npz with arrays 'mu' and 'sigma')")


def load_statistics(path):
    """(mu, sigma) from an .npz reference-statistics file (pytorch-fid / clean-fid layout), checked:
    an .npz of numpy arrays (never a pickle: allow_pickle=False), 'mu' (D,) and 'sigma' (D, D), every
    number finite. Each refusal names the file."""
    check_statistics(path)
    what = f"FID statistics {path}"
    with cli.reading(path, what):
        try:
            f = np.load(path, allow_pickle=False)
        except ValueError as e:  # a pickle, or bytes that are no numpy format at all
            raise cli.InputError(f"{what}: not an .npz of numpy arrays ({e})") from None
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise cli.InputError(f"{what}: a single .npy array, not an .npz holding 'mu' and 'sigma'")
        with f:
            missing = [k for k in ("mu", "sigma") if k not in f.files]
            if missing:
                raise cli.MissingKey(f"{what} lacks {missing} (has {checkpoint.listing(f.files, 6)}; expected 'mu' and "
                                     "'sigma', as pytorch-fid --save-stats writes them)")
            try:
                mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            except (ValueError, TypeError, OSError) as e:  # object arrays (pickles), truncated members, strings
                raise cli.InputError(f"{what}: 'mu' and 'sigma' are not readable number arrays ({e})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise cli.InputError(f"{what}: mu {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise cli.InputError(f"{what}: mu or sigma holds non-finite numbers (NaN or inf): no FID can come of it")
    scale, asymmetry = max(np.abs(sigma).max(), 1e-300), np.abs(sigma - sigma.T).max()
    if asymmetry > 1e-6 * scale:
        raise cli.InputError(f"{what}: sigma is not symmetric, so no covariance matrix (largest |S - S^T| "
                             f"{asymmetry:.3g})")
    lowest = np.linalg.eigvalsh((sigma + sigma.T) / 2).min()
    if lowest < -1e-6 * scale:  # a covariance is positive semi-definite (round-off aside)
        raise cli.InputError(f"{what}: sigma has the negative eigenvalue {lowest:.3g}, so it is no covariance matrix")
    return mu, sigma


def save_statistics(path, mu, sigma):
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    atomic_write(path, lambda tmp: np.savez(tmp, mu=mu, sigma=sigma), suffix=".npz")


# -----------------------------------------------------------------------------
# The FID Inception network: pool3 (2048-d) of TensorFlow's 2015-12-05 Inception v3 graph, in the
# layout of pytorch-fid's FIDInceptionV3 (torchvision-style names: Conv2d_1a_3x3.conv.weight,
# Mixed_5b.branch1x1.bn.running_mean, ...). Differences from torchvision's inception_v3 that the
# TF graph has: the average pools of the A, C and first E blocks do not count the padding, and the
# last E block pools with a max pool. The classifier (fc.*) is not needed and is ignored.


class BasicConv2d(nn.Module):
    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(c_in, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):
    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(c_in, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    def __init__(self, c_in, max_pool):
        super().__init__()
        self.max_pool = max_pool  # the TF graph's last block pools with a max pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)


def tf_resize_bilinear(x, size):
    """TensorFlow's legacy ResizeBilinear (align_corners=False, no half-pixel centres), as in the
    FID graph: output pixel i samples input coordinate i * in / out, clamped at the last pixel;
    the scale in / out and the coordinates in float32, as TensorFlow computes them."""
    def axis(n_in, n_out):
        src = torch.arange(n_out, dtype=torch.float32) * (torch.tensor(n_in, dtype=torch.float32) / n_out)
        i0 = src.floor().long().clamp(max=n_in - 1)
        return i0, (i0 + 1).clamp(max=n_in - 1), (src - i0).to(x.device)

    y0, y1, fy = axis(x.shape[-2], size)
    x0, x1, fx = axis(x.shape[-1], size)
    rows = x[..., y0, :] * (1 - fy[:, None]) + x[..., y1, :] * fy[:, None]  # (B, C, size, W)
    return rows[..., x0] * (1 - fx) + rows[..., x1] * fx  # (B, C, size, size)


def inception_input(images, resize="pytorch-fid"):
    """images ((B, 3, H, W) in [-1, 1] or PIL, any sizes) -> (B, 3, 299, 299) in [-1, 1], by the
    `resize` convention of the module docstring."""
    if resize not in RESIZE:
        raise ValueError(f"FID resize must be one of {RESIZE}, got {resize!r}")
    out = []
    for image in metrics.to_pil_images(images):
        x = metrics.pil_to_tensor(image)[None]  # (1, 3, H, W), the uint8 values 0 ... 255
        if resize == "pytorch-fid":
            x = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        else:
            x = (tf_resize_bilinear(x, 299) - 128) / 128
        out.append(x)  # (1, 3, 299, 299)
    return torch.cat(out)  # (B, 3, 299, 299)


class InceptionPool3(nn.Module):
    """images -> (B, 2048) pool3 features; `resize`: "pytorch-fid" (default) or "tensorflow"."""

    def __init__(self, resize="pytorch-fid"):
        super().__init__()
        if resize not in RESIZE:
            raise ValueError(f"FID resize must be one of {RESIZE}, got {resize!r}")
        self.resize = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)

    @torch.no_grad()
    def forward(self, images):
        x = inception_input(images, self.resize).to(self.Conv2d_1a_3x3.conv.weight.device)  # (B, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = F.max_pool2d(x, 3, 2)  # (B, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))  # (B, 2048)


def check_inception(path):
    metrics.need_safetensors(path, "FID Inception", "a .safetensors state dict of pytorch-fid's FIDInceptionV3: "
                              "Conv2d_1a_3x3.conv.weight, ..., Mixed_7c.*")


def load_inception(path, device="cpu", resize="pytorch-fid"):
    """The FID Inception from a .safetensors state dict in pytorch-fid's names (convert
    pt_inception-2015-12-05-6726825d.pth once with safetensors.torch.save_file)."""
    from safetensors.torch import load_file
    check_inception(path)
    state = {k: v for k, v in load_file(path).items() if not k.startswith(("fc.", "AuxLogits."))}
    net = InceptionPool3(resize)
    expected = net.state_dict()
    missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        raise cli.MissingKey(f"FID Inception: {path!r} does not match (missing {missing[:5]} of {len(missing)}, "
                       f"unexpected {unexpected[:5]} of {len(unexpected)})")
    net.load_state_dict(state, strict=False)
    return net.to(device).eval().requires_grad_(False)


def fid(features, batches, reference):
    """FID of images against reference statistics.

    features: a callable images -> (B, D), e.g. load_inception(path) (pool3, 2048-d);
    batches: an iterable of image batches; reference: (mu, sigma) or an .npz path.
    """
    mu_r, sigma_r = load_statistics(reference) if isinstance(reference, (str, os.PathLike)) else reference
    feats = np.concatenate([np.asarray(torch.as_tensor(features(b)).double().cpu()) for b in tqdm(batches, "FID")])
    mu, sigma = feature_statistics(feats)
    return frechet_distance(mu, sigma, mu_r, sigma_r)
