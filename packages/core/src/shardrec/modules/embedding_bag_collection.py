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
from shardrec.kernels.input_checks import BadBatchError
from shardrec.modules._tables import FusedParams, FusedTableCollection
from shardrec.modules.configs import EmbeddingBagConfig
from shardrec.sparse import KeyedJaggedTensor, KeyedTensor
from shardrec.sparse.variable_batch import expand_pooled, pad_to_max_stride

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
    ``$SHARDREC_KERNEL_BACKEND`` or auto). ``auto`` takes FBGEMM where it can run the tables and is
    the faster kernel: on CPU the torch backend for exact Adagrad (and Adam, which FBGEMM's CPU
    kernel lacks), FBGEMM for SGD and row-wise Adagrad; on CUDA FBGEMM. Both give the same results.

    ``device="meta"`` (or ``device=None`` under ``with torch.device("meta"):``) allocates nothing;
    a forward then gives a meta output of the right shape, and ``reset_parameters()`` materialises
    on cpu (or use ``to_empty(device=...)`` followed by ``reset_parameters()``).

    Every forward checks its batch (``check_inputs=True``, the default): ids that are not integers,
    a negative length, or an id outside its table raise
    :class:`~shardrec.kernels.input_checks.BadBatchError` (a ValueError) naming the feature, the
    table, the id and its sample. The check costs one pass over the ids and one host read (see
    ``docs/benchmarks.md``); ``check_inputs=False`` (or setting the attribute) keeps only the
    dtype check, and a bad id is then undefined behaviour. Under DistributedModelParallel the
    sharded module inherits the setting, and a bad batch on any rank raises on every rank.
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
        check_inputs: bool = True,
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
            check_inputs=check_inputs,
        )
        self._is_weighted = is_weighted
        self._dims = [c.embedding_dim for c in self._configs for _ in c.feature_names]

    def is_weighted(self) -> bool:
        return self._is_weighted

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return list(self._configs)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if features.variable_stride_per_key() or features.inverse_indices_or_none() is not None:
            # Pool each key's unique samples once, then expand to the full batch through the
            # inverse indices (TorchRec's semantics for a variable batch per key).
            padded = pad_to_max_stride(features)
            unique = self._pool(padded).values()
            inverse = padded.inverse_indices_or_none()
            batch = padded.stride() if inverse is None else inverse[1].shape[1]
            values = (
                unique.new_empty(batch, unique.shape[1])
                if unique.device.type == "meta"
                else expand_pooled(unique, self._dims, self._routing.sources, padded)
            )
            return KeyedTensor(
                keys=self._routing.embedding_names, length_per_key=self._dims, values=values
            )
        return self._pool(features)

    def _pool(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self.lookup.device.type == "meta":
            # Tables on meta (a model being planned): the output's shape needs only the batch size.
            self._routing.check_keys(features, weighted=self._is_weighted)
            problem = self.batch_checker.dtype_problem(features.values())
            if problem is not None:
                raise BadBatchError(problem)
            values = torch.empty(features.stride(), sum(self._dims), device="meta")
            return KeyedTensor(
                keys=self._routing.embedding_names, length_per_key=self._dims, values=values
            )
        inp = self._route_checked(features, weighted=self._is_weighted)
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
