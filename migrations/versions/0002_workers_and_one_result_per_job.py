"""workers table; one model and one report per job

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 09:00:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0002'
down_revision: Union[str, None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def _unlink_duplicates(table: str) -> None:
    """A job run twice before this revision could leave two rows: the oldest keeps the link."""
    op.execute(sa.text(
        f"UPDATE {table} SET job_id = NULL WHERE job_id IS NOT NULL AND id NOT IN "
        f"(SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY job_id ORDER BY created_at, id) AS n "
        f"FROM {table} WHERE job_id IS NOT NULL) AS ranked WHERE n = 1)"
    ))


def upgrade() -> None:
    op.create_table('workers',
    sa.Column('id', sa.String(length=200), nullable=False),
    sa.Column('hostname', sa.String(length=200), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('current_job_id', sa.String(length=40), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_workers_last_seen_at'), ['last_seen_at'], unique=False)

    for table in ('models', 'reports'):
        _unlink_duplicates(table)
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_unique_constraint(batch_op.f(f'uq_{table}_job_id'), ['job_id'])


def downgrade() -> None:
    for table in ('reports', 'models'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(batch_op.f(f'uq_{table}_job_id'), type_='unique')
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_workers_last_seen_at'))
    op.drop_table('workers')
