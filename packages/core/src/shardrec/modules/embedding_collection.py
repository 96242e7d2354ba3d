"""``EmbeddingCollection``: unpooled (sequence) embeddings of several tables, one fused kernel.

Parameters live as in :mod:`shardrec.modules.embedding_bag_collection`: views into the kernel's
fused storage, registered at ``embeddings.<table>.weight``. Unlike TorchRec, tables of different
dims may share one collection, and any dim >= 1 works.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Self

import torch
from torch import nn

from shardrec.kernels import KernelBackend, TableBatchedEmbedding
from shardrec.modules._routing import Routing
from shardrec.modules._tables import FusedParams, TableWeight, build_lookup, init_fns
from shardrec.modules.configs import EmbeddingConfig
from shardrec.sparse import JaggedTensor, KeyedJaggedTensor

__all__ = ["EmbeddingCollection"]


class EmbeddingCollection(nn.Module):
    """Sequence embeddings for a KJT: ``forward(KJT) -> dict[str, JaggedTensor]``.

    ::

        tables   t0 (dim 4, feature f0)    t1 (dim 3, feature f1)
        input    KJT f0: [[1, 2], []]   f1: [[5], [6, 7]]
        output   {"f0": JT(values [2, 4], lengths [2, 0]), "f1": JT(values [3, 3], lengths [1, 2])}

    Each output JaggedTensor has the feature's lengths and one row per id; with
    ``need_indices=True`` its weights hold the ids (TorchRec's convention). A feature read by
    several tables is named ``feature@table``. ``fused_params``, ``backend`` and ``device="meta"``
    behave as in :class:`~shardrec.modules.embedding_bag_collection.EmbeddingBagCollection`.
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingConfig],
        device: torch.device | str | None = None,
        need_indices: bool = False,
        *,
        fused_params: FusedParams = None,
        backend: KernelBackend | str | None = None,
    ) -> None:
        super().__init__()
        self._configs = list(tables)
        for config in self._configs:
            if not isinstance(config, EmbeddingConfig):
                raise TypeError(
                    f"EmbeddingCollection tables must be EmbeddingConfig, got {config!r}"
                )
        self._need_indices = need_indices
        self._routing = Routing(self._configs, kind="EmbeddingCollection")
        lookup = build_lookup(
            self._configs,
            self._routing,
            pooled=False,
            is_weighted=False,
            fused_params=fused_params,
            backend=backend,
            device=device,
        )
        self.__dict__["_lookup"] = lookup
        self.embeddings = nn.ModuleDict(
            {name: TableWeight(p) for name, p in lookup.named_table_parameters()}
        )

    @property
    def lookup(self) -> TableBatchedEmbedding:
        """The fused kernel (its tables are this module's ``embeddings``)."""
        found: TableBatchedEmbedding = self.__dict__["_lookup"]
        return found

    @property
    def device(self) -> torch.device:
        return self.lookup.device

    def need_indices(self) -> bool:
        return self._need_indices

    def embedding_configs(self) -> list[EmbeddingConfig]:
        return list(self._configs)

    def embedding_dim(self) -> int:
        """The dim shared by all tables (TorchRec's API); raises when the tables' dims differ."""
        dims = {c.embedding_dim for c in self._configs}
        if len(dims) != 1:
            raise ValueError(
                f"the tables of this EmbeddingCollection have several dims {sorted(dims)};"
                " use embedding_configs() for per-table dims"
            )
        return dims.pop()

    def embedding_names(self) -> list[str]:
        return list(self._routing.embedding_names)

    def embedding_names_by_table(self) -> list[list[str]]:
        return [list(names) for names in self._routing.names_by_table]

    def reset_parameters(self) -> None:
        """Initialise every table with its config's ``init_fn`` (materialising from meta on cpu)."""
        self.lookup.reset_parameters(init_fns=init_fns(self._configs))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        self.lookup._apply(fn)
        return self

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        inp = self._routing.route(features, weighted=False)
        rows = self.lookup.lookup(
            values=inp.values,
            offsets=inp.offsets,
            length_per_feature=inp.length_per_feature,
            batch_size=inp.batch_size,
        )
        assert isinstance(rows, list)
        out: dict[str, JaggedTensor] = {}
        batch = inp.batch_size
        starts = [0]
        for n in inp.length_per_feature:
            starts.append(starts[-1] + n)
        for i, (name, values) in enumerate(zip(self._routing.embedding_names, rows, strict=True)):
            lengths = inp.lengths[i * batch : (i + 1) * batch]
            if self._need_indices:
                # TorchRec's convention puts the int ids in the weights slot, which the public
                # JaggedTensor constructor rejects (weights must be floating point).
                ids = inp.values[starts[i] : starts[i + 1]]
                out[name] = JaggedTensor._trusted(values, ids, lengths, None)
            else:
                out[name] = JaggedTensor(values=values, lengths=lengths)
        return out
