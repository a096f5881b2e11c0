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
    #: True when ``combine`` already returns the complete routed sum on this rank, so the
    #: caller must not all-reduce it again (all-to-all); False when it is a partial sum.
    complete: bool = True

    @abstractmethod
    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 experts: Experts) -> torch.Tensor: ...


class LocalDispatcher(Dispatcher):
    """Every expert lives in this process."""

    complete = True

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 experts: Experts) -> torch.Tensor:
        return experts(x, ids, weights)
