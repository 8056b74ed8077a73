"""RULER's scoring, as `long_context_eval/eval/` defines it (copied so scoring needs no package).

`postprocess_pred` is `eval/evaluate.py`'s; the metrics are `eval/synthetic/constants.py`'s
per-sample functions, on RULER's 0-100 scale:

* string_match_all: the fraction of the references found (case-insensitively, as substrings) in
  the prediction (niah, vt, cwe, fwe);
* string_match_part: 100 if any reference is found, else 0 (qa).

A task's score is the mean of its samples' scores; a run's score is the mean of its task scores
(RULER's "average"). tests/evaluation checks these copies against the package's functions.
"""

from __future__ import annotations

import re

_NON_PRINTABLE = re.compile(r"[\x00-\x1f]")


def postprocess_pred(text: str | None) -> str:
    if text is None:
        return ""
    text = text.strip()
    return _NON_PRINTABLE.sub("\n", text).strip()


def string_match_all(pred: str, refs: list[str]) -> float:
    p = pred.lower()
    return sum(1.0 if r.lower() in p else 0.0 for r in refs) / len(refs) * 100


def string_match_part(pred: str, refs: list[str]) -> float:
    p = pred.lower()
    return max(1.0 if r.lower() in p else 0.0 for r in refs) * 100


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def score(metric: str, prediction: str | None, references: list[str]) -> float:
    """One sample's RULER score (0-100) of a raw completion."""
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}") from None
    if not references:
        raise ValueError("a sample needs at least one reference answer")
    return fn(postprocess_pred(prediction), [str(r) for r in references])
