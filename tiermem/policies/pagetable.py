"""A sorted page table with float columns, updated with vectorised upserts (policy state)."""
from __future__ import annotations

import numpy as np


class PageTable:
    """Sorted unique uint64 page keys plus named float64 columns (default value per column)."""

    def __init__(self, **defaults: float):
        self.keys = np.empty(0, np.uint64)
        self.defaults = defaults
        self.cols = {c: np.empty(0, np.float64) for c in defaults}

    def __len__(self) -> int:
        return int(self.keys.size)

    def upsert(self, keys: np.ndarray) -> np.ndarray:
        """Insert missing keys (unique, any order) with column defaults; return their rows."""
        keys = np.asarray(keys, dtype=np.uint64)
        pos = np.searchsorted(self.keys, keys)
        known = pos < self.keys.size
        known[known] = self.keys[pos[known]] == keys[known]
        if not known.all():
            new = np.unique(keys[~known])
            allk = np.concatenate([self.keys, new])
            order = np.argsort(allk, kind="stable")
            self.keys = allk[order]
            for c, a in self.cols.items():
                self.cols[c] = np.concatenate([a, np.full(new.size, self.defaults[c])])[order]
            pos = np.searchsorted(self.keys, keys)
        return pos

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, known) for the given keys; rows of unknown keys are meaningless."""
        keys = np.asarray(keys, dtype=np.uint64)
        pos = np.searchsorted(self.keys, keys)
        known = pos < self.keys.size
        known[known] = self.keys[pos[known]] == keys[known]
        return np.minimum(pos, max(self.keys.size - 1, 0)), known

    def get(self, keys: np.ndarray, col: str) -> np.ndarray:
        rows, known = self.find(keys)
        out = np.full(np.shape(keys), self.defaults[col], dtype=np.float64)
        if self.keys.size:
            out[known] = self.cols[col][rows[known]]
        return out

    def keep(self, mask: np.ndarray) -> None:
        """Drop the rows where mask is False."""
        self.keys = self.keys[mask]
        for c in self.cols:
            self.cols[c] = self.cols[c][mask]
