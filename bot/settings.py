"""Validated configuration, read from one TOML file at start.

Every section is a pydantic model that forbids unknown keys, so a typo fails at start with the key's dotted
name and what was expected instead of being silently ignored. `config.example.toml` documents every key.
The Discord token is never part of the file: it is read from the `DISCORD_TOKEN` environment variable.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_core import ErrorDetails

from bot.errors import ConfigError

TOKEN_ENV_VAR = "DISCORD_TOKEN"
DISCORD_CDN_HOSTS = ["cdn.discordapp.com", "media.discordapp.net"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiscordSettings(_Section):
    """How the bot reaches Discord and whom it answers."""

    api_base_url: str = "https://discord.com/api/v10"
    gateway_url: str | None = None  # None: ask `GET /gateway/bot`, as Discord documents
    allowed_guild_ids: list[int] = Field(default_factory=list)
    allowed_channel_ids: list[int] = Field(default_factory=list)
    allowed_role_ids: list[int] = Field(default_factory=list)
    allowed_user_ids: list[int] = Field(default_factory=list)
    allow_dms: bool = True
    answer_in_new_thread: bool = False
    answer_in_bot_threads_without_mention: bool = True
    sync_commands_on_start: bool = True
    stream_edit_interval_seconds: float = Field(default=1.2, ge=1.0, le=30)  # Discord limits edit rates
    answer_file_after_messages: int = Field(default=3, ge=1, le=10)  # longer answers come as answer.md
    resume_window_seconds: float = Field(default=600.0, ge=0)  # unfinished questions answered after a restart
    shard_count: int | None = Field(default=None, ge=1)  # None: Discord's recommendation (GET /gateway/bot)
    shard_ids: list[int] | None = None  # the shards this process runs; None: all of them

    @model_validator(mode="after")
    def _shards_in_range(self) -> DiscordSettings:
        if self.shard_ids is None:
            return self
        if self.shard_count is None:
            raise ValueError("shard_ids needs shard_count: the total number of shards over all processes")
        if not self.shard_ids or len(set(self.shard_ids)) != len(self.shard_ids):
            raise ValueError("shard_ids must list each of this process's shards once")
        if not all(0 <= shard < self.shard_count for shard in self.shard_ids):
            raise ValueError(f"shard_ids must be between 0 and shard_count - 1 ({self.shard_count - 1})")
        return self


class LimitSettings(_Section):
    """Per-user limits on questions (messages and commands alike); members with an exempt role skip them."""

    max_in_flight_per_user: int = Field(default=3, ge=1)
    questions_per_minute: float = Field(default=6.0, gt=0)  # the token bucket's refill rate
    burst: int = Field(default=5, ge=1)  # questions a user may ask at once before the rate applies
    exempt_role_ids: list[int] = Field(default_factory=list)


class ModelSettings(_Section):
    """Every `from_pretrained` option the seed notebook lists, plus the attention implementation."""

    name_or_path: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    revision: str | None = None
    cache_dir: str | None = None
    local_files_only: bool = False
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device_map: str | None = "auto"
    low_cpu_mem_usage: bool = True
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"


class VisionSettings(_Section):
    """Image and video budgets; every image is resized into [min_pixels, max_pixels]."""

    min_pixels: int = Field(default=256 * 28 * 28, ge=4 * 28 * 28)
    max_pixels: int = Field(default=1280 * 28 * 28, ge=4 * 28 * 28)
    max_images_per_message: int = Field(default=4, ge=1, le=10)
    max_images_in_context: int = Field(default=8, ge=1)
    video_max_frames: int = Field(default=16, ge=2)
    video_fps: float = Field(default=1.0, gt=0)
    video_max_pixels: int = Field(default=256 * 28 * 28, ge=4 * 28 * 28)

    @model_validator(mode="after")
    def _pixels_ordered(self) -> VisionSettings:
        if self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels must not be greater than max_pixels")
        return self


class GenerationSettings(_Section):
    """Options passed to `generate`; what is left unset keeps the model's own generation_config.json."""

    max_new_tokens: int | None = Field(default=512, ge=1)
    do_sample: bool | None = None
    temperature: float | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    system_prompt: str | None = "You are a helpful assistant."

    def generate_kwargs(self) -> dict[str, object]:
        """The options the config sets, ready for `model.generate(**kwargs)`."""
        fields = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
        return {name: getattr(self, name) for name in fields if getattr(self, name) is not None}


class HistorySettings(_Section):
    """How much of a conversation goes back to the model, and how long it is kept."""

    max_turns: int = Field(default=20, ge=1)
    max_context_tokens: int = Field(default=8192, ge=256)
    retention_days: int = Field(default=90, ge=0)  # 0: keep every turn forever

    @property
    def retention(self) -> int | None:
        """Days turns are kept, or None to keep them forever."""
        return self.retention_days or None


class StorageSettings(_Section):
    """Where conversations and downloaded media live."""

    data_dir: Path = Path("data")
    database_url: str | None = None  # None: sqlite file `<data_dir>/bot.sqlite3`
    media_dir: Path | None = None  # None: `<data_dir>/media`
    sqlite_busy_timeout_ms: int = Field(default=5000, ge=0)
    # A turn the database refused for a passing reason (locked, busy, connection lost) is retried this long.
    write_retry_seconds: float = Field(default=30.0, ge=0)

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data directory."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'bot.sqlite3').as_posix()}"

    @property
    def resolved_media_dir(self) -> Path:
        """The media directory, defaulting to `<data_dir>/media`."""
        return self.media_dir or self.data_dir / "media"


class MediaSettings(_Section):
    """Safe downloading of attachments."""

    allowed_hosts: list[str] = Field(default_factory=lambda: list(DISCORD_CDN_HOSTS))
    max_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(default=64_000_000, ge=1)
    max_video_bytes: int = Field(default=50 * 1024 * 1024, ge=1024)
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    total_timeout_seconds: float = Field(default=30.0, gt=0)
    retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_seconds: float = Field(default=0.5, ge=0)


class EngineSettings(_Section):
    """Which backend answers, and its queue; batching and caches apply to the in-process engine."""

    backend: Literal["local", "server"] = "local"
    max_queue_size: int = Field(default=32, ge=1)
    max_batch_size: int = Field(default=8, ge=1)
    max_batch_tokens: int = Field(default=32768, ge=256)
    batch_wait_ms: float = Field(default=5.0, ge=0)
    join_interval_steps: int = Field(default=16, ge=0)
    vision_cache_mb: int = Field(default=256, ge=0)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    request_timeout_seconds: float = Field(default=600.0, gt=0)


class ServerSettings(_Section):
    """An OpenAI-compatible inference server used when `engine.backend = "server"`."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    api_key_env: str = "INFERENCE_API_KEY"  # the environment variable holding the key; unset: no key
    max_in_flight: int = Field(default=8, ge=1)
    connect_timeout_seconds: float = Field(default=3.0, gt=0)
    first_token_timeout_seconds: float = Field(default=120.0, gt=0)
    answer_timeout_seconds: float = Field(default=300.0, gt=0)
    retry_deadline_seconds: float = Field(default=20.0, ge=0)
    accepts_video: bool = False
    image_cache_mb: int = Field(default=128, ge=0)
    extra_body: dict[str, Any] = Field(default_factory=dict)

    def api_key(self) -> SecretStr | None:
        """The key from the environment variable `api_key_env`, or None when it is unset or empty."""
        value = os.environ.get(self.api_key_env, "").strip() if self.api_key_env else ""
        return SecretStr(value) if value else None


class MetricsSettings(_Section):
    """The HTTP endpoint for Prometheus metrics and health checks (`bot.health`); off by default."""

    enabled: bool = False
    host: str = "127.0.0.1"  # loopback: reachable from this machine only
    port: int = Field(default=9464, ge=0, le=65535)  # 0: any free port


class Settings(_Section):
    """The whole configuration."""

    discord: DiscordSettings = Field(default_factory=DiscordSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    vision: VisionSettings = Field(default_factory=VisionSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    history: HistorySettings = Field(default_factory=HistorySettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    media: MediaSettings = Field(default_factory=MediaSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    @model_validator(mode="after")
    def _reply_fits_the_context(self) -> Settings:
        new_tokens = self.generation.max_new_tokens
        if new_tokens is not None and new_tokens >= self.history.max_context_tokens:
            raise ValueError(
                f"history.max_context_tokens ({self.history.max_context_tokens}) must be greater than "
                f"generation.max_new_tokens ({new_tokens}): the reply is reserved out of the context budget, "
                "so no history would ever be sent"
            )
        return self


def _describe(error: ErrorDetails) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (check the spelling against config.example.toml)"
    if not key:  # a check across sections names its keys itself; its input is the whole file
        return error["msg"]
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def parse_settings(data: dict) -> Settings:
    """Validate a parsed TOML document; raise ConfigError naming each wrong key."""
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "\n  ".join(_describe(error) for error in exc.errors())
        raise ConfigError(f"invalid configuration:\n  {problems}") from None


def load_settings(path: Path | None) -> Settings:
    """Read and validate the TOML file at `path`; `None` gives the defaults."""
    if path is None:
        return Settings()
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return parse_settings(data)


def discord_token() -> SecretStr:
    """The bot token from the environment; raise ConfigError when it is missing."""
    token = os.environ.get(TOKEN_ENV_VAR, "").strip()
    if not token:
        raise ConfigError(f"set the {TOKEN_ENV_VAR} environment variable to your bot's token")
    return SecretStr(token)
