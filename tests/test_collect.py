"""Contribution sampling: the distribution, its edge cases, and the scores."""

from __future__ import annotations

import numpy as np
import torch

from gig.collect import contribution_scores, sample_positions


def test_single_draws_follow_the_scores():
    scores = np.array([0.0, 1.0, 2.0, 0.0, 5.0, 2.0])
    p = scores / scores.sum()
    draws = 8000
    counts = np.zeros_like(scores)
    for i in range(draws):
        counts[sample_positions(scores, 1, np.random.default_rng([7, i]))] += 1
    freq = counts / draws
    # 5 binomial standard errors.
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / draws) + 1e-12)
    assert counts[0] == 0 and counts[3] == 0


def test_draws_are_distinct_and_seeded():
    scores = np.random.default_rng(0).random(49)
    a = sample_positions(scores, 10, np.random.default_rng([1, 2, 3]))
    b = sample_positions(scores, 10, np.random.default_rng([1, 2, 3]))
    assert len(set(a.tolist())) == 10
    np.testing.assert_array_equal(a, b)


def test_all_zero_scores_fall_back_to_uniform():
    counts = np.zeros(4)
    for i in range(4000):
        counts[sample_positions(np.zeros(4), 1, np.random.default_rng(i))] += 1
    assert np.all(np.abs(counts / 4000 - 0.25) < 0.04)


def test_fewer_positive_positions_than_draws_takes_them_all():
    scores = np.array([0, 0, 3.0, 0, 0])
    picks = sample_positions(scores, 3, np.random.default_rng(0))
    assert 2 in picks and len(set(picks.tolist())) == 3


def test_contribution_score_is_clipped_gradient_times_activation():
    x = torch.tensor([[[[1.0, -2.0]], [[3.0, 1.0]]]])  # (1, C=2, H=1, W=2)
    g = torch.tensor([[[[2.0, 1.0]], [[-1.0, -1.0]]]])
    s = contribution_scores({"l": x}, {"l": g})["l"]
    # position 0: 1·2 + 3·(−1) = −1 → 0; position 1: −2·1 + 1·(−1) = −3 → 0
    torch.testing.assert_close(s, torch.tensor([[0.0, 0.0]]))
    s2 = contribution_scores({"l": x}, {"l": -g})["l"]
    torch.testing.assert_close(s2, torch.tensor([[1.0, 3.0]]))


def test_nan_activations_are_a_clear_error(tmp_path):
    """A layer producing NaN stops collect with the layer and image named, not a clustering
    library's error several stages later."""
    import pytest

    from gig.config import Config
    from gig.pipeline import Pipeline

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x):
            h = self.body(x)
            return self.head((h / (h - h)).mean((2, 3)))  # 0/0 after the analysed layer

    from gig.models import wrap_module

    pipe = Pipeline(
        Config(layers=["body"], max_images=2, samples_per_image=2),
        tmp_path / "r",
        model=wrap_module(Broken(), "broken", input_size=32),
        progress=False,
    )
    with pytest.raises(ValueError, match="non-finite .* in logits .*embedded"):
        pipe.collect()


def test_dead_layer_is_a_clear_error(tmp_path):
    """A layer that is zero everywhere stops collect by name instead of yielding empty concepts."""
    import pytest

    from gig.config import Config
    from gig.models import wrap_module
    from gig.pipeline import Pipeline

    class DeadBranch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU())
            self.dead = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
            self.head = torch.nn.Linear(8, 4)
            with torch.no_grad():
                self.dead[0].bias.fill_(-100.0)  # ReLU(-100 + small) = 0 for any image

        def forward(self, x):
            s = self.stem(x)
            return self.head(self.dead(s).mean((2, 3)) + s.mean((2, 3)))

    pipe = Pipeline(
        Config(layers=["stem", "dead"], max_images=3, samples_per_image=4),
        tmp_path / "r",
        model=wrap_module(DeadBranch(), "deadbranch", input_size=32),
        progress=False,
    )
    assert pipe.store.config.model == "deadbranch"  # the run names the model it analysed
    with pytest.raises(ValueError, match="layer 'dead' is zero at every sampled position"):
        pipe.collect()


def test_loader_workers_give_the_same_batches(tmp_path, lite0):
    """Decoding in 2 DataLoader processes: same images, same order, same pixels, and the broken
    file skipped and recorded as without workers."""
    import warnings
    from types import SimpleNamespace

    from PIL import Image

    from gig.collect import iter_image_batches
    from gig.images import open_source

    for i in range(5):
        Image.new("RGB", (50 + 10 * i, 40), (30 * i, 100, 200)).save(tmp_path / f"p{i}.png")
    (tmp_path / "p2b.png").write_bytes(b"not a png")
    handle = SimpleNamespace(bundle=lite0)
    results = []
    for workers in (0, 2):
        source = open_source(tmp_path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = list(iter_image_batches(source, source.records, handle, batch_size=2, workers=workers))
        results.append((batches, list(source.skipped), [str(w.message) for w in caught]))
    (plain, skipped0, warned0), (loaded, skipped2, warned2) = results
    assert [r.path for b in plain for r in b.records] == [r.path for b in loaded for r in b.records]
    assert len([r for b in plain for r in b.records]) == 5
    for a, b in zip(plain, loaded):
        assert torch.equal(a.pixels, b.pixels)
    assert skipped0 == skipped2 and len(skipped0) == 1 and skipped0[0][0].endswith("p2b.png")
    assert any("p2b.png" in w for w in warned2)


def _tiny_classifier(classes: int = 4):
    from gig.models import wrap_module

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.head = torch.nn.Linear(4, classes)

        def forward(self, x):
            return self.head(self.body(x).mean((2, 3)))

    return wrap_module(Tiny(), "tiny", input_size=32)


def test_labels_outside_the_models_classes_are_refused_before_any_image_is_read(tmp_path, monkeypatch):
    """``target: label`` with a CSV label of 5000 or -1 (issue 25): one line naming the file list
    and the rows, before compute (it used to be an IndexError from inside the model's batch)."""
    import pytest
    from PIL import Image

    from gig.config import Config
    from gig.errors import InputError
    from gig.images import CsvSource
    from gig.pipeline import Pipeline

    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / name)
    csv = tmp_path / "list.csv"
    csv.write_text("file,class_index\na.png,2\nb.png,5000\nc.png,-1\n")
    reads = []
    monkeypatch.setattr(CsvSource, "load", lambda self, record: reads.append(record) or Image.new("RGB", (32, 32)))
    with pytest.raises(InputError) as info:  # when the run is opened, before any stage
        Pipeline(
            Config(layers=["body"], images=str(csv), target="label", samples_per_image=2),
            tmp_path / "r",
            model=_tiny_classifier(),
            progress=False,
        )
    message = str(info.value)
    assert "2 label(s)" in message and str(csv) in message and "b.png: 5000" in message and "c.png: -1" in message
    assert "0 to 3" in message and "\n" not in message and reads == []


def test_no_readable_image_is_one_line_naming_the_source(tmp_path):
    """A file list whose images all fail to load: one line with the count and an example (it used
    to be a FileNotFoundError on an internal ``.done.tmp`` file)."""
    import pytest

    from gig.config import Config
    from gig.errors import InputError
    from gig.pipeline import Pipeline

    csv = tmp_path / "list.csv"
    csv.write_text("file\nmissing1.jpg\nmissing2.jpg\n")
    pipe = Pipeline(
        Config(layers=["body"], images=str(csv), samples_per_image=2),
        tmp_path / "r",
        model=_tiny_classifier(),
        progress=False,
    )
    with pytest.raises(InputError, match=r"none of the 2 images of .*list\.csv could be read, e\.g\. .*missing1\.jpg"):
        pipe.collect()
