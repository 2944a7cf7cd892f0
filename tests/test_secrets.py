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
