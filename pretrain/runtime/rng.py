"""The random number generators of one rank: seeded, forked per model replica, saved and restored.

Every rank builds the model from the same seed (identical initial weights), then reseeds by its
data-parallel rank before training, so dropout masks (and anything else drawn in the loop) differ
between model replicas, as they do between the samples a replica sees, while the ranks of one
tensor- or sequence-parallel group, which hold the same activations, draw the same masks. A
checkpoint saves the host generators and the accelerator's (on a GPU, the CUDA generator of the
rank's device) per rank, so a resume on the same layout draws what the uninterrupted run drew.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators (torch.manual_seed seeds every accelerator too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def replica_seed(seed: int, replica: int) -> int:
    """A seed for model replica ``replica`` (its data-parallel rank) of a run seeded with ``seed``:
    distinct for every (seed, replica) pair, unlike seed + replica, where replica 1 of seed 1
    would draw what replica 0 of seed 2 draws."""
    return int(np.random.SeedSequence([seed, replica]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def seed_replica(seed: int, replica: int) -> None:
    seed_everything(replica_seed(seed, replica))


def _accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def generator_states() -> dict[str, torch.Tensor]:
    """torch's host generator and the accelerator's (the host's own where the accelerator is the CPU)."""
    return {"torch": torch.get_rng_state(), "accelerator": _accelerator().get_rng_state()}


def set_generator_states(state: dict[str, torch.Tensor]) -> None:
    if "accelerator" in state:
        _accelerator().set_rng_state(state["accelerator"])
    torch.set_rng_state(state["torch"])  # last: on a CPU the two are one generator


def capture_rng() -> dict:
    np_state = np.random.get_state()
    return {
        **generator_states(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype("int64")),
        "numpy_pos": int(np_state[2]),
    }


def restore_rng(state: dict) -> None:
    set_generator_states(state)
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype("uint32"), state["numpy_pos"], 0, 0.0))
