"""An update is identified by (sender, update id), not by the id alone.

With the id alone unique, a device that published first under another device's (predictable)
update id made every genuine update of that device be refused as a duplicate.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("updates") as batch:
        batch.drop_constraint("uq_updates_update_id", type_="unique")
        batch.create_unique_constraint(op.f("uq_updates_device_id_update_id"),
                                       ["device_id", "update_id"])


def downgrade() -> None:
    """Fails (IntegrityError) if two devices have used the same update id since the upgrade."""
    with op.batch_alter_table("updates") as batch:
        batch.drop_constraint("uq_updates_device_id_update_id", type_="unique")
        batch.create_unique_constraint(op.f("uq_updates_update_id"), ["update_id"])
