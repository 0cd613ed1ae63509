"""The result file's JSON Schema (cpt_bench/running/result.schema.json): every committed result file follows it, a file
that breaks the contract does not, and it agrees with the keys the code writes (every method's fresh result is
validated in test_method_contract.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest

from cpt_bench.running.results import SCHEMA, load_schema, validate_result

ROOT = Path(__file__).parents[1]


def committed_result_files() -> list[Path]:
    files = []
    for path in sorted((ROOT / "results").rglob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("schema") == SCHEMA:
            files.append(path)
    return files


def test_every_committed_result_file_follows_the_schema():
    files = committed_result_files()
    assert len(files) >= 10  # the leaderboard, the reference, the ablations, ...
    for path in files:
        validate_result(json.loads(path.read_text(encoding="utf-8")), str(path.relative_to(ROOT)))


def test_the_schema_is_a_valid_json_schema_named_after_the_result_files():
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["schema"]["const"] == SCHEMA == schema["$id"]


@pytest.mark.parametrize("breakage", ["missing key", "score above 1", "seed not an integer", "matrix of text"])
def test_a_result_that_breaks_the_contract_is_refused(breakage):
    result = copy.deepcopy(json.loads(committed_result_files()[0].read_text(encoding="utf-8")))
    if breakage == "missing key":
        del result["provenance"]
    elif breakage == "score above 1":
        result["base"]["macro_f1"][0] = 1.5
    elif breakage == "seed not an integer":
        result["seed"] = "0"
    else:
        result["matrix"]["macro_f1"] = [["high"]]
    with pytest.raises(ValueError, match="does not follow"):
        validate_result(result, "broken.json")
