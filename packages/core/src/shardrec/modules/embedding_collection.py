"""``EmbeddingCollection``: unpooled (sequence) embeddings of several tables, one fused kernel.

Parameters live as in :mod:`shardrec.modules.embedding_bag_collection`: views into the kernel's
fused storage, registered at ``embeddings.<table>.weight``. Unlike TorchRec, tables of different
dims may share one collection, and any dim >= 1 works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from shardrec.kernels import KernelBackend
from shardrec.modules._tables import FusedParams, FusedTableCollection
from shardrec.modules.configs import EmbeddingConfig
from shardrec.sparse import JaggedTensor, KeyedJaggedTensor
from shardrec.sparse.variable_batch import pad_to_max_stride

__all__ = ["EmbeddingCollection"]


class EmbeddingCollection(FusedTableCollection[EmbeddingConfig]):
    """Sequence embeddings for a KJT: ``forward(KJT) -> dict[str, JaggedTensor]``.

    ::

        tables   t0 (dim 4, feature f0)    t1 (dim 3, feature f1)
        input    KJT f0: [[1, 2], []]   f1: [[5], [6, 7]]
        output   {"f0": JT(values [2, 4], lengths [2, 0]), "f1": JT(values [3, 3], lengths [1, 2])}

    Each output JaggedTensor has the feature's lengths and one row per id; with
    ``need_indices=True`` its weights hold the ids (TorchRec's convention). A feature read by
    several tables is named ``feature@table``. ``fused_params``, ``backend``, ``device="meta"`` and
    ``check_inputs`` behave as in
    :class:`~shardrec.modules.embedding_bag_collection.EmbeddingBagCollection` (a forward on meta
    tables needs the KJT's ``length_per_key`` for the output shapes).
    """

    embeddings: nn.ModuleDict

    def __init__(
        self,
        tables: Sequence[EmbeddingConfig],
        device: torch.device | str | None = None,
        need_indices: bool = False,
        *,
        fused_params: FusedParams = None,
        backend: KernelBackend | str | None = None,
        check_inputs: bool = True,
    ) -> None:
        super().__init__(
            tables,
            EmbeddingConfig,
            kind="EmbeddingCollection",
            weights_attr="embeddings",
            pooled=False,
            is_weighted=False,
            fused_params=fused_params,
            backend=backend,
            device=device,
            check_inputs=check_inputs,
        )
        self._need_indices = need_indices

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

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        if features.variable_stride_per_key():
            # Each feature's rows are its own samples (TorchRec's): look up the ids once, then
            # drop the empty samples that padding added.
            strides = dict(zip(features.keys(), features.stride_per_key(), strict=True))
            padded = self.forward(pad_to_max_stride(features))
            return {
                name: _first_rows(jt, strides[source])
                for (name, jt), source in zip(padded.items(), self._routing.sources, strict=True)
            }
        inp = self._route_checked(features, weighted=False)
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
                # TorchRec's convention: the ids ride in the weights slot.
                ids = inp.values[starts[i] : starts[i + 1]]
                out[name] = JaggedTensor(values=values, weights=ids, lengths=lengths)
            else:
                out[name] = JaggedTensor(values=values, lengths=lengths)
        return out


def _first_rows(jt: JaggedTensor, rows: int) -> JaggedTensor:
    """``jt`` without its trailing rows past ``rows`` (empty ones: they hold no values)."""
    return JaggedTensor(
        values=jt.values(), weights=jt.weights_or_none(), lengths=jt.lengths()[:rows]
    )
