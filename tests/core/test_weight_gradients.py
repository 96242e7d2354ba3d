"""Gradients to a KJT's per-id weights in a weighted EmbeddingBagCollection, on both kernels.

Per-id weights that require grad (e.g. made by a learnable module, as a position-weighted feature
processor does) get TorchRec's gradient: for SUM pooling ``d out_bag / d w_i = row_i``, so
``grad w_i = <grad out_bag, row_i>``; MEAN divides by the bag length. The reference is one
``F.embedding_bag(..., per_sample_weights=...)`` per feature on leaf copies of the tables (MEAN
divided by hand: ``embedding_bag`` takes per-id weights with mode ``sum`` only). Each case runs two
steps, in plain mode (tables get ``.grad``) and with a fused optimizer, which updates the rows in
backward: the weights' gradient must use the rows the forward read, not the updated ones.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType, ops

LR = 0.1
STEPS = 2
# (name, rows, dim, features); t0 and t2 share a dim (one torch group), t1 has another.
TABLES = [("t0", 10, 8, ["f0", "f1"]), ("t1", 6, 4, ["f2"]), ("t2", 5, 8, ["f3"])]
KEYS = ["f0", "f1", "f2", "f3"]
ROWS = {f: r for _, r, _, fs in TABLES for f in fs}
TABLE_OF = {f: n for n, _, _, fs in TABLES for f in fs}


def need_fbgemm() -> None:
    if not ops.fbgemm_available():
        pytest.skip("fbgemm_gpu is not importable here (absent or hidden by SHARDREC_HIDE_FBGEMM)")


def poolings(kind: str) -> dict[str, PoolingType]:
    """Per table: all SUM, all MEAN, or mixed (t0 SUM, the others MEAN)."""
    if kind == "mixed":
        return {n: PoolingType.SUM if n == "t0" else PoolingType.MEAN for n, *_ in TABLES}
    return {n: PoolingType(kind) for n, *_ in TABLES}


def build(backend: str, mode: str, pooling: str) -> EmbeddingBagCollection:
    torch.manual_seed(11)
    pools = poolings(pooling)
    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=n, num_embeddings=r, embedding_dim=d, feature_names=fs, pooling=pools[n]
            )
            for n, r, d, fs in TABLES
        ],
        is_weighted=True,
        fused_params=None if mode == "plain" else {"optimizer": mode, "learning_rate": LR},
        backend=backend,
    )


def make_batch(step: int, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, lengths, base weights)``, key-major. ``one``: one id per bag (the kernel's
    sample-major path); ``multi``: 0 to 3 ids per bag, some empty (the key-major path)."""
    g = torch.Generator().manual_seed(100 + step)
    batch = 5
    if layout == "one":
        lengths = torch.ones(len(KEYS) * batch, dtype=torch.int64)
    else:
        lengths = torch.randint(0, 4, (len(KEYS) * batch,), generator=g)
    ids = []
    for k, f in enumerate(KEYS):
        n = int(lengths[k * batch : (k + 1) * batch].sum())
        ids.append(torch.randint(0, ROWS[f], (n,), generator=g))
    values = torch.cat(ids)
    return values, lengths, torch.rand(values.numel(), generator=g) + 0.5


def reference_step(
    tables: dict[str, torch.Tensor],
    pools: dict[str, PoolingType],
    values: torch.Tensor,
    lengths: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Pooled output ``[B, sum of dims]`` in the module's key order (table order)."""
    batch = lengths.numel() // len(KEYS)
    starts = [0]
    for k in range(len(KEYS)):
        starts.append(starts[-1] + int(lengths[k * batch : (k + 1) * batch].sum()))
    blocks = {}
    for k, f in enumerate(KEYS):
        lo, hi = starts[k], starts[k + 1]
        bag_len = lengths[k * batch : (k + 1) * batch]
        offsets = torch.zeros(batch + 1, dtype=torch.int64)
        offsets[1:] = bag_len.cumsum(0)
        table = TABLE_OF[f]
        out = F.embedding_bag(
            values[lo:hi],
            tables[table],
            offsets,
            mode="sum",
            per_sample_weights=weights[lo:hi],
            include_last_offset=True,
        )
        if pools[table] is PoolingType.MEAN:
            out = out / bag_len.clamp(min=1).unsqueeze(1).to(out.dtype)
        blocks[f] = out
    return torch.cat([blocks[f] for _, _, _, fs in TABLES for f in fs], dim=1)


def run(backend: str, mode: str, pooling: str, layout: str) -> None:
    ebc = build(backend, mode, pooling)
    pools = poolings(pooling)
    ref_tables = {n: w.clone().requires_grad_() for n, w in ebc.lookup.table_weights().items()}
    # A learnable scale produces the KJT's weights, as a feature processor would.
    scale = torch.tensor(1.5, requires_grad=True)
    ref_scale = torch.tensor(1.5, requires_grad=True)
    for step in range(STEPS):
        values, lengths, base = make_batch(step, layout)
        weights = base * scale
        weights.retain_grad()
        kjt = KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths, weights=weights)
        out = ebc(kjt).values()
        ref_weights = (base * ref_scale).detach().requires_grad_()
        ref = reference_step(ref_tables, pools, values, lengths, ref_weights)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=f"output at step {step}")
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(step))
        (out * grad_out).sum().backward()
        (ref * grad_out).sum().backward()
        assert weights.grad is not None, f"the KJT's weights got no gradient at step {step}"
        assert ref_weights.grad is not None
        torch.testing.assert_close(
            weights.grad, ref_weights.grad, atol=1e-5, rtol=1e-5, msg=f"weights' grad, {step}"
        )
        # Through the weights to the module that made them.
        assert scale.grad is not None
        torch.testing.assert_close(
            scale.grad, (ref_weights.grad * base).sum(), atol=1e-4, rtol=1e-5
        )
        scale.grad = None
        with torch.no_grad():
            for name, ref_table in ref_tables.items():
                assert ref_table.grad is not None
                if mode == "plain":
                    got = ebc.embedding_bags[name].weight.grad
                    assert got is not None, f"table {name} got no .grad at step {step}"
                    torch.testing.assert_close(got, ref_table.grad, atol=1e-5, rtol=1e-5)
                    ebc.embedding_bags[name].weight.grad = None
                    ebc.embedding_bags[name].weight.sub_(LR * got)
                ref_table.sub_(LR * ref_table.grad)
                ref_table.grad = None
    for name, table in ebc.lookup.table_weights().items():
        torch.testing.assert_close(
            table, ref_tables[name].detach(), atol=1e-5, rtol=1e-5, msg=f"table {name}"
        )


def assert_first_weight_grad(ebc: EmbeddingBagCollection, pooling: str, layout: str) -> None:
    """One forward and backward of ``ebc`` (built with ``pooling``) on step 0's batch: the KJT's
    weights get the reference's gradient."""
    values, lengths, base = make_batch(0, layout)
    weights = base.clone().requires_grad_()
    ref_tables = {n: w.clone() for n, w in ebc.lookup.table_weights().items()}
    out = ebc(KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths, weights=weights))
    ref_weights = base.clone().requires_grad_()
    ref = reference_step(ref_tables, poolings(pooling), values, lengths, ref_weights)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    (out.values() * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    assert weights.grad is not None
    assert ref_weights.grad is not None
    torch.testing.assert_close(weights.grad, ref_weights.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["one", "multi"])
@pytest.mark.parametrize("pooling", ["SUM", "MEAN", "mixed"])
@pytest.mark.parametrize("mode", ["plain", "sgd"])
def test_torch_backend_weights_get_the_reference_gradient(
    mode: str, pooling: str, layout: str
) -> None:
    run("torch", mode, pooling, layout)


@pytest.mark.parametrize("layout", ["one", "multi"])
def test_torch_backend_sample_major_multi_id_bags(layout: str) -> None:
    # The kernel's other layout of multi-id bags (kept for tests): the same gradient.
    ebc = build("torch", "sgd", "mixed")
    for group in ebc.lookup._groups:
        group.key_major = False  # type: ignore[union-attr]
    assert_first_weight_grad(ebc, "mixed", layout)


@pytest.mark.parametrize("layout", ["one", "multi"])
@pytest.mark.parametrize("mode", ["sgd", "exact_adagrad"])
def test_fbgemm_backend_weights_get_the_reference_gradient(mode: str, layout: str) -> None:
    need_fbgemm()
    if mode == "sgd":
        run("fbgemm", mode, "SUM", layout)
        return
    # Adagrad's update is not the reference's SGD step: compare the first gradient only.
    ebc = build("fbgemm", mode, "SUM")
    assert_first_weight_grad(ebc, "SUM", layout)


def test_fbgemm_refuses_weighted_mean_whose_cpu_backward_is_wrong() -> None:
    # FBGEMM 1.8.0's CPU backward of weighted MEAN gives the weights L times their gradient:
    # the fbgemm backend refuses it and auto picks the torch kernel, so the weights' gradient
    # is the same whichever backend was asked for.
    need_fbgemm()
    with pytest.raises(ValueError, match="1/length"):
        build("fbgemm", "sgd", "MEAN")
    assert build("auto", "sgd", "MEAN").lookup.backend.value == "torch"


def test_backends_agree_on_the_weights_gradient() -> None:
    need_fbgemm()
    grads = []
    for b in ("torch", "fbgemm"):
        ebc = build(b, "sgd", "SUM")
        values, lengths, base = make_batch(1, "multi")
        weights = base.clone().requires_grad_()
        out = ebc(KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths, weights=weights))
        out.values().square().sum().backward()
        grads.append(weights.grad)
    assert grads[0] is not None
    assert grads[1] is not None
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["plain", "sgd"])
def test_weights_without_grad_change_nothing(mode: str) -> None:
    # Weights that need no gradient (the usual case) give the same output and table update as
    # weights that do, and get no .grad.
    values, lengths, base = make_batch(0, "multi")
    results = []
    for needs_grad in (False, True):
        ebc = build("torch", mode, "mixed")
        weights = base.clone().requires_grad_(needs_grad)
        out = ebc(KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths, weights=weights))
        out.values().square().sum().backward()
        assert (weights.grad is not None) == needs_grad
        grads = [p.grad for p in ebc.parameters() if p.grad is not None]
        results.append((out.values().detach(), ebc.lookup.table_weights(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    for name, table in results[0][1].items():
        torch.testing.assert_close(table, results[1][1][name], atol=0, rtol=0)
    assert len(results[0][2]) == len(results[1][2])
    for a, b in zip(results[0][2], results[1][2], strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
