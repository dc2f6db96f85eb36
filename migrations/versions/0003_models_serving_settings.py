"""models.max_input_length: a model's serving settings live in its row

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 10:00:00

Rows made before this revision are filled from the adapter's own metadata file when it is still on
disk (best effort: a row whose folder moved keeps NULL and is served with the serving limit).
"""
import json
from pathlib import Path
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: Union[str, None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('models') as batch:
        batch.add_column(sa.Column('max_input_length', sa.Integer(), nullable=True))
    connection = op.get_bind()
    for model_id, adapter_path in connection.execute(sa.text("SELECT id, adapter_path FROM models")).all():
        meta = Path(adapter_path) / "intent_tuner.json"
        try:
            limit = json.loads(meta.read_text(encoding="utf-8")).get("training_config", {}).get("max_input_length")
        except (OSError, ValueError):
            continue
        if isinstance(limit, int):
            connection.execute(sa.text("UPDATE models SET max_input_length = :limit WHERE id = :id"),
                               {"limit": limit, "id": model_id})


def downgrade() -> None:
    with op.batch_alter_table('models') as batch:
        batch.drop_column('max_input_length')
