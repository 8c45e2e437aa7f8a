"""the sites the coordinator registered (registered_sites): name, Flower's node id and the
SHA-256 fingerprint of the public node key, each unique, and when

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'registered_sites',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('node_id', sa.String(length=20), nullable=False),
        sa.Column('key_fingerprint', sa.String(length=80), nullable=False),
        sa.Column('registered_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_registered_sites')),
        sa.UniqueConstraint('key_fingerprint', name=op.f('uq_registered_sites_key_fingerprint')),
        sa.UniqueConstraint('name', name=op.f('uq_registered_sites_name')),
        sa.UniqueConstraint('node_id', name=op.f('uq_registered_sites_node_id')),
    )


def downgrade() -> None:
    op.drop_table('registered_sites')
