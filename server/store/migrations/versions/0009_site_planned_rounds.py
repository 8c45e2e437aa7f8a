"""the rounds a run planned for each site at the pre-flight (refuse mode: its share of the fixed
schedule, which its σ is calibrated for; null: all of the run's rounds)

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('sites', schema=None) as batch_op:
        batch_op.add_column(sa.Column('planned_rounds', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('sites', schema=None) as batch_op:
        batch_op.drop_column('planned_rounds')
