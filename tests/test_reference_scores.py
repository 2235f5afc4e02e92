"""Scores of fixed configurations on the tiny set equal those the code gave before the fit schedule
became one driver (tests/make_reference_scores.py wrote the file from that code)."""

import json

import pytest

from make_reference_scores import CONFIGS, FILE
from conftest import tiny_model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scores_equal_the_recorded_ones_bit_for_bit(tiny_set, name):
    train, test, _ = tiny_set
    expected = json.loads(FILE.read_text())[name]
    got = [float(s) for s in tiny_model(**CONFIGS[name]).fit(train).predict(test)[0]]
    assert got == expected
