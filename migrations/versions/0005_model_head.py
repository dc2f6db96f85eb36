"""models.head: how a model classifies ("lm": a LoRA adapter scored by its answers; "linear": a linear head)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 08:00:00

Part of a model's serving settings (with quantization and max_input_length): the API, the worker and
every inference backend read it from the row. Existing rows are LoRA adapters.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: Union[str, None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('models') as batch:
        batch.add_column(sa.Column('head', sa.String(length=20), nullable=False, server_default='lm'))


def downgrade() -> None:
    with op.batch_alter_table('models') as batch:
        batch.drop_column('head')
