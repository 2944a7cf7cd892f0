"""The validate step: run the declared suites with Great Expectations on the day's silver
and the collect manifest, write Data Docs and ``summary.json``, and gate the run.

Reports never hold raw values: the result format keeps counts and rates only (no partial
unexpected lists, no unexpected rows or index queries; Great Expectations' default formats
would copy failing values into the report), and ``summary.json`` keeps a whitelist of
result fields. Reports are rendered in a local temporary folder, copied to a hidden staging
folder of the lake and swapped in, so a killed task leaves no half-written report.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from privrec_pipeline import lake as lk
from privrec_pipeline.errors import PrivrecError, QualityGateFailed
from privrec_pipeline.ingest import read_manifest
from privrec_pipeline.quality.config import QualityConfig
from privrec_pipeline.quality.day_report import format_observed, render_day_page
from privrec_pipeline.quality.history import row_count_bounds, trailing_row_counts
from privrec_pipeline.quality.suites import (
    ExpectationSpec,
    RowCountBounds,
    check_overrides,
    resolve_suite,
    suite_parameters,
)

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

# Counts and rates only: Great Expectations' BASIC/SUMMARY formats would put failing values
# (e.g. an email found in a text column) into results and Data Docs.
RESULT_FORMAT: dict[str, Any] = {
    "result_format": "BASIC",
    "partial_unexpected_count": 0,
    "exclude_unexpected_values": True,
    "include_unexpected_rows": False,
    "return_unexpected_index_query": False,
}
# Result fields copied into summary.json. observed_value only where it is a count, a
# rate, a type name or the column list (see _observed).
RESULT_FIELDS = ("element_count", "missing_count", "missing_percent", "unexpected_count",
                 "unexpected_percent", "unexpected_percent_nonmissing")
_NAMES_OBSERVED = {"expect_table_columns_to_match_set", "expect_column_values_to_be_of_type"}
SUMMARY_FILE = "summary.json"
DOCS_INDEX = "index.html"  # the day page (day_report.py)
DATA_DOCS_DIR = "data_docs"  # Great Expectations' site


@dataclass
class ExpectationOutcome:
    id: str
    type: str
    column: str | None
    severity: str
    description: str
    success: bool
    observed: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def describe(self) -> str:
        where = f" on {self.column}" if self.column else ""
        stats = format_observed(self.observed) or "no statistics"
        if self.error:
            stats = f"could not be evaluated ({self.error})"
        return f"{self.id} ({self.type}{where}): {stats}"


def _observed(type_: str, result: dict[str, Any]) -> dict[str, Any]:
    out = {k: result[k] for k in RESULT_FIELDS if result.get(k) is not None}
    value = result.get("observed_value")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out["observed_value"] = value
    elif type_ in _NAMES_OBSERVED and value is not None:
        out["observed_value"] = value
    return out


_ERROR_NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*(?:Error|Exception))")


def _error_name(exception_info: dict[str, Any]) -> str:
    """The exception's class name only: messages of failed metrics can quote data."""
    text = f"{exception_info.get('exception_traceback') or ''} {exception_info.get('exception_message') or ''}"
    names = _ERROR_NAME.findall(text)
    return names[-1].rsplit(".", 1)[-1] if names else "error"


def report_uri(lake: str, day: dt.date) -> str:
    return lk.partition_uri(lake, "reports", day)


def report_index_uri(lake: str, day: dt.date) -> str:
    return f"{report_uri(lake, day)}/{DOCS_INDEX}"


def events_outside_catalog(spark: "SparkSession", lake: str, day: dt.date, silver: "DataFrame") -> int:
    """Silver events whose item is not in the day's catalog (0 without a catalog): kept in
    silver, left out of the DP statistics' public partitions, counted in the quality report."""
    from pyspark.sql import functions as F

    from privrec_pipeline.catalog import read_items, snapshot_for

    snapshot = snapshot_for(lake, day)
    if snapshot is None:
        return 0
    ids = spark.createDataFrame(read_items(snapshot).select(["item_id"]).to_pandas())
    return silver.select("item_id").join(F.broadcast(ids), "item_id", "left_anti").count()


def collect_frame(collect: dict, bronze_read: int, silver_read: int, outside_catalog: int = 0) -> "pd.DataFrame":
    """The one-row table the ``collect`` suite checks (pandas: Great Expectations' pandas
    engine checks one row in milliseconds, where Spark queries cost seconds)."""
    import pandas as pd

    landing = int(collect["landing_records"])
    quarantined = sum(int(v) for v in collect["quarantined"].values())
    row = {
        "landing_records": landing,
        "bronze_records": int(collect["bronze_records"]),
        "quarantined": quarantined,
        "duplicates": int(collect["duplicates"]),
        # Records of users who asked to be erased count as accounted for (``erasure``).
        "accounted_records": int(collect["bronze_records"]) + quarantined + int(collect["duplicates"])
        + int(collect.get("erased", 0)),
        "quarantine_rate": quarantined / landing if landing else 0.0,
        "bronze_records_read": bronze_read,
        "silver_records_read": silver_read,
        "events_outside_catalog": outside_catalog,
    }
    return pd.DataFrame([row]).astype({k: "float64" if k == "quarantine_rate" else "int64" for k in row})


def _context(docs_dir: str) -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={"privrec": {
            "class_name": "SiteBuilder", "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": docs_dir},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }},
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run_suite(context: Any, name: str, df: "DataFrame | pd.DataFrame", specs: list[ExpectationSpec],
               run_id: Any) -> list[ExpectationOutcome]:
    import great_expectations as gx
    import pandas as pd
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    import privrec_pipeline.quality.expectations  # noqa: F401  (registers privrec's expectations)

    if isinstance(df, pd.DataFrame):
        source = context.data_sources.add_pandas(name=f"{name}_source")
    else:
        source = context.data_sources.add_spark(name=f"{name}_source", persist=False)
    batch = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe(f"{name}_day")
    # to_domain_obj raises on an unknown type or bad kwargs (a suite given as dicts would
    # drop such an entry with only a log line).
    expectations = [
        ExpectationConfiguration(type=s.type, kwargs=dict(s.kwargs), severity=s.severity,
                                 meta={"privrec_id": s.id}).to_domain_obj()
        for s in specs
    ]
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=f"{name}_checkpoint", validation_definitions=[definition],
        actions=[],  # Data Docs are built once for both suites (run_validate)
        result_format=RESULT_FORMAT,
    ))
    result = checkpoint.run(batch_parameters={"dataframe": df}, run_id=run_id)
    by_id = {s.id: s for s in specs}
    outcomes: dict[str, ExpectationOutcome] = {}
    for validation in result.run_results.values():
        for r in validation.results:
            spec = by_id[r.expectation_config.meta["privrec_id"]]
            info = r.exception_info or {}
            raised = bool(info.get("raised_exception"))
            outcomes[spec.id] = ExpectationOutcome(
                id=spec.id, type=spec.type, column=spec.column, severity=spec.severity,
                description=spec.description, success=bool(r.success) and not raised,
                observed=_observed(spec.type, r.result or {}),
                error=_error_name(info) if raised else None,
            )
    missing = [s.id for s in specs if s.id not in outcomes]
    if missing:
        raise PrivrecError(f"validation returned no result for {missing}")
    return [outcomes[s.id] for s in specs]  # declaration order


@dataclass
class QualitySummary:
    date: str
    run_id: str
    gate: str  # passed | failed
    rows: int
    landing_records: int
    bronze_records: int
    duplicates: int
    quarantined: dict[str, int]
    quarantine_rate: float
    row_count_bounds: dict[str, Any]
    counts: dict[str, int]
    failed_critical: list[str]
    failed_warning: list[str]
    expectations: list[dict[str, Any]]
    report: str
    config: dict[str, Any]
    step: str = "validate"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)


def _docs_links(root: Path) -> dict[str, str]:
    """Relative links to the Data Docs validation page of each suite."""
    links = {}
    for page in sorted((root / DATA_DOCS_DIR / "validations").rglob("*.html")):
        suite = page.relative_to(root / DATA_DOCS_DIR / "validations").parts[0]
        links[f"{suite} validation"] = quote(page.relative_to(root).as_posix())
    links["site index (needs network for its scripts)"] = f"{DATA_DOCS_DIR}/index.html"
    return links


ROW_COUNT_ID = "row_count.trailing"  # suites.yaml: its observed value is silver's row count


def _silver_rows(outcomes: list[ExpectationOutcome], silver: "DataFrame") -> int:
    """Silver's row count as the silver suite measured it (no second Spark job), or counted."""
    row_count = next((o for o in outcomes if o.id == ROW_COUNT_ID and o.error is None), None)
    observed = row_count.observed.get("observed_value") if row_count else None
    return int(observed) if isinstance(observed, int) else silver.count()


def gate_message(summary: QualitySummary, outcomes: list[ExpectationOutcome]) -> str:
    failed = [o for o in outcomes if not o.success and o.severity == "critical"]
    lines = [f"data quality gate failed for {summary.date}: {len(failed)} critical expectation(s) failed"]
    lines += [f"  - {o.describe()}" for o in failed]
    lines.append(f"full report: {summary.report}")
    return "\n".join(lines)


def run_validate(spark: "SparkSession", lake: str, day: dt.date, config: QualityConfig, *,
                 run_id: str = "manual", allow_empty: bool = False) -> QualitySummary:
    """silver/dt=D + collect manifest -> reports/quality/dt=D/ (Data Docs + summary.json).

    Raises ``QualityGateFailed`` (after the report is written) if a critical expectation fails.
    """
    from great_expectations.core.run_identifier import RunIdentifier

    fs = lk.Lake(lake)
    collect = read_manifest(spark, lake, "collect", day)
    read_manifest(spark, lake, "pseudonymize", day)  # validate needs a finished pseudonymize
    silver = spark.read.parquet(lk.partition_uri(lake, "silver", day))
    # Parquet footers give the count without scanning data; the job runs while Great
    # Expectations prepares the silver suite.
    counting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bronze-count")
    bronze_count = counting.submit(lambda: spark.read.parquet(lk.partition_uri(lake, "bronze", day)).count())
    outside_catalog = counting.submit(events_outside_catalog, spark, lake, day, silver)
    counting.shutdown(wait=False)

    def load_summary(d: dt.date) -> dict | None:
        uri = f"{report_uri(lake, d)}/{SUMMARY_FILE}"
        return json.loads(fs.read_text(uri)) if fs.exists(uri) else None

    history = trailing_row_counts(day, config.row_count_window_days, load_summary)
    bounds: RowCountBounds = row_count_bounds(history, config, allow_empty=allow_empty)
    params = suite_parameters(config, day, bounds)
    silver_specs = resolve_suite("silver", params, config)
    collect_specs = resolve_suite("collect", params, config)
    check_overrides(config, silver_specs + collect_specs)

    target = report_uri(lake, day)
    staging = fs.staging_uri(target)
    ge_run = RunIdentifier(run_name=f"privrec_nightly-{day}",
                           run_time=dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC))
    with tempfile.TemporaryDirectory(prefix="privrec-quality-") as tmp:
        context = _context(f"{tmp}/{DATA_DOCS_DIR}")
        outcomes = _run_suite(context, "silver", silver, silver_specs, ge_run)
        silver_read = _silver_rows(outcomes, silver)
        outcomes += _run_suite(context, "collect", collect_frame(collect, bronze_count.result(), silver_read,
                                                                 outside_catalog.result()),
                               collect_specs, ge_run)
        context.build_data_docs(site_names=["privrec"])
        failed_critical = [o.id for o in outcomes if not o.success and o.severity == "critical"]
        failed_warning = [o.id for o in outcomes if not o.success and o.severity == "warning"]
        quarantined = {k: int(v) for k, v in collect["quarantined"].items()}
        landing = int(collect["landing_records"])
        summary = QualitySummary(
            date=day.isoformat(), run_id=run_id, gate="failed" if failed_critical else "passed",
            rows=silver_read, landing_records=landing, bronze_records=int(collect["bronze_records"]),
            duplicates=int(collect["duplicates"]), quarantined=quarantined,
            quarantine_rate=sum(quarantined.values()) / landing if landing else 0.0,
            row_count_bounds={"min": bounds.min_value, "max": bounds.max_value,
                              "history_days": bounds.history_days, "basis": bounds.basis},
            counts={"evaluated": len(outcomes), "passed": sum(o.success for o in outcomes),
                    "failed_critical": len(failed_critical), "failed_warning": len(failed_warning)},
            failed_critical=failed_critical, failed_warning=failed_warning,
            expectations=[asdict(o) for o in outcomes],
            report=report_index_uri(lake, day), config=config.to_dict(),
        )
        with open(f"{tmp}/{SUMMARY_FILE}", "w", encoding="utf-8") as fh:
            fh.write(summary.to_json())
        with open(f"{tmp}/{DOCS_INDEX}", "w", encoding="utf-8") as fh:
            fh.write(render_day_page(json.loads(summary.to_json()), _docs_links(Path(tmp))))
        try:
            fs.upload_dir(tmp, staging, last=SUMMARY_FILE)
            fs.swap_in(staging, target, last=SUMMARY_FILE)
        except BaseException:
            fs.delete(staging)
            raise
    for o in outcomes:
        if not o.success:
            log.warning("expectation failed [%s]: %s", o.severity, o.describe())
    if failed_critical:
        raise QualityGateFailed(gate_message(summary, outcomes))
    return summary
