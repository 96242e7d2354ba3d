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

from collections.abc import Callable, Sequence
from typing import Self

import torch
from torch import nn

from shardrec.kernels import KernelBackend, TableBatchedEmbedding
from shardrec.modules._routing import Routing
from shardrec.modules._tables import FusedParams, TableWeight, build_lookup, init_fns
from shardrec.modules.configs import EmbeddingBagConfig
from shardrec.sparse import KeyedJaggedTensor, KeyedTensor

__all__ = ["EmbeddingBagCollection"]


class EmbeddingBagCollection(nn.Module):
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

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: torch.device | str | None = None,
        *,
        fused_params: FusedParams = None,
        backend: KernelBackend | str | None = None,
    ) -> None:
        super().__init__()
        self._configs = list(tables)
        for config in self._configs:
            if not isinstance(config, EmbeddingBagConfig):
                raise TypeError(
                    f"EmbeddingBagCollection tables must be EmbeddingBagConfig, got {config!r}"
                )
        self._is_weighted = is_weighted
        self._routing = Routing(self._configs, kind="EmbeddingBagCollection")
        lookup = build_lookup(
            self._configs,
            self._routing,
            pooled=True,
            is_weighted=is_weighted,
            fused_params=fused_params,
            backend=backend,
            device=device,
        )
        # Not a registered submodule: the state dict is the per-table weights below (TorchRec keys).
        self.__dict__["_lookup"] = lookup
        self.embedding_bags = nn.ModuleDict(
            {name: TableWeight(p) for name, p in lookup.named_table_parameters()}
        )
        self._dims = [c.embedding_dim for c in self._configs for _ in c.feature_names]

    @property
    def lookup(self) -> TableBatchedEmbedding:
        """The fused kernel (its tables are this module's ``embedding_bags``)."""
        found: TableBatchedEmbedding = self.__dict__["_lookup"]
        return found

    @property
    def device(self) -> torch.device:
        return self.lookup.device

    def is_weighted(self) -> bool:
        return self._is_weighted

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return list(self._configs)

    def embedding_names(self) -> list[str]:
        """Output keys, in order (``feature`` or ``feature@table``)."""
        return list(self._routing.embedding_names)

    def embedding_names_by_table(self) -> list[list[str]]:
        return [list(names) for names in self._routing.names_by_table]

    def reset_parameters(self) -> None:
        """Initialise every table with its config's ``init_fn`` (materialising from meta on cpu)."""
        self.lookup.reset_parameters(init_fns=init_fns(self._configs))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        self.lookup._apply(fn)
        return self

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
