"""Train the linear probe of ``probe-head.yaml``: a 2-output head "animal" / "thing" on
EfficientNet-Lite0's pooled features (the 1280 inputs of its classifier ``_fc``).

    python docs/examples/train_probe.py [--images embedded] [--out docs/examples/probe.safetensors]
    gig run --config docs/examples/probe-head.yaml --out runs/probe

Each photo's label is "animal" when its ImageNet class is one of the 398 animal classes (indices
0–397), else "thing": the CSV's label where the image list has one, else the model's own top-1
(the embedded photos have no labels). The probe is scikit-learn's logistic regression on the
standardised features, folded back into one ``weight (2, 1280)`` and ``bias (2,)`` on the raw
features, saved with its output names in the file's metadata (what ``head:`` reads,
:func:`gig.models.read_head`). Any other probe works the same way: a ``.safetensors`` file with
``weight (outputs, features)``, ``bias (outputs,)`` and optionally ``names`` (a JSON list).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression

from gig.images import open_source
from gig.models import load_model

ANIMALS = 398  # ImageNet-1k classes 0–397 are animals
NAMES = ["animal", "thing"]


def pooled_features(images: str, model: str = "efficientnet-lite0") -> tuple[np.ndarray, np.ndarray]:
    """``(features (N, 1280), labels (N,))``: the classifier's inputs and 0 = animal, 1 = thing."""
    bundle = load_model(model)
    source = open_source(images, class_index=bundle.class_index)
    seen: list[torch.Tensor] = []
    hook = bundle.model._fc.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].detach()))
    labels = []
    with torch.no_grad():
        for record in source.records:
            logits = bundle.model(bundle.preprocess(source.load(record))[None])
            index = record.label if record.label is not None else int(logits.argmax(1))
            labels.append(0 if index < ANIMALS else 1)
    hook.remove()
    return torch.cat(seen).numpy(), np.array(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default="embedded")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("probe.safetensors"))
    args = parser.parse_args()
    X, y = pooled_features(args.images)
    if len(set(y.tolist())) < 2:
        raise SystemExit(f"the photos of {args.images} are all {NAMES[y[0]]}: a probe needs both kinds")
    mean, std = X.mean(0), X.std(0) + 1e-6
    clf = LogisticRegression(C=0.1, max_iter=5000).fit((X - mean) / std, y)
    # Binary logistic regression gives one logit for class 1 ("thing"); as two outputs: ±logit/2.
    w = clf.coef_[0] / std
    b = clf.intercept_[0] - float((clf.coef_[0] * mean / std).sum())
    weight = torch.tensor(np.stack([-w / 2, w / 2]), dtype=torch.float32)
    bias = torch.tensor([-b / 2, b / 2], dtype=torch.float32)
    save_file({"weight": weight, "bias": bias}, str(args.out), metadata={"names": json.dumps(NAMES)})
    accuracy = float((clf.predict((X - mean) / std) == y).mean())
    print(f"{args.out}: {len(y)} photos ({int((y == 0).sum())} animal), training accuracy {accuracy:.2f}")


if __name__ == "__main__":
    main()
