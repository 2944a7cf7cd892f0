"""Right to erasure: a user erased from a generated two-day lake is in no file of any zone
afterwards (raw id, email, pseudonyms; encrypted columns decrypted and searched too), the
manifests still balance and pass the quality gate, a rerun of an old day keeps the user out,
and bad requests get clear messages."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import test_ledger

from conftest import DAY, row_keys
from privrec_pipeline import lake as lk
from privrec_pipeline.crypto import reference_pseudonym
from privrec_pipeline.erasure.apply import process_pending
from privrec_pipeline.erasure.data_keys import ShreddedError
from privrec_pipeline.erasure.requests import (
    COMPLETED,
    PENDING,
    ErasureRegister,
    open_register,
    read_id_file,
)
from privrec_pipeline.errors import ConfigurationError
from privrec_pipeline.ingest import run_collect, run_pseudonymize
from privrec_pipeline.sources.synthetic import GeneratorConfig, generate_day
from privrec_pipeline.transforms.collect import raw_record_aad

pytestmark = pytest.mark.spark
ledger_url = test_ledger.ledger_url  # the fixture: a fresh SQLite file or PostgreSQL schema
DAYS = [DAY, DAY + dt.timedelta(days=1)]
SHREDDED = "<a row whose data key was deleted>"


def landing_records(lake: str, day: dt.date) -> list[bytes]:
    lines = []
    for f in lk.files(lk.partition(lake, "landing", day)):
        if ".jsonl" in f.name:
            data = f.read_bytes()
            lines += (gzip.decompress(data) if f.name.endswith(".gz") else data).splitlines()
    return lines


def user_of(line: bytes) -> str | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    user = record.get("user_id") if isinstance(record, dict) else None
    return user if isinstance(user, str) else None


@pytest.fixture(scope="module")
def two_days(spark, tmp_path_factory, keyring):
    """Two generated days through collect and pseudonymize, plus a training shard and a
    serving partition holding the user to erase: the busiest user with a quarantined line."""
    root = str(tmp_path_factory.mktemp("erasure") / "lake")
    for day in DAYS:
        generate_day(GeneratorConfig(date=day, events=1500, users=40, items=50, seed=3, bad_rate=0.05), root)
        run_collect(spark, root, day, keyring)
        run_pseudonymize(spark, root, day, keyring)
    lines = [line for day in DAYS for line in landing_records(root, day)]
    counts = Counter(user_of(line) for line in lines if user_of(line))
    bad_users = {user_of(line) for line in lines if user_of(line) and (b'"bad' in line)}
    victim = max((u for u in counts if u in bad_users), key=counts.__getitem__)
    email = next(json.loads(line)["email"] for line in lines if user_of(line) == victim and b'"email"' in line)
    pseudonym = reference_pseudonym(keyring.pseudonym.material, "user", victim)
    other = next(u for u in counts if u != victim)
    _per_user_outputs(root, pseudonym, reference_pseudonym(keyring.pseudonym.material, "user", other))
    backup = Path(str(tmp_path_factory.mktemp("backup")))  # an old copy, as a backup keeps it
    for zone in ("landing", "bronze", "quarantine"):
        shutil.copytree(lk.zone_uri(root, zone), backup / zone)
    return root, victim, email, pseudonym, backup


def _per_user_outputs(root: str, victim: str, other: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    training = lk.partition(root, "training", DAYS[-1])
    for sub, rows in (("partition=0", [victim, victim, other]), ("holdout", [victim, other])):
        (training / sub).mkdir(parents=True)
        table = {"user_pseudonym": rows, "item_index": list(range(len(rows)))}
        if sub == "holdout":
            table["trained"] = [True] * len(rows)
        pq.write_table(pa.table(table), training / sub / "part-00000.snappy.parquet")
    (training / "vocabulary").mkdir()
    pq.write_table(pa.table({"item_id": ["a"], "item_index": [0]}), training / "vocabulary" / "part-0.parquet")
    lk.Lake(root).write_manifest(lk.manifest_uri(root, "build_partitions", DAYS[-1]), json.dumps(
        {"partitions": {"0": {"users": 2, "items": 3}}, "holdout": {"held_out_users": 0,
                                                                  "evaluated_training_users": 2}}))
    serving = lk.partition(root, "serving", DAYS[-1])
    serving.mkdir(parents=True)
    pq.write_table(pa.table({"key": [victim, other], "rank": [1, 1], "item_id": ["a", "b"]}),
                   serving / "v1.parquet")


def traces(root: str, keyring, needles: list[str]) -> list[str]:
    """Every file of the lake, read as a person would: gzip opened, every Parquet value, the
    encrypted identifiers and raw lines decrypted (with the data key a row names); where any
    needle occurs, and where a row names a data key that no longer exists (an erased user's)."""
    import pyarrow.parquet as pq

    keys = row_keys(root, keyring)

    def opened(row: dict, column: str, aad: bytes) -> str:
        try:
            return keys.open(row["enc_key_version"], row.get("data_key"), row[column], aad).decode("utf-8", "replace")
        except ShreddedError:
            return SHREDDED

    found = []
    for f in sorted(Path(root).rglob("*")):
        if not f.is_file() or f.name.endswith(".db"):
            continue
        texts = []
        if f.suffix == ".parquet":
            table = pq.read_table(f)
            texts.append(json.dumps(table.drop_columns([c for c in table.column_names if c.endswith("_enc")])
                                    .to_pylist(), default=str))
            rows = table.to_pylist()
            for row in rows:
                if row.get("identifiers_enc"):
                    texts.append(opened(row, "identifiers_enc", f"identifiers|{row['event_id']}".encode()))
                if row.get("raw_record_enc"):
                    texts.append(opened(row, "raw_record_enc", raw_record_aad(row["source_file"],
                                                                               row["record_position"])))
        else:
            data = f.read_bytes()
            texts.append((gzip.decompress(data) if f.suffix == ".gz" else data).decode("utf-8", "replace"))
        found += [f"{f.relative_to(root)}: {n}" for n in [*needles, SHREDDED] if any(n in t for t in texts)]
    return found


def test_an_erased_user_is_in_no_file_and_the_manifests_balance(two_days, keyring, spark):
    from privrec_pipeline.quality.config import QualityConfig
    from privrec_pipeline.quality.validate import run_validate

    root, victim, email, pseudonym, _ = two_days
    needles = [victim, email, pseudonym]
    assert len(traces(root, keyring, needles)) >= 8  # landing, bronze, quarantine, silver, training, serving
    before = {d: json.loads(lk.path(lk.manifest_uri(root, "collect", d)).read_text()) for d in DAYS}
    register = open_register(root)
    recorded = register.record(keyring, [victim])
    (done,) = process_pending(root, keyring, register)
    assert traces(root, keyring, needles) == []
    assert set(done.erased) >= {"landing", "bronze", "quarantine", "silver", "training", "serving"}
    # The request keeps its fingerprint and counts, not the id.
    (request,) = register.requests()
    assert request.id == recorded.new[0].id and request.state == COMPLETED
    assert request.erased["total"] == sum(done.erased.values())
    with register.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT user_id_enc FROM erasure_requests").scalar() is None
    for day in DAYS:
        doc = json.loads(lk.path(lk.manifest_uri(root, "collect", day)).read_text())
        assert doc["landing_records"] == before[day]["landing_records"]
        assert doc["landing_records"] == (doc["bronze_records"] + sum(doc["quarantined"].values())
                                          + doc["duplicates"] + doc["erased"])
        assert doc["erased"] > 0 and doc["bronze_records"] < before[day]["bronze_records"]
        bronze = spark.read.parquet(lk.partition_uri(root, "bronze", day))
        assert bronze.count() == doc["bronze_records"] and bronze.where(bronze.user_id == victim).count() == 0
        pseudo = json.loads(lk.path(lk.manifest_uri(root, "pseudonymize", day)).read_text())
        assert pseudo["bronze_records"] == pseudo["silver_records"] == doc["bronze_records"]
        # The quality gate's record accounting holds on the rewritten partitions (read by Spark).
        assert run_validate(spark, root, day, QualityConfig(quarantine_rate_max=0.5)).gate == "passed"
    partitions = json.loads(lk.path(lk.manifest_uri(root, "build_partitions", DAYS[-1])).read_text())
    assert partitions["partitions"]["0"] == {"users": 1, "items": 1}
    # Processing again finds nothing to do.
    assert process_pending(root, keyring, register) == []


def test_a_rerun_of_an_old_day_keeps_the_erased_user_out(two_days, keyring, spark):
    """Landing restored from a backup still holds the user's lines: collect drops them, counts
    them as erased and the day balances."""
    root, victim, email, pseudonym, backup = two_days
    register = open_register(root)
    if not register.requests():
        register.record(keyring, [victim])
        process_pending(root, keyring, register)
    restored = lk.partition(root, "landing", DAYS[0])
    shutil.rmtree(restored)
    shutil.copytree(backup / "landing" / restored.name, restored)
    theirs = sum(1 for line in landing_records(root, DAYS[0]) if user_of(line) == victim)
    assert theirs > 0
    manifest = run_collect(spark, root, DAYS[0], keyring)  # reads the register of the lake's ledger database
    run_pseudonymize(spark, root, DAYS[0], keyring)
    assert manifest.erased >= theirs  # and their duplicates' and malformed lines' copies
    manifest.check_balance()
    leftovers = [t for t in traces(root, keyring, [victim, email, pseudonym]) if not t.startswith("landing")]
    assert leftovers == []
    # The run summary says so.
    from rich.console import Console

    from privrec_pipeline.reporting import print_run_summary

    console = Console(record=True, width=200)
    print_run_summary(console, root, DAYS[0], None)
    (line,) = [row for row in console.export_text().splitlines() if "records of erased users" in row]
    assert line.split()[-2] == f"{manifest.erased:,}", line


def test_a_shredded_key_makes_an_old_copy_of_bronze_and_quarantine_undecryptable(two_days, keyring):
    """A copy of bronze and quarantine made before the erasure still holds the user's rows:
    after it, their data key is gone, so their identifiers and quarantined lines open with no
    key left (not the encryption key, not any other user's data key); everyone else's still do."""
    import pyarrow.parquet as pq
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

    from privrec_pipeline.crypto import reference_decrypt
    from privrec_pipeline.erasure.data_keys import wrap_key
    from privrec_pipeline.erasure.requests import fingerprint

    root, victim, _, _, backup = two_days
    register = open_register(root)
    if not register.requests():
        register.record(keyring, [victim])
        process_pending(root, keyring, register)
    (request,) = register.requests()
    assert request.erased["data_keys"] == 1  # one encryption key version
    theirs = fingerprint(keyring.encryption.material, victim)
    with register.data_keys.engine.connect() as conn:
        stored = dict(conn.exec_driver_sql("SELECT fingerprint, wrapped_key FROM user_data_keys").all())
    assert theirs not in stored and len(stored) >= 20  # the other users' keys are kept
    keys = row_keys(root, keyring)
    kek = wrap_key(keyring.encryption.material)
    every_key = [keyring.encryption.material, *(aes_key_unwrap(kek, bytes(w)) for w in stored.values())]
    shredded, opened = Counter(), 0
    for f in sorted(backup.rglob("*.parquet")):
        for row in pq.read_table(f).to_pylist():
            column, aad = (("identifiers_enc", f"identifiers|{row['event_id']}".encode()) if "identifiers_enc" in row
                           else ("raw_record_enc", raw_record_aad(row["source_file"], row["record_position"])))
            if row["data_key"] == theirs:
                assert row.get("user_id", victim) == victim
                with pytest.raises(ShreddedError):
                    keys.open(row["enc_key_version"], row["data_key"], row[column], aad)
                for key in every_key:  # with whatever key is left
                    with pytest.raises(InvalidTag):
                        reference_decrypt(key, row[column], aad)
                shredded[f.relative_to(backup).parts[0]] += 1
            elif row[column] is not None:
                assert keys.open(row["enc_key_version"], row["data_key"], row[column], aad)
                opened += 1
    assert shredded["bronze"] >= 10 and shredded["quarantine"] >= 1 and opened > 100


def test_an_unknown_user_is_completed_with_nothing_found(tmp_path, keyring):
    register = ErasureRegister(f"sqlite:///{tmp_path}/erasure.db")
    register.record(keyring, ["usr_nobody_here"])
    (done,) = process_pending(str(tmp_path / "lake"), keyring, register)
    assert done.erased == {}
    (request,) = register.requests()
    assert request.state == COMPLETED and request.erased["total"] == 0


def test_a_request_is_recorded_once_and_pending_until_processed(tmp_path, keyring):
    register = ErasureRegister(f"sqlite:///{tmp_path}/erasure.db")
    first = register.record(keyring, ["usr_a", "usr_b", "usr_a"])
    assert len(first.new) == 2 and first.already == []
    again = register.record(keyring, ["usr_b", "usr_c"])
    assert [r.id for r in again.already] == [first.new[1].id] and len(again.new) == 1
    assert [r.state for r in register.requests()] == [PENDING] * 3
    assert sorted(u for _, u in register.pending_ids(keyring)) == ["usr_a", "usr_b", "usr_c"]
    # Nothing of the ids in clear in the database file.
    raw = (tmp_path / "erasure.db").read_bytes()
    assert b"usr_a" not in raw and b"usr_c" not in raw


@pytest.mark.parametrize("content, message", [
    (b"usr_1\n usr_2\n", "line 2: the user id has spaces at its start or end"),
    (b"usr_1\nusr\x01x\n", "line 2: the user id contains a control character"),
    (b"\xff\xfe\n", "not UTF-8 text"),
    (b"# only a comment\n\n", "holds no user id"),
    (("u" * 300 + "\n").encode(), "longer than 256 characters"),
])
def test_a_malformed_id_file_is_refused_with_the_line(tmp_path, content, message):
    path = tmp_path / "ids.txt"
    path.write_bytes(content)
    with pytest.raises(ConfigurationError, match=message):
        read_id_file(path)
    assert read_id_file(_write(tmp_path / "ok.txt", b"# ids\nusr_1\n\nusr_2\n")) == ["usr_1", "usr_2"]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_gzip_landing_lines_are_matched_by_parsed_user_not_substring(tmp_path, keyring):
    """A line that merely mentions the id in another field of a valid record is kept; a broken
    line holding it is removed."""
    from privrec_pipeline.erasure.apply import Targets, erase_landing

    folder = tmp_path / "dt=2026-01-15"
    folder.mkdir()
    body = b"".join([
        b'{"user_id": "usr_x", "event_id": "1"}\n',
        b'{"user_id": "usr_y", "search_query": "usr_x"}\n',
        b'{"user_id": "usr_x", "event_id": \n',
        b'{"user_id": "usr_z"}\n',
    ])
    (folder / "events-000.jsonl.gz").write_bytes(gzip.compress(body))
    assert erase_landing(lk.path(str(folder)), Targets.of(keyring, ["usr_x"])) == 2
    left = gzip.decompress((folder / "events-000.jsonl.gz").read_bytes()).splitlines()
    assert left == [b'{"user_id": "usr_y", "search_query": "usr_x"}', b'{"user_id": "usr_z"}']
    assert not list(folder.parent.glob("_staging-*"))  # the swap left nothing behind


def test_the_erase_command_records_processes_and_reports(tmp_path, key_document, monkeypatch):
    from typer.testing import CliRunner

    from privrec_pipeline.cli import app

    monkeypatch.setenv("PRIVREC_KEYS_JSON", key_document)
    root = str(tmp_path / "lake")
    runner = CliRunner()
    recorded = runner.invoke(app, ["erase", "--user-id", "usr_someone", "--lake", root])
    assert recorded.exit_code == 0 and "recorded erasure request 1" in recorded.output, recorded.output
    assert "usr_someone" not in recorded.output
    again = runner.invoke(app, ["erase", "--user-id", "usr_someone", "--lake", root])
    assert "already requested: request 1, pending" in again.output
    status = runner.invoke(app, ["erase", "--status", "--lake", root])
    assert "pending" in status.output and "usr_someone" not in status.output
    processed = runner.invoke(app, ["erase", "--process", "--lake", root])
    assert "request 1: no rows of this user in any zone (unknown user id?)" in processed.output
    status = runner.invoke(app, ["erase", "--status", "--lake", root])
    assert "completed" in status.output and "no rows found (unknown user id?)" in status.output
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"usr_a\nusr b \n")
    bad = runner.invoke(app, ["erase", "--file", str(ids), "--lake", root])
    assert bad.exit_code != 0 and "line 2: the user id has spaces at its start or end" in bad.output
    assert "nothing was recorded" in bad.output and len(open_register(root).requests()) == 1
    assert runner.invoke(app, ["erase", "--lake", root]).exit_code != 0


def test_registers_opened_at_once_create_the_tables_once(ledger_url):
    """Two tasks of two runs open the register together on a fresh database, SQLite and
    PostgreSQL (seen on PostgreSQL: a duplicate-type error from the second CREATE TABLE)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(6), ctx.Queue()
    workers = [ctx.Process(target=_open_register, args=(ledger_url, start, results)) for _ in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    outcomes = [results.get(timeout=10) for _ in workers]
    assert outcomes == ["ok"] * 6, outcomes


def _open_register(url, start, results) -> None:
    try:
        start.wait()
        ErasureRegister(url).requests()
        results.put("ok")
    except Exception as exc:  # reported to the test, not lost in a child
        results.put(repr(exc))
