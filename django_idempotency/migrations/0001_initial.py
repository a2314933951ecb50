import django.db.models.functions.datetime
from django.db import migrations, models

import django_idempotency.models


class Migration(migrations.Migration):

    initial = True

    dependencies = [
    ]

    operations = [
        migrations.CreateModel(
            name='IdempotencyKey',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('scope', django_idempotency.models.ExactCharField(max_length=255, verbose_name='scope')),
                ('key', django_idempotency.models.ExactCharField(max_length=255, verbose_name='key')),
                ('state', models.CharField(choices=[('in_progress', 'in progress'), ('completed', 'completed')], default='in_progress', max_length=16, verbose_name='state')),
                ('fingerprint', models.CharField(max_length=64, verbose_name='request fingerprint')),
                ('method', models.CharField(max_length=16, verbose_name='method')),
                ('path', models.CharField(max_length=2048, verbose_name='path')),
                ('owner_token', models.CharField(max_length=32, verbose_name='owner token')),
                ('response_status', models.PositiveSmallIntegerField(null=True, verbose_name='response status')),
                ('response_headers', models.JSONField(default=list, verbose_name='response headers')),
                ('response_body', models.BinaryField(help_text='Empty (NULL) when the response was streamed or too large to store.', null=True, verbose_name='response body')),
                ('created_at', models.DateTimeField(db_default=django.db.models.functions.datetime.Now(), verbose_name='created at')),
                ('completed_at', models.DateTimeField(null=True, verbose_name='completed at')),
                ('expires_at', models.DateTimeField(verbose_name='expires at')),
                ('locked_until', models.DateTimeField(help_text="Set in lease mode only: when an unfinished request's claim may be taken over.", null=True, verbose_name='lease deadline')),
            ],
            options={
                'verbose_name': 'idempotency key',
                'verbose_name_plural': 'idempotency keys',
                'indexes': [models.Index(fields=['expires_at', 'id'], name='idempotency_expires_idx'), models.Index(fields=['created_at', 'id'], name='idempotency_created_idx'), models.Index(fields=['state', 'locked_until'], name='idempotency_state_lease_idx'), models.Index(fields=['key'], name='idempotency_key_idx')],
                'constraints': [models.UniqueConstraint(fields=('scope', 'key'), name='idempotency_scope_key_uniq')],
            },
        ),
    ]
