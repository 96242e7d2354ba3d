"""Whatever a caller passes, the containers answer with a documented error or a working object.

Hypothesis draws the arguments of a consistent KJT and, most of the time, makes one thing wrong
(negative or non-integer lengths, counts that do not divide, offsets that decrease or do not start
at 0, too many or too few values, weights of the wrong size, a repeated key, a wrong stride). The
contract checked here:

- the constructor and ``validate()`` raise only ``ValueError`` or ``TypeError`` (never an
  IndexError, a RuntimeError from deep inside torch, or a crash);
- a KeyedJaggedTensor that passes ``validate()`` supports every operation without error, and the
  operations agree with each other (split then concat gives the input back).
"""

from __future__ import annotations

import itertools

import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from shardrec import KeyedJaggedTensor
from shardrec.sparse import kjt_is_equal

DOCUMENTED = (ValueError, TypeError)

CORRUPTIONS = (
    "none",
    "negative length",
    "length count",
    "values count",
    "weights count",
    "offsets step",
    "offsets start",
    "index dtype",
    "stride",
    "repeated key",
    "no lengths",
)


@st.composite
def arguments(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    """A consistent KJT's arguments, then (most of the time) one thing made wrong."""
    keys = draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=4, unique=True))
    batch = draw(st.integers(0, 3))
    lengths = draw(
        st.lists(st.integers(0, 3), min_size=len(keys) * batch, max_size=len(keys) * batch)
    )
    num_values = sum(lengths)
    corruption = draw(st.sampled_from(CORRUPTIONS))
    if corruption == "negative length" and lengths:
        lengths[draw(st.integers(0, len(lengths) - 1))] = -draw(st.integers(1, 3))
    elif corruption == "length count":
        lengths.append(1)
    elif corruption == "values count":
        num_values += draw(st.sampled_from([-1, 1, 2]))
    dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.float32]))
    values = torch.arange(max(num_values, 0)).to(dtype)
    if draw(st.booleans()):
        values = values.view(-1, 1).expand(values.shape[0], 2)
    kwargs: dict[str, object] = {"keys": keys, "values": values}
    if corruption == "repeated key" and keys:
        kwargs["keys"] = [*keys[:-1], keys[0]]
    index_dtype = torch.float32 if corruption == "index dtype" else torch.int64
    use_offsets = draw(st.booleans())
    offsets = [0, *itertools.accumulate(lengths)]
    if corruption == "offsets step" and len(offsets) > 1:
        offsets[draw(st.integers(1, len(offsets) - 1))] -= draw(st.integers(1, 3))
        use_offsets = True
    elif corruption == "offsets start":
        offsets[0] = 1
        use_offsets = True
    if corruption != "no lengths":
        if use_offsets:
            kwargs["offsets"] = torch.tensor(offsets, dtype=index_dtype)
        else:
            kwargs["lengths"] = torch.tensor(lengths, dtype=index_dtype)
    if draw(st.booleans()):
        extra = 1 if corruption == "weights count" else 0
        kwargs["weights"] = torch.ones(values.shape[0] + extra)
    if corruption == "stride" or draw(st.booleans()):
        kwargs["stride"] = batch + (1 if corruption == "stride" else 0)
    return corruption, kwargs


def exercise(kjt: KeyedJaggedTensor, data: st.DataObject) -> None:
    """Every operation on a valid KJT works, and split + concat is the identity."""
    k = len(kjt.keys())
    kjt.sync()
    str(kjt)
    repr(kjt)
    jts = kjt.to_dict(compute_offsets=data.draw(st.booleans()))
    assert list(jts) == kjt.keys()
    for jt in jts.values():
        jt.validate()
        jt.to_padded_dense()
    cuts = sorted(data.draw(st.lists(st.integers(0, k), max_size=3)))
    parts = kjt.split([b - a for a, b in itertools.pairwise([0, *cuts, k])])
    assert kjt_is_equal(KeyedJaggedTensor.concat(parts), kjt) or k == 0
    if k:
        indices = data.draw(st.lists(st.integers(0, k - 1), max_size=2 * k))
        kjt.permute(indices).validate()
        assert kjt_is_equal(KeyedJaggedTensor.from_jt_dict(jts), kjt)
    assert kjt.size_in_bytes() >= 0


@settings(max_examples=300, deadline=None)
@given(arguments(), st.data())
def test_arbitrary_input_gets_a_documented_error_or_a_working_kjt(
    drawn: tuple[str, dict[str, object]], data: st.DataObject
) -> None:
    corruption, kwargs = drawn
    try:
        kjt = KeyedJaggedTensor(**kwargs)  # type: ignore[arg-type]
    except DOCUMENTED as error:
        event(f"constructor: {type(error).__name__}")
        return
    try:
        kjt.validate()
    except DOCUMENTED as error:
        event(f"validate: {type(error).__name__}")
        return
    event(f"valid ({'consistent' if corruption == 'none' else 'harmless: ' + corruption})")
    exercise(kjt, data)
