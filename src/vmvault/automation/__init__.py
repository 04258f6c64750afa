"""Automation: a configuration file of jobs, a scheduler that runs them, their history,
honest status and notifications. See docs/automation.md."""

from __future__ import annotations

from vmvault.automation.config import AutomationConfig, load_config
from vmvault.automation.cron import CronExpr, parse_cron

__all__ = ["AutomationConfig", "CronExpr", "load_config", "parse_cron"]
