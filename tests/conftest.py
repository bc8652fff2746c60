"""
Fixtures shared by more than one test file: one CPU thread per test file and the tiny SD3-shaped
VAE config (tests/test_vae.py, tests/test_prepare.py).
"""

import pytest
import torch

from vae import VAEConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy shared CPU a 2-thread OpenMP
    region can be 100x slower than one thread; restored after each file's tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_vae_config():
    """The SD3 VAE's shape at tiny widths: 4 levels of (32, 32, 64, 64) channels, 2 resnets per
    level, 16 latent channels, GroupNorm of 32 groups, SD3's scale and shift."""
    return VAEConfig(block_out_channels=[32, 32, 64, 64])
