"""A Discord-compatible gateway + REST API + CDN on 127.0.0.1, for end-to-end tests of the real client.

The test builds a small world (guilds, channels, users with their guilds and roles, files), starts the server,
points the bot at `api_base_url`, then plays users: `send_message`, `create_thread`, `slash_command`,
`context_menu` dispatch gateway events; `GET .../members/{id}` answers from the users' guilds. Roles hold
every permission (administrator included) until `set_role_permissions` narrows them;
`add_permission_overwrite` adds a channel overwrite; `application_flags` is what `GET
/oauth2/applications/@me` says (the message content intent on, by default). It speaks sharding: each gateway
session gets the guilds, and the events of the guilds, of the shard its IDENTIFY names (`(guild_id >> 22) %
shard_count`; DMs go to shard 0), and `GET /gateway/bot` recommends `shard_count`. Every REST call the bot
makes is recorded; `wait_for_request` and `wait_for_message` await them with a timeout. Messages the bot posts
or edits are kept in `messages` with their current content. An interaction whose id is over 15 minutes old
plays one deferred in time whose token has since expired: its callback is accepted, its follow-ups and webhook
edits get 401 Invalid Webhook Token. `rate_limit_next` makes the next matching REST call meet a 429, as
Discord's rate limiter sends it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakediscord import payloads
from tests.fakediscord.payloads import Json, shard_of, snowflake

HEARTBEAT_INTERVAL_MS = 41_250
OP_DISPATCH, OP_HEARTBEAT, OP_IDENTIFY, OP_RESUME = 0, 1, 2, 6
OP_INVALID_SESSION, OP_HELLO, OP_HEARTBEAT_ACK = 9, 10, 11
EPHEMERAL_FLAG = 64
DEFERRED_UPDATE = 6  # an interaction callback that only acknowledges a component
# A plain member's permissions in a channel: view, send, read history, attach, embed (no manage messages).
MEMBER_PERMISSIONS = str((1 << 10) | (1 << 11) | (1 << 16) | (1 << 15) | (1 << 14))
INTERACTION_TOKEN_SECONDS = 15 * 60
_BODY = web.RequestKey("body", object)  # a request's parsed body, read once


@dataclass(frozen=True)
class RecordedRequest:
    """One REST call the bot made."""

    method: str
    path: str
    query: dict[str, str]
    body: Any


@dataclass
class FakeUser:
    id: int
    name: str
    bot: bool = False
    role_ids: list[int] = field(default_factory=list)
    guild_ids: list[int] = field(default_factory=list)
    accepts_dms: bool = True  # False: the bot's DMs get 403 "Cannot send messages to this user"

    @property
    def payload(self) -> Json:
        return payloads.user(self.id, self.name, bot=self.bot)

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"


@dataclass
class _Interaction:
    id: int
    token: str
    channel_id: int
    guild_id: int | None
    kind: int = 2  # 2: a command, 3: a component (a button press)
    original_message_id: int | None = None

    @property
    def expired(self) -> bool:
        """Whether the token is older than Discord's 15 minutes (the id carries the creation time)."""
        created = ((self.id >> 22) + payloads.DISCORD_EPOCH_MS) / 1000
        return time.time() - created > INTERACTION_TOKEN_SECONDS


def _json(data: Any, status: int = 200) -> web.Response:
    # discord.py parses a body only when the content type is exactly "application/json" (no charset).
    return web.Response(
        body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"}
    )


def _error(status: int, message: str, code: int = 0) -> web.Response:
    return _json({"message": message, "code": code}, status=status)


class FakeDiscord:
    """The fake server; `await start()`, then use `api_base_url` / `gateway_url`, then `await close()`."""

    def __init__(self, *, token: str, shard_count: int = 1) -> None:
        self.token = token
        self.shard_count = shard_count
        self.bot = FakeUser(snowflake(), "visionbot", bot=True)
        self.application_id = snowflake()
        self.owner = FakeUser(snowflake(), "owner")
        self.requests: list[RecordedRequest] = []
        self.messages: dict[int, Json] = {}
        self._nonces: dict[str, int] = {}  # a bot message's nonce (sent with enforce_nonce) -> its id
        self.commands: list[Json] = []
        self.application_flags = payloads.GATEWAY_MESSAGE_CONTENT_LIMITED
        self.identify_payloads: list[Json] = []
        self._guilds: dict[int, Json] = {}
        self._users: dict[int, FakeUser] = {}
        self._channels: dict[int, Json] = {}
        self._files: dict[str, tuple[bytes, str]] = {}
        self.bot_role_ids: dict[int, int] = {}  # guild id -> the bot's managed role there
        self._file_delays: dict[str, float] = {}
        self._interactions: dict[str, _Interaction] = {}
        self._rate_limits: list[tuple[str, str, float]] = []  # (method, path part, retry_after) to answer
        self._sockets: list[web.WebSocketResponse] = []
        self._shards: dict[web.WebSocketResponse, tuple[int, int]] = {}  # identified session -> (id, count)
        self._sequence = 0
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle ---

    async def start(self) -> None:
        """Serve on an ephemeral port of 127.0.0.1."""
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/cdn/{name}", self._cdn)
        api = web.RouteTableDef()
        api.get("/api/v10/gateway/bot")(self._get_gateway_bot)
        api.get("/api/v10/users/@me")(self._get_me)
        api.get("/api/v10/users/@me/guilds")(self._get_my_guilds)
        api.get("/api/v10/oauth2/applications/@me")(self._get_application)
        api.get("/api/v10/guilds/{guild_id}")(self._get_guild)
        api.get("/api/v10/guilds/{guild_id}/channels")(self._get_guild_channels)
        api.get("/api/v10/guilds/{guild_id}/members/{user_id}")(self._get_member)
        api.get("/api/v10/applications/{app_id}/commands")(self._get_commands)
        api.put("/api/v10/applications/{app_id}/commands")(self._put_commands)
        api.post("/api/v10/users/@me/channels")(self._open_dm)
        api.get("/api/v10/channels/{channel_id}")(self._get_channel)
        api.post("/api/v10/channels/{channel_id}/typing")(self._typing)
        api.post("/api/v10/channels/{channel_id}/messages")(self._post_message)
        api.get("/api/v10/channels/{channel_id}/messages/{message_id}")(self._get_message)
        api.patch("/api/v10/channels/{channel_id}/messages/{message_id}")(self._patch_message)
        api.delete("/api/v10/channels/{channel_id}/messages/{message_id}")(self._delete_message)
        api.post("/api/v10/channels/{channel_id}/messages/{message_id}/threads")(self._start_thread)
        api.post("/api/v10/interactions/{interaction_id}/{token}/callback")(self._interaction_callback)
        api.post("/api/v10/webhooks/{app_id}/{token}")(self._followup)
        api.get("/api/v10/webhooks/{app_id}/{token}/messages/{message_id}")(self._get_webhook_message)
        api.patch("/api/v10/webhooks/{app_id}/{token}/messages/{message_id}")(self._patch_webhook_message)
        api.delete("/api/v10/webhooks/{app_id}/{token}/messages/{message_id}")(self._delete_webhook_message)
        app.add_routes(api)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for socket in list(self._sockets):
            await socket.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base_url(self) -> str:
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    # --- world building ---

    def add_guild(
        self,
        name: str,
        channel_names: list[str],
        role_names: tuple[str, ...] = (),
        *,
        shard: int | None = None,
    ) -> tuple[int, list[int], list[int]]:
        """A guild with text channels and roles (on `shard` when given): (guild id, channel ids, role ids)."""
        guild_id = snowflake(shard=None if shard is None else (shard, self.shard_count))
        channel_ids = [snowflake() for _ in channel_names]
        role_ids = [snowflake() for _ in role_names]
        channels = [
            payloads.text_channel(channel_id, guild_id, channel_name)
            for channel_id, channel_name in zip(channel_ids, channel_names, strict=True)
        ]
        for channel in channels:
            self._channels[int(channel["id"])] = channel
        bot_role_id = snowflake()
        self.bot_role_ids[guild_id] = bot_role_id
        me = payloads.member([bot_role_id], with_user=self.bot.payload)
        roles = [
            payloads.role(role_id, role_name) for role_id, role_name in zip(role_ids, role_names, strict=True)
        ]
        roles.append(payloads.role(bot_role_id, self.bot.name, bot_id=self.bot.id))
        self._guilds[guild_id] = payloads.guild(
            guild_id, name, self.owner.id, roles=roles, channels=channels, me=me
        )
        return guild_id, channel_ids, role_ids

    def set_role_permissions(self, guild_id: int, role_id: int, permissions: int) -> None:
        """Give a role (`guild_id` itself: @everyone) exactly `permissions` (a bit field)."""
        for role in self._guilds[guild_id]["roles"]:
            if int(role["id"]) == role_id:
                role["permissions"] = str(permissions)

    def add_permission_overwrite(
        self, channel_id: int, role_id: int, *, allow: int = 0, deny: int = 0
    ) -> None:
        """A channel permission overwrite for a role (`guild_id`: @everyone)."""
        overwrite = {"id": str(role_id), "type": 0, "allow": str(allow), "deny": str(deny)}
        self._channels[channel_id]["permission_overwrites"].append(overwrite)

    def add_user(
        self,
        name: str,
        *,
        bot: bool = False,
        role_ids: list[int] | None = None,
        guild_ids: list[int] | None = None,
        accepts_dms: bool = True,
    ) -> FakeUser:
        """A user; `guild_ids` are the guilds they are a member of (what `GET .../members/{id}` answers)."""
        user = FakeUser(
            snowflake(),
            name,
            bot=bot,
            role_ids=list(role_ids or []),
            guild_ids=list(guild_ids or []),
            accepts_dms=accepts_dms,
        )
        self._users[user.id] = user
        return user

    def add_dm_channel(self, recipient: FakeUser) -> int:
        channel_id = snowflake()
        self._channels[channel_id] = payloads.dm_channel(channel_id, recipient.payload)
        return channel_id

    def dm_channel_of(self, user: FakeUser) -> int | None:
        """The id of the DM channel between the bot and `user`, if one was opened."""
        for channel_id, channel in self._channels.items():
            if channel["type"] == 1 and channel["recipients"][0]["id"] == str(user.id):
                return channel_id
        return None

    def add_file(self, name: str, data: bytes, content_type: str, *, delay: float = 0.0) -> str:
        """Serve `data` from the CDN after `delay` seconds; returns its URL (signed-looking, as Discord)."""
        self._files[name] = (data, content_type)
        self._file_delays[name] = delay
        return f"{self.base_url}/cdn/{name}?ex=0&is=0&hm={secrets.token_hex(8)}"

    def missing_file_url(self, name: str) -> str:
        return f"{self.base_url}/cdn/{name}?ex=0"

    def attachment(self, url: str, filename: str, size: int, content_type: str | None) -> Json:
        return payloads.attachment(snowflake(), filename, url, size, content_type)

    def rate_limit_next(self, method: str, path_part: str, *, retry_after: float = 0.05) -> None:
        """The next `method` call whose path holds `path_part` gets a 429 asking to retry after `retry_after`
        seconds (recorded like any call; the retry then goes through)."""
        self._rate_limits.append((method, path_part, retry_after))

    # --- user events ---

    async def send_message(
        self,
        channel_id: int,
        author: FakeUser,
        content: str,
        *,
        attachments: list[Json] | None = None,
        reply_to: int | None = None,
        message_id: int | None = None,
    ) -> Json:
        """A user posts a message (MESSAGE_CREATE); mentions are taken from `<@id>` in the content."""
        channel = self._channels[channel_id]
        guild_id = int(channel["guild_id"]) if "guild_id" in channel else None
        mentioned = [
            user for user in (self.bot,) if f"<@{user.id}>" in content or f"<@!{user.id}>" in content
        ]
        roles = [role_id for role_id in self.bot_role_ids.values() if f"<@&{role_id}>" in content]
        reference = referenced = None
        if reply_to is not None:
            referenced = self.messages[reply_to]
            reference = {"type": 0, "message_id": str(reply_to), "channel_id": str(channel_id)}
            if guild_id is not None:
                reference["guild_id"] = str(guild_id)
        data = payloads.message(
            message_id or snowflake(),
            channel_id,
            author.payload,
            content,
            guild_id=guild_id,
            author_member=payloads.member(author.role_ids) if guild_id is not None else None,
            mentions=[user.payload for user in mentioned],
            mention_roles=roles,
            attachments=attachments,
            reference=reference,
            referenced_message=referenced,
        )
        self.messages[int(data["id"])] = data
        await self.dispatch("MESSAGE_CREATE", data)
        return data

    async def forward_message(self, channel_id: int, author: FakeUser, source_id: int) -> Json:
        """A user forwards message `source_id` into `channel_id`: a default message whose reference has
        type 1 (forward) and whose content travels in `message_snapshots`, as Discord sends it."""
        source = self.messages[source_id]
        channel = self._channels[channel_id]
        guild_id = int(channel["guild_id"]) if "guild_id" in channel else None
        data = payloads.message(
            snowflake(),
            channel_id,
            author.payload,
            "",
            guild_id=guild_id,
            author_member=payloads.member(author.role_ids) if guild_id is not None else None,
        )
        data["message_reference"] = {
            "type": 1,
            "message_id": str(source_id),
            "channel_id": source["channel_id"],
            **({"guild_id": source["guild_id"]} if "guild_id" in source else {}),
        }
        snapshot = {key: source[key] for key in ("content", "attachments", "embeds", "timestamp", "type")}
        data["message_snapshots"] = [
            {"message": {**snapshot, "flags": 0, "mentions": [], "edited_timestamp": None}}
        ]
        self.messages[int(data["id"])] = data
        await self.dispatch("MESSAGE_CREATE", data)
        return data

    async def redeliver(self, message: Json) -> None:
        """Deliver the same MESSAGE_CREATE again, as Discord may."""
        await self.dispatch("MESSAGE_CREATE", message)

    async def create_thread(self, parent_id: int, starter_message_id: int, owner: FakeUser, name: str) -> int:
        """A user starts a thread from a message (its id becomes the thread's id); THREAD_CREATE."""
        data = self._new_thread(parent_id, starter_message_id, owner.id, name)
        await self.dispatch("THREAD_CREATE", {**data, "newly_created": True})
        return starter_message_id

    async def slash_command(
        self,
        channel_id: int,
        user: FakeUser,
        name: str,
        options: list[Json] | None = None,
        *,
        resolved: Json | None = None,
        interaction_id: int | None = None,
    ) -> str:
        """A user runs `/name` (INTERACTION_CREATE); returns the interaction token."""
        data = {"id": str(self._command_id(name, 1)), "name": name, "type": 1, "options": options or []}
        if resolved:
            data["resolved"] = resolved
        return await self._interact(channel_id, user, data, interaction_id)

    async def context_menu(self, channel_id: int, user: FakeUser, name: str, target_message_id: int) -> str:
        """A user runs a message context-menu command on a message; returns the interaction token."""
        target = self.messages[target_message_id]
        data = {
            "id": str(self._command_id(name, 3)),
            "name": name,
            "type": 3,
            "target_id": str(target_message_id),
            "resolved": {"messages": {str(target_message_id): target}},
        }
        return await self._interact(channel_id, user, data, None)

    async def dispatch(self, event: str, data: Json) -> None:
        """Send a DISPATCH event to every gateway session of the shard its guild belongs to."""
        self._sequence += 1
        frame = {"op": OP_DISPATCH, "t": event, "s": self._sequence, "d": data}
        guild_id = int(data["guild_id"]) if data.get("guild_id") else None
        for socket, (shard_id, shard_count) in list(self._shards.items()):
            if shard_of(guild_id, shard_count) == shard_id:
                await socket.send_json(frame)

    # --- assertions ---

    async def wait_for_request(
        self, predicate: Callable[[RecordedRequest], bool], *, timeout: float = 30.0
    ) -> RecordedRequest:
        """The first recorded REST call matching `predicate` (past or future)."""
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for request in self.requests:
                    if predicate(request):
                        return request
                await self._changed.wait()

    async def wait_for_message(
        self, channel_id: int, predicate: Callable[[Json], bool] = lambda _: True, *, timeout: float = 30.0
    ) -> Json:
        """The first message the bot posted in `channel_id` whose current state matches `predicate`."""
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for message in self.bot_messages(channel_id):
                    if predicate(message):
                        return message
                await self._changed.wait()

    def bot_messages(self, channel_id: int) -> list[Json]:
        """The bot's messages in a channel, oldest first, with their current content."""
        return [
            message
            for message in self.messages.values()
            if message["channel_id"] == str(channel_id) and message["author"]["id"] == str(self.bot.id)
        ]

    def requests_to(self, method: str, path_part: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and path_part in r.path]

    async def wait_connected(self, count: int = 1, *, timeout: float = 30.0) -> None:
        """Wait until exactly `count` gateway sessions are open, each identified and sent its guilds."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self._shards) == count)

    # --- internals ---

    @web.middleware
    async def _record(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        if request.path == "/gateway":
            return await handler(request)
        # Interaction callbacks and webhooks authenticate by the token in their URL, like Discord's.
        token_in_url = "/interactions/" in request.path or "/webhooks/" in request.path
        authorized = request.headers.get("Authorization") == f"Bot {self.token}"
        if request.path.startswith("/api/") and not token_in_url and not authorized:
            return _error(401, "401: Unauthorized")
        body = await self._body(request)
        recorded = RecordedRequest(request.method, request.path, dict(request.query), body)
        response = self._rate_limited(request) or await handler(request)
        async with self._changed:
            self.requests.append(recorded)
            self._changed.notify_all()
        return response

    async def _body(self, request: web.Request) -> Any:
        """The request's JSON body (read once). A multipart body (a message with files, as discord.py sends
        it) gives its `payload_json` with the files, now served by the CDN, listed under "uploaded"."""
        if _BODY not in request:
            body: Any = None
            if request.content_type == "multipart/form-data":
                form = await request.post()
                body = json.loads(str(form["payload_json"])) if "payload_json" in form else {}
                uploaded = []
                for value in form.values():
                    if isinstance(value, web.FileField):
                        data = value.file.read()
                        url = self.add_file(
                            f"upload-{snowflake()}-{value.filename}", data, value.content_type
                        )
                        uploaded.append(self.attachment(url, value.filename, len(data), value.content_type))
                body["uploaded"] = uploaded
            elif request.can_read_body:
                body = await request.json()
            request[_BODY] = body
        return request[_BODY]

    def file_data(self, url: str) -> bytes:
        """The bytes the CDN serves at `url` (an uploaded attachment's, for instance)."""
        name = url.split("/cdn/", 1)[1].split("?", 1)[0]
        return self._files[name][0]

    def _rate_limited(self, request: web.Request) -> web.Response | None:
        for limit in self._rate_limits:
            method, path_part, retry_after = limit
            if request.method == method and path_part in request.path:
                self._rate_limits.remove(limit)
                # discord.py retries a 429 only when it carries `Via` (else it takes it for Cloudflare's).
                data = {"message": "You are being rate limited.", "retry_after": retry_after, "global": False}
                response = _json(data, status=429)
                response.headers["Via"] = "1.1 google"
                return response
        return None

    def _command_id(self, name: str, kind: int) -> int:
        for command in self.commands:
            if command["name"] == name and command["type"] == kind:
                return int(command["id"])
        return snowflake()

    async def press_button(
        self,
        message_id: int,
        user: FakeUser,
        custom_id: str,
        *,
        manage_messages: bool = False,
        shown: Json | None = None,
    ) -> str:
        """A user presses a button of one of the bot's messages (INTERACTION_CREATE of type 3, carrying the
        message as `shown`, by default its current state); they may manage messages in the channel only with
        `manage_messages`. Returns the interaction token."""
        message = shown or self.messages[message_id]
        data = {"custom_id": custom_id, "component_type": 2}
        permissions = payloads.ALL_PERMISSIONS if manage_messages else MEMBER_PERMISSIONS
        return await self._interact(
            int(message["channel_id"]), user, data, None, kind=3, message=message, permissions=permissions
        )

    async def _interact(
        self,
        channel_id: int,
        user: FakeUser,
        data: Json,
        interaction_id: int | None,
        *,
        kind: int = 2,
        message: Json | None = None,
        permissions: str = payloads.ALL_PERMISSIONS,
    ) -> str:
        channel = self._channels[channel_id]
        guild_id = int(channel["guild_id"]) if "guild_id" in channel else None
        token = secrets.token_urlsafe(24)
        interaction = _Interaction(interaction_id or snowflake(), token, channel_id, guild_id, kind=kind)
        self._interactions[token] = interaction
        payload: Json = {
            "id": str(interaction.id),
            "application_id": str(self.application_id),
            "type": kind,
            "data": data,
            "channel_id": str(channel_id),
            "channel": channel,
            "token": token,
            "version": 1,
            "app_permissions": payloads.ALL_PERMISSIONS,
            "locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(guild_id or 0)},
            "context": 0 if guild_id is not None else 1,
            "attachment_size_limit": 10 * 1024 * 1024,
        }
        if message is not None:
            payload["message"] = message
        if guild_id is not None:
            payload["guild_id"] = str(guild_id)
            payload["guild_locale"] = "en-US"
            payload["member"] = {
                **payloads.member(user.role_ids, with_user=user.payload),
                "permissions": permissions,
            }
        else:
            payload["user"] = user.payload
        await self.dispatch("INTERACTION_CREATE", payload)
        return token

    def _new_thread(self, parent_id: int, thread_id: int, owner_id: int, name: str) -> Json:
        guild_id = int(self._channels[parent_id]["guild_id"])
        data = payloads.thread(thread_id, guild_id, parent_id, owner_id, name)
        self._channels[thread_id] = data
        return data

    def _bot_message(self, channel_id: int, body: Json, *, flags: int = 0) -> Json:
        channel = self._channels.get(channel_id, {})
        reference = body.get("message_reference")
        data = payloads.message(
            snowflake(),
            channel_id,
            self.bot.payload,
            body.get("content") or "",
            guild_id=int(channel["guild_id"]) if "guild_id" in channel else None,
            reference=reference,
            referenced_message=self.messages.get(int(reference["message_id"])) if reference else None,
            flags=flags,
            attachments=body.get("uploaded"),
        )
        data["allowed_mentions"] = body.get("allowed_mentions")
        data["components"] = body.get("components") or []
        self.messages[int(data["id"])] = data
        return data

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.send_json({"op": OP_HELLO, "d": {"heartbeat_interval": HEARTBEAT_INTERVAL_MS}})
        async with self._changed:
            self._sockets.append(socket)
            self._changed.notify_all()
        try:
            async for frame in socket:
                if frame.type is not WSMsgType.TEXT:
                    continue
                message = json.loads(frame.data)
                if message["op"] == OP_HEARTBEAT:
                    await socket.send_json({"op": OP_HEARTBEAT_ACK})
                elif message["op"] == OP_IDENTIFY:
                    self.identify_payloads.append(message["d"])
                    shard_id, shard_count = message["d"].get("shard", (0, 1))
                    await self._ready(socket, shard_id, shard_count)
                    async with self._changed:
                        self._shards[socket] = (shard_id, shard_count)
                        self._changed.notify_all()
                elif message["op"] == OP_RESUME:
                    await socket.send_json({"op": OP_INVALID_SESSION, "d": False})
        finally:
            async with self._changed:
                self._sockets.remove(socket)
                self._shards.pop(socket, None)
                self._changed.notify_all()
        return socket

    async def _ready(self, socket: web.WebSocketResponse, shard_id: int, shard_count: int) -> None:
        """READY, then GUILD_CREATE for each guild of this shard."""
        guilds = [
            guild for guild_id, guild in self._guilds.items() if shard_of(guild_id, shard_count) == shard_id
        ]
        self._sequence += 1
        ready = {
            "v": 10,
            "user": self.bot.payload,
            "guilds": [{"id": guild["id"], "unavailable": True} for guild in guilds],
            "shard": [shard_id, shard_count],
            "session_id": secrets.token_hex(16),
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": self.application_flags},
            "private_channels": [],
            "relationships": [],
        }
        await socket.send_json({"op": OP_DISPATCH, "t": "READY", "s": self._sequence, "d": ready})
        for guild in guilds:
            self._sequence += 1
            threads = [c for c in self._channels.values() if c["type"] == 11 and c["guild_id"] == guild["id"]]
            data = {**guild, "threads": threads}
            await socket.send_json({"op": OP_DISPATCH, "t": "GUILD_CREATE", "s": self._sequence, "d": data})

    async def _cdn(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        found = self._files.get(name)
        if found is None:
            return web.Response(status=404, text="Not Found")
        await asyncio.sleep(self._file_delays[name])
        data, content_type = found
        return web.Response(body=data, headers={"Content-Type": content_type})  # aiohttp sets Content-Length

    async def _get_gateway_bot(self, request: web.Request) -> web.Response:
        limits = {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}
        return _json({"url": self.gateway_url, "shards": self.shard_count, "session_start_limit": limits})

    async def _get_me(self, request: web.Request) -> web.Response:
        return _json(self.bot.payload)

    async def _get_application(self, request: web.Request) -> web.Response:
        return _json(
            payloads.application(self.application_id, self.owner.payload, flags=self.application_flags)
        )

    async def _get_my_guilds(self, request: web.Request) -> web.Response:
        return _json([payloads.partial_guild(guild) for guild in self._guilds.values()])

    async def _get_guild(self, request: web.Request) -> web.Response:
        guild = self._guilds.get(int(request.match_info["guild_id"]))
        return _json(guild) if guild is not None else _error(404, "Unknown Guild", 10004)

    async def _get_guild_channels(self, request: web.Request) -> web.Response:
        guild_id = request.match_info["guild_id"]
        if int(guild_id) not in self._guilds:
            return _error(404, "Unknown Guild", 10004)
        channels = [c for c in self._channels.values() if c.get("guild_id") == guild_id and c["type"] != 11]
        return _json(channels)

    async def _get_member(self, request: web.Request) -> web.Response:
        guild = self._guilds.get(int(request.match_info["guild_id"]))
        if guild is None:
            return _error(404, "Unknown Guild", 10004)
        if int(request.match_info["user_id"]) == self.bot.id:
            return _json(guild["members"][0])
        user = self._users.get(int(request.match_info["user_id"]))
        if user is None or int(guild["id"]) not in user.guild_ids:
            return _error(404, "Unknown Member", 10007)
        guild_roles = {int(role["id"]) for role in guild["roles"]}
        roles = [role_id for role_id in user.role_ids if role_id in guild_roles]
        return _json(payloads.member(roles, with_user=user.payload))

    async def _get_commands(self, request: web.Request) -> web.Response:
        return _json(self.commands)

    async def _put_commands(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self.commands = [
            {
                **command,
                "id": str(snowflake()),
                "application_id": str(self.application_id),
                "version": str(snowflake()),
                "description": command.get("description", ""),
                "type": command.get("type", 1),
            }
            for command in body
        ]
        return _json(self.commands)

    async def _open_dm(self, request: web.Request) -> web.Response:
        user = self._users.get(int((await self._body(request))["recipient_id"]))
        if user is None:
            return _error(404, "Unknown User", 10013)
        channel_id = self.dm_channel_of(user) or self.add_dm_channel(user)
        return _json(self._channels[channel_id])

    async def _get_channel(self, request: web.Request) -> web.Response:
        channel = self._channels.get(int(request.match_info["channel_id"]))
        return _json(channel) if channel is not None else _error(404, "Unknown Channel", 10003)

    async def _typing(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _post_message(self, request: web.Request) -> web.Response:
        channel_id = int(request.match_info["channel_id"])
        channel = self._channels.get(channel_id)
        if channel is None:
            return _error(404, "Unknown Channel", 10003)
        if channel["type"] == 1 and not self._users[int(channel["recipients"][0]["id"])].accepts_dms:
            return _error(403, "Cannot send messages to this user", 50007)
        body = await self._body(request)
        if len(body.get("content") or "") > 2000:
            return _error(400, "Invalid Form Body: content must be 2000 or fewer in length.", 50035)
        nonce = str(body["nonce"]) if body.get("enforce_nonce") and body.get("nonce") is not None else None
        if nonce is not None and self._nonces.get(nonce) in self.messages:  # Discord: the first one, again
            return _json(self.messages[self._nonces[nonce]])
        data = self._bot_message(channel_id, body)
        if nonce is not None:
            self._nonces[nonce] = int(data["id"])
        return _json(data)

    async def _get_message(self, request: web.Request) -> web.Response:
        message = self.messages.get(int(request.match_info["message_id"]))
        return _json(message) if message is not None else _error(404, "Unknown Message", 10008)

    async def _patch_message(self, request: web.Request) -> web.Response:
        return await self._edit(int(request.match_info["message_id"]), await self._body(request))

    async def _delete_message(self, request: web.Request) -> web.Response:
        self.messages.pop(int(request.match_info["message_id"]), None)
        return web.Response(status=204)

    async def _start_thread(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        parent_id, message_id = int(request.match_info["channel_id"]), int(request.match_info["message_id"])
        if message_id in self._channels:
            return _error(400, "A thread has already been created for this message", 160004)
        data = self._new_thread(parent_id, message_id, self.bot.id, body["name"])
        await self.dispatch("THREAD_CREATE", {**data, "newly_created": True})
        return _json(data)

    async def _interaction_callback(self, request: web.Request) -> web.Response:
        interaction = self._interactions.get(request.match_info["token"])
        if interaction is None:
            return _error(404, "Unknown interaction", 10062)
        body = await self._body(request)
        if body["type"] == DEFERRED_UPDATE:  # a button press acknowledged: no message of its own
            return _json(
                {
                    "interaction": {"id": str(interaction.id), "type": interaction.kind},
                    "resource": {"type": DEFERRED_UPDATE},
                }
            )
        flags = (body.get("data") or {}).get("flags") or 0
        original = self._bot_message(interaction.channel_id, body.get("data") or {}, flags=flags)
        interaction.original_message_id = int(original["id"])
        return _json(
            {
                "interaction": {
                    "id": str(interaction.id),
                    "type": interaction.kind,
                    "response_message_id": original["id"],
                    "response_message_loading": body["type"] == 5,
                    "response_message_ephemeral": bool(flags & EPHEMERAL_FLAG),
                },
                "resource": {"type": body["type"], "message": original},
            }
        )

    async def _followup(self, request: web.Request) -> web.Response:
        interaction = self._interactions.get(request.match_info["token"])
        if interaction is None or interaction.expired:
            return _error(401, "Invalid Webhook Token", 50027)
        body = await request.json()
        return _json(self._bot_message(interaction.channel_id, body, flags=body.get("flags") or 0))

    def _webhook_message_id(self, request: web.Request) -> int | None:
        interaction = self._interactions.get(request.match_info["token"])
        if interaction is None or interaction.expired:
            return None
        raw = request.match_info["message_id"]
        return interaction.original_message_id if raw == "@original" else int(raw)

    async def _get_webhook_message(self, request: web.Request) -> web.Response:
        message_id = self._webhook_message_id(request)
        if message_id is None:
            return _error(401, "Invalid Webhook Token", 50027)
        message = self.messages.get(message_id)
        return _json(message) if message is not None else _error(404, "Unknown Message", 10008)

    async def _patch_webhook_message(self, request: web.Request) -> web.Response:
        message_id = self._webhook_message_id(request)
        if message_id is None:
            return _error(401, "Invalid Webhook Token", 50027)
        return await self._edit(message_id, await self._body(request))

    async def _delete_webhook_message(self, request: web.Request) -> web.Response:
        message_id = self._webhook_message_id(request)
        if message_id is None:
            return _error(401, "Invalid Webhook Token", 50027)
        if self.messages.pop(message_id, None) is None:
            return _error(404, "Unknown Message", 10008)
        return web.Response(status=204)

    async def _edit(self, message_id: int, body: Json) -> web.Response:
        message = self.messages.get(message_id)
        if message is None:
            return _error(404, "Unknown Message", 10008)
        if len(body.get("content") or "") > 2000:
            return _error(400, "Invalid Form Body: content must be 2000 or fewer in length.", 50035)
        if "content" in body:
            message["content"] = body["content"]
            message["edited_timestamp"] = payloads.iso_now()
        if "uploaded" in body:  # the files sent replace the message's attachments
            message["attachments"] = body["uploaded"]
        if "components" in body:
            message["components"] = body["components"]
        return _json(message)
