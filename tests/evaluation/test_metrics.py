"""OOD metrics against scikit-learn and hand-computed examples."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from lightning_ood.evaluation.metrics import OODMetrics, ood_metrics

TOL = 1e-6
NAN, INF = float("nan"), float("inf")


def sklearn_metrics(
    id_scores: torch.Tensor, ood_scores: torch.Tensor, fpr95_positive: str
) -> dict[str, float]:
    """The same four metrics computed independently with scikit-learn (float64)."""
    scores = np.concatenate([id_scores.double().numpy(), ood_scores.double().numpy()])
    is_ood = np.concatenate([np.zeros(len(id_scores)), np.ones(len(ood_scores))])
    if fpr95_positive == "ood":
        fpr, tpr, _ = roc_curve(is_ood, -scores, drop_intermediate=False)
    else:
        fpr, tpr, _ = roc_curve(1 - is_ood, scores, drop_intermediate=False)
    return {
        "auroc": roc_auc_score(1 - is_ood, scores),
        "fpr95": fpr[np.argmax(tpr >= 0.95)],
        "aupr_in": average_precision_score(1 - is_ood, scores),
        "aupr_out": average_precision_score(is_ood, -scores),
    }


def assert_close(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) == {"auroc", "fpr95", "aupr_in", "aupr_out"}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=TOL), key


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


CASES = {
    "gaussian": lambda g: (torch.randn(500, generator=g) + 1.0, torch.randn(700, generator=g)),
    # Energies far above 17 (sigmoid saturates) next to values in [0, 1]: a sigmoid would tie them.
    "large_energies_mixed": lambda g: (
        torch.cat([150 + 30 * torch.randn(300, generator=g), torch.rand(100, generator=g)]),
        torch.cat([120 + 30 * torch.randn(300, generator=g), torch.rand(200, generator=g)]),
    ),
    "large_negative_float32": lambda g: (
        -1000 + torch.randn(400, generator=g), -1001 + torch.randn(400, generator=g)
    ),
    "heavy_ties": lambda g: (
        torch.randint(2, 8, (400,), generator=g).float(),
        torch.randint(0, 6, (600,), generator=g).float(),
    ),
    "integer_dtype": lambda g: (
        torch.randint(2, 8, (50,), generator=g),
        torch.randint(0, 6, (70,), generator=g),
    ),
    "one_vs_one_correct": lambda g: (torch.tensor([2.0]), torch.tensor([1.0])),
    "one_vs_one_reversed": lambda g: (torch.tensor([1.0]), torch.tensor([2.0])),
    "one_vs_one_tie": lambda g: (torch.tensor([1.0]), torch.tensor([1.0])),
    "two_vs_three": lambda g: (torch.tensor([0.3, 5.0]), torch.tensor([0.1, 0.3, 7.0])),
    "separated": lambda g: (10 + torch.rand(50, generator=g), torch.rand(80, generator=g)),
    "reversed": lambda g: (torch.rand(50, generator=g), 10 + torch.rand(80, generator=g)),
    "all_tied": lambda g: (torch.full((5,), 3.0), torch.full((9,), 3.0)),
}


@pytest.mark.parametrize("fpr95_positive", ["ood", "id"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_sklearn(case: str, fpr95_positive: str) -> None:
    id_scores, ood_scores = CASES[case](_gen())
    got = ood_metrics(id_scores, ood_scores, fpr95_positive=fpr95_positive)
    assert_close(got, sklearn_metrics(id_scores, ood_scores, fpr95_positive))
    assert all(0.0 <= v <= 1.0 for v in got.values())


def test_auroc_is_symmetric_in_the_positive_class() -> None:
    id_scores, ood_scores = CASES["heavy_ties"](_gen())
    scores = torch.cat([id_scores, ood_scores]).numpy()
    is_ood = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    got = ood_metrics(id_scores, ood_scores)["auroc"]
    assert got == pytest.approx(roc_auc_score(is_ood, -scores), abs=TOL)


def test_separated_and_reversed_extremes() -> None:
    assert_close(
        ood_metrics(torch.tensor([5.0, 6.0]), torch.tensor([1.0, 2.0, 3.0])),
        {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0},
    )
    reversed_ = ood_metrics(
        torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0, 7.0]), fpr95_positive="id"
    )
    assert reversed_["auroc"] == 0.0
    assert reversed_["fpr95"] == 1.0


# Hand-computed 4-vs-4 example (higher score = ID), one ID/OOD tie at 2:
#   ID  = [5, 4, 2, -2]      OOD = [3, 2, 0, -1]
# AUROC: pairs with ID above OOD: 5 -> 4, 4 -> 4, 2 -> 2 + 1/2 (tie), -2 -> 0; 10.5 / 16 = 0.65625.
# FPR95, OOD positive: 95% of 4 OOD means all 4, so flag "OOD" for score <= 3 (the top OOD
#   score); ID flagged at that threshold: {2, -2} -> 2/4 = 0.5.
# FPR95, ID positive: keep all 4 ID, accept score >= -2 (the lowest ID score); OOD accepted:
#   all of {3, 2, 0, -1} -> 4/4 = 1.0.
# AUPR-In (ID positive, descending score; precision at each distinct threshold where recall grows):
#   5: P=1 R=1/4; 4: P=1 R=2/4; 3: no gain; 2: TP 3 of 5 -> P=3/5 R=3/4; 0, -1: no gain;
#   -2: TP 4 of 8 -> P=1/2 R=1.  AP = (1 + 1 + 3/5 + 1/2) / 4 = 0.775.
# AUPR-Out (OOD positive, ascending score): -2: TP 0; -1: P=1/2 R=1/4; 0: P=2/3 R=2/4;
#   2: TP 3 of 5 -> P=3/5 R=3/4; 3: TP 4 of 6 -> P=2/3 R=1.
#   AP = (1/2 + 2/3 + 3/5 + 2/3) / 4 = 73/120.
HAND_ID = torch.tensor([5.0, 4.0, 2.0, -2.0])
HAND_OOD = torch.tensor([3.0, 2.0, 0.0, -1.0])
HAND_COMMON = {"auroc": 0.65625, "aupr_in": 0.775, "aupr_out": 73 / 120}


@pytest.mark.parametrize(("fpr95_positive", "fpr95"), [("ood", 0.5), ("id", 1.0)])
def test_hand_computed_four_vs_four(fpr95_positive: str, fpr95: float) -> None:
    got = ood_metrics(HAND_ID, HAND_OOD, fpr95_positive=fpr95_positive)
    assert_close(got, {**HAND_COMMON, "fpr95": fpr95})


def test_fpr95_takes_first_threshold_reaching_95_percent() -> None:
    """20 OOD, 3 ID; the three top OOD each tie with one ID (scores 1, 2, 3).

    Catching 19 of 20 OOD (95%) needs threshold score <= 2, which flags ID {1, 2}: FPR 2/3.
    scikit-learn's default drop_intermediate=True (OpenOOD's call) drops that collinear
    point and reports 1.0; we report the exact 2/3.
    """
    id_scores = torch.tensor([1.0, 2.0, 3.0])
    ood_scores = torch.cat([torch.arange(-20.0, -3.0), torch.tensor([1.0, 2.0, 3.0])])
    assert ood_metrics(id_scores, ood_scores)["fpr95"] == pytest.approx(2 / 3, abs=TOL)
    scores = torch.cat([id_scores, ood_scores]).numpy()
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(3), np.ones(20)], -scores)
    assert fpr[np.argmax(tpr >= 0.95)] == 1.0


def test_fpr95_with_95_percent_below_the_whole_set() -> None:
    # 20 OOD at 0..19 (0 = most OOD-like), 1 ID at 18.5: TPR 19/20 reached at score <= 18,
    # before the ID sample is flagged -> FPR 0 (OOD positive).
    ood_scores = torch.arange(20.0)
    assert ood_metrics(torch.tensor([18.5]), ood_scores)["fpr95"] == 0.0
    assert ood_metrics(torch.tensor([17.5]), ood_scores)["fpr95"] == 1.0


def test_metric_class_equals_function() -> None:
    g = _gen()
    id_scores, ood_scores = CASES["large_energies_mixed"](g)
    scores = torch.cat([id_scores, ood_scores])
    is_ood = torch.cat([torch.zeros(len(id_scores)), torch.ones(len(ood_scores))]).bool()
    order = torch.randperm(len(scores), generator=g)
    scores, is_ood = scores[order], is_ood[order]
    for fpr95_positive in ("ood", "id"):
        metric = OODMetrics(fpr95_positive=fpr95_positive)
        for batch_scores, batch_is_ood in zip(scores.split(97), is_ood.split(97)):
            metric.update(batch_scores, batch_is_ood)
        assert_close(metric.compute(), ood_metrics(id_scores, ood_scores, fpr95_positive))


def test_metric_class_accepts_int_labels_and_resets() -> None:
    metric = OODMetrics()
    metric.update(HAND_ID, torch.zeros(4, dtype=torch.long))
    metric.update(HAND_OOD, torch.ones(4, dtype=torch.long))
    assert_close(metric.compute(), {**HAND_COMMON, "fpr95": 0.5})
    metric.reset()
    metric.update(torch.tensor([2.0, 1.0]), torch.tensor([0, 1]))
    assert metric.compute()["auroc"] == 1.0


@pytest.mark.parametrize(
    ("id_scores", "ood_scores", "match"),
    [
        (torch.tensor([]), torch.tensor([1.0]), "id_scores is empty"),
        (torch.tensor([1.0]), torch.tensor([]), "ood_scores is empty"),
        (torch.ones(2, 2), torch.tensor([1.0]), r"id_scores must be 1-D.*\(2, 2\)"),
        (torch.tensor([1.0]), torch.tensor(1.0), r"ood_scores must be 1-D.*\(\)"),
        (torch.tensor([1.0, NAN, NAN]), torch.tensor([1.0]), "id_scores holds 2 NaN and 0 inf"),
        (torch.tensor([1.0]), torch.tensor([INF, -INF, 0.0]), "ood_scores holds 0 NaN and 2 inf"),
    ],
)
def test_invalid_scores_raise(
    id_scores: torch.Tensor, ood_scores: torch.Tensor, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        ood_metrics(id_scores, ood_scores)


def test_unknown_fpr95_positive_raises() -> None:
    with pytest.raises(ValueError, match="fpr95_positive"):
        ood_metrics(HAND_ID, HAND_OOD, fpr95_positive="in")
    with pytest.raises(ValueError, match="fpr95_positive"):
        OODMetrics(fpr95_positive="OOD")


def test_metric_class_rejects_bad_batches() -> None:
    metric = OODMetrics()
    with pytest.raises(ValueError, match="equal length"):
        metric.update(torch.ones(3), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="0/1"):
        metric.update(torch.ones(2), torch.tensor([0, 2]))
    metric.update(torch.tensor([1.0, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="ood_scores holds 1 NaN"):
        metric.compute()
