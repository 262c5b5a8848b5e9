"""Token batches: left padding, the layout every sampler and trainer here uses."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np


def pad_left(rows: Sequence[Sequence[int]], pad_id: int, length: Optional[int] = None
             ) -> Tuple[np.ndarray, np.ndarray]:
    """tokens, mask [n, length] int32 (length default: the longest row); rows longer than
    `length` keep their last `length` tokens, shorter ones are padded on the left."""
    length = max(len(r) for r in rows) if length is None else length
    toks = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        r = list(r)[-length:] if length else []
        if r:
            toks[i, length - len(r):] = r
            mask[i, length - len(r):] = 1
    return toks, mask
