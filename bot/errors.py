"""The bot's error tree. Each error a user can cause or meet carries the one sentence they are shown.

BotError                      base; `user_message` is safe to show on Discord
├── ConfigError               a wrong config or environment; fails at start, never shown on Discord
├── DiscordUnreachable        Discord's API cannot be reached at start; never shown on Discord
├── MediaError                an attachment could not be used
│   ├── HostNotAllowed        the URL (or a redirect) points off the allow-list
│   ├── TooLarge              announced or streamed bytes over the cap
│   ├── TooManyPixels         decoded size over the pixel cap (decompression bombs)
│   ├── TooElongated          an image more than 200 times wider than tall (or taller than wide)
│   ├── UnsupportedMediaType  the bytes are not an image or video we read
│   ├── CorruptMedia          looks like an image but does not decode
│   ├── Unreachable           404/403/410, connection refused, DNS
│   └── DownloadTimeout       the host was too slow, after retries
├── AnswerStopped              the asker pressed Stop before any text was written
├── InputError                the question itself cannot be answered
│   ├── EmptyQuestion
│   ├── TooManyImages
│   └── UserLimited           the asker is over their per-user limits (Discord only)
├── EngineError               inference failed
│   ├── ModelLoadError        the model cannot be loaded (start-up only)
│   ├── QueueFull             too many questions waiting
│   ├── OutOfMemory           the GPU ran out of memory even after a retry with fewer pixels
│   ├── EngineStopped         the engine is shutting down
│   ├── GenerationFailed      any other failure inside `generate`
│   ├── VideoNotSupported     the inference server takes no videos
│   └── ServerError           the inference server failed (server backend only)
│       ├── ServerUnavailable    unreachable, refusing connections, or 5xx/429 past the retry deadline
│       ├── ServerTimeout        no first token, or no end of the answer, in time
│       ├── ContextTooLong       the server says the prompt exceeds the model's context
│       ├── ServerRejected       any other 4xx (bad key, unknown model, invalid request)
│       └── AnswerIncomplete     the stream broke after some text was shown; carries that text
└── StoreError                the database failed; `transient` when a retry may succeed (locked, busy, lost)
"""

from __future__ import annotations


class BotError(Exception):
    """Base of every error the bot raises on purpose."""

    user_message = "Something went wrong on my side. Please try again in a moment."

    def __init__(self, detail: str = "", *, user_message: str | None = None) -> None:
        super().__init__(detail or self.user_message)
        if user_message is not None:
            self.user_message = user_message


class ConfigError(BotError):
    """The configuration or environment is wrong; raised at start."""


class DiscordUnreachable(BotError):
    """Discord's REST API did not answer at start (network, DNS, or a wrong `discord.api_base_url`)."""


class MediaError(BotError):
    """An attachment could not be downloaded or used."""

    user_message = "I couldn't use that attachment."


class HostNotAllowed(MediaError):
    user_message = "I only download attachments from Discord's own servers, so I skipped that link."


class TooLarge(MediaError):
    user_message = "That file is too large for me to process. Please send a smaller {kind} (under {limit})."

    def __init__(self, detail: str = "", *, limit_bytes: int, kind: str = "image") -> None:
        message = self.user_message.format(kind=kind, limit=format_bytes(limit_bytes))
        super().__init__(detail, user_message=message)
        self.limit_bytes = limit_bytes


class TooManyPixels(MediaError):
    user_message = (
        "That image is too large to decode safely ({pixels} pixels). Please send a smaller one "
        "(at most {limit} pixels)."
    )

    def __init__(self, detail: str = "", *, pixels: int, limit: int) -> None:
        super().__init__(
            detail, user_message=self.user_message.format(pixels=f"{pixels:,}", limit=f"{limit:,}")
        )


class TooElongated(MediaError):
    user_message = (
        "That image is too long and thin for me to look at (more than 200 times wider than tall, or the "
        "other way round). Please crop it or send it in parts."
    )


class UnsupportedMediaType(MediaError):
    user_message = (
        "That attachment isn't an image I can read. Please send a PNG, JPEG, WebP or GIF "
        "(or a short MP4/WebM/MOV video)."
    )


class CorruptMedia(MediaError):
    user_message = "That image looks damaged and I couldn't open it. Could you re-upload it or send another?"
    video_message = "That video looks damaged and I couldn't open it. Could you re-upload it or send another?"


class Unreachable(MediaError):
    user_message = "I couldn't download that attachment (the link may have expired). Please upload it again."


class DownloadTimeout(MediaError):
    user_message = "Downloading that attachment took too long. Please try again or send a smaller file."


class AnswerStopped(BotError):
    """The asker (or a moderator) stopped the answer before the model wrote anything; nothing is stored."""

    user_message = "⏹️ Stopped before I started answering."


class InputError(BotError):
    """The question cannot be answered as asked."""


class EmptyQuestion(InputError):
    user_message = "Please ask me something: add a question or attach an image."


class TooManyImages(InputError):
    user_message = "That's too many images at once: I look at up to {limit} per message. Please send fewer."

    def __init__(self, detail: str = "", *, limit: int) -> None:
        super().__init__(detail, user_message=self.user_message.format(limit=limit))
        self.limit = limit


class UserLimited(InputError):
    """The asker has too many questions in flight, or asks too fast; `retry_after` seconds, when known."""

    def __init__(self, detail: str, *, user_message: str, retry_after: float | None) -> None:
        super().__init__(detail, user_message=user_message)
        self.retry_after = retry_after
        self.notify = True  # False: the user was told moments ago; say nothing this time

    @classmethod
    def busy(cls, limit: int) -> UserLimited:
        """Refused: `limit` questions of this user are already waiting or being answered."""
        return cls(
            f"{limit} questions in flight",
            user_message=f"You already have {limit} questions waiting for answers. "
            "Please ask again once one of them is answered.",
            retry_after=None,
        )

    @classmethod
    def too_fast(cls, seconds: int) -> UserLimited:
        """Refused by the rate limit: the next question is welcome in `seconds` seconds."""
        unit = "second" if seconds == 1 else "seconds"
        return cls(
            f"rate limited for {seconds}s",
            user_message=f"You're asking faster than I can keep up. Please try again in {seconds} {unit}.",
            retry_after=seconds,
        )


class EngineError(BotError):
    """Inference failed."""


class ModelLoadError(EngineError):
    """The model or processor cannot be loaded."""


class QueueFull(EngineError):
    user_message = "I'm answering a lot of questions right now. Please try again in a minute."


class OutOfMemory(EngineError):
    user_message = (
        "I ran out of GPU memory on that one, even after shrinking the images. "
        "Try fewer or smaller images, or /reset to shorten the conversation."
    )


class EngineStopped(EngineError):
    user_message = "I'm restarting right now. Please ask again in a minute."


class GenerationFailed(EngineError):
    user_message = "The model failed while answering. Please try again; if it keeps failing, try /reset."


class VideoNotSupported(EngineError):
    user_message = (
        "The model server I use doesn't take videos. Please send an image (a screenshot works) instead."
    )


class ServerError(EngineError):
    """The inference server failed."""


class ServerUnavailable(ServerError):
    user_message = "I can't reach my model server right now. Please try again in a few minutes."


class ServerTimeout(ServerError):
    user_message = "My model server is taking too long to answer. Please try again in a moment."


class ContextTooLong(ServerError):
    user_message = (
        "This conversation is now too long for the model. Use /reset to start fresh, "
        "or ask with fewer images."
    )


class ServerRejected(ServerError):
    user_message = (
        "My model server refused this question. Please try rephrasing it; if it keeps happening, tell the "
        "bot's admin."
    )


class AnswerIncomplete(ServerError):
    """The stream broke midway; the user sees the text so far, marked incomplete, and nothing is stored."""

    note = (
        "⚠️ *This answer is incomplete: my model server stopped in the middle, so I didn't save it. "
        "Please ask again.*"
    )

    def __init__(self, detail: str = "", *, partial_text: str) -> None:
        shown = f"{partial_text.rstrip()}\n\n{self.note}" if partial_text.strip() else self.note
        super().__init__(detail, user_message=shown)
        self.partial_text = partial_text


class StoreError(BotError):
    user_message = "I couldn't save our conversation, so I didn't answer. Please try again in a moment."

    def __init__(self, detail: str = "", *, transient: bool = False) -> None:
        super().__init__(detail)
        self.transient = transient  # the database was locked, busy or unreachable: a retry may succeed


def format_bytes(count: int) -> str:
    """Human-readable byte count, e.g. `25 MB`."""
    size = float(count)
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}".replace(".0 ", " ")
        size /= 1024
    raise AssertionError("unreachable")
