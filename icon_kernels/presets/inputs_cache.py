"""A one-entry cache of a target computed from an inputs tensor (calibrated sigma, a kNN graph).

Full-batch training passes the same inputs tensor every step; recomputing its target each time
would cost many passes over the data. The entry is reused only for the *same* tensor object
(held by a weak reference, so a new batch at a recycled address never hits), unmodified since
(its version counter), with the same settings. Copies (deepcopy, pickling) start empty.
"""
from __future__ import annotations

import weakref

import torch


class InputsCache:
    def __init__(self):
        self._clear()

    def _clear(self):
        self._ref, self._version, self._key, self._value = None, None, None, None

    def get(self, inputs: torch.Tensor, key):
        if (self._ref is not None and self._ref() is inputs and inputs._version == self._version
                and key == self._key):
            return self._value
        return None

    def put(self, inputs: torch.Tensor, key, value):
        self._ref, self._version, self._key, self._value = weakref.ref(inputs), inputs._version, key, value
        return value

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._clear()
