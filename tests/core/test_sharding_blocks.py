"""The building blocks of shardrec.distributed.sharding, one process: the shard rectangle, the
router, the plan checks, the state-dict prefix and the local lookup's copy of a piece."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection
from shardrec.distributed.sharding import (
    FeatureRouter,
    LocalTable,
    ModuleView,
    ShardMetadata,
    ShardRect,
    build_local_lookup,
    check_full_span,
    check_tiling,
    even_row_shards,
    table_key_prefix,
    table_shards,
)
from shardrec.sparse import KeyedJaggedTensor


def test_a_rect_slices_a_table_and_its_row_states() -> None:
    table = torch.arange(40.0).view(10, 4)
    rect = ShardRect(2, 1, 3, 2)
    assert (rect.offsets, rect.sizes, rect.row_end, rect.col_end) == ((2, 1), (3, 2), 5, 3)
    torch.testing.assert_close(rect.of_table(table), table[2:5, 1:3])
    torch.testing.assert_close(rect.of_table(torch.arange(10.0)), torch.arange(2.0, 5.0))
    assert rect.intersection(ShardRect(4, 0, 6, 4)) == ShardRect(4, 1, 1, 2)
    assert rect.intersection(ShardRect(5, 0, 5, 4)) is None
    assert ShardMetadata.placed(rect, 3).rect == rect
    with pytest.raises(ValueError, match="must be >= 0"):
        ShardRect(0, 0, -1, 4)


def test_the_router_orders_keys_and_names_what_is_missing() -> None:
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b", "c"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1, 1])
    )
    routed = FeatureRouter(["c", "a", "a"], owner="part").route(kjt)
    assert routed.keys() == ["c", "a", "a"]
    assert routed.values().tolist() == [3, 1, 1]
    same = FeatureRouter(["a", "b", "c"], owner="part")
    assert same.route(kjt) is kjt
    with pytest.raises(ValueError, match=r"part: feature 'z' of table 't9' is missing"):
        FeatureRouter(["z"], owner="part", tables=["t9"]).route(kjt)
    with pytest.raises(ValueError, match=r"KJT keys \['b', 'c'\] are not read by any table"):
        FeatureRouter(["a"], owner="ebc", known_keys={"a"}).route(kjt)
    with pytest.raises(TypeError, match="expected a KeyedJaggedTensor"):
        same.route(torch.zeros(3))  # type: ignore[arg-type]


def test_plan_checks_name_the_table_and_the_pieces() -> None:
    blocks = even_row_shards(10, 8, [0, 1, 2, 3])
    assert [(b.offsets[0], b.sizes[0], b.rank) for b in blocks] == [
        (0, 3, 0),
        (3, 3, 1),
        (6, 2, 2),
        (8, 2, 3),
    ]
    assert check_tiling("t", "row-wise", "row blocks", blocks[::-1], axis=0, total=10) == blocks
    with pytest.raises(ValueError, match=r"'t': row blocks .* do not tile \[0, 10\)"):
        check_tiling("t", "row-wise", "row blocks", blocks[:3], axis=0, total=10)
    with pytest.raises(ValueError, match=r"'t': shard .* is not full width"):
        check_full_span("t", "row-wise", [ShardMetadata((0, 0), (10, 7), 0)], axis=1, total=8)


class _Sequence(nn.Module):
    unsharded_module_type = EmbeddingCollection


class _Prefixed(nn.Module):
    table_key_prefix = "tables"


def test_the_state_dict_prefix_comes_from_declared_members() -> None:
    assert table_key_prefix(_Prefixed()) == "tables"
    assert table_key_prefix(_Sequence()) == "embeddings"
    assert table_key_prefix(nn.Linear(1, 1)) == "embedding_bags"


def test_a_local_piece_holds_its_rectangle_of_the_table() -> None:
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name="t", num_embeddings=6, embedding_dim=4, feature_names=["f"])
        ],
        fused_params={"optimizer": "adagrad", "learning_rate": 0.1},
    )
    view = ModuleView.of(ebc, ["t"])
    piece = LocalTable("t__c2", "t", ShardRect(3, 2, 3, 2), (6, 4))
    tbe = build_local_lookup(
        view,
        [piece],
        [("f", "t__c2")],
        pooling_sum=False,
        device=torch.device("cpu"),
        optimizer=view.optimizer,
    )
    assert tbe is not None
    full = ebc.lookup.table_weights()["t"]
    torch.testing.assert_close(tbe.table_weights()["t__c2"], full[3:6, 2:4])
    shards = table_shards(tbe, [piece], ["t", "u"])
    (weight,) = shards["t"].weight
    assert (weight.offsets, weight.global_shape) == ((3, 2), (6, 4))
    assert shards["u"].weight == []
    (state,) = shards["t"].optimizer_state["sum"]  # Adagrad's sum of squares, element-wise
    assert (state.offsets, state.global_shape) == ((3, 2), (6, 4))
    assert list(shards["t"].optimizer_state) == ["sum"]
