"""Property: any nested input gives a row that BigQuery accepts, and the chain is unchanged."""

from __future__ import annotations

import base64
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


ALNUM = "ABCXYZabcxyz0189"


def body(size: int, alphabet: str = ALNUM) -> st.SearchStrategy[str]:
    return st.text(alphabet=alphabet, min_size=size, max_size=size + 24)


# Each strategy draws a credential (a prefix and a body of the shape its format has, so every
# example is one) and the part of it that must go.
CREDENTIALS = [
    *(st.builds(lambda p, b: (p + b, b), st.just(p), body(36))
      for p in ("sk-", "sk-proj-", "sk_live_", "rk_test_", "pk_live_", "ghp_", "ghs_",
                "xoxb-", "hf_", "ya29.", "GOCSPX-")),
    st.builds(lambda b: ("github_pat_" + b, b), body(40)),
    st.builds(lambda b: ("AIza" + b, b), body(35, ALNUM + "_-").map(lambda t: t[:35])),
    st.builds(lambda p, b: (p + b, b), st.sampled_from(["AKIA", "ASIA"]),
              st.text(alphabet="ABCXYZ0189", min_size=16, max_size=16)),
    st.builds(lambda p, b: (p + b, b),
              st.sampled_from(["aws_secret=", "SECRET_ACCESS_KEY: ", "password=", "api_key: ",
                               "clientSecret=", '"accessToken": "', "AccountKey="]),
              body(8, ALNUM + "+/")),
    # bearer and basic credentials of any length
    st.builds(lambda p, b: (p + b, b), st.sampled_from(["Bearer ", "bearer\t", "BEARER "]),
              st.text(alphabet=ALNUM, max_size=40).map(lambda t: t + "9")),
    st.builds(lambda b: ("Basic " + b, b),
              st.text(alphabet=ALNUM, min_size=1, max_size=20).map(
                  lambda t: base64.b64encode(f"{t}:{t[::-1]}".encode()).decode())),
    st.builds(lambda p, b: (p + b, b), st.sampled_from(["token ", "TOKEN\t"]), body(16)),
    st.builds(lambda b: (f"https://user:{b}@db.example.com/x", b), body(8)),
    st.builds(lambda b: ("https://hooks.slack.com/services/T0/B0/" + b, b), body(24)),
    st.builds(lambda b: (f"eyJ{b}.eyJ{b}.{b}", b), body(8)),
    st.builds(lambda b: ("-----BEGIN RSA PRIVATE KEY-----\n" + b, b), body(36)),
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    before=st.sampled_from(["", " ", "\n", "\\n", '"', "(", "x: "]),
    credential=st.one_of(CREDENTIALS),
    after=st.sampled_from(["", " ", "\n", ";", '"']),
)
def test_every_credential_shape_is_removed_and_passes_the_prefilter(
    before: str, credential: tuple[str, str], after: str
) -> None:
    """`remove_secrets` runs its patterns only on text holding one of a few literals: every
    credential must hold one, and must leave no trace of its secret part."""
    from langchain_bq_audit import redact

    shape, secret = credential
    text = before + shape + after
    assert redact._may_hold_secret(text), text
    assert secret not in redact.remove_secrets(text), text
