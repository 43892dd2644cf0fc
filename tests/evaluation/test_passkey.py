from conftest import by_cell

from squeezekv.cli import main


def test_passkey_end_to_end_with_heat_maps(eval_args, tmp_path):
    args = eval_args("passkey") + ["--passkey-lengths", "40,70", "--passkey-depths", "0,1", "--limit", "4"]
    assert main(args) == 0
    out = tmp_path / "passkey"
    cells = by_cell(out)
    assert set(cells["full"]) == {"len40-depth0", "len40-depth1", "len70-depth0", "len70-depth1"}
    for sample, full in cells["full"].items():
        assert full["metrics"]["accuracy"] in (0.0, 1.0)
        assert cells["h2o/squeeze/500"][sample]["prediction"] == full["prediction"]
        assert cells["window/uniform/500"][sample]["prediction"] == full["prediction"]
    maps = sorted(path.name for path in (out / "heatmaps").iterdir())
    assert len(maps) == len(cells) and "full.png" in maps and "h2o_squeeze_0.5.png" in maps
    assert "### accuracy" in (out / "summary.md").read_text()


def test_passkey_rejects_data_files_and_too_long_prompts(eval_args, docs_file, capsys):
    assert main(eval_args("passkey") + ["--data", str(docs_file)]) == 2
    assert "--data is not used" in capsys.readouterr().err
    assert main(eval_args("passkey") + ["--passkey-lengths", "600"]) == 2
    assert "exceeds the model's 256 tokens" in capsys.readouterr().err
