"""The Discord layer: events and slash commands → `AnswerService` → replies (no torch, no SQL)."""

from bot.discord.client import VisionBot, check_token, run_discord, sync_commands

__all__ = ["VisionBot", "check_token", "run_discord", "sync_commands"]
