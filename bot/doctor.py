"""`python -m bot doctor`: is this set-up ready to run? One line per check, ✓, ✗ with what to do, or skipped.

Each check is one function returning a `CheckResult`. Its body returns the ✓ line's detail or raises a
`BotError` whose sentence says what to do (a Discord HTTP error or a timeout is a ✗ too). A check that needs
one that failed (everything on Discord needs a login) reports "skipped" instead of running. Every check has
its own timeout, and nothing changes: no migration, no download, no model loaded, no command synced. On the
server backend torch is never imported. The Discord token is used, never printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, ParamSpec, TypeVar

import aiohttp
import discord
from sqlalchemy.engine import make_url

from bot.discord.client import log_in, use_api_base
from bot.discord.commands import build_commands
from bot.engine.model_files import check_device_map, locate_model_files
from bot.errors import BotError, ConfigError, ModelLoadError, format_bytes
from bot.media.storage import INCOMING_PREFIX
from bot.settings import DiscordSettings, ModelSettings, Settings, StorageSettings, discord_token
from bot.store.database import schema_revisions

P = ParamSpec("P")
T = TypeVar("T")

DISCORD_TIMEOUT_SECONDS = 10.0
CHANNELS_TIMEOUT_SECONDS = 30.0  # a few REST calls per guild
MODEL_TIMEOUT_SECONDS = 20.0  # the hub probe, then the hub's file list
GPU_TIMEOUT_SECONDS = 60.0  # importing torch is slow on a small machine
SERVER_TIMEOUT_SECONDS = 30.0
LOCAL_TIMEOUT_SECONDS = 10.0
GPU_HEADROOM = 1.2  # weights plus activations and the KV cache of a few answers
LISTED = 5  # names shown in one line before "and N more"
MAX_GUILDS_CHECKED = 10  # channel permissions cost three REST calls per guild

# What the bot needs in a channel it answers in: README's invite URL grants exactly these.
REQUIRED_PERMISSIONS = (
    ("view_channel", "View Channel"),
    ("send_messages", "Send Messages"),
    ("read_message_history", "Read Message History"),
    ("create_public_threads", "Create Public Threads"),
    ("send_messages_in_threads", "Send Messages in Threads"),
    ("attach_files", "Attach Files"),
    ("embed_links", "Embed Links"),
)


class Status(enum.Enum):
    """How a check ended; the value is the line's mark."""

    OK = "✓"
    FAILED = "✗"
    SKIPPED = "-"


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: its name, status and a sentence (for ✗: what is wrong and what to do)."""

    name: str
    status: Status
    detail: str

    def line(self) -> str:
        """The line the CLI prints."""
        return f"{self.status.value} {self.name}: {self.detail}"


class Check(Generic[P]):
    """A named check: runs its body under a timeout and turns the outcome into a `CheckResult`."""

    def __init__(self, name: str, timeout: float, hint: str, body: Callable[P, Awaitable[str]]) -> None:
        self.name = name
        self._timeout = timeout
        self._hint = hint
        self._body = body
        functools.update_wrapper(self, body)

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> CheckResult:
        try:
            async with asyncio.timeout(self._timeout):
                detail = await self._body(*args, **kwargs)
        except TimeoutError:
            return self._failed(f"no result within {self._timeout:.0f} s: {self._hint}")
        except BotError as exc:
            return self._failed(str(exc))
        except discord.HTTPException as exc:
            return self._failed(f"Discord answered HTTP {exc.status}: {exc.text or exc.response.reason}")
        except aiohttp.ClientError as exc:
            return self._failed(f"lost the connection to Discord ({type(exc).__name__})")
        return CheckResult(self.name, Status.OK, detail)

    def skipped(self, reason: str) -> CheckResult:
        """This check's line when a check it needs failed."""
        return CheckResult(self.name, Status.SKIPPED, f"skipped ({reason})")

    def _failed(self, detail: str) -> CheckResult:
        return CheckResult(self.name, Status.FAILED, detail)


def check(
    name: str, *, timeout: float, hint: str = "check the network and the address in the config"
) -> Callable[[Callable[P, Awaitable[str]]], Check[P]]:
    """Make a check of a body that returns the ✓ detail or raises a BotError saying what to do; `hint` is
    what to do when it takes longer than `timeout` seconds."""
    return lambda body: Check(name, timeout, hint, body)


async def run_doctor(settings: Settings) -> int:
    """Run every check, printing each line as it comes; the exit status is 1 when any check failed."""
    failed = False
    async for result in run_checks(settings):
        print(result.line(), flush=True)
        failed = failed or result.status is Status.FAILED
    return 1 if failed else 0


async def run_checks(settings: Settings) -> AsyncIterator[CheckResult]:
    """Every check for `settings`, in order: Discord, the model (or inference server), the store."""
    async for result in _discord_checks(settings.discord):
        yield result
    if settings.engine.backend == "server":
        yield await check_inference_server(settings)
    else:
        yield await check_model_files(settings.model)
        yield await check_gpu(settings.model)
    yield await check_database(settings.storage)
    yield await check_media_dir(settings.storage)


async def _discord_checks(settings: DiscordSettings) -> AsyncIterator[CheckResult]:
    use_api_base(settings.api_base_url)
    # REST only, so intents do not matter; without the guilds intent discord.py warns about its cache.
    async with discord.Client(intents=discord.Intents(guilds=True)) as client:
        token = await check_token(client, settings)
        yield token
        if token.status is not Status.OK:
            for dependent in (
                check_message_content_intent,
                check_guilds,
                check_channels,
                check_slash_commands,
            ):
                yield dependent.skipped("needs a Discord login")
            return
        yield await check_message_content_intent(client)
        guilds = await check_guilds(client, settings)
        yield guilds
        if guilds.status is Status.OK:
            yield await check_channels(client, settings)
        else:
            yield check_channels.skipped("needs the bot in a guild")
        yield await check_slash_commands(client)


# -- Discord ---------------------------------------------------------------------------------------------


@check("Discord token", timeout=DISCORD_TIMEOUT_SECONDS)
async def check_token(client: discord.Client, settings: DiscordSettings) -> str:
    """Log `client` in with $DISCORD_TOKEN; the later Discord checks use that session."""
    await log_in(client, settings, discord_token())
    assert client.user is not None
    return f"accepted for {client.user} (id {client.user.id})"


@check("Message content intent", timeout=DISCORD_TIMEOUT_SECONDS)
async def check_message_content_intent(client: discord.Client) -> str:
    """The application's flags (fetched at login): without the intent, messages arrive without content."""
    application = client.application
    assert application is not None
    if application.flags.gateway_message_content:
        return "enabled"
    if application.flags.gateway_message_content_limited:
        return "enabled (the bot is in under 100 servers, so no verification is needed)"
    raise ConfigError(
        "not enabled, so the bot would see no text or images in messages: enable MESSAGE CONTENT INTENT in "
        "the Developer Portal → Bot"
    )


@check("Guilds", timeout=DISCORD_TIMEOUT_SECONDS)
async def check_guilds(client: discord.Client, settings: DiscordSettings) -> str:
    """The bot is in at least one guild, and in every guild the allow-list names."""
    joined = [guild async for guild in client.fetch_guilds(limit=None)]
    if not joined:
        raise ConfigError(
            "the bot is in no guild: invite it with the OAuth2 URL (README, Creating the Discord application)"
        )
    absent = sorted(set(settings.allowed_guild_ids) - {guild.id for guild in joined})
    if absent:
        raise ConfigError(
            f"the bot is not in {_listing(str(guild_id) for guild_id in absent)}, which "
            "discord.allowed_guild_ids lists: invite it there, or correct the list"
        )
    return f"in {_listing(guild.name for guild in joined)}"


@check("Channels", timeout=CHANNELS_TIMEOUT_SECONDS)
async def check_channels(client: discord.Client, settings: DiscordSettings) -> str:
    """In each allowed channel (with no channel allow-list: each text channel it can see in its allowed
    guilds) the bot can read, answer and open threads; permissions computed from roles and overwrites."""
    listed = set(settings.allowed_channel_ids)
    allowed = [
        guild.id
        async for guild in client.fetch_guilds(limit=None)
        if not settings.allowed_guild_ids or guild.id in settings.allowed_guild_ids
    ]
    # Without a channel allow-list a bot in many guilds would take minutes: a sample tells enough.
    checked = allowed if listed else allowed[:MAX_GUILDS_CHECKED]
    ready: list[str] = []
    lacking: list[str] = []
    found: set[int] = set()
    for guild_id in checked:
        for channel_id, where, missing in await _channel_permissions(client, guild_id, listed):
            found.add(channel_id)
            if missing:
                lacking.append(f"{where} lacks {', '.join(missing)}")
            else:
                ready.append(where)
    problems = []
    if lacking:
        problems.append(
            "; ".join(lacking) + ": grant them to the bot's role (Server Settings → Roles, or the channel's "
            "Edit Channel → Permissions)"
        )
    if listed - found:
        problems.append(
            f"{_listing(str(channel_id) for channel_id in sorted(listed - found))} in "
            "discord.allowed_channel_ids is not a channel of the bot's allowed guilds: correct the list"
        )
    if not ready and not problems:
        problems.append("the bot can see no text channel: give its role View Channel where it should answer")
    if problems:
        raise ConfigError("; ".join(problems))
    sample = f" (in {len(checked)} of its {len(allowed)} guilds)" if len(checked) < len(allowed) else ""
    return f"can read, answer and open threads in {_listing(ready)}{sample}"


async def _channel_permissions(
    client: discord.Client, guild_id: int, listed: set[int]
) -> list[tuple[int, str, list[str]]]:
    """(id, "#name (guild)", the required permissions it lacks) for each channel of the guild that the check
    covers: those `listed`, or with none listed, each text channel the bot can see."""
    assert client.user is not None
    guild = await client.fetch_guild(guild_id)
    me = await guild.fetch_member(client.user.id)
    covered = []
    for channel in await guild.fetch_channels():
        permissions = channel.permissions_for(me)
        if listed:
            if channel.id not in listed:
                continue
        elif not isinstance(channel, discord.TextChannel) or not permissions.view_channel:
            continue  # a channel the bot cannot see sends it no messages: nothing to answer there
        missing = [label for name, label in REQUIRED_PERMISSIONS if not getattr(permissions, name)]
        covered.append((channel.id, f"#{channel.name} ({guild.name})", missing))
    return covered


@check("Slash commands", timeout=DISCORD_TIMEOUT_SECONDS)
async def check_slash_commands(client: discord.Client) -> str:
    """The application's global commands are exactly the bot's own command tree, by name."""
    assert client.application_id is not None
    expected = {command.name for command in build_commands()}
    registered = {command["name"] for command in await client.http.get_global_commands(client.application_id)}
    problems = []
    if expected - registered:
        problems.append(f"not registered: {_listing(sorted(expected - registered))}")
    if registered - expected:
        problems.append(f"registered but not the bot's: {_listing(sorted(registered - expected))}")
    if problems:
        raise ConfigError(f"{'; '.join(problems)}: run python -m bot sync-commands")
    return f"registered: {', '.join(sorted(expected))}"


# -- the model -------------------------------------------------------------------------------------------


@check("Model files", timeout=MODEL_TIMEOUT_SECONDS)
async def check_model_files(model: ModelSettings) -> str:
    """Where `from_pretrained` would find the files (a directory, the cache or the hub), without loading."""
    files = await _blocking(locate_model_files, model)
    return f"{files.where}: {format_bytes(files.weights_bytes)} of weights"


@check("GPU", timeout=GPU_TIMEOUT_SECONDS, hint="check the GPU driver (nvidia-smi)")
async def check_gpu(model: ModelSettings) -> str:
    """Whether the device map can be served, and the free GPU memory against the weights' size."""
    return await _blocking(_gpu_report, model)


def _gpu_report(model: ModelSettings) -> str:
    import torch  # only here: the in-process engine loads it anyway, the server backend never comes here

    cuda = torch.cuda.is_available()
    check_device_map(model.device_map, cuda_available=cuda)
    if not cuda:
        return "none (torch sees no CUDA device): the model runs on the CPU, which suits only small models"
    if model.device_map in (None, "cpu"):
        return f"CUDA is available, but model.device_map = {model.device_map!r}: the model runs on the CPU"
    assert model.device_map is not None
    if model.device_map.startswith("cuda"):
        devices = [torch.device(model.device_map).index or 0]
    else:
        devices = list(range(torch.cuda.device_count()))
    free = total = 0
    for index in devices:
        device_free, device_total = torch.cuda.mem_get_info(index)
        free, total = free + device_free, total + device_total
    names = ", ".join(f"{index}: {torch.cuda.get_device_name(index)}" for index in devices)
    summary = f"{names}; {format_bytes(free)} free of {format_bytes(total)}"
    try:
        weights = locate_model_files(model).weights_bytes
    except ModelLoadError:
        return f"{summary} (the model's size is unknown: see Model files)"
    if free < weights * GPU_HEADROOM:
        raise ConfigError(
            f"{summary}, but the weights alone take {format_bytes(weights)}: free GPU memory (other "
            "processes?), use a smaller model or dtype, or more GPUs"
        )
    return f"{summary}; the weights take {format_bytes(weights)}"


@check("Inference server", timeout=SERVER_TIMEOUT_SECONDS)
async def check_inference_server(settings: Settings) -> str:
    """The server answers `GET /v1/models` and lists `server.model`: what the engine checks at start."""
    from bot.engine.server import ServerEngine  # imports no torch

    engine = ServerEngine(settings)
    await engine.start()
    await engine.stop(grace=0)
    return f"{settings.server.base_url} serves {settings.server.model!r}"


# -- the store -------------------------------------------------------------------------------------------


@check("Database", timeout=LOCAL_TIMEOUT_SECONDS)
async def check_database(storage: StorageSettings) -> str:
    """The database answers and its schema is at the newest migration (nothing is migrated)."""
    current, head = await _blocking(
        schema_revisions, storage.resolved_database_url, busy_timeout_ms=storage.sqlite_busy_timeout_ms
    )
    where = make_url(storage.resolved_database_url).render_as_string(hide_password=True)
    if current == head:
        return f"{where} is at the newest schema ({head})"
    state = "has no schema yet" if current is None else f"is at revision {current}, not the newest ({head})"
    raise ConfigError(f"{where} {state}: run python -m bot db upgrade")


@check("Media directory", timeout=LOCAL_TIMEOUT_SECONDS, hint="check the disk or network file system")
async def check_media_dir(storage: StorageSettings) -> str:
    """The media directory exists, the bot can write there, and only its owner can read it."""
    return await _blocking(_media_dir_report, storage.resolved_media_dir)


def _media_dir_report(directory: Path) -> str:
    if not directory.is_dir():
        raise ConfigError(
            f"{directory} does not exist: run python -m bot db upgrade (which creates it), or correct "
            "storage.media_dir"
        )
    try:
        handle, name = tempfile.mkstemp(dir=directory, prefix=INCOMING_PREFIX)
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(
            f"cannot write in {directory} ({exc.strerror}): make the bot's user its owner"
        ) from None
    status = directory.stat()
    if status.st_uid != os.getuid():
        raise ConfigError(f"{directory} belongs to another user: make the bot's user its owner (chown)")
    mode = status.st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"{directory} is open to other users (mode {mode:o}): chmod 700 {directory}")
    return f"{directory} is writable and private to its owner"


# -- helpers ---------------------------------------------------------------------------------------------


async def _blocking(call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`call` in a daemon thread, so a call that outlives its check's timeout never holds up the exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():  # cancelled by the timeout: nobody waits
            outcome()

    def work() -> None:
        try:
            result = call(*args, **kwargs)
        except BaseException as exc:  # handed to the waiting coroutine, which decides
            outcome = functools.partial(future.set_exception, exc)
        else:
            outcome = functools.partial(future.set_result, result)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=work, name=f"doctor-{call.__name__}", daemon=True).start()
    return await future


def _listing(names: Iterable[str]) -> str:
    """Up to `LISTED` names, then how many more."""
    names = list(names)
    shown = ", ".join(names[:LISTED])
    return f"{shown} and {len(names) - LISTED} more" if len(names) > LISTED else shown
