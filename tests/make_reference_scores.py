"""Regenerates tests/data/reference_scores.json: the image scores of fixed configurations on the tiny set
of tests/conftest.py, which tests/test_reference_scores.py compares bit for bit.

The file was written by the code before the fit schedule was merged into one driver (issue 16), so
the test shows that VANILLA GREEDY/NONE and ONLINE NONE score exactly as they did. Rerun only when a
change of these figures is intended:

    PYTHONPATH=. python tests/make_reference_scores.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import make_tiny_set, tiny_model  # noqa: E402  (conftest also fixes the thread count)

# (name, configuration) pairs; the first three are the bit-for-bit set.
CONFIGS = {
    "VANILLA-GREEDY": dict(algorithm="VANILLA", aggregation="GREEDY"),
    "VANILLA-NONE": dict(algorithm="VANILLA", aggregation="NONE"),
    "ONLINE-NONE": dict(algorithm="ONLINE", aggregation="NONE"),
    "VANILLA-GREEDY-PCA-MAHALANOBIS": dict(algorithm="VANILLA", aggregation="GREEDY", feature_reduction="PCA",
                                           distance="MAHALANOBIS"),
    "ONLINE-NONE-PCA-MAHALANOBIS": dict(algorithm="ONLINE", aggregation="NONE", feature_reduction="PCA",
                                        distance="MAHALANOBIS"),
}
FILE = HERE / "data" / "reference_scores.json"


def scores() -> dict[str, list[float]]:
    train, test, _ = make_tiny_set()
    return {name: [float(s) for s in tiny_model(**cfg).fit(train).predict(test)[0]] for name, cfg in CONFIGS.items()}


if __name__ == "__main__":
    FILE.parent.mkdir(exist_ok=True)
    FILE.write_text(json.dumps(scores(), indent=1) + "\n")  # repr of a float round-trips exactly
    print(f"wrote {FILE}")
