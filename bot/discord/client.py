"""The Discord client: connection settings, intents, safe mentions, start-up and shutdown.

It only wires things: messages go to `MessageHandler`, interactions to the command tree, and both call the
answering service. `run_discord` is the entry point of `python -m bot run`; `sync_commands` of
`python -m bot sync-commands`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

import aiohttp
import discord
import yarl
from discord.gateway import DiscordWebSocket
from discord.http import Route
from pydantic import SecretStr

from bot.answering import AnswerService
from bot.discord.access import AccessPolicy
from bot.discord.commands import GuardedCommandTree, build_commands
from bot.discord.delivery import DeliveryTracker
from bot.discord.limits import UserLimits
from bot.discord.messages import MessageHandler
from bot.discord.resuming import resume_unfinished
from bot.discord.stopping import RunningAnswers, StopButton
from bot.errors import ConfigError, DiscordUnreachable
from bot.health import Readiness
from bot.metrics import Metrics
from bot.settings import DiscordSettings, LimitSettings, Settings

log = logging.getLogger("bot.discord")

# At shutdown, the last seconds of the grace period edit the replies still unfinished (at most this long).
FINAL_EDITS_SECONDS = 5.0
# discord.py's close (gateway close frames, HTTP session) gets this long; a gateway that is down must not
# hold the exit.
CLOSE_SECONDS = 5.0

# Model output must never ping anyone; replying to the asker keeps Discord's usual reply notification.
SAFE_MENTIONS = discord.AllowedMentions(everyone=False, roles=False, users=False, replied_user=True)


def bot_intents() -> discord.Intents:
    """Guild and DM messages with their content; nothing else (no members, no presences)."""
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = True
    return intents


# The bot never joins voice: discord.py's start-up warnings about voice libraries are noise here.
discord.VoiceClient.warn_nacl = False
discord.VoiceClient.warn_dave = False


def use_api_base(api_base_url: str) -> None:
    """Send REST calls to `api_base_url` (discord.py builds every route from the class attribute)."""
    Route.BASE = api_base_url.rstrip("/")


def use_gateway(gateway_url: str) -> None:
    """Connect the gateway to `gateway_url`.

    discord.py's `Client.connect` opens `DiscordWebSocket.DEFAULT_GATEWAY` first and again after an
    invalidated session, and resumes at READY's `resume_gateway_url` (which the server names). Setting the
    class attribute therefore covers every path, where overriding `connect` would mean copying its whole
    reconnect loop. Like `Route.BASE` it is process-wide, which fits: one process talks to one Discord.
    """
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


class VisionBot(discord.AutoShardedClient):
    """The bot: answers mentions, replies, bot threads and DMs, plus the slash commands.

    It runs the shards `discord.shard_ids` names (all of them by default) of `discord.shard_count` (Discord's
    recommendation by default); other processes may run the rest, on the same database. `metrics` counts
    Discord's HTTP error responses (429s included) through discord.py's `http_trace`.
    """

    def __init__(
        self,
        settings: DiscordSettings,
        limits: LimitSettings,
        service: AnswerService,
        *,
        metrics: Metrics | None = None,
        **options: Any,
    ) -> None:
        if settings.shard_ids is not None:
            options["shard_ids"] = settings.shard_ids
        trace = (metrics or Metrics()).discord_http_trace()
        super().__init__(
            intents=bot_intents(),
            allowed_mentions=SAFE_MENTIONS,
            shard_count=settings.shard_count,
            http_trace=trace,
            **options,
        )
        self._disconnected_shards: set[int] = set()  # from a disconnect to the reconnect or resume
        self._settings = settings
        self._service = service
        self.tree = GuardedCommandTree(self)
        for command in build_commands():
            self.tree.add_command(command)
        self.deliveries = DeliveryTracker()
        self._access = AccessPolicy(self, settings)
        self._limits = UserLimits(limits)
        self._running_answers = RunningAnswers()
        self._messages = MessageHandler(self, self)
        self._resuming: asyncio.Task[None] | None = None  # answering what an earlier process left unfinished

    @property
    def service(self) -> AnswerService:
        """The answering service every event ends up in."""
        return self._service

    @property
    def discord_settings(self) -> DiscordSettings:
        """The `[discord]` section of the configuration."""
        return self._settings

    @property
    def access(self) -> AccessPolicy:
        """The allow-lists, applied to messages and commands alike."""
        return self._access

    @property
    def limits(self) -> UserLimits:
        """The per-user limits, applied to messages and commands alike."""
        return self._limits

    @property
    def running_answers(self) -> RunningAnswers:
        """The answers in progress that a Stop button can end."""
        return self._running_answers

    async def login(self, token: str) -> None:
        """Log in at the configured REST base URL; pick the gateway and the shard count (each configured, or
        from `GET /gateway/bot`)."""
        use_api_base(self._settings.api_base_url)
        await super().login(token)
        gateway_url = self._settings.gateway_url
        if gateway_url is None or self.shard_count is None:
            recommended_shards, advertised_url, _limits = await self.http.get_bot_gateway()
            gateway_url = gateway_url or advertised_url
            self.shard_count = self.shard_count or recommended_shards
        use_gateway(gateway_url)  # AutoShardedClient connects there once shard_count is known
        shards = self.shard_ids or range(self.shard_count)
        log.info(
            "logged in as %s (id %s); gateway %s; shards %s of %d",
            self.user,
            self.user and self.user.id,
            gateway_url,
            ", ".join(map(str, shards)),
            self.shard_count,
        )

    async def setup_hook(self) -> None:
        self.add_dynamic_items(
            StopButton
        )  # Stop presses reach their answer, also on messages sent before a restart
        if not self._settings.sync_commands_on_start:
            return
        try:
            synced = await self.tree.sync()
        except discord.HTTPException as exc:
            log.error("could not sync slash commands (HTTP %s): %s", exc.status, exc.text)
            return
        log.info("synced %d application commands", len(synced))

    async def readiness(self) -> str | None:
        """None while connected to the gateway with the guilds loaded, else why not."""
        if self.is_closed():
            return "the Discord connection is closed"
        if not self.is_ready():
            return "not connected to the Discord gateway yet"
        if self._disconnected_shards:
            shards = ", ".join(map(str, sorted(self._disconnected_shards)))
            return f"disconnected from the Discord gateway (shard {shards}); reconnecting"
        return None

    async def on_shard_connect(self, shard_id: int) -> None:
        self._disconnected_shards.discard(shard_id)

    async def on_shard_resumed(self, shard_id: int) -> None:
        self._disconnected_shards.discard(shard_id)

    async def on_shard_disconnect(self, shard_id: int) -> None:
        self._disconnected_shards.add(shard_id)

    async def on_ready(self) -> None:
        log.info("connected to Discord; in %d guilds on this process's shards", len(self.guilds))
        if self._resuming is None:  # on_ready fires again after a re-identify: resume once per process
            self._resuming = asyncio.create_task(resume_unfinished(self, self), name="resume-unfinished")

    async def shut_down(self, grace: float) -> None:
        """Stop taking questions, give the answers in progress `grace` seconds (the last few of them to edit
        the replies still unfinished to a sentence; their questions stay kept for the next start), close."""
        reserve = min(FINAL_EDITS_SECONDS, grace / 2)
        if not await self.deliveries.drain(grace - reserve):
            count = await self.deliveries.interrupt(reserve)
            log.warning(
                "%d answers were still running after %.0fs; they are answered after the restart", count, grace
            )
        if self._resuming is not None:
            self._resuming.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.close(), CLOSE_SECONDS)

    async def on_message(self, message: discord.Message) -> None:
        await self._messages.handle(message)


async def run_discord(
    settings: Settings, token: SecretStr, service: AnswerService, *, metrics: Metrics, readiness: Readiness
) -> None:
    """Run the bot until SIGINT/SIGTERM or a fatal gateway error; always close the connection cleanly.

    The gateway is on `readiness` while the client runs.
    """
    client = VisionBot(settings.discord, settings.limits, service, metrics=metrics)
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    try:
        async with client:
            with readiness.watch("gateway", client.readiness):
                connection = asyncio.create_task(client.start(token.get_secret_value()))
                handled = _close_on_signals(
                    loop, client, connection, grace=settings.engine.shutdown_grace_seconds
                )
                try:
                    await connection
                except asyncio.CancelledError:
                    if not connection.cancelled() or _being_cancelled():
                        raise  # else the shutdown ended a wait for the gateway (a reconnect backoff)
    except discord.LoginFailure:
        raise ConfigError("Discord rejected the bot token: check DISCORD_TOKEN") from None
    except discord.PrivilegedIntentsRequired:
        raise ConfigError(
            "Discord refused the MESSAGE CONTENT intent: switch it on for this bot in the Developer Portal "
            "(Bot → Privileged Gateway Intents)"
        ) from None
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
    log.info("disconnected from Discord")


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _close_on_signals(
    loop: asyncio.AbstractEventLoop, client: VisionBot, connection: asyncio.Task[None], *, grace: float
) -> list[signal.Signals]:
    """On the first SIGINT/SIGTERM shut down (`VisionBot.shut_down`), then end `connection`, which may be
    waiting out discord.py's reconnect backoff; on the second, exit at once."""
    closing: set[asyncio.Task[None]] = set()

    async def shut_down() -> None:
        await client.shut_down(grace)
        connection.cancel()

    def request_close(sig: signal.Signals) -> None:
        if closing:
            # Exiting at once is safe: every unfinished question is kept, and answered at the next start.
            log.warning("received %s again; exiting now", sig.name)
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stdout.flush()
            os._exit(128 + sig.value)
        log.info(
            "received %s; finishing %d answers in progress, then closing the Discord connection",
            sig.name,
            client.deliveries.active,
        )
        task = loop.create_task(shut_down())
        closing.add(task)

    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, request_close, sig)
        except (NotImplementedError, RuntimeError):  # not on Windows' loop, or not in the main thread
            continue
        handled.append(sig)
    return handled


async def check_token(settings: DiscordSettings, token: SecretStr) -> None:
    """One REST call: is Discord reachable, and does it accept `token`? Run it before the model loads."""
    use_api_base(settings.api_base_url)
    async with discord.Client(intents=discord.Intents.none()) as client:
        await log_in(client, settings, token)


async def log_in(client: discord.Client, settings: DiscordSettings, token: SecretStr) -> None:
    """`client.login`, with its failures as one sentence each."""
    try:
        await client.login(token.get_secret_value())
    except discord.LoginFailure:
        raise ConfigError("Discord rejected the bot token: check DISCORD_TOKEN") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise DiscordUnreachable(
            f"cannot reach Discord at {settings.api_base_url} ({type(exc).__name__}); check the network, "
            "or discord.api_base_url"
        ) from None


async def sync_commands(settings: Settings, token: SecretStr) -> int:
    """Register the slash commands with Discord over REST (no gateway); return a process exit status."""
    use_api_base(settings.discord.api_base_url)
    client = discord.Client(intents=discord.Intents.none())
    tree = GuardedCommandTree(client)
    for command in build_commands():
        tree.add_command(command)
    async with client:
        await log_in(client, settings.discord, token)
        synced = await tree.sync()
    names = ", ".join(command.name for command in synced)
    print(f"Synced {len(synced)} commands: {names}")
    return 0
