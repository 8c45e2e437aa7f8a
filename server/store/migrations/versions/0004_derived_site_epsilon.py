"""derived site epsilon (each site's run ε recomputed from its events when the run ends);
an index for per-run aggregate metrics (the dashboard's run list)

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('sites', schema=None) as batch_op:
        batch_op.add_column(sa.Column('derived_epsilon', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('derived_events', sa.Integer(), nullable=True))
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.create_index('ix_metrics_run_site_name', ['run_id', 'site_id', 'name', 'round_number'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.drop_index('ix_metrics_run_site_name')
    with op.batch_alter_table('sites', schema=None) as batch_op:
        batch_op.drop_column('derived_events')
        batch_op.drop_column('derived_epsilon')
