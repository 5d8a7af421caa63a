"""The bench command lines: help text, and tracked results rewritten only when a number changed."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # bench/ is not installed; it lives beside tests/ in the repository
    sys.path.insert(0, ROOT)

from bench import memory, report  # noqa: E402

ROWS = [{"op": "cross_entropy", "backend": "reference", "shape": {"N": 8}, "dtype": "bf16",
         "status": "ok", "saved_bytes": 1024, "saved_tensor_bytes": 1024, "kept_elsewhere_bytes": 0,
         "saved_bytes_incl_inputs": 2048, "n_saved_storages": 1}]


def test_memory_rewrites_tracked_files_only_when_a_number_changes(tmp_path, monkeypatch, capsys):
    tracked = tmp_path / "results"
    readme_calls = []
    monkeypatch.setattr(memory, "DEFAULT_OUT", str(tracked))
    monkeypatch.setattr(memory, "measure", lambda ops=None: [dict(r) for r in ROWS])
    monkeypatch.setattr(memory, "_update_readme", lambda result: readme_calls.append(result["rows"]))
    memory.main([])                                          # first run: writes
    path = tracked / "memory.json"
    saved = json.loads(path.read_text())
    assert saved["rows"] == ROWS and len(readme_calls) == 1
    saved["date"], saved["commit"] = "2000-01-01", "old"     # as if measured long ago
    path.write_text(json.dumps(saved))
    md = (tracked / "memory.md").read_text()
    memory.main([])                                          # same numbers: nothing rewritten
    assert json.loads(path.read_text())["date"] == "2000-01-01" and (tracked / "memory.md").read_text() == md
    assert len(readme_calls) == 1 and "left as they are" in capsys.readouterr().out
    memory.main(["--ops", "cross_entropy"])                  # a subset never overwrites the full table
    assert json.loads(path.read_text())["commit"] == "old"
    changed = [dict(ROWS[0], saved_bytes=2048)]
    monkeypatch.setattr(memory, "measure", lambda ops=None: [dict(r) for r in changed])
    memory.main([])                                          # a number changed: rewritten
    assert json.loads(path.read_text())["rows"] == changed and len(readme_calls) == 2
    memory.main(["--force"])
    assert json.loads(path.read_text())["commit"] != "old"
    other = tmp_path / "elsewhere"
    memory.main(["--out", str(other)])                       # --out always writes, never the README
    assert json.loads((other / "memory.json").read_text())["rows"] == changed and len(readme_calls) == 3


def test_report_help_names_the_command_and_every_option():
    p = report.parser()
    text = p.format_help()
    assert text.startswith("usage: python -m bench.report")
    for action in p._actions:
        assert action.help, action.option_strings           # every option is described
    for opt in ("--quick", "--size", "--ops", "--tests", "--junit", "--out", "--budget-s", "--no-plots"):
        assert opt in text


def test_report_smoke_run_keeps_tracked_results_when_only_timings_change(tmp_path):
    res = {"device": "CPU", "commit": "a", "date": "2001-01-01", "roofline": {"hbm_gbps": 1.0},
           "tests": {}, "benchmarks": [{"op": "cross_entropy", "backend": "reference", "status": "ok",
                                        "median_ms": 1.0, "baselines": {"eager": {"median_ms": 1.0}}}]}
    path = tmp_path / "cpu.json"
    assert not report.smoke_unchanged(res, str(path))        # no file yet
    path.write_text(json.dumps(res))
    later = json.loads(json.dumps(res))
    later.update(commit="b", date="2002-02-02", roofline={"hbm_gbps": 2.0})
    later["benchmarks"][0]["median_ms"] = 3.0
    later["benchmarks"][0]["baselines"]["eager"]["median_ms"] = 5.0
    assert report.smoke_unchanged(later, str(path))
    later["benchmarks"][0]["status"] = "failed"              # what ran, or how, changed
    assert not report.smoke_unchanged(later, str(path))
