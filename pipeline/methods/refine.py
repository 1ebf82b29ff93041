"""k-nearest-neighbour refinement of target pseudo-labels over cached teacher features (beyond the papers).

Each target image's neighbours are found once with faiss (inner product on L2-normalised teacher image
features, the image itself included). A bank holds the latest teacher probabilities of every target image;
the refined distribution of an image is the mean of its neighbours' bank rows, so a lone wrong prediction
inside a consistent neighbourhood is out-voted. Methods whose teacher changes during training (EKDA)
update the bank with each batch's fresh probabilities before voting.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.features.cache import build_index


class KnnRefiner:
    def __init__(self, keys: list[str], features: np.ndarray, probs: np.ndarray, *, k: int, device: str = "cpu"):
        if not len(keys) == len(features) == len(probs):
            raise ValueError(f"kNN refinement: {len(keys)} keys, {len(features)} feature rows and {len(probs)} "
                             f"probability rows must match")
        if k < 1:
            raise ValueError(f"distill.refine_knn must be >= 1 to refine, got {k}")
        self.row = {key: i for i, key in enumerate(keys)}
        k = min(k, len(keys))
        index, _ = build_index(np.ascontiguousarray(features, dtype=np.float32), device=device)
        _, neighbours = index.search(np.ascontiguousarray(features, dtype=np.float32), k)
        self.neighbours = torch.from_numpy(neighbours.astype(np.int64))
        self.bank = torch.from_numpy(np.asarray(probs, dtype=np.float32)).clone()

    def rows(self, keys: list[str]) -> torch.Tensor:
        try:
            return torch.tensor([self.row[k] for k in keys])
        except KeyError as exc:
            raise KeyError(f"kNN refinement: no cached teacher feature for target sample {exc.args[0]!r}") from None

    def __call__(self, keys: list[str], probs: torch.Tensor | None = None) -> torch.Tensor:
        """Refined probabilities [B, C] of ``keys``; ``probs`` (fresh teacher probabilities) update the bank first."""
        rows = self.rows(keys)
        if probs is not None:
            self.bank[rows] = probs.detach().float().cpu()
        return self.bank[self.neighbours[rows]].mean(1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The bank (the only thing that changes): a resumed run continues with the latest probabilities."""
        return {"bank": self.bank.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.bank.copy_(state["bank"])

    def refine_all(self) -> np.ndarray:
        """Refined probabilities of every row (bank order)."""
        return self.bank[self.neighbours].mean(1).numpy()
