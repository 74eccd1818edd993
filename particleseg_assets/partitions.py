"""One dynamic partition per EMPIAR entry, keyed by its number ("10028")."""

from dagster import DynamicPartitionsDefinition

EMPIAR_PARTITIONS_NAME = "empiar_id"

empiar_partitions = DynamicPartitionsDefinition(name=EMPIAR_PARTITIONS_NAME)
