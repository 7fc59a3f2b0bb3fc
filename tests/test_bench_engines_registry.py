"""``lmconform bench`` benchmarks any engine the registry opens, with one model export cache.

Real engines on the ``dummy`` model: the reference in-process, the reference served
over JSON lines (``cmd:``, timed by its own clock through ``timing/1``) and the
reference adapter named as ``module:Class``. Each run is recorded in the history
under each engine's name, and ``bench show`` / ``bench compare`` read it.
"""

import importlib.util
import json

import pytest

from benchmarks import cli as cli_bench
from benchmarks.engines import TimedEngine
from benchmarks.history import History
from engines import models

CMD = "cmd:python -m conformance.examples.jsonl_engine"
MODULE = "engines.adapters.reference:ReferenceEngine:name=ref-module"


def bench(*args) -> int:
    return cli_bench.main([str(a) for a in args])


def test_reference_cmd_and_module_engines_are_benchmarked_shown_and_compared(tmp_path, capsys):
    db = tmp_path / "history.sqlite"
    engines = f"reference,{CMD},{MODULE}"
    for _ in range(2):
        assert bench("--engines", engines, "--model", "dummy", "--workloads",
                     "prefill-16,decode-16", "--trials", 3, "--warmup", 0,
                     "--no-bandwidth", "--db", db) == 0
    with History(db) as store:
        samples = store.samples([1])
        run = store.run(1)
    names = {"reference", CMD, "ref-module"}
    assert set(run.settings["engines"]) == names
    for name in names:
        decode = [s for s in samples if s.engine == name and s.metric == "decode_tps"]
        assert len(decode) == 3 and all(s.value > 0 for s in decode)
    cmd_decode = next(s for s in samples if s.engine == CMD and s.metric == "decode_tps")
    assert cmd_decode.settings["engine"]["timed_by"] == "engine clock"  # it speaks timing/1
    # Its peak memory is its own report: the dummy's weights and more, under a gigabyte.
    cmd_peak = next(s for s in samples if s.engine == CMD and s.metric == "peak_memory_mb")
    reference_peak = next(
        s for s in samples if s.engine == "reference" and s.metric == "peak_memory_mb"
    )
    assert reference_peak.value * 0.5 < cmd_peak.value < 1000

    capsys.readouterr()
    assert bench("show", 1, "--db", db) == 0
    shown = capsys.readouterr().out
    assert CMD in shown and "ref-module" in shown and "decode_tps" in shown
    assert bench("compare", 1, 2, "--db", db) in (0, 1)  # a verdict, never an error
    compared = capsys.readouterr().out
    assert "ref-module" in compared and CMD in compared


def test_a_workload_an_engine_cannot_run_is_skipped_with_the_reason(tmp_path, capsys):
    # The mini engine below declares greedy only: no streaming, so no decode timing.
    script = tmp_path / "greedy_only.py"
    script.write_text(
        "import json, sys\n"
        "say = lambda **m: print(json.dumps(m), flush=True)\n"
        "say(type='hello', protocol=1, engine='mini', capabilities=['greedy'],"
        " model_formats=['builtin'])\n"
        "for line in sys.stdin:\n"
        "    m = json.loads(line)\n"
        "    if m['type'] == 'load':\n"
        "        say(type='loaded', id=m['id'], vocab_size=260)\n"
        "    elif m['type'] == 'generate':\n"
        "        say(type='event', id=m['id'], token=65, finish_reason='length')\n"
        "    else:\n"
        "        break\n"
    )
    db = tmp_path / "h.sqlite"
    assert bench("--engines", f"cmd:python {script}", "--model", "dummy", "--workloads",
                 "prefill-16,decode-16", "--trials", 1, "--warmup", 0, "--no-bandwidth",
                 "--db", db) == 0
    err = capsys.readouterr().err
    assert "unsupported, skipped" in err and "lacks the capabilities stream" in err
    with History(db) as store:
        assert {s.workload for s in store.samples()} == {"prefill-16"}


@pytest.mark.skipif(importlib.util.find_spec("mlx_lm") is None, reason="needs mlx-lm")
def test_a_changed_reference_invalidates_the_exported_folder_benchmarks_use(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("LMCONFORM_HOME", str(tmp_path))
    monkeypatch.setattr(models, "reference_fingerprint", lambda: "reference-v1")
    first = TimedEngine.from_spec("mlx-lm", "dummy")
    first.load()
    folder = first.adapter.source.path
    first.close()
    assert folder == tmp_path / "models" / "dummy"
    stamp = json.loads((folder / models.STAMP).read_text())
    assert stamp["fingerprint"] == "reference-v1"
    (folder / "marker").write_text("left by the first export")

    # The same reference: the cached folder is used as it is.
    again = TimedEngine.from_spec("mlx-lm", "dummy")
    again.load()
    again.close()
    assert (folder / "marker").exists()

    # The reference changed: the folder is exported anew before the engine sees it.
    monkeypatch.setattr(models, "reference_fingerprint", lambda: "reference-v2")
    changed = TimedEngine.from_spec("mlx-lm", "dummy")
    changed.load()
    changed.close()
    assert changed.adapter.source.path == folder
    assert not (folder / "marker").exists()
    assert json.loads((folder / models.STAMP).read_text())["fingerprint"] == "reference-v2"
