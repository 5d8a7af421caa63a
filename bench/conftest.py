"""pytest setup for the micro-benchmarks (``pytest bench/bench_<op>.py --benchmark-enable``).

Options:
  --bench-size smoke|quick|llm   default: llm with a GPU, smoke without (tiny, reference only)
  --bench-impls a,b,...          only these implementations (default: all the case defines)
  --bench-modes fwd,bwd,fwd+bwd  default: all three
Each bench file sets ``FAMILY``; its test takes the fixtures ``case``, ``impl`` and ``mode``.
If pytest-benchmark is not installed, a stand-in ``benchmark`` fixture runs each case once
(a check that it runs, no timing) so the files still work on a bare GPU machine.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import harness  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def pytest_addoption(parser):
    g = parser.getgroup("rlhf_ops bench")
    g.addoption("--bench-size", default=None, choices=harness.SIZES)
    g.addoption("--bench-impls", default=None)
    g.addoption("--bench-modes", default=",".join(harness.MODES))


def pytest_generate_tests(metafunc):
    family = getattr(metafunc.module, "FAMILY", None)
    if family is None or "case" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    size = cfg.getoption("--bench-size") or ("llm" if DEVICE == "cuda" else "smoke")
    impls = cfg.getoption("--bench-impls")
    impls = impls.split(",") if impls else None
    modes = cfg.getoption("--bench-modes").split(",")
    params, ids = [], []
    for case in harness.cases(family, size):
        for name in case.impls:
            if size == "smoke" and name != "reference":
                continue  # CPU smoke: the other backends need a GPU or are too slow interpreted
            if impls and name not in impls:
                continue
            for mode in modes:
                params.append((case, name, mode))
                ids.append(f"{case.id}-{name}-{mode}")
    metafunc.parametrize(("case", "impl", "mode"), params, ids=ids)


@pytest.fixture
def device():
    return DEVICE


try:
    import pytest_benchmark  # noqa: F401
except ImportError:
    class _RunOnce:
        extra_info: dict = {}

        def __init__(self):
            self.extra_info = {}

        def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, **_):
            if setup is not None:
                args, kwargs = setup()
            target(*args, **(kwargs or {}))

        def __call__(self, fn, *args, **kwargs):
            return fn(*args, **kwargs)

    @pytest.fixture
    def benchmark():
        return _RunOnce()
