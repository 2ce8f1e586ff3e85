"""SegmentExportErasureOperator: its arguments are plain data, and with file sources the receipts go to the
embedded state file, beside the export's state (checked by the sandbox and that file)."""

from __future__ import annotations

import csv
import json
import sqlite3

import segment_data
from sandbox_state import klaviyo_profiles
from segment_export_sandbox import KLAVIYO_LIST_ID

from segment_export.destinations import destination_for
from segment_export.exporter import RunOptions, run_export
from segment_export.operators.erasure import SegmentExportErasureOperator
from segment_export.sources import source_for
from segment_export.spec import ErasureSpec, ExportSpec
from segment_export.state import StateStore


def test_file_sources_keep_receipts_in_the_embedded_state_and_the_next_export_skips(tmp_path, sandbox, monkeypatch):
    monkeypatch.setenv("SEGMENT_EXPORT_STATE_DB", str(tmp_path / "state.db"))
    extract = segment_data.write_csv(tmp_path / "vip.csv", 200, segment="vip")
    export = ExportSpec.model_validate({
        "id": "csv_vip", "privacy_acknowledged": True, "source": {"path": str(extract)},
        "destination": {"type": "klaviyo", "list_id": KLAVIYO_LIST_ID}, "mapping": {"email": "email"}})

    def run(run_id):
        destination = destination_for(export)
        state = StateStore.open(None, export.id, destination.target_id)
        try:
            return run_export(export, source_for(export.source), destination, state=state, options=RunOptions(run_id=run_id))
        finally:
            state.close()

    run("first")
    with extract.open() as f:
        email = next(csv.DictReader(f))["email"]
    requests = tmp_path / "requests.csv"
    requests.write_text(f"id,address\nr-1,{email}\n")
    erasure = ErasureSpec.model_validate({"source": {"path": str(requests)}, "mapping": {"email": "address", "request_id": "id"}})
    operator = SegmentExportErasureOperator(task_id="erase", erasure=erasure, exports=[export])
    json.dumps([operator.erasure, operator.exports])  # plain data, as the export operator keeps its spec
    summary = operator.execute({})
    assert (summary["sent"], summary["answered"]) == (1, 1) and summary["receipts"][0]["target_id"] == "account"
    assert email not in klaviyo_profiles(sandbox.state())
    with sqlite3.connect(tmp_path / "state.db") as conn:
        assert conn.execute("SELECT request_id, requested_at FROM segment_export_erasures").fetchall() == [("r-1", None)]
    second = run("second")
    assert second.skipped == 1 and second.accepted == 0 and email not in klaviyo_profiles(sandbox.state())
