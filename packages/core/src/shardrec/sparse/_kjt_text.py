"""How a KeyedJaggedTensor prints: ``str()`` in TorchRec's layout, ``repr()`` compact."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shardrec.sparse.keyed_jagged_tensor import KeyedJaggedTensor

_REPR_MAX_VALUES = 1000

_Rows = list[object]


def _key_rows(kjt: KeyedJaggedTensor) -> list[tuple[str, _Rows, _Rows | None]]:
    """Each key's rows of values (and of weights), by position: a permuted KJT may repeat a key."""
    keys = kjt.keys()
    per_key = kjt.length_per_key()
    values = torch.split(kjt.values(), per_key)
    weights = kjt.weights_or_none()
    split_weights = None if weights is None else torch.split(weights, per_key)
    lengths = torch.split(kjt.lengths(), kjt.stride_per_key())
    out: list[tuple[str, _Rows, _Rows | None]] = []
    for index, key in enumerate(keys):
        sizes = lengths[index].tolist()
        rows: _Rows = [t.tolist() for t in torch.split(values[index], sizes)]
        rows_w: _Rows | None = None
        if split_weights is not None:
            rows_w = [t.tolist() for t in torch.split(split_weights[index], sizes)]
        out.append((key, rows, rows_w))
    return out


def torchrec_str(kjt: KeyedJaggedTensor) -> str:
    if not kjt.keys() or (kjt.lengths_or_none() is None and kjt.offsets_or_none() is None):
        return "KeyedJaggedTensor()\n"
    lines = []
    for key, rows, rows_w in _key_rows(kjt):
        if rows_w is None:
            lines.append(f'    "{key}": {rows}')
        else:
            lines.append(
                f'    "{key}": {{\n        "values": {rows},\n        "weights": {rows_w}\n    }}'
            )
    body = ",\n".join(lines)
    return f"KeyedJaggedTensor({{\n{body}\n}})\n"


def compact_repr(kjt: KeyedJaggedTensor) -> str:
    values = kjt.values()
    no_rows = kjt.lengths_or_none() is None and kjt.offsets_or_none() is None
    if values.numel() > _REPR_MAX_VALUES or (no_rows and kjt.keys()):
        return (
            f"KeyedJaggedTensor(keys={kjt.keys()}, stride={kjt.stride()}, "
            f"values={tuple(values.shape)} {values.dtype}, "
            f"weighted={kjt.weights_or_none() is not None})"
        )
    if not kjt.keys():
        return "KeyedJaggedTensor({})"
    lines = []
    for key, rows, rows_w in _key_rows(kjt):
        if rows_w is None:
            lines.append(f'    "{key}": {rows}')
        else:
            lines.append(f'    "{key}": {{"values": {rows}, "weights": {rows_w}}}')
    body = ",\n".join(lines)
    return f"KeyedJaggedTensor({{\n{body}\n}})"
