"""TorchRec's module path for the communication precisions
(``torchrec.distributed.fbgemm_qcomm_codec``): ``CommType`` and ``QCommsConfig``, defined in
:mod:`shardrec.distributed.qcomm`.

TorchRec hands a sharder a codec registry built from the config; shardrec takes the config on the
plan instead (``with_qcomms``), so only the two types live here.
"""

from shardrec.distributed.qcomm import CommType, QCommsConfig

__all__ = ["CommType", "QCommsConfig"]
