"""RULER's metrics on real generated samples, checked against the package's own functions."""

from __future__ import annotations

import pytest

from vllm_defensive.evaluation import metrics

ruler_eval = pytest.importorskip("long_context_eval.eval.synthetic.constants")


def _predictions(sample):
    refs = sample.outputs
    return {
        "all": " ".join(refs),
        "all_upper_with_noise": "\x01 Answer: " + ", ".join(r.upper() for r in refs) + ". Done.\n",
        "first": refs[0],
        "none": "I do not know.",
        "empty": "",
        "none_value": None,
    }


def test_scores_match_the_package_on_real_samples(ruler_data):
    for samples in ruler_data.values():
        for s in samples:
            family = {"string_match_all": ruler_eval.string_match_all_per_sample,
                      "string_match_part": ruler_eval.string_match_part_per_sample}[s.metric]
            for name, pred in _predictions(s).items():
                ours = metrics.score(s.metric, pred, s.outputs)
                post = metrics.postprocess_pred(pred)
                theirs = family([post], [s.outputs])[0]
                assert ours == pytest.approx(theirs), (s.task, name)


def test_score_values_on_real_samples(ruler_data):
    vt = ruler_data[("vt", 2048)][0]
    assert len(vt.outputs) == 5 and vt.metric == "string_match_all"
    assert metrics.score(vt.metric, " ".join(vt.outputs), vt.outputs) == 100.0
    assert metrics.score(vt.metric, " ".join(vt.outputs[:2]), vt.outputs) == pytest.approx(40.0)
    assert metrics.score(vt.metric, vt.outputs[0].lower(), vt.outputs) == pytest.approx(20.0)
    niah = ruler_data[("niah_single_1", 2048)][0]
    assert metrics.score(niah.metric, f" {niah.outputs[0]}.", niah.outputs) == 100.0
    assert metrics.score(niah.metric, " 1234567.", niah.outputs) == 0.0


def test_string_match_part_is_any_reference():
    assert metrics.score("string_match_part", "It is in France.", ["France", "French Republic"]) == 100.0
    assert metrics.score("string_match_part", "Germany", ["France", "French Republic"]) == 0.0
    # string_match_all averages over the references instead
    assert metrics.score("string_match_all", "It is in France.", ["France", "French Republic"]) == 50.0


def test_postprocess_is_rulers():
    assert metrics.postprocess_pred("  a\tb\x00c \n") == "a\nb\nc"
    assert metrics.postprocess_pred(None) == ""


def test_bad_metric_inputs_fail_clearly():
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.score("exact_match", "x", ["x"])
    with pytest.raises(ValueError, match="at least one reference"):
        metrics.score("string_match_all", "x", [])
