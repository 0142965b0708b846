"""Test inputs shared by the attention test files."""

import numpy as np


def packed_documents(rng: np.random.Generator, rows: int, length: int, documents: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and positions [rows, length] of `documents` packed documents of random
    lengths per row; each document's positions restart at 0."""
    segment_ids, positions = [], []
    for _ in range(rows):
        ends = np.r_[np.sort(rng.choice(np.arange(1, length), documents - 1, replace=False)),
                     length]
        lengths = np.diff(np.r_[0, ends])
        segment_ids.append(np.repeat(np.arange(documents), lengths))
        positions.append(np.concatenate([np.arange(n) for n in lengths]))
    return np.stack(segment_ids), np.stack(positions)
