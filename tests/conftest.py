"""Shared test settings and fixtures."""

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")

# Under pytest-xdist (`make test`: one worker per core), one torch thread per worker, and one
# in the processes tests start: two workers of two threads each on two cores slow each other
# many times over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Test modules that need packages only requirements-dev.txt installs. Where one is missing (on
# Colab, `python -m pytest -m sanity` runs with Colab's own packages) the module is left out of
# collection instead of failing it or showing as skipped: the sanity checks need none of them.
# `test_sanity.py` checks that no other module imports such a package at its top.
DEV_ONLY_IMPORTS = {
    "test_e2e_notebook.py": ("nbformat",),
    "test_eecs598_deploy.py": ("onnx", "onnxruntime", "onnxscript"),
    "test_eecs598_errors.py": ("hypothesis",),
    "test_eecs598_mean_ap.py": ("hypothesis",),
    "test_eecs598_mean_ap_coco.py": ("hypothesis",),
    "test_properties.py": ("hypothesis",),
}
collect_ignore = [
    module
    for module, packages in DEV_ONLY_IMPORTS.items()
    if any(importlib.util.find_spec(name) is None for name in packages)
]


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
