"""ckks encryption: run key set description, encrypted evaluation sums

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('encryption_json', sa.Text(), nullable=True))
    op.create_table(
        'encrypted_metrics',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('round_number', sa.Integer(), nullable=False),
        sa.Column('phase', sa.String(length=16), nullable=False),
        sa.Column('names', sa.String(length=200), nullable=False),
        sa.Column('key_id', sa.String(length=32), nullable=False),
        sa.Column('weight_norm', sa.Float(), nullable=False),
        sa.Column('sites', sa.Integer(), nullable=False),
        sa.Column('ciphertext', sa.LargeBinary(), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_encrypted_metrics_run_id_runs'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_encrypted_metrics')),
        sa.UniqueConstraint('run_id', 'round_number', 'phase', name=op.f('uq_encrypted_metrics_run_id')),
    )
    with op.batch_alter_table('encrypted_metrics', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_encrypted_metrics_run_id'), ['run_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('encrypted_metrics', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_encrypted_metrics_run_id'))
    op.drop_table('encrypted_metrics')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_column('encryption_json')
