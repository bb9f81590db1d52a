"""Two processes under torchrun (gloo, CPU) give the same run as one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gig.distributed import Ranks
from gig.store import load_json

_RUN = """
import sys
import gig.collect, gig.decompose
from gig.config import Config
from gig.pipeline import Pipeline

# 6 images: shards of 2 (3 per stage, dealt to the ranks), or of 8 (one, split by images)
gig.collect.SHARD_IMAGES = gig.decompose.SHARD_IMAGES = int(sys.argv[2])
Pipeline(Config(max_images=6, layers=["_blocks.11", "_blocks.15"], gig_tol=0.05, top_k=2, batch_size=2,
                samples_per_image=6, min_cluster=2, calibration_size=60), sys.argv[1], progress=False).run()
"""


def test_ranks_split_shards_round_robin():
    assert Ranks(0, 2).mine(list(range(5))) == [0, 2, 4] and Ranks(1, 2).mine(list(range(5))) == [1, 3]
    assert Ranks().mine([7, 8]) == [7, 8] and Ranks().share({"a": 1}) == {"a": 1}
    mine, total = Ranks(1, 2).shards(list(range(7)), 2)  # shards [0,1] [2,3] [4,5] [6]
    assert total == 4 and mine == [("00001", [2, 3]), ("00003", [6])]


def _launch(tmp_path, name: str, processes: int, shard: int = 2):
    script = tmp_path / "run.py"
    script.write_text(_RUN)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / name
    if processes == 1:
        command = [sys.executable, str(script), str(out), str(shard)]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            str(script),
            str(out),
            str(shard),
        ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _rounded(value, digits: int = 6):
    """``value`` (JSON) with every float rounded to ``digits`` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    one = _launch(tmp_path, "one", 1)
    two = _launch(tmp_path, "two", 2)
    files = sorted(p.relative_to(one) for p in one.rglob("*.safetensors"))
    assert any("attribute/shards" in str(f) for f in files) and len(files) >= 10
    assert files == sorted(p.relative_to(two) for p in two.rglob("*.safetensors"))
    for rel in files:
        a, b = load_file(str(one / rel)), load_file(str(two / rel))
        assert a.keys() == b.keys(), rel
        for key in a:
            assert torch.equal(a[key], b[key]), f"{rel}:{key}"
    for rel in [
        "collect/images.json",
        "concepts/_blocks.15.json",
        "graph/global.json",
        "decompose/front.json",
    ]:
        assert load_json(one / rel) == load_json(two / rel), rel
    # The KL over all images reads logits of the model with each layer replaced, from batches that
    # may round differently in the last bits on another rank; the codes above are equal bit for bit.
    assert _rounded(load_json(one / "decompose/fidelity.json")) == _rounded(load_json(two / "decompose/fidelity.json"))
    manifest = load_json(two / "manifest.json")
    assert all(
        manifest["stages"][s]["status"] == "done" for s in ("collect", "concepts", "decompose", "attribute", "graph")
    )


@pytest.mark.slow
def test_two_processes_split_a_run_smaller_than_one_shard_per_rank(tmp_path):
    """One shard for two ranks: the fronts are split by layer, the attribute shard by images, and
    the run equals one process's (the attributions up to float rounding of other batch sizes: a
    path's numbers do not depend on the other images of its batch)."""
    one = _launch(tmp_path, "one", 1, shard=8)
    two = _launch(tmp_path, "two", 2, shard=8)
    for rel in ["decompose/front.json", "collect/images.json"]:
        assert load_json(one / rel) == load_json(two / rel), rel
    assert _rounded(load_json(one / "decompose/fidelity.json")) == _rounded(load_json(two / "decompose/fidelity.json"))
    a = load_file(str(one / "attribute/shards/00000.safetensors"))
    b = load_file(str(two / "attribute/shards/00000.safetensors"))
    assert a.keys() == b.keys() and a["image_id"].tolist() == list(range(6))
    assert torch.equal(a["image_id"], b["image_id"])
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5, msg=key)
    manifest = load_json(two / "manifest.json")
    assert manifest["stages"]["attribute"]["status"] == "done"
