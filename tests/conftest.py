"""Shared test setup.

On a machine without a GPU the suite runs on CPU tensors and the Triton kernels run under the
interpreter (TRITON_INTERPRET=1 is set here, before anything imports triton). With a GPU the
same tests run on CUDA tensors. Fixtures:
  device      "cuda" when a GPU is visible (and the interpreter is off), else "cpu"
  backend     parametrised over reference / triton / cuda; a backend that cannot run here is
              skipped with the reason rlhf_ops gives.
"""
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

# Hypothesis profiles (tests/test_properties.py). "ci", the default: derandomized (examples are
# a fixed function of each test's name, no example database), so every run draws the same inputs
# and the run time is bounded; "long" (`pytest --hypothesis-profile=long`): random draws, 10×
# the examples, failures saved in .pytest_cache/hypothesis/ for replay. HYPOTHESIS_PROFILE=long also selects it.
try:
    from hypothesis import HealthCheck, settings
    from hypothesis.configuration import set_hypothesis_home_dir

    # the example database of the long profile lives under .pytest_cache/ (git-ignored)
    set_hypothesis_home_dir(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         ".pytest_cache", "hypothesis"))

    _quiet = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
    settings.register_profile("ci", max_examples=10, derandomize=True, database=None, deadline=None,
                              print_blob=True, suppress_health_check=_quiet)
    settings.register_profile("long", max_examples=100, derandomize=False, deadline=None,
                              print_blob=True, suppress_health_check=_quiet)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover - hypothesis is pinned in requirements.txt
    pass
ON_GPU = DEVICE == "cuda"
BACKENDS = ("reference", "triton", "cuda")


def backend_problem(name: str):
    """None if ``name`` can run on DEVICE tensors, else why not."""
    from rlhf_ops import _backend
    why = _backend.unavailable(name, torch.device(DEVICE))
    return None if why is None else f"backend {name!r} is not available: {why}"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=BACKENDS)
def backend(request):
    why = backend_problem(request.param)
    if why:
        pytest.skip(why)
    return request.param


@pytest.fixture(params=[b for b in BACKENDS if b != "reference"])
def fused_backend(request):
    why = backend_problem(request.param)
    if why:
        pytest.skip(why)
    return request.param


def seed_of(nodeid: str) -> int:
    """The seed of a test: a stable hash (crc32) of its id, the same in every process and run
    (Python's hash() of a string is salted per process, so a failure could not be replayed)."""
    return zlib.crc32(nodeid.encode()) % (2**31)


@pytest.fixture(autouse=True)
def _seed(request):
    # A fresh seed per test (derived from its id) so that each check draws its own inputs,
    # reproducibly; a failure report names it (pytest_runtest_makereport below).
    torch.manual_seed(seed_of(request.node.nodeid))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("torch seed", f"torch.manual_seed({seed_of(item.nodeid)})  # "
                                              f"zlib.crc32 of {item.nodeid!r}, set before the test"))
