"""The op registry (rlhf_ops/_registry.py) against what it describes: a new op is registered once,
and every table that reads the registry (backend preferences, bench families, the report, the
memory specs, the sanitizer) agrees with it."""
import importlib
import inspect
import os
import sys

import pytest
import torch

import rlhf_ops as ro
from rlhf_ops import _backend, _registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # bench/ is not installed; it lives beside tests/ in the repository
    sys.path.insert(0, ROOT)

from bench import harness, memory, report, sanitize  # noqa: E402


def _public_ops_with_backend():
    out = set()
    for name in ro.__all__:
        f = getattr(ro, name)
        if callable(f) and not isinstance(f, type) and "backend" in inspect.signature(f).parameters:
            out.add(name)
    return out


def test_every_public_op_with_a_backend_is_registered_once():
    names = [op.name for op in _registry.OPS]
    assert len(names) == len(set(names)), "an op is registered twice"
    assert set(names) == _public_ops_with_backend(), (
        "rlhf_ops/_registry.py OPS must list exactly the public functions that take backend=")


@pytest.mark.parametrize("op", _registry.OPS, ids=lambda op: op.name)
def test_entry_names_files_that_exist(op):
    fn = getattr(importlib.import_module(f"rlhf_ops.{op.module}"), op.name)
    assert getattr(ro, op.name) is fn, f"rlhf_ops.{op.name} is not rlhf_ops.{op.module}.{op.name}"
    assert os.path.exists(os.path.join(ROOT, "kernels", f"{op.kernels}.py"))
    if op.cuda:
        assert os.path.exists(os.path.join(ROOT, "csrc", f"{op.cuda}.cu"))
    assert op.auto[-1] == "reference" and set(op.auto) <= set(_registry.backends(op)), op.auto
    params = inspect.signature(fn).parameters
    assert op.vocab_parallel == ("process_group" in params and "vocab_offset" in params)


def test_backend_preferences_come_from_the_registry():
    assert _backend.AUTO_PREFERENCE == {op.name: op.auto for op in _registry.OPS}
    with pytest.raises(KeyError, match="not registered"):
        _backend.resolve("no_such_op", None, torch.device("cpu"))


def test_bench_families_report_memory_and_sanitizer_read_the_registry():
    assert harness.FAMILIES == _registry.bench_families()
    for op in _registry.OPS:
        if op.bench:
            cases = harness.cases(op.bench, "smoke")
            assert op.name in {c.op for c in cases}, f"bench family {op.bench} has no {op.name} case"
            assert op.bench_x in cases[[c.op for c in cases].index(op.name)].shape
            bench_file = importlib.import_module(f"bench.bench_{op.bench}")
            assert bench_file.FAMILY == op.bench
            assert report.FAMILY_OF[op.name] == op.bench and report._X[op.name] == op.bench_x
    assert set(report.FAMILY_OF) == {op.name for op in _registry.OPS if op.bench}
    assert set(memory._registered_specs()) == {op.name for op in _registry.OPS if op.memory}
    planned = set(sanitize._cases("cuda"))                         # names only: nothing runs
    for op in _registry.OPS:
        if op.sanitize:
            for be in _registry.backends(op)[1:]:
                assert f"{be}/{op.sanitize}" in planned or (op.sanitize, be) in sanitize.ELSEWHERE
