"""Command line: `python -m bot {run,chat,db,doctor,make-tiny-model,sync-commands}`. Wiring only."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from pydantic import SecretStr

from bot.errors import BotError, ConfigError
from bot.logs import configure_logging
from bot.settings import Settings, discord_token, load_settings

DEFAULT_CONFIG = Path("config.toml")
CONFIG_ENV_VAR = "BOT_CONFIG"

log = logging.getLogger("bot")


def _common_options(parser: argparse.ArgumentParser, *, after_command: bool) -> argparse.ArgumentParser:
    """`--config` and `-v`, taken before the command or after it (`python -m bot run --config FILE`).

    After a command they default to SUPPRESS, so that leaving them out there keeps a value given before it.
    """
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS if after_command else None,
        help=f"TOML config file (default: ${CONFIG_ENV_VAR} or ./{DEFAULT_CONFIG} when it exists, "
        "else built-in defaults; see config.example.toml)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS if after_command else False,
        help="debug logging",
    )
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bot", description="A self-hosted Discord bot that answers questions about images."
    )
    _common_options(parser, after_command=False)
    common = [_common_options(argparse.ArgumentParser(add_help=False), after_command=True)]
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser(
        "run", parents=common, help="start the Discord bot (migrates the database, loads the model, connects)"
    )

    chat = commands.add_parser("chat", parents=common, help="ask the model in the terminal, without Discord")
    chat.add_argument(
        "question", nargs="?", help="answer this once and exit (omit for an interactive session)"
    )
    chat.add_argument(
        "--image", type=Path, action="append", default=[], help="image or video file (repeatable)"
    )
    chat.add_argument("--model", help="model name or local directory (overrides the config)")
    chat.add_argument(
        "--conversation",
        help="named history to continue (default: a one-shot question starts fresh and is not kept; "
        "an interactive session continues 'default')",
    )
    chat.add_argument("--reset", action="store_true", help="forget that history first")

    db = commands.add_parser("db", parents=common, help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    db_commands.add_parser("upgrade", parents=common, help="apply Alembic migrations up to the latest schema")
    db_commands.add_parser(
        "purge",
        parents=common,
        help="delete turns older than history.retention_days, and media files nothing uses",
    )

    commands.add_parser(
        "doctor",
        parents=common,
        help="check the set-up (Discord token, intent, permissions, commands, model, GPU, database, media) "
        "without changing anything",
    )

    tiny = commands.add_parser(
        "make-tiny-model", parents=common, help="build the tiny random Qwen2.5-VL used by tests"
    )
    tiny.add_argument("directory", type=Path)
    tiny.add_argument("--seed", type=int, default=0)

    commands.add_parser(
        "sync-commands", parents=common, help="register the slash commands with Discord and exit"
    )
    return parser


def _settings_path(given: Path | None) -> Path | None:
    if given is not None:
        return given
    if os.environ.get(CONFIG_ENV_VAR):
        return Path(os.environ[CONFIG_ENV_VAR])
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def _with_model(settings: Settings, model: str | None) -> Settings:
    if model is None:
        return settings
    return settings.model_copy(update={"model": settings.model.model_copy(update={"name_or_path": model})})


async def _purge(settings: Settings) -> int:
    from bot.app import make_store, migrate

    await asyncio.to_thread(migrate, settings.storage)
    async with make_store(settings.storage) as store:
        result = await store.purge_older_than(settings.history.retention)
    print(
        f"Purged {result.messages_deleted} old messages, {result.media_deleted} unused media files and "
        f"{result.orphan_files_deleted} orphaned files."
    )
    return 0


async def _run_bot(settings: Settings, token: SecretStr) -> None:
    from bot.app import purge_periodically, running_service
    from bot.discord import check_token, run_discord
    from bot.health import Readiness, serving_health
    from bot.metrics import Metrics

    # A wrong token or an unreachable Discord is said in seconds, not after loading the model.
    await check_token(settings.discord, token)
    metrics, readiness = Metrics(), Readiness()
    # The health endpoints come up first, so /readyz says "the model is loading" while it loads.
    async with (
        serving_health(settings.metrics, metrics, readiness),
        running_service(settings, metrics=metrics, readiness=readiness) as service,
    ):
        purging = asyncio.create_task(purge_periodically(service), name="retention-purge")
        try:
            await run_discord(settings, token, service, metrics=metrics, readiness=readiness)
        finally:
            purging.cancel()


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "make-tiny-model":
        from bot.engine.tiny_model import build_tiny_model

        path = build_tiny_model(args.directory, seed=args.seed)
        print(f"Tiny model written to {path}")
        return 0
    if args.command == "db" and args.db_command == "upgrade":
        from bot.app import migrate

        migrate(settings.storage)
        print("Database is at the latest schema.")
        return 0
    if args.command == "db" and args.db_command == "purge":
        return asyncio.run(_purge(settings))
    if args.command == "doctor":
        from bot.doctor import run_doctor

        return asyncio.run(run_doctor(settings))
    if args.command == "chat":
        from bot.chat import run_chat

        return asyncio.run(
            run_chat(
                _with_model(settings, args.model),
                question=args.question,
                images=args.image,
                conversation=args.conversation,
                reset=args.reset,
            )
        )
    token = discord_token()  # before the heavy imports, so a missing token fails at once
    from bot.discord import sync_commands

    if args.command == "sync-commands":
        return asyncio.run(sync_commands(settings, token))
    asyncio.run(_run_bot(settings, token))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, load the config and run the command; return the exit status."""
    args = _parser().parse_args(argv)
    # The doctor's lines are its output: only warnings join them, unless asked for more.
    configure_logging(
        verbose=args.verbose, level=logging.WARNING if args.command == "doctor" else logging.INFO
    )
    try:
        settings = load_settings(_settings_path(args.config))
        return _dispatch(args, settings)
    except ConfigError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr)
        return 2
    except BotError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
