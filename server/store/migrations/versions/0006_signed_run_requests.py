"""who asked for each run (runs.researcher, runs.researcher_key_id) and every signed run
request the coordinator admitted or refused (run_requests; its nonce is unique)

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('researcher', sa.String(length=120), nullable=True))
        batch_op.add_column(sa.Column('researcher_key_id', sa.String(length=16), nullable=True))
    op.create_table(
        'run_requests',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('nonce', sa.String(length=32), nullable=True),
        sa.Column('key_id', sa.String(length=16), nullable=True),
        sa.Column('researcher', sa.String(length=120), nullable=True),
        sa.Column('issued_at', sa.String(length=40), nullable=True),
        sa.Column('scenario_name', sa.String(length=200), nullable=True),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('reason_code', sa.String(length=32), nullable=True),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('run_id', sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_run_requests')),
        sa.UniqueConstraint('nonce', name=op.f('uq_run_requests_nonce')),
    )


def downgrade() -> None:
    op.drop_table('run_requests')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_column('researcher_key_id')
        batch_op.drop_column('researcher')
