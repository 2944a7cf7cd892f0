"""Spark tasks whose output is a report for people, visible from the Airflow UI.

The report location is known before the job runs (it depends only on the lake and the
day), so it is pushed as XCom (``quality_report``, ``dp_stats_report``: the lake URI) and the
task's extra link (its page in the Airflow API server, served by privrec's plugin from the
lake) is set even when the job fails: that is when an operator needs it most. Neither
task reads raw data, so neither receives key material.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import BaseOperatorLink

from privrec_pipeline.orchestration.spark_operator import PrivrecSparkOperator


def _api_base() -> str:
    """The Airflow API server's public URL (``[api] base_url``), or "" for links relative to it."""
    from airflow.configuration import conf

    return conf.get("api", "base_url", fallback="") or ""


class _ReportLink(BaseOperatorLink):
    """Extra link to the report (stored by the worker after execute, as XCom ``_link_<class>``)."""

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return getattr(operator, "report_url", "") or ""


class QualityReportLink(_ReportLink):
    name = "Quality report"


class DPStatsReportLink(_ReportLink):
    name = "DP statistics report"


class _ReportOperator(PrivrecSparkOperator):
    xcom_key = ""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(needs_keys=False, **kwargs)
        self.report_url = ""

    def report_location(self, lake: str, day: dt.date) -> str:
        """Where the report is in the lake."""
        raise NotImplementedError

    def report_page(self, day: dt.date) -> str:
        """Its address in the Airflow API server (``privrec_pipeline.airflow_plugin``)."""
        raise NotImplementedError

    def execute(self, context: Any) -> str:
        from privrec_pipeline.config import lake_root

        day = dt.date.fromisoformat(str(context["ds"]))
        location = self.report_location(lake_root(), day)
        self.report_url = self.report_page(day)
        self.log.info("%s for %s: %s (in the lake: %s)", self.xcom_key.replace("_", " "), context["ds"],
                      self.report_url, location)
        context["ti"].xcom_push(key=self.xcom_key, value=location)
        super().execute(context)
        return location


class QualityValidateOperator(_ReportOperator):
    """jobs/validate.py; the link is the day's Data Docs page."""

    operator_extra_links = (QualityReportLink(),)
    xcom_key = "quality_report"

    def report_location(self, lake: str, day: dt.date) -> str:
        from privrec_pipeline.quality.validate import report_index_uri

        return report_index_uri(lake, day)

    def report_page(self, day: dt.date) -> str:
        from privrec_pipeline.airflow_plugin.app import report_url

        return report_url("quality", day, "index.html", base=_api_base())


class DPStatsOperator(_ReportOperator):
    """jobs/dp_stats.py; the link is the release's page (top items with error bars, budget)."""

    operator_extra_links = (DPStatsReportLink(),)
    xcom_key = "dp_stats_report"

    def report_location(self, lake: str, day: dt.date) -> str:
        from privrec_pipeline.dp_stats.release import REPORT_FILE, dp_stats_uri

        return f"{dp_stats_uri(lake, day)}/{REPORT_FILE}"

    def report_page(self, day: dt.date) -> str:
        from privrec_pipeline.airflow_plugin.app import report_url

        return report_url("dp_stats", day, base=_api_base())
