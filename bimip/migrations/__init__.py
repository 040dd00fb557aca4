"""Alembic migrations for every service's tables; run them with `bimip.core.storage.migrate`."""
