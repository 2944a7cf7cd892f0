"""The installed Spark is consistent: pyspark and pyspark-client agree and Python UDFs run.

The Spark provider pulls pyspark-client, whose files overwrite pyspark's when versions
differ; then every Python UDF fails with a Py4J error. This guards the pin.
"""

import importlib.metadata as md

import pytest

pytestmark = pytest.mark.spark


def test_pyspark_and_client_versions_match():
    import pyspark

    assert md.version("pyspark") == md.version("pyspark-client") == pyspark.__version__


def test_python_udf_runs(spark):
    from pyspark.sql import functions as F

    double = F.udf(lambda x: x * 2, "long")
    rows = spark.range(5).select(double("id").alias("d")).collect()
    assert [r.d for r in rows] == [0, 2, 4, 6, 8]
