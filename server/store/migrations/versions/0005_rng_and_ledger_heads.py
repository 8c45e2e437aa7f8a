"""where each event's DP noise came from (rng); the ledger each site reported (id, entry);
the coordinator's witness of every site's ledger head (ledger_heads)

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('privacy_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rng', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('ledger_id', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('ledger_seq', sa.Integer(), nullable=True))
    with op.batch_alter_table('sites', schema=None) as batch_op:
        batch_op.add_column(sa.Column('ledger_id', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('ledger_seq', sa.Integer(), nullable=True))
    op.create_table(
        'ledger_heads',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('site_key', sa.String(length=200), nullable=False),
        sa.Column('ledger_id', sa.String(length=32), nullable=False),
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.Column('entry_hash', sa.String(length=64), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=True),
        sa.Column('replaced_ledger', sa.String(length=32), nullable=True),
        sa.Column('replaced_seq', sa.Integer(), nullable=True),
        sa.Column('replaced_reason', sa.Text(), nullable=True),
        sa.Column('replaced_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_heads')),
        sa.UniqueConstraint('site_key', name=op.f('uq_ledger_heads_site_key')),
    )


def downgrade() -> None:
    op.drop_table('ledger_heads')
    with op.batch_alter_table('sites', schema=None) as batch_op:
        batch_op.drop_column('ledger_seq')
        batch_op.drop_column('ledger_id')
    with op.batch_alter_table('privacy_events', schema=None) as batch_op:
        batch_op.drop_column('ledger_seq')
        batch_op.drop_column('ledger_id')
        batch_op.drop_column('rng')
