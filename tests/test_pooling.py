"""Slice pooling (umedpt.pooling): attention finds the one informative slice that mean pooling dilutes; bad input."""
import numpy as np
import pytest
import torch
from umedpt.core import ConfigError, InputError
from umedpt.pooling import AttentionPooling, BagClassifier, as_bags, fit_bag_classifier, predict_bags, score_bags


def _bags(n: int, seed: int, slices: int = 12, dim: int = 6, classes: int = 3):
    "Noise bags; one random slice per bag has a marker (feature 0) and its class c (feature 1 + c)."
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, slices, dim, generator=g), torch.randint(0, classes, (n,), generator=g)
    where = torch.randint(0, slices, (n,), generator=g)
    x[torch.arange(n), where, 0] += 4.0
    x[torch.arange(n), where, 1 + y] += 3.0
    return x, y, where


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return _bags(512, seed=0), _bags(192, seed=1)


def test_attention_beats_mean_and_peaks_on_the_informative_slice(data):
    (x, y, _), (xt, yt, where) = data
    fit = {p: fit_bag_classifier(x, y, pooling=p, hidden=16, epochs=30, lr=1e-2, device="cpu", seed=2)
           for p in ("attention", "mean")}
    acc = {p: score_bags(m, xt, yt)["accuracy"] for p, (m, _) in fit.items()}
    _, weights = predict_bags(fit["attention"][0], xt, return_attention=True)
    peak = np.mean([w.argmax() == k for w, k in zip(weights, where.tolist())])
    assert acc["attention"] > 0.9 and peak > 0.9, (acc, peak)
    assert acc["attention"] - acc["mean"] > 0.2, acc
    losses = fit["attention"][1]
    assert len(losses) == 30 * 16 and np.mean(losses[-16:]) < 0.5 * np.mean(losses[:16])


def test_variable_length_bags_and_padding_invariance(data):
    (x, y, _), _ = data
    ragged = [x[i, : 3 + i % 7] for i in range(48)]
    model, _ = fit_bag_classifier(ragged, y[:48], hidden=8, epochs=1, device="cpu")
    probs, weights = predict_bags(model, ragged, return_attention=True)
    assert probs.shape == (48, 3) and [len(w) for w in weights] == [3 + i % 7 for i in range(48)]
    alone = predict_bags(model, [ragged[0]])
    np.testing.assert_allclose(alone[0], probs[0], atol=1e-6)  # a bag's prediction ignores its neighbours' padding
    pool = AttentionPooling(6, hidden=4)
    assert pool(*as_bags(ragged[:2]))[1][0, 3:].abs().sum() == 0  # padding gets no weight


def test_seeded_training_is_reproducible(data):
    (x, y, _), _ = data
    a = fit_bag_classifier(x[:64], y[:64], hidden=8, epochs=2, device="cpu", seed=5)
    b = fit_bag_classifier(x[:64], y[:64], hidden=8, epochs=2, device="cpu", seed=5)
    assert a[1] == b[1]
    assert all(torch.equal(p, q) for p, q in zip(a[0].parameters(), b[0].parameters()))


@pytest.mark.parametrize("bags, labels, message", [
    (torch.zeros(4, 6), [0, 1, 0, 1], "bags: expected B×S×D"),
    (torch.zeros(2, 0, 6), [0, 1], "bags[0]: empty bag"),
    ([torch.ones(3, 6), torch.ones(0, 6)], [0, 1], "bags[1]: empty bag"),
    ([torch.ones(3, 6), torch.ones(3, 5)], [0, 1], "bags[1]: has 5 features"),
    ([torch.ones(3)], [0], "bags[0]: a bag must be S×D"),
    ([], [], "bags: no bags"),
    (torch.zeros(3, 2, 6), [0, 1], "labels: got 2 labels for 3 bags"),
    (torch.zeros(2, 2, 6), [[0], [1]], "labels: expected one class index per bag"),
    (torch.zeros(2, 2, 6), [0.0, 1.0], "labels: must be non-negative integer"),
    (torch.zeros(2, 2, 6), [0, -1], "labels: must be non-negative integer"),
])
def test_bad_input_names_the_parameter(bags, labels, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        fit_bag_classifier(bags, labels, device="cpu", epochs=1)


def test_bad_options():
    x = torch.zeros(4, 2, 6)
    with pytest.raises(ConfigError, match="pooling must be one of"): fit_bag_classifier(x, [0, 1, 0, 1], pooling="max")
    with pytest.raises(ConfigError, match="batch_size must be a positive"):
        fit_bag_classifier(x, [0, 1, 0, 1], batch_size=0)
    with pytest.raises(InputError, match="labels: 2 is not a class index below 2"):
        fit_bag_classifier(x, [0, 1, 2, 1], num_classes=2)
    with pytest.raises(ConfigError, match="num_classes must be at least 2"): BagClassifier(6, 1)
