"""Typed sparse containers: JaggedTensor, KeyedJaggedTensor, KeyedTensor (TorchRec's meanings)."""

from shardrec.sparse._pytree import register as _register_pytrees
from shardrec.sparse._validation import IndexDtypeError
from shardrec.sparse.equality import jt_is_equal, kjt_is_equal
from shardrec.sparse.jagged_tensor import JaggedTensor
from shardrec.sparse.keyed_jagged_tensor import KeyedJaggedTensor
from shardrec.sparse.keyed_tensor import KeyedTensor
from shardrec.sparse.variable_batch import deduplicate_features, expand_features

# Registering is a few dict inserts, and must precede any container reaching torch.compile/export.
_register_pytrees()

__all__ = [
    "IndexDtypeError",
    "JaggedTensor",
    "KeyedJaggedTensor",
    "KeyedTensor",
    "deduplicate_features",
    "expand_features",
    "jt_is_equal",
    "kjt_is_equal",
]
