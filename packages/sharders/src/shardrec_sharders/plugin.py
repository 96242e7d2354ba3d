"""The built-in sharders, offered to shardrec through the ``shardrec`` entry-point group.

This module is the only link between shardrec and this package: shardrec never imports it by
name, it finds it as ``builtin = "shardrec_sharders.plugin"`` in this distribution's metadata.
"""

from __future__ import annotations

from shardrec.distributed.hookspecs import RegisterSharder, hookimpl
from shardrec.modules import EmbeddingBagCollection, EmbeddingCollection
from shardrec_sharders.column_wise import ColumnWiseSharder
from shardrec_sharders.data_parallel import DataParallelSharder
from shardrec_sharders.grid import GridSharder
from shardrec_sharders.row_wise import RowWiseSharder
from shardrec_sharders.table_column_wise import TableColumnWiseSharder
from shardrec_sharders.table_row_wise import TableRowWiseSharder
from shardrec_sharders.table_wise import TableWiseSharder


@hookimpl
def shardrec_register_sharders(register: RegisterSharder) -> None:
    for module_type in (EmbeddingBagCollection, EmbeddingCollection):
        for sharder_type in (
            TableWiseSharder,
            RowWiseSharder,
            ColumnWiseSharder,
            DataParallelSharder,
        ):
            register(sharder_type(module_type))
        register(TableColumnWiseSharder(module_type))
    # Row splits inside a node reduce pooled partial sums there: bags only.
    register(TableRowWiseSharder(EmbeddingBagCollection))
    register(GridSharder(EmbeddingBagCollection))
