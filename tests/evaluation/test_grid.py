import pytest

from squeezekv.evaluation.grid import FULL, Cell, EvalConfig, to_json


def grid(**fields) -> EvalConfig:
    return EvalConfig(
        task="ppl",
        model="m",
        budgets=(0.2,),
        policies=("h2o",),
        allocators=("uniform", "squeeze-bits"),
        **fields,
    )


def test_kv_bits_is_a_grid_axis_and_a_bits_planning_allocator_gets_one_cell():
    config = grid(kv_bits=(16, 8, 4), equal_bytes=True)
    assert [cell.key for cell in config.cells()] == [
        FULL,
        "h2o/uniform/0.2",
        "h2o/squeeze-bits/0.2",
        "h2o/uniform/0.2/8bit",
        "h2o/uniform/0.2/4bit",
    ]
    cell = config.cells()[-1]
    assert cell.row == "h2o × uniform × 4-bit"
    squeeze = config.squeeze_config(cell)
    assert (squeeze.kv_bits, squeeze.equal_bytes) == (4, True)


def test_a_16_bit_grid_records_and_keys_as_before():
    config = grid()
    assert "kv_bits" not in to_json(config) and "equal_bytes" not in to_json(config)
    assert Cell("squeezekv", "h2o", "uniform", 0.2).key == "h2o/uniform/0.2"
    assert to_json(grid(kv_bits=(16, 8)))["kv_bits"] == [16, 8]


def test_bad_kv_bits_in_a_grid_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="kv_bits=6 is not supported"):
        grid(kv_bits=(16, 6))
