"""An on-disk cache of retrained measurements, keyed by the training subset and a user key.

Each entry is one JSON file ``<sha256>.json`` holding the key, the subset's indices and the measured
values; nothing is pickled or executed on load. Entries are written to a temporary file and renamed,
so concurrent runs and a killed run never leave a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Union

from ..errors import InfluenceError


class RetrainCache:
    """Measurements of models retrained on subsets, stored under ``directory``.

    ``key`` names the training setup (model, recipe, seeds, queries): change it whenever anything that
    changes the retrained measurements changes, or stale results are reused.
    """

    def __init__(self, directory: Union[str, Path], key: str):
        if not isinstance(key, str) or not key:
            raise InfluenceError(
                "A retrain cache needs a non-empty cache_key naming the training setup (e.g. 'mlp-adam-300steps-v1'), "
                "so that results of another setup are never reused."
            )
        self.directory = Path(directory)
        self.key = key
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, indices: Sequence[int]) -> Path:
        text = json.dumps({"key": self.key, "indices": [int(i) for i in indices]})
        return self.directory / f"{hashlib.sha256(text.encode()).hexdigest()}.json"

    def get(self, indices: Sequence[int]) -> Optional[List[float]]:
        """The stored measurements of the subset ``indices``, or None."""
        path = self._path(indices)
        if not path.exists():
            return None
        entry = json.loads(path.read_text())
        if entry.get("key") != self.key or entry.get("indices") != [int(i) for i in indices]:
            raise InfluenceError(f"Retrain cache entry {path} does not belong to its key and subset; delete it.")
        return [float(v) for v in entry["measurements"]]

    def put(self, indices: Sequence[int], measurements: Sequence[float]) -> None:
        path = self._path(indices)
        entry = {"key": self.key, "indices": [int(i) for i in indices], "measurements": [float(v) for v in measurements]}
        handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            json.dump(entry, file)
        os.replace(temporary, path)

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("*.json"))
