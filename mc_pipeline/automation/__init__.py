"""What runs without anyone: the registry sensor, the failure alerts, the schedules, freshness checks."""

from mc_pipeline.assets.checks import counts_reconcile
from mc_pipeline.automation.checks import contacts_freshness, dead_letters_within_share
from mc_pipeline.automation.schedules import (
    freshness_check_job,
    freshness_checks,
    hourly_incremental_sync,
    weekly_full_refresh,
)
from mc_pipeline.automation.sensors import mailchimp_lists_sensor, sync_failure_alerts

SENSORS = [mailchimp_lists_sensor, sync_failure_alerts]
SCHEDULES = [hourly_incremental_sync, weekly_full_refresh, freshness_checks]
CHECKS = [contacts_freshness, counts_reconcile, dead_letters_within_share]
JOBS = [freshness_check_job]

__all__ = ["CHECKS", "JOBS", "SCHEDULES", "SENSORS"]
