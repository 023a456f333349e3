"""Apply the event store's Alembic migrations from inside exo, on a connection exo already holds.

The migration scripts live in the top-level `migrations/` folder, which installs as the subpackage
`exo.store.migrations` (pyproject.toml maps it), so this works the same from
a source checkout, an editable install and a plain wheel install.
"""

from __future__ import annotations

import importlib.resources
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection


def _migrations_directory() -> Path:
    """The source tree's own `migrations/` when this package runs from a checkout (an editable
    install maps exo.store.migrations to the checkout it was installed from, which may be another
    tree than the one on PYTHONPATH), else the installed subpackage."""
    source = Path(__file__).resolve().parents[2] / "migrations"
    if (source / "versions" / "exo_0001_initial.py").is_file():
        return source
    return Path(str(importlib.resources.files("exo.store.migrations")))


# Top-level `migrations/` in the source tree, installed as the subpackage exo.store.migrations.
MIGRATIONS_DIRECTORY = _migrations_directory()


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIRECTORY))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@cache
def known_revisions() -> frozenset[str]:
    script = ScriptDirectory.from_config(alembic_config())
    return frozenset(revision.revision for revision in script.walk_revisions())


@cache
def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIRECTORY}")
    return head


def upgrade_to_head(connection: Connection) -> None:
    """Create or upgrade the schema inside the caller's transaction (all or nothing on SQLite)."""
    command.upgrade(alembic_config(connection), "head")
