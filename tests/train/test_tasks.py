import json
import random

import pytest

from renio_kernels.train.tasks import (
    TrainStream,
    eval_pool,
    extract_answer,
    is_correct,
    load_jsonl,
    synthetic_problem,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("58+27=85\n85-31=54\n#### 54", "54"),
        ("#### 1,234", "1234"),
        ("so the answer is \\boxed{42}.", "42"),
        ("first 3 then 4.0", "4"),
        ("#### -7", "-7"),
        ("12=12\n#### 5 and later 9", "5"),  # the marked answer wins over a later number
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct():
    assert is_correct("10+5=15\n#### 15", "15")
    assert is_correct("#### 15.0", "15")
    assert not is_correct("10+5=16\n#### 16", "15")
    # no marked answer: the last number counts (GSM8K-style checkers do the same)
    assert is_correct("10+5=15\n####", "15")
    assert not is_correct("10+5=15\n15-3=12\n####", "15")
    assert not is_correct("", "15")


def test_synthetic_solutions_are_right():
    rng = random.Random(0)
    for _ in range(200):
        p = synthetic_problem(rng)
        assert int(p["answer"]) == eval(p["problem"])  # plain + and - chains
        assert is_correct(p["solution"], p["answer"])
        for line in p["solution"].splitlines()[:-1]:
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs) >= 0


def test_training_stream_is_deterministic_and_holds_out_eval():
    a, b = TrainStream(3), TrainStream(3)
    assert [a[i] for i in range(50)] == [b[i] for i in reversed(range(50))][::-1]
    held = {p["problem"] for p in eval_pool()}
    assert not any(a[i]["problem"] in held for i in range(500))
    records = [{"problem": str(i), "solution": "", "answer": str(i)} for i in range(7)]
    s = TrainStream(0, records)
    epoch = sorted(int(s[i]["problem"]) for i in range(7))
    assert epoch == list(range(7))


def test_jsonl_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: pass --data"):
        load_jsonl(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "solution": "2", "answer": "2"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_jsonl(bad)
    bad.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"missing key\(s\) \['solution'\]"):
        load_jsonl(bad)
    bad.write_text("\n\n")
    with pytest.raises(ValueError, match="holds no records"):
        load_jsonl(bad)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"problem": "1+1", "solution": "#### 2", "answer": 2}) + "\n")
    assert load_jsonl(good) == [{"problem": "1+1", "solution": "#### 2", "answer": "2"}]
