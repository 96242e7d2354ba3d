"""An example shardrec storage backend: tables whose rows live in memory-mapped files.

``EmbeddingBagConfig(..., storage=StorageChoice("mmap", {"directory": "/big/disk"}))`` keeps the
table's rows (and its fused optimizer's state) in files under that directory, so a table larger
than the machine's memory trains: the kernel pages in the rows a batch reads.
"""

from shardrec_mmap_storage.files import HEADER_BYTES, MmapFileError, map_rows
from shardrec_mmap_storage.plugin import BACKEND_NAME, MmapAllocator, MmapStorage

__all__ = [
    "BACKEND_NAME",
    "HEADER_BYTES",
    "MmapAllocator",
    "MmapFileError",
    "MmapStorage",
    "map_rows",
]
