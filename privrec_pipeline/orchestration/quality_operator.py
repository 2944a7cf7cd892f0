"""The validate task: the Spark job plus where its report is, visible from the Airflow UI.

The report location is known before the job runs (it depends only on the lake and the
day), so it is pushed as XCom ``quality_report`` and shown as the extra link "Quality
report" even when the gate fails the task: that is when an operator needs it most.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperatorLink

from privrec_pipeline.orchestration.spark_operator import PrivrecSparkSubmitOperator

REPORT_XCOM_KEY = "quality_report"


def _as_url(uri: str) -> str:
    return uri if "://" in uri else f"file://{uri}"


class QualityReportLink(BaseOperatorLink):
    """Extra link to the day's Data Docs (stored by the worker after execute, as XCom)."""

    name = "Quality report"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return getattr(operator, "report_url", "") or ""


class QualityValidateOperator(PrivrecSparkSubmitOperator):
    operator_extra_links = (QualityReportLink(),)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(needs_keys=False, **kwargs)
        self.report_url = ""

    def execute(self, context: Any) -> str:
        import datetime as dt

        from privrec_pipeline.config import lake_root
        from privrec_pipeline.quality.validate import report_index_uri

        day = dt.date.fromisoformat(str(context["ds"]))
        self.report_url = _as_url(report_index_uri(lake_root(), day))
        self.log.info("quality report for %s: %s", context["ds"], self.report_url)
        context["ti"].xcom_push(key=REPORT_XCOM_KEY, value=self.report_url)
        super().execute(context)
        return self.report_url
