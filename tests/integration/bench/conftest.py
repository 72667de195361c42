"""The PostgreSQL fixtures of the storage tests (one server per session, or TEST_DATABASE_URL)."""

from tests.integration.db.conftest import PgTarget, pg

__all__ = ["PgTarget", "pg"]
