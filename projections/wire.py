"""Query answers as Arrow: the one conversion to pandas every reader uses, and the IPC bytes the
projection service sends answers in.

DuckDB answers a statement as an Arrow table; a local read converts it here, and a read through
the service gets the same table as an Arrow IPC stream and converts it here too, so both give
the same frame. The conversion keeps the dtypes DuckDB's own `.df()` gives: integer and boolean
columns with nulls as pandas' nullable dtypes, decimals (e.g. `sum()` of integers) as float64,
dates as datetime64, a string column holding only nulls as objects (None).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:  # pandas is imported on the first conversion: the projection service never converts
    import pandas as pd


_THREADED_CELLS = 1_000_000


@cache
def _nullable() -> dict[pa.DataType, pd.api.extensions.ExtensionDtype]:
    import pandas as pd

    return {pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
            pa.int64(): pd.Int64Dtype(), pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(),
            pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype(), pa.bool_(): pd.BooleanDtype()}


def to_frame(table: pa.Table) -> pd.DataFrame:
    """The DataFrame of a query's Arrow answer, with the dtypes (and the names: a repeated column
    name gets a suffix, `a`, `a_1`) DuckDB's `.df()` gives."""
    if len(set(table.column_names)) < table.num_columns:
        table = table.rename_columns(_unique(table.column_names))
    nullable: list[int] = []
    nullable_types = _nullable()
    for i, column in enumerate(table.columns):
        kind = column.type
        if pa.types.is_decimal(kind):
            table = table.set_column(i, table.field(i).with_type(pa.float64()), column.cast(pa.float64()))
        elif pa.types.is_date(kind):
            table = table.set_column(i, table.field(i).with_type(pa.timestamp("us")), column.cast(pa.timestamp("us")))
        elif _is_text(kind) and column.null_count == len(column):  # objects, None (pyarrow's null type)
            table = table.set_column(i, table.field(i).with_type(pa.null()), pa.nulls(len(column)))
        elif column.null_count and kind in nullable_types:
            nullable.append(i)
    # pyarrow's thread pool costs more than it saves on a small answer (a query's 100 rows: ~40%
    # of the conversion); a large one is converted a column per thread. Blocks are consolidated
    # (split_blocks would save ~20% on 100 rows, but hands numeric columns over zero-copy, read-only:
    # `frame.loc[...] = x` would fail)
    frame = table.to_pandas(use_threads=table.num_rows * table.num_columns > _THREADED_CELLS)
    for i in nullable:  # integers and booleans with nulls: pandas' nullable dtypes, not floats/objects
        frame.isetitem(i, table.column(i).to_pandas(types_mapper=nullable_types.get))
    return frame


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        unique.append(name if count == 0 else f"{name}_{count}")
    return unique


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def to_ipc(table: pa.Table) -> bytes:
    """`table` as the bytes of an Arrow IPC stream."""
    return ipc_buffer(table).to_pybytes()


def ipc_buffer(table: pa.Table, prefix: bytes = b"") -> pa.Buffer:
    """`prefix`, then `table` as an Arrow IPC stream, in one buffer that is not copied again (it can
    be sent as it is: a bytes copy of a large answer, then another with its prefix, made the
    projection service hold four times the answer)."""
    sink = pa.BufferOutputStream()
    sink.write(prefix)
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def from_ipc(data: bytes | memoryview) -> pa.Table:
    """The table an Arrow IPC stream holds."""
    return pa.ipc.open_stream(data).read_all()
