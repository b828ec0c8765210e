"""`cstoolkit world compare`: paired differences of two methods over the same bench items."""

from __future__ import annotations

import json

from cstoolkit.cli import main
from cstoolkit.world.compare import compare, paired_difference


def _rows(method: str, rates: list[float], n: int = 72, kind: str = "held_out_pair", metric: str = "content_acc"):
    samples = {"content_acc": "content_samples", "rejected": "scored_samples"}[metric]
    return [{"method": method, "item": f"{kind}-{i}", "kind": kind, "status": "done", metric: r, samples: n}
            for i, r in enumerate(rates)]


def test_a_clearly_better_is_named_and_level_when_equal() -> None:
    hard_easy = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.1, 0.9, 0.2, 0.8]
    better = [min(1.0, r + 0.1) for r in hard_easy]
    r = paired_difference(_rows("a", better), _rows("b", hard_easy), "content_acc")
    assert r is not None and r["items"] == 10 and abs(r["diff"] - 0.1) < 0.02
    # paired: the items' spread cancels, so a steady +0.1 is clear of 0 although the rates range 0.1-1.0
    assert r["ci95"][0] > 0 and r["verdict"] == "a"
    same = paired_difference(_rows("a", hard_easy), _rows("b", hard_easy), "content_acc")
    assert same["verdict"] == "level" and same["ci95"][0] < 0 < same["ci95"][1]


def test_lower_is_better_metrics_name_the_lower_side() -> None:
    a, b = _rows("a", [0.1] * 8, metric="rejected"), _rows("b", [0.6] * 8, metric="rejected")
    r = paired_difference(a, b, "rejected")
    assert r["diff"] < 0 and r["verdict"] == "a"


def test_only_items_both_finished_count() -> None:
    a = _rows("a", [1.0, 1.0, 1.0])
    b = _rows("b", [0.0, 0.0, 0.0])
    b[2]["status"] = "failed"
    r = paired_difference(a, b, "content_acc")
    assert r["items"] == 2
    assert paired_difference(a, [], "content_acc") is None


def test_compare_groups_by_kind() -> None:
    rows = _rows("a", [0.9] * 4) + _rows("b", [0.1] * 4) + _rows("a", [0.2] * 4, kind="novel_content") \
        + _rows("b", [0.2] * 4, kind="novel_content")
    out = compare(rows, "a", "b", metrics=("content_acc",))
    assert list(out) == ["held_out_pair", "novel_content"]
    assert out["held_out_pair"]["content_acc"]["verdict"] == "a"
    assert out["novel_content"]["content_acc"]["verdict"] == "level"


def test_cli_table_json_and_errors(tmp_path, capsys) -> None:
    res = tmp_path / "results.json"
    res.write_text(json.dumps({"rows": _rows("m1", [0.9] * 5) + _rows("m2", [0.2] * 5)}))
    assert main(["world", "compare", str(res), "--a", "m1", "--b", "m2", "--metrics", "content_acc"]) == 0
    table = capsys.readouterr().out
    assert "| held_out_pair |" in table and "**m1**" in table
    assert main(["world", "compare", str(res), "--a", "m1", "--b", "m2", "--metrics", "content_acc", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["held_out_pair"]["content_acc"]["verdict"] == "a"
    assert main(["world", "compare", str(res), "--a", "m1", "--b", "nope"]) == 2
    assert "--b: no rows of method 'nope'" in capsys.readouterr().err
    assert main(["world", "compare", str(tmp_path / "missing.json"), "--a", "m1", "--b", "m2"]) == 2
    assert main(["world", "compare", str(res), "--a", "m1", "--b", "m2", "--kinds", "bogus"]) == 2
    assert "--kinds: unknown 'bogus'" in capsys.readouterr().err


def test_recipes_folder_env_then_project_then_cwd(tmp_path, monkeypatch) -> None:
    """An installed (non-editable) package has no recipes beside it: $CSTOOLKIT_RECIPES or ./recipes."""
    import pytest

    from cstoolkit.errors import UserError
    from cstoolkit.world import bench

    monkeypatch.setenv(bench.RECIPES_ENV, str(tmp_path / "nope"))
    with pytest.raises(UserError, match="CSTOOLKIT_RECIPES: .*nope is not a folder"):
        bench.recipes_folder()
    monkeypatch.setenv(bench.RECIPES_ENV, str(tmp_path))
    assert bench.recipes_folder() == tmp_path
    monkeypatch.delenv(bench.RECIPES_ENV)
    assert bench.recipes_folder() == bench.RECIPES_DIR  # a clone: the project's recipes/
    monkeypatch.setattr(bench, "RECIPES_DIR", tmp_path / "site" / "recipes")  # as if installed elsewhere
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "m.yaml").write_text("method: m\n")
    monkeypatch.chdir(tmp_path)
    assert bench.recipes_folder() == tmp_path / "recipes"
    (tmp_path / "recipes" / "m.yaml").unlink()
    with pytest.raises(UserError, match="set CSTOOLKIT_RECIPES"):
        bench.recipes_folder()


def test_cli_method_at_file_compares_two_runs_of_one_method(tmp_path, capsys) -> None:
    full, ablated = tmp_path / "full.json", tmp_path / "no_kv.json"
    full.write_text(json.dumps({"rows": _rows("csd_var", [0.8] * 6)}))
    ablated.write_text(json.dumps({"rows": _rows("csd_var", [0.3] * 6)}))
    args = ["world", "compare", "--a", f"csd_var@{full}", "--b", f"csd_var@{ablated}", "--metrics", "content_acc"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["held_out_pair"]["content_acc"]
    assert out["verdict"] == "a" and abs(out["diff"] - 0.5) < 1e-6
    assert main(["world", "compare", "--a", f"other@{full}", "--b", f"csd_var@{ablated}"]) == 2
    assert "--a: no rows of method 'other' in the results; one of csd_var" in capsys.readouterr().err
    assert main(["world", "compare", "--a", "csd_var", "--b", f"csd_var@{ablated}"]) == 2


def test_pooling_two_runs_of_one_method_is_refused(tmp_path, capsys) -> None:
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(json.dumps({"rows": _rows("m", [0.8] * 3)}))
    two.write_text(json.dumps({"rows": _rows("m", [0.1] * 3) + _rows("n", [0.5] * 3)}))
    assert main(["world", "compare", str(one), str(two), "--a", "m", "--b", "n"]) == 2
    assert "pick one run with METHOD@RESULTS.json" in capsys.readouterr().err
    assert main(["world", "compare", "--a", f"m@{one}", "--b", f"n@{two}", "--json"]) == 0


def test_collect_units_tables_the_finished_units_of_a_stopped_bench(tmp_path, capsys) -> None:
    """benchmarks/world_device/collect_units.py: a bench killed at its limit leaves bench.json per finished unit;
    the table counts done units only, per kind, and says how many items each row has."""
    from conftest import load_script

    mod = load_script("benchmarks/world_device/collect_units.py")
    for i, (kind, acc, status) in enumerate([("held_out_pair", 1.0, "done"), ("held_out_pair", 0.5, "done"),
                                             ("novel_content", 0.0, "done"), ("held_out_pair", 0.0, "failed")]):
        unit = tmp_path / "m-switti" / f"{kind}-{i}"
        unit.mkdir(parents=True)
        row = {"method": "m-switti", "item": f"{kind}-{i}", "kind": kind, "status": status, "seconds": 10.0,
               "content_acc": acc, "content_samples": 8}
        (unit / "bench.json").write_text(json.dumps({"status": status, "row": row}))
    rows, methods, kinds = mod.collect(tmp_path)
    assert methods == ["m-switti"] and kinds == ["held_out_pair", "novel_content"] and len(rows) == 3
    per_kind = mod.summarise(rows, methods, kinds)
    assert per_kind["m-switti [held_out_pair]"]["n"] == 2
    assert abs(per_kind["m-switti [held_out_pair]"]["content_acc"] - 0.75) < 1e-9
    assert per_kind["m-switti [novel_content]"]["content_acc"] == 0.0
