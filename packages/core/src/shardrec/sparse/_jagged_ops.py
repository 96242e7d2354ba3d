"""Pure-torch kernels on the (values, lengths, offsets) layout, shared by the containers."""

from __future__ import annotations

import torch


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """``[2, 0, 1] -> [0, 2, 2, 3]``, in the dtype of ``lengths``."""
    offsets = lengths.new_zeros(lengths.numel() + 1)
    torch.cumsum(lengths, dim=0, out=offsets[1:])
    return offsets


def offsets_to_lengths(offsets: torch.Tensor) -> torch.Tensor:
    """``[0, 2, 2, 3] -> [2, 0, 1]``."""
    return offsets[1:] - offsets[:-1]


def padded_dense(
    values: torch.Tensor,
    lengths: torch.Tensor,
    offsets: torch.Tensor,
    desired_length: int | None,
    padding_value: float,
) -> torch.Tensor:
    """Rows of a jagged tensor, truncated or padded to one width: ``(B, N, *values.shape[1:])``.

    One scatter of all kept values instead of a Python loop over rows. Values past the last row
    (``values`` longer than the lengths add up to) belong to no row and are left out.
    """
    num_rows = lengths.numel()
    width = (
        int(lengths.max().item()) if desired_length is None and num_rows else desired_length or 0
    )
    out = values.new_full((num_rows, width, *values.shape[1:]), padding_value)
    if num_rows == 0 or width == 0 or values.shape[0] == 0:
        return out
    total = int(offsets[-1].item())
    values = values.narrow(0, 0, total)
    rows = torch.repeat_interleave(
        torch.arange(num_rows, device=values.device), lengths.long(), output_size=total
    )
    columns = torch.arange(values.shape[0], device=values.device) - offsets[:-1].long()[rows]
    keep = columns < width
    out[rows[keep], columns[keep]] = values[keep]
    return out
