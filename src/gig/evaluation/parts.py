"""The evaluation's resumable chunk loop, written once for both protocols.

Images are processed in chunks; each finished chunk is saved as ``parts/NAME_INDEX.json`` with
the image ids it covers, and a later call reuses a part whose ids are the same (the folder is
emptied by the runner whenever the :meth:`~gig.evaluation.settings.EvaluationPlan.key` changes).

Why not the run store's shards (``RunStore.shard_done`` / ``mark_shard``, as collect, decompose
and attribute use): the evaluation is not a stage of the run (no manifest entry, no stage hash;
its folder may lie outside the run, e.g. ``--out`` for an ablation), its parts are JSON records
of curves rather than tensors, and their validity rests on the evaluation's own settings key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..store import load_json, save_json


def chunked(items: Sequence[dict], size: int) -> list[list[dict]]:
    """``items`` in consecutive chunks of ``size``."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def resumable_parts(
    folder: Path,
    name: str,
    infos: Sequence[dict],
    size: int,
    compute: Callable[[list[dict]], dict],
    reused: Callable[[list[dict]], None],
) -> list[dict]:
    """``compute(chunk) → part`` for every chunk of ``size`` image records ``infos`` (dicts with
    ``image_id``), each saved as ``folder/NAME_IIII.json``; a saved part whose ``image_id`` list
    matches its chunk is loaded instead, and ``reused(chunk)`` called (progress accounting)."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for index, chunk in enumerate(chunked(infos, size)):
        path = folder / f"{name}_{index:04d}.json"
        if path.is_file():
            part = load_json(path)
            if part["image_id"] == [i["image_id"] for i in chunk]:
                parts.append(part)
                reused(chunk)
                continue
        part = compute(chunk)
        save_json(path, part)
        parts.append(part)
    return parts
