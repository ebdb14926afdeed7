"""Rows (the dicts `rows.build_row` makes, or the spool gives back) -> one Arrow record batch.

The Arrow schema is rendered from `schema.COLUMNS`. A value Arrow cannot take for its
column (which a row from an older spool or a user's redactor could hold) makes that row
alone invalid: it is reported by index, and the other rows are encoded without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..schema import COLUMNS, Column

if TYPE_CHECKING:
    import pyarrow as pa


def _arrow_type(column: Column) -> pa.DataType:
    import pyarrow as pa

    base = {
        "STRING": pa.string(),
        "JSON": pa.string(),  # JSON columns take their JSON text as an Arrow string
        "INT64": pa.int64(),
        "FLOAT64": pa.float64(),
        "BOOL": pa.bool_(),
        "TIMESTAMP": pa.timestamp("us", tz="UTC"),
    }[column.type]
    return pa.list_(base) if column.mode == "REPEATED" else base


_SCHEMA: pa.Schema | None = None


def arrow_schema() -> pa.Schema:
    """The audit table as an Arrow schema (REQUIRED columns are not nullable)."""
    global _SCHEMA
    if _SCHEMA is None:
        import pyarrow as pa

        _SCHEMA = pa.schema(
            [pa.field(c.name, _arrow_type(c), nullable=c.mode != "REQUIRED") for c in COLUMNS]
        )
    return _SCHEMA


def _column(values: list[Any], column: Column, type_: pa.DataType) -> pa.Array:
    import pyarrow as pa

    if column.mode == "REPEATED":
        values = [[] if v is None else v for v in values]  # a NULL list rejects the batch
    if column.type == "TIMESTAMP":  # rows hold ISO-8601 text, as insertAll wants it
        return pa.array(values, pa.string()).cast(type_)
    return pa.array(values, type_)


def encode(rows: list[dict[str, Any]]) -> tuple[pa.RecordBatch, list[int], dict[int, str]]:
    """`(batch, kept, invalid)`: the batch of the encodable rows, their indexes in `rows`,
    and `{index: error}` for the rows that could not be encoded."""
    import pyarrow as pa

    schema = arrow_schema()
    invalid: dict[int, str] = {}
    for column in COLUMNS:  # a REQUIRED column must be there, else Arrow fills a NULL
        if column.mode == "REQUIRED":
            for i, row in enumerate(rows):
                if row.get(column.name) is None and i not in invalid:
                    invalid[i] = f"invalid: {column.name}: missing required field"
    kept = [i for i in range(len(rows)) if i not in invalid]
    arrays = []
    for column, field in zip(COLUMNS, schema, strict=True):
        values = [rows[i].get(column.name) for i in kept]
        try:
            arrays.append(_column(values, column, field.type))
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            # find the rows at fault, then encode everything again without them
            for i in kept:
                try:
                    _column([rows[i].get(column.name)], column, field.type)
                except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
                    invalid[i] = f"invalid: {column.name}: {exc}"
            if len(invalid) == len(rows):
                return pa.RecordBatch.from_pylist([], schema=schema), [], invalid
            batch, kept_rest, _ = encode([rows[i] for i in range(len(rows)) if i not in invalid])
            kept = [i for i in range(len(rows)) if i not in invalid]
            return batch, [kept[j] for j in kept_rest], invalid
    return pa.record_batch(arrays, schema=schema), kept, invalid
