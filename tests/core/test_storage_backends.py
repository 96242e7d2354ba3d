"""Storage backends: the hook, the registry, choosing one per table, and the example mmap backend
unsharded (equal training to the default storage, its file errors, a table larger than the
memory limit)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from shardrec.distributed import PluginError, hookimpl
from shardrec.distributed.plugins import BUILTIN_STORAGE_MODULE, load_plugins
from shardrec.kernels import (
    FeatureSpec,
    FusedOptimizerConfig,
    GroupRequest,
    LookupGroup,
    StorageBackend,
    StorageChoice,
    TableBatchedEmbedding,
    TableSpec,
    TorchGroup,
    UnknownStorageBackendError,
)
from shardrec.modules import EmbeddingConfig

from .._plugin_site import PLUGINS, install_plugin

PLUGIN = PLUGINS / "shardrec_mmap_storage"


class _Counting:
    """A backend of the torch kernel that counts the groups it built."""

    def __init__(self, name: str = "counting") -> None:
        self._name = name
        self.built = 0

    @property
    def name(self) -> str:
        return self._name

    def group_key(self, table: TableSpec, pooled: bool) -> Hashable:
        return table.embedding_dim

    def unsupported_reason(self, request: GroupRequest) -> str | None:
        return "no odd dims" if any(t.embedding_dim % 2 for t in request.tables) else None

    def build_group(self, request: GroupRequest) -> LookupGroup:
        self.built += 1
        return TorchGroup(
            tables=request.tables,
            feature_tables=request.feature_tables,
            optimizer=request.optimizer,
            device=request.device,
        )


def _plugin(*backends: object) -> object:
    class Plugin:
        @hookimpl
        def shardrec_register_storage_backends(self, register: Any) -> None:
            for b in backends:
                register(b)

    return Plugin()


def test_builtin_backends_register_through_the_hook() -> None:
    registry = load_plugins(entry_points=False)
    assert isinstance(registry.storage_backends()["torch"], StorageBackend)
    assert sorted(registry.storage_backends()) == ["fbgemm", "torch"]
    (builtin,) = registry.builtin_plugins()
    assert builtin.name == BUILTIN_STORAGE_MODULE
    assert [b.name for b in builtin.storage_backends] == ["torch", "fbgemm"]
    impls = registry.pm.hook.shardrec_register_storage_backends.get_hookimpls()
    assert [i.plugin_name for i in impls] == [BUILTIN_STORAGE_MODULE]
    assert registry.plugins() == []  # the filters and listings of third-party plugins see none


def test_plugin_backends_are_checked() -> None:
    counting = _Counting()
    registry = load_plugins(entry_points=False, plugins=[_plugin(counting)])
    assert registry.storage_backend("counting", table="t") is counting
    with pytest.raises(PluginError, match=r"storage backend 'torch'.*already registered"):
        load_plugins(entry_points=False, plugins=[_plugin(_Counting("torch"))])
    with pytest.raises(PluginError, match="not a StorageBackend"):
        load_plugins(entry_points=False, plugins=[_plugin(object())])
    with pytest.raises(UnknownStorageBackendError, match=r"table 't9'.*'nope'.*counting, fbgemm"):
        registry.storage_backend("nope", table="t9")


def _tables(storage: StorageChoice | None, second: StorageChoice | None = None) -> list[Any]:
    return [
        EmbeddingBagConfig(
            name="a", num_embeddings=9, embedding_dim=4, feature_names=["f"], storage=storage
        ),
        EmbeddingBagConfig(
            name="b", num_embeddings=5, embedding_dim=6, feature_names=["g"], storage=second
        ),
    ]


def _kjt(seed: int, rows: tuple[int, int] = (9, 5)) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 3, (2, 4), generator=g)
    values = torch.cat(
        [torch.randint(0, rows[k], (int(lengths[k].sum()),), generator=g) for k in range(2)]
    )
    return KeyedJaggedTensor(keys=["f", "g"], values=values, lengths=lengths.reshape(-1))


def test_unknown_backend_names_the_table_and_the_available_ones() -> None:
    with pytest.raises(
        ValueError, match=r"table 'b' asks for storage backend 'nope'.*fbgemm, torch"
    ):
        EmbeddingBagCollection(tables=_tables(None, StorageChoice("nope")))


def test_a_backend_that_refuses_names_the_tables() -> None:
    with pytest.raises(ValueError, match=r"'torch' cannot hold tables 'a': .*no options"):
        EmbeddingBagCollection(tables=_tables(StorageChoice("torch", {"x": "1"})))
    counting = _Counting()
    spec = TableSpec(
        name="odd", num_embeddings=3, embedding_dim=3, storage=StorageChoice("counting")
    )
    with pytest.raises(ValueError, match=r"'counting' cannot hold tables 'odd': no odd dims"):
        TableBatchedEmbedding(
            tables=[spec],
            features=[FeatureSpec(name="f", table="odd")],
            storage_backends={"counting": counting},
        )


def test_choice_per_table_keeps_the_lookup() -> None:
    counting = _Counting()
    choice = StorageChoice("counting")
    specs = [
        TableSpec(name="a", num_embeddings=9, embedding_dim=4),
        TableSpec(name="b", num_embeddings=5, embedding_dim=6, storage=choice),
        TableSpec(name="c", num_embeddings=7, embedding_dim=6, storage=choice),
    ]
    features = [FeatureSpec(name=n, table=n) for n in "abc"]
    opt = FusedOptimizerConfig(optimizer="rowwise_adagrad", learning_rate=0.1)
    plain = [dataclass_replace(s, storage=None) for s in specs]
    mixed = TableBatchedEmbedding(
        tables=specs,
        features=features,
        optimizer=opt,
        backend="torch",
        storage_backends={"counting": counting, "torch": _builtin("torch")},
    )
    default = TableBatchedEmbedding(tables=plain, features=features, optimizer=opt, backend="torch")
    assert mixed.group_backends == ("torch", "counting")  # b and c share one group (same dim)
    assert counting.built == 1
    mixed.reset_parameters()
    default.load_table_weights(mixed.table_weights())
    for step in range(3):
        kjt = KeyedJaggedTensor(
            keys=["a", "b", "c"],
            values=torch.tensor([step, 1, 4, 2, 6]),
            lengths=torch.tensor([1, 1, 2, 0, 1, 0]),
        )
        a, b = mixed(kjt), default(kjt)
        assert isinstance(a, torch.Tensor)
        assert isinstance(b, torch.Tensor)
        assert torch.equal(a, b)
        a.pow(2).sum().backward()
        b.pow(2).sum().backward()
    for name, w in default.table_weights().items():
        assert torch.equal(mixed.table_weights()[name], w), name
        assert torch.equal(
            mixed.optimizer_states()[name]["sum"], default.optimizer_states()[name]["sum"]
        )


def dataclass_replace(spec: TableSpec, **changes: Any) -> TableSpec:
    import dataclasses

    return dataclasses.replace(spec, **changes)


def _builtin(name: str) -> StorageBackend:
    return load_plugins(entry_points=False).storage_backends()[name]


def test_config_field_is_typed() -> None:
    with pytest.raises(TypeError, match="storage of table 'x' must be a StorageChoice"):
        EmbeddingConfig(name="x", num_embeddings=3, embedding_dim=2, storage="mmap")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="options must map str to str"):
        StorageChoice("mmap", {"directory": 3})  # type: ignore[dict-item]


# ---- the example mmap backend, installed as a user would ---------------------------------------


@pytest.fixture(scope="module")
def mmap_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_plugin(PLUGIN, tmp_path_factory.mktemp("mmap-plugin"))


@pytest.fixture
def mmap_installed(mmap_site: Path) -> Iterator[Path]:
    sys.path.insert(0, str(mmap_site))
    try:
        yield mmap_site
    finally:
        sys.path.remove(str(mmap_site))


@pytest.mark.parametrize("optimizer", ["sgd", "exact_adagrad", "rowwise_adagrad", "adam"])
def test_mmap_trains_like_the_default_storage(
    mmap_installed: Path, tmp_path: Path, optimizer: str
) -> None:
    fused = {"optimizer": optimizer, "learning_rate": 0.05}
    choice = StorageChoice("mmap", {"directory": str(tmp_path)})
    torch.manual_seed(0)
    default = EmbeddingBagCollection(tables=_tables(None), fused_params=fused)
    mine = EmbeddingBagCollection(tables=_tables(choice, choice), fused_params=fused)
    assert mine.lookup.group_backends == ("mmap", "mmap")
    mine.load_state_dict(default.state_dict())
    for step in range(4):
        kjt = _kjt(step)
        a, b = mine(kjt).values(), default(kjt).values()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        a.sin().sum().backward()
        b.sin().sum().backward()
    for name, w in default.lookup.table_weights().items():
        torch.testing.assert_close(mine.lookup.table_weights()[name], w, rtol=1e-5, atol=1e-6)
        states = default.lookup.optimizer_states()[name]
        assert mine.lookup.optimizer_states()[name].keys() == states.keys()
        for key, value in states.items():
            torch.testing.assert_close(mine.lookup.optimizer_states()[name][key], value, msg=key)
    # The weights are the file's bytes (after the 4 KiB header), not a copy of them.
    (weight_file,) = tmp_path.glob("a.rank0.weight.*")
    on_disk = torch.frombuffer(bytearray(weight_file.read_bytes()[4096:]), dtype=torch.float32)
    assert torch.equal(on_disk.view(9, 4), mine.lookup.table_weights()["a"])


def test_mmap_files_errors(mmap_installed: Path, tmp_path: Path) -> None:
    missing = StorageChoice("mmap", {"directory": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match=r"'mmap' cannot hold tables 'a': directory .*nowhere"):
        EmbeddingBagCollection(tables=_tables(missing))
    with pytest.raises(ValueError, match=r"unknown options \['dir'\]"):
        EmbeddingBagCollection(tables=_tables(StorageChoice("mmap", {"dir": str(tmp_path)})))
    choice = StorageChoice("mmap", {"directory": str(tmp_path)})
    first = EmbeddingBagCollection(tables=_tables(choice))
    with pytest.raises(ValueError, match=r"a\.rank0\.weight\.9x4\.float32 is in use by another"):
        EmbeddingBagCollection(tables=_tables(choice))
    weight = first.lookup.table_weights()["a"].clone()
    del first
    gc.collect()  # unmaps (and unlocks) the files
    # A file of the same table, shape and dtype is mapped again, its rows kept.
    again = EmbeddingBagCollection(tables=_tables(choice), device="meta")
    again.lookup.reset_parameters(init_fns={"a": lambda w: None, "b": lambda w: None})
    assert torch.equal(again.lookup.table_weights()["a"], weight)
    del again
    gc.collect()
    (path,) = tmp_path.glob("a.rank0.weight.*")
    os.truncate(path, path.stat().st_size - 8)
    with pytest.raises(ValueError, match=r"a\.rank0\.weight\.9x4\.float32: short file: 4232 bytes"):
        EmbeddingBagCollection(tables=_tables(choice))
    path.write_bytes(b"not a table")
    with pytest.raises(ValueError, match=r"not a shardrec mmap table file.*left as it is"):
        EmbeddingBagCollection(tables=_tables(choice))
    assert path.read_bytes() == b"not a table"
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="is a symbolic link"):
        EmbeddingBagCollection(tables=_tables(choice))
    assert not (tmp_path / "elsewhere").exists()


LARGER_THAN_THE_LIMIT = textwrap.dedent(
    """
    import resource, sys, torch
    from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from shardrec.kernels import StorageChoice

    ROWS, DIM = 1 << 20, 256  # 1 GiB of fp32 rows

    def build(storage):
        # No init (the file's rows read as zeros): only the rows a batch touches reach the disk.
        table = EmbeddingBagConfig(name="big", num_embeddings=ROWS, embedding_dim=DIM,
                                   feature_names=["f"], init_fn=lambda w: None, storage=storage)
        return EmbeddingBagCollection(tables=[table], fused_params={
            "optimizer": "rowwise_adagrad", "learning_rate": 0.1})

    def data_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024

    # Private memory may grow by 256 MiB from here: a quarter of the table. Shared file mappings
    # do not count against RLIMIT_DATA (Linux >= 4.7).
    limit = data_bytes() + (256 << 20)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:
        build(None)
    except RuntimeError as exc:
        print("default storage:", str(exc).splitlines()[0][:120])
    else:
        sys.exit("the default storage allocated the table within the limit")
    model = build(StorageChoice("mmap", {"directory": sys.argv[1]}))
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([3, 7, ROWS - 1]),
                            lengths=torch.tensor([2, 1]))
    for step in range(3):
        out = model(kjt).values()
        out.sum().backward()
    weight = model.lookup.table_weights()["big"]
    assert bool((weight[3] < 0).all()) and bool((weight[ROWS - 1] < 0).all()), "no update"
    assert bool((weight[4] == 0).all())
    print("mmap trained", tuple(out.shape))
    """
)


def test_a_table_larger_than_the_memory_limit_trains_on_mmap(
    mmap_site: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(mmap_site), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", LARGER_THAN_THE_LIMIT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "default storage: " in run.stdout
    assert "can't allocate memory" in run.stdout
    assert "mmap trained (2, 256)" in run.stdout
    # Sparse: the 1 GiB weight file holds only the pages written.
    (weight,) = tmp_path.glob("big.rank0.weight.*")
    assert weight.stat().st_size == 4096 + (1 << 30)
    assert weight.stat().st_blocks * 512 < (64 << 20)


# ---- one sharder index per plugin manager ------------------------------------------------------


class _CountingSharder:
    """A sharder that counts how often it is asked for its sharding types."""

    def __init__(self) -> None:
        self.asked = 0

    @property
    def module_type(self) -> type[torch.nn.Module]:
        return EmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> list[str]:
        self.asked += 1
        return ["table_wise"]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return ["fused"]

    def storage_usage(self, tensor: torch.Tensor, dt: str, kernel: str) -> dict[str, int]:
        return {"ddr": 0}

    def shard(self, module: Any, params: Any, env: Any, device: Any) -> Any:
        return module


def test_the_sharder_index_is_built_once_per_manager() -> None:
    from shardrec.distributed import ShardingEnv
    from shardrec.distributed.default_plan import default_plan
    from shardrec.distributed.model_parallel import shard_module
    from shardrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from shardrec.distributed.sharder_index import SharderIndex
    from shardrec.distributed.sharding_plan import shardable_modules

    class Plugin:
        @hookimpl
        def shardrec_register_sharders(self, register: Any) -> None:
            register(sharder)

    sharder = _CountingSharder()
    registry = load_plugins(entry_points=False, plugins=[Plugin()])
    index = registry.sharders()
    assert registry.sharders() is index
    assert SharderIndex.of(index) is index
    built = sharder.asked
    assert built > 0
    module = torch.nn.Sequential(EmbeddingBagCollection(tables=_tables(None), device="meta"))
    env = ShardingEnv.from_local(world_size=2, rank=0)
    plan = default_plan(module, index, env, torch.device("cpu"))
    assert [fqn for fqn, _ in shardable_modules(module, index)] == ["0"]
    shard_module(module[0], plan.plan["0"], index, env, torch.device("cpu"), "0")
    assert index.sharder_for(EmbeddingBagCollection, "table_wise", "cpu") is sharder
    planned = EmbeddingShardingPlanner(Topology(world_size=2, compute_device="cpu")).plan(
        module, index
    )
    assert {str(p.sharding_type) for p in planned.plan["0"].values()} == {"table_wise"}
    assert sharder.asked == built  # asked while registering, never again


def test_the_plugin_listing_shows_storage_backends(mmap_site: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "shardrec", "plugins"],
        env={**os.environ, "PYTHONPATH": str(mmap_site)},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "example_mmap_storage  (shardrec-mmap-storage 0.0.1" in run.stdout
    assert "storage backend          mmap" in run.stdout
    assert "shardrec_mmap_storage.plugin.MmapStorage" in run.stdout
    assert run.stdout.splitlines()[-1] == "built-in storage backends: torch, fbgemm"
