import itertools
import random

from renio_kernels.train.metrics import auroc


def brute_auroc(scores, positive):
    pairs = [
        (s, t)
        for (s, p), (t, q) in itertools.product(zip(scores, positive, strict=True), repeat=2)
        if p and not q
    ]
    return sum(1.0 if s > t else 0.5 if s == t else 0.0 for s, t in pairs) / len(pairs)


def test_auroc_matches_pair_count_with_ties():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 30)
        scores = [float(rng.randint(0, 5)) for _ in range(n)]  # many ties
        positive = [rng.random() < 0.4 for _ in range(n)]
        if all(positive) or not any(positive):
            continue
        assert abs(auroc(scores, positive) - brute_auroc(scores, positive)) < 1e-12


def test_auroc_edges():
    assert auroc([1.0, 2.0, 3.0], [False, False, True]) == 1.0
    assert auroc([3.0, 2.0, 1.0], [False, False, True]) == 0.0
    assert auroc([1.0, 1.0], [True, False]) == 0.5
    assert auroc([1.0, 2.0], [True, True]) is None
    assert auroc([], []) is None
