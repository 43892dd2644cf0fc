from transformers import AutoModelForCausalLM

from squeezekv.cli import main


def test_convert_writes_a_folder_that_loads_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "converted"
    assert main(["convert", "models/squeeze-ref-25m", str(out)]) == 0
    assert "written:" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 16
    assert main(["convert", "models/squeeze-ref-25m", str(out)]) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err
