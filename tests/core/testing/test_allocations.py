"""``record_allocations`` records the new storages torch ops make, and nothing that reuses memory
that was there already."""

from __future__ import annotations

import pytest
import torch

from shardrec.testing import Allocation, record_allocations

N = 1000
BYTES = N * 4


def test_records_a_clone_and_a_factory_op_with_what_they_made() -> None:
    x = torch.arange(N, dtype=torch.float32)
    with record_allocations(BYTES) as made:
        y = x.clone()
        z = torch.zeros(N, 2, dtype=torch.int64)
    assert made == [
        Allocation("aten.clone.default", (N,), torch.float32, torch.device("cpu"), BYTES,
                   y.untyped_storage().data_ptr()),
        Allocation("aten.zeros.default", (N, 2), torch.int64, torch.device("cpu"), 2 * N * 8,
                   z.untyped_storage().data_ptr()),
    ]  # fmt: skip


def test_a_copy_made_by_contiguous_is_recorded() -> None:
    x = torch.zeros(N // 10, 10)
    with record_allocations(BYTES) as made:
        x.contiguous()  # already contiguous: itself
        x.t().contiguous()
    assert [(a.op, a.shape) for a in made] == [("aten.clone.default", (10, N // 10))]


def test_views_in_place_ops_and_storage_slices_are_not_allocations() -> None:
    x = torch.zeros(2 * N)
    with record_allocations(BYTES) as made:
        x[N:].view(10, N // 10).t()
        x.add_(1)
        torch.mul(x, 2, out=x)
        x.resize_(N)  # shrinks into its own memory
        storage = x.untyped_storage()[BYTES // 2 : BYTES // 2 + BYTES]  # another data_ptr
        on_slice = torch.empty(0).set_(storage, 0, (N,), (1,))
        on_slice.view(N // 10, 10).mul_(3)
    assert made == []


def test_only_storages_of_at_least_min_bytes_off_meta_are_recorded() -> None:
    with record_allocations(BYTES) as made:
        torch.ones(N - 1)
        torch.ones(N, device="meta")
        torch.ones(N)
    assert [a.shape for a in made] == [(N,)]
    grown = torch.empty(0)
    with record_allocations(BYTES) as made:
        grown.resize_(N)  # new memory for an existing tensor
    assert [a.op for a in made] == ["aten.resize_.default"]


def test_contexts_nest_and_each_records_by_its_own_size() -> None:
    with record_allocations(BYTES) as outer:
        torch.ones(N)
        with record_allocations(4 * BYTES) as inner:
            torch.ones(N)
            torch.ones(4 * N)
        torch.ones(2 * N)
    assert [a.shape for a in inner] == [(4 * N,)]
    assert [a.shape for a in outer] == [(N,), (N,), (4 * N,), (2 * N,)]


def test_a_negative_size_is_refused() -> None:
    with pytest.raises(ValueError, match="min_bytes must be >= 0, got -1"), record_allocations(-1):
        pass
