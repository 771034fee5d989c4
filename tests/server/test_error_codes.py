"""One vocabulary of error codes: proto's ErrorCode is the declaration; the server's status map,
the table in proto/README.md §12, the Python client's error classes and the JavaScript client's
must each cover exactly those codes (and the README's statuses must be the server's)."""

from __future__ import annotations

import re
from pathlib import Path

from hooklab.errors import _BY_CODE, ServerError
from hooklab_proto import ErrorCode
from hooklab_server.api.errors import STATUS

ROOT = Path(__file__).resolve().parents[2]
CODES = {code.value for code in ErrorCode}


def test_every_code_has_one_status() -> None:
    assert {code.value for code in STATUS} == CODES


def test_the_readme_table_is_the_vocabulary_with_its_statuses() -> None:
    readme = (ROOT / "proto" / "README.md").read_text()
    section = readme[readme.index("## 12. Errors") :]
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", section, re.MULTILINE))
    assert set(rows) == CODES
    for code in ErrorCode:
        assert int(rows[code.value]) == STATUS[code], code


def test_the_python_client_has_a_class_for_every_code() -> None:
    assert set(_BY_CODE) == CODES
    assert all(issubclass(cls, ServerError) and cls is not ServerError for cls in _BY_CODE.values())


def test_the_javascript_client_has_a_class_for_every_code() -> None:
    source = (ROOT / "client" / "js" / "src" / "errors.js").read_text()
    table = source[source.index("ERROR_CLASSES") :]
    table = table[: table.index("};")]
    assert set(re.findall(r"^\s+([a-z_]+): [A-Za-z]+Error,$", table, re.MULTILINE)) == CODES
