"""What `--compare-hard-labels/--no-compare-hard-labels` does over a recipe, the same for `train distill`
and `quantize distill` (both merge through `train.distill.distill_config`); both commands' tests run it."""

from __future__ import annotations

COMPARE_HARD_LABELS_CASES: list[tuple[dict[str, bool] | None, list[str], bool]] = [
    # (recipe settings, or None for no --config; the flags given; compare_hard_labels of the run)
    (None, [], False),  # neither says: DistillConfig's documented default
    (None, ["--compare-hard-labels"], True),
    ({"compare_hard_labels": False}, ["--compare-hard-labels"], True),
    ({"compare_hard_labels": True}, ["--no-compare-hard-labels"], False),
    ({"compare_hard_labels": True}, [], True),
    ({"compare_hard_labels": False}, [], False),
]
