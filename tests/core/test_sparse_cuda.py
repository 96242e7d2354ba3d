"""The containers on a CUDA device: movement (to, pin_memory, record_stream) and every operation.

Skipped where there is no GPU (the CPU CI machine); run on the GPU test machine.
"""

from __future__ import annotations

import pytest
import torch

from shardrec import JaggedTensor, KeyedJaggedTensor, KeyedTensor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def host_kjt() -> KeyedJaggedTensor:
    return KeyedJaggedTensor(
        keys=["product", "user"],
        values=torch.tensor([101, 202, 303, 404, 505, 606]),
        lengths=torch.tensor([2, 0, 1, 1, 1, 1], dtype=torch.int32),
        weights=torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
    )


def test_kjt_moves_and_operates_on_cuda() -> None:
    pinned = host_kjt().pin_memory()
    assert pinned.values().is_pinned()
    assert pinned.lengths().is_pinned()
    kjt = pinned.to(torch.device("cuda"), non_blocking=True)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        kjt.record_stream(stream)
    torch.cuda.synchronize()
    assert kjt.device().type == "cuda"
    assert kjt.weights().device.type == "cuda"
    kjt.validate()
    assert kjt.length_per_key() == [3, 3]
    assert kjt["user"].values().tolist() == [404, 505, 606]
    permuted = kjt.permute([1, 0, 1])
    assert permuted.values().device.type == "cuda"
    assert permuted.values().tolist() == [404, 505, 606, 101, 202, 303, 404, 505, 606]
    first, second = kjt.split([1, 1])
    again = KeyedJaggedTensor.concat([second, first])
    assert again.keys() == ["user", "product"]
    assert again.lengths().tolist() == [1, 1, 1, 2, 0, 1]
    assert again.offsets().device.type == "cuda"
    back = KeyedJaggedTensor.from_jt_dict(kjt.to_dict())
    assert torch.equal(back.values().cpu(), host_kjt().values())
    assert torch.equal(kjt.to("cpu").values(), host_kjt().values())


def test_jagged_and_keyed_tensor_on_cuda() -> None:
    jt = JaggedTensor(
        values=torch.tensor([1.0, 2.0, 3.0], device="cuda"),
        lengths=torch.tensor([2, 0, 1], device="cuda"),
    )
    assert jt.to_padded_dense().tolist() == [[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]]
    jt.validate()
    kt = KeyedTensor(["a", "b"], [2, 1], torch.arange(6.0, device="cuda").reshape(2, 3))
    (out,) = KeyedTensor.regroup([kt], [["b", "a"]])
    assert out.device.type == "cuda"
    assert out.tolist() == [[2.0, 0.0, 1.0], [5.0, 3.0, 4.0]]
    stream = torch.cuda.Stream()
    kt.record_stream(stream)
    assert kt.to("cpu").values().device.type == "cpu"


def test_compile_on_cuda_matches_eager() -> None:
    torch._dynamo.reset()
    kjt = host_kjt().to(torch.device("cuda")).sync()

    def weighted_sums(k: KeyedJaggedTensor) -> torch.Tensor:
        return torch.stack(
            [(jt.values().float() * jt.weights()).sum() for jt in k.to_dict().values()]
        )

    eager = weighted_sums(kjt)
    compiled = torch.compile(weighted_sums, backend="inductor", fullgraph=True)(kjt)
    torch.testing.assert_close(compiled, eager)
