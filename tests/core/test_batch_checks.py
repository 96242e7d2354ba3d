"""A bad batch never gives a silent wrong answer: EmbeddingBagCollection, EmbeddingCollection and
TableBatchedEmbedding refuse negative lengths, ids outside their table and ids that are not
integers, naming the feature, the table, the id and where it sits; ``check_inputs=False`` turns
the content checks off (the dtype check stays: it is free)."""

from __future__ import annotations

import pytest
import torch

from shardrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
)
from shardrec.kernels import (
    BadBatchError,
    BatchChecker,
    FeatureSpec,
    TableBatchedEmbedding,
    TableSpec,
)

# f1 is read by t1 (10 rows) and t2 (7 rows): id 8 is fine for t1, out of range for t2.
EBC_TABLES = [
    EmbeddingBagConfig(name="t1", num_embeddings=10, embedding_dim=4, feature_names=["f1"]),
    EmbeddingBagConfig(name="t2", num_embeddings=7, embedding_dim=4, feature_names=["f2", "f1"]),
]
EC_TABLES = [
    EmbeddingConfig(name="t1", num_embeddings=10, embedding_dim=4, feature_names=["f1"]),
    EmbeddingConfig(name="t2", num_embeddings=7, embedding_dim=4, feature_names=["f2"]),
]


def batch(f1: list[list[float]], f2: list[list[float]]) -> KeyedJaggedTensor:
    """A KJT of two features given as bags per sample (ids may be anything, even floats)."""
    bags = [*f1, *f2]
    ids = [i for bag in bags for i in bag]
    lengths = torch.tensor([len(b) for b in bags])
    is_float = any(isinstance(i, float) for i in ids)
    values = torch.tensor(ids, dtype=torch.float32 if is_float else torch.int64)
    return kjt(["f1", "f2"], values, lengths)


def kjt(keys: list[str], values: torch.Tensor, lengths: torch.Tensor) -> KeyedJaggedTensor:
    try:
        return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
    except TypeError:
        # A container that refuses float ids itself: build it anyway, as one that accepts
        # TorchRec's float values would, so that the module's own refusal is what is tested.
        return KeyedJaggedTensor._trusted(keys, None, values, None, lengths, None, 2, None, None)


def modules() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [EmbeddingBagCollection(tables=EBC_TABLES), EmbeddingCollection(tables=EC_TABLES)]


@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_an_id_out_of_range_names_feature_table_id_position_and_sample(kind: str) -> None:
    ebc, ec = modules()
    module = ebc if kind == "ebc" else ec
    with pytest.raises(
        BadBatchError,
        match=r"id 12 of feature 'f1' \(position 2 of its ids, sample 1\) is out of range for"
        r" table 't1' \(num_embeddings=10",
    ):
        module(batch([[1], [2, 12]], [[0], [1]]))
    with pytest.raises(BadBatchError, match=r"id -3 of feature 'f2' \(position 0 .* sample 0\)"):
        module(batch([[1], [2]], [[-3], [1]]))


def test_a_feature_read_by_two_tables_is_checked_against_each() -> None:
    ebc, _ = modules()
    with pytest.raises(BadBatchError, match=r"id 8 of feature 'f1' .* table 't2' \(num_emb"):
        ebc(batch([[8], [1]], [[0], [1]]))


def test_every_id_is_checked_when_the_features_hold_as_many_ids_each() -> None:
    # Fixed-size batches take the one-aminmax path: the last id of the last feature is caught.
    ebc, _ = modules()
    with pytest.raises(BadBatchError, match=r"id 7 of feature 'f2' \(position 1 .* sample 1\)"):
        ebc(batch([[1], [2]], [[3], [7]]))


@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_a_negative_length_is_named(kind: str) -> None:
    ebc, ec = modules()
    module = ebc if kind == "ebc" else ec
    # Lengths [2, -1 | 1, 1] still add up to the 3 ids: only the content check sees it.
    values = torch.tensor([1, 2, 3])
    bad = KeyedJaggedTensor(keys=["f1", "f2"], values=values, lengths=torch.tensor([3, -1, 0, 1]))
    with pytest.raises(
        BadBatchError, match=r"negative length -1 for feature 'f1' \(table 't1'\) at sample 1"
    ):
        module(bad)


@pytest.mark.parametrize("kind", ["ebc", "ec"])
@pytest.mark.parametrize("check_inputs", [True, False])
def test_ids_that_are_not_integers_are_refused_naming_the_features(
    kind: str, check_inputs: bool
) -> None:
    ebc, ec = modules()
    module = ebc if kind == "ebc" else ec
    module.check_inputs = check_inputs
    with pytest.raises(
        BadBatchError, match=r"dtype torch.float32, but the ids of features 'f1' \(table 't1'\)"
    ):
        module(batch([[1.0], [2.5]], [[0.0], [1.0]]))


def test_unchecked_modules_give_the_checked_answer_on_good_batches() -> None:
    torch.manual_seed(0)
    checked = EmbeddingBagCollection(tables=EBC_TABLES)
    unchecked = EmbeddingBagCollection(tables=EBC_TABLES, check_inputs=False)
    unchecked.load_state_dict(checked.state_dict())
    good = batch([[1, 6], []], [[6], [0, 1, 2]])
    torch.testing.assert_close(unchecked(good).values(), checked(good).values())
    assert checked.check_inputs
    assert not unchecked.check_inputs
    with pytest.raises(TypeError, match="check_inputs must be a bool"):
        EmbeddingBagCollection(tables=EBC_TABLES, check_inputs="no")  # type: ignore[arg-type]


def test_the_flag_reads_nothing_on_the_host() -> None:
    # On meta tensors any host read would raise: the flag is computed from shapes and kernels only.
    checker = BatchChecker("X", ["a", "b"], ["ta", "tb"], [5, 6])
    for lpk in ([2, 2], [1, 3]):
        flag = checker.problem_flag(
            torch.empty(4, dtype=torch.int64, device="meta"),
            torch.empty(4, dtype=torch.int64, device="meta"),
            lpk,
        )
        assert flag.device.type == "meta"
        assert flag.shape == ()
    good = checker.problem_flag(torch.tensor([4, 0, 5, 5]), torch.tensor([1, 1, 2, 0]), [2, 2])
    high = checker.problem_flag(torch.tensor([4, 0, 5, 6]), torch.tensor([1, 1, 1, 1]), [2, 2])
    uneven = checker.problem_flag(torch.tensor([4, 5, 5, 6]), torch.tensor([1, 0, 2, 1]), [1, 3])
    negative = checker.problem_flag(torch.tensor([4, 0, 5, 5]), torch.tensor([3, -1, 1, 1]), [2, 2])
    assert [bool(good), bool(high), bool(uneven), bool(negative)] == [False, True, True, True]


def test_table_batched_embedding_checks_by_default_and_can_be_told_not_to() -> None:
    def tbe(check: bool) -> TableBatchedEmbedding:
        return TableBatchedEmbedding(
            tables=[TableSpec(name="t", num_embeddings=4, embedding_dim=2)],
            features=[FeatureSpec(name="f", table="t")],
            check_inputs=check,
        )

    bad = KeyedJaggedTensor(keys=["f"], values=torch.tensor([3, 4]), lengths=torch.tensor([1, 1]))
    with pytest.raises(BadBatchError, match=r"TableBatchedEmbedding: id 4 of feature 'f'"):
        tbe(True)(bad)
    good = KeyedJaggedTensor(keys=["f"], values=torch.tensor([3, 0]), lengths=torch.tensor([1, 1]))
    assert tbe(False)(good).shape == (2, 2)  # type: ignore[union-attr]
