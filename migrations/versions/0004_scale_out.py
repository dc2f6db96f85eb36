"""scale out: job resources and worker labels; 64-bit job event ids on PostgreSQL

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 12:00:00

- jobs.resources: what a job asks of the worker that runs it ({"gpus", "processes", "labels"}).
- jobs.required_labels / workers.labels: the labels as one canonical string (sorted, comma-joined,
  "" for none), so that a worker claims only jobs whose labels it has with one indexed IN (...).
- job_events.id becomes BIGINT on PostgreSQL: GET /jobs/{id}/events promises 64-bit ids (SQLite's
  INTEGER PRIMARY KEY already is one).
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: Union[str, None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('resources', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('required_labels', sa.String(length=200), nullable=False, server_default=''))
        batch.create_index('ix_jobs_status_required_labels', ['status', 'required_labels'], unique=False)
    with op.batch_alter_table('workers') as batch:
        batch.add_column(sa.Column('labels', sa.String(length=200), nullable=False, server_default=''))
    if op.get_bind().dialect.name == 'postgresql':
        op.alter_column('job_events', 'id', type_=sa.BigInteger(), existing_type=sa.Integer(),
                        existing_nullable=False)
        op.execute("ALTER SEQUENCE job_events_id_seq AS BIGINT")


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("ALTER SEQUENCE job_events_id_seq AS INTEGER")
        op.alter_column('job_events', 'id', type_=sa.Integer(), existing_type=sa.BigInteger(),
                        existing_nullable=False)
    with op.batch_alter_table('workers') as batch:
        batch.drop_column('labels')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index('ix_jobs_status_required_labels')
        batch.drop_column('required_labels')
        batch.drop_column('resources')
