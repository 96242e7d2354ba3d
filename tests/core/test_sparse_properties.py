"""Property tests: every container operation against a plain-Python model of jagged lists.

The model of a KJT is ``{key: [row, row, ...]}`` (one row of ids per sample, in key order) plus the
same shape of weights; the model of each operation is a few lines of list code. Hypothesis draws
batches (including no keys, no samples, and empty rows) and checks the containers agree.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardrec import JaggedTensor, KeyedJaggedTensor, KeyedTensor

# Modest budgets: the whole file runs in seconds on a shared 2-core machine.
FAST = settings(max_examples=40, deadline=None)

Rows = list[list[int]]
WRows = list[list[float]]


@dataclass
class Model:
    """A batch as plain lists: ``ids[k][b]`` are key ``keys[k]``'s ids for sample ``b``."""

    keys: list[str]
    batch: int
    ids: list[Rows]
    weights: list[WRows] | None

    def lengths(self) -> list[int]:
        return [len(row) for rows in self.ids for row in rows]

    def values(self) -> list[int]:
        return [v for rows in self.ids for row in rows for v in row]

    def flat_weights(self) -> list[float]:
        assert self.weights is not None
        return [w for rows in self.weights for row in rows for w in row]

    def kjt(self, *, int32: bool = False, use_offsets: bool = False) -> KeyedJaggedTensor:
        dtype = torch.int32 if int32 else torch.int64
        lengths = torch.tensor(self.lengths(), dtype=dtype)
        values = torch.tensor(self.values(), dtype=torch.int64)
        weights = None
        if self.weights is not None:
            weights = torch.tensor(self.flat_weights(), dtype=torch.float32)
        if use_offsets:
            offsets = torch.tensor([0, *itertools.accumulate(self.lengths())], dtype=dtype)
            return KeyedJaggedTensor(
                self.keys, values, weights=weights, offsets=offsets, stride=self.batch
            )
        return KeyedJaggedTensor(
            self.keys, values, weights=weights, lengths=lengths, stride=self.batch
        )


KEY_NAMES = [f"k{i}" for i in range(8)]


@st.composite
def models(
    draw: st.DrawFn,
    *,
    min_keys: int = 0,
    batch: int | None = None,
    weighted: bool | None = None,
    key_pool: list[str] | None = None,
) -> Model:
    pool = key_pool if key_pool is not None else KEY_NAMES
    keys = draw(st.lists(st.sampled_from(pool), min_size=min_keys, max_size=5, unique=True))
    b = batch if batch is not None else draw(st.integers(0, 5))
    row = st.lists(st.integers(0, 1000), max_size=4)
    ids = [[draw(row) for _ in range(b)] for _ in keys]
    is_weighted = draw(st.booleans()) if weighted is None else weighted
    weights = None
    if is_weighted:
        weights = [
            [[float(draw(st.integers(-50, 50))) / 4 for _ in r] for r in rows] for rows in ids
        ]
    return Model(keys, b, ids, weights)


def expected_offsets(lengths: list[int]) -> list[list[int]]:
    """The offsets ``lengths`` may have: with no rows, TorchRec's empty form ``[]`` is valid too."""
    full = [0, *itertools.accumulate(lengths)]
    return [full, []] if not lengths else [full]


def jt_rows(jt: JaggedTensor) -> Rows:
    return [t.tolist() for t in jt.to_dense()]


def jt_weight_rows(jt: JaggedTensor) -> WRows | None:
    rows = jt.to_dense_weights()
    return None if rows is None else [t.tolist() for t in rows]


def assert_matches(kjt: KeyedJaggedTensor, model: Model) -> None:
    """Every accessor of ``kjt`` agrees with the model."""
    assert kjt.keys() == model.keys
    assert kjt.stride() == model.batch
    assert kjt.lengths().tolist() == model.lengths()
    assert kjt.values().tolist() == model.values()
    assert kjt.offsets().tolist() in expected_offsets(model.lengths())
    per_key = [sum(len(r) for r in rows) for rows in model.ids]
    assert kjt.length_per_key() == per_key
    assert kjt.offset_per_key() == [0, *itertools.accumulate(per_key)]
    if model.weights is None:
        assert kjt.weights_or_none() is None
    else:
        assert kjt.weights().tolist() == model.flat_weights()
    for position, key in enumerate(model.keys):
        if model.keys.index(key) != position:
            continue  # a repeated key (after permute): __getitem__ answers for one of them
        # the last occurrence answers __getitem__ when a key repeats
        last = len(model.keys) - 1 - model.keys[::-1].index(key)
        jt = kjt[key]
        assert jt_rows(jt) == model.ids[last]
        if model.weights is not None:
            assert jt_weight_rows(jt) == model.weights[last]


@FAST
@given(models(), st.booleans(), st.booleans())
def test_construction_and_accessors(model: Model, int32: bool, use_offsets: bool) -> None:
    kjt = model.kjt(int32=int32, use_offsets=use_offsets)
    assert_matches(kjt, model)
    kjt.validate()


@FAST
@given(models())
def test_to_dict(model: Model) -> None:
    jts = model.kjt().to_dict()
    assert list(jts) == model.keys
    for k, key in enumerate(model.keys):
        assert jt_rows(jts[key]) == model.ids[k]
        assert jts[key].lengths().tolist() == [len(r) for r in model.ids[k]]
        if model.weights is not None:
            assert jt_weight_rows(jts[key]) == model.weights[k]


@FAST
@given(models(min_keys=1), st.data())
def test_permute(model: Model, data: st.DataObject) -> None:
    k = len(model.keys)
    indices = data.draw(st.lists(st.integers(0, k - 1), max_size=2 * k))
    out = model.kjt().permute(indices)
    expected = Model(
        [model.keys[i] for i in indices],
        model.batch,
        [model.ids[i] for i in indices],
        None if model.weights is None else [model.weights[i] for i in indices],
    )
    assert_matches(out, expected)


@FAST
@given(models(), st.data())
def test_split(model: Model, data: st.DataObject) -> None:
    k = len(model.keys)
    cuts = sorted(data.draw(st.lists(st.integers(0, k), max_size=4)))
    bounds = [0, *cuts, k]
    segments = [b - a for a, b in itertools.pairwise(bounds)]
    parts = model.kjt().split(segments)
    assert len(parts) == len(segments)
    for part, (a, b) in zip(parts, itertools.pairwise(bounds), strict=True):
        expected = Model(
            model.keys[a:b],
            model.batch,
            model.ids[a:b],
            None if model.weights is None else model.weights[a:b],
        )
        assert_matches(part, expected)


@FAST
@given(st.integers(0, 4), st.booleans(), st.data())
def test_concat(batch: int, weighted: bool, data: st.DataObject) -> None:
    first = data.draw(models(batch=batch, weighted=weighted, key_pool=KEY_NAMES[:4]))
    second = data.draw(models(batch=batch, weighted=weighted, key_pool=KEY_NAMES[4:]))
    synced = data.draw(st.booleans())
    kjts = [first.kjt(), second.kjt()]
    if synced:
        kjts = [kjt.sync() for kjt in kjts]
    out = KeyedJaggedTensor.concat(kjts)
    if not first.keys and not second.keys:
        assert out.keys() == []
        return
    expected = Model(
        first.keys + second.keys,
        batch,
        first.ids + second.ids,
        None if not weighted else (first.weights or []) + (second.weights or []),
    )
    assert_matches(out, expected)


@FAST
@given(models(min_keys=1))
def test_from_jt_dict_round_trip(model: Model) -> None:
    out = KeyedJaggedTensor.from_jt_dict(model.kjt().to_dict())
    assert_matches(out, model)


@FAST
@given(models(), st.booleans())
def test_sync_constructors(model: Model, from_offsets: bool) -> None:
    values = torch.tensor(model.values(), dtype=torch.int64)
    if from_offsets:
        offsets = torch.tensor([0, *itertools.accumulate(model.lengths())])
        kjt = KeyedJaggedTensor.from_offsets_sync(model.keys, values, offsets, stride=model.batch)
    else:
        lengths = torch.tensor(model.lengths(), dtype=torch.int64)
        kjt = KeyedJaggedTensor.from_lengths_sync(model.keys, values, lengths, stride=model.batch)
    assert kjt.length_per_key_or_none() == [sum(len(r) for r in rows) for rows in model.ids]
    assert_matches(kjt, Model(model.keys, model.batch, model.ids, None))


@FAST
@given(models())
def test_pytree_round_trip(model: Model) -> None:
    kjt = model.kjt()
    leaves, spec = torch.utils._pytree.tree_flatten(kjt)
    assert all(isinstance(leaf, torch.Tensor) for leaf in leaves)
    assert_matches(torch.utils._pytree.tree_unflatten(leaves, spec), model)


VALUE_FORMS = ("ids", "float", "rows")


def as_form(ids: torch.Tensor, form: str) -> torch.Tensor:
    """The same jagged layout holding something else: floats, or a row ``[id, -id]`` per id."""
    if form == "float":
        return ids.to(torch.float64)
    if form == "rows":
        return torch.stack([ids, -ids], dim=1)
    return ids


@FAST
@given(models(min_keys=1), st.sampled_from(VALUE_FORMS), st.data())
def test_operations_do_not_depend_on_what_values_hold(
    model: Model, form: str, data: st.DataObject
) -> None:
    """Every operation moves values the same way whatever their dtype or trailing shape."""
    ids = model.kjt()
    held = KeyedJaggedTensor(
        ids.keys(),
        as_form(ids.values(), form),
        weights=ids.weights_or_none(),
        lengths=ids.lengths(),
    )
    k = len(model.keys)
    indices = data.draw(st.lists(st.integers(0, k - 1), max_size=2 * k))
    cuts = sorted(data.draw(st.lists(st.integers(0, k), max_size=3)))
    segments = [b - a for a, b in itertools.pairwise([0, *cuts, k])]
    pairs = [
        (ids.permute(indices), held.permute(indices)),
        *zip(ids.split(segments), held.split(segments), strict=True),
        (
            KeyedJaggedTensor.concat(ids.split(segments)),
            KeyedJaggedTensor.concat(held.split(segments)),
        ),
    ]
    for a, b in pairs:
        assert a.keys() == b.keys()
        assert torch.equal(a.lengths(), b.lengths())
        assert torch.equal(as_form(a.values(), form), b.values())
    for key, jt in held.to_dict(compute_offsets=data.draw(st.booleans())).items():
        assert torch.equal(as_form(ids[key].values(), form), jt.values())
        assert jt.offsets().tolist() in expected_offsets(jt.lengths().tolist())
    held.validate()


# -- JaggedTensor ----------------------------------------------------------------------------------

jagged_rows = st.lists(st.lists(st.integers(-100, 100), max_size=5), max_size=6)


def padded(rows: Sequence[Sequence[float]], width: int | None, pad: float) -> list[list[float]]:
    w = max((len(r) for r in rows), default=0) if width is None else width
    return [[float(v) for v in r[:w]] + [pad] * (w - len(r[:w])) for r in rows]


@FAST
@given(jagged_rows, st.one_of(st.none(), st.integers(0, 6)), st.sampled_from([0.0, -1.0]))
def test_jagged_tensor_dense_forms(rows: Rows, width: int | None, pad: float) -> None:
    jt = JaggedTensor.from_dense([torch.tensor(r, dtype=torch.int64) for r in rows])
    assert jt_rows(jt) == rows
    assert jt.lengths().tolist() == [len(r) for r in rows]
    assert jt.offsets().tolist() in expected_offsets([len(r) for r in rows])
    dense = jt.to_padded_dense(desired_length=width, padding_value=pad)
    assert dense.tolist() == padded(rows, width, pad)
    weights = [[v / 2 for v in r] for r in rows]
    wjt = JaggedTensor(
        values=jt.values(),
        lengths=jt.lengths(),
        weights=torch.tensor([w for r in weights for w in r], dtype=torch.float32),
    )
    wdense = wjt.to_padded_dense_weights(desired_length=width, padding_value=pad)
    assert wdense is not None
    assert wdense.tolist() == padded(weights, width, pad)
    if rows:
        back = JaggedTensor.from_dense_lengths(dense, jt.lengths())
        kept = [r[: dense.shape[1]] for r in rows]
        if all(len(r) <= dense.shape[1] for r in rows):
            assert [[int(v) for v in r] for r in jt_rows(back)] == kept


# -- KeyedTensor -----------------------------------------------------------------------------------


@FAST
@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=6),
    st.integers(0, 3),
    st.integers(1, 3),
    st.data(),
)
def test_keyed_tensor_regroup(
    dims: list[int], batch: int, num_kts: int, data: st.DataObject
) -> None:
    keys = KEY_NAMES[: len(dims)]
    # The model: each key's block as plain rows of floats, distinct across keys and samples.
    blocks = {
        key: [[float(100 * b + 10 * k + c) for c in range(d)] for b in range(batch)]
        for k, (key, d) in enumerate(zip(keys, dims, strict=True))
    }
    width = dict(zip(keys, dims, strict=True))

    def tensor_of(key: str) -> torch.Tensor:
        return torch.tensor(blocks[key], dtype=torch.float32).reshape(batch, width[key])

    cuts = sorted(
        data.draw(st.lists(st.integers(0, len(keys)), min_size=num_kts - 1, max_size=num_kts - 1))
    )
    kts = []
    for a, b in itertools.pairwise([0, *cuts, len(keys)]):
        part = keys[a:b]
        if not part:
            kts.append(KeyedTensor([], [], torch.zeros(batch, 0)))
            continue
        kt = KeyedTensor.from_tensor_list(part, [tensor_of(k) for k in part])
        assert kt.keys() == part
        assert kt.length_per_key() == [width[k] for k in part]
        assert kt.offset_per_key() == [0, *itertools.accumulate(width[k] for k in part)]
        assert list(kt.to_dict()) == part
        for k in part:
            assert kt[k].tolist() == blocks[k]
            assert kt.to_dict()[k].tolist() == blocks[k]
        kts.append(kt)
    groups = data.draw(st.lists(st.lists(st.sampled_from(keys), max_size=5), max_size=3))
    out = KeyedTensor.regroup(kts, groups)
    assert len(out) == len(groups)
    for group, tensor in zip(groups, out, strict=True):
        assert tensor.shape == (batch, sum(width[k] for k in group))
        assert tensor.tolist() == [[v for k in group for v in blocks[k][b]] for b in range(batch)]
    names = [f"g{i}" for i in range(len(groups))]
    as_dict = KeyedTensor.regroup_as_dict(kts, groups, names)
    assert list(as_dict) == names
    for name, tensor in zip(names, out, strict=True):
        assert torch.equal(as_dict[name], tensor)


@pytest.mark.parametrize("key_dim", [0, 1])
def test_keyed_tensor_key_dim(key_dim: int) -> None:
    a = torch.arange(6.0).reshape(2, 3) if key_dim == 1 else torch.arange(6.0).reshape(3, 2)
    b = torch.arange(4.0).reshape(2, 2) + 100
    b = b if key_dim == 1 else b.T
    kt = KeyedTensor.from_tensor_list(["a", "b"], [a, b], key_dim=key_dim, cat_dim=key_dim)
    assert kt.key_dim() == key_dim
    assert kt.length_per_key() == [3, 2]
    assert torch.equal(kt["a"], a)
    assert torch.equal(kt["b"], b)
    (swapped,) = KeyedTensor.regroup([kt], [["b", "a"]])
    assert torch.equal(swapped, torch.cat([b, a], dim=key_dim))
