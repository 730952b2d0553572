"""How the ranks of a run divide into tensor-, sequence- and data-parallel groups.

Interface (other modules rely on it; keep it stable):

    layout = ParallelLayout.from_deepspeed(ds_config, world=W, rank=R, sp=None)
        ds_config: the DeepSpeed dict (raw or resolved); TP size from ``tensor_parallel.autotp_size``
                   (0 or absent = 1); SP size from the ``sp`` argument when given, else the config's
                   ``sequence_parallel_size`` (absent = 1).
    layout.world, layout.rank, layout.tp, layout.sp     as given
    layout.model_parallel = tp * sp                     ranks that share one micro-batch
    layout.dp            = world // (tp * sp)           the data-parallel size
    layout.tp_rank, layout.sp_rank, layout.dp_rank      this rank's coordinates
    layout.problems()    -> list[str]                   sizes that do not divide the world ([] = fine)
    layout.tp_crosses_nodes(local_world) -> bool        a TP group would span machines
    layout.describe()    -> str                         "TP 2 x SP 1 x DP 2 (4 ranks)" for the log
    tensor_parallel_size(ds), sequence_parallel_size(ds) -> int   the sizes a config asks for

Rank order is DeepSpeed's: TP innermost, then SP, then DP, i.e.
``rank = (dp_rank * sp + sp_rank) * tp + tp_rank`` (deepspeed.utils.groups builds its TP mesh as
(data_parallel, tensor_parallel) and its Ulysses mesh as (data_parallel, sequence_parallel), both
row-major). So TP groups are consecutive ranks, which keeps them inside one node when the launcher
fills nodes in order.

Why it matters outside DeepSpeed: every rank of a TP group (and of an SP group) must see the same
micro-batch, so the data loader splits the data by ``dp_rank`` over ``dp`` readers only, and the
DeepSpeed batch arithmetic is ``train_batch_size = micro * gas * dp``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _positive_int(value: Any, key: str, off: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value == 0 and off is None):
        raise ValueError(f"{key}: must be a positive integer (got {value!r})")
    return off if value == 0 else value


def tensor_parallel_size(ds: dict) -> int:
    """``tensor_parallel.autotp_size`` (DeepSpeed reads 0 or absent as off, i.e. 1)."""
    section = ds.get("tensor_parallel")
    if section is None:
        return 1
    if not isinstance(section, dict):
        raise ValueError(f'tensor_parallel: must be an object such as {{"autotp_size": 2}} (got {section!r})')
    return _positive_int(section.get("autotp_size", 0), "tensor_parallel.autotp_size", off=1)


def sequence_parallel_size(ds: dict) -> int:
    return _positive_int(ds.get("sequence_parallel_size", 1), "sequence_parallel_size")


@dataclass(frozen=True)
class ParallelLayout:
    world: int
    rank: int = 0
    tp: int = 1
    sp: int = 1

    @classmethod
    def from_deepspeed(cls, ds: dict, world: int, rank: int = 0, sp: int | None = None) -> ParallelLayout:
        return cls(
            world=world, rank=rank, tp=tensor_parallel_size(ds), sp=sequence_parallel_size(ds) if sp is None else sp
        )

    @property
    def model_parallel(self) -> int:
        return self.tp * self.sp

    @property
    def dp(self) -> int:
        return max(1, self.world // self.model_parallel)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def sp_rank(self) -> int:
        return (self.rank // self.tp) % self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.model_parallel

    def problems(self) -> list[str]:
        if self.world % self.model_parallel:
            what = " x ".join(
                f"{name} {n}"
                for name, n in (("tensor_parallel.autotp_size", self.tp), ("sequence parallel size", self.sp))
                if n > 1
            )
            return [f"{what} does not divide the world size {self.world}"]
        return []

    def tp_crosses_nodes(self, local_world: int) -> bool:
        """Whether a TP group spans machines (``local_world`` ranks per node, filled in rank
        order): then every layer's all-reduces cross the network, which is slow. TP belongs inside
        a node, DP across nodes."""
        return self.tp > 1 and local_world % self.tp != 0

    def describe(self) -> str:
        return f"TP {self.tp} x SP {self.sp} x DP {self.dp} ({self.world} ranks)"
