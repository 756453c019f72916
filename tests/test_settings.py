"""Config: the example file is complete and valid, and every mistake names its key."""

import tomllib
from pathlib import Path

import pytest

from bot.errors import ConfigError
from bot.settings import Settings, discord_token, load_settings, parse_settings

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def _keys(model: type) -> set[str]:
    return set(model.model_fields)


def test_example_config_is_valid_and_matches_defaults() -> None:
    assert load_settings(EXAMPLE) == Settings()


def test_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    data = tomllib.loads(text)
    for section, field in Settings.model_fields.items():
        assert section in data, f"[{section}] missing from config.example.toml"
        for key in _keys(field.annotation):
            assert key in data[section] or f"# {key} =" in text, f"{section}.{key} is not documented"


def test_unknown_key_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"model\.nmae_or_path: unknown key"):
        parse_settings({"model": {"nmae_or_path": "x"}})


def test_wrong_value_names_key_and_expectation() -> None:
    with pytest.raises(ConfigError, match=r"vision\.max_images_per_message: Input should be less than"):
        parse_settings({"vision": {"max_images_per_message": 50}})
    with pytest.raises(ConfigError, match=r"model\.dtype: Input should be 'auto'"):
        parse_settings({"model": {"dtype": "float8"}})


@pytest.mark.parametrize(
    ("shards", "expected"),
    [
        ({"shard_ids": [0]}, "shard_ids needs shard_count"),
        ({"shard_count": 2, "shard_ids": [1, 1]}, "each of this process's shards once"),
        ({"shard_count": 2, "shard_ids": [2]}, r"between 0 and shard_count - 1 \(1\)"),
    ],
)
def test_shard_ids_must_fit_the_shard_count(shards: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_settings({"discord": shards})
    assert parse_settings({"discord": {"shard_count": 4, "shard_ids": [3, 1]}}).discord.shard_ids == [3, 1]


def test_min_pixels_above_max_pixels_is_refused() -> None:
    with pytest.raises(ConfigError, match="min_pixels must not be greater than max_pixels"):
        parse_settings({"vision": {"min_pixels": 2_000_000, "max_pixels": 1_000_000}})


def test_broken_toml_and_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\nname_or_path = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "absent.toml")


def test_generation_kwargs_leave_unset_options_to_the_model() -> None:
    settings = parse_settings({"generation": {"max_new_tokens": 64, "temperature": 0.7}})
    assert settings.generation.generate_kwargs() == {"max_new_tokens": 64, "temperature": 0.7}


def test_storage_defaults_live_under_the_data_dir(tmp_path: Path) -> None:
    settings = parse_settings({"storage": {"data_dir": str(tmp_path)}})
    assert settings.storage.resolved_database_url == f"sqlite:///{tmp_path.as_posix()}/bot.sqlite3"
    assert settings.storage.resolved_media_dir == tmp_path / "media"


def test_token_comes_from_the_environment_and_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="DISCORD_TOKEN"):
        discord_token()
    monkeypatch.setenv("DISCORD_TOKEN", "secret-token-value")
    token = discord_token()
    assert token.get_secret_value() == "secret-token-value"
    assert "secret-token-value" not in repr(token) and "secret-token-value" not in str(token)


def test_streaming_edits_are_at_most_one_per_second() -> None:
    with pytest.raises(ConfigError, match=r"discord\.stream_edit_interval_seconds: Input should be greater"):
        parse_settings({"discord": {"stream_edit_interval_seconds": 0.5}})
