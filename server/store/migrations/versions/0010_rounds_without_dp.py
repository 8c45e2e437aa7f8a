"""rounds a site's ledger released without DP (the labelled non-private baseline), as the site
reported them at the pre-flight and with each charge: beside them, lifetime ε composes the DP
rounds only and is no lifetime guarantee

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('sites', schema=None) as batch_op:
        batch_op.add_column(sa.Column('without_dp_before', sa.Integer(), nullable=True))
    with op.batch_alter_table('privacy_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lifetime_without_dp', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('privacy_events', schema=None) as batch_op:
        batch_op.drop_column('lifetime_without_dp')
    with op.batch_alter_table('sites', schema=None) as batch_op:
        batch_op.drop_column('without_dp_before')
