"""KeyedJaggedTensor.validate(): the checks that read tensor contents (a device sync).

Every error is a ValueError (TypeError for a key that is not a string) naming the key and sample
where the problem shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from shardrec.sparse import _validation as check
from shardrec.sparse import _vbe as vbe
from shardrec.sparse._jagged_ops import offsets_to_lengths

if TYPE_CHECKING:
    from shardrec.sparse.keyed_jagged_tensor import KeyedJaggedTensor

_OWNER = "KeyedJaggedTensor"


def validate(kjt: KeyedJaggedTensor) -> None:
    keys = kjt.keys()
    lengths_at = kjt.lengths_offset_per_key()
    values = kjt.values()
    offsets = kjt.offsets_or_none()
    num_values = values.shape[0]
    # Key types only: repeats are refused by the constructor but made on purpose by permute.
    check.key_types(_OWNER, keys)
    for name, tensor in (
        ("weights", kjt.weights_or_none()),
        ("lengths", kjt.lengths_or_none()),
        ("offsets", offsets),
    ):
        if tensor is not None and tensor.device != values.device:
            raise ValueError(
                f"{_OWNER}: {name} is on {tensor.device} but values on {values.device}"
            )
    if offsets is not None and offsets.numel() and int(offsets[0]) != 0:
        raise ValueError(f"{_OWNER}: offsets[0] is {int(offsets[0])}, expected 0")
    lengths_given = kjt.lengths_or_none() is not None
    lengths = kjt.lengths()
    bad = check.find_negative_length(lengths)
    if bad is not None:
        position = next(i for i, end in enumerate(lengths_at[1:]) if bad < end)
        sample = bad - lengths_at[position]
        where = f"key {keys[position]!r} at sample {sample}"
        if not lengths_given and offsets is not None:
            before, after = int(offsets[bad]), int(offsets[bad + 1])
            raise ValueError(
                f"{_OWNER}: offsets decrease at position {bad + 1} ({before} -> {after}), {where}"
            )
        raise ValueError(
            f"{_OWNER}: negative length {int(lengths[bad].item())} for {where} (lengths[{bad}])"
        )
    if (
        lengths_given
        and offsets is not None
        and not torch.equal(offsets_to_lengths(offsets), lengths.to(offsets.dtype))
    ):
        raise ValueError(f"{_OWNER}: lengths and offsets disagree")
    if lengths.numel() != lengths_at[-1]:
        raise ValueError(
            f"{_OWNER}: {lengths.numel()} lengths but the keys' batch sizes "
            f"{kjt.stride_per_key()} add up to {lengths_at[-1]}"
        )
    actual = vbe.per_key_sums(lengths, kjt.stride_per_key())
    total = sum(actual)
    if total != num_values:
        raise ValueError(
            f"{_OWNER}: lengths sum to {total} but values has {num_values} entries"
            + _overrun(keys, actual, num_values)
        )
    claimed = kjt.length_per_key_or_none()
    if claimed is not None:
        for key, want, got in zip(keys, claimed, actual, strict=True):
            if want != got:
                raise ValueError(
                    f"{_OWNER}: key {key!r} has {got} ids by its lengths but "
                    f"length_per_key says {want}"
                )
    _validate_inverse(kjt)


def _validate_inverse(kjt: KeyedJaggedTensor) -> None:
    """Every inverse index of a key points at one of that key's samples."""
    inverse = kjt.inverse_indices_or_none()
    if inverse is None:
        return
    names, table = inverse
    if table.device != kjt.values().device:
        raise ValueError(
            f"{_OWNER}: inverse_indices is on {table.device} but values on {kjt.values().device}"
        )
    if kjt.variable_stride_per_key() and table.numel() and table.shape[1] != kjt.stride():
        raise ValueError(
            f"{_OWNER}: inverse_indices cover {table.shape[1]} samples but stride() is "
            f"{kjt.stride()}"
        )
    strides = dict(zip(kjt.keys(), kjt.stride_per_key(), strict=True))
    for row, name in enumerate(names):
        if name not in strides:
            continue  # TorchRec allows rows for keys this KJT does not hold
        indices = table[row]
        if indices.numel() == 0:
            continue
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= strides[name]:
            sample = int(torch.nonzero((indices < 0) | (indices >= strides[name]))[0, 0])
            raise ValueError(
                f"{_OWNER}: inverse index {int(indices[sample])} of key {name!r} at sample "
                f"{sample} is out of range; the key has {strides[name]} samples"
            )


def _overrun(keys: list[str], per_key: list[int], num_values: int) -> str:
    """Which key the mismatch shows in: the first whose ids run past the end of values, or the
    values left over after the last key."""
    end = 0
    for key, count in zip(keys, per_key, strict=True):
        end += count
        if end > num_values:
            return f"; key {key!r} runs past the end of values"
    return f"; {num_values - end} values follow the last key's ids"
