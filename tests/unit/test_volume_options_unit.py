"""Volume options given as arguments with the wrong type: a clear error or their meaning,
never the opposite of what was asked (Shaping the volume: a bad value is a `ValueError`
when the handler is made)."""

from __future__ import annotations

import pytest

from langchain_bq_audit.settings import AuditSettings


def test_user_visible_given_as_text_means_what_it_says() -> None:
    for text, expected in (("false", False), ("0", False), ("true", True)):
        try:
            settings = AuditSettings(user_visible=text)  # type: ignore[arg-type]
        except ValueError:
            continue  # a clear error is fine too
        assert settings.user_visible is expected, text
    with pytest.raises(ValueError, match="user_visible"):
        AuditSettings(user_visible="maybe")  # type: ignore[arg-type]


def test_sample_rate_given_as_text_is_read_or_a_clear_error() -> None:
    try:
        assert AuditSettings(sample_rate="0.5").sample_rate == 0.5  # type: ignore[arg-type]
    except ValueError as exc:
        assert "sample_rate" in str(exc)
    with pytest.raises(ValueError, match="sample_rate"):
        AuditSettings(sample_rate="half")  # type: ignore[arg-type]
