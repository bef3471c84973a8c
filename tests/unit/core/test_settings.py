from __future__ import annotations

import pytest
from pydantic import SecretStr

from core.settings import placeholder_reason


@pytest.mark.parametrize("value", ["changeme", "CHANGEME", "sk-xxx", "aaaaaaaaaaaa", "short"])
def test_placeholders_are_refused(value: str) -> None:
    assert placeholder_reason(value) is not None


def test_real_looking_key_passes() -> None:
    assert placeholder_reason(SecretStr("sk-live-3f9a8b7c6d5e")) is None
