"""Property: any nested input gives a row that BigQuery accepts, and the chain is unchanged."""

from __future__ import annotations

import datetime as dt
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.runnables import RunnableLambda

from langchain_bq_audit import BigQueryAuditHandler

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
    st.sampled_from(["\udcff", "a\ud800b", "\U0001f600", "\x00", "é" * 3]),
    st.binary(max_size=20),
    st.datetimes(timezones=st.just(dt.timezone.utc)),
    st.uuids(),
    st.decimals(allow_nan=True),
)
keys = st.one_of(st.text(max_size=12), st.integers(), st.sampled_from(["api_key", "password"]))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.tuples(inner, inner),
        st.dictionaries(keys, inner, max_size=5),
        st.frozensets(st.one_of(st.integers(), st.text(max_size=5)), max_size=4),
    ),
    max_leaves=25,
)


def test_any_input_gives_an_accepted_row(bq_client, table_name, read_rows) -> None:
    handler = BigQueryAuditHandler(client=bq_client, table=table_name, batch_age_s=0.2)
    chain = RunnableLambda(lambda v: v)
    seen: list[Any] = []

    @settings(
        max_examples=80,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(value=values, tags=st.lists(st.text(max_size=8), max_size=3))
    def run(value: Any, tags: list[str]) -> None:
        meta = {"payload": value, "session_id": "prop"}
        out = chain.invoke(value, config={"callbacks": [handler], "metadata": meta, "tags": tags})
        assert out is value  # the chain behaves exactly as without the handler
        seen.append(value)

    run()
    assert handler.flush(timeout=60)
    stats = handler.stats()
    assert stats["written"] == len(seen), stats["last_error"]
    assert stats["spooled"] == stats["dead_lettered"] == stats["dropped"] == 0
    assert stats["callback_errors"] == 0
    rows = read_rows()
    assert len(rows) == len(seen)
    assert all(r["session_id"] == "prop" and r["metadata"] is not None for r in rows)
    handler.close()
