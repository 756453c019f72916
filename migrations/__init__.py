"""Alembic migrations: the only way the database schema is created (`bot.store.database.upgrade`)."""
