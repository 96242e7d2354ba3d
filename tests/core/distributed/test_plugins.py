"""The plugin manager: discovery, filters, and the errors a faulty plugin gets."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from shardrec import EmbeddingBagCollection
from shardrec.distributed import PluginError, ShardingType, hookimpl, load_sharder_registry

from ..._plugin_site import PLUGINS, install_plugin

EXAMPLE = PLUGINS / "shardrec_example_sharder"
EVIL_TWIN = PLUGINS / "shardrec_evil_twin"


class _Sharder:
    def __init__(self, name: str = "mine") -> None:
        self.name = name

    @property
    def module_type(self) -> type[nn.Module]:
        return EmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return [self.name]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return ["fused"]

    def storage_usage(self, tensor: torch.Tensor, dt: str, kernel: str) -> dict[str, int]:
        return {"ddr": 0}

    def shard(self, module: nn.Module, params: Any, env: Any, device: Any) -> nn.Module:
        return module


def _plugin(*sharders: object, raises: Exception | None = None) -> object:
    @hookimpl
    def shardrec_register_sharders(register: Any) -> None:
        if raises is not None:
            raise raises
        for s in sharders:
            register(s)

    class Plugin:
        pass

    plugin = Plugin()
    plugin.shardrec_register_sharders = shardrec_register_sharders  # type: ignore[attr-defined]
    return plugin


def test_builtin_sharders_come_from_the_entry_point() -> None:
    registry = load_sharder_registry(env={})
    builtin = [p for p in registry.plugins() if p.name == "builtin"]
    assert len(builtin) == 1
    assert builtin[0].distribution == "shardrec-sharders"
    offered = {
        (s.module_type.__name__, t) for s in builtin[0].sharders for t in s.sharding_types("cpu")
    }
    # Table-row-wise and grid sum partial bags across a node, which sequences do not have.
    bags_only = {ShardingType.TABLE_ROW_WISE, ShardingType.GRID_SHARD}
    for st in ShardingType:
        assert ("EmbeddingBagCollection", st.value) in offered
        assert (("EmbeddingCollection", st.value) in offered) is (st not in bags_only)


def test_in_process_plugin_registers() -> None:
    registry = load_sharder_registry(entry_points=False, plugins=[_plugin(_Sharder())])
    assert [s.sharding_types("cpu") for s in registry.sharders()] == [["mine"]]


def test_duplicate_sharding_type_names_both_plugins() -> None:
    with pytest.raises(PluginError, match=r"'table_wise'.*already registered"):
        load_sharder_registry(plugins=[_plugin(_Sharder("table_wise"))], env={})


def test_non_sharder_is_refused() -> None:
    with pytest.raises(PluginError, match="not a ModuleSharder"):
        load_sharder_registry(entry_points=False, plugins=[_plugin(object())])


def test_hook_that_raises_is_named() -> None:
    with pytest.raises(PluginError, match=r"shardrec_register_sharders raised KeyError"):
        load_sharder_registry(entry_points=False, plugins=[_plugin(raises=KeyError("x"))])


def test_block_and_allow_lists() -> None:
    disabled = {"SHARDREC_DISABLE_PLUGINS": "builtin,managed_collision"}
    assert load_sharder_registry(env=disabled).plugins() == []
    assert load_sharder_registry(env={"SHARDREC_PLUGINS": "nothing-else"}).plugins() == []
    allowed = load_sharder_registry(env={"SHARDREC_PLUGINS": "shardrec-sharders"})
    assert [p.name for p in allowed.plugins()] == ["builtin", "managed_collision"]


def _install(tmp_path: Path, distribution: Path = EXAMPLE) -> Path:
    return install_plugin(distribution, tmp_path)


def test_third_party_plugin_is_picked_up(tmp_path: Path) -> None:
    site = _install(tmp_path)
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    listing = subprocess.run(
        [sys.executable, "-m", "shardrec", "plugins"], env=env, capture_output=True, text=True
    )
    assert listing.returncode == 0, listing.stderr
    assert "example_local_copy  (shardrec-example-sharder 0.0.1" in listing.stdout
    assert "local_copy" in listing.stdout
    script = textwrap.dedent(
        """
        import os, torch, torch.distributed as dist
        import shardrec as torchrec
        from shardrec.distributed import ParameterSharding, ShardingPlan
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
        dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:0")
        ebc = torchrec.EmbeddingBagCollection(tables=[torchrec.EmbeddingBagConfig(
            name="t", num_embeddings=10, embedding_dim=4, feature_names=["f"])])
        plan = ShardingPlan({"": {"t": ParameterSharding(
            sharding_type="local_copy", compute_kernel="fused", ranks=(0,))}})
        model = torchrec.distributed.DistributedModelParallel(ebc, plan=plan)
        kjt = torchrec.KeyedJaggedTensor(keys=["f"], values=torch.tensor([1, 2, 3]),
                                         lengths=torch.tensor([2, 1]))
        print(type(model.module).__name__)
        assert torch.equal(model(kjt).values(), ebc(kjt).values())
        print(model.plan)
        dist.destroy_process_group()
        """
    )
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "LocalCopyEmbeddingBagCollection" in run.stdout
    assert "local_copy" in run.stdout


def test_third_party_plugin_import_error_names_it(tmp_path: Path) -> None:
    site = _install(tmp_path)
    (site / "shardrec_example_sharder" / "plugin.py").write_text("import no_such_module\n")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-m", "shardrec", "plugins"], env=env, capture_output=True, text=True
    )
    assert run.returncode == 1
    assert "example_local_copy" in run.stderr
    assert "shardrec-example-sharder" in run.stderr
    assert "no_such_module" in run.stderr


def _listing(site: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardrec", "plugins"],
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
    )


def test_a_disabled_distribution_is_never_imported(tmp_path: Path) -> None:
    site = _install(tmp_path, EVIL_TWIN)  # its entry point is also named "builtin"
    mark = tmp_path / "imported"
    for filters in (
        {"SHARDREC_DISABLE_PLUGINS": "shardrec-evil-twin"},
        {"SHARDREC_PLUGINS": "shardrec-sharders"},
    ):
        run = _listing(site, SHARDREC_EVIL_TWIN_MARK=str(mark), **filters)
        assert run.returncode == 0, run.stderr
        assert "builtin  (shardrec-sharders" in run.stdout
        assert "table_wise" in run.stdout
        assert not mark.exists(), filters
    reason = run.stdout.splitlines()[0]
    assert reason.startswith("skipped builtin  (shardrec-evil-twin 0.0.1; entry point: builtin")
    assert reason.endswith("not listed in SHARDREC_PLUGINS")


def test_entry_points_sharing_a_name_are_refused_before_either_loads(tmp_path: Path) -> None:
    site = _install(tmp_path, EVIL_TWIN)
    mark = tmp_path / "imported"
    run = _listing(site, SHARDREC_EVIL_TWIN_MARK=str(mark))
    assert run.returncode == 1
    assert "'shardrec-evil-twin'" in run.stderr
    assert "'shardrec-sharders'" in run.stderr
    assert "must be unique" in run.stderr
    assert not mark.exists()


def _hooks(**functions: Any) -> object:
    class Plugin:
        pass

    plugin = Plugin()
    for name, function in functions.items():
        setattr(plugin, name, function)
    return plugin


def test_a_misspelled_hook_names_the_nearest_one() -> None:
    @hookimpl
    def register_one(register: Any) -> None:
        pass

    with pytest.raises(PluginError) as err:
        load_sharder_registry(
            entry_points=False, plugins=[_hooks(shardrec_register_sharder=register_one)]
        )
    assert str(err.value) == (
        "plugin '_hooks.<locals>.Plugin#0': hook 'shardrec_register_sharder' is not a shardrec "
        "hook (did you mean 'shardrec_register_sharders'?)"
    )


def test_a_wrong_hook_argument_names_the_one_shardrec_passes() -> None:
    @hookimpl
    def hook(registr: Any) -> None:
        pass

    with pytest.raises(PluginError, match=r"argument 'registr'.*\(did you mean 'register'\?\)"):
        load_sharder_registry(entry_points=False, plugins=[_hooks(shardrec_register_sharders=hook)])


def test_an_unmarked_hook_is_refused() -> None:
    def hook(register: Any) -> None:
        pass

    with pytest.raises(
        PluginError, match=r"'shardrec_register_sharders' .*not marked with @hookimpl"
    ):
        load_sharder_registry(entry_points=False, plugins=[_hooks(shardrec_register_sharders=hook)])


def test_a_misspelled_hook_of_an_installed_plugin_names_its_distribution(tmp_path: Path) -> None:
    site = _install(tmp_path)
    plugin = site / "shardrec_example_sharder" / "plugin.py"
    plugin.write_text(
        plugin.read_text().replace(
            "def shardrec_register_sharders(", "def shardrec_register_sharder("
        )
    )
    run = _listing(site)
    assert run.returncode == 1
    line = run.stderr.strip()
    assert "\n" not in line
    assert "entry point 'example_local_copy = shardrec_example_sharder.plugin'" in line
    assert "distribution 'shardrec-example-sharder' 0.0.1" in line
    assert "did you mean 'shardrec_register_sharders'" in line
