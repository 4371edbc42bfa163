"""The named layout changes a mapping row can ask for, torch layout -> Keras layout."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda array: array,
    "dense_kernel": lambda array: array.T,  # out, in -> in, out
    "conv_kernel": lambda array: array.transpose(2, 3, 1, 0),  # O, I, H, W -> H, W, I, O
}
