"""Key material: created safely, resolved in the documented order, never printed."""

import json
import os
import stat

import pytest

from privrec_pipeline.errors import SecretsError
from privrec_pipeline.secrets import (
    ENV_KEY_FILE,
    ENV_KEYS_JSON,
    init_key_file,
    load_keyring,
    new_key_document,
    parse_key_document,
)


def test_init_creates_0600_file_once(tmp_path):
    path = tmp_path / "conf" / "keys.json"
    created_path, created = init_key_file(path)
    assert created and created_path == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_text()
    _, created_again = init_key_file(path)
    assert not created_again and path.read_text() == first  # never overwritten


def test_env_document_wins_over_file(tmp_path, key_document):
    other = tmp_path / "keys.json"
    init_key_file(other)
    ring = load_keyring({ENV_KEYS_JSON: key_document, ENV_KEY_FILE: str(other)})
    assert ring.pseudonym.material.hex() == json.loads(key_document)["pseudonym"]["keys"]["v1"]


def test_group_readable_key_file_is_refused(tmp_path):
    path = tmp_path / "keys.json"
    init_key_file(path)
    os.chmod(path, 0o644)
    with pytest.raises(SecretsError, match="chmod 600"):
        load_keyring({ENV_KEY_FILE: str(path)})


def test_missing_keys_name_the_fix(tmp_path):
    with pytest.raises(SecretsError, match="privrec keys init"):
        load_keyring({ENV_KEY_FILE: str(tmp_path / "absent.json")})


def test_errors_and_repr_never_show_key_material():
    doc = new_key_document()
    secret = doc["pseudonym"]["keys"]["v1"]
    doc["pseudonym"]["current"] = "v9"
    with pytest.raises(SecretsError) as err:
        parse_key_document(json.dumps(doc), "test")
    assert secret not in str(err.value)
    doc["pseudonym"]["current"] = "v1"
    ring = parse_key_document(json.dumps(doc), "test")
    assert secret not in repr(ring) and secret not in str(ring)
    assert secret in ring.secret_strings()


def test_short_keys_are_rejected():
    doc = new_key_document()
    doc["encryption"]["keys"]["v1"] = "00ff"
    with pytest.raises(SecretsError, match="16, 24 or 32 bytes"):
        parse_key_document(json.dumps(doc), "test")


def _ring(path):
    return load_keyring({ENV_KEY_FILE: str(path)})


def test_fingerprint_identifies_the_key_not_its_label():
    first, second = new_key_document(), new_key_document()  # two `keys init`: both keys labelled v1
    ring_a, ring_b = parse_key_document(json.dumps(first), "a"), parse_key_document(json.dumps(second), "b")
    again = parse_key_document(json.dumps(first), "a, read again")
    assert ring_a.pseudonym.version == ring_b.pseudonym.version == "v1"
    assert ring_a.pseudonym.fingerprint == again.pseudonym.fingerprint  # stable for a key
    assert ring_a.pseudonym.fingerprint != ring_b.pseudonym.fingerprint  # differs between keys
    assert ring_a.pseudonym.fingerprint != ring_a.encryption.fingerprint
    fingerprint = ring_a.pseudonym.fingerprint
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    hexkey = first["pseudonym"]["keys"]["v1"]
    # Keyed (RFC 2104 HMAC): neither a piece of the key nor an unkeyed hash of it.
    assert fingerprint not in hexkey and not any(hexkey[i:i + 8] in fingerprint for i in range(0, 64, 8))
    import hashlib

    assert fingerprint != hashlib.sha256(bytes.fromhex(hexkey)).hexdigest()[:16]
    assert fingerprint in repr(ring_a.pseudonym) and hexkey not in repr(ring_a) + str(ring_a.pseudonym)


def test_rotate_adds_the_next_version_and_keeps_the_old_one(tmp_path):
    from privrec_pipeline.crypto import reference_pseudonym
    from privrec_pipeline.secrets import rotate_key_file

    path = tmp_path / "keys.json"
    init_key_file(path)
    before = _ring(path)
    rotation = rotate_key_file(path, "pseudonym")
    after = _ring(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (rotation.old.version, rotation.new.version) == ("v1", "v2")
    assert after.pseudonym.version == "v2" and after.pseudonym.fingerprint == rotation.new.fingerprint
    assert after.pseudonym_versions["v1"].material == before.pseudonym.material  # kept, byte for byte
    assert after.pseudonym.fingerprint != before.pseudonym.fingerprint
    assert (reference_pseudonym(after.pseudonym.material, "user", "usr_0001")
            != reference_pseudonym(before.pseudonym.material, "user", "usr_0001"))  # new pseudonyms
    assert after.encryption == before.encryption  # the other purpose is untouched
    assert "v1" in json.loads(path.read_text())["pseudonym"]["retired"]
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]  # no temp file left behind

    encryption = rotate_key_file(path, "encryption")
    ring = _ring(path)
    assert encryption.new.version == ring.encryption.version == "v2"
    assert set(ring.encryption_versions) == {"v1", "v2"}  # v1 still decrypts older bronze
    assert rotate_key_file(path, "pseudonym").new.version == "v3"


def test_rotate_never_reuses_a_label(tmp_path):
    from privrec_pipeline.secrets import rotate_key_file

    doc = new_key_document()
    doc["pseudonym"]["retired"] = {"v7": "2026-01-01T00:00:00+00:00"}  # v7's key was erased from the file
    path = tmp_path / "keys.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh)
    assert rotate_key_file(path, "pseudonym").new.version == "v8"


def test_a_retired_key_is_not_made_current_again(tmp_path):
    from privrec_pipeline.secrets import rotate_key_file

    path = tmp_path / "keys.json"
    init_key_file(path)
    rotate_key_file(path, "pseudonym")
    doc = json.loads(path.read_text())
    doc["pseudonym"]["current"] = "v1"
    with pytest.raises(SecretsError, match="'v1' was retired") as err:
        parse_key_document(json.dumps(doc), "test")
    assert not any(s in str(err.value) for s in doc["pseudonym"]["keys"].values())


def test_rotate_refuses_a_missing_or_unsafe_file(tmp_path):
    from privrec_pipeline.secrets import rotate_key_file

    with pytest.raises(SecretsError, match="privrec keys init"):
        rotate_key_file(tmp_path / "absent.json", "pseudonym")
    path = tmp_path / "keys.json"
    init_key_file(path)
    os.chmod(path, 0o644)
    with pytest.raises(SecretsError, match="chmod 600"):
        rotate_key_file(path, "pseudonym")
    os.chmod(path, 0o600)
    with pytest.raises(SecretsError, match="unknown key purpose"):
        rotate_key_file(path, "signing")


def test_a_failed_write_never_leaves_a_broken_key_file(tmp_path, monkeypatch):
    """A write that fails (disk full, I/O error at fsync, a crash) leaves the old document or
    none, never a half-written one that a later run would misread or `keys init` would keep."""
    path = tmp_path / "conf" / "keys.json"
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        with pytest.raises(OSError, match="No space left"):
            init_key_file(path)
    assert not path.exists() and list(path.parent.iterdir()) == []
    init_key_file(path)
    before = path.read_text()
    from privrec_pipeline.secrets import rotate_key_file

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        with pytest.raises(OSError, match="No space left"):
            rotate_key_file(path, "pseudonym")
    assert path.read_text() == before and [p.name for p in path.parent.iterdir()] == ["keys.json"]
    assert _ring(path).pseudonym.version == "v1"


def test_cli_rotate_and_show_print_fingerprints_never_keys(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from privrec_pipeline.cli import app

    monkeypatch.delenv(ENV_KEYS_JSON, raising=False)
    path = tmp_path / "keys.json"
    runner = CliRunner()
    assert runner.invoke(app, ["keys", "init", "--path", str(path)]).exit_code == 0
    v1 = _ring(path)

    declined = runner.invoke(app, ["keys", "rotate", "--purpose", "pseudonym", "--path", str(path)], input="n\n")
    assert declined.exit_code == 1 and _ring(path) == v1
    assert "same person gets a new pseudonym" in " ".join(declined.output.split())

    rotated = runner.invoke(app, ["keys", "rotate", "--purpose", "pseudonym", "--path", str(path), "--yes"])
    assert rotated.exit_code == 0, rotated.output
    v2 = _ring(path)
    text = " ".join(rotated.output.split())
    assert "same person gets a new pseudonym" in text and "must not be combined" in text
    assert v1.pseudonym.fingerprint in text and v2.pseudonym.fingerprint in text

    shown = runner.invoke(app, ["keys", "show", "--path", str(path)])
    assert shown.exit_code == 0, shown.output
    lines = {line.split()[0] + " " + line.split()[1]: line for line in shown.output.splitlines()[1:]}
    assert v2.pseudonym.fingerprint in lines["pseudonym v2"] and "current" in lines["pseudonym v2"]
    assert v1.pseudonym.fingerprint in lines["pseudonym v1"] and "retired" in lines["pseudonym v1"]
    assert v1.encryption.fingerprint in lines["encryption v1"]
    for output in (declined.output, rotated.output, shown.output):
        squashed = "".join(output.split())
        assert not any(s in squashed for s in v2.secret_strings())

    monkeypatch.setenv(ENV_KEYS_JSON, path.read_text())
    from_env = runner.invoke(app, ["keys", "rotate", "--purpose", "encryption"])
    assert from_env.exit_code == 1 and "rotate them there" in " ".join(from_env.output.split())
    assert v2.encryption.fingerprint in runner.invoke(app, ["keys", "show"]).output
