"""Pseudonym keys are told apart by fingerprint, not by label: a training window over days
written under two keys, both labelled v1 (a recreated key file, a worker with its own file),
is refused, because one person would count as several users."""

from __future__ import annotations

import datetime as dt
import json
import shutil

import pytest

from conftest import DAY, released_day
from privrec_pipeline import lake as lk
from privrec_pipeline.errors import PrivrecError
from privrec_pipeline.ingest import run_collect, run_pseudonymize
from privrec_pipeline.manifest import pseudonym_fingerprint
from privrec_pipeline.quality.config import QualityConfig
from privrec_pipeline.quality.validate import run_validate
from privrec_pipeline.secrets import new_key_document, parse_key_document
from privrec_pipeline.sources.synthetic import GeneratorConfig, generate_day
from privrec_pipeline.training.partitions import PartitionParams, run_build_partitions

pytestmark = pytest.mark.spark
DAY_BEFORE = DAY - dt.timedelta(days=1)
GENERATOR = {"events": 4000, "users": 150, "items": 60, "seed": 3}  # one user population on both days
PARAMS = PartitionParams(window_days=2, partitions=2, max_items_per_user=12, holdout_user_share=0.2)


@pytest.fixture(scope="module")
def other_keyring():
    """A second, independently created key document: its pseudonym key is labelled v1 too."""
    return parse_key_document(json.dumps(new_key_document()), "other worker's keys")


@pytest.fixture(scope="module")
def two_keys_lake(spark, tmp_path_factory, keyring, other_keyring):
    """DAY under the shared keys, DAY_BEFORE pseudonymized by a worker with its own key file."""
    lake = str(tmp_path_factory.mktemp("fingerprints") / "lake")
    released_day(spark, lake, keyring, GENERATOR)
    generate_day(GeneratorConfig(date=DAY_BEFORE, **GENERATOR), lake)
    run_collect(spark, lake, DAY_BEFORE, keyring)
    run_pseudonymize(spark, lake, DAY_BEFORE, other_keyring)
    run_validate(spark, lake, DAY_BEFORE, QualityConfig())
    return lake


def _users(spark, lake, day):
    silver = spark.read.parquet(lk.partition_uri(lake, "silver", day))
    return {r.user_pseudonym for r in silver.select("user_pseudonym").distinct().collect()}


def test_a_window_over_two_keys_with_the_same_label_is_refused(spark, two_keys_lake, keyring, other_keyring):
    assert keyring.pseudonym.version == other_keyring.pseudonym.version == "v1"
    # What the check prevents: the same people, but no pseudonym in common across the two days.
    assert not _users(spark, two_keys_lake, DAY) & _users(spark, two_keys_lake, DAY_BEFORE)
    with pytest.raises(PrivrecError) as err:
        run_build_partitions(spark, two_keys_lake, DAY, PARAMS)
    message = str(err.value)
    assert keyring.pseudonym.fingerprint in message and other_keyring.pseudonym.fingerprint in message
    assert str(DAY) in message and str(DAY_BEFORE) in message
    assert "Rerun pseudonymize" in message and "window that does not span the rotation" in message
    assert not any(s in message for s in keyring.secret_strings() + other_keyring.secret_strings())
    assert not lk.path(lk.manifest_uri(two_keys_lake, "build_partitions", DAY)).exists()


def test_one_key_over_the_window_is_recorded_in_the_manifest(spark, two_keys_lake, keyring, tmp_path):
    lake = str(tmp_path / "lake")
    shutil.copytree(two_keys_lake, lake)
    run_pseudonymize(spark, lake, DAY_BEFORE, keyring)  # the fix the error names: one key for the window
    assert _users(spark, lake, DAY) & _users(spark, lake, DAY_BEFORE)  # the same people, the same pseudonyms
    manifest = run_build_partitions(spark, lake, DAY, PARAMS)
    assert manifest.days_used == [str(DAY_BEFORE), str(DAY)]
    assert manifest.pseudonym_key_fingerprint == keyring.pseudonym.fingerprint
    written = json.loads(lk.path(lk.manifest_uri(lake, "build_partitions", DAY)).read_text())
    assert written["pseudonym_key_fingerprint"] == keyring.pseudonym.fingerprint
    assert pseudonym_fingerprint(lk.Lake(lake), lake, DAY_BEFORE) == keyring.pseudonym.fingerprint


def test_a_day_without_a_recorded_fingerprint_is_refused(spark, two_keys_lake, keyring, tmp_path):
    lake = str(tmp_path / "lake")
    shutil.copytree(two_keys_lake, lake)
    manifest_path = lk.path(lk.manifest_uri(lake, "pseudonymize", DAY_BEFORE))
    old = json.loads(manifest_path.read_text())
    old.pop("pseudonym_key_fingerprint")  # as written before fingerprints were recorded
    manifest_path.write_text(json.dumps(old))
    with pytest.raises(PrivrecError, match=f"{DAY_BEFORE} records key version 'v1' but no key fingerprint"):
        run_build_partitions(spark, lake, DAY, PARAMS)
    with pytest.raises(PrivrecError, match="rerun pseudonymize for this date"):
        pseudonym_fingerprint(lk.Lake(lake), lake, DAY_BEFORE)
    manifest_path.unlink()
    with pytest.raises(PrivrecError, match=f"no pseudonymize manifest for {DAY_BEFORE}"):
        run_build_partitions(spark, lake, DAY, PARAMS)
