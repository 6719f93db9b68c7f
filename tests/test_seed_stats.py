"""The one mean ± std over seeds (common.seed_stats), against hand-computed values."""

import math

from common.seed_stats import format_pm, seed_summary


def test_seed_summary_is_the_sample_std_over_the_values_present():
    mean, std, n = seed_summary([1.0, None, 2.0, 3.0, 4.0])
    assert (mean, n) == (2.5, 4)
    assert math.isclose(std, math.sqrt(5 / 3))  # Σ(x − 2.5)² = 5, over n − 1 = 3
    assert seed_summary([0.7]) == (0.7, 0.0, 1)
    assert seed_summary([None]) is None and seed_summary([]) is None


def test_format_pm_scales_rounds_and_marks_single_and_missing_seeds():
    assert format_pm([0.5, 0.7], 100) == "60.0 ± 14.1"  # std = 0.1·√2 = 0.1414
    assert format_pm([0.5, 0.7], 100, show_n=True) == "60.0 ± 14.1 (n=2)"
    assert format_pm([6.1234, 6.1236], 1, 3) == "6.123 ± 0.000"
    assert format_pm([0.25], 100) == "25.0"  # one seed: no spread to show
    assert format_pm([0.25], 100, show_n=True) == "25.0 (n=1)"
    assert format_pm([None, None]) == "—" and format_pm([]) == "—"
