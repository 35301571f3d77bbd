"""It learns real data on a CPU: the digits demo's samples are recognised as their class, and
its figures are the same on every run (at one torch thread count, on one machine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfflow.train import demo


@pytest.mark.slow
def test_selfflow_samples_of_each_digit_are_recognised_far_above_chance(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo runs: tiny matmuls, a busy 2-core machine
    try:
        images, labels = demo.write_digits(tmp_path / "data")
        classifier = demo.fit_classifier(images, labels)
        rows = demo.run_method(
            "selfflow", tmp_path / "data", tmp_path, [600], classifier, demo.DemoSettings()
        )
    finally:
        torch.set_num_threads(threads)
    untrained, trained = rows[0]["accuracy"], rows[1]["accuracy"]
    # 200 samples, 20 per class; chance is 10 %
    assert trained >= 0.6, rows
    assert trained >= untrained + 0.3, rows


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return demo.write_digits(tmp_path_factory.mktemp("digits") / "data")


def test_the_classifier_does_not_depend_on_the_blas_thread_count(digits):
    # OpenBLAS starts as many threads as the machine has cores unless told otherwise; the
    # classifier that scores the demo must come out the same either way
    from threadpoolctl import threadpool_limits

    images, labels = digits
    fitted = []
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="blas"):
            fitted.append(demo.fit_classifier(images, labels))
    one, two = fitted
    assert np.array_equal(one.coef_, two.coef_) and np.array_equal(one.intercept_, two.intercept_)
    noise = np.random.default_rng(0).uniform(-1, 1, (2000, 1, 8, 8))  # untrained-like samples
    with threadpool_limits(2, user_api="blas"):
        assert np.array_equal(
            one.predict(noise.reshape(2000, -1)), two.predict(noise.reshape(2000, -1))
        )
    assert one.score(images.reshape(len(images), -1).astype(np.float64), labels) > 0.99


@pytest.mark.slow  # about 9 s of CPU: two short runs, each trained and scored twice
def test_two_runs_of_the_demo_give_the_same_figures(digits, tmp_path, monkeypatch):
    from threadpoolctl import threadpool_limits

    from selfflow.model.checkpoint import load_model
    from selfflow.train.state import export_path

    monkeypatch.setattr(demo, "SAMPLES_PER_CLASS", 3)  # a reduced size: seconds, not minutes
    monkeypatch.setattr(demo, "SAMPLER_STEPS", 10)
    images, labels = digits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the demo's default
    runs = []
    try:
        for blas_threads, folder in ((1, tmp_path / "a"), (2, tmp_path / "b")):
            with threadpool_limits(blas_threads, user_api="blas"):
                classifier = demo.fit_classifier(images, labels)
                demo.write_digits(folder / "data")
                rows = demo.run_method(
                    "selfflow", folder / "data", folder, [12], classifier, demo.DemoSettings()
                )
            weights = load_model(export_path(folder / "selfflow", 12)).state_dict()
            runs.append(([(row["step"], row["accuracy"]) for row in rows], weights))
    finally:
        torch.set_num_threads(threads)
    (scores_a, weights_a), (scores_b, weights_b) = runs
    assert scores_a == scores_b and [step for step, _ in scores_a] == [0, 12]
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a)
