"""Per-table weight holders (TorchRec's state-dict keys) and the collections' kernel builder."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Generic, Self, TypeVar

import torch
from torch import nn

from shardrec.kernels import FusedOptimizerConfig, KernelBackend, TableBatchedEmbedding
from shardrec.kernels.input_checks import BadBatchError, BatchChecker
from shardrec.modules._routing import KernelInput, Routing
from shardrec.modules.configs import BaseEmbeddingConfig
from shardrec.sparse import KeyedJaggedTensor

__all__ = ["FusedParams", "FusedTableCollection", "TableWeight", "build_lookup"]

FusedParams = Mapping[str, object] | FusedOptimizerConfig | None


class TableWeight(nn.Module):
    """One table's ``weight`` (``[num_embeddings, embedding_dim]``): a view into the fused storage.

    It stands where TorchRec has an ``nn.EmbeddingBag``/``nn.Embedding``, so the state-dict key is
    ``embedding_bags.<table>.weight`` / ``embeddings.<table>.weight``.
    """

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight
        self.num_embeddings = int(weight.shape[0])
        self.embedding_dim = int(weight.shape[1])

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        # The owning collection moves the fused storage and re-points this parameter.
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def build_lookup(
    tables: Sequence[BaseEmbeddingConfig],
    routing: Routing,
    *,
    pooled: bool,
    is_weighted: bool,
    fused_params: FusedParams,
    backend: KernelBackend | str | None,
    device: torch.device | str | None,
    check_inputs: bool = True,
) -> TableBatchedEmbedding:
    if isinstance(fused_params, FusedOptimizerConfig) or fused_params is None:
        optimizer = fused_params
    else:
        optimizer = FusedOptimizerConfig.from_fused_params(fused_params)
    specs, features = routing.kernel_specs(tables, pooled=pooled)
    lookup = TableBatchedEmbedding(
        tables=specs,
        features=features,
        pooled=pooled,
        is_weighted=is_weighted,
        optimizer=optimizer,
        backend=backend,
        device=device,
        check_inputs=check_inputs,
    )
    if lookup.device.type != "meta":
        lookup.reset_parameters(init_fns=init_fns(tables))
    return lookup


def init_fns(
    tables: Sequence[BaseEmbeddingConfig],
) -> dict[str, Callable[[torch.Tensor], object]]:
    return {t.name: t.init_fn for t in tables if t.init_fn is not None}


ConfigT = TypeVar("ConfigT", bound=BaseEmbeddingConfig)


class FusedTableCollection(nn.Module, Generic[ConfigT]):
    """What EmbeddingBagCollection and EmbeddingCollection share: checked configs, the routing of
    features to tables, and one fused kernel whose per-table weights are registered as
    ``<weights_attr>.<table>.weight`` (TorchRec's state-dict keys).
    """

    def __init__(
        self,
        tables: Sequence[ConfigT],
        config_type: type[ConfigT],
        *,
        kind: str,
        weights_attr: str,
        pooled: bool,
        is_weighted: bool,
        fused_params: FusedParams,
        backend: KernelBackend | str | None,
        device: torch.device | str | None,
        check_inputs: bool,
    ) -> None:
        super().__init__()
        self._configs: list[ConfigT] = list(tables)
        for config in self._configs:
            if not isinstance(config, config_type):
                raise TypeError(f"{kind} tables must be {config_type.__name__}, got {config!r}")
        if not isinstance(check_inputs, bool):
            raise TypeError(f"{kind}: check_inputs must be a bool, got {check_inputs!r}")
        self._routing = Routing(self._configs, kind=kind)
        rows = {c.name: c.num_embeddings for c in self._configs}
        self._checker = BatchChecker(
            kind,
            self._routing.sources,
            self._routing.tables_of_pairs,
            [rows[t] for t in self._routing.tables_of_pairs],
        )
        #: Whether forward checks each batch (lengths >= 0, ids inside their tables; the dtype is
        #: always checked). Sharded copies of this module (DistributedModelParallel) inherit it.
        self.check_inputs = check_inputs
        # The module checks the batch in its own terms (the user's feature, table and row), so
        # the kernel does not check it a second time.
        lookup = build_lookup(
            self._configs,
            self._routing,
            pooled=pooled,
            is_weighted=is_weighted,
            fused_params=fused_params,
            backend=backend,
            device=device,
            check_inputs=False,
        )
        # Not a registered submodule: the state dict is the per-table weights (TorchRec keys).
        self.__dict__["_lookup"] = lookup
        weights = nn.ModuleDict(
            {name: TableWeight(p) for name, p in lookup.named_table_parameters()}
        )
        setattr(self, weights_attr, weights)

    @property
    def lookup(self) -> TableBatchedEmbedding:
        """The fused kernel (its tables are this module's per-table weights)."""
        found: TableBatchedEmbedding = self.__dict__["_lookup"]
        return found

    @property
    def device(self) -> torch.device:
        return self.lookup.device

    def embedding_names(self) -> list[str]:
        """Output keys, in order (``feature`` or ``feature@table``)."""
        return list(self._routing.embedding_names)

    def embedding_names_by_table(self) -> list[list[str]]:
        return [list(names) for names in self._routing.names_by_table]

    def reset_parameters(self) -> None:
        """Initialise every table with its config's ``init_fn`` (materialising from meta on cpu)."""
        self.lookup.reset_parameters(init_fns=init_fns(self._configs))

    @property
    def batch_checker(self) -> BatchChecker:
        """The checks of :attr:`check_inputs`, over this module's (feature, table) pairs in
        output order; the sharders run them before they distribute a batch."""
        return self._checker

    def _route_checked(self, features: KeyedJaggedTensor, *, weighted: bool) -> KernelInput:
        """The batch in kernel order, checked (one host read when :attr:`check_inputs`)."""
        inp = self._routing.route(features, weighted=weighted)
        if inp.values.device.type == "meta":
            # Nothing to read: a meta batch only has shapes (the lookup then gives meta outputs).
            problem = self._checker.dtype_problem(inp.values)
        elif self.check_inputs:
            self._checker.check(inp.values, inp.lengths, inp.length_per_feature, inp.batch_size)
            return inp
        else:
            problem = self._checker.dtype_problem(inp.values)
        if problem is not None:
            raise BadBatchError(problem)
        return inp

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        self.lookup._apply(fn)
        return self
