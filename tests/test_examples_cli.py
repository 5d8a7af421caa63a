"""examples/reward_model_trl.py refuses --ranked with --baseline in one line: TRL's own
RewardTrainer takes chosen/rejected pairs only (it used to end in TRL's KeyError: 'chosen')."""
import importlib.util
import os

import pytest

pytest.importorskip("trl")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example():
    spec = importlib.util.spec_from_file_location(
        "reward_model_trl", os.path.join(ROOT, "examples", "reward_model_trl.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ranked_with_baseline_is_refused_in_one_line(capsys):
    ex = _example()
    with pytest.raises(SystemExit) as e:
        ex.main(["--ranked", "4", "--baseline"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TRL's RewardTrainer takes chosen/rejected pairs only" in err[0]
    with pytest.raises(ValueError, match="drop --baseline or --ranked"):
        ex.run(1, ranked=4, baseline=True)
