"""SparkSession construction shared by the jobs and the tests.

A job's session is a Spark Connect session on the engine (``spark.engine``) when one is
configured; tests and the cold benchmarks pass a master (``local[2]``) for an application of
their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

SPARK_DEFAULTS: dict[str, str] = {
    # Data decisions use UTC: the data interval and event times are compared in UTC.
    "spark.sql.session.timeZone": "UTC",
    # Small default: adaptive execution coalesces further; big clusters override by --conf.
    "spark.sql.shuffle.partitions": "8",
    "spark.sql.parquet.compression.codec": "zstd",
    # Plans never show literal values that look like secrets (defence in depth: keys are
    # passed as data, never as literals, see privrec_pipeline.crypto.key_frame).
    "spark.sql.redaction.string.regex": "(?i)[0-9a-f]{64,}",
}
"""Session settings privrec relies on; a value given at launch (the engine's settings, or
spark-submit --conf) wins, except for ``REQUIRED``."""
REQUIRED = ("spark.sql.session.timeZone",)  # set on every session: days are UTC days

# JVM options of the driver and executors. Whole-stage code generation turns the collect
# classification into one large method per stage; HotSpot by default never JIT-compiles
# methods over 8,000 bytes of bytecode (``DontCompileHugeMethods``) and would interpret it.
# Measured on 1M landing lines (local[2]): classify 13.3 s -> 8.2 s, bronze 26.5 s -> 16.2 s;
# pseudonymize on 2M events 23.8-24.8 s against 24.9-27.2 s without it.
JVM_OPTIONS = "-XX:-DontCompileHugeMethods"
# Jobs measured faster with HotSpot's default: validate's one large aggregate (the column
# checks) runs once per row and does not repay compiling it (2M events, three pairs of
# runs: 23.3-23.8 s against 24.1-24.8 s, and 2 s less CPU).
JOB_JVM_OPTIONS: dict[str, str] = {"validate": "-XX:+DontCompileHugeMethods"}


def launch_conf(job: str | None = None) -> dict[str, str]:
    """Settings that must be given at JVM launch (spark-submit --conf or the builder), for
    ``jobs/<job>.py``."""
    options = JOB_JVM_OPTIONS.get(job or "", JVM_OPTIONS)
    return {"spark.driver.extraJavaOptions": options, "spark.executor.extraJavaOptions": options}


LAUNCH_CONF: dict[str, str] = launch_conf()
"""Launch settings of the jobs without their own (``launch_conf``)."""


def get_spark(app_name: str, master: str | None = None) -> "SparkSession":
    """The job's session: on the warm engine (a Spark Connect server, ``spark.engine``) when one
    is configured or runs and no ``master`` is given, else a Spark application of its own."""
    from pyspark.sql import SparkSession

    from privrec_pipeline.spark import engine

    remote = None if master else engine.remote_settings()
    if remote is not None:
        spark = engine.connect(app_name, *remote)
        # privrec's own server was started with SPARK_DEFAULTS under the deployment's settings;
        # another server gets them per session. Data decisions are in UTC whatever is set.
        own = spark.conf.get(engine.DEFAULTS_MARKER, "false") == "true"
        for key, value in SPARK_DEFAULTS.items():
            if key in REQUIRED or (not own and (key != "spark.sql.redaction.string.regex"
                                                or spark.conf.get(key, None) is None)):
                spark.conf.set(key, value)
        return spark
    builder = SparkSession.builder.appName(app_name).config("spark.ui.showConsoleProgress", "false")
    if master:  # launched from Python (tests, tools), not by spark-submit
        builder = builder.master(master)
        for key, value in LAUNCH_CONF.items():
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    given = spark.sparkContext.getConf()
    for key, value in SPARK_DEFAULTS.items():
        if not given.contains(key):
            spark.conf.set(key, value)
    spark.sparkContext.setLogLevel("WARN")
    return spark
