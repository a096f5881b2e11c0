"""Expert-parallel dispatchers: routed experts split in contiguous blocks across ranks.

Every rank runs the same tokens through attention (heads split by TP), so each holds the
whole batch when the MoE starts. Both dispatchers return a *partial* routed sum that the
layer adds to its shared-expert partial and all-reduces once:

* all-reduce (the original Ascend server's form): every rank routes every token and runs
  its own experts on the tokens that chose them;
* all-to-all: each rank takes a contiguous share of the tokens, sends each (token, expert)
  pair only to the rank owning that expert, gets the expert outputs back, combines them with
  the routing weights, and contributes just its share's rows.
"""

from __future__ import annotations

import torch

from llama_mpi.moe.dispatcher import Dispatcher, LocalDispatcher
from llama_mpi.moe.experts import Experts
from llama_mpi.parallel.communicator import Communicator


class AllReduceDispatcher(LocalDispatcher):
    """The local call on this rank's experts (slots of other ranks' experts contribute
    nothing), as a partial sum for the layer's one all-reduce."""

    complete = False


class AllToAllDispatcher(Dispatcher):
    complete = False

    def __init__(self, comm: Communicator, num_experts: int) -> None:
        self.comm = comm
        self.per_rank = num_experts // comm.world_size

    def token_share(self, n_tokens: int) -> tuple[int, int]:
        """This rank's contiguous share of the batch's tokens (uneven sizes allowed)."""
        n, r = self.comm.world_size, self.comm.rank
        base, extra = divmod(n_tokens, n)
        lo = r * base + min(r, extra)
        return lo, lo + base + (1 if r < extra else 0)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 experts: Experts) -> torch.Tensor:
        comm, k = self.comm, ids.shape[1]
        lo, hi = self.token_share(x.shape[0])
        pair_expert = ids[lo:hi].flatten()
        dest = pair_expert // self.per_rank
        order = torch.argsort(dest, stable=True)  # group pairs by destination rank
        send_counts = torch.bincount(dest, minlength=comm.world_size).tolist()
        pair_token = order // k  # row in this rank's share
        send_x = x[lo:hi][pair_token]
        recv_x, recv_counts = comm.all_to_all(send_x, send_counts)
        # the same counts again, and then in reverse: no further exchange of counts
        recv_ids, _ = comm.all_to_all(pair_expert[order].to(torch.int32).unsqueeze(1),
                                      send_counts, recv_counts)
        ones = torch.ones(recv_x.shape[0], 1, dtype=torch.float32, device=x.device)
        y = experts(recv_x, recv_ids.long(), ones)  # one output row per received pair
        back, _ = comm.all_to_all(y.to(x.dtype), recv_counts, send_counts)  # in send order
        back = back.float() * weights[lo:hi].flatten()[order, None]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        out[lo:hi].index_add_(0, pair_token, back)
        return out


def make_dispatcher(mode: str, comm: Communicator, num_experts: int) -> Dispatcher:
    if comm.world_size == 1:
        return LocalDispatcher()
    if mode == "allreduce":
        return AllReduceDispatcher()
    if mode == "alltoall":
        return AllToAllDispatcher(comm, num_experts)
    raise ValueError(f"moe_comm must be 'alltoall' or 'allreduce', not {mode!r}")
