"""How routed tokens reach the rank that owns their experts, and come back.

A dispatcher turns (activations, routing) into the routed-expert sum for the tokens this
rank is responsible for. In one process that is a direct call; the parallel runtime plugs
in all-reduce and all-to-all dispatchers behind the same call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from llama_mpi.moe.experts import Experts


class Dispatcher(ABC):
    #: True when the call returns the whole routed sum on this rank (one process): the layer
    #: then adds it to the residual directly and reduces only the shared experts' part; False
    #: when it is this rank's partial sum, reduced once with the shared part by the layer.
    complete: bool = True

    @abstractmethod
    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 experts: Experts) -> torch.Tensor:
        """The routed-expert sum ``[T, E]`` (float32) for the batch ``x`` routed to global
        expert ``ids`` with ``weights`` (both ``[T, k]``), as far as this rank computes it."""


class LocalDispatcher(Dispatcher):
    """Every expert lives in this process."""

    complete = True

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 experts: Experts) -> torch.Tensor:
        return experts(x, ids, weights)
