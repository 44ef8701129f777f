"""A device may prove its identity with an X.509 certificate instead of a password.

``credentials.kind`` says which (existing rows are passwords); an X.509 credential stores its
certificate's SHA-256 fingerprint and no secret hash.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FIELDS = ("(kind = 'password') = (secret_hash IS NOT NULL) AND "
          "(kind = 'x509') = (certificate_sha256 IS NOT NULL)")


def upgrade() -> None:
    with op.batch_alter_table("credentials") as batch:
        batch.add_column(sa.Column(
            "kind", sa.Enum("password", "x509", name="credential_kind", native_enum=False,
                            create_constraint=True, length=16),
            server_default="password", nullable=False))
        batch.add_column(sa.Column("certificate_sha256", sa.String(length=64), nullable=True))
        batch.alter_column("secret_hash", existing_type=sa.String(length=255), nullable=True)
        batch.create_check_constraint("credential_fields", FIELDS)


def downgrade() -> None:
    """Fails (IntegrityError) if an X.509 credential exists: it has no secret to keep."""
    with op.batch_alter_table("credentials") as batch:
        batch.drop_constraint("credential_fields", type_="check")
        batch.drop_constraint("credential_kind", type_="check")
        batch.alter_column("secret_hash", existing_type=sa.String(length=255), nullable=False)
        batch.drop_column("certificate_sha256")
        batch.drop_column("kind")
