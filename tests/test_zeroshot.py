"""zeroshot.py: the local multiple-choice task is deterministic and well formed; lm-eval runs on it."""

import json

import pytest

import data
import zeroshot


def test_the_task_is_deterministic_and_is_the_committed_file():
    a, b = zeroshot.build_items(), zeroshot.build_items()
    assert a == b and len(a) == zeroshot.N_ITEMS
    for it in a[:50]:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4 and 0 <= it["label"] < 4
        assert it["context"].endswith("\n") and it["context"].count("\n") == zeroshot.CONTEXT_LINES
    labels = [it["label"] for it in a]
    assert all(labels.count(k) > 0.15 * len(a) for k in range(4))  # the answer's position is shuffled
    committed = [json.loads(line) for line in open(zeroshot.ITEMS)]
    assert committed == a  # built from the shipped corpus: the same items on every interpreter


@pytest.mark.skipif(not zeroshot.HAVE_LM_EVAL, reason="lm-eval is an optional extra (pip install -r requirements-eval.txt)")
def test_lm_eval_runs_on_the_embedded_model():
    r = zeroshot.evaluate(data.SHIPPED_MODEL, limit=20)
    assert 0.25 < r["acc"] <= 1.0  # far above chance on the model's own kind of text
