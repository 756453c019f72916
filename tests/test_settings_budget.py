"""Checks across config sections: the reply's token reservation must leave room for a context."""

from __future__ import annotations

import pytest

from bot.errors import ConfigError
from bot.settings import parse_settings


@pytest.mark.parametrize("max_new_tokens", [512, 600])
def test_reply_reservation_at_or_over_the_context_budget_is_refused(max_new_tokens: int) -> None:
    config = {"history": {"max_context_tokens": 512}, "generation": {"max_new_tokens": max_new_tokens}}

    with pytest.raises(ConfigError) as caught:
        parse_settings(config)

    message = str(caught.value)
    assert "history.max_context_tokens (512) must be greater than generation.max_new_tokens" in message
    assert "{'history'" not in message  # the whole file is not dumped as the "input"


def test_unset_max_new_tokens_or_a_larger_context_is_accepted() -> None:
    unset = parse_settings({"history": {"max_context_tokens": 256}, "generation": {"max_new_tokens": None}})
    larger = parse_settings({"history": {"max_context_tokens": 513}, "generation": {"max_new_tokens": 512}})

    assert unset.generation.max_new_tokens is None
    assert larger.history.max_context_tokens == 513
