"""Schedules: the daily catalog refresh."""

from dagster import DefaultScheduleStatus, ScheduleDefinition

from particleseg_assets.jobs import catalog_job

daily_catalog_refresh = ScheduleDefinition(
    name="daily_catalog_refresh",
    job=catalog_job,
    cron_schedule="0 4 * * *",
    execution_timezone="UTC",
    # Off until switched on in the UI: it talks to EBI, which a test instance should not.
    default_status=DefaultScheduleStatus.STOPPED,
    description="Refresh the EMPIAR catalog every day at 04:00 UTC (incremental).",
)
