"""``EmbeddingBagCollection``: pooled embeddings of several tables, looked up by one fused kernel.

Where the parameters live (measured, see ``docs/benchmarks.md``): the fused kernel owns one storage
per group of tables, and each table's ``weight`` is an ``nn.Parameter`` that is a view into it,
registered at ``embedding_bags.<table>.weight``. The alternative, per-table parameters concatenated
for each fused call, copies every table on every forward: for the Criteo benchmark's 1.43 GB of
tables that ``torch.cat`` took 2.4-3.2 s here, against about 27 ms for the whole fused forward.
With views, ``state_dict``/``load_state_dict`` use TorchRec's keys and read/write the fused storage
in place, so an unsharded TorchRec checkpoint loads as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from shardrec.kernels import KernelBackend
from shardrec.modules._tables import FusedParams, FusedTableCollection
from shardrec.modules.configs import EmbeddingBagConfig
from shardrec.sparse import KeyedJaggedTensor, KeyedTensor

__all__ = ["EmbeddingBagCollection"]


class EmbeddingBagCollection(FusedTableCollection[EmbeddingBagConfig]):
    """Pooled embeddings for a KJT: ``forward(KJT) -> KeyedTensor`` of ``[B, sum of dims]``.

    ::

        tables   t0 (dim 4, features f0, f1)   t1 (dim 2, feature f1)
        input    KJT with keys f0, f1 (any order), B samples
        output   KeyedTensor keys [f0, f1@t0, f1@t1], values [B, 4 + 4 + 2]

    Keys are in table order; a feature read by several tables is named ``feature@table``.
    ``is_weighted=True`` multiplies each id's row by the KJT's weight before pooling (``MEAN`` then
    divides by the bag length). Empty bags give zeros.

    Beyond TorchRec: ``fused_params`` (``{"optimizer": "sgd"|"exact_adagrad"|"rowwise_adagrad"|
    "adam", "learning_rate": ..., "eps": ..., "beta1": ..., "beta2": ...}`` or a
    :class:`~shardrec.kernels.FusedOptimizerConfig`) fuses the optimizer into backward; the default
    ``None`` leaves ``.grad`` on the tables for a torch optimizer, as ``nn.EmbeddingBag`` does.
    ``backend`` picks the kernel (``"torch"``, ``"fbgemm"``, ``"auto"``; default
    ``$SHARDREC_KERNEL_BACKEND`` or auto).

    ``device="meta"`` allocates nothing; ``reset_parameters()`` then materialises on cpu (or use
    ``to_empty(device=...)`` followed by ``reset_parameters()``).
    """

    embedding_bags: nn.ModuleDict

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: torch.device | str | None = None,
        *,
        fused_params: FusedParams = None,
        backend: KernelBackend | str | None = None,
    ) -> None:
        super().__init__(
            tables,
            EmbeddingBagConfig,
            kind="EmbeddingBagCollection",
            weights_attr="embedding_bags",
            pooled=True,
            is_weighted=is_weighted,
            fused_params=fused_params,
            backend=backend,
            device=device,
        )
        self._is_weighted = is_weighted
        self._dims = [c.embedding_dim for c in self._configs for _ in c.feature_names]

    def is_weighted(self) -> bool:
        return self._is_weighted

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return list(self._configs)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        inp = self._routing.route(features, weighted=self._is_weighted)
        pooled = self.lookup.lookup(
            values=inp.values,
            offsets=inp.offsets,
            length_per_feature=inp.length_per_feature,
            batch_size=inp.batch_size,
            weights=inp.weights,
        )
        assert isinstance(pooled, torch.Tensor)
        return KeyedTensor(
            keys=self._routing.embedding_names, length_per_key=self._dims, values=pooled
        )
