"""Results tables and the roofline (benchmarks/report.py, benchmarks/roofline.py)."""

import pytest

from benchmarks import roofline
from benchmarks.engines import mlx_weight_bytes
from benchmarks.history import Sample
from benchmarks.report import iqr_percent, results_table, roofline_note, summary_table


def sample(engine, workload, name, value, per_token=100_000_000, batch=1, trial=1):
    settings = {"engine": {"weight_bytes_per_token": per_token},
                "workload": {"batch_size": batch}}
    return Sample(1, trial, engine, "m", workload, name, value, "", settings)


RUN = [
    sample("machine", "memory-bandwidth", "bandwidth_gbs", 10.0, per_token=None),
    *(sample("reference", "decode-64", "decode_tps", v, trial=i) for i, v in
      enumerate([9.0, 10.0, 11.0], 1)),
    *(sample("mlx-lm", "decode-64", "decode_tps", v, per_token=50_000_000, trial=i)
      for i, v in enumerate([19.0, 20.0, 21.0], 1)),
    sample("reference", "batch-8", "batch_tps", 40.0, batch=8),
    sample("reference", "decode-64", "peak_memory_mb", 120.0),
]


def rows(table):
    return {(r[0], r[1], r[2]): dict(zip(table.headers, r)) for r in table.rows}


def test_results_table_has_median_spread_ratio_and_roofline():
    table = rows(results_table(RUN))
    ref = table[("decode-64", "decode_tps", "reference")]
    peer = table[("decode-64", "decode_tps", "mlx-lm")]
    assert ref["median"] == "10.00" and ref["n"] == "3" and ref["vs reference"] == "1.00x"
    assert peer["median"] == "20.00" and peer["vs reference"] == "2.00x"
    assert ref["IQR %"] == "10.0"  # quartiles 9.5 and 10.5 around a median of 10
    # 10 GB/s over 100 MB per token = 100 tok/s: 10 tok/s is 10% of it.
    assert ref["% roofline"] == "10.0"
    assert peer["% roofline"] == "10.0"  # 20 tok/s of 10 GB / 50 MB = 200 tok/s
    # A batched step reads the weights once for 8 sequences: bound 800 tok/s.
    assert table[("batch-8", "batch_tps", "reference")]["% roofline"] == "5.0"
    assert table[("decode-64", "peak_memory_mb", "reference")]["% roofline"] == "-"
    assert ("memory-bandwidth", "bandwidth_gbs", "machine") not in table


def test_summary_table_puts_engines_in_rows():
    table = summary_table(RUN)
    assert table.headers[0] == "engine"
    assert "decode-64 tok/s" in table.headers and "decode-64 % roofline" in table.headers
    by_engine = {r[0]: dict(zip(table.headers, r)) for r in table.rows}
    assert by_engine["mlx-lm"]["decode-64 tok/s"] == "20.00"
    assert by_engine["mlx-lm"]["batch-8 tok/s"] == "-"
    assert by_engine["reference"]["decode-64 peak MB"] == "120"
    assert table.markdown().splitlines()[1].startswith("|---|")


def test_roofline_note_states_bandwidth_and_bound_per_engine():
    note = roofline_note(RUN)
    assert "10.0 GB/s" in note and "reference: 100.0 MB/token -> roofline 100 tok/s" in note


def test_iqr_percent():
    assert iqr_percent([10.0]) == 0.0
    assert iqr_percent([9.0, 10.0, 11.0]) == pytest.approx(10.0)


def test_roofline_arithmetic_and_a_plausible_bandwidth():
    assert roofline.roofline_tps(8e9, 80e6) == pytest.approx(100.0)
    assert roofline.percent_of_roofline(65.0, 8e9, 80e6) == pytest.approx(65.0)
    with pytest.raises(ValueError, match="bytes_per_token"):
        roofline.roofline_tps(1e9, 0)
    measured = roofline.measure_bandwidth(buffer_bytes=32 * 2**20, repeats=2)
    assert 1e8 < measured < 1e13  # 0.1 GB/s .. 10 TB/s: a real memory system


def test_weight_bytes_of_a_tied_mlx_model_count_the_embedding_as_the_head():
    from reference.model import Model, ModelArgs

    args = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 32}
    tied = Model(ModelArgs(**args, tie_word_embeddings=True))
    held, per_token = mlx_weight_bytes(tied)
    assert per_token == held  # the head *is* the embedding, read whole every token
    untied = Model(ModelArgs(**args, tie_word_embeddings=False))
    held, per_token = mlx_weight_bytes(untied)
    assert held - per_token == 64 * 16 * 4  # the float32 embedding table is not read
