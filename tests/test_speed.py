"""Timings: <run>/timings.json phase by phase."""
import json

import pytest

import common


def test_timings_replace_phases_keep_skipped_ones_and_sum(tmp_path, capsys):
    t = common.Timings(tmp_path)
    with t.phase("01/teacher") as ph:
        ph.extra = {"epochs": 1}
    common.record_timing(tmp_path, "02/dit-ipc10", 30.0, 1.0, 2.0)
    common.record_timing(tmp_path, "02/dit-ipc10", 60.0, 1.5, 1.5)  # a rerun replaces it
    t.add("02/lgd-ipc10", 5.0, 1.0, skipped=True)  # found finished: nothing recorded
    with pytest.raises(RuntimeError):
        with t.phase("03/default/sets"):
            raise RuntimeError("a phase that fails is not recorded")
    d = json.loads((tmp_path / "timings.json").read_text())
    assert list(d) == ["01/teacher", "02/dit-ipc10"] and d["01/teacher"]["epochs"] == 1
    assert d["02/dit-ipc10"]["seconds"] == 60.0 and d["02/dit-ipc10"]["load_start"] == 1.5
    table = common.timings_table(tmp_path)
    assert "| 02/dit-ipc10 | 1.0 | 60 | 1.50 -> 1.50 |" in table
    assert f"**{d['01/teacher']['seconds'] + 60:.0f}**" in table.splitlines()[-1]
    t.report("test")
    out = capsys.readouterr().out
    assert "02/lgd-ipc10" in out and "skipped: done earlier" in out
    (tmp_path / "timings.json").write_text("{half")  # unreadable: starts over, job not lost
    common.record_timing(tmp_path, "01/prior", 1.0, 0.5, 0.5)
    assert list(json.loads((tmp_path / "timings.json").read_text())) == ["01/prior"]
    with pytest.raises(common.UserError, match="does not exist"):
        common.timings_table(tmp_path / "none")

