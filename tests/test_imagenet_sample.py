"""Checks on the shared 800-photo ImageNet sample; skipped cleanly when it is absent."""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED_SAMPLE


@pytest.mark.skipif(not (SHARED_SAMPLE / "labels.csv").is_file(), reason="no ../shared/data/imagenet-sample")
def test_lite0_preprocessing_gives_imagenet_accuracy(lite0):
    from gig.images import CsvSource

    source = CsvSource(SHARED_SAMPLE / "labels.csv")
    records = source.records[::50]  # 16 photos spread over the classes
    x = torch.stack([lite0.preprocess(img) for _, img in source.iter_loaded(records)])
    with torch.no_grad():
        pred = lite0.model(x).argmax(1)
    labels = torch.tensor([r.label for r in records])
    # The model scores about 86 % top-1 on this sample; 16 photos leave room for chance.
    assert float((pred == labels).float().mean()) >= 0.6
