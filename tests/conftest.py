"""Shared test settings and fixtures."""

import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def flush_denormal():
    """Flush subnormal floats to zero for the duration of a training test.

    A freshly initialised RegNet produces subnormal floats in its first iterations, which can
    make CPU convolutions ~100x slower. Not set globally: hypothesis needs subnormals.
    """
    from eecs598.training import flush_denormal_enabled

    previous = flush_denormal_enabled()
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(previous)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a 2-core machine shared with another torch process, two threads
    per process made conv training 50-100x slower; child processes use one too, so results
    match them bit for bit."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
