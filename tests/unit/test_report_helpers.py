"""Pure helpers of the performance report (benchmarks/report.py, report_render.py): no model."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import report  # noqa: E402
import report_render  # noqa: E402


def test_bytes_per_token_full_depth_reads_every_layer_and_the_head():
    assert report.bytes_per_token(400e6, 100e6, None, 30) == 500e6
    assert report.bytes_per_token(400e6, 100e6, 30.0, 30) == 500e6


def test_bytes_per_token_early_exit_scales_only_the_layers():
    assert report.bytes_per_token(400e6, 100e6, 15.0, 30) == 300e6
    assert report.bytes_per_token(300e6, 0.0, 20.0, 30) == pytest.approx(200e6)


def test_agreement_counts_positions_prefix_and_exact_match():
    ref = [1, 2, 3, 4]
    assert report.agreement([1, 2, 3, 4], ref) == {"position": 1.0, "prefix": 1.0, "exact": True}
    # diverges at position 1, matches again at 3: position agreement is not prefix agreement
    assert report.agreement([1, 9, 9, 4], ref) == {"position": 0.5, "prefix": 0.25, "exact": False}
    assert report.agreement([1, 2], ref) == {"position": 0.5, "prefix": 0.5, "exact": False}


def test_pooled_rate_weighs_runs_by_length():
    assert report.pooled_rate([10, 30], [1.0, 1.0]) == 20.0
    assert report.pooled_rate([5], [0.0]) is None


def test_q4_indices_spread_over_the_prompt_set():
    assert report.q4_indices(12, 4) == {0, 3, 6, 9}
    assert report.q4_indices(3, 10) == {0, 1, 2}
    assert report.q4_indices(5, 0) == set()


def test_md_table_renders_header_alignment_and_rows():
    table = report_render.md_table(["name", "tok/s"], [["a", "1.0"], ["b", "2.5"]])
    assert table == "| name | tok/s |\n|:---|---:|\n| a | 1.0 |\n| b | 2.5 |"
    assert report_render.md_table(["x"], [], align="c") == "| x |\n|:---:|"


def test_fmt_and_pct_show_missing_values_as_a_dash():
    assert report_render.fmt(None) == "–"
    assert report_render.fmt(2.345, ".2f", "x") == "2.35x"
    assert report_render.pct(0.5) == "50.0%"
    assert report_render.pct(None) == "–"


def test_para_joins_a_wrapped_string_into_one_line():
    assert (
        report_render.para("""a  b
        c""")
        == "a b c"
    )
