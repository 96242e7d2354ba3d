"""KeyedTensor: the tutorial's pooled output shape, slicing by key, regroup."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardrec import KeyedTensor


def pooled() -> KeyedTensor:
    # What an EmbeddingBagCollection returns for a batch of 3: 4 + 2 columns.
    return KeyedTensor(
        keys=["product", "user"],
        length_per_key=[4, 2],
        values=torch.arange(18.0).reshape(3, 6),
    )


def test_accessors() -> None:
    kt = pooled()
    assert kt.keys() == ["product", "user"]
    assert kt.key_dim() == 1
    assert kt.length_per_key() == [4, 2]
    assert kt.offset_per_key() == [0, 4, 6]
    assert kt["user"].tolist() == [[4.0, 5.0], [10.0, 11.0], [16.0, 17.0]]
    as_dict = kt.to_dict()
    assert list(as_dict) == ["product", "user"]
    assert torch.equal(as_dict["product"], kt.values()[:, :4])
    assert kt.to("cpu").device() == torch.device("cpu")
    assert repr(kt).startswith('KeyedTensor(key_dim=1, {\n    "product": tensor(')


def test_from_tensor_list() -> None:
    kt = KeyedTensor.from_tensor_list(["a", "b"], [torch.ones(2, 3), torch.zeros(2, 1)])
    assert kt.length_per_key() == [3, 1]
    assert kt.values().tolist() == [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]]


def test_regroup_across_keyed_tensors() -> None:
    first = pooled()
    second = KeyedTensor(["item"], [1], torch.tensor([[100.0], [200.0], [300.0]]))
    user_item, product = KeyedTensor.regroup([first, second], [["user", "item"], ["product"]])
    assert user_item.tolist() == [[4.0, 5.0, 100.0], [10.0, 11.0, 200.0], [16.0, 17.0, 300.0]]
    assert torch.equal(product, first["product"])
    # Regrouped tensors are new storage, never views of the inputs.
    assert product.data_ptr() != first.values().data_ptr()
    named = KeyedTensor.regroup_as_dict([first, second], [["item"]], ["only_item"])
    assert named["only_item"].tolist() == [[100.0], [200.0], [300.0]]


def test_regroup_backpropagates() -> None:
    values = torch.arange(6.0).reshape(1, 6).requires_grad_()
    kt = KeyedTensor(["product", "user"], [4, 2], values)
    (out,) = KeyedTensor.regroup([kt], [["user", "product"]])
    (out * torch.arange(6.0)).sum().backward()
    assert values.grad is not None
    assert values.grad.tolist() == [[2.0, 3.0, 4.0, 5.0, 0.0, 1.0]]


# -- the strided-copy fast path of regroup against the plain cat path ------------------------------

_NAMES = [f"k{i}" for i in range(8)]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([0, 1, 2, 3]), min_size=1, max_size=8),
    st.integers(0, 4),
    st.sampled_from([torch.float32, torch.float64, torch.int64]),
    st.data(),
)
def test_regroup_fast_path_equals_cat_path(
    widths: list[int], batch: int, dtype: torch.dtype, data: st.DataObject
) -> None:
    from shardrec.sparse import _regroup

    keys = _NAMES[: len(widths)]
    # Several KeyedTensors, some keys present in more than one (the first occurrence wins).
    num_kts = data.draw(st.integers(1, 3))
    kts = []
    for index in range(num_kts):
        chosen = data.draw(st.lists(st.sampled_from(keys), unique=True, min_size=1), f"kt{index}")
        sizes = [widths[keys.index(k)] for k in chosen]
        values = (torch.arange(batch * sum(sizes)) + 1000 * index).reshape(batch, sum(sizes))
        kts.append(KeyedTensor(chosen, sizes, values.to(dtype)))
    present = sorted({k for kt in kts for k in list(kt.keys())})
    # Groups with repeats and evenly spaced keys (the strided runs the plan merges).
    groups = data.draw(
        st.lists(st.lists(st.sampled_from(present), max_size=6), min_size=1, max_size=3)
    )
    groups.append(present[data.draw(st.integers(0, 1)) :: data.draw(st.integers(1, 3))])
    assert _regroup._fast_path_applies(kts)
    fast = KeyedTensor.regroup(kts, groups)
    again = KeyedTensor.regroup(kts, groups)  # from the cached plan
    plain = _regroup._regroup_cat(kts, groups, 1)
    assert len(fast) == len(plain) == len(groups)
    for got, got_again, want in zip(fast, again, plain, strict=True):
        assert got.dtype == want.dtype
        assert got.is_contiguous()
        assert torch.equal(got, want)
        assert torch.equal(got_again, want)


def test_regroup_plan_cache_tells_sizes_apart() -> None:
    # Same keys and groups, different widths: the cached plan of one must not serve the other.
    narrow = KeyedTensor(["a", "b"], [1, 2], torch.arange(6.0).reshape(2, 3))
    wide = KeyedTensor(["a", "b"], [2, 1], torch.arange(6.0).reshape(2, 3))
    (first,) = KeyedTensor.regroup([narrow], [["b", "a"]])
    (second,) = KeyedTensor.regroup([wide], [["b", "a"]])
    assert first.tolist() == [[1.0, 2.0, 0.0], [4.0, 5.0, 3.0]]
    assert second.tolist() == [[2.0, 0.0, 1.0], [5.0, 3.0, 4.0]]


def test_regroup_outputs_do_not_alias_inputs() -> None:
    values = torch.arange(8.0).reshape(2, 4)
    kt = KeyedTensor(["a", "b"], [2, 2], values)
    for group in (["a", "b"], ["b"], ["a", "a"]):
        (out,) = KeyedTensor.regroup([kt], [group])
        out.fill_(-1.0)
    assert torch.equal(values, torch.arange(8.0).reshape(2, 4))


@pytest.mark.parametrize("case", ["requires_grad", "non_contiguous", "mixed_dtypes", "key_dim0"])
def test_regroup_general_path_cases(case: str) -> None:
    from shardrec.sparse import _regroup

    left = torch.arange(12.0).reshape(3, 4)
    right = torch.arange(6.0).reshape(3, 2) + 100
    if case == "requires_grad":
        left.requires_grad_(True)
    if case == "non_contiguous":
        left = torch.arange(24.0).reshape(3, 8)[:, ::2]
    if case == "mixed_dtypes":
        right = right.double()
    key_dim = 0 if case == "key_dim0" else 1
    if key_dim == 0:
        left, right = left.T.contiguous(), right.T.contiguous()
    kts = [
        KeyedTensor(["a", "b"], [2, 2], left, key_dim=key_dim),
        KeyedTensor(["c"], [2], right, key_dim=key_dim),
    ]
    assert not (key_dim == 1 and _regroup._fast_path_applies(kts))
    (out,) = KeyedTensor.regroup(kts, [["c", "a"]])
    want = torch.cat([kts[1]["c"], kts[0]["a"]], dim=key_dim)
    assert torch.equal(out.detach(), want.detach())
    if case == "requires_grad":
        out.sum().backward()
        assert left.grad is not None
        assert left.grad.tolist() == [[1.0, 1.0, 0.0, 0.0]] * 3
