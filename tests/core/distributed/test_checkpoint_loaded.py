"""``state_loaded()``: a checkpoint load writes into a model's state in place, then tells every
module that keeps something derived from its state (:class:`StateLoaded`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shardrec.distributed.checkpoint import (
    StateLoaded,
    load,
    load_sharded_state_dict,
    save,
    sharded_state_dict,
)


class _Cached(nn.Module):
    """Keeps a copy of its buffer (and of its peer's, if any) outside its state, refreshed when
    told of a load."""

    value: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("value", torch.zeros(3))
        self.peers: list[_Cached] = []  # a plain list: not a submodule
        self.seen: list[list[float]] = []

    def state_loaded(self) -> None:
        self.seen.append([float(m.value.sum()) for m in (self, *self.peers)])


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = _Cached()
        self.linear = nn.Linear(2, 2)
        self.second = _Cached()
        self.first.peers.append(self.second)


def test_every_module_that_asks_is_told_once_after_all_values_are_in(tmp_path: Path) -> None:
    saved = _Model()
    saved.first.value.fill_(1.0)
    saved.second.value.fill_(2.0)
    save(tmp_path, saved, step=3)
    model = _Model()
    assert isinstance(model.first, StateLoaded)
    assert not isinstance(model.linear, StateLoaded)
    assert load(tmp_path, model) == 3
    # Told once each, after every value was in: the first module, told first, saw the second's
    # value already loaded.
    assert model.first.seen == [[3.0, 6.0]]
    assert model.second.seen == [[6.0]]
    assert torch.equal(model.linear.weight, saved.linear.weight)
    # The in-memory load (DistributedModelParallel.load_state_dict's) tells them too.
    saved.second.value.fill_(4.0)
    load_sharded_state_dict(model, sharded_state_dict(saved))
    assert model.first.seen[-1] == [3.0, 12.0]
    assert model.second.seen == [[6.0], [12.0]]
